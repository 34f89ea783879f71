"""AWS leak scan and removal, scoped strictly to resources tagged ``rlfleet:stack=<stack id>``.

``scan_stack`` finds what the kit created for a stack and is still there:

- the Resource Groups Tagging API (every tagged service in the region), minus what is already
  gone but still listed (terminated instances, KMS keys pending deletion);
- an IAM pass (roles, instance profiles, customer-managed policies): the tagging API does not
  return IAM (not on moto; not reliably on AWS either);
- an EC2 pass with tag filters (instances not terminated, volumes, network interfaces,
  security groups), which also catches what the tagging API lags on.

``remove_leftovers`` deletes them in dependency order and never raises for one failing call:
it returns a :class:`~rlfleet.teardown.RemovalReport` saying what was removed, what failed
(with the AWS error) and what was kept (artifact buckets without ``delete_data``). It only ever
acts on the :class:`Leftover` objects it is given; those come from a tag-filtered scan.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from typing import Any

from rlfleet.stack_outputs import is_stack_id
from rlfleet.teardown import AWS_STACK_TAG, Leftover, RemovalReport
from rlfleet.teardown.sweep import StackScope, StackSweep

# Removal order: things that hold references first. Kinds not listed are reported, not deleted.
REMOVAL_ORDER = [
    "ec2:instance",
    "autoscaling:group",
    "cloudwatch:alarm",
    "logs:log-group",
    "ec2:network-interface",
    "ec2:volume",
    "ec2:security-group",
    "ec2:subnet",
    "ec2:route-table",
    "ec2:internet-gateway",
    "ec2:vpc",
    "iam:instance-profile",
    "iam:role",
    "iam:policy",
    "secretsmanager:secret",
    "sns:topic",
    "kms:key",
    "s3:bucket",
]
_EC2_PASS = {"ec2:instance", "ec2:volume", "ec2:network-interface", "ec2:security-group"}
_NOT_FOUND = (
    "NotFound",
    "NoSuchEntity",
    "NoSuchBucket",
    "ResourceNotFoundException",
    "InvalidInstanceID.NotFound",
    "InvalidVolume.NotFound",
    "InvalidGroup.NotFound",
    "InvalidNetworkInterfaceID.NotFound",
    "InvalidSubnetID.NotFound",
    "InvalidRouteTableID.NotFound",
    "InvalidInternetGatewayID.NotFound",
    "InvalidVpcID.NotFound",
)


def _session(session: Any | None, region: str | None) -> Any:
    if session is not None:
        return session
    import boto3

    return boto3.Session(region_name=region) if region else boto3.Session()


class _Clients:
    def __init__(self, session: Any, region: str | None, endpoint_url: str | None) -> None:
        self.session = session
        self.region = region or session.region_name or "us-east-1"
        self.endpoint_url = endpoint_url
        self._cache: dict[str, Any] = {}

    def __call__(self, service: str) -> Any:
        if service not in self._cache:
            kw: dict[str, Any] = {"region_name": self.region}
            if self.endpoint_url:
                kw["endpoint_url"] = self.endpoint_url
            self._cache[service] = self.session.client(service, **kw)
        return self._cache[service]


def _error_code(err: BaseException) -> str:
    resp = getattr(err, "response", None) or {}
    return str(resp.get("Error", {}).get("Code", ""))


def _is_not_found(err: BaseException) -> bool:
    code = _error_code(err)
    return any(code == c or code.endswith(".NotFound") for c in _NOT_FOUND)


def _tags_match(tags: Iterable[dict[str, str]] | None, stack: str) -> bool:
    for t in tags or []:
        key = t.get("Key", t.get("TagKey"))
        value = t.get("Value", t.get("TagValue"))
        if key == AWS_STACK_TAG and value == stack:
            return True
    return False


# -- scan -------------------------------------------------------------------------------------

def parse_arn(arn: str, region: str | None = None) -> Leftover:
    """Map a tagging-API ARN to a Leftover (kind + the id the delete call needs)."""
    parts = arn.split(":", 5)
    service, arn_region, resource = parts[2], parts[3] or region, parts[5]
    if service == "s3":
        return Leftover("aws", "s3:bucket", resource, region=arn_region, arn=arn, is_data=True)
    if service == "cloudwatch" and resource.startswith("alarm:"):
        return Leftover("aws", "cloudwatch:alarm", resource[len("alarm:"):], region=arn_region, arn=arn)
    if service == "logs" and resource.startswith("log-group:"):
        name = resource[len("log-group:"):]
        name = name[:-2] if name.endswith(":*") else name
        return Leftover("aws", "logs:log-group", name, region=arn_region, arn=arn)
    if service == "kms" and resource.startswith("key/"):
        # the stack key encrypts the artifact bucket: it is data, kept with the bucket
        return Leftover("aws", "kms:key", resource[len("key/"):], region=arn_region, arn=arn, is_data=True,
                        detail="encrypts the artifact bucket")
    if service == "secretsmanager":
        return Leftover("aws", "secretsmanager:secret", arn, region=arn_region, arn=arn)
    if service == "sns":
        return Leftover("aws", "sns:topic", arn, region=arn_region, arn=arn)
    if service == "autoscaling" and "autoScalingGroupName/" in resource:
        name = resource.split("autoScalingGroupName/", 1)[1]
        return Leftover("aws", "autoscaling:group", name, region=arn_region, arn=arn)
    if "/" in resource:
        rtype, rid = resource.split("/", 1)
        return Leftover("aws", f"{service}:{rtype}", rid, region=arn_region, arn=arn)
    return Leftover("aws", f"{service}:{resource.split(':', 1)[0]}", resource, region=arn_region, arn=arn)


def scan_stack(
    stack: str,
    *,
    region: str | None = None,
    endpoint_url: str | None = None,
    session: Any | None = None,
    include_iam: bool = True,
) -> list[Leftover]:
    """Everything tagged ``rlfleet:stack=<stack>`` that still exists, sorted in removal order.

    ``stack`` is the stack id (:func:`rlfleet.stack_outputs.make_stack_id`), unique per account,
    region and Pulumi project, so the global IAM pass only matches this stack. ``include_iam=False``
    skips that pass (for a bare stack name, which another region's stack shares).
    """
    if not stack:
        raise ValueError("scan_stack needs a stack id")
    c = _Clients(_session(session, region), region, endpoint_url)
    found: dict[tuple[str, str], Leftover] = {}

    def add(x: Leftover) -> None:
        found.setdefault((x.kind, x.id), x)

    # 1. tagging API
    tag_filter = [{"Key": AWS_STACK_TAG, "Values": [stack]}]
    for page in c("resourcegroupstaggingapi").get_paginator("get_resources").paginate(TagFilters=tag_filter):
        for m in page.get("ResourceTagMappingList", []):
            x = parse_arn(m["ResourceARN"], c.region)
            if x.kind in _EC2_PASS:
                continue  # the EC2 pass below knows their state (terminated instances stay listed)
            if x.kind == "kms:key":
                state = c("kms").describe_key(KeyId=x.id)["KeyMetadata"].get("KeyState")
                if state in ("PendingDeletion", "PendingReplicaDeletion"):
                    continue
            add(x)

    # 2. EC2 with tag filters
    ec2 = c("ec2")
    filt = [{"Name": f"tag:{AWS_STACK_TAG}", "Values": [stack]}]
    for page in ec2.get_paginator("describe_instances").paginate(Filters=filt):
        for res in page["Reservations"]:
            for inst in res["Instances"]:
                state = inst["State"]["Name"]
                if state != "terminated":
                    add(Leftover("aws", "ec2:instance", inst["InstanceId"], region=c.region, detail=state))
    for page in ec2.get_paginator("describe_volumes").paginate(Filters=filt):
        for v in page["Volumes"]:
            add(Leftover("aws", "ec2:volume", v["VolumeId"], region=c.region, detail=v.get("State", "")))
    for page in ec2.get_paginator("describe_network_interfaces").paginate(Filters=filt):
        for n in page["NetworkInterfaces"]:
            add(Leftover("aws", "ec2:network-interface", n["NetworkInterfaceId"], region=c.region))
    for page in ec2.get_paginator("describe_security_groups").paginate(Filters=filt):
        for g in page["SecurityGroups"]:
            add(Leftover("aws", "ec2:security-group", g["GroupId"], region=c.region, detail=g.get("GroupName", "")))

    # 3. IAM (global; not in the tagging API): the stack id is what keeps this to one stack
    if not include_iam:
        return sort_for_removal(found.values())
    iam = c("iam")
    for page in iam.get_paginator("list_roles").paginate():
        for role in page["Roles"]:
            if _tags_match(_iam_tags(iam.list_role_tags, RoleName=role["RoleName"]), stack):
                add(Leftover("aws", "iam:role", role["RoleName"], arn=role["Arn"]))
    for page in iam.get_paginator("list_instance_profiles").paginate():
        for prof in page["InstanceProfiles"]:
            tags = prof.get("Tags")
            if tags is None:
                tags = _iam_tags(iam.list_instance_profile_tags, InstanceProfileName=prof["InstanceProfileName"])
            if _tags_match(tags, stack):
                add(Leftover("aws", "iam:instance-profile", prof["InstanceProfileName"], arn=prof["Arn"]))
    for page in iam.get_paginator("list_policies").paginate(Scope="Local"):
        for pol in page["Policies"]:
            if _tags_match(_iam_tags(iam.list_policy_tags, PolicyArn=pol["Arn"]), stack):
                add(Leftover("aws", "iam:policy", pol["Arn"], arn=pol["Arn"], detail=pol["PolicyName"]))

    return sort_for_removal(found.values())


def _iam_tags(fn: Callable[..., Any], **kw: Any) -> list[dict[str, str]]:
    try:
        return list(fn(**kw).get("Tags", []))
    except Exception as err:
        if _is_not_found(err):
            return []
        raise


def sort_for_removal(items: Iterable[Leftover]) -> list[Leftover]:
    rank = {k: i for i, k in enumerate(REMOVAL_ORDER)}
    return sorted(items, key=lambda x: (rank.get(x.kind, len(rank)), x.kind, x.id))


# -- removal ----------------------------------------------------------------------------------

def remove_leftovers(
    leftovers: Iterable[Leftover],
    *,
    delete_data: bool = False,
    region: str | None = None,
    endpoint_url: str | None = None,
    session: Any | None = None,
    echo: Callable[[str], None] = lambda s: None,
    wait_timeout_s: float = 600.0,
    kms_pending_days: int = 7,
) -> RemovalReport:
    """Delete the given leftovers in dependency order; report failures instead of stopping.

    Artifact buckets are kept (reported as skipped) unless ``delete_data``; then every object
    version and delete marker is removed before the bucket. KMS keys are scheduled for deletion
    (AWS's minimum window is 7 days) using the bare key id.
    """
    c = _Clients(_session(session, region), region, endpoint_url)
    report = RemovalReport()
    items = sort_for_removal(x for x in leftovers if x.provider == "aws")

    terminated: list[Leftover] = []
    revoked = False
    for x in items:
        if x.is_data and not delete_data:
            report.skipped.append((x, "artifact data is kept without --delete-data"))
            continue
        handler = _HANDLERS.get(x.kind)
        if handler is None:
            report.failed.append((x, "rlfleet does not know how to delete this kind; remove it by hand"))
            continue
        if x.kind != "ec2:instance" and terminated:
            # instances must be gone before their volumes, ENIs and security groups
            _wait_terminated(c, terminated, report, wait_timeout_s, echo)
            terminated = []
        if x.kind == "ec2:security-group" and not revoked:
            _revoke_group_references(c, [g for g in items if g.kind == "ec2:security-group"])
            revoked = True
        try:
            handler(c, x, kms_pending_days)
        except Exception as err:
            if _is_not_found(err):
                report.removed.append(x)
                continue
            msg = f"{type(err).__name__}: {err}"
            report.failed.append((x, msg))
            echo(f"failed to remove {x}: {msg}")
            continue
        if x.kind == "ec2:instance":
            terminated.append(x)
        else:
            report.removed.append(x)
            echo(f"removed {x}")
    if terminated:
        _wait_terminated(c, terminated, report, wait_timeout_s, echo)
    return report


def _wait_terminated(
    c: _Clients, insts: list[Leftover], report: RemovalReport, timeout_s: float, echo: Callable[[str], None]
) -> None:
    pending = {x.id: x for x in insts}
    delay, deadline = 1.0, time.monotonic() + timeout_s
    while pending:
        try:
            resp = c("ec2").describe_instances(InstanceIds=list(pending))
            states = {i["InstanceId"]: i["State"]["Name"] for r in resp["Reservations"] for i in r["Instances"]}
        except Exception as err:
            if not _is_not_found(err):
                raise
            states = {}
        for iid in list(pending):
            if states.get(iid, "terminated") == "terminated":
                report.removed.append(pending.pop(iid))
                echo(f"removed aws ec2:instance {iid}")
        if not pending:
            return
        if time.monotonic() > deadline:
            for x in pending.values():
                report.failed.append((x, f"still {states.get(x.id)} after {timeout_s:.0f} s"))
            return
        time.sleep(delay)
        delay = min(delay * 2, 15.0)


def _rm_instance(c: _Clients, x: Leftover, _: int) -> None:
    c("ec2").terminate_instances(InstanceIds=[x.id])


def _rm_asg(c: _Clients, x: Leftover, _: int) -> None:
    c("autoscaling").delete_auto_scaling_group(AutoScalingGroupName=x.id, ForceDelete=True)


def _rm_alarm(c: _Clients, x: Leftover, _: int) -> None:
    c("cloudwatch").delete_alarms(AlarmNames=[x.id])


def _rm_log_group(c: _Clients, x: Leftover, _: int) -> None:
    c("logs").delete_log_group(logGroupName=x.id)


def _rm_eni(c: _Clients, x: Leftover, _: int) -> None:
    ec2 = c("ec2")
    eni = ec2.describe_network_interfaces(NetworkInterfaceIds=[x.id])["NetworkInterfaces"][0]
    att = eni.get("Attachment")
    if att and att.get("AttachmentId") and att.get("DeviceIndex", 0) != 0:
        ec2.detach_network_interface(AttachmentId=att["AttachmentId"], Force=True)
    ec2.delete_network_interface(NetworkInterfaceId=x.id)


def _rm_volume(c: _Clients, x: Leftover, _: int) -> None:
    ec2 = c("ec2")
    vol = ec2.describe_volumes(VolumeIds=[x.id])["Volumes"][0]
    for att in vol.get("Attachments", []):
        ec2.detach_volume(VolumeId=x.id, InstanceId=att["InstanceId"], Force=True)
    ec2.delete_volume(VolumeId=x.id)


def _revoke_group_references(c: _Clients, groups: list[Leftover]) -> None:
    """Drop rules of our groups that name another group: AWS refuses to delete a referenced group."""
    ec2 = c("ec2")
    for x in groups:
        try:
            sg = ec2.describe_security_groups(GroupIds=[x.id])["SecurityGroups"][0]
            for field, revoke in (("IpPermissions", ec2.revoke_security_group_ingress),
                                  ("IpPermissionsEgress", ec2.revoke_security_group_egress)):
                refs = [p for p in sg.get(field, []) if p.get("UserIdGroupPairs")]
                if refs:
                    revoke(GroupId=x.id, IpPermissions=refs)
        except Exception:  # noqa: S112 - best effort; the delete below reports the real error
            continue


def _rm_sg(c: _Clients, x: Leftover, _: int) -> None:
    c("ec2").delete_security_group(GroupId=x.id)


def _rm_subnet(c: _Clients, x: Leftover, _: int) -> None:
    c("ec2").delete_subnet(SubnetId=x.id)


def _rm_route_table(c: _Clients, x: Leftover, _: int) -> None:
    ec2 = c("ec2")
    rt = ec2.describe_route_tables(RouteTableIds=[x.id])["RouteTables"][0]
    for assoc in rt.get("Associations", []):
        if not assoc.get("Main") and assoc.get("RouteTableAssociationId"):
            ec2.disassociate_route_table(AssociationId=assoc["RouteTableAssociationId"])
    ec2.delete_route_table(RouteTableId=x.id)


def _rm_igw(c: _Clients, x: Leftover, _: int) -> None:
    ec2 = c("ec2")
    igw = ec2.describe_internet_gateways(InternetGatewayIds=[x.id])["InternetGateways"][0]
    for att in igw.get("Attachments", []):
        ec2.detach_internet_gateway(InternetGatewayId=x.id, VpcId=att["VpcId"])
    ec2.delete_internet_gateway(InternetGatewayId=x.id)


def _rm_vpc(c: _Clients, x: Leftover, _: int) -> None:
    c("ec2").delete_vpc(VpcId=x.id)


def _rm_instance_profile(c: _Clients, x: Leftover, _: int) -> None:
    iam = c("iam")
    prof = iam.get_instance_profile(InstanceProfileName=x.id)["InstanceProfile"]
    for role in prof.get("Roles", []):
        iam.remove_role_from_instance_profile(InstanceProfileName=x.id, RoleName=role["RoleName"])
    iam.delete_instance_profile(InstanceProfileName=x.id)


def _rm_role(c: _Clients, x: Leftover, _: int) -> None:
    iam = c("iam")
    for page in iam.get_paginator("list_instance_profiles_for_role").paginate(RoleName=x.id):
        for prof in page["InstanceProfiles"]:
            iam.remove_role_from_instance_profile(InstanceProfileName=prof["InstanceProfileName"], RoleName=x.id)
    for page in iam.get_paginator("list_attached_role_policies").paginate(RoleName=x.id):
        for pol in page["AttachedPolicies"]:
            iam.detach_role_policy(RoleName=x.id, PolicyArn=pol["PolicyArn"])
    for page in iam.get_paginator("list_role_policies").paginate(RoleName=x.id):
        for name in page["PolicyNames"]:
            iam.delete_role_policy(RoleName=x.id, PolicyName=name)
    iam.delete_role(RoleName=x.id)


def _rm_policy(c: _Clients, x: Leftover, _: int) -> None:
    iam = c("iam")
    ents = iam.list_entities_for_policy(PolicyArn=x.id)
    for r in ents.get("PolicyRoles", []):
        iam.detach_role_policy(RoleName=r["RoleName"], PolicyArn=x.id)
    for u in ents.get("PolicyUsers", []):
        iam.detach_user_policy(UserName=u["UserName"], PolicyArn=x.id)
    for g in ents.get("PolicyGroups", []):
        iam.detach_group_policy(GroupName=g["GroupName"], PolicyArn=x.id)
    for v in iam.list_policy_versions(PolicyArn=x.id)["Versions"]:
        if not v["IsDefaultVersion"]:
            iam.delete_policy_version(PolicyArn=x.id, VersionId=v["VersionId"])
    iam.delete_policy(PolicyArn=x.id)


def _rm_secret(c: _Clients, x: Leftover, _: int) -> None:
    c("secretsmanager").delete_secret(SecretId=x.id, ForceDeleteWithoutRecovery=True)


def _rm_topic(c: _Clients, x: Leftover, _: int) -> None:
    c("sns").delete_topic(TopicArn=x.id)


def _rm_kms_key(c: _Clients, x: Leftover, days: int) -> None:
    kms = c("kms")
    key_id = x.id.rsplit("/", 1)[-1]  # bare key id: moto answers 500 to the ARN
    state = kms.describe_key(KeyId=key_id)["KeyMetadata"].get("KeyState")
    if state in ("PendingDeletion", "PendingReplicaDeletion"):
        return
    kms.schedule_key_deletion(KeyId=key_id, PendingWindowInDays=max(7, min(30, days)))


def _rm_bucket(c: _Clients, x: Leftover, _: int) -> None:
    s3 = c("s3")
    for page in s3.get_paginator("list_object_versions").paginate(Bucket=x.id):
        objs = [{"Key": v["Key"], "VersionId": v["VersionId"]} for v in page.get("Versions", [])]
        objs += [{"Key": m["Key"], "VersionId": m["VersionId"]} for m in page.get("DeleteMarkers", [])]
        for i in range(0, len(objs), 1000):
            resp = s3.delete_objects(Bucket=x.id, Delete={"Objects": objs[i : i + 1000], "Quiet": True})
            if resp.get("Errors"):
                e = resp["Errors"][0]
                raise RuntimeError(
                    f"could not delete {len(resp['Errors'])} object(s) of {x.id}, "
                    f"e.g. {e.get('Key')}: {e.get('Message')}"
                )
    s3.delete_bucket(Bucket=x.id)


_HANDLERS: dict[str, Callable[[_Clients, Leftover, int], None]] = {
    "ec2:instance": _rm_instance,
    "autoscaling:group": _rm_asg,
    "cloudwatch:alarm": _rm_alarm,
    "logs:log-group": _rm_log_group,
    "ec2:network-interface": _rm_eni,
    "ec2:volume": _rm_volume,
    "ec2:security-group": _rm_sg,
    "ec2:subnet": _rm_subnet,
    "ec2:route-table": _rm_route_table,
    "ec2:internet-gateway": _rm_igw,
    "ec2:vpc": _rm_vpc,
    "iam:instance-profile": _rm_instance_profile,
    "iam:role": _rm_role,
    "iam:policy": _rm_policy,
    "secretsmanager:secret": _rm_secret,
    "sns:topic": _rm_topic,
    "kms:key": _rm_kms_key,
    "s3:bucket": _rm_bucket,
}


def bucket_usage(bucket: str, *, region: str | None = None, endpoint_url: str | None = None,
                 session: Any | None = None) -> tuple[int, int]:
    """(object versions, total bytes) in a bucket, counting every version: what --delete-data removes."""
    c = _Clients(_session(session, region), region, endpoint_url)
    count = size = 0
    for page in c("s3").get_paginator("list_object_versions").paginate(Bucket=bucket):
        for v in page.get("Versions", []):
            count += 1
            size += int(v.get("Size", 0))
    return count, size


def stack_sweep(scope: StackScope) -> StackSweep:
    """The sweep of one stack: tag scan and removal in its region. A bare stack name (targets made
    before stack ids) is shared by that stack in every region, so IAM (global) is left out."""
    include_iam = is_stack_id(scope.stack)
    note = None if include_iam else (
        f"target {scope.target!r} records the bare stack name {scope.stack!r} (made before stack ids): IAM is "
        f"global and every region's and project's {scope.stack!r} carries that tag, so IAM roles, profiles and "
        "policies are not swept or checked; run 'pulumi up' on the stack once (it tags everything with "
        f"its stack id), then 'rlfleet target add' it again"
    )
    return StackSweep(
        scope=scope,
        scan=lambda: scan_stack(scope.stack, region=scope.region, include_iam=include_iam),
        remove=lambda items, delete_data: remove_leftovers(items, delete_data=delete_data, region=scope.region),
        tagged=f"the tag {AWS_STACK_TAG}={scope.stack}",
        note=note,
    )
