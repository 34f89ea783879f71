"""``rlfleet demo`` (the main job) and ``rlfleet plot``.

demo: on a target (default: the embedded local one), through the public SDK only:
train PPO on CartPole-v1 until solved (evaluation mean >= 475 over 10 deterministic episodes,
evaluated every 10,000 env steps), evaluate the exported policy in a separate eval run, deploy
it, send requests to the endpoint, print a summary and write a learning-curve PNG.

Heavy imports (matplotlib, httpx, the SDK's Ray client) happen inside the commands.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path
from typing import Any

import click

from rlfleet.cli._common import console, json_option, print_json, target_option

SOLVED = 475.0


def _percentile(values: list[float], q: float) -> float:
    s = sorted(values)
    k = max(0, min(len(s) - 1, round(q / 100 * (len(s) - 1))))
    return s[k]


def _progress_train(run: Any, budget: int, quiet: bool) -> Any:
    """Wait for the train run with a progress bar fed by its metrics.jsonl."""
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    if quiet:
        return run.wait()
    with Progress(
        TextColumn("[bold]training[/] PPO CartPole-v1"),
        BarColumn(),
        TextColumn("{task.completed:>7,.0f} steps"),
        TextColumn("{task.fields[info]}"),
        TimeElapsedColumn(),
        console=console(stderr=True),
        transient=False,
    ) as progress:
        task = progress.add_task("train", total=budget, info="starting")
        last_poll = 0.0

        def on_poll(r: Any, st: Any) -> None:
            nonlocal last_poll
            if time.monotonic() - last_poll < 0.5:
                return
            last_poll = time.monotonic()
            try:
                rows = r.metrics()
            except Exception:  # the run dir may not exist yet
                rows = []
            if not rows:
                progress.update(task, info=st.value.lower())
                return
            last = rows[-1]
            evals = [x["eval_return_mean"] for x in rows if "eval_return_mean" in x]
            info = f"return {last.get('episode_return_mean', 0):6.1f}"
            if evals:
                info += f" | eval {evals[-1]:6.1f}"
            info += f" | {last.get('steps_per_second', 0):,.0f} steps/s"
            progress.update(task, completed=last["step"], info=info)

        st = run.wait(on_poll=on_poll)
        on_poll(run, st)
        return st


def _bench_endpoint(ep: Any, n: int) -> dict[str, Any]:
    """n sequential batch-1 requests on one keep-alive connection."""
    import httpx

    obs = [[0.01, -0.02, 0.03, 0.0]]
    lat: list[float] = []
    actions: list[int] = []
    with httpx.Client(headers={"Authorization": f"Bearer {ep.token}"}, timeout=10, verify=ep.verify) as c:
        for i in range(n + 20):
            t0 = time.perf_counter()
            r = c.post(ep.act_url, json={"observations": obs})
            dt = time.perf_counter() - t0
            r.raise_for_status()
            if i >= 20:  # warm-up excluded
                lat.append(dt)
                actions.append(r.json()["actions"][0])
        unauth = httpx.post(ep.act_url, json={"observations": obs}, timeout=10, verify=ep.verify).status_code
    return {"requests": n, "p50_ms": 1000 * statistics.median(lat), "p99_ms": 1000 * _percentile(lat, 99),
            "client_req_per_s": n / sum(lat), "unauthenticated_status": unauth, "sample_action": actions[0]}


def plot_runs(curves: dict[str, list[dict[str, Any]]], out: Path, x: str = "step",
              title: str = "Learning curves", threshold: float | None = None) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=110)
    for name, rows in curves.items():
        pts = [(r[x], r["episode_return_mean"]) for r in rows if "episode_return_mean" in r and x in r]
        if pts:
            ax.plot(*zip(*pts, strict=True), label=f"{name} (train, mean of last 100 episodes)")
        ev = [(r[x], r["eval_return_mean"]) for r in rows if "eval_return_mean" in r and x in r]
        if ev:
            ax.plot(*zip(*ev, strict=True), "o--", label=f"{name} (deterministic eval)")
    if threshold is not None:
        ax.axhline(threshold, color="grey", lw=0.8, ls=":", label=f"solved ({threshold:g})")
    ax.set_xlabel("env steps" if x == "step" else "training seconds")
    ax.set_ylabel("episode return")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)
    plt.close(fig)
    return out


@click.command("demo")
@target_option
@click.option("--seed", default=0, show_default=True, help="Training seed.")
@click.option("--max-steps", default=300_000, show_default=True, help="Give up if not solved by then.")
@click.option("--requests", "n_requests", default=1000, show_default=True, help="Requests sent to the endpoint.")
@click.option("--out", "out", default="rlfleet-demo.png", show_default=True, type=click.Path(dir_okay=False),
              help="Learning-curve PNG.")
@click.option("--keep-serving", is_flag=True, help="Leave the deploy run serving (cancel it yourself).")
@click.option("--quiet", is_flag=True, help="No progress bar.")
@json_option
def demo(target: str | None, seed: int, max_steps: int, n_requests: int, out: str, keep_serving: bool,
         quiet: bool, as_json: bool) -> None:
    """The main job: train PPO on CartPole-v1 until solved, evaluate, deploy, query, summarize."""
    say = console(stderr=True)
    chatty = not quiet and not as_json
    t_all = time.monotonic()
    if not quiet:
        say.print(f"[bold]rlfleet demo[/] on target [cyan]{target or 'local'}[/] (starting it if needed)")
    train, solved_step, solved_s = _train_until_solved(target, seed, max_steps, quiet=quiet or as_json)
    if chatty:
        say.print(f"solved at step {solved_step:,} after {solved_s:.1f} s of training; evaluating ...")
    ev, eval_json = _evaluate(target, train.run_id, seed)
    if chatty:
        say.print("deploying ...")
    dep, ep, lat = _deploy_and_query(target, train.run_id, n_requests, keep_serving)
    png = plot_runs({train.run_id: train.metrics()}, Path(out), title="rlfleet demo: PPO on CartPole-v1",
                    threshold=SOLVED)
    summary = {
        "train_run": train.run_id, "eval_run": ev.run_id, "deploy_run": dep.run_id,
        "steps_to_solve": solved_step, "seconds_to_solve": solved_s,
        "train_steps_per_second": round(solved_step / max(solved_s, 1e-9)),
        "eval_return_mean": eval_json["mean"], "eval_return_std": eval_json["std"],
        "eval_episodes": eval_json["episodes"], "policy_sha256": eval_json["policy_sha256"],
        "endpoint": ep.act_url, "endpoint_p50_ms": round(lat["p50_ms"], 3),
        "endpoint_p99_ms": round(lat["p99_ms"], 3), "endpoint_requests": lat["requests"],
        "endpoint_unauthenticated_status": lat["unauthenticated_status"],
        "serving": keep_serving, "learning_curve_png": str(png), "total_seconds": round(time.monotonic() - t_all, 1),
    }
    if as_json:
        print_json(summary)
    else:
        _print_summary(summary, lat)


def _train_until_solved(target: str | None, seed: int, max_steps: int, *, quiet: bool) -> tuple[Any, int, float]:
    """Step 1: train until the evaluation mean reaches SOLVED; (run, solved step, training seconds)."""
    from rlfleet import RunSpec, submit_run
    from rlfleet.errors import RlfleetError, RunFailed

    train = submit_run(RunSpec(
        kind="train", name="demo-cartpole", agent="ppo", env="CartPole-v1", seed=seed,
        budget={"steps": max_steps},
        config={"eval_every": 10_000, "eval_episodes": 10, "stop_at_return": SOLVED},
    ), target=target)
    st = _progress_train(train, max_steps, quiet)
    if st.value != "SUCCEEDED":
        raise RunFailed(f"train run {train.run_id} ended {st.value}: {train.failure_reason()}")
    extra = train.artifacts().manifest().extra
    if extra.get("solved_step") is None:
        raise RlfleetError(
            f"train run {train.run_id} did not solve CartPole-v1 within {max_steps} steps "
            f"(best eval {max((e['mean'] for e in extra.get('evals', [])), default=float('nan')):.1f}); "
            "try another --seed or a larger --max-steps"
        )
    solved_eval = next(e for e in extra["evals"] if e["step"] == extra["solved_step"])
    return train, int(extra["solved_step"]), float(solved_eval["time"])


def _evaluate(target: str | None, train_run: str, seed: int) -> tuple[Any, dict[str, Any]]:
    """Step 2: a separate eval run of the exported policy; (run, its eval.json)."""
    from rlfleet import RunSpec, submit_run

    ev = submit_run(RunSpec(kind="eval", name="demo-eval", source=train_run, env="CartPole-v1", seed=seed,
                            eval={"episodes": 20}), target=target).result()
    return ev, ev.artifacts().read_json("eval.json")


def _deploy_and_query(target: str | None, train_run: str, n_requests: int,
                      keep_serving: bool) -> tuple[Any, Any, dict[str, Any]]:
    """Step 3: deploy the policy and time requests to it; (run, endpoint, latency figures). The
    deployment is cancelled afterwards unless ``keep_serving``."""
    from rlfleet import RunSpec, submit_run

    dep = submit_run(RunSpec(kind="deploy", name="demo-serve", source=train_run, env="CartPole-v1",
                             deploy={"name": "cartpole"}), target=target)
    try:
        dep.result()
        ep = dep.endpoint()
        lat = _bench_endpoint(ep, n_requests)
    finally:
        if not keep_serving:
            dep.cancel()
    return dep, ep, lat


def _print_summary(summary: dict[str, Any], lat: dict[str, Any]) -> None:
    """Step 4: the summary table."""
    from rich.table import Table

    t = Table(title="rlfleet demo: PPO on CartPole-v1", show_header=False)
    t.add_column(style="bold")
    t.add_column()
    t.add_row("solved (eval mean >= 475)", f"{summary['steps_to_solve']:,} env steps, "
              f"{summary['seconds_to_solve']:.1f} s of training ({summary['train_steps_per_second']:,} steps/s)")
    t.add_row("evaluation", f"{summary['eval_return_mean']:.1f} ± {summary['eval_return_std']:.1f} over "
              f"{summary['eval_episodes']} deterministic episodes (ONNX policy)")
    t.add_row("endpoint", summary["endpoint"] + (" (still serving)" if summary["serving"] else " (stopped)"))
    t.add_row("endpoint latency", f"p50 {lat['p50_ms']:.3f} ms, p99 {lat['p99_ms']:.3f} ms over "
              f"{lat['requests']} batch-1 requests; without token: HTTP {lat['unauthenticated_status']}")
    t.add_row("runs", f"train {summary['train_run']}, eval {summary['eval_run']}, deploy {summary['deploy_run']}")
    t.add_row("learning curve", summary["learning_curve_png"])
    t.add_row("total", f"{summary['total_seconds']:.1f} s")
    console().print(t)


@click.command("plot")
@click.argument("runs", nargs=-1, required=True)
@target_option
@click.option("--out", "out", default="learning-curves.png", show_default=True, type=click.Path(dir_okay=False))
@click.option("--x", "x", type=click.Choice(["step", "time"]), default="step", show_default=True,
              help="x axis: env steps or training seconds.")
@click.option("--threshold", type=float, default=None, help="Draw a horizontal line (e.g. 475).")
@json_option
def plot(runs: tuple[str, ...], target: str | None, out: str, x: str, threshold: float | None,
         as_json: bool) -> None:
    """Draw learning curves of RUN [RUN...] from their metrics.jsonl (works while they run)."""
    from rlfleet.errors import RunNotFound
    from rlfleet.targets import get_target

    tgt = get_target(target)
    store = tgt.store()
    curves: dict[str, list[dict[str, Any]]] = {}
    for rid in runs:
        arts = store.run(rid)
        if not arts.exists("spec.json") and not arts.exists("metrics.jsonl"):
            raise RunNotFound(f"no run {rid!r} in {store.root_uri} (target {tgt.name}); see 'rlfleet runs'")
        rows = list(arts.iter_metrics())
        if not rows:
            raise RunNotFound(f"run {rid} has no metrics yet ({arts.uri}/metrics.jsonl is empty or missing)")
        curves[rid] = rows
    png = plot_runs(curves, Path(out), x=x, threshold=threshold)
    if as_json:
        print_json({"png": str(png), "runs": {k: len(v) for k, v in curves.items()}})
    else:
        click.echo(f"wrote {png} ({', '.join(f'{k}: {len(v)} points' for k, v in curves.items())})")


__all__ = ["demo", "plot"]
