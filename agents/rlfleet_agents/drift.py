"""Training observation statistics (``policy_stats.json``) and drift against them while serving.

At export the run records what the policy saw: per feature of the (flattened) observation, the
inner edges of ``BINS`` quantile bins with the training fraction in each bin, mean/std, and
``KS_POINTS`` quantiles for a Kolmogorov-Smirnov distance; and the training action distribution
(fractions per discrete action, or quantile bins per continuous action dimension). The sample is
the observations and greedy actions of the run's final evaluation (the ONNX policy acting in the
environment, which is what a deployment sees; not the exploring training rollouts), capped at
``MAX_SAMPLE`` rows.

While serving, :class:`DriftMonitor` keeps the last ``window`` observations and actions in ring
buffers (copying one request into them is one slice assignment) and, every ``every`` rows once the
window is full, computes per-feature PSI, KS and the action shift (PSI of the action
distribution) in a few vectorised numpy calls over the window. ``snapshot()`` holds the latest.

PSI = sum_b (w_b - t_b) * ln(w_b / t_b), both fractions floored at ``EPS``.

Alert level per feature, calibrated at export (:func:`calibrate`): real traffic is episodes, and
consecutive requests of one episode are strongly autocorrelated, so a window of ``WINDOW`` requests
holds the phase of the few episodes in flight, and its PSI against the whole sample is large without
any shift (CartPole, one client: up to 5.7 on the cart's position and velocity). The export's own
evaluation episodes, replayed the way serving sees them (one client at a time, and interleaved as the
evaluation stepped them), give each feature's natural PSI of a window (the largest over sliding
windows, each against the rest of the sample); the alert level is ``max(PSI_ALERT, CAL_MARGIN *
natural)``. The server exports PSI / level as the drift score (alert above 1). For i.i.d. traffic the
natural PSI is ~0.03 and the level stays ``PSI_ALERT`` = 0.2, at which a one-standard-deviation shift
of one feature alerts within a few hundred requests (tests/agents/test_drift.py); on real episode
traffic (tests/agents/test_drift_episodes.py) the levels of slow features are high, i.e. a window of
a few episodes cannot tell a shift of them from the next episode. Measured figures: docs/serving.md.
"""

from __future__ import annotations

import json
import threading
from typing import Any

import numpy as np

from rlfleet.stack_outputs import SERVE_DRIFT_PSI_ALERT

STATS_FILE = "policy_stats.json"
STATS_FORMAT = 1
BINS = 10
KS_POINTS = 99  # the 1st..99th percentiles
MAX_SAMPLE = 20_000
EPS = 1e-4
WINDOW = 1_000
EVERY = 100
PSI_ALERT = SERVE_DRIFT_PSI_ALERT  # 0.2, one value for the server and the alarms; margins in docs/serving.md
CAL_MARGIN = 3.0  # fresh episodes reached up to 2.03x the calibrated natural PSI (docs/serving.md)
CAL_WINDOWS = 40  # sliding windows per replay order; fewer (down to 2, and 2 replays) for wide observations:
CAL_BUDGET = 20_000_000  # rows x features x windows binned at export (~1 s for CartPole's 5,000 x 4 x 200)
MIN_UNIQUE_FOR_KS = 20  # KS only for features that look continuous in training
MAX_FEATURES = 512  # wider observations (images) get no statistics: the file and the sample stay small


class StatsError(ValueError):
    """policy_stats.json is missing a field or does not fit the policy."""


def _bin_index(edges: np.ndarray, x: np.ndarray) -> np.ndarray:
    """Bin of each value: (-inf, e0], (e0, e1], ..., (e_last, inf)."""
    return np.searchsorted(edges, x, side="left")


