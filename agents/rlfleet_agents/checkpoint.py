"""Checkpoints in the run's artifact dir: ``checkpoints/step_<n>.pt`` plus the pointer file
``checkpoints/latest.json`` ({"path", "step", "time"}), written after the checkpoint itself.

Checkpoints hold only tensors and plain values so they load with ``torch.load(weights_only=True)``
(no pickle code execution from the artifact store).
"""

from __future__ import annotations

import io
import json
import time
from typing import Any

import numpy as np
import torch

from rlfleet.artifacts import RunArtifacts
from rlfleet.errors import ArtifactError

POINTER = "checkpoints/latest.json"
KEEP = 2


def _to_safe(obj: Any) -> Any:
    if isinstance(obj, np.ndarray):
        return torch.from_numpy(np.ascontiguousarray(obj))
    if isinstance(obj, dict):
        return {k: _to_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_safe(v) for v in obj)
    if isinstance(obj, np.generic):
        return obj.item()
    return obj


def _from_safe(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor) and obj.dtype != torch.uint8:
        return obj
    if isinstance(obj, dict):
        return {k: _from_safe(v) for k, v in obj.items()}
    return obj


def save_checkpoint(arts: RunArtifacts, algo: Any, extra: dict[str, Any]) -> str:
    state = algo.state_dict()
    if "buffer" in state:
        state["buffer"] = {k: (torch.from_numpy(np.ascontiguousarray(v)) if isinstance(v, np.ndarray) else v)
                           for k, v in state["buffer"].items()}
    state = _to_safe(state)
    state["meta"] = _to_safe(extra)
    buf = io.BytesIO()
    torch.save(state, buf)
    rel = f"checkpoints/step_{algo.global_step:012d}.pt"
    arts.write_bytes(rel, buf.getvalue())
    arts.write_json(POINTER, {"path": rel, "step": algo.global_step, "time": time.time()})
    # keep the last KEEP checkpoints
    existing = sorted(f for f in arts.list_files(include_manifest=False)
                      if f.startswith("checkpoints/step_") and f.endswith(".pt"))
    for old in existing[:-KEEP]:
        if old != rel:
            arts.delete_file(old)
    return rel


def _read_pointer(arts: RunArtifacts) -> dict[str, Any] | None:
    if not arts.exists(POINTER):
        return None
    return json.loads(arts.read_bytes(POINTER, allow_incomplete=True))


def load_latest(arts: RunArtifacts) -> dict[str, Any]:
    """The latest checkpoint of a run (complete or not: resuming a killed run is the point)."""
    complete = arts.is_complete()
    ptr = _read_pointer(arts) if not complete else json.loads(arts.read_bytes(POINTER))
    if ptr is None:
        raise ArtifactError(
            f"run {arts.run_id} has no checkpoint to resume from ({arts.uri}/{POINTER} is missing): "
            "it stopped before its first checkpoint; start a new run instead"
        )
    data = arts.read_bytes(ptr["path"], allow_incomplete=not complete)
    state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    if "buffer" in state:
        state["buffer"] = {k: (v.numpy() if isinstance(v, torch.Tensor) else v) for k, v in state["buffer"].items()}
    return state
