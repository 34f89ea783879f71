"""Compute: the Ray head (CPU, static Elastic IP, TLS endpoint) and the GPU worker pool."""

from __future__ import annotations

from dataclasses import dataclass

import pulumi
import pulumi_aws as aws

from rlfleet_cloud.bootstrap import NodeParams, aws_cloud_config, render_bootstrap
from rlfleet_cloud.kit import KitRef
from rlfleet_cloud.settings import ClusterSettings

from .common import tags

IMDS_V2_ONLY = {"http_endpoint": "enabled", "http_tokens": "required", "http_put_response_hop_limit": 1,
                "instance_metadata_tags": "disabled"}


@dataclass
class NodeArgs:
    settings: ClusterSettings
    ami_id: pulumi.Input[str]
    subnet_id: pulumi.Input[str]
    security_group_id: pulumi.Input[str]
    instance_profile: pulumi.Input[str]
    key_arn: pulumi.Input[str]
    region: str
    secret_arn: pulumi.Input[str]
    ca_cert_uri: pulumi.Input[str]
    artifact_root: pulumi.Input[str]
    log_group: pulumi.Input[str]
    kit: pulumi.Input[KitRef]


def _instance(name: str, a: NodeArgs, *, role: str, instance_type: str, user_data: pulumi.Input[str],
              spot: bool, parent: pulumi.Resource, public_ip: bool) -> aws.ec2.Instance:
    s = a.settings
    market = None
    if spot:
        # persistent + stop: an interrupted spot worker stops (keeps its disk) instead of vanishing
        market = {"market_type": "spot", "spot_options": {"instance_interruption_behavior": "stop",
                                                           "spot_instance_type": "persistent"}}
    return aws.ec2.Instance(
        name,
        ami=a.ami_id,
        instance_type=instance_type,
        subnet_id=a.subnet_id,
        vpc_security_group_ids=[a.security_group_id],
        associate_public_ip_address=public_ip,
        iam_instance_profile=a.instance_profile,
        metadata_options=IMDS_V2_ONLY,
        root_block_device={"encrypted": True, "kms_key_id": a.key_arn, "volume_size": s.disk_size_gb,
                           "volume_type": "gp3", "delete_on_termination": True,
                           "tags": tags(s, f"{role}-disk")},
        ebs_optimized=True,
        monitoring=True,
        instance_initiated_shutdown_behavior="stop",
        instance_market_options=market,
        user_data=user_data,
        user_data_replace_on_change=False,
        tags={**tags(s, role), "rlfleet:role": role.split("-")[0]},
        opts=pulumi.ResourceOptions(parent=parent, ignore_changes=["ami"]),
    )


class RayHead(pulumi.ComponentResource):
    instance_id: pulumi.Output[str]
    private_ip: pulumi.Output[str]
    public_ip: pulumi.Output[str]

    def __init__(self, name: str, args: NodeArgs, opts: pulumi.ResourceOptions | None = None) -> None:
        super().__init__("rlfleet:aws:RayHead", name, None, opts)
        s = args.settings
        child = pulumi.ResourceOptions(parent=self)
        eip = aws.ec2.Eip(f"{name}-ip", domain="vpc", tags=tags(s, "head-ip"), opts=child)
        user_data = pulumi.Output.all(eip.public_ip, args.secret_arn, args.ca_cert_uri, args.artifact_root,
                                      args.log_group, args.kit).apply(
            lambda v: aws_cloud_config(render_bootstrap(s, NodeParams(
                role="head", region=args.region, project="", secret_ref=v[1], ca_cert_uri=v[2],
                artifact_root=v[3], head_public_ip=v[0], log_group=v[4], kit=v[5]))))
        inst = _instance(f"{name}-vm", args, role="head", instance_type=s.head_instance_type,
                         user_data=user_data, spot=False, parent=self, public_ip=False)
        aws.ec2.EipAssociation(f"{name}-ip-assoc", instance_id=inst.id, allocation_id=eip.allocation_id,
                               opts=child)
        self.instance_id = inst.id
        self.private_ip = inst.private_ip
        self.public_ip = eip.public_ip
        self.register_outputs({"instance_id": inst.id, "private_ip": inst.private_ip, "public_ip": eip.public_ip})


@dataclass
class PoolArgs:
    node: NodeArgs
    head_private_ip: pulumi.Input[str]


class GpuNodePool(pulumi.ComponentResource):
    instance_ids: pulumi.Output[list[str]]

    def __init__(self, name: str, args: PoolArgs, opts: pulumi.ResourceOptions | None = None) -> None:
        super().__init__("rlfleet:aws:GpuNodePool", name, None, opts)
        a = args.node
        s = a.settings
        user_data = pulumi.Output.all(args.head_private_ip, a.secret_arn, a.ca_cert_uri, a.artifact_root,
                                      a.log_group, a.kit).apply(
            lambda v: aws_cloud_config(render_bootstrap(s, NodeParams(
                role="worker", region=a.region, project="", secret_ref=v[1], ca_cert_uri=v[2],
                artifact_root=v[3], head_private_ip=v[0], log_group=v[4], kit=v[5]))))
        # Workers get a public address for package installs only; the security group admits
        # nothing from outside the cluster except SSH from the admin CIDRs.
        self.instances = [
            _instance(f"{name}-{i}", a, role=f"worker-{i}", instance_type=s.worker_instance_type,
                      user_data=user_data, spot=s.spot, parent=self, public_ip=True)
            for i in range(s.worker_count)
        ]
        self.instance_ids = pulumi.Output.all(*[i.id for i in self.instances])
        self.register_outputs({"instance_ids": self.instance_ids})
