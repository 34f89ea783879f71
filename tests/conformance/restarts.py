"""Checks shared by the tests that SIGKILL a managed run's trainer on a remote target (the on-prem
host, the aws-node / gcp-node heads) and expect the target's supervisor unit to restart it."""

from __future__ import annotations

from typing import Any

from conformance.test_scenarios import _wait_for
from rlfleet import RunStatus
from rlfleet.runqueue import QueueStore

_ENDED = ("SUCCEEDED", "FAILED", "CANCELLED")


def report(record_property: Any, text: str) -> None:
    """Print the test's figures and record them for the run's "figures" section (tests/conftest.py)."""
    print("\n" + text)
    record_property("figures", text)


def wait_resubmitted(q: QueueStore, run_id: str, timeout: float = 300, poll: float = 0.2) -> dict[str, Any]:
    """Wait for the supervisor to resubmit the killed run (attempt 1 dispatched), or to end it
    (then fail saying so: a kill after the run committed ends it SUCCEEDED, with no restart)."""
    def seen() -> dict[str, Any] | None:
        st = q.state(run_id) or {}
        restarted = st.get("attempt") == 1 and st.get("status") == "DISPATCHED"
        return st if restarted or st.get("status") in _ENDED else None

    st = _wait_for("the supervisor resubmitting the run (or ending it)", seen, timeout, poll=poll)
    assert st.get("attempt") == 1, f"not restarted (a kill after the run committed ends it SUCCEEDED): {st}"
    return st


def wait_queue_ended(q: QueueStore, run_id: str, timeout: float = 60, poll: float = 0.2) -> dict[str, Any]:
    """The queue's record of a run that has ended: the supervisor writes it on its next poll after
    the run ends (0.5-2 s later), so a reader that saw the run end must wait for it."""
    return _wait_for("the supervisor recording the run's end in the queue",
                     lambda: (lambda st: st if st.get("status") in _ENDED else None)(q.state(run_id) or {}),
                     timeout, poll=poll)


def assert_resumed_from_checkpoint(run: Any, *, ckpt: int, step_at_kill: int, steps: int, every: int,
                                   timeout: float) -> tuple[dict[str, Any], dict[str, Any], int]:
    """The restarted run ends SUCCEEDED with one restart, resumed from the checkpoint at or after
    ``ckpt`` (before the end of training), losing at most one checkpoint interval. Returns (its
    info, the manifest's resumed_from, the steps lost as seen from here)."""
    status = run.wait(timeout=timeout)
    assert status is RunStatus.SUCCEEDED, (status, run.failure_reason())
    info = run.info()
    assert info["restarts"] == 1, info
    manifest = run.artifacts().verify()
    resumed = manifest.extra["resumed_from"]
    assert resumed["run_id"] == run.run_id and resumed["step"] >= ckpt, resumed
    assert resumed["step"] < steps, f"the kill landed after training had ended: {resumed}"
    lost = max(step_at_kill - resumed["step"], 0)
    assert lost <= every and manifest.extra["env_steps"] >= steps
    return info, resumed, lost
