"""ONNX export: pinned opset, checker, parity gate (discrete and continuous), dynamic batch."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch

from rlfleet_agents.envs import make_vec_env, vec_space_info
from rlfleet_agents.export import OPSET, ParityError, check_parity, export_onnx, sample_observations
from rlfleet_agents.networks import ActorCritic, DeterministicPolicy, QNetwork
from rlfleet_agents.policy import OnnxPolicy


def _info(env_id: str):
    envs = make_vec_env(env_id, 2)
    info = vec_space_info(envs, env_id)
    envs.close()
    return info


@pytest.mark.parametrize(("env_id", "net"), [("CartPole-v1", "ac"), ("CartPole-v1", "q"), ("Pendulum-v1", "ac")])
def test_parity_and_batch_axis(env_id: str, net: str) -> None:
    torch.manual_seed(0)
    info = _info(env_id)
    model = ActorCritic(info, [64, 64], normalize_obs=True) if net == "ac" else QNetwork(info, [64, 64], True)
    # give the normalizer non-trivial statistics so the exported graph must carry them
    model.norm.update(torch.randn(256, info.obs_dim) * 3 + 1)
    policy = DeterministicPolicy(model, info.action_kind)
    data = export_onnx(policy, info, {"env": env_id})
    m = onnx.load_from_string(data)
    assert m.opset_import[0].version == OPSET
    meta = json.loads({p.key: p.value for p in m.metadata_props}["rlfleet"])
    assert meta["spaces"]["action_kind"] == info.action_kind
    report = check_parity(policy, data, sample_observations(info, 512, seed=0))
    assert report["max_abs_diff"] <= 1e-5 and report["action_mismatches"] == 0
    ort_policy = OnnxPolicy(data)
    for batch in (1, 7, 256):
        obs = sample_observations(info, batch, seed=batch)
        acts = ort_policy.act(obs)
        with torch.no_grad():
            expect = policy(torch.as_tensor(obs))[0].numpy()
        assert acts.shape[0] == batch
        if info.action_kind == "discrete":
            assert np.array_equal(acts, expect)
            assert acts.dtype == np.int64
        else:
            assert np.all(acts <= 2.0) and np.all(acts >= -2.0)  # clipped to Pendulum's bounds
            np.testing.assert_allclose(acts, expect, atol=1e-5)


def test_parity_gate_fails_a_wrong_graph() -> None:
    torch.manual_seed(0)
    info = _info("CartPole-v1")
    policy = DeterministicPolicy(ActorCritic(info, [64, 64], False), "discrete")
    data = export_onnx(policy, info, {})
    with torch.no_grad():  # the torch policy changes after export: parity must catch it
        policy.model.actor[-1].weight.add_(0.5)
    with pytest.raises(ParityError, match="parity gate"):
        check_parity(policy, data, sample_observations(info, 256, seed=1))
