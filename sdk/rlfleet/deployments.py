"""Named deployments: versions, routing state and the SDK surface (``deploy()``, :class:`Deployment`).

The registry lives in the target's artifact store, beside ``runs/``::

    deployments/<name>/versions/<n>.json   one per version, immutable: the source run, the policy's
                                           URI and sha256 (the ONNX file that passed the parity
                                           gate), its observation/action spaces, who/when
    deployments/<name>/state/<seq>.json    routing state, append-only; the highest seq is in force:
                                           live/canary/shadow versions, canary weight, replicas,
                                           SLO thresholds, the token's sha256, who/when/why
    deployments/<name>/endpoint.json       written once by the controller: the balancer's port
    deployments/<name>/status.json         what the controller observes (replicas, p50/p99, errors)

Commit point: every registry document is created whole and never rewritten (file://: a temporary
file hard-linked to its final name, which fails if the name exists; s3://: a conditional put,
``If-None-Match: *``; other stores: an existence check then a write, which leaves a small race
window). A reader never sees half a document, and a writer whose seq was taken by another writer
fails with one line saying who changed the deployment. The controller
(``rlfleet_agents.controller``, a long-running Ray job per name) polls the state and applies it.

Bad input (unknown deployment or version, weight out of range, promote without a canary, a canary
whose spaces differ from the live version's) raises :class:`DeploymentError` before anything is
written.
"""

from __future__ import annotations

import contextlib
import getpass
import json
import os
import posixpath
import re
import struct
import time
import uuid
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

from rlfleet.artifacts import ArtifactStore, is_local_fs
from rlfleet.errors import ArtifactError, RlfleetError

DEPLOYMENTS_DIR = "deployments"
NAME_RE = re.compile(r"^[a-z0-9][a-z0-9-]{0,38}[a-z0-9]$|^[a-z0-9]$")
MAX_REPLICAS = 16
CONTROLLER_ENTRYPOINT = "python -m rlfleet_agents.controller"
CONTROLLER_ENV = "RLFLEET_DEPLOYMENT"
META_DEPLOYMENT = "rlfleet_deployment"
DEFAULT_SLO = {"max_error_rate": 0.05, "p99_ms": 250.0, "window_s": 5.0, "min_requests": 20}
_DOC = re.compile(r"^(\d+)\.json$")


class DeploymentError(RlfleetError):
    """Bad input or a refused change to a named deployment (nothing was changed)."""

    exit_code = 2


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _user() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return "unknown"


def check_name(name: str) -> str:
    if not isinstance(name, str) or not NAME_RE.match(name):
        raise DeploymentError(f"deployment name {name!r}: use 1-40 lowercase letters, digits and '-' "
                              "(starting and ending with a letter or digit), e.g. 'cartpole'")
    return name


# ---------------------------------------------------------------------------------------------
# the registry


