"""Safety of the embedded local target: what it signals, reuses, exposes and forwards.

- Stopping never signals a process outside this cluster, whatever state.json says (stale after a
  crash/reboot, or forged): proven with real ``sleep`` processes in the host network namespace,
  inside a throwaway PID namespace so a regression cannot reach the rest of the machine.
- With ``RLFLEET_LOCAL_ISOLATION=none`` a healthy head is reused (runs survive the next submit).
- Local state is private (0700 home / state / temp parent, umask 077 for the cluster, no token
  outside the token file); a temp dir someone else could touch makes ``local up`` refuse.
- The loopback forwarder is bounded: idle connections are dropped, 5,000 of them do not stop
  ``rlfleet runs``.
"""

from __future__ import annotations

import hashlib
import json
import os
import resource
import socket
import stat
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from rlfleet import RunSpec, submit_run

pytestmark = pytest.mark.integration
PY = sys.executable
RLFLEET = str(Path(PY).parent / "rlfleet")


def _temp_parent(home: Path) -> Path:
    """The per-user, per-home directory under /tmp that holds Ray's temp dir."""
    digest = hashlib.sha256(str(home.resolve()).encode()).hexdigest()[:8]
    return Path(f"/tmp/rlfleet-{os.getuid()}-{digest}")


def _cli(*args: str, env: dict[str, str] | None = None, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [RLFLEET, *args], capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL, env=env
    )


# -- item 2: stale or forged state never signals a stranger ------------------------------------------

