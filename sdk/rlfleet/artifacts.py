"""One artifact store for file://, s3:// and gs:// (fsspec).

Layout: ``<root>/runs/<run_id>/{spec.json, metrics.jsonl, checkpoints/, policy.onnx, eval.json,
manifest.json}``. ``manifest.json`` lists every file with its sha256 and size and is written
last: it is the commit point. A run without it is incomplete; readers refuse incomplete or
tampered runs unless asked explicitly (``allow_incomplete=True``), e.g. to resume from a
checkpoint of a killed run.

Every write is atomic: a reader sees the old content or the new one, never part of it (object
stores replace whole objects; on file:// we write a temporary name, fsync and rename). A write
that dies midway (full disk, killed writer) leaves no manifest.json, so the run reads as
incomplete. Deleting a run removes its manifest first.

Metrics of a running run are immutable segments ``metrics/<first>-<last>.jsonl`` (row numbers,
inclusive; larger segments that cover smaller ones may exist side by side); when the run ends the
writer consolidates them into ``metrics.jsonl`` before the manifest. :meth:`RunArtifacts.iter_metrics`
reads either layout (runs from before segments have ``metrics.jsonl`` only).

Transient store errors are retried with exponential backoff, for ``retries`` attempts (default 5:
interactive use) or for ``retry_s`` seconds (a run's own writes: minutes); if an operation keeps
failing, :class:`StoreUnavailable` says which store, which file and how long we tried.
"""

from __future__ import annotations

import hashlib
import json
import os
import posixpath
import re
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, TypeVar

from rlfleet.errors import ArtifactError, IncompleteRunError, StoreUnavailable, TamperedRunError

MANIFEST = "manifest.json"
METRICS = "metrics.jsonl"
METRICS_DIR = "metrics"
# A policy server's live files, next to its deploy run's committed ones and outside the manifest
# (rewritten while it serves): its status (drift, counts) and its audit log segments.
SERVE_STATUS = "serve_status.json"
AUDIT_DIR = "audit"
RUNS_DIR = "runs"
_SEGMENT = re.compile(r"^metrics/(\d+)-(\d+)\.jsonl$")
T = TypeVar("T")

