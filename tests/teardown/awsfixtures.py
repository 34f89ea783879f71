"""Build a realistic set of AWS resources on the moto server, tagged for a stack (or not)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import boto3

ASSUME = json.dumps({
    "Version": "2012-10-17",
    "Statement": [{"Effect": "Allow", "Principal": {"Service": "ec2.amazonaws.com"}, "Action": "sts:AssumeRole"}],
})
POLICY = json.dumps({
    "Version": "2012-10-17",
    "Statement": [{"Effect": "Allow", "Action": "s3:GetObject", "Resource": "arn:aws:s3:::x/*"}],
})


@dataclass
class Created:
    instances: list[str] = field(default_factory=list)
    volumes: list[str] = field(default_factory=list)
    enis: list[str] = field(default_factory=list)
    security_groups: list[str] = field(default_factory=list)
    buckets: list[str] = field(default_factory=list)
    roles: list[str] = field(default_factory=list)
    instance_profiles: list[str] = field(default_factory=list)
    policies: list[str] = field(default_factory=list)
    alarms: list[str] = field(default_factory=list)
    log_groups: list[str] = field(default_factory=list)
    kms_keys: list[str] = field(default_factory=list)
    secrets: list[str] = field(default_factory=list)

    def count(self) -> int:
        return sum(len(v) for v in vars(self).values())


def create_set(session: boto3.Session, prefix: str, stack: str | None) -> Created:
    """Resources like the Pulumi program creates; tagged rlfleet:stack=<stack> unless stack is None."""
    tags = [{"Key": "rlfleet:stack", "Value": stack}, {"Key": "rlfleet:managed", "Value": "true"}] if stack else [
        {"Key": "team", "Value": "rl"}
    ]
    spec = lambda rtype: [{"ResourceType": rtype, "Tags": tags}]  # noqa: E731
    out = Created()
    ec2 = session.client("ec2")
    iam = session.client("iam")
    s3 = session.client("s3")
    ami = ec2.describe_images(Owners=["amazon"])["Images"][0]["ImageId"]
    subnet = ec2.describe_subnets()["Subnets"][0]

    # security groups: the worker group references the head group (a deletion dependency)
    head_sg = ec2.create_security_group(GroupName=f"{prefix}-head", Description="head",
                                        TagSpecifications=spec("security-group"))["GroupId"]
    worker_sg = ec2.create_security_group(GroupName=f"{prefix}-worker", Description="worker",
                                          TagSpecifications=spec("security-group"))["GroupId"]
    ec2.authorize_security_group_ingress(GroupId=head_sg, IpPermissions=[
        {"IpProtocol": "tcp", "FromPort": 6379, "ToPort": 6379, "UserIdGroupPairs": [{"GroupId": worker_sg}]}])
    out.security_groups += [head_sg, worker_sg]

    # head + two GPU workers, IMDSv2 required, tagged root volumes
    for itype, sg in (("g5.xlarge", head_sg), ("g5.2xlarge", worker_sg), ("g5.2xlarge", worker_sg)):
        r = ec2.run_instances(
            ImageId=ami, MinCount=1, MaxCount=1, InstanceType=itype, SecurityGroupIds=[sg],
            SubnetId=subnet["SubnetId"], MetadataOptions={"HttpTokens": "required"},
            TagSpecifications=spec("instance") + spec("volume"),
        )
        out.instances.append(r["Instances"][0]["InstanceId"])
    # a data volume attached to the head (not deleted on termination) and a detached one
    attached = ec2.create_volume(AvailabilityZone=subnet["AvailabilityZone"], Size=100, VolumeType="gp3",
                                 TagSpecifications=spec("volume"))["VolumeId"]
    ec2.attach_volume(VolumeId=attached, InstanceId=out.instances[0], Device="/dev/sdf")
    detached = ec2.create_volume(AvailabilityZone=subnet["AvailabilityZone"], Size=20,
                                 TagSpecifications=spec("volume"))["VolumeId"]
    out.volumes += [attached, detached]
    eni = ec2.create_network_interface(SubnetId=subnet["SubnetId"], Groups=[worker_sg],
                                       TagSpecifications=spec("network-interface"))
    out.enis.append(eni["NetworkInterface"]["NetworkInterfaceId"])

    # versioned, KMS-encrypted artifact bucket with several versions and a delete marker
    kms = session.client("kms")
    key = kms.create_key(Description=f"{prefix} artifacts",
                         Tags=[{"TagKey": t["Key"], "TagValue": t["Value"]} for t in tags])["KeyMetadata"]["KeyId"]
    out.kms_keys.append(key)
    bucket = f"{prefix}-artifacts"
    region = session.region_name or "us-east-1"
    s3.create_bucket(Bucket=bucket, **({} if region == "us-east-1" else
                                       {"CreateBucketConfiguration": {"LocationConstraint": region}}))
    s3.put_bucket_tagging(Bucket=bucket, Tagging={"TagSet": tags})
    s3.put_bucket_versioning(Bucket=bucket, VersioningConfiguration={"Status": "Enabled"})
    s3.put_bucket_encryption(Bucket=bucket, ServerSideEncryptionConfiguration={"Rules": [
        {"ApplyServerSideEncryptionByDefault": {"SSEAlgorithm": "aws:kms", "KMSMasterKeyID": key}}]})
    for i in range(3):
        s3.put_object(Bucket=bucket, Key=f"runs/r{i}/spec.json", Body=b"{}" * 10)
        s3.put_object(Bucket=bucket, Key=f"runs/r{i}/spec.json", Body=b"{}" * 20)  # second version
    s3.delete_object(Bucket=bucket, Key="runs/r0/spec.json")  # delete marker
    out.buckets.append(bucket)

    # IAM: role with an inline and an attached customer policy, in an instance profile
    role = f"{prefix}-node"
    iam.create_role(RoleName=role, AssumeRolePolicyDocument=ASSUME, Tags=tags)
    iam.put_role_policy(RoleName=role, PolicyName="inline", PolicyDocument=POLICY)
    pol = iam.create_policy(PolicyName=f"{prefix}-artifacts", PolicyDocument=POLICY, Tags=tags)["Policy"]["Arn"]
    iam.attach_role_policy(RoleName=role, PolicyArn=pol)
    iam.create_instance_profile(InstanceProfileName=f"{prefix}-node", Tags=tags)
    iam.add_role_to_instance_profile(InstanceProfileName=f"{prefix}-node", RoleName=role)
    out.roles.append(role)
    out.policies.append(pol)
    out.instance_profiles.append(f"{prefix}-node")

    # monitoring and the token secret
    cw = session.client("cloudwatch")
    logs = session.client("logs")
    for name in ("gpu-idle", "head-down"):
        cw.put_metric_alarm(AlarmName=f"{prefix}-{name}", MetricName="GPUUtilization", Namespace="rlfleet",
                            Statistic="Average", Period=300, EvaluationPeriods=1, Threshold=5.0,
                            ComparisonOperator="LessThanThreshold", Tags=tags)
        out.alarms.append(f"{prefix}-{name}")
    for name in ("ray", "runs"):
        logs.create_log_group(logGroupName=f"/rlfleet/{prefix}/{name}",
                              tags={t["Key"]: t["Value"] for t in tags})
        out.log_groups.append(f"/rlfleet/{prefix}/{name}")
    sec = session.client("secretsmanager").create_secret(Name=f"{prefix}/ray-token", SecretString="x" * 32,
                                                          Tags=tags)
    out.secrets.append(sec["ARN"])
    return out


def still_present(session: boto3.Session, c: Created) -> dict[str, list[str]]:
    """Which of the created resources still exist (for decoy checks); instances: not terminated."""
    ec2 = session.client("ec2")
    present: dict[str, list[str]] = {}

    def keep(kind: str, rid: str) -> None:
        present.setdefault(kind, []).append(rid)

    for iid in c.instances:
        st = ec2.describe_instances(InstanceIds=[iid])["Reservations"][0]["Instances"][0]["State"]["Name"]
        if st != "terminated":
            keep("instances", iid)
    vols = {v["VolumeId"] for v in ec2.describe_volumes()["Volumes"]}
    present_any(c.volumes, vols, "volumes", keep)
    enis = {n["NetworkInterfaceId"] for n in ec2.describe_network_interfaces()["NetworkInterfaces"]}
    present_any(c.enis, enis, "enis", keep)
    sgs = {g["GroupId"] for g in ec2.describe_security_groups()["SecurityGroups"]}
    present_any(c.security_groups, sgs, "security_groups", keep)
    buckets = {b["Name"] for b in session.client("s3").list_buckets()["Buckets"]}
    present_any(c.buckets, buckets, "buckets", keep)
    iam = session.client("iam")
    present_any(c.roles, {r["RoleName"] for r in iam.list_roles()["Roles"]}, "roles", keep)
    profiles = {p["InstanceProfileName"] for p in iam.list_instance_profiles()["InstanceProfiles"]}
    present_any(c.instance_profiles, profiles, "instance_profiles", keep)
    present_any(c.policies, {p["Arn"] for p in iam.list_policies(Scope="Local")["Policies"]}, "policies", keep)
    present_any(c.alarms, {a["AlarmName"] for a in session.client("cloudwatch").describe_alarms()["MetricAlarms"]},
                "alarms", keep)
    present_any(c.log_groups, {g["logGroupName"] for g in session.client("logs").describe_log_groups()["logGroups"]},
                "log_groups", keep)
    kms = session.client("kms")
    for k in c.kms_keys:
        if kms.describe_key(KeyId=k)["KeyMetadata"]["KeyState"] == "Enabled":
            keep("kms_keys", k)
    sm = session.client("secretsmanager")
    names = {s["ARN"] for s in sm.list_secrets()["SecretList"]}
    present_any(c.secrets, names, "secrets", keep)
    return present


def present_any(ids: list[str], existing: set[str], kind: str, keep: Any) -> None:
    for i in ids:
        if i in existing:
            keep(kind, i)


def as_dict(c: Created) -> dict[str, list[str]]:
    return {k: list(v) for k, v in vars(c).items() if v}
