"""One real MLflow tracking server per test session (fixture ``mlflow_server``), registered in
tests/conftest.py like the other session fixtures.

``mlflow server`` (the full ``mlflow`` package, dev extra) with a SQLite backend store and a file
artifact store in a temp dir, on 127.0.0.1 of the local cluster's network namespace: where the
runs are (the local head's namespace has only lo). Tests read what it stored from the SQLite store
(``MlflowClient(tracking_uri=server.store_uri)``) and the artifact directory.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

VENV_BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass(frozen=True)
class MlflowServer:
    url: str  # as the runs on the local cluster reach it
    store_uri: str  # its backend store, read by the test directly
    artifacts: Path


class _Server:
    """One MLflow tracking server process (SQLite backend store, file artifact store in ``base``) on
    127.0.0.1 of the local cluster's network namespace as it is when started."""

    def __init__(self, base: Path) -> None:
        from rlfleet.paths import read_local_state

        st = read_local_state()
        self.holder = st.get("holder_pid")
        self.enter = ["nsenter", f"--net=/proc/{self.holder}/ns/net"] if st.get("isolation") == "netns" else []
        self.base = base
        port = free_port()
        self.url = f"http://127.0.0.1:{port}"
        with open(base / "server.log", "ab") as log:
            self.proc = subprocess.Popen(
                [*self.enter, str(VENV_BIN / "mlflow"), "server", "--backend-store-uri", f"sqlite:///{base}/mlflow.db",
                 "--artifacts-destination", f"file://{base}/artifacts", "--host", "127.0.0.1", "--port", str(port),
                 "--workers", "1"],
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
        try:
            deadline = time.monotonic() + 240
            while self._curl("/health", 10):
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"mlflow server did not start: {(base / 'server.log').read_text()[-2000:]}")
                time.sleep(0.5)
            # /health answers before the tracking store exists: the first API call builds it (SQLAlchemy
            # mappers, the schema check), 4.7 s against 1.2 s for the next one at load 13 here. One
            # real call here, with room, so the runs' first calls do not pay it.
            if self._curl("/api/2.0/mlflow/experiments/search?max_results=1", 300):
                raise RuntimeError(f"mlflow server did not answer its API: {(base / 'server.log').read_text()[-2000:]}")
        except BaseException:
            self.stop()
            raise

    def _curl(self, path: str, max_time: int) -> int:
        return subprocess.run([*self.enter, "curl", "-sf", "--max-time", str(max_time), "-o", "/dev/null",
                               self.url + path]).returncode

    def current(self) -> bool:
        """Is it still in the local cluster's namespace? A test that restarts the local head (head
        down and up) gets a new namespace, where this server is unreachable."""
        from rlfleet.paths import read_local_state

        return read_local_state().get("holder_pid") == self.holder and self.proc.poll() is None

    def stop(self) -> None:
        os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:  # uvicorn's graceful shutdown can hang on open connections
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=10)


@pytest.fixture(scope="session")
def _mlflow_servers() -> Iterator[list[_Server]]:
    servers: list[_Server] = []
    yield servers
    for srv in servers:
        srv.stop()


@pytest.fixture
def mlflow_server(local_cluster, _mlflow_servers: list[_Server]) -> MlflowServer:
    """A real MLflow tracking server (SQLite backend store, file artifact store in a temp dir) on
    127.0.0.1 of the local cluster's network namespace: where the runs are (the local head's
    namespace has only lo). One for the session; started again (same store) when a test restarted
    the local head since, which gives it a new namespace (stop 17-19's CI: the sweep test's runs could
    not reach the server and logged nothing). The test reads what it stored from the SQLite store
    and the artifact directory. ~35-60 s to start on this machine under load."""
    if _mlflow_servers and not _mlflow_servers[-1].current():
        _mlflow_servers.pop().stop()
    if not _mlflow_servers:
        base = Path(tempfile.mkdtemp(prefix="rlfleet-mlflow-"))
        _mlflow_servers.append(_Server(base))
    srv = _mlflow_servers[-1]
    return MlflowServer(srv.url, f"sqlite:///{srv.base}/mlflow.db", srv.base / "artifacts")


def mlflow_run_of(server: MlflowServer, rlfleet_run_id: str, experiment: str) -> tuple[Any, Any]:
    """(client, the MLflow run) that rlfleet run ``rlfleet_run_id`` logged in ``experiment``."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=server.store_uri)
    exp = client.get_experiment_by_name(experiment)
    assert exp is not None
    found = client.search_runs([exp.experiment_id], filter_string=f"tags.`rlfleet.run_id` = '{rlfleet_run_id}'")
    assert len(found) == 1
    return client, found[0]


def assert_logged(server: MlflowServer, arts: Any, experiment: str, target: str) -> Any:
    """Check that the finished rlfleet run ``arts`` logged itself to ``server``: the manifest's record,
    status FINISHED, params (the resolved config + agent/env/seed/total_steps), provenance tags,
    every metrics row at its step, final_eval/mean, and policy.onnx byte for byte. Returns the
    MLflow run (for the caller's own checks)."""
    import hashlib

    manifest = arts.verify()
    spec = json.loads(arts.read_bytes("spec.json"))
    client, mr = mlflow_run_of(server, arts.run_id, experiment)
    assert manifest.extra["mlflow"] == {"tracking_uri": server.url, "experiment_id": mr.info.experiment_id,
                                        "run_id": mr.info.run_id, "error": None}
    assert mr.info.status == "FINISHED"
    params = mr.data.params
    assert {k: params[k] for k in ("agent", "env", "seed")} == {"agent": spec["agent"], "env": spec["env"],
                                                                 "seed": str(spec["seed"])}
    assert params["total_steps"] == str(spec["budget"]["steps"])
    for key, value in spec["config"].items():
        assert params[key] == (value if isinstance(value, str) else json.dumps(value)), key
    prov, tags = manifest.provenance, mr.data.tags
    assert prov is not None
    assert tags["rlfleet.run_id"] == arts.run_id and tags["rlfleet.target"] == target
    assert tags["rlfleet.kit_version"] == prov["kit_version"]
    assert tags["rlfleet.packages_sha256"] == prov["packages_sha256"]
    assert tags["rlfleet.code_sha256"] == (prov.get("code_sha256") or "none")  # the shipped code: directory
    assert all(tags[k] == v for k, v in spec["tags"].items()) and tags["mlflow.runName"] == spec["name"]
    # metrics: equal to metrics.jsonl, row by row, at the same steps
    rows = list(arts.iter_metrics())
    assert len(rows) >= 3
    for key in ("episode_return_mean", "steps_per_second", "losses/loss_policy"):
        history = sorted((m.step, m.value) for m in client.get_metric_history(mr.info.run_id, key))
        if key.startswith("losses/"):
            expected = [(r["step"], r["losses"][key.split("/")[1]]) for r in rows]
        else:
            expected = [(r["step"], r[key]) for r in rows if key in r]
        assert [h[0] for h in history] == [e[0] for e in expected], key
        assert [h[1] for h in history] == pytest.approx([e[1] for e in expected]), key
    final = client.get_metric_history(mr.info.run_id, "final_eval/mean")
    assert [m.value for m in final] == [manifest.extra["final_eval"]["mean"]]
    # the ONNX policy is an artifact, byte for byte the run's policy.onnx
    (stored,) = server.artifacts.glob(f"*/{mr.info.run_id}/artifacts/policy/policy.onnx")
    assert hashlib.sha256(stored.read_bytes()).hexdigest() == manifest.extra["policy_sha256"]
    return mr
