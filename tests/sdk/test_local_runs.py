"""Runs on the real local target: a Ray head with token auth in a private network namespace."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from rlfleet import RunSpec, RunStatus, get_run, list_runs, submit_run
from rlfleet.errors import AuthError, IncompleteRunError, RunNotFound, SpecError
from rlfleet.jobs import JobsClient

pytestmark = pytest.mark.integration
RLFLEET = str(Path(sys.executable).parent / "rlfleet")


def quick(**kw) -> RunSpec:
    base = {"kind": "train", "agent": "random", "budget": {"steps": 300}, "resources": {"cpus": 0.5}}
    base.update(kw)
    return RunSpec(**base)


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([RLFLEET, *args], capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL)


def _http_status(url: str, token: str | None) -> int:
    req = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"} if token else {})  # noqa: S310
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:  # noqa: S310 - loopback
            return int(resp.status)
    except urllib.error.HTTPError as err:
        return int(err.code)


def test_requests_without_or_with_wrong_token_are_refused(local_cluster) -> None:
    url = local_cluster.ray_address + "/api/jobs/"
    assert _http_status(url, None) == 401
    assert _http_status(url, "wrong-token") == 403
    assert _http_status(url, local_cluster.token()) == 200
    with pytest.raises(AuthError, match="refused the token"):
        JobsClient(local_cluster.ray_address, "wrong-token", target_name="local").list()
    mode = Path(local_cluster.token_source.split(":", 1)[1]).stat().st_mode & 0o777
    assert mode == 0o600


def _listeners(prefix: list[str]) -> list[tuple[str, str]]:
    out = subprocess.run([*prefix, "ss", "-Hltnp"], capture_output=True, text=True, check=True).stdout
    rows = []
    for line in out.splitlines():
        parts = line.split()
        rows.append((parts[3], " ".join(parts[5:])))
    return rows


def _is_loopback(addr: str) -> bool:
    host = addr.rsplit(":", 1)[0].strip("[]")
    return host.startswith("127.") or host in ("::1", "::ffff:127.0.0.1") or host.startswith("::ffff:127.")


def test_no_listener_on_a_routable_address(local_cluster) -> None:
    from rlfleet.local import read_state

    st = read_state()
    assert st["isolation"] == "netns"
    inside = _listeners(["nsenter", f"--net=/proc/{st['holder_pid']}/ns/net"])
    assert len(inside) >= 5, inside  # GCS, raylet, dashboard, agents ... all of Ray
    assert all(_is_loopback(a) for a, _ in inside), [r for r in inside if not _is_loopback(r[0])]
    # on the host network only the forwarder listens for us, and only on 127.0.0.1
    ray_pids = set(subprocess.run(["pgrep", "-f", st["temp_dir"]], capture_output=True, text=True).stdout.split())
    ours = {str(st["forwarder_pid"]), *ray_pids}
    host = [(a, p) for a, p in _listeners([]) if any(f"pid={pid}," in p for pid in ours)]
    assert host and all(_is_loopback(a) for a, _ in host), host
    assert not any(f"pid={pid}," in p for pid in ray_pids for _, p in host)


def test_submit_wait_logs_metrics_artifacts(local_cluster) -> None:
    run = submit_run(quick(name="smoke", seed=3))
    assert run.run_id.startswith("rl-")
    assert run.wait(timeout=180) is RunStatus.SUCCEEDED
    assert run.status().is_terminal()
    assert run.logs().strip()
    rows = run.metrics()
    assert rows and rows[-1]["step"] >= 300
    arts = run.artifacts()
    manifest = arts.verify()
    assert {"spec.json", "metrics.jsonl"} <= set(manifest.files)
    assert RunSpec.from_dict(arts.read_json("spec.json")) == run.spec
    info = get_run(run.run_id).info()
    assert info["status"] == "SUCCEEDED" and info["kind"] == "train" and info["name"] == "smoke"
    assert info["artifact_uri"].endswith(f"/runs/{run.run_id}") and info["started_at"] and info["ended_at"]
    assert run.run_id in [r.run_id for r in list_runs("local")]
    assert run.cancel() is False  # cancelling a finished run: no error, no change
    assert run.status() is RunStatus.SUCCEEDED


def test_cancel_a_running_run(local_cluster) -> None:
    run = submit_run(quick(budget={"steps": 10**10, "minutes": 5}, name="long"))
    deadline = time.monotonic() + 90
    while not (run.status() is RunStatus.RUNNING and run.metrics()):  # running and writing metrics
        assert time.monotonic() < deadline, f"run never started: {run.status()}"
        time.sleep(0.2)
    assert run.cancel() is True
    assert run.wait(timeout=60) is RunStatus.CANCELLED
    assert run.cancel() is False
    assert not run.artifacts().is_complete()  # no manifest: a cancelled run never passes for complete


def test_eight_concurrent_submissions_all_complete(local_cluster) -> None:
    runs: list = []
    errors: list = []

    def go(i: int) -> None:
        try:
            runs.append(submit_run(quick(seed=i, name=f"burst-{i}", budget={"steps": 100})))
        except Exception as err:  # pragma: no cover - reported below
            errors.append(err)

    threads = [threading.Thread(target=go, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(runs) == 8
    assert len({r.run_id for r in runs}) == 8
    assert [r.wait(timeout=300) for r in runs] == [RunStatus.SUCCEEDED] * 8
    listed = {r.run_id for r in list_runs("local")}
    assert {r.run_id for r in runs} <= listed
    for r in runs:
        assert r.artifacts().is_complete()


def test_unknown_run(local_cluster) -> None:
    with pytest.raises(RunNotFound, match="rl-nope"):
        get_run("rl-nope")
    res = cli("status", "rl-nope")
    assert res.returncode == 4 and "no run 'rl-nope'" in res.stderr


def _write_env_project(root: Path, *, broken: bool = False, name: str = "proj",
                       reward_module: str | None = None) -> Path:
    """A project with corridor_env:Corridor-v0; with ``reward_module`` the env takes its reward from
    ``<module>.reward(done)``, a package the run must install."""
    proj = root / name
    proj.mkdir()
    body = "raise RuntimeError('corridor module is broken on purpose')\n" if broken else ""
    reward = f"import {reward_module}\n_reward = {reward_module}.reward\n" if reward_module else (
        "def _reward(done):\n    return 1.0 if done else -0.01\n")
    (proj / "corridor_env.py").write_text(
        body
        + textwrap.dedent('''
        import gymnasium as gym
        import numpy as np
        from gymnasium import spaces


        class Corridor(gym.Env):
            """Walk right to the end of a corridor of `length` cells."""

            def __init__(self, length=5):
                self.length = length
                self.observation_space = spaces.Box(0.0, 1.0, (1,), np.float32)
                self.action_space = spaces.Discrete(2)
                self.pos = 0

            def reset(self, *, seed=None, options=None):
                super().reset(seed=seed)
                self.pos = 0
                return np.array([0.0], np.float32), {}

            def step(self, action):
                self.pos = max(0, self.pos + (1 if action == 1 else -1))
                done = self.pos >= self.length
                obs = np.array([self.pos / self.length], np.float32)
                return obs, _reward(done), done, False, {}


        gym.register(id="Corridor-v0", entry_point=Corridor, max_episode_steps=50)
    ''')
        + reward
    )
    return proj


def test_custom_env_shipped_with_code(local_cluster, tmp_path) -> None:
    proj = _write_env_project(tmp_path)
    spec = RunSpec(
        kind="train",
        agent="ppo",
        env="corridor_env:Corridor-v0",
        env_kwargs={"length": 4},
        code=str(proj),
        budget={"steps": 4096},
        seed=1,
        name="corridor",
    )
    run = submit_run(spec)
    assert run.wait(timeout=300) is RunStatus.SUCCEEDED, run.failure_reason()
    files = run.artifacts().verify().files
    assert "policy.onnx" in files
    assert run.metrics()[-1]["step"] >= 4096
    # eval names no env: it takes the source's env, env_kwargs and (still on this machine) its code
    ev = submit_run(RunSpec(kind="eval", source=run.run_id, eval={"episodes": 3}))
    assert ev.wait(timeout=300) is RunStatus.SUCCEEDED, ev.failure_reason()
    assert ev.spec.env == "corridor_env:Corridor-v0" and ev.spec.env_kwargs == {"length": 4}
    assert ev.artifacts().read_json("eval.json")["episodes"] == 3


def test_failed_run_exits_nonzero_with_reason(local_cluster, tmp_path) -> None:
    proj = _write_env_project(tmp_path, broken=True)
    res = cli(
        "run",
        "train",
        "--agent",
        "random",
        "--env",
        "corridor_env:Corridor-v0",
        "--code",
        str(proj),
        "--steps",
        "100",
        "--wait",
    )
    assert res.returncode == 5, res.stderr
    assert "ended FAILED" in res.stderr and "broken on purpose" in res.stderr
    assert "Traceback" not in res.stderr


def test_code_over_the_upload_limit_is_refused_before_submit(local_cluster, tmp_path, monkeypatch) -> None:
    proj = tmp_path / "big"
    proj.mkdir()
    (proj / "data.bin").write_bytes(os.urandom(64 * 1024))
    monkeypatch.setenv("RAY_max_grpc_message_size", str(32 * 1024))
    before = len(list_runs("local"))
    with pytest.raises(SpecError, match=r"0\.1 MiB of files; Ray's upload limit for a run's code is 0 MiB"):
        submit_run(quick(code=str(proj)))
    assert len(list_runs("local")) == before


def test_eval_of_an_incomplete_run_is_refused(local_cluster) -> None:
    arts = local_cluster.store().run("rl-20200101-000000-000000")
    arts.write_json("spec.json", {"kind": "train"})
    with pytest.raises(IncompleteRunError, match="incomplete"):
        submit_run(RunSpec(kind="eval", source="rl-20200101-000000-000000"))
    with pytest.raises(IncompleteRunError, match="no run 'rl-missing'"):
        submit_run(RunSpec(kind="eval", source="rl-missing"))


def test_cli_round_trip(local_cluster) -> None:
    res = cli("run", "train", "--agent", "random", "--steps", "200", "--name", "cli-run", "--wait", "--json")
    assert res.returncode == 0, res.stderr
    doc = json.loads(res.stdout)
    for key in ("run_id", "status", "kind", "target", "artifact_uri", "submitted_at", "started_at", "ended_at"):
        assert key in doc
    assert doc["status"] == "SUCCEEDED" and doc["kind"] == "train" and doc["target"] == "local"
    rid = doc["run_id"]
    listed = json.loads(cli("runs", "--json").stdout)
    assert rid in [r["run_id"] for r in listed]
    assert json.loads(cli("status", rid, "--json").stdout)["status"] == "SUCCEEDED"
    arts = json.loads(cli("artifacts", rid, "--json").stdout)
    assert arts["complete"] and arts["verified"] and any(f["path"] == "metrics.jsonl" for f in arts["files"])
    assert cli("logs", rid).returncode == 0
    res = cli("cancel", rid)
    assert res.returncode == 0 and "nothing to do" in res.stdout
    res = cli("wait", rid, "--json")
    assert res.returncode == 0 and json.loads(res.stdout)["status"] == "SUCCEEDED"


def test_local_down_stops_only_its_own_cluster(local_cluster, tmp_path, monkeypatch) -> None:
    """Two users' (or two homes') local heads on one machine: stopping one leaves the other serving."""
    from rlfleet.local import _cluster_pids, _healthy, ensure_local_up, local_down, read_state
    from rlfleet.provisioners import local as local_prov

    mine = local_cluster.ray_address  # read before RLFLEET_HOME moves: local_cluster follows the live state
    monkeypatch.setenv("RLFLEET_HOME", str(tmp_path / "other-home"))
    other = ensure_local_up(num_cpus=1)
    st = read_state()
    assert other.ray_address != mine
    assert _cluster_pids(st["temp_dir"], st["holder_pid"])
    assert local_down() is True
    assert local_prov.scan_leftovers(other) == []
    assert local_down() is False  # idempotent
    monkeypatch.undo()
    assert _healthy(local_cluster), "stopping one local head must not touch another"
