"""Deploy endpoints on cloud targets get the TLS front on-prem has (nginx, the head's certificate):
what the AWS and GCP programs render for it, under Pulumi's mocks. The real thing (nginx on a node
booted from this user data, a deploy run reached over https with the pinned CA) is the conformance
scenario on aws-node (tests/conformance)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from rlfleet import stack_outputs as so

from .conftest import Built

SERVE = list(range(8600, 8608))


def _aws_script(stack: Built, role: str) -> str:
    inst = next(i for i in stack.of("aws:ec2/instance:Instance") if i.inputs["tags"]["rlfleet:role"] == role)
    return str(yaml.safe_load(inst.inputs["userData"])["write_files"][0]["content"])


def _gcp_script(stack: Built, role: str) -> str:
    suffix = "-head" if role == "head" else "-worker-0"
    vm = next(v for v in stack.of("gcp:compute/instance:Instance") if v.inputs["name"].endswith(suffix))
    return str(vm.inputs["metadata"]["startup-script"])


def test_aws_deploy_ports_open_to_the_admin_cidrs_only(aws: Built) -> None:
    rules = aws.one("aws:ec2/securityGroup:SecurityGroup").inputs["ingress"]
    deploy = [r for r in rules if r.get("fromPort") == SERVE[0]]
    assert len(deploy) == 1, rules
    assert deploy[0]["toPort"] == SERVE[-1] and deploy[0]["protocol"] == "tcp"
    assert deploy[0]["cidrBlocks"] == ["203.0.113.0/24"] and deploy[0]["ipv6CidrBlocks"] == ["2001:db8::/48"]


def test_gcp_deploy_ports_open_to_the_admin_cidrs_only(gcp: Built) -> None:
    fws = {r.name.rsplit("-", 1)[1]: r.inputs for r in gcp.of("gcp:compute/firewall:Firewall")}
    assert fws["admin"]["sourceRanges"] == ["203.0.113.0/24"]
    assert f"{SERVE[0]}-{SERVE[-1]}" in fws["admin"]["allows"][0]["ports"]


@pytest.mark.parametrize("cloud", ["aws", "gcp"])
def test_serve_ports_in_the_stack_outputs_and_the_target(cloud: str, aws: Built, gcp: Built,
                                                         tmp_path: Path) -> None:
    from rlfleet.provisioners.pulumi_stack import target_from_outputs

    outputs = (aws if cloud == "aws" else gcp).outputs
    assert outputs[so.OUTPUT_SERVE_PORTS] == SERVE
    ca = tmp_path / "ca.pem"
    ca.write_text("-----BEGIN CERTIFICATE-----\n")
    t = target_from_outputs("c", outputs, kind=cloud, ca_cert=str(ca))
    assert t.serve_ports == tuple(SERVE)  # the envelope carries them to the deploy run


@pytest.mark.parametrize("cloud", ["aws", "gcp"])
def test_head_fronts_the_api_and_the_deploy_ports_with_nginx(cloud: str, aws: Built, gcp: Built) -> None:
    script = _aws_script(aws, "head") if cloud == "aws" else _gcp_script(gcp, "head")
    public = "198.51.100.7" if cloud == "aws" else "203.0.113.50"
    assert "tls_proxy" not in script  # nginx replaced the stdlib proxy
    # the head installs nginx (the front) and haproxy (a deployment's balancer) when the image lacks them
    front = script[script.index("install_front() {"):]
    front = front[:front.index("\n}\n")]
    assert "want+=(nginx)" in front and "want+=(haproxy)" in front
    assert re.search(r'install "\$\{want\[@\]\}"', front)
    assert re.search(r"^\s*install_front$", script, re.M)  # and the head calls it
    conf = script[script.index("render_nginx_conf()"):]
    assert "ssl_protocols TLSv1.2 TLSv1.3;" in conf
    assert "proxy_pass http://127.0.0.1:8265;" in conf  # the Jobs API behind the API port
    assert "listen 0.0.0.0:${API_PORT} ssl;" in conf
    # one server per deploy port, on the node's addresses (127.0.0.1:<p> stays the policy server's)
    assert f"SERVE_PORTS='{','.join(map(str, SERVE))}'" in script
    assert 'listen ${addr}:${p} ssl;' in conf and "proxy_pass http://127.0.0.1:${p};" in conf
    # the runtime learns the front from the Ray unit (as on-prem): the address clients use
    assert "Environment=RLFLEET_SERVE_TLS_ADDRESS=${HEAD_PUBLIC_IP}" in script
    assert "Environment=RLFLEET_SERVE_TLS_PORTS=${SERVE_PORTS}" in script
    # deploy runs are placed on the head, the node with the front and the certificate
    assert f"SERVE_FRONT_RESOURCE='{so.RAY_RESOURCE_SERVE_FRONT}'" in script
    assert "'--resources={\\\"${SERVE_FRONT_RESOURCE}\\\": ${serve_slots}}'" in script
    assert f"HEAD_PUBLIC_IP='{public}'" in script


@pytest.mark.parametrize("cloud", ["aws", "gcp"])
def test_workers_have_no_deploy_front(cloud: str, aws: Built, gcp: Built) -> None:
    script = _aws_script(aws, "worker") if cloud == "aws" else _gcp_script(gcp, "worker")
    worker_branch = script[script.index('  ray_args="--address='):script.index("cat >/etc/systemd/system/rlfleet-ray")]
    # no deploy-run resource and no front in the unit (the rendered units are checked on aws-node)
    assert so.RAY_RESOURCE_SERVE_FRONT not in worker_branch and 'serve_front_env=""' in worker_branch


@pytest.mark.parametrize(("kind", "serve_ports", "run_kind", "placed"), [
    ("aws", tuple(SERVE), "deploy", True),
    ("gcp", tuple(SERVE), "deploy", True),
    ("aws", tuple(SERVE), "train", False),  # training goes wherever Ray has room
    ("aws", (), "deploy", False),  # a stack without the serve_ports output: no such resource on it
    ("onprem", tuple(SERVE), "deploy", False),  # every on-prem node has its own front
])
def test_deploy_runs_on_cloud_targets_ask_for_the_heads_front(kind: str, serve_ports: tuple, run_kind: str,
                                                             placed: bool) -> None:
    """What submit_run passes to the Jobs API as entrypoint_resources (the aws-node conformance
    target shows Ray then runs the deploy run on the head)."""
    from rlfleet.runs import _placement
    from rlfleet.spec import RunSpec
    from rlfleet.targets import Target

    t = Target(name="t", kind=kind, ray_address="https://198.51.100.7:8443", token_source="env:T",
               artifact_root="s3://b/rlfleet", serve_ports=serve_ports)
    spec = RunSpec(kind=run_kind, source="rl-20261130-000000-abcdef") if run_kind == "deploy" else RunSpec(kind="train")
    assert _placement(t, spec) == ({so.RAY_RESOURCE_SERVE_FRONT: 1} if placed else None)
