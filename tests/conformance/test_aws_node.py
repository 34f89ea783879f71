"""What only the aws-node target shows (the scenarios in test_scenarios.py run on it unchanged):
the hosts really came up from the rendered user data with the node identity, IMDSv2 only, the
token from Secrets Manager, the CA published to the bucket, nginx as the head's TLS front, the
worker joined the head, runs placed on the worker or the head (Ray's Jobs API says where their
driver ran), and the series Ray exports on a node while a run trains are the ones the CloudWatch
agent's configuration selects.

Every test takes the session's ``tgt`` with the aws-node param only, so pytest runs them together
with the aws-node scenarios (and the cluster can go when the session moves on)."""

from __future__ import annotations

import json
import re
import ssl
import urllib.parse
import urllib.request

import httpx
import pytest

from rlfleet import RunSpec, RunStatus, submit_run
from rlfleet.stack_outputs import METRIC_ENV_STEPS_TOTAL, METRIC_EPISODE_RETURN, RAY_RESOURCE_SERVE_FRONT

from .targets import ConformanceTarget, driver_ip
from .test_scenarios import _ppo_run, _wait_for

pytestmark = [pytest.mark.integration, pytest.mark.onprem, pytest.mark.slow, pytest.mark.timeout(2400),
              pytest.mark.parametrize("tgt", ["aws-node"], indirect=True)]


def test_nodes_bootstrapped_from_the_rendered_user_data(tgt: ConformanceTarget) -> None:
    cl = tgt.cluster
    for host, role in [(cl.head, "head"), *((w, "worker") for w in cl.workers)]:
        log = cl.bootstrap_log(host)
        assert f"rlfleet-bootstrap[{role}]: done" in log, log[-2000:]
        # the kit came from the stack bucket, verified by the sha256 the user data carries
        assert "installing the kit rlfleet-" in log
        # no CloudWatch agent download here: one log line, the node continues
        assert "monitoring agent setup failed; continuing without it" in log
        token = host.path("/etc/rlfleet/ray_token")
        assert token.read_text().strip() == cl.token and token.stat().st_mode & 0o777 == 0o600
        r = host.nsexec("systemctl", "is-active", "rlfleet-ray", check=False)
        assert r.stdout.strip() == "active", r.stdout + r.stderr
        # the node identity came from the instance metadata, with an IMDSv2 token every time (a 401
        # elsewhere is a tokenless probe refused, e.g. Ray's cloud detection: IMDSv1 is off)
        by_node = cl.cloud.imds_requests(host.ip)
        assert ("GET", "/latest/meta-data/iam/security-credentials/rlfleet-node", 200) in by_node
        identity = [r for r in by_node if "/iam/" in r[1] or r[1] in ("/latest/api/token",
                                                                      "/latest/meta-data/local-ipv4")]
        assert all(status == 200 for _, _, status in identity), identity
        print(f"[aws-node] {host.ip}: tokenless IMDS requests refused: {[r for r in by_node if r[2] == 401]}")
    # the head published its CA to the bucket, the certificate the client pins
    assert cl.head.path("/etc/rlfleet/tls/ca.pem").read_bytes().strip()


def test_imds_refuses_v1(tgt: ConformanceTarget) -> None:
    r = tgt.cluster.head.nsexec("curl", "-s", "-o", "/dev/null", "-w", "%{http_code}",
                                "http://169.254.169.254/latest/meta-data/instance-id", check=False)
    assert r.stdout == "401"


def test_head_tls_front_is_nginx_with_the_pinned_ca(tgt: ConformanceTarget, tmp_path) -> None:
    """The head's Jobs API as the client reaches it (the stack's ray_address): nginx, TLS 1.2+, only
    the pinned CA, Ray's token still required behind it."""
    cl = tgt.cluster
    assert cl.head.nsexec("systemctl", "is-active", "nginx", check=False).stdout.strip() == "active"
    url = tgt.target.ray_address.rstrip("/") + "/api/jobs/"
    pinned = ssl.create_default_context(cafile=tgt.target.ca_cert)
    auth = {"Authorization": f"Bearer {tgt.target.token()}"}
    r = httpx.get(url, verify=pinned, headers=auth, timeout=15)
    assert r.status_code == 200 and r.headers.get("server") == "nginx", (r.status_code, r.headers)
    assert httpx.get(url, verify=pinned, timeout=15).status_code in (401, 403)  # Ray's token auth behind TLS
    with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
        httpx.get(url, timeout=15)  # the system trust store does not vouch for the head
    old = ssl.create_default_context(cafile=tgt.target.ca_cert)
    old.minimum_version = old.maximum_version = ssl.TLSVersion.TLSv1_1
    with pytest.raises(httpx.ConnectError):
        httpx.get(url, verify=old, timeout=15)
    # the Ray units: the head offers the deploy resource and names its front; the worker neither
    head_unit = cl.head.path("/etc/systemd/system/rlfleet-ray.service").read_text()
    assert f"RLFLEET_SERVE_TLS_ADDRESS={cl.rendered.head_public_ip}" in head_unit
    assert "RLFLEET_SERVE_TLS_PORTS=" + ",".join(map(str, tgt.target.serve_ports)) in head_unit
    assert RAY_RESOURCE_SERVE_FRONT in head_unit
    for w in cl.workers:
        unit = w.path("/etc/systemd/system/rlfleet-ray.service").read_text()
        assert "RLFLEET_SERVE_TLS" not in unit and RAY_RESOURCE_SERVE_FRONT not in unit