class Registry:
    """The documents of one deployment name in an artifact store."""

    def __init__(self, store: ArtifactStore, name: str) -> None:
        self.store = store
        self.name = check_name(name)

    def _path(self, *parts: str) -> str:
        return posixpath.join(self.store.root_path, DEPLOYMENTS_DIR, self.name, *parts)

    @property
    def uri(self) -> str:
        return f"{self.store.root_uri}/{DEPLOYMENTS_DIR}/{self.name}"

    # -- reading --------------------------------------------------------------------------------
    def _numbers(self, folder: str) -> list[int]:
        names = self.store.list_names(self._path(folder), f"list {self.uri}/{folder}")
        return sorted(int(m.group(1)) for n in names if (m := _DOC.match(n)))

    def read(self, rel: str) -> dict[str, Any] | None:
        fs, path = self.store.fs, self._path(rel)

        def _cat() -> bytes | None:
            try:
                return bytes(fs.cat_file(path))
            except FileNotFoundError:
                return None

        raw = self.store.retry(f"read {self.uri}/{rel}", _cat)
        if raw is None:
            return None
        try:
            doc = json.loads(raw)
        except ValueError:
            raise ArtifactError(f"{self.uri}/{rel} is not JSON: the registry was edited by hand; "
                                "restore it from the store's versioning") from None
        if not isinstance(doc, dict):
            raise ArtifactError(f"{self.uri}/{rel} is not a mapping")
        return doc

    def exists(self) -> bool:
        return bool(self._numbers("versions"))

    def versions(self) -> list[dict[str, Any]]:
        return [d for n in self._numbers("versions") if (d := self.read(f"versions/{n}.json")) is not None]

    def version(self, n: int) -> dict[str, Any]:
        doc = self.read(f"versions/{int(n)}.json")
        if doc is None:
            have = self._numbers("versions")
            raise DeploymentError(f"deployment {self.name!r} has no version {n} (versions: "
                                  f"{', '.join(map(str, have)) or 'none'})")
        return doc

    def state(self) -> dict[str, Any] | None:
        """The state in force: the highest committed seq (None before the first deploy)."""
        seqs = self._numbers("state")
        return self.read(f"state/{seqs[-1]}.json") if seqs else None

    def history(self) -> list[dict[str, Any]]:
        return [d for n in self._numbers("state") if (d := self.read(f"state/{n}.json")) is not None]

    # -- writing (create-only: the commit point) --------------------------------------------------
    def create(self, rel: str, doc: dict[str, Any]) -> bool:
        """Create ``rel`` whole; False when it already exists (another writer was first)."""
        data = json.dumps(doc, indent=2, sort_keys=True).encode()
        fs, path = self.store.fs, self._path(rel)
        if is_local_fs(fs):
            return self.store.retry(f"write {self.uri}/{rel}",
                                    lambda: _create_local(path, data, self.store.root_path))
        if type(fs).__module__.startswith("s3fs"):
            def _put() -> bool:
                try:
                    fs.pipe_file(path, data, mode="create")
                except FileExistsError:
                    return False
                return True

            return self.store.retry(f"write {self.uri}/{rel}", _put)
        if self.store.retry(f"check {self.uri}/{rel}", lambda: fs.exists(path)):
            return False
        self.store.retry(f"write {self.uri}/{rel}", lambda: fs.pipe_file(path, data))
        return True

    def add_version(self, doc: dict[str, Any]) -> int:
        for _ in range(5):
            n = (self._numbers("versions") or [0])[-1] + 1
            if self.create(f"versions/{n}.json", {**doc, "deployment": self.name, "version": n}):
                return n
        raise DeploymentError(f"deployment {self.name!r}: other writers kept taking the next version number; "
                              "try again")

    def write_state(self, prev: dict[str, Any] | None, changes: dict[str, Any], why: str,
                    by: str | None = None) -> dict[str, Any]:
        """Commit ``prev`` + ``changes`` as seq prev.seq+1; a writer that lost the race is refused."""
        seq = (prev or {}).get("seq", 0) + 1
        doc = {**(prev or {}), **changes, "seq": seq, "deployment": self.name, "by": by or _user(),
               "at": _now(), "why": why}
        if not self.create(f"state/{seq}.json", doc):
            other = self.read(f"state/{seq}.json") or {}
            raise DeploymentError(f"deployment {self.name!r} changed meanwhile (state {seq} written by "
                                  f"{other.get('by', '?')}: {other.get('why', '?')}); check "
                                  f"'rlfleet deploy {self.name} --status' and try again")
        return doc

    # -- the controller's documents ---------------------------------------------------------------
    def endpoint(self) -> dict[str, Any] | None:
        return self.read("endpoint.json")

    def status(self) -> dict[str, Any] | None:
        return self.read("status.json")

    def write_status(self, doc: dict[str, Any]) -> None:
        """status.json is an observation, replaced whole (atomically) on every write."""
        self.put("status.json", json.dumps(doc, sort_keys=True).encode())

    def put(self, rel: str, data: bytes) -> None:
        """Write an observation file (status, replica files), replacing it whole (atomically)."""
        self.store.put(self._path(rel), data, f"write {self.uri}/{rel}")


