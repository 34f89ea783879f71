"""Drift detection (issue 11 part 6) in numpy: the issue's test, both halves, seeded.

Training statistics come from 20,000 draws of a 4-feature distribution with CartPole-like scales
and a policy-like action rule; served traffic arrives one observation per request, as a client
stepping an environment sends it."""

from __future__ import annotations

import functools
import json

import numpy as np
import pytest

from rlfleet_agents.drift import (
    BINS,
    PSI_ALERT,
    DriftMonitor,
    StatsError,
    StatsRecorder,
    compute_stats,
    psi,
)

pytestmark = pytest.mark.figures

SCALE = np.array([0.1, 0.5, 0.05, 0.8])


def _draw(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
    x = rng.normal(0.0, 1.0, (n, 4)) * SCALE
    return x.astype(np.float32), (x[:, 2] + 0.3 * x[:, 3] > 0).astype(np.int64)


@functools.cache
def _stats_text(seed: int) -> str:  # computed once per seed (the export's calibration takes ~0.5-1 s)
    x, a = _draw(np.random.default_rng(seed), 20_000)
    return json.dumps(compute_stats(x, a, action_kind="discrete", n_actions=2, source="test"))


def _stats(seed: int) -> dict:
    return json.loads(_stats_text(seed))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_unshifted_traffic_raises_no_alert_in_20000_requests(seed: int) -> None:
    rng = np.random.default_rng(1000 + seed)
    seen: list[dict] = []
    stats = _stats(seed)
    # i.i.d. training rows: a window's natural PSI is ~0.03, so every feature keeps the floor level
    assert stats["calibration"]["replays"] == ["as recorded"]
    assert max(f["psi_natural"] for f in stats["features"]) < 0.05
    assert [f["psi_alert"] for f in stats["features"]] == [PSI_ALERT] * 4
    mon = DriftMonitor(stats, obs_dim=4, on_update=seen.append)
    x, a = _draw(rng, 20_000)
    for i in range(20_000):
        mon.observe(x[i : i + 1], a[i : i + 1])
    assert len(seen) == (20_000 - mon.window) // mon.every + 1  # recomputed all along, not once
    worst = max(s["max_psi"] for s in seen)
    worst_action = max(s["action_shift"] for s in seen)
    assert not any(s["alert"] for s in seen)
    # the false-alert margin measured here (docs/serving.md): the worst PSI stays under a quarter of the threshold
    assert worst < PSI_ALERT / 4 and worst_action < PSI_ALERT / 4, (worst, worst_action)
    print(f"seed {seed}: max PSI over 20k unshifted requests {worst:.4f}, action shift {worst_action:.4f}, "
          f"threshold {PSI_ALERT}")


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_one_std_shift_in_one_feature_alerts_within_2000_requests(seed: int) -> None:
    rng = np.random.default_rng(2000 + seed)
    mon = DriftMonitor(_stats(seed), obs_dim=4)
    x, a = _draw(rng, 1_000)  # a full window of normal traffic first
    mon.observe(x, a)
    assert not mon.snapshot()["alert"]
    x, a = _draw(rng, 2_000)
    x[:, 1] += SCALE[1]  # feature 1 moves by one training standard deviation
    fired = None
    for i in range(2_000):
        mon.observe(x[i : i + 1], a[i : i + 1])
        if mon.snapshot()["alert"]:
            fired = i + 1
            break
    assert fired is not None, mon.snapshot()
    snap = mon.snapshot()
    assert int(np.argmax(snap["psi"])) == 1 and snap["psi"][1] > PSI_ALERT
    assert max(p for j, p in enumerate(snap["psi"]) if j != 1) < PSI_ALERT / 4  # only the moved feature
    assert snap["ks"][1] > max(k for j, k in enumerate(snap["ks"]) if j != 1)
    print(f"seed {seed}: alert after {fired} shifted requests, PSI {snap['psi']}")


def test_action_shift_alerts_when_the_policy_acts_differently() -> None:
    rng = np.random.default_rng(7)
    mon = DriftMonitor(_stats(7), obs_dim=4)
    x, a = _draw(rng, 1_000)
    mon.observe(x, np.ones_like(a))  # every action 1 where training saw about half
    snap = mon.snapshot()
    assert snap["action_shift"] > PSI_ALERT and snap["alert"] and snap["max_psi"] < PSI_ALERT


def test_stats_content_and_edge_cases() -> None:
    rng = np.random.default_rng(3)
    x = np.column_stack([rng.normal(2.0, 3.0, 5000), rng.integers(0, 3, 5000)])  # continuous, 3-valued
    stats = compute_stats(x, rng.integers(0, 3, 5000), action_kind="discrete", n_actions=3, source="s")
    cont, disc = stats["features"]
    assert len(cont["edges"]) == BINS - 1 and np.allclose(cont["fractions"], 0.1, atol=0.002)
    assert abs(cont["mean"] - 2.0) < 0.15 and abs(cont["std"] - 3.0) < 0.15 and len(cont["ks_quantiles"]) == 99
    assert len(disc["edges"]) <= 3 and "ks_quantiles" not in disc  # ties collapse bins; no KS for few values
    assert abs(sum(disc["fractions"]) - 1) < 1e-9 and len(stats["actions"]["fractions"]) == 3
    cstats = compute_stats(x, rng.normal(0, 1, (5000, 2)), action_kind="continuous", n_actions=0, source="s")
    mon = DriftMonitor(cstats, obs_dim=2, window=500, every=50)
    mon.observe(x[:500], rng.normal(3, 1, (500, 2)))
    assert mon.snapshot()["action_shift"] > 1.0 and mon.snapshot()["ks"][1] is None
    assert float(psi(np.array([0.5, 0.5]), np.array([0.5, 0.5]))) == 0.0
    with pytest.raises(StatsError, match="describes 2 features, the policy takes 4"):
        DriftMonitor(stats, obs_dim=4)


def test_recorder_keeps_a_bounded_uniform_sample_of_what_the_policy_saw() -> None:
    rec = StatsRecorder(lambda o: (o[:, 0] > 0).astype(np.int64), cap=2_000, seed=1)
    for step in range(1_000):  # 8 envs x 1,000 steps, the time step in feature 0
        obs = np.column_stack([np.full(8, step, np.float32), np.arange(8, dtype=np.float32)])
        assert rec(obs).shape == (8,)
    x, a = rec.sample()
    assert rec.seen == 8_000 and x.shape == (2_000, 2) and a.shape == (2_000, 1)
    assert np.array_equal(a[:, 0], (x[:, 0] > 0).astype(np.int64))  # rows stay paired with their actions
    order = rec.order()  # (call, slot) stays paired too: here the call is feature 0 and the slot feature 1
    assert order is not None and np.array_equal(order, x.astype(np.int64))
    assert abs(x[:, 0].mean() - 499.5) < 20 and 430 < (x[:, 0] < 250).sum() < 570  # uniform over time
    with pytest.raises(StatsError, match="never called"):
        StatsRecorder(np.sign).sample()


def test_image_sized_observations_get_no_statistics_and_no_big_sample() -> None:
    rec = StatsRecorder(lambda o: np.zeros(len(o), np.int64), cap=1_000)
    for _ in range(5):
        rec(np.zeros((4, 84, 84), np.float32))  # 7,056 features
    assert rec.obs is None and rec.seen == 20  # nothing kept
    stats = compute_stats(*rec.sample(), action_kind="discrete", n_actions=2, source="s")
    assert stats["features"] is None and "7056 features" in stats["unavailable"]
    with pytest.raises(StatsError, match="at most 512"):
        DriftMonitor(stats, obs_dim=7056)
