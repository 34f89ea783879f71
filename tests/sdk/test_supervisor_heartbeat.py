"""How the SDK knows a ``ray`` target's cluster runs a supervisor: the heartbeat a live supervisor
keeps fresh in the target's store (``queue/supervisor.json``). No Ray cluster needed: the
supervisor process runs for real against a closed port (its passes fail; its heartbeat does not)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from rlfleet.provisioners import registry
from rlfleet.runqueue import FRESH_S, HEARTBEAT_S, QueueStore
from rlfleet.targets import Target


def _target(root: Path) -> Target:
    with socket.socket() as s:  # a port nothing listens on once closed
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return Target(name="hb", kind="ray", ray_address=f"http://127.0.0.1:{port}", token_source="env:T",
                  artifact_root=f"file://{root}")


def _supervised(t: Target) -> bool:
    registry._live.clear()  # one look is cached for LIVE_CACHE_S
    return registry.supervised(t)


def test_a_ray_target_is_supervised_only_while_the_heartbeat_is_fresh(tmp_path: Path) -> None:
    t = _target(tmp_path)
    q = QueueStore(t.store())
    assert not _supervised(t)  # no heartbeat at all
    q.put_heartbeat({"beat": time.time() - FRESH_S - 5, "pid": 1})
    assert not _supervised(t)  # a supervisor that died a while ago
    q.put_heartbeat({"beat": time.time(), "pid": 1})
    assert _supervised(t)
    (tmp_path / "queue" / "supervisor.json").write_text("{not json")
    assert not _supervised(t)  # torn or foreign: not an announcement
    # local targets are supervised by kind; aws/gcp by the heartbeat too (their head's unit writes
    # it in the bucket: tests/sdk/test_cloud_supervised.py)
    assert registry.supervised(t.model_copy(update={"kind": "local"}))
    aws = t.model_copy(update={"kind": "aws", "provisioner": {"type": "pulumi", "project_dir": "/p", "stack": "s"}})
    q.put_heartbeat({"beat": time.time(), "pid": 1})
    assert _supervised(aws)


def start_supervisor(t: Target, root: str, token_dir: Path, *, poll: float, timeout: float,
                     env: dict[str, str] | None = None) -> subprocess.Popen:
    """A real supervisor process on ``root`` against ``t``'s Ray address, once its heartbeat makes
    ``t`` supervised (it is SIGTERMed if that does not happen within ``timeout``)."""
    token = token_dir / "token"
    token.write_text("x" * 32)
    token.chmod(0o600)
    proc = subprocess.Popen([sys.executable, "-m", "rlfleet.supervisor", "--address", t.ray_address,
                             "--token-file", str(token), "--root", root, "--poll", str(poll)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=dict(os.environ) if env is None else env)
    try:
        deadline = time.monotonic() + timeout
        while not _supervised(t):
            assert proc.poll() is None, proc.stdout.read() if proc.stdout else ""
            assert time.monotonic() < deadline, f"no heartbeat within {timeout:.0f} s"
            time.sleep(0.2)
    except BaseException:
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=60)
        raise
    return proc


def test_a_running_supervisor_announces_itself_and_withdraws_on_sigterm(tmp_path: Path) -> None:
    root = tmp_path / "store"
    t = _target(root)
    proc = start_supervisor(t, t.artifact_root, tmp_path, poll=0.2, timeout=60)
    try:
        beat = QueueStore(t.store()).heartbeat() or {}
        assert beat["pid"] == proc.pid and abs(beat["beat"] - time.time()) < 30
        time.sleep(1.0)  # several passes against the closed port: it keeps running (and announced)
        assert proc.poll() is None and _supervised(t)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=30)
    assert not (root / "queue" / "supervisor.json").exists()
    assert not _supervised(t)


def test_a_queued_run_stays_visible_while_the_heartbeat_is_stale(tmp_path: Path, monkeypatch) -> None:
    """A run the SDK queued (the supervisor was live) is still found when the heartbeat has gone
    stale for a moment (a supervisor slowed by load): reads look in the queue whenever the kind can
    have a supervisor. On the on-prem host 'rlfleet logs -f' said 'no run' for a just-queued run."""
    import time as _time

    from rlfleet import runs as runs_mod
    from rlfleet.artifacts import ArtifactStore
    from rlfleet.errors import RunNotFound
    from rlfleet.runqueue import QueueStore, Request
    from rlfleet.runs import Run, RunStatus

    class _NoJob:
        def get(self, run_id: str) -> dict:
            raise RunNotFound(run_id)

    t = _target(tmp_path)
    monkeypatch.setattr(runs_mod, "jobs_client", lambda _t: _NoJob())
    QueueStore(ArtifactStore(f"file://{tmp_path}")).put_request(Request(
        run_id="rl-q", priority=0, submitted_ns=_time.time_ns(), user="u", cpus=1, gpus=0, max_restarts=0,
        job={"entrypoint": "true", "metadata": {}, "runtime_env": {}}))
    assert not _supervised(t)  # no fresh heartbeat
    assert Run("rl-q", t).status() is RunStatus.QUEUED
    with pytest.raises(RunNotFound):
        Run("rl-nope", t).status()


def test_logs_follow_waits_while_the_run_is_queued(tmp_path: Path, monkeypatch) -> None:
    """'rlfleet logs -f' of a run still in the queue (no Ray job yet) waits for it and then prints
    its lines; it said 'no run ... on target' on the on-prem host (fresh-clone CI), where every
    run goes through the supervisor's queue."""
    import time as _time

    from rlfleet import runs as runs_mod
    from rlfleet.artifacts import ArtifactStore
    from rlfleet.errors import RunNotFound
    from rlfleet.runqueue import QueueStore, Request
    from rlfleet.runs import Run

    calls = {"n": 0}

    class _Dispatched:  # Ray knows the job from the third look on (the supervisor dispatched it)
        def _known(self) -> bool:
            calls["n"] += 1
            return calls["n"] > 2

        def get(self, run_id: str) -> dict:
            if not self._known():
                raise RunNotFound(run_id)
            return {"submission_id": run_id, "status": "SUCCEEDED", "metadata": {}}

        def logs(self, run_id: str) -> str:
            if not self._known():
                raise RunNotFound(run_id)
            return "line 1\nline 2\n"

    t = _target(tmp_path)
    monkeypatch.setattr(runs_mod, "jobs_client", lambda _t: _Dispatched())
    QueueStore(ArtifactStore(f"file://{tmp_path}")).put_request(Request(
        run_id="rl-q", priority=0, submitted_ns=_time.time_ns(), user="u", cpus=1, gpus=0, max_restarts=0,
        job={"entrypoint": "true", "metadata": {}, "runtime_env": {}}))
    assert Run("rl-q", t).logs() == ""  # queued: nothing printed yet, not an error
    calls["n"] = 0
    assert "".join(Run("rl-q", t)._follow(poll=0.01)) == "line 1\nline 2\n"
    calls["n"] = 0
    with pytest.raises(RunNotFound):  # a run neither Ray nor the queue knows is still an error
        list(Run("rl-nope", t)._follow(poll=0.01))


