"""Typed hyperparameters for the built-in agents. Plain dataclasses: importing this module
must stay cheap (no torch, no gymnasium), because the SDK validates ``RunSpec.config`` with
:func:`validate_config` on the submitting machine.

Resolution order for a run: dataclass defaults < tuned defaults for the env (``ENV_DEFAULTS``)
< the run's ``config`` overrides.
"""

from __future__ import annotations

import dataclasses
import difflib
from dataclasses import dataclass, field
from typing import Any


@dataclass
class LoopConfig:
    """What every built-in training loop shares: evaluation, stopping, envs, device, checkpoints."""

    eval_episodes: int = 10
    """Episodes per in-training evaluation (fresh seeds, deterministic actions)."""
    stop_at_return: float | None = None
    """Stop training at the first in-training evaluation whose mean return reaches this."""
    vectorization: str = "auto"
    """'auto' (native numpy-vectorized env if it has one, else sync), 'native', 'sync' or 'async'."""
    device: str = "auto"
    """'auto' (CUDA when available and the run reserves a GPU), 'cpu' or 'cuda'."""
    torch_threads: int = 1
    """torch intra-op threads (a small MLP is as fast on 1 thread as on 2)."""
    checkpoint_every_steps: int = 50_000
    """Write a checkpoint every N env steps (0: only at the end)."""
    checkpoint_every_minutes: float = 5.0
    """... and at least every N minutes (0: no time trigger)."""


@dataclass
class PPOConfig(LoopConfig):
    """Proximal Policy Optimization (clipped objective, GAE), discrete or Box actions."""

    num_envs: int = 16
    """Parallel environments (Gymnasium vector env; numpy-vectorized where the env has one)."""
    num_steps: int = 64
    """Steps per environment per rollout; a rollout is num_envs * num_steps transitions."""
    learning_rate: float = 2.5e-3
    """Adam learning rate at the start of training."""
    anneal_lr: bool = True
    """Decay the learning rate linearly to 0 over the step budget (needs budget.steps)."""
    gamma: float = 0.99
    """Discount factor."""
    gae_lambda: float = 0.95
    """GAE lambda (bias/variance of the advantage estimate)."""
    num_minibatches: int = 4
    """Minibatches per epoch over one rollout."""
    update_epochs: int = 4
    """Passes over each rollout."""
    clip_coef: float = 0.2
    """PPO ratio clip at the start of training."""
    anneal_clip: bool = False
    """Decay the ratio clip (and the value clip) linearly to 0 over the step budget, like
    RL-Zoo's ``clip_range: lin_0.2``: late updates shrink, so a solved policy stays solved."""
    clip_vloss: bool = False
    """Clip the value loss like the policy loss."""
    ent_coef: float = 0.0
    """Entropy bonus weight."""
    vf_coef: float = 0.5
    """Value loss weight."""
    max_grad_norm: float = 0.5
    """Global gradient-norm clip."""
    norm_adv: bool = True
    """Normalize advantages per minibatch."""
    target_kl: float | None = None
    """Stop the epoch loop early when the approximate KL exceeds this (None: never)."""
    hidden_sizes: list[int] = field(default_factory=lambda: [64, 64])
    """Hidden layer widths of the actor and the critic (separate MLPs, tanh)."""
    normalize_obs: bool = False
    """Running mean/std observation normalization, baked into the exported policy."""
    normalize_reward: bool = False
    """Scale rewards by a running estimate of the return's std (training only)."""
    init_log_std: float = 0.0
    """Continuous actions: initial log standard deviation of the Gaussian policy."""
    eval_every: int = 0
    """Evaluate the deterministic policy every N env steps (0: never; runs then export the last policy)."""
    total_steps: int = 200_000
    """Step budget when the run's budget.steps is not set."""