_SANDBOX = textwrap.dedent(
    """
    import json, os, subprocess, sys, time
    from pathlib import Path

    home = Path(sys.argv[1])
    os.environ["RLFLEET_HOME"] = str(home)
    os.environ.pop("RLFLEET_LOCAL_ISOLATION", None)
    from rlfleet import RunSpec, local, submit_run
    from rlfleet.errors import RlfleetError
    from rlfleet.provisioners import local as prov

    def sleeper(env=None):
        return subprocess.Popen(["sleep", "300"], env=env)

    def start(pid):
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19])

    def ns(pid):
        return os.stat(f"/proc/{pid}/ns/net").st_ino

    host_ns = ns(os.getpid())
    boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    shared_tmp = home.parent / "shared-tmp"
    shared_tmp.mkdir()
    (shared_tmp / "keep").write_text("not rlfleet's")

    holder, fwd, bystander = sleeper(), sleeper(), sleeper()
    marked = sleeper({**os.environ, "RAY_TMPDIR": str(shared_tmp)})
    # another cluster's namespace holder and a process inside that namespace
    other = subprocess.Popen(["unshare", "--net", "sleep", "300"])
    while ns(other.pid) == host_ns:
        time.sleep(0.01)
    inside = subprocess.Popen(["nsenter", f"--net=/proc/{other.pid}/ns/net", "sleep", "300"])
    while ns(inside.pid) != ns(other.pid):
        time.sleep(0.01)
    victims = {"holder": holder, "forwarder": fwd, "bystander": bystander, "marked": marked,
               "other_holder": other, "inside_other": inside}
    base = {"dashboard_port": 9, "serve_ports": [], "temp_dir": str(shared_tmp), "started_at": 0}

    # the state a netns cluster records; a skewed start time is a pid reused by another process
    def recorded(holder, fwd, netns, *, boot=boot, holder_skew=0, forwarder_skew=0):
        return {**base, "isolation": "netns", "boot_id": boot,
                "holder_pid": holder.pid, "holder_start": start(holder.pid) + holder_skew, "netns_inode": netns,
                "forwarder_pid": fwd.pid, "forwarder_start": start(fwd.pid) + forwarder_skew}

    scenarios = [
        ("legacy state (no identity recorded)", "local_down",
         {**base, "isolation": "netns", "holder_pid": holder.pid, "forwarder_pid": fwd.pid}),
        ("holder pid reused (start time differs)", "destroy",
         recorded(holder, fwd, host_ns, holder_skew=1, forwarder_skew=1)),
        ("forged: live holder in the host namespace", "local_down", recorded(holder, fwd, host_ns)),
        ("pid reused by another cluster's holder", "destroy",
         recorded(other, inside, ns(other.pid), holder_skew=1, forwarder_skew=1)),
        ("namespace recorded differs from the holder's", "local_down", recorded(other, inside, host_ns)),
        ("state from before a reboot", "destroy", recorded(other, inside, ns(other.pid), boot="0" * 32)),
        ("isolation none, temp_dir of someone else", "local_down",
         {**base, "isolation": "none", "boot_id": boot, "holder_pid": None, "forwarder_pid": None}),
        ("submit_run finds stale state", "submit", recorded(holder, fwd, host_ns, holder_skew=1)),
    ]
    out = []
    for name, op, st in scenarios:
        local._state_file().parent.mkdir(parents=True, exist_ok=True)
        local._state_file().write_text(json.dumps(st))
        if op == "local_down":
            local.local_down()
        elif op == "submit":
            # submit_run clears the stale state, then stops before starting Ray: the temp dir is a symlink
            (home.parent / "elsewhere").mkdir(exist_ok=True)
            local._temp_parent().symlink_to(home.parent / "elsewhere")
            try:
                submit_run(RunSpec(kind="train", agent="random", budget={"steps": 10}), target="local")
                sys.exit("submit_run started a head")
            except RlfleetError as err:
                assert "symlink" in str(err), err
            finally:
                local._temp_parent().unlink()
        else:
            prov.destroy(local.local_target(), delete_data=False, echo=lambda m: None)
        time.sleep(0.3)
        left = prov.scan_leftovers(local.local_target())
        out.append({"scenario": name, "dead": sorted(k for k, p in victims.items() if p.poll() is not None),
                    "state_left": local._state_file().exists(), "shared_tmp_kept": (shared_tmp / "keep").exists(),
                    "leftovers": left})
    # control: a leftover process of THIS home (carries this home's RAY_TMPDIR) is stopped
    leftover = sleeper({**os.environ, "RAY_TMPDIR": local._ray_temp_dir()})
    local._state_file().write_text(json.dumps({**base, "isolation": "none", "boot_id": boot,
                                               "temp_dir": local._ray_temp_dir()}))
    local.local_down()
    deadline = time.monotonic() + 15
    while leftover.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)
    # control: a head started before identities were recorded (legacy state.json) is still stopped,
    # holder and forwarder included, when the pair proves itself (see rlfleet.local._legacy_holder)
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    lholder = subprocess.Popen(["unshare", "--net", "sleep", "infinity"])
    while ns(lholder.pid) == host_ns:
        time.sleep(0.01)
    lfwd = subprocess.Popen([sys.executable, "-m", "rlfleet._netns", "--pid", str(lholder.pid), "--ports", str(port)],
                            stdout=subprocess.DEVNULL)
    deadline = time.monotonic() + 15
    while ns(lfwd.pid) != ns(lholder.pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    linside = subprocess.Popen(["nsenter", f"--net=/proc/{lholder.pid}/ns/net", "sleep", "300"])
    while ns(linside.pid) != ns(lholder.pid):
        time.sleep(0.01)
    local._state_file().write_text(json.dumps({**base, "isolation": "netns", "holder_pid": lholder.pid,
                                               "forwarder_pid": lfwd.pid, "dashboard_port": port}))
    local.local_down()
    deadline = time.monotonic() + 15
    legacy = {"holder": lholder, "forwarder": lfwd, "inside": linside}
    while any(p.poll() is None for p in legacy.values()) and time.monotonic() < deadline:
        time.sleep(0.1)
    print(json.dumps({"scenarios": out, "own_leftover_stopped": leftover.poll() is not None,
                      "legacy_left": sorted(k for k, p in legacy.items() if p.poll() is None),
                      "others_alive": sorted(k for k, p in victims.items() if p.poll() is None)}))
    """
)


