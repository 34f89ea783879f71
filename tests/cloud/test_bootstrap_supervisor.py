"""The head's bootstrap runs the run supervisor (issue 12: a supervisor inside the cluster on every
target) as the ``rlfleet-supervisor`` unit: what the AWS and GCP programs render for it, under
Pulumi's mocks. The unit is the on-prem one's program, user and hardening, with the stack's bucket
as its root. The unit running on booted nodes, a managed run restarted there:
tests/conformance/test_cloud_supervisor.py."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from rlfleet import stack_outputs as so

from .conftest import Built
from .test_deploy_front import _aws_script, _gcp_script

ONPREM_UNIT = Path(__file__).resolve().parents[2] / "ansible/roles/ray_runtime/templates/rlfleet-supervisor.service.j2"
ONPREM_ONLY = {"ReadWritePaths"}  # the NAS directory it writes; the cloud unit writes nothing on its disk


def _script(cloud: str, role: str, aws: Built, gcp: Built) -> str:
    return _aws_script(aws, role) if cloud == "aws" else _gcp_script(gcp, role)


def _unit(script: str) -> str:
    """The unit text the script writes, rendered by bash from the script's own function and
    parameters (as the node renders it)."""
    params = re.search(r"^ARTIFACT_ROOT='[^']*'$", script, re.M)
    fn = re.search(r"^render_supervisor_unit\(\) \{\n.*?^\}$", script, re.M | re.S)
    assert params and fn, "no render_supervisor_unit / ARTIFACT_ROOT in the rendered bootstrap"
    return subprocess.run(["bash", "-euc", f"{params.group(0)}\n{fn.group(0)}\nrender_supervisor_unit"],
                          capture_output=True, text=True, check=True, timeout=30).stdout


def _service(unit: str) -> dict[str, list[str]]:
    """[Service] key -> values (continuation lines joined)."""
    out: dict[str, list[str]] = {}
    body = unit.split("[Service]", 1)[1].split("\n[", 1)[0].replace("\\\n", " ")
    for line in body.splitlines():
        if line.strip() and not line.startswith("#"):
            k, _, v = line.partition("=")
            out.setdefault(k.strip(), []).append(" ".join(v.split()))
    return out


@pytest.mark.parametrize("cloud", ["aws", "gcp"])
def test_the_head_runs_the_supervisor_unit_on_the_stacks_bucket(cloud: str, aws: Built, gcp: Built,
                                                               tmp_path: Path) -> None:
    stack = aws if cloud == "aws" else gcp
    script = _script(cloud, "head", aws, gcp)
    unit = _unit(script)
    svc = _service(unit)
    root = str(stack.outputs[so.OUTPUT_ARTIFACT_ROOT])  # where the client's target reads the queue
    assert root.startswith({"aws": "s3://", "gcp": "gs://"}[cloud]), root
    assert svc["ExecStart"] == [f"/opt/rlfleet/venv/bin/python -m rlfleet.supervisor --address "
                                f"http://127.0.0.1:8265 --token-file /etc/rlfleet/ray_token --root {root} --poll 2"]
    # the token's path only: Ray's loopback Jobs API, the token file the bootstrap writes (0600)
    assert "--token-file /etc/rlfleet/ray_token" in svc["ExecStart"][0]
    assert "/etc/rlfleet/ray_token" in script and "chmod 0600" in script
    assert svc["User"] == ["rlfleet"] and svc["Restart"] == ["always"]
    assert re.search(r"^After=rlfleet-ray\.service network-online\.target$", unit, re.M)
    # the same hardening as on-prem's unit: every fixed [Service] setting of the ansible template
    onprem = _service(ONPREM_UNIT.read_text())
    fixed = {k: v for k, v in onprem.items() if not any("{{" in x for x in v) and k not in ONPREM_ONLY}
    assert {k: svc.get(k) for k in fixed} == fixed
    assert set(svc) - set(fixed) == {"User", "Group", "WorkingDirectory", "Environment", "ExecStart"}, svc
    # a valid unit (systemd's own parser: no unknown key, nothing it ignores)
    path = tmp_path / "rlfleet-supervisor.service"
    path.write_text(unit.replace("/opt/rlfleet/venv/bin/python", sys.executable))
    res = subprocess.run(["systemd-analyze", "verify", str(path)], capture_output=True, text=True, timeout=60)
    assert not [x for x in res.stderr.splitlines() if "rlfleet-supervisor.service" in x], res.stderr
    # installed, enabled and (re)started by the head's part of the script, after Ray and nginx
    head = re.search(r'^if \[ "\$ROLE" = head \]; then\n  systemctl enable nginx\.service\n(.*?)^fi$', script,
                     re.M | re.S)
    assert head, "no head block starting nginx in the rendered bootstrap"
    steps = head.group(1)
    assert "render_supervisor_unit >/etc/systemd/system/rlfleet-supervisor.service" in steps
    assert "systemctl enable rlfleet-supervisor.service" in steps
    assert "systemctl restart rlfleet-supervisor.service" in steps


@pytest.mark.parametrize("cloud", ["aws", "gcp"])
def test_workers_run_no_supervisor(cloud: str, aws: Built, gcp: Built) -> None:
    script = _script(cloud, "worker", aws, gcp)
    calls = [m.start() for m in re.finditer(r"^\s*render_supervisor_unit >", script, re.M)]
    head_block = script.index('if [ "$ROLE" = head ]; then\n  systemctl enable nginx.service')
    assert calls and all(c > head_block for c in calls)  # only under the head's branch
    assert "ROLE='worker'" in script
