"""What every simulated cloud-node target shares (aws-node in awsnode.py, gcp-node in gcpnode.py):

- :class:`CloudLan`: the "cloud LAN", one private Linux bridge per test session (no forwarding,
  no NAT) on which each cloud cluster gets its own /24 (``add_subnet``: the host side is ``.1``),
  plus 169.254.169.254 on the bridge for the instance-metadata server. AWS-node uses 10.42.1.0/24
  (what the AWS mocks give), so another cluster takes another /24 on the same bridge.
- :class:`MetadataServer`: ONE HTTP server on 169.254.169.254:80 that dispatches each request by
  its client ip to the handler the node's cluster registered (EC2 IMDSv2, GCE ``Metadata-Flavor:
  Google``, ...); an unregistered client gets 404. Every request is logged as (ip, method, path,
  status).
- :class:`CloudHost`: a throwaway host (tests/onprem/throwaway.py) on that bridge with the node's
  private ip, and the cloud-init runner: ``write_files`` + ``runcmd`` executed as cloud-final runs
  them (a oneshot systemd service with the manager's default environment).
- :func:`wait_tcp` and the machine lock: a subnet's addresses exist once per machine, so
  ``add_subnet`` holds ``CACHE_DIR/cloud-subnet-<prefix>.lock`` until ``drop_subnet`` (another test
  session using the same subnet waits for it). Each session has its own bridge, and its metadata
  server is bound to that bridge (SO_BINDTODEVICE), so sessions with different subnets run side by
  side, each with its own 169.254.169.254.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import http.server
import json
import os
import secrets
import shutil
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import yaml
from onprem.throwaway import CACHE_DIR, TARBALL, ThrowawayHost, _run

METADATA_IP = "169.254.169.254"
LAN_LOCK = CACHE_DIR / "cloud-lan.lock"  # the default machine_lock() path


def subnet_lock_path(prefix: str) -> Path:
    return CACHE_DIR / f"cloud-subnet-{prefix}.lock"
TORCH_WHEELS = Path("/opt/wheels")  # the CPU torch wheel(s) of this machine, pip's find-links on the hosts


def wait_tcp(host: str, port: int, timeout: float) -> None:
    """Until something accepts TCP connections on host:port (raises the last OSError after timeout)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection((host, port), timeout=1):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.3)