@dataclass
class DQNConfig(LoopConfig):
    """Deep Q-Network (double-DQN target, Huber loss, linear epsilon decay); discrete actions."""

    num_envs: int = 4
    """Parallel environments."""
    learning_rate: float = 1e-3
    """Adam learning rate."""
    buffer_size: int = 50_000
    """Replay buffer capacity (transitions)."""
    batch_size: int = 128
    """Minibatch size per gradient step."""
    gamma: float = 0.99
    """Discount factor."""
    tau: float = 1.0
    """Target network soft-update coefficient (1.0: hard copy)."""
    target_update_every: int = 500
    """Env steps between target network updates."""
    train_every: int = 4
    """Env steps (summed over envs) between gradient steps."""
    gradient_steps: int = 1
    """Gradient steps each time training happens."""
    learning_starts: int = 1_000
    """Env steps of random-ish exploration before learning starts."""
    exploration_fraction: float = 0.2
    """Fraction of the budget over which epsilon decays from start to end."""
    epsilon_start: float = 1.0
    """Initial exploration rate."""
    epsilon_end: float = 0.05
    """Final exploration rate."""
    double_q: bool = True
    """Use the online network to pick the target action (double DQN)."""
    max_grad_norm: float = 10.0
    """Global gradient-norm clip."""
    hidden_sizes: list[int] = field(default_factory=lambda: [64, 64])
    """Hidden layer widths of the Q-network (ReLU)."""
    normalize_obs: bool = False
    """Running mean/std observation normalization (updated during the first 10% of the budget)."""
    eval_every: int = 0
    """Evaluate the greedy policy every N env steps (0: never)."""
    total_steps: int = 100_000
    """Step budget when the run's budget.steps is not set."""


CONFIGS: dict[str, type] = {"ppo": PPOConfig, "dqn": DQNConfig}

# Tuned defaults for classic-control envs (measured here; see docs/agents.md).
ENV_DEFAULTS: dict[str, dict[str, dict[str, Any]]] = {
    "ppo": {
        # RL-Zoo-style annealing (lr and clip to 0) plus reward scaling: measured here over seeds
        # 0-7 at a 100k budget, every later evaluation stayed solved (target_kl 0.015 and no
        # reward scaling: 0.52-0.76 of them); see docs/benchmarks.md.
        "CartPole-v1": {"num_envs": 32, "num_steps": 64, "learning_rate": 2.5e-3, "gamma": 0.99,
                        "gae_lambda": 0.95, "update_epochs": 4, "num_minibatches": 4, "anneal_clip": True,
                        "normalize_reward": True, "total_steps": 150_000},
        "Acrobot-v1": {"num_envs": 16, "num_steps": 64, "learning_rate": 1e-3, "normalize_obs": True,
                       "total_steps": 200_000},
        "MountainCar-v0": {"num_envs": 16, "num_steps": 128, "normalize_obs": True,
                           "learning_rate": 1e-3, "ent_coef": 0.0, "total_steps": 1_000_000},
        "Pendulum-v1": {"num_envs": 8, "num_steps": 256, "learning_rate": 1e-3, "gamma": 0.9,
                        "gae_lambda": 0.95, "update_epochs": 10, "num_minibatches": 8,
                        "normalize_obs": True, "normalize_reward": True, "init_log_std": -0.5,
                        "anneal_lr": True, "total_steps": 150_000},
        "MountainCarContinuous-v0": {"num_envs": 8, "num_steps": 256, "normalize_obs": True,
                                     "learning_rate": 3e-4, "total_steps": 300_000},
    },
    "dqn": {
        "CartPole-v1": {"num_envs": 4, "learning_rate": 2.3e-3, "buffer_size": 100_000, "batch_size": 64,
                        "gamma": 0.99, "target_update_every": 10, "train_every": 128,
                        "gradient_steps": 64, "learning_starts": 1_000, "exploration_fraction": 0.16,
                        "epsilon_end": 0.04, "hidden_sizes": [128, 128], "total_steps": 50_000},
        "Acrobot-v1": {"learning_rate": 6.3e-4, "total_steps": 100_000, "hidden_sizes": [256, 256]},
        "MountainCar-v0": {"learning_rate": 4e-3, "total_steps": 150_000, "hidden_sizes": [256, 256],
                           "exploration_fraction": 0.3},
    },
}

