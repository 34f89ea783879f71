"""submit_run() and the Run handle: the same calls for every target."""

from __future__ import annotations

import getpass
import json
import os
import secrets
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from enum import Enum
from typing import Any

from rlfleet.artifacts import ArtifactStore
from rlfleet.errors import ArtifactError, IncompleteRunError, RlfleetError, RunFailed, RunNotFound, SpecError
from rlfleet.provisioners import registry
from rlfleet.spec import Kind, RunSpec
from rlfleet.stored_run import DAMAGED, StoredRun, open_stored_run, read_stored_run
from rlfleet.targets import Target, get_target
from rlfleet.tracking import effective_tracking

ENTRYPOINT = "python -m rlfleet_agents.run"
META_PREFIX = "rlfleet_"


class RunStatus(str, Enum):
    QUEUED = "QUEUED"  # in the target's run queue, not a Ray job yet
    RESTARTING = "RESTARTING"  # a managed run whose job failed for an infrastructure reason: resubmitted soon
    PENDING = "PENDING"
    RUNNING = "RUNNING"
    SUCCEEDED = "SUCCEEDED"
    FAILED = "FAILED"
    CANCELLED = "CANCELLED"

    def is_terminal(self) -> bool:
        return self in (RunStatus.SUCCEEDED, RunStatus.FAILED, RunStatus.CANCELLED)


_FROM_RAY = {
    "QUEUED": RunStatus.QUEUED,
    "RESTARTING": RunStatus.RESTARTING,
    "CANCELLED": RunStatus.CANCELLED,
    "PENDING": RunStatus.PENDING,
    "RUNNING": RunStatus.RUNNING,
    "SUCCEEDED": RunStatus.SUCCEEDED,
    "FAILED": RunStatus.FAILED,
    "STOPPED": RunStatus.CANCELLED,
}


def new_run_id() -> str:
    """Sortable by submission time (UTC), unique enough for concurrent submitters."""
    return "rl-" + time.strftime("%Y%m%d-%H%M%S", time.gmtime()) + "-" + secrets.token_hex(3)


@dataclass(frozen=True)
class Endpoint:
    url: str
    path: str
    token: str
    ca_cert: str | None = None  # https endpoints (a target's TLS front): the CA file to verify it with

    def __repr__(self) -> str:
        return f"Endpoint(url={self.url!r}, path={self.path!r}, token='***', ca_cert={self.ca_cert!r})"

    @property
    def verify(self) -> Any:
        """What an HTTP client (httpx ``verify=``, urllib ``context=``) checks the server with: an SSL
        context trusting only the pinned CA when there is one, else the system's CAs."""
        import ssl

        return ssl.create_default_context(cafile=self.ca_cert) if self.ca_cert else ssl.create_default_context()

    @property
    def act_url(self) -> str:
        return self.url.rstrip("/") + self.path


def jobs_client(target: Target) -> Any:
    """A Jobs API client of ``target``'s Ray cluster (its token, its CA)."""
    from rlfleet.jobs import JobsClient

    return JobsClient(target.ray_address, target.token(), target_name=target.name, ca_cert=target.ca_cert)


def _iso(ms: Any) -> str | None:
    if not ms:
        return None
    return datetime.fromtimestamp(int(ms) / 1000, tz=timezone.utc).isoformat(timespec="seconds")


def run_uri(target: Target, ref: str) -> str:
    """A run id or a run URI -> the URI of that run's directory as the cluster sees it."""
    if "://" in ref:
        return ref.rstrip("/")
    return f"{target.artifact_root.rstrip('/')}/runs/{ref}"


