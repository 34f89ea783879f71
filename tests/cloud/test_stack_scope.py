"""What teardown relies on, asserted on the programs under Pulumi mocks (preview=False):

- a stack id, unique per account/project, region, Pulumi project and stack, tags/labels every
  resource and is exported (OUTPUT_STACK_TAG) for the SDK's target and teardown's scans;
- data outlives `pulumi destroy` together with what reading it needs: the bucket, its key and
  (GCP) the key's grants are retained on delete;
- the GCP idle stopper may stop exactly this stack's VMs (not `dev-2`'s);
- node identities cannot destroy noncurrent object versions.
"""

from __future__ import annotations

import json
import re

import pulumi
import pytest

from rlfleet import stack_outputs as so

from .conftest import ACCOUNT, AWS_BASE, GCP_PROJECT, Built, aws_program, build
from .policies import aws_violations, gcp_violations


def test_aws_stack_id_is_exported_tags_everything_and_differs_by_region_and_project(aws: Built) -> None:
    sid = aws.outputs[so.OUTPUT_STACK_TAG]
    assert so.is_stack_id(sid) and sid.startswith("dev-") and sid != "dev"
    assert aws_violations(aws.resources, sid) == []  # every taggable resource carries rlfleet:stack=<id>
    tagged = [r for r in aws.resources if (r.inputs.get("tags") or {}).get(so.AWS_TAG_STACK)]
    assert len(tagged) >= 15 and {r.inputs["tags"][so.AWS_TAG_STACK] for r in tagged} == {sid}
    # the same stack name in another region gets another id; the same inputs give the same id
    west = build(aws_program, {**AWS_BASE, "aws:region": "eu-west-1"})
    assert west.outputs[so.OUTPUT_STACK_TAG] != sid and so.is_stack_id(west.outputs[so.OUTPUT_STACK_TAG])
    assert build(aws_program, AWS_BASE).outputs[so.OUTPUT_STACK_TAG] == sid
    other = {"cloud": "aws", "account": ACCOUNT, "region": "us-east-1", "organization": pulumi.get_organization(),
             "project": pulumi.get_project(), "stack": "dev"}
    assert so.make_stack_id(**other) == sid  # derived from exactly these inputs
    assert so.make_stack_id(**{**other, "project": "team-x"}) != sid
    assert so.make_stack_id(**{**other, "account": "210987654321"}) != sid


def test_gcp_stack_id_labels_everything_marks_service_accounts_and_reaches_the_stopper(gcp: Built) -> None:
    sid = gcp.outputs[so.OUTPUT_STACK_TAG]
    assert so.is_stack_id(sid) and sid != "dev" and len(sid) <= 63  # a valid GCP label value
    assert gcp_violations(gcp.resources, sid) == []
    for sa in gcp.of("gcp:serviceaccount/account:Account"):
        assert f"{so.GCP_LABEL_STACK}={sid}" in sa.inputs["description"].split()
    fn = gcp.one("gcp:cloudfunctionsv2/function:Function").inputs
    assert fn["serviceConfig"]["environmentVariables"]["RLFLEET_STACK"] == sid
    for p in gcp.of("gcp:monitoring/alertPolicy:AlertPolicy"):
        for cond in p.inputs["conditions"]:
            filt = next(iter(c for c in cond.values() if isinstance(c, dict) and "filter" in c))["filter"]
            # VM metrics by the VM's label; Managed Prometheus series by the label the nodes add
            key = so.PROM_LABEL_STACK if "prometheus_target" in filt else so.GCP_LABEL_STACK
            assert f'"{key}" = "{sid}"' in filt, (p.name, filt)
    assert f'= \\"{sid}\\"' in gcp.one("gcp:monitoring/dashboard:Dashboard").inputs["dashboardJson"]


def test_aws_key_and_bucket_outlive_destroy(aws: Built) -> None:
    retained = {r.typ for r in aws.resources if r.retain_on_delete}
    assert retained == {"aws:kms/key:Key", "aws:s3/bucket:Bucket"}


def test_gcp_key_its_grants_and_bucket_outlive_destroy(gcp: Built) -> None:
    """Destroying a CryptoKey destroys its versions: the kept bucket would become unreadable."""
    retained = sorted(r.typ for r in gcp.resources if r.retain_on_delete)
    assert retained == ["gcp:kms/cryptoKey:CryptoKey", "gcp:kms/cryptoKeyIAMMember:CryptoKeyIAMMember",
                        "gcp:kms/cryptoKeyIAMMember:CryptoKeyIAMMember", "gcp:kms/keyRing:KeyRing",
                        "gcp:storage/bucket:Bucket"]
    key = gcp.one("gcp:kms/cryptoKey:CryptoKey")
    grants = gcp.of("gcp:kms/cryptoKeyIAMMember:CryptoKeyIAMMember")
    assert {g.inputs["cryptoKeyId"] for g in grants} == {key.state["id"]}
    assert any("gs-project-accounts" in g.inputs["member"] for g in grants)  # the GCS agent decrypts reads


