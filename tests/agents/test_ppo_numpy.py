"""The numpy PPO update (CPU learners) against the torch autograd update it replaces, from the same
weights, Adam state, batch and minibatch order (real envs, a few real iterations first)."""

from __future__ import annotations

import copy
from typing import Any

import numpy as np
import pytest
import torch

from rlfleet_agents.trainer import make_algorithm

# rollout and minibatch sizes spelled out, so the cases do not move with the tuned CartPole defaults
_SMALL = {"num_envs": 8, "num_steps": 32, "update_epochs": 4, "num_minibatches": 4}
CASES = {
    "discrete": ("CartPole-v1", _SMALL),
    "discrete-entropy-vclip-obsnorm": ("CartPole-v1", {**_SMALL, "ent_coef": 0.01, "clip_vloss": True,
                                                       "normalize_obs": True, "num_minibatches": 3}),
    "discrete-target-kl": ("CartPole-v1", {**_SMALL, "learning_rate": 0.02, "target_kl": 0.01}),
    "box-entropy-vclip": ("Pendulum-v1", {**_SMALL, "num_envs": 4, "num_steps": 64, "ent_coef": 0.01,
                                          "clip_vloss": True}),
}


def _both_updates(env: str, over: dict[str, Any], warmup: int) -> tuple[dict[str, Any], dict[str, Any]]:
    algo = make_algorithm("ppo", env, None, 0, over, 50_000)
    try:
        for _ in range(warmup):
            algo.train_iteration()
        batch = algo.collect_rollout()
        adv, ret = algo.compute_advantages(batch)
        model0, opt0 = copy.deepcopy(algo.model.state_dict()), copy.deepcopy(algo.optimizer.state_dict())
        rng0 = torch.get_rng_state()
        out = {}
        for name, update in (("torch", algo.update_torch), ("numpy", algo.update)):
            algo.model.load_state_dict(model0)
            algo.optimizer.load_state_dict(copy.deepcopy(opt0))  # load_state_dict aliases the tensors
            torch.set_rng_state(rng0)
            stats = update(batch, adv, ret)
            params = list(algo.model.parameters())
            out[name] = {"stats": stats, "params": [p.detach().clone() for p in params],
                         "state": [{k: v.clone() for k, v in algo.optimizer.state[p].items()} for p in params],
                         "start": [model0[k] for k, _ in algo.model.named_parameters()]}
        return out["torch"], out["numpy"]
    finally:
        algo.close()


@pytest.mark.parametrize("case", list(CASES))
def test_numpy_update_matches_the_torch_update(case: str) -> None:
    env, over = CASES[case]
    ref, ours = _both_updates(env, over, warmup=2)
    assert ours["stats"]["updates"] == ref["stats"]["updates"]
    if "target_kl" in over:  # the early stop fires at the same minibatch
        assert ref["stats"]["updates"] < over["update_epochs"] * over["num_minibatches"]
    for k in ("loss_policy", "loss_value", "entropy", "approx_kl", "clip_fraction"):
        assert ours["stats"][k] == pytest.approx(ref["stats"][k], rel=1e-4, abs=1e-6), k
    moved = max(float((p - s).abs().max()) for p, s in zip(ref["params"], ref["start"], strict=True))
    assert moved > 1e-3  # the update did change the weights, so agreeing below means something
    for p_ref, p_ours, s_ref, s_ours in zip(ref["params"], ours["params"], ref["state"], ours["state"], strict=True):
        np.testing.assert_allclose(p_ours.numpy(), p_ref.numpy(), atol=2e-6, rtol=1e-4)
        assert float(s_ours["step"]) == float(s_ref["step"])
        np.testing.assert_allclose(s_ours["exp_avg"].numpy(), s_ref["exp_avg"].numpy(), atol=1e-7, rtol=1e-3)
        np.testing.assert_allclose(s_ours["exp_avg_sq"].numpy(), s_ref["exp_avg_sq"].numpy(), atol=1e-9, rtol=1e-3)


def test_numpy_update_from_a_fresh_optimizer_leaves_torchs_adam_state() -> None:
    """The first update creates the Adam state in torch's own layout: a checkpoint of it loads
    into a torch Adam, and the torch update can carry on from it (a run resumed on a GPU)."""
    ref, ours = _both_updates("CartPole-v1", _SMALL, warmup=0)
    for p_ref, p_ours, s_ref, s_ours in zip(ref["params"], ours["params"], ref["state"], ours["state"], strict=True):
        np.testing.assert_allclose(p_ours.numpy(), p_ref.numpy(), atol=2e-6, rtol=1e-4)
        assert s_ours.keys() == s_ref.keys()
        assert all(s_ours[k].dtype == s_ref[k].dtype and s_ours[k].shape == s_ref[k].shape for k in s_ref)
    algo = make_algorithm("ppo", "CartPole-v1", None, 1, _SMALL, 50_000)
    try:
        algo.train_iteration()  # numpy update on CPU
        saved = copy.deepcopy(algo.optimizer.state_dict())
        algo.optimizer.load_state_dict(saved)
        batch = algo.collect_rollout()
        stats = algo.update_torch(batch, *algo.compute_advantages(batch))
        assert np.isfinite(stats["loss_value"]) and stats["updates"] == 16
        assert float(algo.optimizer.state_dict()["state"][0]["step"]) == 32
    finally:
        algo.close()
