"""Helpers for the agents tests: run ``python -m rlfleet_agents.run`` as a real process with the
run envelope the SDK would send, against a file:// artifact root in a temp dir (or any fsspec URI)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[2]
PYTHONPATH = os.pathsep.join([str(REPO / "sdk"), str(REPO / "agents")])


class Runner:
    """Starts runs the way a cluster does: ``python -m rlfleet_agents.run`` with RLFLEET_ENVELOPE.

    Keyword arguments of ``env``/``start``/``run`` are RunEnvelope fields (source_uri=,
    resume_uri=, env_from_source=, serve_token_sha256=, ...).
    """

    def __init__(self, root: Path, uri: str | None = None, storage_options: dict[str, Any] | None = None) -> None:
        self.root = root
        self.uri = uri or f"file://{root}"
        self.storage_options = storage_options or {}

    def env(self, run_id: str, spec: dict[str, Any], **fields: Any) -> dict[str, str]:
        from rlfleet.envelope import RunEnvelope
        from rlfleet.spec import RunSpec

        envelope = RunEnvelope(run_id=run_id, artifact_root=self.uri, storage_options=self.storage_options,
                               spec=RunSpec.model_validate(spec), target="test", **fields)
        env = {k: v for k, v in os.environ.items() if not k.startswith(("RLFLEET_", "RAY_"))}
        env.update(PYTHONPATH=PYTHONPATH, **envelope.to_env())
        return env

    def start(self, run_id: str, spec: dict[str, Any], cwd: Path | None = None, **fields: Any) -> subprocess.Popen:
        return subprocess.Popen([sys.executable, "-m", "rlfleet_agents.run"], env=self.env(run_id, spec, **fields),
                                cwd=cwd or self.root, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def run(self, run_id: str, spec: dict[str, Any], cwd: Path | None = None, timeout: float = 120,
            **fields: Any) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "rlfleet_agents.run"], env=self.env(run_id, spec, **fields),
                              cwd=cwd or self.root, capture_output=True, text=True, timeout=timeout)

    def run_dir(self, run_id: str) -> Path:
        return self.root / "runs" / run_id

    def src(self, run_id: str) -> str:
        return f"{self.uri}/runs/{run_id}"

    def manifest(self, run_id: str) -> dict[str, Any]:
        return json.loads((self.run_dir(run_id) / "manifest.json").read_text())


@pytest.fixture
def runner_cls() -> type[Runner]:
    return Runner


@pytest.fixture
def runner(tmp_path: Path) -> Runner:
    (tmp_path / "root").mkdir()
    return Runner(tmp_path / "root")


@pytest.fixture(scope="session")
def trained_root(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Runner]:
    """One solved PPO CartPole run (through the real entrypoint), shared by eval/serve tests. Its
    rollout and update shape are spelled out (the CartPole defaults before e2f34ad), not taken from
    the defaults: the drift tests' calibrated levels and figures belong to this policy, and tuning
    the defaults for sample efficiency must not change what they measure."""
    root = tmp_path_factory.mktemp("trained") / "root"
    root.mkdir()
    r = Runner(root)
    t0 = time.monotonic()
    out = r.run("ppo-cp", {"kind": "train", "agent": "ppo", "env": "CartPole-v1", "seed": 4,
                           "budget": {"steps": 60_000},
                           "config": {"eval_every": 10_000, "stop_at_return": 475, "num_envs": 32,
                                      "num_steps": 64, "update_epochs": 4, "num_minibatches": 4}})
    assert out.returncode == 0, out.stderr
    print(f"trained ppo-cp in {time.monotonic() - t0:.1f} s")
    yield r

