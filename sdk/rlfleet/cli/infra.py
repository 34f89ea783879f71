"""rlfleet up | down | cleanup | cost <target>: the infrastructure life cycle.

Heavy work (boto3, google-cloud, Pulumi, ansible-runner) is imported inside the commands.
Errors are rlfleet errors: the main CLI prints them on one line and exits with their code
(LeftoversFound: 8, ConfirmationRequired: 2).
"""

from __future__ import annotations

from typing import Any

import click

from rlfleet.cli._common import is_tty, json_option, print_json


def _echo_err(msg: str) -> None:
    click.echo(msg, err=True)


def _confirm(question: str) -> bool:
    return click.confirm(question, default=False, err=True)


@click.command("up")
@click.argument("target_name", metavar="TARGET")
@click.option("--yes", is_flag=True, help="Do not ask before creating billable cloud resources.")
@json_option
def up(target_name: str, yes: bool, as_json: bool) -> None:
    """Provision TARGET (Pulumi / Ansible / local); shows the cost estimate first for clouds."""
    from rlfleet.errors import ConfirmationRequired
    from rlfleet.provisioners import registry
    from rlfleet.targets import get_target, save_target

    target = get_target(target_name)
    echo = (lambda m: None) if as_json else _echo_err
    est = None
    if registry.estimate_before_up(target):
        from rlfleet.teardown.cost import estimate_target

        est = estimate_target(target)
        echo(est.format())
        if not yes:
            if not is_tty():
                raise ConfirmationRequired(
                    f"'rlfleet up {target.name}' creates billable {target.kind} resources "
                    f"(~{est.hourly:.2f} {est.currency}/h estimated); there is no terminal to ask on: "
                    "re-run with --yes to confirm"
                )
            if not _confirm(f"Create these resources (~{est.hourly:.2f} {est.currency}/h)?"):
                raise ConfirmationRequired(f"not confirmed: nothing of target {target.name!r} was created")
    new = registry.provisioner_of(target).up(target, echo=echo)
    path = save_target(new) if registry.saved_after_up(new) else None
    if as_json:
        print_json({"target": new.model_dump(mode="json"), "saved_to": str(path) if path else None,
                    "estimate": est.to_dict() if est else None})
    else:
        click.echo(f"target {new.name!r} is up: {new.ray_address}" + (f" (saved to {path})" if path else ""))


@click.command("down")
@click.argument("target_name", metavar="TARGET")
@click.option("--delete-data", is_flag=True, help="Also delete artifact buckets / directories (asks first).")
@click.option("--yes", is_flag=True, help="Confirm --delete-data without asking (for scripts).")
@click.option("--dry-run", is_flag=True, help="List what would be removed; change nothing.")
@json_option
def down(target_name: str, delete_data: bool, yes: bool, dry_run: bool, as_json: bool) -> None:
    """Tear TARGET down: cancel its runs, destroy what its provisioner created, then verify by
    tag/label scan that nothing is left (exit 8 and a list if something is)."""
    from rlfleet.targets import get_target
    from rlfleet.teardown.down import down as run_down

    target = get_target(target_name)
    result = run_down(target, delete_data=delete_data, yes=yes, dry_run=dry_run, echo=_echo_err,
                      confirm=_confirm, is_tty=is_tty)
    if as_json:
        print_json(result.to_dict())


@click.command("cleanup")
@click.argument("target_name", metavar="TARGET")
@click.option("--older-than", "older_than", metavar="AGE", help="Remove runs older than AGE (30d, 12h, 2w).")
@click.option("--keep-last", "keep_last", type=click.IntRange(min=1), metavar="N",
              help="Keep the N newest runs of each name (at least 1).")
@click.option("--dry-run", is_flag=True, help="List what would be removed; change nothing.")
@json_option
def cleanup(target_name: str, older_than: str | None, keep_last: int | None, dry_run: bool, as_json: bool) -> None:
    """Prune TARGET's run artifacts by rule. Never removes running or deployed runs, the runs
    they use, or the newest run of each name."""
    from rlfleet.targets import get_target
    from rlfleet.teardown import cleanup as cl

    try:
        age = cl.parse_age(older_than) if older_than else None
    except ValueError as err:
        raise click.BadParameter(str(err), param_hint="--older-than") from None
    if age is None and keep_last is None:
        raise click.UsageError("give a retention rule: --older-than AGE and/or --keep-last N")
    target = get_target(target_name)
    active = cl.cluster_active_run_ids(target, echo=_echo_err)
    store = target.store()
    try:
        plan = cl.plan_cleanup(store, older_than=age, keep_last=keep_last, active_run_ids=active)
    except ValueError as err:
        raise click.UsageError(str(err)) from None
    freed = 0
    if not as_json:
        for r, why in plan.keep:
            _echo_err(f"keep   {r.run_id} ({r.name}): {why}")
    if dry_run:
        for r in plan.remove:
            _echo_err(f"would remove {r.run_id} ({r.name}, {cl.human_bytes(plan.sizes.get(r.run_id, 0))})")
    else:
        # each run is re-checked (store and cluster) right before it is deleted
        freed = cl.apply_cleanup(store, plan, echo=(lambda m: None) if as_json else _echo_err,
                                 active_run_ids=lambda: cl.cluster_active_run_ids(target))
    summary: dict[str, Any] = {
        "target": target.name,
        "dry_run": dry_run,
        "removed": [r.run_id for r in plan.remove],
        "kept": {r.run_id: why for r, why in plan.keep},
        "bytes_freed": 0 if dry_run else freed,
        "bytes_to_free": plan.bytes_to_free,
    }
    if as_json:
        print_json(summary)
    elif dry_run:
        click.echo(f"dry run: would remove {len(plan.remove)} run(s), freeing {cl.human_bytes(plan.bytes_to_free)}")
    else:
        click.echo(f"removed {len(plan.remove)} run(s), freed {cl.human_bytes(freed)}")


@click.command("cost")
@click.argument("target_name", metavar="TARGET")
@json_option
def cost(target_name: str, as_json: bool) -> None:
    """Estimate TARGET's hourly and monthly cost from its stack config (an estimate, dated)."""
    from rlfleet.targets import get_target
    from rlfleet.teardown.cost import estimate_target

    est = estimate_target(get_target(target_name))
    if as_json:
        print_json(est.to_dict())
    else:
        click.echo(est.format())
