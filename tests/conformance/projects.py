"""Bring-your-own projects the scenarios ship with ``code:``: written and built by the test itself."""

from __future__ import annotations

import base64
import hashlib
import textwrap
import zipfile
from pathlib import Path

EXTRA_PKG = "rlf_conformance_extra"
EXTRA_VERSION = "0.1.0"
GOAL_REWARD = 7.0  # only the wheel knows it: a run that reaches the goal proves the wheel was installed
N_LINES = 100_000


def build_wheel(out_dir: Path) -> Path:
    """A tiny pure-Python wheel (zip + dist-info with a correct RECORD), built without setuptools."""
    out_dir.mkdir(parents=True, exist_ok=True)
    dist = f"{EXTRA_PKG}-{EXTRA_VERSION}"
    files = {
        f"{EXTRA_PKG}/__init__.py": f"GOAL_REWARD = {GOAL_REWARD!r}\n\n\ndef goal_reward():\n    return GOAL_REWARD\n",
        f"{dist}.dist-info/METADATA": f"Metadata-Version: 2.1\nName: {EXTRA_PKG}\nVersion: {EXTRA_VERSION}\n",
        f"{dist}.dist-info/WHEEL": "Wheel-Version: 1.0\nGenerator: rlfleet-tests\nRoot-Is-Purelib: true\n"
                                  "Tag: py3-none-any\n",
    }
    record = []
    for name, text in files.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(text.encode()).digest()).rstrip(b"=").decode()
        record.append(f"{name},sha256={digest},{len(text.encode())}")
    record.append(f"{dist}.dist-info/RECORD,,")
    files[f"{dist}.dist-info/RECORD"] = "\n".join(record) + "\n"
    wheel = out_dir / f"{dist}-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, text in files.items():
            zf.writestr(name, text)
    return wheel


def corridor_project(root: Path) -> tuple[Path, str]:
    """A corridor env whose goal reward comes from the wheel; the wheel ships inside the project
    (``wheels/``) and is named by a requirement relative to the code directory."""
    proj = root / "corridor_project"
    proj.mkdir(parents=True)
    wheel = build_wheel(proj / "wheels")
    (proj / "corridor_env.py").write_text(textwrap.dedent('''
        import gymnasium as gym
        import numpy as np
        from gymnasium import spaces

        from rlf_conformance_extra import goal_reward


        class Corridor(gym.Env):
            """Walk right to the end of a corridor of `length` cells; one-hot position observation."""

            def __init__(self, length=5):
                self.length = length
                self.observation_space = spaces.Box(0.0, 1.0, (length,), np.float32)
                self.action_space = spaces.Discrete(2)
                self.pos = 0

            def _obs(self):
                obs = np.zeros(self.length, np.float32)
                obs[min(self.pos, self.length - 1)] = 1.0
                return obs

            def reset(self, *, seed=None, options=None):
                super().reset(seed=seed)
                self.pos = 0
                return self._obs(), {}

            def step(self, action):
                self.pos = max(0, self.pos + (1 if action == 1 else -1))
                done = self.pos >= self.length - 1
                return self._obs(), (goal_reward() if done else 0.0), done, False, {}


        gym.register(id="Corridor-v0", entry_point=Corridor, max_episode_steps=40)
    '''))
    return proj, f"./wheels/{wheel.name}"


def printer_project(root: Path) -> Path:
    """Importing the env module prints N_LINES numbered lines as fast as Python can."""
    proj = root / "printer_project"
    proj.mkdir(parents=True)
    (proj / "printer_env.py").write_text(textwrap.dedent(f'''
        import sys

        import gymnasium as gym

        _out = sys.stdout
        for _start in range(1, {N_LINES} + 1, 10_000):
            _end = min(_start + 10_000, {N_LINES} + 1)
            _out.write("".join(f"conformance-line {{i:06d}}\\n" for i in range(_start, _end)))
        _out.flush()

        gym.register(id="Quiet-v0", entry_point="gymnasium.envs.classic_control.cartpole:CartPoleEnv",
                     max_episode_steps=50)
    '''))
    return proj
