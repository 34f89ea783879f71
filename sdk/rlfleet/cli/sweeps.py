"""rlfleet sweep: a hyperparameter sweep of train runs (rlfleet.sweeps)."""

from __future__ import annotations

from typing import Any

import click

from rlfleet.cli._common import json_option, print_json, table, target_option
from rlfleet.errors import SpecError


@click.command("sweep")
@target_option
@click.option("--spec", "spec_file", type=click.Path(dir_okay=False), help="Base train spec (YAML/JSON).")
@click.option("--param", "params", multiple=True, metavar="NAME=DIST:ARGS",
              help="A hyperparameter to search (repeatable): loguniform:LO:HI, uniform:LO:HI, int:LO:HI or "
                   "choice:A,B,...")
@click.option("--trials", type=int, help="Number of trials (runs).")
@click.option("--parallel", type=int, default=1, show_default=True, help="Trials running at the same time.")
@click.option("--metric", default="eval_return", show_default=True,
              help="What to maximize: eval_return or episode_return.")
@click.option("--pruner", default="median", show_default=True, help="Early stopping of weak trials: median or none.")
@click.option("--seed", type=int, help="Seed of the sampler (the runs use the spec's seed).")
@click.option("--resume", "resume", metavar="SWEEP_ID", help="Continue a sweep whose driver stopped.")
@click.option("--poll", type=float, default=2.0, show_default=True, help="Seconds between looks at the runs.")
@json_option
def sweep_cmd(target: str | None, spec_file: str | None, params: tuple[str, ...], trials: int | None,
              parallel: int, metric: str, pruner: str, seed: int | None, resume: str | None, poll: float,
              as_json: bool) -> None:
    """Search hyperparameters with TRIALS train runs; stop weak ones early; print the best run."""
    from rlfleet import sweeps

    def say(msg: str) -> None:
        click.echo(msg, err=as_json)

    if resume is not None:
        ctx = click.get_current_context()
        given = sorted(f"--{p}" for p in ("spec_file", "params", "trials", "seed")
                       if ctx.params[p] not in (None, ()))
        if given:
            raise SpecError(f"--resume continues the sweep as it was defined; drop {', '.join(given)}")
        result = sweeps.resume_sweep(resume, target=target, on_event=say, poll=poll)
    else:
        if not spec_file:
            raise SpecError("--spec: give the base train spec of the sweep (YAML/JSON)")
        if trials is None:
            raise SpecError("--trials: give the number of trials, e.g. --trials 16")
        result = sweeps.sweep(spec_file, list(params), trials=trials, parallel=parallel, metric=metric,
                              target=target, pruner=pruner, seed=seed, on_event=say, poll=poll)
    if as_json:
        print_json(result.to_dict())
        return
    _print_result(result)


def _print_result(result: Any) -> None:
    names = sorted({k for t in result.trials for k in t.params})
    table(["trial", "state", "run_id", *names, result.metric, "last step", "note"],
          [[t.number, t.state, t.run_id, *(_fmt(t.params.get(n)) for n in names), _fmt(t.value), t.last_step,
            t.note] for t in result.trials],
          title=f"sweep {result.sweep_id} on {result.target}")
    best = result.best
    if best is None:
        click.echo("no trial completed; no best run")
    else:
        click.echo(f"best run: {best.run_id} ({result.metric} {_fmt(best.value)}, trial {best.number})")


def _fmt(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else ("" if v is None else str(v))
