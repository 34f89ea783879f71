"""The durable run queue of a supervised target, kept in the target's artifact store.

Layout under ``<artifact_root>/queue/`` (every write atomic, like a run's files):

- ``requests/<run_id>.json``: one submission, written once by the submitting machine (the Ray job
  it becomes: entrypoint, runtime_env, metadata, resources; priority, user, max_restarts). Present
  while the run is queued or running; the supervisor deletes it when the run has ended for good.
- ``state/<run_id>.json``: the supervisor's record of the run (attempts, restarts, final status,
  message); written by the supervisor only.
- ``cancel/<run_id>``: a cancel request for a run that may not be a Ray job yet.
- ``policy.json``: the queue policy (per-user caps), written by :func:`set_queue_policy`.
- ``supervisor.json``: the heartbeat of the live supervisor watching this queue (``beat``: its clock,
  rewritten every HEARTBEAT_S; removed when it stops cleanly). A target kind that has no supervisor
  of its own (``ray``: a cluster rlfleet does not provision) is supervised while it is fresh.

Why the store and not a file on the head's disk: the store is already where runs commit, it
survives losing the head entirely (a cloud head replaced, an on-prem head reinstalled), every
submitter can already write there (no new network endpoint to secure), and the supervisor on any
node reads the same state. Order: priority (higher first), then submission time, then run id.
"""

from __future__ import annotations

import json
import posixpath
import time
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from rlfleet.artifacts import ArtifactStore, is_local_fs
from rlfleet.errors import SpecError

QUEUE_DIR = "queue"
REQUESTS = "requests"
STATE = "state"
CANCEL = "cancel"
POLICY = "policy.json"
HEARTBEAT = "supervisor.json"
HEARTBEAT_S = 10.0  # the supervisor rewrites its heartbeat this often
FRESH_S = 60.0  # a heartbeat older than this: no live supervisor (it died, or its cluster is gone)

# supervisor states of a run (state/<run_id>.json "status")
DISPATCHED = "DISPATCHED"  # a Ray job exists (or existed) for the current attempt
FINAL = ("SUCCEEDED", "FAILED", "CANCELLED")


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class UserCap(_Frozen):
    """At most this much reserved at once by one user's runs (None: no limit)."""

    cpus: float | None = Field(default=None, ge=0)
    gpus: float | None = Field(default=None, ge=0)


class QueuePolicy(_Frozen):
    """Per-user caps on concurrent CPUs/GPUs; ``default`` applies to users not named."""

    user_caps: dict[str, UserCap] = Field(default_factory=dict)
    default: UserCap = Field(default_factory=UserCap)

    def cap(self, user: str) -> UserCap:
        return self.user_caps.get(user, self.default)

    @classmethod
    def parse(cls, data: Any) -> QueuePolicy:
        """Validate a policy; bad input -> one SpecError line naming the field."""
        import difflib

        if not isinstance(data, dict):
            raise SpecError(f"invalid queue policy: must be a mapping (user_caps, default), got {type(data).__name__}")
        try:
            return cls.model_validate(data)
        except ValidationError as err:
            e = err.errors()[0]
            loc = ".".join(str(x) for x in e["loc"]) or "policy"
            if e["type"] == "extra_forbidden":
                allowed = list(UserCap.model_fields) if len(e["loc"]) > 1 else list(cls.model_fields)
                hint = difflib.get_close_matches(str(e["loc"][-1]), allowed, n=1)
                msg = "unknown field" + (f"; did you mean '{hint[0]}'?" if hint else "")
                msg += f" (allowed: {', '.join(allowed)})"
            else:
                msg = f"{e['msg']} (got {e.get('input')!r})"
            raise SpecError(f"invalid queue policy: {loc}: {msg}") from None


@dataclass(frozen=True)
class Request:
    """One queued submission (requests/<run_id>.json)."""

    run_id: str
    priority: int
    submitted_ns: int
    user: str
    cpus: float
    gpus: float
    max_restarts: int
    job: dict[str, Any]  # JobsClient.submit keyword arguments, submission_id excepted

    def order(self) -> tuple[int, int, str]:
        return (-self.priority, self.submitted_ns, self.run_id)

    def to_json(self) -> bytes:
        return json.dumps(self.__dict__, sort_keys=True).encode()

    @classmethod
    def from_json(cls, data: bytes) -> Request:
        return cls(**json.loads(data))


