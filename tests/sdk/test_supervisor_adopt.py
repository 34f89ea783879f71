"""The supervisor's decisions on runs whose job an earlier supervisor or head left behind: a job an
earlier supervisor submitted but never recorded (it was killed in between) is adopted with its
dispatch time; a managed run whose job was lost after the run had committed its manifest is done,
not restarted (a restart would find the manifest and fail)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from rlfleet.artifacts import ArtifactStore
from rlfleet.errors import RunNotFound
from rlfleet.runqueue import QueueStore, Request
from rlfleet.supervisor import Supervisor


class _Jobs:
    """Ray's Jobs API as the supervisor sees it: one RUNNING job that Ray started at ``started``."""

    def __init__(self, run_id: str | None, started: float = 0.0) -> None:
        self.job = {"submission_id": run_id, "status": "RUNNING", "start_time": int(started * 1000),
                    "metadata": {}}
        self.submitted: list[str] = []

    def list(self) -> list[dict[str, Any]]:
        return [self.job] if self.job["submission_id"] else []

    def get(self, run_id: str) -> dict[str, Any]:
        if run_id != self.job["submission_id"]:
            raise RunNotFound(run_id)
        return self.job

    def submit(self, submission_id: str, **_job: Any) -> str:
        self.submitted.append(submission_id)
        return submission_id

    def delete(self, run_id: str) -> bool:
        return False

    def node_resources(self) -> list[dict[str, Any]]:
        return [{"node_id": "n-1", "CPU": 2.0}]


def test_an_adopted_job_records_its_dispatch_time(tmp_path: Path) -> None:
    q = QueueStore(ArtifactStore(f"file://{tmp_path}"))
    q.put_request(Request(run_id="rl-a", priority=0, submitted_ns=time.time_ns(), user="u", cpus=1, gpus=0,
                          max_restarts=0, job={"entrypoint": "true"}))
    started = time.time() - 5
    sup = Supervisor(_Jobs("rl-a", started), q)  # type: ignore[arg-type]
    sup.step()
    st = q.state("rl-a")
    assert st is not None and st["status"] == "DISPATCHED"
    assert abs(st["dispatched"] - started) < 0.01  # when Ray started it, not when it was adopted


def _managed(q: QueueStore, kind: str) -> None:
    """A train (or other) run with one restart left whose job the head forgot: the Ray head
    restarted after the run had been dispatched."""
    q.put_request(Request(run_id="rl-b", priority=0, submitted_ns=time.time_ns(), user="u", cpus=1, gpus=0,
                          max_restarts=1, job={"entrypoint": "true", "metadata": {"rlfleet_kind": kind}}))
    q.put_state("rl-b", {"status": "DISPATCHED", "attempt": 0, "restarts": 0, "dispatched": time.time() - 9})


def test_a_lost_job_whose_run_had_committed_is_done_not_restarted(tmp_path: Path) -> None:
    store = ArtifactStore(f"file://{tmp_path}")
    q = QueueStore(store)
    _managed(q, "train")
    arts = store.run("rl-b")
    arts.write_text("spec.json", "{}")
    arts.commit(extra={"env_steps": 6144})  # the run finished before its job was lost
    jobs = _Jobs(None)
    Supervisor(jobs, q).step()  # type: ignore[arg-type]
    st = q.state("rl-b")
    assert st is not None and st["status"] == "SUCCEEDED", st
    assert st["restarts"] == 0 and "committed" in st["message"] and "lost" in st["message"]
    assert jobs.submitted == [] and q.request("rl-b") is None


def test_a_lost_job_without_a_manifest_is_restarted(tmp_path: Path) -> None:
    store = ArtifactStore(f"file://{tmp_path}")
    q = QueueStore(store)
    _managed(q, "train")
    store.run("rl-b").write_text("checkpoints/latest.json", "{}")  # mid-run: a checkpoint, no manifest
    Supervisor(_Jobs(None), q).step()  # type: ignore[arg-type]
    st = q.state("rl-b")
    assert st is not None and st["status"] == "QUEUED" and st["restarts"] == 1 and st["resume"], st
    assert "lost" in st["history"][0]["message"]


def test_a_run_killed_after_its_commit_reads_succeeded(tmp_path: Path, monkeypatch) -> None:
    """Ray keeps the FAILED job of a trainer SIGKILLed after its commit; the run reads as the
    supervisor ruled it: SUCCEEDED."""
    from rlfleet.runs import _managed_view
    from rlfleet.targets import local_target

    monkeypatch.setenv("RLFLEET_HOME", str(tmp_path))
    tgt = local_target()
    q = QueueStore(tgt.store())
    _managed(q, "train")
    arts = tgt.store().run("rl-b")
    arts.write_text("spec.json", "{}")
    arts.commit(extra={})
    failed = {"submission_id": "rl-b", "status": "FAILED", "message": "Job entrypoint command failed with exit code -9",
              "metadata": {"rlfleet_max_restarts": "1", "rlfleet_attempt": "0"}}
    jobs = _Jobs(None)
    jobs.job = failed
    Supervisor(jobs, q).step()  # type: ignore[arg-type]
    view = _managed_view(tgt, "rl-b", failed)
    assert view["status"] == "SUCCEEDED" and "exit code -9" in view["message"], view


