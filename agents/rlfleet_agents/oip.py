"""The Open Inference Protocol (KServe v2 / Triton HTTP/REST) over the deploy run's ONNX session.

Routing and auth live in rlfleet_agents.serve; this module only turns protocol requests into
session runs and back: model metadata read from the ONNX graph, tensor validation (each error names
the field, e.g. ``inputs[0] ('obs').shape``), JSON tensor data and the binary tensor data extension
(``Inference-Header-Content-Length``) in both directions.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any

import numpy as np

# ONNX element types -> protocol datatypes -> little-endian numpy dtypes.
_ONNX_TO_V2 = {
    "tensor(float)": "FP32", "tensor(double)": "FP64", "tensor(float16)": "FP16",
    "tensor(int64)": "INT64", "tensor(int32)": "INT32", "tensor(int16)": "INT16", "tensor(int8)": "INT8",
    "tensor(uint64)": "UINT64", "tensor(uint32)": "UINT32", "tensor(uint16)": "UINT16", "tensor(uint8)": "UINT8",
    "tensor(bool)": "BOOL",
}
_NUMPY = {
    "FP32": "<f4", "FP64": "<f8", "FP16": "<f2", "INT64": "<i8", "INT32": "<i4", "INT16": "<i2", "INT8": "i1",
    "UINT64": "<u8", "UINT32": "<u4", "UINT16": "<u2", "UINT8": "u1", "BOOL": "?",
}


class V2Error(ValueError):
    """A request the protocol refuses: ``status`` and a one-line message naming the field."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class TensorSpec:
    name: str
    datatype: str
    shape: list[int]  # -1: any size (the batch axis)

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "datatype": self.datatype, "shape": self.shape}


def _spec(node: Any) -> TensorSpec:
    dt = _ONNX_TO_V2.get(node.type)
    if dt is None:
        raise ValueError(f"policy.onnx tensor {node.name!r} has type {node.type}, which this server cannot serve")
    return TensorSpec(node.name, dt, [d if isinstance(d, int) and d >= 0 else -1 for d in node.shape])


@dataclass
class Reply:
    body: bytes
    header_length: int | None  # set when binary tensor data follows the JSON header


class OipModel:
    """One ONNX session spoken to through the protocol under the deployment's name."""

    def __init__(self, session: Any, name: str, max_batch: int = 4096) -> None:
        self.session = session
        self.name = name
        self.max_batch = max_batch
        self.inputs = [_spec(n) for n in session.get_inputs()]
        self.outputs = [_spec(n) for n in session.get_outputs()]
        self._in = {t.name: t for t in self.inputs}
        self._out = {t.name: t for t in self.outputs}

    def metadata(self) -> dict[str, Any]:
        return {"name": self.name, "versions": [], "platform": "onnxruntime_onnx",
                "inputs": [t.to_json() for t in self.inputs], "outputs": [t.to_json() for t in self.outputs]}

    def infer(self, body: bytes, header_length: int | None) -> Reply:
        req, tail = _split(body, header_length)
        feeds, used = self._feeds(req, tail)
        if used != len(tail):
            raise V2Error(400, f"the body has {len(tail) - used} bytes after the binary input data the "
                               "inputs declare (parameters.binary_data_size)")
        wanted = self._wanted(req)
        arrays = self.session.run([n for n, _ in wanted], feeds)
        outputs, chunks = [], []
        for (name, binary), arr in zip(wanted, arrays, strict=True):
            arr = np.ascontiguousarray(arr, dtype=_NUMPY[self._out[name].datatype])
            out: dict[str, Any] = {"name": name, "datatype": self._out[name].datatype, "shape": list(arr.shape)}
            if binary:
                raw = arr.tobytes()
                out["parameters"] = {"binary_data_size": len(raw)}
                chunks.append(raw)
            else:
                out["data"] = arr.ravel().tolist()
            outputs.append(out)
        resp: dict[str, Any] = {"model_name": self.name, "outputs": outputs}
        if "id" in req:
            resp["id"] = req["id"]
        head = json.dumps(resp, separators=(",", ":")).encode()
        if not chunks:
            return Reply(head, None)
        return Reply(b"".join([head, *chunks]), len(head))

    def _feeds(self, req: dict[str, Any], tail: bytes) -> tuple[dict[str, np.ndarray], int]:
        inputs = req.get("inputs")
        if not isinstance(inputs, list) or not inputs:
            raise V2Error(400, "'inputs' must be a non-empty list of {name, shape, datatype, data} tensors")
        feeds: dict[str, np.ndarray] = {}
        offset = 0
        for i, t in enumerate(inputs):
            if not isinstance(t, dict):
                raise V2Error(400, f"inputs[{i}] must be an object {{name, shape, datatype, data}}")
            name = t.get("name")
            spec = self._in.get(name) if isinstance(name, str) else None
            if spec is None:
                raise V2Error(400, f"inputs[{i}].name {name!r} is not an input of model {self.name!r}; "
                                   f"its inputs are {sorted(self._in)}")
            if name in feeds:
                raise V2Error(400, f"inputs[{i}].name {name!r} is given twice")
            where = f"inputs[{i}] ({name!r})"
            arr, size = _tensor(t, spec, where, tail, offset, self.max_batch)
            offset += size
            feeds[spec.name] = arr
        missing = [n for n in self._in if n not in feeds]
        if missing:
            raise V2Error(400, f"'inputs' lacks {missing[0]!r}; model {self.name!r} needs {sorted(self._in)}")
        return feeds, offset

    def _wanted(self, req: dict[str, Any]) -> list[tuple[str, bool]]:
        params = req.get("parameters") or {}
        if not isinstance(params, dict):
            raise V2Error(400, "'parameters' must be an object")
        default_binary = params.get("binary_data_output", False) is True
        requested = req.get("outputs")
        if requested is None:
            return [(t.name, default_binary) for t in self.outputs]
        if not isinstance(requested, list) or not requested:
            raise V2Error(400, "'outputs' must be a non-empty list of {name} objects, or absent for all outputs")
        wanted: list[tuple[str, bool]] = []
        for i, o in enumerate(requested):
            name = o.get("name") if isinstance(o, dict) else None
            if name not in self._out:
                raise V2Error(400, f"outputs[{i}].name {name!r} is not an output of model {self.name!r}; "
                                   f"its outputs are {sorted(self._out)}")
            if any(n == name for n, _ in wanted):
                raise V2Error(400, f"outputs[{i}].name {name!r} is requested twice")
            op = o.get("parameters") or {}
            if not isinstance(op, dict):
                raise V2Error(400, f"outputs[{i}].parameters must be an object")
            if op.get("classification"):
                raise V2Error(400, f"outputs[{i}].parameters.classification: the classification extension is "
                                   "not supported; request the raw output")
            wanted.append((name, op.get("binary_data", default_binary) is True))
        return wanted


