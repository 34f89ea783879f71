"""The run entrypoint as a real process: artifacts, manifest last, errors, resume, eval, custom envs."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from rlfleet.artifacts import open_run


def test_random_agent_run_is_fast_and_committed(runner) -> None:
    t0 = time.monotonic()
    out = runner.run("rnd", {"kind": "train", "agent": "random", "budget": {"steps": 1500}})
    took = time.monotonic() - t0
    assert out.returncode == 0, out.stderr
    run = open_run(runner.uri, "rnd")
    m = run.verify()
    assert {"spec.json", "metrics.jsonl", "eval.json"} <= set(m.files)
    assert m.extra["env_steps"] >= 1500 and m.extra["kind"] == "train" and m.extra["gpu_hours"] == 0
    rows = list(run.iter_metrics())
    assert rows and rows[-1]["step"] >= 1500 and "episode_return_mean" in rows[-1]
    assert 5 < m.extra["final_eval"]["mean"] < 60  # random CartPole
    assert took < 15, f"random run took {took:.1f} s"


def test_ppo_train_run_artifacts(trained_root) -> None:
    run = open_run(trained_root.uri, "ppo-cp")
    m = run.verify()
    assert {"spec.json", "metrics.jsonl", "policy.onnx", "policy.pt", "checkpoints/latest.json"} <= set(m.files)
    ex = m.extra
    assert ex["stopped_by"] == "solved"
    solving = next(e for e in ex["evals"] if e["step"] == ex["solved_step"])
    assert solving["mean"] >= 475 and solving["confirm_mean"] >= 475  # the protocol, then confirmed
    assert ex["policy_step"] == ex["solved_step"]  # the exported policy is the one that solved
    assert ex["final_eval"]["mean"] >= 450  # ONNX policy, 10 more fresh seeds
    assert ex["parity"]["max_abs_diff"] <= 1e-5 and ex["parity"]["action_mismatches"] == 0
    assert ex["device"] == "cpu" and ex["wall_time_s"] > 0 and ex["env_steps"] == ex["solved_step"]
    rows = list(run.iter_metrics())
    keys = {"step", "episode_return_mean", "episode_return_min", "episode_return_max", "episode_length_mean",
            "steps_per_second", "losses", "learning_rate", "time"}
    assert keys <= set(rows[-1])
    assert [r["step"] for r in rows] == sorted(r["step"] for r in rows)
    assert json.loads(run.read_text("spec.json"))["agent"] == "ppo"


def test_bad_env_fails_with_one_line_and_no_manifest(runner) -> None:
    out = runner.run("bad", {"kind": "train", "agent": "ppo", "env_kwargs": {"no_such_option": 1}})
    assert out.returncode != 0
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("rlfleet: error: run bad:") and "no_such_option" in lines[0]
    assert not (runner.run_dir("bad") / "manifest.json").exists()
    assert (runner.run_dir("bad") / "spec.json").exists()  # written first
    out = runner.run("bad2", {"kind": "train", "agent": "ppo", "env": "NoSuchEnv-v0"})
    assert out.returncode != 0 and out.stderr.startswith("rlfleet: error: run bad2:") and "NoSuchEnv" in out.stderr


def test_dqn_rejects_box_actions(runner) -> None:
    out = runner.run("dqnbox", {"kind": "train", "agent": "dqn", "env": "Pendulum-v1"})
    assert out.returncode != 0 and "DQN needs a Discrete action space" in out.stderr


def test_kill_and_resume_continues_from_checkpoint(runner) -> None:
    spec = {"kind": "train", "agent": "ppo", "seed": 2, "budget": {"steps": 400_000},
            "config": {"checkpoint_every_steps": 4_000}}
    proc = runner.start("victim", spec)
    ptr = runner.run_dir("victim") / "checkpoints" / "latest.json"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not (ptr.exists() and json.loads(ptr.read_text())["step"] >= 8_000):
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)  # preemption: no chance to clean up
    proc.wait(10)
    assert not (runner.run_dir("victim") / "manifest.json").exists()
    ckpt_step = json.loads(ptr.read_text())["step"]
    assert ckpt_step >= 8_000

    out = runner.run("resumed", {**spec, "resume_from": "victim", "budget": {"steps": ckpt_step + 3_000}},
                     resume_uri=runner.src("victim"))
    assert out.returncode == 0, out.stderr
    assert f"resuming from run victim at step {ckpt_step}" in out.stdout
    run = open_run(runner.uri, "resumed")
    m = run.manifest()
    assert m.extra["resumed_from"] == {"run_id": "victim", "step": ckpt_step}
    first = next(run.iter_metrics())
    assert ckpt_step < first["step"] <= ckpt_step + 32 * 64  # one rollout after the checkpoint, not from 0
    assert m.extra["env_steps"] >= ckpt_step + 3_000
    # optimizer state carried over: Adam's step count continues
    import io

    import torch

    old = torch.load(io.BytesIO((runner.run_dir("victim") / json.loads(ptr.read_text())["path"]).read_bytes()),
                     weights_only=True)
    new_ptr = json.loads(run.read_text("checkpoints/latest.json"))
    new = torch.load(io.BytesIO(run.read_bytes(new_ptr["path"])), weights_only=True)
    old_adam = old["optimizer"]["state"][0]["step"].item()
    new_adam = new["optimizer"]["state"][0]["step"].item()
    assert new_adam > old_adam > 0


def test_sigterm_checkpoints_and_exits_without_manifest(runner) -> None:
    proc = runner.start("term", {"kind": "train", "agent": "ppo", "budget": {"steps": 400_000}})
    run = open_run(runner.uri, "term")
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and len(list(run.iter_metrics())) < 2:  # rows stream while it runs
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 143, err
    assert (runner.run_dir("term") / "checkpoints" / "latest.json").exists()
    assert not (runner.run_dir("term") / "manifest.json").exists()
    # the rows up to the stop are consolidated into metrics.jsonl
    assert (runner.run_dir("term") / "metrics.jsonl").read_text().count("\n") >= 2


def test_sigterm_after_training_still_commits_nothing(runner) -> None:
    """A stop that lands after the training loop (export, final evaluation) is still a stop: the run
    exits 143 with its checkpoint and no manifest, so a cancelled run never reads as complete (a
    sweep's pruned trial did, once: CANCELLED with a committed manifest)."""
    spec = {"kind": "train", "agent": "ppo", "budget": {"steps": 2048}, "config": {"eval_episodes": 400}}
    proc = runner.start("late-term", spec)
    onnx = runner.run_dir("late-term") / "policy.onnx"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not onnx.exists() and proc.poll() is None:
        time.sleep(0.005)
    assert onnx.exists() and proc.poll() is None, "the run never reached its export"
    proc.send_signal(signal.SIGTERM)  # during the 400-episode final evaluation
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 143, err
    assert not (runner.run_dir("late-term") / "manifest.json").exists()
    assert (runner.run_dir("late-term") / "checkpoints" / "latest.json").exists()
    assert "stopped before its commit" in err


def test_eval_run_and_compare(trained_root) -> None:
    r = trained_root
    out = r.run("rnd-base", {"kind": "train", "agent": "random", "budget": {"steps": 1000}})
    assert out.returncode == 0, out.stderr
    out = r.run("ev", {"kind": "eval", "source": "ppo-cp", "seed": 5,
                       "eval": {"episodes": 12, "compare_to": "rnd-base"}},
                source_uri=r.src("ppo-cp"))
    assert out.returncode == 0, out.stderr
    ev = open_run(r.uri, "ev").read_json("eval.json")
    assert ev["episodes"] == 12 and len(ev["returns"]) == 12 and len(ev["lengths"]) == 12
    assert ev["mean"] >= 450 and ev["min"] <= ev["mean"] <= ev["max"]
    src_manifest = r.manifest("ppo-cp")
    assert ev["policy_sha256"] == src_manifest["files"]["policy.onnx"]["sha256"]
    assert ev["compare"]["run_id"] == "rnd-base" and ev["compare"]["better"] is True
    # the torch checkpoint gives the same result as the ONNX policy
    out = r.run("ev-torch", {"kind": "eval", "source": "ppo-cp", "seed": 5,
                             "eval": {"episodes": 12, "policy_format": "torch"}},
                source_uri=r.src("ppo-cp"))
    assert out.returncode == 0, out.stderr
    assert open_run(r.uri, "ev-torch").read_json("eval.json")["returns"] == ev["returns"]


def test_eval_of_incomplete_run_is_refused(runner) -> None:
    (runner.run_dir("half") / "checkpoints").mkdir(parents=True)
    (runner.run_dir("half") / "spec.json").write_text("{}")
    out = runner.run("ev", {"kind": "eval", "source": "half"}, source_uri=runner.src("half"))
    assert out.returncode != 0
    assert "cannot evaluate run half: it is incomplete" in out.stderr
    assert not (runner.run_dir("ev") / "manifest.json").exists()


def test_eval_with_mismatched_env_is_refused(trained_root) -> None:
    out = trained_root.run("ev-mis", {"kind": "eval", "source": "ppo-cp", "env": "Pendulum-v1"},
                           source_uri=trained_root.src("ppo-cp"))
    assert out.returncode != 0 and "does not match the policy" in out.stderr and "CartPole-v1" in out.stderr


CUSTOM_ENV = '''
import gymnasium as gym
import numpy as np


class Corridor(gym.Env):
    """Walk right to the end of a corridor of `length` cells."""

    def __init__(self, length=6):
        self.length = length
        self.observation_space = gym.spaces.Box(0.0, 1.0, shape=(1,), dtype=np.float32)
        self.action_space = gym.spaces.Discrete(2)

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self.pos, self.t = 0, 0
        return np.array([0.0], dtype=np.float32), {}

    def step(self, action):
        self.pos = max(0, self.pos + (1 if action == 1 else -1))
        self.t += 1
        done = self.pos >= self.length
        obs = np.array([self.pos / self.length], dtype=np.float32)
        return obs, (1.0 if done else -0.01), done, self.t >= 50, {}


gym.register("Corridor-v0", entry_point=Corridor)
'''


def test_custom_env_module_trains(runner, tmp_path: Path) -> None:
    code = tmp_path / "code"
    code.mkdir()
    (code / "my_corridor.py").write_text(CUSTOM_ENV)
    spec = {"kind": "train", "agent": "ppo", "env": "my_corridor:Corridor-v0", "env_kwargs": {"length": 8},
            "budget": {"steps": 15_000}, "config": {"num_envs": 8, "num_steps": 32}}
    out = runner.run("custom", spec, cwd=code)
    assert out.returncode == 0, out.stderr
    m = runner.manifest("custom")
    # optimal: 8 steps right -> 1.0 - 7 * 0.01 = 0.93; a random walk rarely reaches the end in 50 steps
    assert m["extra"]["final_eval"]["mean"] == pytest.approx(0.93, abs=1e-6)
    # not importable from elsewhere: clear message
    out = runner.run("custom2", spec)
    assert out.returncode != 0 and "cannot import module 'my_corridor'" in out.stderr
    # an eval that names no env takes the source run's env and env_kwargs (submitter could not read the store)
    out = runner.run("custom-ev", {"kind": "eval", "source": "custom", "eval": {"episodes": 3}}, cwd=code,
                     source_uri=runner.src("custom"), env_from_source=True)
    assert out.returncode == 0, out.stderr
    ev_spec = json.loads((runner.run_dir("custom-ev") / "spec.json").read_text())
    assert ev_spec["env"] == "my_corridor:Corridor-v0" and ev_spec["env_kwargs"] == {"length": 8}
    assert runner.manifest("custom-ev")["files"]["spec.json"]


def test_a_run_from_another_kit_version_is_refused(runner) -> None:
    env = runner.env("other-kit", {"kind": "train", "agent": "random", "budget": {"steps": 100}})
    data = json.loads(env["RLFLEET_ENVELOPE"])
    data["kit_version"] = "0.0.1"
    env["RLFLEET_ENVELOPE"] = json.dumps(data)
    out = subprocess.run([sys.executable, "-m", "rlfleet_agents.run"], env=env, cwd=runner.root,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 1
    from rlfleet.envelope import kit_version

    assert f"submitted by rlfleet 0.0.1 but the cluster runs rlfleet {kit_version()}" in out.stderr
    assert "Traceback" not in out.stderr
    assert not runner.run_dir("other-kit").exists()  # refused before anything was written


def test_a_run_without_an_envelope_says_how_runs_start(runner) -> None:
    env = {k: v for k, v in runner.env("x", {"kind": "train"}).items() if k != "RLFLEET_ENVELOPE"}
    out = subprocess.run([sys.executable, "-m", "rlfleet_agents.run"], env=env, cwd=runner.root,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 1 and "missing RLFLEET_ENVELOPE" in out.stderr and "Traceback" not in out.stderr
