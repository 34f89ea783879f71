"""Small helpers shared by the AWS components."""

from __future__ import annotations

from rlfleet.constants import AWS_TAG_MANAGED, AWS_TAG_STACK
from rlfleet_cloud.settings import ClusterSettings, require_stack_id

PROJECT = "rlfleet-aws"


def tags(s: ClusterSettings, name: str) -> dict[str, str]:
    """Tags for every taggable resource: teardown scans for rlfleet:stack=<stack id> / rlfleet:managed."""
    return {"Name": f"rlfleet-{s.stack}-{name}", AWS_TAG_STACK: require_stack_id(s), AWS_TAG_MANAGED: "true"}
