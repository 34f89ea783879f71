"""One run as its artifact store records it: the one reader of a stored run's spec, manifest,
state and size, for ``get_run``'s source check, ``rlfleet runs --stored`` and ``rlfleet cleanup``.

A run is ``complete`` only when its ``manifest.json`` (the commit point, see :mod:`rlfleet.artifacts`)
exists and parses; a run without one is ``incomplete`` (failed, cancelled or still writing); a
manifest that cannot be read is ``damaged`` and commits nothing either. Reading changes nothing.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime, timezone
from functools import cached_property
from typing import Any

from rlfleet.artifacts import ArtifactStore, Manifest, RunArtifacts, open_run
from rlfleet.constants import run_label
from rlfleet.errors import ArtifactError, IncompleteRunError, RlfleetError
from rlfleet.spec import RunSpec

SPEC_FILE = "spec.json"
COMPLETE, INCOMPLETE, DAMAGED = "complete", "incomplete", "damaged"


def run_id_of(ref: str | None) -> str | None:
    """The run id in a run reference (an id, or a ``<root>/runs/<id>`` URI)."""
    if not ref:
        return None
    return ref.rstrip("/").rsplit("/", 1)[-1]


@dataclass(frozen=True)
class StoredRun:
    """What the store says about one run. Build it with :meth:`read` (or :func:`read_stored_run`)."""

    arts: RunArtifacts
    state: str  # complete | incomplete | damaged
    problem: str | None  # why a damaged run is damaged
    manifest: Manifest | None  # set when complete
    spec: dict[str, Any] | None  # spec.json as written, None when absent or unreadable
    spec_problem: str | None  # why spec is None

    @classmethod
    def read(cls, arts: RunArtifacts) -> StoredRun:
        """Read the manifest and spec.json of ``arts`` (store errors other than a missing or
        damaged file propagate: :class:`~rlfleet.errors.StoreUnavailable`)."""
        manifest: Manifest | None = None
        state, problem = COMPLETE, None
        try:
            manifest = arts.manifest()
        except IncompleteRunError:
            state = INCOMPLETE
        except ArtifactError as err:
            state, problem = DAMAGED, str(err)
        spec, spec_problem = _read_spec(arts)
        return cls(arts=arts, state=state, problem=problem, manifest=manifest, spec=spec, spec_problem=spec_problem)

    # -- identity -----------------------------------------------------------------------------
    @property
    def run_id(self) -> str:
        return self.arts.run_id

    @property
    def uri(self) -> str:
        return self.arts.uri

    @property
    def complete(self) -> bool:
        return self.state == COMPLETE

    # -- what the spec and manifest say -------------------------------------------------------
    @property
    def extra(self) -> dict[str, Any]:
        """The manifest's ``extra`` (wall time, GPU-hours, evals...); empty unless complete."""
        return dict(self.manifest.extra) if self.manifest else {}

    @property
    def kind(self) -> str | None:
        return _str_or_none((self.spec or {}).get("kind"))

    @property
    def name(self) -> str | None:
        return _str_or_none((self.spec or {}).get("name"))

    @property
    def label(self) -> str:
        """The spec's name, else ``<agent>-<env slug>``: the rule of :attr:`rlfleet.spec.RunSpec.label`."""
        spec = self.spec or {}
        return run_label(self.name, str(spec.get("agent", "run")), str(spec.get("env", "")))

    @property
    def reads_from(self) -> tuple[str, ...]:
        """Ids of the runs this one reads (its ``source`` and ``resume_from``)."""
        spec = self.spec or {}
        refs = (run_id_of(_str_or_none(spec.get("source"))), run_id_of(_str_or_none(spec.get("resume_from"))))
        return tuple(r for r in refs if r)

    def run_spec(self) -> RunSpec:
        """spec.json as a validated :class:`~rlfleet.spec.RunSpec`; :class:`ArtifactError` naming the
        run and the file when it is missing, unreadable or not a run spec."""
        if self.spec is None:
            raise ArtifactError(f"run {self.run_id}: {self.spec_problem}")
        try:
            return RunSpec.from_dict(self.spec)
        except (RlfleetError, ValueError) as err:
            raise ArtifactError(f"run {self.run_id}: {self.uri}/{SPEC_FILE} is not a valid run spec ({err})") from None

    # -- files, time, size (each asks the store on first use) ---------------------------------
    @cached_property
    def files(self) -> tuple[str, ...]:
        """Every file of the run (manifest included), relative, sorted."""
        return tuple(self.arts.list_files())

    @property
    def exists(self) -> bool:
        return bool(self.files)

    @cached_property
    def created(self) -> datetime | None:
        """When the run committed (its manifest's ``created_at``); for a run without a usable
        manifest, the newest file's time (its last sign of life); None if the store keeps no times."""
        if self.manifest is not None:
            when = parse_time(self.manifest.created_at)
            if when is not None:
                return when
        times = []
        for rel in self.files:
            try:
                when = self.arts.modified(rel)
            except ArtifactError:  # the store would not say: this file adds no time
                continue
            if when is not None:
                times.append(when)
        return max(times) if times else None

    def size_bytes(self) -> int:
        """Bytes the run occupies in the store (every file, not only the manifest's)."""
        return self.arts.size_bytes()


def read_stored_run(store: ArtifactStore, run_id: str) -> StoredRun:
    return StoredRun.read(store.run(run_id))


def open_stored_run(uri: str, **store_kw: Any) -> StoredRun:
    """A stored run from its URI ``<root>/runs/<run_id>``."""
    return StoredRun.read(open_run(uri, **store_kw))


def stored_runs(store: ArtifactStore, *, limit: int | None = None) -> list[StoredRun]:
    """The runs in ``store``, newest id first (run ids sort by submission time)."""
    ids = sorted(store.list_run_ids(), reverse=True)
    return [read_stored_run(store, rid) for rid in ids[:limit]]


def parse_time(value: Any) -> datetime | None:
    """A timezone-aware time from a datetime, a POSIX timestamp or an ISO string (naive = UTC)."""
    if isinstance(value, datetime):
        return value if value.tzinfo else value.replace(tzinfo=timezone.utc)
    if isinstance(value, (int, float)):
        return datetime.fromtimestamp(value, tz=timezone.utc)
    if isinstance(value, str):
        try:
            dt = datetime.fromisoformat(value.replace("Z", "+00:00"))
        except ValueError:
            return None
        return dt if dt.tzinfo else dt.replace(tzinfo=timezone.utc)
    return None


def _read_spec(arts: RunArtifacts) -> tuple[dict[str, Any] | None, str | None]:
    """spec.json of a run (checked against the manifest when there is a readable one)."""
    try:
        raw = arts.read_bytes(SPEC_FILE, allow_incomplete=True)
    except ArtifactError as err:  # missing, not in the manifest, or changed after the commit
        return None, str(err)
    try:
        spec = json.loads(raw)
    except ValueError as err:  # JSONDecodeError, UnicodeDecodeError
        return None, f"{arts.uri}/{SPEC_FILE} is not JSON ({err}); is this a run directory of another tool?"
    if not isinstance(spec, dict):
        return None, f"{arts.uri}/{SPEC_FILE} holds a {type(spec).__name__}, not a run spec mapping"
    return spec, None


def _str_or_none(value: Any) -> str | None:
    return None if value is None else str(value)


__all__ = ["COMPLETE", "DAMAGED", "INCOMPLETE", "StoredRun", "open_stored_run", "parse_time",
           "read_stored_run", "run_id_of", "stored_runs"]
