"""The Ray unit the node bootstrap writes runs the SDK's job entrypoint with the kit's venv: Ray
starts ``python -m rlfleet_agents.run`` through /bin/sh with the unit's PATH, so ``python`` must be
the venv's, not whatever an image has on its default PATH (a DLAMI's conda python, or none on
Debian: "/bin/sh: 1: python: not found", seen on the aws-node conformance hosts)."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest

from rlfleet.runs import ENTRYPOINT

from .test_bootstrap_tls import _script


def _ray_unit(cloud: str, role: str) -> str:
    m = re.search(r"^cat >/etc/systemd/system/rlfleet-ray\.service <<UNIT\n(.*?)^UNIT$", _script(cloud, role),
                  re.M | re.S)
    assert m, "no rlfleet-ray.service in the rendered bootstrap"
    return m.group(1)


@pytest.mark.parametrize("cloud", ["aws", "gcp"])
@pytest.mark.parametrize("role", ["head", "worker"])
def test_job_entrypoint_python_is_the_kits_venv(cloud: str, role: str, tmp_path: Path) -> None:
    unit = _ray_unit(cloud, role)
    paths = re.findall(r"^Environment=PATH=(\S+)$", unit, re.M)
    assert len(paths) == 1, f"the Ray unit sets no single PATH:\n{unit}"
    # an image with a python of its own on the usual PATH (a DLAMI's conda, /usr/bin/python)
    for d in ("opt/rlfleet/venv/bin", "usr/bin", "usr/local/bin", "opt/conda/bin"):
        exe = tmp_path / d / "python"
        exe.parent.mkdir(parents=True, exist_ok=True)
        exe.write_text("#!/bin/sh\n")
        exe.chmod(0o755)
    chrooted = ":".join(str(tmp_path / p.lstrip("/")) for p in paths[0].split(":"))
    found = shutil.which(ENTRYPOINT.split()[0], path=chrooted)
    assert found == str(tmp_path / "opt/rlfleet/venv/bin/python")
    assert re.search(r"^ExecStart=/opt/rlfleet/venv/bin/ray start ", unit, re.M)


@pytest.mark.parametrize("cloud", ["aws", "gcp"])
@pytest.mark.parametrize("role", ["head", "worker"])
def test_ray_usage_stats_are_off(cloud: str, role: str) -> None:
    """Ray reports usage stats to its vendor unless told not to (the cloud nodes' Ray did: noticed
    on the gcp-node conformance hosts through its cloud probe reaching the metadata server). The
    local target and the on-prem unit turn it off; so does the cloud nodes' Ray environment."""
    script = _script(cloud, role)
    m = re.search(r"^cat >/etc/rlfleet/ray\.env <<ENV\n(.*?)^ENV$", script, re.M | re.S)
    assert m, "no /etc/rlfleet/ray.env in the rendered bootstrap"
    assert "RAY_USAGE_STATS_ENABLED=0" in m.group(1).splitlines()
    assert "EnvironmentFile=/etc/rlfleet/ray.env" in _ray_unit(cloud, role)


def test_gcp_nodes_label_every_scraped_series_with_the_stack_id() -> None:
    """Managed Prometheus keeps no VM labels: the stack's alert policies and charts select its
    series by the label the Ops Agent's scrape adds (before, a drift alert of one stack fired on
    every stack's deployments in the project)."""
    from rlfleet.stack_outputs import PROM_LABEL_STACK
    from rlfleet_cloud.bootstrap import ops_agent_config

    (target,) = ops_agent_config("dev-0123456789ab")["metrics"]["receivers"]["ray_prometheus"]["config"][
        "scrape_configs"][0]["static_configs"]
    assert target["labels"] == {PROM_LABEL_STACK: "dev-0123456789ab"}
