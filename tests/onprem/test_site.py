"""site.yml applied for real to a throwaway Debian host, then checked from outside and inside.

One session-scoped host (conftest.py). Tests run in file order: converge twice, look at the
running host, submit a real training run through the SDK, then tear down.
"""

from __future__ import annotations

import json
import re
import socket
import ssl
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from rlfleet.provisioners import ansible_site

from .harness import HOST_ALIAS, playbook

pytestmark = [pytest.mark.onprem, pytest.mark.slow]

RAY_API = 8443
METRICS = 9443


def _testinfra(op) -> Any:
    import testinfra

    # the host key written by the first converge is pinned (no trust on first use)
    return testinfra.get_host(
        f"ssh://root@{op.host.ip}",
        ssh_identity_file=str(op.site.ssh_key),
        ssh_extra_args=f"-o UserKnownHostsFile={op.site.known_hosts} -o StrictHostKeyChecking=yes -o BatchMode=yes "
        "-o PasswordAuthentication=no -o ConnectTimeout=10",
    )


@pytest.fixture(scope="module")
def node(onprem):
    return _testinfra(onprem)


@pytest.fixture(scope="module")
def target(onprem):
    # the target exactly as 'rlfleet target add onprem --inventory …' builds it; this machine reads
    # the NAS directory through the container's root dir (NFS is not in this kernel)
    return ansible_site.target_from(
        "onprem-test",
        inventory=str(onprem.site.inventory),
        vault_password_file=str(onprem.site.vault_password_file),
        client_artifact_root=f"file://{onprem.host.path('/mnt/rlfleet/rlfleet')}",
        env_vars={"RLFLEET_METRICS_LINGER_S": "12"},
    )


def _ssl(op, *, client: bool) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(op.site.pki_dir / "ca.crt"))
    if client:
        ctx.load_cert_chain(str(op.site.pki_dir / "clients/admin.crt"), str(op.site.pki_dir / "clients/admin.key"))
    return ctx


def _get(url: str, ctx: ssl.SSLContext, token: str | None = None, timeout: float = 10) -> tuple[int, str]:
    req = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"} if token else {})  # noqa: S310
    try:
        with urllib.request.urlopen(req, context=ctx, timeout=timeout) as r:  # noqa: S310 - test URL
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode(errors="replace")


def _prom(node, query: str) -> list[dict[str, Any]]:
    q = urllib.parse.quote(query, safe="")
    out = node.check_output(f"curl -fsS 'http://127.0.0.1:9090/api/v1/query?query={q}'")
    return json.loads(out)["data"]["result"]


# -- converge -------------------------------------------------------------------------------------

def test_first_converge_configures_a_cpu_node(onprem):
    r = onprem.first
    assert r.rc == 0 and r.failed == 0
    assert r.changed > 20, r.recap  # a bare host really got configured
    # no GPU here: the preflight says so and the host becomes a CPU node, never a failure
    assert "no NVIDIA GPU found, configured as a CPU node" in r.output
    assert "monitoring_grafana_install is false" in r.output


def test_second_converge_through_sdk_changes_nothing(onprem, target):
    lines: list[str] = []
    t0 = time.monotonic()
    assert ansible_site.up(target, echo=lines.append) == target
    onprem.figures["second_converge_s"] = time.monotonic() - t0
    recap = [ln for ln in lines if ln.startswith(f"{HOST_ALIAS}: ok=")]
    assert recap, lines[-20:]
    print(f"\n[onprem] second converge (ansible-runner) {onprem.figures['second_converge_s']:.0f} s: {recap[-1]}")
    onprem.figures["second_changed"] = int(recap[-1].split("changed=")[1].split()[0])
    assert " changed=0 " in recap[-1], [ln for ln in lines if ln.startswith("  changed ")]
    assert any("[1] " in ln for ln in lines)  # progress is shown task by task


def test_gpu_required_fails_with_a_clear_message(onprem):
    r = playbook(onprem.site, onprem.workdir, "playbooks/gpu.yml", "-e", "gpu_require=true")
    assert r.rc != 0
    assert f"{HOST_ALIAS} has no NVIDIA GPU on its PCI bus and gpu_require is true" in r.output.replace("\n", " ")


