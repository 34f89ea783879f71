"""Storage and secrets: the stack's KMS key, the artifact bucket and the Ray token secret."""

from __future__ import annotations

import json
from dataclasses import dataclass

import pulumi
import pulumi_aws as aws
import pulumi_random as random

from rlfleet.stack_outputs import ARTIFACT_PREFIX
from rlfleet_cloud.settings import ClusterSettings

from .common import tags


def key_policy(account_id: str, region: str) -> str:
    """Account admins manage the key; CloudWatch Logs and CloudWatch alarms (→ SNS) may use it."""
    return json.dumps({
        "Version": "2012-10-17",
        "Statement": [
            {"Sid": "AccountAdmin", "Effect": "Allow",
             "Principal": {"AWS": f"arn:aws:iam::{account_id}:root"}, "Action": "kms:*", "Resource": "*"},
            {"Sid": "CloudWatchLogs", "Effect": "Allow",
             "Principal": {"Service": f"logs.{region}.amazonaws.com"},
             "Action": ["kms:Encrypt*", "kms:Decrypt*", "kms:ReEncrypt*", "kms:GenerateDataKey*", "kms:Describe*"],
             "Resource": "*",
             "Condition": {"ArnLike": {"kms:EncryptionContext:aws:logs:arn":
                                       f"arn:aws:logs:{region}:{account_id}:log-group:/rlfleet/*"}}},
            {"Sid": "CloudWatchAlarmsToSns", "Effect": "Allow",
             "Principal": {"Service": "cloudwatch.amazonaws.com"},
             "Action": ["kms:Decrypt", "kms:GenerateDataKey*"], "Resource": "*",
             "Condition": {"StringEquals": {"aws:SourceAccount": account_id}}},
        ],
    })


def tls_only_policy(bucket_arn: str) -> str:
    return json.dumps({
        "Version": "2012-10-17",
        "Statement": [{
            "Sid": "DenyInsecureTransport", "Effect": "Deny", "Principal": "*", "Action": "s3:*",
            "Resource": [bucket_arn, f"{bucket_arn}/*"],
            "Condition": {"Bool": {"aws:SecureTransport": "false"}},
        }],
    })


@dataclass
class StorageArgs:
    settings: ClusterSettings
    account_id: str
    region: str


class ClusterStorage(pulumi.ComponentResource):
    key_arn: pulumi.Output[str]
    bucket_name: pulumi.Output[str]
    bucket_arn: pulumi.Output[str]
    artifact_root: pulumi.Output[str]
    secret_arn: pulumi.Output[str]
    token: pulumi.Output[str]

    def __init__(self, name: str, args: StorageArgs, opts: pulumi.ResourceOptions | None = None) -> None:
        super().__init__("rlfleet:aws:ClusterStorage", name, None, opts)
        s = args.settings
        child = pulumi.ResourceOptions(parent=self)
        # Data outlives the stack: `pulumi destroy` leaves the bucket and the key that encrypts
        # it (delete them deliberately; see docs/runbook-aws.md).
        keep = pulumi.ResourceOptions(parent=self, retain_on_delete=True)
        key = aws.kms.Key(f"{name}-key", description=f"rlfleet {s.stack}: artifacts, disks, secret, logs",
                          enable_key_rotation=True, deletion_window_in_days=30,
                          policy=key_policy(args.account_id, args.region), tags=tags(s, "key"), opts=keep)
        aws.kms.Alias(f"{name}-key-alias", name=f"alias/rlfleet-{s.stack}", target_key_id=key.key_id, opts=child)

        bucket = aws.s3.Bucket(f"{name}-artifacts", bucket_prefix=f"rlfleet-{s.stack}-"[:37],
                               force_destroy=False, tags=tags(s, "artifacts"), opts=keep)
        aws.s3.BucketPublicAccessBlock(f"{name}-artifacts-pab", bucket=bucket.id, block_public_acls=True,
                                       block_public_policy=True, ignore_public_acls=True,
                                       restrict_public_buckets=True, opts=child)
        aws.s3.BucketOwnershipControls(f"{name}-artifacts-owner", bucket=bucket.id,
                                       rule={"object_ownership": "BucketOwnerEnforced"}, opts=child)
        aws.s3.BucketServerSideEncryptionConfiguration(
            f"{name}-artifacts-sse", bucket=bucket.id,
            rules=[{"apply_server_side_encryption_by_default": {"sse_algorithm": "aws:kms",
                                                               "kms_master_key_id": key.arn},
                    "bucket_key_enabled": True}], opts=child)
        aws.s3.BucketVersioning(f"{name}-artifacts-versioning", bucket=bucket.id,
                                versioning_configuration={"status": "Enabled"}, opts=child)
        aws.s3.BucketLifecycleConfiguration(
            f"{name}-artifacts-lifecycle", bucket=bucket.id,
            rules=[
                {"id": "checkpoints-old-versions", "status": "Enabled",
                 "filter": {"prefix": f"{ARTIFACT_PREFIX}/runs/"},
                 "noncurrent_version_expiration": {"noncurrent_days": s.checkpoint_noncurrent_days},
                 "transitions": [{"days": s.checkpoint_archive_days, "storage_class": "INTELLIGENT_TIERING"}]},
                {"id": "abort-incomplete-uploads", "status": "Enabled", "filter": {"prefix": ""},
                 "abort_incomplete_multipart_upload": {"days_after_initiation": 7}},
            ], opts=child)
        aws.s3.BucketPolicy(f"{name}-artifacts-tls-only", bucket=bucket.id,
                            policy=bucket.arn.apply(tls_only_policy), opts=child)

        token = random.RandomPassword(f"{name}-ray-token", length=48, special=False, opts=child)
        secret = aws.secretsmanager.Secret(f"{name}-ray-token", name_prefix=f"rlfleet-{s.stack}-ray-token-",
                                           description=f"rlfleet {s.stack}: Ray cluster auth token",
                                           kms_key_id=key.arn, recovery_window_in_days=7,
                                           tags=tags(s, "ray-token"), opts=child)
        aws.secretsmanager.SecretVersion(f"{name}-ray-token-v", secret_id=secret.id,
                                         secret_string=token.result, opts=child)

        self.key_arn = key.arn
        self.bucket_name = bucket.bucket
        self.bucket_arn = bucket.arn
        self.artifact_root = pulumi.Output.concat("s3://", bucket.bucket, "/", ARTIFACT_PREFIX)
        self.secret_arn = secret.arn
        self.token = pulumi.Output.secret(token.result)
        self.register_outputs({"key_arn": key.arn, "bucket": bucket.bucket, "artifact_root": self.artifact_root,
                               "secret_arn": secret.arn})