# Errors that retrying will not fix.
_PERMANENT = (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


# The environment the cloud drivers read when a filesystem first connects (endpoint, credentials,
# emulator host). fsspec caches one instance per set of arguments, so without this a process whose
# environment changes (rotated session credentials, another endpoint) kept using the old one.
_DRIVER_ENV_PREFIXES = ("AWS_", "STORAGE_EMULATOR_HOST", "GOOGLE_", "CLOUDSDK_", "GCSFS_")
_driver_env: tuple[tuple[str, str], ...] | None = None


def _forget_filesystems_of_another_environment(fsspec: Any) -> None:
    global _driver_env
    env = tuple(sorted((k, v) for k, v in os.environ.items() if k.startswith(_DRIVER_ENV_PREFIXES)))
    if env == _driver_env:
        return
    if _driver_env is not None:
        for proto in ("s3", "s3a", "gs", "gcs"):
            if proto in fsspec.registry:  # only drivers this process has loaded
                fsspec.registry[proto].clear_instance_cache()
    _driver_env = env


def filesystem(uri: str, storage_options: dict[str, Any]) -> tuple[Any, str]:
    """The fsspec filesystem of ``uri`` and the path on it, or :class:`ArtifactError` naming the
    missing driver or the unusable URI."""
    if uri.startswith("gs://") or uri.startswith("gcs://"):
        # gcsfs otherwise probes hierarchical-namespace support and hangs ~60 s per bucket
        # against plain-HTTP endpoints (measured: ../shared/notes/components.md).
        os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")
    import fsspec

    _forget_filesystems_of_another_environment(fsspec)
    try:
        fs, path = fsspec.core.url_to_fs(uri, **storage_options)
    except ImportError as err:
        scheme = uri.split("://", 1)[0]
        extra = {"s3": "aws", "gs": "gcp", "gcs": "gcp"}.get(scheme, scheme)
        raise ArtifactError(
            f"artifact root {uri!r} needs the {scheme}:// driver: pip install 'rlfleet[{extra}]' ({err})"
        ) from None
    except ValueError as err:
        raise ArtifactError(f"artifact root {uri!r} is not a usable URI: {err}") from None
    return fs, path.rstrip("/")


def metrics_segment(first: int, last: int) -> str:
    """The relative path of the metrics segment holding rows ``first``..``last`` (inclusive)."""
    return f"{METRICS_DIR}/{first:012d}-{last:012d}.jsonl"


def _jsonl(data: bytes) -> list[dict[str, Any]]:
    rows = []
    for line in data.decode().splitlines():
        line = line.strip()
        if line:
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                continue  # a line cut by a concurrent in-place write (runs from before atomic writes)
    return rows


def normalize_root(uri: str) -> str:
    """Accept plain paths and ``~`` for local roots; return a URI."""
    if "://" not in uri:
        uri = "file://" + os.path.abspath(os.path.expanduser(uri))
    elif uri.startswith("file://~"):
        uri = "file://" + os.path.expanduser(uri[len("file://") :])
    return uri.rstrip("/")


@dataclass(frozen=True)
class FileEntry:
    sha256: str
    size: int


@dataclass(frozen=True)
class Manifest:
    run_id: str
    files: dict[str, FileEntry]
    created_at: str
    extra: dict[str, Any] = field(default_factory=dict)
    # what the run ran with (kit version, packages, seed, device, code): see check_provenance
    provenance: dict[str, Any] | None = None

    def to_json(self) -> str:
        doc: dict[str, Any] = {
            "run_id": self.run_id,
            "created_at": self.created_at,
            "files": {k: {"sha256": v.sha256, "size": v.size} for k, v in sorted(self.files.items())},
            "extra": self.extra,
        }
        if self.provenance is not None:
            doc["provenance"] = self.provenance
        return json.dumps(doc, indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str | bytes, *, where: str) -> Manifest:
        try:
            d = json.loads(text)
            files = {k: FileEntry(sha256=v["sha256"], size=int(v["size"])) for k, v in d["files"].items()}
            if not isinstance(d.get("extra", {}), dict):
                raise TypeError("'extra' is not a mapping")
            provenance = d.get("provenance")
            if provenance is not None:
                check_provenance(provenance, files)
            return cls(run_id=d["run_id"], files=files, created_at=d["created_at"], extra=d.get("extra", {}),
                       provenance=provenance)
        except (ValueError, KeyError, TypeError, AttributeError) as err:
            raise TamperedRunError(f"{where}/{MANIFEST} is not a valid manifest ({err})") from None

    @property
    def total_bytes(self) -> int:
        return sum(f.size for f in self.files.values())


# provenance: field -> the types it may hold; "<field>_sha256" fields name the file they hash
PROVENANCE_FIELDS: dict[str, tuple[type, ...]] = {
    "kit_version": (str,), "python": (str,), "platform": (str,), "seed": (int,), "device": (str,),
    "torch_threads": (int, type(None)), "deterministic": (bool,), "packages_sha256": (str,),
    "code_sha256": (str, type(None)), "reproduces": (str, type(None)),
}
PROVENANCE_FILES = {"packages_sha256": "environment.txt", "code_sha256": "code.zip"}


def check_provenance(provenance: Any, files: dict[str, FileEntry]) -> None:
    """Raise ValueError unless ``provenance`` has every field with its type, and each hash it names
    is the manifest's hash of that file (so the packages list and the code archive are the ones the
    manifest's integrity check covers)."""
    if not isinstance(provenance, dict):
        raise ValueError("'provenance' is not a mapping")
    for key, types in PROVENANCE_FIELDS.items():
        value = provenance.get(key, ...)
        if value is ... or not isinstance(value, types) or (isinstance(value, bool) and bool not in types):
            raise ValueError(f"provenance.{key} is missing or not a {'/'.join(t.__name__ for t in types)}")
    for key, rel in PROVENANCE_FILES.items():
        value = provenance[key]
        if value is not None and (rel not in files or files[rel].sha256 != value):
            raise ValueError(f"provenance.{key} is not the sha256 of the run's {rel}")


class ArtifactStore:
    """The artifact root of a target (``file://…``, ``s3://bucket/prefix``, ``gs://bucket/prefix``)."""

    def __init__(
        self,
        root_uri: str,
        *,
        storage_options: dict[str, Any] | None = None,
        retries: int | None = None,
        retry_s: float | None = None,
        backoff_s: float = 0.2,
        max_backoff_s: float = 5.0,
    ) -> None:
        self.root_uri = normalize_root(root_uri)
        self.storage_options = dict(storage_options or {})
        # attempts and/or a time budget; neither given: 5 attempts (~3 s), for interactive use
        self.retries = retries if retries is not None or retry_s is not None else 5
        self.retry_s = retry_s
        self.backoff_s = backoff_s
        self.max_backoff_s = max_backoff_s
        self._fs: Any = None
        self._root_path = ""

    @property
    def fs(self) -> Any:
        if self._fs is None:
            self._fs, self._root_path = filesystem(self.root_uri, self.storage_options)
        return self._fs

    @property
    def root_path(self) -> str:
        """The root as its filesystem names it (``/abs/dir``, ``bucket/prefix``)."""
        return self._path()

    @property
    def is_local(self) -> bool:
        """True for a file:// root (writes go through a temporary file and a rename)."""
        return is_local_fs(self.fs)

    def _path(self, *parts: str) -> str:
        _ = self.fs
        return posixpath.join(self._root_path, *parts)

    def retry(self, what: str, fn: Callable[[], T]) -> T:
        """Run ``fn`` with exponential backoff on transient errors, within the store's attempt
        count and/or time budget."""
        delay = self.backoff_s
        start = time.monotonic()
        last: BaseException | None = None
        attempt = 0
        while True:
            attempt += 1
            try:
                return fn()
            except _PERMANENT:
                raise
            except (OSError, ConnectionError, TimeoutError, RuntimeError) as err:
                last = err
            except Exception as err:  # botocore/google errors are not OSError subclasses
                if type(err).__module__.split(".")[0] not in (
                    "botocore",
                    "aiobotocore",
                    "google",
                    "aiohttp",
                    "gcsfs",
                    "s3fs",
                ):
                    raise
                last = err
            if self.retries is not None and attempt >= self.retries:
                break
            if self.retry_s is not None and time.monotonic() - start + delay > self.retry_s:
                break
            time.sleep(delay)
            delay = min(delay * 2, self.max_backoff_s)
        took = time.monotonic() - start
        raise StoreUnavailable(
            f"artifact store {self.root_uri} failed to {what} after {attempt} attempts "
            f"over {took:.1f} s: {type(last).__name__}: {last}. Check that the store is reachable "
            "and the credentials allow it, then retry."
        )

    def put(self, path: str, data: bytes, what: str) -> None:
        """Write the file at ``path`` (as the store's filesystem names it) atomically, with retries."""
        fs = self.fs

        def _put() -> None:
            if is_local_fs(fs):
                _write_local_atomic(fs, path, data)
                return
            with fs.open(path, "wb") as f:  # one object: visible whole or not at all
                f.write(data)

        self.retry(what, _put)

    def list_names(self, path: str, what: str) -> list[str]:
        """The names of the entries of folder ``path`` (as the store's filesystem names it); ``[]``
        when it does not exist. ``what`` names the listing in a store error. Always a fresh listing:
        other processes and machines write these folders (s3fs and gcsfs cache listings, so a
        long-lived reader such as a deployment's controller would never see a new state)."""
        fs = self.fs

        def _ls() -> list[str]:
            fs.invalidate_cache(path)
            try:
                return [posixpath.basename(p.rstrip("/")) for p in fs.ls(path, detail=False)]
            except FileNotFoundError:
                return []

        return list(self.retry(what, _ls))

    def run(self, run_id: str) -> RunArtifacts:
        if not run_id or "/" in run_id or run_id in (".", ".."):
            raise ArtifactError(f"invalid run id {run_id!r}")
        return RunArtifacts(self, run_id)

    def list_run_ids(self) -> list[str]:
        base = self._path(RUNS_DIR)

        def _ls() -> list[str]:
            try:
                entries = self.fs.ls(base, detail=True)
            except FileNotFoundError:
                return []
            except NotADirectoryError:
                raise ArtifactError(f"artifact root {self.root_uri} is not a directory") from None
            return sorted(posixpath.basename(e["name"].rstrip("/")) for e in entries if e.get("type") == "directory")

        return self.retry(f"list {base}", _ls)


def open_run(uri_or_root: str, run_id: str | None = None, **kw: Any) -> RunArtifacts:
    """Open a run from ``<root>/runs/<run_id>`` given as one URI, or a root plus an id."""
    if run_id is None:
        uri = normalize_root(uri_or_root)
        root, _, rid = uri.rpartition("/")
        if not root.endswith("/" + RUNS_DIR) and not root.endswith("://" + RUNS_DIR):
            raise ArtifactError(f"{uri_or_root!r} is not a run URI of the form <root>/runs/<run_id>")
        return ArtifactStore(root[: -len(RUNS_DIR) - 1], **kw).run(rid)
    return ArtifactStore(uri_or_root, **kw).run(run_id)


class RunArtifacts:
    """The files of one run. Relative paths use '/', e.g. ``checkpoints/step_1000.pt``."""

    def __init__(self, store: ArtifactStore, run_id: str) -> None:
        self.store = store
        self.run_id = run_id
        self._manifest: Manifest | None = None

    @property
    def uri(self) -> str:
        return f"{self.store.root_uri}/{RUNS_DIR}/{self.run_id}"

    def path(self, rel: str) -> str:
        """Where ``rel`` lives on the store's filesystem (``store.fs``); refuses ``..`` and empty paths."""
        rel = rel.strip("/")
        if not rel or ".." in rel.split("/"):
            raise ArtifactError(f"invalid artifact path {rel!r}")
        return self.store._path(RUNS_DIR, self.run_id, rel)

    # -- writing ------------------------------------------------------------------------------
    def write_bytes(self, rel: str, data: bytes) -> None:
        if rel == MANIFEST:
            raise ArtifactError("manifest.json is written by commit() only")
        self._put(rel, data)

    def _put(self, rel: str, data: bytes) -> None:
        """Write one file atomically (see the module doc), with the store's retries."""
        self.store.put(self.path(rel), data, f"write {rel} of run {self.run_id}")

    def write_text(self, rel: str, text: str) -> None:
        self.write_bytes(rel, text.encode())

    def write_json(self, rel: str, obj: Any) -> None:
        self.write_bytes(rel, json.dumps(obj, indent=2, sort_keys=True).encode())

    def delete_file(self, rel: str) -> None:
        path = self.path(rel)
        self.store.retry(f"delete {rel}", lambda: self.store.fs.rm(path) if self.store.fs.exists(path) else None)

    def commit(self, extra: dict[str, Any] | None = None, provenance: dict[str, Any] | None = None) -> Manifest:
        """Hash every file of the run and write manifest.json last (the commit point)."""
        files: dict[str, FileEntry] = {}
        for rel in self.list_files(include_manifest=False):
            data = self._read_raw(rel)
            files[rel] = FileEntry(sha256=hashlib.sha256(data).hexdigest(), size=len(data))
        if provenance is not None:
            try:
                check_provenance(provenance, files)
            except ValueError as err:
                raise ArtifactError(f"run {self.run_id}: not committed: {err}") from None
        manifest = Manifest(run_id=self.run_id, files=files, created_at=_now(), extra=dict(extra or {}),
                            provenance=provenance)
        self._put(MANIFEST, manifest.to_json().encode())
        self._manifest = manifest
        return manifest

    # -- reading ------------------------------------------------------------------------------
    def _read_raw(self, rel: str) -> bytes:
        path = self.path(rel)
        try:
            return self.store.retry(f"read {rel} of run {self.run_id}", lambda: self.store.fs.cat_file(path))
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            raise ArtifactError(f"run {self.run_id} has no {rel} (looked in {self.uri})") from None

    def read_live(self, rel: str) -> bytes:
        """A file a live run writes outside its manifest (SERVE_STATUS, AUDIT_DIR/): read, unchecked."""
        return self._read_raw(rel)

    def exists(self, rel: str) -> bool:
        path = self.path(rel)
        return bool(self.store.retry(f"stat {rel}", lambda: self.store.fs.exists(path)))

    def modified(self, rel: str) -> datetime | None:
        """When ``rel`` was last written (UTC), or None where the store keeps no times."""
        path = self.path(rel)
        try:
            value = self.store.retry(f"stat {rel}", lambda: self.store.fs.modified(path))
        except (NotImplementedError, FileNotFoundError, IsADirectoryError, NotADirectoryError):
            return None
        if isinstance(value, datetime):
            return value if value.tzinfo else value.replace(tzinfo=timezone.utc)
        return None

    def is_complete(self) -> bool:
        return self.exists(MANIFEST)

    def manifest(self) -> Manifest:
        if self._manifest is None:
            if not self.is_complete():
                raise IncompleteRunError(
                    f"run {self.run_id} is incomplete: {self.uri} has no {MANIFEST} "
                    "(the run failed, was cancelled or is still running)"
                )
            self._manifest = Manifest.from_json(self._read_raw(MANIFEST), where=self.uri)
        return self._manifest

    def read_bytes(self, rel: str, *, allow_incomplete: bool = False) -> bytes:
        """Read a file; for a committed run, check it against the manifest. ``allow_incomplete``
        also reads, unchecked, from a run whose manifest is missing or damaged."""
        if allow_incomplete:
            try:
                manifest = self.manifest()
            except (IncompleteRunError, TamperedRunError):
                return self._read_raw(rel)
        else:
            manifest = self.manifest()
        entry = manifest.files.get(rel)
        if entry is None:
            raise ArtifactError(f"run {self.run_id} has no {rel} in its manifest")
        data = self._read_raw(rel)
        if hashlib.sha256(data).hexdigest() != entry.sha256 or len(data) != entry.size:
            raise TamperedRunError(
                f"{self.uri}/{rel} does not match its manifest (sha256 or size changed): "
                "the artifact was modified after the run committed; do not use it"
            )
        return data

    def read_text(self, rel: str, **kw: Any) -> str:
        return self.read_bytes(rel, **kw).decode()

    def read_json(self, rel: str, **kw: Any) -> Any:
        return json.loads(self.read_bytes(rel, **kw))

    def verify(self) -> Manifest:
        """Check every file listed in the manifest; raise TamperedRunError on the first mismatch."""
        manifest = self.manifest()
        present = set(self.list_files(include_manifest=False))
        missing = sorted(set(manifest.files) - present)
        if missing:
            raise TamperedRunError(f"run {self.run_id}: files listed in the manifest are missing: {missing}")
        for rel in manifest.files:
            self.read_bytes(rel)
        return manifest

    def list_files(self, *, include_manifest: bool = True) -> list[str]:
        base = self.store._path(RUNS_DIR, self.run_id)
        fs = self.store.fs

        def _find() -> list[str]:
            try:
                found = fs.find(base)
            except FileNotFoundError:
                return []
            return found

        out = []
        for p in self.store.retry(f"list run {self.run_id}", _find):
            rel = posixpath.relpath(p, base)
            if ".tmp-" in posixpath.basename(rel):
                continue
            if rel == MANIFEST and not include_manifest:
                continue
            out.append(rel)
        return sorted(out)

    def iter_metrics(self) -> Iterator[dict[str, Any]]:
        """The run's metrics rows in order, also while it runs: ``metrics.jsonl`` when it is there
        (finished runs, and runs from before segments), else the segments under ``metrics/``."""
        done = 0  # rows yielded so far
        for _ in range(5):  # the writer may consolidate or merge segments while we read
            # another process writes them: drop this filesystem's cached listings (s3fs, gcsfs)
            self.store.fs.invalidate_cache(self.store._path(RUNS_DIR, self.run_id, METRICS_DIR))
            if self.exists(METRICS):
                yield from _jsonl(self._read_raw(METRICS))[done:]
                return
            try:
                for row in self._segment_rows(done):
                    yield row
                    done += 1
                return
            except FileNotFoundError:
                continue

    def _segment_rows(self, start: int) -> Iterator[dict[str, Any]]:
        base = self.store._path(RUNS_DIR, self.run_id, METRICS_DIR)
        fs = self.store.fs
        segments = []
        for name in self.store.list_names(base, f"list the metrics of run {self.run_id}"):
            m = _SEGMENT.match(f"{METRICS_DIR}/{name}")
            if m:
                segments.append((int(m.group(1)), int(m.group(2)), f"{METRICS_DIR}/{name}"))
        nxt = start
        for first, last, rel in sorted(segments, key=lambda s: (s[0], -s[1])):
            if last < nxt:
                continue  # covered by a larger segment already read
            if first > nxt:
                return  # the rows in between are not visible yet
            path = self.path(rel)

            def _cat(p: str = path) -> bytes:
                return bytes(fs.cat_file(p))

            rows = _jsonl(self.store.retry(f"read {rel} of run {self.run_id}", _cat))
            yield from rows[nxt - first :]
            nxt = last + 1

    def delete_dir(self, rel: str) -> None:
        """Remove a directory of the run (e.g. ``metrics``) and everything under it."""
        path = self.path(rel)
        fs = self.store.fs
        self.store.retry(f"delete {rel} of run {self.run_id}",
                         lambda: fs.rm(path, recursive=True) if fs.exists(path) else None)

    def size_bytes(self) -> int:
        base = self.store._path(RUNS_DIR, self.run_id)
        return int(self.store.retry(f"size of run {self.run_id}", lambda: self.store.fs.du(base)))

    def delete(self) -> None:
        """Delete the run, manifest first: a half-deleted run reads as incomplete, never as a
        committed run with files missing."""
        base = self.store._path(RUNS_DIR, self.run_id)
        fs = self.store.fs
        self.delete_file(MANIFEST)
        self._manifest = None
        self.store.retry(f"delete run {self.run_id}", lambda: fs.rm(base, recursive=True) if fs.exists(base) else None)


def _write_local_atomic(fs: Any, path: str, data: bytes) -> None:
    """Write a temporary file next to ``path``, fsync it, rename it over ``path`` (atomic on POSIX)."""
    parent = os.path.dirname(path)
    fs.makedirs(parent, exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}-{threading.get_ident()}-{uuid.uuid4().hex[:8]}"
    try:
        with fs.open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    try:  # make the rename itself durable
        fd = os.open(parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass


def is_local_fs(fs: Any) -> bool:
    """True for fsspec's local filesystem."""
    proto = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    return proto in ("file", "local")
