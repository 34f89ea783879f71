"""rlfleet_agents: what runs on a target (train / eval / deploy). Entry point:
``python -m rlfleet_agents.run`` (see run.py for the environment contract)."""
