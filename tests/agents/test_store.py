"""A run against an s3:// artifact root (real moto server): metrics.jsonl is rewritten (no append
on object stores), manifest committed last; and a PPO checkpoint + resume through s3."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import boto3

from rlfleet.artifacts import open_run

REPO = Path(__file__).resolve().parents[2]


def _run(root: str, run_id: str, spec: dict, opts: dict, **extra: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RLFLEET_", "RAY_"))}
    env.update(PYTHONPATH=f"{REPO / 'sdk'}:{REPO / 'agents'}", RLFLEET_RUN_ID=run_id, RLFLEET_ARTIFACT_ROOT=root,
               RLFLEET_STORAGE_OPTIONS=json.dumps(opts), RLFLEET_SPEC=json.dumps(spec), **extra)
    return subprocess.run([sys.executable, "-m", "rlfleet_agents.run"], env=env, capture_output=True, text=True,
                          timeout=120)


def test_runs_on_s3_root(moto_reset: str) -> None:
    boto3.client("s3", endpoint_url=moto_reset).create_bucket(Bucket="runs")
    root, opts = "s3://runs/team", {"client_kwargs": {"endpoint_url": moto_reset}}
    out = _run(root, "rnd", {"kind": "train", "agent": "random", "budget": {"steps": 3000}}, opts)
    assert out.returncode == 0, out.stderr
    run = open_run(root, "rnd", storage_options=opts)
    m = run.verify()
    rows = list(run.iter_metrics())
    assert rows and rows[-1]["step"] >= 3000 and "metrics.jsonl" in m.files

    spec = {"kind": "train", "agent": "ppo", "budget": {"steps": 4000}, "config": {"checkpoint_every_steps": 2000}}
    out = _run(root, "ppo1", spec, opts)
    assert out.returncode == 0, out.stderr
    first = open_run(root, "ppo1", storage_options=opts).manifest().extra["env_steps"]
    out = _run(root, "ppo2", {**spec, "resume_from": "ppo1", "budget": {"steps": first + 2000}}, opts,
               RLFLEET_RESUME_URI=f"{root}/runs/ppo1")
    assert out.returncode == 0, out.stderr
    m2 = open_run(root, "ppo2", storage_options=opts).verify()
    assert m2.extra["resumed_from"] == {"run_id": "ppo1", "step": first}
    assert "policy.onnx" in m2.files
