"""Hyperparameter sweeps: many ordinary train runs, weak ones stopped early, resumable.

    from rlfleet.sweeps import sweep
    result = sweep("base.yaml", ["learning_rate=loguniform:1e-4:1e-2", "update_epochs=choice:4,8"],
                   trials=16, parallel=2, metric="eval_return")
    result.best_run_id

Each trial is a train run submitted with :func:`rlfleet.runs.submit_run` to the sweep's target,
with its own artifacts; the driver (this process) only calls ``submit_run``, ``Run.status``,
``Run.cancel`` and reads ``metrics.jsonl`` / ``manifest.json`` through the artifact store, so a
sweep works on every target. Sampling and early stopping are Optuna's (TPE sampler, median
pruner by default): every new metrics row of a trial's run is reported as an intermediate value
at its env step, and a trial the pruner calls weak has its run cancelled.

The sweep's state is an Optuna journal (``journal.log``) plus its definition (``sweep.json``) in
``$RLFLEET_HOME/sweeps/<sweep_id>/`` on the submitting machine; each trial records its run id
there as soon as the run is submitted. If the driver dies, :func:`resume_sweep` (``rlfleet sweep
--resume SWEEP_ID``) re-attaches to the runs still going and submits the trials not yet started;
no run is submitted twice. One driver at a time: a second one is refused while the first lives.

Optuna is imported only when a sweep runs (the ``sweep`` extra: ``pip install 'rlfleet[sweep]'``).
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rlfleet.agent_catalog import config_schema
from rlfleet.agent_config import validate_agent_config
from rlfleet.errors import RlfleetError, RunNotFound, SpecError
from rlfleet.paths import rlfleet_home
from rlfleet.spec import Kind, RunSpec
from rlfleet.targets import Target, get_target

if TYPE_CHECKING:
    from rlfleet.runs import Run

SWEEP_TAG = "rlfleet_sweep"
TRIAL_TAG = "rlfleet_trial"
PRUNERS = ("median", "none")
DISTRIBUTIONS = ("loguniform", "uniform", "int", "choice")


@dataclass(frozen=True)
class Metric:
    """What a sweep optimizes (always maximized): the intermediate value of each metrics row and the
    final value of a finished run."""

    name: str
    description: str

    def row_key(self, base: RunSpec) -> str:
        if self.name == "eval_return" and base.config.get("eval_every"):
            return "eval_return_mean"  # the in-training evaluations
        return "episode_return_mean"

    def final(self, extra: Mapping[str, Any], rows: list[dict[str, Any]], base: RunSpec) -> float | None:
        if self.name == "eval_return":
            fe = extra.get("final_eval") or {}
            return float(fe["mean"]) if isinstance(fe.get("mean"), (int, float)) else None
        vals = [r[self.row_key(base)] for r in rows if isinstance(r.get(self.row_key(base)), (int, float))]
        return float(vals[-1]) if vals else None


METRICS = {
    "eval_return": Metric("eval_return", "mean return of the run's final evaluation (manifest final_eval.mean); "
                                         "intermediate: in-training evaluations with config eval_every, else the "
                                         "training episodes' mean return"),
    "episode_return": Metric("episode_return", "mean return of the recent training episodes (episode_return_mean)"),
}


# -- the search space ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Param:
    """One searched hyperparameter: ``name=loguniform:LO:HI | uniform:LO:HI | int:LO:HI | choice:A,B,...``."""

    name: str
    dist: str
    low: float | int | None = None
    high: float | int | None = None
    choices: tuple[Any, ...] = ()
    text: str = ""

    def suggest(self, trial: Any) -> Any:
        if self.dist == "choice":
            return trial.suggest_categorical(self.name, list(self.choices))
        if self.dist == "int":
            return trial.suggest_int(self.name, int(self.low), int(self.high))  # type: ignore[arg-type]
        return trial.suggest_float(self.name, float(self.low), float(self.high),  # type: ignore[arg-type]
                                   log=self.dist == "loguniform")


def _number(raw: str, as_int: bool, where: str) -> float | int:
    try:
        value: float | int = int(raw) if as_int else float(raw)
    except ValueError:
        raise SpecError(f"{where}: {raw!r} is not {'an integer' if as_int else 'a number'}") from None
    if not math.isfinite(value):
        raise SpecError(f"{where}: {raw!r} is not a finite number")
    return value


def parse_param(text: str, agent: str) -> Param:
    """Parse and check one ``--param`` against ``agent``'s hyperparameter schema; SpecError names it."""
    name, sep, rest = text.partition("=")
    name = name.strip()
    where = f"--param {text!r}"
    if not sep or not name:
        raise SpecError(f"{where}: give NAME=DIST:ARGS, e.g. learning_rate=loguniform:1e-4:1e-2 "
                        f"(DIST: {', '.join(DISTRIBUTIONS)})")
    schema = config_schema(agent)
    if schema is None:
        raise SpecError(f"--param {name}: the {agent!r} agent has no hyperparameters to sweep")
    if name not in schema["properties"]:
        try:  # the agent's own message: a close match and the allowed names
            validate_agent_config(agent, {name: None})
        except ValueError as err:
            raise SpecError(f"--param {str(err).removeprefix('config.')}") from None
    dist, _, args = rest.partition(":")
    if dist not in DISTRIBUTIONS:
        raise SpecError(f"{where}: unknown distribution {dist!r} (allowed: {', '.join(DISTRIBUTIONS)}; "
                        "e.g. loguniform:1e-4:1e-2, int:1:8, choice:4,8)")
    if dist == "choice":
        items = [s.strip() for s in args.split(",")]
        if not args or any(not s for s in items):
            raise SpecError(f"{where}: choice needs a comma-separated list of values, e.g. choice:4,8")
        choices = tuple(_json_or_text(s) for s in items)
        if len(set(map(json.dumps, choices))) != len(choices):
            raise SpecError(f"{where}: choice lists a value twice")
        param = Param(name, dist, choices=choices, text=text)
        values: list[Any] = list(choices)
    else:
        bounds = args.split(":")
        if len(bounds) != 2:
            raise SpecError(f"{where}: {dist} needs LOW:HIGH, e.g. {name}={dist}:"
                            f"{'1:8' if dist == 'int' else '1e-4:1e-2'}")
        low, high = (_number(b, dist == "int", where) for b in bounds)
        if not low < high:
            raise SpecError(f"{where}: LOW must be below HIGH (got {low} and {high})")
        if dist == "loguniform" and low <= 0:
            raise SpecError(f"{where}: loguniform needs LOW > 0 (got {low})")
        param = Param(name, dist, low=low, high=high, text=text)
        values = [low, high]
    for v in values:  # every value the sweep may try must be one the agent accepts
        try:
            validate_agent_config(agent, {name: v})
        except ValueError as err:
            raise SpecError(f"--param {name}: {dist} value {v!r} is not accepted: {err}") from None
    return param