def _create_local(path: str, data: bytes, root: str) -> bool:
    """Write a temporary file and fsync it, then hard-link it to ``path``: False if ``path`` exists.
    Readers see the whole file or none. Root writing into a store another user owns (an admin
    deploying to the on-prem NAS directory, owned by the cluster's service user) creates the
    directories and the file as that owner: the controller, running as it, adds its own documents."""
    new_dirs = []
    d = os.path.dirname(path)
    while d.startswith(root.rstrip("/") + "/") and not os.path.isdir(d):
        new_dirs.append(d)
        d = os.path.dirname(d)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    try:
        owner = os.stat(root) if os.geteuid() == 0 else None
        if owner is not None and owner.st_uid != 0:
            for p in [*reversed(new_dirs), tmp]:
                with contextlib.suppress(FileNotFoundError):  # a concurrent writer's rename/cleanup
                    os.chown(p, owner.st_uid, owner.st_gid)
        os.link(tmp, path)
        return True
    except FileExistsError:
        return False
    finally:
        os.unlink(tmp)


def deployment_names(store: ArtifactStore) -> list[str]:
    base = posixpath.join(store.root_path, DEPLOYMENTS_DIR)
    names = store.list_names(base, f"list {store.root_uri}/{DEPLOYMENTS_DIR}")
    return sorted(n for n in names if NAME_RE.match(n))


# ---------------------------------------------------------------------------------------------
# versions from runs


def onnx_rlfleet_metadata(onnx_bytes: bytes) -> dict[str, Any]:
    """The ``rlfleet`` metadata an exported policy carries (its spaces, env, source run), read from the
    ONNX protobuf directly (ModelProto field 14, metadata_props) so the SDK needs no onnx package."""

    def fields(buf: bytes) -> Any:
        i = 0
        while i < len(buf):
            key, i = _varint(buf, i)
            num, wire = key >> 3, key & 7
            if wire == 0:
                _, i = _varint(buf, i)
            elif wire == 1:
                i += 8
            elif wire == 5:
                i += 4
            elif wire == 2:
                size, i = _varint(buf, i)
                yield num, buf[i:i + size]
                i += size
            else:
                raise ValueError(f"wire type {wire}")

    try:
        for num, value in fields(onnx_bytes):
            if num == 14:
                entry = dict(fields(value))
                if entry.get(1) == b"rlfleet":
                    return dict(json.loads(entry.get(2, b"{}")))
    except (ValueError, IndexError, struct.error):
        pass
    raise DeploymentError("policy.onnx carries no 'rlfleet' metadata: it was not exported by rlfleet_agents")


def _varint(buf: bytes, i: int) -> tuple[int, int]:
    out = shift = 0
    while True:
        b = buf[i]
        i += 1
        out |= (b & 0x7F) << shift
        if not b & 0x80:
            return out, i
        shift += 7
        if shift > 63:
            raise ValueError("varint too long")


def version_from_run(store: ArtifactStore, run_id: str) -> dict[str, Any]:
    """The version document for run ``run_id``: only a complete run whose policy.onnx matches its
    manifest and passed the parity gate."""
    from rlfleet.stored_run import read_stored_run

    flag = "--from"
    if not run_id or "/" in run_id:
        raise DeploymentError(f"{flag}: give a run id (see 'rlfleet runs --stored'), got {run_id!r}")
    stored = read_stored_run(store, run_id)
    if not stored.complete:
        what = "does not exist" if not stored.exists else f"is {stored.state} (no usable manifest.json)"
        raise DeploymentError(f"{flag}: run {run_id} {what} under {store.root_uri}/runs; deploy a finished "
                              "train run (see 'rlfleet runs --stored')")
    assert stored.manifest is not None
    entry = stored.manifest.files.get("policy.onnx")
    if entry is None:
        raise DeploymentError(f"{flag}: run {run_id} has no policy.onnx (only ppo and dqn train runs export one)")
    if not stored.manifest.extra.get("parity"):
        raise DeploymentError(f"{flag}: run {run_id}'s policy.onnx has no parity record (the ONNX-vs-torch check "
                              "every train run passes before export); retrain it")
    try:
        onnx_bytes = stored.arts.read_bytes("policy.onnx")  # checked against the manifest
    except ArtifactError as err:
        raise DeploymentError(f"{flag}: run {run_id}: refused, its policy fails its checksum ({err})") from None
    meta = onnx_rlfleet_metadata(onnx_bytes)
    spaces = meta.get("spaces") or {}
    return {
        "source_run": run_id,
        "policy_uri": f"{stored.uri}/policy.onnx",
        "policy_sha256": entry.sha256,
        "spaces": {k: spaces.get(k) for k in ("obs_shape", "action_kind", "n_actions")},
        "env": meta.get("env"),
        "created_at": _now(),
        "created_by": _user(),
    }


