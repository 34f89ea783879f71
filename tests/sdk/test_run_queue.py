"""The durable run queue and the supervisor (issue 12 parts 3 and 4) on the local target: a real
Ray head (the session's ``local_cluster``), the real supervisor process in its namespace, the real
artifact store on disk. Every run here reserves 1 CPU of the head's 2: two slots."""

from __future__ import annotations

import itertools
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from conformance.targets import _pids_with_env

from rlfleet import RunSpec, RunStatus, submit_run
from rlfleet.errors import SpecError
from rlfleet.jobs import JobsClient
from rlfleet.provisioners import local_supervisor
from rlfleet.runqueue import QueuePolicy, QueueStore
from rlfleet.runs import _submit, get_run, list_runs


def _queue(tgt: Any) -> QueueStore:
    return QueueStore(tgt.store())


def _quick(name: str, priority: int = 0, steps: int = 20) -> RunSpec:
    return RunSpec(kind="train", agent="random", name=name, priority=priority, budget={"steps": steps})


def _held(specs: list[RunSpec], tgt: Any) -> list[Any]:
    """Submit with the supervisor stopped (the queue must hold them): the SDK's submit path without
    its ready() step, which would start the supervisor again."""
    local_supervisor.stop_supervisor()
    return [_submit(s, tgt, None) for s in specs]


def _rss_kib(pids: list[int]) -> int:
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/status") as f:
                total += next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))
        except (OSError, StopIteration):
            pass
    return total


_HEAD_PROCS = (b"gcs_server", b"raylet", b"dashboard", b"ray::Dashboard", b"log_monitor", b"monitor.py",
               b"runtime_env/agent")


def _head_pids() -> list[int]:
    """The head's own Ray processes (GCS, raylet, dashboard and its modules, agents, monitors): not the
    runs in flight (their entrypoints, job supervisor actors and workers come and go with the slots)."""
    from rlfleet.provisioners import local

    out = []
    for pid in local._cluster_pids(local._ray_temp_dir(), local._verified_holder(local.read_state())):
        try:
            cmd = open(f"/proc/{pid}/cmdline", "rb").read()
        except OSError:
            continue
        if any(m in cmd for m in _HEAD_PROCS) and b"default_worker" not in cmd and b"JobSupervisor" not in cmd:
            out.append(pid)
    return out


def _wait_all(tgt: Any, run_ids: list[str], timeout: float) -> dict[str, dict[str, Any]]:
    """Until the supervisor has recorded a final status for every run: {run_id: state}."""
    q = _queue(tgt)
    deadline = time.monotonic() + timeout
    while True:
        states = {rid: q.state(rid) or {} for rid in run_ids}
        if all(s.get("status") in ("SUCCEEDED", "FAILED", "CANCELLED") for s in states.values()):
            return states
        if time.monotonic() > deadline:
            left = sum(s.get("status") not in ("SUCCEEDED", "FAILED", "CANCELLED") for s in states.values())
            raise AssertionError(f"{left} of {len(run_ids)} runs not ended after {timeout} s")
        time.sleep(0.5)


def test_bad_queue_input_is_one_clear_line() -> None:
    with pytest.raises(SpecError) as err:
        RunSpec(kind="train", priority=-1)
    assert str(err.value).startswith("invalid run spec: priority: ") and "\n" not in str(err.value)
    with pytest.raises(SpecError, match=r"max_restarts: only train runs restart"):
        RunSpec(kind="eval", source="rl-x", max_restarts=1)
    with pytest.raises(SpecError, match=r"max_restarts: .*greater than or equal to 0"):
        RunSpec(kind="train", max_restarts=-2)
    with pytest.raises(SpecError) as err:
        QueuePolicy.parse({"user_caps": {"alice": {"cpu": 2}}})
    msg = str(err.value)
    assert msg.startswith("invalid queue policy: user_caps.alice.cpu: unknown field; did you mean 'cpus'?"), msg
    assert "\n" not in msg
    with pytest.raises(SpecError, match=r"invalid queue policy: default.gpus: .*greater than or equal to 0"):
        QueuePolicy.parse({"default": {"gpus": -1}})


