"""Stack settings: one typed, validated object per stack, same vocabulary on both clouds.

``parse_settings(cloud, get, stack=...)`` reads raw config values through ``get(key) -> str |
None`` (a ``pulumi.Config.get`` in the programs, a dict's ``get`` in tests) and raises
:class:`StackConfigError` with a message naming the key and what to do.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import json
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from rlfleet.constants import RAY_OWN_PORTS, cloud_defaults
from rlfleet.stack_outputs import PORT_SSH, SERVE_PORTS_DEFAULT, make_stack_id


class StackConfigError(ValueError):
    """A stack config value is invalid; the message names the key and the fix."""


# GPU worker types the kit knows: instance/machine type -> (gpu type, gpus per instance).
AWS_GPU_INSTANCES: dict[str, tuple[str, int]] = {
    **{f"g5.{s}": ("a10g", 1) for s in ("xlarge", "2xlarge", "4xlarge", "8xlarge", "16xlarge")},
    "g5.12xlarge": ("a10g", 4), "g5.24xlarge": ("a10g", 4), "g5.48xlarge": ("a10g", 8),
    **{f"g6.{s}": ("l4", 1) for s in ("xlarge", "2xlarge", "4xlarge", "8xlarge", "16xlarge")},
    "g6.12xlarge": ("l4", 4), "g6.24xlarge": ("l4", 4), "g6.48xlarge": ("l4", 8),
    **{f"g6e.{s}": ("l40s", 1) for s in ("xlarge", "2xlarge", "4xlarge", "8xlarge", "16xlarge")},
    **{f"g4dn.{s}": ("t4", 1) for s in ("xlarge", "2xlarge", "4xlarge", "8xlarge", "16xlarge")},
    "g4dn.12xlarge": ("t4", 4),
    "p4d.24xlarge": ("a100", 8), "p5.48xlarge": ("h100", 8),
}
AWS_GPU_TYPES = frozenset(g for g, _ in AWS_GPU_INSTANCES.values())

GCP_GPU_TYPES = frozenset({
    "nvidia-l4", "nvidia-tesla-t4", "nvidia-tesla-v100", "nvidia-tesla-a100",
    "nvidia-a100-80gb", "nvidia-h100-80gb",
})
# Machine families with built-in GPUs: machine type -> (accelerator, count). N1 types take
# attached T4/V100 GPUs instead (any count in 1, 2, 4, 8).
GCP_GPU_MACHINES: dict[str, tuple[str, int]] = {
    **{f"g2-standard-{n}": ("nvidia-l4", 1) for n in (4, 8, 12, 16, 32)},
    "g2-standard-24": ("nvidia-l4", 2), "g2-standard-48": ("nvidia-l4", 4),
    "g2-standard-96": ("nvidia-l4", 8),
    "a2-highgpu-1g": ("nvidia-tesla-a100", 1), "a2-highgpu-2g": ("nvidia-tesla-a100", 2),
    "a2-highgpu-4g": ("nvidia-tesla-a100", 4), "a2-highgpu-8g": ("nvidia-tesla-a100", 8),
    "a2-ultragpu-1g": ("nvidia-a100-80gb", 1), "a3-highgpu-8g": ("nvidia-h100-80gb", 8),
}
GCP_N1_GPUS = frozenset({"nvidia-tesla-t4", "nvidia-tesla-v100"})

# "World-open": admin CIDRs that together cover more than this (sum of the union, per family).
# IPv4: more than a /8 (1/256 of the address space). IPv6: more than a /32, the usual minimum
# allocation to an ISP or LIR; one organisation's own networks are /48-/64 per site.
IPV4_MAX_PREFIX = 8
IPV6_MAX_PREFIX = 32
_V4_MAPPED = ipaddress.IPv6Network("::ffff:0:0/96")


def world_open_reason(cidrs: Iterable[str]) -> str | None:
    """Why these CIDRs count as world-open (None if they do not). Pure; ansible mirrors it.

    Takes the union of all CIDRs (overlaps counted once), IPv4 and IPv6 separately, and compares
    its size with one /8 (IPv4) or one /32 (IPv6). IPv4-mapped IPv6 ranges (::ffff:0:0/96)
    count as IPv4. ``0.0.0.0/1`` + ``128.0.0.0/1`` is as open as ``0.0.0.0/0``.
    """
    v4: list[ipaddress.IPv4Network] = []
    v6: list[ipaddress.IPv6Network] = []
    for text in cidrs:
        net = ipaddress.ip_network(str(text).strip(), strict=False)
        if isinstance(net, ipaddress.IPv6Network) and net.subnet_of(_V4_MAPPED):
            mapped = net.network_address.ipv4_mapped
            assert mapped is not None
            v4.append(ipaddress.IPv4Network(f"{mapped}/{net.prefixlen - 96}"))
        elif isinstance(net, ipaddress.IPv4Network):
            v4.append(net)
        else:
            v6.append(net)
    reasons = []
    for family, nets, bits, limit in (("IPv4", v4, 32, IPV4_MAX_PREFIX), ("IPv6", v6, 128, IPV6_MAX_PREFIX)):
        total = sum(n.num_addresses for n in ipaddress.collapse_addresses(nets))  # type: ignore[arg-type]
        if total > 2 ** (bits - limit):
            size = f"/{bits - (total.bit_length() - 1)}" if total & (total - 1) == 0 else f"{total} addresses"
            reasons.append(f"{family} {size} in total, more than a /{limit}")
    return "; ".join(reasons) or None


@dataclass(frozen=True)
class ClusterSettings:
    cloud: str  # "aws" | "gcp"
    stack: str
    admin_cidrs: tuple[str, ...]
    allow_world_control_ports: bool
    network_cidr: str
    subnet_cidr: str
    existing_network: str | None  # aws: vpc id; gcp: network self link / name
    existing_subnet: str | None  # aws: subnet id; gcp: subnetwork self link / name
    head_instance_type: str
    worker_instance_type: str
    gpu_type: str
    gpu_count: int
    worker_count: int
    spot: bool
    disk_size_gb: int
    image_family: str
    image_owner: str  # aws: AMI owner; gcp: image project
    api_port: int
    idle_minutes: int
    max_lifetime_hours: int
    disk_alarm_percent: int
    checkpoint_noncurrent_days: int
    checkpoint_archive_days: int
    log_retention_days: int
    ray_version: str
    secure_boot: bool
    alert_email: str
    zone: str = ""  # aws: availability zone; gcp: zone ("" = first zone of the region)
    # Value of the rlfleet:stack tag / rlfleet-stack label (rlfleet.stack_outputs.make_stack_id).
    # Set by the program once it knows account/project and region (see with_stack_id).
    stack_id: str = ""

    @property
    def control_ports(self) -> tuple[int, ...]:
        """Ports reachable from the admin CIDRs (SSH and the TLS API endpoint)."""
        return (PORT_SSH, self.api_port)

    @property
    def serve_ports(self) -> tuple[int, ...]:
        """Deploy ports the head's TLS front serves (also reachable from the admin CIDRs only)."""
        return SERVE_PORTS_DEFAULT


