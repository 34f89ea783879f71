"""Network, storage, secret and identity for the GCP cluster."""

from __future__ import annotations

from dataclasses import dataclass

import pulumi
import pulumi_gcp as gcp
import pulumi_random as random

from rlfleet.kit import KIT_OBJECT_PREFIX
from rlfleet.stack_outputs import ARTIFACT_PREFIX
from rlfleet_cloud.settings import ClusterSettings

from .common import labels, net_tag, stack_marker

KMS_ROLE = "roles/cloudkms.cryptoKeyEncrypterDecrypter"
# Project-level roles the node service account gets (these two cannot be scoped lower).
NODE_PROJECT_ROLES = ("roles/logging.logWriter", "roles/monitoring.metricWriter")


def firewall_rules(settings: ClusterSettings) -> list[dict]:
    """(name suffix, allows, source ranges or tags) for the cluster's ingress rules."""
    tag = net_tag(settings.stack)
    return [
        {"suffix": "admin", "allows": [{"protocol": "tcp", "ports": [
            "22", str(settings.api_port), f"{min(settings.serve_ports)}-{max(settings.serve_ports)}"]}],
         "source_ranges": list(settings.admin_cidrs), "target_tags": [tag],
         "description": "SSH, the TLS Ray Jobs API and the TLS deploy ports from the admin CIDRs only"},
        {"suffix": "intra", "allows": [{"protocol": "tcp"}, {"protocol": "udp"}, {"protocol": "icmp"}],
         "source_tags": [tag], "target_tags": [tag], "description": "intra-cluster (Ray GCS, object store, metrics)"},
    ]


@dataclass
class NetworkArgs:
    settings: ClusterSettings
    region: str


class Network(pulumi.ComponentResource):
    network: pulumi.Output[str]
    subnetwork: pulumi.Output[str]

    def __init__(self, name: str, args: NetworkArgs, opts: pulumi.ResourceOptions | None = None) -> None:
        super().__init__("rlfleet:gcp:Network", name, None, opts)
        s = args.settings
        child = pulumi.ResourceOptions(parent=self)
        if s.existing_network:
            network: pulumi.Input[str] = s.existing_network
            subnetwork: pulumi.Input[str] = s.existing_subnet or ""
        else:
            net = gcp.compute.Network(f"{name}-vpc", name=f"rlfleet-{s.stack}", auto_create_subnetworks=False,
                                      opts=child)
            sub = gcp.compute.Subnetwork(f"{name}-subnet", name=f"rlfleet-{s.stack}", network=net.id,
                                         region=args.region, ip_cidr_range=s.subnet_cidr,
                                         private_ip_google_access=True,
                                         log_config={"aggregation_interval": "INTERVAL_5_MIN"}, opts=child)
            router = gcp.compute.Router(f"{name}-router", name=f"rlfleet-{s.stack}", network=net.id,
                                        region=args.region, opts=child)
            gcp.compute.RouterNat(f"{name}-nat", name=f"rlfleet-{s.stack}", router=router.name, region=args.region,
                                  nat_ip_allocate_option="AUTO_ONLY",
                                  source_subnetwork_ip_ranges_to_nat="ALL_SUBNETWORKS_ALL_IP_RANGES", opts=child)
            network, subnetwork = net.id, sub.id
        for rule in firewall_rules(s):
            gcp.compute.Firewall(f"{name}-fw-{rule['suffix']}", name=f"rlfleet-{s.stack}-{rule['suffix']}",
                                 network=network, direction="INGRESS", allows=rule["allows"],
                                 source_ranges=rule.get("source_ranges"), source_tags=rule.get("source_tags"),
                                 target_tags=rule["target_tags"], description=rule["description"],
                                 log_config={"metadata": "INCLUDE_ALL_METADATA"}, opts=child)
        self.network = pulumi.Output.from_input(network)
        self.subnetwork = pulumi.Output.from_input(subnetwork)
        self.register_outputs({"network": self.network, "subnetwork": self.subnetwork})


def soft_delete_seconds(s: ClusterSettings) -> int:
    return min(90, max(7, s.checkpoint_noncurrent_days)) * 86400


@dataclass
class StorageArgs:
    settings: ClusterSettings
    region: str
    project: str
    project_number: str
    gcs_agent_member: str


