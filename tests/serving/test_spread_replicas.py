"""A named deployment's replicas placed by Ray over the nodes of the session's multi-node cluster
(``multinode``: head 10.87.0.1, worker-1 10.87.0.2, worker-2 10.87.0.3, each in its own network
namespace on a private bridge). The controller and its HAProxy run on the head; a replica on a
worker serves its node's address over mutual TLS (the deployment's CA), one on the head stays on
127.0.0.1. The tests of this module share one deployment and run in order; every load is bounded
in count and time."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from rlfleet.deployments import deploy

from .policies import argmax_onnx, write_policy_run
from .traffic import Traffic, replica_loss

pytestmark = [pytest.mark.integration, pytest.mark.figures]

NAME = "spread"
HEAD = "10.87.0.1"
NODES = {HEAD, "10.87.0.2", "10.87.0.3"}
RLFLEET = str(Path(sys.executable).parent / "rlfleet")


def _local_state(mn: Any) -> dict[str, Any]:
    from rlfleet.paths import local_state_file

    with mn.home_env():
        return json.loads(local_state_file().read_text())


@pytest.fixture(scope="module")
def target(multinode: Any) -> Any:
    """The multi-node cluster as a target whose deploy ports the host's forwarder reaches (the
    head's namespace's 127.0.0.1, where the controller's HAProxy binds)."""
    return multinode.target.model_copy(update={"serve_ports": tuple(_local_state(multinode)["serve_ports"])})


@pytest.fixture(scope="module")
def dep(target: Any) -> Any:
    run_id = write_policy_run(target.store(), "rl-20000101-000000-5b7ead", argmax_onnx())
    t0 = time.monotonic()
    d = deploy(NAME, run_id, replicas=3, target=target, audit_rate=0.0)
    print(f"\nspread deployment serving after {time.monotonic() - t0:.1f} s")
    yield d
    if (d.registry.state() or {}).get("active"):
        d.undeploy()


def _replicas(dep: Any) -> list[dict[str, Any]]:
    return [r for r in (dep.registry.status() or {}).get("replicas", []) if r["version"] == 1 and not r["draining"]]


def test_replicas_are_spread_over_the_nodes_and_serve(dep: Any, multinode: Any) -> None:
    reps = _replicas(dep)
    placed = sorted(r["node"] for r in reps)
    print(f"replicas placed on {placed}")
    # one per node: the controller places each on the node holding fewest (Ray's SPREAD and soft
    # affinity put all 3 on the head)
    assert len(reps) == 3 and placed == sorted(NODES), reps
    # the status says what Ray did: each replica's node is the node of its actor
    ip_of = multinode.node_ip_of()
    alive = [a for a in multinode.actors("Replica") if a["state"] == "ALIVE"]
    assert sorted(ip_of[a["node_id"]] for a in alive) == placed
    assert ip_of[dep.registry.endpoint()["node"]] == HEAD  # the controller (and its HAProxy) on the head
    for r in reps:
        host = r["address"].rsplit(":", 1)[0]
        if r["node"] == HEAD:  # beside the balancer: loopback, plain HTTP
            assert host == "127.0.0.1" and not r["tls"] and r["slot"].startswith("s"), r
        else:  # on a worker: its node's address, TLS
            assert host == r["node"] and r["tls"] and r["slot"].startswith("t"), r
        assert str(r["balancer"]).startswith("UP"), r
    assert any(r["tls"] for r in reps)
    versions, codes = Traffic(dep).send(300)
    assert codes == {200: 300} and versions == {"1": 300}, codes
    time.sleep(1.0)  # the controller's next status carries HAProxy's per-server response times
    rtime = {r["address"]: r["rtime_ms"] for r in _replicas(dep)}
    print(f"HAProxy's average response time per replica (ms): {rtime}")
    assert all(isinstance(v, int) for v in rtime.values()), rtime