@contextlib.contextmanager
def machine_lock(path: Path = LAN_LOCK):
    """An exclusive lock across test sessions on this machine (blocks until free)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_CREAT | os.O_RDWR, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing releases the flock


# -- the metadata server -----------------------------------------------------------------------

@dataclass
class MetadataRequest:
    method: str  # GET, PUT, ...
    path: str  # with the query string
    headers: dict[str, str]  # header names lower-cased
    client_ip: str
    body: bytes = b""


@dataclass
class MetadataResponse:
    status: int
    body: str | bytes = ""
    headers: dict[str, str] = field(default_factory=dict)


MetadataHandler = Callable[[MetadataRequest], MetadataResponse]


class _DeviceBoundServer(http.server.ThreadingHTTPServer):
    daemon_threads = True
    device = ""

    def server_bind(self) -> None:
        if self.device:  # only packets that arrive on this bridge: another session's LAN has its own server
            self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, self.device.encode())
        super().server_bind()


class MetadataServer:
    """169.254.169.254:80 on the cloud LAN, dispatching by client ip to the registered handler.
    ``device``: the bridge it serves (SO_BINDTODEVICE), so each session's LAN has its own."""

    def __init__(self, ip: str = METADATA_IP, port: int = 80, *, device: str = "") -> None:
        self.handlers: dict[str, MetadataHandler] = {}
        self.requests: list[tuple[str, str, str, int]] = []  # (client ip, method, path, status)
        server = self

        class _Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *a: object) -> None:
                pass

            def _dispatch(self) -> None:
                n = int(self.headers.get("Content-Length") or 0)
                req = MetadataRequest(self.command, self.path, {k.lower(): v for k, v in self.headers.items()},
                                      self.client_address[0], self.rfile.read(n) if n else b"")
                handler = server.handlers.get(req.client_ip)
                try:
                    resp = handler(req) if handler else MetadataResponse(404, "no instance at this address")
                except Exception as err:  # shown to the node as a 500 and kept in the log
                    resp = MetadataResponse(500, f"{type(err).__name__}: {err}")
                server.requests.append((req.client_ip, req.method, req.path, resp.status))
                data = resp.body.encode() if isinstance(resp.body, str) else resp.body
                self.send_response(resp.status)
                for k, v in resp.headers.items():
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_PUT = do_POST = _dispatch

        _DeviceBoundServer.device = device
        self.httpd = _DeviceBoundServer((ip, port), _Handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def register(self, client_ip: str, handler: MetadataHandler) -> None:
        self.handlers[client_ip] = handler

    def unregister(self, client_ip: str) -> None:
        self.handlers.pop(client_ip, None)

    def requests_from(self, client_ip: str) -> list[tuple[str, str, int]]:
        """(method, path, status) of every request this client made."""
        return [(m, p, s) for ip, m, p, s in self.requests if ip == client_ip]

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


# -- the cloud LAN -----------------------------------------------------------------------------

class CloudLan:
    """The session's bridge + metadata server, shared by every cloud cluster of the session.

    ``CloudLan.acquire()`` returns the session's LAN (created on first use); each cluster calls
    ``release()`` once when it stops; the last release removes the bridge and stops the metadata
    server. A cluster's subnet is held with a machine lock (``add_subnet`` .. ``drop_subnet``)."""

    _current: CloudLan | None = None
    _guard = threading.Lock()

    def __init__(self) -> None:
        self.bridge = "rlfbr" + secrets.token_hex(3)
        self.users = 0
        self.subnets: dict[str, str] = {}  # "10.42.1" -> host side ip "10.42.1.1"
        self.routes: list[str] = []
        self.metadata: MetadataServer | None = None
        self._subnet_locks: dict[str, contextlib.AbstractContextManager] = {}

    @classmethod
    def acquire(cls) -> CloudLan:
        with cls._guard:
            if cls._current is None:
                lan = cls()
                lan._up()
                cls._current = lan
            cls._current.users += 1
            return cls._current

    def release(self) -> None:
        with CloudLan._guard:
            self.users -= 1
            if self.users > 0:
                return
            CloudLan._current = None
            self._down()

    def _up(self) -> None:
        try:
            _run("ip", "link", "add", self.bridge, "type", "bridge")
            _run("ip", "addr", "add", f"{METADATA_IP}/32", "dev", self.bridge)
            _run("ip", "link", "set", self.bridge, "up")
            self.metadata = MetadataServer(device=self.bridge)
        except BaseException:
            self._down()
            raise

    def _down(self) -> None:
        if self.metadata is not None:
            self.metadata.stop()
            self.metadata = None
        for dst in self.routes:
            _run("ip", "route", "del", dst, check=False)
        _run("ip", "link", "del", self.bridge, check=False)
        for prefix in list(self._subnet_locks):
            self._subnet_locks.pop(prefix).__exit__(None, None, None)

    def add_subnet(self, prefix: str) -> str:
        """Give this machine ``<prefix>.1/24`` on the bridge (a cluster's subnet); returns that address."""
        if prefix not in self.subnets:
            lock = machine_lock(subnet_lock_path(prefix))
            lock.__enter__()  # waits while another test session uses this subnet
            self._subnet_locks[prefix] = lock
            _run("ip", "addr", "add", f"{prefix}.1/24", "dev", self.bridge)
            self.subnets[prefix] = f"{prefix}.1"
        return self.subnets[prefix]

    def drop_subnet(self, prefix: str) -> None:
        if self.subnets.pop(prefix, None):
            _run("ip", "addr", "del", f"{prefix}.1/24", "dev", self.bridge, check=False)
        lock = self._subnet_locks.pop(prefix, None)
        if lock is not None:
            lock.__exit__(None, None, None)

    def add_route(self, dst: str, via: str) -> None:
        """A route on this machine to ``dst`` (e.g. a node's public ip /32) via a node on the bridge."""
        _run("ip", "route", "replace", dst, "via", via, "dev", self.bridge)
        self.routes.append(dst)

    def drop_route(self, dst: str) -> None:
        if dst in self.routes:
            self.routes.remove(dst)
            _run("ip", "route", "del", dst, check=False)


# -- a host on the LAN ---------------------------------------------------------------------------

class CloudHost(ThrowawayHost):
    """A throwaway host on the cloud LAN (not a /30 of its own), with the node's private ip.

    ``default_env``: the "machine image"'s systemd DefaultEnvironment (what every service and the
    cloud-init run see, e.g. AWS_CONFIG_FILE). ``extra_ips``: more addresses on host0 (/32), e.g. a
    public ip this machine routes to the node."""

    def __init__(self, workdir: Path, *, lan: CloudLan, ip: str, extra_ips: tuple[str, ...] = (),
                 default_env: dict[str, str] | None = None, image: Path | None = None) -> None:
        super().__init__(workdir)
        self.image = image  # a cached machine image (ensure_image) to boot instead of the pristine root
        self.lan = lan
        self.bridge = lan.bridge
        self.ip = ip
        self.host_ip = lan.add_subnet(ip.rsplit(".", 1)[0])
        self.extra_ips = extra_ips
        self.default_env = default_env or {}

    def start(self, log=print, *, tarball: Path | None = None) -> CloudHost:
        super().start(log, tarball=tarball or self.image)
        return self

    def stop(self) -> None:
        """Halt as ThrowawayHost does, but delete the root (GBs of venvs: minutes on a loaded
        machine) in a detached ``rm -rf`` of a renamed copy, so the session goes on meanwhile."""
        root = self.root
        self.root = root.with_name(root.name + ".gone")  # super() deletes a path that does not exist
        try:
            super().stop()
        finally:
            self.root = root
        if root.exists():
            trash = Path(tempfile.mkdtemp(prefix="rlfleet-trash-")) / "root"
            try:
                root.rename(trash)  # same filesystem (the temp dir): instant
            except OSError:
                shutil.rmtree(root, ignore_errors=True)
                return
            subprocess.Popen(["rm", "-rf", "--one-file-system", str(trash.parent)], start_new_session=True,
                             stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def _wait_systemd(self) -> None:
        # on a loaded machine systemd may not have its bus socket yet when the veth is up:
        # 'systemctl is-system-running --wait' then fails at once ("Failed to connect to bus")
        deadline = time.monotonic() + 120
        while self.nsexec("test", "-S", "/run/systemd/private", check=False).returncode != 0:
            if time.monotonic() > deadline:
                break  # super() reports the state
            time.sleep(0.5)
        super()._wait_systemd()

    def _prepare_root(self) -> None:
        super()._prepare_root()  # /etc/hosts names self.ip, the node's private ip
        if self.default_env:
            d = self.root / "etc/systemd/system.conf.d"
            d.mkdir(parents=True, exist_ok=True)
            env = " ".join(f"{k}={v}" for k, v in self.default_env.items())
            (d / "cloud-image.conf").write_text(f"[Manager]\nDefaultEnvironment={env}\n")
        if TORCH_WHEELS.is_dir():
            dst = self.root / "opt/wheels"
            dst.mkdir(parents=True, exist_ok=True)
            for w in TORCH_WHEELS.glob("torch-*+cpu-*.whl"):
                with contextlib.suppress(OSError):
                    os.link(w, dst / w.name)
                if not (dst / w.name).exists():
                    shutil.copy2(w, dst / w.name)

    def _network(self) -> None:
        _run("ip", "link", "set", self.veth, "master", self.bridge)
        _run("ip", "link", "set", self.veth, "up")
        self.nsexec("ip", "addr", "add", f"{self.ip}/24", "dev", "host0")
        for extra in self.extra_ips:
            self.nsexec("ip", "addr", "add", f"{extra}/32", "dev", "host0")
        self.nsexec("ip", "link", "set", "host0", "up")
        self.nsexec("ip", "route", "add", "default", "via", self.host_ip)

    def write_pip_conf(self) -> None:
        """pip reaches PyPI through this host's proxy, with the CPU torch wheel in find-links."""
        self.path("/etc/pip.conf").write_text(
            f"[global]\nproxy = {self.proxy_url}\ncert = /etc/ssl/certs/ca-certificates.crt\n"
            "find-links = /opt/wheels\n")

    def write_apt_conf(self) -> None:
        """apt reaches the Debian mirror through this host's proxy (the cloud's egress, as pip's)."""
        self.path("/etc/apt/apt.conf.d/80rlfleet-proxy").write_text(
            f'Acquire::http::Proxy "{self.proxy_url}";\nAcquire::https::Proxy "{self.proxy_url}";\n')

    def apt_install(self, *packages: str, timeout: float = 600) -> None:
        proxy = [f"-oAcquire::http::Proxy={self.proxy_url}", f"-oAcquire::https::Proxy={self.proxy_url}"]
        self.nsexec("apt-get", *proxy, "-qq", "update", timeout=timeout)
        self.nsexec("env", "DEBIAN_FRONTEND=noninteractive", "apt-get", *proxy, "-qq", "-y",
                    "--no-install-recommends", "install", *packages, timeout=timeout)

    def run_as_cloud_final(self, script: str, *, unit: str = "cloud-final-rlfleet",
                           timeout: float = 1800) -> subprocess.CompletedProcess:
        """Run a shell script as cloud-final / the guest agent runs a boot script: a oneshot
        systemd service with the manager's default environment. Returns its exit (check=False)."""
        path = self.path(f"/var/lib/cloud/{unit}.sh")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(script)
        path.chmod(0o700)
        return self.nsexec("systemd-run", "--wait", "--collect", "--quiet", f"--unit={unit}",
                           "-p", "Type=oneshot", "-p", f"TimeoutStartSec={int(timeout)}",
                           f"/var/lib/cloud/{unit}.sh", check=False, timeout=timeout + 60)

    def cloud_init(self, user_data: str, timeout: float = 1800) -> subprocess.CompletedProcess:
        """cloud-init's write_files + runcmd for this ``#cloud-config`` user data, as cloud-final
        runs it, returning the bootstrap's exit."""
        assert user_data.startswith("#cloud-config\n"), user_data[:80]
        doc = yaml.safe_load(user_data)
        assert set(doc) <= {"write_files", "runcmd"}, f"unexpected cloud-config keys {sorted(doc)}"
        for f in doc.get("write_files") or []:
            p = self.path(f["path"])
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_text(f["content"])
            p.chmod(int(f.get("permissions", "0644"), 8))
            os.chown(p, 0, 0)
        runcmd = doc.get("runcmd") or []
        script = "#!/bin/sh\n" + "".join((c if isinstance(c, str) else " ".join(c)) + "\n" for c in runcmd)
        return self.run_as_cloud_final(script, timeout=timeout)


# -- machine images ------------------------------------------------------------------------------

# written per boot (they name this session's proxy / endpoints), never part of an image
_PER_BOOT = ("./etc/pip.conf", "./etc/apt/apt.conf.d/80rlfleet-proxy", "./etc/aws", "./var/log/journal",
             "./etc/machine-id", "./etc/hostname", "./etc/hosts", "./opt/wheels")


def image_key(inputs: dict) -> str:
    """12 hex of the image's inputs (with the pristine root it starts from)."""
    blob = json.dumps({"base": TARBALL.name, **inputs}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def ensure_image(name: str, inputs: dict, build: Callable[[CloudHost], None], *, lan: CloudLan, ip: str,
                 workdir: Path, log=print) -> tuple[Path, bool]:
    """The machine image ``name`` for these inputs: a root tarball in CACHE_DIR
    (``<name>-image-<key>.tar.zst``), built once on this machine by booting a host at ``ip`` on the
    LAN and running ``build(host)`` on it (the host has pip's and apt's proxy configuration).
    Returns (tarball, built now?). Per-boot files (_PER_BOOT) are left out."""
    path = CACHE_DIR / f"{name}-image-{image_key(inputs)}.tar.zst"
    if path.exists():
        return path, False
    with machine_lock(CACHE_DIR / f"{name}-image.lock"):
        if path.exists():  # another session built it meanwhile
            return path, False
        host = CloudHost(workdir / f"{name}-image-build", lan=lan, ip=ip)
        try:
            host.start(log=log)
            host.write_pip_conf()
            host.write_apt_conf()
            build(host)
            host.nsexec("sync")
            tmp = path.with_name(f".{path.name}.{os.getpid()}")
            excludes = [f"--exclude={e}" for e in _PER_BOOT]
            _run("tar", "-C", str(host.root), "--numeric-owner", *excludes, "-I", "zstd -T2 -3", "-cf", str(tmp),
                 ".", timeout=900)
            tmp.replace(path)
        finally:
            host.stop()
    for old in CACHE_DIR.glob(f"{name}-image-*.tar.zst"):  # images of other inputs: stale
        if old != path:
            with contextlib.suppress(OSError):
                old.unlink()
    return path, True


@dataclass
class CloudNodeCluster:
    """A head (+ workers) of one cloud's throwaway hosts on the LAN, with that cloud's local API
    servers; the per-cloud modules give ``subnet`` and ``public_ip`` (the head's static address)."""

    workdir: Path
    rendered: Any
    cloud: Any
    lan: CloudLan
    head: CloudHost
    workers: list = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)
    token: str = ""
    stopped: bool = False
    subnet: ClassVar[str] = ""

    @property
    def public_ip(self) -> str:
        raise NotImplementedError

    @property
    def hosts(self) -> list:
        return [self.head, *self.workers]

    def bootstrap_log(self, host: CloudHost) -> str:
        p = host.path("/var/log/rlfleet-bootstrap.log")
        return p.read_text() if p.exists() else ""

    def stop(self) -> None:
        if self.stopped:
            return
        self.stopped = True
        for h in self.hosts:
            with contextlib.suppress(Exception):
                h.stop()
        self.cloud.stop()
        self.lan.drop_route(f"{self.public_ip}/32")
        self.lan.drop_subnet(self.subnet)
        self.lan.release()