# ---------------------------------------------------------------------------------------------
# the SDK surface


@dataclass
class Deployment:
    """A handle on a named deployment of a target; every call reads the registry."""

    name: str
    target: Any  # rlfleet.targets.Target

    def __repr__(self) -> str:
        return f"Deployment({self.name!r}, target={self.target.name!r})"

    @property
    def registry(self) -> Registry:
        return Registry(self.target.store(), self.name)

    def _state(self) -> dict[str, Any]:
        st = self.registry.state()
        if st is None:
            raise DeploymentError(f"no deployment {self.name!r} on target {self.target.name!r} "
                                  "(list them with 'rlfleet deployments')")
        return st

    def versions(self) -> list[dict[str, Any]]:
        self._state()
        return self.registry.versions()

    def state(self) -> dict[str, Any]:
        return self._state()

    def status(self) -> dict[str, Any]:
        """The state in force, the versions and what the controller last observed."""
        reg = self.registry
        st = self._state()
        return {"deployment": self.name, "target": self.target.name, "state": st, "versions": reg.versions(),
                "endpoint": reg.endpoint(), "observed": reg.status()}

    def endpoint(self) -> Any:
        from rlfleet.runs import Endpoint
        from rlfleet.tokens import deployment_token

        self._state()
        ep = self.registry.endpoint()
        if ep is None:
            raise DeploymentError(f"deployment {self.name!r} is not serving yet (its controller has not bound "
                                  f"its port); see 'rlfleet deploy {self.name} --status'")
        ca = self.target.ca_cert if ep["url"].startswith("https://") else None  # the node's TLS front
        return Endpoint(url=ep["url"], path=ep["path"], token=deployment_token(self.name), ca_cert=ca)

    # -- changes ----------------------------------------------------------------------------------
    def _change(self, changes: dict[str, Any], why: str, wait: float | None) -> dict[str, Any]:
        doc = self.registry.write_state(self._state(), changes, why)
        if doc.get("active"):
            _start_controller(self.target, self.name)  # none running (its job died): a new one takes over
        if wait:
            self.wait_applied(doc["seq"], wait)
        return doc

    def canary(self, run_id: str, weight: int, *, wait: float | None = 120.0) -> dict[str, Any]:
        weight = _check_weight(weight)
        st = self._state()
        doc = version_from_run(self.target.store(), run_id)
        live = self.registry.version(st["live"])
        _check_same_spaces(live, doc, "canary")
        n = self.registry.add_version(doc)
        return self._change({"canary": n, "canary_weight": weight, "replicas": {**st["replicas"], str(n): 1}},
                            f"canary v{n} (run {run_id}) at {weight}%", wait)

    def set_weight(self, weight: int, *, wait: float | None = 120.0) -> dict[str, Any]:
        weight = _check_weight(weight)
        st = self._state()
        if not st.get("canary"):
            raise DeploymentError(f"deployment {self.name!r} has no canary to weigh; start one with "
                                  f"'rlfleet deploy {self.name} --from RUN_ID --canary PCT'")
        return self._change({"canary_weight": weight}, f"canary v{st['canary']} at {weight}%", wait)

    def promote(self, *, wait: float | None = 120.0) -> dict[str, Any]:
        st = self._state()
        if not st.get("canary"):
            raise DeploymentError(f"deployment {self.name!r} has no canary to promote (live is v{st['live']}); "
                                  f"start one with 'rlfleet deploy {self.name} --from RUN_ID --canary PCT'")
        v = st["canary"]
        replicas = {str(v): st["replicas"].get(str(st["live"]), 1)}
        return self._change({"live": v, "previous": st["live"], "canary": None, "canary_weight": 0,
                             "replicas": _keep_shadow(st, replicas)}, f"promote v{v} (was v{st['live']})", wait)

    def rollback(self, *, wait: float | None = 120.0) -> dict[str, Any]:
        st = self._state()
        if st.get("canary"):
            v = st["canary"]
            replicas = {k: n for k, n in st["replicas"].items() if k != str(v)}
            return self._change({"canary": None, "canary_weight": 0, "replicas": replicas},
                                f"rollback: canary v{v} removed, v{st['live']} keeps all traffic", wait)
        prev = st.get("previous")
        if not prev:
            raise DeploymentError(f"deployment {self.name!r} has nothing to roll back to: no canary and no "
                                  f"version before v{st['live']}")
        replicas = {str(prev): st["replicas"].get(str(st["live"]), 1)}
        return self._change({"live": prev, "previous": None, "replicas": _keep_shadow(st, replicas)},
                            f"rollback to v{prev} (was v{st['live']})", wait)

    def update(self, run_id: str, *, replicas: int | None = None, wait: float | None = 120.0) -> dict[str, Any]:
        """Rolling update: a new version from ``run_id`` takes over all traffic once its replicas serve."""
        st = self._state()
        doc = version_from_run(self.target.store(), run_id)
        live = self.registry.version(st["live"])
        _check_same_spaces(live, doc, "update")
        n = self.registry.add_version(doc)
        count = _check_replicas(replicas) if replicas is not None else st["replicas"].get(str(st["live"]), 1)
        return self._change({"live": n, "previous": st["live"], "canary": None, "canary_weight": 0,
                             "replicas": _keep_shadow(st, {str(n): count})},
                            f"rolling update to v{n} (run {run_id}), was v{st['live']}", wait)

    def scale(self, replicas: int, *, wait: float | None = 120.0) -> dict[str, Any]:
        st = self._state()
        count = _check_replicas(replicas)
        return self._change({"replicas": {**st["replicas"], str(st["live"]): count}},
                            f"v{st['live']} to {count} replicas", wait)

    def autoscale(self, minimum: int | None, maximum: int | None = None, *, target_inflight: float = 4.0,
                  down_after_s: float = 10.0, wait: float | None = 120.0) -> dict[str, Any]:
        """Scale the live version between ``minimum`` and ``maximum`` replicas on in-flight requests per
        replica (``target_inflight``); ``minimum=None`` turns autoscaling off."""
        self._state()
        if minimum is None:
            return self._change({"autoscale": None}, "autoscaling off", wait)
        lo, hi = _check_replicas(minimum), _check_replicas(maximum if maximum is not None else minimum)
        if lo > hi:
            raise DeploymentError(f"--autoscale {lo}:{hi}: the minimum is over the maximum; give MIN:MAX, MIN <= MAX")
        if not 0 < float(target_inflight) <= 1000:
            raise DeploymentError(f"target_inflight {target_inflight!r}: give a number of requests from 0 to 1000")
        return self._change({"autoscale": {"min": lo, "max": hi, "target_inflight": float(target_inflight),
                                           "down_after_s": float(down_after_s)}},
                            f"autoscale {lo}-{hi} replicas at {target_inflight:g} in-flight requests each", wait)

    def shadow(self, run_id: str | None, *, wait: float | None = 120.0) -> dict[str, Any]:
        st = self._state()
        replicas = {k: n for k, n in st["replicas"].items() if k != str(st.get("shadow"))}
        if run_id is None:
            return self._change({"shadow": None, "replicas": replicas}, "shadow removed", wait)
        doc = version_from_run(self.target.store(), run_id)
        _check_same_spaces(self.registry.version(st["live"]), doc, "shadow")
        n = self.registry.add_version(doc)
        return self._change({"shadow": n, "replicas": {**replicas, str(n): 1}},
                            f"shadow v{n} (run {run_id}) sees a copy of live traffic", wait)

    def undeploy(self, *, timeout: float = 60.0) -> None:
        """Stop serving: the controller removes its replicas and balancer and exits; the token is
        revoked. The registry (versions, history) is kept."""
        from rlfleet.tokens import revoke_deployment_token

        st = self._state()
        if st.get("active"):
            self.registry.write_state(st, {"active": False}, "undeploy")
        client = _jobs(self.target)
        deadline = time.monotonic() + timeout
        for job in _controller_jobs(client, self.name):
            while job.get("status") not in ("SUCCEEDED", "FAILED", "STOPPED") and time.monotonic() < deadline:
                time.sleep(0.5)
                job = client.get(job["submission_id"])
            if job.get("status") not in ("SUCCEEDED", "FAILED", "STOPPED"):
                client.stop(job["submission_id"])
        revoke_deployment_token(self.name)

    def wait_applied(self, seq: int, timeout: float = 120.0) -> dict[str, Any]:
        """Wait until the controller has applied state ``seq`` (its replicas serve behind the balancer)."""
        deadline = time.monotonic() + timeout
        obs: dict[str, Any] | None = None
        while time.monotonic() < deadline:
            obs = self.registry.status() or {}
            if obs.get("error"):
                raise DeploymentError(f"deployment {self.name!r}: {obs['error']}")
            if obs.get("applied_seq", 0) >= seq:
                st = self.registry.state() or {}
                if st.get("seq", 0) > seq and st.get("by") == "controller" and st.get("rolled_back"):
                    raise DeploymentError(f"deployment {self.name!r}: {st['why']}")
                return obs
            time.sleep(0.3)
        raise DeploymentError(f"deployment {self.name!r}: the controller did not apply state {seq} in {timeout:.0f} s "
                              f"(last observed: applied {(obs or {}).get('applied_seq')}); see "
                              f"'rlfleet deploy {self.name} --status'")


