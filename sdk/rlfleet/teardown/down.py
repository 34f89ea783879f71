"""``rlfleet down``: stop runs, destroy, sweep what is left, and prove nothing remains.

Order of work (nothing changes before the data-deletion question is answered):

1. list the target's runs that are not finished (a cluster that no longer answers has none);
2. with ``delete_data``: measure what would be deleted (objects, bytes) and ask; without a TTY
   and without ``yes`` refuse with :class:`ConfirmationRequired`;
3. cancel those runs and deployments;
4. the provisioner's ``destroy`` (Pulumi destroy / teardown.yml / stopping the local head);
   cloud stacks keep their artifact bucket on destroy, so for them ``delete_data`` is not
   passed on: the sweep deletes the bucket instead;
5. kinds with a tag sweep (cloud stacks: ``registry.sweep_of``) only: remove whatever is still
   tagged for the stack (only resources carrying ``rlfleet:stack=<stack id>`` /
   ``rlfleet-stack=<stack id>``; the artifact bucket and the key that encrypts it only with
   ``delete_data``);
6. verify: scan again (the sweep's scan, else the provisioner's ``scan_leftovers``), retrying
   with backoff for eventual consistency; anything left is printed and :class:`LeftoversFound`
   raised.

``dry_run`` does 1, 2 (measuring only) and lists what 3-5 would remove; it changes nothing.
A second ``down`` on a torn-down target finds nothing to do and succeeds.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from rlfleet.errors import ConfirmationRequired, LeftoversFound, ProvisionerError, RlfleetError
from rlfleet.provisioners import registry
from rlfleet.provisioners.registry import Provisioner
from rlfleet.targets import Target
from rlfleet.teardown import Leftover, RemovalReport
from rlfleet.teardown.cleanup import human_bytes
from rlfleet.teardown.sweep import StackSweep

Scanner = Callable[[], list[Leftover]]
Remover = Callable[[list[Leftover], bool], RemovalReport]


@dataclass(frozen=True)
class DataSummary:
    uri: str
    objects: int
    bytes: int

    def __str__(self) -> str:
        return f"{self.uri}: {self.objects} object(s), {human_bytes(self.bytes)}"


@dataclass
class DownResult:
    target: str
    dry_run: bool = False
    cancelled: list[str] = field(default_factory=list)
    planned: list[str] = field(default_factory=list)
    sweep: RemovalReport | None = None
    leftovers: list[Leftover] = field(default_factory=list)
    kept_data: list[Leftover] = field(default_factory=list)
    data: DataSummary | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "target": self.target,
            "dry_run": self.dry_run,
            "cancelled": self.cancelled,
            "planned": self.planned,
            "swept": [str(x) for x in self.sweep.removed] if self.sweep else [],
            "leftovers": [str(x) for x in self.leftovers],
            "kept_data": [str(x) for x in self.kept_data],
            "data": None if self.data is None else vars(self.data),
        }


# -- what down works with: the target's provisioner and its cloud's tag sweep ----------------------

def stack_of(target: Target) -> str:
    """The value the stack's resources are tagged with: its stack id (older targets: the bare name)."""
    sweep = registry.sweep_of(target)
    if sweep is None:
        raise RlfleetError(f"target {target.name!r} ({target.kind}) is not a tagged cloud stack")
    return sweep.scope.stack


def bare_name_note(target: Target) -> str | None:
    """What the sweep of a cloud target cannot cover (a bare stack name recorded before stack ids)."""
    sweep = registry.sweep_of(target)
    return sweep.note if sweep else None


def _data_region(target: Target) -> str | None:
    sweep = registry.sweep_of(target)
    return sweep.scope.region if sweep else None


@dataclass
class _Teardown:
    """One ``down``: the target, who destroys it, how leftovers are found and removed, the result."""

    target: Target
    provisioner: Provisioner | Any  # anything with destroy / plan_destroy / scan_leftovers
    scan: Scanner
    remove: Remover | None  # the tag sweep's removal (cloud stacks), None: nothing to sweep
    hint: str  # how leftovers are recognised, for the final error
    echo: Callable[[str], None]
    result: DownResult


def _as_leftovers(target: Target, items: Iterable[Leftover | str]) -> list[Leftover]:
    return [x if isinstance(x, Leftover) else Leftover(target.kind, "leftover", x) for x in items]


