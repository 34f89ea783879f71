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


# What a real server often has before rlfleet arrives (planted before the first converge, checked
# by test_hardening.py): a cloud-init sshd drop-in that sorts before the kit's and allows passwords,
# a site nginx with its own configuration, an unrelated enabled service, an artifact directory.
CLOUD_INIT_DROPIN = "/etc/ssh/sshd_config.d/50-cloud-init.conf"
CLOUD_INIT_SSHD = ("PasswordAuthentication yes\nPermitRootLogin yes\nKbdInteractiveAuthentication yes\n"
                   "X11Forwarding yes\n")
SITE_NGINX_CONF = """\
# the site's own nginx (planted by the on-prem tests before rlfleet's first converge)
user www-data;
worker_processes 1;
pid /run/nginx.pid;
events { worker_connections 64; }
http {
    server {
        listen 127.0.0.1:8081;
        location / { return 200 "site-owned\\n"; }
    }
}
"""
SITE_UNIT = "site-agent"
SITE_ARTIFACTS = "/mnt/rlfleet/rlfleet"
SITE_ARTIFACT_FILE = f"{SITE_ARTIFACTS}/site-data.txt"


def plant_existing_setup(host) -> None:
    """Make the throwaway host look lived-in before the first converge (see the constants above).
    nginx comes from apt through the test proxy (the converge would install it anyway)."""
    dropin = host.path(CLOUD_INIT_DROPIN)
    dropin.parent.mkdir(parents=True, exist_ok=True)
    dropin.write_text(CLOUD_INIT_SSHD)
    proxy = [f"-oAcquire::http::Proxy={host.proxy_url}", f"-oAcquire::https::Proxy={host.proxy_url}"]
    host.nsexec("apt-get", *proxy, "-qq", "update", timeout=300)
    for attempt in range(6):  # the apt download cache is shared with other test hosts: its lock may be busy
        r = host.nsexec("env", "DEBIAN_FRONTEND=noninteractive", "apt-get", *proxy, "-qq", "-y",
                        "--no-install-recommends", "install", "nginx", timeout=300, check=attempt == 5)
        if r.returncode == 0:
            break
        time.sleep(10)
    host.path("/etc/nginx/nginx.conf").write_text(SITE_NGINX_CONF)
    host.path(f"/etc/systemd/system/{SITE_UNIT}.service").write_text(
        "[Unit]\nDescription=a service of the site, not of rlfleet\n"
        "[Service]\nExecStart=/bin/sleep infinity\n[Install]\nWantedBy=multi-user.target\n")
    host.nsexec("systemctl", "daemon-reload")
    host.nsexec("systemctl", "enable", "--now", SITE_UNIT)
    host.nsexec("systemctl", "restart", "nginx")
    host.path(SITE_ARTIFACT_FILE).parent.mkdir(parents=True)
    host.path(SITE_ARTIFACT_FILE).write_text("data the site had before rlfleet\n")


DECOY_VERSION = "99.0.0"


def decoy_wheel(out: Path) -> Path:
    """A higher-version `rlfleet` wheel in the hosts' --find-links directory: what someone
    registering the name on an index would offer. The kit must never be resolved to it (site.yml
    ships and installs the checkout's own wheel by path)."""
    import base64
    import hashlib
    import zipfile

    out.mkdir(parents=True, exist_ok=True)
    wheel = out / f"rlfleet-{DECOY_VERSION}-py3-none-any.whl"
    info = f"rlfleet-{DECOY_VERSION}.dist-info"
    files = {
        "rlfleet/__init__.py": f'DECOY = True\n__version__ = "{DECOY_VERSION}"\n',
        f"{info}/METADATA": f"Metadata-Version: 2.1\nName: rlfleet\nVersion: {DECOY_VERSION}\n"
                            "Provides-Extra: agents\nProvides-Extra: aws\nProvides-Extra: gcp\n",
        f"{info}/WHEEL": "Wheel-Version: 1.0\nGenerator: rlfleet-tests\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }
    record = []
    for name, text in files.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(text.encode()).digest()).rstrip(b"=").decode()
        record.append(f"{name},sha256={digest},{len(text.encode())}")
    files[f"{info}/RECORD"] = "\n".join([*record, f"{info}/RECORD,,"]) + "\n"
    with zipfile.ZipFile(wheel, "w") as zf:
        for name, text in files.items():
            zf.writestr(name, text)
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
        # CPU-only torch from a local wheel: PyPI's default torch pulls CUDA (~2.5 GB). The kit
        # itself is built and shipped by site.yml (ray_runtime); `wheels` only adds --find-links.
        "ray_runtime_local_wheels": [str(w) for w in wheels] + torch,
        "ray_runtime_packages": (["torch==2.13.0+cpu"] if torch else []) + ["ray[default]==2.60.0"],
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


def playbook(site: Site, workdir: Path, playbook: str, *extra: str, timeout: float = 1800) -> PlayResult:
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
        site = write_site(h, wd, wheels=[decoy_wheel(wd / "wheels")])
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
