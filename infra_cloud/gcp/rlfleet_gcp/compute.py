"""Compute: the Ray head (CPU, static external IP, TLS endpoint) and the GPU worker pool.
Shielded VM, OS Login, CMEK-encrypted boot disks, no project-wide SSH keys."""

from __future__ import annotations

from dataclasses import dataclass

import pulumi
import pulumi_gcp as gcp

from rlfleet_cloud.bootstrap import NodeParams, render_bootstrap
from rlfleet_cloud.kit import KitRef
from rlfleet_cloud.settings import ClusterSettings

from .common import labels, net_tag, vm_name

BASE_METADATA = {"enable-oslogin": "TRUE", "block-project-ssh-keys": "TRUE", "serial-port-enable": "FALSE"}


@dataclass
class NodeArgs:
    settings: ClusterSettings
    zone: str
    region: str
    project: str
    image: str
    subnetwork: pulumi.Input[str]
    service_account: pulumi.Input[str]
    key_id: pulumi.Input[str]
    secret_id: pulumi.Input[str]
    ca_cert_uri: pulumi.Input[str]
    artifact_root: pulumi.Input[str]
    kit: pulumi.Input[KitRef]


def _scheduling(s: ClusterSettings, *, spot: bool) -> dict:
    sched: dict = {"on_host_maintenance": "TERMINATE", "automatic_restart": not spot,
                   "provisioning_model": "SPOT" if spot else "STANDARD", "preemptible": spot}
    if spot or s.max_lifetime_hours:
        sched["instance_termination_action"] = "STOP"
    if s.max_lifetime_hours:
        sched["max_run_duration"] = {"seconds": s.max_lifetime_hours * 3600}
    return sched


def _vm(name: str, a: NodeArgs, *, role: str, machine_type: str, startup: pulumi.Input[str], gpus: int,
        spot: bool, network_ip: pulumi.Input[str] | None, nat_ip: pulumi.Input[str] | None,
        parent: pulumi.Resource) -> gcp.compute.Instance:
    s = a.settings
    nic: dict = {"subnetwork": a.subnetwork}
    if network_ip is not None:
        nic["network_ip"] = network_ip
    if nat_ip is not None:
        nic["access_configs"] = [{"nat_ip": nat_ip}]
    metadata = {**BASE_METADATA, "startup-script": startup}
    if gpus:
        metadata["install-nvidia-driver"] = "True"  # Deep Learning VM images install the driver
    return gcp.compute.Instance(
        name,
        name=vm_name(s, role),
        zone=a.zone,
        machine_type=machine_type,
        boot_disk={"auto_delete": True, "kms_key_self_link": a.key_id,
                   "initialize_params": {"image": a.image, "size": s.disk_size_gb, "type": "pd-balanced",
                                         "labels": labels(s, role.split("-")[0])}},
        network_interfaces=[nic],
        service_account={"email": a.service_account, "scopes": ["https://www.googleapis.com/auth/cloud-platform"]},
        shielded_instance_config={"enable_secure_boot": s.secure_boot, "enable_vtpm": True,
                                  "enable_integrity_monitoring": True},
        guest_accelerators=[{"type": s.gpu_type, "count": gpus}] if gpus else None,
        scheduling=_scheduling(s, spot=spot),
        metadata=metadata,
        tags=[net_tag(s.stack)],
        labels=labels(s, role.split("-")[0]),
        allow_stopping_for_update=True,
        opts=pulumi.ResourceOptions(parent=parent, ignore_changes=["bootDisk.initializeParams.image"]),
    )


class RayHead(pulumi.ComponentResource):
    name: pulumi.Output[str]
    private_ip: pulumi.Output[str]
    public_ip: pulumi.Output[str]

    def __init__(self, name: str, args: NodeArgs, opts: pulumi.ResourceOptions | None = None) -> None:
        super().__init__("rlfleet:gcp:RayHead", name, None, opts)
        s = args.settings
        child = pulumi.ResourceOptions(parent=self)
        ext = gcp.compute.Address(f"{name}-ip", name=f"rlfleet-{s.stack}-head", region=args.region,
                                  address_type="EXTERNAL", labels=labels(s, "head"), opts=child)
        internal = gcp.compute.Address(f"{name}-internal-ip", name=f"rlfleet-{s.stack}-head-internal",
                                       region=args.region, address_type="INTERNAL", subnetwork=args.subnetwork,
                                       labels=labels(s, "head"), opts=child)
        startup = pulumi.Output.all(ext.address, args.secret_id, args.ca_cert_uri, args.artifact_root,
                                    args.kit).apply(
            lambda v: render_bootstrap(s, NodeParams(role="head", region=args.region, project=args.project,
                                                     secret_ref=v[1], ca_cert_uri=v[2], artifact_root=v[3],
                                                     head_public_ip=v[0], kit=v[4])))
        vm = _vm(f"{name}-vm", args, role="head", machine_type=s.head_instance_type, startup=startup, gpus=0,
                 spot=False, network_ip=internal.address, nat_ip=ext.address, parent=self)
        self.name = vm.name
        self.private_ip = internal.address
        self.public_ip = ext.address
        self.register_outputs({"name": vm.name, "private_ip": internal.address, "public_ip": ext.address})


@dataclass
class PoolArgs:
    node: NodeArgs
    head_private_ip: pulumi.Input[str]


class GpuNodePool(pulumi.ComponentResource):
    names: pulumi.Output[list[str]]

    def __init__(self, name: str, args: PoolArgs, opts: pulumi.ResourceOptions | None = None) -> None:
        super().__init__("rlfleet:gcp:GpuNodePool", name, None, opts)
        a = args.node
        s = a.settings
        startup = pulumi.Output.all(args.head_private_ip, a.secret_id, a.ca_cert_uri, a.artifact_root,
                                    a.kit).apply(
            lambda v: render_bootstrap(s, NodeParams(role="worker", region=a.region, project=a.project,
                                                     secret_ref=v[1], ca_cert_uri=v[2], artifact_root=v[3],
                                                     head_private_ip=v[0], kit=v[4])))
        # Workers have no external address; they reach package mirrors through Cloud NAT.
        self.instances = [
            _vm(f"{name}-{i}", a, role=f"worker-{i}", machine_type=s.worker_instance_type, startup=startup,
                gpus=s.gpu_count, spot=s.spot, network_ip=None, nat_ip=None, parent=self)
            for i in range(s.worker_count)
        ]
        self.names = pulumi.Output.all(*[vm.name for vm in self.instances])
        self.register_outputs({"names": self.names})