# -- the running host -----------------------------------------------------------------------------

@pytest.mark.parametrize(
    "unit", ["rlfleet-ray-head", "nginx", "prometheus", "prometheus-node-exporter", "nftables", "ssh"]
)
def test_service_active_and_enabled(node, unit):
    svc = node.service(unit)
    assert svc.is_enabled, unit
    assert node.run(f"systemctl is-active {unit}").stdout.strip() == "active", unit


def test_haproxy_installed_with_its_distro_service_off(node):
    """tls_front installs haproxy for the named deployments' controllers (docs/serving.md), which run
    their own HAProxy as the Ray user; the distro's haproxy.service stays stopped and disabled."""
    assert node.package("haproxy").is_installed and node.file("/usr/sbin/haproxy").exists
    assert node.run("systemctl is-enabled haproxy").stdout.strip() == "disabled"
    assert node.run("systemctl is-active haproxy").stdout.strip() == "inactive"


def test_ssh_is_key_only_and_secrets_are_owner_only(node):
    conf = node.check_output("sshd -T")
    assert "passwordauthentication no" in conf
    assert "kbdinteractiveauthentication no" in conf
    token = node.file("/etc/rlfleet/ray_token")
    assert token.user == "rlfleet" and token.mode == 0o600
    assert node.file("/etc/rlfleet/tls/node.key").mode == 0o600
    assert not node.file("/etc/rlfleet/tls/ca.key").exists  # the CA key stays on the controller
    unit = node.file("/etc/systemd/system/rlfleet-ray-head.service").content_string
    assert "--num-gpus=0" in unit and "Restart=on-failure" in unit and "RAY_AUTH_MODE=token" in unit


def test_listeners_are_loopback_or_behind_tls(node, onprem):
    listen = node.check_output("ss -Hltn")
    ip = onprem.host.ip
    assert "127.0.0.1:9090 " in listen and "127.0.0.1:9100 " in listen and "127.0.0.1:8265 " in listen
    assert f"{ip}:{RAY_API} " in listen and f"{ip}:{METRICS} " in listen
    assert "0.0.0.0:9090 " not in listen and "0.0.0.0:8265 " not in listen and "0.0.0.0:80 " not in listen


def test_prometheus_ready_and_all_targets_up(node):
    assert "Ready" in node.check_output("curl -fsS http://127.0.0.1:9090/-/ready")
    deadline = time.monotonic() + 90
    while True:
        data = json.loads(node.check_output("curl -fsS http://127.0.0.1:9090/api/v1/targets"))
        active = data["data"]["activeTargets"]
        health = {(t["labels"]["job"], t["scrapeUrl"]): t["health"] for t in active}
        jobs = {job for job, _ in health}
        if {"node", "ray", "prometheus"} <= jobs and all(h == "up" for h in health.values()):
            break
        if time.monotonic() > deadline:
            pytest.fail(f"Prometheus targets not all up after 90 s: {health} "
                        f"{[t.get('lastError') for t in active]}")
        time.sleep(3)
    assert any(url.startswith("https://") and url.endswith("/ray/metrics") for _, url in health)
    assert _prom(node, 'up{job="node"}')[0]["value"][1] == "1"


def test_node_metrics_over_the_veth_need_a_client_certificate(onprem):
    url = f"https://{onprem.host.ip}:{METRICS}/node/metrics"
    status, body = _get(url, _ssl(onprem, client=True))
    assert status == 200 and "node_cpu_seconds_total" in body
    status, body = _get(url, _ssl(onprem, client=False))
    assert status == 400 and "No required SSL certificate" in body


def test_firewall_drops_ports_it_does_not_allow(onprem, node):
    ip = onprem.host.ip
    # Ray's GCS listens on every address (token auth, gRPC TLS), but only cluster hosts may reach it
    assert re.search(r"(\*|0\.0\.0\.0|\[::\]):6379 ", node.check_output("ss -Hltn"))
    for port in (6379, 8080, 22222):
        with pytest.raises((TimeoutError, socket.timeout)):  # dropped: no RST, no answer
            socket.create_connection((ip, port), timeout=3).close()
    socket.create_connection((ip, RAY_API), timeout=3).close()  # an admin port answers
    counters = node.check_output("nft list chain inet rlfleet input")
    assert "policy drop" in counters


