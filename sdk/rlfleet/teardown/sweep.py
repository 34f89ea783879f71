"""The tag sweep of a cloud stack: the one scanner (and remover) of what the kit created for it.

A cloud's teardown module (:mod:`rlfleet.teardown.aws`, :mod:`rlfleet.teardown.gcp`) builds a
:class:`StackSweep` for a :class:`StackScope` with its ``stack_sweep(scope)``; the Pulumi
provisioner hands it to ``rlfleet down`` (``sweep``) and its ``scan_leftovers`` is ``sweep.scan``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from rlfleet.teardown import Leftover, RemovalReport


@dataclass(frozen=True)
class StackScope:
    """Which resources belong to one stack: its tag value, and where to look."""

    target: str  # the target's name (for messages)
    stack: str  # the value its resources are tagged with: the stack id (older targets: the bare name)
    region: str | None = None
    project: str | None = None  # gcp


@dataclass(frozen=True)
class StackSweep:
    scope: StackScope
    scan: Callable[[], list[Leftover]]
    remove: Callable[[list[Leftover], bool], RemovalReport]  # (items, delete_data)
    tagged: str  # "the tag rlfleet:stack=<id>": how the leftovers are recognised, for messages
    note: str | None = None  # what this sweep cannot cover, said before teardown starts