class Run:
    """A handle on one run; cheap to create, every method asks the cluster or the store."""

    def __init__(
        self, run_id: str, target: Target, *, info: dict[str, Any] | None = None, spec: RunSpec | None = None
    ) -> None:
        self.run_id = run_id
        self.target = target
        self._info = info
        self._spec = spec
        self._stopping = False  # after cancel(), wait() waits for the end, also for a serving deploy run

    def __repr__(self) -> str:
        return f"Run({self.run_id!r}, target={self.target.name!r})"

    # -- state --------------------------------------------------------------------------------
    def job_record(self) -> dict[str, Any]:
        """The run's Ray job record as last read (fetched if not read yet)."""
        return self._job(refresh=False)

    def _job(self, refresh: bool = True) -> dict[str, Any]:
        if refresh or self._info is None:
            try:
                info = jobs_client(self.target).get(self.run_id)
            except RunNotFound:  # not a Ray job (yet, or any more): the target's run queue knows it
                queued = _queue_view(self.target, self.run_id)
                if queued is None:
                    raise
                info = queued
            else:
                info = _managed_view(self.target, self.run_id, info)
            self._info = info
        return self._info

    @property
    def metadata(self) -> dict[str, str]:
        return dict(self._job(refresh=False).get("metadata") or {})

    @property
    def kind(self) -> Kind:
        if self._spec is not None:
            return self._spec.kind
        return Kind(self.metadata.get(META_PREFIX + "kind", "train"))

    @property
    def spec(self) -> RunSpec:
        if self._spec is None:
            from rlfleet.envelope import ENV_VAR

            env = (self._job(refresh=False).get("runtime_env") or {}).get("env_vars") or {}
            raw = env.get(ENV_VAR)
            if raw is None:
                raise RlfleetError(f"run {self.run_id} carries no rlfleet spec (not an rlfleet run?)")
            self._spec = RunSpec.model_validate(json.loads(raw)["spec"])
        return self._spec

    def status(self) -> RunStatus:
        return _FROM_RAY.get(str(self._job().get("status")), RunStatus.PENDING)

    def message(self) -> str:
        return str(self._job(refresh=False).get("message") or "")

    def info(self, refresh: bool = True) -> dict[str, Any]:
        job = self._job(refresh=refresh)
        md = job.get("metadata") or {}
        status = _FROM_RAY.get(str(job.get("status")), RunStatus.PENDING)
        start, end = job.get("start_time"), job.get("end_time")
        wall = ((end or time.time() * 1000) - start) / 1000 if start else None
        gpus = float(md.get(META_PREFIX + "gpus", 0) or 0)
        return {
            "run_id": self.run_id,
            "status": status.value,
            "kind": md.get(META_PREFIX + "kind"),
            "name": md.get(META_PREFIX + "name"),
            "env": md.get(META_PREFIX + "env"),
            "agent": md.get(META_PREFIX + "agent"),
            "target": self.target.name,
            "artifact_uri": run_uri(self.target, self.run_id),
            "submitted_at": _iso(md.get(META_PREFIX + "submitted_ms")) or _iso(start),
            "started_at": _iso(start),
            "ended_at": _iso(end),
            "wall_time_s": round(wall, 1) if wall is not None else None,
            "gpu_hours": round(gpus * wall / 3600, 4) if wall is not None else None,
            "spec_hash": md.get(META_PREFIX + "spec_hash"),
            "user": md.get(META_PREFIX + "user"),
            "message": job.get("message") or "",
            **{k: job[k] for k in ("position", "restarts", "priority") if job.get(k) is not None},
            # each restart: the failed attempt, why, when, and the node it ran on (state DEAD: lost)
            **({"restart_history": job["restart_history"]} if job.get("restart_history") else {}),
        }

    def wait(
        self,
        timeout: float | None = None,
        *,
        poll: float = 0.25,
        on_poll: Callable[[Run, RunStatus], None] | None = None,
    ) -> RunStatus:
        """Block until the run is terminal; a deploy run returns RUNNING as soon as it serves
        (unless this handle cancelled it: then until it has stopped)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        delay = poll
        while True:
            st = self.status()
            if on_poll:
                on_poll(self, st)
            if st.is_terminal():
                return st
            if st is RunStatus.RUNNING and self.kind is Kind.DEPLOY and not self._stopping and self._endpoint_ready():
                return st
            if deadline is not None and time.monotonic() >= deadline:
                raise TimeoutError(f"run {self.run_id} still {st.value} after {timeout} s")
            time.sleep(delay)
            delay = min(delay * 1.5, 2.0)

    def result(self, timeout: float | None = None) -> Run:
        """wait(), then raise RunFailed unless the run succeeded (or serves, for deploy)."""
        st = self.wait(timeout)
        if st in (RunStatus.FAILED, RunStatus.CANCELLED):
            raise RunFailed(f"run {self.run_id} ended {st.value}: {self.failure_reason()}")
        return self

    def failure_reason(self) -> str:
        """The run's own last error line if it printed one; pip's first error line if the run's
        requirements did not install; else Ray's message."""
        try:
            for line in reversed(self.logs().splitlines()):
                if line.startswith("rlfleet: error:"):
                    return line[len("rlfleet: error:") :].strip()
        except RlfleetError:
            pass
        message = self.message()
        if "runtime_env" in message or "RuntimeEnvSetupError" in message:
            for line in message.splitlines():
                if "ERROR:" in line:  # pip's first error line, as the requirements plugin raised it
                    return line[line.index("ERROR:") :].strip()
        return message or "no message"

    # -- outputs ------------------------------------------------------------------------------
    def logs(self, follow: bool = False) -> Any:
        if follow:
            return self._follow()
        return self._ray_logs()

    def _ray_logs(self) -> str:
        """The current attempt's log; empty while the run waits in the target's queue (no Ray job
        yet, or between a supervisor's restarts). RunNotFound if neither Ray nor the queue knows it."""
        try:
            return jobs_client(self.target).logs(self.run_id)
        except RunNotFound:
            if _queue_view(self.target, self.run_id) is None:
                raise
            return ""

    def _follow(self, poll: float = 0.5) -> Iterator[str]:
        seen = 0
        while True:
            text = self._ray_logs()
            if len(text) < seen:  # a new attempt (the supervisor resubmitted the run): its log anew
                seen = 0
            if len(text) > seen:
                yield text[seen:]
                seen = len(text)
            if self.status().is_terminal():
                text = self._ray_logs()
                if len(text) > seen:
                    yield text[seen:]
                return
            time.sleep(poll)

    def artifacts(self) -> Any:
        """rlfleet.artifacts.RunArtifacts of this run (read through the client's view of the root)."""
        return self.target.store().run(self.run_id)

    def metrics(self) -> list[dict[str, Any]]:
        return list(self.artifacts().iter_metrics())

    def _endpoint_ready(self) -> bool:
        try:
            return bool(self.artifacts().exists("endpoint.json"))
        except ArtifactError:
            return False

    def endpoint(self) -> Endpoint:
        if self.kind is not Kind.DEPLOY:
            raise RlfleetError(f"run {self.run_id} is a {self.kind.value} run; only deploy runs serve")
        arts = self.artifacts()
        if not arts.exists("endpoint.json"):
            raise IncompleteRunError(
                f"deploy run {self.run_id} is not serving yet (no endpoint.json); "
                f"wait for it with 'rlfleet wait {self.run_id}'"
            )
        ep = json.loads(arts.read_bytes("endpoint.json", allow_incomplete=True))
        from rlfleet.tokens import deploy_token

        ca = self.target.ca_cert if ep["url"].startswith("https://") else None
        return Endpoint(url=ep["url"], path=ep["path"], token=deploy_token(self.run_id), ca_cert=ca)

    def cancel(self) -> bool:
        """Stop the run (and its deployment, revoking its token). Idempotent: False if it had already ended."""
        from rlfleet.tokens import revoke_deploy_token

        st = self.status()
        if st.is_terminal():
            revoke_deploy_token(self.run_id)
            return False
        if st in (RunStatus.QUEUED, RunStatus.RESTARTING) or registry.supervised(self.target):
            from rlfleet.runqueue import QueueStore

            QueueStore(self.target.store()).request_cancel(self.run_id)  # the supervisor honours it
            registry.nudge_supervisor(self.target)
            if st in (RunStatus.QUEUED, RunStatus.RESTARTING):
                return True
        self._stopping = True
        stopped = bool(jobs_client(self.target).stop(self.run_id))
        revoke_deploy_token(self.run_id)
        return stopped


