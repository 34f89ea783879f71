"""The embedded local target's provisioner: a Ray head for this user on 127.0.0.1, artifacts on disk.

(``rlfleet.local`` is this module under its older name.) The target itself is data
(:func:`rlfleet.targets.local_target`, from the state this module records under ``$RLFLEET_HOME``).

- Token auth is always on (``RAY_AUTH_MODE=token``); the token lives in
  ``$RLFLEET_HOME/local/token`` with mode 0600 and is never put on a command line.
- The head runs in a private network namespace with only ``lo`` (see ``_netns``): Ray's internal
  servers cannot be reached from the network at all, and a forwarder exposes just the Jobs API
  port and the deploy ports on the host's 127.0.0.1.
- If namespaces are unavailable (no root and no user namespaces), ``rlfleet local up`` refuses
  with a clear message unless ``RLFLEET_LOCAL_ISOLATION=none`` is set, in which case Ray runs on
  the host network with token auth and rlfleet says which ports are exposed.
- State is private: ``$RLFLEET_HOME``, ``local/`` and ``runs/`` are 0700; Ray's temp dir lives in a
  0700 directory of this user under /tmp (Ray makes its own dir 0777); the cluster runs with umask
  077. A pre-existing temp dir that is not this user's, not a plain directory, or group/world
  writable makes ``local up`` refuse.
- Stopping signals only processes of THIS cluster (see ``_cluster_pids``): ``state.json`` records
  the boot id, the namespace holder's and forwarder's start times and the namespace inode, and a
  PID is signalled only while all of them still match. Stale state (crash, reboot) is cleared
  without signalling anyone else.
- ``nodes=N`` (``rlfleet local up --nodes N``) adds N Ray worker nodes, each in its own network
  namespace; see :func:`ensure_local_up` and ``docs/scale-out.md``.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import secrets
import shutil
import signal
import socket
import stat
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rlfleet._netns import proc_start_time
from rlfleet.errors import ClusterUnreachable, ConfigError, RlfleetError
from rlfleet.paths import local_state_dir as state_dir
from rlfleet.paths import local_state_file as _state_file
from rlfleet.paths import local_token_path as token_path
from rlfleet.paths import read_local_state as read_state
from rlfleet.paths import rlfleet_home
from rlfleet.provisioners.registry import CostInputs
from rlfleet.targets import Target, local_target
from rlfleet.teardown import Leftover

if TYPE_CHECKING:
    from rlfleet.teardown.sweep import StackSweep

__all__ = [
    "N_SERVE_PORTS",
    "cost_inputs",
    "destroy",
    "ensure_local_up",
    "local_down",
    "local_status",
    "local_target",
    "node_link",
    "node_start",
    "node_stop",
    "plan_destroy",
    "read_state",
    "ready",
    "scan_leftovers",
    "state_dir",
    "sweep",
    "target_from",
    "token_path",
    "up",
]

N_SERVE_PORTS = 8
# Multi-node: a bridge inside the head's namespace, one veth per worker namespace. The subnet exists
# only inside those namespaces (the host has no interface on it), so it cannot clash with the host's.
BRIDGE = "rlbr0"
SUBNET = "10.87.0"
GCS_PORT = 6379
MAX_NODES = 16
WORKER_OBJECT_STORE_BYTES = 256 * 1024 * 1024


def _temp_parent() -> Path:
    # Ray's unix sockets must fit in 107 bytes: keep its temp dir short and per-home.
    digest = hashlib.sha256(str(rlfleet_home().resolve()).encode()).hexdigest()[:8]
    return Path(f"/tmp/rlfleet-{os.getuid()}-{digest}")  # noqa: S108 - per-user, per-home, mode 0700, checked


def _ray_temp_dir() -> str:
    """Ray's temp dir. Ray chmods it 0777 itself, so it lives inside the private ``_temp_parent()``."""
    return str(_temp_parent() / "ray")


def _private_dir(path: Path, what: str, *, tighten: bool = True) -> None:
    """Create ``path`` 0700, or check that the existing one is this user's own private directory.

    A symlink, a non-directory, someone else's directory or (unless ``tighten``) a group/world
    writable one is refused; this user's directory with looser read bits is made 0700.
    """
    with contextlib.suppress(FileExistsError):
        path.mkdir(mode=0o700)
    st = path.lstat()
    remove = f"remove it ('rm -rf {path}') if nothing of yours uses it, and retry"
    if stat.S_ISLNK(st.st_mode) or not stat.S_ISDIR(st.st_mode):
        how = f"it is a symlink or not a directory; {remove}"
    elif st.st_uid != os.getuid():
        how = (
            f"it belongs to uid {st.st_uid}, not to you (uid {os.getuid()}), who could read or replace what "
            "rlfleet puts there; have it removed, or set RLFLEET_HOME to another directory"
        )
    elif st.st_mode & 0o022 and not tighten:
        how = f"its mode {stat.S_IMODE(st.st_mode):o} lets other users write into it; {remove}"
    else:
        if st.st_mode & 0o077:
            os.chmod(path, 0o700)
        return
    raise RlfleetError(f"refusing to use {path} as {what}: {how}")