def with_stack_id(s: ClusterSettings, *, account: str, region: str, organization: str,
                  project: str) -> ClusterSettings:
    """These settings plus the stack id that tags every resource (deterministic: see make_stack_id)."""
    sid = make_stack_id(cloud=s.cloud, account=account, region=region, organization=organization,
                        project=project, stack=s.stack)
    return dataclasses.replace(s, stack_id=sid)


def require_stack_id(s: object) -> str:
    """The stack id for tags/labels; a bare stack name is refused (teardown could not scope it)."""
    if not isinstance(s, ClusterSettings) or not s.stack_id:
        raise TypeError("tags/labels take the ClusterSettings after with_stack_id (the stack id is the tag "
                        f"value), not {s!r}")
    return s.stack_id


def _int(key: str, raw: str, lo: int, hi: int) -> int:
    try:
        val = int(raw)
    except ValueError:
        raise StackConfigError(f"config {key}: {raw!r} is not a whole number") from None
    if not lo <= val <= hi:
        raise StackConfigError(f"config {key}: {val} is out of range; use {lo}..{hi}")
    return val


def _bool(key: str, raw: str) -> bool:
    low = raw.strip().lower()
    if low in ("true", "1", "yes"):
        return True
    if low in ("false", "0", "no", ""):
        return False
    raise StackConfigError(f"config {key}: {raw!r} is not true or false")


