"""Read and validate this stack's config (Pulumi.yaml documents every key)."""

from __future__ import annotations

import pulumi

from rlfleet_cloud.settings import ClusterSettings, StackConfigError, parse_settings

from .common import PROJECT


def load_settings() -> ClusterSettings:
    cfg = pulumi.Config(PROJECT)
    try:
        return parse_settings("gcp", cfg.get, stack=pulumi.get_stack())
    except StackConfigError as err:
        raise pulumi.RunError(f"{PROJECT}: {err}") from None
