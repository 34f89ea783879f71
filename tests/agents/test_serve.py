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