def submit_run(spec: RunSpec, target: str | Target | None = None) -> Run:
    """Validate, ship and start a run on ``target`` (default: local). Returns at once."""
    from rlfleet import preflight

    if not isinstance(spec, RunSpec):
        raise RlfleetError(f"submit_run() takes a RunSpec, not {type(spec).__name__}")
    packages = preflight.check_spec(spec)  # facts about this machine, checked here and never on the cluster
    return _submit(spec, registry.ready(get_target(target)), packages)  # the local head starts here


def reproduce_run(run_id: str, target: str | Target | None = None) -> Run:
    """Re-run the finished train run ``run_id`` with its stored spec (same seed); a run that
    shipped ``code:`` gets the code archive stored with it (code.zip), not the directory as it
    is now on this machine. The new run records ``reproduces: <run_id>`` in its manifest."""
    import tempfile
    import zipfile
    from io import BytesIO

    from rlfleet import preflight

    tgt = get_target(target)
    try:
        stored = read_stored_run(tgt.store(), run_id)
    except ArtifactError as err:
        raise ArtifactError(f"--reproduce: {err}") from None
    if not stored.exists:
        raise IncompleteRunError(f"--reproduce: no run {run_id!r} under {tgt.reader_artifact_root}/runs "
                                 "(check the id with 'rlfleet runs --stored')")
    if not stored.complete:
        why = f"damaged ({stored.problem})" if stored.state == DAMAGED else "incomplete (no manifest.json)"
        raise IncompleteRunError(f"--reproduce: run {run_id} is {why}; only a finished train run can be reproduced")
    try:
        spec = stored.run_spec()
    except ArtifactError as err:
        raise ArtifactError(f"--reproduce: {err}") from None
    if spec.kind is not Kind.TRAIN:
        raise RlfleetError(f"--reproduce: run {run_id} is not a train run (kind {spec.kind.value}); "
                           "only train runs can be reproduced")
    archive = None
    if spec.code is not None:
        if "code.zip" not in stored.manifest.files:  # type: ignore[union-attr]
            raise ArtifactError(f"--reproduce: run {run_id} shipped code: but stored no code.zip (a run from "
                                "before provenance); re-run it with 'rlfleet run train --spec' instead")
        archive = stored.arts.read_bytes("code.zip")  # checked against the manifest
    with tempfile.TemporaryDirectory(prefix="rlfleet-reproduce-") as tmp:
        checked = spec
        if archive is not None:  # the stored code answers the spec's questions about code: (requirements)
            with zipfile.ZipFile(BytesIO(archive)) as zf:
                zf.extractall(tmp)  # our own archive, checked against the run's manifest
            checked = spec.with_changes(code=tmp)
        packages = preflight.check_spec(checked)
    return _submit(spec, registry.ready(tgt), packages, reproduces=run_id, code_archive=archive)


