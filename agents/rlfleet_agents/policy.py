"""An exported policy loaded with ONNX Runtime (no torch import): used by eval and deploy runs."""

from __future__ import annotations

import hashlib
import json
import math
from typing import Any

import numpy as np

from rlfleet_agents.envs import SpaceInfo


class ObservationError(ValueError):
    """Observations that do not fit the policy's observation space."""


class OnnxPolicy:
    def __init__(self, onnx_bytes: bytes, *, threads: int = 1) -> None:
        import onnxruntime as ort

        so = ort.SessionOptions()
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
        so.log_severity_level = 3
        self.session = ort.InferenceSession(onnx_bytes, so, providers=["CPUExecutionProvider"])
        self.sha256 = hashlib.sha256(onnx_bytes).hexdigest()
        meta = self.session.get_modelmeta().custom_metadata_map.get("rlfleet")
        if not meta:
            raise ValueError("policy.onnx has no 'rlfleet' metadata: it was not exported by rlfleet_agents")
        self.meta: dict[str, Any] = json.loads(meta)
        self.info = SpaceInfo.from_dict(self.meta["spaces"])
        self._shape = tuple(self.info.obs_shape)

    def act(self, obs: np.ndarray) -> np.ndarray:
        return self.session.run(["action"], {"obs": np.asarray(obs, dtype=np.float32)})[0]

    def validate(self, observations: Any, *, max_batch: int = 4096) -> np.ndarray:
        """JSON observations -> float32 batch, or ObservationError naming the problem."""
        if not isinstance(observations, list) or not observations:
            raise ObservationError("'observations' must be a non-empty list of observations")
        if len(observations) > max_batch:
            raise ObservationError(f"batch of {len(observations)} observations is over the limit of {max_batch}")
        try:
            arr = np.asarray(observations, dtype=np.float64)
        except (ValueError, TypeError, OverflowError):  # OverflowError: an integer beyond float range
            raise ObservationError(
                f"observations must be numbers, each of shape {list(self._shape)} (ragged or non-numeric input)"
            ) from None
        if arr.dtype == object or arr.shape[1:] != self._shape:
            raise ObservationError(
                f"each observation must have shape {list(self._shape)}, got {list(arr.shape[1:])}"
            )
        if not np.all(np.isfinite(arr)):
            bad = np.argwhere(~np.isfinite(arr.reshape(arr.shape[0], -1)))[0]
            raise ObservationError(f"observation {int(bad[0])} has a NaN or infinite value at index {int(bad[1])}")
        return arr.astype(np.float32)

    def actions_to_json(self, actions: np.ndarray) -> list[Any]:
        if self.info.action_kind == "discrete":
            return [int(a) for a in actions.tolist()]
        return [[float(x) if math.isfinite(x) else 0.0 for x in row] for row in actions.tolist()]

    def check_env(self, obs_shape: list[int], action_kind: str, n_actions: int, env_id: str) -> None:
        if list(obs_shape) != list(self.info.obs_shape) or action_kind != self.info.action_kind or (
            n_actions != self.info.n_actions
        ):
            trained = self.meta.get("env", "another env")
            raise ValueError(
                f"env {env_id!r} does not match the policy (trained on {trained!r}: observation shape "
                f"{self.info.obs_shape}, {self.info.action_kind} actions x{self.info.n_actions}); "
                f"set env to {trained!r}"
            )
