"""Small helpers shared by the AWS components."""

from __future__ import annotations

from rlfleet.stack_outputs import AWS_TAG_MANAGED, AWS_TAG_STACK

PROJECT = "rlfleet-aws"


def tags(stack: str, name: str) -> dict[str, str]:
    """Tags for every taggable resource: teardown scans for rlfleet:stack / rlfleet:managed."""
    return {"Name": f"rlfleet-{stack}-{name}", AWS_TAG_STACK: stack, AWS_TAG_MANAGED: "true"}
