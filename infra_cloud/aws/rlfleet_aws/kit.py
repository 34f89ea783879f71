"""The kit this stack ships: the checkout's wheel and node constraints as objects in the stack's
bucket, encrypted with the stack's key; nodes fetch them with their instance role (read-only)."""

from __future__ import annotations

from dataclasses import dataclass

import pulumi
import pulumi_aws as aws

from rlfleet.kit import Kit
from rlfleet_cloud.kit import KitRef, kit_keys, kit_ref
from rlfleet_cloud.settings import ClusterSettings

from .common import tags


@dataclass
class KitArgs:
    settings: ClusterSettings
    kit: Kit
    bucket_name: pulumi.Input[str]
    key_arn: pulumi.Input[str]


class KitObjects(pulumi.ComponentResource):
    ref: pulumi.Output[KitRef]

    def __init__(self, name: str, args: KitArgs, opts: pulumi.ResourceOptions | None = None) -> None:
        super().__init__("rlfleet:aws:KitObjects", name, None, opts)
        s, kit = args.settings, args.kit
        child = pulumi.ResourceOptions(parent=self)
        wheel_key, constraints_key = kit_keys(kit)
        objs = [
            aws.s3.BucketObjectv2(f"{name}-{suffix}", bucket=args.bucket_name, key=key,
                                  source=pulumi.FileAsset(str(path)), content_type=ctype,
                                  server_side_encryption="aws:kms", kms_key_id=args.key_arn,
                                  tags=tags(s, f"kit-{suffix}"), opts=child)
            for suffix, key, path, ctype in (("wheel", wheel_key, kit.wheel, "application/zip"),
                                             ("constraints", constraints_key, kit.constraints, "text/plain"))
        ]
        # derived from the objects: the nodes (their user data) wait until both are uploaded
        self.ref = pulumi.Output.all(*[o.bucket for o in objs]).apply(lambda b: kit_ref(kit, "s3", b[0]))
        self.register_outputs({"wheel_key": wheel_key, "sha256": kit.sha256})