def parse_cidrs(raw: str | None, *, allow_world: bool) -> tuple[str, ...]:
    """Admin CIDRs from a JSON list or a comma-separated string; world-open needs the override."""
    key = "admin_cidrs"
    if raw is None or not raw.strip():
        raise StackConfigError(
            f"config {key} is required: the networks allowed to reach SSH and the cluster API, "
            "e.g. pulumi config set --path 'admin_cidrs[0]' 203.0.113.7/32"
        )
    raw = raw.strip()
    try:
        items = json.loads(raw) if raw.startswith("[") else [p for p in raw.split(",")]
    except json.JSONDecodeError as err:
        raise StackConfigError(f"config {key}: not a JSON list of CIDRs ({err})") from None
    out: list[str] = []
    for item in items:
        text = str(item).strip()
        try:
            net = ipaddress.ip_network(text, strict=True)
        except ValueError as err:
            raise StackConfigError(
                f"config {key}: {text!r} is not a valid CIDR ({err}); write e.g. 203.0.113.7/32"
            ) from None
        out.append(str(net))
    if not out:
        raise StackConfigError(f"config {key}: the list is empty; add at least one network")
    reason = world_open_reason(out)
    if reason and not allow_world:
        raise StackConfigError(
            f"config {key}: {', '.join(out)} would open SSH and the cluster API to the whole internet "
            f"({reason}); list your own networks instead, or set allow_world_control_ports=true if you "
            "really mean it"
        )
    return tuple(out)


def _gpu(cloud: str, worker_type: str, gpu_type: str | None, gpu_count: str | None) -> tuple[str, int]:
    if cloud == "aws":
        known, table = AWS_GPU_TYPES, AWS_GPU_INSTANCES
    else:
        known, table = GCP_GPU_TYPES, GCP_GPU_MACHINES
    if gpu_type is not None and gpu_type not in known:
        raise StackConfigError(
            f"config gpu_type: unknown GPU type {gpu_type!r} for {cloud}; known: {', '.join(sorted(known))}"
        )
    if worker_type in table:
        t_gpu, t_count = table[worker_type]
        if gpu_type is not None and gpu_type != t_gpu:
            raise StackConfigError(
                f"config gpu_type: {worker_type} comes with {t_gpu} GPUs, not {gpu_type}; "
                "remove gpu_type or pick a matching worker_instance_type"
            )
        if gpu_count is not None and _int("gpu_count", gpu_count, 1, 16) != t_count:
            raise StackConfigError(
                f"config gpu_count: {worker_type} has {t_count} GPU(s); remove gpu_count or change the type"
            )
        return t_gpu, t_count
    if cloud == "gcp" and worker_type.startswith("n1-"):
        gpu = gpu_type or "nvidia-tesla-t4"
        if gpu not in GCP_N1_GPUS:
            raise StackConfigError(f"config gpu_type: N1 machines take {', '.join(sorted(GCP_N1_GPUS))}, not {gpu}")
        count = _int("gpu_count", gpu_count or "1", 1, 8)
        if count not in (1, 2, 4, 8):
            raise StackConfigError("config gpu_count: N1 machines take 1, 2, 4 or 8 GPUs")
        return gpu, count
    if gpu_type is None or gpu_count is None:
        raise StackConfigError(
            f"config worker_instance_type: {worker_type!r} is not a GPU type the kit knows; "
            "set gpu_type and gpu_count explicitly if it has GPUs"
        )
    return gpu_type, _int("gpu_count", gpu_count, 1, 16)


# Keys of earlier versions that would now be ignored: refused with the way out.
_REMOVED = {
    "kit_spec": "the stack now ships the wheel of the checkout it runs from (objects in its bucket, "
                "installed pinned by sha256); remove it with: pulumi config rm kit_spec",
}