class _Cluster:
    """Ray's Jobs API as the supervisor sees it (unit level): ``cpus`` on the nodes, ``running`` jobs."""

    def __init__(self, cpus: float, running: list[dict[str, Any]]) -> None:
        self.cpus, self.jobs, self.submitted = cpus, {j["submission_id"]: j for j in running}, []

    def list(self) -> list[dict[str, Any]]:
        return list(self.jobs.values())

    def get(self, run_id: str) -> dict[str, Any]:
        from rlfleet.errors import RunNotFound

        if run_id not in self.jobs:
            raise RunNotFound(run_id)
        return self.jobs[run_id]

    def submit(self, submission_id: str, **job: Any) -> str:
        self.submitted.append(submission_id)
        self.jobs[submission_id] = {"submission_id": submission_id, "status": "PENDING", **job}
        return submission_id

    def node_resources(self) -> list[dict[str, Any]]:
        return [{"node_id": "n-1", "CPU": self.cpus}]


def test_env_runners_count_in_the_queues_room(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A distributed run holds its process's CPUs plus env_runners x runner_cpus: the queue waits for
    all of them to be free, and dispatches nothing into the CPUs the runners of a run in flight hold
    (unit level: the SDK's real submit path into a queue on disk, the real supervisor's pass)."""
    from rlfleet.supervisor import Supervisor

    tgt = _local_queue(tmp_path, monkeypatch)
    dist = _submit(RunSpec(kind="train", agent="ppo", name="dist", config={"env_runners": 2, "runner_cpus": 1.5}),
                   tgt, None)  # 1 + 2 x 1.5 = 4 CPUs
    small = _submit(_quick("small"), tgt, None)
    q = _queue(tgt)
    other = {"submission_id": "rl-other", "status": "RUNNING", "metadata": {"rlfleet_run_id": "rl-other",
                                                                           "rlfleet_cpus": "1.0"}}
    # 4 CPUs, 1 held by another run: the distributed run waits (and the small one behind it too)
    cluster = _Cluster(4, [other])
    Supervisor(cluster, q).step()  # type: ignore[arg-type]
    assert cluster.submitted == [], "the distributed run was dispatched with 3 of its 4 CPUs free"
    assert q.request(dist.run_id).cpus == 4.0 and q.request(small.run_id).cpus == 1.0
    # the other run ends: the distributed run goes; then its runners hold the CPUs the small run wants
    other["status"] = "SUCCEEDED"
    sup = Supervisor(cluster, q)
    sup.step()  # type: ignore[arg-type]
    assert cluster.submitted == [dist.run_id]
    cluster.jobs[dist.run_id]["status"] = "RUNNING"
    Supervisor(cluster, q).step()  # a fresh supervisor: it knows the run only from Ray's job metadata
    assert cluster.submitted == [dist.run_id], "a run was dispatched into the CPUs the env runners hold"


class _Nodes(_Cluster):
    """The same, with the nodes Ray's dashboard lists (node id -> CPUs)."""

    def __init__(self, nodes: dict[str, float], running: list[dict[str, Any]]) -> None:
        super().__init__(0, running)
        self.nodes = nodes

    def node_resources(self) -> list[dict[str, Any]]:
        return [{"node_id": nid, "CPU": cpus} for nid, cpus in self.nodes.items()]


def _local_queue(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Any:
    from rlfleet.targets import local_target

    monkeypatch.setenv("RLFLEET_HOME", str(tmp_path))
    (tmp_path / "local").mkdir(mode=0o700)
    (tmp_path / "local" / "token").write_text("t")
    (tmp_path / "local" / "token").chmod(0o600)
    return local_target()


def test_a_run_that_fits_no_node_holds_no_room(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Two nodes of 2 CPUs: a run whose process asks 3 CPUs fits the cluster's sum but no node. It is
    handed to Ray (which keeps it PENDING until such a node joins) and holds no room, so the runs
    behind it go (counted over the cluster only, it held 3 of the 4 CPUs and the 2-CPU run waited)."""
    from rlfleet.supervisor import Supervisor

    tgt = _local_queue(tmp_path, monkeypatch)
    big = _submit(RunSpec(kind="train", agent="random", name="big", resources={"cpus": 3}), tgt, None)
    two = _submit(RunSpec(kind="train", agent="random", name="two", resources={"cpus": 2}), tgt, None)
    small = _submit(_quick("small"), tgt, None)
    cluster = _Nodes({"n-a": 2, "n-b": 2}, [])
    Supervisor(cluster, _queue(tgt)).step()  # type: ignore[arg-type]
    assert cluster.submitted == [big.run_id, two.run_id, small.run_id]
    cluster.jobs[two.run_id].update(status="RUNNING", driver_node_id="n-a")
    cluster.jobs[small.run_id].update(status="RUNNING", driver_node_id="n-b")
    more = _submit(_quick("more"), tgt, None)
    Supervisor(cluster, _queue(tgt)).step()  # type: ignore[arg-type]  # a fresh one: from Ray's records
    assert more.run_id in cluster.submitted  # n-b has 1 CPU left; the PENDING big run holds none


def test_a_run_waits_for_a_node_with_room_for_its_process(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Two nodes of 2 CPUs, one 1-CPU run on each: 2 CPUs are free over the cluster, but no node has 2
    free, so a 2-CPU run stays queued (counted over the cluster only, it became a Ray job that Ray kept
    PENDING, holding its place there and 2 CPUs of the queue's count) until a node has them."""
    from rlfleet.supervisor import Supervisor

    tgt = _local_queue(tmp_path, monkeypatch)
    running = [{"submission_id": f"rl-{n}", "status": "RUNNING", "driver_node_id": n,
                "metadata": {"rlfleet_run_id": f"rl-{n}", "rlfleet_cpus": "1.0"}} for n in ("n-a", "n-b")]
    two = _submit(RunSpec(kind="train", agent="random", name="two", resources={"cpus": 2}), tgt, None)
    cluster = _Nodes({"n-a": 2, "n-b": 2}, running)
    Supervisor(cluster, _queue(tgt)).step()  # type: ignore[arg-type]
    assert cluster.submitted == [], "dispatched with 1 CPU free on each node"
    q = _queue(tgt)
    assert q.request(two.run_id) is not None and (q.state(two.run_id) or {}).get("status") in (None, "QUEUED")
    running[1]["status"] = "SUCCEEDED"
    Supervisor(cluster, _queue(tgt)).step()  # type: ignore[arg-type]
    assert cluster.submitted == [two.run_id]


def test_priority_then_fifo_and_queued_position(local_cluster: Any) -> None:
    """Queued while the supervisor is down; it then dispatches by priority, then submission time."""
    tgt = submit_run(_quick("order-warmup", steps=5)).result(120).target
    runs = _held([_quick("order-low-a"), _quick("order-high", priority=5), _quick("order-low-b"),
                  _quick("order-mid", priority=2)], tgt)
    # the handle is valid at once; status and 'rlfleet runs' show QUEUED with the position
    assert [get_run(r.run_id).status() for r in runs] == [RunStatus.QUEUED] * 4
    assert [get_run(r.run_id).info()["position"] for r in runs] == [3, 1, 4, 2]
    listed = {r.run_id: r.info(refresh=False) for r in list_runs()}
    assert [listed[r.run_id]["status"] for r in runs] == ["QUEUED"] * 4
    assert [listed[r.run_id]["position"] for r in runs] == [3, 1, 4, 2]
    out = subprocess.run([str(Path(sys.executable).parent / "rlfleet"), "runs"], capture_output=True, text=True,
                         timeout=120, env={**os.environ, "COLUMNS": "200"})
    assert out.returncode == 0, out.stderr
    line = next(x for x in out.stdout.splitlines() if runs[1].run_id in x)
    assert "QUEUED #1" in line, out.stdout
    local_supervisor.ensure_supervisor(tgt)
    states = _wait_all(tgt, [r.run_id for r in runs], timeout=120)
    assert {s["status"] for s in states.values()} == {"SUCCEEDED"}
    by_dispatch = sorted(runs, key=lambda r: states[r.run_id]["dispatched"])
    assert [r.spec.name for r in by_dispatch] == ["order-high", "order-mid", "order-low-a", "order-low-b"]
    assert all(get_run(r.run_id).status() is RunStatus.SUCCEEDED for r in runs)


def test_per_user_cpu_cap(local_cluster: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """alice may hold 1 CPU at a time: her 3 runs go one by one while bob's run takes the other slot."""
    tgt = submit_run(_quick("cap-warmup", steps=5)).result(120).target
    q = _queue(tgt)
    q.put_policy(QueuePolicy.parse({"user_caps": {"alice": {"cpus": 1}}}))
    try:
        monkeypatch.setenv("USER", "alice")
        monkeypatch.setenv("LOGNAME", "alice")
        alice = _held([_quick(f"cap-alice-{i}", steps=3000) for i in range(3)], tgt)
        monkeypatch.setenv("USER", "bob")
        monkeypatch.setenv("LOGNAME", "bob")
        bob = _held([_quick("cap-bob", steps=3000)], tgt)[0]
        local_supervisor.ensure_supervisor(tgt)
        _wait_all(tgt, [r.run_id for r in [*alice, bob]], timeout=180)
    finally:
        q.put_policy(QueuePolicy())
    client = JobsClient(tgt.ray_address, tgt.token())
    spans = {r.run_id: (client.get(r.run_id)["start_time"], client.get(r.run_id)["end_time"]) for r in alice}
    ordered = sorted(spans.values())
    for (_, end), (start, _) in itertools.pairwise(ordered):
        assert start >= end, f"two of alice's runs overlapped: {ordered}"
    b0, b1 = client.get(bob.run_id)["start_time"], client.get(bob.run_id)["end_time"]
    assert b0 < ordered[-1][0], "bob waited behind alice's capped runs"
    assert all(get_run(r.run_id).status() is RunStatus.SUCCEEDED for r in [*alice, bob])
    assert b1


# 200, the figure. A short run holds its slot ~4.5 s on an idle machine (3.3 s of it Ray's job
# supervisor worker start; docs/scale-out.md), so the queue drains in ~8-12 min here, two at a time;
# RLFLEET_QUEUE_TEST_RUNS=24 is the quick version for a loaded machine
QUEUE_RUNS = int(os.environ.get("RLFLEET_QUEUE_TEST_RUNS", "200"))


@pytest.mark.timeout(max(900, 120 + 16 * QUEUE_RUNS))  # the test's own deadline (60 + 15 s a run) first
def test_many_runs_on_2_slots_survive_a_supervisor_kill(local_cluster: Any, record_property: Any) -> None:
    """200 (RLFLEET_QUEUE_TEST_RUNS: another count) short runs at once: all complete exactly once,
    in priority-then-FIFO dispatch order, the supervisor SIGKILLed halfway and restarted, memory of the
    head and supervisor printed."""
    n = QUEUE_RUNS
    t0 = time.monotonic()
    first = submit_run(_quick("q200-000", priority=0, steps=5))
    tgt = first.target
    local_supervisor.ensure_supervisor(tgt)
    head_before, sup_before = _rss_kib(_head_pids()), _rss_kib([local_supervisor.supervisor_pid() or 0])
    runs = [first] + [submit_run(_quick(f"q200-{i:03d}", priority=i % 3, steps=5)) for i in range(1, n)]
    t_submitted = time.monotonic() - t0
    q = _queue(tgt)
    queued_at_submit = len(q.request_ids())
    head_peak = _rss_kib(_head_pids())
    deadline = time.monotonic() + 60 + 15 * n  # ~3.5 s per run per slot unloaded, up to ~14 s at load 15
    while len(q.request_ids()) > n // 2 and time.monotonic() < deadline:  # then kill it with half queued
        time.sleep(0.5)
    sup = local_supervisor.supervisor_pid()
    assert sup is not None, "no supervisor running"
    os.kill(sup, signal.SIGKILL)  # with about half the runs still queued
    killed_with = len(q.request_ids())
    time.sleep(1)
    local_supervisor.ensure_supervisor(tgt)
    ids = [r.run_id for r in runs]
    while q.request_ids() and time.monotonic() < deadline:
        head_peak = max(head_peak, _rss_kib(_head_pids()))
        time.sleep(1)
    states = _wait_all(tgt, ids, timeout=max(10, deadline - time.monotonic()))
    wall = time.monotonic() - t0
    sup_after = _rss_kib([local_supervisor.supervisor_pid() or 0])
    client = JobsClient(tgt.ray_address, tgt.token())
    jobs = [j for j in client.list() if j.get("submission_id") in set(ids)]
    figures = (f"{n} runs on 2 slots: submitted in {t_submitted:.1f} s ({queued_at_submit} in the queue then), "
               f"supervisor killed with {killed_with} requests left, all ended in {wall:.1f} s; head RSS "
               f"{head_before // 1024} MiB before, peak {head_peak // 1024} MiB; supervisor RSS {sup_before // 1024} "
               f"MiB at start, {sup_after // 1024} MiB after the restart; load {os.getloadavg()[0]:.1f}")
    print("\n" + figures)
    record_property("figures", figures)
    assert {s["status"] for s in states.values()} == {"SUCCEEDED"}, {s["status"] for s in states.values()}
    assert len(jobs) == n and len({j["submission_id"] for j in jobs}) == n  # none lost, none duplicated
    assert all(s.get("attempt", 0) == 0 for s in states.values())
    assert all(tgt.store().run(rid).is_complete() for rid in ids)
    # dispatch order: no run dispatched while a run that ranks ahead of it had been waiting (submitted
    # 1 s or more before: a supervisor pass works on the queue as it listed it when the pass began)
    sub = {r.run_id: int(r.metadata["rlfleet_submitted_ms"]) / 1000 for r in runs}
    order = sorted(runs, key=lambda r: (-r.spec.priority, sub[r.run_id], r.run_id))
    t = [states[r.run_id]["dispatched"] for r in order]
    late = [(a.spec.name, b.spec.name) for i, a in enumerate(order) for j, b in enumerate(order)
            if i < j and t[i] > t[j] and sub[a.run_id] <= t[j] - 1.0]
    assert not late, f"{len(late)} runs dispatched before a waiting run that ranks ahead of them: {late[:5]}"
    assert head_peak - head_before < 150 * 1024, "the head grew with the queue"


BUDGET = 65_536


def test_sigkilled_trainer_restarts_from_its_checkpoint(local_cluster: Any) -> None:
    every = 2048  # room for the kill to land mid-run: PPO trains CartPole at ~5-7k steps/s here
    run = submit_run(RunSpec(kind="train", agent="ppo", name="managed-kill", seed=3, max_restarts=2,
                             config={"checkpoint_every_steps": every}, budget={"steps": BUDGET}))
    arts = run.artifacts()

    def checkpoint() -> int:
        if not arts.exists("checkpoints/latest.json"):
            return 0
        return int(arts.read_json("checkpoints/latest.json", allow_incomplete=True)["step"])

    # kill as soon as a checkpoint exists
    deadline = time.monotonic() + 300
    while checkpoint() < every:
        assert time.monotonic() < deadline and not run.status().is_terminal(), "no checkpoint before the end"
        time.sleep(0.2)
    # the rows flushed so far (every 2 s): wait for the first, so the rows kept across the restart are shown
    while not (before := [r["step"] for r in run.metrics()]) and time.monotonic() < deadline:
        time.sleep(0.2)
    step_at_kill = max(before, default=0)
    pids = _pids_with_env(run.run_id, "rlfleet_agents.run")
    assert pids, "no trainer process found"
    for pid in pids:
        os.kill(pid, signal.SIGKILL)
    ckpt = checkpoint()
    status = run.wait(timeout=300)
    info = get_run(run.run_id).info()
    assert status is RunStatus.SUCCEEDED, (status, run.failure_reason())
    assert info["restarts"] == 1
    manifest = arts.verify()
    resumed = manifest.extra["resumed_from"]
    assert resumed["run_id"] == run.run_id
    lost = max(step_at_kill - resumed["step"], 0)
    print(f"\nmanaged run {run.run_id}: trainer SIGKILLed at step >= {step_at_kill} (last metrics row seen), "
          f"last checkpoint {ckpt}, resumed at step {resumed['step']}: >= {lost} steps lost "
          f"(checkpoint interval {every}), {info['wall_time_s']} s of the final attempt")
    assert resumed["step"] >= ckpt and lost <= every
    assert manifest.extra["env_steps"] >= BUDGET
    # the run's metrics are both attempts': the killed one's rows up to the checkpoint, then the
    # resumed one's (a restart used to leave only its own rows)
    steps = [r["step"] for r in arts.iter_metrics()]
    assert before and steps == sorted(steps) and steps[-1] >= BUDGET, (before, steps[:3])
    kept = [s for s in before if s <= resumed["step"]]
    assert kept and set(kept) <= {s for s in steps if s <= resumed["step"]}, (before, steps[:6])


def test_user_error_fails_at_once_without_restart(local_cluster: Any) -> None:
    run = submit_run(RunSpec(kind="train", agent="random", name="managed-user-error", max_restarts=3,
                             env_kwargs={"no_such_kwarg": 1}, budget={"steps": 100}))
    assert run.wait(timeout=120) is RunStatus.FAILED
    assert "no_such_kwarg" in run.failure_reason()
    states = _wait_all(run.target, [run.run_id], timeout=30)
    assert states[run.run_id]["restarts"] == 0


def test_queue_and_a_managed_run_survive_a_head_restart(local_cluster: Any) -> None:
    """The head goes down with a managed run in flight and runs queued: after 'local up' the new
    supervisor restarts the run Ray forgot (from its checkpoint) and dispatches the queued ones,
    each exactly once."""
    from rlfleet.local import ensure_local_up, local_down, local_target

    tgt = submit_run(_quick("restart-warmup", steps=5)).result(120).target
    managed = submit_run(RunSpec(kind="train", agent="ppo", name="restart-managed", seed=1, max_restarts=1,
                                 config={"checkpoint_every_steps": 2048}, budget={"steps": 20480}))
    arts = managed.artifacts()
    deadline = time.monotonic() + 300
    while not arts.exists("checkpoints/latest.json") and time.monotonic() < deadline:
        time.sleep(0.3)
    held = _held([_quick(f"restart-held-{i}") for i in range(3)], tgt)
    # (a budget the run cannot finish before the head goes down; one that had committed by then is
    # done, not restarted: tests/sdk/test_supervisor_adopt.py)
    assert not arts.is_complete(), "the managed run finished before the head went down"
    t0 = time.monotonic()
    local_down()
    ensure_local_up()
    new = local_target()
    local_supervisor.ensure_supervisor(new)
    ids = [managed.run_id, *(r.run_id for r in held)]
    states = _wait_all(new, ids, timeout=300)
    print(f"\nhead restarted with 1 managed run in flight and 3 queued: all ended {time.monotonic() - t0:.1f} s later")
    assert {rid: s["status"] for rid, s in states.items()} == dict.fromkeys(ids, "SUCCEEDED"), states[managed.run_id]
    assert states[managed.run_id]["restarts"] == 1
    assert "lost" in states[managed.run_id]["history"][0]["message"]
    assert arts.verify().extra["resumed_from"]["run_id"] == managed.run_id
    assert all(states[r.run_id].get("attempt", 0) == 0 for r in held)
    jobs = [j["submission_id"] for j in JobsClient(new.ray_address, new.token()).list()]
    assert all(jobs.count(rid) == 1 for rid in ids)

