"""What only the aws-node target shows (the scenarios in test_scenarios.py run on it unchanged):
the hosts really came up from the rendered user data with the node identity, IMDSv2 only, the
token from Secrets Manager, the CA published to the bucket, the worker joined the head, and a run
placed on the worker works."""

from __future__ import annotations

import pytest

from rlfleet import RunSpec, RunStatus, submit_run

from .awsnode import AwsNodeCluster
from .targets import ConformanceTarget

pytestmark = [pytest.mark.integration, pytest.mark.onprem, pytest.mark.slow, pytest.mark.timeout(2400)]


def test_nodes_bootstrapped_from_the_rendered_user_data(aws_node_cluster: AwsNodeCluster) -> None:
    cl = aws_node_cluster
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
        # the node identity came from the instance metadata, with an IMDSv2 token every time
        by_node = cl.cloud.imds_requests(host.ip)
        assert ("GET", "/latest/meta-data/iam/security-credentials/rlfleet-node", 200) in by_node
        assert all(status != 401 for _, _, status in by_node), by_node
    # the head published its CA to the bucket, the certificate the client pins
    assert cl.head.path("/etc/rlfleet/tls/ca.pem").read_bytes().strip()


def test_imds_refuses_v1(aws_node_cluster: AwsNodeCluster) -> None:
    r = aws_node_cluster.head.nsexec("curl", "-s", "-o", "/dev/null", "-w", "%{http_code}",
                                     "http://169.254.169.254/latest/meta-data/instance-id", check=False)
    assert r.stdout == "401"


def test_a_run_placed_on_the_worker_succeeds(conformance_aws_node: ConformanceTarget) -> None:
    cl = conformance_aws_node.cluster
    assert cl.workers, "the aws-node cluster has no worker"
    # only the worker has a GPU resource (the head starts with --num-gpus=0): a run asking for
    # one can only be placed there
    run = submit_run(RunSpec(kind="train", agent="random", budget={"steps": 200},
                             resources={"cpus": 0.5, "gpus": 1}), target=conformance_aws_node.target)
    assert run.wait(timeout=conformance_aws_node.timeout) is RunStatus.SUCCEEDED, run.failure_reason()
    run.artifacts().verify()
    worker_logs = [w.path(f"/var/lib/rlfleet/ray/session_latest/logs/job-driver-{run.run_id}.log")
                   for w in cl.workers]
    assert any(p.exists() for p in worker_logs), "the run's driver log is not on the worker"
    assert not cl.head.path(f"/var/lib/rlfleet/ray/session_latest/logs/job-driver-{run.run_id}.log").exists()