def parse_settings(cloud: str, get: Callable[[str], str | None], *, stack: str) -> ClusterSettings:
    if cloud not in ("aws", "gcp"):
        raise StackConfigError(f"unknown cloud {cloud!r}")
    defaults = cloud_defaults(cloud)  # rlfleet.constants: the one copy (Pulumi.yaml is checked against it)

    def val(key: str) -> str:
        raw = get(key)
        return defaults[key] if raw is None else str(raw)

    allow_world = _bool("allow_world_control_ports", val("allow_world_control_ports"))
    admin = parse_cidrs(get("admin_cidrs"), allow_world=allow_world)
    for key in ("network_cidr", "subnet_cidr"):
        try:
            ipaddress.ip_network(val(key), strict=True)
        except ValueError as err:
            raise StackConfigError(f"config {key}: {val(key)!r} is not a valid CIDR ({err})") from None
    net, sub = ipaddress.ip_network(val("network_cidr")), ipaddress.ip_network(val("subnet_cidr"))
    if sub.version != net.version or not sub.subnet_of(net):  # type: ignore[arg-type]
        raise StackConfigError(f"config subnet_cidr: {sub} must lie inside network_cidr {net}")
    worker_type = val("worker_instance_type")
    gpu_type, gpu_count = _gpu(cloud, worker_type, get("gpu_type"), get("gpu_count"))
    api_port = _int("api_port", val("api_port"), 1024, 65535)
    if api_port in RAY_OWN_PORTS:
        raise StackConfigError(f"config api_port: {api_port} is one of Ray's own ports; use e.g. 8443")
    for key, why in _REMOVED.items():
        if get(key) is not None:
            raise StackConfigError(f"config {key} is no longer used: {why}")
    ray_version = val("ray_version")
    if not re.fullmatch(r"\d+\.\d+\.\d+", ray_version):
        raise StackConfigError(f"config ray_version: {ray_version!r} is not a version like 2.60.0")
    email = val("alert_email")
    if email and not re.fullmatch(r"[^@\s]+@[^@\s]+\.[^@\s]+", email):
        raise StackConfigError(f"config alert_email: {email!r} is not an email address")
    network, subnet = get("existing_network"), get("existing_subnet")
    if bool(network) != bool(subnet):
        raise StackConfigError("config existing_network and existing_subnet go together; set both or neither")
    return ClusterSettings(
        cloud=cloud,
        stack=stack,
        admin_cidrs=admin,
        allow_world_control_ports=allow_world,
        network_cidr=val("network_cidr"),
        subnet_cidr=val("subnet_cidr"),
        existing_network=network or None,
        existing_subnet=subnet or None,
        head_instance_type=val("head_instance_type"),
        worker_instance_type=worker_type,
        gpu_type=gpu_type,
        gpu_count=gpu_count,
        worker_count=_int("worker_count", val("worker_count"), 0, 64),
        spot=_bool("spot", val("spot")),
        disk_size_gb=_int("disk_size_gb", val("disk_size_gb"), 50, 16384),
        image_family=val("image_family"),
        image_owner=val("image_owner"),
        api_port=api_port,
        idle_minutes=_int("idle_minutes", val("idle_minutes"), 5, 1440),
        max_lifetime_hours=_int("max_lifetime_hours", val("max_lifetime_hours"), 0, 24 * 30),
        disk_alarm_percent=_int("disk_alarm_percent", val("disk_alarm_percent"), 50, 99),
        checkpoint_noncurrent_days=_int("checkpoint_noncurrent_days", val("checkpoint_noncurrent_days"), 1, 3650),
        checkpoint_archive_days=_int("checkpoint_archive_days", val("checkpoint_archive_days"), 1, 3650),
        log_retention_days=_int("log_retention_days", val("log_retention_days"), 1, 3653),
        ray_version=ray_version,
        secure_boot=_bool("secure_boot", val("secure_boot")),
        alert_email=email,
        zone=val("zone"),
    )