def _keep_shadow(st: dict[str, Any], replicas: dict[str, int]) -> dict[str, int]:
    sh = st.get("shadow")
    return {**replicas, str(sh): st["replicas"].get(str(sh), 1)} if sh else replicas


def _check_weight(weight: Any) -> int:
    if isinstance(weight, bool) or not isinstance(weight, int) or not 1 <= weight <= 100:
        raise DeploymentError(f"--canary {weight!r}: the canary's weight is a whole percentage from 1 to 100")
    return weight


def _check_replicas(n: Any) -> int:
    if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= MAX_REPLICAS:
        raise DeploymentError(f"--replicas {n!r}: give a whole number from 1 to {MAX_REPLICAS}")
    return n


def _check_same_spaces(live: dict[str, Any], new: dict[str, Any], what: str) -> None:
    if live.get("spaces") != new.get("spaces"):
        raise DeploymentError(
            f"{what}: run {new['source_run']}'s policy ({new.get('env')}: {_spaces(new)}) does not take the "
            f"live v{live['version']}'s observations and actions ({live.get('env')}: {_spaces(live)}); deploy it "
            "under another name")


def _spaces(doc: dict[str, Any]) -> str:
    s = doc.get("spaces") or {}
    return f"observation shape {s.get('obs_shape')}, {s.get('action_kind')} actions x{s.get('n_actions')}"