def test_stale_or_forged_state_never_signals_other_processes(tmp_path) -> None:
    """A holder/forwarder PID that is not this cluster's (reused, forged, other cluster, pre-reboot) is
    never signalled, nor is anything in its namespace or carrying a temp_dir taken from the state.

    Runs in a private PID namespace (the sleeps are in the HOST network namespace): a regression
    kills the sandbox's processes, not the machine's.
    """
    script = tmp_path / "sandbox.py"
    script.write_text(_SANDBOX)
    cmd = ["unshare", "--pid", "--fork", "--mount-proc"]
    if os.geteuid() != 0:
        cmd.insert(1, "--map-root-user")
    res = subprocess.run([*cmd, PY, str(script), str(tmp_path / "home")], capture_output=True, text=True, timeout=240)
    assert res.returncode == 0, res.stderr[-3000:]
    doc = json.loads(res.stdout.strip().splitlines()[-1])
    for sc in doc["scenarios"]:
        assert sc["dead"] == [], f"{sc['scenario']}: signalled {sc['dead']}"
        assert not sc["state_left"], f"{sc['scenario']}: stale state not cleared"
        assert sc["shared_tmp_kept"], f"{sc['scenario']}: removed a temp_dir named by the state"
        assert sc["leftovers"] == [], f"{sc['scenario']}: {sc['leftovers']}"
    assert len(doc["others_alive"]) == 6
    assert doc["own_leftover_stopped"], "a process carrying this home's RAY_TMPDIR must still be stopped"
    assert doc["legacy_left"] == [], "a head from before identities were recorded must still be stopped"


# -- item 3: RLFLEET_LOCAL_ISOLATION=none reuses a healthy head ---------------------------------------


def test_isolation_none_head_is_reused_by_the_next_submit(tmp_path, monkeypatch) -> None:
    from rlfleet.local import _cluster_pids, _ray_temp_dir, ensure_local_up, local_down, local_status, read_state

    monkeypatch.setenv("RLFLEET_HOME", str(tmp_path / "none-home"))
    monkeypatch.setenv("RLFLEET_LOCAL_ISOLATION", "none")
    try:
        ensure_local_up(num_cpus=1)
        st0 = read_state()
        assert st0["isolation"] == "none"
        pids0 = set(_cluster_pids(_ray_temp_dir(), None))
        assert pids0
        spec = RunSpec(kind="train", agent="random", budget={"steps": 300}, resources={"cpus": 0.25})
        first = submit_run(spec, target="local")
        second = submit_run(spec, target="local")  # must reuse the head, not restart it
        assert read_state()["started_at"] == st0["started_at"], "the head was restarted by a submit"
        assert pids0 <= set(_cluster_pids(_ray_temp_dir(), None)), "head processes were replaced"
        assert first.wait(timeout=180).value == "SUCCEEDED"
        assert second.wait(timeout=180).value == "SUCCEEDED"
        assert local_status()["running"] is True
    finally:
        local_down()


# -- item 8: local state is private -----------------------------------------------------------------


def _mode(p: Path) -> int:
    return stat.S_IMODE(p.lstat().st_mode)


def test_temp_dir_someone_else_controls_is_refused(tmp_path) -> None:
    cases = {}
    nobody = tmp_path / "h-nobody"
    cases["owned by someone else"] = nobody
    loose = tmp_path / "h-loose"
    cases["group/world-writable"] = loose
    link = tmp_path / "h-link"
    cases["a symlink"] = link
    made: list[Path] = []
    try:
        for case, home in cases.items():
            parent = _temp_parent(home)
            if case == "a symlink":
                (tmp_path / "elsewhere").mkdir(mode=0o700)
                parent.symlink_to(tmp_path / "elsewhere")
            else:
                parent.mkdir(mode=0o700)
                if case == "owned by someone else":
                    os.chown(parent, 65534, 65534)
                else:
                    os.chmod(parent, 0o777)  # noqa: S103 - the unsafe dir under test
            made.append(parent)
            before = sorted(os.listdir(parent))
            env = {**os.environ, "RLFLEET_HOME": str(home)}
            res = _cli("local", "up", env=env, timeout=240)
            assert res.returncode != 0, f"{case}: 'local up' started a head in {parent}"
            assert "Traceback" not in res.stderr
            lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
            assert str(parent) in lines[-1] and "refus" in lines[-1], f"{case}: {res.stderr}"
            assert sorted(os.listdir(parent)) == before, f"{case}: wrote into {parent}"
            assert not (home / "local" / "state.json").exists() and not (home / "local" / "token").exists()
    finally:
        for home in cases.values():
            if (home / "local" / "state.json").exists():  # old code started a head: stop it
                _cli("local", "down", env={**os.environ, "RLFLEET_HOME": str(home)})
        for parent in made:
            if parent.is_symlink():
                parent.unlink()
            else:
                subprocess.run(["rm", "-rf", str(parent)], check=False)


