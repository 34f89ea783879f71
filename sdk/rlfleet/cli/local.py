"""rlfleet local up | down | status."""

from __future__ import annotations

import click

from rlfleet.cli._common import json_option, print_json, table


@click.group("local")
def local_grp() -> None:
    """The embedded local target: a Ray head on 127.0.0.1 with token auth."""


@local_grp.command("up")
@click.option("--cpus", type=int, help="CPUs Ray may schedule (default: all cores).")
@json_option
def up(cpus: int | None, as_json: bool) -> None:
    """Start the local Ray head (reuse it if it is already up)."""
    from rlfleet.local import ensure_local_up, local_status

    ensure_local_up(echo=(lambda m: None) if as_json else (lambda m: click.echo(m, err=True)), num_cpus=cpus)
    st = local_status()
    if as_json:
        print_json(st)
    else:
        click.echo(
            f"local target up: {st['ray_address']} (token: {st['token_file']}, artifacts: {st['artifact_root']})"
        )


@local_grp.command("down")
@json_option
def down(as_json: bool) -> None:
    """Stop the local Ray head. Artifacts on disk are kept."""
    from rlfleet.local import local_down

    stopped = local_down(echo=(lambda m: None) if as_json else (lambda m: click.echo(m, err=True)))
    if as_json:
        print_json({"stopped": stopped})
    else:
        click.echo("local Ray head stopped" if stopped else "local Ray head was not running; nothing to do")


@local_grp.command("status")
@json_option
def status(as_json: bool) -> None:
    """Is the local Ray head running, and where?"""
    from rlfleet.local import local_status

    st = local_status()
    if as_json:
        print_json(st)
    else:
        table(["field", "value"], [[k, v] for k, v in st.items()])
