"""Inventory for a throwaway host, and ansible-playbook runs under a clean environment.

Used by the pytest fixtures and runnable by hand for debugging:
    PYTHONPATH=sdk:agents .venv/bin/python -m tests.onprem.harness /tmp/onprem-debug   (boots, converges, keeps it up
    until Enter is pressed, then cleans up)
"""

from __future__ import annotations

import json
import re
import secrets
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[2]
ANSIBLE_DIR = REPO / "ansible"
VENV_BIN = Path(sys.executable).parent
TORCH_CPU_WHEELS = sorted(Path("/opt/wheels").glob("torch-*+cpu-*.whl"))
HOST_ALIAS = "node1"


@dataclass
class Site:
    """A generated site: inventory dir, vault password file, secrets (for assertions only)."""

    inventory: Path
    vault_password_file: Path
    ssh_key: Path
    token: str
    grafana_password: str
    pki_dir: Path
    wheels: list[Path] = field(default_factory=list)
    known_hosts: Path | None = None


def build_wheel(out: Path) -> Path:
    """The rlfleet wheel the container's venv installs (rlfleet is not on PyPI)."""
    out.mkdir(parents=True, exist_ok=True)
    subprocess.run(
        [str(VENV_BIN / "pip"), "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(out), str(REPO)],
        check=True, capture_output=True, text=True, timeout=300,
    )
    (wheel,) = out.glob("rlfleet-*.whl")
    return wheel


def write_site(host, workdir: Path, *, wheels: list[Path]) -> Site:
    """Write inventories/<site>/ for one throwaway host reached with community.docker.nsenter."""
    inv = workdir / "inventory"
    (inv / "group_vars" / "all").mkdir(parents=True, exist_ok=True)
    key = workdir / "id_ed25519"
    if not key.exists():
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "rlfleet-test", "-f", str(key)],
                       check=True, timeout=30)
    (inv / "hosts.ini").write_text(
        "[ray_head]\n"
        f"{HOST_ALIAS} ansible_connection=community.docker.nsenter ansible_nsenter_pid={host.pid1} "
        # nsenter runs commands with the controller's HOME; keep the module tmp dir inside the host
        "ansible_remote_tmp=/var/tmp/ansible-rlfleet "
        f"ansible_python_interpreter=/usr/bin/python3 ansible_become=false rlfleet_address={host.ip}\n\n"
        "[ray_workers]\n\n"
        "[monitoring]\n"
        f"{HOST_ALIAS}\n\n"
        "[nas_server]\n\n[rlfleet:children]\nray_head\nray_workers\n"
    )
    torch = [str(w) for w in TORCH_CPU_WHEELS]
    main = {
        "rlfleet_site": "throwaway",
        "rlfleet_admin_cidrs": [f"{host.host_ip}/32"],
        "rlfleet_http_proxy": host.proxy_url,
        "rlfleet_admin_user": "root",
        "base_admin_authorized_keys": [(key.with_suffix(".pub")).read_text().strip()],
        # CPU-only torch from a local wheel: PyPI's default torch pulls CUDA (~2.5 GB).
        "ray_runtime_local_wheels": [str(w) for w in wheels] + torch,
        "ray_runtime_packages": (["torch==2.13.0+cpu"] if torch else [])
        + ["ray[default]==2.60.0", "rlfleet[agents]==0.1.0"],
        "monitoring_scrape_interval": "5s",
        # no registry reachable here ships Grafana: provisioning is written, the package is not
        "monitoring_grafana_install": False,
    }
    (inv / "group_vars" / "all" / "main.yml").write_text(yaml.safe_dump(main, sort_keys=False))
    token = secrets.token_urlsafe(32)
    grafana = secrets.token_urlsafe(16)
    vault = inv / "group_vars" / "all" / "vault.yml"
    vault.write_text(yaml.safe_dump({"vault_ray_token": token, "vault_grafana_admin_password": grafana}))
    pw = workdir / "vault-password"
    pw.write_text(secrets.token_urlsafe(24) + "\n")
    pw.chmod(0o600)
    subprocess.run([str(VENV_BIN / "ansible-vault"), "encrypt", "--vault-password-file", str(pw), str(vault)],
                   check=True, capture_output=True, text=True, timeout=60, env=clean_env(workdir))
    return Site(inventory=inv, vault_password_file=pw, ssh_key=key, token=token, grafana_password=grafana,
                pki_dir=inv / "pki", wheels=wheels)


