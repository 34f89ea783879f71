"""Named deployments (docs/serving.md) on the local target: HAProxy + N replicas vs one server.

- req/s and p50/p99 through the balancer with 1, 2 and 4 replicas (wrk, keep-alive, 16 connections)
  against one deploy-run server without a balancer, both reached through the local target's
  forwarder on 127.0.0.1 (so the difference is the balancer and the replicas);
- the balancer's added p50 at concurrency 1;
- non-2xx and p99 under constant load (wrk, 8 connections) while a canary starts at 10 %, goes to
  50 % and is promoted.

A private local target (its own RLFLEET_HOME) is started and stopped; the policy is an untrained
CartPole MLP exported and parity-checked like a train run's. Bounded: ~8 s per wrk run.

Usage: PYTHONPATH=sdk:agents .venv/bin/python bench/bench_deployments.py [--duration 8] [--json-out F]
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, os.path.dirname(__file__))
from bench_serving import wrk
from common import emit, machine


def policy_run(store: Any, run_id: str, seed: int) -> str:
    """A committed run with an exported, parity-checked (untrained) CartPole policy."""
    import numpy as np
    import torch

    from rlfleet_agents.envs import make_vec_env, vec_space_info
    from rlfleet_agents.export import check_parity, export_onnx, sample_observations, sha256
    from rlfleet_agents.networks import ActorCritic, DeterministicPolicy

    torch.manual_seed(seed)
    envs = make_vec_env("CartPole-v1", 2)
    info = vec_space_info(envs, "CartPole-v1")
    envs.close()
    policy = DeterministicPolicy(ActorCritic(info, [64, 64], True), "discrete")
    data = export_onnx(policy, info, {"env": "CartPole-v1", "run_id": run_id})
    parity = check_parity(policy, data, sample_observations(info, 256, seed, np.zeros((0, 4), np.float32)))
    arts = store.run(run_id)
    arts.write_text("spec.json", '{"kind": "train", "agent": "ppo", "env": "CartPole-v1", "seed": 0}')
    arts.write_bytes("policy.onnx", data)
    arts.commit(extra={"kind": "train", "policy_sha256": sha256(data), "parity": parity})
    return run_id


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--duration", type=int, default=8, help="seconds per wrk run")
    ap.add_argument("--json-out")
    args = ap.parse_args()
    if not shutil.which("wrk") or not shutil.which("haproxy"):
        sys.exit("needs wrk and haproxy (apt-get install wrk haproxy)")
    home = Path(tempfile.mkdtemp(prefix="rlfbd-", dir="/tmp"))
    os.environ["RLFLEET_HOME"] = str(home / "home")
    os.environ.pop("RLFLEET_TARGET", None)
    from rlfleet import RunSpec, submit_run
    from rlfleet.deployments import deploy
    from rlfleet.local import ensure_local_up, local_down

    result: dict[str, Any] = {"machine": machine(), "duration_s": args.duration}
    d = args.duration
    try:
        tgt = ensure_local_up()
        store = tgt.store()
        a, b = policy_run(store, "rl-20000101-000000-bench01", 1), policy_run(store, "rl-20000101-000000-bench02", 2)
        single = submit_run(RunSpec(kind="deploy", source=a, deploy={"name": "single"}), target="local")
        single.wait(120)
        ep = single.endpoint()
        result["one_server"] = [wrk(ep.act_url, ep.token, c, d, home) for c in (1, 16)]
        single.cancel()
        dep = deploy("bench", a, replicas=1, target="local")
        dep_ep = dep.endpoint()
        for n in (1, 2, 4):
            if n > 1:
                dep.scale(n)
            result[f"balanced_{n}"] = [wrk(dep_ep.act_url, dep_ep.token, c, d, home) for c in (1, 16)]
            print(f"{n} replicas: {result[f'balanced_{n}']}", file=sys.stderr)
        dep.scale(2)
        one = result["one_server"]
        result["balancer_added_p50_ms_c1"] = round(result["balanced_1"][0]["p50_ms"] - one[0]["p50_ms"], 3)
        result["req_per_s_ratio_c16"] = {n: round(result[f"balanced_{n}"][1]["req_per_s"] / one[1]["req_per_s"], 2)
                                         for n in (1, 2, 4)}
        # canary -> promote under constant load
        span = max(3 * d, 20)
        load: dict[str, Any] = {}
        th = threading.Thread(target=lambda: load.update(wrk(dep_ep.act_url, dep_ep.token, 8, span, home)))
        th.start()
        time.sleep(2)
        t0 = time.monotonic()
        dep.canary(b, 10)
        dep.set_weight(50)
        dep.promote()
        changes_s = time.monotonic() - t0
        th.join()
        result["canary_promote_under_load"] = {**load, "changes_took_s": round(changes_s, 1)}
        dep.undeploy()
    finally:
        local_down()
        subprocess.run(["rm", "-rf", str(home)], check=False)
    emit(result, args.json_out)


if __name__ == "__main__":
    main()
