"""RLlib's PPO side by side with ours (issue 12, benchmarks): env steps/s of PPO on the bring-your-own
slow env (bench/slowenv: 1 ms of CPU or of sleep per step) with 0, 1, 2, 4 env runners, both sides
on this machine, in one run, rows interleaved (ours, then RLlib's, for each mode and runner count)
so that the machine's load drifts alike over both.

- **Ours**: the local target's Ray head (``ensure_local_up``: one node in its own network namespace,
  token auth, 5 CPUs), a ``train`` run per row submitted through the SDK (Jobs API); the learner is
  the job (1 CPU), each env runner a Ray actor of 1 CPU.
- **RLlib** (``ray[rllib]==2.60.0``, the Ray version we use): it needs gymnasium 1.2.2 (the project
  uses a newer one), so it lives in its own venv (``~/.cache/rlfleet-bench/rllib-venv``: created
  on first use, ``pip install torch==2.13.0`` then ``ray[rllib]==2.60.0``) and runs in a
  subprocess of that venv -- this same file with ``--rllib-worker`` -- with its own
  ``ray.init(num_cpus=5)`` inside a private network namespace that has only loopback (token auth
  on, its token in a 0600 file). The learner is the driver process (``num_learners=0``), each env
  runner a Ray actor of 1 CPU; 0 runners = RLlib's local env runner in the driver.

Both: 4 envs (gymnasium SyncVectorEnv) x 64 steps per runner per iteration, a train batch of
max(1, N) x 256 steps, 4 epochs of 4 minibatches, lr 2.5e-3 decayed linearly to 0 over the budget,
gamma 0.99, GAE lambda 0.95, clip 0.2, no value clipping, no KL penalty, entropy 0, value loss x0.5,
gradient norm clip 0.5, separate policy and value MLPs 64-64 tanh, seed 0, torch 1 thread; the same
env-steps budget per row. steps/s is :func:`bench_scaleout.throughput` on both sides (per-iteration
(step, time) rows; the first two iterations -- actor start-up -- excluded). The return is each side's
mean over its last ~100 episodes at the end (RLlib reports each iteration's mean over the episodes
that ended in it: those are weighted by their counts, newest first, until >= 100). The env's best is
100 (reward 1 per right action, 100 steps); a random policy gets ~50.

With ``--nodes N`` both sides run on ONE multi-node cluster instead (``rlfleet local up --nodes N``:
a head of 1 CPU plus N worker nodes of 1 CPU, each in its own network namespace on a private
bridge): ours as above; RLlib's rows as Ray jobs of that cluster whose entrypoint (the driver, with
the learner) is the RLlib venv's python and whose workers run it too (runtime_env ``py_executable``:
both venvs have Ray 2.60.0 on Python 3.11). Both entrypoints reserve 1 CPU, so on both sides the
env runners go to the other nodes; each row records the nodes its driver and actors ran on.

Usage: nice -n 10 .venv/bin/python bench/bench_rllib.py [--quick] [--write] [--json FILE]
                                                        [--nodes 4] [--modes cpu,sleep]
(17-19 min here at load 15-34, most of it each row's start-up on both sides; --quick: half the steps)
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import IO, Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
from common import emit, machine, machine_line, write_section  # noqa: E402

SLOWENV = str(ROOT / "bench" / "slowenv")
RUNNERS = (0, 1, 2, 4)
MODES = ("cpu", "sleep")
CPUS = 5  # the learner + 4 runners of 1 CPU each, on both sides
STEPS_PER_RUNNER = 2_000  # the env-steps budget of a row: this x max(1, runners) (--quick: half)
NUM_ENVS, NUM_STEPS, MINIBATCHES, EPOCHS, LR = 4, 64, 4, 4, 2.5e-3
VENV = Path(os.environ.get("RLFLEET_BENCH_RLLIB_VENV", Path.home() / ".cache" / "rlfleet-bench" / "rllib-venv"))
RLLIB_PINS = ("torch==2.13.0", "ray[rllib]==2.60.0")  # torch first: an unpinned one pulls CUDA wheels
MARK = "RLLIB-BENCH "  # the worker's answer lines on stdout (Ray and RLlib print their own lines too)


# ---------------------------------------------------------------- RLlib side (runs in its own venv)


def rllib_row(case: dict[str, Any]) -> dict[str, Any]:
    """One RLlib PPO training on the slow env; (step, time) after every iteration and the final return."""
    from ray.rllib.algorithms.ppo import PPOConfig
    from ray.rllib.core.rl_module.default_model_config import DefaultModelConfig
    from ray.tune.registry import register_env
    from slowenv import SlowEnv

    register_env("slowenv-bench", lambda cfg: SlowEnv(**cfg))
    n, budget = case["runners"], case["steps"]
    batch = max(1, n) * NUM_ENVS * NUM_STEPS
    config = (
        PPOConfig()
        .environment("slowenv-bench", env_config={"step_ms": 1.0, "mode": case["mode"]})
        .env_runners(num_env_runners=n, num_envs_per_env_runner=NUM_ENVS, rollout_fragment_length=NUM_STEPS,
                     num_cpus_per_env_runner=1, gym_env_vectorize_mode="sync")
        .learners(num_learners=0)
        .training(train_batch_size_per_learner=batch, minibatch_size=batch // MINIBATCHES, num_epochs=EPOCHS,
                  lr=[[0, LR], [budget, 0.0]], gamma=0.99, lambda_=0.95, clip_param=0.2,
                  vf_clip_param=float("inf"), use_kl_loss=False, entropy_coeff=0.0, vf_loss_coeff=0.5,
                  grad_clip=0.5, grad_clip_by="global_norm")
        .rl_module(model_config=DefaultModelConfig(fcnet_hiddens=[64, 64], fcnet_activation="tanh",
                                                   vf_share_layers=False))
        .debugging(seed=case.get("seed", 0))
    )  # fmt: skip
    algo = config.build_algo()
    rows: list[dict[str, Any]] = []
    means: list[tuple[float, int]] = []  # (mean return, episodes) of each iteration that ended episodes
    t0 = time.monotonic()
    try:
        step, episodes = 0, 0
        while step < budget:
            res = algo.train()
            runners = res.get("env_runners", {})
            step = int(runners.get("num_env_steps_sampled_lifetime") or res.get("num_env_steps_sampled_lifetime"))
            timers = res.get("timers", {})  # RLlib's own split of the iteration (smoothed over iterations)
            split = {k: float(timers.get(k) or "nan") for k in ("env_runner_sampling_timer", "learner_update_timer")}
            rows.append({"step": step, "time": time.monotonic() - t0, **split})
            done = int(runners.get("num_episodes_lifetime", 0)) - episodes
            episodes += done
            if done > 0:  # RLlib reports the mean of the iteration's new episodes (nan when none ended)
                means.append((float(runners["episode_return_mean"]), done))
    finally:
        algo.stop()
    return {"rows": rows, "return": last_episodes_mean(means)}


def last_episodes_mean(means: list[tuple[float, int]], last: int = 100) -> float:
    """The mean return over the last ~``last`` episodes from per-iteration (mean, count) pairs: the
    newest iterations whose counts reach ``last`` (all of the oldest one taken), weighted by count."""
    total, n = 0.0, 0
    for mean, count in reversed(means):
        total, n = total + mean * count, n + count
        if n >= last:
            break
    return total / n if n else float("nan")


def rllib_worker() -> int:
    """Serve rows: one JSON case per stdin line, one ``MARK`` + JSON answer per case on stdout."""
    import ray
    import torch

    torch.set_num_threads(1)
    ray.init(num_cpus=CPUS, include_dashboard=False, log_to_driver=False, _temp_dir=os.environ["RLB_TEMP"])
    print(MARK + json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        try:
            answer = rllib_row(json.loads(line))
        except Exception as err:  # the parent names the row; the traceback is in the worker log
            import traceback

            traceback.print_exc()
            answer = {"error": f"{type(err).__name__}: {err}"}
        print(MARK + json.dumps(answer), flush=True)
    ray.shutdown()
    return 0


def rllib_job(case_json: str) -> int:
    """One row as a Ray job of the multi-node cluster (``--nodes``): the driver is this process (the
    learner, on the head node), the env runners Ray actors that Ray places on the worker nodes."""
    import ray
    import torch

    torch.set_num_threads(1)
    ray.init(log_to_driver=False)  # the job's cluster (RAY_ADDRESS, its token: from the job supervisor)
    try:
        answer = rllib_row(json.loads(case_json))
    except Exception as err:
        import traceback

        traceback.print_exc()
        answer = {"error": f"{type(err).__name__}: {err}"}
    print(MARK + json.dumps(answer), flush=True)
    return 0


class RLlibJobs:
    """The RLlib side on the same multi-node cluster as ours: each row a Ray job whose entrypoint is the
    RLlib venv's python and whose workers (the env runner actors) run that python too (runtime_env
    ``py_executable``: both venvs have Ray 2.60.0 on Python 3.11, so they join the same cluster)."""

    def __init__(self, py: Path, target: Any, log: IO[str]) -> None:
        from rlfleet.jobs import JobsClient

        self.py, self.log = py, log
        self.client = JobsClient(target.ray_address, target.token(), target_name=target.name)
        self.n = 0

    def row(self, case: dict[str, Any]) -> dict[str, Any]:
        self.n += 1
        sid = f"rllib-bench-{os.getpid()}-{self.n}"
        env = {"PYTHONPATH": SLOWENV, "OMP_NUM_THREADS": "1"}
        entry = f"{shlex.quote(str(self.py))} {shlex.quote(__file__)} --rllib-job {shlex.quote(json.dumps(case))}"
        self.client.submit(submission_id=sid, entrypoint=entry, metadata={},
                           runtime_env={"py_executable": str(self.py), "env_vars": env},
                           num_cpus=1, num_gpus=0)  # fmt: skip
        while (job := self.client.get(sid))["status"] not in ("SUCCEEDED", "FAILED", "STOPPED"):
            time.sleep(1.0)
        logs = self.client.logs(sid)
        self.log.write(f"--- {sid} {case} {job['status']}\n{logs}\n")
        self.log.flush()
        answer = next((json.loads(line[len(MARK) :]) for line in logs.splitlines() if line.startswith(MARK)), None)
        if answer is None or "error" in answer:
            why = (answer or {}).get("error") or f"job {job['status']}: {job.get('message')}"
            raise SystemExit(f"RLlib PPO, mode {case['mode']}, {case['runners']} runners: {why} (log {self.log.name})")
        return {**answer, "nodes": where(self.client, job)}

    def close(self) -> None:
        pass


def where(client: Any, job: dict[str, Any]) -> str:
    """'driver 10.87.0.1; actors 10.87.0.2, 10.87.0.3': the nodes a job's driver and actors ran on."""
    from rlfleet.placement import run_nodes

    ran = run_nodes(client, job, actor_class=None)  # RLlib's runners are not our EnvRunner class
    ips = sorted(str(a["node_ip"]) for a in ran["runners"])
    return f"driver {ran['driver'] or '?'}; actors {', '.join(ips) or 'none'}"


