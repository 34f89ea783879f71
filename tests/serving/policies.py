"""Hand-built ONNX policies and stored runs for the serving tests.

``failing_onnx``: a real ONNX graph with the CartPole policy's interface (``obs`` [batch, 4] ->
``action`` int64 [batch]) and rlfleet metadata that ONNX Runtime cannot run for a batch of one
(a Reshape to rows of 3 values): its server answers 500, the canary that breaks the error SLO.
``other_space_onnx``: a policy for 3 observations (another env): a canary the registry must refuse.
Runs are written through the real artifact API with a manifest (the commit point) and a parity
record, like a train run's.
"""

from __future__ import annotations

import json
from typing import Any

from rlfleet.artifacts import ArtifactStore

CARTPOLE = {"obs_shape": [4], "action_kind": "discrete", "n_actions": 2}


def _onnx(obs_dim: int, spaces: dict[str, Any], env: str, failing: bool) -> bytes:
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    nodes, inits = [], []
    if failing:
        inits.append(numpy_helper.from_array(np.array([-1, 3], dtype=np.int64), "rows3"))
        nodes.append(helper.make_node("Reshape", ["obs", "rows3"], ["r"]))
        nodes.append(helper.make_node("ArgMax", ["r"], ["action"], axis=1, keepdims=0))
    else:  # the larger of the first n_actions features
        n = int(spaces.get("n_actions", CARTPOLE["n_actions"]))
        inits += [numpy_helper.from_array(np.array([v], dtype=np.int64), k) for k, v in
                  (("start", 0), ("end", n), ("axis", 1))]
        nodes.append(helper.make_node("Slice", ["obs", "start", "end", "axis"], ["first"]))
        nodes.append(helper.make_node("ArgMax", ["first"], ["action"], axis=1, keepdims=0))
    graph = helper.make_graph(
        nodes, "policy",
        [helper.make_tensor_value_info("obs", TensorProto.FLOAT, ["batch", obs_dim])],
        [helper.make_tensor_value_info("action", TensorProto.INT64, ["batch"])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    full = {**CARTPOLE, **spaces}
    entry = model.metadata_props.add()
    entry.key = "rlfleet"
    entry.value = json.dumps({"spaces": {**full, "obs_low": None, "obs_high": None, "action_low": None,
                                          "action_high": None}, "env": env})
    onnx.checker.check_model(model)
    return model.SerializeToString()


def failing_onnx() -> bytes:
    return _onnx(4, {}, "CartPole-v1", failing=True)


def argmax_onnx() -> bytes:
    """A CartPole-shaped policy that picks the index of the larger of the first two features (not trained)."""
    return _onnx(4, {}, "CartPole-v1", failing=False)


def other_space_onnx() -> bytes:
    return _onnx(3, {"obs_shape": [3], "n_actions": 3}, "Other-v0", failing=False)


def write_policy_run(store: ArtifactStore, run_id: str, onnx_bytes: bytes, *, parity: bool = True,
                     env: str = "CartPole-v1") -> str:
    """A committed train run holding ``onnx_bytes`` as its policy.onnx."""
    import hashlib

    arts = store.run(run_id)
    arts.write_text("spec.json", json.dumps({"kind": "train", "agent": "ppo", "env": env, "seed": 0}))
    arts.write_bytes("policy.onnx", onnx_bytes)
    arts.commit(extra={"kind": "train", "agent": "ppo", "env": env,
                       "policy_sha256": hashlib.sha256(onnx_bytes).hexdigest(),
                       "parity": {"max_abs_diff": 0.0, "actions_agree": 1.0} if parity else None})
    return run_id
