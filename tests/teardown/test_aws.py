"""Leak scan and removal against a real moto server (HTTP on 127.0.0.1)."""

from __future__ import annotations

import boto3
import pytest

from rlfleet.teardown import aws

from .awsfixtures import as_dict, create_set, still_present

pytestmark = pytest.mark.integration

STACK = "prod"


@pytest.fixture
def world(moto_reset: str):
    session = boto3.Session(region_name="us-east-1")
    ours = create_set(session, "rlf-prod", STACK)
    other = create_set(session, "rlf-prod2", "prod-2")  # another stack, similar name
    untagged = create_set(session, "team-rl", None)  # decoys without our tags
    return session, ours, other, untagged


def _kinds(leftovers):
    out: dict[str, int] = {}
    for x in leftovers:
        out[x.kind] = out.get(x.kind, 0) + 1
    return out


def _check_scan(found, ours, other, untagged):
    ids = {x.id for x in found}
    assert set(ours.instances) <= ids
    assert set(ours.volumes) <= ids  # plus the tagged root volumes of the three instances
    assert {ours.roles[0], ours.instance_profiles[0], ours.policies[0], ours.buckets[0]} <= ids
    assert set(ours.kms_keys) <= ids and set(ours.alarms) <= ids and set(ours.log_groups) <= ids
    assert set(ours.security_groups) <= ids and set(ours.enis) <= ids and set(ours.secrets) <= ids
    for decoy in (other, untagged):
        for kind_ids in as_dict(decoy).values():
            assert not ids & set(kind_ids), f"scan returned a resource of another stack: {ids & set(kind_ids)}"
    kinds = _kinds(found)
    assert kinds["ec2:instance"] == 3 and kinds["ec2:volume"] == 5  # 3 root + data + detached
    assert kinds["s3:bucket"] == 1 and next(x for x in found if x.kind == "s3:bucket").is_data
    # removal order: instances before volumes before security groups; profiles before roles
    order = [x.kind for x in found]
    assert order.index("ec2:instance") < order.index("ec2:volume") < order.index("ec2:security-group")
    assert order.index("iam:instance-profile") < order.index("iam:role")


def test_scan_then_remove_keeps_data_then_deletes_it_and_never_touches_decoys(world, moto_reset, capsys):
    session, ours, other, untagged = world
    before_other = still_present(session, other)
    before_untagged = still_present(session, untagged)
    s3 = session.client("s3")
    decoy_versions = len(s3.list_object_versions(Bucket=other.buckets[0]).get("Versions", []))

    found = aws.scan_stack(STACK, region="us-east-1", session=session)
    _check_scan(found, ours, other, untagged)
    report = aws.remove_leftovers(found, delete_data=False, session=session, region="us-east-1")
    assert report.ok, report.lines()
    # data kept by default, and the key that encrypts it with it
    assert [x.id for x, _ in report.skipped] == ours.kms_keys + ours.buckets
    left = aws.scan_stack(STACK, region="us-east-1", session=session)
    assert [(x.kind, x.id) for x in left] == [("kms:key", ours.kms_keys[0]), ("s3:bucket", ours.buckets[0])]
    assert aws.bucket_usage(ours.buckets[0], session=session) == (6, 6 * 30)  # 6 versions, 20+40 B each pair

    report2 = aws.remove_leftovers(left, delete_data=True, session=session, region="us-east-1")
    assert report2.ok and [x.id for x in report2.removed] == ours.kms_keys + ours.buckets
    assert aws.scan_stack(STACK, region="us-east-1", session=session) == []
    assert still_present(session, ours) == {}

    # every decoy untouched
    assert still_present(session, other) == before_other == as_dict(other)
    assert still_present(session, untagged) == before_untagged == as_dict(untagged)
    assert len(s3.list_object_versions(Bucket=other.buckets[0]).get("Versions", [])) == decoy_versions
    n = sum(len(v) for v in before_other.values()) + sum(len(v) for v in before_untagged.values())
    print(f"FIGURES created={ours.count() + other.count() + untagged.count()} ours={ours.count()} "
          f"leftovers_before={len(found)} after=0 decoys_untouched={n}")


def test_failed_call_mid_teardown_is_reported_and_rerun_completes(world, moto_reset):
    session, _, other, _ = world
    calls = {"n": 0}

    def fail_once(**kwargs):
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("injected: DeleteSecurityGroup throttled")

    session.events.register("before-call.ec2.DeleteSecurityGroup", fail_once)
    found = aws.scan_stack(STACK, region="us-east-1", session=session)
    echoed: list[str] = []
    report = aws.remove_leftovers(found, delete_data=True, session=session, region="us-east-1", echo=echoed.append)
    assert not report.ok
    assert len(report.failed) == 1
    failed, why = report.failed[0]
    assert failed.kind == "ec2:security-group" and "injected" in why
    assert any(line.startswith("FAILED") and "injected" in line for line in report.lines())
    assert any("failed to remove" in e for e in echoed)
    # everything after the failure was still attempted
    assert {"iam:role", "kms:key", "s3:bucket"} <= {x.kind for x in report.removed}

    left = aws.scan_stack(STACK, region="us-east-1", session=session)
    assert [x.id for x in left] == [failed.id]
    rerun = aws.remove_leftovers(left, delete_data=True, session=session, region="us-east-1")
    assert rerun.ok and [x.id for x in rerun.removed] == [failed.id]
    assert aws.scan_stack(STACK, region="us-east-1", session=session) == []
    assert still_present(session, other) == as_dict(other)


def test_scan_of_unknown_stack_is_empty_and_removal_of_nothing_is_a_noop(moto_reset):
    assert aws.scan_stack("never-created", region="us-east-1") == []
    report = aws.remove_leftovers([], region="us-east-1")
    assert report.ok and report.removed == [] and report.summary() == "0 removed, 0 failed, 0 kept"


def test_parse_arn_ids_used_by_delete_calls():
    k = aws.parse_arn("arn:aws:kms:us-east-1:123456789012:key/1234abcd-12ab")
    assert (k.kind, k.id) == ("kms:key", "1234abcd-12ab")  # bare id (moto 500s on the ARN)
    lg = aws.parse_arn("arn:aws:logs:eu-west-1:123456789012:log-group:/rlfleet/x:*")
    assert (lg.kind, lg.id, lg.region) == ("logs:log-group", "/rlfleet/x", "eu-west-1")
    b = aws.parse_arn("arn:aws:s3:::my-bucket", "us-east-1")
    assert (b.kind, b.id, b.is_data) == ("s3:bucket", "my-bucket", True)
