"""rlfleet: one run spec, any GPU fleet.

    from rlfleet import RunSpec, submit_run
    run = submit_run(RunSpec(kind="train", env="CartPole-v1", agent="ppo", budget={"steps": 50_000}))
    run.wait(); run.metrics(); run.artifacts()

Importing rlfleet is cheap: no Ray, torch or Pulumi import happens here.
"""

from rlfleet.errors import RlfleetError
from rlfleet.runs import Run, RunStatus, get_run, list_runs, submit_run
from rlfleet.spec import RunSpec
from rlfleet.targets import Target, get_target

__all__ = [
    "RlfleetError",
    "Run",
    "RunSpec",
    "RunStatus",
    "Target",
    "get_run",
    "get_target",
    "list_runs",
    "submit_run",
]
__version__ = "0.1.0"
