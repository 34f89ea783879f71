"""The local target's process check when the process exits while it is read."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from rlfleet.provisioners import local


def test_a_process_that_exits_while_proc_is_read_counts_as_dead(monkeypatch: pytest.MonkeyPatch) -> None:
    """Reading /proc/<pid>/stat of a process that is exiting raises ESRCH (seen at session teardown:
    local_down() failed with ProcessLookupError)."""
    real = Path.read_text

    def vanishing(self: Path, *a: object, **kw: object) -> str:
        if self.name == "stat" and self.parent.name == str(os.getpid()):
            raise ProcessLookupError(3, "No such process")
        return real(self, *a, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(Path, "read_text", vanishing)
    assert local._alive(os.getpid()) is False


def test_this_process_is_alive() -> None:
    assert local._alive(os.getpid()) is True
