"""Serving observability and drift end to end (issue 11 parts 5 and 6): the trained run's
policy_stats.json, a real PolicyApp on uvicorn fed over HTTP (drift alert, audit log without the
token, status file), and a deploy run of a policy without statistics."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest

from rlfleet.artifacts import open_run
from rlfleet_agents.audit import AuditLog, read_audit
from rlfleet_agents.drift import PSI_ALERT, STATS_FILE, DriftMonitor, StatsRecorder, compute_stats, load_stats
from rlfleet_agents.evaluate import evaluate
from rlfleet_agents.policy import OnnxPolicy
from rlfleet_agents.serve import PolicyApp, bind_socket, make_server
from rlfleet_agents.servemetrics import STATUS_FILE, ServeObserver

pytestmark = pytest.mark.figures

TOKEN = "observe-secret-token-5f0c1e"


def test_train_run_exports_policy_stats_in_its_manifest(trained_root) -> None:
    run = open_run(trained_root.uri, "ppo-cp")
    assert STATS_FILE in run.verify().files  # hashed like policy.onnx
    stats = load_stats(run.read_bytes(STATS_FILE))
    assert stats["source"].startswith("final evaluation of policy.onnx: ")
    assert 0 < stats["samples"] <= 20_000 and len(stats["features"]) == 4
    for f in stats["features"]:
        assert len(f["edges"]) == 9 and abs(sum(f["fractions"]) - 1) < 1e-9 and f["std"] > 0
        assert f["edges"] == sorted(f["edges"]) and len(f["ks_quantiles"]) == 99
    fr = stats["actions"]["fractions"]
    assert len(fr) == 2 and abs(sum(fr) - 1) < 1e-9 and min(fr) > 0.2  # a balancing policy pushes both ways


@pytest.fixture
def served(trained_root, tmp_path: Path) -> Iterator[dict]:
    """A PolicyApp with drift, audit (every request) and status publishing, on uvicorn in a thread."""
    src = open_run(trained_root.uri, "ppo-cp")
    policy = OnnxPolicy(src.read_bytes("policy.onnx"))
    # statistics of the pool the traffic is drawn from (fresh episodes: the exported ones come from the
    # run's own 10 evaluation episodes, and CartPole's per-episode state distributions differ; see
    # docs/serving.md), computed by the same code as at export
    rec = StatsRecorder(policy.act, seed=5)
    evaluate(rec, "CartPole-v1", 6, seed=777)
    pool, actions = rec.sample()
    # the test's traffic draws rows of the pool at random (i.i.d.), so the levels are calibrated on the
    # pool in a random order, the way that traffic arrives. Calibrated on the episodes as recorded, they
    # belong to the policy (e.g. cart velocity 1.87, above the +1 std shift's PSI of 1.30 after 800
    # requests, for a policy trained on another CPU's BLAS): episode traffic is test_drift_episodes.py
    perm = np.random.default_rng(11).permutation(len(pool))
    pool, actions = pool[perm], actions[perm]
    stats = compute_stats(pool, actions, action_kind="discrete", n_actions=2, source="test pool")
    (tmp_path / "root").mkdir()
    arts = open_run(f"file://{tmp_path / 'root'}", "dep-obs")
    labels = {"deployment": "cartpole", "version": "ppo-cp", "replica": "dep-obs"}
    observer = ServeObserver(labels=labels, drift=DriftMonitor(stats, obs_dim=4),
                             audit=AuditLog(arts.write_text, rate=1.0, **labels),
                             publish=arts.write_json, publish_every_s=0.3)
    app = PolicyApp(policy, "cartpole", hashlib.sha256(TOKEN.encode()).hexdigest(), observer=observer)
    sock = bind_socket("127.0.0.1", None, [])
    server = make_server(app)

    def _serve() -> None:  # the server's own loop (uvloop): asyncio's default loop in a thread answers in ~45 ms
        with asyncio.Runner(loop_factory=server.config.get_loop_factory()) as runner:
            runner.run(server.serve(sockets=[sock]))

    thread = threading.Thread(target=_serve, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.02)
    assert server.started
    try:
        yield {"url": f"http://127.0.0.1:{sock.getsockname()[1]}", "arts": arts, "observer": observer,
               "policy": policy, "stats": stats, "pool": pool, "dir": tmp_path / "root" / "runs" / "dep-obs"}
    finally:
        server.should_exit = True
        thread.join(15)
        observer.close()


def test_policy_app_drift_alert_audit_log_and_status(served: dict) -> None:
    """1,000 observations drawn from the statistics' distribution raise no alert; then feature 1 moves
    by one standard deviation and the alert comes within 1,000 requests. Every request is in the
    audit log with its observation and action, and nothing there carries the token or a header."""
    stats, observer = served["stats"], served["observer"]
    pool = served["pool"]
    rng = np.random.default_rng(0)
    normal = pool[rng.integers(0, len(pool), 1_000)]
    shifted = pool[rng.integers(0, len(pool), 1_000)].copy()
    shifted[:, 1] += stats["features"][1]["std"]
    sent, got = [], []
    with httpx.Client(base_url=served["url"], headers={"Authorization": f"Bearer {TOKEN}"}) as c:
        for rows in np.split(normal, 100):  # batches of 10 observations fill the window in 100 requests
            r = c.post("/v1/policies/cartpole/act", json={"observations": rows.tolist()})
            sent.append(rows.tolist())
            got.append(r.json()["actions"])
        calm = observer.drift.snapshot()
        fired = None
        for i, row in enumerate(shifted):  # then one observation per request, until the alert
            r = c.post("/v1/policies/cartpole/act", json={"observations": [row.tolist()]})
            sent.append([row.tolist()])
            got.append(r.json()["actions"])
            if observer.drift.snapshot()["alert"]:
                fired = i + 1
                break
        assert c.post("/v1/policies/cartpole/act", json={"observations": [[1.0]]}).status_code == 422
        assert httpx.post(served["url"] + "/v1/policies/cartpole/act", json={}).status_code == 401
    assert calm["filled"] == 1_000 and not calm["alert"] and calm["max_psi"] < PSI_ALERT, calm
    assert fired is not None and fired <= 1_000, observer.drift.snapshot()
    snap = observer.drift.snapshot()
    assert int(np.argmax(snap["psi"])) == 1
    print(f"unshifted max PSI {calm['max_psi']}; alert after {fired} shifted requests; PSI {snap['psi']}")
    observer.publish_now()
    status = json.loads((served["dir"] / STATUS_FILE).read_text())
    assert status["requests"] == 102 + fired and status["errors"] == 2 and status["observations"] == 1_000 + fired
    assert status["drift"]["alert"] and status["version"] == "ppo-cp" and status["audit"]["dropped"] == 0
    arts = served["arts"]
    lines = read_audit(lambda: arts.list_files(), arts.read_live)
    assert len(lines) == 100 + fired and [e["batch"] for e in lines[99:101]] == [10, 1]
    assert [np.asarray(e["observations"]) for e in lines] == [pytest.approx(np.asarray(s), rel=1e-6) for s in sent]
    assert [e["actions"] for e in lines] == got
    first = lines[0]
    assert set(first) == {"ts", "deployment", "version", "replica", "latency_ms", "batch", "observations", "actions"}
    assert first["version"] == "ppo-cp" and first["replica"] == "dep-obs" and 0 < first["latency_ms"] < 1000
    blob = b"".join(p.read_bytes() for p in served["dir"].rglob("*") if p.is_file())
    assert TOKEN.encode() not in blob and b"Bearer" not in blob and b"authorization" not in blob.lower()
    segs = sorted(p.name for p in (served["dir"] / "audit").iterdir())
    assert len(segs) >= 2 and all(s.startswith("dep-obs-") and s.endswith(".jsonl") for s in segs)
    # rlfleet drift RUN_ID reads the published status from the store
    env = {"RLFLEET_HOME": str(served["dir"].parents[1])}
    r = _cli("drift", "dep-obs", env=env)
    assert r.returncode == 0, r.stderr
    cells = [ln.replace("\u2502", " ").split() for ln in r.stdout.splitlines()]  # table rows between | borders
    rows = {c[0]: c for c in cells if c and c[0].isdigit()}
    assert rows["1"][-1] == "DRIFT" and all(rows[j][-1] != "DRIFT" for j in "023"), r.stdout
    assert "ALERT: the served traffic drifted" in r.stdout and "cartpole version ppo-cp" in r.stdout
    r = _cli("drift", "dep-obs", "--json", env=env)
    assert json.loads(r.stdout)["drift"]["psi"] == status["drift"]["psi"]
    r = _cli("drift", "rl-nope", env=env)
    assert r.returncode != 0 and r.stderr.strip().count("\n") == 0 and "no run 'rl-nope'" in r.stderr


def _cli(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(Path(sys.executable).parent / "rlfleet"), *args], capture_output=True, text=True,
                          timeout=120, env={**os.environ, **env, "COLUMNS": "200"}, stdin=subprocess.DEVNULL)


def test_deploy_run_of_a_policy_without_stats_serves_and_says_drift_is_unavailable(trained_root) -> None:
    """An older run (no policy_stats.json) still deploys; the deploy run's status says why there is no
    drift, and its audit log (every request here) holds the requests but never the token."""
    import shutil
    import signal

    old = trained_root.run_dir("ppo-old")
    shutil.copytree(trained_root.run_dir("ppo-cp"), old)
    (old / STATS_FILE).unlink()
    manifest = json.loads((old / "manifest.json").read_text())
    del manifest["files"][STATS_FILE]
    (old / "manifest.json").write_text(json.dumps(manifest))
    proc = trained_root.start("dep-old", {"kind": "deploy", "source": "ppo-old",
                                          "deploy": {"name": "cartpole", "audit_rate": 1.0}},
                              source_uri=trained_root.src("ppo-old"),
                              serve_token_sha256=hashlib.sha256(TOKEN.encode()).hexdigest())
    run_dir = trained_root.run_dir("dep-old")
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not (run_dir / "manifest.json").exists():
        assert proc.poll() is None, proc.communicate()[1]
        time.sleep(0.05)
    ep = json.loads((run_dir / "endpoint.json").read_text())
    obs = [[0.01, -0.02, 0.03, 0.0], [0.0, 0.1, -0.01, 0.2]]
    with httpx.Client(base_url=ep["url"], headers={"Authorization": f"Bearer {TOKEN}"}) as c:
        acts = [c.post(ep["path"], json={"observations": [o]}).json()["actions"] for o in obs]
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    assert "drift: the policy has no policy_stats.json" in out
    status = json.loads((run_dir / STATUS_FILE).read_text())
    assert status["drift"]["available"] is False and "retrain or re-export" in status["drift"]["reason"]
    assert status["requests"] == 2 and status["version"] == "ppo-old" and status["replica"] == "dep-old"
    arts = open_run(trained_root.uri, "dep-old")
    lines = read_audit(lambda: arts.list_files(), arts.read_live)
    assert [e["observations"][0] for e in lines] == [pytest.approx(o, rel=1e-6) for o in obs]  # float32 as sent
    assert [e["actions"] for e in lines] == acts
    blob = b"".join(p.read_bytes() for p in run_dir.rglob("*") if p.is_file())
    assert TOKEN.encode() not in blob
    r = _cli("drift", "dep-old", env={"RLFLEET_HOME": str(trained_root.root)})
    assert r.returncode == 0 and "drift unavailable: the policy has no policy_stats.json" in r.stdout, r.stderr
