"""rlfleet run / runs / status / logs / wait / cancel / artifacts / endpoint."""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import click

from rlfleet.agent_catalog import AGENTS
from rlfleet.cli._common import console, json_option, print_json, table, target_option
from rlfleet.errors import ArtifactError, RlfleetError, RunFailed, SpecError


def _get_run(run_id: str, target: str | None) -> Any:
    """rlfleet.runs.get_run, imported when a command runs: it pulls pydantic and the provisioner
    registry (~0.5 s), which `rlfleet run --help` does not need."""
    from rlfleet.runs import get_run

    return get_run(run_id, target)


def _parse_kv(items: tuple[str, ...], flag: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise SpecError(f"{flag} takes KEY=VALUE, got {item!r}")
        try:
            out[key] = json.loads(raw)
        except json.JSONDecodeError:
            out[key] = raw
    return out


@click.command("run")
@click.argument("kind", type=click.Choice(["train", "eval", "deploy"]))
@target_option
@click.option("--spec", "spec_file", type=click.Path(dir_okay=False), help="Base spec (YAML/JSON); flags override it.")
@click.option("--env", "env_id", help="Gymnasium env id, e.g. CartPole-v1 or my_mod:MyEnv-v0.")
@click.option(
    "--env-kwarg", "env_kwargs", multiple=True, metavar="KEY=VALUE", help="Env constructor argument (repeatable)."
)
@click.option("--agent", type=click.Choice(AGENTS), help="Built-in agent.")
@click.option("--config", "config_kv", multiple=True, metavar="KEY=VALUE", help="Agent hyperparameter (repeatable).")
@click.option("--steps", type=int, help="Training budget in env steps.")
@click.option("--minutes", type=float, help="Training budget in minutes.")
@click.option("--seed", type=int)
@click.option("--name", help="Run label (lowercase, digits, '-').")
@click.option("--from", "source", metavar="RUN_ID", help="eval/deploy: the run to use.")
@click.option("--resume", "resume_from", metavar="RUN_ID", help="train: continue from this run's latest checkpoint.")
@click.option("--reproduce", metavar="RUN_ID",
              help="train: re-run this finished train run with its stored spec, seed and code (no other spec options).")
@click.option("--code", type=click.Path(), help="Local project directory shipped with the run.")
@click.option(
    "--requirement", "requirement", multiple=True, metavar="REQ",
    help="Extra pip requirement for this run (repeatable; './x.whl' = a file inside --code).",
)
@click.option("--requirements-file", metavar="NAME", help="A requirements file inside --code, e.g. requirements.txt.")
@click.option("--episodes", type=int, help="eval: number of episodes.")
@click.option("--cpus", type=float, help="CPUs to reserve.")
@click.option("--gpus", type=float, help="GPUs to reserve.")
@click.option("--priority", type=int, help="Queue priority, 0-1000 (higher goes first; supervised targets).")
@click.option("--max-restarts", type=int, help="train: restarts from its checkpoint after infrastructure failures.")
@click.option(
    "--wait", "do_wait", is_flag=True, help="Wait until it ends (deploy: until it serves); exit non-zero if it failed."
)
@json_option
def run_cmd(
    kind: str,
    target: str | None,
    spec_file: str | None,
    env_id: str | None,
    env_kwargs: tuple[str, ...],
    agent: str | None,
    config_kv: tuple[str, ...],
    steps: int | None,
    minutes: float | None,
    seed: int | None,
    name: str | None,
    source: str | None,
    resume_from: str | None,
    code: str | None,
    requirement: tuple[str, ...],
    requirements_file: str | None,
    episodes: int | None,
    cpus: float | None,
    gpus: float | None,
    priority: int | None,
    max_restarts: int | None,
    do_wait: bool,
    as_json: bool,
    reproduce: str | None = None,
) -> None:
    """Submit a KIND (train | eval | deploy) run."""
    from rlfleet.runs import reproduce_run, submit_run
    from rlfleet.spec import RunSpec

    if reproduce is not None:
        if kind != "train":
            raise SpecError(f"--reproduce re-runs a train run; use 'rlfleet run train --reproduce {reproduce}'")
        ctx = click.get_current_context()
        given = sorted(f"--{p.replace('_', '-')}" for p, v in ctx.params.items()
                       if p not in ("kind", "target", "do_wait", "as_json", "reproduce") and v not in (None, ()))
        if given:
            raise SpecError(f"--reproduce re-runs the stored spec as it is; drop {', '.join(given)} "
                            "(or submit a changed spec with --spec)")
        _submitted(reproduce_run(reproduce, target=target), do_wait, as_json, note=f" (reproduces {reproduce})")
        return
    data: dict[str, Any] = {}
    if spec_file:
        data = RunSpec.from_file(spec_file).model_dump(mode="json", exclude_defaults=True)
        if data.get("kind", kind) != kind:
            raise SpecError(f"--spec {spec_file} describes a {data['kind']} run, but the command says {kind!r}")
    data["kind"] = kind
    simple = {
        "env": env_id,
        "agent": agent,
        "seed": seed,
        "name": name,
        "source": source,
        "resume_from": resume_from,
        "code": code,
        "priority": priority,
        "max_restarts": max_restarts,
    }
    data.update({k: v for k, v in simple.items() if v is not None})
    if requirement and requirements_file:
        raise SpecError("give --requirement or --requirements-file, not both")
    if requirement or requirements_file:
        data["requirements"] = list(requirement) if requirement else requirements_file
    if env_kwargs:
        data["env_kwargs"] = {**data.get("env_kwargs", {}), **_parse_kv(env_kwargs, "--env-kwarg")}
    if config_kv:
        data["config"] = {**data.get("config", {}), **_parse_kv(config_kv, "--config")}
    for key, sub, val in (
        ("budget", "steps", steps),
        ("budget", "minutes", minutes),
        ("eval", "episodes", episodes),
        ("resources", "cpus", cpus),
        ("resources", "gpus", gpus),
    ):
        if val is not None:
            data[key] = {**data.get(key, {}), sub: val}
    _submitted(submit_run(RunSpec.from_dict(data), target=target), do_wait, as_json)


def _submitted(run: Any, do_wait: bool, as_json: bool, note: str = "") -> None:
    """Say what was submitted, or wait for it (exit non-zero if it failed)."""
    spec = run.spec
    if not do_wait:
        if as_json:
            print_json(run.info())
        else:
            click.echo(f"submitted {spec.kind.value} run {run.run_id} to {run.target.name}{note}")
            click.echo(f"  follow it: rlfleet logs {run.run_id} -f --target {run.target.name}")
        return
    status = _wait_with_progress(run, quiet=as_json)
    info = run.info()
    if as_json:
        print_json(info)
    else:
        _print_run(info)
    if status.value in ("FAILED", "CANCELLED"):
        raise RunFailed(f"run {run.run_id} ended {status.value}: {run.failure_reason()}")


def _wait_with_progress(run: Any, *, quiet: bool) -> Any:
    """Wait with a live line: status, step, return (stderr, so --json stays clean)."""
    if quiet or not sys.stderr.isatty():
        return run.wait()
    from rich.live import Live
    from rich.text import Text

    t0 = time.monotonic()
    last_metrics_at = 0.0
    line = {"metrics": ""}

    def render(st: Any) -> Text:
        return Text(f"{run.run_id}  {st.value:<9} {time.monotonic() - t0:6.1f}s  {line['metrics']}")

    with Live(render(run.status()), console=console(stderr=True), refresh_per_second=4, transient=True) as live:

        def on_poll(r: Any, st: Any) -> None:
            nonlocal last_metrics_at
            if time.monotonic() - last_metrics_at > 2:
                last_metrics_at = time.monotonic()
                try:
                    rows = r.metrics()
                except Exception:
                    rows = []
                if rows:
                    m = rows[-1]
                    ret = m.get("episode_return_mean")
                    line["metrics"] = f"step {m.get('step', '?')}" + (
                        f"  return {ret:.1f}" if isinstance(ret, (int, float)) else ""
                    )
            live.update(render(st))

        return run.wait(on_poll=on_poll)


def _print_run(info: dict[str, Any]) -> None:
    rows = [
        [k, info.get(k)]
        for k in (
            "run_id",
            "status",
            "kind",
            "name",
            "target",
            "artifact_uri",
            "submitted_at",
            "started_at",
            "ended_at",
            "wall_time_s",
            "nodes",
            "gpu_hours",
        )
    ]
    rows += [[k, info[k]] for k in ("position", "priority", "restarts") if info.get(k) is not None]
    rows += [[f"restart {i}", _restart_line(h)] for i, h in enumerate(info.get("restart_history") or [], 1)]
    if info.get("message") and info.get("status") in ("FAILED", "CANCELLED"):
        rows.append(["message", info["message"]])
    table(["field", "value"], rows)


def _restart_line(h: dict[str, Any]) -> str:
    """One restart: when the attempt ended, on which node (and that node's state), and why."""
    at = datetime.fromtimestamp(h["at"], UTC).strftime("%Y-%m-%dT%H:%M:%SZ") if h.get("at") else "?"
    node = f" on node {h['node_ip']}" if h.get("node_ip") else ""
    state = f" ({h['node_state']})" if h.get("node_state") else ""
    return f"attempt {h.get('attempt', '?')} ended {at}{node}{state}: {h.get('message', '')}"


@click.command("runs")
@target_option
@click.option("--limit", type=click.IntRange(min=1), default=50, show_default=True)
@click.option("--stored", is_flag=True, help="List the runs in the target's artifact store (no cluster needed).")
@json_option
def runs_cmd(target: str | None, limit: int, stored: bool, as_json: bool) -> None:
    """List runs on a target, newest first (with wall time and GPU-hours)."""
    from rlfleet.errors import AuthError, ClusterUnreachable
    from rlfleet.provisioners.registry import head_down_note
    from rlfleet.runs import list_runs
    from rlfleet.targets import get_target

    tgt = get_target(target)
    if not stored:
        try:
            runs = list_runs(tgt)[:limit]
        except (ClusterUnreachable, AuthError) as err:
            note = head_down_note(tgt, err)
            if note is None:
                raise
            stored = True  # the head is down: show what the target's artifact store holds
            click.echo(f"{note}; runs in its artifact store {tgt.reader_artifact_root}:", err=True)
    if stored:
        _print_stored_runs(tgt, limit, as_json)
        return
    infos = [r.info(refresh=False) for r in runs]
    if as_json:
        print_json(infos)
        return
    table(
        ["run_id", "kind", "name", "status", "submitted", "wall s", "GPU-h"],
        [
            [i["run_id"], i["kind"], i["name"], _status_text(i), i["submitted_at"], i["wall_time_s"], i["gpu_hours"]]
            for i in infos
        ],
        title=f"runs on {tgt.name}",
    )


def _status_text(info: dict[str, Any]) -> str:
    """QUEUED with its place in the queue (#3), a managed run's restarts (RUNNING, 1 restart)."""
    text = str(info["status"])
    if info.get("position"):
        text += f" #{info['position']}"
    if info.get("restarts"):
        text += f", {info['restarts']} restart{'s' if info['restarts'] > 1 else ''}"
    return text


def _print_stored_runs(tgt: Any, limit: int, as_json: bool) -> None:
    """Runs as the artifact store records them: committed (manifest.json), incomplete, or damaged
    (a manifest that cannot be read: reported on its row, the listing goes on)."""
    from rlfleet.stored_run import stored_runs

    store = tgt.store()
    docs: list[dict[str, Any]] = [
        {"run_id": r.run_id, "artifact_uri": r.uri, "complete": r.complete, "state": r.state, "problem": r.problem,
         "kind": r.kind, "name": r.name, "wall_time_s": r.extra.get("wall_time_s"),
         "gpu_hours": r.extra.get("gpu_hours")}
        for r in stored_runs(store, limit=limit)
    ]
    if as_json:
        print_json(docs)
        return
    table(
        ["run_id", "kind", "name", "artifacts", "wall s", "GPU-h"],
        [
            [d["run_id"], d["kind"], d["name"], d["state"] if d["complete"] else d["state"].upper(),
             d["wall_time_s"], d["gpu_hours"]]
            for d in docs
        ],
        title=f"runs stored under {store.root_uri}",
    )


def _run_command(name: str, *options: Any, with_json: bool = True) -> Callable[[Callable[..., None]], click.Command]:
    """A command on one run: ``RUN_ID``, ``--target``, then ``options``, then ``--json``."""

    def wrap(fn: Callable[..., None]) -> click.Command:
        for deco in (*((json_option,) if with_json else ()), *reversed(options), target_option,
                     click.argument("run_id")):
            fn = deco(fn)
        return click.command(name)(fn)

    return wrap


def _show(as_json: bool, doc: Any, human: Callable[[], None]) -> None:
    """Print ``doc`` as JSON with --json, else the human form."""
    if as_json:
        print_json(doc)
    else:
        human()


@_run_command("status")
def status_cmd(run_id: str, target: str | None, as_json: bool) -> None:
    """Show RUN_ID's status."""
    run = _get_run(run_id, target)
    info = run.info()
    if info.get("status") not in ("QUEUED", None):  # which node(s) ran it, from Ray's own tables
        from rlfleet.placement import describe, run_nodes
        from rlfleet.runs import jobs_client

        try:
            info["nodes"] = describe(run_nodes(jobs_client(run.target), run.job_record()))
        except RlfleetError:
            pass  # an older Ray without the state API: status without nodes
    _show(as_json, info, lambda: _print_run(info))


@_run_command("logs", click.option("-f", "--follow", is_flag=True, help="Keep printing until the run ends."),
              with_json=False)
def logs_cmd(run_id: str, target: str | None, follow: bool) -> None:
    """Print RUN_ID's logs."""
    run = _get_run(run_id, target)
    if follow:
        for chunk in run.logs(follow=True):
            click.echo(chunk, nl=False)
    else:
        click.echo(run.logs(), nl=False)


@_run_command("wait", click.option("--timeout", type=float, help="Give up after this many seconds."))
def wait_cmd(run_id: str, target: str | None, timeout: float | None, as_json: bool) -> None:
    """Wait for RUN_ID to end (deploy: to serve); exit non-zero if it failed."""
    run = _get_run(run_id, target)
    try:
        if as_json or timeout is not None:
            status = run.wait(timeout)
        else:
            status = _wait_with_progress(run, quiet=False)
    except TimeoutError as err:
        raise RlfleetError(str(err)) from None
    _show(as_json, run.info() if as_json else None, lambda: click.echo(f"{run_id} {status.value}"))
    if status.value in ("FAILED", "CANCELLED"):
        raise RunFailed(f"run {run_id} ended {status.value}: {run.failure_reason()}")


@_run_command("cancel")
def cancel_cmd(run_id: str, target: str | None, as_json: bool) -> None:
    """Cancel RUN_ID (and its deployment). A finished run is left as it is."""
    run = _get_run(run_id, target)
    stopped = run.cancel()
    status = run.status().value
    _show(as_json, {"run_id": run_id, "stopped": stopped, "status": status}, lambda: click.echo(
        f"{run_id}: {'cancelled' if stopped else 'already ' + status.lower() + ', nothing to do'}"))


@_run_command("artifacts")
def artifacts_cmd(run_id: str, target: str | None, as_json: bool) -> None:
    """List RUN_ID's artifacts and verify them against its manifest."""
    from rlfleet.targets import get_target

    arts = get_target(target).store().run(run_id)
    files = arts.list_files()
    if not files:
        raise ArtifactError(f"run {run_id} has no artifacts under {arts.uri}")
    complete = arts.is_complete()
    manifest = arts.verify() if complete else None
    entries = manifest.files if manifest else {}
    doc = {
        "run_id": run_id,
        "uri": arts.uri,
        "complete": complete,
        "verified": manifest is not None,
        "files": [{"path": f, "size": entries[f].size if f in entries else None,
                   "sha256": entries[f].sha256 if f in entries else None} for f in files],
        "extra": manifest.extra if manifest else {},
    }
    _show(as_json, doc, lambda: table(
        ["path", "bytes", "sha256"],
        [[f["path"], f["size"], (f["sha256"] or "")[:16]] for f in doc["files"]],
        title=f"{arts.uri}  ({'complete, verified' if complete else 'INCOMPLETE: no manifest.json'})",
    ))


@_run_command("endpoint")
def endpoint_cmd(run_id: str, target: str | None, as_json: bool) -> None:
    """Show the URL of deploy run RUN_ID (the token is not printed)."""
    ep = _get_run(run_id, target).endpoint()
    _show(as_json, {"url": ep.url, "act_url": ep.act_url}, lambda: click.echo(ep.act_url))