def test_local_state_is_private(local_cluster, tmp_path) -> None:
    from rlfleet.local import _ray_temp_dir, read_state, state_dir, token_path
    from rlfleet.targets import rlfleet_home

    run = submit_run(RunSpec(kind="train", agent="random", budget={"steps": 300}), target="local")
    assert run.wait(timeout=180).value == "SUCCEEDED"
    home = rlfleet_home()
    st = read_state()
    parent = _temp_parent(home)
    for d in (home, state_dir(), home / "runs", parent):
        assert d.lstat().st_uid == os.getuid() and stat.S_ISDIR(d.lstat().st_mode)
        assert _mode(d) == 0o700, f"{d} is {oct(_mode(d))}"
    # Ray makes its own temp dir 0777: it must sit below the private parent
    assert Path(_ray_temp_dir()).parent == parent and Path(st["temp_dir"]).parent == parent
    # everything the run wrote (runs/<id>/..., endpoint.json for deploys) is private by itself too
    for p in [home / "runs" / run.run_id, *(home / "runs" / run.run_id).rglob("*")]:
        assert _mode(p) & 0o077 == 0, f"{p} is {oct(_mode(p))}"
    # every process of the cluster creates files with umask 077
    for pid in _cluster_pids_of_session():
        status = Path(f"/proc/{pid}/status").read_text()
        umask = next(ln.split()[1] for ln in status.splitlines() if ln.startswith("Umask:"))
        assert umask == "0077", f"pid {pid} has umask {umask}"
    # the token is only in the 0600 token file
    token = token_path().read_text().strip().encode()
    assert _mode(token_path()) == 0o600
    holders = []
    for root in (home, parent):
        for dirpath, _dirs, files in os.walk(root):
            for name in files:
                p = Path(dirpath) / name
                if p == token_path() or p.is_symlink() or not p.is_file():
                    continue
                try:
                    if token in p.read_bytes():
                        holders.append(str(p))
                except OSError:
                    continue
    assert holders == [], f"the token is written in {holders}"


def _cluster_pids_of_session() -> list[int]:
    from rlfleet.local import _cluster_pids, _ray_temp_dir, _verified_holder, read_state

    pids = _cluster_pids(_ray_temp_dir(), _verified_holder(read_state()))
    assert len(pids) >= 5
    return pids


# -- item 12: the forwarder is bounded -----------------------------------------------------------------


def _fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def _threads(pid: int) -> int:
    return int(next(ln.split()[1] for ln in Path(f"/proc/{pid}/status").read_text().splitlines()
                    if ln.startswith("Threads:")))