def _resolve(target: Target, provisioner: Provisioner | Any | None, scanner: Scanner | None,
             remover: Remover | None, dry_run: bool, echo: Callable[[str], None]) -> _Teardown:
    """Step 0: the provisioner (from the registry unless given), the sweep of the target's cloud
    and the scan verify uses. Raises before anything changes for a kind with no provisioner."""
    prov = provisioner if provisioner is not None else registry.provisioner_of(target)
    sweep: StackSweep | None = registry.sweep_of(target)
    if sweep is not None and sweep.note:
        echo(sweep.note)

    def provisioner_scan() -> list[Leftover]:
        return _as_leftovers(target, prov.scan_leftovers(target))

    scan = scanner or (sweep.scan if sweep is not None else provisioner_scan)
    remove = remover if remover is not None else (sweep.remove if sweep is not None else None)
    hint = f"; they carry {sweep.tagged}" if sweep is not None else ""
    return _Teardown(target, prov, scan, remove, hint, echo, DownResult(target=target.name, dry_run=dry_run))


def _active_runs(td: _Teardown, list_runs: Callable[[Target], Iterable[Any]] | None) -> list[Any]:
    """Step 1: the target's runs that are not finished (a cluster that does not answer has none)."""
    cluster_runs = list_runs
    if cluster_runs is None:
        from rlfleet.runs import list_runs as all_runs

        cluster_runs = all_runs
    try:
        return [r for r in cluster_runs(td.target) if not r.status().is_terminal()]
    except (RlfleetError, OSError, ConnectionError) as err:
        td.echo(f"cluster of {td.target.name!r} does not answer ({type(err).__name__}); no runs to cancel")
        return []


def _measure_and_ask(td: _Teardown, summarize_data: Callable[[Target], DataSummary], *, ask: bool, yes: bool,
                     confirm: Callable[[str], bool] | None, is_tty: Callable[[], bool]) -> None:
    """Step 2 (--delete-data): measure what would be deleted, then ask before anything changes."""
    td.result.data = summarize_data(td.target)
    td.echo(f"--delete-data would delete {td.result.data}")
    if ask:
        _confirm_delete(td.target, td.result.data, yes=yes, confirm=confirm, is_tty=is_tty)


def _report_plan(td: _Teardown, active: list[Any], delete_data: bool) -> DownResult:
    """--dry-run: what steps 3-5 would do; nothing changes."""
    res = td.result
    res.planned += [f"cancel run {r.run_id} ({r.status().value})" for r in active]
    res.planned += list(td.provisioner.plan_destroy(td.target, delete_data=delete_data and td.remove is None))
    for x in td.scan():
        if x.is_data and not delete_data:
            res.kept_data.append(x)
        else:
            res.planned.append(f"remove {x}")
    td.echo(f"dry run: 'rlfleet down {td.target.name}' would:")
    for line in res.planned or ["(nothing: the target is already down)"]:
        td.echo(f"  {line}")
    for x in res.kept_data:
        td.echo(f"  keep {x} (use --delete-data to remove)")
    return res


def _cancel(td: _Teardown, active: list[Any]) -> None:
    """Step 3: cancel runs and deployments (destroying the cluster stops the ones that refuse)."""
    for run in active:
        try:
            run.cancel()
            td.result.cancelled.append(run.run_id)
            td.echo(f"cancelled run {run.run_id}")
        except (RlfleetError, OSError, ConnectionError) as err:
            td.echo(f"could not cancel run {run.run_id}: {err} (destroying the cluster stops it anyway)")


def _destroy(td: _Teardown, delete_data: bool) -> ProvisionerError | None:
    """Step 4: the provisioner's destroy. Cloud stacks keep their artifact bucket on destroy
    (retained resources); with --delete-data the sweep empties and deletes it, so the provisioner
    is never asked to."""
    try:
        td.provisioner.destroy(td.target, delete_data=delete_data and td.remove is None, echo=td.echo)
    except ProvisionerError as err:
        td.echo(f"destroy failed: {err}")
        return err
    return None


def _sweep(td: _Teardown, delete_data: bool) -> None:
    """Step 5: remove what is still tagged for the stack (only after a successful destroy)."""
    if td.remove is None:
        return
    found = [x for x in td.scan() if delete_data or not x.is_data]
    if found:
        td.echo(f"{len(found)} resource(s) still tagged for the stack after destroy; removing them:")
        td.result.sweep = td.remove(found, delete_data)
        for line in td.result.sweep.lines():
            td.echo(f"  {line}")


