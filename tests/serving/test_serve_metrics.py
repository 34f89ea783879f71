"""A deploy run's serving metrics reach Ray's Prometheus export on the shared local cluster (issue 11
part 5): requests, latency, batch size, errors and the drift gauges, with the deployment, version
and replica labels, read from the node's metrics endpoint the way Prometheus scrapes it."""

from __future__ import annotations

import json
import re
import subprocess
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np


def _scrape(st: dict[str, Any]) -> str:
    """Every metrics endpoint Ray lists for its Prometheus, fetched inside the cluster's namespace."""
    sd = json.loads((Path(st["temp_dir"]) / "prom_metrics_service_discovery.json").read_text())
    targets = [t for group in sd for t in group["targets"]]
    prefix = ["nsenter", f"--net=/proc/{st['holder_pid']}/ns/net"] if st.get("isolation") == "netns" else []
    out = []
    for t in targets:
        r = subprocess.run([*prefix, "curl", "-s", "--max-time", "10", f"http://{t}/metrics"],
                           capture_output=True, text=True, timeout=30)
        out.append(r.stdout)
    return "\n".join(out)


def _samples(text: str, name: str, run_id: str) -> list[tuple[dict[str, str], float]]:
    got = []
    for line in text.splitlines():
        if line.startswith(name + "{") and f'run_id="{run_id}"' in line:
            labels, value = line[len(name) + 1 :].rsplit("} ", 1)
            got.append((dict(re.findall(r'(\w+)="([^"]*)"', labels)), float(value)))
    return got


def test_deploy_run_exports_serving_metrics_through_ray(local_cluster: Any, serving_runs: dict[str, str]) -> None:
    from rlfleet import RunSpec, submit_run
    from rlfleet.local import read_state

    source = serving_runs["ppo"]
    dep = submit_run(RunSpec(kind="deploy", source=source, deploy={"name": "metrics-cp"},
                             resources={"cpus": 0.25}), target="local")
    try:
        dep.result(timeout=180)
        ep = dep.endpoint()
        rng = np.random.default_rng(0)
        with httpx.Client(headers={"Authorization": f"Bearer {ep.token}"}, timeout=30) as c:
            for _ in range(20):
                assert c.post(ep.act_url, json={"observations": [[0.0, 0.01, -0.02, 0.0]]}).status_code == 200
            big = rng.normal(0, 0.05, (1_000, 4)).tolist()  # fills the drift window in one request
            assert c.post(ep.act_url, json={"observations": big}).status_code == 200
            assert c.post(ep.act_url, json={"observations": [[1.0]]}).status_code == 422
        want = {"deployment": "metrics-cp", "version": source, "replica": dep.run_id}
        st = read_state()
        deadline = time.monotonic() + 90  # Ray's agent exports every few seconds
        text = ""
        while time.monotonic() < deadline:
            text = _scrape(st)
            if _samples(text, "ray_rlfleet_serve_drift_psi", dep.run_id) and \
                    _samples(text, "ray_rlfleet_serve_errors_total", dep.run_id):
                break
            time.sleep(3)
        requests = _samples(text, "ray_rlfleet_serve_requests_total", dep.run_id)
        status = json.loads(dep.artifacts().read_live("serve_status.json"))
        assert requests, (status, [ln for ln in text.splitlines() if "rlfleet" in ln][:20])
        assert status["metrics"] == {"enabled": True, "connected": True, "error": None}
        by_code = {lab["code"]: v for lab, v in requests}
        assert by_code["200"] == 21 and by_code["422"] == 1
        for lab, _ in requests:
            assert {k: lab[k] for k in want} == want
        (errors,) = _samples(text, "ray_rlfleet_serve_errors_total", dep.run_id)
        assert errors[0]["code"] == "422" and errors[1] == 1
        lat = dict((lab["le"], v) for lab, v in _samples(text, "ray_rlfleet_serve_latency_seconds_bucket",
                                                         dep.run_id))
        assert lat["+Inf"] == 22
        batch = dict((lab["le"], v) for lab, v in _samples(text, "ray_rlfleet_serve_batch_size_bucket", dep.run_id))
        assert batch["1.0"] == 20 and batch["+Inf"] == 21  # 20 single observations, one batch of 1,000
        psi = {lab["feature"]: v for lab, v in _samples(text, "ray_rlfleet_serve_drift_psi", dep.run_id)}
        assert sorted(psi) == ["0", "1", "2", "3"] and all(v >= 0 for v in psi.values())
        # the alerting gauge: PSI / the feature's level calibrated at export (status: psi_alert)
        score = {lab["feature"]: v for lab, v in _samples(text, "ray_rlfleet_serve_drift_score", dep.run_id)}
        levels = status["drift"]["psi_alert"]
        assert sorted(score) == sorted(psi) and all(lv >= 0.2 for lv in levels)
        assert all(abs(score[j] - psi[j] / levels[int(j)]) < 1e-4 for j in psi), (score, psi, levels)
        assert _samples(text, "ray_rlfleet_serve_action_shift", dep.run_id)
    finally:
        dep.cancel()
