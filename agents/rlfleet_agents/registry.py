"""The one list of built-in agents: for each, its config model, its tuned per-env defaults and its
algorithm class (behind the :class:`Algorithm` protocol). Everything that names agents reads this:
run.py, trainer.py, and, through ``rlfleet/data/agents.json`` written from here, the SDK
(``RunSpec.agent``, ``rlfleet run --agent``, config validation before submit).

Add an agent: a config model in configs.py, a module with its algorithm class, one entry in
``AGENTS`` below, then ``python -m rlfleet_agents.registry --write`` to ship its schema to the SDK.

Importing this module stays cheap (pydantic, no torch): algorithm classes are imported when a run
trains.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from rlfleet.agent_catalog import CATALOG_FILE
from rlfleet.agent_config import check_config
from rlfleet_agents.configs import DQN_ENV_DEFAULTS, PPO_ENV_DEFAULTS, DQNConfig, LoopConfig, PPOConfig

if TYPE_CHECKING:
    import numpy as np
    import torch

    from rlfleet_agents.envs import EpisodeTracker, SpaceInfo
    from rlfleet_agents.networks import DeterministicPolicy


class Algorithm(Protocol):
    """What the training loop (trainer.train), checkpoints and the export need from a learner."""

    # read-only here (properties), so a learner may hold a narrower type (model: ActorCritic)
    @property
    def cfg(self) -> LoopConfig: ...  # the agent's own subclass
    @property
    def env_id(self) -> str: ...
    @property
    def seed(self) -> int: ...
    @property
    def device(self) -> torch.device: ...
    @property
    def total_steps(self) -> int: ...
    @property
    def global_step(self) -> int: ...
    @property
    def tracker(self) -> EpisodeTracker: ...
    @property
    def info(self) -> SpaceInfo: ...
    @property
    def model(self) -> torch.nn.Module: ...
    @property
    def obs(self) -> np.ndarray: ...  # the current observations (sampled for the export parity check)

    def train_iteration(self) -> dict[str, float]: ...
    def policy(self) -> DeterministicPolicy: ...
    def state_dict(self) -> dict[str, Any]: ...
    def load_state_dict(self, s: dict[str, Any]) -> None: ...
    def close(self) -> None: ...


class AlgorithmClass(Protocol):
    """An algorithm's class: builds a learner, and rebuilds its policy network from a policy.pt."""

    def __call__(self, cfg: Any, env_id: str, env_kwargs: dict[str, Any] | None, seed: int,
                 total_steps: int, device: torch.device) -> Algorithm: ...

    def policy_network(self, info: SpaceInfo, cfg: dict[str, Any]) -> torch.nn.Module: ...


@dataclass(frozen=True)
class Agent:
    name: str
    description: str
    config: type[LoopConfig] | None = None
    """The hyperparameter model; None: the agent takes no config."""
    env_defaults: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    """Tuned overrides per Gymnasium env id (between the model's defaults and the run's config)."""
    algorithm: str | None = None
    """'module:Class' of the learner; None: the agent does not learn (no checkpoint, no policy)."""

    def load_algorithm(self) -> AlgorithmClass:
        if self.algorithm is None:
            raise ValueError(f"agent: {self.name!r} has no trainer (allowed: {', '.join(learners())})")
        module, _, cls = self.algorithm.partition(":")
        loaded: AlgorithmClass = getattr(importlib.import_module(module), cls)
        return loaded


AGENTS: dict[str, Agent] = {a.name: a for a in (
    Agent("ppo", "Proximal Policy Optimization (clipped objective, GAE); Discrete or 1-D Box actions",
          PPOConfig, PPO_ENV_DEFAULTS, "rlfleet_agents.ppo:PPO"),
    Agent("dqn", "Deep Q-Network (double-DQN target, Huber loss, epsilon-greedy); Discrete actions",
          DQNConfig, DQN_ENV_DEFAULTS, "rlfleet_agents.dqn:DQN"),
    Agent("random", "uniform random actions (a baseline; no torch, no policy)"),
)}


def get_agent(name: str) -> Agent:
    if name not in AGENTS:
        raise ValueError(f"agent: unknown agent {name!r} (allowed: {', '.join(AGENTS)})")
    return AGENTS[name]


def learners() -> list[str]:
    """Agents that train a policy (and export policy.onnx)."""
    return [a.name for a in AGENTS.values() if a.algorithm is not None]


def validate_config(agent: str, config: Any) -> None:
    """Check hyperparameter names, types and ranges; raise ValueError naming ``config.<key>``."""
    a = get_agent(agent)
    check_config(agent, config, None if a.config is None else a.config.model_json_schema(), a.config)


def build_config(agent: str, env_id: str, overrides: dict[str, Any] | None = None) -> LoopConfig:
    """The resolved config of a run: model defaults < the agent's defaults for the env < overrides."""
    overrides = dict(overrides or {})
    validate_config(agent, overrides)
    a = get_agent(agent)
    if a.config is None:
        raise ValueError(f"agent: {agent!r} has no hyperparameters (allowed: {', '.join(learners())})")
    return a.config.model_validate({**a.env_defaults.get(env_id.split(":")[-1], {}), **overrides})


def config_to_dict(cfg: LoopConfig) -> dict[str, Any]:
    return cfg.model_dump(mode="json")


def catalog() -> dict[str, Any]:
    """What the SDK ships as rlfleet/data/agents.json: names, descriptions, config JSON schemas."""
    return {"agents": {a.name: {"description": a.description,
                                "config": None if a.config is None else a.config.model_json_schema()}
                       for a in AGENTS.values()}}


def catalog_text() -> str:
    return json.dumps(catalog(), indent=1, sort_keys=False) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m rlfleet_agents.registry",
                                description="Print (or --write) the agent catalog the SDK ships.")
    p.add_argument("--write", action="store_true", help=f"write {CATALOG_FILE}")
    args = p.parse_args(argv)
    if args.write:
        Path(CATALOG_FILE).write_text(catalog_text())
        print(f"wrote {CATALOG_FILE}")
    else:
        sys.stdout.write(catalog_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

if TYPE_CHECKING:  # mypy proves every registered class meets the protocols (no runtime import of torch)
    from rlfleet_agents.dqn import DQN
    from rlfleet_agents.ppo import PPO

    _PPO: AlgorithmClass = PPO
    _DQN: AlgorithmClass = DQN