def _submit(spec: RunSpec, tgt: Target, packages: list[str] | None, *, reproduces: str | None = None,
            code_archive: bytes | None = None) -> Run:
    from rlfleet import preflight
    from rlfleet.envelope import RunEnvelope
    from rlfleet.runqueue import runner_cpus

    if spec.max_restarts and not registry.supervised(tgt):
        raise SpecError(f"max_restarts: {registry.supervisor_missing(tgt)}")
    client = jobs_client(tgt)
    from rlfleet.placement import check_fits

    check_fits(spec, tgt, client)  # more GPUs than any node of a fixed-size cluster: refused here
    env_from_source = False
    if spec.source:
        src_spec = _read_source(tgt, spec.source, spec.kind)
        if "env" not in spec.model_fields_set:
            # eval/deploy default to the env the source run trained on
            if src_spec is None:
                env_from_source = True
            else:
                code = spec.code or (src_spec.code if src_spec.code and os.path.isdir(src_spec.code) else None)
                spec = spec.with_changes(env=src_spec.env, env_kwargs=src_spec.env_kwargs, code=code)
    run_id = new_run_id()
    serve_token_sha256 = None
    if spec.kind is Kind.DEPLOY:
        from rlfleet.tokens import new_deploy_token

        serve_token_sha256 = new_deploy_token(run_id)
    envelope = RunEnvelope(
        run_id=run_id,
        artifact_root=tgt.artifact_root,
        storage_options=tgt.storage_options,
        spec=spec,
        target=tgt.name,
        source_uri=run_uri(tgt, spec.source) if spec.source else None,
        resume_uri=run_uri(tgt, spec.resume_from) if spec.resume_from else None,
        env_from_source=env_from_source,
        serve_ports=tgt.serve_ports,
        serve_token_sha256=serve_token_sha256,
        reproduces=reproduces,
        tracking=effective_tracking(spec.tracking, tgt.tracking),
    )
    env_vars = {**tgt.env_vars, **envelope.to_env(), "PYTHONUNBUFFERED": "1"}
    runtime_env: dict[str, Any] = {"env_vars": env_vars}
    if code_archive is not None:
        runtime_env["working_dir"] = client.upload_package(code_archive)
    elif spec.code:
        runtime_env["working_dir"] = client.upload_working_dir(spec.code)
    if packages:  # installed on each node by rlfleet_agents.requirements_env (registered with Ray)
        runtime_env[preflight.REQUIREMENTS_PLUGIN] = {"packages": packages}
    metadata = {
        META_PREFIX + "run_id": run_id,
        META_PREFIX + "kind": spec.kind.value,
        META_PREFIX + "name": spec.label,
        META_PREFIX + "env": spec.env,
        META_PREFIX + "agent": spec.agent,
        META_PREFIX + "spec_hash": spec.spec_hash(),
        META_PREFIX + "user": _user(),
        META_PREFIX + "target": tgt.name,
        META_PREFIX + "kit_version": envelope.kit_version,
        META_PREFIX + "cpus": str(spec.resources.cpus),
        META_PREFIX + "runner_cpus": str(runner_cpus(spec)),  # its env runners' (the queue counts them)
        META_PREFIX + "gpus": str(spec.resources.gpus),
        META_PREFIX + "submitted_ms": str(int(time.time() * 1000)),
        META_PREFIX + "priority": str(spec.priority),
        META_PREFIX + "max_restarts": str(spec.max_restarts),
    }
    job = {"entrypoint": ENTRYPOINT, "runtime_env": runtime_env, "metadata": metadata,
           "num_cpus": spec.resources.cpus, "num_gpus": spec.resources.gpus, "resources": _placement(tgt, spec)}
    try:
        if registry.supervised(tgt):
            _enqueue(tgt, run_id, spec, job)
        else:
            client.submit(submission_id=run_id, **job)
    except BaseException:
        if serve_token_sha256:
            from rlfleet.tokens import revoke_deploy_token

            revoke_deploy_token(run_id)
        raise
    return Run(run_id, tgt, spec=spec)


