"""The whole AWS cluster as one component; __main__.py exports its outputs."""

from __future__ import annotations

import pulumi
import pulumi_aws as aws

from rlfleet import stack_outputs as out
from rlfleet.kit import Kit, KitError
from rlfleet_cloud.kit import checkout_kit
from rlfleet_cloud.settings import ClusterSettings, with_stack_id

from .compute import GpuNodePool, NodeArgs, PoolArgs, RayHead
from .identity import IdentityArgs, NodeIdentity
from .kit import KitArgs, KitObjects
from .monitoring import ClusterLogs, ClusterMonitoring, LogsArgs, MonitoringArgs
from .network import Network, NetworkArgs
from .storage import ClusterStorage, StorageArgs


class RayGpuCluster(pulumi.ComponentResource):
    outputs: dict[str, pulumi.Output]

    def __init__(self, name: str, settings: ClusterSettings, opts: pulumi.ResourceOptions | None = None, *,
                 kit: Kit | None = None) -> None:
        super().__init__("rlfleet:aws:RayGpuCluster", name, None, opts)
        s = settings
        try:
            kit = kit or checkout_kit()  # the wheel of this checkout, built when the program runs
        except KitError as err:
            raise pulumi.RunError(f"rlfleet-aws: {err}") from None
        child = pulumi.ResourceOptions(parent=self)
        region_res = aws.get_region()
        region = region_res.region or region_res.name
        account_id = aws.get_caller_identity().account_id
        s = with_stack_id(s, account=account_id, region=region, organization=pulumi.get_organization(),
                          project=pulumi.get_project())
        ami = aws.ec2.get_ami(most_recent=True, owners=[s.image_owner],
                              filters=[{"name": "name", "values": [s.image_family]},
                                       {"name": "architecture", "values": ["x86_64"]}])
        namespace = f"rlfleet/{s.stack}"

        net = Network(f"{name}-net", NetworkArgs(settings=s), opts=child)
        store = ClusterStorage(f"{name}-store", StorageArgs(settings=s, account_id=account_id, region=region),
                               opts=child)
        logs = ClusterLogs(f"{name}-obs", LogsArgs(settings=s, key_arn=store.key_arn), opts=child)
        ident = NodeIdentity(f"{name}-id", IdentityArgs(
            settings=s, bucket_arn=store.bucket_arn, key_arn=store.key_arn, log_group_arn=logs.log_group_arn,
            secret_arn=store.secret_arn, metric_namespace=namespace), opts=child)
        ca_uri = pulumi.Output.concat("s3://", store.bucket_name, "/", out.CA_CERT_OBJECT)
        shipped = KitObjects(f"{name}-kit", KitArgs(settings=s, kit=kit, bucket_name=store.bucket_name,
                                                    key_arn=store.key_arn), opts=child)
        node = NodeArgs(settings=s, ami_id=ami.id, subnet_id=net.subnet_id, security_group_id=net.security_group_id,
                        instance_profile=ident.instance_profile, key_arn=store.key_arn, region=region,
                        secret_arn=store.secret_arn, ca_cert_uri=ca_uri, artifact_root=store.artifact_root,
                        log_group=logs.log_group_name, kit=shipped.ref)
        head = RayHead(f"{name}-head", node, opts=child)
        pool = GpuNodePool(f"{name}-workers", PoolArgs(node=node, head_private_ip=head.private_ip), opts=child)
        mon = ClusterMonitoring(f"{name}-mon", MonitoringArgs(
            settings=s, region=region, account_id=account_id, head_instance_id=head.instance_id,
            worker_instance_ids=[i.id for i in pool.instances], topic_arn=logs.topic_arn,
            metric_namespace=namespace), opts=child)

        self.outputs = {
            out.OUTPUT_RAY_ADDRESS: pulumi.Output.concat("https://", head.public_ip, ":", str(s.api_port)),
            out.OUTPUT_ARTIFACT_ROOT: store.artifact_root,
            out.OUTPUT_TOKEN_SECRET: pulumi.Output.concat("aws-secret:", store.secret_arn),
            out.OUTPUT_RAY_TOKEN: store.token,
            out.OUTPUT_CA_CERT_URI: ca_uri,
            out.OUTPUT_DASHBOARD_URL: mon.dashboard_url,
            out.OUTPUT_REGION: pulumi.Output.from_input(region),
            out.OUTPUT_HEAD_INSTANCE: head.instance_id,
            out.OUTPUT_WORKER_INSTANCES: pool.instance_ids,
            out.OUTPUT_STACK_TAG: pulumi.Output.from_input(s.stack_id),
            out.OUTPUT_SERVE_PORTS: pulumi.Output.from_input(list(s.serve_ports)),
        }
        self.register_outputs(self.outputs)
