"""The built-in agents as the SDK knows them, without importing ``rlfleet_agents``: their names and
the JSON schema of each one's hyperparameters, read from ``rlfleet/data/agents.json``. Plain json
(no pydantic), so the CLI can offer the names cheaply; validation is in :mod:`rlfleet.agent_config`.

``rlfleet_agents.registry`` owns the agents (pydantic config model + algorithm class per agent) and
writes that file from its models: ``python -m rlfleet_agents.registry --write``.
tests/agents/test_registry.py fails when the shipped file drifts from the models.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

CATALOG_FILE = Path(__file__).parent / "data" / "agents.json"

Schema = dict[str, Any]


def load_catalog(path: Path = CATALOG_FILE) -> dict[str, Any]:
    """``{"agents": {name: {"description": str, "config": JSON schema, or null: takes no config}}}``."""
    catalog: dict[str, Any] = json.loads(path.read_text())
    return catalog


CATALOG = load_catalog()
AGENTS: tuple[str, ...] = tuple(CATALOG["agents"])
"""Names of the built-in agents, in the registry's order."""


def config_schema(agent: str) -> Schema | None:
    """The JSON schema of ``agent``'s hyperparameters (None: the agent takes no config)."""
    if agent not in CATALOG["agents"]:
        raise ValueError(f"agent: unknown agent {agent!r} (allowed: {', '.join(AGENTS)})")
    schema: Schema | None = CATALOG["agents"][agent]["config"]
    return schema
