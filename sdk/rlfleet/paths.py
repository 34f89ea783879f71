"""Where rlfleet keeps this machine's state. A leaf module (it imports nothing of rlfleet), so the
targets file, the local target and the provisioners can all read it without importing each other.

``$RLFLEET_HOME`` (default ``~/.rlfleet``) holds ``local/`` (the local Ray head's token and
``state.json``), ``runs/`` (the local artifact root), ``tokens/`` and ``ca/``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any


def rlfleet_home() -> Path:
    """Where rlfleet keeps local state (local cluster, default artifact root)."""
    return Path(os.environ.get("RLFLEET_HOME", "~/.rlfleet")).expanduser()


def local_state_dir() -> Path:
    """The local Ray head's private directory: token, state.json, lock, ray-start.log."""
    return rlfleet_home() / "local"


def local_token_path() -> Path:
    return local_state_dir() / "token"


def local_state_file() -> Path:
    return local_state_dir() / "state.json"


def read_local_state() -> dict[str, Any]:
    """The running local head's recorded state (ports, pids, isolation); ``{}`` when there is none."""
    return read_record(local_state_file())


def read_record(path: Path) -> dict[str, Any]:
    """A JSON record the local target keeps (state, supervisor); ``{}`` when missing or unreadable."""
    try:
        return dict(json.loads(path.read_text()))
    except (FileNotFoundError, ValueError):
        return {}
