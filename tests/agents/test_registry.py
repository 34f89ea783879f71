"""The one agent registry (rlfleet_agents.registry) and the catalog the SDK ships from it
(rlfleet/data/agents.json): no drift, the same messages on both sides of the seam, and the SDK
validating configs without importing rlfleet_agents."""

from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import torch
from click.testing import CliRunner

from rlfleet.agent_catalog import AGENTS, CATALOG_FILE
from rlfleet.agent_config import validate_agent_config
from rlfleet.spec import RunSpec
from rlfleet_agents import registry
from rlfleet_agents.networks import DeterministicPolicy
from rlfleet_agents.trainer import make_algorithm

REPO = Path(__file__).resolve().parents[2]


def test_shipped_catalog_matches_the_models() -> None:
    shipped = json.loads(CATALOG_FILE.read_text())
    assert shipped == registry.catalog(), (
        "sdk/rlfleet/data/agents.json drifted from the agent config models: "
        "run `.venv/bin/python -m rlfleet_agents.registry --write` and commit the file"
    )
    assert CATALOG_FILE.read_text() == registry.catalog_text()  # byte-for-byte: what --write produces


def _probes(prop: dict[str, Any]) -> list[Any]:
    """Values around every bound and type of a field, plus its default."""
    return [prop.get("default"), None, True, False, "x", "auto", "cuda", -1, 0, 1, 0.5, 1.5, 2, 10**6, -0.5,
            [], [0], [1], [64, 64], [4096], [4097], [1] * 8, [1] * 9, [64, "x"], {"a": 1}]


CASES = [(agent, key, value)
         for agent, entry in registry.catalog()["agents"].items() if entry["config"]
         for key, prop in entry["config"]["properties"].items() for value in _probes(prop)]


def _outcome(check: Any, agent: str, config: dict[str, Any]) -> str:
    try:
        check(agent, config)
    except ValueError as err:
        return str(err)
    return "ok"


def test_sdk_and_runtime_validate_alike() -> None:
    """The SDK's model (built from the shipped schema) and the agents' pydantic model accept and
    refuse the same values, with the same message, over every field of every agent."""
    assert len(CASES) > 1000
    outcomes: Counter[str] = Counter()
    for agent, key, value in CASES:
        sdk = _outcome(validate_agent_config, agent, {key: value})
        runtime = _outcome(registry.validate_config, agent, {key: value})
        assert sdk == runtime, (agent, key, value)
        assert sdk == "ok" or sdk.startswith(f"config.{key}: "), sdk
        outcomes["ok" if sdk == "ok" else "refused"] += 1
    assert outcomes["ok"] > 100 and outcomes["refused"] > 500, outcomes
    for bad in ({"x": 1}, {"learning_rat": 1}):
        assert _outcome(validate_agent_config, "random", bad) == _outcome(registry.validate_config, "random", bad)
        assert _outcome(validate_agent_config, "ppo", bad) == _outcome(registry.validate_config, "ppo", bad)


def test_sdk_validates_configs_without_the_agents_package() -> None:
    """With rlfleet_agents impossible to import, a RunSpec still refuses a bad config (it used to
    skip the check when the agents extra was missing) and accepts a good one."""
    code = (
        "import sys\n"
        "sys.modules['rlfleet_agents'] = None  # any import of it now raises ImportError\n"
        "from rlfleet.errors import SpecError\n"
        "from rlfleet.spec import RunSpec\n"
        "RunSpec(kind='train', agent='dqn', config={'buffer_size': 10, 'hidden_sizes': [32]})\n"
        "try:\n"
        "    RunSpec(kind='train', agent='dqn', config={'buffer_size': 0})\n"
        "except SpecError as err:\n"
        "    print(err)\n"
        "print(sorted(m for m in sys.modules if m.startswith('rlfleet_agents')))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                         env={"PYTHONPATH": str(REPO / "sdk")}, check=True).stdout.splitlines()
    assert out == ["invalid run spec: config.buffer_size: must be > 0, got 0", "['rlfleet_agents']"]


def test_every_agent_list_is_the_registry() -> None:
    names = tuple(registry.AGENTS)
    assert names == AGENTS == ("ppo", "dqn", "random")
    with pytest.raises(Exception, match=r"agent: Input should be 'ppo', 'dqn' or 'random'"):
        RunSpec(kind="train", agent="sac")
    from rlfleet.cli import cli

    help_text = CliRunner().invoke(cli, ["run", "--help"]).output
    assert "[" + "|".join(names) + "]" in help_text
    assert registry.learners() == ["ppo", "dqn"]
    with pytest.raises(ValueError, match=r"agent: 'random' has no trainer \(allowed: ppo, dqn\)"):
        make_algorithm("random", "CartPole-v1", None, 0, {}, 100)


@pytest.mark.parametrize("agent", registry.learners())
def test_policy_network_rebuilds_a_saved_policy(agent: str) -> None:
    """run.py rebuilds a policy.pt's network through the registry (eval with policy_format: torch)."""
    algo = make_algorithm(agent, "CartPole-v1", None, 0, {"num_envs": 2, "hidden_sizes": [16]}, 100)
    try:
        cfg = registry.config_to_dict(algo.cfg)
        net = registry.get_agent(agent).load_algorithm().policy_network(algo.info, json.loads(json.dumps(cfg)))
        net.load_state_dict(algo.model.state_dict())  # strict: same layers, same shapes
        obs = torch.randn((3, 4), generator=torch.Generator().manual_seed(0))
        saved, rebuilt = algo.policy()(obs), DeterministicPolicy(net, algo.info.action_kind)(obs)
        assert all(torch.equal(a, b) for a, b in zip(saved, rebuilt, strict=True))
    finally:
        algo.close()
