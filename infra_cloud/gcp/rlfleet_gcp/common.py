"""Small helpers shared by the GCP components."""

from __future__ import annotations

from rlfleet.stack_outputs import GCP_LABEL_MANAGED, GCP_LABEL_STACK

PROJECT = "rlfleet-gcp"


def labels(stack: str, role: str = "") -> dict[str, str]:
    """Labels for every labelable resource (GCP label keys cannot contain ':')."""
    out = {GCP_LABEL_STACK: stack, GCP_LABEL_MANAGED: "true"}
    if role:
        out["rlfleet-role"] = role
    return out


def net_tag(stack: str) -> str:
    """Network tag on every cluster VM; firewall rules target it."""
    return f"rlfleet-{stack}"
