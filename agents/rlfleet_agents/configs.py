"""Typed hyperparameters of the built-in agents: pydantic models, one per learning agent.

Importing this module stays cheap (pydantic only: no torch, no gymnasium). Each field's
docstring becomes its description in the JSON schema that the SDK ships
(``rlfleet/data/agents.json``, written by ``python -m rlfleet_agents.registry --write``), which
is how the SDK validates ``RunSpec.config`` without importing this package.

Resolution order for a run: model defaults < tuned defaults for the env (``PPO_ENV_DEFAULTS`` /
``DQN_ENV_DEFAULTS``) < the run's ``config`` overrides (see :func:`rlfleet_agents.registry.build_config`).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

Positive = Annotated[int, Field(gt=0)]
Count = Annotated[int, Field(ge=0)]
Fraction = Annotated[float, Field(ge=0, le=1)]
NonNegative = Annotated[float, Field(ge=0)]
Rate = Annotated[float, Field(gt=0)]
LayerWidths = Annotated[list[Annotated[int, Field(ge=1, le=4096)]], Field(min_length=1, max_length=8)]


class LoopConfig(BaseModel):
    """What every built-in training loop shares: evaluation, stopping, envs, device, checkpoints."""

    # strict: "8" is not an integer and 1 is not true; an int is still accepted for a float
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True, use_attribute_docstrings=True)

    eval_episodes: Positive = 10
    """Episodes per in-training evaluation (fresh seeds, deterministic actions)."""
    stop_at_return: float | None = None
    """Stop training at the first in-training evaluation whose mean return reaches this."""
    vectorization: Literal["auto", "native", "sync", "async"] = "auto"
    """'auto' (native numpy-vectorized env if it has one, else sync), 'native', 'sync' or 'async'."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """'auto' (CUDA when available and the run reserves a GPU), 'cpu' or 'cuda'."""
    torch_threads: Positive = 1
    """torch intra-op threads (a small MLP is as fast on 1 thread as on 2)."""
    checkpoint_every_steps: Count = 50_000
    """Write a checkpoint every N env steps (0: only at the end)."""
    checkpoint_every_minutes: NonNegative = 5.0
    """... and at least every N minutes (0: no time trigger)."""
    eval_every: Count = 0
    """Evaluate the deterministic policy every N env steps (0: never)."""
    total_steps: Positive = 100_000
    """Step budget when the run's budget.steps is not set (each agent sets its own default)."""


class PPOConfig(LoopConfig):
    """Proximal Policy Optimization (clipped objective, GAE), discrete or Box actions."""

    num_envs: Positive = 16
    """Parallel environments (Gymnasium vector env; numpy-vectorized where the env has one)."""
    num_steps: Positive = 64
    """Steps per environment per rollout; a rollout is num_envs * num_steps transitions."""
    learning_rate: Rate = 2.5e-3
    """Adam learning rate at the start of training."""
    anneal_lr: bool = True
    """Decay the learning rate linearly to 0 over the step budget (needs budget.steps)."""
    gamma: Fraction = 0.99
    """Discount factor."""
    gae_lambda: Fraction = 0.95
    """GAE lambda (bias/variance of the advantage estimate)."""
    num_minibatches: Positive = 4
    """Minibatches per epoch over one rollout."""
    update_epochs: Positive = 4
    """Passes over each rollout."""
    clip_coef: NonNegative = 0.2
    """PPO ratio clip at the start of training."""
    anneal_clip: bool = False
    """Decay the ratio clip (and the value clip) linearly to 0 over the step budget, like
    RL-Zoo's ``clip_range: lin_0.2``: late updates shrink, so a solved policy stays solved."""
    clip_vloss: bool = False
    """Clip the value loss like the policy loss."""
    ent_coef: NonNegative = 0.0
    """Entropy bonus weight."""
    vf_coef: NonNegative = 0.5
    """Value loss weight."""
    max_grad_norm: NonNegative = 0.5
    """Global gradient-norm clip."""
    norm_adv: bool = True
    """Normalize advantages per minibatch."""
    target_kl: NonNegative | None = None
    """Stop the epoch loop early when the approximate KL exceeds this (None: never)."""
    hidden_sizes: LayerWidths = [64, 64]  # pydantic copies a mutable default per instance
    """Hidden layer widths of the actor and the critic (separate MLPs, tanh)."""
    normalize_obs: bool = False
    """Running mean/std observation normalization, baked into the exported policy."""
    normalize_reward: bool = False
    """Scale rewards by a running estimate of the return's std (training only)."""
    init_log_std: float = 0.0
    """Continuous actions: initial log standard deviation of the Gaussian policy."""
    env_runners: Annotated[int, Field(ge=0, le=256)] = 0
    """Ray actors that collect the rollouts, spread over the cluster's nodes, each with its own
    num_envs vectorized envs (seeded distinctly); the learner (this run's process, placed by
    resources.gpus) broadcasts the weights every iteration. 0: the learner steps the envs itself."""
    runner_cpus: Annotated[float, Field(gt=0, le=64)] = 1.0
    """CPUs each env runner reserves on its node (env_runners > 0)."""
    eval_every: Count = 0
    """Evaluate the deterministic policy every N env steps (0: never; runs then export the last policy)."""
    total_steps: Positive = 200_000
    """Step budget when the run's budget.steps is not set."""


