"""Targets of kind ``ray``: an existing Ray cluster rlfleet reaches but does not provision (no
up/down; the registry says so). Only ``target_from`` (``rlfleet target add ray``) lives here."""

from __future__ import annotations

from typing import Any

from rlfleet.errors import ConfigError
from rlfleet.targets import Target


def target_from(name: str, *, address: str | None = None, token_file: str | None = None,
                artifact_root: str | None = None, client_artifact_root: str | None = None,
                ca_cert: str | None = None, **_: Any) -> Target:
    given = (("--address", address), ("--token-file", token_file), ("--artifact-root", artifact_root))
    missing = [flag for flag, value in given if not value]
    if missing:
        raise ConfigError(f"'target add ray' needs {', '.join(missing)}")
    return Target(
        name=name,
        kind="ray",
        ray_address=str(address),
        token_source=f"file:{token_file}",
        artifact_root=str(artifact_root),
        client_artifact_root=client_artifact_root,
        ca_cert=ca_cert,
    )
