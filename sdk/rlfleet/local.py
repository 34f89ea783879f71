"""The embedded local target: a Ray head for this user on 127.0.0.1, artifacts on disk.

- Token auth is always on (``RAY_AUTH_MODE=token``); the token lives in
  ``$RLFLEET_HOME/local/token`` with mode 0600 and is never put on a command line.
- The head runs in a private network namespace with only ``lo`` (see ``_netns``): Ray's internal
  servers cannot be reached from the network at all, and a forwarder exposes just the Jobs API
  port and the deploy ports on the host's 127.0.0.1.
- If namespaces are unavailable (no root and no user namespaces), ``rlfleet local up`` refuses
  with a clear message unless ``RLFLEET_LOCAL_ISOLATION=none`` is set, in which case Ray runs on
  the host network with token auth and rlfleet says which ports are exposed.
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
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from rlfleet.errors import ClusterUnreachable, RlfleetError
from rlfleet.targets import Target, rlfleet_home

N_SERVE_PORTS = 8


def state_dir() -> Path:
    return rlfleet_home() / "local"


def token_path() -> Path:
    return state_dir() / "token"


def _state_file() -> Path:
    return state_dir() / "state.json"


def _ray_temp_dir() -> str:
    # Ray's unix sockets must fit in 107 bytes: keep its temp dir short and per-home.
    digest = hashlib.sha256(str(rlfleet_home().resolve()).encode()).hexdigest()[:8]
    return f"/tmp/rlfleet-{os.getuid()}-{digest}"  # noqa: S108 - per-user, per-home, mode 0700


def read_state() -> dict[str, Any]:
    try:
        return dict(json.loads(_state_file().read_text()))
    except (FileNotFoundError, ValueError):
        return {}


def local_target() -> Target:
    """The local target as data. It works with no config; the port comes from the running head."""
    st = read_state()
    port = st.get("dashboard_port", 8265)
    return Target(
        name="local",
        kind="local",
        ray_address=f"http://127.0.0.1:{port}",
        token_source=f"file:{token_path()}",
        artifact_root="file://" + str(rlfleet_home()),
        provisioner={"type": "local"},
        env_vars={"RLFLEET_SERVE_PORTS": ",".join(str(p) for p in st.get("serve_ports", []))},
    )


def _ensure_token() -> str:
    path = token_path()
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
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
    if not pid:
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
    except (FileNotFoundError, IndexError):
        return False


@contextlib.contextmanager
def _lock() -> Iterator[None]:
    state_dir().mkdir(parents=True, exist_ok=True, mode=0o700)
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


def _ray_env(temp_dir: str) -> dict[str, str]:
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
            cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True
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


def _kill(pid: int | None, sig: int = signal.SIGTERM) -> None:
    if pid and _alive(pid):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)


def ensure_local_up(*, echo: Callable[[str], None] | None = None, num_cpus: int | None = None) -> Target:
    """Start (or reuse) this user's local Ray head. Idempotent; returns the local target."""
    say = echo or (lambda _m: None)
    with _lock():
        st = read_state()
        if st and _alive(st.get("holder_pid")) and _healthy(local_target()):
            return local_target()
        if st:
            _stop_locked(say, quiet=True)
        _ensure_token()
        temp_dir = _ray_temp_dir()
        os.makedirs(temp_dir, mode=0o700, exist_ok=True)
        ports = _free_ports(1 + N_SERVE_PORTS)
        dash, serve = ports[0], ports[1:]
        isolation = _isolation()
        cpus = num_cpus or int(os.environ.get("RLFLEET_LOCAL_CPUS", "0")) or (os.cpu_count() or 1)
        log = open(state_dir() / "ray-start.log", "w")
        holder = fwd = None
        t0 = time.monotonic()
        try:
            prefix: list[str] = []
            if isolation == "netns":
                holder = _start_holder()
                prefix = _nsenter(holder)
                fwd_proc = subprocess.Popen(
                    [
                        sys.executable,
                        "-m",
                        "rlfleet._netns",
                        "--pid",
                        str(holder),
                        "--ports",
                        ",".join(str(p) for p in ports),
                    ],
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=log,
                    start_new_session=True,
                )
                fwd = fwd_proc.pid
            _write_state(
                {
                    "holder_pid": holder,
                    "forwarder_pid": fwd,
                    "dashboard_port": dash,
                    "serve_ports": serve,
                    "isolation": isolation,
                    "temp_dir": temp_dir,
                    "num_cpus": cpus,
                    "started_at": time.time(),
                }
            )
            say(f"starting Ray head (token auth, {'private network namespace' if holder else 'host network'}) ...")
            cmd = [
                *prefix, _ray_bin(), "start", "--head", "--node-ip-address=127.0.0.1",
                "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}", f"--num-cpus={cpus}",
                f"--temp-dir={temp_dir}", "--disable-usage-stats",
            ]  # fmt: skip
            res = subprocess.run(
                cmd, env=_ray_env(temp_dir), stdin=subprocess.DEVNULL, stdout=log, stderr=log, timeout=180
            )
            if res.returncode != 0:
                raise RlfleetError(f"'ray start' failed (exit {res.returncode}); see {state_dir() / 'ray-start.log'}")
            target = local_target()
            deadline = time.monotonic() + 120
            while not _healthy(target, timeout=5):
                if time.monotonic() > deadline:
                    raise ClusterUnreachable(
                        f"the local Ray head did not answer on {target.ray_address} within 120 s; "
                        f"see {state_dir() / 'ray-start.log'}"
                    )
                time.sleep(0.2)
            say(f"local Ray head is up at {target.ray_address} ({time.monotonic() - t0:.1f} s)")
            return target
        except BaseException:
            _stop_locked(say, quiet=True)
            raise
        finally:
            log.close()


