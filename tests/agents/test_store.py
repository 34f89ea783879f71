"""A run against an s3:// artifact root (real moto server): metrics go out as segments while it runs
and as one metrics.jsonl at the end, manifest committed last; and a PPO checkpoint + resume through s3."""

from __future__ import annotations

import subprocess
from pathlib import Path

import boto3

from rlfleet.artifacts import open_run

REPO = Path(__file__).resolve().parents[2]


def test_runs_on_s3_root(moto_reset: str, runner_cls) -> None:
    boto3.client("s3", endpoint_url=moto_reset).create_bucket(Bucket="runs")
    root, opts = "s3://runs/team", {"client_kwargs": {"endpoint_url": moto_reset}}

    def _run(root: str, run_id: str, spec: dict, opts: dict, **fields) -> subprocess.CompletedProcess:
        return runner_cls(REPO, uri=root, storage_options=opts).run(run_id, spec, cwd=REPO, **fields)

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
               resume_uri=f"{root}/runs/ppo1")
    assert out.returncode == 0, out.stderr
    m2 = open_run(root, "ppo2", storage_options=opts).verify()
    assert m2.extra["resumed_from"] == {"run_id": "ppo1", "step": first}
    assert "policy.onnx" in m2.files