def _private_home() -> None:
    """``$RLFLEET_HOME`` and its ``local/`` and ``runs/``: this user's, mode 0700."""
    home = rlfleet_home()
    home.parent.mkdir(parents=True, exist_ok=True)
    _private_dir(home, "the rlfleet home (RLFLEET_HOME)")
    _private_dir(state_dir(), "the local target's state directory")
    _private_dir(home / "runs", "the local artifact store")


def _private_open(path: Path) -> Any:
    """Open ``path`` for writing with mode 0600 (also when it already exists)."""

    def opener(p: str, flags: int) -> int:
        fd = os.open(p, flags, 0o600)
        os.fchmod(fd, 0o600)
        return fd

    return open(path, "w", opener=opener)


def _ensure_token() -> str:
    path = token_path()
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        os.chmod(path, 0o600)
        return path.read_text().strip()
    with os.fdopen(fd, "w") as f:
        f.write(secrets.token_hex(32))
    return path.read_text().strip()


def _free_ports(n: int) -> list[int]:
    socks, ports = [], []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
            ports.append(int(s.getsockname()[1]))
    finally:
        for s in socks:
            s.close()
    return ports


def _alive(pid: int | None) -> bool:
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # a zombie counts as dead
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except (FileNotFoundError, ProcessLookupError, IndexError):  # ESRCH: it exited while being read
        return False


def _boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""


def _netns_inode(pid: int | str) -> int | None:
    try:
        return os.stat(f"/proc/{pid}/ns/net").st_ino
    except OSError:
        return None


def _owned(pid: int) -> bool:
    try:
        return os.stat(f"/proc/{pid}").st_uid == os.getuid()
    except OSError:
        return False


def _same_process(st: dict[str, Any], role: str) -> int | None:
    """The PID recorded for ``role`` if it is still that very process (same boot, start time, owner)."""
    pid, start = st.get(f"{role}_pid"), st.get(f"{role}_start")
    if not isinstance(pid, int) or pid <= 0 or not isinstance(start, int) or not st.get("boot_id"):
        return None  # nothing recorded, or state from before identities were recorded
    if st["boot_id"] != _boot_id() or proc_start_time(pid) != start or not _alive(pid) or not _owned(pid):
        return None
    return pid


def _cmdline(pid: int) -> list[bytes] | None:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[:-1]
    except OSError:
        return None


def _verified_holder(st: dict[str, Any]) -> int | None:
    """The namespace holder of this cluster, or None: it must be the recorded process (boot, start
    time, owner), a ``sleep infinity``, in the recorded namespace, and that namespace must not be the
    caller's."""
    if not st.get("boot_id"):
        return _legacy_holder(st)
    pid = _same_process(st, "holder")
    if pid is None:
        return None
    ino = _netns_inode(pid)
    if ino is None or ino != st.get("netns_inode") or ino == _netns_inode("self"):
        return None
    return pid if _cmdline(pid) == [b"sleep", b"infinity"] else None


def _legacy_holder(st: dict[str, Any]) -> int | None:
    """A head started before identities were recorded: its holder counts only with proof that it is
    this cluster's -- a ``sleep infinity`` of this user in a namespace that is not the caller's,
    shared with this user's forwarder whose command line names exactly that holder and the recorded
    ports (only ``ensure_local_up`` starts such a pair)."""
    pid, fwd = st.get("holder_pid"), st.get("forwarder_pid")
    if st.get("isolation") != "netns" or not isinstance(pid, int) or not isinstance(fwd, int) or min(pid, fwd) <= 0:
        return None
    if not (_alive(pid) and _alive(fwd) and _owned(pid) and _owned(fwd)):
        return None
    ino = _netns_inode(pid)
    if ino is None or ino == _netns_inode("self") or _netns_inode(fwd) != ino:
        return None
    ports = ",".join(str(p) for p in [st.get("dashboard_port"), *st.get("serve_ports", [])])
    want = [b"-m", b"rlfleet._netns", b"--pid", str(pid).encode(), b"--ports", ports.encode()]
    if _cmdline(pid) != [b"sleep", b"infinity"] or (_cmdline(fwd) or [])[1:] != want:
        return None
    return pid