# ---------------------------------------------------------------- the parent (the project's venv)


def ensure_rllib_venv(say: Any) -> Path:
    """The RLlib venv's python, created (once) with the pinned torch and ray[rllib]."""
    py = VENV / "bin" / "python"
    probe = [str(py), "-c", "import ray, ray.rllib, torch; assert ray.__version__ == '2.60.0'"]
    if py.exists() and subprocess.run(probe, capture_output=True).returncode == 0:
        return py
    say(f"creating the RLlib venv {VENV} (torch, ray[rllib]; ~5 min) ...")
    VENV.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run([shutil.which("python3.11") or sys.executable, "-m", "venv", str(VENV)], check=True)
    for pin in RLLIB_PINS:
        subprocess.run([str(py), "-m", "pip", "install", "-q", pin], check=True)
    subprocess.run(probe, check=True)
    return py


class RLlibWorker:
    """The RLlib subprocess: its own Ray (CPUS CPUs) in a network namespace with only loopback."""

    def __init__(self, py: Path, log: IO[str]) -> None:
        self.tmp = tempfile.mkdtemp(prefix="rlb-")  # Ray's temp dir (short: Ray's socket paths)
        token = Path(self.tmp) / "token"
        token.write_text(secrets.token_hex(32))
        token.chmod(0o600)
        env = {**os.environ, "PYTHONPATH": SLOWENV, "RLB_TEMP": self.tmp, "OMP_NUM_THREADS": "1",
               "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token)}  # fmt: skip
        cmd = ["unshare", "-n", "sh", "-c", 'ip link set lo up && exec "$0" "$@"', str(py), __file__, "--rllib-worker"]
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log, text=True,
                                     env=env, cwd=self.tmp)  # fmt: skip
        self.log = log
        self._answer()  # ready

    def _answer(self) -> dict[str, Any]:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            if line.startswith(MARK):
                return json.loads(line[len(MARK) :])
            self.log.write(line)
        raise SystemExit(f"the RLlib worker exited ({self.proc.wait()}); see its log {self.log.name}")

    def row(self, case: dict[str, Any]) -> dict[str, Any]:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(case) + "\n")
        self.proc.stdin.flush()
        answer = self._answer()
        if "error" in answer:
            raise SystemExit(f"RLlib PPO, mode {case['mode']}, {case['runners']} runners: {answer['error']} "
                             f"(log {self.log.name})")  # fmt: skip
        return answer

    def close(self) -> None:
        if self.proc.stdin:
            self.proc.stdin.close()
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        shutil.rmtree(self.tmp, ignore_errors=True)


