"""``rlfleet cleanup``: prune run artifacts by a retention rule, never the ones that matter.

Rules (both optional, at least one required; together, a run is removed only if both say so):

- ``older_than``: remove runs created longer ago than this (``30d``, ``12h``, ``2w``);
- ``keep_last``: keep the N newest runs of each name (the spec's ``name``, else agent-env).

Never removed, whatever the rules say:

- runs that are active (running, pending, or deploy runs still serving) — the caller passes their
  ids (``active_run_ids``; the CLI asks the target's cluster) — and the runs they read from
  (a deploy's or eval's ``source``, a train's ``resume_from``);
- the newest run of each name (the newest committed one, if the name has any);
- when the active runs are unknown (``active_run_ids=None``: cluster unreachable), every run
  without a manifest (it may still be writing), every deploy run (it may still be serving) and
  every run that any run in the store names as its source or resume point.

:func:`apply_cleanup` re-checks each run right before deleting it (its files unchanged since the
plan, no new run naming it as source, and, when given a way to ask the cluster, not active now)
and deletes the manifest first, so a run whose deletion is interrupted reads as incomplete.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Any

from rlfleet.artifacts import ArtifactStore
from rlfleet.stored_run import read_stored_run, run_id_of

_AGE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhdw])\s*$")
_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days", "w": "weeks"}


def parse_age(text: str) -> timedelta:
    """``30d`` -> 30 days. Units: s, m, h, d, w."""
    m = _AGE.match(text or "")
    if not m:
        raise ValueError(f"{text!r} is not an age like 30d, 12h, 2w (units: s m h d w)")
    return timedelta(**{_UNITS[m.group(2)]: float(m.group(1))})


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"  # pragma: no cover


@dataclass(frozen=True)
class RunRecord:
    run_id: str
    name: str
    kind: str
    created: datetime | None
    complete: bool
    reads_from: tuple[str, ...] = ()  # run ids this run reads (source, resume_from)


@dataclass
class CleanupPlan:
    remove: list[RunRecord] = field(default_factory=list)
    keep: list[tuple[RunRecord, str]] = field(default_factory=list)
    sizes: dict[str, int] = field(default_factory=dict)  # run_id -> bytes, for runs to remove

    @property
    def bytes_to_free(self) -> int:
        return sum(self.sizes.get(r.run_id, 0) for r in self.remove)


def read_run(store: ArtifactStore, run_id: str) -> RunRecord:
    """What cleanup needs to know about one run (read by :class:`rlfleet.stored_run.StoredRun`)."""
    run = read_stored_run(store, run_id)
    return RunRecord(
        run_id=run_id,
        name=run.label,
        kind=run.kind or "?",
        created=run.created,
        complete=run.complete,
        reads_from=run.reads_from,
    )


def plan_cleanup(
    store: ArtifactStore,
    *,
    older_than: timedelta | None = None,
    keep_last: int | None = None,
    active_run_ids: Iterable[str] | None,
    now: datetime | None = None,
    records: list[RunRecord] | None = None,
) -> CleanupPlan:
    """Decide which runs to remove; changes nothing."""
    if older_than is None and keep_last is None:
        raise ValueError("give a retention rule: --older-than AGE and/or --keep-last N")
    if keep_last is not None and keep_last < 1:
        raise ValueError("--keep-last must be at least 1 (the newest run of each name is always kept)")
    now = now or datetime.now(timezone.utc)
    if records is None:
        records = [read_run(store, rid) for rid in store.list_run_ids()]
    by_id = {r.run_id: r for r in records}

    protected: dict[str, str] = {}
    if active_run_ids is None:
        protected.update(_unknown_cluster_protection(records))
    else:
        active = set(active_run_ids)
        for rid in sorted(active):
            protected[rid] = "running or deployed"
            rec = by_id.get(rid)
            for src in rec.reads_from if rec else ():
                protected.setdefault(src, f"used by active run {rid}")

    groups: dict[str, list[RunRecord]] = {}
    for r in records:
        groups.setdefault(r.name, []).append(r)
    rank: dict[str, int] = {}
    oldest = datetime.min.replace(tzinfo=timezone.utc)
    for name, runs in groups.items():
        runs.sort(key=lambda r: (r.created or oldest, r.run_id), reverse=True)
        for i, r in enumerate(runs):
            rank[r.run_id] = i
        # the newest usable (committed) run; a failed newer attempt does not displace it
        latest = next((r for r in runs if r.complete), runs[0])
        protected.setdefault(latest.run_id, f"latest run named {name!r}")

    plan = CleanupPlan()
    for r in sorted(records, key=lambda r: r.run_id):
        if r.run_id in protected:
            plan.keep.append((r, protected[r.run_id]))
            continue
        if r.created is None:
            plan.keep.append((r, "creation time unknown"))
            continue
        if older_than is not None and now - r.created <= older_than:
            plan.keep.append((r, f"younger than {_fmt_age(older_than)}"))
            continue
        if keep_last is not None and rank[r.run_id] < keep_last:
            plan.keep.append((r, f"among the {keep_last} newest runs named {r.name!r}"))
            continue
        plan.remove.append(r)
    for r in plan.remove:
        try:
            plan.sizes[r.run_id] = store.run(r.run_id).size_bytes()
        except Exception:
            plan.sizes[r.run_id] = 0
    return plan


def _unknown_cluster_protection(records: Iterable[RunRecord]) -> dict[str, str]:
    """What to keep when the cluster cannot say what runs: any run without a manifest may still be
    writing, any deploy run may be serving, and any run named as a source may be in use."""
    protected: dict[str, str] = {}
    for r in records:
        if not r.complete:
            protected[r.run_id] = "no manifest and the cluster could not say whether it is still running"
        elif r.kind == "deploy":
            protected[r.run_id] = "a deploy run and the cluster could not say whether it is still serving"
    for r in records:
        for src in r.reads_from:
            protected.setdefault(src, f"used by run {r.run_id}, which may still be active (cluster unknown)")
    return protected


def _fmt_age(td: timedelta) -> str:
    s = td.total_seconds()
    for unit, n in (("w", 604800), ("d", 86400), ("h", 3600), ("m", 60)):
        if s >= n and s % n == 0:
            return f"{int(s // n)}{unit}"
    return f"{int(s)}s"


def apply_cleanup(
    store: ArtifactStore,
    plan: CleanupPlan,
    *,
    echo: Callable[[str], None] = print,
    active_run_ids: Callable[[], set[str] | None] | None = None,
) -> int:
    """Delete the runs the plan removes, re-checking each right before deleting it; returns the
    bytes freed (sizes measured when planning).

    A run is kept after all (moved from ``plan.remove`` to ``plan.keep``, with the reason echoed)
    when its files changed since the plan, when a run that appeared since the plan names it as
    source or resume point, or when ``active_run_ids()`` (asked again for every run: the cluster's
    active runs and their sources, ``None`` if it does not answer) says it is in use, or cannot say
    and the run is one the unknown-cluster rules keep. Once the cluster has not answered, it is not
    asked again (each try can cost a connect timeout).
    """
    planned = {r.run_id: r for r in plan.remove} | {r.run_id: r for r, _ in plan.keep}
    new_records: dict[str, RunRecord] = {}
    answered = True

    def ask() -> set[str] | None:
        nonlocal answered
        active = active_run_ids() if answered and active_run_ids is not None else None
        answered = active is not None
        return active

    freed = 0
    removed: list[RunRecord] = []
    for r in plan.remove:
        why = _still_in_use(store, r, planned, new_records, ask if active_run_ids is not None else None)
        if why:
            plan.keep.append((r, why))
            echo(f"kept   {r.run_id} ({r.name}): {why}")
            continue
        size = plan.sizes.get(r.run_id, 0)
        store.run(r.run_id).delete()
        removed.append(r)
        freed += size
        echo(f"removed run {r.run_id} ({r.name}, {human_bytes(size)})")
    plan.remove = removed
    return freed


def _still_in_use(
    store: ArtifactStore,
    r: RunRecord,
    planned: dict[str, RunRecord],
    new_records: dict[str, RunRecord],
    active_run_ids: Callable[[], set[str] | None] | None,
) -> str | None:
    """Why ``r`` must not be deleted now (None: delete it). ``new_records`` caches runs that
    appeared since the plan."""
    if read_run(store, r.run_id) != r:
        return "changed since the plan (new files or a new manifest): it may be in use"
    for rid in store.list_run_ids():
        if rid not in planned and rid not in new_records:
            new_records[rid] = read_run(store, rid)
    users = sorted(rid for rid, rec in new_records.items() if r.run_id in rec.reads_from)
    if users:
        return f"used by run {users[0]}, which appeared since the plan"
    if active_run_ids is None:
        return None
    active = active_run_ids()
    if active is None:
        why = _unknown_cluster_protection([*planned.values(), *new_records.values()]).get(r.run_id)
        return f"the cluster stopped answering: {why}" if why else None
    if r.run_id in active:
        return "running, deployed or used by an active run (the cluster says so now)"
    return None


def cluster_active_run_ids(target: Any, echo: Callable[[str], None] | None = None) -> set[str] | None:
    """The target's active runs and the runs they read, or None (with one line to ``echo``) when
    its cluster does not answer."""
    from rlfleet.errors import RlfleetError
    from rlfleet.runs import list_runs

    try:
        return active_run_ids_from(list_runs(target))
    except (RlfleetError, OSError, ConnectionError) as err:
        if echo is not None:
            echo(f"cluster of {target.name!r} does not answer ({type(err).__name__}): keeping every run "
                 "without a manifest, every deploy run and every run another run names as its source")
        return None


def active_run_ids_from(runs: Iterable[Any]) -> set[str]:
    """Ids of runs that are not terminal (a deploy run stays RUNNING while it serves), plus the
    runs they read from when the cluster knows their spec."""
    out = set()
    for run in runs:
        if run.status().is_terminal():
            continue
        out.add(run.run_id)
        try:
            spec = run.spec
        except Exception:  # noqa: S112 - the store's spec.json is consulted too
            continue
        for ref in (getattr(spec, "source", None), getattr(spec, "resume_from", None)):
            rid = run_id_of(ref)
            if rid:
                out.add(rid)
    return out