def _json_or_text(raw: str) -> Any:
    try:
        return json.loads(raw)
    except json.JSONDecodeError:
        return raw


def parse_params(params: Sequence[str] | Mapping[str, str], agent: str) -> list[Param]:
    texts = [f"{k}={v}" for k, v in params.items()] if isinstance(params, Mapping) else list(params)
    if not texts:
        raise SpecError("--param: give at least one hyperparameter to search, e.g. "
                        "--param learning_rate=loguniform:1e-4:1e-2")
    out = [parse_param(t, agent) for t in texts]
    names = [p.name for p in out]
    dup = next((n for n in names if names.count(n) > 1), None)
    if dup:
        raise SpecError(f"--param {dup}: given twice; give each hyperparameter once")
    return out


# -- the sweep's definition and state ------------------------------------------------------------


def _optuna() -> Any:
    """Optuna (the ``sweep`` extra), imported when a sweep runs; quiet unless it warns."""
    try:
        import optuna
    except ImportError:
        raise RlfleetError("sweeps need Optuna, which is not installed here: pip install 'rlfleet[sweep]'") from None
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return optuna


def sweeps_dir() -> Path:
    return rlfleet_home() / "sweeps"


def new_sweep_id() -> str:
    """``sw-YYYYmmdd-HHMMSS-xxxxxx``, like a run id."""
    from rlfleet.runs import new_run_id

    return "sw-" + new_run_id().removeprefix("rl-")


