"""Parts 2 and 5 of issue 12: PPO rollouts in Ray actors spread over the nodes of the session's
multi-node cluster (tests/scaleout/multinode.py), a runner killed mid-run, bad input, and the
placement a user can read (``rlfleet status RUN`` nodes, the metrics' ``node`` label).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from rlfleet import RunSpec, RunStatus, submit_run
from rlfleet.errors import SpecError

from .multinode import MultiNode

SLOWENV = str(Path(__file__).resolve().parents[2] / "bench" / "slowenv")
RLFLEET = str(Path(sys.executable).parent / "rlfleet")
GPU_NODE, NODES = "10.87.0.3", {"10.87.0.1", "10.87.0.2", "10.87.0.3"}

pytestmark = pytest.mark.integration


def _runners(mn: MultiNode, job_id: str) -> list[dict]:
    return [a for a in mn.actors("EnvRunner") if a.get("job_id") == job_id]


def test_runners_spread_over_nodes_and_the_learner_sits_on_the_gpu_node(multinode: MultiNode) -> None:
    from rlfleet.targets import save_target

    spec = RunSpec(kind="train", agent="ppo", env="CartPole-v1", seed=0, budget={"steps": 6_000},
                   resources={"cpus": 0.5, "gpus": 1}, name="spread",
                   config={"env_runners": 3, "runner_cpus": 1, "num_envs": 8, "num_steps": 64})  # fmt: skip
    run = submit_run(spec, target=multinode.target)
    assert run.wait(timeout=600) is RunStatus.SUCCEEDED, run.failure_reason() + run.logs()[-2000:]
    job = run._job()
    ip_of = multinode.node_ip_of()
    # the learner (the run's process) ran on the node with the (fake) GPU: Ray placed it there
    assert ip_of[job["driver_node_id"]] == GPU_NODE
    # three runner actors, on at least two different nodes, as Ray recorded them
    runners = _runners(multinode, job["job_id"])
    assert len(runners) == 3
    where = [ip_of[a["node_id"]] for a in runners]
    assert set(where) <= NODES and len(set(where)) >= 2, where
    rows = run.metrics()
    assert rows[-1]["step"] >= 6_000
    # one iteration = 3 runners x 8 envs x 64 steps (less the ignored autoreset steps), not one runner's 8 x 64
    assert 2 * 8 * 64 < rows[0]["step"] <= 3 * 8 * 64
    # part 5: 'rlfleet status' names the nodes
    save_target(multinode.target)
    res = subprocess.run([RLFLEET, "status", run.run_id, "--target", "multinode", "--json"],
                         capture_output=True, text=True, timeout=120)  # fmt: skip
    assert res.returncode == 0, res.stderr
    assert f"driver {GPU_NODE}" in res.stdout and "runners " in res.stdout
    for ip in set(where):
        assert ip in res.stdout


def test_a_killed_runner_is_replaced_and_the_run_completes(multinode: MultiNode) -> None:
    """A bring-your-own env (code:) in the runners; one runner's process is SIGKILLed mid-run."""
    spec = RunSpec(kind="train", agent="ppo", env="slowenv:SlowEnv-v0", code=SLOWENV, seed=1,
                   env_kwargs={"step_ms": 1.0, "mode": "sleep"}, budget={"steps": 8_000},
                   resources={"cpus": 0.5}, name="kill-runner",
                   config={"env_runners": 2, "runner_cpus": 1, "num_envs": 4, "num_steps": 32})  # fmt: skip
    run = submit_run(spec, target=multinode.target)
    deadline = time.monotonic() + 300
    victim = None
    while victim is None:
        assert time.monotonic() < deadline, "no runner and first metrics row within 300 s"
        st = run.status()
        # QUEUED first: the cluster's supervisor makes the run a Ray job (a supervised 'ray' target)
        assert st in (RunStatus.QUEUED, RunStatus.PENDING, RunStatus.RUNNING), run.failure_reason()
        job_id = run._job(refresh=False).get("job_id")
        alive = [a for a in _runners(multinode, job_id) if a["state"] == "ALIVE"] if job_id else []
        if len(alive) == 2 and run.metrics():
            victim = alive[0]
        else:
            time.sleep(1)
    step_at_kill = run.metrics()[-1]["step"]
    os.kill(int(victim["pid"]), signal.SIGKILL)
    assert run.wait(timeout=600) is RunStatus.SUCCEEDED, run.failure_reason()
    assert step_at_kill < 8_000, "the run had finished before the runner was killed"
    runners = _runners(multinode, run._job()["job_id"])
    assert len(runners) == 3  # two, and the one that replaced the killed runner
    assert "replacing it and collecting the iteration again" in run.logs()
    rows = run.metrics()
    assert rows[-1]["step"] >= 8_000
    assert [r["step"] for r in rows] == sorted(r["step"] for r in rows)
    assert rows[-1]["episode_return_mean"] > 55  # learnt beyond chance (50 of 100) despite the loss


def test_bad_input_says_what_to_change_in_one_line(multinode: MultiNode) -> None:
    with pytest.raises(SpecError) as err:
        RunSpec(kind="train", agent="ppo", env="CartPole-v1", config={"env_runners": -1})
    assert "env_runners" in str(err.value) and len(str(err.value).strip().splitlines()) == 1
    # more GPUs than any node has: refused before anything is submitted
    before = len(multinode.client().list())
    with pytest.raises(SpecError) as err2:
        submit_run(RunSpec(kind="train", agent="ppo", env="CartPole-v1", resources={"cpus": 0.5, "gpus": 2},
                           config={"env_runners": 1}), target=multinode.target)
    msg = str(err2.value)
    assert "resources.gpus" in msg and "has 1" in msg and "\n" not in msg
    assert len(multinode.client().list()) == before
    # more runners than the cluster's CPUs can hold: the run fails at once, naming the field
    run = submit_run(RunSpec(kind="train", agent="ppo", env="CartPole-v1", resources={"cpus": 0.5},
                             config={"env_runners": 12, "runner_cpus": 2}), target=multinode.target)
    assert run.wait(timeout=300) is RunStatus.FAILED
    reason = run.failure_reason()
    assert "config.env_runners: 12 runners of 2 CPUs do not fit" in reason, reason
    assert "Traceback" not in reason


def test_metrics_node_label_is_the_node_the_process_runs_on(multinode: MultiNode) -> None:
    """The ``node`` label (rlfleet_agents.distributed.node_address) inside each node's namespace."""
    import json

    from rlfleet.paths import local_state_file

    with multinode.home_env():
        st = json.loads(local_state_file().read_text())
    code = "from rlfleet_agents.distributed import node_address; print(node_address())"
    for rec in st["nodes"]:
        out = subprocess.run(["nsenter", f"--net=/proc/{rec['holder_pid']}/ns/net", sys.executable, "-c", code],
                             capture_output=True, text=True, timeout=60)  # fmt: skip
        assert out.stdout.strip() == rec["ip"], out.stderr
    out = subprocess.run(["nsenter", f"--net=/proc/{st['holder_pid']}/ns/net", sys.executable, "-c", code],
                         capture_output=True, text=True, timeout=60)  # fmt: skip
    assert out.stdout.strip() == "10.87.0.1", out.stderr
