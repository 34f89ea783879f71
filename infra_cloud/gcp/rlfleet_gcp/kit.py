"""The kit this stack ships: the checkout's wheel and node constraints as objects in the stack's
bucket, encrypted with the stack's key; nodes fetch them with their service account (read-only)."""

from __future__ import annotations

from dataclasses import dataclass

import pulumi
import pulumi_gcp as gcp

from rlfleet.kit import Kit
from rlfleet_cloud.kit import KitRef, kit_keys, kit_ref


@dataclass
class KitArgs:
    kit: Kit
    bucket_name: pulumi.Input[str]
    key_id: pulumi.Input[str]


class KitObjects(pulumi.ComponentResource):
    ref: pulumi.Output[KitRef]

    def __init__(self, name: str, args: KitArgs, opts: pulumi.ResourceOptions | None = None) -> None:
        super().__init__("rlfleet:gcp:KitObjects", name, None, opts)
        kit = args.kit
        child = pulumi.ResourceOptions(parent=self)
        wheel_key, constraints_key = kit_keys(kit)
        objs = [
            gcp.storage.BucketObject(f"{name}-{suffix}", bucket=args.bucket_name, name=key,
                                     source=pulumi.FileAsset(str(path)), content_type=ctype,
                                     kms_key_name=args.key_id, opts=child)
            for suffix, key, path, ctype in (("wheel", wheel_key, kit.wheel, "application/zip"),
                                             ("constraints", constraints_key, kit.constraints, "text/plain"))
        ]
        # derived from the objects: the nodes (their startup script) wait until both are uploaded
        self.ref = pulumi.Output.all(*[o.bucket for o in objs]).apply(lambda b: kit_ref(kit, "gs", b[0]))
        self.register_outputs({"wheel_key": wheel_key, "sha256": kit.sha256})
