"""The session's throwaway host fixture (``onprem``) lives in session.py and is registered once,
in tests/conftest.py, so tests/onprem and tests/conformance share ONE host per test run. Do not
define or import the fixture here: a second registration would boot a second host."""

from __future__ import annotations

import subprocess
import textwrap
from pathlib import Path

import pytest

from .harness import ANSIBLE_DIR, VENV_BIN, clean_env
from .session import Onprem

__all__ = ["Onprem"]


def pytest_collection_modifyitems(config, items):
    """test_hardening.py looks at what teardown left behind: its host tests run right after
    test_site.py, whose last test tears the shared host down (alone, test_hardening.py tears
    down by itself)."""
    def module(item) -> str:
        return Path(str(item.fspath)).name

    site = [it for it in items if module(it) == "test_site.py"]
    if not site:
        return
    late = [it for it in items if module(it) == "test_hardening.py" and "onprem" in it.keywords]
    rest = [it for it in items if it not in late]
    at = rest.index(site[-1]) + 1
    items[:] = rest[:at] + late + rest[at:]


@pytest.fixture(scope="session")
def rendered(tmp_path_factory) -> Path:
    """offline.yml run once: the roles' templates rendered for an example GPU site, the preflight
    messages for bad settings, the outcomes of hardening_cases.yml (test_offline, test_hardening)."""
    wd = tmp_path_factory.mktemp("offline")
    out = wd / "out"
    out.mkdir()
    (wd / "mnt/rlfleet").mkdir(parents=True)
    (wd / "hosts.ini").write_text(textwrap.dedent(f"""\
        localhost ansible_connection=local ansible_python_interpreter={VENV_BIN / 'python3'}
        [ray_head]
        gpu-head-01 rlfleet_address=10.20.0.11 gpu_count=2
        [ray_workers]
        cpu-node-02 rlfleet_address=10.20.0.12 gpu_count=0
        [rlfleet:children]
        ray_head
        ray_workers
        """))
    playbook = str(Path(__file__).parent / "offline.yml")
    r = subprocess.run([str(VENV_BIN / "ansible-playbook"), "-i", str(wd / "hosts.ini"), playbook,
                        "-e", f"out_dir={out}", "-e", f"nas_client_mount_path={wd / 'mnt/rlfleet'}"],
                       cwd=ANSIBLE_DIR, env=clean_env(wd), capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]
    return out