def _enqueue(tgt: Target, run_id: str, spec: RunSpec, job: dict[str, Any]) -> None:
    """Write the run into the target's durable queue (the commit point of a submission), then wake
    the supervisor, which makes it a Ray job as soon as it fits."""
    from rlfleet.runqueue import QueueStore, Request, run_cpus

    req = Request(run_id=run_id, priority=spec.priority, submitted_ns=time.time_ns(), user=_user(),
                  cpus=run_cpus(spec), gpus=spec.resources.gpus, max_restarts=spec.max_restarts, job=job)
    QueueStore(tgt.store()).put_request(req)
    registry.nudge_supervisor(tgt)


def _queue_view(tgt: Target, run_id: str) -> dict[str, Any] | None:
    """A job-like record of a run the Ray head does not know: queued, restarting, or ended and
    forgotten by Ray (head restarted). None if the queue never saw it (or cannot be read)."""
    if not registry.may_queue(tgt):
        return None
    from rlfleet.runqueue import QueueStore, position

    try:
        q = QueueStore(tgt.store())
        req, st = q.request(run_id), q.state(run_id) or {}
    except (RlfleetError, OSError):
        return None  # a store this machine cannot read: as without a queue
    if req is None and not st:
        return None
    status = st.get("status", "QUEUED")
    if status == "DISPATCHED":
        status = "PENDING"
    view: dict[str, Any] = {
        "submission_id": run_id, "status": status, "message": st.get("message", ""),
        "metadata": (req.job["metadata"] if req else st.get("metadata")) or {},
        "runtime_env": req.job["runtime_env"] if req else {}, "restarts": st.get("restarts", 0),
        "restart_history": st.get("history") or [],
    }
    if status == "QUEUED":
        view["position"] = position(q.waiting(), run_id)
    return view


