"""Output helpers shared by the CLI commands."""

from __future__ import annotations

import json
import sys
from typing import Any

import click

target_option = click.option(
    "--target",
    "-t",
    "target",
    default=None,
    metavar="T",
    help="Target name (default: $RLFLEET_TARGET or 'local').",
)
json_option = click.option("--json", "as_json", is_flag=True, help="Print one JSON document.")


def print_json(obj: Any) -> None:
    click.echo(json.dumps(obj, indent=2, sort_keys=True, default=str))


def console(stderr: bool = False) -> Any:
    from rich.console import Console

    stream = sys.stderr if stderr else sys.stdout
    # piped output: do not fold ids and URIs at 80 columns
    width = None if stream.isatty() else 200
    return Console(stderr=stderr, highlight=False, width=width)


def table(columns: list[str], rows: list[list[Any]], title: str | None = None) -> None:
    from rich.table import Table

    t = Table(title=title, show_lines=False, header_style="bold")
    for c in columns:
        t.add_column(c, overflow="fold")
    for r in rows:
        t.add_row(*["" if v is None else str(v) for v in r])
    console().print(t)


def is_tty() -> bool:
    return sys.stdin.isatty() and sys.stdout.isatty()