def _feature_stats(col: np.ndarray) -> dict[str, Any]:
    col = col.astype(np.float64)
    edges = np.unique(np.quantile(col, np.linspace(0, 1, BINS + 1)[1:-1]))
    counts = np.bincount(_bin_index(edges, col), minlength=len(edges) + 1)
    out: dict[str, Any] = {"edges": edges.tolist(), "fractions": (counts / len(col)).tolist(),
                           "mean": float(col.mean()), "std": float(col.std())}
    if len(np.unique(col)) >= MIN_UNIQUE_FOR_KS:
        out["ks_quantiles"] = np.quantile(col, np.arange(1, KS_POINTS + 1) / (KS_POINTS + 1)).tolist()
    return out


def _window_psi(seq: np.ndarray, rows: int, starts: np.ndarray) -> np.ndarray:
    """[windows, features]: PSI of each window ``seq[s : s + rows]`` against the rest of the sequence,
    binned by the rest's own quantile edges (fresh traffic meets statistics it is no part of; edges
    that include the window spread it over more bins and halved the natural PSI of the pole angle)."""
    q = np.linspace(0, 1, BINS + 1)[1:-1]
    out = np.empty((len(starts), seq.shape[1]))
    for i, s in enumerate(starts):
        rest = np.concatenate([seq[:s], seq[s + rows :]])
        edges = np.quantile(rest, q, axis=0)
        for j in range(seq.shape[1]):
            e = np.unique(edges[:, j])
            t = np.bincount(_bin_index(e, rest[:, j]), minlength=len(e) + 1) / len(rest)
            w = np.bincount(_bin_index(e, seq[s : s + rows, j]), minlength=len(e) + 1) / rows
            out[i, j] = psi(w, t)
    return out