_PROBE = r"""
import json, os, socket, ssl, http.client
host, port, token = os.environ["R_HOST"], int(os.environ["R_PORT"]), os.environ["R_TOKEN"]
ca, client = os.environ["R_CA"], os.environ["R_CLIENT"]
body = json.dumps({"observations": [[0.01, -0.02, 0.03, 0.04]]})
path = "/v1/policies/spread/act"
out = {}
def post(conn, headers):
    conn.request("POST", path, body=body, headers={"content-type": "application/json", **headers})
    return conn.getresponse().status
try:  # plaintext
    out["plain"] = post(http.client.HTTPConnection(host, port, timeout=5), {"authorization": "Bearer " + token})
except Exception as err:
    out["plain"] = type(err).__name__
nocert = ssl.create_default_context(cafile=ca)
try:  # TLS, the server verified (its IP SAN), but no client certificate
    out["no_client_cert"] = post(http.client.HTTPSConnection(host, port, timeout=5, context=nocert),
                                 {"authorization": "Bearer " + token})
except Exception as err:
    out["no_client_cert"] = type(err).__name__
mtls = ssl.create_default_context(cafile=ca)
mtls.load_cert_chain(client)
out["no_token"] = post(http.client.HTTPSConnection(host, port, timeout=5, context=mtls), {})
out["token"] = post(http.client.HTTPSConnection(host, port, timeout=5, context=mtls),
                    {"authorization": "Bearer " + token})
print(json.dumps(out))
"""


def test_a_remote_replica_wants_tls_a_client_certificate_and_the_token(dep: Any, multinode: Any) -> None:
    """From the cluster's network (a node's namespace on the bridge), straight to a replica on a
    worker: plaintext gets no HTTP answer, TLS without the deployment's client certificate fails the
    handshake, the deployment's client certificate (HAProxy's) without the token gets 401."""
    remote = next(r for r in _replicas(dep) if r["tls"])
    host, port = remote["address"].rsplit(":", 1)
    obs = dep.registry.status()
    cfg = Path(f"/proc/{obs['balancer']['pid']}/cmdline").read_bytes().split(b"\0")[2].decode()  # haproxy -f CFG
    tls_dir = os.path.dirname(cfg)
    env = {**os.environ, "R_HOST": host, "R_PORT": port, "R_TOKEN": dep.endpoint().token,
           "R_CA": f"{tls_dir}/ca.pem", "R_CLIENT": f"{tls_dir}/client.pem"}
    holder = _local_state(multinode)["holder_pid"]  # the head's namespace
    res = subprocess.run(["nsenter", f"--net=/proc/{holder}/ns/net", sys.executable, "-c", _PROBE], env=env,
                         capture_output=True, text=True, timeout=60)  # fmt: skip
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout)
    print(f"straight to the replica at {remote['address']}: {out}")
    assert out["plain"] not in (200, 401, 403), out  # no HTTP answer in plaintext
    assert isinstance(out["no_client_cert"], str) and out["no_client_cert"] != "ConnectionRefusedError", out
    assert out["no_token"] == 401 and out["token"] == 200, out


def test_canary_weights_hold_with_replicas_on_several_nodes(dep: Any, target: Any) -> None:
    run_id = write_policy_run(target.store(), "rl-20000101-000000-5b7eae", argmax_onnx())
    dep.canary(run_id, 25)
    canary = [r for r in dep.registry.status()["replicas"] if r["version"] == 2]
    versions, codes = Traffic(dep).send(400)
    share = versions["2"] / 400
    print(f"canary at 25 % beside 3 spread replicas: share {share:.4f} over 400; canary on {canary[0]['node']}")
    assert codes == {200: 400} and abs(share - 0.25) <= 0.0125, versions
    assert len(canary) == 1 and canary[0]["node"] in NODES
    dep.rollback()
    assert Traffic(dep).send(50)[0] == {"1": 50}


def test_a_shadow_sees_a_copy_from_the_live_replicas_on_every_node(dep: Any) -> None:
    """The shadow serves mutual TLS on its node's address; every live replica (on the head or a
    worker) sends it a copy with its own client certificate of the deployment's CA."""
    dep.shadow(dep.versions()[0]["source_run"])  # the live policy itself: every answer must agree
    shadow = next(r for r in dep.registry.status()["replicas"] if r["role"] == "shadow")
    assert shadow["tls"] and shadow["address"].startswith(f"{shadow['node']}:"), shadow
    versions, codes = Traffic(dep).send(300)
    assert codes == {200: 300} and versions == {"1": 300}  # the shadow answers nobody
    deadline, sh = time.monotonic() + 20, {}
    while time.monotonic() < deadline and sum(sh.get(k, 0) for k in ("compared", "failed", "dropped")) < 300:
        sh = dep.registry.status().get("shadow") or {}
        time.sleep(0.3)
    live_nodes = sorted(r["node"] for r in _replicas(dep))
    print(f"shadow on {shadow['node']}, live replicas on {live_nodes}: {sh}")
    assert sh["failed"] == 0 and sh["compared"] + sh["dropped"] == 300 and sh["compared"] >= 150, sh
    assert sh["agreement"] == 1.0, sh
    dep.shadow(None)
    assert not [r for r in dep.registry.status()["replicas"] if r["role"] == "shadow"]


