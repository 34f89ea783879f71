"""Small helpers shared by the GCP components."""

from __future__ import annotations

from rlfleet.constants import GCP_LABEL_MANAGED, GCP_LABEL_ROLE, GCP_LABEL_STACK
from rlfleet_cloud.settings import ClusterSettings, require_stack_id

PROJECT = "rlfleet-gcp"


def labels(s: ClusterSettings, role: str = "") -> dict[str, str]:
    """Labels for every labelable resource (GCP label keys cannot contain ':'); the stack id."""
    out = {GCP_LABEL_STACK: require_stack_id(s), GCP_LABEL_MANAGED: "true"}
    if role:
        out[GCP_LABEL_ROLE] = role
    return out


def stack_marker(s: ClusterSettings) -> str:
    """Service accounts carry no labels: teardown's scan matches this text in their description."""
    return f"{GCP_LABEL_STACK}={require_stack_id(s)} {GCP_LABEL_MANAGED}=true"


def vm_name(s: ClusterSettings, role: str) -> str:
    """A cluster VM's name: role is "head" or "worker-<i>"."""
    return f"rlfleet-{s.stack}-{role}"


def vm_roles(s: ClusterSettings) -> list[str]:
    return ["head"] + [f"worker-{i}" for i in range(s.worker_count)]


def net_tag(stack: str) -> str:
    """Network tag on every cluster VM; firewall rules target it."""
    return f"rlfleet-{stack}"
