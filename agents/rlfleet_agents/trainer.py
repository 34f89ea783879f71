"""The training loop around an algorithm: budget, in-training evaluation with best-policy
tracking, metrics rows and checkpoint triggers. Used by run.py and by the benchmarks.

An algorithm is anything that meets :class:`rlfleet_agents.registry.Algorithm`; which class an
agent uses is written in the registry only.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from rlfleet_agents.evaluate import evaluate
from rlfleet_agents.networks import DeterministicPolicy, torch_act_fn
from rlfleet_agents.registry import Algorithm, build_config, get_agent


def pick_device(requested: str, gpus: float) -> torch.device:
    if requested == "cpu":
        return torch.device("cpu")
    if requested == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("config.device: 'cuda' was requested but no CUDA device is visible to this run")
        return torch.device("cuda")
    return torch.device("cuda" if torch.cuda.is_available() and gpus > 0 else "cpu")


def make_algorithm(agent: str, env_id: str, env_kwargs: dict[str, Any] | None, seed: int,
                   overrides: dict[str, Any] | None, budget_steps: int | None, gpus: float = 0.0) -> Algorithm:
    algorithm_class = get_agent(agent).load_algorithm()  # ValueError for an agent that does not learn
    cfg = build_config(agent, env_id, overrides)
    torch.set_num_threads(max(1, cfg.torch_threads))
    total = int(budget_steps or cfg.total_steps)
    return algorithm_class(cfg, env_id, env_kwargs, seed, total, pick_device(cfg.device, gpus))


@dataclass
class TrainResult:
    global_step: int
    wall_time_s: float
    eval_time_s: float
    evals: list[dict[str, Any]] = field(default_factory=list)
    best_eval: dict[str, Any] | None = None
    best_step: int | None = None
    solved_step: int | None = None
    solved_time_s: float | None = None
    stopped_by: str = "steps"
    policy: DeterministicPolicy | None = None


def train(
    algo: Algorithm,
    *,
    total_steps: int,
    minutes: float | None = None,
    env_kwargs: dict[str, Any] | None = None,
    on_row: Callable[[dict[str, Any]], None] | None = None,
    on_checkpoint: Callable[[Any], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
    checkpoint_every_iteration: bool = False,
) -> TrainResult:
    """Train ``algo`` until ``total_steps``, ``minutes``, a confirmed ``stop_at_return`` or
    ``should_stop()``. ``checkpoint_every_iteration`` (tests) calls ``on_checkpoint`` after every
    iteration regardless of the config's step/minute triggers."""
    cfg = algo.cfg
    start = time.monotonic()
    eval_time = 0.0
    last_ckpt_step, last_ckpt_time = algo.global_step, start
    next_eval = (algo.global_step // cfg.eval_every + 1) * cfg.eval_every if cfg.eval_every else None
    res = TrainResult(global_step=algo.global_step, wall_time_s=0.0, eval_time_s=0.0)
    best_model: Any = None
    window_returns: list[float] = []
    window_lengths: list[int] = []
    t_last, s_last = time.monotonic(), algo.global_step
    while algo.global_step < total_steps:
        stats = algo.train_iteration()
        rets, lens = algo.tracker.pop()
        window_returns = (window_returns + rets)[-100:]
        window_lengths = (window_lengths + lens)[-100:]
        now = time.monotonic()
        sps = (algo.global_step - s_last) / max(now - t_last, 1e-9)
        t_last, s_last = now, algo.global_step
        row: dict[str, Any] = {"step": algo.global_step, "time": round(now - start - eval_time, 4),
                               "steps_per_second": round(sps, 1), "episodes": len(rets)}
        if window_returns:
            recent = rets or window_returns
            row.update(episode_return_mean=float(np.mean(window_returns)),
                       episode_return_min=float(np.min(recent)), episode_return_max=float(np.max(recent)),
                       episode_length_mean=float(np.mean(window_lengths)))
        row["losses"] = {k: round(float(v), 6) for k, v in stats.items() if k != "learning_rate"}
        if "learning_rate" in stats:
            row["learning_rate"] = stats["learning_rate"]
        if next_eval is not None and algo.global_step >= next_eval:
            while next_eval <= algo.global_step:
                next_eval += cfg.eval_every
            t0 = time.monotonic()
            ev = evaluate(torch_act_fn(algo.policy(), algo.device), algo.env_id, cfg.eval_episodes,
                          seed=algo.seed + 7 * len(res.evals), env_kwargs=env_kwargs)
            eval_time += time.monotonic() - t0
            entry = {"step": algo.global_step, "mean": ev["mean"], "std": ev["std"],
                     "time": round(now - start - (eval_time - (time.monotonic() - t0)), 4)}
            res.evals.append(entry)
            row["eval_return_mean"] = ev["mean"]
            if res.best_eval is None or ev["mean"] >= res.best_eval["mean"]:
                res.best_eval, res.best_step = ev, algo.global_step
                best_model = copy.deepcopy(algo.model).cpu()
            if cfg.stop_at_return is not None and ev["mean"] >= cfg.stop_at_return and res.solved_step is None:
                # confirm on twice as many fresh episodes before stopping: the exported policy
                # must stay solved on seeds it was not selected on
                t1 = time.monotonic()
                conf = evaluate(torch_act_fn(algo.policy(), algo.device), algo.env_id, 2 * cfg.eval_episodes,
                                seed=algo.seed + 500_009 + 7 * len(res.evals), env_kwargs=env_kwargs)
                eval_time += time.monotonic() - t1
                entry["confirm_mean"] = conf["mean"]
                if conf["mean"] >= cfg.stop_at_return:
                    res.solved_step, res.solved_time_s = algo.global_step, entry["time"]
        if on_row is not None:
            on_row(row)
        if res.solved_step is not None:
            res.stopped_by = "solved"
            break
        elapsed = time.monotonic() - start
        if on_checkpoint is not None and (
            (cfg.checkpoint_every_steps and algo.global_step - last_ckpt_step >= cfg.checkpoint_every_steps)
            or (cfg.checkpoint_every_minutes and now - last_ckpt_time >= 60 * cfg.checkpoint_every_minutes)
            or checkpoint_every_iteration
        ):
            on_checkpoint(algo)
            last_ckpt_step, last_ckpt_time = algo.global_step, time.monotonic()
        if minutes is not None and elapsed >= 60 * minutes:
            res.stopped_by = "minutes"
            break
        if should_stop is not None and should_stop():
            res.stopped_by = "signal"
            break
    res.global_step = algo.global_step
    res.wall_time_s = time.monotonic() - start
    res.eval_time_s = eval_time
    if best_model is not None:
        res.policy = DeterministicPolicy(best_model, algo.info.action_kind)
    else:
        res.policy = DeterministicPolicy(copy.deepcopy(algo.model).cpu(), algo.info.action_kind)
    return res
