"""The 'random' agent: uniform random actions, no torch. A fast, real run for SDK tests and a
baseline for comparisons: runs ``budget.steps`` env steps (default 2,000) or ``budget.minutes``,
streams metrics.jsonl and reports its episodes like an eval."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import numpy as np

from rlfleet_agents.envs import EpisodeTracker, make_vec_env
from rlfleet_agents.evaluate import summarize

DEFAULT_STEPS = 2_000
NUM_ENVS = 4


def run_random(env_id: str, env_kwargs: dict[str, Any] | None, seed: int, steps: int | None,
               minutes: float | None, on_row: Callable[[dict[str, Any]], None],
               should_stop: Callable[[], bool]) -> dict[str, Any]:
    envs = make_vec_env(env_id, NUM_ENVS, env_kwargs)
    total = steps or DEFAULT_STEPS
    try:
        envs.action_space.seed(seed)
        envs.reset(seed=seed)
        tracker = EpisodeTracker(NUM_ENVS)
        all_r: list[float] = []
        all_l: list[int] = []
        step = 0
        start = last_row = time.monotonic()
        last_step = 0
        while step < total:
            _, rew, term, trunc, _ = envs.step(envs.action_space.sample())
            step += int(tracker.step(rew, term, trunc).sum())
            now = time.monotonic()
            done = step >= total or (minutes is not None and now - start >= 60 * minutes) or should_stop()
            if now - last_row >= 0.25 or done:
                r, ln = tracker.pop()
                all_r += r
                all_l += ln
                row: dict[str, Any] = {"step": step, "time": round(now - start, 4), "episodes": len(r),
                                       "steps_per_second": round((step - last_step) / max(now - last_row, 1e-9), 1)}
                if all_r:
                    recent = r or all_r[-10:]
                    row.update(episode_return_mean=float(np.mean(all_r[-100:])),
                               episode_return_min=float(np.min(recent)),
                               episode_return_max=float(np.max(recent)),
                               episode_length_mean=float(np.mean(all_l[-100:])))
                on_row(row)
                last_row, last_step = now, step
            if done:
                break
        summary = summarize(all_r, all_l)
        summary["env_steps"] = step
        summary["wall_time_s"] = time.monotonic() - start
        return summary
    finally:
        envs.close()
