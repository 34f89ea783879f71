"""Learning tests with fixed seeds and step budgets (in-process, real Gymnasium envs)."""

from __future__ import annotations

import numpy as np

from rlfleet_agents.evaluate import evaluate
from rlfleet_agents.networks import torch_act_fn
from rlfleet_agents.trainer import make_algorithm, train


def _random_baseline(env_id: str, episodes: int = 10) -> float:
    import gymnasium as gym

    space = gym.make(env_id).action_space
    space.seed(0)
    return evaluate(lambda obs: np.stack([space.sample() for _ in range(len(obs))]), env_id, episodes,
                    seed=0)["mean"]


def test_ppo_solves_cartpole_within_budget() -> None:
    algo = make_algorithm("ppo", "CartPole-v1", None, seed=0,
                          overrides={"eval_every": 10_000, "stop_at_return": 475}, budget_steps=100_000)
    res = train(algo, total_steps=algo.total_steps)
    algo.close()
    assert res.stopped_by == "solved", res.evals
    assert res.solved_step is not None and res.solved_step <= 100_000
    # the reported policy is the solved one: re-evaluate it on other seeds
    again = evaluate(torch_act_fn(res.policy, algo.device), "CartPole-v1", 10, seed=123)
    assert again["mean"] >= 475, again


def test_ppo_continuous_pendulum_beats_random() -> None:
    random_mean = _random_baseline("Pendulum-v1")
    algo = make_algorithm("ppo", "Pendulum-v1", None, seed=0, overrides={"eval_every": 0}, budget_steps=45_000)
    assert algo.info.action_kind == "box"
    res = train(algo, total_steps=algo.total_steps)
    algo.close()
    learned = evaluate(torch_act_fn(res.policy, algo.device), "Pendulum-v1", 10, seed=5)["mean"]
    assert random_mean < -1000, random_mean
    assert learned > random_mean + 350, (learned, random_mean)


def test_dqn_learns_cartpole() -> None:
    random_mean = _random_baseline("CartPole-v1")
    algo = make_algorithm("dqn", "CartPole-v1", None, seed=0, overrides={"eval_every": 5_000},
                          budget_steps=25_000)
    res = train(algo, total_steps=algo.total_steps)
    algo.close()
    assert res.best_eval is not None
    assert random_mean < 30
    assert res.best_eval["mean"] >= 150, res.evals


def test_seeding_is_reproducible() -> None:
    rows = []
    for _ in range(2):
        algo = make_algorithm("ppo", "CartPole-v1", None, seed=3, overrides={}, budget_steps=3_000)
        out: list[dict] = []
        train(algo, total_steps=3_000, on_row=out.append)
        algo.close()
        rows.append([(r["step"], r.get("episode_return_mean"), r["losses"]["loss_value"]) for r in out])
    assert rows[0] == rows[1]


def test_checkpoint_every_iteration_is_a_train_parameter() -> None:
    """The test hook is an argument of train(), not an environment variable: with it every
    iteration checkpoints; without it the config's step/minute triggers (both off here) decide."""
    calls = {True: 0, False: 0}
    rows = {True: 0, False: 0}
    for every in (True, False):
        algo = make_algorithm("ppo", "CartPole-v1", None, seed=1, budget_steps=2_048,
                              overrides={"num_envs": 4, "num_steps": 64, "checkpoint_every_steps": 0,
                                         "checkpoint_every_minutes": 0})

        def on_checkpoint(_: object, every: bool = every) -> None:
            calls[every] += 1

        def on_row(_: dict, every: bool = every) -> None:
            rows[every] += 1

        train(algo, total_steps=2_048, on_row=on_row, on_checkpoint=on_checkpoint, checkpoint_every_iteration=every)
        algo.close()
    assert rows[True] == rows[False] >= 2_048 // 256
    assert calls == {True: rows[True], False: 0}