class DQNConfig(LoopConfig):
    """Deep Q-Network (double-DQN target, Huber loss, linear epsilon decay); discrete actions."""

    num_envs: Positive = 4
    """Parallel environments."""
    learning_rate: Rate = 1e-3
    """Adam learning rate."""
    buffer_size: Positive = 50_000
    """Replay buffer capacity (transitions)."""
    batch_size: Positive = 128
    """Minibatch size per gradient step."""
    gamma: Fraction = 0.99
    """Discount factor."""
    tau: Fraction = 1.0
    """Target network soft-update coefficient (1.0: hard copy)."""
    target_update_every: Positive = 500
    """Env steps between target network updates."""
    train_every: Positive = 4
    """Env steps (summed over envs) between gradient steps."""
    gradient_steps: Positive = 1
    """Gradient steps each time training happens."""
    learning_starts: Count = 1_000
    """Env steps of random-ish exploration before learning starts."""
    exploration_fraction: Fraction = 0.2
    """Fraction of the budget over which epsilon decays from start to end."""
    epsilon_start: Fraction = 1.0
    """Initial exploration rate."""
    epsilon_end: Fraction = 0.05
    """Final exploration rate."""
    double_q: bool = True
    """Use the online network to pick the target action (double DQN)."""
    max_grad_norm: NonNegative = 10.0
    """Global gradient-norm clip."""
    hidden_sizes: LayerWidths = [64, 64]  # pydantic copies a mutable default per instance
    """Hidden layer widths of the Q-network (ReLU)."""
    normalize_obs: bool = False
    """Running mean/std observation normalization (updated during the first 10% of the budget)."""
    eval_every: Count = 0
    """Evaluate the greedy policy every N env steps (0: never)."""
    total_steps: Positive = 100_000
    """Step budget when the run's budget.steps is not set."""


# Tuned defaults for classic-control envs (measured here; see docs/agents.md), per env id.
EnvDefaults = dict[str, dict[str, Any]]

_MUJOCO_PPO: dict[str, Any] = {
    "num_envs": 1, "num_steps": 2048, "learning_rate": 3e-4, "anneal_lr": True, "gamma": 0.99,
    "gae_lambda": 0.95, "num_minibatches": 32, "update_epochs": 10, "clip_coef": 0.2, "clip_vloss": True,
    "ent_coef": 0.0, "vf_coef": 0.5, "max_grad_norm": 0.5, "hidden_sizes": [64, 64], "normalize_obs": True,
    "normalize_reward": True, "init_log_std": 0.0, "total_steps": 1_000_000,
}

PPO_ENV_DEFAULTS: EnvDefaults = {
    # RL-Zoo-style annealing (lr and clip to 0) plus reward scaling keep a solved policy solved
    # (target_kl 0.015 and no reward scaling: 0.52-0.76 of the later evaluations). Short rollouts
    # (16 x 32) with 10 epochs x 2 minibatches solve in about a third of the env steps of the
    # earlier 32 x 64, 4 x 4 (median ~20k, SB3 + RL-Zoo 30k); the numpy update (ppo_numpy.py)
    # keeps the wall time low. See docs/benchmarks.md "Agents".
    "CartPole-v1": {"num_envs": 16, "num_steps": 32, "learning_rate": 2.5e-3, "gamma": 0.99,
                    "gae_lambda": 0.95, "update_epochs": 10, "num_minibatches": 2, "anneal_clip": True,
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
    # MuJoCo: CleanRL's ppo_continuous_action.py defaults (1 env, 2048-step rollouts, 10 epochs of
    # 32 minibatches, lr 3e-4 annealed, clipped value loss, observation and reward normalization);
    # measured against SB3 + RL-Zoo in bench/bench_mujoco.py (docs/benchmarks.md "MuJoCo").
    "Hopper-v5": _MUJOCO_PPO,
    # HalfCheetah: CleanRL's settings with a narrower initial policy (std e^-1) and RL-Zoo's
    # shorter horizon (gamma 0.98, GAE 0.92). At 1M steps (seed 0 / 1 / 2): 6358 / 7528 / 6689,
    # against 1782 / 1891 with CleanRL's std 1 and gamma 0.99 (SB3 + RL-Zoo: 6032 / 6258 on seeds 0, 1).
    "HalfCheetah-v5": {**_MUJOCO_PPO, "init_log_std": -1.0, "gamma": 0.98, "gae_lambda": 0.92},
}

DQN_ENV_DEFAULTS: EnvDefaults = {
    "CartPole-v1": {"num_envs": 4, "learning_rate": 2.3e-3, "buffer_size": 100_000, "batch_size": 64,
                    "gamma": 0.99, "target_update_every": 10, "train_every": 128,
                    "gradient_steps": 64, "learning_starts": 1_000, "exploration_fraction": 0.16,
                    "epsilon_end": 0.04, "hidden_sizes": [128, 128], "total_steps": 50_000},
    "Acrobot-v1": {"learning_rate": 6.3e-4, "total_steps": 100_000, "hidden_sizes": [256, 256]},
    "MountainCar-v0": {"learning_rate": 4e-3, "total_steps": 150_000, "hidden_sizes": [256, 256],
                       "exploration_fraction": 0.3},
}
