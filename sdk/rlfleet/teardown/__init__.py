"""Teardown that leaves nothing behind: leak scans by tag/label, removal of leftovers,
artifact cleanup and cost estimates.

Modules (imported on demand; boto3 / google-cloud clients load only inside their functions):

- :mod:`rlfleet.teardown.aws`     scan/remove everything tagged ``rlfleet:stack=<stack>``
- :mod:`rlfleet.teardown.gcp`     scan/remove everything labelled ``rlfleet-stack=<stack>``
- :mod:`rlfleet.teardown.down`    ``rlfleet down``: cancel runs, destroy, sweep, verify
- :mod:`rlfleet.teardown.cleanup` ``rlfleet cleanup``: prune run artifacts by rule
- :mod:`rlfleet.teardown.cost`    ``rlfleet cost``: hourly/monthly estimate from a stack config
"""

from __future__ import annotations

from dataclasses import dataclass, field

from rlfleet.constants import AWS_TAG_MANAGED as AWS_MANAGED_TAG  # noqa: F401 - names the scanners import
from rlfleet.constants import AWS_TAG_STACK as AWS_STACK_TAG  # noqa: F401
from rlfleet.constants import GCP_LABEL_MANAGED as GCP_MANAGED_LABEL  # noqa: F401
from rlfleet.constants import GCP_LABEL_STACK as GCP_STACK_LABEL  # noqa: F401


@dataclass(frozen=True)
class Leftover:
    """One resource that the kit created for a stack and that still exists."""

    provider: str  # aws | gcp | onprem | local
    kind: str  # e.g. "ec2:instance", "s3:bucket", "iam:role", "gcs:bucket"
    id: str  # what the remover passes to the delete call (bare KMS key id, bucket name, ...)
    region: str | None = None
    arn: str | None = None
    is_data: bool = False  # buckets holding artifacts: removed only with --delete-data
    detail: str = ""

    def __str__(self) -> str:
        where = f" ({self.region})" if self.region else ""
        data = " [artifact data]" if self.is_data else ""
        extra = f" - {self.detail}" if self.detail else ""
        return f"{self.provider} {self.kind} {self.id}{where}{data}{extra}"


@dataclass
class RemovalReport:
    """What a removal pass did. ``ok`` is True when nothing failed."""

    removed: list[Leftover] = field(default_factory=list)
    failed: list[tuple[Leftover, str]] = field(default_factory=list)
    skipped: list[tuple[Leftover, str]] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.failed

    def lines(self) -> list[str]:
        out = [f"removed  {x}" for x in self.removed]
        out += [f"FAILED   {x}: {why}" for x, why in self.failed]
        out += [f"kept     {x}: {why}" for x, why in self.skipped]
        return out

    def summary(self) -> str:
        return (
            f"{len(self.removed)} removed, {len(self.failed)} failed, {len(self.skipped)} kept"
        )