def test_a_run_placed_on_the_worker_succeeds(tgt: ConformanceTarget) -> None:
    cl = tgt.cluster
    assert cl.workers, "the aws-node cluster has no worker"
    # only the worker has a GPU resource (the head starts with --num-gpus=0): a run asking for
    # one can only be placed there
    run = submit_run(RunSpec(kind="train", agent="random", budget={"steps": 200},
                             resources={"cpus": 0.5, "gpus": 1}), target=tgt.target)
    assert run.wait(timeout=tgt.timeout) is RunStatus.SUCCEEDED, run.failure_reason()
    run.artifacts().verify()
    assert driver_ip(tgt, run.run_id) in {w.ip for w in cl.workers}


def test_a_deploy_run_is_served_by_the_head_over_tls(tgt: ConformanceTarget) -> None:
    """A deploy run goes to the head (its rlfleet_serve_front resource), publishes
    https://<head public ip>:<deploy port> and answers there through nginx with the pinned CA."""
    cl = tgt.cluster
    src = _ppo_run(tgt)
    dep = submit_run(RunSpec(kind="deploy", source=src.run_id, deploy={"name": "aws-node-front"}), target=tgt.target)
    try:
        assert dep.wait(timeout=tgt.timeout) is RunStatus.RUNNING, dep.failure_reason()
        assert driver_ip(tgt, dep.run_id) == cl.head.ip
        ep = dep.endpoint()
        m = re.fullmatch(r"https://([0-9.]+):(\d+)", ep.url)
        assert m and m.group(1) == cl.rendered.head_public_ip and int(m.group(2)) in tgt.target.serve_ports, ep.url
        assert ep.ca_cert == tgt.target.ca_cert
        obs = [[0.0, 0.0, 0.0, 0.0]]
        r = httpx.post(ep.act_url, json={"observations": obs}, verify=ep.verify,
                       headers={"Authorization": f"Bearer {ep.token}"}, timeout=15)
        assert r.status_code == 200 and r.headers.get("server") == "nginx", (r.status_code, r.text[:300])
        # the policy server itself listens on the head's loopback only
        listening = cl.head.nsexec("ss", "-Hltn", check=False).stdout
        assert f"127.0.0.1:{m.group(2)} " in listening, listening
    finally:
        dep.cancel()
    assert _wait_for("the deploy run stopping", lambda: dep.status().is_terminal(), 120)


def test_ray_exports_the_series_the_cloudwatch_agent_selects(tgt: ConformanceTarget) -> None:
    """While a run trains, its node's Ray Prometheus endpoint (:8080, what the CloudWatch agent's
    prometheus.yaml scrapes) carries the rlfleet series with the run_id label, under the names the
    agent's EMF declaration selects and its keep rule keeps."""
    cl = tgt.cluster
    run = submit_run(RunSpec(kind="train", agent="ppo", env="CartPole-v1", budget={"steps": 200_000, "minutes": 3},
                             name="aws-node-series"), target=tgt.target)
    agent = json.loads(cl.head.path("/opt/rlfleet/monitoring/cwagent.json").read_text())
    emf = agent["logs"]["logs_collected"]["prometheus"]["emf_processor"]
    selectors = [s for d in emf["metric_declaration"] if d["dimensions"] == [["run_id"]] for s in d["metric_selectors"]]

    def samples() -> dict[str, float]:
        from prometheus_client.parser import text_string_to_metric_families

        seen: dict[str, float] = {}
        for h in cl.hosts:
            try:
                text = urllib.request.urlopen(f"http://{h.ip}:8080/metrics", timeout=5).read().decode()
            except OSError:
                continue
            for fam in text_string_to_metric_families(text):
                for s in fam.samples:
                    if s.labels.get("run_id") == run.run_id:
                        seen[s.name] = float(s.value)
        return seen if METRIC_EPISODE_RETURN in seen and METRIC_ENV_STEPS_TOTAL in seen else {}

    try:
        seen = _wait_for(f"Ray exporting {run.run_id}'s series on a node's :8080", samples, tgt.timeout, poll=3)
    finally:
        run.cancel()
    print(f"\n[aws-node] series of a training run on :8080: {sorted(seen)}")
    for name in (METRIC_EPISODE_RETURN, METRIC_ENV_STEPS_TOTAL):
        assert any(re.match(sel, name) for sel in selectors), (name, selectors)
    assert seen[METRIC_ENV_STEPS_TOTAL] > 0