def switch_to_ssh(site: Site, host, workdir: Path) -> None:
    """After the first converge the host runs key-only sshd: from now on Ansible (and testinfra)
    connect over SSH on the veth like to a real server, host key pinned from the container's
    root (no trust on first use), with pipelining."""
    pub = host.path("/etc/ssh/ssh_host_ed25519_key.pub").read_text().split()
    known = workdir / "known_hosts"
    known.write_text(f"{host.ip} {pub[0]} {pub[1]}\n")
    site.known_hosts = known
    hosts = site.inventory / "hosts.ini"
    old = f"ansible_connection=community.docker.nsenter ansible_nsenter_pid={host.pid1} "
    text = hosts.read_text()
    assert old in text
    hosts.write_text(text.replace(old, (
        f"ansible_connection=ssh ansible_host={host.ip} ansible_user=root "
        f"ansible_ssh_private_key_file={site.ssh_key} "
        f"ansible_ssh_common_args='-o UserKnownHostsFile={known} -o StrictHostKeyChecking=yes' ")))


def clean_env(workdir: Path) -> dict[str, str]:
    """What ansible-playbook gets: nothing of the controller's PIP_*/SSL_* leaks into the target."""
    home = workdir / "home"
    home.mkdir(exist_ok=True)
    return {
        "PATH": f"{VENV_BIN}:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        "HOME": str(home),
        "LANG": "C.UTF-8",
        "ANSIBLE_CONFIG": str(ANSIBLE_DIR / "ansible.cfg"),
        "ANSIBLE_FORCE_COLOR": "0",
    }


@dataclass
class PlayResult:
    rc: int
    seconds: float
    output: str
    recap: dict[str, dict[str, int]]

    @property
    def changed(self) -> int:
        return sum(h.get("changed", 0) for h in self.recap.values())

    @property
    def failed(self) -> int:
        return sum(h.get("failed", 0) + h.get("unreachable", 0) for h in self.recap.values())

    def changed_tasks(self) -> list[str]:
        """Task names that reported 'changed' (for a readable idempotence failure)."""
        out, task = [], ""
        for line in self.output.splitlines():
            if line.startswith("TASK ["):
                task = line[6:].split("]")[0]
            elif line.startswith("changed:"):
                out.append(task)
        return out


def playbook(site: Site, workdir: Path, playbook: str, *extra: str, timeout: float = 900) -> PlayResult:
    log = workdir / f"{Path(playbook).stem}-{time.strftime('%H%M%S')}.log"
    t0 = time.monotonic()
    with log.open("w") as f:  # streamed, so a long converge can be followed with tail -f
        proc = subprocess.run(
            [str(VENV_BIN / "ansible-playbook"), "-i", str(site.inventory), "--vault-password-file",
             str(site.vault_password_file), playbook, *extra],
            cwd=ANSIBLE_DIR, env=clean_env(workdir), stdout=f, stderr=subprocess.STDOUT, text=True,
            timeout=timeout,
        )
    seconds = time.monotonic() - t0
    out = log.read_text()
    recap: dict[str, dict[str, int]] = {}
    for m in re.finditer(r"^(\S+)\s+:\s+(ok=.*)$", out, re.M):
        recap[m.group(1)] = {k: int(v) for k, v in re.findall(r"(\w+)=(\d+)", m.group(2))}
    return PlayResult(rc=proc.returncode, seconds=seconds, output=out, recap=recap)


if __name__ == "__main__":  # manual debugging aid
    from tests.onprem.throwaway import ThrowawayHost

    wd = Path(sys.argv[1])
    wd.mkdir(parents=True, exist_ok=True)
    h = ThrowawayHost(wd)
    try:
        h.start()
        site = write_site(h, wd, wheels=[build_wheel(wd / "wheels")])
        for n in (1, 2):
            r = playbook(site, wd, "site.yml")
            print(json.dumps({"run": n, "rc": r.rc, "s": round(r.seconds, 1), "recap": r.recap,
                              "changed_tasks": r.changed_tasks()}))
            if r.rc:
                print(r.output[-6000:])
                break
        print(f"pid1={h.pid1} ip={h.ip} root={h.root}; press Enter to tear down")
        sys.stdin.readline()
    finally:
        h.stop()
