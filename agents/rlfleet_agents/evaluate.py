"""Deterministic evaluation: N episodes on fresh seeds, one episode per vector-env slot.

``act`` is any ``(obs batch float32) -> actions`` function (ONNX Runtime session, torch module
or random), so this module imports neither torch nor onnxruntime.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np

from rlfleet_agents.envs import make_vec_env

# Evaluation seeds are far from training seeds (training uses seed .. seed+num_envs).
EVAL_SEED_OFFSET = 1_000_003


def evaluate(
    act: Callable[[np.ndarray], np.ndarray],
    env_id: str,
    episodes: int,
    *,
    seed: int,
    env_kwargs: dict[str, Any] | None = None,
    max_parallel: int = 32,
    vectorization: str = "auto",
) -> dict[str, Any]:
    returns: list[float] = []
    lengths: list[int] = []
    done_total = 0
    while done_total < episodes:
        n = min(max_parallel, episodes - done_total)
        envs = make_vec_env(env_id, n, env_kwargs, mode=vectorization)
        try:
            # one int seed: native vector envs accept only that; sync/async derive seed+i per env
            obs, _ = envs.reset(seed=seed + EVAL_SEED_OFFSET + done_total)
            ret = np.zeros(n)
            length = np.zeros(n, dtype=np.int64)
            active = np.ones(n, dtype=bool)
            while active.any():
                actions = act(np.asarray(obs, dtype=np.float32))
                obs, rew, term, trunc, _ = envs.step(actions)
                ret[active] += rew[active]
                length[active] += 1
                active &= ~(term | trunc)
            returns.extend(ret.tolist())
            lengths.extend(length.tolist())
        finally:
            envs.close()
        done_total += n
    return summarize(returns, lengths)


def summarize(returns: list[float], lengths: list[int]) -> dict[str, Any]:
    arr = np.asarray(returns, dtype=np.float64)
    return {
        "episodes": len(returns),
        "mean": float(arr.mean()) if len(arr) else math.nan,
        "std": float(arr.std()) if len(arr) else math.nan,
        "min": float(arr.min()) if len(arr) else math.nan,
        "max": float(arr.max()) if len(arr) else math.nan,
        "returns": [float(x) for x in returns],
        "lengths": [int(x) for x in lengths],
        "length_mean": float(np.mean(lengths)) if lengths else math.nan,
    }
