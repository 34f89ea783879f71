"""A train run's MLflow log, when its envelope names a tracking server (``rlfleet.tracking``).

One MLflow run per rlfleet run, in the experiment the tracking block names: params are the
agent's resolved hyperparameters plus agent/env/seed/total_steps (the same set as TensorBoard's
hparams); metrics are every numeric field of every metrics.jsonl row at its ``step`` (the
scalars TensorBoard gets, ``losses/<name>`` included) and ``final_eval/mean``; tags are the
rlfleet run id, target, kit version, code and packages hashes (the manifest's provenance), the
run's label and the spec's own tags; ``policy.onnx`` is an artifact (``policy/policy.onnx``).

Written through ``mlflow.tracking.MlflowClient`` (the ``mlflow-skinny`` package: the client
without the server) with an explicit tracking URI, never process-global state. Rows are sent in
batches, at most every ``FLUSH_S`` seconds, so a distant server does not slow training. A tracking
server that fails is never fatal to the run: the error is one line on stderr and in the manifest
(``extra.mlflow.error``), and logging stops. Credentials come only from the node's environment
(``MLFLOW_TRACKING_TOKEN`` ...), which MLflow reads itself; nothing here prints or stores them.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from typing import Any

from rlfleet.tracking import Tracking
from rlfleet_agents.tblog import FINAL_TAG, scalars

FLUSH_S = 5.0
MAX_BATCH = 1000  # MLflow's limit of metrics per log_batch call
# a tracking server that does not answer must not hold a run for minutes (MLflow's defaults: 7
# retries with exponential backoff, 120 s timeout); the node's own settings win
_HTTP_DEFAULTS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
                  "MLFLOW_HTTP_REQUEST_TIMEOUT": "20"}


def _param(value: Any) -> str:
    import json

    return value if isinstance(value, str) else json.dumps(value, sort_keys=True)


class MlflowLog:
    def __init__(self, tracking: Tracking, params: dict[str, Any], tags: dict[str, str]) -> None:
        self.tracking = tracking
        self.run_id: str | None = None
        self.experiment_id: str | None = None
        self.error: str | None = None
        self._pending: list[Any] = []
        self._last_flush = time.monotonic()
        try:
            for k, v in _HTTP_DEFAULTS.items():
                os.environ.setdefault(k, v)
            from mlflow.entities import Param
            from mlflow.tracking import MlflowClient

            self.client = MlflowClient(tracking_uri=tracking.mlflow_uri)
            self.experiment_id = self._experiment(tracking.mlflow_experiment)
            run = self.client.create_run(self.experiment_id, tags=tags, run_name=tags.get("mlflow.runName"))
            self.run_id = run.info.run_id
            items = [Param(k, _param(v)) for k, v in sorted(params.items())]
            for i in range(0, len(items), 100):  # MLflow's limit of params per batch
                self.client.log_batch(self.run_id, params=items[i:i + 100])
        except Exception as err:
            self._failed(err)

    def _experiment(self, name: str) -> str:
        """The experiment's id, creating it if missing; runs that start together (a sweep's parallel
        trials) may both try: the loser takes the winner's."""
        from mlflow.exceptions import MlflowException

        exp = self.client.get_experiment_by_name(name)
        if exp is not None:
            return str(exp.experiment_id)
        try:
            return str(self.client.create_experiment(name))
        except MlflowException:  # RESOURCE_ALREADY_EXISTS: another run created it meanwhile
            exp = self.client.get_experiment_by_name(name)
            if exp is None:
                raise
            return str(exp.experiment_id)

    @property
    def active(self) -> bool:
        return self.run_id is not None and self.error is None

    def _failed(self, err: BaseException) -> None:
        self.error = f"{type(err).__name__}: {' '.join(str(err).split())}"[:500]
        print(f"rlfleet: warning: MLflow logging to {self.tracking.mlflow_uri} stopped: {self.error}",
              file=sys.stderr, flush=True)

    def write(self, row: dict[str, Any]) -> None:
        if not self.active:
            return
        from mlflow.entities import Metric

        ts, step = int(time.time() * 1000), int(row["step"])
        self._pending.extend(Metric(k, v, ts, step) for k, v in scalars(row).items())
        if time.monotonic() - self._last_flush >= FLUSH_S:
            self.flush()

    def flush(self) -> None:
        self._last_flush = time.monotonic()
        if not self.active or not self._pending:
            return
        try:
            while self._pending:
                batch, self._pending = self._pending[:MAX_BATCH], self._pending[MAX_BATCH:]
                self.client.log_batch(self.run_id, metrics=batch)  # type: ignore[arg-type]
        except Exception as err:
            self._failed(err)

    def close(self, final_mean: float, step: int, onnx_bytes: bytes | None) -> dict[str, Any]:
        """Send the last rows, the final return and the policy. Returns what the manifest records
        (``extra.mlflow``). The MLflow run stays RUNNING: the entrypoint ends it FINISHED only after
        the rlfleet run's commit, so a run stopped in between ends KILLED, never FINISHED."""
        from mlflow.entities import Metric

        self._pending.append(Metric(FINAL_TAG, float(final_mean), int(time.time() * 1000), int(step)))
        self.flush()
        if self.active and onnx_bytes is not None and self.tracking.log_policy:
            try:
                with tempfile.TemporaryDirectory(prefix="rlfleet-mlflow-") as tmp:
                    path = os.path.join(tmp, "policy.onnx")
                    with open(path, "wb") as f:
                        f.write(onnx_bytes)
                    self.client.log_artifact(self.run_id, path, artifact_path="policy")
            except Exception as err:
                self._failed(err)
        return self.record()

    def end(self, status: str) -> None:
        if self.run_id is None or getattr(self, "_ended", False):
            return
        self._ended = True
        try:
            self.flush()
            self.client.set_terminated(self.run_id, status=status)
        except Exception as err:
            if self.error is None:
                self._failed(err)

    def record(self) -> dict[str, Any]:
        return {"tracking_uri": self.tracking.mlflow_uri, "experiment_id": self.experiment_id,
                "run_id": self.run_id, "error": self.error}
