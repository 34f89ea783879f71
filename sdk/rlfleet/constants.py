"""Facts that cross a boundary, written once: tag and label keys, ports, the cloud stacks'
config defaults and the one slug rule.

Read by the SDK, the teardown scans and cost estimates, and the Pulumi programs in
``infra_cloud/`` (they put this checkout's ``sdk/`` on ``sys.path`` and import ``rlfleet``
from it, never from an index), so this module imports nothing but the standard library.
``Pulumi.yaml`` repeats the defaults for ``pulumi config`` users; a test fails when they drift
(tests/cloud/test_constants_drift.py).
"""

from __future__ import annotations

import re

# -- tags / labels (ARCHITECTURE.md) ----------------------------------------------------------
# GCP label keys cannot contain ':' and must start with a lowercase letter; AWS takes both.
AWS_TAG_STACK = "rlfleet:stack"
AWS_TAG_MANAGED = "rlfleet:managed"
GCP_LABEL_STACK = "rlfleet-stack"
GCP_LABEL_MANAGED = "rlfleet-managed"
GCP_LABEL_ROLE = "rlfleet-role"
# the stack id as a label of every series a node scrapes (Prometheus label names take no "-")
PROM_LABEL_STACK = "rlfleet_stack"
MANAGED_VALUE = "true"

# -- ports ------------------------------------------------------------------------------------
PORT_SSH = 22
PORT_API_DEFAULT = 8443  # TLS proxy in front of Ray's dashboard / Jobs API (127.0.0.1:8265)
PORT_RAY_GCS = 6379
PORT_RAY_DASHBOARD = 8265
PORT_RAY_CLIENT = 10001
PORT_RAY_METRICS = 8080  # Ray's Prometheus endpoint on every node (scraped locally only)
# Deploy runs: the TLS front (nginx on a cloud head, ansible's tls_front role on-prem) serves
# https://<host>:<p> for a policy server on 127.0.0.1:<p>, open to the admin networks only.
SERVE_PORTS_DEFAULT = (8600, 8601, 8602, 8603, 8604, 8605, 8606, 8607)
RAY_OWN_PORTS = (PORT_RAY_GCS, PORT_RAY_DASHBOARD, PORT_RAY_CLIENT, PORT_RAY_METRICS)
CONTROL_PORTS = (PORT_SSH, PORT_API_DEFAULT, PORT_RAY_GCS, PORT_RAY_DASHBOARD, PORT_RAY_CLIENT)

# -- cloud stack defaults ---------------------------------------------------------------------
# Config values (as strings, the way `pulumi config` hands them over) that a stack takes when its
# Pulumi.<stack>.yaml leaves them unset. "" means no default (the key is optional).
CLOUDS = ("aws", "gcp")
CLOUD_DEFAULTS: dict[str, dict[str, str]] = {
    "aws": {
        "head_instance_type": "m6i.xlarge",
        "worker_instance_type": "g5.xlarge",
        "image_family": "Deep Learning Base OSS Nvidia Driver GPU AMI (Ubuntu 22.04) *",
        "image_owner": "amazon",
    },
    "gcp": {
        "head_instance_type": "n2-standard-4",
        "worker_instance_type": "g2-standard-8",
        "image_family": "common-cu128-ubuntu-2204-nvidia-570",
        "image_owner": "deeplearning-platform-release",
    },
    "common": {
        "network_cidr": "10.42.0.0/16",
        "subnet_cidr": "10.42.1.0/24",
        "worker_count": "1",
        "spot": "false",
        "disk_size_gb": "200",
        "api_port": str(PORT_API_DEFAULT),
        "idle_minutes": "30",
        "max_lifetime_hours": "0",
        "disk_alarm_percent": "90",
        "checkpoint_noncurrent_days": "14",
        "checkpoint_archive_days": "30",
        "log_retention_days": "30",
        "ray_version": "2.60.0",
        "allow_world_control_ports": "false",
        "secure_boot": "true",  # GCP Shielded VM; the AWS program has no such setting
        "alert_email": "",
        "zone": "",
    },
}


def cloud_defaults(cloud: str) -> dict[str, str]:
    """Every default of a ``cloud`` stack (``aws`` | ``gcp``): the common ones and its own."""
    if cloud not in CLOUDS:
        raise ValueError(f"unknown cloud {cloud!r}; known: {', '.join(CLOUDS)}")
    return {**CLOUD_DEFAULTS["common"], **CLOUD_DEFAULTS[cloud]}


# -- slugs ------------------------------------------------------------------------------------
# One rule for every name the kit derives from free text (run labels, the stack part of stack ids):
# lowercase [a-z0-9_-], at most 63 characters, starting and ending with a letter or digit. Valid
# as a GCP label value and as an AWS tag value (and inside resource names after a letter prefix).
SLUG_MAX = 63
_NOT_SLUG = re.compile(r"[^a-z0-9_-]+")


def slug(text: str, *, max_len: int = 40, fallback: str = "run") -> str:
    """``text`` lowercased, every run of other characters made one '-', trimmed to ``max_len``
    (<= 63) without a leading or trailing '-' or '_'; ``fallback`` when nothing is left."""
    if not 1 <= max_len <= SLUG_MAX:
        raise ValueError(f"max_len must be 1..{SLUG_MAX}, not {max_len}")
    out = _NOT_SLUG.sub("-", text.lower()).strip("-_")[:max_len].rstrip("-_")
    return out or fallback


def run_label(name: str | None, agent: str, env: str) -> str:
    """A run's label: its name, else ``<agent>-<env slug>`` (``ppo-cartpole-v1``)."""
    return name or f"{agent}-{slug(env)}"
