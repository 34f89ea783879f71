"""The run supervisor on the cloud heads (issue 12, part 3): the ``rlfleet-supervisor`` unit the
head's bootstrap installs, on the aws-node and gcp-node hosts booted from the rendered user data /
startup-script. Its queue and heartbeat are in the stack's bucket (moto's S3 / the GCS emulator),
reached with the node's identity; the SDK on this machine reads the heartbeat there and so sends
runs through the queue and accepts ``max_restarts``. A managed run's trainer SIGKILLed on its node
is resubmitted by the unit under the same run id, from its checkpoint.

Every test takes the session's ``tgt`` with the cloud-node params only, so pytest runs them with
the other tests of that target (and the hosts can go when the session moves on)."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path
from typing import Any

import pytest

from rlfleet import RunSpec, submit_run
from rlfleet.provisioners import registry
from rlfleet.runqueue import DISPATCHED, QueueStore

from .restarts import assert_resumed_from_checkpoint, report, wait_queue_ended, wait_resubmitted
from .targets import ConformanceTarget, _pids_with_env
from .test_scenarios import _wait_for

pytestmark = [pytest.mark.integration, pytest.mark.onprem, pytest.mark.slow, pytest.mark.timeout(2400),
              pytest.mark.parametrize("tgt", ["aws-node", "gcp-node"], indirect=True)]

UNIT = "rlfleet-supervisor"
EVERY = 2048  # checkpoint interval of the managed run
STEPS = 10240
# PPO on CartPole trains 20k steps in ~15 s on these hosts: too fast for a kill to land mid-run. The
# managed run trains on the bring-your-own SlowEnv (5 ms of sleep a step, no CPU): ~10 s of env
# time per checkpoint interval, ~50 s in all
SLOWENV = Path(__file__).resolve().parents[2] / "bench" / "slowenv"
CREDENTIAL_VARS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "GOOGLE_APPLICATION_CREDENTIALS",
                   "RLFLEET_STORAGE_OPTIONS")


def _unit_pid(tgt: ConformanceTarget) -> int:
    return int(tgt.cluster.head.nsexec("systemctl", "show", "-p", "MainPID", "--value", UNIT).stdout.strip())


def test_the_head_runs_the_supervisor_unit_announced_in_the_bucket(tgt: ConformanceTarget) -> None:
    head = tgt.cluster.head
    assert head.nsexec("systemctl", "is-enabled", UNIT).stdout.strip() == "enabled"
    _wait_for("the supervisor unit active", lambda: head.nsexec(
        "systemctl", "is-active", UNIT, check=False).stdout.strip() == "active", 60)
    show = dict(line.split("=", 1) for line in head.nsexec(
        "systemctl", "show", UNIT, "-p", "User", "-p", "Restart", "-p", "NoNewPrivileges", "-p", "ProtectSystem",
        "-p", "CapabilityBoundingSet").stdout.splitlines() if "=" in line)
    assert show == {"User": "rlfleet", "Restart": "always", "NoNewPrivileges": "yes", "ProtectSystem": "strict",
                    "CapabilityBoundingSet": ""}, show
    pid = _unit_pid(tgt)
    status = dict(line.split(":\t", 1) for line in head.nsexec("cat", f"/proc/{pid}/status").stdout.splitlines()
                  if ":\t" in line)
    assert status["PPid"].strip() == "1"  # the head's systemd runs it, not the bootstrap or this machine
    assert head.nsexec("id", "-un", status["Uid"].split()[0]).stdout.strip() == "rlfleet"
    # the token: read from its 0600 file, never on the command line or in the journal; no cloud
    # credentials of its own (the bucket is reached with the node's identity, instance metadata)
    token = tgt.cluster.token
    cmdline = head.nsexec("cat", f"/proc/{pid}/cmdline").stdout
    assert token not in cmdline and "--token-file\0/etc/rlfleet/ray_token" in cmdline
    environ = head.nsexec("cat", f"/proc/{pid}/environ").stdout.split("\0")
    assert token not in "\0".join(environ)
    assert not [v for v in environ if v.split("=", 1)[0] in CREDENTIAL_VARS], environ
    journal = head.nsexec("journalctl", "-u", UNIT, "--no-pager", "-o", "cat", check=False).stdout
    assert token not in journal
    assert f"watching {tgt.target.artifact_root}/queue" in journal, journal[-2000:]
    # its heartbeat, read from this machine through the bucket, makes the target supervised
    q = QueueStore(tgt.target.store())
    _wait_for("the supervisor's heartbeat in the bucket", q.supervisor_live, 60)
    beat = q.heartbeat() or {}
    assert beat.get("pid") == pid and beat.get("host") == head.name, beat
    registry._live.clear()
    assert registry.supervised(tgt.target)
    exposure = head.nsexec("systemd-analyze", "security", UNIT, "--no-pager", check=False).stdout.strip().splitlines()
    print(f"\n[{tgt.key}] {UNIT}: {exposure[-1] if exposure else 'systemd-analyze security: no output'}")


def test_a_sigkilled_trainer_is_restarted_from_its_checkpoint_by_the_heads_supervisor(
        tgt: ConformanceTarget, record_property: Any) -> None:
    t0 = time.monotonic()
    managed = submit_run(RunSpec(kind="train", agent="ppo", env="slowenv:SlowEnv-v0", code=str(SLOWENV),
                                 env_kwargs={"step_ms": 5, "mode": "sleep"}, name="cloud-managed", seed=3,
                                 max_restarts=1, config={"checkpoint_every_steps": EVERY}, budget={"steps": STEPS}),
                         target=tgt.target)
    q = QueueStore(tgt.target.store())
    assert q.request(managed.run_id) is not None  # it went through the queue in the bucket
    arts = managed.artifacts()

    def checkpoint() -> int:
        if not arts.exists("checkpoints/latest.json"):
            return 0
        return int(arts.read_json("checkpoints/latest.json", allow_incomplete=True)["step"])

    _wait_for("a checkpoint", lambda: checkpoint() >= EVERY or managed.status().is_terminal(), tgt.timeout, poll=0.3)
    ckpt = checkpoint()
    # kill once the flushed metrics have passed the checkpoint, so the steps lost are measured
    _wait_for("metrics past the checkpoint", lambda: max((r["step"] for r in managed.metrics()), default=0) >= ckpt
              or managed.status().is_terminal(), 120, poll=0.3)
    assert not managed.status().is_terminal(), "the managed run ended before its trainer could be killed"
    step_at_kill = max(r["step"] for r in managed.metrics())
    ckpt = checkpoint()
    assert (q.state(managed.run_id) or {}).get("status") == DISPATCHED
    # the trainer is a process of a node (systemd-nspawn: this machine's /proc sees it)
    pids = _pids_with_env(managed.run_id, "rlfleet_agents.run")
    assert pids, f"no trainer process of {managed.run_id} found on the nodes"
    supervisor_before = _unit_pid(tgt)
    t_kill = time.monotonic()
    for pid in pids:
        os.kill(pid, signal.SIGKILL)
    wait_resubmitted(q, managed.run_id, poll=0.3)
    t_resubmitted = time.monotonic() - t_kill
    info, resumed, lost = assert_resumed_from_checkpoint(managed, ckpt=ckpt, step_at_kill=step_at_kill,
                                                         steps=STEPS, every=EVERY, timeout=tgt.timeout)
    state = wait_queue_ended(q, managed.run_id)
    assert state["status"] == "SUCCEEDED" and len(state["history"]) == 1, state
    assert q.request(managed.run_id) is None  # done: the request is gone from the bucket
    assert _unit_pid(tgt) == supervisor_before  # the same unit did it; it did not restart
    report(record_property,
           f"[{tgt.key}] managed run {managed.run_id}: SIGKILL at step >= {step_at_kill}, checkpoint {ckpt}; "
           f"resubmitted {t_resubmitted:.1f} s after the kill, resumed at step {resumed['step']} "
           f"(>= {lost} steps lost), restarts {info['restarts']}, SUCCEEDED {time.monotonic() - t_kill:.0f} s after "
           f"the kill; first failure: {state['history'][0]['message'][:120]!r}; test {time.monotonic() - t0:.0f} s")
