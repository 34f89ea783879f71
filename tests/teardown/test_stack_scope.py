"""`down` against a real moto server: kept data stays readable (its KMS key is kept with it), and
teardown touches only its own stack (the stack id), never another region's or project's stack of
the same name. The provisioner (Pulumi, which cannot run here) is a stand-in that destroys what
a Pulumi destroy destroys: everything but the retained bucket and key."""

from __future__ import annotations

import boto3
import pytest

from rlfleet.stack_outputs import make_stack_id
from rlfleet.targets import Target
from rlfleet.teardown import aws
from rlfleet.teardown.down import down

from .awsfixtures import as_dict, create_set, still_present

pytestmark = pytest.mark.integration

ACCOUNT = "123456789012"
RETAINED = ("s3:bucket", "kms:key")  # retain_on_delete in infra_cloud/aws (storage.py)


def sid(region: str = "us-east-1", project: str = "rlfleet-aws", stack: str = "dev") -> str:
    return make_stack_id(cloud="aws", account=ACCOUNT, region=region, organization="organization",
                         project=project, stack=stack)


class RetainingPulumi:
    """Destroys everything tagged for the stack except what the program retains on delete."""

    def __init__(self, tag: str, region: str = "us-east-1") -> None:
        self.tag, self.region, self.destroyed = tag, region, 0

    def destroy(self, target, *, delete_data, echo):
        assert not delete_data
        self.destroyed += 1
        items = [x for x in aws.scan_stack(self.tag, region=self.region) if x.kind not in RETAINED]
        assert aws.remove_leftovers(items, delete_data=True, region=self.region).ok

    def plan_destroy(self, target, *, delete_data):
        return []

    def scan_leftovers(self, target):
        return []


def target(tag: str, endpoint: str, bucket: str, region: str = "us-east-1") -> Target:
    return Target(name="dev", kind="aws", ray_address="https://10.0.0.5:8443", token_source="env:RLF_TOKEN",
                  artifact_root=f"s3://{bucket}/rlfleet",
                  storage_options={"client_kwargs": {"endpoint_url": endpoint}},
                  provisioner={"type": "pulumi", "project_dir": "/nonexistent", "stack": "dev",
                               "stack_tag": tag, "region": region})


def readable(session: boto3.Session, bucket: str, key: str) -> bytes:
    """Get an SSE-KMS object and check that AWS could decrypt it: its key must be Enabled.
    (moto serves the bytes whatever the key's state, so the key state is checked explicitly.)"""
    obj = session.client("s3").get_object(Bucket=bucket, Key=key)
    assert obj["ServerSideEncryption"] == "aws:kms"
    state = session.client("kms").describe_key(KeyId=obj["SSEKMSKeyId"])["KeyMetadata"]["KeyState"]
    assert state == "Enabled", f"the key of s3://{bucket}/{key} is {state}: the object can no longer be read"
    return obj["Body"].read()


def _put_encrypted(session: boto3.Session, bucket: str, kms_key: str) -> None:
    session.client("s3").put_object(Bucket=bucket, Key="rlfleet/runs/r1/policy.onnx", Body=b"weights",
                                    ServerSideEncryption="aws:kms", SSEKMSKeyId=kms_key)


def test_down_keeps_the_key_of_the_kept_bucket_and_delete_data_removes_both(moto_reset):
    s = boto3.Session(region_name="us-east-1")
    tag = sid()
    ours = create_set(s, "rlf-dev", tag)
    _put_encrypted(s, ours.buckets[0], ours.kms_keys[0])
    lines: list[str] = []
    res = down(target(tag, moto_reset, ours.buckets[0]), list_runs=lambda t: [], provisioner=RetainingPulumi(tag),
               echo=lines.append, backoff_s=0.01)
    assert res.leftovers == []
    assert sorted(x.kind for x in res.kept_data) == ["kms:key", "s3:bucket"]
    assert any(line.startswith("kept aws kms:key") for line in lines)
    assert readable(s, ours.buckets[0], "rlfleet/runs/r1/policy.onnx") == b"weights"
    assert still_present(s, ours) == {"buckets": ours.buckets, "kms_keys": ours.kms_keys}

    res2 = down(target(tag, moto_reset, ours.buckets[0]), delete_data=True, yes=True, list_runs=lambda t: [],
                provisioner=RetainingPulumi(tag), echo=lines.append, backoff_s=0.01)
    assert res2.leftovers == [] and res2.kept_data == []
    assert still_present(s, ours) == {}  # bucket gone, key pending deletion
    assert aws.scan_stack(tag, region="us-east-1") == []


def test_down_touches_only_its_stack_not_the_same_name_in_another_region_or_project(moto_reset):
    east, west = boto3.Session(region_name="us-east-1"), boto3.Session(region_name="eu-west-1")
    ours = create_set(east, "rlf-dev", sid())
    other_region = create_set(west, "rlf-dev-eu", sid(region="eu-west-1"))
    other_project = create_set(east, "teamx-dev", sid(project="teamx-aws"))
    assert len({sid(), sid(region="eu-west-1"), sid(project="teamx-aws")}) == 3

    res = down(target(sid(), moto_reset, ours.buckets[0]), delete_data=True, yes=True, list_runs=lambda t: [],
               provisioner=RetainingPulumi(sid()), echo=lambda s: None, backoff_s=0.01)
    assert res.leftovers == [] and still_present(east, ours) == {}
    # same stack name "dev": untouched, IAM (global) included
    assert still_present(west, other_region) == as_dict(other_region)
    assert still_present(east, other_project) == as_dict(other_project)
    iam = east.client("iam")
    for decoy in (other_region, other_project):
        assert iam.get_role(RoleName=decoy.roles[0])["Role"]["RoleName"] == decoy.roles[0]


def test_bare_stack_name_target_never_sweeps_global_iam_and_says_how_to_upgrade(moto_reset):
    """A target made before stack ids records the bare name; resources of every 'dev' carry it."""
    east, west = boto3.Session(region_name="us-east-1"), boto3.Session(region_name="eu-west-1")
    ours = create_set(east, "rlf-dev", "dev")
    decoy = create_set(west, "rlf-dev-eu", "dev")  # another region's 'dev', same bare tag
    lines: list[str] = []
    res = down(target("dev", moto_reset, ours.buckets[0]), list_runs=lambda t: [], provisioner=RetainingPulumi("x"),
               echo=lines.append, backoff_s=0.01)
    assert still_present(west, decoy) == as_dict(decoy)  # the decoy's IAM role survives
    assert east.client("iam").get_role(RoleName=decoy.roles[0])
    note = [line for line in lines if "bare stack name 'dev'" in line]
    assert note and "rlfleet target add" in note[0] and "pulumi up" in note[0]
    assert res.leftovers == []
