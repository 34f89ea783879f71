"""Provisioners own a target's infrastructure: Pulumi stacks (aws, gcp), Ansible sites
(onprem) and the embedded local Ray head.

The contract every provisioner module implements (:class:`registry.Provisioner`) and the one
registry of target kinds are in :mod:`rlfleet.provisioners.registry`; the typed references a
target records about its provisioner are in :mod:`rlfleet.provisioners.refs`.
"""

from __future__ import annotations

from rlfleet.provisioners.registry import Provisioner, for_kind

__all__ = ["Provisioner", "for_kind"]