def ours_row(target: Any, mode: str, runners: int, steps: int) -> dict[str, Any]:
    from rlfleet import RunSpec, RunStatus, submit_run
    from rlfleet.jobs import JobsClient

    cfg = {
        "env_runners": runners,
        "num_envs": NUM_ENVS,
        "num_steps": NUM_STEPS,
        "runner_cpus": 1,
        "num_minibatches": MINIBATCHES,
        "update_epochs": EPOCHS,
        "learning_rate": LR,
        "anneal_lr": True,
        "gamma": 0.99,
        "gae_lambda": 0.95,
        "clip_coef": 0.2,
        "clip_vloss": False,
        "ent_coef": 0.0,
        "vf_coef": 0.5,
        "max_grad_norm": 0.5,
        "hidden_sizes": [64, 64],
        "vectorization": "sync",
    }
    spec = RunSpec(kind="train", agent="ppo", env="slowenv:SlowEnv-v0", code=SLOWENV, seed=0,
                   env_kwargs={"step_ms": 1.0, "mode": mode}, resources={"cpus": 1},
                   budget={"steps": steps}, config=cfg)  # fmt: skip
    run = submit_run(spec, target=target)
    st = run.wait(timeout=1800)
    if st is not RunStatus.SUCCEEDED:
        raise SystemExit(f"run {run.run_id} (mode {mode}, {runners} runners) ended {st}: {run.failure_reason()}")
    rows = run.metrics()
    client = JobsClient(target.ray_address, target.token(), target_name=target.name)
    nodes_of = where(client, client.get(run.run_id))
    ret = next((r["episode_return_mean"] for r in reversed(rows) if "episode_return_mean" in r), float("nan"))
    return {"rows": rows, "return": ret, "nodes": nodes_of}


