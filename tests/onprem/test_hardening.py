"""On-prem hardening that holds whatever else is on the host (issue 10, items 10 and 11).

Offline: the firewall and NAS preflights over a table of good and bad settings
(hardening_cases.yml, run by offline.yml): admin networks that together cover more than a /8 in
any spelling need the override; NFS security options are parsed, not substring-matched.

On the shared throwaway host, which the harness made look lived-in before the first converge
(harness.plant_existing_setup: a cloud-init sshd drop-in allowing passwords, a site nginx with its
own nginx.conf, an unrelated enabled service, an artifact directory with the site's data): the
kit's sshd settings are the effective ones, and teardown restores nginx, leaves what it did not
create, and deletes only an artifact directory it can prove it created. These run after
test_site.py's teardown (conftest.py orders them).
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from .harness import (
    ANSIBLE_DIR,
    CLOUD_INIT_DROPIN,
    CLOUD_INIT_SSHD,
    REPO,
    SITE_ARTIFACT_FILE,
    SITE_ARTIFACTS,
    SITE_NGINX_CONF,
    SITE_UNIT,
    playbook,
)

CASES = yaml.safe_load((Path(__file__).parent / "hardening_cases.yml").read_text())["hardening_cases"]
MARKER = ".created-by-rlfleet"
STATE_DIR = "/var/lib/rlfleet-state"


def _case_id(case: dict) -> str:
    return f"{case['role']}-{'|'.join(str(v) for v in case['vars'].values())}"


# -- offline: the preflights' table ---------------------------------------------------------------

@pytest.mark.parametrize("index", range(len(CASES)), ids=[_case_id(c) for c in CASES])
def test_preflight_table(rendered, index):
    outcome = json.loads((rendered / "hardening_preflight.json").read_text()).get(str(index))
    case = CASES[index]
    if case["refused"] is None:
        assert outcome is None, f"{case['vars']} should pass, was refused: {outcome}"
    else:
        assert outcome is not None, f"{case['vars']} should be refused ({case['refused']!r}), passed"
        assert outcome["role"] == case["role"]
        assert case["refused"] in " ".join(outcome["msg"].split()), outcome["msg"]


def test_world_open_rule_is_the_same_as_the_pulumi_settings():
    """The firewall filter mirrors infra_cloud's world_open_reason (one rule for every target)."""
    shared = str(REPO / "infra_cloud/shared")
    if shared not in sys.path:
        sys.path.insert(0, shared)
    from rlfleet_cloud.settings import world_open_reason

    plugin = ANSIBLE_DIR / "filter_plugins/rlfleet_hardening.py"
    spec = importlib.util.spec_from_file_location("rlfleet_filters", plugin)
    assert spec and spec.loader
    filters = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(filters)
    lists = [c["vars"]["firewall_admin_cidrs"] for c in CASES if c["role"] == "firewall"]
    lists = [x for x in lists if not filters.invalid_networks(x) and x]
    lists += [["2000::/3"], ["::ffff:203.0.113.0/120"], ["2001:db8::/48", "2001:db8:1::/48", "203.0.113.0/24"],
              ["10.0.0.0/8", "10.0.0.0/8"], ["0.0.0.0/0", "::/0"], ["2001:db8::/31"]]
    assert len(lists) > 15
    for cidrs in lists:
        assert filters.world_open_reason(cidrs) == (world_open_reason(cidrs) or ""), cidrs


# -- on the throwaway host ------------------------------------------------------------------------

def _systemctl(host, verb: str, unit: str) -> str:
    return host.nsexec("systemctl", verb, unit, check=False).stdout.strip()


@pytest.fixture(scope="module")
def torn_down(onprem):
    """The host after teardown.yml (test_site.py's last test does it through the SDK; when this
    module runs alone it tears down itself)."""
    if onprem.host.path("/opt/rlfleet").exists():
        r = playbook(onprem.site, onprem.workdir, "teardown.yml")
        assert r.rc == 0, r.output[-3000:]
    return onprem


