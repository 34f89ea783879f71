"""Environment construction: any Gymnasium id, including ``module:EnvName-v0`` ids for user envs
(Gymnasium imports ``module``, which registers the env), plus ``env_kwargs``.

Vector envs all use Gymnasium's default NEXT_STEP autoreset: the step after an episode ends
returns the reset observation with reward 0 and ignores the action. Learners must drop that
step (see ``RolloutTracker.valid``); the step that ended the episode already carries the true
final observation, which is what bootstrapping needs on truncation.
"""

from __future__ import annotations

import logging
import os
import sys
from dataclasses import dataclass
from typing import Any

import gymnasium as gym
import numpy as np


class EnvError(ValueError):
    """The environment could not be created (unknown id, bad kwargs, unsupported space)."""


def _ensure_code_dir_on_path() -> None:
    cwd = os.getcwd()
    if cwd not in sys.path:
        sys.path.insert(0, cwd)


def _format_make_error(env_id: str, err: Exception) -> EnvError:
    if isinstance(err, ModuleNotFoundError):
        module = err.name or (env_id.split(":", 1)[0] if ":" in env_id else None)
        return EnvError(
            f"env {env_id!r}: cannot import module {module!r}; ship it with the run's code "
            "directory (RunSpec.code) or install it on the cluster"
        )
    if isinstance(err, TypeError):
        return EnvError(f"env {env_id!r}: env_kwargs not accepted by the env: {err}")
    return EnvError(f"env {env_id!r}: {type(err).__name__}: {err}")


_mujoco_warnings_routed = False


def _route_mujoco_warnings(env_id: str) -> None:
    """MuJoCo writes its warnings to ``MUJOCO_LOG.TXT`` in the working directory (mujoco 4 warns
    that HalfCheetah's XML uses the deprecated ``settotalmass``): send them to Python's logging
    instead, so a run or a test leaves no stray file behind."""
    global _mujoco_warnings_routed
    if _mujoco_warnings_routed:
        return
    try:
        entry = gym.spec(env_id).entry_point
    except Exception:  # unknown id: gym.make reports it
        return
    if not isinstance(entry, str) or not entry.startswith("gymnasium.envs.mujoco"):
        return
    try:
        import mujoco
    except ImportError:  # gym.make names the missing extra
        return
    log = logging.getLogger("mujoco")
    mujoco.set_mju_user_warning(lambda msg: log.warning("%s", msg.strip()))
    _mujoco_warnings_routed = True


def make_env(env_id: str, env_kwargs: dict[str, Any] | None = None, **extra: Any) -> gym.Env:
    _ensure_code_dir_on_path()
    _route_mujoco_warnings(env_id)
    try:
        return gym.make(env_id, **(env_kwargs or {}), **extra)
    except Exception as err:
        raise _format_make_error(env_id, err) from None


def make_vec_env(
    env_id: str, num_envs: int, env_kwargs: dict[str, Any] | None = None, *, mode: str = "auto"
) -> gym.vector.VectorEnv:
    """A vector env; 'auto' prefers the env's native numpy-vectorized implementation."""
    _ensure_code_dir_on_path()
    _route_mujoco_warnings(env_id)
    kwargs = dict(env_kwargs or {})
    tried: list[str] = ["vector_entry_point"] if mode in ("auto", "native") else []
    if mode in ("auto", "sync"):
        tried.append("sync")
    if mode == "async":
        tried.append("async")
    last: Exception | None = None
    for vm in tried:
        try:
            env = gym.make_vec(env_id, num_envs=num_envs, vectorization_mode=vm, **kwargs)
        except gym.error.Error as err:  # no vector entry point (or unknown id): try the next mode
            last = err
            if "vector entry point" in str(err) and mode == "auto":
                continue
            raise _format_make_error(env_id, err) from None
        except Exception as err:
            raise _format_make_error(env_id, err) from None
        mode_attr = env.metadata.get("autoreset_mode")
        if mode_attr is not None and getattr(mode_attr, "name", str(mode_attr)) != "NEXT_STEP":
            env.close()
            raise EnvError(f"env {env_id!r}: only NEXT_STEP autoreset vector envs are supported")
        return env
    raise _format_make_error(env_id, last or RuntimeError("no vectorization mode"))


