"""Metrics out of a run: rows in the run's artifact dir, and Prometheus metrics through
``ray.util.metrics`` when the run executes under Ray (``RAY_ADDRESS`` set).

Rows never wait for the store: :meth:`MetricsWriter.write` only appends to memory. A background
thread appends the new rows every ``flush_every_s`` as an immutable segment
``metrics/<first>-<last>.jsonl`` (every store, file:// included: no object is ever rewritten),
merges every ``fanout`` segments of one size into one larger segment (so a long run keeps a few
dozen objects, not thousands), and retries with backoff while the store fails, keeping the rows
in memory. ``close()`` writes every row to ``metrics.jsonl`` and then drops the segments; the
run's manifest comes after it. A store error in metrics is never fatal to the run.

Connecting the job process to its cluster (``ray.init(address="auto")``) takes seconds, so it
happens in a background thread and never delays training; rows recorded before it is ready
still reach the store, and the latest values are exported once it is. A writer may defer the
connection (``ray_connect_after_s``; the random baseline: METRICS_CONNECT_AFTER_S): a run that
ends sooner never imports ray nor registers with the cluster. Ray exports a process's metrics every
10 s, so such a run exported nothing before either; ``RLFLEET_METRICS_LINGER_S`` (keep the process
for scrapes) connects at once.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import threading
import time
from typing import Any

from rlfleet.artifacts import METRICS, METRICS_DIR, RunArtifacts, metrics_segment

METRIC_NAMES = (
    "rlfleet_episode_return", "rlfleet_episode_length", "rlfleet_env_steps_total",
    "rlfleet_steps_per_second", "rlfleet_loss", "rlfleet_serve_requests_total",
    "rlfleet_serve_latency_seconds",  # the serve_* ones: rlfleet_agents.servemetrics
)


METRICS_CONNECT_AFTER_S = 3.0  # the random baseline connects to Ray for metrics only after this long


def _linger_s() -> float:
    return float(os.environ.get("RLFLEET_METRICS_LINGER_S", "0") or 0)


class RayMetrics:
    """``ray.util.metrics`` instruments with the contract's names and labels. ``connect_after_s``:
    connect only after this long (not at all if :meth:`cancel` comes first); at once when the
    process lingers for scrapes."""

    def __init__(self, labels: dict[str, str], connect_after_s: float = 0.0) -> None:
        self.labels = labels
        self.ready = threading.Event()
        self.failed: str | None = None
        self.connect_s: float | None = None
        self._m: dict[str, Any] = {}
        self._lock = threading.Lock()
        self._pending: dict[str, Any] | None = None
        self._cancelled = threading.Event()
        if self.enabled:
            delay = 0.0 if _linger_s() > 0 else connect_after_s
            threading.Thread(target=self._connect_after, args=(delay,), name="rlfleet-ray-metrics",
                             daemon=True).start()

    @property
    def enabled(self) -> bool:
        return bool(os.environ.get("RAY_ADDRESS"))

    def _connect_after(self, delay: float) -> None:
        if delay > 0 and self._cancelled.wait(delay):
            return  # the run ended first: nothing to export
        self._connect()

    def cancel(self) -> None:
        """A connection not yet started is not made (the run has ended)."""
        self._cancelled.set()

    def _connect(self) -> None:
        t0 = time.monotonic()
        try:
            import ray
            from ray.util import metrics as rm

            if not ray.is_initialized():
                from rlfleet_agents.distributed import connect_ray  # on this process's own node

                connect_ray(logging_level=logging.WARNING, log_to_driver=False, include_dashboard=False)
            self._m = self._instruments(rm, tuple(self.labels))
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

    def _instruments(self, rm: Any, keys: tuple[str, ...]) -> dict[str, Any]:
        """The instruments by short name (a policy server's are in rlfleet_agents.servemetrics)."""
        return {
            "return": rm.Gauge("rlfleet_episode_return", "Mean episode return (recent episodes)", tag_keys=keys),
            "length": rm.Gauge("rlfleet_episode_length", "Mean episode length (recent episodes)", tag_keys=keys),
            "steps": rm.Counter("rlfleet_env_steps_total", "Environment steps taken", tag_keys=keys),
            "sps": rm.Gauge("rlfleet_steps_per_second", "Environment steps per second", tag_keys=keys),
            "loss": rm.Gauge("rlfleet_loss", "Training losses", tag_keys=(*keys, "name")),
        }

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

    def wait_ready(self, timeout: float) -> bool:
        return self.ready.wait(timeout) if self.enabled else False


class MetricsWriter:
    """Streams rows to the run's metrics (segments, then metrics.jsonl) and to Ray metrics.

    ``flush_every_s``: how often the background thread appends a segment (default 2 s on
    file://, 5 s on object stores); ``max_backoff_s``: the longest wait between attempts while the
    store fails; ``close_timeout_s``: how long ``close()`` waits for the last segment write before
    the consolidated ``metrics.jsonl`` (which gets the store's own retry budget);
    ``ray_connect_after_s``: defer the Ray metrics connection (none if the writer closes first).
    """

    def __init__(self, arts: RunArtifacts, labels: dict[str, str], *, flush_every_s: float | None = None,
                 max_backoff_s: float = 30.0, fanout: int = 8, close_timeout_s: float = 600.0,
                 ray_connect_after_s: float = 0.0) -> None:
        self.arts = arts
        self.rows: list[str] = []
        self.flush_every_s = flush_every_s if flush_every_s is not None else (
            2.0 if arts.store.is_local else 5.0)
        self.max_backoff_s = max_backoff_s
        self.fanout = fanout
        self.close_timeout_s = close_timeout_s
        self.flushed = 0  # rows already in a segment
        self.failures = 0  # failed store writes so far (segments, merges, deletions)
        self.last_error: str | None = None
        self._segments: list[tuple[int, int, int]] = []  # (first, last, level) of the live segments
        self._garbage: list[str] = []  # merged-away segments whose deletion failed
        self._lock = threading.Lock()  # one store writer at a time (the thread, or close())
        self._stop = threading.Event()
        self._closed = False
        self._last_step = 0
        self.ray = RayMetrics(labels, connect_after_s=ray_connect_after_s)
        self._thread = threading.Thread(target=self._loop, name="rlfleet-metrics", daemon=True)
        self._thread.start()

    def set_start_step(self, step: int) -> None:
        self._last_step = step

    def carry_over(self, step: int) -> int:
        """A restarted attempt of this same run (resumed from its own checkpoint at ``step``): the
        earlier attempts' rows up to ``step`` stay the run's first rows. They are stored again as
        one segment before the old segments (and an earlier attempt's metrics.jsonl, which readers
        would prefer) are deleted, so a reader always finds them; the rows after ``step`` are
        trained again by this attempt. Call before the first write(). Returns the rows kept."""
        kept = [r for r in self.arts.iter_metrics() if int(r.get("step", 0)) <= step]
        with self._lock:
            old = [f for f in self.arts.list_files(include_manifest=False)
                   if f == METRICS or f.startswith(METRICS_DIR + "/")]
            self.rows[:0] = [json.dumps(r, sort_keys=True, allow_nan=False, default=float) for r in kept]
            self.flushed, self._segments = 0, []
            # deleted only after a segment holding the kept rows is stored (this flush or a later one)
            self._garbage.extend(old)
            self._flush_segment()
        self._last_step = max(self._last_step, step)
        return len(kept)

    def write(self, row: dict[str, Any]) -> None:
        self.rows.append(json.dumps(row, sort_keys=True, allow_nan=False, default=float))
        step = int(row.get("step", self._last_step))
        self.ray.record_row(dict(row), steps_delta=max(0, step - self._last_step))
        self._last_step = max(step, self._last_step)

    # -- background ---------------------------------------------------------------------------
    def _loop(self) -> None:
        delay = self.flush_every_s
        while not self._stop.wait(delay):
            with self._lock:
                if self._closed:  # close() got the lock first: it has written metrics.jsonl
                    return
                ok = self._flush_segment()
            delay = self.flush_every_s if ok else min(max(delay, self.flush_every_s) * 2, self.max_backoff_s)

    def _failed(self, what: str, err: BaseException) -> None:
        self.failures += 1
        self.last_error = f"{type(err).__name__}: {err}"
        if self.failures == 1 or self.failures % 20 == 0:
            print(f"rlfleet: warning: metrics: could not {what} ({self.last_error}); {len(self.rows) - self.flushed} "
                  "row(s) kept in memory, retrying", file=sys.stderr, flush=True)

    def _flush_segment(self) -> bool:
        """Append the rows not yet stored as one segment; merge full groups. False if the store failed."""
        end = len(self.rows)
        first = self.flushed
        if end > first:
            try:
                self.arts.write_text(metrics_segment(first, end - 1), "".join(r + "\n" for r in self.rows[first:end]))
            except Exception as err:  # metrics must never break a run
                self._failed(f"write rows {first}-{end - 1}", err)
                return False
            self.flushed = end
            self._segments.append((first, end - 1, 0))
        self._merge()
        live = {metrics_segment(a, b) for a, b, _ in self._segments}
        for rel in list(self._garbage):
            if rel in live:  # an earlier attempt's file of the same name, just rewritten: keep it
                self._garbage.remove(rel)
                continue
            try:
                self.arts.delete_file(rel)
                self._garbage.remove(rel)
            except Exception as err:  # one attempt per file, retried next time
                self._failed(f"delete {rel}", err)
        return True

    def _merge(self) -> None:
        """``fanout`` consecutive segments of one level become one segment of the next level (written
        before the small ones are deleted, so readers always find every row)."""
        segs = self._segments
        i = 0
        while i + self.fanout <= len(segs):
            group = segs[i : i + self.fanout]
            if len({lvl for _, _, lvl in group}) != 1:
                i += 1
                continue
            first, last, level = group[0][0], group[-1][1], group[0][2]
            try:
                self.arts.write_text(metrics_segment(first, last),
                                     "".join(r + "\n" for r in self.rows[first : last + 1]))
            except Exception as err:
                self._failed(f"merge rows {first}-{last}", err)
                return
            segs[i : i + self.fanout] = [(first, last, level + 1)]
            self._garbage.extend(metrics_segment(a, b) for a, b, _ in group)
            i = 0

    # -- end ----------------------------------------------------------------------------------
    def close(self) -> None:
        """Every row to metrics.jsonl (with the store's retry budget), then drop the segments.
        Never raises: if the store stays down, the segments already written remain readable."""
        if self._closed:
            return
        self._closed = True
        self._stop.set()
        if _linger_s() <= 0:
            self.ray.cancel()  # a deferred connection not made yet: the run has nothing more to export
        if not self._lock.acquire(timeout=self.close_timeout_s):  # the thread's write in progress
            print(f"rlfleet: warning: metrics: the store did not take the last rows within "
                  f"{self.close_timeout_s:.0f} s; {len(self.rows) - self.flushed} row(s) not stored",
                  file=sys.stderr, flush=True)
            return
        try:
            try:
                self.arts.write_text(METRICS, "".join(r + "\n" for r in self.rows))
                self.flushed = len(self.rows)
            except Exception as err:
                self._failed(f"write {METRICS}", err)
            else:
                try:
                    self.arts.delete_dir(METRICS_DIR)
                except Exception as err:  # metrics.jsonl wins for readers; the segments only cost space
                    self._failed(f"delete {METRICS_DIR}/", err)
        finally:
            self._lock.release()
        linger = _linger_s()
        if linger > 0 and self.ray.enabled:
            # let Prometheus scrape the final values before the process exits
            self.ray.wait_ready(min(30.0, linger + 10))
            time.sleep(linger)
