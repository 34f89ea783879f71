"""The controller's decisions without a cluster: HAProxy's configuration (checked by the real
haproxy binary), canary weights, the SLO rule, the autoscaler, the balancer's address on a node
with a TLS front."""

from __future__ import annotations

import socket
import subprocess
import time
from pathlib import Path

import pytest

from rlfleet.deployments import DeploymentError
from rlfleet_agents import controller
from rlfleet_agents.controller import Autoscaler, balancer_address, haproxy_config, slo_breach, weights


def test_haproxy_accepts_the_configuration(tmp_path: Path) -> None:
    cfg = tmp_path / "haproxy.cfg"
    cfg.write_text(haproxy_config("cartpole", 18999, str(tmp_path / "admin.sock")))
    out = subprocess.run(["haproxy", "-c", "-f", str(cfg)], capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stdout + out.stderr
    text = cfg.read_text()
    assert "bind 127.0.0.1:18999" in text and "0.0.0.0" not in text and "mode 600 level admin" in text


@pytest.mark.parametrize("pct, n_live, n_canary", [(10, 2, 1), (10, 1, 1), (50, 2, 1), (1, 4, 1), (90, 1, 3)])
def test_canary_weights_give_its_share(pct: int, n_live: int, n_canary: int) -> None:
    w = weights(1, n_live, 2, n_canary, pct)
    assert all(0 <= v <= 256 for v in w.values())
    share = w[2] * n_canary / (w[1] * n_live + w[2] * n_canary)
    assert abs(share - pct / 100) <= 0.05 * pct / 100, (w, share)
    assert weights(1, 2, None, 0, 0) == {1: 100} and weights(1, 2, 2, 1, 100) == {1: 0, 2: 100}


def test_slo_rule() -> None:
    slo = {"max_error_rate": 0.05, "p99_ms": 250, "min_requests": 20}
    assert slo_breach(slo, 19, 19, None) is None  # too few requests to judge
    assert slo_breach(slo, 100, 5, 100.0) is None
    assert "error rate 0.06 > 0.05 over 100 requests" == slo_breach(slo, 100, 6, 100.0)
    assert "p99 300 ms > 250 ms" in slo_breach(slo, 100, 0, 300.0)


def test_autoscaler_up_at_once_down_one_at_a_time(monkeypatch: pytest.MonkeyPatch) -> None:
    now = [1000.0]
    monkeypatch.setattr(controller.time, "monotonic", lambda: now[0])
    a, cfg = Autoscaler(), {"min": 1, "max": 4, "target_inflight": 2, "down_after_s": 5}
    a.sample(7, 3.0)
    assert a.replicas(cfg, 1) == 4  # ceil(7/2) = 4
    a.sample(40, 3.0)
    assert a.replicas(cfg, 1) == 4  # never over max
    now[0] += 10
    a.sample(0, 3.0)
    assert a.replicas(cfg, 1) == 4  # needs fewer from now on
    now[0] += 5
    a.sample(0, 3.0)
    assert a.replicas(cfg, 1) == 3
    now[0] += 4
    a.sample(0, 3.0)
    assert a.replicas(cfg, 1) == 3
    now[0] += 1
    a.sample(0, 3.0)
    assert a.replicas(cfg, 1) == 2


def test_balancer_address_on_a_node_with_a_tls_front() -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        taken = busy.getsockname()[1]
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            free = probe.getsockname()[1]
        env = {"RLFLEET_SERVE_TLS_ADDRESS": "10.0.0.5", "RLFLEET_SERVE_TLS_PORTS": f"{taken},{free}"}
        assert balancer_address(env, []) == (free, f"https://10.0.0.5:{free}")
        env["RLFLEET_SERVE_TLS_PORTS"] = str(taken)
        with pytest.raises(DeploymentError, match=rf"all deploy ports \[{taken}\] of this node's TLS front are in use"):
            balancer_address(env, [])
    port, url = balancer_address({}, [])
    assert url == f"http://127.0.0.1:{port}" and port > 0


def test_the_balancer_starts_and_stops(tmp_path: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    t0 = time.monotonic()
    lb = controller.Balancer("unit", port)
    try:
        assert "Name: HAProxy" in lb.cmd("show info")
        stats = lb.stats()
        assert len(stats) == controller.SLOTS and all(r["status"] == "MAINT" for r in stats.values())
        with socket.create_connection(("127.0.0.1", port), timeout=5) as c:  # no replica: 503, not a hang
            c.sendall(b"GET /healthz HTTP/1.0\r\n\r\n")
            assert c.recv(64).startswith(b"HTTP/1.1 503")
    finally:
        lb.close()
    print(f"haproxy start + stop: {time.monotonic() - t0:.2f} s")
    assert lb.proc.poll() is not None and not Path(lb.dir).exists()


def test_the_balancer_starts_under_the_ray_units_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The on-prem Ray unit's PATH is <venv>/bin:/usr/local/bin:/usr/bin:/bin (no sbin): Debian's
    haproxy is /usr/sbin/haproxy, and the controller must still find it."""
    monkeypatch.setenv("PATH", f"{tmp_path}:/usr/local/bin:/usr/bin:/bin")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    lb = controller.Balancer("unit-path", port)
    try:
        assert "Name: HAProxy" in lb.cmd("show info")
    finally:
        lb.close()


def test_replicas_read_the_policy_where_the_cluster_sees_the_store() -> None:
    """A version document's policy_uri is where the registering SDK read it (on-prem: the NAS as the
    client mounts it); replicas load it from the cluster's own artifact root (on the on-prem host
    they failed with 'No such file or directory: <the client's path>')."""
    doc = {"source_run": "rl-20261201-000000-abcdef",
           "policy_uri": "file:///home/me/nas/rlfleet/runs/rl-20261201-000000-abcdef/policy.onnx"}
    assert controller.replica_policy_uri(doc, "file:///mnt/rlfleet/rlfleet/") == \
        "file:///mnt/rlfleet/rlfleet/runs/rl-20261201-000000-abcdef/policy.onnx"
    assert controller.replica_policy_uri(doc, "s3://bucket/rlfleet") == \
        "s3://bucket/rlfleet/runs/rl-20261201-000000-abcdef/policy.onnx"


def test_new_replicas_go_to_the_nodes_holding_fewest() -> None:
    """Each new replica to the alive node with fewest of the deployment's replicas, ties to the
    controller's node; a dead node's replicas do not count; no known node: Ray places them."""
    from rlfleet_agents.controller import spread_nodes

    assert spread_nodes(["w2", "head", "w1"], [], 3, "head") == ["head", "w1", "w2"]
    assert spread_nodes(["head", "w1", "w2"], [], 1, "head") == ["head"]  # one replica: beside the balancer
    assert spread_nodes(["head", "w1"], [], 4, "head") == ["head", "w1", "head", "w1"]
    # a replacement for the one lost on w1 goes back to w1; replicas on a dead node do not count
    assert spread_nodes(["head", "w1", "w2"], ["head", "w2"], 1, "head") == ["w1"]
    assert spread_nodes(["head", "w1"], ["head", "gone", "gone"], 1, "head") == ["w1"]
    assert spread_nodes([], ["head"], 2, "head") == ["", ""]