def _split(body: bytes, header_length: int | None) -> tuple[dict[str, Any], bytes]:
    if header_length is None:
        head, tail = body, b""
    elif not 0 < header_length <= len(body):
        raise V2Error(400, f"Inference-Header-Content-Length {header_length} does not fit the body of "
                           f"{len(body)} bytes")
    else:
        head, tail = body[:header_length], body[header_length:]
    try:
        req = json.loads(head)
    except (ValueError, UnicodeDecodeError, RecursionError):
        raise V2Error(400, "the inference request is not valid JSON; send {\"inputs\": [{\"name\", \"shape\", "
                           "\"datatype\", \"data\"}]}") from None
    if not isinstance(req, dict):
        raise V2Error(400, "the inference request must be a JSON object with an 'inputs' list")
    if "id" in req and not isinstance(req["id"], str):
        raise V2Error(400, "'id' must be a string")
    return req, tail


def _tensor(t: dict[str, Any], spec: TensorSpec, where: str, tail: bytes, offset: int,
            max_batch: int) -> tuple[np.ndarray, int]:
    """One input tensor, checked against the graph: (array, binary bytes it consumed)."""
    dt = t.get("datatype")
    if dt != spec.datatype:
        raise V2Error(400, f"{where}.datatype {dt!r} does not match the model's {spec.datatype}")
    shape = t.get("shape")
    if (not isinstance(shape, list) or len(shape) != len(spec.shape)
            or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape)
            or any(m != -1 and d != m for d, m in zip(shape, spec.shape, strict=True))):
        raise V2Error(400, f"{where}.shape {shape!r} does not match the model's {spec.shape} (-1: any size)")
    if spec.shape and spec.shape[0] == -1 and not 1 <= shape[0] <= max_batch:
        raise V2Error(400, f"{where}.shape: a batch of {shape[0]} is outside 1..{max_batch}")
    count = math.prod(shape)
    dtype = np.dtype(_NUMPY[spec.datatype])
    params = t.get("parameters") or {}
    if not isinstance(params, dict):
        raise V2Error(400, f"{where}.parameters must be an object")
    size = params.get("binary_data_size")
    if size is not None:
        if "data" in t:
            raise V2Error(400, f"{where} has both 'data' and parameters.binary_data_size; send one")
        if not isinstance(size, int) or size != count * dtype.itemsize:
            raise V2Error(400, f"{where}.parameters.binary_data_size {size!r} does not match shape {shape} of "
                               f"{spec.datatype} ({count * dtype.itemsize} bytes)")
        if offset + size > len(tail):
            raise V2Error(400, f"{where}.parameters.binary_data_size {size}: the body holds only "
                               f"{len(tail) - offset} more bytes")
        arr = np.frombuffer(tail, dtype=dtype, count=count, offset=offset).reshape(shape)
    else:
        if "data" not in t:
            raise V2Error(400, f"{where}.data is missing (or send parameters.binary_data_size with binary data)")
        if not isinstance(t["data"], list):
            raise V2Error(400, f"{where}.data must be a list of {spec.datatype} numbers in row-major order")
        try:
            with np.errstate(over="ignore", invalid="ignore"):  # out-of-range values: refused below / as NaN
                arr = np.asarray(t["data"], dtype=dtype)
        except (ValueError, TypeError, OverflowError):
            raise V2Error(400, f"{where}.data must be {spec.datatype} numbers in row-major order") from None
        if arr.size != count:
            raise V2Error(400, f"{where}.data has {arr.size} values; shape {shape} needs {count}")
        arr = arr.reshape(shape)
        size = 0
    if dtype.kind == "f" and not np.all(np.isfinite(arr)):
        bad = int(np.argwhere(~np.isfinite(arr.ravel()))[0][0])
        raise V2Error(400, f"{where}.data has a NaN or infinite value at flat index {bad}")
    return arr, size
