"""``rlfleet down``: stop runs, destroy, sweep what is left, and prove nothing remains.

Order of work (nothing changes before the data-deletion question is answered):

1. list the target's runs that are not finished (a cluster that no longer answers has none);
2. with ``delete_data``: measure what would be deleted (objects, bytes) and ask; without a TTY
   and without ``yes`` refuse with :class:`ConfirmationRequired`;
3. cancel those runs and deployments;
4. the provisioner's ``destroy`` (Pulumi destroy / teardown.yml / stopping the local head);
   cloud stacks keep their artifact bucket on destroy, so for them ``delete_data`` is not
   passed on: the sweep deletes the bucket instead;
5. cloud targets only: remove whatever is still tagged for the stack (the sweep: only resources
   carrying ``rlfleet:stack=<stack id>`` / ``rlfleet-stack=<stack id>``; the artifact bucket and
   the key that encrypts it only with ``delete_data``);
6. verify: scan again, retrying with backoff for eventual consistency; anything left is printed
   and :class:`LeftoversFound` raised.

``dry_run`` does 1, 2 (measuring only) and lists what 3-5 would remove; it changes nothing.
A second ``down`` on a torn-down target finds nothing to do and succeeds.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any

from rlfleet.errors import ConfirmationRequired, LeftoversFound, ProvisionerError, RlfleetError
from rlfleet.stack_outputs import is_stack_id
from rlfleet.targets import Target
from rlfleet.teardown import AWS_STACK_TAG, GCP_STACK_LABEL, Leftover, RemovalReport
from rlfleet.teardown.cleanup import human_bytes

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


# -- how to scan and sweep each kind of target ----------------------------------------------

def stack_of(target: Target) -> str:
    """The value the stack's resources are tagged with: its stack id (older targets: the bare name)."""
    prov = target.provisioner or {}
    stack = prov.get("stack_tag") or prov.get("stack")
    if not stack:
        raise RlfleetError(
            f"target {target.name!r} has no provisioner.stack: rlfleet cannot tell which "
            "tagged resources belong to it; re-create it with 'rlfleet target add'"
        )
    return str(stack)


def bare_name_note(target: Target) -> str | None:
    """For a cloud target that records a bare stack name instead of a stack id: what is not swept."""
    if target.kind != "aws":
        return None  # gcp: the scans stay inside the target's project, where the old names were unique
    tag = stack_of(target)
    if is_stack_id(tag):
        return None
    return (
        f"target {target.name!r} records the bare stack name {tag!r} (made before stack ids): IAM is "
        f"global and every region's and project's {tag!r} carries that tag, so IAM roles, profiles and "
        "policies are not swept or checked; run 'pulumi up' on the stack once (it tags everything with "
        f"its stack id), then 'rlfleet target add' it again"
    )


def _region(target: Target) -> str | None:
    prov = target.provisioner or {}
    if prov.get("region"):
        return str(prov["region"])
    if prov.get("project_dir") and prov.get("stack"):
        try:
            from rlfleet.teardown.cost import read_stack_config

            _, cfg = read_stack_config(prov["project_dir"], prov["stack"])
            return cfg.get(f"{target.kind}:region") or cfg.get(f"{target.kind}:project")
        except RlfleetError:
            return None
    return None


def default_scanner(target: Target, provisioner: ModuleType | None) -> Scanner:
    if target.kind == "aws":
        from rlfleet.teardown import aws

        stack, region = stack_of(target), _region(target)
        include_iam = is_stack_id(stack)
        return lambda: aws.scan_stack(stack, region=region, include_iam=include_iam)
    if target.kind == "gcp":
        from rlfleet.teardown import gcp

        stack, region = stack_of(target), _region(target)
        project = (target.provisioner or {}).get("project")
        return lambda: gcp.scan_stack(stack, project=project, region=region)
    if provisioner is None:
        return list

    def scan() -> list[Leftover]:
        return [Leftover(target.kind, "leftover", s) for s in provisioner.scan_leftovers(target)]

    return scan


def default_remover(target: Target) -> Remover | None:
    if target.kind == "aws":
        from rlfleet.teardown import aws

        region = _region(target)
        return lambda items, delete_data: aws.remove_leftovers(items, delete_data=delete_data, region=region)
    if target.kind == "gcp":
        from rlfleet.teardown import gcp

        project = (target.provisioner or {}).get("project")
        return lambda items, delete_data: gcp.remove_leftovers(items, delete_data=delete_data, project=project)
    return None