class ClusterStorage(pulumi.ComponentResource):
    key_id: pulumi.Output[str]
    bucket_name: pulumi.Output[str]
    artifact_root: pulumi.Output[str]
    secret_id: pulumi.Output[str]
    secret_name: pulumi.Output[str]
    token: pulumi.Output[str]

    def __init__(self, name: str, args: StorageArgs, opts: pulumi.ResourceOptions | None = None) -> None:
        super().__init__("rlfleet:gcp:ClusterStorage", name, None, opts)
        s = args.settings
        child = pulumi.ResourceOptions(parent=self)
        # Data outlives the stack, and so does what reading it needs: `pulumi destroy` leaves the
        # bucket, its key (destroying a CryptoKey destroys its versions: every object would become
        # unreadable) and the key's grants to the GCS agent. `rlfleet down --delete-data` removes
        # data and key versions together (see docs/runbook-gcp.md).
        keep = pulumi.ResourceOptions(parent=self, retain_on_delete=True)
        ring = gcp.kms.KeyRing(f"{name}-ring", name=f"rlfleet-{s.stack}", location=args.region, opts=keep)
        key = gcp.kms.CryptoKey(f"{name}-key", name=f"rlfleet-{s.stack}", key_ring=ring.id,
                                rotation_period="7776000s", labels=labels(s), opts=keep)
        compute_agent = f"serviceAccount:service-{args.project_number}@compute-system.iam.gserviceaccount.com"
        grants = [
            gcp.kms.CryptoKeyIAMMember(f"{name}-key-{who}", crypto_key_id=key.id, role=KMS_ROLE, member=member,
                                       opts=keep)
            for who, member in (("gcs", args.gcs_agent_member), ("compute", compute_agent))
        ]
        bucket_name = f"rlfleet-{s.stack}-{args.project}"[:63]
        bucket = gcp.storage.Bucket(
            f"{name}-artifacts", name=bucket_name, location=args.region, force_destroy=False,
            uniform_bucket_level_access=True, public_access_prevention="enforced",
            versioning={"enabled": True}, encryption={"default_kms_key_name": key.id},
            lifecycle_rules=[
                {"action": {"type": "Delete"},
                 "condition": {"days_since_noncurrent_time": s.checkpoint_noncurrent_days, "with_state": "ARCHIVED"}},
                {"action": {"type": "SetStorageClass", "storage_class": "NEARLINE"},
                 "condition": {"age": s.checkpoint_archive_days, "matches_prefixes": [f"{ARTIFACT_PREFIX}/runs/"]}},
                {"action": {"type": "AbortIncompleteMultipartUpload"}, "condition": {"age": 7}},
            ],
            # Nodes need storage.objects.delete (overwrites and old checkpoints), which IAM cannot
            # limit to live generations: a deleted noncurrent version stays restorable (soft delete)
            # for as long as the lifecycle would have kept it (GCS allows 7..90 days).
            soft_delete_policy={"retention_duration_seconds": soft_delete_seconds(s)},
            labels=labels(s),
            opts=pulumi.ResourceOptions(parent=self, depends_on=grants, retain_on_delete=True))
        token = random.RandomPassword(f"{name}-ray-token", length=48, special=False, opts=child)
        secret = gcp.secretmanager.Secret(f"{name}-ray-token", secret_id=f"rlfleet-{s.stack}-ray-token",
                                          replication={"auto": {}}, labels=labels(s), opts=child)
        gcp.secretmanager.SecretVersion(f"{name}-ray-token-v", secret=secret.id, secret_data=token.result, opts=child)
        self.key_id = key.id
        self.bucket_name = bucket.name
        self.artifact_root = pulumi.Output.concat("gs://", bucket.name, "/", ARTIFACT_PREFIX)
        self.secret_id = secret.secret_id
        self.secret_name = secret.name  # projects/<number>/secrets/<id>
        self.token = pulumi.Output.secret(token.result)
        self.register_outputs({"key": key.id, "bucket": bucket.name, "secret": secret.name})


@dataclass
class IdentityArgs:
    settings: ClusterSettings
    project: str
    bucket_name: pulumi.Input[str]
    secret_id: pulumi.Input[str]


class NodeIdentity(pulumi.ComponentResource):
    email: pulumi.Output[str]

    def __init__(self, name: str, args: IdentityArgs, opts: pulumi.ResourceOptions | None = None) -> None:
        super().__init__("rlfleet:gcp:NodeIdentity", name, None, opts)
        s = args.settings
        child = pulumi.ResourceOptions(parent=self)
        sa = gcp.serviceaccount.Account(f"{name}-sa", account_id=f"rlfleet-{s.stack}-node"[:30],
                                        display_name=f"rlfleet {s.stack} Ray nodes",
                                        # service accounts carry no labels: teardown's scan matches this marker
                                        description=stack_marker(s),
                                        opts=child)
        member = pulumi.Output.concat("serviceAccount:", sa.email)
        # Objects of its bucket: read/write, except the kit the nodes install, which they may only
        # read (the stack ships it). IAM conditions on object names (uniform bucket-level access).
        kit_objects = pulumi.Output.concat('resource.name.startsWith("projects/_/buckets/', args.bucket_name,
                                           f'/objects/{KIT_OBJECT_PREFIX}/")')
        gcp.storage.BucketIAMMember(f"{name}-bucket", bucket=args.bucket_name, role="roles/storage.objectUser",
                                    member=member, opts=child,
                                    condition={"title": "not-the-kit", "description": "all but the shipped kit",
                                               "expression": pulumi.Output.concat("!", kit_objects)})
        gcp.storage.BucketIAMMember(f"{name}-kit", bucket=args.bucket_name, role="roles/storage.objectViewer",
                                    member=member, opts=child,
                                    condition={"title": "the-kit", "description": "read the shipped kit",
                                               "expression": kit_objects})
        gcp.secretmanager.SecretIamMember(f"{name}-secret", secret_id=args.secret_id,
                                          role="roles/secretmanager.secretAccessor", member=member, opts=child)
        for role in NODE_PROJECT_ROLES:
            gcp.projects.IAMMember(f"{name}-{role.split('/')[1].replace('.', '-')}", project=args.project,
                                   role=role, member=member, opts=child)
        self.email = sa.email
        self.register_outputs({"email": sa.email})
