"""Node loss with recovery (issue 12): time from losing the node that trains a managed run to the
run training again, on a local multi-node cluster (``rlfleet local up --nodes 2``: head 1 CPU +
two worker nodes of 2 CPUs, each in its own network namespace, the run supervisor on the head).

Each repetition submits a PPO CartPole run with ``max_restarts: 1`` and ``resources.cpus: 2`` (so it
trains on a worker node), waits for its first checkpoint, SIGKILLs every Ray process of that node
(``rlfleet.local.node_stop``: a lost node, a preempted spot worker) and times, from the kill:

- ``failed``: the supervisor has queued the restart (Ray declared the node dead and failed the job);
- ``running``: Ray reports the resubmitted job RUNNING (on the other worker);
- ``training``: the first metrics row of the resumed attempt is readable in the store (rows are
  flushed every 2 s and polled every 0.5 s, so this is an upper bound by up to ~2.5 s).

Then the run is cancelled (the rest of its training measures nothing here) and the node restarted.
The table gives the median and the range over the repetitions.

Usage: .venv/bin/python bench/bench_node_loss.py [--repeat 3] [--write]   (~1.5 min per repetition)
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
from common import machine, machine_line, write_section  # noqa: E402

EVERY = 2048
WORKERS = {"10.87.0.2": "worker-1", "10.87.0.3": "worker-2"}
PHASES = ("failed", "running", "training")


def _rows(run: Any) -> set[tuple[int, float]]:
    return {(r["step"], r["time"]) for r in run.metrics()}


def _checkpoint_step(run: Any) -> int:
    arts = run.artifacts()
    if not arts.exists("checkpoints/latest.json"):
        return 0
    return int(arts.read_json("checkpoints/latest.json", allow_incomplete=True)["step"])


def _alive(client: Any) -> set[str]:
    from rlfleet.placement import nodes

    return {n["node_ip"] for n in nodes(client) if n.get("state") == "ALIVE"}


def once(target: Any, client: Any, i: int) -> dict[str, Any]:
    from rlfleet import RunSpec, RunStatus, submit_run
    from rlfleet.local import node_start, node_stop
    from rlfleet.placement import nodes
    from rlfleet.runqueue import QueueStore

    spec = RunSpec(kind="train", agent="ppo", env="CartPole-v1", seed=i, name=f"node-loss-{i}", max_restarts=1,
                   resources={"cpus": 2}, budget={"steps": 200_000}, config={"checkpoint_every_steps": EVERY})
    run = submit_run(spec, target=target)
    deadline = time.monotonic() + 600
    while _checkpoint_step(run) < EVERY:
        if time.monotonic() > deadline or run.status().is_terminal():
            raise SystemExit(f"run {run.run_id}: no checkpoint ({run.status()}: {run.failure_reason()})")
        time.sleep(0.2)
    ip_of = {n["node_id"]: n["node_ip"] for n in nodes(client)}
    ip = ip_of[run.job_record()["driver_node_id"]]
    step_at_kill, ckpt = max((r[0] for r in _rows(run)), default=0), _checkpoint_step(run)
    t0 = time.monotonic()
    node_stop(WORKERS[ip])
    q, old, out = QueueStore(target.store()), None, {"node": WORKERS[ip], "checkpoint": ckpt,
                                                       "step_at_kill": step_at_kill}
    while "training" not in out:
        if time.monotonic() - t0 > 600 or run.status().is_terminal():
            raise SystemExit(f"run {run.run_id} did not train again: {run.status()} {run.failure_reason()}")
        st = q.state(run.run_id) or {}
        if old is None and st.get("attempt", 0) >= 1:
            old, out["failed"] = _rows(run), time.monotonic() - t0
        if old is not None and "running" not in out and st.get("status") == "DISPATCHED" \
                and run.status() is RunStatus.RUNNING:
            out["running"] = time.monotonic() - t0
        if old is not None and _rows(run) - old:
            out["training"] = time.monotonic() - t0
            out.setdefault("running", out["training"])
        time.sleep(0.5)
    run.cancel()
    node_start(WORKERS[ip])
    while ip not in _alive(client):
        time.sleep(1)
    run.wait(timeout=120)
    return out


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--write", action="store_true", help="write the table into docs/benchmarks.md")
    args = ap.parse_args()
    os.environ["RLFLEET_HOME"] = tempfile.mkdtemp(prefix="rlfleet-bench-nodeloss-")
    from rlfleet.jobs import JobsClient
    from rlfleet.local import local_down
    from rlfleet.provisioners.local_supervisor import local_up
    from rlfleet.provisioners.refs import NoRef
    from rlfleet.runqueue import QueueStore
    from rlfleet.targets import Target

    info = machine()
    local = local_up(num_cpus=1, nodes=2, node_cpus=2, echo=print)  # with the run supervisor
    target = Target(name="bench-nodeloss", kind="ray", ray_address=local.ray_address,
                    token_source=local.token_source, artifact_root=local.artifact_root,
                    provisioner=NoRef(type="none"))  # fmt: skip
    client = JobsClient(target.ray_address, target.token(), target_name=target.name)
    results = []
    try:
        while not QueueStore(target.store()).supervisor_live():
            time.sleep(0.5)
        while not set(WORKERS) <= _alive(client):
            time.sleep(1)
        for i in range(args.repeat):
            results.append(once(target, client, i))
            print(f"repetition {i + 1}: {results[-1]}", flush=True)
    finally:
        local_down()
    rows = ["| from the node's loss to | median | range |", "|---|---:|---:|"]
    what = {"failed": "the restart queued (Ray declared the node dead, the job FAILED)",
            "running": "the resubmitted job RUNNING on the other worker",
            "training": "the resumed attempt's first metrics row (training again)"}
    for k in PHASES:
        v = [r[k] for r in results]
        rows.append(f"| {what[k]} | {statistics.median(v):.1f} s | {min(v):.1f}-{max(v):.1f} s |")
    body = (f"{machine_line(info)}; "
            f"cluster: head (1 CPU) + 2 worker nodes (2 CPUs each); PPO CartPole, `max_restarts: 1`, 2 CPUs, "
            f"checkpoint every {EVERY} steps; {len(results)} repetitions, each killing the worker that trained "
            f"(nodes: {', '.join(r['node'] for r in results)}).\n\n" + "\n".join(rows)
            + "\n\nKilled right after the first checkpoint (steps "
            + ", ".join(str(r["checkpoint"]) for r in results) + "); the last "
            "metrics rows written before the kill (flushed every 2 s) were at steps "
            + ", ".join(str(r["step_at_kill"]) for r in results) + ", so no step past the checkpoint was seen lost.")
    print(body)
    if args.write:
        write_section("nodeloss", body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
