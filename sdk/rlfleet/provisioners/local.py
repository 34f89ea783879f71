"""Provisioner for the embedded local target: the Ray head on this machine."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from rlfleet.targets import Target


def target_from(name: str, **options: Any) -> Target:
    from rlfleet.local import local_target

    return local_target()


def up(target: Target, *, echo: Callable[[str], None]) -> Target:
    from rlfleet.local import ensure_local_up

    return ensure_local_up(echo=echo)


def destroy(target: Target, *, delete_data: bool, echo: Callable[[str], None]) -> None:
    """Stop the Ray head. With delete_data, also remove the local artifact root's runs/."""
    import shutil

    from rlfleet.local import local_down
    from rlfleet.targets import rlfleet_home

    local_down(echo=echo)
    if delete_data:
        shutil.rmtree(rlfleet_home() / "runs", ignore_errors=True)


def plan_destroy(target: Target, *, delete_data: bool) -> list[str]:
    from rlfleet.local import read_state
    from rlfleet.targets import rlfleet_home

    plan = []
    st = read_state()
    if st:
        plan.append(
            f"stop the local Ray head ({target.ray_address}, pids {st.get('holder_pid')}, {st.get('forwarder_pid')})"
        )
    if delete_data and (rlfleet_home() / "runs").exists():
        plan.append(f"delete {rlfleet_home() / 'runs'}")
    return plan


def scan_leftovers(target: Target) -> list[str]:
    """Anything of the local head still alive or on disk after destroy."""
    import os

    from rlfleet.local import _cluster_pids, _ray_temp_dir, _temp_parent, read_state

    left = []
    if read_state():
        left.append("local state file still present")
    temp = _temp_parent()
    if os.path.lexists(temp) and temp.lstat().st_uid == os.getuid():  # someone else's is not ours to remove
        left.append(f"Ray temp dir {temp}")
    left += [f"Ray process {pid}" for pid in _cluster_pids(_ray_temp_dir())]
    return left