def test_a_cut_off_node_keeps_the_status_fresh_and_its_replicas_come_back(dep: Any, multinode: Any) -> None:
    """A worker's link is cut for 10 s (Ray would declare the node dead only after ~65 s): HAProxy
    takes its replicas out (no failed request after that, at most the one in flight at the cut),
    the controller keeps writing its status (a replica that does not answer its ping does not hold
    up the controller's rounds), and once the link is back the replicas serve again."""
    remote = Counter(r["node"] for r in _replicas(dep) if r["tls"])
    ip = min(remote, key=lambda n: remote[n])
    name = {"10.87.0.2": "worker-1", "10.87.0.3": "worker-2"}[ip]
    traffic = Traffic(dep)
    results: list[tuple[float, Any]] = []
    stop = threading.Event()

    def load() -> None:
        while not stop.is_set() and len(results) < 20_000:
            sent = time.monotonic()
            _, codes = traffic.send(1)
            results.append((sent, next(iter(codes))))  # when it was sent: the one in flight at the cut

    th = threading.Thread(target=load)
    th.start()
    ages: list[float] = []
    down_at = back_at = None
    try:
        time.sleep(1.0)
        with multinode.restored(name):
            cut_at = time.monotonic()
            multinode.cut_node(name)
            while time.monotonic() - cut_at < 10:
                st = dep.registry.status() or {}
                ages.append(time.time() - float(st.get("updated_at") or 0))
                if down_at is None and not any(r["node"] == ip and str(r["balancer"]).startswith("UP")
                                               for r in st.get("replicas", [])):
                    down_at = time.monotonic()
                time.sleep(0.25)
            multinode.reconnect_node(name)
            deadline = time.monotonic() + 40
            while time.monotonic() < deadline and back_at is None:
                reps = _replicas(dep)
                if len(reps) == 3 and all(str(r["balancer"]).startswith("UP") for r in reps):
                    back_at = time.monotonic()
                time.sleep(0.3)
    finally:
        stop.set()
        th.join()
    failed = [(round(t - cut_at, 2), c) for t, c in results if c != 200]
    after = [f for f in failed if down_at is not None and f[0] >= down_at - cut_at]
    print(f"link of {name} cut for 10 s: {len(results)} requests, failed {failed}; down in the status after "
          f"{(down_at or 0) - cut_at:.1f} s, oldest status seen {max(ages):.1f} s, all UP again "
          f"{(back_at or 0) - cut_at:.1f} s after the cut")
    assert down_at is not None and after == [] and len(failed) <= 1, failed
    assert max(ages) < 5.0, f"the controller's status went {max(ages):.1f} s without an update"
    assert back_at is not None, _replicas(dep)


def test_losing_a_remote_replica_drops_no_request(dep: Any) -> None:
    figures = replica_loss(dep, lambda pid: os.kill(pid, signal.SIGKILL), load_s=30, pick=lambda r: r["tls"])
    assert figures["failed_after_down"] == 0
    assert len(_replicas(dep)) == 3


def test_status_from_the_cli_shows_each_replicas_node(dep: Any, target: Any, tmp_path: Path) -> None:
    from rlfleet.targets import save_target

    cfg = save_target(target, tmp_path / "targets.yaml")
    env = {**os.environ, "RLFLEET_CONFIG": str(cfg), "COLUMNS": "200"}
    shown = subprocess.run([RLFLEET, "deploy", NAME, "--status", "--target", target.name], env=env,
                           capture_output=True, text=True, timeout=120)  # fmt: skip
    assert shown.returncode == 0, shown.stderr
    print(shown.stdout)
    for r in _replicas(dep):
        line = next(ln for ln in shown.stdout.splitlines() if r["replica"] in ln)
        assert r["node"] in line and r["address"] in line and ("yes" if r["tls"] else "no") in line, line
    doc = json.loads(subprocess.run([RLFLEET, "deploy", NAME, "--status", "--json", "--target", target.name],
                                    env=env, capture_output=True, text=True, timeout=120).stdout)
    assert {r["node"] for r in doc["observed"]["replicas"]} <= NODES


def test_undeploy_stops_the_replicas_on_every_node(dep: Any, multinode: Any) -> None:
    dep.undeploy()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and [a for a in multinode.actors("Replica") if a["state"] == "ALIVE"]:
        time.sleep(0.5)
    assert not [a for a in multinode.actors("Replica") if a["state"] == "ALIVE"]
