from __future__ import annotations

import pytest

from rlfleet.errors import SpecError
from rlfleet.spec import RunSpec
from rlfleet_agents.configs import DQNConfig, PPOConfig, build_config, validate_config


def test_defaults_documented_and_env_tuned() -> None:
    assert build_config("ppo", "Pendulum-v1").gamma == 0.9
    assert build_config("ppo", "CartPole-v1", {"num_envs": 8}).num_envs == 8
    assert build_config("dqn", "CartPole-v1").hidden_sizes == [128, 128]
    # every field has a docstring line in the source (attribute docstrings)
    import inspect

    for cls in (PPOConfig, DQNConfig):
        sources = [inspect.getsource(c) for c in cls.__mro__ if "__dataclass_fields__" in vars(c)]
        for name in cls.__dataclass_fields__:
            src = next(s for s in sources if f"    {name}:" in s)  # the class that declares it
            after = src.split(f"    {name}:", 1)[1].splitlines()[1].strip()
            assert after.startswith('"""'), f"{cls.__name__}.{name} has no docstring"


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
    code = "import sys, rlfleet_agents.configs, rlfleet_agents.random_agent; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, env={"PYTHONPATH": pythonpath})