def _verified_forwarder(st: dict[str, Any], holder: int | None) -> int | None:
    """The forwarder of a verified holder: the recorded process, inside the holder's namespace."""
    if holder is None:
        return None
    pid = _same_process(st, "forwarder") if st.get("boot_id") else st.get("forwarder_pid")  # legacy: proven
    if not isinstance(pid, int) or _netns_inode(pid) != _netns_inode(holder):
        return None
    return pid


def _head_is_ours(st: dict[str, Any]) -> bool:
    """Does the recorded head still belong to this state? (Health is then checked with our token.)"""
    if st.get("isolation") == "none":
        return bool(st.get("boot_id")) and st["boot_id"] == _boot_id()
    return _verified_holder(st) is not None


@contextlib.contextmanager
def _lock() -> Iterator[None]:
    _private_home()
    with open(state_dir() / ".lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _healthy(target: Target, timeout: float = 3.0) -> bool:
    from rlfleet.jobs import JobsClient

    try:
        JobsClient(target.ray_address, target.token(), target_name="local").version(timeout=timeout)
        return True
    except RlfleetError:
        return False


def _ray_env(temp_dir: str, node_ip: str | None = None) -> dict[str, str]:
    bin_dir = str(Path(sys.executable).parent)
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update(
        {
            "RAY_AUTH_MODE": "token",
            "RAY_AUTH_TOKEN_PATH": str(token_path()),
            "PATH": bin_dir + os.pathsep + env.get("PATH", "/usr/bin:/bin"),
            "RAY_USAGE_STATS_ENABLED": "0",
            "RAY_TMPDIR": temp_dir,
        }
    )
    if node_ip:  # a node of a multi-node local cluster: its drivers connect to its own raylet (see
        env["RLFLEET_NODE_IP"] = node_ip  # rlfleet_agents.distributed.connect_ray)
    import importlib.util

    from rlfleet.preflight import RAY_PLUGINS_VALUE

    if importlib.util.find_spec("rlfleet_agents") is not None:  # runs' requirements (rlfleet_agents.requirements_env)
        env["RAY_RUNTIME_ENV_PLUGINS"] = RAY_PLUGINS_VALUE
        env["RLFLEET_REQUIREMENTS_CACHE"] = str(rlfleet_home() / "cache" / "requirements")
    return env


def _ray_bin() -> str:
    cand = Path(sys.executable).parent / "ray"
    return str(cand) if cand.exists() else (shutil.which("ray") or "ray")


def _isolation() -> str:
    mode = os.environ.get("RLFLEET_LOCAL_ISOLATION", "netns")
    if mode not in ("netns", "none"):
        raise RlfleetError(f"RLFLEET_LOCAL_ISOLATION must be 'netns' or 'none', not {mode!r}")
    return mode


def _start_holder() -> int:
    """A process that owns a fresh network namespace (only ``lo``, brought up)."""
    cmd = ["unshare", "--net"]
    if os.geteuid() != 0:
        cmd.append("--map-root-user")
    cmd += ["sleep", "infinity"]
    try:
        proc = subprocess.Popen(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            start_new_session=True,
            umask=0o077,
        )
    except FileNotFoundError:
        raise RlfleetError("'unshare' (util-linux) is not installed; it isolates the local Ray head") from None
    deadline = time.monotonic() + 5
    own = os.readlink("/proc/self/ns/net")
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            err = proc.stderr.read().decode().strip() if proc.stderr else ""
            raise RlfleetError(
                f"cannot create a private network namespace for the local Ray head ({err}). "
                "Run as a user allowed to create namespaces, or set RLFLEET_LOCAL_ISOLATION=none "
                "to run Ray on the host network (token auth stays on; some Ray ports then listen on "
                "all interfaces)"
            )
        with contextlib.suppress(OSError):
            if os.readlink(f"/proc/{proc.pid}/ns/net") != own:
                break
        time.sleep(0.02)
    subprocess.run(
        [*_nsenter(proc.pid), "ip", "link", "set", "lo", "up"],
        check=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    return proc.pid


def _nsenter(pid: int) -> list[str]:
    cmd = ["nsenter", f"--net=/proc/{pid}/ns/net"]
    if os.geteuid() != 0:
        cmd = ["nsenter", "-t", str(pid), "--user", "--net", "--preserve-credentials"]
    return cmd


def _signal(pid: int, start: int | None, sig: int = signal.SIGTERM) -> None:
    """Signal ``pid`` only if it is still the process that started at ``start`` (no PID reuse)."""
    if start is None or not _alive(pid):
        return
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return
    except OSError:  # kernel without pidfds: a check-then-kill, the window is microseconds
        if proc_start_time(pid) == start:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        return
    try:  # the pidfd pins the process: check it is the one we mean, then signal exactly it
        if proc_start_time(pid) == start:
            with contextlib.suppress(ProcessLookupError):
                signal.pidfd_send_signal(fd, sig)
    finally:
        os.close(fd)


def ensure_local_up(
    *,
    echo: Callable[[str], None] | None = None,
    num_cpus: int | None = None,
    nodes: int | None = None,
    node_cpus: int = 1,
    node_gpus: Sequence[float] | float = 0,
) -> Target:
    """Start (or reuse) this user's local Ray head. Idempotent; returns the local target.

    ``nodes=N`` adds N Ray worker nodes on this machine, each in its own network namespace, joined
    to the head by a private bridge inside the head's namespace (``10.87.0.0/24``: head ``.1``,
    worker ``i`` ``.(i+1)``); each declares ``node_cpus`` CPUs and its entry of ``node_gpus`` (one
    number for all, or one per worker) as Ray ``GPU`` resources -- fake ones when the machine has
    none, so placement by GPU can be tried anywhere. ``nodes=None`` reuses whatever runs (a single
    head if nothing does); asking for another layout than the running one is refused.
    """
    say = echo or (lambda _m: None)
    isolation = _isolation()
    layout = _node_layout(nodes, node_cpus, node_gpus, isolation)
    with _lock():
        st = read_state()
        if st and _head_is_ours(st) and _healthy(local_target()):
            running = [(n["cpus"], n["gpus"]) for n in st.get("nodes", [])]
            if layout is not None and running != layout:
                raise RlfleetError(
                    f"the local Ray head already runs with {len(running)} worker node(s) {running} "
                    f"(cpus, gpus); stop it first ('rlfleet local down') to start {len(layout)} node(s) {layout}"
                )
            return local_target()
        if st:
            _stop_locked(say, quiet=True)
        _prepare_private_state()
        ports = _free_ports(1 + N_SERVE_PORTS)
        cpus = num_cpus or int(os.environ.get("RLFLEET_LOCAL_CPUS", "0")) or (os.cpu_count() or 1)
        log = _private_open(state_dir() / "ray-start.log")
        t0 = time.monotonic()
        try:
            holder, fwd = _start_isolation(isolation, ports, log)
            _record_state(holder, fwd, ports, isolation, cpus)
            head_ip = "127.0.0.1"
            if layout and holder:
                _make_bridge(holder)
                head_ip = f"{SUBNET}.1"
            say(f"starting Ray head (token auth, {'private network namespace' if holder else 'host network'}) ...")
            _ray_start_head(holder, ports[0], cpus, log, head_ip)
            target = _wait_healthy(deadline_s=120)
            say(f"local Ray head is up at {target.ray_address} ({time.monotonic() - t0:.1f} s)")
            if layout and holder:
                _start_worker_nodes(holder, layout, log, say)
            return target
        except BaseException:
            _stop_locked(say, quiet=True)
            raise
        finally:
            log.close()


def _prepare_private_state() -> None:
    """Ray's private temp dir (0700, this user's) and the token file (0600)."""
    _private_dir(_temp_parent(), "the local Ray head's temp directory", tighten=False)
    _ensure_token()


def _start_isolation(isolation: str, ports: list[int], log: Any) -> tuple[int | None, int | None]:
    """With netns isolation: the namespace holder and the forwarder of ``ports`` to the host's
    127.0.0.1, as (holder PID, forwarder PID); on the host network (None, None)."""
    if isolation != "netns":
        return None, None
    holder = _start_holder()
    fwd = subprocess.Popen(
        [sys.executable, "-m", "rlfleet._netns", "--pid", str(holder), "--ports", ",".join(str(p) for p in ports)],
        stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True, umask=0o077,
    )
    return holder, fwd.pid


def _record_state(holder: int | None, fwd: int | None, ports: list[int], isolation: str, cpus: int) -> None:
    """state.json: the identities that let a later stop signal exactly this cluster's processes."""
    _write_state(
        {
            "boot_id": _boot_id(),
            "holder_pid": holder,
            "holder_start": proc_start_time(holder) if holder else None,
            "netns_inode": _netns_inode(holder) if holder else None,
            "forwarder_pid": fwd,
            "forwarder_start": proc_start_time(fwd) if fwd else None,
            "dashboard_port": ports[0],
            "serve_ports": ports[1:],
            "isolation": isolation,
            "temp_dir": _ray_temp_dir(),
            "num_cpus": cpus,
            "started_at": time.time(),
        }
    )


def _ray_start_head(holder: int | None, dash: int, cpus: int, log: Any, node_ip: str = "127.0.0.1") -> None:
    """``ray start --head`` (inside the namespace when there is one), umask 077."""
    _ray_start(holder, [
        "--head", f"--node-ip-address={node_ip}", f"--port={GCS_PORT}",
        "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}", f"--num-cpus={cpus}",
    ], log, node_ip=node_ip if node_ip != "127.0.0.1" else None)  # fmt: skip


def _ray_start(
    holder: int | None, args: list[str], log: Any, temp_dir: str | None = None, node_ip: str | None = None
) -> None:
    """``ray start ARGS`` inside ``holder``'s namespace (or on the host network), umask 077."""
    temp_dir = temp_dir or _ray_temp_dir()
    prefix = _nsenter(holder) if holder else []
    cmd = [*prefix, _ray_bin(), "start", *args, f"--temp-dir={temp_dir}", "--disable-usage-stats"]
    res = subprocess.run(  # umask 077: everything Ray and the runs create is private
        cmd, env=_ray_env(temp_dir, node_ip), stdin=subprocess.DEVNULL, stdout=log, stderr=log, timeout=180, umask=0o077
    )
    if res.returncode != 0:
        raise RlfleetError(f"'ray start' failed (exit {res.returncode}); see {state_dir() / 'ray-start.log'}")


# -- worker nodes (multi-node local cluster) -------------------------------------------------------


def _node_layout(
    nodes: int | None, node_cpus: int, node_gpus: Sequence[float] | float, isolation: str
) -> list[tuple[int, float]] | None:
    """[(cpus, gpus)] per worker node, checked; None when the caller takes whatever runs."""
    if nodes is None:
        return None
    if not 0 <= nodes <= MAX_NODES:
        raise ConfigError(f"nodes must be between 0 and {MAX_NODES}, not {nodes}")
    if nodes and isolation != "netns":
        raise ConfigError(
            "worker nodes need network namespaces (each node has its own); unset RLFLEET_LOCAL_ISOLATION=none"
        )
    if node_cpus < 1:
        raise ConfigError(f"node cpus must be at least 1, not {node_cpus}")
    gpus = [float(node_gpus)] * nodes if isinstance(node_gpus, (int, float)) else [float(g) for g in node_gpus]
    if len(gpus) != nodes:
        raise ConfigError(f"node gpus: give one number, or one per worker node ({nodes}), not {len(gpus)}")
    if any(g < 0 for g in gpus):
        raise ConfigError(f"node gpus must not be negative: {gpus}")
    return [(node_cpus, g) for g in gpus]


def _ip(holder: int, *args: str) -> None:
    """``ip ARGS`` inside ``holder``'s network namespace."""
    res = subprocess.run([*_nsenter(holder), "ip", *args], capture_output=True, text=True, timeout=30)
    if res.returncode != 0:
        raise RlfleetError(f"'ip {' '.join(args)}' failed: {res.stderr.strip()}")


def _make_bridge(holder: int) -> None:
    """The private bridge inside the head's namespace; the head's node address is on it."""
    _ip(holder, "link", "add", BRIDGE, "type", "bridge", "forward_delay", "0")  # ports forward at link up
    _ip(holder, "addr", "add", f"{SUBNET}.1/24", "dev", BRIDGE)
    _ip(holder, "link", "set", BRIDGE, "up")
    _default_route(holder, BRIDGE)


def _default_route(holder: int, dev: str) -> None:
    """An on-link default route: Ray finds a process's node IP by the source address the kernel picks
    for a UDP 'connect' to a public address (no packet is sent). Without it a driver or worker falls
    back to the host's name and registers with the wrong node. Nothing forwards beyond the bridge:
    a packet to any other address finds no neighbour and is dropped."""
    _ip(holder, "route", "add", "default", "dev", dev)


def _start_worker_nodes(head: int, layout: list[tuple[int, float]], log: Any, say: Callable[[str], None]) -> None:
    t0 = time.monotonic()
    records = []
    for i, (cpus, gpus) in enumerate(layout, start=1):
        records.append(_worker_namespace(head, i, cpus, gpus))
        st = read_state()
        st["nodes"] = records
        _write_state(st)  # recorded before Ray starts there: a failed start still stops it
    for rec in records:
        _ray_start_worker(rec, log)
    say(f"{len(layout)} worker node(s) joined ({time.monotonic() - t0:.1f} s): "
        + ", ".join(f"{r['name']} {r['ip']} cpus={r['cpus']} gpus={r['gpus']:g}" for r in records))


def _worker_namespace(head: int, i: int, cpus: int, gpus: float) -> dict[str, Any]:
    """Worker ``i``'s namespace (a child of the head's user namespace when not root), wired to the
    bridge by the veth ``rlv<i>`` (head side) / ``eth0`` (node side)."""
    proc = subprocess.Popen(
        [*_nsenter(head), "unshare", "--net", "sleep", "infinity"],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        start_new_session=True, umask=0o077,
    )  # fmt: skip
    head_ns = _netns_inode(head)
    deadline = time.monotonic() + 5
    while _netns_inode(proc.pid) in (head_ns, _netns_inode("self"), None) or _cmdline(proc.pid) != [
        b"sleep", b"infinity"
    ]:
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RlfleetError(f"cannot create the network namespace of worker node {i}")
        time.sleep(0.02)
    ip = f"{SUBNET}.{i + 1}"
    _ip(head, "link", "add", f"rlv{i}", "type", "veth", "peer", "name", "eth0", "netns", str(proc.pid))
    _ip(head, "link", "set", f"rlv{i}", "master", BRIDGE, "up")
    _ip(proc.pid, "link", "set", "lo", "up")
    _ip(proc.pid, "addr", "add", f"{ip}/24", "dev", "eth0")
    _ip(proc.pid, "link", "set", "eth0", "up")
    _default_route(proc.pid, "eth0")
    return {"name": f"worker-{i}", "ip": ip, "cpus": cpus, "gpus": gpus, "holder_pid": proc.pid,
            "holder_start": proc_start_time(proc.pid), "netns_inode": _netns_inode(proc.pid)}  # fmt: skip


def _ray_start_worker(rec: dict[str, Any], log: Any) -> None:
    # Each node its own temp dir (inside the private parent), as on separate machines: Ray caches a
    # node's IP in its session dir, and a driver reading the head's would register with the head.
    _ray_start(rec["holder_pid"], [
        f"--address={SUBNET}.1:{GCS_PORT}", f"--node-ip-address={rec['ip']}", f"--num-cpus={rec['cpus']}",
        f"--num-gpus={rec['gpus']:g}", f"--object-store-memory={WORKER_OBJECT_STORE_BYTES}",
    ], log, str(_temp_parent() / rec["name"].replace("worker-", "w")), rec["ip"])  # fmt: skip


def _verified_nodes(st: dict[str, Any]) -> list[tuple[dict[str, Any], int]]:
    """The recorded worker nodes whose namespace holder is still that very process, with its PID."""
    out = []
    for rec in st.get("nodes", []):
        if not isinstance(rec, dict):
            continue
        pid = _same_process({"boot_id": st.get("boot_id"), **rec}, "holder")
        if pid is None:
            continue
        ino = _netns_inode(pid)
        if ino is not None and ino == rec.get("netns_inode") and ino != _netns_inode("self"):
            if _cmdline(pid) == [b"sleep", b"infinity"]:
                out.append((rec, pid))
    return out


def _node(name: str) -> tuple[dict[str, Any], int]:
    st = read_state()
    for rec, pid in _verified_nodes(st):
        if rec["name"] == name:
            return rec, pid
    names = [r.get("name") for r in st.get("nodes", [])]
    raise ConfigError(f"no running local worker node {name!r} (nodes: {', '.join(map(str, names)) or 'none'})")


def node_stop(name: str, *, hard: bool = True) -> int:
    """Stop worker node ``name``'s Ray processes (SIGKILL: a node lost; else SIGTERM), keeping its
    namespace so :func:`node_start` can bring it back. Returns how many processes were signalled."""
    with _lock():
        rec, holder = _node(name)
        procs = {p: proc_start_time(p) for p in _netns_pids(rec["netns_inode"], exclude=holder)}
        for p, start in procs.items():
            _signal(p, start, signal.SIGKILL if hard else signal.SIGTERM)
        return len(procs)


def node_start(name: str) -> None:
    """(Re)start Ray on worker node ``name`` (after :func:`node_stop`): it joins as a new node."""
    with _lock():
        rec, _ = _node(name)
        with _private_open(state_dir() / f"ray-start-{name}.log") as log:
            _ray_start_worker(rec, log)


def node_link(name: str, *, up: bool) -> None:
    """Cut worker node ``name`` off the bridge (link down) or reconnect it; its processes keep running."""
    with _lock():
        rec, _ = _node(name)
        st = read_state()
        holder = _verified_holder(st)
        if holder is None:
            raise ConfigError("the local Ray head is not running")
        _ip(holder, "link", "set", f"rlv{rec['name'].rsplit('-', 1)[1]}", "up" if up else "down")


def _netns_pids(inode: int, exclude: int | None = None) -> list[int]:
    """This user's processes in the network namespace ``inode`` (other than ``exclude``)."""
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit() and int(entry) not in (os.getpid(), exclude) and _owned(int(entry)):
            if _netns_inode(entry) == inode:
                out.append(int(entry))
    return out


def _wait_healthy(deadline_s: float) -> Target:
    target = local_target()
    deadline = time.monotonic() + deadline_s
    while not _healthy(target, timeout=5):
        if time.monotonic() > deadline:
            raise ClusterUnreachable(
                f"the local Ray head did not answer on {target.ray_address} within {deadline_s:.0f} s; "
                f"see {state_dir() / 'ray-start.log'}"
            )
        time.sleep(0.2)
    return target


def _write_state(st: dict[str, Any]) -> None:
    tmp = _state_file().with_suffix(".tmp")
    with _private_open(tmp) as f:
        f.write(json.dumps(st))
    tmp.replace(_state_file())


def local_down(*, echo: Callable[[str], None] | None = None) -> bool:
    """Stop the local Ray head. Idempotent: returns False if nothing was running."""
    with _lock():
        return _stop_locked(echo or (lambda _m: None))


def _stop_locked(say: Callable[[str], None], quiet: bool = False) -> bool:
    st = read_state()
    if not st:
        return False
    # Nothing from the state file is trusted as is: the holder/forwarder PIDs count only while
    # their identities match, and the temp dir is this home's own, never the recorded path.
    holder = _verified_holder(st)
    fwd = _verified_forwarder(st, holder)
    if not quiet:
        say("stopping the local Ray head ...")
    nodes = _verified_nodes(st)
    _stop_cluster_processes(_ray_temp_dir(), holder, [rec["netns_inode"] for rec, _ in nodes])
    for rec, pid in nodes:
        _signal(pid, rec["holder_start"])
    if fwd is not None:
        _signal(fwd, st.get("forwarder_start") or proc_start_time(fwd))  # legacy state: just verified
    if holder is not None:
        _signal(holder, st.get("holder_start") or proc_start_time(holder))
    with contextlib.suppress(FileNotFoundError):
        _state_file().unlink()
    _remove_temp_parent()
    return True


def _remove_temp_parent() -> None:
    """Remove this home's temp dir under /tmp, only if it is this user's real directory."""
    parent = _temp_parent()
    try:
        st = parent.lstat()
    except FileNotFoundError:
        return
    if stat.S_ISDIR(st.st_mode) and st.st_uid == os.getuid():
        shutil.rmtree(parent, ignore_errors=True)


def _cluster_pids(temp_dir: str, holder: int | None = None) -> list[int]:
    """Processes of THIS cluster only, all owned by this user: inside its network namespace, or
    carrying this home's ``RAY_TMPDIR`` in their environment.

    ``ray stop`` would kill every Ray process of the user on the machine (other clusters too),
    so the local target stops exactly its own. The rule, so a stale or forged ``state.json``
    cannot point it at anyone else:

    - the namespace counts only if ``holder`` is the holder verified against the current state
      (same boot, start time, ``sleep infinity``, recorded namespace inode, not the caller's own
      namespace; for state written before identities were recorded, see ``_legacy_holder``);
    - the environment marker counts only for this home's own temp dir (computed from
      ``$RLFLEET_HOME``, never taken from the state) -- a path under this user's private /tmp
      directory that only rlfleet puts into ``RAY_TMPDIR``, for the processes it starts;
    - a process of another user is never included.
    """
    netns = None
    if holder is not None:
        st = read_state()
        if _verified_holder(st) == holder:
            netns = _netns_inode(holder)
    own = (_ray_temp_dir(), str(_temp_parent()))  # the second: heads started before the 0700 parent
    markers = {f"RAY_TMPDIR={d}".encode() for d in own} if temp_dir in own else set()
    me = os.getpid()
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) in (me, holder):
            continue
        pid = int(entry)
        if not _owned(pid):
            continue
        try:
            if netns is not None and _netns_inode(pid) == netns:
                pids.append(pid)
                continue
            if markers:
                with open(f"/proc/{pid}/environ", "rb") as f:
                    if markers & set(f.read().split(b"\0")):
                        pids.append(pid)
        except OSError:
            continue
    return pids


def _holders(st: dict[str, Any]) -> set[int]:
    return {pid for _, pid in _verified_nodes(st)}


def _stop_cluster_processes(
    temp_dir: str, holder: int | None, node_inodes: Sequence[int] = (), grace_s: float = 10.0
) -> None:
    pids = set(_cluster_pids(temp_dir, holder))
    for ino in node_inodes:  # the verified worker nodes' processes (their holders are signalled after)
        pids |= set(_netns_pids(ino)) - {rec_pid for rec_pid in _holders(read_state())}
    procs = {pid: proc_start_time(pid) for pid in pids}
    for pid, start in procs.items():
        _signal(pid, start, signal.SIGTERM)

    def running() -> list[int]:
        return [p for p, s in procs.items() if _alive(p) and proc_start_time(p) == s]

    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline and running():
        time.sleep(0.1)
    for pid in running():
        _signal(pid, procs[pid], signal.SIGKILL)


def local_status() -> dict[str, Any]:
    st = read_state()
    target = local_target()
    up = bool(st) and _head_is_ours(st) and _healthy(target)
    return {
        "running": bool(up),
        "ray_address": target.ray_address if st else None,
        "isolation": st.get("isolation"),
        "num_cpus": st.get("num_cpus"),
        "serve_ports": st.get("serve_ports", []),
        "artifact_root": target.artifact_root,
        "token_file": str(token_path()),
        "started_at": st.get("started_at"),
        "nodes": [
            {k: n.get(k) for k in ("name", "ip", "cpus", "gpus")} for n in st.get("nodes", []) if isinstance(n, dict)
        ],
    }


# -- the provisioner (rlfleet.provisioners.registry.Provisioner) -----------------------------------


def target_from(name: str, **options: Any) -> Target:
    return local_target()


def up(target: Target, *, echo: Callable[[str], None]) -> Target:
    return ensure_local_up(echo=echo)


def ready(target: Target) -> Target:
    """Runs go to a live head: start it (or reuse the running one)."""
    return ensure_local_up()


def destroy(target: Target, *, delete_data: bool, echo: Callable[[str], None]) -> None:
    """Stop the Ray head. With delete_data, also remove the local artifact root's runs/."""
    local_down(echo=echo)
    if delete_data:
        shutil.rmtree(rlfleet_home() / "runs", ignore_errors=True)


def plan_destroy(target: Target, *, delete_data: bool) -> list[str]:
    plan = []
    st = read_state()
    if st:
        plan.append(
            f"stop the local Ray head ({target.ray_address}, pids {st.get('holder_pid')}, {st.get('forwarder_pid')})"
        )
    if delete_data and (rlfleet_home() / "runs").exists():
        plan.append(f"delete {rlfleet_home() / 'runs'}")
    return plan


def sweep(target: Target) -> StackSweep | None:
    return None  # nothing is tagged in a cloud: scan_leftovers looks at this machine


def scan_leftovers(target: Target) -> list[Leftover]:
    """Anything of the local head still alive or on disk after destroy."""
    left = []
    if read_state():
        left.append("local state file still present")
    temp = _temp_parent()
    if os.path.lexists(temp) and temp.lstat().st_uid == os.getuid():  # someone else's is not ours to remove
        left.append(f"Ray temp dir {temp}")
    left += [f"Ray process {pid}" for pid in _cluster_pids(_ray_temp_dir())]
    return [Leftover("local", "leftover", x) for x in left]


def cost_inputs(target: Target) -> CostInputs:
    raise ConfigError(f"target {target.name!r} (local) has no cloud stack to price")


# -- hooks for the local run supervisor (rlfleet.provisioners.local_supervisor) ---------------------
state_lock = _lock  # the lock every start/stop of this home's head holds
boot_id = _boot_id
signal_process = _signal  # signals pid only while it is still the process that started at `start`
private_open = _private_open


def is_own_live_process(pid: int, start: int | None) -> bool:
    """``pid`` is alive, this user's, and still the process that started at ``start``."""
    return _alive(pid) and _owned(pid) and proc_start_time(pid) == start


def head_process_launch() -> tuple[list[str], dict[str, str]]:
    """(command prefix, environment) for a process that belongs to the running head: it runs in the
    head's namespace (or carries its RAY_TMPDIR marker), so local_down() stops it with the head."""
    st = read_state()
    holder = _verified_holder(st) if st.get("isolation") == "netns" else None
    return (_nsenter(holder) if holder else []), _ray_env(_ray_temp_dir())