@dataclass(frozen=True)
class SweepDef:
    sweep_id: str
    target: str
    base: RunSpec
    params: list[Param]
    trials: int
    parallel: int
    metric: Metric
    pruner: str
    seed: int | None

    @property
    def state_dir(self) -> Path:
        return sweeps_dir() / self.sweep_id

    def to_dict(self) -> dict[str, Any]:
        return {"sweep_id": self.sweep_id, "target": self.target, "base": self.base.to_dict(),
                "params": [p.text for p in self.params], "trials": self.trials, "parallel": self.parallel,
                "metric": self.metric.name, "pruner": self.pruner, "seed": self.seed}

    @classmethod
    def load(cls, sweep_id: str) -> SweepDef:
        path = sweeps_dir() / sweep_id / "sweep.json"
        if "/" in sweep_id or not path.is_file():
            raise SpecError(f"--resume: no sweep {sweep_id!r} under {sweeps_dir()} (sweeps are resumed on the "
                            "machine that started them; check the id the sweep printed)")
        d = json.loads(path.read_text())
        base = RunSpec.from_dict(d["base"])
        return cls(d["sweep_id"], d["target"], base, parse_params(d["params"], base.agent), d["trials"],
                   d["parallel"], METRICS[d["metric"]], d["pruner"], d["seed"])


def define_sweep(spec: RunSpec | str | Path, params: Sequence[str] | Mapping[str, str], *, trials: int,
                 parallel: int = 1, metric: str = "eval_return", target: str | Target | None = None,
                 pruner: str = "median", seed: int | None = None) -> SweepDef:
    """Check everything a sweep is given; SpecError (one line) before anything is written or submitted."""
    base = spec if isinstance(spec, RunSpec) else RunSpec.from_file(spec)
    if base.kind is not Kind.TRAIN:
        raise SpecError(f"--spec: a sweep runs train runs; the spec describes a {base.kind.value} run")
    if isinstance(trials, bool) or not isinstance(trials, int) or trials < 1:
        raise SpecError(f"--trials: must be an integer >= 1, got {trials!r}")
    if isinstance(parallel, bool) or not isinstance(parallel, int) or parallel < 1:
        raise SpecError(f"--parallel: must be an integer >= 1, got {parallel!r}")
    if metric not in METRICS:
        raise SpecError(f"--metric: unknown metric {metric!r} (allowed: {', '.join(METRICS)})")
    if pruner not in PRUNERS:
        raise SpecError(f"--pruner: unknown pruner {pruner!r} (allowed: {', '.join(PRUNERS)})")
    if config_schema(base.agent) is None:
        raise SpecError(f"--spec: the {base.agent!r} agent has no hyperparameters to sweep")
    parsed = parse_params(params, base.agent)
    tgt = get_target(target)
    _optuna()
    return SweepDef(new_sweep_id(), tgt.name, base, parsed, trials, parallel, METRICS[metric], pruner, seed)


# -- results -------------------------------------------------------------------------------------


@dataclass
class TrialResult:
    number: int
    state: str  # COMPLETE | PRUNED | FAIL | RUNNING
    run_id: str | None
    params: dict[str, Any]
    value: float | None
    last_step: int | None
    note: str = ""


