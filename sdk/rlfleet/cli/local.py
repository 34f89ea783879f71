"""rlfleet local up | down | status."""

from __future__ import annotations

import click

from rlfleet.cli._common import json_option, print_json, table


@click.group("local")
def local_grp() -> None:
    """The embedded local target: a Ray head on 127.0.0.1 with token auth."""


@local_grp.command("up")
@click.option("--cpus", type=int, help="CPUs Ray may schedule on the head (default: all cores).")
@click.option("--nodes", type=click.IntRange(0, 16), default=None,
              help="Also start N Ray worker nodes here, each in its own network namespace (default: none).")
@click.option("--node-cpus", type=click.IntRange(1), default=1, show_default=True,
              help="CPUs each worker node declares.")
@click.option("--node-gpus", default="0", show_default=True,
              help="GPUs each worker node declares: one number, or one per node ('0,1'); fake ones count too.")
@json_option
def up(cpus: int | None, nodes: int | None, node_cpus: int, node_gpus: str, as_json: bool) -> None:
    """Start the local Ray head (reuse it if it is already up), optionally with worker nodes, and its run supervisor."""
    from rlfleet.local import local_status
    from rlfleet.provisioners.local_supervisor import local_up

    try:
        gpus = [float(g) for g in node_gpus.split(",") if g.strip()]
    except ValueError:
        raise click.BadParameter("one number, or numbers separated by commas (0,1)", param_hint="--node-gpus") from None
    local_up(  # the head, its worker nodes and the run supervisor (queue, restarts)
        echo=(lambda m: None) if as_json else (lambda m: click.echo(m, err=True)), num_cpus=cpus, nodes=nodes,
        node_cpus=node_cpus, node_gpus=gpus[0] if len(gpus) == 1 else gpus,
    )  # fmt: skip
    st = local_status()
    if as_json:
        print_json(st)
    else:
        click.echo(
            f"local target up: {st['ray_address']} (token: {st['token_file']}, artifacts: {st['artifact_root']})"
        )
        for n in st["nodes"]:
            click.echo(f"  node {n['name']}: {n['ip']} cpus={n['cpus']} gpus={n['gpus']:g}")


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