def test_ray_api_needs_tls_and_the_token(onprem):
    ctx = _ssl(onprem, client=False)
    url = f"https://{onprem.host.ip}:{RAY_API}/api/jobs/"
    assert _get(url, ctx)[0] == 401
    assert _get(url, ctx, token="wrong-" + onprem.site.token)[0] == 403
    status, body = _get(url, ctx, token=onprem.site.token)
    assert status == 200 and isinstance(json.loads(body), list)
    # a client that does not trust the cluster CA cannot even connect
    with pytest.raises(urllib.error.URLError, match="CERTIFICATE_VERIFY_FAILED"):
        _get(url, ssl.create_default_context(), token=onprem.site.token)


# -- a real run through the SDK -------------------------------------------------------------------

def test_submit_run_trains_and_lands_on_the_nas(onprem, target, node):
    from rlfleet import RunSpec, RunStatus, submit_run

    spec = RunSpec(kind="train", agent="ppo", env="CartPole-v1", seed=1, budget={"steps": 4096},
                   name="onprem-smoke")
    t0 = time.monotonic()
    run = submit_run(spec, target=target)
    status = run.wait(timeout=300)
    onprem.figures["train_run_s"] = time.monotonic() - t0
    assert status == RunStatus.SUCCEEDED, run.logs()[-3000:]
    arts = run.artifacts()
    manifest = arts.verify()
    assert {"spec.json", "metrics.jsonl", "policy.onnx"} <= set(manifest.files)
    # on the host, under the NAS mount path, owned by the service user
    run_dir = f"/mnt/rlfleet/rlfleet/runs/{run.run_id}"
    assert node.file(f"{run_dir}/manifest.json").is_file
    assert node.file(run_dir).user == "rlfleet"
    onprem.figures["run_id"] = run.run_id  # type: ignore[assignment]


def test_prometheus_scraped_the_runs_episode_return(onprem, node):
    run_id = onprem.figures.get("run_id")
    assert run_id, "the training run did not complete"
    query = f'ray_rlfleet_episode_return{{run_id="{run_id}"}}'
    deadline = time.monotonic() + 60
    while not (result := _prom(node, f"last_over_time({query}[10m])")):
        if time.monotonic() > deadline:
            pytest.fail(f"Prometheus has no {query}")
        time.sleep(3)
    labels = result[0]["metric"]
    assert labels["kind"] == "train" and labels["target"] == "onprem-test"
    assert float(result[0]["value"][1]) > 0


# -- a deployment behind the node's TLS front -----------------------------------------------------