def _jobs(target: Any) -> Any:
    from rlfleet.jobs import JobsClient

    return JobsClient(target.ray_address, target.token(), target_name=target.name, ca_cert=target.ca_cert)


def _controller_jobs(client: Any, name: str) -> list[dict[str, Any]]:
    return [j for j in client.list() if (j.get("metadata") or {}).get(META_DEPLOYMENT) == name
            and j.get("status") not in ("SUCCEEDED", "FAILED", "STOPPED")]


def controller_placement(target: Any) -> dict[str, float] | None:
    """The controller binds one of the node's TLS-front ports: on a cloud stack only the head has
    the front (nginx, the deploy ports, infra_cloud's bootstrap), so the job asks for the head's
    rlfleet_serve_front resource, one per port, as a deploy run does. On-prem every node has one."""
    from rlfleet.provisioners import registry
    from rlfleet.stack_outputs import RAY_RESOURCE_SERVE_FRONT

    return {RAY_RESOURCE_SERVE_FRONT: 1} if registry.deploys_on_head_front(target) and target.serve_ports else None


def _start_controller(target: Any, name: str) -> str:
    client = _jobs(target)
    if _controller_jobs(client, name):
        return ""
    env = {CONTROLLER_ENV: json.dumps({"name": name, "artifact_root": target.artifact_root,
                                       "storage_options": target.storage_options,
                                       "serve_ports": list(target.serve_ports), "target": target.name})}
    sid = f"deployment-{name}-{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}-{uuid.uuid4().hex[:6]}"
    client.submit(submission_id=sid, entrypoint=CONTROLLER_ENTRYPOINT,
                  runtime_env={"env_vars": {**target.env_vars, **env, "PYTHONUNBUFFERED": "1"}},
                  metadata={META_DEPLOYMENT: name, "rlfleet_user": _user()}, num_cpus=0, num_gpus=0,
                  resources=controller_placement(target))
    return sid