@dataclass
class SweepResult:
    sweep_id: str
    state_dir: str
    target: str
    metric: str
    trials: list[TrialResult] = field(default_factory=list)

    @property
    def best(self) -> TrialResult | None:
        done = [t for t in self.trials if t.state == "COMPLETE" and t.value is not None]
        return max(done, key=lambda t: t.value) if done else None  # type: ignore[arg-type,return-value]

    @property
    def best_run_id(self) -> str | None:
        return self.best.run_id if self.best else None

    def to_dict(self) -> dict[str, Any]:
        best = self.best
        return {"sweep_id": self.sweep_id, "state_dir": self.state_dir, "target": self.target, "metric": self.metric,
                "best_run_id": self.best_run_id, "best_value": best.value if best else None,
                "best_params": best.params if best else None,
                "trials": [t.__dict__ for t in self.trials]}


# -- the driver ----------------------------------------------------------------------------------

REPORTS_PER_TRIAL = 20


def report_grid(base: RunSpec) -> int:
    """Env steps between two intermediate values of a trial. A run's rows come at env steps that
    differ from run to run (episode ends are not steps), and the pruner compares trials at equal
    steps: each row is reported at the grid point at or below its step (the first row there wins),
    on a grid of 1/20 of the step budget."""
    budget = base.budget.steps or base.config.get("total_steps") or 100_000
    return max(1, int(budget) // REPORTS_PER_TRIAL)



Event = Callable[[str], None]


@contextmanager
def _driver_lock(state_dir: Path) -> Iterator[None]:
    import fcntl

    fd = os.open(state_dir / "driver.lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise RlfleetError(f"sweep {state_dir.name} is being driven by another process; wait for it or stop "
                               "it before resuming") from None
        yield
    finally:
        os.close(fd)


class _Driver:
    def __init__(self, sd: SweepDef, target: Target, on_event: Event | None, poll: float) -> None:
        optuna = _optuna()
        from optuna.storages import JournalStorage
        from optuna.storages.journal import JournalFileBackend

        self.sd, self.target, self.poll = sd, target, poll
        self.say: Event = on_event or (lambda _msg: None)
        self.optuna = optuna
        storage = JournalStorage(JournalFileBackend(str(sd.state_dir / "journal.log")))
        steps = sd.base.budget.steps
        pruner: Any = optuna.pruners.NopPruner() if sd.pruner == "none" else optuna.pruners.MedianPruner(
            n_startup_trials=min(5, max(1, sd.trials // 4)), n_warmup_steps=steps // 4 if steps else 0)
        self.study = optuna.create_study(study_name=sd.sweep_id, storage=storage, direction="maximize",
                                         pruner=pruner, load_if_exists=True)
        # a resumed driver draws on from where the last one stopped, not the first trials' values again
        done = len(self.study.get_trials(deepcopy=False))
        self.study.sampler = optuna.samplers.TPESampler(seed=None if sd.seed is None else sd.seed + done)
        self.runs: dict[int, Run] = {}  # trial number -> its run, for the trials still going
        self.handles: dict[int, Any] = {}  # trial number -> optuna Trial (to report and prune)
        self.seen: dict[int, set[int]] = {}  # trial number -> the steps already reported
        self.rows_key = sd.metric.row_key(sd.base)
        self.grid = report_grid(sd.base)

    # trials -------------------------------------------------------------------------------------
    def _started(self) -> int:
        return sum(1 for t in self.study.get_trials(deepcopy=False) if not t.user_attrs.get("not_submitted"))

    def _reattach(self) -> None:
        """Trials the last driver left RUNNING: follow their runs again (never submit them twice)."""
        from rlfleet.runs import Run, list_runs

        TrialState = self.optuna.trial.TrialState
        for ft in self.study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            run_id = ft.user_attrs.get("run_id")
            if run_id is None:  # killed between asking and recording: was the run submitted?
                name = ft.user_attrs.get("run_name")
                match = [r for r in list_runs(self.target) if r.metadata.get("rlfleet_name") == name]
                trial = self.optuna.trial.Trial(self.study, ft._trial_id)
                if not match:
                    trial.set_user_attr("not_submitted", True)
                    self.study.tell(trial, state=TrialState.FAIL)
                    continue
                run_id = match[0].run_id
                trial.set_user_attr("run_id", run_id)
            self.handles[ft.number] = self.optuna.trial.Trial(self.study, ft._trial_id)
            self.seen[ft.number] = set(ft.intermediate_values)
            self.runs[ft.number] = Run(run_id, self.target)
            self.say(f"trial {ft.number}: following run {run_id} again")

    def _submit_next(self) -> None:
        from rlfleet.runs import submit_run

        trial = self.study.ask()
        values = {p.name: p.suggest(trial) for p in self.sd.params}
        name = f"{self.sd.sweep_id}-t{trial.number}"
        trial.set_user_attr("run_name", name)
        spec = self.sd.base.with_changes(
            name=name, config={**self.sd.base.config, **values},
            tags={**self.sd.base.tags, SWEEP_TAG: self.sd.sweep_id, TRIAL_TAG: str(trial.number)})
        try:
            run = submit_run(spec, self.target)
        except BaseException:
            trial.set_user_attr("not_submitted", True)
            self.study.tell(trial, state=self.optuna.trial.TrialState.FAIL)
            raise
        trial.set_user_attr("run_id", run.run_id)
        self.handles[trial.number], self.runs[trial.number] = trial, run
        self.seen[trial.number] = set()
        self.say(f"trial {trial.number}: run {run.run_id} {_fmt_params(values)}")

    def _rows(self, run: Run) -> list[dict[str, Any]]:
        try:
            return run.metrics()
        except RlfleetError:
            return []

    def _report(self, number: int, rows: list[dict[str, Any]]) -> bool:
        """Report new rows; True when the pruner calls the trial weak."""
        trial, seen = self.handles[number], self.seen[number]
        for row in rows:
            value, step = row.get(self.rows_key), row.get("step")
            if not isinstance(value, (int, float)) or not isinstance(step, int):
                continue
            step = step // self.grid * self.grid  # the trials' steps, aligned for the pruner's comparisons
            if step in seen:
                continue
            trial.report(float(value), step)
            seen.add(step)
            if trial.should_prune():
                return True
        return False

    def _check(self, number: int) -> None:
        from rlfleet.runs import RunStatus

        TrialState = self.optuna.trial.TrialState
        run, trial = self.runs[number], self.handles[number]
        try:
            status = run.status()
        except RunNotFound:
            trial.set_user_attr("note", "the cluster no longer knows its run")
            self._end(number, TrialState.FAIL)
            return
        rows = self._rows(run)
        if status is not RunStatus.SUCCEEDED and self._report(number, rows):
            run.cancel()
            trial.set_user_attr("note", f"pruned at step {max(self.seen[number])}")
            self._end(number, TrialState.PRUNED)
            return
        if status is RunStatus.SUCCEEDED:
            self._report(number, rows)  # the last rows, never pruned: the run is done
            extra = run.artifacts().manifest().extra
            value = self.sd.metric.final(extra, rows, self.sd.base)
            if value is None:
                trial.set_user_attr("note", f"the run reported no {self.sd.metric.name}")
                self._end(number, TrialState.FAIL)
            else:
                self._end(number, TrialState.COMPLETE, value)
        elif status.is_terminal():
            trial.set_user_attr("note", f"run ended {status.value}: {run.failure_reason()}"[:300])
            self._end(number, TrialState.FAIL)

    def _end(self, number: int, state: Any, value: float | None = None) -> None:
        self.study.tell(self.handles[number], value, state=state)
        run = self.runs.pop(number)
        self.handles.pop(number)
        self.seen.pop(number)
        self.say(f"trial {number}: {state.name}" + (f" {self.sd.metric.name}={value:.4g}" if value is not None
                                                    else "") + f" (run {run.run_id})")

    def drive(self, timeout: float | None) -> SweepResult:
        deadline = None if timeout is None else time.monotonic() + timeout
        self._reattach()
        while True:
            while len(self.runs) < self.sd.parallel and self._started() < self.sd.trials:
                self._submit_next()
            if not self.runs:
                break
            for number in sorted(self.runs):
                self._check(number)
            if deadline is not None and time.monotonic() > deadline and self.runs:
                raise TimeoutError(f"sweep {self.sd.sweep_id} still has {len(self.runs)} trial(s) running after "
                                   f"{timeout} s; resume it with 'rlfleet sweep --resume {self.sd.sweep_id}'")
            if self.runs:
                time.sleep(self.poll)
        return result_of(self.sd, self.study)


def _fmt_params(values: Mapping[str, Any]) -> str:
    return " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in values.items())


def result_of(sd: SweepDef, study: Any) -> SweepResult:
    out = SweepResult(sd.sweep_id, str(sd.state_dir), sd.target, sd.metric.name)
    for t in study.get_trials(deepcopy=False):
        if t.user_attrs.get("not_submitted"):
            continue
        steps = list(t.intermediate_values)
        out.trials.append(TrialResult(t.number, t.state.name, t.user_attrs.get("run_id"), dict(t.params), t.value,
                                      max(steps) if steps else None, t.user_attrs.get("note", "")))
    return out


def _drive(sd: SweepDef, target: str | Target | None, on_event: Event | None, poll: float,
           timeout: float | None) -> SweepResult:
    tgt = get_target(target if target is not None else sd.target)
    with _driver_lock(sd.state_dir):
        return _Driver(sd, tgt, on_event, poll).drive(timeout)


def sweep(spec: RunSpec | str | Path, params: Sequence[str] | Mapping[str, str], *, trials: int, parallel: int = 1,
          metric: str = "eval_return", target: str | Target | None = None, pruner: str = "median",
          seed: int | None = None, on_event: Event | None = None, poll: float = 2.0,
          timeout: float | None = None) -> SweepResult:
    """Run a sweep of ``trials`` train runs (``parallel`` at a time) over ``params`` on ``target``;
    block until every trial has ended. Bad input raises SpecError before anything is submitted."""
    sd = define_sweep(spec, params, trials=trials, parallel=parallel, metric=metric, target=target,
                      pruner=pruner, seed=seed)
    start_sweep(sd)
    if on_event:
        on_event(f"sweep {sd.sweep_id}: state in {sd.state_dir} (resume: rlfleet sweep --resume {sd.sweep_id})")
    return _drive(sd, target, on_event, poll, timeout)


def start_sweep(sd: SweepDef) -> None:
    """Write the sweep's definition (its state directory is private to the user)."""
    sd.state_dir.mkdir(parents=True, mode=0o700, exist_ok=False)
    (sd.state_dir / "sweep.json").write_text(json.dumps(sd.to_dict(), indent=2, sort_keys=True))


def resume_sweep(sweep_id: str, *, target: str | Target | None = None, on_event: Event | None = None,
                 poll: float = 2.0, timeout: float | None = None) -> SweepResult:
    """Continue sweep ``sweep_id`` after its driver died: follow its running trials' runs, start the rest."""
    return _drive(SweepDef.load(sweep_id), target, on_event, poll, timeout)


def sweep_status(sweep_id: str) -> SweepResult:
    """The sweep's trials as its state records them (no cluster needed)."""
    sd = SweepDef.load(sweep_id)
    optuna = _optuna()
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    study = optuna.load_study(study_name=sweep_id,
                              storage=JournalStorage(JournalFileBackend(str(sd.state_dir / "journal.log"))))
    return result_of(sd, study)
