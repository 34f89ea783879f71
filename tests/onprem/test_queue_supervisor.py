"""The run supervisor on the on-prem head (issue 12 parts 3 and 4): the ``rlfleet-supervisor``
systemd unit that site.yml installs next to the Ray head, on the session's throwaway host.

It runs inside the host (the submitting machine plays no part in a restart), announces itself in
the artifact store (``queue/supervisor.json``), and so the SDK sends on-prem runs through the
durable queue and accepts ``max_restarts``. Runs before test_site.py (file order), whose last test
tears the host down.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
from conformance.restarts import assert_resumed_from_checkpoint, report, wait_queue_ended, wait_resubmitted
from conformance.targets import _pids_with_env
from conformance.test_scenarios import _wait_for as _wait

from rlfleet import RunSpec, RunStatus, submit_run
from rlfleet.errors import SpecError
from rlfleet.jobs import JobsClient
from rlfleet.provisioners import ansible_site, registry
from rlfleet.runqueue import QueueStore
from rlfleet.targets import save_target

from .conftest import Onprem
from .harness import VENV_BIN

pytestmark = [pytest.mark.onprem, pytest.mark.slow]

UNIT = "rlfleet-supervisor"
NAS = "/mnt/rlfleet/rlfleet"
EVERY = 2048  # checkpoint interval of the managed run
STEPS = 10240
# PPO on CartPole trains 20k steps in ~15 s with the numpy update and the current defaults: a kill
# after the first checkpoint can land after training ended. The managed run trains on the
# bring-your-own SlowEnv (5 ms of sleep a step, no CPU): ~10 s of env time per checkpoint interval
SLOWENV = Path(__file__).resolve().parents[2] / "bench" / "slowenv"


def _target(op: Onprem) -> Any:
    if not op.host.path("/opt/rlfleet/venv").exists():  # an earlier test tore the runtime down
        from .harness import playbook

        r = playbook(op.site, op.workdir, "site.yml")
        assert r.rc == 0, r.output[-3000:]
    # the target exactly as 'rlfleet target add onprem --inventory ...' builds it; this machine reads
    # the NAS directory through the container's root dir (NFS is not in this kernel)
    tgt = ansible_site.target_from(
        "onprem-supervised",
        inventory=str(op.site.inventory),
        vault_password_file=str(op.site.vault_password_file),
        client_artifact_root=f"file://{op.host.path(NAS)}",
    )
    save_target(tgt)  # 'rlfleet runs --target onprem-supervised'
    return tgt


def _unit_pid(op: Onprem) -> int:
    out = op.host.nsexec("systemctl", "show", "-p", "MainPID", "--value", UNIT).stdout.strip()
    return int(out)


def _fresh(tgt: Any) -> bool:
    return QueueStore(tgt.store()).supervisor_live()


def test_supervisor_is_an_unprivileged_service_on_the_head(onprem: Onprem) -> None:
    tgt = _target(onprem)
    h = onprem.host
    assert h.nsexec("systemctl", "is-enabled", UNIT).stdout.strip() == "enabled"
    assert h.nsexec("systemctl", "is-active", UNIT).stdout.strip() == "active"
    show = dict(line.split("=", 1) for line in h.nsexec(
        "systemctl", "show", UNIT, "-p", "User", "-p", "Restart", "-p", "After", "-p", "NoNewPrivileges",
        "-p", "ProtectSystem", "-p", "CapabilityBoundingSet").stdout.splitlines() if "=" in line)
    assert show["User"] == "rlfleet" and show["Restart"] == "always", show
    assert "rlfleet-ray-head.service" in show["After"].split(), show
    assert show["NoNewPrivileges"] == "yes" and show["ProtectSystem"] == "strict", show
    assert show["CapabilityBoundingSet"] == "", show
    pid = _unit_pid(onprem)
    # a process of the host's systemd (the submitting machine is not its parent), as the service user
    proc = dict(line.split(":\t", 1) for line in h.nsexec("cat", f"/proc/{pid}/status").stdout.splitlines()
                if ":\t" in line)
    assert proc["PPid"].strip() == "1", proc["PPid"]
    uid = proc["Uid"].split()[0]
    assert h.nsexec("id", "-un", uid).stdout.strip() == "rlfleet", uid
    # the token is read from its 0600 file: never on the command line, never in the journal
    token = onprem.site.token
    cmdline = h.nsexec("cat", f"/proc/{pid}/cmdline").stdout
    assert token not in cmdline and "--token-file" in cmdline
    journal = h.nsexec("journalctl", "-u", UNIT, "--no-pager", "-o", "cat", check=False).stdout
    assert token not in journal
    assert "watching file://" + NAS + "/queue" in journal, journal[-2000:]
    # it announces itself in the store, and the SDK takes that as supervised
    _wait("the supervisor's heartbeat in the store", lambda: _fresh(tgt), 60)
    beat = QueueStore(tgt.store()).heartbeat() or {}
    assert beat.get("pid") == pid and beat.get("host") == h.name, beat
    assert registry.supervised(tgt)
    exposure = h.nsexec("systemd-analyze", "security", UNIT, "--no-pager", check=False).stdout.strip().splitlines()
    print(f"\n[onprem] {UNIT}: {exposure[-1] if exposure else 'systemd-analyze security: no output'}")


def test_no_live_supervisor_refuses_max_restarts(onprem: Onprem) -> None:
    tgt = _target(onprem)
    onprem.host.nsexec("systemctl", "stop", UNIT, timeout=60)
    try:
        # a clean stop withdraws its heartbeat: the SDK does not promise restarts nobody will make
        _wait("the heartbeat withdrawn", lambda: not _fresh(tgt), 30)
        time.sleep(registry.LIVE_CACHE_S + 0.5)
        with pytest.raises(SpecError, match=r"^max_restarts: target 'onprem-supervised' \(onprem\) has no live run "
                                            r"supervisor"):
            submit_run(RunSpec(kind="train", agent="random", budget={"steps": 10}, max_restarts=1), target=tgt)
    finally:
        onprem.host.nsexec("systemctl", "start", UNIT, timeout=60)
    _wait("the heartbeat back", lambda: _fresh(tgt), 60)
    time.sleep(registry.LIVE_CACHE_S + 0.5)


def test_sigkilled_trainer_restarts_and_a_full_cluster_queues(onprem: Onprem, record_property: Any) -> None:
    """A managed run takes every CPU of the host; two runs submitted behind it wait QUEUED with
    their positions. Its trainer is SIGKILLed inside the host: the supervisor unit resubmits it
    from its checkpoint (restarts == 1); the queued runs run later; the one with a user error fails
    at once with its message and no restart."""
    tgt = _target(onprem)
    assert registry.supervised(tgt)
    client = JobsClient(tgt.ray_address, tgt.token(), target_name=tgt.name, ca_cert=tgt.ca_cert)
    cpus = client.cluster_resources()["CPU"]
    t0 = time.monotonic()
    managed = submit_run(RunSpec(kind="train", agent="ppo", env="slowenv:SlowEnv-v0", code=str(SLOWENV),
                                 env_kwargs={"step_ms": 5, "mode": "sleep"}, name="onprem-managed", seed=3,
                                 max_restarts=1, config={"checkpoint_every_steps": EVERY}, budget={"steps": STEPS},
                                 resources={"cpus": cpus}), target=tgt)
    arts = managed.artifacts()

    def checkpoint() -> int:
        if not arts.exists("checkpoints/latest.json"):
            return 0
        return int(arts.read_json("checkpoints/latest.json", allow_incomplete=True)["step"])

    _wait("the managed run running", lambda: managed.status() is RunStatus.RUNNING, 300)
    quick = submit_run(RunSpec(kind="train", agent="random", name="onprem-queued", budget={"steps": 50},
                               resources={"cpus": 0.5}), target=tgt)
    bad = submit_run(RunSpec(kind="train", agent="random", name="onprem-user-error", max_restarts=3,
                             env_kwargs={"no_such_kwarg": 1}, budget={"steps": 50}, resources={"cpus": 0.5}),
                     target=tgt)
    # the cluster is full: both wait in the queue, with their places; 'rlfleet runs' says so
    assert quick.status() is RunStatus.QUEUED and bad.status() is RunStatus.QUEUED
    assert (quick.info()["position"], bad.info()["position"]) == (1, 2)
    out = subprocess.run([str(VENV_BIN / "rlfleet"), "runs", "--target", tgt.name], capture_output=True, text=True,
                         timeout=120, env={**os.environ, "COLUMNS": "200"})
    assert out.returncode == 0, out.stderr
    line = next(x for x in out.stdout.splitlines() if quick.run_id in x)
    assert "QUEUED #1" in line, out.stdout

    _wait("a checkpoint", lambda: checkpoint() >= EVERY or managed.status().is_terminal(), 300, poll=0.2)
    ckpt = checkpoint()
    # the progress at the kill, as far as this machine can see it: the metrics rows flushed so far
    # (every 2 s); kill once they have reached the checkpoint, so steps lost is measured, not 0 by default
    _wait("metrics past the checkpoint", lambda: max((r["step"] for r in managed.metrics()), default=0) >= ckpt
          or managed.status().is_terminal(), 120, poll=0.2)
    assert not managed.status().is_terminal(), "the managed run ended before its trainer could be killed"
    step_at_kill = max(r["step"] for r in managed.metrics())
    ckpt = checkpoint()  # (it may have moved on meanwhile)
    # the trainer is a process of the host (systemd-nspawn: its processes are in this machine's /proc)
    pids = _pids_with_env(managed.run_id, "rlfleet_agents.run")
    assert pids, "no trainer process of the managed run found on the host"
    supervisor_before = _unit_pid(onprem)
    t_kill = time.monotonic()
    for pid in pids:
        os.kill(pid, signal.SIGKILL)
    q = QueueStore(tgt.store())
    wait_resubmitted(q, managed.run_id)
    t_resubmitted = time.monotonic() - t_kill
    info, resumed, lost = assert_resumed_from_checkpoint(managed, ckpt=ckpt, step_at_kill=step_at_kill,
                                                         steps=STEPS, every=EVERY, timeout=600)
    assert _unit_pid(onprem) == supervisor_before  # the same service did it, it did not restart

    assert quick.wait(timeout=300) is RunStatus.SUCCEEDED, quick.failure_reason()
    assert bad.wait(timeout=300) is RunStatus.FAILED
    assert "no_such_kwarg" in bad.failure_reason()
    states = {r.run_id: wait_queue_ended(q, r.run_id) for r in (managed, quick, bad)}
    assert states[bad.run_id]["restarts"] == 0 and states[bad.run_id]["status"] == "FAILED"
    history = states[managed.run_id]["history"]
    assert len(history) == 1, history
    report(record_property,
           f"[onprem] managed run {managed.run_id}: SIGKILL at step >= {step_at_kill}, checkpoint {ckpt}; "
           f"resubmitted {t_resubmitted:.1f} s after the kill, resumed at step {resumed['step']} "
           f"(>= {lost} steps lost: the steps of the iteration in "
           f"progress at the kill are not reported; checkpoint interval {EVERY}); restarts {info['restarts']}; "
           f"first failure: {history[0]['message'][:120]!r}; whole test {time.monotonic() - t0:.0f} s")
    first = states[managed.run_id]["history"][0]["at"]
    print("[onprem] queue states (dispatched: s after the managed run's first failure): " + json.dumps(
        {r.spec.name: [states[r.run_id].get("status"), round(states[r.run_id].get("dispatched", 0) - first, 1)]
         for r in (managed, quick, bad)}))

