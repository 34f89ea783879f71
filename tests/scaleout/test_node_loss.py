"""Part 3 of issue 12 on several nodes: a managed run survives losing the node that trains it.

The session's multi-node cluster (tests/scaleout/multinode.py) runs the run supervisor like any
``rlfleet local up`` does; the test reaches it as a ``ray`` target, which is supervised because that
supervisor's heartbeat (``queue/supervisor.json`` in the target's store) is fresh. A PPO CartPole
run asking for 2 CPUs cannot go on the 1-CPU head, so it trains on a worker node; once it has a
checkpoint that node's Ray processes are SIGKILLed (a lost node, a preempted spot worker). The
supervisor resubmits the run under the same id on the other worker, resuming from its checkpoint.
"""

from __future__ import annotations

import time
from typing import Any

import pytest

from rlfleet import RunSpec, RunStatus, submit_run
from rlfleet.errors import SpecError
from rlfleet.provisioners import registry
from rlfleet.runqueue import QueueStore

from .multinode import MultiNode

pytestmark = pytest.mark.integration

EVERY = 2048  # checkpoint interval (env steps)
STEPS = 102_400  # budget; stop_at_return ends a run at its first evaluation of 500 (confirmed on 20 more)
WORKERS = {"10.87.0.2": "worker-1", "10.87.0.3": "worker-2"}


def _spec(name: str, max_restarts: int, cpus: float = 2) -> RunSpec:
    return RunSpec(kind="train", agent="ppo", env="CartPole-v1", seed=7, name=name, max_restarts=max_restarts,
                   resources={"cpus": cpus}, budget={"steps": STEPS},
                   config={"checkpoint_every_steps": EVERY, "eval_every": 4096, "eval_episodes": 10,
                           "stop_at_return": 500.0})  # fmt: skip


