"""Our PPO vs Stable-Baselines3 PPO on CartPole-v1, side by side in one process.

1. Throughput (env steps/s, training included): a fixed number of steps each, 1 torch thread.
   SB3 uses RL-Zoo's CartPole-v1 hyperparameters.
2. Wall time to solve: evaluate every 10,000 env steps (10 deterministic episodes, the same eval
   seeds and code for both); solved = first eval mean >= 475; evaluation time excluded;
   median over seeds. Training continues to the budget to measure stability: the fraction of
   evaluations after the first solve that stay >= 475.

Usage: PYTHONPATH=sdk:agents .venv/bin/python bench/bench_agents.py [--seeds 5] [--json-out F]
Default run: ~3-5 minutes on 2 cores.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any

import numpy as np

sys.path.insert(0, os.path.dirname(__file__))
from common import emit, machine, median

EVAL_EVERY = 10_000
EVAL_EPISODES = 10
SOLVED = 475.0

# RL-Zoo (rl-baselines3-zoo hyperparams/ppo.yml), CartPole-v1
ZOO_CARTPOLE = {"n_envs": 8, "n_timesteps": 100_000, "n_steps": 32, "batch_size": 256, "gae_lambda": 0.8,
                "gamma": 0.98, "n_epochs": 20, "ent_coef": 0.0, "learning_rate": "lin_0.001",
                "clip_range": "lin_0.2"}


def _sb3_model(seed: int) -> Any:
    from stable_baselines3 import PPO
    from stable_baselines3.common.env_util import make_vec_env

    z = ZOO_CARTPOLE
    env = make_vec_env("CartPole-v1", n_envs=z["n_envs"], seed=seed)
    return PPO("MlpPolicy", env, n_steps=z["n_steps"], batch_size=z["batch_size"], gae_lambda=z["gae_lambda"],
               gamma=z["gamma"], n_epochs=z["n_epochs"], ent_coef=z["ent_coef"],
               learning_rate=lambda f: f * 1e-3, clip_range=lambda f: f * 0.2, seed=seed, device="cpu", verbose=0)


def sb3_throughput(steps: int) -> float:
    model = _sb3_model(0)
    t0 = time.perf_counter()
    model.learn(total_timesteps=steps)
    return model.num_timesteps / (time.perf_counter() - t0)


def ours_throughput(steps: int) -> float:
    from rlfleet_agents.trainer import make_algorithm, train

    algo = make_algorithm("ppo", "CartPole-v1", None, 0, {}, steps)
    res = train(algo, total_steps=steps)
    algo.close()
    return res.global_step / res.wall_time_s


def sb3_solve(seed: int, budget: int) -> dict[str, Any]:
    from stable_baselines3.common.callbacks import BaseCallback

    from rlfleet_agents.evaluate import evaluate

    model = _sb3_model(seed)
    evals: list[dict[str, Any]] = []
    state = {"eval_time": 0.0, "start": 0.0, "next": EVAL_EVERY}

    class EvalCb(BaseCallback):
        def _on_training_start(self) -> None:
            state["start"] = time.perf_counter()

        def _on_step(self) -> bool:
            if self.num_timesteps >= state["next"]:
                state["next"] += EVAL_EVERY
                t0 = time.perf_counter()
                ev = evaluate(lambda o: self.model.predict(o, deterministic=True)[0], "CartPole-v1",
                              EVAL_EPISODES, seed=seed + 7 * len(evals))
                state["eval_time"] += time.perf_counter() - t0
                evals.append({"step": self.num_timesteps, "mean": ev["mean"],
                              "time": t0 - state["start"] - (state["eval_time"] - (time.perf_counter() - t0))})
            return True

    model.learn(total_timesteps=budget, callback=EvalCb())
    return _solve_summary(evals)


def ours_solve(seed: int, budget: int) -> dict[str, Any]:
    from rlfleet_agents.trainer import make_algorithm, train

    algo = make_algorithm("ppo", "CartPole-v1", None, seed,
                          {"eval_every": EVAL_EVERY, "eval_episodes": EVAL_EPISODES}, budget)
    res = train(algo, total_steps=budget)
    algo.close()
    out = _solve_summary(res.evals)
    out["exported_policy_eval"] = res.best_eval["mean"] if res.best_eval else None
    return out


def _solve_summary(evals: list[dict[str, Any]]) -> dict[str, Any]:
    first = next((i for i, e in enumerate(evals) if e["mean"] >= SOLVED), None)
    after = evals[first + 1 :] if first is not None else []
    return {
        "solved_step": evals[first]["step"] if first is not None else None,
        "solved_time_s": round(evals[first]["time"], 3) if first is not None else None,
        "stability_after_solve": (sum(e["mean"] >= SOLVED for e in after) / len(after)) if after else None,
        "evals_after_solve": len(after),
        "evals": [(e["step"], round(e["mean"], 1)) for e in evals],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--ours-budget", type=int, default=100_000, help="env steps per seed (ours)")
    ap.add_argument("--sb3-budget", type=int, default=ZOO_CARTPOLE["n_timesteps"], help="env steps per seed (SB3)")
    ap.add_argument("--throughput-steps", type=int, default=30_000)
    ap.add_argument("--json-out")
    ap.add_argument("--ours-override", default="{}", metavar="JSON",
                    help="PPO config keys that replace our CartPole-v1 defaults for this run, e.g. "
                         "'{\"num_envs\": 16, \"num_steps\": 32}' (to measure a candidate side by side)")
    args = ap.parse_args()
    override = json.loads(args.ours_override)
    if override:
        from rlfleet_agents.configs import PPO_ENV_DEFAULTS

        PPO_ENV_DEFAULTS["CartPole-v1"].update(override)

    import torch

    torch.set_num_threads(1)
    result: dict[str, Any] = {"machine": machine(), "protocol": {
        "eval_every": EVAL_EVERY, "eval_episodes": EVAL_EPISODES, "solved": SOLVED, "seeds": args.seeds,
        "ours_budget": args.ours_budget, "sb3_budget": args.sb3_budget, "sb3_hyperparameters": ZOO_CARTPOLE,
        "ours_override": override}}

    sb3_sps = sb3_throughput(args.throughput_steps)
    ours_sps = ours_throughput(max(args.throughput_steps, 100_000))
    result["throughput"] = {"ours_steps_per_s": round(ours_sps), "sb3_steps_per_s": round(sb3_sps),
                            "ratio": round(ours_sps / sb3_sps, 1)}
    print(f"throughput: ours {ours_sps:,.0f} steps/s, SB3 {sb3_sps:,.0f} steps/s", file=sys.stderr)

    runs: dict[str, list[dict[str, Any]]] = {"ours": [], "sb3": []}
    for seed in range(args.seeds):
        runs["ours"].append(ours_solve(seed, args.ours_budget))
        runs["sb3"].append(sb3_solve(seed, args.sb3_budget))
        print(f"seed {seed}: ours {runs['ours'][-1]['solved_time_s']} s, SB3 {runs['sb3'][-1]['solved_time_s']} s",
              file=sys.stderr)

    def agg(rs: list[dict[str, Any]]) -> dict[str, Any]:
        times = [r["solved_time_s"] if r["solved_time_s"] is not None else float("inf") for r in rs]
        steps = [r["solved_step"] if r["solved_step"] is not None else float("inf") for r in rs]
        stab = [r["stability_after_solve"] for r in rs if r["stability_after_solve"] is not None]
        return {"median_time_to_solve_s": median(times), "median_steps_to_solve": median(steps),
                "solved_seeds": sum(r["solved_step"] is not None for r in rs),
                "mean_stability_after_solve": float(np.mean(stab)) if stab else None, "per_seed": rs}

    result["solve"] = {"ours": agg(runs["ours"]), "sb3": agg(runs["sb3"])}
    o, s = result["solve"]["ours"]["median_time_to_solve_s"], result["solve"]["sb3"]["median_time_to_solve_s"]
    result["solve"]["time_ratio_ours_over_sb3"] = round(o / s, 3) if np.isfinite(o) and np.isfinite(s) else None
    emit(result, args.json_out)


if __name__ == "__main__":
    main()