class QueueStore:
    """Reads and writes ``<root>/queue/`` through the target's artifact store."""

    def __init__(self, store: ArtifactStore) -> None:
        self.store = store

    def _p(self, *parts: str) -> str:
        return posixpath.join(self.store.root_path, QUEUE_DIR, *parts)

    def _put(self, path: str, data: bytes) -> None:
        self.store.put(path, data, f"write {path}")

    def _get(self, path: str) -> bytes | None:
        def get() -> bytes | None:
            try:
                return bytes(self.store.fs.cat_file(path))
            except FileNotFoundError:
                return None

        return self.store.retry(f"read {path}", get)

    def _ls(self, sub: str) -> list[str]:
        fs, base = self.store.fs, self._p(sub)

        def ls() -> list[str]:
            if is_local_fs(fs):  # a plain listdir: the supervisor polls this
                import os

                try:
                    names = os.listdir(base)
                except FileNotFoundError:
                    return []
            else:
                try:
                    names = [posixpath.basename(p.rstrip("/")) for p in fs.ls(base, detail=False, refresh=True)]
                except FileNotFoundError:
                    return []
            return [n[: -len(".json")] if n.endswith(".json") else n for n in names if ".tmp-" not in n]

        return self.store.retry(f"list {base}", ls)

    def _rm(self, path: str) -> None:
        def rm() -> None:
            try:
                self.store.fs.rm(path)
            except FileNotFoundError:
                pass

        self.store.retry(f"delete {path}", rm)

    # -- requests --------------------------------------------------------------------------------
    def put_request(self, req: Request) -> None:
        self._put(self._p(REQUESTS, req.run_id + ".json"), req.to_json())

    def request_ids(self) -> list[str]:
        return self._ls(REQUESTS)

    def request(self, run_id: str) -> Request | None:
        raw = self._get(self._p(REQUESTS, run_id + ".json"))
        return Request.from_json(raw) if raw is not None else None

    def drop_request(self, run_id: str) -> None:
        self._rm(self._p(REQUESTS, run_id + ".json"))

    # -- supervisor state ------------------------------------------------------------------------
    def put_state(self, run_id: str, state: dict[str, Any]) -> None:
        self._put(self._p(STATE, run_id + ".json"), json.dumps(state, sort_keys=True).encode())

    def state(self, run_id: str) -> dict[str, Any] | None:
        raw = self._get(self._p(STATE, run_id + ".json"))
        return dict(json.loads(raw)) if raw is not None else None

    # -- cancel requests -------------------------------------------------------------------------
    def request_cancel(self, run_id: str) -> None:
        self._put(self._p(CANCEL, run_id), str(time.time()).encode())

    def cancel_ids(self) -> set[str]:
        return set(self._ls(CANCEL))

    def drop_cancel(self, run_id: str) -> None:
        self._rm(self._p(CANCEL, run_id))

    # -- policy ----------------------------------------------------------------------------------
    def policy(self) -> QueuePolicy:
        raw = self._get(self._p(POLICY))
        if raw is None:
            return QueuePolicy()
        return QueuePolicy.parse(json.loads(raw))

    def put_policy(self, policy: QueuePolicy) -> None:
        self._put(self._p(POLICY), policy.model_dump_json(exclude_defaults=True).encode())

    # -- the supervisor's heartbeat ---------------------------------------------------------------
    def put_heartbeat(self, record: dict[str, Any]) -> None:
        self._put(self._p(HEARTBEAT), json.dumps(record, sort_keys=True).encode())

    def heartbeat(self) -> dict[str, Any] | None:
        raw = self._get(self._p(HEARTBEAT))
        try:
            return dict(json.loads(raw)) if raw is not None else None
        except (ValueError, TypeError):
            return None  # a torn or foreign file: no live supervisor announced

    def drop_heartbeat(self) -> None:
        self._rm(self._p(HEARTBEAT))

    def supervisor_live(self, now: float | None = None) -> bool:
        """Does a supervisor watch this queue (a heartbeat fresher than FRESH_S)?"""
        beat = (self.heartbeat() or {}).get("beat")
        return isinstance(beat, (int, float)) and abs((now or time.time()) - beat) < FRESH_S

    # -- what a user sees ------------------------------------------------------------------------
    def waiting(self) -> list[Request]:
        """Queued runs (no Ray job yet), in dispatch order."""
        out = []
        for rid in self.request_ids():
            st = self.state(rid)
            if st is not None and st.get("status") != "QUEUED":
                continue
            req = self.request(rid)
            if req is not None:
                out.append(req)
        return sorted(out, key=Request.order)


def runner_cpus(spec: Any) -> float:
    """The CPUs a train run's env runners hold besides its own process: ``config.env_runners`` x
    ``config.runner_cpus`` (the agent's defaults for what the config leaves out; 0 for agents
    without env runners). The queue's room check counts them (:func:`run_cpus`)."""
    from rlfleet.agent_catalog import config_schema

    if getattr(spec.kind, "value", spec.kind) != "train":
        return 0.0
    try:
        props = (config_schema(spec.agent) or {}).get("properties", {})
    except ValueError:
        return 0.0
    if "env_runners" not in props:
        return 0.0
    n = spec.config.get("env_runners", props["env_runners"].get("default", 0))
    each = spec.config.get("runner_cpus", props.get("runner_cpus", {}).get("default", 1.0))
    return float(n or 0) * float(each)


def run_cpus(spec: Any) -> float:
    """The CPUs a run holds while it runs: its process's (``resources.cpus``) and its env runners'."""
    return float(spec.resources.cpus) + runner_cpus(spec)


def position(waiting: list[Request], run_id: str) -> int | None:
    """1-based place of ``run_id`` in the dispatch order, None if it is not waiting."""
    for i, r in enumerate(waiting, 1):
        if r.run_id == run_id:
            return i
    return None
