"""Our PPO vs Stable-Baselines3 PPO on MuJoCo continuous control, side by side in one process.

For each env and seed, both kits train for the same number of env steps on 1 torch thread:
ours with its tuned defaults for the env (CleanRL's ppo_continuous_action settings, see
rlfleet_agents/configs.py), SB3 with RL-Zoo's tuned hyperparameters for the env (VecNormalize on
observations and rewards, as RL-Zoo's ``normalize: true``). Then the final deterministic policy of
each is evaluated on the same fresh-seed episodes with the same code (``rlfleet_agents.evaluate``;
SB3's observations go through its frozen VecNormalize statistics). Reported per env and kit:
final return (mean over seeds, with the spread: std over seeds and min/max), training wall
time and training CPU time (evaluation excluded; on a shared machine the CPU time is the figure
that does not move with other jobs' load). CleanRL's published 1M-step returns are printed as a reference row.

Usage (full budget, as the issue asks: 1M steps x 5 seeds x 2 envs x 2 kits; about 2 hours on 2
idle cores with one worker per core):
  PYTHONPATH=sdk:agents .venv/bin/python bench/bench_mujoco.py --steps 1000000 --seeds 5 \
      --envs Hopper-v5,HalfCheetah-v5 --jobs 2 --json-out mujoco.json
docs/benchmarks.md "MuJoCo" has the full-budget result (files in bench/results/); an interrupted
run continues with --resume. Reduced budget:
  PYTHONPATH=sdk:agents .venv/bin/python bench/bench_mujoco.py --steps 200000 --seeds 2 --envs Hopper-v5
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, os.path.dirname(__file__))
from common import emit, machine

# rl-baselines3-zoo hyperparams/ppo.yml (the tuned "Hopper-v3" / "HalfCheetah-v3" entries; RL-Zoo
# uses the same values for the later MuJoCo versions). All: normalize: true, n_envs: 1,
# policy_kwargs log_std_init=-2, ortho_init=False, ReLU, pi/vf [256, 256].
ZOO = {
    "Hopper": {"batch_size": 32, "n_steps": 512, "gamma": 0.999, "learning_rate": 9.80828e-05,
               "ent_coef": 0.00229519, "clip_range": 0.2, "n_epochs": 5, "gae_lambda": 0.99,
               "max_grad_norm": 0.7, "vf_coef": 0.835671},
    "HalfCheetah": {"batch_size": 64, "n_steps": 512, "gamma": 0.98, "learning_rate": 2.0633e-05,
                    "ent_coef": 0.000401762, "clip_range": 0.1, "n_epochs": 20, "gae_lambda": 0.92,
                    "max_grad_norm": 0.8, "vf_coef": 0.58096},
}

# CleanRL's published ppo_continuous_action.py returns at 1M steps (MuJoCo v4, openrlbenchmark
# tag pr-424), from https://docs.cleanrl.dev/rl-algorithms/ppo/#ppo_continuous_actionpy
# ("Experiment results", MuJoCo v4 table): mean +- std over its seeds of the training episodic return.
CLEANRL_1M = {"Hopper": (2382.86, 271.74), "HalfCheetah": (1442.64, 46.03)}


def _family(env_id: str) -> str:
    name = env_id.split("-")[0]
    if name not in ZOO:
        raise SystemExit(f"--envs: no RL-Zoo hyperparameters here for {env_id!r} (have: {', '.join(ZOO)})")
    return name


def ours(env_id: str, seed: int, steps: int, episodes: int) -> dict[str, Any]:
    from rlfleet_agents.evaluate import evaluate
    from rlfleet_agents.networks import torch_act_fn
    from rlfleet_agents.trainer import make_algorithm, train

    algo = make_algorithm("ppo", env_id, None, seed, {"device": "cpu"}, steps)
    c0 = time.process_time()
    res = train(algo, total_steps=steps)
    cpu = time.process_time() - c0
    algo.close()
    assert res.policy is not None
    ev = evaluate(torch_act_fn(res.policy, algo.device), env_id, episodes, seed=seed)
    return {"seed": seed, "steps": res.global_step, "wall_time_s": round(res.wall_time_s, 1),
            "cpu_time_s": round(cpu, 1),
            "return": round(ev["mean"], 1), "return_std_episodes": round(ev["std"], 1)}


def sb3(env_id: str, seed: int, steps: int, episodes: int) -> dict[str, Any]:
    import torch
    from stable_baselines3 import PPO
    from stable_baselines3.common.env_util import make_vec_env
    from stable_baselines3.common.vec_env import VecNormalize

    from rlfleet_agents.evaluate import evaluate

    z = ZOO[_family(env_id)]
    venv = VecNormalize(make_vec_env(env_id, n_envs=1, seed=seed), gamma=z["gamma"])
    model = PPO("MlpPolicy", venv, seed=seed, device="cpu", verbose=0,
                policy_kwargs={"log_std_init": -2, "ortho_init": False, "activation_fn": torch.nn.ReLU,
                               "net_arch": {"pi": [256, 256], "vf": [256, 256]}}, **z)
    t0, c0 = time.perf_counter(), time.process_time()
    model.learn(total_timesteps=steps)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    venv.training = False

    def act(obs: np.ndarray) -> np.ndarray:
        return model.predict(venv.normalize_obs(obs), deterministic=True)[0]

    ev = evaluate(act, env_id, episodes, seed=seed)
    venv.close()
    return {"seed": seed, "steps": int(model.num_timesteps), "wall_time_s": round(wall, 1), "cpu_time_s": round(cpu, 1),
            "return": round(ev["mean"], 1), "return_std_episodes": round(ev["std"], 1)}


def summary(runs: list[dict[str, Any]]) -> dict[str, Any]:
    r = np.array([x["return"] for x in runs], dtype=float)
    t = np.array([x["wall_time_s"] for x in runs], dtype=float)
    c = np.array([x["cpu_time_s"] for x in runs], dtype=float)
    return {"return_mean": round(float(r.mean()), 1), "return_std_over_seeds": round(float(r.std()), 1),
            "return_min": float(r.min()), "return_max": float(r.max()),
            "wall_time_s_mean": round(float(t.mean()), 1), "cpu_time_s_mean": round(float(c.mean()), 1),
            "per_seed": runs}


def _task(args: tuple[str, int, int, int, list[str]]) -> tuple[str, int, dict[str, dict[str, Any]]]:
    """One (env, seed): each kit in turn, in this worker process (1 torch thread)."""
    env_id, seed, steps, episodes, kits = args
    import torch

    torch.set_num_threads(1)
    kit_fn = {"ours": ours, "sb3": sb3}
    out = {k: kit_fn[k](env_id, seed, steps, episodes) for k in kits}
    print(f"{env_id} seed {seed}: " + ", ".join(f"{k} {out[k]}" for k in kits), file=sys.stderr, flush=True)
    return env_id, seed, out


def _row(env_id: str, kits: list[str], runs: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    row: dict[str, Any] = {k: summary(sorted(runs[k], key=lambda r: r["seed"])) for k in kits if runs[k]}
    if len(row) == 2:
        o, s = row["ours"], row["sb3"]
        row["wall_time_ratio_ours_over_sb3"] = round(o["wall_time_s_mean"] / s["wall_time_s_mean"], 3)
        row["cpu_time_ratio_ours_over_sb3"] = round(o["cpu_time_s_mean"] / s["cpu_time_s_mean"], 3)
    ref_mean, ref_std = CLEANRL_1M[_family(env_id)]
    row["cleanrl_published_1M"] = {"return_mean": ref_mean, "return_std": ref_std,
                                   "env": env_id.replace("-v5", "-v4"), "steps": 1_000_000}
    return row


def markdown(result: dict[str, Any]) -> str:
    """The docs/benchmarks.md table of a (finished or partial) result file."""
    lines = ["| env | kit | seeds done | env steps (mean) | final return, mean +- std over seeds | min / max "
             "| per seed | training wall s (mean) | training CPU s (mean) |",
             "|---|---|---:|---:|---:|---:|---|---:|---:|"]
    ratios = []
    for env_id, row in result["envs"].items():
        for kit, name in (("ours", "ours"), ("sb3", "SB3 + RL-Zoo")):
            if kit not in row:
                continue
            r = row[kit]
            seeds = r["per_seed"]
            per_seed = ", ".join(f"{x['return']:.1f}" for x in seeds)
            lines.append(
                f"| {env_id} | {name} | {len(seeds)} | {round(np.mean([x['steps'] for x in seeds])):,} "
                f"| **{r['return_mean']:.1f} +- {r['return_std_over_seeds']:.1f}** "
                f"| {r['return_min']:.1f} / {r['return_max']:.1f} "
                f"| {per_seed} "
                f"| {r['wall_time_s_mean']:,.1f} | {r['cpu_time_s_mean']:,.1f} |")
        ref = row["cleanrl_published_1M"]
        lines.append(f"| {env_id} | CleanRL, published ({ref['env']}, reference) | | 1,000,000 "
                     f"| {ref['return_mean']} +- {ref['return_std']} | | | | |")
        if "wall_time_ratio_ours_over_sb3" in row:
            ratios.append(f"{env_id}: wall time ours/SB3 {row['wall_time_ratio_ours_over_sb3']:.3f}, "
                          f"CPU time {row['cpu_time_ratio_ours_over_sb3']:.3f}")
    return "\n".join(lines + [""] + [f"- {r}" for r in ratios])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--envs", default="Hopper-v5,HalfCheetah-v5", help="comma-separated MuJoCo env ids")
    ap.add_argument("--steps", type=int, default=1_000_000, help="env steps per run (both kits)")
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--eval-episodes", type=int, default=10, help="deterministic episodes per final evaluation")
    ap.add_argument("--kits", default="ours,sb3", help="comma-separated: ours, sb3 (a partial run measures one)")
    ap.add_argument("--jobs", type=int, default=1,
                    help="worker processes, each running whole (env, seed) tasks with both kits in turn on "
                         "1 torch thread; at most the number of cores for honest wall times")
    ap.add_argument("--json-out")
    ap.add_argument("--resume", action="store_true",
                    help="continue the run in --json-out: its finished (env, seed) tasks are kept, the rest run; "
                         "refused if the protocol, ours' resolved config or SB3's hyperparameters differ")
    ap.add_argument("--markdown", metavar="RESULT_JSON",
                    help="print the docs/benchmarks.md table of an earlier run's --json-out file, run nothing")
    args = ap.parse_args()
    if args.markdown:
        print(markdown(json.loads(Path(args.markdown).read_text())))
        return
    kits = [k.strip() for k in args.kits.split(",") if k.strip()]
    if not kits or set(kits) - {"ours", "sb3"}:
        raise SystemExit(f"--kits: choose from ours, sb3 (got {args.kits!r})")
    envs = [e.strip() for e in args.envs.split(",") if e.strip()]
    for e in envs:
        _family(e)
    if not 1 <= args.jobs <= (os.cpu_count() or 1):
        raise SystemExit(f"--jobs: between 1 and the {os.cpu_count()} cores here (got {args.jobs})")

    if args.resume and not args.json_out:
        raise SystemExit("--resume: name the run's file with --json-out")
    from importlib.metadata import version

    from rlfleet_agents.registry import build_config, config_to_dict

    protocol = {"steps": args.steps, "seeds": args.seeds, "envs": envs, "kits": kits,
                "eval_episodes": args.eval_episodes,
                "ours_config": {e: config_to_dict(build_config("ppo", e, {"device": "cpu"})) for e in envs},
                "sb3_hyperparameters": {e: ZOO[_family(e)] for e in envs},
                "packages": {p: version(p) for p in ("torch", "stable_baselines3", "gymnasium", "mujoco", "numpy")}}
    result: dict[str, Any] = {"machine": machine(), "protocol": protocol, "envs": {}, "segments": []}
    runs: dict[str, dict[str, list[dict[str, Any]]]] = {e: {k: [] for k in kits} for e in envs}
    if args.resume and os.path.exists(args.json_out):
        prev = json.loads(Path(args.json_out).read_text())
        for key in ("steps", "envs", "kits", "eval_episodes", "ours_config", "sb3_hyperparameters"):
            if prev["protocol"].get(key) != protocol[key]:
                raise SystemExit(f"--resume: {args.json_out} was run with another {key} "
                                 f"({prev['protocol'].get(key)!r}); start a new file or use the same settings")
        result["machine"], result["segments"] = prev["machine"], prev.get("segments", [])
        for env_id, row in prev["envs"].items():  # a task counts as done when every kit has its seed
            per_kit = {k: row.get(k, {}).get("per_seed", []) for k in kits}
            seeds = set.intersection(*({r["seed"] for r in rs} for rs in per_kit.values()))
            runs[env_id] = {k: [r for r in rs if r["seed"] in seeds] for k, rs in per_kit.items()}
            if seeds:
                result["envs"][env_id] = _row(env_id, kits, runs[env_id])
    segment = {"machine": machine(), "jobs": args.jobs, "seeds_run": {}}
    result["segments"].append(segment)
    # (env, seed) tasks, both kits in turn inside each (load on the machine hits both kits alike);
    # HalfCheetah first: its SB3 runs are the longest, so the pool's last tasks are the short ones
    tasks = [(e, seed, args.steps, args.eval_episodes, kits)
             for e in sorted(envs, key=lambda e: _family(e) != "HalfCheetah") for seed in range(args.seeds)
             if not any(r["seed"] == seed for r in runs[e][kits[0]])]
    t0 = time.perf_counter()

    def record(env_id: str, seed: int, out: dict[str, dict[str, Any]]) -> None:
        for k in kits:
            runs[env_id][k].append(out[k])
        result["envs"][env_id] = _row(env_id, kits, runs[env_id])
        segment["seeds_run"].setdefault(env_id, []).append(seed)
        segment["elapsed_s"] = round(time.perf_counter() - t0, 1)
        if args.json_out:  # partial results (after every task) survive an interrupted long run
            emit(result, args.json_out)

    if args.jobs == 1:
        for t in tasks:
            record(*_task(t))
    else:
        import multiprocessing as mp

        with mp.get_context("spawn").Pool(args.jobs, maxtasksperchild=1) as pool:
            for env_id, seed, out in pool.imap_unordered(_task, tasks):
                record(env_id, seed, out)
    emit(result, args.json_out)


if __name__ == "__main__":
    main()