@dataclass
class SpaceInfo:
    """What a policy needs to know about the env's spaces (stored in the exported model)."""

    obs_shape: list[int]
    obs_low: list[float] | None
    obs_high: list[float] | None
    action_kind: str  # "discrete" | "box"
    n_actions: int  # discrete: number of actions; box: action dimension
    action_low: list[float] | None
    action_high: list[float] | None

    @property
    def obs_dim(self) -> int:
        return int(np.prod(self.obs_shape))

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SpaceInfo:
        return cls(**d)


def _finite_or_none(a: np.ndarray) -> list[float]:
    return [float(x) if np.isfinite(x) else (float("inf") if x > 0 else float("-inf")) for x in a.ravel()]


def space_info(obs_space: gym.Space, act_space: gym.Space, env_id: str = "env") -> SpaceInfo:
    if not isinstance(obs_space, gym.spaces.Box):
        raise EnvError(
            f"env {env_id!r}: observation space {obs_space} is not supported: "
            "the built-in agents need a Box observation space (flatten others with a wrapper)"
        )
    if isinstance(act_space, gym.spaces.Discrete):
        kind, n, lo, hi = "discrete", int(act_space.n), None, None
    elif isinstance(act_space, gym.spaces.Box) and len(act_space.shape) == 1:
        kind, n = "box", int(act_space.shape[0])
        lo, hi = _finite_or_none(act_space.low), _finite_or_none(act_space.high)
    else:
        raise EnvError(
            f"env {env_id!r}: action space {act_space} is not supported "
            "(allowed: Discrete, or a 1-D Box)"
        )
    return SpaceInfo(
        obs_shape=[int(x) for x in obs_space.shape],
        obs_low=_finite_or_none(obs_space.low),
        obs_high=_finite_or_none(obs_space.high),
        action_kind=kind,
        n_actions=n,
        action_low=lo,
        action_high=hi,
    )


def vec_space_info(envs: gym.vector.VectorEnv, env_id: str) -> SpaceInfo:
    return space_info(envs.single_observation_space, envs.single_action_space, env_id)


class EpisodeTracker:
    """Per-env running return/length under NEXT_STEP autoreset.

    ``step(rewards, terminated, truncated)`` returns the mask of transitions that are real
    (not the ignored reset step) and records finished episodes.
    """

    def __init__(self, num_envs: int) -> None:
        self.prev_done = np.zeros(num_envs, dtype=bool)
        self.ret = np.zeros(num_envs, dtype=np.float64)
        self.length = np.zeros(num_envs, dtype=np.int64)
        self.finished_returns: list[float] = []
        self.finished_lengths: list[int] = []

    def step(self, rewards: np.ndarray, terminated: np.ndarray, truncated: np.ndarray) -> np.ndarray:
        valid = ~self.prev_done
        self.ret[valid] += rewards[valid]
        self.length[valid] += 1
        done = (terminated | truncated) & valid
        if done.any():
            self.finished_returns.extend(self.ret[done].tolist())
            self.finished_lengths.extend(self.length[done].tolist())
            self.ret[done] = 0.0
            self.length[done] = 0
        self.prev_done = done
        return valid

    def pop(self) -> tuple[list[float], list[int]]:
        r, ln = self.finished_returns, self.finished_lengths
        self.finished_returns, self.finished_lengths = [], []
        return r, ln

    def state(self) -> dict[str, Any]:
        return {"prev_done": self.prev_done.tolist(), "ret": self.ret.tolist(), "length": self.length.tolist()}