def _allowed_names(expression: str) -> set[str]:
    """The stopper condition is a disjunction of exact resource names; anything else is refused."""
    terms = expression.split(" || ")
    names = set()
    for t in terms:
        m = re.fullmatch(r'resource\.name == "([^"]+)"', t.strip())
        assert m, f"not an exact-name term: {t!r}"
        names.add(m.group(1))
    return names


def test_gcp_stopper_reaches_exactly_this_stacks_vms(gcp: Built) -> None:
    binding = next(r for r in gcp.of("gcp:projects/iAMMember:IAMMember") if "condition" in r.inputs)
    names = _allowed_names(binding.inputs["condition"]["expression"])
    base = f"projects/{GCP_PROJECT}/zones/us-central1-a/instances/"
    vms = {r.inputs["name"] for r in gcp.of("gcp:compute/instance:Instance")}
    assert names == {base + n for n in vms} == {base + n for n in ("rlfleet-dev-head", "rlfleet-dev-worker-0",
                                                                    "rlfleet-dev-worker-1")}
    for other in ("rlfleet-dev-2-head", "rlfleet-dev-2-worker-0", "rlfleet-dev-headless", "rlfleet-dev-worker-10"):
        assert base + other not in names
    assert f"projects/{GCP_PROJECT}/zones/us-central1-b/instances/rlfleet-dev-head" not in names


def test_node_identities_cannot_destroy_noncurrent_versions(aws: Built, gcp: Built) -> None:
    # AWS: the node role may put delete markers (s3:DeleteObject) but never delete a version
    doc = json.loads(aws.one("aws:iam/rolePolicy:RolePolicy").inputs["policy"])
    actions = {a for st in doc["Statement"] if st["Effect"] == "Allow"
               for a in (st["Action"] if isinstance(st["Action"], list) else [st["Action"]])}
    assert "s3:DeleteObject" in actions
    assert not {a for a in actions if a.startswith("s3:") and ("Version" in a or a.endswith("*"))}
    # GCP: storage.objects.delete (needed to overwrite) cannot be limited to live generations, so
    # the bucket soft-deletes: a deleted noncurrent version stays restorable for longer than the
    # lifecycle keeps noncurrent versions, and nodes cannot change or skip that.
    b = gcp.one("gcp:storage/bucket:Bucket").inputs
    keep = int(b["softDeletePolicy"]["retentionDurationSeconds"])
    noncurrent = next(r["condition"]["daysSinceNoncurrentTime"] for r in b["lifecycleRules"]
                      if r["action"]["type"] == "Delete")
    assert keep >= max(7, noncurrent) * 86400
    node_sa = next(r for r in gcp.of("gcp:serviceaccount/account:Account") if r.inputs["accountId"].endswith("node"))
    member = f"serviceAccount:{node_sa.state['email']}"
    roles = {r.inputs["role"] for r in gcp.resources if r.inputs.get("member") == member}
    assert not roles & {"roles/storage.admin", "roles/storage.objectAdmin"}  # no bucket settings, no restore


def test_target_from_the_outputs_records_the_stack_id_and_teardown_uses_it(aws: Built, tmp_path) -> None:
    from rlfleet.provisioners.pulumi_stack import target_from_outputs
    from rlfleet.teardown.down import bare_name_note, stack_of

    ca = tmp_path / "ca.pem"
    ca.write_text("-----BEGIN CERTIFICATE-----\n")
    t = target_from_outputs("c", aws.outputs, ca_cert=str(ca))
    sid = aws.outputs[so.OUTPUT_STACK_TAG]
    assert t.provisioner["stack_tag"] == sid and stack_of(t) == sid and bare_name_note(t) is None
    legacy = t.model_copy(update={"provisioner": {**t.provisioner, "stack_tag": "dev"}})
    assert "bare stack name 'dev'" in (bare_name_note(legacy) or "")


@pytest.mark.parametrize("stack", ["dev", "Prod.EU_1", "x" * 100, "---", "team/a b"])
def test_stack_ids_are_label_safe_and_tell_themselves_from_bare_names(stack: str) -> None:
    sid = so.make_stack_id(cloud="gcp", account="p", region="r", organization="o", project="q", stack=stack)
    assert re.fullmatch(r"[a-z0-9][a-z0-9_-]{0,62}", sid) and so.is_stack_id(sid)  # a GCP label value
    assert not so.is_stack_id(stack) and not so.is_stack_id("prod-2")
