"""The conformance scenarios: one list, run unchanged on every target (conftest.py's ``tgt``).

Each scenario asserts real outcomes on the target: runs reach their terminal state on its
cluster, artifacts are read back from its own store, metrics from its own monitoring. Scenarios
run in file order per target; the last one stops the target's head and starts it again.
"""

from __future__ import annotations

import json
import os
import re
import signal
import time

import httpx
import pytest

from rlfleet import RunSpec, RunStatus, submit_run

from .projects import GOAL_REWARD, N_LINES, corridor_project, printer_project
from .targets import ConformanceTarget, sha256

pytestmark = pytest.mark.integration

PPO_STEPS = 8192


def _ppo_run(tgt: ConformanceTarget):
    """The PPO CartPole run several scenarios read (trained once per target)."""
    if "ppo" not in tgt.cache:
        spec = RunSpec(kind="train", agent="ppo", env="CartPole-v1", seed=1, budget={"steps": PPO_STEPS},
                       name="conformance-ppo")
        run = submit_run(spec, target=tgt.target)
        tgt.cache["ppo"] = (run, run.wait(timeout=tgt.timeout))
    run, status = tgt.cache["ppo"]
    assert status is RunStatus.SUCCEEDED, f"the PPO run {run.run_id} ended {status.value}: {run.failure_reason()}"
    return run


def _wait_for(what: str, fn, timeout: float, poll: float = 0.5):
    deadline = time.monotonic() + timeout
    while not (value := fn()):
        assert time.monotonic() < deadline, f"{what} not within {timeout} s"
        time.sleep(poll)
    return value


def test_ppo_train_eval_deploy_act(tgt: ConformanceTarget) -> None:
    run = _ppo_run(tgt)
    train_manifest = run.artifacts().verify()
    assert train_manifest.extra["env_steps"] >= PPO_STEPS
    ev = submit_run(RunSpec(kind="eval", source=run.run_id, eval={"episodes": 5}, seed=3), target=tgt.target)
    assert ev.wait(timeout=tgt.timeout) is RunStatus.SUCCEEDED, ev.failure_reason()
    result = ev.artifacts().read_json("eval.json")
    assert result["episodes"] == 5 and result["source_run"] == run.run_id
    assert result["policy_sha256"] == train_manifest.extra["policy_sha256"]
    assert result["mean"] > 0 and len(result["returns"]) == 5

    dep = submit_run(RunSpec(kind="deploy", source=run.run_id, deploy={"name": "conformance"}), target=tgt.target)
    try:
        assert dep.wait(timeout=tgt.timeout) is RunStatus.RUNNING, dep.failure_reason()
        ep = dep.endpoint()
        obs = [[0.0, 0.0, 0.0, 0.0], [0.01, -0.2, 0.03, 0.3]]
        try:
            # the endpoint as the deploy run publishes it, reached from the submitting machine
            resp = httpx.post(ep.act_url, json={"observations": obs}, verify=ep.verify,
                              headers={"Authorization": f"Bearer {ep.token}"}, timeout=15)
        except httpx.TransportError as err:
            pytest.fail(f"the deploy endpoint {ep.act_url} is not reachable from the submitting machine: {err!r}")
        assert resp.status_code == 200, resp.text
        actions = resp.json()["actions"]
        assert len(actions) == 2 and all(a in (0, 1) for a in actions)
        assert httpx.post(ep.act_url, json={"observations": obs}, verify=ep.verify, timeout=15).status_code == 401
    finally:
        dep.cancel()
    # wait() returns a deploy run once it serves: poll until the stop is complete
    assert _wait_for("the deploy run stopping", lambda: dep.status().is_terminal(), 120)
    assert dep.status() is RunStatus.CANCELLED


def test_bring_your_own_env_with_code_kwargs_and_requirements(tgt: ConformanceTarget, tmp_path) -> None:
    proj, wheel_req = corridor_project(tmp_path)
    spec = RunSpec(kind="train", agent="ppo", env="corridor_env:Corridor-v0", env_kwargs={"length": 3},
                   code=str(proj), requirements=[wheel_req], budget={"steps": 4096}, seed=2,
                   name="conformance-byo")
    run = submit_run(spec, target=tgt.target)
    assert run.wait(timeout=tgt.timeout) is RunStatus.SUCCEEDED, run.failure_reason()
    files = tgt.own_files(run.run_id)
    manifest = json.loads(files["manifest.json"])
    assert "policy.onnx" in manifest["files"]
    # env_kwargs reached the env: the policy's input is the length-3 one-hot observation
    import onnxruntime as ort

    sess = ort.InferenceSession(files["policy.onnx"], providers=["CPUExecutionProvider"])
    assert sess.get_inputs()[0].shape[-1] == 3
    # the wheel from requirements ran: only it knows the goal reward
    rows = [json.loads(line) for line in files["metrics.jsonl"].decode().splitlines()]
    assert rows[-1]["step"] >= 4096
    assert max(r.get("episode_return_max", 0.0) for r in rows) == GOAL_REWARD


