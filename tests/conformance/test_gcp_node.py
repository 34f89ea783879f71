"""What only the gcp-node target shows (the scenarios in test_scenarios.py run on it unchanged):
the hosts really came up from the rendered startup-script, read from the metadata server as the
guest agent reads it; the node identity is the service account's metadata token; the Ray token
came from Secret Manager with that token; the kit came from the stack bucket; the head published
its CA there; the worker joined the head and a run placed on it works (Ray's Jobs API says where
its driver ran).

Every test takes the session's ``tgt`` with the gcp-node param only, so pytest runs them together
with the gcp-node scenarios (and the cluster can go when the session moves on)."""

from __future__ import annotations

import pytest

from rlfleet import RunSpec, RunStatus, submit_run

from .targets import ConformanceTarget, driver_ip

pytestmark = [pytest.mark.integration, pytest.mark.onprem, pytest.mark.slow, pytest.mark.timeout(2400),
              pytest.mark.parametrize("tgt", ["gcp-node"], indirect=True)]
MD = "/computeMetadata/v1/instance"


def test_nodes_started_from_the_rendered_startup_script(tgt: ConformanceTarget) -> None:
    cl = tgt.cluster
    r = cl.rendered
    for host, inst in zip(cl.hosts, [r.head, *r.workers], strict=True):
        # the script the node ran is the rendered metadata value, byte for byte
        assert host.path("/var/lib/google/startup-script").read_text() == inst.metadata["startup-script"]
        log = cl.bootstrap_log(host)
        assert f"rlfleet-bootstrap[{inst.role}]: done" in log, log[-2000:]
        assert "installing the kit rlfleet-" in log  # from the bucket, sha256-checked by the script
        assert host.path("/opt/rlfleet/kit/installed.sha256").read_text().split()[0] in inst.metadata["startup-script"]
        # no Ops Agent download here: one log line, the node continues with the agent's config written
        assert "monitoring agent setup failed; continuing without it" in log
        token = host.path("/etc/rlfleet/ray_token")
        assert token.read_text().strip() == cl.token and token.stat().st_mode & 0o777 == 0o600
        active = host.nsexec("systemctl", "is-active", "rlfleet-ray", check=False)
        assert active.stdout.strip() == "active", active.stdout + active.stderr
        # the node's own address and its service account's token came from the metadata server
        reqs = cl.cloud.metadata_requests(host.ip)
        assert ("GET", f"{MD}/attributes/startup-script", 200) in reqs
        assert ("GET", f"{MD}/network-interfaces/0/ip", 200) in reqs
        assert any(p.endswith("/token") and s == 200 for _, p, s in reqs), reqs
        assert all(s != 403 for _, p, s in reqs if p.startswith("/computeMetadata/")), reqs
        # Ray runs with its usage stats off (as on local and on-prem): the unit's main process has it
        pid = host.nsexec("systemctl", "show", "-p", "MainPID", "--value", "rlfleet-ray").stdout.strip()
        environ = host.nsexec("cat", f"/proc/{pid}/environ").stdout.split("\0")
        assert "RAY_USAGE_STATS_ENABLED=0" in environ
        logs = host.nsexec("grep", "-rl", "Usage reporting is enabled", "/var/lib/rlfleet/ray/session_latest/logs",
                           check=False)
        assert logs.stdout == "", logs.stdout
    # every secret read carried a token the metadata server issued to a node of this cluster
    sm = cl.cloud.secret_manager
    assert sm is not None
    secret_path = f"/v1/projects/{r.project}/secrets/{r.secret_id}/versions/latest:access"
    assert {(ip, p, s) for ip, p, s in sm.requests} == {(h.ip, secret_path, 200) for h in cl.hosts}
    # the head published its CA certificate to the bucket: the object the client pins
    ca = cl.cloud.storage_client().bucket(r.bucket).blob("rlfleet/cluster/head-ca.pem").download_as_bytes()
    assert ca == cl.head.path("/etc/rlfleet/tls/ca.pem").read_bytes()


def test_metadata_server_needs_the_flavor_header(tgt: ConformanceTarget) -> None:
    head = tgt.cluster.head
    url = f"http://metadata.google.internal{MD}/service-accounts/default/token"
    without = head.nsexec("curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", url, check=False)
    assert without.stdout == "403"
    forwarded = head.nsexec("curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", "-H", "Metadata-Flavor: Google",
                            "-H", "X-Forwarded-For: 10.0.0.1", url, check=False)
    assert forwarded.stdout == "403"


def test_secret_manager_refuses_a_token_the_metadata_server_did_not_issue(tgt: ConformanceTarget) -> None:
    cl = tgt.cluster
    sm = cl.cloud.secret_manager
    assert sm is not None
    url = f"{sm.endpoint}v1/projects/{cl.rendered.project}/secrets/{cl.rendered.secret_id}/versions/latest:access"
    r = cl.head.nsexec("curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", "-H", "Authorization: Bearer forged",
                       url, check=False)
    assert r.stdout == "401"


def test_a_run_placed_on_the_worker_succeeds(tgt: ConformanceTarget) -> None:
    cl = tgt.cluster
    assert cl.workers, "the gcp-node cluster has no worker"
    # only the worker has a GPU resource (the head starts with --num-gpus=0): a run asking for
    # one can only be placed there
    run = submit_run(RunSpec(kind="train", agent="random", budget={"steps": 200},
                             resources={"cpus": 0.5, "gpus": 1}), target=tgt.target)
    assert run.wait(timeout=tgt.timeout) is RunStatus.SUCCEEDED, run.failure_reason()
    assert driver_ip(tgt, run.run_id) in {w.ip for w in cl.workers}
    files = tgt.own_files(run.run_id)  # written by the worker into the bucket
    assert "manifest.json" in files
    run.artifacts().verify()
