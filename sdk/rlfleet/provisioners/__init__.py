"""Provisioners own a target's infrastructure: Pulumi stacks (aws, gcp), Ansible sites
(onprem) and the embedded local Ray head.

Contract (each module under ``rlfleet.provisioners`` exposes these module-level functions; heavy
imports such as pulumi or ansible_runner happen inside them, never at import time):

``target_from(name: str, **options) -> Target``
    Build a Target from what the provisioner knows (stack outputs, inventory). Options are the
    ``rlfleet target add`` flags (``stack``, ``outputs_file``, ``inventory``, ...).
``up(target: Target, *, echo: Callable[[str], None]) -> Target``
    Create or update the infrastructure; idempotent (re-running changes nothing). Returns the
    target as it is now (addresses may change).
``destroy(target: Target, *, delete_data: bool, echo) -> None``
    Remove what the provisioner created. Keeps artifact data (buckets, NAS directories) unless
    ``delete_data``. Idempotent: destroying a destroyed target is a no-op.
``plan_destroy(target: Target, *, delete_data: bool) -> list[str]``
    Human-readable list of what ``destroy`` would remove (for ``--dry-run``); changes nothing.
``scan_leftovers(target: Target) -> list[str]``
    After destroy: everything still present that the kit created for this target (tag/label
    scan). Empty list means clean.
"""

from __future__ import annotations

import importlib
from types import ModuleType

from rlfleet.errors import ConfigError

# target kind -> module implementing the contract above
_MODULES = {
    "local": "rlfleet.provisioners.local",
    "aws": "rlfleet.provisioners.pulumi_stack",
    "gcp": "rlfleet.provisioners.pulumi_stack",
    "onprem": "rlfleet.provisioners.ansible_site",
}


def for_kind(kind: str) -> ModuleType:
    mod = _MODULES.get(kind)
    if mod is None:
        raise ConfigError(
            f"targets of kind {kind!r} have no provisioner (kinds with one: {', '.join(sorted(_MODULES))}); "
            "an existing Ray cluster is added with 'rlfleet target add ray --address … --token-file …'"
        )
    return importlib.import_module(mod)
