"""rlfleet: one run spec, any GPU fleet.

    from rlfleet import RunSpec, submit_run
    run = submit_run(RunSpec(kind="train", env="CartPole-v1", agent="ppo", budget={"steps": 50_000}))
    run.wait(); run.metrics(); run.artifacts()

Importing rlfleet is cheap: names are loaded on first use, and no Ray, torch or Pulumi import
happens on the SDK's own paths.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_EXPORTS = {
    "RlfleetError": "rlfleet.errors",
    "Run": "rlfleet.runs",
    "RunStatus": "rlfleet.runs",
    "get_run": "rlfleet.runs",
    "list_runs": "rlfleet.runs",
    "reproduce_run": "rlfleet.runs",
    "submit_run": "rlfleet.runs",
    "resume_sweep": "rlfleet.sweeps",
    "sweep": "rlfleet.sweeps",
    "RunSpec": "rlfleet.spec",
    "Target": "rlfleet.targets",
    "get_target": "rlfleet.targets",
}
__all__ = sorted(_EXPORTS)
__version__ = "0.1.0"

if TYPE_CHECKING:
    from rlfleet.errors import RlfleetError  # noqa: F401
    from rlfleet.runs import Run, RunStatus, get_run, list_runs, reproduce_run, submit_run  # noqa: F401
    from rlfleet.spec import RunSpec  # noqa: F401
    from rlfleet.sweeps import resume_sweep, sweep  # noqa: F401
    from rlfleet.targets import Target, get_target  # noqa: F401


def __getattr__(name: str) -> Any:
    mod = _EXPORTS.get(name)
    if mod is None:
        raise AttributeError(f"module 'rlfleet' has no attribute {name!r}")
    value = getattr(importlib.import_module(mod), name)
    globals()[name] = value
    return value
