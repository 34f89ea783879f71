"""The run supervisor: a small process INSIDE the cluster that turns queued runs into Ray jobs and
restarts managed runs after infrastructure failures. The submitting machine may be gone.

    python -m rlfleet.supervisor --address http://127.0.0.1:PORT --token-file PATH --root URI

State is durable and lives in the artifact store (:mod:`rlfleet.runqueue`); the process keeps only
the live requests in memory, so it can be killed and restarted at any time:

- a run becomes a Ray job with ``submission_id = run_id``; Ray refuses a second job with the same
  id, so a supervisor that crashed between submitting and recording never starts a run twice;
- dispatch order is priority (higher first), then submission time; a run that does not fit the
  free CPUs/GPUs blocks the ones behind it (no overtaking by smaller runs), except when only its
  user's cap holds it back: then the next user's run goes;
- free resources = what the ALIVE nodes declare (Ray's dashboard) minus what the non-terminal
  rlfleet jobs reserve (their process's CPUs/GPUs and their env runners' CPUs), counted over the
  cluster and, for the run's process (which needs its CPUs/GPUs on one node), per node; queued
  runs are not Ray jobs (a Ray job supervisor costs tens of MB);
- a run with ``max_restarts`` whose job failed for an infrastructure reason (killed by a signal,
  its node or job supervisor gone, the job lost with the head) is resubmitted under the same run
  id with ``resume_uri`` its own last checkpoint; a user error (the run's own error exit, a bad
  runtime env) ends it at once with its message.

It announces itself in the store (``queue/supervisor.json``, rewritten every HEARTBEAT_S, removed on
SIGTERM): that is how the SDK knows a ``ray``-kind target (a cluster it does not provision, e.g. a
multi-node ``rlfleet local up --nodes N`` reached as a ``ray`` target) has a supervisor, so runs go
through the queue and ``max_restarts`` is accepted there.

SIGUSR1 wakes the loop at once (the local target's SDK sends it after queueing a run); otherwise
it polls every ``--poll`` seconds, every 0.5 s while runs it dispatched are in flight (so a slot
that frees up is refilled within 0.5 s).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import select
import signal
import socket
import sys
import time
from typing import Any

from rlfleet.artifacts import ArtifactStore
from rlfleet.errors import RlfleetError, RunNotFound
from rlfleet.jobs import JobsClient
from rlfleet.runqueue import DISPATCHED, HEARTBEAT_S, QueueStore, Request

TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")
USER_ERROR_EXIT = 1  # rlfleet_agents.run EXIT_ERROR: the run reported its own error
_RAY_STATUS = {"STOPPED": "CANCELLED"}
FULL_LIST_S = 10.0
RESTART_DELAY_S = 3.0  # Ray releases a finished job's supervisor actor (and so its name) asynchronously
NAME_TAKEN = "is already taken"  # Ray: a job whose id's supervisor actor name is still held
BUSY_POLL_S = 0.5  # while runs are in flight: notice a job's end (a free slot) within this
ERROR_REPEAT_S = 60.0  # a lasting failure (head down) is logged again this often, not every pass


def infra_failure(job: dict[str, Any]) -> bool:
    """Did this FAILED job fail for an infrastructure reason (worth a restart)?"""
    msg = str(job.get("message") or "")
    if "RuntimeEnvSetupError" in msg or "runtime_env" in msg:
        return False  # the run's requirements did not install: the user's to fix
    code = job.get("driver_exit_code")
    if isinstance(code, int):
        return code != USER_ERROR_EXIT and code != 0
    if "exit code 1" in msg and "exit code 1" == msg.rstrip(".").split(" with ")[-1]:
        return False
    return True  # no exit code: the job supervisor or its node died, the entrypoint was killed


class Supervisor:
    def __init__(self, client: JobsClient, queue: QueueStore, *, poll_s: float = 2.0) -> None:
        self.client = client
        self.q = queue
        self.poll_s = poll_s
        self.requests: dict[str, Request] = {}  # live requests (queued or running)
        self.states: dict[str, dict[str, Any]] = {}
        self._listed: dict[Any, dict[str, Any]] = {}  # every Ray job, as of the last full listing
        self._listed_at: float | None = None
        self._started = time.time()
        self._error: str | None = None  # the failure of the last pass, if it failed
        self._error_logged = 0.0  # when it was last logged (monotonic)
        self._beat_at = 0.0

    # -- one pass --------------------------------------------------------------------------------
    def step(self) -> None:
        ids = set(self.q.request_ids())
        for rid in list(self.requests):
            if rid not in ids:
                self.requests.pop(rid, None)
                self.states.pop(rid, None)
        for rid in ids - set(self.requests):
            req = self.q.request(rid)
            if req is None:
                continue
            self.requests[rid] = req
            self.states[rid] = self.q.state(rid) or {"status": "QUEUED", "attempt": 0, "restarts": 0}
        jobs = self._jobs()
        cancels = self.q.cancel_ids()
        for rid in sorted(self.requests, key=lambda r: self.requests[r].order()):
            self._reconcile(self.requests[rid], jobs.get(rid), rid in cancels)
        self._dispatch(jobs)

    def _jobs(self) -> dict[Any, dict[str, Any]]:
        """Ray's jobs: the runs in flight asked one by one every pass; the full list (every job the
        head remembers, ~2 KB each: the runs' envelopes) only every FULL_LIST_S, for jobs that are
        not ours (their resources) and for adopting jobs a killed supervisor never recorded."""
        now = time.monotonic()
        if self._listed_at is None or now - self._listed_at >= FULL_LIST_S:
            self._listed = {j.get("submission_id"): j for j in self.client.list()}
            self._listed_at = now
            return dict(self._listed)
        jobs = dict(self._listed)
        for rid, st in self.states.items():
            if st.get("status") == DISPATCHED:
                try:
                    jobs[rid] = self._listed[rid] = self.client.get(rid)
                except RunNotFound:
                    jobs.pop(rid, None)
        return jobs

    def _reconcile(self, req: Request, job: dict[str, Any] | None, cancel: bool) -> None:
        rid, st = req.run_id, self.states[req.run_id]
        if job is not None and _attempt(job) != st.get("attempt", 0):
            # an earlier attempt's job that Ray has not let go yet: free the id, never adopt it
            if str(job.get("status")) in TERMINAL:
                try:
                    self.client.delete(rid)
                except RlfleetError:
                    pass
            self._listed.pop(rid, None)
            job = None
            if st["status"] == DISPATCHED:
                return  # the current attempt's job is not visible yet
        if st["status"] == "QUEUED":
            if job is not None:  # dispatched by an earlier supervisor that died before recording it
                started = job.get("start_time")  # ms since the epoch, as Ray records it
                self._record(rid, {**st, "status": DISPATCHED,
                                   "dispatched": started / 1000 if started else time.time()})
            elif cancel:
                self._finish(req, "CANCELLED", "cancelled while queued")
            return
        if job is None:  # the head restarted (Ray forgot its jobs) or a restart's resubmit was cut short
            self._failed(req, "its job was lost (the Ray head restarted or the job was deleted)", infra=True)
            return
        status = str(job.get("status"))
        if cancel and status not in TERMINAL:
            self.client.stop(rid)
            return
        if status not in TERMINAL:
            if st.get("ray_status") != status:
                self._record(rid, {**st, "ray_status": status})
            return
        message = str(job.get("message") or "failed")
        if status == "FAILED" and not cancel and NAME_TAKEN in message and st.get("name_retries", 0) < 10:
            # the previous attempt's job supervisor actor still held the job's name: the attempt never
            # started, so it is retried as the same attempt, a little later
            self._requeue(req, message, counted=False)
        elif status == "FAILED" and not cancel:
            self._failed(req, message, infra=infra_failure(job), where=self._node_of(job))
        else:
            self._finish(req, _RAY_STATUS.get(status, status), str(job.get("message") or ""))

    def _failed(self, req: Request, message: str, *, infra: bool, where: dict[str, Any] | None = None) -> None:
        st = self.states[req.run_id]
        if infra and self._committed(req):
            # the run finished (its manifest is the commit point) before the head or its node went:
            # it is done; a restart would find the manifest and fail
            self._finish(req, "SUCCEEDED", f"its job ended after the run had committed its manifest: {message}")
            return
        if not infra or st.get("restarts", 0) >= req.max_restarts:
            n = st.get("restarts", 0)
            why = message if not infra or not req.max_restarts else f"{message} (after {n} restarts)"
            self._finish(req, "FAILED", why)
            return
        self._requeue(req, message, counted=True, where=where)
        print(f"supervisor: run {req.run_id} failed ({message}); restart {st.get('restarts', 0) + 1} of "
              f"{req.max_restarts}", flush=True)

    def _requeue(self, req: Request, message: str, *, counted: bool, where: dict[str, Any] | None = None) -> None:
        """Queue the run again under its id (the user's handle): its failed job is deleted so the id
        can be submitted again, and it waits RESTART_DELAY_S for Ray to release the old job's actor.
        A counted restart's history entry names the node the failed attempt ran on (``where``)."""
        st = self.states[req.run_id]
        if counted:
            history = [*st.get("history", []), {"attempt": st.get("attempt", 0), "message": message,
                                                "at": time.time(), **(where or {})}]
            st = {**st, "history": history, "attempt": st.get("attempt", 0) + 1,
                  "restarts": st.get("restarts", 0) + 1, "resume": True}
        else:
            st = {**st, "name_retries": st.get("name_retries", 0) + 1}
        self._record(req.run_id, {**st, "status": "RESTARTING"})
        try:
            self.client.delete(req.run_id)
        except RlfleetError:
            pass
        self._listed.pop(req.run_id, None)
        self._record(req.run_id, {**st, "status": "QUEUED", "not_before": time.time() + RESTART_DELAY_S})

    def _node_of(self, job: dict[str, Any]) -> dict[str, Any]:
        """The node a failed job's driver ran on, as Ray records it (node_id, node_ip, and its state
        now: DEAD when the node was lost); {} when Ray never started the driver."""
        nid = job.get("driver_node_id")
        if not nid:
            return {}
        from rlfleet.placement import nodes

        try:
            node = next((n for n in nodes(self.client) if n.get("node_id") == nid), {})
        except RlfleetError:
            node = {}
        return {"node_id": nid, "node_ip": node.get("node_ip"), "node_state": node.get("state")}

    def _finish(self, req: Request, status: str, message: str) -> None:
        st = self.states[req.run_id]
        self.q.put_state(req.run_id, {**st, "status": status, "message": message, "ended": time.time(),
                                      "metadata": req.job.get("metadata") or {}})
        self.q.drop_request(req.run_id)
        self.q.drop_cancel(req.run_id)
        self.requests.pop(req.run_id, None)
        self.states.pop(req.run_id, None)

    def _record(self, rid: str, st: dict[str, Any]) -> None:
        self.states[rid] = st
        self.q.put_state(rid, st)

    # -- dispatch --------------------------------------------------------------------------------
    def _nodes(self) -> dict[str, dict[str, float]]:
        """CPUs and GPUs per ALIVE node."""
        return {n["node_id"]: {"cpus": float(n.get("CPU", 0.0)), "gpus": float(n.get("GPU", 0.0))}
                for n in self.client.node_resources()}

    def _dispatch(self, jobs: dict[Any, dict[str, Any]]) -> None:
        """Room is counted twice: over the cluster (a run's process plus its env runners, which Ray
        spreads over the nodes) and per node (the run's process, its ``num_cpus``/``num_gpus``, needs
        them on ONE node; a job's process is charged to the node Ray ran it on, ``driver_node_id``).
        A run whose process fits no node, or that needs more than the cluster has, is handed to Ray
        at once and holds no room: Ray keeps it PENDING until a node that fits joins."""
        waiting = sorted((r for r in self.requests.values() if self.states[r.run_id]["status"] == "QUEUED"),
                         key=Request.order)
        if not waiting:
            return
        nodes = self._nodes()
        total = {k: sum(n[k] for n in nodes.values()) for k in ("cpus", "gpus")}
        free = dict(total)
        node_free = {nid: dict(n) for nid, n in nodes.items()}
        by_user: dict[str, dict[str, float]] = {}
        for j in jobs.values():
            md = j.get("metadata") or {}
            if str(j.get("status")) in TERMINAL or not md.get("rlfleet_run_id"):
                continue
            process = {"cpus": float(md.get("rlfleet_cpus") or 0), "gpus": float(md.get("rlfleet_gpus") or 0)}
            used = {"cpus": process["cpus"] + float(md.get("rlfleet_runner_cpus") or 0), "gpus": process["gpus"]}
            if _oversized(used, total) or not _fits_a_node(process, nodes):
                continue  # Ray holds it PENDING until a node that fits joins: it reserves nothing
            u = by_user.setdefault(md.get("rlfleet_user") or "unknown", {"cpus": 0.0, "gpus": 0.0})
            for k in free:
                free[k] -= used[k]
                u[k] += used[k]
            on = node_free.get(str(j.get("driver_node_id") or ""))
            if on is not None:
                for k in on:
                    on[k] -= process[k]
        policy = self.q.policy()
        held_users: set[str] = set()
        now = time.time()
        for req in waiting:
            if req.user in held_users:
                continue
            # a restart waiting out its delay keeps its place: its room is held, not given to later runs
            delayed = self.states[req.run_id].get("not_before", 0) > now
            mine = by_user.setdefault(req.user, {"cpus": 0.0, "gpus": 0.0})
            limit = policy.cap(req.user)
            if (limit.cpus is not None and mine["cpus"] + req.cpus > limit.cpus + 1e-9) or (
                limit.gpus is not None and mine["gpus"] + req.gpus > limit.gpus + 1e-9
            ):
                held_users.add(req.user)  # this user waits; others may go
                continue
            want = {"cpus": req.cpus, "gpus": req.gpus}
            process = {"cpus": float(req.job.get("num_cpus") or 0), "gpus": float(req.job.get("num_gpus") or 0)}
            if _oversized(want, total) or not _fits_a_node(process, nodes):
                # bigger than the whole cluster, or than each of its nodes, now: Ray waits for a node
                if not delayed:  # that fits (as without a queue), and it blocks nobody here
                    self._submit(req)
                continue
            room = [nid for nid, n in node_free.items() if all(process[k] <= n[k] + 1e-9 for k in n)]
            if req.cpus > free["cpus"] + 1e-9 or req.gpus > free["gpus"] + 1e-9 or not room:
                break  # strict order: nothing overtakes the first run that does not fit
            if not delayed:
                self._submit(req)
            free["cpus"] -= req.cpus
            free["gpus"] -= req.gpus
            mine["cpus"] += req.cpus
            mine["gpus"] += req.gpus
            # charged to the node with the most CPUs left among those it fits (where Ray is likely to
            # put it); the next pass charges it to the node Ray chose
            best = max(room, key=lambda nid: node_free[nid]["cpus"])
            for k in process:
                node_free[best][k] -= process[k]

    def _submit(self, req: Request) -> None:
        st = self.states[req.run_id]
        job = dict(req.job)
        job["metadata"] = {**job["metadata"], "rlfleet_attempt": str(st.get("attempt", 0))}
        if st.get("resume"):
            job = _with_resume(job, self._has_checkpoint(req))
        try:
            self.client.submit(submission_id=req.run_id, **job)
        except RlfleetError as err:
            if st.get("attempt", 0) and st.get("name_retries", 0) < 20:
                # a restart: Ray may still hold the earlier attempt's job or its supervisor actor's name
                # (HTTP 400 'already exists', HTTP 500 from the job agent); try again a little later
                self._record(req.run_id, {**st, "name_retries": st.get("name_retries", 0) + 1,
                                          "not_before": time.time() + RESTART_DELAY_S})
                return
            if "already exists" not in str(err):
                self._finish(req, "FAILED", f"Ray refused the job: {err}")
                return
        self._record(req.run_id, {**st, "status": DISPATCHED, "dispatched": time.time()})

    def _committed(self, req: Request) -> bool:
        """A train/evaluate run that committed its manifest (a deploy run commits one when it starts
        serving, so its manifest says nothing about being done)."""
        if (req.job.get("metadata") or {}).get("rlfleet_kind") == "deploy":
            return False
        try:
            return self.q.store.run(req.run_id).is_complete()
        except RlfleetError:
            return False

    def _has_checkpoint(self, req: Request) -> bool:
        try:
            return self.q.store.run(req.run_id).exists("checkpoints/latest.json")
        except RlfleetError:
            return False

    # -- the loop --------------------------------------------------------------------------------
    def heartbeat(self) -> None:
        """Announce this live supervisor in the store (the SDK of a ``ray``-kind target reads it)."""
        now = time.time()
        if now - self._beat_at >= HEARTBEAT_S:
            self.q.put_heartbeat({"beat": now, "pid": os.getpid(), "host": socket.gethostname(),
                                  "started": self._started, "poll_s": self.poll_s})
            self._beat_at = now

    def serve(self) -> None:
        # SIGUSR1 wakes the loop through a pipe that the interpreter's C-level handler writes to
        # (set_wakeup_fd). The Python handler does nothing: one that set a threading.Event took its
        # lock, and a wakeup landing while the loop held that lock deadlocked the supervisor for good
        read_end, write_end = os.pipe()
        os.set_blocking(read_end, False)
        os.set_blocking(write_end, False)
        signal.set_wakeup_fd(write_end, warn_on_full_buffer=False)
        signal.signal(signal.SIGUSR1, lambda *_: None)
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
        print(f"supervisor: pid {os.getpid()} watching {self.q.store.root_uri}/queue", flush=True)
        try:
            self._loop(read_end)
        finally:  # stopped cleanly (SIGTERM): no longer announced (a SIGKILL leaves it to go stale)
            try:
                self.q.drop_heartbeat()
            except RlfleetError:
                pass

    def one_pass(self, now: float | None = None) -> None:
        """Heartbeat and one step. A failure (head restarting, store briefly away) is tried again
        next pass; it is logged when it starts or changes, then once a minute while it lasts (a 1 s
        poll would write a line a second to the journal), and once when the cluster answers again."""
        now = time.monotonic() if now is None else now
        try:
            self.heartbeat()
            self.step()
        except RlfleetError as err:
            msg = str(err)
            if msg != self._error or now - self._error_logged >= ERROR_REPEAT_S:
                again = " (still)" if msg == self._error else ""
                print(f"supervisor: {msg}{again}", flush=True)
                self._error, self._error_logged = msg, now
            return
        if self._error is not None:
            print("supervisor: the cluster and the store answer again", flush=True)
            self._error = None

    def _loop(self, wakeups: int) -> None:
        """A pass, then sleep until the next poll or a wakeup (a byte on ``wakeups``) first; the
        wakeups that came before a pass are served by it."""
        while True:
            with contextlib.suppress(BlockingIOError):
                while os.read(wakeups, 4096):
                    pass
            self.one_pass()
            busy = any(st.get("status") == DISPATCHED for st in self.states.values())
            select.select([wakeups], [], [], min(self.poll_s, BUSY_POLL_S) if busy else self.poll_s)


def _attempt(job: dict[str, Any]) -> int:
    """Which attempt of its run a Ray job is (the supervisor tags each submission)."""
    try:
        return int((job.get("metadata") or {}).get("rlfleet_attempt", 0))
    except (TypeError, ValueError):
        return 0


def _oversized(want: dict[str, float], total: dict[str, float]) -> bool:
    return any(want[k] > total[k] + 1e-9 for k in want)


def _fits_a_node(process: dict[str, float], nodes: dict[str, dict[str, float]]) -> bool:
    """Does one node declare all of a run's process's CPUs and GPUs (free or not)?"""
    return any(all(process[k] <= n[k] + 1e-9 for k in process) for n in nodes.values())


def _with_resume(job: dict[str, Any], has_checkpoint: bool) -> dict[str, Any]:
    """The job of a restart: the same envelope, resuming from the run's own last checkpoint (none
    yet: start over)."""
    from rlfleet.envelope import ENV_VAR

    env = dict(job["runtime_env"]["env_vars"])
    envelope = json.loads(env[ENV_VAR])
    if has_checkpoint:
        envelope["resume_uri"] = envelope["artifact_root"].rstrip("/") + "/runs/" + envelope["run_id"]
    env[ENV_VAR] = json.dumps(envelope)
    return {**job, "runtime_env": {**job["runtime_env"], "env_vars": env}}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m rlfleet.supervisor")
    ap.add_argument("--address", required=True, help="the Ray dashboard (Jobs API) URL on this node")
    ap.add_argument("--token-file", required=True, help="file holding the Ray token (never on the command line)")
    ap.add_argument("--root", required=True, help="the artifact root URI as the cluster sees it")
    ap.add_argument("--poll", type=float, default=2.0)
    args = ap.parse_args(argv)
    try:
        token = open(args.token_file).read().strip()
    except OSError as err:
        print(f"rlfleet supervisor: error: cannot read --token-file {args.token_file}: {err.strerror}", file=sys.stderr)
        return 2
    options = json.loads(os.environ.get("RLFLEET_STORAGE_OPTIONS") or "{}")
    store = ArtifactStore(args.root, storage_options=options, retry_s=60)
    Supervisor(JobsClient(args.address, token, target_name="supervisor"), QueueStore(store), poll_s=args.poll).serve()
    return 0


if __name__ == "__main__":
    sys.exit(main())
