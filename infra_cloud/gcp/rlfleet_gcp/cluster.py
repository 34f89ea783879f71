"""The whole GCP cluster as one component; __main__.py exports its outputs."""

from __future__ import annotations

import pulumi
import pulumi_gcp as gcp

from rlfleet import stack_outputs as out
from rlfleet.kit import Kit, KitError
from rlfleet_cloud.kit import checkout_kit
from rlfleet_cloud.settings import ClusterSettings, with_stack_id

from .compute import GpuNodePool, NodeArgs, PoolArgs, RayHead
from .foundation import ClusterStorage, IdentityArgs, Network, NetworkArgs, NodeIdentity, StorageArgs
from .kit import KitArgs, KitObjects
from .monitoring import ClusterMonitoring, MonitoringArgs


class RayGpuCluster(pulumi.ComponentResource):
    outputs: dict[str, pulumi.Output]

    def __init__(self, name: str, settings: ClusterSettings, *, region: str,
                 opts: pulumi.ResourceOptions | None = None, kit: Kit | None = None) -> None:
        super().__init__("rlfleet:gcp:RayGpuCluster", name, None, opts)
        s = settings
        try:
            kit = kit or checkout_kit()  # the wheel of this checkout, built when the program runs
        except KitError as err:
            raise pulumi.RunError(f"rlfleet-gcp: {err}") from None
        child = pulumi.ResourceOptions(parent=self)
        proj = gcp.organizations.get_project()
        project, number = proj.project_id, proj.number
        s = with_stack_id(s, account=project, region=region, organization=pulumi.get_organization(),
                          project=pulumi.get_project())
        zone = s.zone or gcp.compute.get_zones(region=region).names[0]
        image = gcp.compute.get_image(family=s.image_family, project=s.image_owner).self_link
        gcs_agent = gcp.storage.get_project_service_account().member

        net = Network(f"{name}-net", NetworkArgs(settings=s, region=region), opts=child)
        store = ClusterStorage(f"{name}-store", StorageArgs(settings=s, region=region, project=project,
                                                            project_number=number, gcs_agent_member=gcs_agent),
                               opts=child)
        ident = NodeIdentity(f"{name}-id", IdentityArgs(settings=s, project=project, bucket_name=store.bucket_name,
                                                        secret_id=store.secret_id), opts=child)
        ca_uri = pulumi.Output.concat("gs://", store.bucket_name, "/", out.CA_CERT_OBJECT)
        shipped = KitObjects(f"{name}-kit", KitArgs(kit=kit, bucket_name=store.bucket_name, key_id=store.key_id),
                             opts=child)
        node = NodeArgs(settings=s, zone=zone, region=region, project=project, image=image,
                        subnetwork=net.subnetwork, service_account=ident.email, key_id=store.key_id,
                        secret_id=store.secret_id, ca_cert_uri=ca_uri, artifact_root=store.artifact_root,
                        kit=shipped.ref)
        head = RayHead(f"{name}-head", node, opts=child)
        pool = GpuNodePool(f"{name}-workers", PoolArgs(node=node, head_private_ip=head.private_ip), opts=child)
        mon = ClusterMonitoring(f"{name}-mon", MonitoringArgs(settings=s, region=region, project=project,
                                                              project_number=number, bucket_name=store.bucket_name,
                                                              zone=zone),
                                opts=child)
        self.outputs = {
            out.OUTPUT_RAY_ADDRESS: pulumi.Output.concat("https://", head.public_ip, ":", str(s.api_port)),
            out.OUTPUT_ARTIFACT_ROOT: store.artifact_root,
            out.OUTPUT_TOKEN_SECRET: pulumi.Output.concat("gcp-secret:", store.secret_name),
            out.OUTPUT_RAY_TOKEN: store.token,
            out.OUTPUT_CA_CERT_URI: ca_uri,
            out.OUTPUT_DASHBOARD_URL: mon.dashboard_url,
            out.OUTPUT_REGION: pulumi.Output.from_input(region),
            out.OUTPUT_HEAD_INSTANCE: head.name,
            out.OUTPUT_WORKER_INSTANCES: pool.names,
            out.OUTPUT_STACK_TAG: pulumi.Output.from_input(s.stack_id),
            out.OUTPUT_SERVE_PORTS: pulumi.Output.from_input(list(s.serve_ports)),
        }
        self.register_outputs(self.outputs)
