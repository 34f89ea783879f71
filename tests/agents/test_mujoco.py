"""MuJoCo continuous control (Hopper-v5) through the real run entrypoint, in one short chain:
train -> checkpoint -> resume -> ONNX export past the parity gate -> a deploy run that answers
with float action vectors on our route and on the Open Inference Protocol route.

The training itself (returns against SB3 and CleanRL) is measured in bench/bench_mujoco.py."""

from __future__ import annotations

import hashlib
import io
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np

from rlfleet.artifacts import open_run

TOKEN = "test-mujoco-token-0123456789"
OBS_DIM, ACT_DIM = 11, 3
# a few thousand steps with CleanRL's Hopper settings, rollouts cut to 512 steps to stay fast
SPEC = {"kind": "train", "agent": "ppo", "env": "Hopper-v5", "seed": 3,
        "config": {"num_steps": 512, "num_minibatches": 8, "update_epochs": 2, "eval_episodes": 2}}


def _policy_pt(runner, run_id: str) -> dict:
    import torch

    return torch.load(io.BytesIO((runner.run_dir(run_id) / "policy.pt").read_bytes()), weights_only=True)


def test_hopper_train_resume_export_serve(runner) -> None:
    t0 = time.monotonic()
    first = runner.run("hop1", {**SPEC, "budget": {"steps": 1_000}}, timeout=120)
    assert first.returncode == 0, first.stderr
    ckpt = json.loads((runner.run_dir("hop1") / "checkpoints" / "latest.json").read_text())
    assert 1_000 <= ckpt["step"] < 1_000 + 512
    # the observation normalizer's running statistics are part of the checkpoint
    import torch

    state = torch.load(io.BytesIO((runner.run_dir("hop1") / ckpt["path"]).read_bytes()), weights_only=True)
    count1 = float(state["model"]["norm.count"])
    assert count1 >= ckpt["step"] and float(state["model"]["norm.mean"].abs().sum()) > 0
    assert state["reward_scaler"]["count"] > 1

    second = runner.run("hop2", {**SPEC, "resume_from": "hop1", "budget": {"steps": ckpt["step"] + 500}},
                        resume_uri=runner.src("hop1"), timeout=120)
    assert second.returncode == 0, second.stderr
    assert f"resuming from run hop1 at step {ckpt['step']}" in second.stdout
    run = open_run(runner.uri, "hop2")
    m = run.verify()
    assert m.extra["resumed_from"] == {"run_id": "hop1", "step": ckpt["step"]}
    assert ckpt["step"] < next(run.iter_metrics())["step"] <= ckpt["step"] + 512
    assert m.extra["parity"]["action_mismatches"] == 0 and m.extra["parity"]["max_abs_diff"] <= 1e-5

    # the exported graph takes raw observations: normalization and action clipping are inside it
    saved = _policy_pt(runner, "hop2")
    sd = saved["model"]
    assert float(sd["norm.count"]) > count1  # statistics kept growing after the resume
    assert saved["spaces"]["action_kind"] == "box" and saved["spaces"]["n_actions"] == ACT_DIM
    import onnxruntime as ort

    sess = ort.InferenceSession(str(runner.run_dir("hop2") / "policy.onnx"), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    obs = np.concatenate([rng.normal(0, 1, (32, OBS_DIM)), rng.normal(0, 1e3, (8, OBS_DIM))]).astype(np.float32)
    action, raw = sess.run(["action", "raw"], {"obs": obs})
    x = np.clip((obs - sd["norm.mean"].numpy()) / np.sqrt(sd["norm.var"].numpy() + 1e-8), -10, 10)
    layers = [(sd[f"actor.{i}.weight"].numpy(), sd[f"actor.{i}.bias"].numpy()) for i in (0, 2, 4)]
    for i, (w, b) in enumerate(layers):
        x = x @ w.T + b
        if i < 2:
            x = np.tanh(x)
    np.testing.assert_allclose(raw, x, atol=1e-4)  # the Gaussian mean, from raw observations
    np.testing.assert_array_equal(action, np.clip(raw, -1.0, 1.0))
    assert action.shape == (40, ACT_DIM) and action.dtype == np.float32

    # deploy: float vectors of the action dimension on /act and on the v2 route
    proc = runner.start("hopdep", {"kind": "deploy", "source": "hop2", "deploy": {"name": "hopper"}},
                        source_uri=runner.src("hop2"), serve_token_sha256=hashlib.sha256(TOKEN.encode()).hexdigest())
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not (runner.run_dir("hopdep") / "manifest.json").exists():
            assert proc.poll() is None, proc.communicate()[1]
            time.sleep(0.05)
        ep = json.loads((runner.run_dir("hopdep") / "endpoint.json").read_text())
        auth = {"Authorization": f"Bearer {TOKEN}"}
        with httpx.Client(base_url=ep["url"], headers=auth, timeout=30) as c:
            got = c.post(ep["path"], json={"observations": obs[:3].tolist()})
            assert got.status_code == 200, got.text
            acts = got.json()["actions"]
            assert len(acts) == 3 and all(len(a) == ACT_DIM and all(isinstance(v, float) for v in a) for a in acts)
            np.testing.assert_allclose(np.array(acts), action[:3], atol=1e-6)
            bad = c.post(ep["path"], json={"observations": [[0.0] * 4]})
            assert bad.status_code == 422 and "[11]" in bad.text
            v2 = c.post(f"/v2/models/{ep['policy']}/infer", json={"inputs": [
                {"name": "obs", "shape": [3, OBS_DIM], "datatype": "FP32", "data": obs[:3].ravel().tolist()}]})
            assert v2.status_code == 200, v2.text
            out = {o["name"]: o for o in v2.json()["outputs"]}
            assert out["action"]["datatype"] == "FP32" and out["action"]["shape"] == [3, ACT_DIM]
            np.testing.assert_allclose(np.array(out["action"]["data"]).reshape(3, ACT_DIM), action[:3], atol=1e-6)
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=20)
    assert proc.returncode == 0, err
    print(f"hopper train+resume+export+serve in {time.monotonic() - t0:.1f} s")


def test_mujoco_warnings_leave_no_log_file(tmp_path: Path) -> None:
    """mujoco 4 warns that HalfCheetah's XML uses the deprecated ``settotalmass``: the warning goes
    to Python logging, not to a MUJOCO_LOG.TXT in the working directory of a run (or of the suite)."""
    code = ("import logging; logging.basicConfig()\n"
            "from rlfleet_agents.envs import make_env, make_vec_env\n"
            "make_vec_env('HalfCheetah-v5', 2).reset(seed=0)\n"
            "make_env('HalfCheetah-v5').reset(seed=1)\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert not (tmp_path / "MUJOCO_LOG.TXT").exists()
    assert "WARNING:mujoco:compiler attribute 'settotalmass' is deprecated" in out.stderr