def _managed_view(tgt: Target, run_id: str, job: dict[str, Any]) -> dict[str, Any]:
    """A Ray job of a run with max_restarts: its restarts, and RESTARTING (not FAILED) while the
    supervisor still holds its request (it will resubmit it)."""
    md = job.get("metadata") or {}
    managed = int(md.get(META_PREFIX + "max_restarts", 0) or 0)
    if not managed and (job.get("status") != "FAILED" or not registry.supervised(tgt)):
        return job
    from rlfleet.runqueue import QueueStore

    q = QueueStore(tgt.store())
    req = q.request(run_id)
    if not managed and (req is None or not req.max_restarts):
        return job  # (a FAILED record without our metadata: Ray rewrites a restarted run's old job)
    st = q.state(run_id) or {}
    job = {**job, "restarts": st.get("restarts", 0), "restart_history": st.get("history") or []}
    if job.get("status") == "FAILED" and req is not None:
        job["status"] = "RESTARTING"
    elif job.get("status") == "FAILED" and st.get("status") == "SUCCEEDED":
        # killed after its manifest was committed: the supervisor ruled the run done
        job["status"], job["message"] = "SUCCEEDED", st.get("message", "")
    return job


def _placement(tgt: Target, spec: RunSpec) -> dict[str, float] | None:
    """A deploy run on a cloud stack with deploy ports goes to the head: the node with the TLS
    front (nginx) and the certificate for the address clients use (infra_cloud bootstrap)."""
    from rlfleet.stack_outputs import RAY_RESOURCE_SERVE_FRONT

    if spec.kind is Kind.DEPLOY and registry.deploys_on_head_front(tgt) and tgt.serve_ports:
        return {RAY_RESOURCE_SERVE_FRONT: 1}
    return None


def _user() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return "unknown"


def _read_source(tgt: Target, source: str, kind: Kind) -> RunSpec | None:
    """The eval/deploy source's spec, read once from the store if this machine can see it.

    Where the store is a local directory the answer is definite, so a missing or incomplete
    source is refused here, before submitting. Elsewhere (s3, gs, a NAS mounted only on the
    cluster) an unreadable store is not an error: the run itself checks its source.
    """
    definite = "://" not in source and tgt.reader_artifact_root.startswith("file://")
    try:
        if "://" in source:
            stored = open_stored_run(source, storage_options=tgt.storage_options, retries=1)
        else:
            store = ArtifactStore(tgt.reader_artifact_root, storage_options=tgt.storage_options, retries=1)
            stored = read_stored_run(store, source)
    except (RlfleetError, OSError):
        return None
    if not definite:
        return _spec_or_none(stored) if stored.state != DAMAGED else None
    if stored.state == DAMAGED:
        raise IncompleteRunError(f"source: run {source!r} is damaged ({stored.problem}); a {kind.value} run needs "
                                 "a finished train run")
    if not stored.complete and not stored.exists:
        raise IncompleteRunError(
            f"source: no run {source!r} under {tgt.reader_artifact_root}/runs (check the id with 'rlfleet runs')"
        )
    if not stored.complete:
        raise IncompleteRunError(
            f"source: run {source!r} is incomplete (no manifest.json: it failed, was cancelled or is "
            f"still running); a {kind.value} run needs a finished train run"
        )
    return _spec_or_none(stored)


def _spec_or_none(stored: StoredRun) -> RunSpec | None:
    try:
        return stored.run_spec()
    except ArtifactError:
        return None


def get_run(run_id: str, target: str | Target | None = None) -> Run:
    run = Run(run_id, get_target(target))
    run._job()  # RunNotFound unless Ray or the target's run queue knows it
    return run


def list_runs(target: str | Target | None = None) -> list[Run]:
    """rlfleet runs on the target's cluster, newest first."""
    tgt = get_target(target)
    jobs = jobs_client(tgt).list()
    runs = [
        Run(j["submission_id"], tgt, info=j)
        for j in jobs
        if (j.get("metadata") or {}).get(META_PREFIX + "run_id") and j.get("submission_id")
    ]
    queued: list[Run] = []
    if registry.supervised(tgt):
        from rlfleet.runqueue import QueueStore

        known = {r.run_id for r in runs}
        for pos, req in enumerate(QueueStore(tgt.store()).waiting(), 1):
            if req.run_id not in known:
                info = {"submission_id": req.run_id, "status": "QUEUED", "metadata": req.job["metadata"],
                        "runtime_env": req.job["runtime_env"], "position": pos, "priority": req.priority}
                queued.append(Run(req.run_id, tgt, info=info))
    return queued + sorted(runs, key=lambda r: r.run_id, reverse=True)
