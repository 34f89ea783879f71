"""MLflow tracking (issue 14 part 4b): which server a run logs to, bad tracking input, a dead server
and the token. The round trip to a REAL MLflow server (params, metrics per step, provenance tags,
the ONNX policy) is checked on the sweep's trials, which log to it through their target
(tests/sdk/test_sweeps.py, tests/tracking_server.py: one run less in CI)."""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import time
from pathlib import Path

import pytest
from tracking_server import free_port, mlflow_run_of

from rlfleet import RunSpec
from rlfleet.errors import ConfigError, SpecError
from rlfleet.targets import load_targets
from rlfleet.tracking import Tracking, effective_tracking

PPO = {"kind": "train", "agent": "ppo", "env": "CartPole-v1", "seed": 5, "budget": {"steps": 6144},
       "resources": {"cpus": 1}, "config": {"learning_rate": 0.002}, "tags": {"team": "rl"}}


def test_a_dead_server_never_fails_the_run_and_the_token_stays_out_of_the_logs(monkeypatch, capsys) -> None:
    """A tracking server that does not answer costs the run its MLflow log, not its result: one warning
    line, the error in the manifest record, every later call a no-op. MLFLOW_TRACKING_TOKEN from the
    node's environment (MLflow sends it as a header) is in no message."""
    from rlfleet_agents.mlflowlog import MlflowLog

    token = "mlflow-token-" + hashlib.sha256(os.urandom(8)).hexdigest()[:16]
    monkeypatch.setenv("MLFLOW_TRACKING_TOKEN", token)
    dead = f"http://127.0.0.1:{free_port()}"
    t0 = time.monotonic()
    log = MlflowLog(Tracking(mlflow_uri=dead), {"learning_rate": 0.002}, {"rlfleet.run_id": "rl-x"})
    log.write({"step": 2048, "episode_return_mean": 20.0, "losses": {"loss_value": 1.5}})
    record = log.close(20.0, 2048, b"onnx bytes")
    log.end("FAILED")
    assert time.monotonic() - t0 < 30  # MLflow's own retries would take minutes
    assert record == {"tracking_uri": dead, "experiment_id": None, "run_id": None, "error": log.error}
    assert log.error is not None and "Connection" in log.error and token not in log.error
    out = capsys.readouterr()
    assert token not in out.out + out.err
    assert out.err.count("\n") == 1 and out.err.startswith(f"rlfleet: warning: MLflow logging to {dead} stopped: ")


def test_close_leaves_the_mlflow_run_open_until_the_commit(mlflow_server) -> None:
    """close() sends the rows, the final return and the policy but not the end: the entrypoint ends
    the MLflow run FINISHED after the rlfleet run's commit, so a stop that lands in between (a
    sweep's pruned trial, once) leaves it KILLED, never FINISHED beside a run with no manifest."""
    from rlfleet_agents.mlflowlog import MlflowLog

    # the server's own store, from this process (the server listens in the local cluster's namespace)
    tracking = Tracking.model_construct(mlflow_uri=mlflow_server.store_uri, mlflow_experiment="close-contract")
    log = MlflowLog(tracking, {"learning_rate": 0.002}, {"rlfleet.run_id": "rl-close"})
    log.write({"step": 2048, "episode_return_mean": 20.0})
    assert log.close(20.0, 2048, None)["error"] is None
    client, run = mlflow_run_of(mlflow_server, "rl-close", "close-contract")
    assert run.info.status == "RUNNING"
    log.end("KILLED")  # what the entrypoint's finally does for a stopped run
    assert client.get_run(run.info.run_id).info.status == "KILLED"


def test_spec_tracking_wins_and_bad_tracking_is_one_line() -> None:
    spec_t, tgt_t = Tracking(mlflow_uri="http://mlflow.example:5000"), Tracking(mlflow_uri="https://t.example")
    assert effective_tracking(spec_t, tgt_t) is spec_t
    assert effective_tracking(Tracking(), tgt_t) is tgt_t
    assert effective_tracking(Tracking(), None) is None
    # a URL with credentials is refused without echoing them
    with pytest.raises(SpecError) as err:
        RunSpec(**PPO, tracking={"mlflow_uri": "https://alice:s3cret@mlflow.example"})
    assert "tracking: mlflow_uri must not carry credentials" in str(err.value) and "s3cret" not in str(err.value)
    with pytest.raises(SpecError, match=r"tracking: mlflow_uri must be the http\(s\)://host:port URL"):
        RunSpec(**PPO, tracking={"mlflow_uri": "file:///tmp/mlruns"})
    with pytest.raises(SpecError, match=r"tracking\.mlflow_experiment"):
        RunSpec(**PPO, tracking={"mlflow_uri": "http://m:5000", "mlflow_experiment": ""})
    # a token in the target's env_vars would show in Ray's job listing; a target's tracking block is read
    targets = Path(tempfile.mkdtemp()) / "targets.yaml"
    fields = {"kind": "onprem", "ray_address": "https://10.0.0.5:8265", "token_source": "env:RAY_TOKEN",
              "artifact_root": "file:///mnt/nas/rlfleet"}
    targets.write_text(json.dumps({"targets": {"lab": {**fields, "tracking": {"mlflow_uri": "http://10.0.0.9:5000"}}}}))
    assert load_targets(targets)["lab"].tracking == Tracking(mlflow_uri="http://10.0.0.9:5000")
    targets.write_text(json.dumps({"targets": {"lab": {**fields, "env_vars": {"MLFLOW_TRACKING_TOKEN": "x"}}}}))
    with pytest.raises(ConfigError, match="env_vars: MLFLOW_TRACKING_TOKEN is a credential"):
        load_targets(targets)


def test_mlflow_and_optuna_load_only_when_used() -> None:
    """The run entrypoint imports no MLflow (only a run that names a server does), and neither the
    CLI's sweep command nor the sweeps module imports Optuna before a sweep runs."""
    import subprocess
    import sys

    code = ("import sys, rlfleet_agents.run, rlfleet.sweeps, rlfleet.cli.sweeps; "
            "print(sorted(m for m in ('mlflow', 'optuna') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
