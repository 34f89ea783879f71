"""Drift on REAL episode traffic (issue 11 part 6): clients stepping CartPole-v1 episodes with the
trained policy, fed through DriftMonitor one observation per request as the serving layer does,
against the policy_stats.json the train run exported. Consecutive requests of one episode are
strongly autocorrelated (the cart drifts over an episode), so a 1,000-row window holds the phase of
the few episodes in flight, not the policy's whole state distribution: 20,000 such requests must
raise no alert, for several client patterns."""

from __future__ import annotations

import gymnasium as gym
import numpy as np
import pytest

from rlfleet.artifacts import open_run
from rlfleet_agents.drift import CAL_MARGIN, PSI_ALERT, STATS_FILE, DriftMonitor, load_stats
from rlfleet_agents.policy import OnnxPolicy

pytestmark = pytest.mark.figures

REQUESTS = 20_000


def episode_traffic(policy: OnnxPolicy, clients: int, rows: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``clients`` envs stepped in lockstep by the policy (each resets itself at its episode's end),
    for ``rows`` observations in all: [steps, clients, 4] observations and [steps, clients] actions."""
    env = gym.make_vec("CartPole-v1", num_envs=clients, vectorization_mode="vector_entry_point")
    try:
        obs, _ = env.reset(seed=seed)
        xs, acts = [], []
        for _ in range(-(-rows // clients)):
            a = policy.act(np.asarray(obs, np.float32))
            xs.append(np.array(obs, np.float32))
            acts.append(np.array(a))
            obs, *_ = env.step(a)
    finally:
        env.close()
    return np.stack(xs), np.stack(acts)


def serve(stats: dict, x: np.ndarray, a: np.ndarray) -> list[dict]:
    """Every recomputation of a DriftMonitor fed one observation per request, in order."""
    seen: list[dict] = []
    mon = DriftMonitor(stats, obs_dim=x.shape[1], on_update=seen.append)
    for i in range(len(x)):
        mon.observe(x[i : i + 1], a[i : i + 1])
    assert len(seen) == (len(x) - mon.window) // mon.every + 1
    return seen


@pytest.fixture(scope="module")
def exported(trained_root) -> tuple[OnnxPolicy, dict]:
    run = open_run(trained_root.uri, "ppo-cp")
    return OnnxPolicy(run.read_bytes("policy.onnx")), load_stats(run.read_bytes(STATS_FILE))


# one client stepping episodes back to back (16 independent envs' streams one after the other: the
# same as one env run 16 times longer), 16 clients interleaved request by request, 4 clients
@pytest.mark.parametrize(("pattern", "clients"), [("one client", 16), ("16 interleaved", 16), ("4 interleaved", 4)])
def test_real_episode_traffic_raises_no_alert_in_20000_requests(exported, pattern: str, clients: int) -> None:
    policy, stats = exported
    x, a = episode_traffic(policy, clients, REQUESTS, seed=31_337 + clients)
    if pattern == "one client":
        x, a = x.transpose(1, 0, 2), a.T  # client by client
    x, a = x.reshape(-1, 4)[:REQUESTS], a.reshape(-1)[:REQUESTS]
    seen = serve(stats, x, a)
    worst = np.max([s["psi"] for s in seen], axis=0)
    alerts = sum(s["alert"] for s in seen)
    print(f"{pattern}: max PSI per feature {worst.round(3).tolist()}, action shift "
          f"{max(s['action_shift'] for s in seen):.3f}, alerts {alerts} of {len(seen)} recomputations")
    assert alerts == 0, (pattern, worst.round(3).tolist(), seen[-1].get("psi_alert"))


def test_export_calibrates_each_features_alert_level_from_its_episodes(exported) -> None:
    """The levels come from the export's own episodes replayed as serving sees them: the cart's slow
    position/velocity get high levels, the pole's faster angle/angular velocity lower ones."""
    _, stats = exported
    cal = stats["calibration"]
    # the 10 evaluation episodes ran as 10 env slots: replayed as 1, 2, 4, 8 and 10 clients interleaved
    assert cal["replays"] == ["1 client", "2 clients", "4 clients", "8 clients", "10 clients"]
    assert cal["rows_per_window"] == 1_000 and cal["windows"] == 5 * 40
    nat = [f["psi_natural"] for f in stats["features"]]
    levels = [f["psi_alert"] for f in stats["features"]]
    assert levels == pytest.approx([max(PSI_ALERT, CAL_MARGIN * v) for v in nat], abs=1e-5)
    assert min(nat[0], nat[1]) > 1.0 and max(nat[2], nat[3]) < min(nat[0], nat[1]), nat
    print(f"natural PSI {nat}, alert levels {levels}")


def _first_alert(stats: dict, x: np.ndarray, a: np.ndarray, j: int, stds: float) -> tuple[int | None, dict]:
    """(requests until the alert or None within 2,000, the last snapshot): a full window of real
    traffic, then the same traffic with feature ``j`` moved by ``stds`` training standard deviations."""
    mon = DriftMonitor(stats, obs_dim=4)
    mon.observe(x[:1_000], a[:1_000])
    assert not mon.snapshot()["alert"]
    shifted = x[1_000:].copy()
    shifted[:, j] += stds * stats["features"][j]["std"]
    fired = next((i + 1 for i in range(2_000)
                  if (mon.observe(shifted[i : i + 1], a[1_000 + i : 1_001 + i]), mon.snapshot()["alert"])[1]), None)
    return fired, mon.snapshot()


@pytest.mark.parametrize("pattern", ["one client", "16 interleaved"])
def test_real_traffic_shift_of_a_pole_feature_alerts_within_2000_requests(exported, pattern: str) -> None:
    """What the calibrated levels still catch on real traffic: the pole's angle moved by one training
    standard deviation (the issue's bound). The angular velocity and the cart's features are caught
    or not depending on the policy's own natural variability (their levels are 3x it): printed, not
    asserted (docs/serving.md; this policy's angular velocity needed more than 2 std, an earlier one's
    2 std)."""
    policy, stats = exported
    x, a = episode_traffic(policy, 16, 3_000, seed=4_242)
    if pattern == "one client":
        x, a = x.transpose(1, 0, 2), a.T
    x, a = x.reshape(-1, 4)[:3_000], a.reshape(-1)[:3_000]
    fired, snap = _first_alert(stats, x, a, 2, 1)
    assert fired is not None and int(np.argmax(snap["score"])) == 2, snap["score"]
    print(f"{pattern}: feature 2 +1 std alerted after {fired} requests, score {snap['score']}")
    for stds in (2, 3, 4):
        fired, snap = _first_alert(stats, x, a, 3, stds)
        print(f"{pattern}: feature 3 +{stds} std: {f'alert after {fired} requests' if fired else 'no alert'}, "
              f"score {snap['score']}")