def table(results: list[dict[str, Any]]) -> str:
    lines = [
        "| env (1 ms/step) | runners | env steps | ours steps/s | RLlib steps/s | ours/RLlib "
        "| ours return | RLlib return |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        lines.append(
            f"| {r['mode']} | {r['runners']} | {r['steps']:,} | {r['ours']:,.0f} | {r['rllib']:,.0f} "
            f"| {r['ours'] / r['rllib']:.2f} | {r['ours_return']:.1f} | {r['rllib_return']:.1f} |"
        )
    if all(r.get("rllib_nodes") for r in results):  # --nodes: where each side ran
        lines += ["", "| env | runners | ours: driver; actors | RLlib: driver; actors |", "|---|---:|---|---|"]
        lines += [f"| {r['mode']} | {r['runners']} | {r['ours_nodes']} | {r['rllib_nodes']} |" for r in results]
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="half the steps")
    ap.add_argument("--write", action="store_true", help="write the table into docs/benchmarks.md")
    ap.add_argument("--json", help="also write every row (with its per-iteration rows) to this JSON file")
    ap.add_argument(
        "--nodes",
        type=int,
        default=0,
        help="both sides on one multi-node cluster: head (1 CPU) + this many worker nodes of 1 CPU "
        "(rlfleet local up --nodes N); 0: each side on its own single node of 5 CPUs",
    )
    ap.add_argument("--modes", default=",".join(MODES), help="comma-separated: cpu, sleep")
    ap.add_argument("--rllib-worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--rllib-job", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.rllib_worker:
        return rllib_worker()
    if args.rllib_job:
        return rllib_job(args.rllib_job)
    if os.nice(0) < 10:
        os.nice(10 - os.nice(0))  # both sides (and their Ray processes) inherit it
    from bench_scaleout import throughput

    py = ensure_rllib_venv(print)
    os.environ["RLFLEET_HOME"] = tempfile.mkdtemp(prefix="rlfleet-bench-rllib-")
    from rlfleet.local import ensure_local_up, local_down
    from rlfleet.provisioners.refs import NoRef
    from rlfleet.targets import Target

    info = machine()
    t_start = time.monotonic()
    log = open(Path(os.environ["RLFLEET_HOME"]) / "rllib-worker.log", "w")
    if args.nodes:
        local = ensure_local_up(num_cpus=1, nodes=args.nodes, node_cpus=1, echo=print)
    else:
        local = ensure_local_up(num_cpus=CPUS, nodes=0, echo=print)
    target = Target(name="bench-rllib", kind="ray", ray_address=local.ray_address,
                    token_source=local.token_source, artifact_root=local.artifact_root,
                    provisioner=NoRef(type="none"))  # fmt: skip
    results: list[dict[str, Any]] = []
    worker: RLlibWorker | RLlibJobs | None = None
    try:
        worker = RLlibJobs(py, target, log) if args.nodes else RLlibWorker(py, log)
        for mode in args.modes.split(","):
            for n in RUNNERS:
                steps = int(STEPS_PER_RUNNER * max(1, n) / (2 if args.quick else 1))
                ours = ours_row(target, mode, n, steps)
                theirs = worker.row({"mode": mode, "runners": n, "steps": steps, "seed": 0})
                r = {"mode": mode, "runners": n, "steps": steps, "ours": throughput(ours["rows"]),
                     "rllib": throughput(theirs["rows"]), "ours_return": ours["return"],
                     "rllib_return": theirs["return"], "load": round(os.getloadavg()[0], 1),
                     "ours_nodes": ours["nodes"], "rllib_nodes": theirs.get("nodes"),
                     "ours_rows": [{k: row[k] for k in ("step", "time")} for row in ours["rows"]],
                     "rllib_rows": theirs["rows"]}  # fmt: skip
                results.append(r)
                print(f"mode {mode}, {n} runners: ours {r['ours']:,.0f} steps/s, RLlib {r['rllib']:,.0f} "
                      f"(ours/RLlib {r['ours'] / r['rllib']:.2f}); return {r['ours_return']:.1f} vs "
                      f"{r['rllib_return']:.1f}; load {r['load']}; ours {r['ours_nodes']}; RLlib "
                      f"{r['rllib_nodes']}", flush=True)  # fmt: skip
    finally:
        if worker:
            worker.close()
        log.close()
        local_down()
    loads = [r["load"] for r in results]
    layout = f"one cluster: head (1 CPU) + {args.nodes} worker nodes (1 CPU each); " if args.nodes else ""
    body = (
        f"{machine_line(info)} (1-minute load after each row: {min(loads)}-{max(loads)}); {layout}"
        f"{'--quick, ' if args.quick else ''}whole run {(time.monotonic() - t_start) / 60:.1f} min.\n\n"
        f"{table(results)}"
    )
    print(body)
    emit({"machine": info, "rows": results}, args.json)
    if args.write:
        write_section("rllib-nodes" if args.nodes else "rllib", body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