def calibrate(obs: np.ndarray, feats: list[dict[str, Any]], order: np.ndarray | None = None,
              seen: int | None = None, window: int = WINDOW) -> dict[str, Any]:
    """Each feature's natural PSI of a serving window, from the sample's own episodes (module doc).

    ``order``: per row (call, slot) of the recording (StatsRecorder.order()), replayed as k clients
    interleaved request by request for k = 1 (one client stepping its episodes back to back), 2, 4, 8,
    ... and all the recorded slots (as the calls came); without it the rows are taken in the given
    order. When the sample kept only some of the ``seen`` rows, a window holds the rows that
    ``window`` requests' time span kept (fewer rows: noisier PSI, so a higher, safer level).
    Sets ``psi_natural`` and ``psi_alert`` in ``feats``; returns the ``calibration`` record."""
    n = len(obs)
    rows = window if seen is None or seen <= n else max(1, round(window * n / seen))
    rows = min(rows, n // 2)
    if rows < 10:
        for f in feats:
            f["psi_alert"] = PSI_ALERT
        return {"windows": 0, "reason": f"{n} observations are too few to calibrate windows of {window} requests; "
                                        f"alert level {PSI_ALERT} for every feature"}
    if order is None:
        replays = {"as recorded": np.arange(n)}
    else:  # k clients interleaved request by request: slots in groups of k, one group after another
        slots = int(order[:, 1].max()) + 1
        widths = [k for k in (1, 2, 4, 8, 16, 32) if k < slots] + [slots]
        replays = {f"{k} client{'s' if k > 1 else ''}": np.lexsort((order[:, 1], order[:, 0], order[:, 1] // k))
                   for k in widths}
    if len(replays) > 2 and n * obs.shape[1] * len(replays) * 2 > CAL_BUDGET:  # wide: one client and all
        replays = {k: replays[k] for k in (next(iter(replays)), list(replays)[-1])}
    per_replay = int(np.clip(CAL_BUDGET // (n * obs.shape[1] * len(replays)), 2, CAL_WINDOWS))
    starts = np.unique(np.linspace(0, n - rows, per_replay).round().astype(np.int64))
    natural = np.max([_window_psi(obs[r], rows, starts).max(axis=0) for r in replays.values()], axis=0)
    for f, v in zip(feats, natural.tolist(), strict=True):
        f["psi_natural"] = round(v, 6)
        f["psi_alert"] = round(max(PSI_ALERT, CAL_MARGIN * v), 6)
    return {"window": window, "rows_per_window": rows, "windows": len(starts) * len(replays),
            "replays": list(replays), "margin": CAL_MARGIN, "floor": PSI_ALERT}


def compute_stats(obs: np.ndarray, actions: np.ndarray, *, action_kind: str, n_actions: int,
                  source: str, order: np.ndarray | None = None, seen: int | None = None) -> dict[str, Any]:
    """The content of policy_stats.json from a sample of observations and the policy's actions
    (``order``/``seen``: how they were recorded, for :func:`calibrate`)."""
    obs = np.asarray(obs, dtype=np.float64)
    width = int(np.prod(obs.shape[1:]))
    if width > MAX_FEATURES:
        return {"format": STATS_FORMAT, "source": source, "samples": 0, "bins": BINS, "features": None,
                "unavailable": f"observations have {width} features; drift statistics are kept for "
                               f"at most {MAX_FEATURES} (per-feature PSI does not fit images)"}
    if len(obs) == 0:
        raise StatsError("no observations to compute training statistics from")
    obs = obs.reshape(len(obs), width)
    acts = np.asarray(actions)
    feats = [_feature_stats(obs[:, j]) for j in range(obs.shape[1])]
    out: dict[str, Any] = {"format": STATS_FORMAT, "source": source, "samples": len(obs), "bins": BINS,
                           "features": feats, "calibration": calibrate(obs, feats, order, seen)}
    if action_kind == "discrete":
        counts = np.bincount(acts.astype(np.int64).ravel(), minlength=n_actions)[:n_actions]
        out["actions"] = {"kind": "discrete", "fractions": (counts / max(1, counts.sum())).tolist()}
    else:
        a = acts.astype(np.float64).reshape(len(acts), -1)
        out["actions"] = {"kind": "continuous", "dims": [_feature_stats(a[:, j]) for j in range(a.shape[1])]}
    return out


class StatsRecorder:
    """Wraps a policy's ``act``: a uniform reservoir sample (at most ``cap`` rows) of the observations
    it is called with and the actions it returns, for :func:`compute_stats`."""

    def __init__(self, act: Any, cap: int = MAX_SAMPLE, seed: int = 0) -> None:
        self.act, self.cap = act, cap
        self.rng = np.random.default_rng(seed)
        self.seen = 0
        self.width = 0
        self.calls = 0
        self.obs: np.ndarray | None = None
        self.actions: np.ndarray | None = None
        self._order: np.ndarray | None = None  # (call, slot) of each kept row

    def __call__(self, obs: np.ndarray) -> np.ndarray:
        actions = self.act(obs)
        self.add(obs, actions)
        return actions

    def add(self, obs: np.ndarray, actions: np.ndarray) -> None:
        x = np.asarray(obs, np.float32).reshape(len(obs), -1)
        a = np.asarray(actions).reshape(len(obs), -1)
        if x.shape[1] > MAX_FEATURES:  # no statistics for these (compute_stats says so): keep no rows
            self.width = x.shape[1]
            self.seen += len(x)
            return
        if self.obs is None:
            self.obs = np.empty((self.cap, x.shape[1]), np.float32)
            self.actions = np.empty((self.cap, a.shape[1]), a.dtype)
            self._order = np.empty((self.cap, 2), np.int64)
        assert self.actions is not None and self._order is not None
        order = np.column_stack([np.full(len(x), self.calls), np.arange(len(x))])
        self.calls += 1
        take = max(0, min(len(x), self.cap - self.seen))  # filling the reservoir
        self.obs[self.seen : self.seen + take] = x[:take]
        self.actions[self.seen : self.seen + take] = a[:take]
        self._order[self.seen : self.seen + take] = order[:take]
        if take < len(x):  # Algorithm R, in order: row t replaces a random slot with probability cap/(t+1)
            t = self.seen + np.arange(take, len(x))
            slot = self.rng.integers(0, t + 1)
            keep = slot < self.cap
            self.obs[slot[keep]] = x[take:][keep]
            self.actions[slot[keep]] = a[take:][keep]
            self._order[slot[keep]] = order[take:][keep]
        self.seen += len(x)

    def sample(self) -> tuple[np.ndarray, np.ndarray]:
        if self.width > MAX_FEATURES:
            return np.empty((0, self.width), np.float32), np.empty((0, 1))
        n = min(self.seen, self.cap)
        if self.obs is None or self.actions is None or n == 0:
            raise StatsError("the policy was never called: no observations to compute training statistics from")
        return self.obs[:n], self.actions[:n]

    def order(self) -> np.ndarray | None:
        """(call, slot) of each row of :meth:`sample`: the call it came in and its row in that batch
        (with an evaluation's vector env, the env slot: one client's stream)."""
        return None if self._order is None else self._order[: min(self.seen, self.cap)]


def psi(window_frac: np.ndarray, train_frac: np.ndarray) -> np.ndarray:
    """Population stability index along the last axis."""
    w = np.maximum(window_frac, EPS)
    t = np.maximum(train_frac, EPS)
    return np.sum((w - t) * np.log(w / t), axis=-1)


class _Binned:
    """Features (or continuous action dims) binned all at once: edges padded to one width with +inf."""

    def __init__(self, feats: list[dict[str, Any]]) -> None:
        width = max((len(f["edges"]) for f in feats), default=0)
        self.edges = np.full((len(feats), width), np.inf)
        self.train = np.zeros((len(feats), width + 1))
        for j, f in enumerate(feats):
            e, fr = np.asarray(f["edges"], float), np.asarray(f["fractions"], float)
            if len(fr) != len(e) + 1:
                raise StatsError(f"{STATS_FILE}: feature {j} has {len(e)} edges but {len(fr)} fractions")
            self.edges[j, : len(e)] = e
            self.train[j, : len(fr)] = fr
        self.ks_cols = [j for j, f in enumerate(feats) if f.get("ks_quantiles")]
        self.ks_q = np.array([feats[j]["ks_quantiles"] for j in self.ks_cols], float).reshape(len(self.ks_cols), -1)
        self.ks_p = np.arange(1, self.ks_q.shape[1] + 1) / (self.ks_q.shape[1] + 1)

    def psi(self, x: np.ndarray) -> np.ndarray:
        """x: [n, features] -> PSI per feature."""
        counts = np.zeros(self.train.shape)
        for j in range(x.shape[1]):
            counts[j] = np.bincount(_bin_index(self.edges[j], x[:, j]), minlength=counts.shape[1])
        return psi(counts / len(x), self.train)

    def ks(self, x: np.ndarray) -> dict[int, float]:
        """Largest gap between the window's CDF and the training CDF at the training percentiles."""
        if not self.ks_cols:
            return {}
        xs = np.sort(x[:, self.ks_cols], axis=0)
        cdf = np.stack([np.searchsorted(xs[:, i], self.ks_q[i], side="right") for i in range(len(self.ks_cols))])
        gap = np.abs(cdf / len(x) - self.ks_p[None, :]).max(axis=1)
        return {j: float(g) for j, g in zip(self.ks_cols, gap, strict=True)}


class DriftMonitor:
    """Sliding-window drift of served observations/actions against policy_stats.json.

    ``on_update(snapshot)`` is called (in the serving thread) after each recomputation.
    """

    def __init__(self, stats: dict[str, Any], *, obs_dim: int, window: int = WINDOW, every: int = EVERY,
                 on_update: Any = None) -> None:
        if stats.get("format") != STATS_FORMAT:
            raise StatsError(f"{STATS_FILE}: format {stats.get('format')!r} is not {STATS_FORMAT}")
        feats = stats.get("features")
        if stats.get("unavailable"):
            raise StatsError(str(stats["unavailable"]))
        if not isinstance(feats, list) or len(feats) != obs_dim:
            raise StatsError(f"{STATS_FILE} describes {len(feats) if isinstance(feats, list) else 'no'} features, "
                             f"the policy takes {obs_dim}")
        if window < 10 or every < 1:
            raise StatsError("drift window must be >= 10 rows and the update interval >= 1 row")
        self.obs = _Binned(feats)
        self.levels = np.array([float(f.get("psi_alert", PSI_ALERT)) for f in feats])  # older files: PSI_ALERT
        acts = stats.get("actions") or {}
        self.action_kind = acts.get("kind")
        if self.action_kind == "discrete":
            self.action_train = np.asarray(acts["fractions"], float)
            self.act_dim = 1
            self.acts: _Binned | None = None
        else:
            self.acts = _Binned(acts["dims"])
            self.act_dim = len(acts["dims"])
        self.window, self.every, self.on_update = window, every, on_update
        self._x = np.zeros((window, obs_dim), np.float64)
        self._a = np.zeros((window, self.act_dim), np.float64)
        self._pos = 0  # next row to write
        self._filled = 0
        self._since = 0
        self.seen = 0
        self._lock = threading.Lock()
        self.latest: dict[str, Any] = {"available": True, "window": window, "filled": 0, "seen": 0,
                                       "psi": None, "ks": None, "action_shift": None, "alert": False,
                                       "threshold": PSI_ALERT, "psi_alert": self.levels.round(6).tolist()}

    def observe(self, obs: np.ndarray, actions: np.ndarray) -> None:
        """Add one request's rows (obs [b, ...], actions [b] or [b, d]); recompute every ``every`` rows."""
        x = obs.reshape(len(obs), -1)
        a = np.asarray(actions).reshape(len(obs), -1)
        if len(x) > self.window:
            x, a = x[-self.window:], a[-self.window:]
        with self._lock:
            n, p = len(x), self._pos
            first = min(n, self.window - p)
            self._x[p : p + first] = x[:first]
            self._a[p : p + first] = a[:first]
            if first < n:
                self._x[: n - first] = x[first:]
                self._a[: n - first] = a[first:]
            self._pos = (p + n) % self.window
            self._filled = min(self.window, self._filled + n)
            self.seen += len(obs)
            self._since += len(obs)
            if self._since < self.every or self._filled < self.window:
                return
            self._since = 0
            snap = self._compute()
            self.latest = snap
        if self.on_update is not None:
            self.on_update(snap)

    def _compute(self) -> dict[str, Any]:
        x, a = self._x, self._a
        psis = self.obs.psi(x)
        if self.acts is None:
            counts = np.bincount(a[:, 0].astype(np.int64), minlength=len(self.action_train))[: len(self.action_train)]
            shift = float(psi(counts / len(a), self.action_train))
        else:
            shift = float(self.acts.psi(a).max())
        ks = self.obs.ks(x)
        top = float(psis.max()) if len(psis) else 0.0
        score = psis / self.levels
        top_score = float(score.max()) if len(score) else 0.0
        return {"available": True, "window": self.window, "filled": self._filled, "seen": self.seen,
                "psi": [round(float(v), 6) for v in psis],
                "ks": [None if j not in ks else round(ks[j], 6) for j in range(len(psis))],
                "action_shift": round(shift, 6), "max_psi": round(top, 6),
                "score": [round(float(v), 6) for v in score], "max_score": round(top_score, 6),
                "alert": bool(top_score > 1.0 or shift > PSI_ALERT), "threshold": PSI_ALERT,
                "psi_alert": self.levels.round(6).tolist()}

    def snapshot(self) -> dict[str, Any]:
        return dict(self.latest)


UNAVAILABLE = {"available": False, "reason": f"the policy has no {STATS_FILE} (exported before drift statistics "
                                             "were recorded); retrain or re-export it to measure drift"}


def load_stats(text: str | bytes) -> dict[str, Any]:
    try:
        stats = json.loads(text)
    except ValueError as err:
        raise StatsError(f"{STATS_FILE} is not valid JSON: {err}") from None
    if not isinstance(stats, dict):
        raise StatsError(f"{STATS_FILE} must hold a JSON object")
    return stats
