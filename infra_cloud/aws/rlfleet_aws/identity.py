"""Identity: the nodes' instance role. It may use its own bucket, key, log group, metric
namespaces and secret, and nothing else."""

from __future__ import annotations

import json
from dataclasses import dataclass

import pulumi
import pulumi_aws as aws

from rlfleet.kit import KIT_OBJECT_PREFIX
from rlfleet.stack_outputs import CA_CERT_OBJECT
from rlfleet_cloud.settings import ClusterSettings

from .common import tags

ASSUME_EC2 = json.dumps({
    "Version": "2012-10-17",
    "Statement": [{"Effect": "Allow", "Principal": {"Service": "ec2.amazonaws.com"}, "Action": "sts:AssumeRole"}],
})


def node_policy_document(*, bucket_arn: str, key_arn: str, log_group_arn: str, secret_arn: str,
                         metric_namespace: str) -> dict:
    """Least privilege for a cluster node (pure function; asserted in tests)."""
    return {
        "Version": "2012-10-17",
        "Statement": [
            {"Sid": "ListOwnBucket", "Effect": "Allow", "Action": ["s3:ListBucket", "s3:GetBucketLocation"],
             "Resource": [bucket_arn]},
            {"Sid": "ReadWriteOwnObjects", "Effect": "Allow",
             "Action": ["s3:GetObject", "s3:PutObject", "s3:DeleteObject", "s3:AbortMultipartUpload"],
             "Resource": [f"{bucket_arn}/*"]},
            # the kit the nodes install is the stack's to ship: nodes read it, never replace it
            {"Sid": "KitIsReadOnly", "Effect": "Deny",
             "Action": ["s3:PutObject", "s3:DeleteObject", "s3:DeleteObjectVersion", "s3:PutObjectAcl",
                        "s3:PutObjectTagging", "s3:RestoreObject"],
             "Resource": [f"{bucket_arn}/{KIT_OBJECT_PREFIX}/*"]},
            {"Sid": "UseOwnKey", "Effect": "Allow",
             "Action": ["kms:Decrypt", "kms:Encrypt", "kms:GenerateDataKey", "kms:DescribeKey"],
             "Resource": [key_arn]},
            {"Sid": "ReadOwnSecret", "Effect": "Allow", "Action": ["secretsmanager:GetSecretValue"],
             "Resource": [secret_arn]},
            {"Sid": "WriteOwnLogs", "Effect": "Allow",
             "Action": ["logs:CreateLogStream", "logs:PutLogEvents", "logs:DescribeLogStreams"],
             "Resource": [log_group_arn, f"{log_group_arn}:*"]},
            # PutMetricData has no resource-level permissions; the namespace condition scopes it.
            {"Sid": "WriteOwnMetrics", "Effect": "Allow", "Action": ["cloudwatch:PutMetricData"],
             "Resource": "*",
             "Condition": {"StringEquals": {"cloudwatch:namespace": ["CWAgent", metric_namespace]}}},
        ],
    }


@dataclass
class IdentityArgs:
    settings: ClusterSettings
    bucket_arn: pulumi.Input[str]
    key_arn: pulumi.Input[str]
    log_group_arn: pulumi.Input[str]
    secret_arn: pulumi.Input[str]
    metric_namespace: str


class NodeIdentity(pulumi.ComponentResource):
    role_arn: pulumi.Output[str]
    instance_profile: pulumi.Output[str]

    def __init__(self, name: str, args: IdentityArgs, opts: pulumi.ResourceOptions | None = None) -> None:
        super().__init__("rlfleet:aws:NodeIdentity", name, None, opts)
        s = args.settings
        child = pulumi.ResourceOptions(parent=self)
        role = aws.iam.Role(f"{name}-role", assume_role_policy=ASSUME_EC2,
                            description=f"rlfleet {s.stack}: Ray cluster nodes", max_session_duration=3600,
                            tags=tags(s, "node-role"), opts=child)
        doc = pulumi.Output.all(args.bucket_arn, args.key_arn, args.log_group_arn, args.secret_arn).apply(
            lambda a: json.dumps(node_policy_document(bucket_arn=a[0], key_arn=a[1], log_group_arn=a[2],
                                                      secret_arn=a[3], metric_namespace=args.metric_namespace)))
        aws.iam.RolePolicy(f"{name}-policy", role=role.id, policy=doc, opts=child)
        profile = aws.iam.InstanceProfile(f"{name}-profile", role=role.name,
                                          tags=tags(s, "node-profile"), opts=child)
        self.role_arn = role.arn
        self.instance_profile = profile.name
        self.register_outputs({"role_arn": role.arn, "instance_profile": profile.name,
                               "ca_cert_object": CA_CERT_OBJECT})