@pytest.fixture
def netns_upstream(tmp_path):
    """A test-made network namespace (only lo) with an HTTP server on 127.0.0.1:<port> inside."""
    holder = subprocess.Popen(["unshare", "--net", "sleep", "300"])
    procs = [holder]
    try:
        own = os.stat("/proc/self/ns/net").st_ino
        deadline = time.monotonic() + 5
        while os.stat(f"/proc/{holder.pid}/ns/net").st_ino == own and time.monotonic() < deadline:
            time.sleep(0.01)
        enter = ["nsenter", f"--net=/proc/{holder.pid}/ns/net"]
        subprocess.run([*enter, "ip", "link", "set", "lo", "up"], check=True)
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        (tmp_path / "www").mkdir()
        (tmp_path / "www" / "hello").write_text("hello")
        srv = subprocess.Popen([*enter, PY, "-m", "http.server", "--bind", "127.0.0.1", str(port)],
                               cwd=tmp_path / "www", stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        procs.append(srv)
        yield holder.pid, port, procs
    finally:
        for p in reversed(procs):
            p.terminate()
            p.wait(10)


def _get(port: int, path: str = "/hello", timeout: float = 10) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as c:
        c.sendall(f"GET {path} HTTP/1.0\r\nHost: x\r\n\r\n".encode())
        chunks = []
        while data := c.recv(65536):
            chunks.append(data)
    return b"".join(chunks)


def _closed_within(sock: socket.socket, seconds: float) -> float | None:
    sock.settimeout(seconds)
    t0 = time.monotonic()
    try:
        data = sock.recv(1)
    except ConnectionResetError:
        return time.monotonic() - t0
    except TimeoutError:
        return None
    return time.monotonic() - t0 if data == b"" else None


def test_forwarder_drops_idle_connections_and_caps_their_number(netns_upstream) -> None:
    holder, port, procs = netns_upstream
    fwd = subprocess.Popen([PY, "-m", "rlfleet._netns", "--pid", str(holder), "--ports", str(port),
                            "--max-conns", "16", "--idle-timeout", "3", "--first-byte-timeout", "1"],
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    procs.append(fwd)
    assert fwd.stdout is not None
    line = fwd.stdout.readline()  # printed once listening and inside the namespace
    assert "forwarding" in line, line + (fwd.stdout.read() if fwd.poll() is not None else "")
    deadline = time.monotonic() + 20  # the server inside the namespace may still be starting
    while not _get(port).endswith(b"hello"):
        assert time.monotonic() < deadline, "no answer through the forwarder"
        time.sleep(0.2)
    # a connection that never sends a byte is dropped after the first-byte timeout
    idle = socket.create_connection(("127.0.0.1", port))
    took = _closed_within(idle, 5)
    idle.close()
    assert took is not None and 0.5 <= took <= 3.5, took
    # a connection that sent a request and then went quiet is dropped after the idle timeout
    half = socket.create_connection(("127.0.0.1", port))
    half.sendall(b"GET /hello HTTP/1.1\r\nHost: x\r\n")  # never finishes its headers
    took = _closed_within(half, 8)
    half.close()
    assert took is not None and 2 <= took <= 6.5, took
    # 200 idle connections: the forwarder holds at most 16, and a real request still gets through
    base_fds = _fds(fwd.pid)
    conns = [socket.create_connection(("127.0.0.1", port), timeout=5) for _ in range(200)]
    try:
        time.sleep(0.3)
        assert _get(port).endswith(b"hello")
        assert _fds(fwd.pid) <= base_fds + 2 * 16, _fds(fwd.pid)
    finally:
        for c in conns:
            c.close()
    assert fwd.poll() is None


def test_5000_idle_connections_do_not_stop_rlfleet_runs(local_cluster) -> None:
    from rlfleet.local import _healthy, read_state

    run = submit_run(RunSpec(kind="train", agent="random", budget={"steps": 200}), target="local")
    assert run.wait(timeout=180).value == "SUCCEEDED"
    st = read_state()
    fwd = st["forwarder_pid"]
    port = st["dashboard_port"]
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, max(soft, 12000)), hard))
    conns: list[socket.socket] = []
    peak = {"fds": 0, "threads": 0}
    opened = threading.Event()

    def flood() -> None:
        try:
            for i in range(5000):
                s = socket.socket()
                s.setblocking(False)
                s.connect_ex(("127.0.0.1", port))
                conns.append(s)
                if i % 250 == 249:  # let the forwarder keep up; sample it while the flood is on
                    time.sleep(0.02)
                    peak["fds"] = max(peak["fds"], _fds(fwd))
                    peak["threads"] = max(peak["threads"], _threads(fwd))
        finally:
            opened.set()

    t = threading.Thread(target=flood, daemon=True)
    t0 = time.monotonic()
    t.start()
    try:
        res = _cli("runs", timeout=120)
        runs_s = time.monotonic() - t0
        t.join(60)
        assert opened.is_set() and len(conns) == 5000
        time.sleep(0.5)
        peak["fds"] = max(peak["fds"], _fds(fwd))
        peak["threads"] = max(peak["threads"], _threads(fwd))
        assert res.returncode == 0, res.stderr
        assert "not running" not in res.stderr and "runs on local" in res.stdout, res.stdout + res.stderr
        assert run.run_id in res.stdout
        # bounded: at most the connection cap (client + upstream sockets each), a handful of threads
        assert peak["fds"] <= 2 * 1024 + 64, peak
        assert peak["threads"] <= 8, peak
        print(f"5000 idle connections: 'rlfleet runs' answered in {runs_s:.1f} s; forwarder peak {peak}")
    finally:
        for s in conns:
            s.close()
    assert _healthy(local_cluster, timeout=10)
