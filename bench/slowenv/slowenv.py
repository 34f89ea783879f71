"""A bring-your-own env that is slow on purpose (bench/bench_scaleout.py, tests/scaleout): each step
costs ``step_ms`` of CPU time (``mode='cpu'``: a busy loop on the thread's CPU clock) or of
waiting (``mode='sleep'``: time.sleep, which scales with runners even on 2 cores). Ship this
directory as a run's ``code:`` and use the env id ``slowenv:SlowEnv-v0``.

The task is easy to learn: reward 1 when the action is 1 exactly when the first observation is
positive; episodes are truncated after ``horizon`` steps.
"""

from __future__ import annotations

import time

import gymnasium as gym
import numpy as np


class SlowEnv(gym.Env):
    def __init__(self, step_ms: float = 1.0, mode: str = "cpu", horizon: int = 100) -> None:
        if mode not in ("cpu", "sleep"):
            raise ValueError(f"mode must be 'cpu' or 'sleep', not {mode!r}")
        self.step_s, self.mode, self.horizon = step_ms / 1000.0, mode, horizon
        self.observation_space = gym.spaces.Box(-1.0, 1.0, (4,), np.float32)
        self.action_space = gym.spaces.Discrete(2)
        self._obs = np.zeros(4, np.float32)
        self._t = 0

    def reset(self, *, seed: int | None = None, options: dict | None = None) -> tuple[np.ndarray, dict]:
        super().reset(seed=seed)
        self._t = 0
        self._obs = self.np_random.uniform(-1, 1, 4).astype(np.float32)
        return self._obs, {}

    def step(self, action: int) -> tuple[np.ndarray, float, bool, bool, dict]:
        if self.mode == "sleep":
            time.sleep(self.step_s)
        else:  # CPU time of this thread, not wall time: a descheduled busy loop would count as work
            end = time.thread_time() + self.step_s
            while time.thread_time() < end:
                pass
        reward = float(int(action) == int(self._obs[0] > 0))
        self._t += 1
        self._obs = self.np_random.uniform(-1, 1, 4).astype(np.float32)
        return self._obs, reward, False, self._t >= self.horizon, {}


gym.register(id="SlowEnv-v0", entry_point=SlowEnv)
