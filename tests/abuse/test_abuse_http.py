"""Policy HTTP API abuse: the real PolicyApp on a real uvicorn (127.0.0.1), serving a real small
ONNX policy (an untrained CartPole actor exported with rlfleet_agents.export). Malformed JSON, wrong
shapes/dtypes, NaN/inf, huge bodies, wrong content types, bad auth headers, unknown paths/methods:
never a 5xx, and every answer from the app is a JSON object whose 'error' names the problem."""

from __future__ import annotations

import asyncio
import hashlib
import inspect
import json
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass

import httpx
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from .harness import count, fuzz

TOKEN = "abuse-serve-token-0123456789"
NAME = "cartpole"
PATH = f"/v1/policies/{NAME}/act"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


def small_policy_bytes() -> bytes:
    """A real ONNX policy with the graph contract of rlfleet_agents.export (input 'obs' [batch, 4],
    outputs 'action' int64 [batch] and 'raw'; 'rlfleet' metadata), built without importing torch."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    w = numpy_helper.from_array(np.array([[1, -1], [0.5, -0.5], [2, -2], [1, -1]], dtype=np.float32), "W")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["obs", "W"], ["raw"]),
         helper.make_node("ArgMax", ["raw"], ["action"], axis=1, keepdims=0)],
        "policy",
        [helper.make_tensor_value_info("obs", TensorProto.FLOAT, ["batch", 4])],
        [helper.make_tensor_value_info("action", TensorProto.INT64, ["batch"]),
         helper.make_tensor_value_info("raw", TensorProto.FLOAT, ["batch", 2])],
        [w],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    meta = model.metadata_props.add()
    meta.key = "rlfleet"
    meta.value = json.dumps({"env": "CartPole-v1", "spaces": {
        "obs_shape": [4], "obs_low": [-4.8, -1e38, -0.42, -1e38], "obs_high": [4.8, 1e38, 0.42, 1e38],
        "action_kind": "discrete", "n_actions": 2, "action_low": None, "action_high": None}})
    onnx.checker.check_model(model, full_check=True)
    return model.SerializeToString()


def make_app(policy: object, name: str, token: str) -> object:
    """The one place that knows how PolicyApp receives its token (a hash of the per-deployment
    token, or the token itself in older versions)."""
    from rlfleet_agents.serve import PolicyApp

    params = inspect.signature(PolicyApp).parameters
    secret = hashlib.sha256(token.encode()).hexdigest() if "token_sha256" in params else token
    return PolicyApp(policy, name, secret)  # type: ignore[arg-type]


@dataclass
class Server:
    url: str
    host: str
    port: int
    client: httpx.Client
    codes: list[int]


@pytest.fixture(scope="module")
def server() -> Iterator[Server]:
    """The policy server as a deploy run hosts it (make_server + bind_socket), in a thread."""
    from rlfleet_agents.policy import OnnxPolicy
    from rlfleet_agents.serve import bind_socket, make_server

    codes: list[int] = []
    app = make_app(OnnxPolicy(small_policy_bytes()), NAME, TOKEN)
    app.on_request = lambda seconds, code: codes.append(code)  # type: ignore[attr-defined]
    sock = bind_socket("127.0.0.1", None, [])
    port = sock.getsockname()[1]
    srv = make_server(app)
    thread = threading.Thread(target=lambda: asyncio.run(srv.serve(sockets=[sock])), daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not srv.started:
        assert time.monotonic() < deadline and thread.is_alive(), "policy server did not start"
        time.sleep(0.02)
    url = f"http://127.0.0.1:{port}"
    with httpx.Client(base_url=url, timeout=10) as client:
        ok = client.post(PATH, json={"observations": [[0.0, 0.0, 0.0, 0.0]]}, headers=AUTH)
        assert ok.status_code == 200 and len(ok.json()["actions"]) == 1, ok.text
        try:
            yield Server(url, "127.0.0.1", port, client, codes)
        finally:
            srv.should_exit = True
            thread.join(timeout=10)
    assert not thread.is_alive()
    assert all(c < 500 for c in codes), codes


def check(resp: httpx.Response, statuses: set[int], *needles: str) -> dict:
    count("http")
    assert resp.status_code < 500, f"{resp.status_code}: {resp.text[:300]}"
    assert resp.status_code in statuses, f"{resp.status_code}: {resp.text[:300]}"
    assert resp.headers.get("content-type") == "application/json", resp.headers
    doc = resp.json()
    assert isinstance(doc, dict)
    if resp.status_code >= 400:
        assert isinstance(doc.get("error"), str) and "\n" not in doc["error"], doc
        for n in needles:
            assert n in doc["error"], f"{n!r} not in {doc['error']!r}"
    return doc


# body -> (status, words of the error)
BODIES: list[tuple[bytes, int, list[str]]] = [
    (b"", 422, ["not valid JSON"]),
    (b"not json", 422, ["not valid JSON"]),
    (b"\xff\xfe\x00", 422, ["not valid JSON"]),
    (b"{", 422, ["not valid JSON"]),
    (b"null", 422, ["'observations'"]),
    (b"NaN", 422, ["'observations'"]),
    (b"[]", 422, ["'observations'"]),
    (b'"observations"', 422, ["'observations'"]),
    (b'{"obs": [[0,0,0,0]]}', 422, ["'observations'"]),
    (b'{"observations": null}', 422, ["non-empty list"]),
    (b'{"observations": []}', 422, ["non-empty list"]),
    (b'{"observations": {"a": 1}}', 422, ["non-empty list"]),
    (b'{"observations": "0,0,0,0"}', 422, ["non-empty list"]),
    (b'{"observations": [0,0,0,0]}', 422, ["shape [4]"]),
    (b'{"observations": [[]]}', 422, ["shape [4], got [0]"]),
    (b'{"observations": [[0,0,0]]}', 422, ["shape [4], got [3]"]),
    (b'{"observations": [[0,0,0,0,0]]}', 422, ["shape [4], got [5]"]),
    (b'{"observations": [[[0,0,0,0]]]}', 422, ["shape [4]"]),
    (b'{"observations": [[0,0,0,0],[0,0,0]]}', 422, ["ragged"]),
    (b'{"observations": [[0,0,0,[0]]]}', 422, ["ragged"]),
    (b'{"observations": [["a","b","c","d"]]}', 422, ["numbers"]),
    (b'{"observations": [[{},{},{},{}]]}', 422, ["numbers"]),
    (b'{"observations": [[0,0,NaN,0]]}', 422, ["NaN or infinite value at index 2"]),
    (b'{"observations": [[0,0,0,Infinity]]}', 422, ["NaN or infinite"]),
    (b'{"observations": [[0,0,0,-Infinity]]}', 422, ["NaN or infinite"]),
    (b'{"observations": [[0,0,0,1e999]]}', 422, ["NaN or infinite"]),
    (b'{"observations": [[null,0,0,0]]}', 422, ["observation 0"]),
    (b'{"observations": [[0,0,0,' + b"9" * 400 + b"]]}", 422, ["observation"]),  # was a 500 (OverflowError)
    (b'{"observations": [[0,0,0,1' + b"0" * 5000 + b"]]}", 422, []),  # over Python's int-digit limit
    (b"[" * 100_000 + b"]" * 100_000, 422, []),  # was a 500 (RecursionError in json.loads)
    (b'{"observations": ' + b"[" * 50_000 + b"]" * 50_000 + b"}", 422, []),
    (json.dumps({"observations": [[0.0] * 4] * 4097}).encode(), 422, ["4097", "limit"]),
]


@pytest.mark.parametrize(("body", "status", "needles"), BODIES, ids=[f"b{i}" for i in range(len(BODIES))])
def test_bad_body(server: Server, body: bytes, status: int, needles: list[str]) -> None:
    check(server.client.post(PATH, content=body, headers=AUTH), {status}, *needles)


def test_huge_bodies_are_refused(server: Server) -> None:
    check(server.client.post(PATH, content=b"[" * (5 * 1024 * 1024), headers=AUTH), {413}, "request body over")
    chunks = (b"0" * 65536 for _ in range(80))  # chunked, no content-length, over 4 MiB in total
    check(server.client.post(PATH, content=chunks, headers=AUTH), {413}, "request body over")


CONTENT_TYPES = ["text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x",
                 "application/octet-stream", "application/json; charset=latin-1", "", "image/png"]


@pytest.mark.parametrize("ctype", CONTENT_TYPES)
def test_content_types(server: Server, ctype: str) -> None:
    """The body decides, never a 5xx: valid JSON is served whatever the label, anything else is a 422."""
    headers = {**AUTH, "content-type": ctype}
    check(server.client.post(PATH, content=b'{"observations": [[0,0,0,0]]}', headers=headers), {200})
    check(server.client.post(PATH, content=b"observations=0,0,0,0", headers=headers), {422}, "not valid JSON")


AUTH_TABLE: list[tuple[dict[str, str], int]] = [
    ({}, 401),
    ({"Authorization": ""}, 401),
    ({"Authorization": "Bearer"}, 403),
    ({"Authorization": f"bearer {TOKEN}"}, 403),
    ({"Authorization": f"Bearer  {TOKEN}"}, 403),
    ({"Authorization": f"Bearer {TOKEN}x"}, 403),
    ({"Authorization": f"Bearer {TOKEN[:-1]}"}, 403),
    ({"Authorization": TOKEN}, 403),
    ({"Authorization": f"Basic {TOKEN}"}, 403),
    ({"Authorization": "Bearer " + "A" * 8000}, 403),
    ({"Authorization": f"Bearer {hashlib.sha256(TOKEN.encode()).hexdigest()}"}, 403),  # the hash is no token
    ({"X-Authorization": f"Bearer {TOKEN}"}, 401),
]


@pytest.mark.parametrize(("headers", "status"), AUTH_TABLE, ids=[f"a{i}" for i in range(len(AUTH_TABLE))])
def test_bad_auth(server: Server, headers: dict[str, str], status: int) -> None:
    doc = check(server.client.post(PATH, json={"observations": [[0, 0, 0, 0]]}, headers=headers), {status})
    assert "actions" not in doc


def test_non_ascii_auth_header(server: Server) -> None:
    r = server.client.post(PATH, json={"observations": [[0, 0, 0, 0]]},
                           headers=[(b"authorization", b"Bearer \xff\xfe" + TOKEN.encode())])
    assert "actions" not in check(r, {403})


PATHS: list[tuple[str, str, int]] = [
    ("GET", PATH, 405), ("PUT", PATH, 405), ("DELETE", PATH, 405), ("PATCH", PATH, 405), ("OPTIONS", PATH, 405),
    ("HEAD", "/healthz", 405), ("POST", "/healthz", 405), ("DELETE", "/healthz", 405),
    ("POST", "/", 404), ("POST", "/v1/policies/other/act", 404), ("POST", "/v1/policies/cartpole", 404),
    ("POST", PATH + "/", 404), ("POST", PATH.upper(), 404), ("GET", "/metrics", 404), ("GET", "/" + "a" * 4000, 404),
]


@pytest.mark.parametrize(("method", "path", "status"), PATHS, ids=[f"{m} {p[:40]}" for m, p, _ in PATHS])
def test_unknown_paths_and_methods(server: Server, method: str, path: str, status: int) -> None:
    r = server.client.request(method, path, content=b'{"observations": [[0,0,0,0]]}', headers=AUTH)
    count("http")
    assert r.status_code == status, r.text
    if method != "HEAD":
        check(r, {status})


def raw_http(server: Server, request: bytes) -> bytes:
    with socket.create_connection((server.host, server.port), timeout=10) as s:
        s.sendall(request)
        s.shutdown(socket.SHUT_WR)
        out = b""
        while chunk := s.recv(65536):
            out += chunk
    return out


_POST = b"POST " + PATH.encode() + b" HTTP/1.1\r\nHost: x\r\n"
_AUTHED = _POST + f"Authorization: Bearer {TOKEN}\r\n".encode()
_JSON_BODY = b'{"observations": [[0,0,0,0]]}'
# raw request -> statuses allowed (None: the server may also just hang up)
RAW: list[tuple[bytes, set[int]]] = [
    (b"FOO " + PATH.encode() + b" HTTP/1.1\r\nHost: x\r\n\r\n", {400, 405}),
    (_AUTHED + b"Content-Length: 100\r\n\r\n{}", {400, 422}),  # the body is shorter than announced
    (_AUTHED + b"Content-Length: -1\r\n\r\n", {400}),
    (_AUTHED + b"Transfer-Encoding: chunked\r\n\r\nzz\r\n", {400}),
    (b"GET / HTTP/9.9\r\n\r\n", {400, 404, 505}),
    (b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03", {400}),  # a TLS ClientHello on the plain port
    (b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Pad: " + b"a" * 70000 + b"\r\n\r\n", {200, 400, 431}),
    (_POST + b"Authorization: Bearer \r\nContent-Length: 29\r\n\r\n" + _JSON_BODY, {401, 403}),
    (_POST + f"Authorization: Bearer {TOKEN} x\r\nContent-Length: 29\r\n\r\n".encode() + _JSON_BODY, {403}),
    (_POST.replace(b"cartpole", b"x/../cartpole") + b"Content-Length: 29\r\n\r\n" + _JSON_BODY, {401, 404}),
]


@pytest.mark.parametrize(("request_bytes", "allowed"), RAW, ids=[f"raw{i}" for i in range(len(RAW))])
def test_malformed_http(server: Server, request_bytes: bytes, allowed: set[int]) -> None:
    """Malformed HTTP never gets a 5xx (uvicorn answers 4xx or hangs up); the app answers JSON."""
    count("http")
    reply = raw_http(server, request_bytes)
    if reply:
        head, _, body = reply.partition(b"\r\n\r\n")
        status = int(head.split(b" ", 2)[1])
        assert status in allowed, reply[:300]
        if b"content-type: application/json" in head.lower():
            assert "error" in json.loads(body) or status == 200
    assert server.client.get("/healthz").json() == {"status": "ok"}


# -- generated bodies ------------------------------------------------------------------------------

_num = st.one_of(st.integers(min_value=-(10**30), max_value=10**30), st.floats(), st.booleans(), st.none(),
                 st.text(max_size=3))
_obs = st.one_of(st.lists(_num, max_size=6), _num, st.lists(st.lists(_num, max_size=5), max_size=3))


@fuzz(50)
@given(st.one_of(
    st.fixed_dictionaries({"observations": st.lists(_obs, max_size=4)}),
    st.dictionaries(st.text(max_size=5), _obs, max_size=2),
    st.binary(max_size=64).map(lambda b: ("raw", b)),
))
def test_generated_body_never_5xx(server: Server, body: object) -> None:
    if isinstance(body, tuple):
        r = server.client.post(PATH, content=body[1], headers=AUTH)
    else:
        r = server.client.post(PATH, content=json.dumps(body).encode(), headers=AUTH)
    doc = check(r, {200, 422})
    if r.status_code == 200:
        assert all(a in (0, 1) for a in doc["actions"])


# -- the Open Inference Protocol (KServe v2) routes ------------------------------------------------

V2_INFER = f"/v2/models/{NAME}/infer"
_v2_tensor = st.fixed_dictionaries(
    {"name": st.sampled_from(["obs", "x", None, 1]),
     "shape": st.one_of(st.lists(st.integers(min_value=-2, max_value=5), max_size=3), st.none(), st.text(max_size=2)),
     "datatype": st.sampled_from(["FP32", "FP64", "INT64", "BYTES", None]),
     "data": _obs},
    optional={"parameters": st.one_of(st.none(), st.text(max_size=2),
                                      st.dictionaries(st.sampled_from(["binary_data_size", "x"]), _num, max_size=1))},
)
_v2_output = st.one_of(_num, st.fixed_dictionaries(
    {"name": st.sampled_from(["action", "raw", "q", None])},
    optional={"parameters": st.one_of(_num, st.dictionaries(st.sampled_from(["binary_data", "classification"]),
                                                              _num, max_size=1))}))


@fuzz(80)
@given(st.one_of(
    st.fixed_dictionaries({"inputs": st.one_of(st.lists(_v2_tensor, max_size=3), _num)},
                          optional={"outputs": st.one_of(st.lists(_v2_output, max_size=3), _num), "id": _num,
                                    "parameters": st.one_of(_num, st.just({"binary_data_output": False}))}),
    st.tuples(st.binary(max_size=64), st.integers(min_value=-5, max_value=80)),
))
def test_v2_generated_infer_never_5xx(server: Server, body: object) -> None:
    """Generated protocol requests (JSON, and raw bytes with an Inference-Header-Content-Length):
    a 200 with CartPole actions or a 400 whose one-line JSON error names the problem, never a 5xx."""
    if isinstance(body, tuple):
        r = server.client.post(V2_INFER, content=body[0],
                               headers={**AUTH, "Inference-Header-Content-Length": str(body[1])})
    else:
        r = server.client.post(V2_INFER, content=json.dumps(body).encode(), headers=AUTH)
    doc = check(r, {200, 400})
    if r.status_code == 200:
        for out in doc["outputs"]:
            if out["name"] == "action":
                assert out["datatype"] == "INT64" and all(a in (0, 1) for a in out["data"])


V2_PATHS: list[tuple[str, str, int]] = [
    ("GET", V2_INFER, 405), ("PUT", f"/v2/models/{NAME}", 405), ("POST", f"/v2/models/{NAME}/ready", 405),
    ("POST", "/v2", 405), ("GET", "/v2/models", 404), ("GET", f"/v2/models/{NAME}/config", 404),
    ("GET", f"/v2/models/{NAME}/versions/1/ready", 404), ("GET", "/v2/models/other", 404),
    ("GET", f"/v2/models/{NAME}//infer", 404), ("GET", "/v2/repository/index", 404), ("GET", "/v2/" + "a" * 4000, 404),
]


@pytest.mark.parametrize(("method", "path", "status"), V2_PATHS, ids=[f"{m} {p[:40]}" for m, p, _ in V2_PATHS])
def test_v2_unknown_paths_and_methods(server: Server, method: str, path: str, status: int) -> None:
    check(server.client.request(method, path, content=b"{}", headers=AUTH), {status})
    doc = check(server.client.request(method, path, content=b"{}"), {401})  # the token first: no name leaks
    assert NAME not in doc["error"]