def _wait_supervised(mn: MultiNode, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not QueueStore(mn.target.store()).supervisor_live():
        assert time.monotonic() < deadline, "the multi-node cluster's supervisor wrote no heartbeat"
        time.sleep(0.5)
    registry._live.clear()  # a look from before the heartbeat may be cached


def _checkpoint_step(arts: object) -> int:
    if not arts.exists("checkpoints/latest.json"):  # type: ignore[attr-defined]
        return 0
    return int(arts.read_json("checkpoints/latest.json", allow_incomplete=True)["step"])  # type: ignore[attr-defined]


def test_a_ray_target_without_a_live_supervisor_refuses_max_restarts(multinode: MultiNode, tmp_path) -> None:
    """The same cluster under another artifact root: no heartbeat there, so no queue and no restarts."""
    other = multinode.target.model_copy(update={"name": "mn-unsupervised", "artifact_root": f"file://{tmp_path}"})
    assert not registry.supervised(other)
    with pytest.raises(SpecError, match=r"max_restarts: target 'mn-unsupervised' \(ray\) has no live run supervisor"):
        submit_run(_spec("no-supervisor", 1), target=other)
    assert not (tmp_path / "queue").exists()  # nothing partial left behind


def _rows(run: object) -> set[tuple[int, float]]:
    return {(r["step"], r["time"]) for r in run.metrics()}  # type: ignore[attr-defined]


@pytest.mark.slow  # 100-150 s here (two PPO runs, Ray ~17 s to declare the node dead); CI runs it
def test_a_managed_run_survives_losing_its_node(multinode: MultiNode, record_property: Any) -> None:
    _wait_supervised(multinode)
    assert registry.supervised(multinode.target)
    t_start = time.monotonic()
    run = submit_run(_spec("node-loss", 1, cpus=2), target=multinode.target)
    arts = run.artifacts()
    deadline = time.monotonic() + 300
    while not run._job().get("driver_node_id"):
        assert time.monotonic() < deadline and not run.status().is_terminal(), run.failure_reason()
        time.sleep(0.3)
    ip_of = multinode.node_ip_of()
    node_ip = ip_of[run._job()["driver_node_id"]]
    assert node_ip in WORKERS, f"a 2-CPU run trained on {node_ip}, not on a worker node"
    lost = WORKERS[node_ip]
    # the same seed, uninterrupted, alongside: 1 CPU, so Ray puts it on the idle head (else on the
    # other worker, which the restart then waits for)
    base = submit_run(_spec("node-loss-baseline", 0, cpus=1), target=multinode.target)
    while _checkpoint_step(arts) < EVERY:
        assert time.monotonic() < deadline and not run.status().is_terminal(), (
            f"no checkpoint within 300 s: {run.status()} {run.failure_reason()}")
        time.sleep(0.2)
    with multinode.restored(lost):
        step_at_kill = max((r["step"] for r in run.metrics()), default=0)  # rows flushed so far (every 2 s)
        ckpt = _checkpoint_step(arts)
        t_kill = time.monotonic()
        assert multinode.stop_node(lost) > 0
        # the rows as they are once the supervisor has queued the restart (the killed attempt is gone
        # for sure then); the first row not among them is the resumed attempt training
        q, old, back_s, failed_s = QueueStore(multinode.target.store()), None, None, None
        while back_s is None and not run.status().is_terminal():
            assert time.monotonic() - t_kill < 400, "the run did not train again within 400 s"
            if old is None and (q.state(run.run_id) or {}).get("attempt", 0) >= 1:
                old, failed_s = _rows(run), time.monotonic() - t_kill
            elif old is not None and _rows(run) - old:
                back_s = time.monotonic() - t_kill
            time.sleep(0.5)
        status = run.wait(timeout=400)
        info = run.info()
        assert status is RunStatus.SUCCEEDED, (status, run.failure_reason(), run.logs()[-2000:])
    managed_s = time.monotonic() - t_start
    state = QueueStore(multinode.target.store()).state(run.run_id) or {}
    assert info["restarts"] == 1 and state["restarts"] == 1, (info, state)
    hist = state["history"][0]
    assert hist["node_ip"] == node_ip and hist["node_state"] == "DEAD", hist  # the lost node, named
    manifest = arts.verify()
    resumed = manifest.extra["resumed_from"]
    assert resumed["run_id"] == run.run_id and resumed["step"] >= ckpt
    steps_lost = max(step_at_kill - resumed["step"], 0)
    assert steps_lost <= EVERY
    new_node = multinode.node_ip_of()[run._job()["driver_node_id"]]
    assert new_node != node_ip and new_node in WORKERS, new_node
    assert back_s is not None, "no metrics row of the resumed attempt was seen before the run ended"
    final = manifest.extra["final_eval"]

    assert base.wait(timeout=400) is RunStatus.SUCCEEDED, base.failure_reason()
    base_where = multinode.node_ip_of()[base._job()["driver_node_id"]]
    bm = base.artifacts().verify().extra
    ref = bm["final_eval"]
    figures = (f"node loss: run {run.run_id} trained on {lost} ({node_ip}); its node SIGKILLed at step >= "
          f"{step_at_kill} (last checkpoint {ckpt}); resumed on {WORKERS[new_node]} at step {resumed['step']}: "
          f">= {steps_lost} steps lost (interval {EVERY}); node loss -> restart queued {failed_s:.1f} s -> first "
          f"metrics row of the new attempt seen {back_s:.1f} s (polled every 0.5 s, rows flushed every 2 s); "
          f"history: {hist['message'][-120:]!r}; "
          f"{manifest.extra['env_steps']} steps (solved at {manifest.extra.get('solved_step')}), final eval "
          f"{final['mean']:.1f} +- {final['std']:.1f} vs uninterrupted (on {base_where}) {ref['mean']:.1f} +- "
          f"{ref['std']:.1f} ({bm['env_steps']} steps, solved at {bm.get('solved_step')}); managed run "
          f"{managed_s:.0f} s, whole test {time.monotonic() - t_start:.0f} s")
    print("\n" + figures)
    record_property("figures", figures)
    # within noise: the means differ by at most two standard errors of their difference (10 episodes
    # each); two solved policies (500 +- 0) must agree exactly. This is the evaluation's noise only:
    # a resumed run follows another trajectory than the uninterrupted one, which adds run-to-run spread
    se = ((final["std"] ** 2 + ref["std"] ** 2) / final["episodes"]) ** 0.5
    assert abs(final["mean"] - ref["mean"]) <= 2 * se + 1e-6, (final, ref)
