"""The per-run requirements env (a Ray runtime_env plugin): an overlay on the cluster's packages."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest

from rlfleet_agents.requirements_env import build_overlay, env_key


def test_overlay_adds_a_package_and_keeps_the_clusters(tmp_path, make_wheel) -> None:
    wheel = make_wheel(tmp_path / "wheels", "corridor_rewards", "1.0", "def reward(done):\n    return 7.0\n")
    dest = tmp_path / "cache" / env_key([str(wheel)])
    t0 = time.monotonic()
    python = build_overlay([str(wheel)], dest)
    took = time.monotonic() - t0
    code = "import corridor_rewards, numpy, rlfleet, rlfleet_agents; print(corridor_rewards.reward(1))"
    out = subprocess.run([str(python), "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "7.0"
    # the cluster's environment did not change: the package is only in the overlay
    base = subprocess.run([sys.executable, "-c", "import corridor_rewards"], capture_output=True, text=True)
    assert base.returncode != 0
    # cached: a second build is a no-op
    t1 = time.monotonic()
    assert build_overlay([str(wheel)], dest) == python
    assert time.monotonic() - t1 < 1.0 < took + 1.0


def test_a_requirement_that_cannot_install_raises_pips_first_error(tmp_path) -> None:
    bad = tmp_path / "broken-1.0-py3-none-any.whl"
    bad.write_bytes(b"not a zip")
    dest = tmp_path / "cache" / "x"
    with pytest.raises(RuntimeError) as exc:
        build_overlay([str(bad)], dest)
    assert str(exc.value).startswith("ERROR:") and "\n" not in str(exc.value)
    assert not dest.exists()  # nothing half-built is left to be reused
