"""Metrics out of a run: ``metrics.jsonl`` in the run's artifact dir, and Prometheus metrics
through ``ray.util.metrics`` when the run executes under Ray (``RAY_ADDRESS`` set).

file:// roots: rows are appended as they come. s3:// and gs:// have no append: the whole file
is rewritten at most every ``rewrite_every_s`` seconds and on close.

Connecting the job process to its cluster (``ray.init(address="auto")``) takes seconds, so it
happens in a background thread and never delays training; rows recorded before it is ready
still reach metrics.jsonl, and the latest values are exported once it is.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from typing import Any

from rlfleet.artifacts import RunArtifacts, _is_local

METRIC_NAMES = (
    "rlfleet_episode_return", "rlfleet_episode_length", "rlfleet_env_steps_total",
    "rlfleet_steps_per_second", "rlfleet_loss", "rlfleet_serve_requests_total",
    "rlfleet_serve_latency_seconds",
)
LATENCY_BOUNDARIES = [0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0]


class RayMetrics:
    """``ray.util.metrics`` instruments with the contract's names and labels."""

    def __init__(self, labels: dict[str, str]) -> None:
        self.labels = labels
        self.ready = threading.Event()
        self.failed: str | None = None
        self.connect_s: float | None = None
        self._m: dict[str, Any] = {}
        self._lock = threading.Lock()
        self._pending: dict[str, Any] | None = None
        if os.environ.get("RAY_ADDRESS"):
            threading.Thread(target=self._connect, name="rlfleet-ray-metrics", daemon=True).start()

    @property
    def enabled(self) -> bool:
        return bool(os.environ.get("RAY_ADDRESS"))

    def _connect(self) -> None:
        t0 = time.monotonic()
        try:
            import ray
            from ray.util import metrics as rm

            if not ray.is_initialized():
                ray.init(address="auto", logging_level=logging.WARNING, log_to_driver=False,
                         include_dashboard=False)
            keys = tuple(self.labels)
            self._m = {
                "return": rm.Gauge("rlfleet_episode_return", "Mean episode return (recent episodes)", tag_keys=keys),
                "length": rm.Gauge("rlfleet_episode_length", "Mean episode length (recent episodes)", tag_keys=keys),
                "steps": rm.Counter("rlfleet_env_steps_total", "Environment steps taken", tag_keys=keys),
                "sps": rm.Gauge("rlfleet_steps_per_second", "Environment steps per second", tag_keys=keys),
                "loss": rm.Gauge("rlfleet_loss", "Training losses", tag_keys=(*keys, "name")),
                "requests": rm.Counter("rlfleet_serve_requests_total", "Policy server requests",
                                       tag_keys=(*keys, "code")),
                "latency": rm.Histogram("rlfleet_serve_latency_seconds", "Policy server request latency",
                                        boundaries=LATENCY_BOUNDARIES, tag_keys=keys),
            }
            for m in self._m.values():
                m.set_default_tags(self.labels)
        except Exception as err:  # metrics must never break a run
            self.failed = f"{type(err).__name__}: {err}"
            return
        finally:
            self.connect_s = time.monotonic() - t0
        self.ready.set()
        with self._lock:
            pending, self._pending = self._pending, None
        if pending:
            self.record_row(pending)

    def record_row(self, row: dict[str, Any], steps_delta: int = 0) -> None:
        if not self.ready.is_set():
            with self._lock:
                if not self.ready.is_set():
                    prev = self._pending or {}
                    self._pending = {**row, "_steps": prev.get("_steps", 0) + steps_delta}
                    return
        m = self._m
        steps_delta += int(row.pop("_steps", 0)) if "_steps" in row else 0
        if "episode_return_mean" in row:
            m["return"].set(float(row["episode_return_mean"]))
        if "episode_length_mean" in row:
            m["length"].set(float(row["episode_length_mean"]))
        if steps_delta > 0:
            m["steps"].inc(steps_delta)
        if "steps_per_second" in row:
            m["sps"].set(float(row["steps_per_second"]))
        for name, v in (row.get("losses") or {}).items():
            m["loss"].set(float(v), tags={"name": name})

    def record_request(self, latency_s: float, code: int) -> None:
        if self.ready.is_set():
            self._m["requests"].inc(1, tags={"code": str(code)})
            self._m["latency"].observe(latency_s)

    def wait_ready(self, timeout: float) -> bool:
        return self.ready.wait(timeout) if self.enabled else False


class MetricsWriter:
    """Streams rows to metrics.jsonl and Ray metrics."""

    def __init__(self, arts: RunArtifacts, labels: dict[str, str], *, rewrite_every_s: float = 5.0) -> None:
        self.arts = arts
        self.rows: list[str] = []
        self.rewrite_every_s = rewrite_every_s
        self._last_write = 0.0
        self._dirty = False
        self._last_step = 0
        self._local_path: str | None = None
        if _is_local(arts.store.fs):
            self._local_path = arts._p("metrics.jsonl")
            os.makedirs(os.path.dirname(self._local_path), exist_ok=True)
            open(self._local_path, "a").close()
        self.ray = RayMetrics(labels)

    def set_start_step(self, step: int) -> None:
        self._last_step = step

    def write(self, row: dict[str, Any]) -> None:
        line = json.dumps(row, sort_keys=True, allow_nan=False, default=float)
        self.rows.append(line)
        if self._local_path is not None:
            with open(self._local_path, "a") as f:
                f.write(line + "\n")
        else:
            self._dirty = True
            if time.monotonic() - self._last_write >= self.rewrite_every_s:
                self.flush()
        step = int(row.get("step", self._last_step))
        self.ray.record_row(dict(row), steps_delta=max(0, step - self._last_step))
        self._last_step = max(step, self._last_step)

    def flush(self) -> None:
        if self._local_path is None and (self._dirty or not self._last_write):
            self.arts.write_text("metrics.jsonl", "".join(r + "\n" for r in self.rows))
            self._dirty = False
            self._last_write = time.monotonic()

    def close(self) -> None:
        self.flush()
        linger = float(os.environ.get("RLFLEET_METRICS_LINGER_S", "0") or 0)
        if linger > 0 and self.ray.enabled:
            # let Prometheus scrape the final values before the process exits
            self.ray.wait_ready(min(30.0, linger + 10))
            time.sleep(linger)