def test_sigkill_trainer_then_resume_from_last_checkpoint(tgt: ConformanceTarget) -> None:
    cfg = {"checkpoint_every_steps": 4096}
    long = submit_run(RunSpec(kind="train", agent="ppo", env="CartPole-v1", seed=4, config=cfg,
                              budget={"steps": 5_000_000, "minutes": 8}, name="conformance-killed"),
                      target=tgt.target)
    arts = long.artifacts()

    def checkpointed() -> int:
        if not arts.exists("checkpoints/latest.json"):
            return 0
        step = int(arts.read_json("checkpoints/latest.json", allow_incomplete=True)["step"])
        return step if step >= 8192 else 0

    try:
        _wait_for("a checkpoint at step >= 8192", checkpointed, tgt.timeout)
        pids = tgt.trainer_pids(long.run_id)
        assert pids, f"no trainer process of {long.run_id} found"
        for pid in pids:
            os.kill(pid, signal.SIGKILL)
        status = long.wait(timeout=tgt.timeout)
    finally:
        long.cancel()
    assert status is RunStatus.FAILED, status
    assert not arts.is_complete()
    last = int(arts.read_json("checkpoints/latest.json", allow_incomplete=True)["step"])
    assert last >= 8192

    budget = last + 4096
    resumed = submit_run(RunSpec(kind="train", agent="ppo", env="CartPole-v1", seed=4, config=cfg,
                                 budget={"steps": budget}, resume_from=long.run_id, name="conformance-resumed"),
                         target=tgt.target)
    assert resumed.wait(timeout=tgt.timeout) is RunStatus.SUCCEEDED, resumed.failure_reason()
    manifest = resumed.artifacts().verify()
    assert manifest.extra["resumed_from"] == {"run_id": long.run_id, "step": last}
    rows = resumed.metrics()
    assert last < rows[0]["step"] <= last + 2048  # continues from the checkpoint's step counter
    assert manifest.extra["env_steps"] >= budget
    assert f"resuming from run {long.run_id} at step {last}" in resumed.logs()


def test_cancel_a_running_train_run(tgt: ConformanceTarget) -> None:
    run = submit_run(RunSpec(kind="train", agent="ppo", env="CartPole-v1", seed=5,
                             budget={"steps": 5_000_000, "minutes": 8}, name="conformance-cancel"),
                     target=tgt.target)
    _wait_for("the run writing metrics", lambda: run.status() is RunStatus.RUNNING and run.metrics(), tgt.timeout)
    assert run.cancel() is True
    assert run.wait(timeout=tgt.timeout) is RunStatus.CANCELLED
    assert run.cancel() is False  # idempotent
    files = tgt.own_files(run.run_id)
    assert "manifest.json" not in files  # a cancelled run never passes for complete
    assert "checkpoints/latest.json" in files  # SIGTERM checkpoints, so it can be resumed


def test_logs_follow_returns_every_line_in_order(tgt: ConformanceTarget, tmp_path) -> None:
    proj = printer_project(tmp_path)
    run = submit_run(RunSpec(kind="train", agent="random", env="printer_env:Quiet-v0", code=str(proj),
                             budget={"steps": 100}, resources={"cpus": 0.5}, name="conformance-logs"),
                     target=tgt.target)
    t0 = time.monotonic()
    follow = tgt.cli_popen("logs", run.run_id, "-f")
    try:
        out, err = follow.communicate(timeout=tgt.timeout)
    finally:
        if follow.poll() is None:
            follow.kill()
            follow.wait(10)
    seconds = time.monotonic() - t0
    assert follow.returncode == 0, err[-2000:]
    assert run.status() is RunStatus.SUCCEEDED, run.failure_reason()
    numbers = [int(m.group(1)) for m in re.finditer(r"^conformance-line (\d{6})$", out, re.M)]
    assert numbers[-1:] == [N_LINES], f"last line seen: {numbers[-1:]} ({len(numbers)} lines in {seconds:.1f} s)"
    assert numbers == list(range(1, N_LINES + 1)), f"{len(numbers)} lines, first gap/disorder at " + str(
        next((i for i, n in enumerate(numbers, 1) if n != i), None))


def test_manifest_verified_on_the_targets_own_store(tgt: ConformanceTarget) -> None:
    run = _ppo_run(tgt)
    files = tgt.own_files(run.run_id)
    manifest = json.loads(files.pop("manifest.json"))
    assert manifest["run_id"] == run.run_id
    listed = manifest["files"]
    assert {"spec.json", "metrics.jsonl", "policy.onnx", "checkpoints/latest.json"} <= set(listed)
    assert set(listed) == set(files), set(listed) ^ set(files)
    for rel, entry in listed.items():
        assert sha256(files[rel]) == entry["sha256"] and len(files[rel]) == entry["size"], rel
    assert json.loads(files["spec.json"]) == run.spec.to_dict()


def test_training_metrics_reach_the_targets_monitoring(tgt: ConformanceTarget) -> None:
    run = _ppo_run(tgt)
    seen = tgt.monitored(run.run_id)
    assert seen["episode_return"] > 0
    assert seen["env_steps"] >= PPO_STEPS
    labels = seen["labels"]
    assert labels["run_id"] == run.run_id
    if "kind" in labels:  # Prometheus-style monitoring carries the contract's labels
        assert labels["kind"] == "train" and labels["target"] == tgt.name


def test_runs_listed_from_the_store_when_the_head_is_down(tgt: ConformanceTarget) -> None:
    run = _ppo_run(tgt)
    with tgt.head_down():
        res = tgt.cli("runs", "--json")
        assert res.returncode == 0, res.stderr
        listed = {d["run_id"]: d for d in json.loads(res.stdout)}
    assert run.run_id in listed, sorted(listed)
    assert listed[run.run_id]["complete"] is True
    assert listed[run.run_id]["kind"] == "train" and listed[run.run_id]["name"] == "conformance-ppo"
    # and the head serves again afterwards
    after = submit_run(RunSpec(kind="train", agent="random", budget={"steps": 100}, resources={"cpus": 0.5}),
                       target=tgt.target)
    status = after.wait(timeout=tgt.timeout)
    # (on failure: why, and the attempts the target's supervisor made; seen once on gcp-node, not explained)
    assert status is RunStatus.SUCCEEDED, (status, after.failure_reason(), after.info().get("restart_history"))
