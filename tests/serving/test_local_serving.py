"""Named deployments end to end on the local target: a controller Ray job, replicas as Ray actors,
HAProxy in front (all real, on the shared ``local_cluster``). The tests of this module share one
deployment and run in order: deploy -> canary split -> promote -> rollback -> replica loss ->
automatic rollback -> tampered canary -> shadow -> autoscale -> controller loss -> bad input -> status
-> undeploy.
Every load is bounded in count and time."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import httpx
import pytest

from rlfleet.deployments import DeploymentError, Registry, deploy, get_deployment
from rlfleet.errors import RlfleetError

from .traffic import OBS, Traffic, replica_loss

NAME = "cartpole"
RLFLEET = str(Path(sys.executable).parent / "rlfleet")

pytestmark = [pytest.mark.integration, pytest.mark.figures]


def _state(dep: Any) -> dict[str, Any]:
    return dep.registry.state()


def _observed(dep: Any) -> dict[str, Any]:
    return dep.registry.status() or {}


def _wait(cond: Any, timeout: float, what: str = "the condition") -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"{what} not within {timeout} s"
        time.sleep(0.2)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie is not alive
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return False


@pytest.fixture(scope="module")
def dep(local_cluster: Any, serving_runs: dict[str, str]) -> Any:
    t0 = time.monotonic()
    d = deploy(NAME, serving_runs["ppo"], replicas=2, target="local", slo={"window_s": 3.0, "min_requests": 20})
    print(f"deploy to serving: {time.monotonic() - t0:.1f} s")
    yield d
    if (_state(d) or {}).get("active"):
        d.undeploy()


def test_deploy_serves_versions_through_the_balancer(dep: Any, local_cluster: Any) -> None:
    ep = dep.endpoint()
    port = int(ep.url.rsplit(":", 1)[1])
    assert ep.url.startswith("http://127.0.0.1:") and port in local_cluster.serve_ports
    assert httpx.post(ep.act_url, json=OBS).status_code == 401  # the balancer passes auth to the replicas
    assert httpx.post(ep.act_url, json=OBS, headers={"authorization": "Bearer nope"}).status_code == 403
    versions, codes = Traffic(dep).send(200)
    assert codes == {200: 200} and versions == {"1": 200}
    obs = _observed(dep)
    reps = [r for r in obs["replicas"] if r["version"] == 1]
    assert len(reps) == 2 and all(r["balancer"].startswith("UP") for r in reps)
    assert all(_alive(r["pid"]) for r in reps) and _alive(obs["balancer"]["pid"])
    assert [v["version"] for v in dep.versions()] == [1]


def test_canary_split_within_5_percent_of_its_weight(dep: Any, serving_runs: dict[str, str]) -> None:
    url = dep.endpoint().url
    dep.canary(serving_runs["argmax"], 10)
    assert dep.endpoint().url == url  # the name's URL never changes across versions
    versions, codes = Traffic(dep).send(2000, budget_s=120)
    assert codes == {200: 2000}, codes
    share = versions["2"] / 2000
    print(f"canary share over 2000 requests: {share:.4f} (weight 10 %), {dict(versions)}")
    assert abs(share - 0.10) <= 0.005, versions
    st = _state(dep)
    assert (st["live"], st["canary"], st["canary_weight"]) == (1, 2, 10)


def test_replicas_report_status_and_audit_lines_per_version(dep: Any) -> None:
    """The serving observer (parts 5-6: metrics, drift, audit) rides on every replica's PolicyApp:
    after the canary split, each live and canary replica's serve_status.json (published every 5 s)
    counts its requests under its version, and the sampled audit lines name their version."""
    root = Path(dep.registry.store.root_path, "deployments", NAME, "replicas")
    current = {r["replica"]: r["version"] for r in _observed(dep)["replicas"]}
    deadline = time.monotonic() + 20
    seen: dict[str, dict[str, Any]] = {}
    while time.monotonic() < deadline and (set(seen) != set(current)
                                           or sum(d["requests"] for d in seen.values()) < 2000):
        for rid in current:
            f = root / rid / "serve_status.json"
            if f.exists() and (doc := json.loads(f.read_text())).get("requests"):
                seen[rid] = doc
        time.sleep(0.5)
    assert set(seen) == set(current), (sorted(seen), current)
    assert {doc["version"] for doc in seen.values()} == {"1", "2"}
    assert all(doc["replica"] == rid and doc["deployment"] == NAME for rid, doc in seen.items())
    assert all(doc["metrics"]["enabled"] and doc["metrics"]["connected"] for doc in seen.values()), seen
    assert sum(doc["requests"] for doc in seen.values()) >= 2000
    lines = [json.loads(x) for f in root.glob("*/audit/*.jsonl") for x in f.read_text().splitlines() if x]
    assert lines and {str(x["version"]) for x in lines} <= {"1", "2"}
    assert not any("token" in json.dumps(x).lower() for x in lines)
    shown = _cli("drift", NAME, "--json")  # the replicas' drift, from the store, by deployment name
    assert shown.returncode == 0, shown.stderr
    doc = json.loads(shown.stdout)
    assert doc["deployment"] == NAME and {r["replica"] for r in doc["replicas"]} == set(current)
    assert all("drift" in r for r in doc["replicas"])
    text = _cli("drift", NAME)
    assert text.returncode == 0 and text.stdout.count(f"{NAME} version") == len(current), text.stderr


def test_promote_then_rollback(dep: Any) -> None:
    old = {r["pid"] for r in _observed(dep)["replicas"] if r["version"] == 1}
    dep.promote()
    versions, codes = Traffic(dep).send(100)
    assert codes == {200: 100} and versions == {"2": 100}
    st = _state(dep)
    assert (st["live"], st["canary"], st["previous"]) == (2, None, 1)
    # the old replicas were drained and stopped: ray.kill ends their processes asynchronously, so a
    # PID may outlive the applied state by a moment on a loaded machine (seen at load ~8)
    deadline = time.monotonic() + 20
    while any(_alive(p) for p in old) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not any(_alive(p) for p in old), f"v1 replica processes {old} still running 20 s after the promote"
    assert len([r for r in _observed(dep)["replicas"] if r["version"] == 2]) == 2
    dep.rollback()
    versions, codes = Traffic(dep).send(100)
    assert codes == {200: 100} and versions == {"1": 100}
    assert (_state(dep)["live"], _state(dep)["previous"]) == (1, None)


def test_losing_a_replica_drops_no_request(dep: Any) -> None:
    replica_loss(dep, lambda pid: os.kill(pid, signal.SIGKILL), load_s=30)


def test_automatic_rollback_of_a_failing_canary(dep: Any, serving_runs: dict[str, str]) -> None:
    before = _state(dep)["seq"]
    dep.canary(serving_runs["failing"], 50)
    t0 = time.monotonic()
    traffic = Traffic(dep)
    codes_total: Counter = Counter()
    rolled = None
    while time.monotonic() - t0 < 30 and rolled is None:
        _, codes = traffic.send(20)
        codes_total.update(codes)
        st = _state(dep)
        if st.get("rolled_back") and st["seq"] > before + 1:
            rolled = st
    took = time.monotonic() - t0
    print(f"automatic rollback {took:.1f} s after the canary started; answers meanwhile {dict(codes_total)}")
    assert rolled is not None, f"no automatic rollback in 30 s; answers {codes_total}"
    assert rolled["by"] == "controller" and rolled["canary"] is None and "error rate" in rolled["why"]
    assert codes_total[500] > 0  # the canary really failed requests
    dep.wait_applied(rolled["seq"], 60)
    versions, codes = traffic.send(100)
    assert codes == {200: 100} and versions == {"1": 100}


def test_a_canary_whose_policy_changed_after_registration_is_refused(dep: Any, local_cluster: Any) -> None:
    """The version's file is replaced after the registry checked it: its replicas refuse to load it,
    the controller removes the canary (saying why) and the live version keeps serving."""
    from rlfleet.deployments import version_from_run

    from .policies import argmax_onnx, failing_onnx, write_policy_run

    store = local_cluster.store()
    run_id = write_policy_run(store, "rl-20000101-000000-7a3e3e", argmax_onnx())
    reg = dep.registry
    n = reg.add_version(version_from_run(store, run_id))
    Path(store.root_path, "runs", run_id, "policy.onnx").write_bytes(failing_onnx())  # tampered
    st = reg.state()
    mine = reg.write_state(st, {"canary": n, "canary_weight": 50, "replicas": {**st["replicas"], str(n): 1}},
                           "canary with a tampered policy")
    with pytest.raises(DeploymentError, match=rf"automatic rollback: replicas of v{n} cannot start: refused: .*"
                                              "the policy changed after it was deployed"):
        dep.wait_applied(mine["seq"], 120)
    now = reg.state()
    assert now["canary"] is None and now["by"] == "controller" and now["rolled_back"]["version"] == n
    versions, codes = Traffic(dep).send(50)
    assert codes == {200: 50} and versions == {"1": 50}


def test_shadow_sees_a_copy_and_agreement_is_measured(dep: Any, serving_runs: dict[str, str]) -> None:
    dep.shadow(serving_runs["ppo"])  # the live policy itself: every answer must agree
    versions, codes = Traffic(dep).send(200)
    assert codes == {200: 200} and set(versions) == {"1"}  # the shadow answers nobody
    deadline = time.monotonic() + 20
    sh: dict[str, Any] = {}

    def accounted() -> int:
        return sum(sh.get(k, 0) for k in ("compared", "failed", "dropped"))

    while time.monotonic() < deadline:
        sh = _observed(dep).get("shadow") or {}
        if accounted() >= 200:
            break
        time.sleep(0.3)
    print(f"shadow: {sh}")
    # every copy is compared, or dropped when 64 copies already wait for the shadow (a loaded machine:
    # the live answers never wait for the shadow); none fails, and every compared answer agrees
    assert accounted() == 200 and sh["failed"] == 0, sh
    assert sh["compared"] >= 100 and sh["agreement"] == 1.0, sh
    dep.shadow(None)
    assert not [r for r in _observed(dep)["replicas"] if r["role"] == "shadow"]


def test_autoscale_on_in_flight_requests(dep: Any, tmp_path: Path) -> None:
    dep.autoscale(1, 3, target_inflight=2, down_after_s=2)
    ep = dep.endpoint()
    script = tmp_path / "post.lua"
    script.write_text(f'wrk.method = "POST"\nwrk.body = {json.dumps(json.dumps(OBS))}\n'
                      f'wrk.headers["Content-Type"] = "application/json"\n'
                      f'wrk.headers["Authorization"] = "Bearer {ep.token}"\n')
    script.chmod(0o600)
    wrk = subprocess.Popen(["wrk", "-t2", "-c16", "-d10s", "-s", str(script), ep.act_url],
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    peak, inflight = 1, 0.0
    try:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and wrk.poll() is None:
            obs = _observed(dep)
            live = (obs.get("versions") or {}).get("1", {})
            peak = max(peak, int(live.get("replicas") or 1))
            inflight = max(inflight, float((obs.get("autoscale") or {}).get("inflight_avg") or 0))
            time.sleep(0.3)
    finally:
        out = wrk.communicate(timeout=40)[0]
    t0 = time.monotonic()
    while time.monotonic() - t0 < 40 and (_observed(dep).get("versions") or {}).get("1", {}).get("replicas") != 1:
        time.sleep(0.5)
    back = time.monotonic() - t0
    print(f"autoscale: peak {peak} replicas at in-flight avg up to {inflight:.1f} (target 2 each); back to 1 "
          f"replica {back:.1f} s after the load; wrk: {' '.join(out.split()[-12:])}")
    assert peak >= 2 and inflight > 2
    assert "requests in" in out and "Non-2xx" not in out, out  # scaling up and down failed no request
    assert (_observed(dep).get("versions") or {}).get("1", {}).get("replicas") == 1
    dep.autoscale(None)
    dep.scale(2)


def test_a_killed_controller_leaves_nothing_and_the_next_change_restarts_it(dep: Any) -> None:
    obs = _observed(dep)
    url = dep.endpoint().url
    pids = [obs["balancer"]["pid"], *(r["pid"] for r in obs["replicas"])]
    os.kill(obs["controller_pid"], signal.SIGKILL)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and any(_alive(p) for p in pids):
        time.sleep(0.2)
    assert not any(_alive(p) for p in pids), "HAProxy or a replica outlived its controller"
    dep.scale(2)  # any change starts a new controller when none runs
    assert dep.endpoint().url == url and _observed(dep)["controller_pid"] != obs["controller_pid"]
    versions, codes = Traffic(dep).send(50)
    assert codes == {200: 50} and versions == {"1": 50}


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([RLFLEET, *args], capture_output=True, text=True, timeout=120)


def _registry_files(reg: Registry) -> dict[str, str]:
    root = Path(reg.store.root_path, "deployments", reg.name)
    return {str(p.relative_to(root)): p.read_text() for p in sorted(root.rglob("*.json"))
            if p.parts[len(root.parts)] in ("versions", "state", "endpoint.json")}  # not the observations


@pytest.mark.parametrize("args, message", [
    (["deploy", "nosuch", "--promote"], "no deployment 'nosuch' on target 'local'"),
    (["deploy", "nosuch", "--from", "{ppo}", "--canary", "10"], "no deployment 'nosuch' serves"),
    (["deploy", NAME, "--from", "{argmax}", "--canary", "0"], "--canary 0: the canary's weight is a whole percentage"),
    (["deploy", NAME, "--from", "{argmax}", "--canary", "101"], "--canary 101"),
    (["deploy", NAME, "--canary", "50"], "has no canary to weigh"),
    (["deploy", NAME, "--promote"], "has no canary to promote (live is v1)"),
    (["deploy", NAME, "--from", "{other}", "--canary", "10"], "does not take the live v1's observations"),
    (["deploy", NAME, "--from", "rl-20000101-000000-000000", "--canary", "10"], "does not exist"),
    (["deploy", NAME, "--replicas", "0"], "--replicas 0: give a whole number from 1 to 16"),
    (["deploy", NAME, "--promote", "--rollback"], "cannot be combined"),
    (["deploy", NAME, "--autoscale", "3:1"], "the minimum is over the maximum"),
    (["deploy", NAME, "--autoscale", "lots"], "give MIN:MAX replicas"),
    (["undeploy", "nosuch"], "no deployment 'nosuch'"),
])
def test_bad_input_one_line_nothing_changed(dep: Any, serving_runs: dict[str, str], args: list[str],
                                            message: str) -> None:
    reg = dep.registry
    before = _registry_files(reg)
    out = _cli(*[a.format(**serving_runs) for a in args])
    lines = out.stderr.strip().splitlines()
    assert out.returncode != 0 and len(lines) == 1 and lines[0].startswith("rlfleet: error: "), out.stderr
    assert message in lines[0], lines[0]
    assert "Traceback" not in out.stderr + out.stdout
    assert _registry_files(reg) == before
    assert not Path(reg.store.root_path, "deployments", "nosuch").exists()


def test_status_and_list_from_the_cli(dep: Any) -> None:
    before = (_observed(dep).get("versions") or {}).get("1", {}).get("requests_total", 0)
    Traffic(dep).send(100)  # latency figures cover the SLO window (3 s here)
    t_sent = time.monotonic()
    # status.json is the controller's last observation (a round a second, each replica answering
    # for the round before at the latest): wait for one that counts the 100 requests
    _wait(lambda: (_observed(dep).get("versions") or {}).get("1", {}).get("requests_total", 0) >= before + 100, 20,
          "a status that counts the 100 requests")
    print(f"requests_total {before} -> {_observed(dep)['versions']['1']['requests_total']}: "
          f"counted {time.monotonic() - t_sent:.2f} s after the last request")
    out = _cli("deploy", NAME, "--status", "--json")
    assert out.returncode == 0, out.stderr
    doc = json.loads(out.stdout)
    assert doc["state"]["live"] == 1 and doc["observed"]["versions"]["1"]["replicas"] == 2
    assert [v["version"] for v in doc["versions"]] == [1, 2, 3, 4, 5]
    assert doc["observed"]["versions"]["1"]["requests_total"] >= before + 100
    text = _cli("deploy", NAME, "--status")
    assert text.returncode == 0 and "p99 ms" in text.stdout and "live" in text.stdout, text.stderr
    listed = json.loads(_cli("deployments", "--json").stdout)
    # (the session's store also holds other tests' deployments, e.g. the conformance scenario's)
    assert [r["deployment"] for r in listed].count(NAME) == 1
    assert "token" not in out.stdout.lower().replace("token_sha256", "")


def test_undeploy_leaves_no_process_and_no_port(dep: Any) -> None:
    obs = _observed(dep)
    pids = [r["pid"] for r in obs["replicas"]] + [obs["balancer"]["pid"]]
    port = obs["balancer"]["port"]
    assert all(_alive(p) for p in pids)
    out = _cli("undeploy", NAME)
    assert out.returncode == 0, out.stderr
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and any(_alive(p) for p in pids):
        time.sleep(0.2)
    assert not any(_alive(p) for p in pids)
    with socket.socket() as s:  # the namespace's port: nothing listens behind the forwarder
        s.settimeout(3)
        try:
            s.connect(("127.0.0.1", port))
            s.sendall(b"GET /healthz HTTP/1.0\r\n\r\n")
            answer = s.recv(100)
        except OSError:
            answer = b""
    assert answer == b""
    assert _state(dep)["active"] is False and [v["version"] for v in dep.versions()] == [1, 2, 3, 4, 5]
    with pytest.raises(RlfleetError, match="no token for deployment"):
        get_deployment(NAME, "local").endpoint()
