"""Session fixtures of the serving tests: policies in the local target's store, on the shared
``local_cluster`` (tests/conftest.py). One tiny PPO CartPole run is trained through the real
entrypoint (2,048 steps: two PPO updates); the other versions are hand-built ONNX graphs committed as runs
(tests/serving/policies.py)."""

from __future__ import annotations

import time
from typing import Any

import pytest

from .policies import argmax_onnx, failing_onnx, other_space_onnx, write_policy_run


@pytest.fixture(scope="session")
def serving_runs(local_cluster: Any) -> dict[str, str]:
    from rlfleet import RunSpec, RunStatus, submit_run

    t0 = time.monotonic()
    run = submit_run(RunSpec(kind="train", agent="ppo", env="CartPole-v1", seed=1, budget={"steps": 2048},
                             name="serving-ppo"), target="local")
    status = run.wait(timeout=600)
    assert status is RunStatus.SUCCEEDED, run.failure_reason()
    print(f"serving: trained the PPO policy in {time.monotonic() - t0:.1f} s")
    store = local_cluster.store()
    return {
        "ppo": run.run_id,
        "argmax": write_policy_run(store, "rl-20000101-000000-a9a9a9", argmax_onnx()),
        "failing": write_policy_run(store, "rl-20000101-000000-fa11ed", failing_onnx()),
        "other": write_policy_run(store, "rl-20000101-000000-07e1e1", other_space_onnx(), env="Other-v0"),
    }