_CHOICES: dict[str, tuple[str, ...]] = {
    "vectorization": ("auto", "native", "sync", "async"),
    "device": ("auto", "cpu", "cuda"),
}
# (min, min_inclusive) bounds for numeric fields: everything numeric is >= 0 unless listed.
_POSITIVE = {
    "num_envs", "num_steps", "learning_rate", "num_minibatches", "update_epochs", "buffer_size",
    "batch_size", "train_every", "gradient_steps", "target_update_every", "torch_threads",
    "total_steps", "eval_episodes",
}
_UNIT = {"gamma", "gae_lambda", "tau", "exploration_fraction", "epsilon_start", "epsilon_end"}
_SIGNED = {"init_log_std", "stop_at_return"}


def _type_name(tp: Any) -> str:
    return {"int": "an integer", "float": "a number", "bool": "true or false", "str": "a string",
            "list[int]": "a list of integers"}.get(str(tp), str(tp))


def _check_value(agent: str, key: str, tp: str, value: Any) -> None:
    where = f"config.{key}"
    optional = "None" in tp
    base = tp.replace(" | None", "")
    if value is None:
        if optional:
            return
        raise ValueError(f"{where}: must be {_type_name(base)}, got null")
    if base == "bool":
        if not isinstance(value, bool):
            raise ValueError(f"{where}: must be true or false, got {value!r}")
        return
    if base == "int":
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"{where}: must be an integer, got {value!r}")
    elif base == "float":
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"{where}: must be a number, got {value!r}")
    elif base == "str":
        if not isinstance(value, str):
            raise ValueError(f"{where}: must be a string, got {value!r}")
        allowed = _CHOICES.get(key)
        if allowed and value not in allowed:
            raise ValueError(f"{where}: {value!r} is not allowed (allowed: {', '.join(allowed)})")
        return
    elif base == "list[int]":
        if (not isinstance(value, list) or not value or len(value) > 8
                or not all(isinstance(v, int) and not isinstance(v, bool) and 1 <= v <= 4096 for v in value)):
            raise ValueError(f"{where}: must be a list of 1-8 layer widths (integers 1..4096), got {value!r}")
        return
    if key in _SIGNED:
        return
    if key in _POSITIVE and value <= 0:
        raise ValueError(f"{where}: must be > 0, got {value!r}")
    if value < 0:
        raise ValueError(f"{where}: must be >= 0, got {value!r}")
    if key in _UNIT and value > 1:
        raise ValueError(f"{where}: must be between 0 and 1, got {value!r}")


def validate_config(agent: str, config: dict[str, Any]) -> None:
    """Check hyperparameter names, types and ranges; raise ValueError naming ``config.<key>``."""
    if agent == "random":
        if config:
            raise ValueError("config: the 'random' agent takes no config")
        return
    cls = CONFIGS.get(agent)
    if cls is None:
        raise ValueError(f"agent: unknown agent {agent!r} (allowed: {', '.join([*CONFIGS, 'random'])})")
    if not isinstance(config, dict):
        raise ValueError(f"config: must be a mapping of hyperparameters, got {type(config).__name__}")
    fields = {f.name: str(f.type) for f in dataclasses.fields(cls)}
    for key, value in config.items():
        if key not in fields:
            hint = difflib.get_close_matches(str(key), list(fields), n=1)
            did = f"did you mean '{hint[0]}'? " if hint else ""
            raise ValueError(
                f"config.{key}: unknown {agent} hyperparameter; {did}(allowed: {', '.join(fields)})"
            )
        _check_value(agent, key, fields[key], value)


def build_config(agent: str, env_id: str, overrides: dict[str, Any] | None = None) -> Any:
    """The resolved config object for a run: defaults < ENV_DEFAULTS[env] < overrides."""
    overrides = dict(overrides or {})
    validate_config(agent, overrides)
    cls = CONFIGS[agent]
    values = {**ENV_DEFAULTS.get(agent, {}).get(env_id.split(":")[-1], {}), **overrides}
    cfg = cls(**values)
    # ints given where floats are expected are fine; normalize for JSON round trips
    return cfg


def config_to_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)