@pytest.mark.onprem
@pytest.mark.slow
def test_sshd_settings_beat_an_earlier_cloud_init_drop_in(onprem):
    host = onprem.host
    # the site's drop-in is still there, untouched: the kit's settings win without editing it
    assert host.path(CLOUD_INIT_DROPIN).read_text() == CLOUD_INIT_SSHD
    effective = dict(ln.split(" ", 1) for ln in host.nsexec("sshd", "-T").stdout.splitlines() if " " in ln)
    assert effective["passwordauthentication"] == "no"
    assert effective["kbdinteractiveauthentication"] == "no"
    assert effective["permitrootlogin"] == "without-password"  # sshd -T's name for prohibit-password
    assert effective["x11forwarding"] == "no"
    # and the running daemon offers public keys only
    r = subprocess.run(
        ["ssh", "-o", "BatchMode=yes", "-o", "PubkeyAuthentication=no", "-o", "ConnectTimeout=10",
         "-o", f"UserKnownHostsFile={onprem.site.known_hosts}", "-o", "StrictHostKeyChecking=yes",
         f"root@{host.ip}", "true"],
        capture_output=True, text=True, timeout=60,
    )
    assert r.returncode == 255 and "Permission denied (publickey)." in r.stderr, r.stderr


@pytest.mark.onprem
@pytest.mark.slow
def test_teardown_restores_nginx_and_leaves_what_it_did_not_create(torn_down):
    host = torn_down.host
    assert host.path("/etc/nginx/nginx.conf").read_bytes() == SITE_NGINX_CONF.encode()  # byte for byte
    for unit in ("nginx", SITE_UNIT):  # on the host before rlfleet: enabled and running as before
        assert (_systemctl(host, "is-enabled", unit), _systemctl(host, "is-active", unit)) == ("enabled", "active")
    assert host.nsexec("curl", "-fsS", "http://127.0.0.1:8081/").stdout == "site-owned\n"
    listen = host.nsexec("ss", "-Hltn").stdout
    assert ":8443 " not in listen and ":9443 " not in listen  # the TLS front is gone with the reload
    for unit in ("prometheus", "prometheus-node-exporter"):  # installed by rlfleet: stopped and disabled
        assert _systemctl(host, "is-active", unit) != "active", unit
        assert _systemctl(host, "is-enabled", unit) == "disabled", unit
    assert not host.path(STATE_DIR).exists()


@pytest.mark.onprem
@pytest.mark.slow
def test_delete_data_keeps_an_artifact_dir_that_was_there_before(torn_down):
    host = torn_down.host
    assert not host.path(f"{SITE_ARTIFACTS}/{MARKER}").exists()  # the converge did not claim it
    r = playbook(torn_down.site, torn_down.workdir, "teardown.yml", "-e", "teardown_delete_data=true")
    assert r.rc == 0, r.output[-3000:]
    assert host.path(SITE_ARTIFACT_FILE).read_text() == "data the site had before rlfleet\n"
    assert f"kept {SITE_ARTIFACTS}: rlfleet did not create it" in " ".join(r.output.split())


@pytest.mark.onprem
@pytest.mark.slow
def test_delete_data_removes_an_artifact_dir_rlfleet_created(torn_down):
    host, made = torn_down.host, "/mnt/rlfleet/kit-made"
    r = playbook(torn_down.site, torn_down.workdir, "playbooks/nas.yml", "-e", f"nas_client_artifact_dir={made}")
    assert r.rc == 0, r.output[-3000:]
    assert host.path(f"{made}/{MARKER}").is_file()
    (host.path(made) / "runs").mkdir()
    r = playbook(torn_down.site, torn_down.workdir, "teardown.yml", "-e", "teardown_delete_data=true",
                 "-e", f"nas_client_artifact_dir={made}")
    assert r.rc == 0, r.output[-3000:]
    assert not host.path(made).exists()
    assert host.path(SITE_ARTIFACT_FILE).is_file()  # the mount path and the site's dir stay
