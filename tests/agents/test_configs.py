from __future__ import annotations

import pytest

from rlfleet.errors import SpecError
from rlfleet.spec import RunSpec
from rlfleet_agents.configs import DQNConfig, PPOConfig
from rlfleet_agents.registry import build_config, validate_config


def test_defaults_documented_and_env_tuned() -> None:
    assert build_config("ppo", "Pendulum-v1").gamma == 0.9
    assert build_config("ppo", "CartPole-v1", {"num_envs": 8}).num_envs == 8
    assert build_config("dqn", "CartPole-v1").hidden_sizes == [128, 128]
    # every field has a docstring in the source (attribute docstrings become its description)
    for cls in (PPOConfig, DQNConfig):
        for name, info in cls.model_fields.items():
            assert info.description and len(info.description) > 10, f"{cls.__name__}.{name} has no docstring"


@pytest.mark.parametrize(
    ("agent", "config", "needle"),
    [
        ("ppo", {"learning_rat": 1e-3},
         "config.learning_rat: unknown ppo hyperparameter; did you mean 'learning_rate'?"),
        ("ppo", {"num_envs": "8"}, "config.num_envs: must be an integer"),
        ("ppo", {"num_envs": 0}, "config.num_envs: must be > 0"),
        ("ppo", {"gamma": 1.5}, "config.gamma: must be between 0 and 1"),
        ("ppo", {"device": "tpu"}, "config.device: 'tpu' is not allowed (allowed: auto, cpu, cuda)"),
        ("ppo", {"hidden_sizes": [64, "x"]}, "config.hidden_sizes: must be a list"),
        ("ppo", {"hidden_sizes": [64, 5000]}, "config.hidden_sizes: must be a list of 1-8 integers between 1 and 4096"),
        ("ppo", {"target_kl": -1}, "config.target_kl: must be >= 0, got -1"),
        ("ppo", {"device": None}, "config.device: must be a string, got null"),
        ("dqn", {"learning_rate": True}, "config.learning_rate: must be a number, got True"),
        ("random", {"x": 1}, "config: the 'random' agent takes no config"),
        ("sac", {}, "agent: unknown agent 'sac' (allowed: ppo, dqn, random)"),
        ("dqn", {"anneal_lr": True}, "config.anneal_lr: unknown dqn hyperparameter"),
        ("ppo", {"normalize_obs": 1}, "config.normalize_obs: must be true or false"),
    ],
)
def test_validate_config_names_the_key(agent: str, config: dict, needle: str) -> None:
    with pytest.raises(ValueError) as err:
        validate_config(agent, config)
    assert needle in str(err.value)


def test_runspec_rejects_bad_config_before_submit() -> None:
    with pytest.raises(SpecError, match=r"config\.clip_coeff: unknown ppo hyperparameter; did you mean 'clip_coef'"):
        RunSpec(kind="train", agent="ppo", config={"clip_coeff": 0.1})
    RunSpec(kind="train", agent="ppo", config={"clip_coef": 0.1, "target_kl": None})


def test_configs_import_no_torch() -> None:
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[2]
    pythonpath = f"{repo / 'sdk'}:{repo / 'agents'}"
    code = ("import sys, rlfleet_agents.registry, rlfleet_agents.random_agent, rlfleet_agents.run; "
            "assert 'torch' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True, env={"PYTHONPATH": pythonpath})