def _verify(td: _Teardown, delete_data: bool, attempts: int, backoff_s: float) -> None:
    """Step 6: scan until nothing is left, with backoff for eventual consistency."""
    delay = backoff_s
    for attempt in range(max(1, attempts)):
        everything = td.scan()
        td.result.leftovers = [x for x in everything if delete_data or not x.is_data]
        td.result.kept_data = [x for x in everything if x.is_data and not delete_data]
        if not td.result.leftovers:
            return
        if attempt + 1 < attempts:
            td.echo(f"verify: {len(td.result.leftovers)} resource(s) still present; checking again in {delay:.0f} s")
            time.sleep(delay)
            delay *= 2


def _conclude(td: _Teardown, destroy_error: ProvisionerError | None) -> DownResult:
    """Step 7: say what is kept and what is left; a failed destroy or a leftover is an error."""
    name, left = td.target.name, td.result.leftovers
    for x in td.result.kept_data:
        td.echo(f"kept {x} (artifact data; 'rlfleet down {name} --delete-data' removes it)")
    if destroy_error is not None:
        for x in left:
            td.echo(f"  still present: {x}")
        raise destroy_error
    if left:
        td.echo(f"LEFTOVERS on {name!r}:")
        for x in left:
            td.echo(f"  {x}")
        raise LeftoversFound(
            f"{len(left)} resource(s) created for target {name!r} are still there after teardown "
            f"(listed above){td.hint}. Re-run 'rlfleet down {name}' to retry; "
            "if they stay, delete them by hand or check the cloud console for what blocks them"
        )
    td.echo(f"target {name!r} is down; verified: nothing the kit created is left"
            + (" (artifact data kept)" if td.result.kept_data else ""))
    return td.result


def data_summary(target: Target) -> DataSummary:
    """What --delete-data would delete: the artifact bucket (every object version on S3) or,
    for file:// roots, the artifact directory."""
    uri = target.reader_artifact_root
    scheme, _, rest = uri.partition("://")
    if scheme == "s3":
        from rlfleet.teardown import aws

        bucket = rest.split("/", 1)[0]
        endpoint = (target.storage_options.get("client_kwargs") or {}).get("endpoint_url")
        n, size = aws.bucket_usage(bucket, region=_data_region(target), endpoint_url=endpoint)
        return DataSummary(f"s3://{bucket}", n, size)
    store = target.store()
    fs = store.fs
    root = store.root_path
    if scheme in ("gs", "gcs"):
        root = root.split("/", 1)[0]
        uri = f"gs://{root}"
    try:
        files = fs.find(root, detail=True)
    except FileNotFoundError:
        files = {}
    return DataSummary(uri, len(files), sum(int(v.get("size") or 0) for v in files.values()))


# -- the orchestrator -------------------------------------------------------------------------

def down(
    target: Target,
    *,
    delete_data: bool = False,
    yes: bool = False,
    dry_run: bool = False,
    echo: Callable[[str], None] = print,
    confirm: Callable[[str], bool] | None = None,
    is_tty: Callable[[], bool] = lambda: False,
    list_runs: Callable[[Target], Iterable[Any]] | None = None,
    provisioner: Provisioner | Any | None = None,
    scanner: Scanner | None = None,
    remover: Remover | None = None,
    summarize_data: Callable[[Target], DataSummary] = data_summary,
    verify_attempts: int = 5,
    backoff_s: float = 2.0,
) -> DownResult:
    """Tear ``target`` down (see the module doc). ``list_runs``, ``provisioner``, ``scanner``,
    ``remover`` and ``summarize_data`` replace the registry's parts (tests, other tools)."""
    td = _resolve(target, provisioner, scanner, remover, dry_run, echo)
    active = _active_runs(td, list_runs)
    if delete_data:
        _measure_and_ask(td, summarize_data, ask=not dry_run, yes=yes, confirm=confirm, is_tty=is_tty)
    if dry_run:
        return _report_plan(td, active, delete_data)
    _cancel(td, active)
    destroy_error = _destroy(td, delete_data)
    if destroy_error is None:
        _sweep(td, delete_data)
    _verify(td, delete_data, verify_attempts, backoff_s)
    return _conclude(td, destroy_error)


def _confirm_delete(
    target: Target, data: DataSummary, *, yes: bool, confirm: Callable[[str], bool] | None,
    is_tty: Callable[[], bool],
) -> None:
    if yes:
        return
    if not is_tty() or confirm is None:
        raise ConfirmationRequired(
            f"--delete-data would permanently delete {data} of target {target.name!r}; "
            "there is no terminal to ask on, so nothing was changed. Re-run with --yes to confirm, "
            "or without --delete-data to keep the data"
        )
    if not confirm(f"Permanently delete {data}?"):
        raise ConfirmationRequired(f"not confirmed: nothing of target {target.name!r} was changed")
