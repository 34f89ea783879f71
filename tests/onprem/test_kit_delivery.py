"""The on-prem kit delivery chain: site.yml builds the wheel of this checkout on the controller,
copies it with its constraints, checks the sha256 on the host and installs it by path.

On the shared throwaway host (first converge, before test_site.py's): the installed `rlfleet` is
byte for byte the shipped wheel, although a higher-version `rlfleet` wheel sits in the host's
--find-links directory (harness.decoy_wheel). Offline: naming rlfleet in ray_runtime_packages is
refused with the way out.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import subprocess
import textwrap
import zipfile
from pathlib import Path

import pytest

from .harness import ANSIBLE_DIR, DECOY_VERSION, VENV_BIN, clean_env
from .test_site import _testinfra

KIT_DIR = "/opt/rlfleet/kit"
VENV_PY = "/opt/rlfleet/venv/bin/python"
# Run on the host by the venv's Python: what pip installed as rlfleet, and the files' real hashes.
PROBE = textwrap.dedent("""\
    import base64, hashlib, importlib.metadata as m, json, pathlib
    d = m.distribution("rlfleet")
    files = {}
    for f in d.files or []:
        p = pathlib.Path(d.locate_file(f))
        if p.is_file():
            digest = hashlib.sha256(p.read_bytes()).digest()
            files[str(f)] = "sha256=" + base64.urlsafe_b64encode(digest).rstrip(b"=").decode()
    print(json.dumps({"version": d.version, "direct_url": json.loads(d.read_text("direct_url.json") or "{}"),
                      "files": files, "decoy": hasattr(__import__("rlfleet"), "DECOY")}))
    """)


def _controller_kits(onprem) -> dict[str, dict]:
    """Kits site.yml built on the controller (its HOME is the harness's): sha256 -> kit.json."""
    cache = onprem.workdir / "home" / ".cache" / "rlfleet" / "kit"
    return {d["sha256"]: d for d in (json.loads(p.read_text()) for p in cache.glob("*/kit.json"))}


def _record(wheel_bytes: bytes) -> dict[str, str]:
    with zipfile.ZipFile(io.BytesIO(wheel_bytes)) as zf:
        rec = next(n for n in zf.namelist() if n.endswith(".dist-info/RECORD"))
        rows = csv.reader(io.StringIO(zf.read(rec).decode()))
        return {path: digest for path, digest, *_ in rows if digest}


@pytest.mark.onprem
@pytest.mark.slow
def test_installed_kit_is_the_shipped_wheel_not_a_higher_version_from_find_links(onprem):
    node = _testinfra(onprem)
    marker = node.file(f"{KIT_DIR}/installed").content_string.split()
    kits = _controller_kits(onprem)
    assert marker[0] in kits, f"the host holds kit {marker[0]}, which the controller never built ({list(kits)})"
    kit = kits[marker[0]]
    shipped = node.file(f"{KIT_DIR}/{kit['wheel_name']}")
    assert shipped.mode == 0o644 and shipped.user == "root"
    wheel_bytes = Path(onprem.host.path(f"{KIT_DIR}/{kit['wheel_name']}")).read_bytes()
    assert hashlib.sha256(wheel_bytes).hexdigest() == kit["sha256"] == marker[0]
    assert Path(kit["wheel"]).read_bytes() == wheel_bytes  # the controller's build, unchanged in transit
    cons = Path(onprem.host.path(f"{KIT_DIR}/constraints.txt")).read_bytes()
    assert hashlib.sha256(cons).hexdigest() == kit["constraints_sha256"] and b"+cpu" not in cons
    # the decoy is right there in --find-links, with a higher version...
    assert node.file(f"/opt/rlfleet/wheels/rlfleet-{DECOY_VERSION}-py3-none-any.whl").exists
    # ...and what pip installed is the shipped file, by direct reference
    got = json.loads(node.check_output(f"{VENV_PY} -c {_shq(PROBE)}"))
    assert got["version"] == kit["version"] != DECOY_VERSION and got["decoy"] is False
    assert got["direct_url"]["url"] == f"file://{KIT_DIR}/{kit['wheel_name']}"
    record = _record(wheel_bytes)
    code = {p: h for p, h in record.items() if p.startswith(("rlfleet/", "rlfleet_agents/"))}
    assert len(code) > 30
    installed = {p: h for p, h in got["files"].items() if p in code}
    assert installed == code  # every module on the host hashes to the shipped wheel's RECORD


def _shq(text: str) -> str:
    return "'" + text.replace("'", "'\"'\"'") + "'"


def test_naming_rlfleet_in_ray_runtime_packages_is_refused(tmp_path: Path) -> None:
    (tmp_path / "hosts.ini").write_text(
        f"[ray_head]\nlocalhost ansible_connection=local ansible_python_interpreter={VENV_BIN / 'python3'}\n")
    play = tmp_path / "play.yml"
    play.write_text(textwrap.dedent("""\
        - hosts: ray_head
          gather_facts: false
          vars:
            ray_runtime_token: "0123456789abcdef0123456789abcdef"
            gpu_count: 0
            rlfleet_address: 127.0.0.1
            ray_runtime_packages: ["ray[default]==2.60.0", "RLFleet[agents]>=0.1"]
          tasks:
            - ansible.builtin.include_role:
                name: ray_runtime
                tasks_from: preflight.yml
        """))
    r = subprocess.run([str(VENV_BIN / "ansible-playbook"), "-i", str(tmp_path / "hosts.ini"), str(play)],
                       cwd=ANSIBLE_DIR, env=clean_env(tmp_path), capture_output=True, text=True, timeout=300)
    assert r.returncode != 0
    assert "ray_runtime_packages lists rlfleet (RLFleet[agents]>=0.1)" in r.stdout
    assert "remove rlfleet from ray_runtime_packages" in r.stdout