def _write_state(st: dict[str, Any]) -> None:
    tmp = _state_file().with_suffix(".tmp")
    tmp.write_text(json.dumps(st))
    tmp.replace(_state_file())


def local_down(*, echo: Callable[[str], None] | None = None) -> bool:
    """Stop the local Ray head. Idempotent: returns False if nothing was running."""
    with _lock():
        return _stop_locked(echo or (lambda _m: None))


def _stop_locked(say: Callable[[str], None], quiet: bool = False) -> bool:
    st = read_state()
    if not st:
        return False
    holder = st.get("holder_pid")
    temp_dir = st.get("temp_dir") or _ray_temp_dir()
    if not quiet:
        say("stopping the local Ray head ...")
    _stop_cluster_processes(temp_dir, holder)
    _kill(st.get("forwarder_pid"))
    _kill(holder)
    with contextlib.suppress(FileNotFoundError):
        _state_file().unlink()
    shutil.rmtree(temp_dir, ignore_errors=True)
    return True


def _cluster_pids(temp_dir: str, holder: int | None) -> list[int]:
    """Processes of THIS cluster only: inside its network namespace, or carrying its RAY_TMPDIR.

    ``ray stop`` would kill every Ray process of the user on the machine (other clusters too),
    so the local target stops exactly its own.
    """
    netns = None
    if holder and _alive(holder):
        with contextlib.suppress(OSError):
            netns = os.readlink(f"/proc/{holder}/ns/net")
    marker = f"RAY_TMPDIR={temp_dir}".encode()
    me = os.getpid()
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) in (me, holder):
            continue
        pid = int(entry)
        try:
            if netns is not None and os.readlink(f"/proc/{pid}/ns/net") == netns:
                pids.append(pid)
                continue
            with open(f"/proc/{pid}/environ", "rb") as f:
                if marker in f.read().split(b"\0"):
                    pids.append(pid)
        except OSError:
            continue
    return pids


def _stop_cluster_processes(temp_dir: str, holder: int | None, grace_s: float = 10.0) -> None:
    pids = _cluster_pids(temp_dir, holder)
    for pid in pids:
        _kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline and any(_alive(p) for p in pids):
        time.sleep(0.1)
    for pid in pids:
        _kill(pid, signal.SIGKILL)


def local_status() -> dict[str, Any]:
    st = read_state()
    target = local_target()
    holder_ok = st.get("isolation") == "none" or _alive(st.get("holder_pid"))
    up = bool(st) and holder_ok and _healthy(target)
    return {
        "running": bool(up),
        "ray_address": target.ray_address if st else None,
        "isolation": st.get("isolation"),
        "num_cpus": st.get("num_cpus"),
        "serve_ports": st.get("serve_ports", []),
        "artifact_root": target.artifact_root,
        "token_file": str(token_path()),
        "started_at": st.get("started_at"),
    }