def deploy(name: str, source: str, *, replicas: int | None = None, canary: int | None = None, target: Any = None,
           slo: dict[str, float] | None = None, audit_rate: float = 0.01,
           wait: float | None = 180.0) -> Deployment:
    """Deploy run ``source`` as deployment ``name``: its first version (``replicas`` replicas), a
    canary taking ``canary`` % of the traffic, or a rolling update of an existing deployment."""
    from rlfleet.provisioners import registry as provisioners
    from rlfleet.targets import get_target
    from rlfleet.tokens import has_deployment_token, new_deployment_token

    check_name(name)
    if canary is not None:
        _check_weight(canary)
    count = _check_replicas(1 if replicas is None else replicas)
    tgt = get_target(target)
    dep = Deployment(name, tgt)
    reg = dep.registry
    st = reg.state()
    if st is not None and st.get("active"):
        if canary is not None:
            dep.canary(source, canary, wait=wait)
        else:
            dep.update(source, replicas=replicas, wait=wait)
        return dep
    if canary is not None:
        raise DeploymentError(f"--canary: no deployment {name!r} serves on target {tgt.name!r} to put a canary "
                              f"beside; deploy it first with 'rlfleet deploy {name} --from RUN_ID'")
    if not 0.0 <= float(audit_rate) <= 1.0:
        raise DeploymentError(f"audit_rate {audit_rate!r}: the sampled fraction of requests is from 0 to 1")
    unknown = set(slo or {}) - set(DEFAULT_SLO)
    if unknown:
        raise DeploymentError(f"slo: unknown threshold(s) {sorted(unknown)}; known: {sorted(DEFAULT_SLO)}")
    doc = version_from_run(tgt.store(), source)
    if st is not None:  # a name deployed before, then undeployed: it serves the same kind of policy again
        _check_same_spaces(reg.version(st["live"]), doc, "deploy")
    tgt = provisioners.ready(tgt)
    if has_deployment_token(name):
        from rlfleet.tokens import revoke_deployment_token

        revoke_deployment_token(name)  # a stale token of an ended deployment: a new one now
    token_sha = new_deployment_token(name)
    n = reg.add_version(doc)
    new = reg.write_state(st, {"active": True, "live": n, "previous": None, "canary": None, "canary_weight": 0,
                               "shadow": None, "replicas": {str(n): count}, "slo": {**DEFAULT_SLO, **(slo or {})},
                               "audit_rate": float(audit_rate),
                               "token_sha256": token_sha}, f"deploy v{n} (run {source}) x{count}")
    try:
        _start_controller(tgt, name)
    except BaseException:
        reg.write_state(new, {"active": False}, "controller could not be started")
        raise
    if wait:
        dep.wait_applied(new["seq"], wait)
    return dep


def get_deployment(name: str, target: Any = None) -> Deployment:
    from rlfleet.targets import get_target

    dep = Deployment(check_name(name), get_target(target))
    dep.state()
    return dep


def list_deployments(target: Any = None) -> list[dict[str, Any]]:
    """Every deployment name in the target's registry with its state in force and last observation."""
    from rlfleet.targets import get_target

    tgt = get_target(target)
    store = tgt.store()
    out = []
    for name in deployment_names(store):
        reg = Registry(store, name)
        st = reg.state()
        if st is None:
            continue
        out.append({"deployment": name, "state": st, "endpoint": reg.endpoint(), "observed": reg.status()})
    return out


__all__ = ["DEFAULT_SLO", "Deployment", "DeploymentError", "Registry", "controller_placement", "deploy",
           "deployment_names", "get_deployment", "list_deployments", "onnx_rlfleet_metadata", "version_from_run"]
