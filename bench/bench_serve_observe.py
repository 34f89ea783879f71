"""What serving observability costs per request: drift window + audit sampling + metrics hook.

1. In process: ``ServeObserver.request()`` + ``answered()`` per batch-1 request (drift on a 4-feature
   window of 1,000 with a recomputation every 100 rows, audit at 1 %, no Ray), vs nothing.
2. End to end, as bench_serving.py measures it (wrk on 127.0.0.1, keep-alive, bounded in time): two
   deploy runs of the same policy, one whose source run has policy_stats.json and audit_rate 0.01
   ("observed"), one without statistics and with audit_rate 0 ("bare"); concurrency 1 and 16,
   measured alternately so both see the same background load.

Usage: PYTHONPATH=sdk:agents .venv/bin/python bench/bench_serve_observe.py [--duration 5] [--json-out F]
Default run: ~1 minute.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, os.path.dirname(__file__))
from bench_serving import REPO, _free_port, make_source_run, wrk
from common import emit, machine


def in_process(n: int = 50_000) -> dict[str, float]:
    from rlfleet_agents.audit import AuditLog
    from rlfleet_agents.drift import DriftMonitor, compute_stats
    from rlfleet_agents.servemetrics import ServeObserver

    rng = np.random.default_rng(0)
    x = rng.normal(0, 1, (20_000, 4)).astype(np.float32)
    stats = compute_stats(x, (x[:, 2] > 0).astype(np.int64), action_kind="discrete", n_actions=2, source="bench")
    labels = {"deployment": "b", "version": "1", "replica": "r"}
    observer = ServeObserver(labels=labels, drift=DriftMonitor(stats, obs_dim=4),
                             audit=AuditLog(lambda rel, text: None, rate=0.01, **labels))
    rows = [x[i : i + 1] for i in range(1_000)]
    acts = [np.array([i % 2], np.int64) for i in range(1_000)]
    t0, c0 = time.perf_counter(), time.process_time()
    for i in range(n):
        observer.answered(rows[i % 1_000], acts[i % 1_000], 0.0003)
        observer.request(0.0003, 200)
    wall, cpu = (time.perf_counter() - t0) / n, (time.process_time() - c0) / n
    observer.close()
    # CPU time is the cost; wall time also holds whatever else the machine runs (load average below)
    return {"requests": n, "cpu_us_per_request": round(cpu * 1e6, 2), "wall_us_per_request": round(wall * 1e6, 2),
            "load_average_1m": round(os.getloadavg()[0], 2)}


def start(root: Path, run_id: str, source: str, token: str, audit_rate: float) -> tuple[subprocess.Popen, str]:
    from rlfleet.envelope import RunEnvelope
    from rlfleet.spec import RunSpec

    envelope = RunEnvelope(
        run_id=run_id, artifact_root=f"file://{root}", source_uri=f"file://{root}/runs/{source}", target="bench",
        spec=RunSpec(kind="deploy", source=source, deploy={"name": "cartpole", "port": _free_port(),
                                                           "audit_rate": audit_rate}),
        serve_token_sha256=hashlib.sha256(token.encode()).hexdigest(),
    )
    env = {**{k: v for k, v in os.environ.items() if not k.startswith(("RLFLEET_", "RAY_"))},
           "PYTHONPATH": f"{REPO / 'sdk'}:{REPO / 'agents'}", **envelope.to_env()}
    proc = subprocess.Popen([sys.executable, "-m", "rlfleet_agents.run"], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    ep = root / "runs" / run_id / "endpoint.json"
    deadline = time.monotonic() + 60
    while not ep.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"{run_id} did not start: {proc.stderr.read().decode() if proc.stderr else ''}")
        time.sleep(0.05)
    e = json.loads(ep.read_text())
    return proc, e["url"] + e["path"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--duration", type=int, default=5, help="seconds per wrk run")
    ap.add_argument("--json-out")
    args = ap.parse_args()
    result: dict[str, Any] = {"machine": machine(), "in_process": in_process()}
    print(f"in process: {result['in_process']}", file=sys.stderr)
    if not shutil.which("wrk"):
        sys.exit("wrk is not installed (apt-get install wrk)")
    tmp = Path(tempfile.mkdtemp(prefix="rlfo-", dir="/tmp"))
    token = secrets.token_urlsafe(24)
    root = tmp / "root"
    procs: list[subprocess.Popen] = []
    try:
        from rlfleet.artifacts import open_run
        from rlfleet_agents.drift import STATS_FILE, compute_stats

        onnx_bytes = make_source_run(root)  # "src": no statistics
        rng = np.random.default_rng(1)
        x = (rng.normal(0, 1, (20_000, 4)) * 0.05).astype(np.float32)
        stats = compute_stats(x, (x[:, 2] > 0).astype(np.int64), action_kind="discrete", n_actions=2, source="bench")
        with_stats = open_run(f"file://{root}", "src-stats")
        with_stats.write_bytes("policy.onnx", onnx_bytes)
        with_stats.write_json(STATS_FILE, stats)
        with_stats.commit()
        bare, bare_url = start(root, "dep-bare", "src", token, 0.0)
        observed, obs_url = start(root, "dep-observed", "src-stats", token, 0.01)
        procs = [bare, observed]
        rows: dict[str, list[dict[str, Any]]] = {"bare": [], "observed": []}
        for c in (1, 16):
            for _ in range(2):  # alternate: both see the same background load
                rows["bare"].append(wrk(bare_url, token, c, args.duration, tmp))
                rows["observed"].append(wrk(obs_url, token, c, args.duration, tmp))
        result["wrk"] = rows
        status = json.loads((root / "runs" / "dep-observed" / "serve_status.json").read_text()) if (
            root / "runs" / "dep-observed" / "serve_status.json").exists() else None
        result["observed_status"] = status and {k: status[k] for k in ("requests", "errors", "audit")}
        for c in (1, 16):
            b = [r["req_per_s"] for r in rows["bare"] if r["connections"] == c]
            o = [r["req_per_s"] for r in rows["observed"] if r["connections"] == c]
            result[f"observed_over_bare_req_per_s_c{c}"] = round(sum(o) / max(sum(b), 1), 3)
    finally:
        for p in procs:
            p.send_signal(signal.SIGTERM)
            p.wait(30)
        shutil.rmtree(tmp, ignore_errors=True)
    emit(result, args.json_out)


if __name__ == "__main__":
    main()
