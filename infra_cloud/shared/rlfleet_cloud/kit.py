"""The kit a stack ships: the wheel of the checkout this program runs from (see rlfleet.kit).

The Pulumi programs build it when they run (so a plain ``pulumi up`` ships it too), upload the
wheel and the node constraints as objects under ``rlfleet/kit/<sha256[:16]>/`` in the stack's own
bucket, and hand the nodes a :class:`KitRef`: where the files are and their sha256, nothing secret.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from rlfleet.kit import KIT_OBJECT_PREFIX, Kit, build_kit

CHECKOUT = Path(__file__).resolve().parents[3]  # <checkout>/infra_cloud/shared/rlfleet_cloud/kit.py
# The extras a node installs with the kit on each cloud: the agents and the artifact store's fsspec
# driver; not the cloud extras of the user's machine, which carry the Pulumi SDK and providers.
KIT_EXTRAS = {"aws": "agents,s3", "gcp": "agents,gcs"}
__all__ = ["CHECKOUT", "KIT_EXTRAS", "KIT_OBJECT_PREFIX", "KitRef", "checkout_kit", "kit_keys", "kit_ref"]


@dataclass(frozen=True)
class KitRef:
    """What a node's bootstrap gets to fetch and verify the kit (no secrets)."""

    wheel_uri: str
    sha256: str
    constraints_uri: str
    constraints_sha256: str

    @property
    def wheel_name(self) -> str:
        return self.wheel_uri.rsplit("/", 1)[1]


def checkout_kit() -> Kit:
    """Build (or reuse the cached build of) this checkout's wheel; raises rlfleet.kit.KitError."""
    return build_kit(CHECKOUT)


def kit_keys(kit: Kit) -> tuple[str, str]:
    """Object names of the wheel and of the constraints in the stack's bucket."""
    prefix = kit.object_prefix()
    return f"{prefix}/{kit.wheel_name}", f"{prefix}/constraints.txt"


def kit_ref(kit: Kit, scheme: str, bucket: str) -> KitRef:
    wheel_key, constraints_key = kit_keys(kit)
    return KitRef(wheel_uri=f"{scheme}://{bucket}/{wheel_key}", sha256=kit.sha256,
                  constraints_uri=f"{scheme}://{bucket}/{constraints_key}",
                  constraints_sha256=kit.constraints_sha256)