def test_a_flood_of_wakeups_never_stalls_the_supervisor(tmp_path: Path) -> None:
    """Every queued run sends the local supervisor a SIGUSR1. Its handler called Event.set(), which
    takes the Event's lock: a signal landing while the loop itself held that lock (in clear() or
    wait()) deadlocked the process for good, and the queue stopped (seen with 200 runs submitted at
    once on a busy machine: 153 runs left queued, no pass for 15 min). After a flood of wakeups the
    supervisor must still be passing: its heartbeat comes back once removed."""
    root = tmp_path / "store"
    t = _target(root)
    proc = start_supervisor(t, t.artifact_root, tmp_path, poll=0.01, timeout=60)
    beat = root / "queue" / "supervisor.json"
    try:
        end = time.monotonic() + 8
        sent = 0
        while time.monotonic() < end and proc.poll() is None:
            os.kill(proc.pid, signal.SIGUSR1)
            sent += 1
            if sent % 50 == 0:
                time.sleep(0.001)
        assert proc.poll() is None, "the supervisor died of a wakeup"
        beat.unlink()
        deadline = time.monotonic() + HEARTBEAT_S + 20
        while not beat.exists() and time.monotonic() < deadline:
            time.sleep(0.2)
        assert beat.exists(), f"no pass after {sent} wakeups: the supervisor is stuck"
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=30)
