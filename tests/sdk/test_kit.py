"""rlfleet.kit: the wheel of a checkout, built once per source state, reproducible, with the node
constraints; run as a script the way the Ansible controller runs it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest

from rlfleet import kit as kitmod

REPO = Path(__file__).resolve().parents[2]
KIT_PY = REPO / "sdk" / "rlfleet" / "kit.py"


def _copy_checkout(dest: Path) -> Path:
    """The files the wheel is built from, copied with fresh (different) timestamps."""
    for rel in kitmod.source_files(REPO):
        (dest / rel).parent.mkdir(parents=True, exist_ok=True)
        (dest / rel).write_bytes((REPO / rel).read_bytes())
    return dest


@pytest.mark.slow
def test_built_once_per_source_state_and_reproducible(tmp_path: Path) -> None:
    src = _copy_checkout(tmp_path / "checkout")  # a frozen copy: the shared tree may change meanwhile
    t0 = time.monotonic()
    first = kitmod.build_kit(src, cache_dir=tmp_path / "cache-a")
    built_s = time.monotonic() - t0
    t0 = time.monotonic()
    again = kitmod.build_kit(src / "sdk" / "rlfleet", cache_dir=tmp_path / "cache-a")  # any path inside
    cached_s = time.monotonic() - t0
    assert again == first and again.wheel.stat().st_mtime_ns == first.wheel.stat().st_mtime_ns
    assert cached_s < built_s / 3, (cached_s, built_s)
    assert first.wheel.name == f"rlfleet-{first.version}-py3-none-any.whl" and first.version == "0.1.0"
    assert first.sha256 == kitmod.sha256_file(first.wheel)
    with zipfile.ZipFile(first.wheel) as zf:
        names = set(zf.namelist())
        assert "rlfleet/kit.py" in names and "rlfleet_agents/run.py" in names
        assert not any("__pycache__" in n or n.endswith(".pyc") for n in names)
        assert {zi.date_time for zi in zf.infolist()} == {(1980, 1, 1, 0, 0, 0)}
    # another machine, another clone (new timestamps), an empty cache: the same bytes
    os.utime(src / "pyproject.toml", (1e9, 1e9))
    other = kitmod.build_kit(_copy_checkout(tmp_path / "clone2"), cache_dir=tmp_path / "cache-b")
    assert other.sha256 == first.sha256
    # a changed source is a new kit
    (src / "agents" / "rlfleet_agents" / "extra_module.py").write_text("X = 1\n")
    changed = kitmod.build_kit(src, cache_dir=tmp_path / "cache-a")
    assert changed.sha256 != first.sha256 and changed.source_digest != first.source_digest
    with zipfile.ZipFile(changed.wheel) as zf:
        assert "rlfleet_agents/extra_module.py" in zf.namelist()


def test_node_constraints_drop_local_labels_and_hold_for_the_frozen_python_only() -> None:
    text = "# comment\ntorch==2.13.0+cpu\nray==2.60.0\nnumpy==2.4.6 ; sys_platform == 'linux'\n"
    assert kitmod.node_constraints(text, "3.11") == (
        '# comment\ntorch==2.13.0 ; python_version == "3.11"\nray==2.60.0 ; python_version == "3.11"\n'
        "numpy==2.4.6 ; (sys_platform == 'linux') and python_version == \"3.11\"\n")
    pins = kitmod.node_constraints((REPO / "constraints.txt").read_text())
    assert "+cpu" not in pins and f'\ntorch==2.13.0 ; python_version == "{kitmod.frozen_python()}"\n' in pins
    assert not any(line.split("==")[0].lower() == "rlfleet" for line in pins.splitlines())


def test_node_constraints_pin_the_frozen_python_and_leave_others_free() -> None:
    """numpy 2.4 has no Python 3.10 build (Ubuntu 22.04 images): pins must not apply there."""
    from pip._vendor.packaging.requirements import Requirement

    line = kitmod.node_constraints("numpy==2.4.6\n", "3.11").strip()
    req = Requirement(line)
    assert req.marker.evaluate({"python_version": "3.11"}) is True
    assert req.marker.evaluate({"python_version": "3.10"}) is False


def test_cache_entry_that_no_longer_matches_is_rebuilt(tmp_path: Path) -> None:
    entry = tmp_path / "e"
    entry.mkdir()
    (entry / "rlfleet-0.1.0-py3-none-any.whl").write_bytes(b"tampered")
    (entry / "constraints.txt").write_text("x\n")
    (entry / "kit.json").write_text(json.dumps({
        "wheel_name": "rlfleet-0.1.0-py3-none-any.whl", "sha256": "0" * 64, "version": "0.1.0",
        "constraints_sha256": kitmod.sha256_file(entry / "constraints.txt"), "source_digest": "d"}))
    assert kitmod._cached(entry) is None


def test_script_prints_the_kit_as_json(tmp_path: Path) -> None:
    """How the ray_runtime role runs it on the controller: python -I <checkout>/sdk/rlfleet/kit.py --json."""
    env = {**os.environ, "RLFLEET_KIT_CACHE": str(tmp_path / "cache")}
    r = subprocess.run([sys.executable, "-I", str(KIT_PY), "--json"], capture_output=True, text=True,
                       timeout=600, env=env)
    assert r.returncode == 0, r.stderr
    d = json.loads(r.stdout)
    assert Path(d["wheel"]).is_file() and kitmod.sha256_file(Path(d["wheel"])) == d["sha256"]
    assert kitmod.sha256_file(Path(d["constraints"])) == d["constraints_sha256"]
    assert Path(d["wheel"]).parent.parent == tmp_path / "cache"


@pytest.mark.parametrize(("args", "message"), [
    (["--source", "/"], "is not inside an rlfleet checkout"),
    (["--wheel", "/etc/hostname"], "is not an rlfleet wheel file"),
])
def test_bad_input_is_one_line_no_traceback(tmp_path: Path, args: list[str], message: str) -> None:
    env = {**os.environ, "RLFLEET_KIT_CACHE": str(tmp_path / "cache")}
    r = subprocess.run([sys.executable, "-I", str(KIT_PY), *args], capture_output=True, text=True, timeout=60,
                       env=env)
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr.count("\n") == 1 and r.stderr.startswith("rlfleet kit: error: ") and message in r.stderr
    assert "Traceback" not in r.stderr