def test_a_run_waiting_out_its_restart_delay_keeps_its_place(tmp_path: Path) -> None:
    """A managed run waits RESTART_DELAY_S before its resubmit; runs queued behind it must not take
    the room it needs meanwhile (strict order: nothing overtakes the first run that does not fit)."""
    q = QueueStore(ArtifactStore(f"file://{tmp_path}"))
    now = time.time_ns()
    q.put_request(Request(run_id="rl-first", priority=0, submitted_ns=now - 10**9, user="u", cpus=2, gpus=0,
                          max_restarts=1, job={"entrypoint": "true", "metadata": {"rlfleet_kind": "train"}}))
    q.put_state("rl-first", {"status": "QUEUED", "attempt": 1, "restarts": 1, "resume": True,
                             "not_before": time.time() + 60})
    q.put_request(Request(run_id="rl-later", priority=0, submitted_ns=now, user="v", cpus=1, gpus=0,
                          max_restarts=0, job={"entrypoint": "true", "metadata": {"rlfleet_kind": "train"}}))
    jobs = _Jobs(None)  # the cluster is empty: 2 CPUs free
    Supervisor(jobs, q).step()  # type: ignore[arg-type]
    assert jobs.submitted == [], "a later run took the room of the run waiting to restart"
    assert q.state("rl-later") is None or q.state("rl-later")["status"] == "QUEUED"


def test_an_unreachable_cluster_is_logged_once_a_minute_not_every_pass(tmp_path: Path, capsys) -> None:
    """While the Ray head is down the supervisor tries every pass (1 s on-prem); the journal gets the
    error once, a reminder a minute later, and one line when the cluster answers again."""
    from rlfleet.errors import RlfleetError

    class _Down(_Jobs):
        down = True

        def list(self) -> list[dict[str, Any]]:
            if self.down:
                raise RlfleetError("cannot reach the Ray cluster at http://127.0.0.1:8265")
            return []

    q = QueueStore(ArtifactStore(f"file://{tmp_path}"))
    jobs = _Down(None)
    sup = Supervisor(jobs, q)  # type: ignore[arg-type]
    t = [1000.0]
    for _ in range(30):  # 30 passes in 30 s
        sup.one_pass(now=t[0])
        t[0] += 1.0
    assert capsys.readouterr().out.count("cannot reach the Ray cluster") == 1
    for _ in range(40):  # 40 s more: one reminder after a minute
        sup.one_pass(now=t[0])
        t[0] += 1.0
    out = capsys.readouterr().out
    assert out.count("cannot reach the Ray cluster") == 1 and "still" in out
    jobs.down = False
    sup.one_pass(now=t[0])
    sup.one_pass(now=t[0] + 1)
    out = capsys.readouterr().out
    assert out.count("\n") == 1 and "again" in out


def test_a_runs_status_shows_each_restart_with_its_node(tmp_path: Path, monkeypatch, capsys) -> None:
    """Run.info() and 'rlfleet status' show every restart of a managed run: the failed attempt, why,
    and the node it ran on with that node's state (DEAD: the node was lost)."""
    from rlfleet.cli.runs import _print_run
    from rlfleet.runs import _managed_view
    from rlfleet.targets import local_target

    monkeypatch.setenv("RLFLEET_HOME", str(tmp_path))
    tgt = local_target()
    q = QueueStore(tgt.store())
    _managed(q, "train")
    lost = {"attempt": 0, "message": "its node died", "at": 1796090000.0, "node_id": "ab12",
            "node_ip": "10.87.0.2", "node_state": "DEAD"}
    q.put_state("rl-b", {"status": "DISPATCHED", "attempt": 1, "restarts": 1, "history": [lost]})
    running = {"submission_id": "rl-b", "status": "RUNNING", "metadata": {"rlfleet_max_restarts": "1"}}
    view = _managed_view(tgt, "rl-b", running)
    assert view["restarts"] == 1 and view["restart_history"] == [lost]
    _print_run({"run_id": "rl-b", "status": "RUNNING", "restarts": 1, "restart_history": view["restart_history"]})
    out = capsys.readouterr().out
    assert "restart 1" in out and "attempt 0 ended 2026-12-01T" in out and "on node 10.87.0.2 (DEAD)" in out
    assert "its node died" in out
