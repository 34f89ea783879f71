"""The local target's run supervisor (:mod:`rlfleet.supervisor`): a process in the head's network
namespace, started with the head (on the first run or ``rlfleet local up``, with or without worker
nodes: :func:`local_up`), stopped with it.

Why a process in the namespace and not a detached Ray actor: it must outlive the Ray head it
supervises (a head restart loses Ray's jobs; the supervisor then restarts or fails them from the
durable queue), it must not take a CPU from the runs it schedules, and a plain process is what the
on-prem (systemd) and cloud (bootstrap unit) targets run too. ``rlfleet local down`` stops it with
every other process of the namespace (``_cluster_pids``); with ``RLFLEET_LOCAL_ISOLATION=none``
it carries the head's ``RAY_TMPDIR`` marker, which ``_cluster_pids`` also matches.

Its identity (PID, start time, boot id) is recorded in ``local/supervisor.json`` so the SDK wakes
exactly this process (SIGUSR1) after queueing a run, and never signals a reused PID.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
from typing import Any

from rlfleet._netns import proc_start_time
from rlfleet.paths import local_state_dir, local_token_path, read_local_state, read_record
from rlfleet.targets import Target

POLL_S = 2.0


def _record_file() -> Any:
    return local_state_dir() / "supervisor.json"


def _recorded() -> dict[str, Any]:
    return read_record(_record_file())


def supervisor_pid() -> int | None:
    """The running supervisor of this home's head, or None."""
    from rlfleet.provisioners import local

    rec, st = _recorded(), read_local_state()
    pid = rec.get("pid")
    if not isinstance(pid, int) or rec.get("boot_id") != local.boot_id() or rec.get("head_started") != st.get(
        "started_at"
    ):
        return None
    return pid if local.is_own_live_process(pid, rec.get("start")) else None


def ensure_supervisor(target: Target) -> int:
    """Start this head's supervisor unless it runs; returns its PID. Idempotent."""
    from rlfleet.provisioners import local

    with local.state_lock():
        pid = supervisor_pid()
        if pid is not None:
            return pid
        st = read_local_state()
        prefix, env = local.head_process_launch()
        env = {**env, "PYTHONUNBUFFERED": "1"}
        fd = os.open(local_state_dir() / "supervisor.log", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        log = os.fdopen(fd, "ab")  # appended: a restarted supervisor keeps its predecessor's lines
        try:
            proc = subprocess.Popen(
                [*prefix, sys.executable, "-m", "rlfleet.supervisor", "--address",
                 f"http://127.0.0.1:{st['dashboard_port']}", "--token-file", str(local_token_path()),
                 "--root", target.artifact_root, "--poll", str(POLL_S)],
                env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True, umask=0o077,
                preexec_fn=_ignore_wakeups,
            )  # fmt: skip
        finally:
            log.close()
        pid = proc.pid  # nsenter execs the supervisor in place (it forks only for --pid/--user)
        rec = {"pid": pid, "start": proc_start_time(pid), "boot_id": local.boot_id(),
               "head_started": st.get("started_at")}
        tmp = _record_file().with_suffix(".tmp")
        with local.private_open(tmp) as f:
            f.write(json.dumps(rec))
        tmp.replace(_record_file())
        return pid


def local_up(**options: Any) -> Target:
    """``rlfleet local up``: the local head (and its worker nodes, ``nodes=N``) with its run
    supervisor; the options are :func:`rlfleet.provisioners.local.ensure_local_up`'s. Idempotent."""
    from rlfleet.provisioners import local

    target = local.ensure_local_up(**options)
    ensure_supervisor(target)
    return target


def _ignore_wakeups() -> None:
    """SIGUSR1 ignored until the supervisor installs its handler (the default action would kill it
    while it is still importing); an ignored disposition survives exec."""
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)


def nudge(target: Target) -> None:
    """Wake the supervisor now (a run was queued): no poll interval on the fast path. (None running:
    the request waits in the queue for the next one, which ``ready()`` starts.)"""
    pid = supervisor_pid()
    if pid is None:
        return
    from rlfleet.provisioners.local import signal_process

    with contextlib.suppress(OSError):
        signal_process(pid, _recorded().get("start"), signal.SIGUSR1)


def stop_supervisor() -> None:
    """Stop the supervisor (a test that checks the queue survives it; 'local down' stops it anyway)."""
    pid = supervisor_pid()
    if pid is not None:
        from rlfleet.provisioners.local import signal_process

        signal_process(pid, _recorded().get("start"), signal.SIGKILL)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(_record_file())