def data_summary(target: Target) -> DataSummary:
    """What --delete-data would delete: the artifact bucket (every object version on S3) or,
    for file:// roots, the artifact directory."""
    uri = target.reader_artifact_root
    scheme, _, rest = uri.partition("://")
    if scheme == "s3":
        from rlfleet.teardown import aws

        bucket = rest.split("/", 1)[0]
        endpoint = (target.storage_options.get("client_kwargs") or {}).get("endpoint_url")
        n, size = aws.bucket_usage(bucket, region=_region(target), endpoint_url=endpoint)
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
    provisioner: ModuleType | Any | None = None,
    scanner: Scanner | None = None,
    remover: Remover | None = None,
    summarize_data: Callable[[Target], DataSummary] = data_summary,
    verify_attempts: int = 5,
    backoff_s: float = 2.0,
) -> DownResult:
    if provisioner is None:
        from rlfleet.provisioners import for_kind

        provisioner = for_kind(target.kind)
    if list_runs is None:
        from rlfleet.runs import list_runs as _list_runs

        list_runs = _list_runs
    scan = scanner or default_scanner(target, provisioner)
    sweep = remover if remover is not None else default_remover(target)
    result = DownResult(target=target.name, dry_run=dry_run)
    note = bare_name_note(target)
    if note:
        echo(note)

    # 1. runs still going
    try:
        active = [r for r in list_runs(target) if not r.status().is_terminal()]
    except (RlfleetError, OSError, ConnectionError) as err:
        echo(f"cluster of {target.name!r} does not answer ({type(err).__name__}); no runs to cancel")
        active = []

    # 2. data: measure, then ask before anything changes
    if delete_data:
        result.data = summarize_data(target)
        echo(f"--delete-data would delete {result.data}")
        if not dry_run:
            _confirm_delete(target, result.data, yes=yes, confirm=confirm, is_tty=is_tty)

    if dry_run:
        result.planned += [f"cancel run {r.run_id} ({r.status().value})" for r in active]
        result.planned += list(provisioner.plan_destroy(target, delete_data=delete_data and sweep is None))
        for x in scan():
            if x.is_data and not delete_data:
                result.kept_data.append(x)
            else:
                result.planned.append(f"remove {x}")
        echo(f"dry run: 'rlfleet down {target.name}' would:")
        for line in result.planned or ["(nothing: the target is already down)"]:
            echo(f"  {line}")
        for x in result.kept_data:
            echo(f"  keep {x} (use --delete-data to remove)")
        return result

    # 3. cancel runs and deployments
    for run in active:
        try:
            run.cancel()
            result.cancelled.append(run.run_id)
            echo(f"cancelled run {run.run_id}")
        except (RlfleetError, OSError, ConnectionError) as err:
            echo(f"could not cancel run {run.run_id}: {err} (destroying the cluster stops it anyway)")

    # 4. the provisioner
    # Cloud stacks keep their artifact bucket on destroy (retained resources); with --delete-data
    # the sweep below empties and deletes it, so the provisioner is never asked to.
    destroy_error: ProvisionerError | None = None
    try:
        provisioner.destroy(target, delete_data=delete_data and sweep is None, echo=echo)
    except ProvisionerError as err:
        destroy_error = err
        echo(f"destroy failed: {err}")

    # 5. sweep what is still tagged for the stack (only after a successful destroy)
    if destroy_error is None and sweep is not None:
        found = [x for x in scan() if delete_data or not x.is_data]
        if found:
            echo(f"{len(found)} resource(s) still tagged for the stack after destroy; removing them:")
            result.sweep = sweep(found, delete_data)
            for line in result.sweep.lines():
                echo(f"  {line}")

    # 6. verify, with backoff for eventual consistency
    delay = backoff_s
    left: list[Leftover] = []
    for attempt in range(max(1, verify_attempts)):
        everything = scan()
        left = [x for x in everything if delete_data or not x.is_data]
        result.kept_data = [x for x in everything if x.is_data and not delete_data]
        if not left:
            break
        if attempt + 1 < verify_attempts:
            echo(f"verify: {len(left)} resource(s) still present; checking again in {delay:.0f} s")
            time.sleep(delay)
            delay *= 2
    result.leftovers = left
    for x in result.kept_data:
        echo(f"kept {x} (artifact data; 'rlfleet down {target.name} --delete-data' removes it)")
    if destroy_error is not None:
        for x in left:
            echo(f"  still present: {x}")
        raise destroy_error
    if left:
        echo(f"LEFTOVERS on {target.name!r}:")
        for x in left:
            echo(f"  {x}")
        raise LeftoversFound(
            f"{len(left)} resource(s) created for target {target.name!r} are still there after teardown "
            f"(listed above){_tag_hint(target)}. Re-run 'rlfleet down {target.name}' to retry; "
            "if they stay, delete them by hand or check the cloud console for what blocks them"
        )
    echo(f"target {target.name!r} is down; verified: nothing the kit created is left"
         + (" (artifact data kept)" if result.kept_data else ""))
    return result


def _tag_hint(target: Target) -> str:
    if target.kind == "aws":
        return f"; they carry the tag {AWS_STACK_TAG}={stack_of(target)}"
    if target.kind == "gcp":
        return f"; they carry the label {GCP_STACK_LABEL}={stack_of(target)}"
    return ""


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
