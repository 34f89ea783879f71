"""A store outage in the middle of a real training run (issue 10 item 5): the run's only way to
its s3:// store (the real moto server) is a loopback TCP proxy that the test cuts for 10 s."""

from __future__ import annotations

import itertools
import socket
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

import boto3
import pytest

from rlfleet.artifacts import ArtifactStore, open_run
from rlfleet.errors import StoreUnavailable


class CuttableProxy:
    """A TCP proxy on 127.0.0.1 in front of the moto server. ``cut(True)`` resets every open
    connection and every new one (a store outage as the client sees it) until ``cut(False)``."""

    def __init__(self, upstream: str) -> None:
        self.upstream = ("127.0.0.1", int(upstream.rsplit(":", 1)[1]))
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.down = threading.Event()
        self.lock = threading.Lock()
        self.open: set[socket.socket] = set()
        self.accepted = self.reset = 0
        threading.Thread(target=self._accept, daemon=True).start()

    @staticmethod
    def _rst(sock: socket.socket) -> None:
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            sock.shutdown(socket.SHUT_RDWR)  # wakes a pump blocked in recv(); close() alone would not
        except OSError:
            pass
        sock.close()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            if self.down.is_set():
                self.reset += 1
                self._rst(client)
                continue
            try:
                server = socket.create_connection(self.upstream, timeout=5)
            except OSError:
                self._rst(client)
                continue
            self.accepted += 1
            with self.lock:
                self.open |= {client, server}
            for a, b in ((client, server), (server, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                with self.lock:
                    self.open.discard(s)
                self._rst(s)

    def cut(self, down: bool) -> None:
        if down:
            self.down.set()
            with self.lock:
                socks, self.open = list(self.open), set()
            for s in socks:
                self.reset += 1
                self._rst(s)
        else:
            self.down.clear()

    def close(self) -> None:
        self.listener.close()
        self.cut(True)


def test_store_outage_of_10_s_mid_run_loses_no_metrics_row(moto_reset: str, runner_cls, tmp_path: Path) -> None:
    """A real PPO training run; the store disappears for 10 s while it trains. The run succeeds, every
    metrics row reaches the store, and the training loop never waits for the store's metrics writes."""
    s3 = boto3.client("s3", endpoint_url=moto_reset)
    s3.create_bucket(Bucket="blip")
    proxy = CuttableProxy(moto_reset)
    root = "s3://blip/team"
    opts = {"client_kwargs": {"endpoint_url": f"http://127.0.0.1:{proxy.port}"}}
    spec = {"kind": "train", "agent": "ppo", "seed": 1, "budget": {"steps": 50_000_000, "minutes": 0.5},
            "config": {"checkpoint_every_steps": 10_000_000}}
    env = runner_cls(tmp_path, uri=root, storage_options=opts).env("blip", spec)
    env.pop("AWS_ENDPOINT_URL", None)  # nothing may bypass the proxy
    proc = subprocess.Popen([sys.executable, "-m", "rlfleet_agents.run"], env=env, cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None:
            keys = [o["Key"] for o in s3.list_objects_v2(Bucket="blip", Prefix="team/runs/blip/").get("Contents", [])]
            if any("/metrics" in k for k in keys):
                break
            time.sleep(0.2)
        assert proc.poll() is None, proc.communicate()
        t_cut = time.monotonic()
        proxy.cut(True)
        time.sleep(10)
        resets_during_outage = proxy.reset
        proxy.cut(False)
        _, err = proc.communicate(timeout=240)
        after_s = time.monotonic() - t_cut - 10
    finally:
        if proc.poll() is None:
            proc.kill()
        proxy.close()
    assert proc.returncode == 0, err
    assert resets_during_outage > 0  # the run really tried to reach the store during the outage
    run = open_run(root, "blip", storage_options={"client_kwargs": {"endpoint_url": moto_reset}})
    m = run.verify()
    rows = list(run.iter_metrics())
    steps = [r["step"] for r in rows]
    per_rollout = 32 * 64  # CartPole PPO: a row per rollout of 32 envs x 64 steps (masked autoreset steps excepted)
    gaps = [b - a for a, b in itertools.pairwise([0, *steps])]
    assert 0 < min(gaps) and max(gaps) <= per_rollout, gaps  # a lost row would leave a gap of two rollouts
    assert steps[-1] == m.extra["env_steps"]
    assert "metrics.jsonl" in m.files and not [f for f in m.files if f.startswith("metrics/")]
    times = [r["time"] for r in rows]
    stall = max(b - a for a, b in itertools.pairwise(times))
    print(f"outage: {resets_during_outage} connections reset; run ended {after_s:.1f} s after the store came "
          f"back; {len(rows)} rows, {m.extra['env_steps']} steps; longest pause between rows {stall:.2f} s")
    assert stall < 5, f"training waited {stall:.1f} s for the store (metrics must not block the training loop)"


def test_checkpoint_and_manifest_writes_ride_out_an_outage_within_their_budget(moto_reset: str) -> None:
    """The runtime opens its store with a retry budget in seconds (rlfleet_agents.run.STORE_RETRY_S,
    minutes); here the same code path with a short budget, through the cuttable proxy."""
    boto3.client("s3", endpoint_url=moto_reset).create_bucket(Bucket="ride")
    proxy = CuttableProxy(moto_reset)
    opts = {"client_kwargs": {"endpoint_url": f"http://127.0.0.1:{proxy.port}"}, "skip_instance_cache": True}
    # botocore's own retries (~10-15 s per attempt by default) off, so our budget alone decides
    quick = {**opts, "config_kwargs": {"retries": {"max_attempts": 1}, "connect_timeout": 1}}
    try:
        run = ArtifactStore("s3://ride/r", storage_options=quick, retry_s=60, max_backoff_s=1.0).run("ckpt")
        run.write_bytes("checkpoints/step_1.pt", b"weights")
        proxy.cut(True)
        threading.Timer(4.0, proxy.cut, args=(False,)).start()
        t0 = time.monotonic()
        run.write_bytes("checkpoints/step_2.pt", b"more weights")  # falls into the outage
        run.commit()
        took = time.monotonic() - t0
        assert 3.5 <= took < 15 and proxy.reset > 0
        assert open_run("s3://ride/r", "ckpt", storage_options=opts).verify().files.keys() == {
            "checkpoints/step_1.pt", "checkpoints/step_2.pt"}

        short = ArtifactStore("s3://ride/r", storage_options=quick, retry_s=2, max_backoff_s=0.5).run("short")
        proxy.cut(True)
        t0 = time.monotonic()
        with pytest.raises(StoreUnavailable, match=r"failed to .*run short after \d+ attempts over"):
            short.commit()
        assert 1.5 < time.monotonic() - t0 < 6
    finally:
        proxy.close()
    assert not open_run("s3://ride/r", "short", storage_options={"client_kwargs": {"endpoint_url": moto_reset}}
                        ).is_complete()
