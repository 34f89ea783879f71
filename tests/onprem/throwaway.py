"""A throwaway Debian bookworm "server" booted with systemd-nspawn on a private veth /30.

Facts this relies on (measured on this machine kind, see ../shared/notes/throwaway-hosts.md):
the host's PID 1 is not systemd, so nspawn runs with ``--register=no --keep-unit``; the
container always gets ``--network-veth`` (its own network namespace, its firewall cannot touch
the host); we address the veth pair ourselves; the container reaches apt/PyPI only through an
HTTP proxy bound to the host's veth address (no forwarding, no NAT); the machine's egress
intercepts TLS, so the host's extra CA certificates are copied into the root.

The pristine root (debootstrap minbase) is cached as a zstd tarball; restoring it takes seconds.
Everything is removed in :meth:`ThrowawayHost.stop`, which is safe to call after a partial start.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

CACHE_DIR = Path(os.environ.get("RLFLEET_TEST_CACHE", "/var/cache/rlfleet-test"))
MIRROR = os.environ.get("RLFLEET_TEST_MIRROR", "http://deb.debian.org/debian")
INCLUDE = "python3,python3-apt,systemd,systemd-sysv,dbus,iproute2,ca-certificates,curl"
TARBALL = CACHE_DIR / "bookworm-minbase-v1.tar.zst"
# apt's download cache shared by every throwaway host: each host gets its own archives dir seeded
# from it (hard links) and gives new downloads back when it stops. Bind-mounting the shared dir
# itself let two test sessions' hosts fight over apt's archives lock ("Could not get lock
# /var/cache/apt/archives/lock. It is held by process 0"), failing a converge.
APT_CACHE = CACHE_DIR / "apt-archives"
VENV_BIN = Path(sys.executable).parent


def _run(*args: str, check: bool = True, timeout: float = 120, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(list(args), check=check, timeout=timeout, capture_output=True, text=True, **kw)


def ensure_root_tarball(log=print) -> Path:
    """Debootstrap bookworm minbase once and cache it as a zstd tarball."""
    if TARBALL.exists():
        return TARBALL
    CACHE_DIR.mkdir(parents=True, exist_ok=True)
    build = CACHE_DIR / f"build-{os.getpid()}"
    shutil.rmtree(build, ignore_errors=True)
    log(f"debootstrap bookworm minbase into {build} (~60 s, once; cached as {TARBALL})")
    try:
        _run("debootstrap", "--variant=minbase", f"--include={INCLUDE}", "bookworm", str(build), MIRROR,
             timeout=900)
        tmp = TARBALL.with_suffix(f".tmp{os.getpid()}")
        _run("tar", "-C", str(build), "--numeric-owner", "-I", "zstd -T2 -3", "-cf", str(tmp), ".",
             timeout=600)
        tmp.replace(TARBALL)
    finally:
        shutil.rmtree(build, ignore_errors=True)
    return TARBALL


def _free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


class ThrowawayHost:
    """One booted container. Attributes are valid after :meth:`start`."""

    binds_ro: tuple[str, ...] = ()  # host directories a subclass mounts read-only at the same path

    def __init__(self, workdir: Path, *, subnet: int | None = None) -> None:
        self.workdir = workdir
        self.name = "rlfot" + secrets.token_hex(3)  # ve-<name> must fit in 15 chars
        n = subnet if subnet is not None else 1 + secrets.randbelow(250)
        # a private /30 used only by this test host: .1 host side, .2 container side
        self.host_ip = f"10.251.{n}.1"
        self.ip = f"10.251.{n}.2"
        self.root = workdir / "root"
        self.apt_dir = workdir / "apt-archives"
        self.veth = f"ve-{self.name}"
        self.nspawn: subprocess.Popen | None = None
        self.proxy: subprocess.Popen | None = None
        self.proxy_url = ""
        self.pid1 = 0
        self.timings: dict[str, float] = {}

    # -- lifecycle ------------------------------------------------------------------------------
    def start(self, log=print, *, tarball: Path | None = None) -> ThrowawayHost:
        """Boot from ``tarball`` (a root filesystem, e.g. a cached machine image) or the pristine root."""
        t0 = time.monotonic()
        tarball = tarball or ensure_root_tarball(log)
        self.timings["debootstrap_or_cache"] = time.monotonic() - t0
        t0 = time.monotonic()
        self.root.mkdir(parents=True)
        _run("tar", "-C", str(self.root), "--numeric-owner", "-I", "zstd -T2", "-xf", str(tarball), timeout=300)
        self.timings["restore"] = time.monotonic() - t0
        self._prepare_root()
        t0 = time.monotonic()
        self._boot()
        self._network()
        self._proxy()
        self._wait_systemd()
        self.timings["boot"] = time.monotonic() - t0
        return self

    def stop(self) -> None:
        if self.nspawn is not None and self.nspawn.poll() is None:
            # SIGRTMIN+3 asks the container's systemd for a clean halt; then nspawn exits
            if self.pid1:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(self.pid1, signal.SIGRTMIN + 3)
            try:
                self.nspawn.wait(20)
            except subprocess.TimeoutExpired:
                self.nspawn.kill()
                self.nspawn.wait(10)
        if self.proxy is not None and self.proxy.poll() is None:
            self.proxy.terminate()
            try:
                self.proxy.wait(10)
            except subprocess.TimeoutExpired:
                self.proxy.kill()
                self.proxy.wait(5)
        # the veth goes away with the namespace; remove it explicitly if it lingers
        if Path(f"/sys/class/net/{self.veth}").exists():
            _run("ip", "link", "del", self.veth, check=False)
        shutil.rmtree(self.root, ignore_errors=True)
        for deb in self.apt_dir.glob("*.deb"):  # give this host's downloads to the shared cache
            if not (APT_CACHE / deb.name).exists():
                tmp = APT_CACHE / f".{deb.name}.{os.getpid()}"
                with contextlib.suppress(OSError):
                    _link_or_copy(deb, tmp)
                    tmp.replace(APT_CACHE / deb.name)
        shutil.rmtree(self.apt_dir, ignore_errors=True)

    # -- steps ----------------------------------------------------------------------------------
    def _prepare_root(self) -> None:
        ca_dir = self.root / "usr/local/share/ca-certificates"
        ca_dir.mkdir(parents=True, exist_ok=True)
        for crt in Path("/usr/local/share/ca-certificates").glob("*.crt"):
            shutil.copy2(crt, ca_dir / crt.name)
        _run("chroot", str(self.root), "update-ca-certificates", timeout=120)
        (self.root / "etc/hostname").write_text(self.name + "\n")
        (self.root / "etc/hosts").write_text(f"127.0.0.1 localhost\n{self.ip} {self.name}\n")
        # a bare server has a machine id; minbase leaves it empty
        (self.root / "etc/machine-id").write_text(secrets.token_hex(16) + "\n")

    def _boot(self) -> None:
        log = (self.workdir / "nspawn.log").open("w")
        APT_CACHE.mkdir(parents=True, exist_ok=True)
        (self.apt_dir / "partial").mkdir(parents=True, exist_ok=True)
        os.chown(self.apt_dir / "partial", 42, 65534)  # Debian's _apt user downloads into partial/
        for deb in APT_CACHE.glob("*.deb"):
            _link_or_copy(deb, self.apt_dir / deb.name)
        self.nspawn = subprocess.Popen(
            ["systemd-nspawn", "--boot", "--network-veth", "--register=no", "--keep-unit",
             "--console=passive", f"--bind={self.apt_dir}:/var/cache/apt/archives",
             *(f"--bind-ro={d}" for d in self.binds_ro),
             "-M", self.name, "-D", str(self.root)],
            stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
            env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "SYSTEMD_LOG_LEVEL": "warning"},
        )
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.nspawn.poll() is not None:
                raise RuntimeError(f"systemd-nspawn exited: {(self.workdir / 'nspawn.log').read_text()[-2000:]}")
            self.pid1 = self._find_pid1()
            if self.pid1 and Path(f"/sys/class/net/{self.veth}").exists():
                return
            time.sleep(0.2)
        raise RuntimeError("the container did not boot in 30 s")

    def _find_pid1(self) -> int:
        """The container's PID 1 (systemd) as the host sees it: a descendant of nspawn."""
        assert self.nspawn is not None
        frontier = [self.nspawn.pid]
        while frontier:
            pid = frontier.pop()
            for child in _children(pid):
                try:
                    comm = Path(f"/proc/{child}/comm").read_text().strip()
                    nspid = Path(f"/proc/{child}/status").read_text().split("NSpid:")[1].split("\n")[0].split()
                except (OSError, IndexError):
                    continue
                if comm == "systemd" and nspid[-1] == "1":
                    return child
                frontier.append(child)
        return 0

    def _network(self) -> None:
        _run("ip", "addr", "add", f"{self.host_ip}/30", "dev", self.veth)
        _run("ip", "link", "set", self.veth, "up")
        self.nsexec("ip", "addr", "add", f"{self.ip}/30", "dev", "host0")
        self.nsexec("ip", "link", "set", "host0", "up")
        self.nsexec("ip", "route", "add", "default", "via", self.host_ip)

    def _proxy(self) -> None:
        port = _free_port(self.host_ip)
        log = (self.workdir / "proxy.log").open("w")
        # bound ONLY to the host's veth address: the container's way to apt and PyPI
        self.proxy = subprocess.Popen(
            [str(VENV_BIN / "proxy"), "--hostname", self.host_ip, "--port", str(port),
             "--num-workers", "2", "--num-acceptors", "1", "--log-level", "WARNING"],
            stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
        )
        self.proxy_url = f"http://{self.host_ip}:{port}"
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError), socket.create_connection((self.host_ip, port), timeout=1):
                return
            time.sleep(0.2)
        raise RuntimeError(f"proxy.py did not listen on {self.proxy_url}: {(self.workdir / 'proxy.log').read_text()}")

    def _wait_systemd(self) -> None:
        r = self.nsexec("systemctl", "is-system-running", "--wait", check=False, timeout=90)
        if r.stdout.strip() not in ("running", "degraded"):
            raise RuntimeError(f"container systemd state: {r.stdout.strip()} {r.stderr.strip()}")

    # -- helpers --------------------------------------------------------------------------------
    def nsexec(self, *args: str, check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess:
        """Run a command inside the container (all namespaces, clean environment)."""
        return _run("nsenter", "-t", str(self.pid1), "-a", "--", "env", "-i",
                    "PATH=/usr/sbin:/usr/bin:/sbin:/bin", *args, check=check, timeout=timeout)

    def path(self, inside: str) -> Path:
        """A path inside the container as the host reaches it."""
        return self.root / inside.lstrip("/")


def _link_or_copy(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)
    except FileExistsError:
        pass
    except OSError:  # another filesystem
        shutil.copy2(src, dst)


def _children(pid: int) -> list[int]:
    out: list[int] = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        with contextlib.suppress(OSError):
            out += [int(c) for c in (task / "children").read_text().split()]
    return out
