"""TLS between the balancer and a replica on another node, without a cluster: the real
:class:`rlfleet_agents.replica.Replica` in its remote mode (told the controller is on another node)
serving HTTPS with a certificate of the deployment's CA, behind the real HAProxy of the controller
(its TLS slots), on 127.0.0.1. The multi-node test (test_spread_replicas.py) shows the same across
nodes."""

from __future__ import annotations

import hashlib
import http.client
import socket
import ssl
import time
from pathlib import Path

import httpx
import pytest

from rlfleet_agents import controller
from rlfleet_agents.deploytls import DeploymentCA, client_context
from rlfleet_agents.replica import Replica

from .policies import argmax_onnx
from .traffic import OBS

TOKEN = "t0ken-for-the-tls-test"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def remote_replica(tmp_path: Path) -> Replica:
    data = argmax_onnx()
    (tmp_path / "policy.onnx").write_bytes(data)
    rep = Replica("tlsunit", 1, hashlib.sha256(TOKEN.encode()).hexdigest(), f"file://{tmp_path}/policy.onnx",
                  hashlib.sha256(data).hexdigest(), {}, None, controller_node="the-controllers-node")
    yield rep
    rep.stop()


def test_a_remote_replica_serves_only_mutual_tls_behind_the_balancer(remote_replica: Replica) -> None:
    rep = remote_replica
    info = rep.info()
    assert info["tls"] and info["port"] is None and info["csr"]  # waits for its certificate, serves nothing
    ca = DeploymentCA("tlsunit")
    info = rep.serve_tls(ca.sign(info["csr"], ip="127.0.0.1"), ca.cert_pem)
    port, url = info["port"], f"https://127.0.0.1:{info['port']}/v1/policies/tlsunit/act"
    assert port and rep.ping()
    auth = {"authorization": f"Bearer {TOKEN}"}

    # plaintext is refused: the TLS server answers an HTTP request with no HTTP response
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    with pytest.raises((http.client.HTTPException, ConnectionError, OSError)):
        conn.request("POST", "/v1/policies/tlsunit/act", body=b"{}", headers=auth)
        conn.getresponse()
    # TLS without a client certificate of the deployment's CA is refused in the handshake
    with pytest.raises((ssl.SSLError, httpx.HTTPError)):
        httpx.post(url, json=OBS, headers=auth, verify=client_context(ca.cert_pem), timeout=5)
    other = DeploymentCA("another-deployment")  # another deployment's client certificate: refused too
    with pytest.raises((ssl.SSLError, httpx.HTTPError)):
        httpx.post(url, json=OBS, headers=auth, verify=client_context(ca.cert_pem, other.client_pem()), timeout=5)
    # the deployment's client certificate gets through to the token check
    mine = client_context(ca.cert_pem, ca.client_pem())
    assert httpx.post(url, json=OBS, verify=mine, timeout=5).status_code == 401
    wrong = httpx.post(url, json=OBS, headers={"authorization": "Bearer nope"}, verify=mine, timeout=5)
    assert wrong.status_code == 403
    ok = httpx.post(url, json=OBS, headers=auth, verify=mine, timeout=5)
    assert ok.status_code == 200 and ok.headers["x-rlfleet-version"] == "1"

    # the controller's HAProxy reaches it through a TLS slot: health checks over TLS, requests pass
    lb = controller.Balancer("tlsunit", _free_port(), ca=ca)
    try:
        assert all(oct(p.stat().st_mode & 0o777) == "0o600" for p in Path(lb.dir).glob("*.pem"))
        lb.enable("t1", "127.0.0.1", port, 100)
        deadline = time.monotonic() + 10
        while not str(lb.stats()["t1"]["status"]).startswith("UP"):
            assert time.monotonic() < deadline, lb.stats()["t1"]
            time.sleep(0.1)
        front = f"http://127.0.0.1:{lb.port}/v1/policies/tlsunit/act"
        codes = [httpx.post(front, json=OBS, headers=auth, timeout=5).status_code for _ in range(20)]
        assert codes == [200] * 20
        assert httpx.post(front, json=OBS, timeout=5).status_code == 401  # the token still counts
    finally:
        lb.close()


def test_a_balancer_of_another_deployment_cannot_reach_the_replica(remote_replica: Replica) -> None:
    """A replica signed by one deployment's CA is never UP behind a balancer with another CA (its
    certificate fails HAProxy's verification, and HAProxy's client certificate fails the replica's)."""
    ca = DeploymentCA("tlsunit")
    info = remote_replica.serve_tls(ca.sign(remote_replica.info()["csr"], ip="127.0.0.1"), ca.cert_pem)
    lb = controller.Balancer("other", _free_port(), ca=DeploymentCA("other"))
    try:
        lb.enable("t1", "127.0.0.1", info["port"], 100)
        time.sleep(3)  # six health checks (inter 500 ms; fall 2)
        row = lb.stats()["t1"]
        assert not str(row["status"]).startswith("UP"), row
        r = httpx.post(f"http://127.0.0.1:{lb.port}/v1/policies/tlsunit/act", json=OBS,
                       headers={"authorization": f"Bearer {TOKEN}"}, timeout=10)
        assert r.status_code == 503
    finally:
        lb.close()
