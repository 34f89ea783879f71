"""env_runners = 0 keeps PPO as it was (no Ray, the learner steps its own envs); the runner's rollout
is the learner's own function (no cluster needed)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from rlfleet_agents.configs import PPOConfig
from rlfleet_agents.distributed import EnvRunner
from rlfleet_agents.ppo import PPO
from rlfleet_agents.registry import build_config


def _params(a: PPO) -> np.ndarray:
    return torch.cat([p.detach().flatten() for p in a.model.parameters()]).numpy().copy()


def test_zero_runners_is_the_default_and_trains_locally_and_deterministically() -> None:
    assert PPOConfig().env_runners == 0
    schema = json.loads((Path(__file__).resolve().parents[2] / "sdk/rlfleet/data/agents.json").read_text())
    assert "env_runners" in json.dumps(schema)  # the SDK validates the new fields (agents.json regenerated)
    runs = []
    for _ in range(2):
        cfg = build_config("ppo", "CartPole-v1", {"num_envs": 4, "num_steps": 32})
        assert isinstance(cfg, PPOConfig)
        a = PPO(cfg, "CartPole-v1", None, 5, 10_000, torch.device("cpu"))
        assert a.runners is None and a.envs is not None
        for _ in range(2):
            a.train_iteration()
        runs.append((a.global_step, _params(a)))
        a.close()
    assert runs[0][0] == runs[1][0] > 0
    assert np.array_equal(runs[0][1], runs[1][1])


def test_a_runner_collects_what_the_learner_would_with_the_same_seed() -> None:
    """An EnvRunner (here in-process, no Ray) with the learner's seed produces the learner's batch."""
    cfg = build_config("ppo", "CartPole-v1", {"num_envs": 4, "num_steps": 16})
    assert isinstance(cfg, PPOConfig)
    learner = PPO(cfg, "CartPole-v1", None, 9, 10_000, torch.device("cpu"))
    runner = EnvRunner(cfg, "CartPole-v1", None, 9)
    weights = {k: v.clone() for k, v in learner.model.state_dict().items()}
    got = runner.sample(weights)["batch"]
    want = learner.collect_rollout()
    for k in want:
        assert np.array_equal(got[k], want[k]), k
    learner.close()