def test_a_deployment_is_served_over_the_nodes_tls_front_with_its_own_token(onprem, target, node):
    """Issue 10.7 (remote half): the deploy run binds 127.0.0.1 on the node; nginx serves it over
    TLS (cluster CA) on the node's address; the deployment's own token opens it and nothing else."""
    import httpx

    from rlfleet import RunSpec, RunStatus, submit_run
    from rlfleet.errors import RlfleetError

    run_id = onprem.figures.get("run_id")
    assert run_id, "the training run did not complete"
    assert target.serve_ports == ansible_site.DEFAULT_SERVE_PORTS  # read from the inventory
    ip = onprem.host.ip
    body = {"observations": [[0.0, 0.0, 0.0, 0.0], [0.01, -0.2, 0.03, 0.3]]}
    # plain HTTP on a routable address is refused before anything listens
    bad = submit_run(RunSpec(kind="deploy", source=run_id, deploy={"host": "0.0.0.0"}), target=target)
    assert bad.wait(timeout=300) is RunStatus.FAILED
    assert "deploy.host 0.0.0.0: on this target the policy server binds 127.0.0.1" in (bad.failure_reason() or "")

    t0 = time.monotonic()
    dep = submit_run(RunSpec(kind="deploy", source=run_id, deploy={"name": "onprem-tls"}), target=target)
    try:
        assert dep.wait(timeout=300) is RunStatus.RUNNING, dep.failure_reason()
        ep = dep.endpoint()
        onprem.figures["deploy_serving_s"] = round(time.monotonic() - t0, 1)
        scheme, _, port_s = ep.url.rpartition(":")
        port = int(port_s)
        assert scheme == f"https://{ip}" and port in target.serve_ports, ep.url  # learnt from the node
        assert ep.ca_cert == target.ca_cert
        auth = {"Authorization": f"Bearer {ep.token}"}
        with httpx.Client(verify=ep.verify, timeout=15) as c:  # TLS, pinned cluster CA, over the veth
            t1 = time.monotonic()
            r = c.post(ep.act_url, json=body, headers=auth)
            onprem.figures["deploy_first_act_ms"] = round(1000 * (time.monotonic() - t1), 1)
            assert r.status_code == 200, r.text
            actions = r.json()["actions"]
            assert len(actions) == 2 and all(a in (0, 1) for a in actions)
            cluster = {"Authorization": f"Bearer {onprem.site.token}"}
            assert c.post(ep.act_url, json=body, headers=cluster).status_code == 403  # not the cluster's token
            assert c.post(ep.act_url, json=body).status_code == 401
            # the deployment's token does not open the Ray API
            assert c.get(f"{target.ray_address}/api/jobs/", headers=auth).status_code in (401, 403)
        with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):  # only the cluster CA is trusted
            httpx.post(ep.act_url, json=body, headers=auth, timeout=15, verify=ssl.create_default_context())
        # plain HTTP to the TLS port: nginx refuses it, nothing reaches the policy
        r = httpx.post(f"http://{ip}:{port}{ep.path}", json=body, headers=auth, timeout=15)
        assert r.status_code == 400 and "actions" not in r.text, r.text
        # the policy server listens on loopback only, nginx on the node's address
        listen = [ln for ln in node.check_output("ss -Hltnp").splitlines() if f":{port} " in ln]
        assert any(f"127.0.0.1:{port} " in ln and "python" in ln for ln in listen), listen
        assert any(f"{ip}:{port} " in ln and "nginx" in ln for ln in listen), listen
        assert len(listen) == 2, listen
        # every deploy port is open to the admin network (the firewall) and speaks TLS only
        for p in target.serve_ports:
            socket.create_connection((ip, p), timeout=3).close()
        unit = node.file("/etc/systemd/system/rlfleet-ray-head.service").content_string
        assert f"RLFLEET_SERVE_TLS_ADDRESS={ip}" in unit
    finally:
        dep.cancel()
    deadline = time.monotonic() + 120
    while not dep.status().is_terminal():
        assert time.monotonic() < deadline, "the deploy run did not stop within 120 s of cancel()"
        time.sleep(1)
    assert dep.status() is RunStatus.CANCELLED
    with pytest.raises(RlfleetError, match="no token for deployment"):  # revoked on this machine
        dep.endpoint()
    # the endpoint stops answering: nginx has nothing behind the port any more
    r = httpx.post(ep.act_url, json=body, headers=auth, timeout=15, verify=ep.verify)
    assert r.status_code == 502 and "actions" not in r.text


# -- teardown -------------------------------------------------------------------------------------

def test_teardown_removes_the_runtime_and_keeps_the_data(onprem, target, node):
    plan = ansible_site.plan_destroy(target, delete_data=False)
    assert any("kept: artifact data" in p for p in plan)
    t0 = time.monotonic()
    ansible_site.destroy(target, delete_data=False, echo=lambda _: None)
    onprem.figures["teardown_s"] = time.monotonic() - t0
    assert ansible_site.scan_leftovers(target) == []
    assert not node.file("/opt/rlfleet").exists
    assert node.run("systemctl is-active rlfleet-ray-head").stdout.strip() != "active"
    run_id = onprem.figures["run_id"]
    assert Path(onprem.host.path(f"/mnt/rlfleet/rlfleet/runs/{run_id}/manifest.json")).is_file()
    # idempotent: tearing down a torn-down host is fine
    ansible_site.destroy(target, delete_data=False, echo=lambda _: None)
    print(f"\n[onprem] figures: {json.dumps(onprem.figures, default=str)}")
