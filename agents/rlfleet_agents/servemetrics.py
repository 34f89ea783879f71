"""What a policy server reports about its traffic: Prometheus metrics, drift, the audit log.

:class:`ServeObserver` is the one hook :class:`rlfleet_agents.serve.PolicyApp` calls
(``observer=``): ``request(latency_s, code)`` for every HTTP request and ``answered(obs, actions,
latency_s)`` for every answered policy request. It feeds

- :class:`ServeMetrics`: ``ray.util.metrics`` instruments (exported by Ray's metrics agent on the
  node, :8080, with Ray's ``ray_`` prefix, like the run metrics of rlfleet_agents.metrics), labels
  ``deployment``, ``version``, ``replica`` plus the run's own (``run_id``, ``kind``, ``env``,
  ``target``): ``rlfleet_serve_requests_total{code}``, ``rlfleet_serve_errors_total{code}`` (4xx and
  5xx), ``rlfleet_serve_latency_seconds`` (histogram), ``rlfleet_serve_batch_size`` (histogram of
  observations per answered request), ``rlfleet_serve_drift_psi{feature}``,
  ``rlfleet_serve_drift_ks{feature}``, ``rlfleet_serve_drift_score{feature}`` (PSI / the feature's
  calibrated alert level), ``rlfleet_serve_action_shift``;
- a :class:`rlfleet_agents.drift.DriftMonitor` (when the policy has policy_stats.json);
- an :class:`rlfleet_agents.audit.AuditLog`.

A publisher thread flushes the audit log and writes ``serve_status.json`` (drift snapshot,
request/error counts, audit counters) every ``publish_every_s``; ``rlfleet drift RUN_ID`` reads it.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import numpy as np

from rlfleet.artifacts import SERVE_STATUS
from rlfleet_agents.audit import AuditLog
from rlfleet_agents.drift import UNAVAILABLE, DriftMonitor
from rlfleet_agents.metrics import RayMetrics

STATUS_FILE = SERVE_STATUS
LATENCY_BOUNDARIES = [0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0]
BATCH_BOUNDARIES = [1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 4096]


class ServeMetrics(RayMetrics):
    """The policy server's instruments (connected in the background like a run's). What arrives
    before the connection is ready (seconds; a server answers at once) is kept, bounded, and
    recorded when it is."""

    EARLY_MAX = 10_000  # latency/batch observations kept before the connection is ready

    def __init__(self, labels: dict[str, str]) -> None:
        self._early_lock = threading.Lock()
        self._early: dict[str, Any] = {"requests": {}, "latency": [], "batch": [], "drift": None}
        super().__init__(labels)

    def _connect(self) -> None:
        super()._connect()
        if not self.ready.is_set():
            return
        with self._early_lock:
            early, self._early = self._early, {"requests": {}, "latency": [], "batch": [], "drift": None}
        for code, n in early["requests"].items():
            self._m["requests"].inc(n, tags={"code": str(code)})
            if code >= 400:
                self._m["errors"].inc(n, tags={"code": str(code)})
        for v in early["latency"]:
            self._m["latency"].observe(v)
        for v in early["batch"]:
            self._m["batch"].observe(v)
        if early["drift"] is not None:
            self.record_drift(early["drift"])

    def _keep_early(self, kind: str, value: Any) -> bool:
        """True if the connection is not ready and ``value`` was kept for it."""
        if self.ready.is_set() or not self.enabled:
            return False
        with self._early_lock:
            if self.ready.is_set():
                return False
            e = self._early
            if kind == "requests":
                e["requests"][value] = e["requests"].get(value, 0) + 1
            elif kind == "drift":
                e["drift"] = value
            elif len(e[kind]) < self.EARLY_MAX:
                e[kind].append(value)
            return True

    def state(self) -> dict[str, Any]:
        return {"enabled": self.enabled, "connected": self.ready.is_set(), "error": self.failed}

    def _instruments(self, rm: Any, keys: tuple[str, ...]) -> dict[str, Any]:
        return {
            "requests": rm.Counter("rlfleet_serve_requests_total", "Policy server requests",
                                   tag_keys=(*keys, "code")),
            "errors": rm.Counter("rlfleet_serve_errors_total", "Policy server requests answered 4xx/5xx",
                                 tag_keys=(*keys, "code")),
            "latency": rm.Histogram("rlfleet_serve_latency_seconds", "Policy server request latency",
                                    boundaries=LATENCY_BOUNDARIES, tag_keys=keys),
            "batch": rm.Histogram("rlfleet_serve_batch_size", "Observations per answered policy request",
                                  boundaries=BATCH_BOUNDARIES, tag_keys=keys),
            "psi": rm.Gauge("rlfleet_serve_drift_psi", "PSI of a served observation feature vs training",
                            tag_keys=(*keys, "feature")),
            "ks": rm.Gauge("rlfleet_serve_drift_ks", "KS distance of a served observation feature vs training",
                           tag_keys=(*keys, "feature")),
            "score": rm.Gauge("rlfleet_serve_drift_score", "PSI of a served observation feature / its alert "
                              "level calibrated at export (alert above 1)", tag_keys=(*keys, "feature")),
            "action_shift": rm.Gauge("rlfleet_serve_action_shift", "PSI of the served action distribution "
                                     "vs training", tag_keys=keys),
        }

    def record_request(self, latency_s: float, code: int) -> None:
        if self._keep_early("requests", code):
            self._keep_early("latency", latency_s)
            return
        if self.ready.is_set():
            self._m["requests"].inc(1, tags={"code": str(code)})
            self._m["latency"].observe(latency_s)
            if code >= 400:
                self._m["errors"].inc(1, tags={"code": str(code)})

    def record_batch(self, n: int) -> None:
        if self._keep_early("batch", n):
            return
        if self.ready.is_set():
            self._m["batch"].observe(n)

    def record_drift(self, snap: dict[str, Any]) -> None:
        if self._keep_early("drift", snap) or not self.ready.is_set():
            return
        for j, v in enumerate(snap["psi"]):
            self._m["psi"].set(v, tags={"feature": str(j)})
        for j, v in enumerate(snap["score"]):
            self._m["score"].set(v, tags={"feature": str(j)})
        for j, v in enumerate(snap["ks"]):
            if v is not None:
                self._m["ks"].set(v, tags={"feature": str(j)})
        self._m["action_shift"].set(snap["action_shift"])


class ServeObserver:
    """PolicyApp's hook: metrics, drift and the audit log of one replica (see the module doc)."""

    def __init__(self, *, labels: dict[str, str], metrics: ServeMetrics | None = None,
                 drift: DriftMonitor | None = None, drift_unavailable: str | None = None,
                 audit: AuditLog | None = None, publish: Callable[[str, dict[str, Any]], None] | None = None,
                 publish_every_s: float = 5.0) -> None:
        self.labels = labels
        self.metrics = metrics
        self.drift = drift
        self.drift_unavailable = drift_unavailable
        self.audit = audit
        self._publish = publish
        self.requests = 0
        self.errors = 0
        self.rows = 0
        self.started = datetime.now(UTC).isoformat(timespec="seconds")
        if drift is not None and metrics is not None:
            drift.on_update = metrics.record_drift
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        if publish is not None or audit is not None:
            self._thread = threading.Thread(target=self._loop, args=(publish_every_s,), name="rlfleet-serve-publish",
                                            daemon=True)
            self._thread.start()

    # -- the hook (the server's event loop; keep it cheap) ----------------------------------------
    def request(self, latency_s: float, code: int) -> None:
        self.requests += 1
        if code >= 400:
            self.errors += 1
        if self.metrics is not None:
            self.metrics.record_request(latency_s, code)

    def answered(self, obs: np.ndarray, actions: np.ndarray, latency_s: float) -> None:
        self.rows += len(obs)
        if self.metrics is not None:
            self.metrics.record_batch(len(obs))
        if self.drift is not None:
            self.drift.observe(obs, actions)
        if self.audit is not None:
            self.audit.record(obs, actions, latency_s)

    # -- status ----------------------------------------------------------------------------------
    def status(self) -> dict[str, Any]:
        drift = self.drift.snapshot() if self.drift is not None else {
            **UNAVAILABLE, **({"reason": self.drift_unavailable} if self.drift_unavailable else {})}
        return {**self.labels, "started": self.started, "updated": datetime.now(UTC).isoformat(timespec="seconds"),
                "requests": self.requests, "errors": self.errors, "observations": self.rows, "drift": drift,
                "audit": self.audit.stats() if self.audit is not None else None,
                "metrics": self.metrics.state() if self.metrics is not None else None}

    def publish_now(self) -> None:
        if self.audit is not None:
            self.audit.flush()
        if self._publish is not None:
            try:
                self._publish(STATUS_FILE, self.status())
            except Exception:  # noqa: S110 - the status is refreshed next time; never fails serving
                pass

    def _loop(self, every: float) -> None:
        while not self._stop.wait(every):
            self.publish_now()

    def close(self) -> None:
        """Stop the publisher and write the last audit lines and status."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
        self.publish_now()


def observer_for_run(arts: Any, src: Any, policy: Any, *, run_labels: dict[str, str], deployment: str,
                     version: str, replica: str, audit_rate: float, publish_every_s: float = 5.0,
                     say: Callable[[str], None] = print) -> ServeObserver:
    """The observer of a deploy run: drift from the source run's policy_stats.json when it has one,
    the audit log and the status file in the deploy run's own artifacts (``arts``)."""
    from rlfleet_agents.drift import STATS_FILE, StatsError, load_stats

    labels = {"deployment": deployment, "version": version, "replica": replica}
    drift, why = None, None
    if STATS_FILE in src.manifest().files:
        try:
            drift = DriftMonitor(load_stats(src.read_bytes(STATS_FILE)), obs_dim=int(np.prod(policy.info.obs_shape)))
        except StatsError as err:
            why = f"drift unavailable: {err}"
    else:
        why = str(UNAVAILABLE["reason"])
    if drift is None:
        say(f"drift: {why}")
    audit = AuditLog(arts.write_text, rate=audit_rate, deployment=deployment, version=version,
                     replica=replica) if audit_rate > 0 else None
    return ServeObserver(labels=labels, metrics=ServeMetrics({**run_labels, **labels}), drift=drift,
                         drift_unavailable=why, audit=audit, publish=arts.write_json,
                         publish_every_s=publish_every_s)
