"""Distributed rollouts (issue 12): env steps/s of PPO with 0, 1, 2, 4 env runners across the nodes
of a local multi-node cluster (``rlfleet local up --nodes 4``: head + 4 worker nodes, each in its own
network namespace, 1 CPU each), for three envs:

- ``slowenv:SlowEnv-v0`` mode ``cpu``: a bring-your-own env (bench/slowenv, shipped as ``code:``)
  that burns 1 ms of CPU per step -- CPU-bound: on a 2-core machine at most 2 runners can help;
- the same env, mode ``sleep``: 1 ms of waiting per step (an env that waits on a simulator or an
  I/O device) -- it scales with runners even here;
- CartPole-v1 (Gymnasium's numpy-vectorized env: ~1M steps/s at 64 envs) -- the env is nearly free,
  so the learner update and the weight/batch transfers set the pace.

steps/s = (last step - first step) / (time between the first and last metrics rows): training
throughput (rollout + update), the first iteration (actor start-up) excluded. Efficiency = steps/s
with N runners / (N x steps/s with 1 runner).

Usage: .venv/bin/python bench/bench_scaleout.py [--quick] [--write]   (~10 min; --quick ~4 min)
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
from common import machine, machine_line, write_section  # noqa: E402

SLOWENV = str(ROOT / "bench" / "slowenv")
RUNNERS = (0, 1, 2, 4)
ENVS: dict[str, dict[str, Any]] = {
    "slow env, 1 ms CPU/step": {"env": "slowenv:SlowEnv-v0", "code": SLOWENV,
                                 "env_kwargs": {"step_ms": 1.0, "mode": "cpu"}, "steps": 6_000},
    "slow env, 1 ms sleep/step": {"env": "slowenv:SlowEnv-v0", "code": SLOWENV,
                                  "env_kwargs": {"step_ms": 1.0, "mode": "sleep"}, "steps": 6_000},
    "CartPole-v1": {"env": "CartPole-v1", "steps": 60_000},
}


def throughput(rows: list[dict[str, Any]]) -> float:
    if len(rows) < 3:
        return float("nan")
    a, b = rows[1], rows[-1]  # rows[0] includes starting the runners
    return (b["step"] - a["step"]) / max(b["time"] - a["time"], 1e-9)


def measure(target: Any, case: dict[str, Any], runners: int, scale: float) -> float:
    from rlfleet import RunSpec, RunStatus, submit_run

    cfg = {"env_runners": runners, "num_envs": 4, "num_steps": 64, "runner_cpus": 1}
    spec = RunSpec(kind="train", agent="ppo", env=case["env"], code=case.get("code"),
                   env_kwargs=case.get("env_kwargs") or {}, seed=0, resources={"cpus": 1},
                   budget={"steps": int(case["steps"] * max(1, runners) * scale)}, config=cfg)  # fmt: skip
    run = submit_run(spec, target=target)
    st = run.wait(timeout=1800)
    if st is not RunStatus.SUCCEEDED:
        raise SystemExit(f"run {run.run_id} ({case['env']}, {runners} runners) ended {st}: {run.failure_reason()}")
    return throughput(run.metrics())


def table(results: dict[str, dict[int, float]]) -> str:
    lines = ["| env | runners | env steps/s | vs 0 runners | efficiency vs linear (1 runner = 1.0) |",
             "|---|---:|---:|---:|---:|"]
    for name, by_n in results.items():
        for n, sps in by_n.items():
            eff = "" if n == 0 else f"{sps / (n * by_n[1]):.2f}"
            lines.append(f"| {name} | {n} | {sps:,.0f} | {sps / by_n[0]:.2f}x | {eff} |")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="a third of the steps")
    ap.add_argument("--write", action="store_true", help="write the table into docs/benchmarks.md")
    args = ap.parse_args()
    os.environ["RLFLEET_HOME"] = tempfile.mkdtemp(prefix="rlfleet-bench-scaleout-")
    from rlfleet.local import ensure_local_up, local_down
    from rlfleet.provisioners.refs import NoRef
    from rlfleet.targets import Target

    info = machine()
    t0 = time.monotonic()
    local = ensure_local_up(num_cpus=1, nodes=4, node_cpus=1, echo=print)
    boot = time.monotonic() - t0
    target = Target(name="bench-multinode", kind="ray", ray_address=local.ray_address,
                    token_source=local.token_source, artifact_root=local.artifact_root,
                    provisioner=NoRef(type="none"))  # fmt: skip
    results: dict[str, dict[int, float]] = {}
    try:
        for name, case in ENVS.items():
            results[name] = {}
            for n in RUNNERS:
                results[name][n] = measure(target, case, n, 1 / 3 if args.quick else 1.0)
                print(f"{name}: {n} runners -> {results[name][n]:,.0f} env steps/s", flush=True)
    finally:
        local_down()
    body = (f"{machine_line(info)}; "
            f"cluster: head (1 CPU) + 4 worker nodes (1 CPU each), booted in {boot:.0f} s. PPO, 4 envs x 64 steps "
            f"per runner per iteration.\n\n{table(results)}")
    print(body)
    if args.write:
        write_section("scaleout", body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
