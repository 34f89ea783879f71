"""A deploy run serving the trained policy: same actions as a local ORT session, auth, validation."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest

from rlfleet.artifacts import open_run


def ort_session(path: Path):
    import onnxruntime as ort

    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])

TOKEN = "test-serve-token-0123456789"


@pytest.fixture(scope="module")
def endpoint(trained_root, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    """One deploy run (a real process) for the whole module."""
    proc = trained_root.start("dep", {"kind": "deploy", "source": "ppo-cp", "deploy": {"name": "cartpole"}},
                              source_uri=trained_root.src("ppo-cp"),
                              serve_token_sha256=hashlib.sha256(TOKEN.encode()).hexdigest())
    ep_file = trained_root.run_dir("dep") / "endpoint.json"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not (trained_root.run_dir("dep") / "manifest.json").exists():
        assert proc.poll() is None, proc.communicate()[1]
        time.sleep(0.05)
    ep = json.loads(ep_file.read_text())
    try:
        yield ep
    finally:
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=20)
        assert proc.returncode == 0, err
        assert "policy server stopped" in out


def test_endpoint_contract_and_same_actions_as_local_ort(trained_root, endpoint: dict) -> None:
    run = open_run(trained_root.uri, "dep")
    m = run.verify()  # manifest committed after endpoint.json
    assert "endpoint.json" in m.files
    assert endpoint["url"].startswith("http://127.0.0.1:") and endpoint["path"] == "/v1/policies/cartpole/act"
    assert endpoint["pid"] != os.getpid()
    onnx_path = trained_root.run_dir("ppo-cp") / "policy.onnx"
    assert endpoint["policy_sha256"] == trained_root.manifest("ppo-cp")["files"]["policy.onnx"]["sha256"]
    sess = ort_session(onnx_path)
    rng = np.random.default_rng(0)
    obs = rng.normal(0, 1, size=(300, 4)).astype(np.float32)
    expect = sess.run(["action"], {"obs": obs})[0].tolist()
    with httpx.Client(base_url=endpoint["url"], headers={"Authorization": f"Bearer {TOKEN}"}) as c:
        assert c.get("/healthz").json() == {"status": "ok"}
        got = c.post(endpoint["path"], json={"observations": obs.tolist()})
        assert got.status_code == 200, got.text
        assert got.json()["actions"] == expect
        singles = [c.post(endpoint["path"], json={"observations": [o]}).json()["actions"][0] for o in obs[:20].tolist()]
        assert singles == expect[:20]


def test_auth_refusal(endpoint: dict) -> None:
    body = {"observations": [[0.0, 0.0, 0.0, 0.0]]}
    with httpx.Client(base_url=endpoint["url"]) as c:
        r = c.post(endpoint["path"], json=body)
        assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
        r = c.post(endpoint["path"], json=body, headers={"Authorization": "Bearer wrong"})
        assert r.status_code == 403
        r = c.post(endpoint["path"], json=body, headers={"Authorization": TOKEN})  # no scheme
        assert r.status_code == 403
        assert "actions" not in r.text


@pytest.mark.parametrize(
    ("body", "needle"),
    [
        (b"not json", "not valid JSON"),
        (b'{"obs": [[0,0,0,0]]}', "'observations'"),
        (b'{"observations": []}', "non-empty list"),
        (b'{"observations": [[0,0,0]]}', "shape [4], got [3]"),
        (b'{"observations": [[0,0,0,0],[0,0,0]]}', "ragged"),
        (b'{"observations": [["a","b","c","d"]]}', "numbers"),
        (b'{"observations": [[0,0,NaN,0]]}', "NaN or infinite value at index 2"),
        (b'{"observations": [[0,0,0,1e999]]}', "NaN or infinite"),
    ],
)
def test_malformed_requests_get_422(endpoint: dict, body: bytes, needle: str) -> None:
    with httpx.Client(base_url=endpoint["url"], headers={"Authorization": f"Bearer {TOKEN}"}) as c:
        r = c.post(endpoint["path"], content=body)
        assert r.status_code == 422, r.text
        assert needle in r.json()["error"]
        assert c.get(endpoint["path"]).status_code == 405
        assert c.post("/v1/policies/other/act", content=body).status_code == 404
        assert c.post(endpoint["path"], content=b"[" * (5 * 1024 * 1024)).status_code == 413


def test_deploy_without_token_refuses_to_start(trained_root) -> None:
    out = trained_root.run("dep-notok", {"kind": "deploy", "source": "ppo-cp"},
                           source_uri=trained_root.src("ppo-cp"))
    assert out.returncode != 0 and "needs its deployment token" in out.stderr
    assert not (trained_root.run_dir("dep-notok") / "manifest.json").exists()


# ---------------------------------------------------------------------------------------------
# The Open Inference Protocol (KServe v2) beside /act, spoken to by tritonclient's HTTP client.

AUTH = {"Authorization": f"Bearer {TOKEN}"}


def triton(endpoint: dict):
    import tritonclient.http as th

    return th, th.InferenceServerClient(url=endpoint["url"].removeprefix("http://"), connection_timeout=10,
                                        network_timeout=30)


def triton_infer(th, client, name: str, obs: np.ndarray, *, binary_in: bool, binary_out: bool | None,
                 headers: dict | None = AUTH, datatype: str = "FP32"):
    inp = th.InferInput("obs", list(obs.shape), datatype)
    inp.set_data_from_numpy(obs, binary_data=binary_in)
    outputs = None if binary_out is None else [th.InferRequestedOutput(n, binary_data=binary_out)
                                                for n in ("action", "raw")]
    # a copy: tritonclient writes Inference-Header-Content-Length into the dict it is given
    return client.infer(name, [inp], outputs=outputs, headers=dict(headers) if headers else None)


def test_v2_tritonclient_round_trip_matches_act_and_ort(trained_root, endpoint: dict) -> None:
    """tritonclient unchanged: liveness, readiness, metadata from the ONNX graph, and a batch of
    CartPole observations whose actions equal /act's and a direct ORT session's (JSON and binary)."""
    th, client = triton(endpoint)
    name = endpoint["policy"]
    assert client.is_server_live() and client.is_server_ready()  # probes: no token
    assert client.is_model_ready(name, headers=AUTH)
    assert not client.is_model_ready(name)  # 401 without the token
    assert client.get_server_metadata(headers=AUTH)["extensions"] == ["binary_tensor_data"]
    meta = client.get_model_metadata(name, headers=AUTH)
    assert meta["name"] == name and meta["platform"] == "onnxruntime_onnx"
    assert meta["inputs"] == [{"name": "obs", "datatype": "FP32", "shape": [-1, 4]}]
    assert meta["outputs"] == [{"name": "action", "datatype": "INT64", "shape": [-1]},
                               {"name": "raw", "datatype": "FP32", "shape": [-1, 2]}]

    import gymnasium as gym

    env = gym.make("CartPole-v1")
    obs = np.stack([env.reset(seed=s)[0] for s in range(64)]
                   + [env.observation_space.sample() for _ in range(64)]).astype(np.float32)
    sess = ort_session(trained_root.run_dir("ppo-cp") / "policy.onnx")
    want_action, want_raw = sess.run(["action", "raw"], {"obs": obs})
    with httpx.Client(base_url=endpoint["url"], headers=AUTH) as c:
        act = c.post(endpoint["path"], json={"observations": obs.tolist()}).json()["actions"]
    assert act == want_action.tolist() and len(set(act)) == 2  # both actions occur: a real comparison
    for binary_in, binary_out in [(False, False), (True, True), (False, None), (True, False)]:
        res = triton_infer(th, client, name, obs, binary_in=binary_in, binary_out=binary_out)
        assert res.get_response()["model_name"] == name
        got = res.as_numpy("action")
        assert got.dtype == np.int64 and got.shape == (128,), (binary_in, binary_out)
        assert got.tolist() == act, (binary_in, binary_out)
        np.testing.assert_array_equal(res.as_numpy("raw"), want_raw)
    one = triton_infer(th, client, name, obs[:1], binary_in=False, binary_out=False)
    assert one.as_numpy("action").tolist() == act[:1]


def test_v2_bad_input_through_tritonclient(endpoint: dict) -> None:
    th, client = triton(endpoint)
    name = endpoint["policy"]
    obs = np.zeros((3, 4), dtype=np.float32)
    cases: list[tuple[dict, str, str]] = [
        (dict(obs=np.zeros((3, 5), np.float32)), "400",
         "inputs[0] ('obs').shape [3, 5] does not match the model's [-1, 4] (-1: any size)"),
        (dict(obs=obs.astype(np.float64), datatype="FP64"), "400",
         "inputs[0] ('obs').datatype 'FP64' does not match the model's FP32"),
        (dict(obs=obs, name="nope"), "404", f"unknown model 'nope': this server serves '{name}'"),
        (dict(obs=obs, headers=None), "401", "missing 'Authorization: Bearer <token>' header"),
        (dict(obs=obs, headers={"Authorization": "Bearer wrong"}), "403", "invalid token"),
    ]
    for kw, status, message in cases:
        with pytest.raises(th.InferenceServerException) as exc:
            triton_infer(th, client, kw.pop("name", name), kw.pop("obs"), binary_in=False, binary_out=False, **kw)
        assert (exc.value.status(), exc.value.message()) == (status, message)
    with pytest.raises(th.InferenceServerException) as exc:
        client.get_model_metadata(name)
    assert exc.value.status() == "401"


def test_v2_unauthenticated_requests_reveal_nothing(endpoint: dict) -> None:
    """Only the probes answer without the token, and no answer without it names the model or its tensors."""
    name = endpoint["policy"]
    with httpx.Client(base_url=endpoint["url"]) as c:
        assert c.get("/v2/health/live").json() == {"live": True}
        assert c.get("/v2/health/ready").json() == {"ready": True}
        assert c.post("/v2/health/live").status_code == 405
        for method, path in [("GET", "/v2"), ("GET", f"/v2/models/{name}"), ("GET", f"/v2/models/{name}/ready"),
                             ("POST", f"/v2/models/{name}/infer"), ("GET", "/v2/models/nope"),
                             ("GET", "/v2/anything"), ("GET", "/nope"), ("POST", "/v1/policies/other/act")]:
            r = c.request(method, path, content=b"{}")
            assert r.status_code == (401 if path.startswith("/v2") else 404), (path, r.text)
            assert name not in r.text and "obs" not in r.text, (path, r.text)
        r = c.get("/nope", headers=AUTH)  # the token's holder is told where the policy is
        assert r.status_code == 404 and endpoint["path"] in r.json()["error"]


def _tensor(data, shape=(1, 4), datatype="FP32", name="obs", **extra) -> dict:
    return {"inputs": [{"name": name, "shape": list(shape), "datatype": datatype, "data": data, **extra}]}


@pytest.mark.parametrize(
    ("body", "status", "needle"),
    [
        (b"not json", 400, "not valid JSON"),
        (b"[1, 2]", 400, "JSON object with an 'inputs' list"),
        ({"inputs": []}, 400, "'inputs' must be a non-empty list"),
        (_tensor([0, 0, 0, 0], name="x"), 400, "inputs[0].name 'x' is not an input of model 'cartpole'"),
        ({"inputs": [_tensor([0] * 4)["inputs"][0]] * 2}, 400, "inputs[1].name 'obs' is given twice"),
        (_tensor([0, 0, 0]), 400, "inputs[0] ('obs').data has 3 values; shape [1, 4] needs 4"),
        (_tensor(["a", "b", "c", "d"]), 400, "inputs[0] ('obs').data must be FP32 numbers"),
        (_tensor([0] * 4, shape=(1, 2, 2)), 400, "inputs[0] ('obs').shape [1, 2, 2] does not match"),
        (_tensor([], shape=(0, 4)), 400, "inputs[0] ('obs').shape: a batch of 0 is outside 1..4096"),
        (_tensor([0] * 4, shape=(4097, 4)), 400, "a batch of 4097 is outside 1..4096"),
        (_tensor([0] * 4, datatype="INT64"), 400, "datatype 'INT64' does not match the model's FP32"),
        (_tensor(None), 400, "inputs[0] ('obs').data must be a list of FP32 numbers"),
        ({"inputs": [{"name": "obs", "shape": [1, 4], "datatype": "FP32"}]}, 400, "inputs[0] ('obs').data is missing"),
        (b'{"inputs":[{"name":"obs","shape":[1,4],"datatype":"FP32","data":[0,0,NaN,0]}]}', 400,
         "NaN or infinite value at flat index 2"),
        (_tensor([0, 0, 0, 1e39]), 400, "NaN or infinite value at flat index 3"),
        ({**_tensor([0] * 4), "outputs": [{"name": "q"}]}, 400, "outputs[0].name 'q' is not an output"),
        (_tensor([0] * 4, parameters={"binary_data_size": 16}), 400, "has both 'data' and parameters.binary_data_size"),
        ({"inputs": [{"name": "obs", "shape": [1, 4], "datatype": "FP32", "parameters": {"binary_data_size": 16}}]},
         400, "binary_data_size 16: the body holds only 0 more bytes"),
        ({"inputs": [{"name": "obs", "shape": [1, 4], "datatype": "FP32", "parameters": {"binary_data_size": 8}}]},
         400, "binary_data_size 8 does not match shape [1, 4] of FP32 (16 bytes)"),
        (b"[" * (5 * 1024 * 1024), 413, "request body over 4194304 bytes"),
    ],
)
def test_v2_malformed_infer_requests(endpoint: dict, body, status: int, needle: str) -> None:
    path = f"/v2/models/{endpoint['policy']}/infer"
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    with httpx.Client(base_url=endpoint["url"], headers=AUTH) as c:
        r = c.post(path, content=content)
        assert r.status_code == status, r.text
        assert needle in r.json()["error"], r.json()


def test_v2_routes_methods_and_nested_data(endpoint: dict) -> None:
    name = endpoint["policy"]
    with httpx.Client(base_url=endpoint["url"], headers=AUTH) as c:
        assert c.get(f"/v2/models/{name}/infer").status_code == 405
        assert c.post(f"/v2/models/{name}").status_code == 405
        r = c.get(f"/v2/models/{name}/versions/1")
        assert r.status_code == 404 and "has no versions here" in r.json()["error"]
        r = c.get("/v2/models/nope/ready")
        assert r.status_code == 404 and "unknown model 'nope'" in r.json()["error"]
        r = c.post(f"/v2/models/{name}/infer", content=b"{}", headers={"Content-Encoding": "gzip"})
        assert r.status_code == 400 and "Content-Encoding 'gzip' is not supported" in r.json()["error"]
        r = c.post(f"/v2/models/{name}/infer", content=b"{}", headers={"Inference-Header-Content-Length": "99"})
        assert r.status_code == 400 and "Inference-Header-Content-Length 99 does not fit" in r.json()["error"]
        head = json.dumps({"inputs": [{"name": "obs", "shape": [1, 4], "datatype": "FP32",
                                       "parameters": {"binary_data_size": 16}}]}).encode()
        r = c.post(f"/v2/models/{name}/infer", content=head + bytes(16) + b"xy",
                   headers={"Inference-Header-Content-Length": str(len(head))})
        assert r.status_code == 400 and "the body has 2 bytes after the binary input data" in r.json()["error"]
        rows = [[0.01, 0.2, -0.03, -0.3], [0.0, -0.5, 0.05, 0.6]]
        flat_rows = [x for row in rows for x in row]
        flat = c.post(f"/v2/models/{name}/infer", json={**_tensor(flat_rows, shape=(2, 4)), "id": "req-7",
                                                        "outputs": [{"name": "action"}]}).json()
        nested = c.post(f"/v2/models/{name}/infer", json=_tensor(rows, shape=(2, 4))).json()
        act = c.post(endpoint["path"], json={"observations": rows}).json()["actions"]
    assert flat["id"] == "req-7" and [o["name"] for o in flat["outputs"]] == ["action"]
    assert flat["outputs"][0] == {"name": "action", "datatype": "INT64", "shape": [2], "data": act}
    assert nested["outputs"][0]["data"] == act and nested["outputs"][1]["shape"] == [2, 2]


def test_v2_continuous_policy_tensors() -> None:
    """A continuous-action graph (Pendulum-like: obs [batch, 3] -> FP32 action [batch, 1], clipped):
    metadata and outputs follow the graph, in JSON and as binary tensor data."""
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    from rlfleet_agents.oip import OipModel

    graph = helper.make_graph(
        [helper.make_node("MatMul", ["obs", "W"], ["raw"]), helper.make_node("Clip", ["raw", "lo", "hi"], ["action"])],
        "policy",
        [helper.make_tensor_value_info("obs", TensorProto.FLOAT, ["batch", 3])],
        [helper.make_tensor_value_info("action", TensorProto.FLOAT, ["batch", 1]),
         helper.make_tensor_value_info("raw", TensorProto.FLOAT, ["batch", 1])],
        [numpy_helper.from_array(np.array([[1.5], [-3.0], [0.5]], np.float32), "W"),
         numpy_helper.from_array(np.array(-2.0, np.float32), "lo"),
         numpy_helper.from_array(np.array(2.0, np.float32), "hi")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    oip = OipModel(sess, "pendulum")
    assert oip.metadata()["outputs"] == [{"name": "action", "datatype": "FP32", "shape": [-1, 1]},
                                         {"name": "raw", "datatype": "FP32", "shape": [-1, 1]}]
    obs = np.array([[1, 0, 0], [0, 1, 0], [0.2, 0.1, -0.4]], np.float32)
    want = sess.run(["action"], {"obs": obs})[0]
    assert want.min() == -2.0 and want.max() == 1.5  # one clipped, one not
    req = {"inputs": [{"name": "obs", "shape": [3, 3], "datatype": "FP32", "data": obs.ravel().tolist()}],
           "outputs": [{"name": "action"}, {"name": "raw", "parameters": {"binary_data": True}}]}
    out = oip.infer(json.dumps(req).encode(), None)
    assert out.header_length is not None
    head = json.loads(out.body[:out.header_length])
    assert head["outputs"][0] == {"name": "action", "datatype": "FP32", "shape": [3, 1],
                                  "data": want.ravel().tolist()}
    assert head["outputs"][1]["parameters"] == {"binary_data_size": 12}
    raw = np.frombuffer(out.body[out.header_length:], "<f4").reshape(3, 1)
    np.testing.assert_array_equal(raw, sess.run(["raw"], {"obs": obs})[0])
    onnx.checker.check_model(model)
