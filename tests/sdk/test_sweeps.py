"""Sweeps (issue 14 part 3): trials are ordinary train runs on the real local target, weak ones are
pruned (Optuna's median pruner) by cancelling their runs, and a sweep whose driver was SIGKILLed
is resumed without submitting any run twice."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from tracking_server import assert_logged, mlflow_run_of

from rlfleet import RunStatus, get_run, list_runs
from rlfleet.cli import main
from rlfleet.sweeps import sweep_status
from rlfleet.targets import local_target

RLFLEET = str(Path(sys.executable).parent / "rlfleet")
GOOD, WEAK = 0.0025, 1e-06
# TPE's first draws for choice:GOOD,WEAK with seed 6 are GOOD, GOOD; a driver resumed after two
# trials draws with seed 6 + 2: WEAK first. Trial 2 is the weak one and starts when trial 0 or 1
# has completed (parallel 2), so the pruner has a reference
SEED = 6


# the bring-your-own env of the scale-out bench, waiting 0.5 ms per step: every trial takes >= 10 s
# of wall time (no CPU), so a weak trial is still training when the driver, which sees its rows up
# to ~2.5 s late (2 s flushes, 0.5 s polls), cancels it (on CartPole a weak run could finish first)
SLOWENV = str(Path(__file__).resolve().parents[2] / "bench" / "slowenv")


def _base(tmp_path: Path, steps: int, slow: bool = False, **config: object) -> Path:
    spec = {"kind": "train", "agent": "ppo", "env": "CartPole-v1", "seed": 3, "budget": {"steps": steps},
            "resources": {"cpus": 1}, "config": config}
    if slow:
        spec.update(env="slowenv:SlowEnv-v0", code=SLOWENV, env_kwargs={"step_ms": 0.5, "mode": "sleep"})
    path = tmp_path / "base.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


BAD = [
    (["--param", "n_epochs=choice:4,8"], "--param n_epochs: unknown ppo hyperparameter; did you mean 'update_epochs'?"),
    (["--param", "learning_rate=lognormal:1e-4:1e-2"], "unknown distribution 'lognormal'"),
    (["--param", "learning_rate=loguniform:1e-2"], "loguniform needs LOW:HIGH"),
    (["--param", "learning_rate=loguniform:0:1e-2"], "loguniform needs LOW > 0"),
    (["--param", "learning_rate=uniform:1e-2:1e-4"], "LOW must be below HIGH"),
    (["--param", "update_epochs=choice:4,x"], "--param update_epochs: choice value 'x' is not accepted"),
    (["--param", "update_epochs=uniform:1:8"], "config.update_epochs: must be an integer, got 1.0"),
    (["--param", "learning_rate=loguniform:1e-4:1e-2", "--trials", "0"], "--trials: must be an integer >= 1"),
    (["--param", "learning_rate=loguniform:1e-4:1e-2", "--parallel", "0"], "--parallel: must be an integer >= 1"),
    (["--param", "learning_rate=loguniform:1e-4:1e-2", "--metric", "eval_retrun"],
     "--metric: unknown metric 'eval_retrun' (allowed: eval_return, episode_return)"),
    ([], "--param: give at least one hyperparameter"),
]


@pytest.mark.parametrize(("args", "message"), BAD, ids=[m[:30] for _, m in BAD])
def test_bad_sweep_input_is_one_line_and_submits_nothing(tmp_path, monkeypatch, capsys, args, message) -> None:
    home = tmp_path / "home"
    monkeypatch.setenv("RLFLEET_HOME", str(home))  # an empty home: a started cluster or sweep would show here
    base = _base(tmp_path, 4096)
    argv = ["sweep", "--spec", str(base), "--trials", "4", *args] if "--trials" not in args else \
        ["sweep", "--spec", str(base), *args]
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("rlfleet: error: ") and "Traceback" not in err
    assert message in err
    assert not home.exists()  # no sweep state, no local head, no run


@pytest.mark.integration
def test_sweep_prunes_a_weak_trial_and_resumes_after_its_driver_is_killed(local_cluster, mlflow_server, tmp_path,
                                                                         monkeypatch, capsys) -> None:
    """One sweep: 3 trials, parallel 2, on a 'ray' target (the local head, as any Ray cluster) that
    names an MLflow server. The driver (a CLI process) is SIGKILLed once trials 0 and 1 run; the
    resumed driver follows their runs (never submitting them again), starts trial 2 (the weak one),
    prunes it by cancelling its run, and names the best run. Every trial logged to MLflow."""
    steps = 20_480  # ~10 PPO iterations of ~2000 env steps; the pruner may act after the first quarter
    base = _base(tmp_path, steps, slow=True, eval_episodes=3)
    local = json.loads(local_target().model_dump_json(exclude={"name", "kind", "provisioner"}))
    # its own artifact root: the local head's run supervisor announces itself in the local root, which
    # would make a 'ray' target there supervised (its runs queued); this test is about a plain cluster
    local["artifact_root"] = f"file://{tmp_path}/lab-store"
    targets = tmp_path / "targets.yaml"
    targets.write_text(yaml.safe_dump({"targets": {"lab": {**local, "kind": "ray", "tracking": {
        "mlflow_uri": mlflow_server.url, "mlflow_experiment": "sweeps"}}}}))
    monkeypatch.setenv("RLFLEET_CONFIG", str(targets))  # for this process and the driver's
    proc = subprocess.Popen(
        [RLFLEET, "sweep", "--target", "lab", "--spec", str(base), "--param", f"learning_rate=choice:{GOOD},{WEAK}",
         "--trials", "3", "--parallel", "2", "--seed", str(SEED), "--poll", "0.5"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, stdin=subprocess.DEVNULL)
    lines: list[str] = []
    try:
        assert proc.stdout is not None
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            lines.append(line)
            if line.startswith("trial 1: run ") or not line:
                break  # two trials submitted and recorded: kill the driver now
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    assert lines[-1].startswith("trial 1: run "), lines
    sweep_id = lines[0].split()[1].rstrip(":")
    before = {t.number: t.run_id for t in sweep_status(sweep_id).trials}
    assert sorted(before) == [0, 1] and all(before.values())
    assert all(t.state == "RUNNING" for t in sweep_status(sweep_id).trials)

    assert main(["sweep", "--resume", sweep_id, "--poll", "0.5"]) == 0
    out = capsys.readouterr().out
    for run_id in before.values():
        assert f"following run {run_id} again" in out
    result = sweep_status(sweep_id)
    by_number = {t.number: t for t in result.trials}
    assert {n: t.run_id for n, t in by_number.items() if n < 2} == before
    assert [by_number[n].params["learning_rate"] for n in range(3)] == [GOOD, GOOD, WEAK]
    # every trial is exactly one run on the cluster: nothing was submitted twice
    ours = [r for r in list_runs("lab") if r.metadata.get("rlfleet_name", "").startswith(sweep_id)]
    assert sorted(r.run_id for r in ours) == sorted(t.run_id for t in result.trials)

    # the weak trial was pruned: its run cancelled before its budget, no manifest
    weak = by_number[2]
    assert weak.state == "PRUNED", (weak, out)
    assert weak.last_step is not None and steps // 4 <= weak.last_step < steps
    run = get_run(weak.run_id, "lab")
    assert run.wait(timeout=300) is RunStatus.CANCELLED
    assert not run.artifacts().is_complete()
    # identical specs train identically (same seed, CPU): the good twins complete, equal
    assert by_number[0].state == by_number[1].state == "COMPLETE" and by_number[0].value == by_number[1].value
    best = result.best
    assert best is not None and best.params["learning_rate"] == GOOD and result.best_run_id == best.run_id
    assert f"best run: {best.run_id}" in out and "PRUNED" in out
    arts = get_run(best.run_id, "lab").artifacts()
    assert best.value == arts.verify().extra["final_eval"]["mean"]
    spec = json.loads(arts.read_bytes("spec.json"))
    assert spec["tags"] == {"rlfleet_sweep": sweep_id, "rlfleet_trial": str(best.number)}
    assert spec["config"] == {"learning_rate": GOOD, "eval_episodes": 3}
    assert spec["name"] == f"{sweep_id}-t{best.number}"

    # the intermediate values the pruner saw are the run's metrics rows, each at the grid point (1/20
    # of the budget) at or below its env step: runs' steps differ, the pruner compares equal steps
    grid, rows = steps // 20, {}
    for r in arts.iter_metrics():
        if "episode_return_mean" in r:  # (as the driver reports them: rows before any episode ended have none)
            rows.setdefault(r["step"] // grid * grid, r["episode_return_mean"])
    import optuna
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    state_dir = Path(os.environ["RLFLEET_HOME"]) / "sweeps" / sweep_id
    study = optuna.load_study(study_name=sweep_id,
                              storage=JournalStorage(JournalFileBackend(str(state_dir / "journal.log"))))
    assert study.trials[best.number].intermediate_values == rows and len(rows) >= 8
    # MLflow (named by the target): each finished trial logged params, every row, provenance, policy;
    # the pruned one is there too with the rows it reached, never FINISHED: KILLED when its run ends it
    # within Ray's 3 s between SIGTERM and SIGKILL, else left RUNNING (seen once in two runs here)
    for n in (0, 1):
        mr = assert_logged(mlflow_server, get_run(by_number[n].run_id, "lab").artifacts(), "sweeps", "lab")
        assert mr.data.params["learning_rate"] == str(GOOD) and mr.data.tags["rlfleet_sweep"] == sweep_id
    client, pruned = mlflow_run_of(mlflow_server, weak.run_id, "sweeps")
    assert pruned.info.status in ("KILLED", "RUNNING") and pruned.data.tags["rlfleet_trial"] == "2"
    assert client.get_metric_history(pruned.info.run_id, "episode_return_mean")
    # the state lives where the user was told, private to them
    assert str(state_dir) in lines[0] and state_dir.stat().st_mode & 0o077 == 0
    # a finished sweep resumed again is a no-op with the same answer, as JSON too
    assert main(["sweep", "--resume", sweep_id, "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["best_run_id"] == best.run_id and len(doc["trials"]) == 3
