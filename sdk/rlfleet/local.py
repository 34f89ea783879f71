"""``rlfleet.local`` is :mod:`rlfleet.provisioners.local` under its older name: the local target's
provisioner moved beside the others. The same module object (not a copy), so code that patches
``rlfleet.local.ensure_local_up`` still patches what ``submit_run`` calls."""

from __future__ import annotations

import sys

from rlfleet.provisioners import local
from rlfleet.provisioners.local import *  # noqa: F403 - the names mypy and readers see here

sys.modules[__name__] = local
