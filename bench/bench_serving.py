"""Serving: our deploy-run policy server vs a Ray Serve deployment of the same ONNX policy.

Both: batch-1 POST {"observations": [[...]]} with a bearer token checked by the server, ONNX
Runtime with 1 thread, JSON in and out, on 127.0.0.1. Load from wrk (keep-alive), bounded in
time: concurrency 1 (latency) and concurrency 16 (throughput).
Ours is started exactly as a deploy run starts it (``python -m rlfleet_agents.run``).
Ray Serve runs in a private in-process Ray (token auth on; Serve's HTTP is not covered by it).

Usage: PYTHONPATH=sdk:agents .venv/bin/python bench/bench_serving.py [--duration 8] [--json-out F]
Default run: ~1.5 minutes.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, os.path.dirname(__file__))
from common import emit, machine

REPO = Path(__file__).resolve().parents[1]
OBS = [[0.01, -0.02, 0.03, 0.04]]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _unit(v: str) -> float:
    m = re.match(r"([\d.]+)(us|ms|s)", v)
    assert m, v
    return float(m.group(1)) * {"us": 1e-3, "ms": 1.0, "s": 1000.0}[m.group(2)]


def wrk(url: str, token: str, connections: int, duration: int, workdir: Path) -> dict[str, Any]:
    script = workdir / "post.lua"
    script.write_text(
        'wrk.method = "POST"\n'
        f"wrk.body = {json.dumps(json.dumps({'observations': OBS}))}\n"
        'wrk.headers["Content-Type"] = "application/json"\n'
        f'wrk.headers["Authorization"] = "Bearer {token}"\n'
        "done = function(summary, latency, requests)\n"
        '  io.write(string.format("STATUS non2xx=%d errors=%d\\n", summary.errors.status, '
        "summary.errors.connect + summary.errors.read + summary.errors.write + summary.errors.timeout))\n"
        "end\n"
    )
    threads = 1 if connections == 1 else 2
    out = subprocess.run(["wrk", f"-t{threads}", f"-c{connections}", f"-d{duration}s", "--latency", "-s",
                          str(script), url], capture_output=True, text=True, timeout=duration + 30).stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
    p50 = _unit(re.search(r"\s50%\s+(\S+)", out).group(1))
    p99 = _unit(re.search(r"\s99%\s+(\S+)", out).group(1))
    status = re.search(r"STATUS non2xx=(\d+) errors=(\d+)", out)
    return {"connections": connections, "req_per_s": round(rps), "p50_ms": round(p50, 3), "p99_ms": round(p99, 3),
            "non_2xx": int(status.group(1)), "socket_errors": int(status.group(2))}


def make_source_run(root: Path) -> bytes:
    import torch

    from rlfleet.artifacts import open_run
    from rlfleet_agents.envs import make_vec_env, vec_space_info
    from rlfleet_agents.export import export_onnx
    from rlfleet_agents.networks import ActorCritic, DeterministicPolicy

    torch.manual_seed(0)
    envs = make_vec_env("CartPole-v1", 2)
    info = vec_space_info(envs, "CartPole-v1")
    envs.close()
    data = export_onnx(DeterministicPolicy(ActorCritic(info, [64, 64], True), "discrete"), info,
                       {"env": "CartPole-v1"})
    arts = open_run(f"file://{root}", "src")
    arts.write_bytes("policy.onnx", data)
    arts.commit()
    return data


def start_ours(root: Path, token: str) -> tuple[subprocess.Popen, str]:
    from rlfleet.envelope import RunEnvelope
    from rlfleet.spec import RunSpec

    port = _free_port()
    envelope = RunEnvelope(
        run_id="dep", artifact_root=f"file://{root}", source_uri=f"file://{root}/runs/src", target="bench",
        spec=RunSpec(kind="deploy", source="src", deploy={"name": "cartpole", "port": port}),
        serve_token_sha256=hashlib.sha256(token.encode()).hexdigest(),
    )
    env = {**{k: v for k, v in os.environ.items() if not k.startswith(("RLFLEET_", "RAY_"))},
           "PYTHONPATH": f"{REPO / 'sdk'}:{REPO / 'agents'}", **envelope.to_env()}
    proc = subprocess.Popen([sys.executable, "-m", "rlfleet_agents.run"], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    ep = root / "runs" / "dep" / "endpoint.json"
    deadline = time.monotonic() + 60
    while not ep.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"our server did not start: {proc.stderr.read().decode() if proc.stderr else ''}")
        time.sleep(0.05)
    e = json.loads(ep.read_text())
    return proc, e["url"] + e["path"]


def ray_token_env(tmp: Path) -> str:
    """A fresh token in a 0600 file that the next ray.init() uses (token auth on); the token."""
    token = secrets.token_urlsafe(24)
    token_file = tmp / "token"
    token_file.write_text(token)
    token_file.chmod(0o600)
    os.environ["RAY_AUTH_MODE"] = "token"  # never let ray.init() pick (see ../shared/notes)
    os.environ["RAY_AUTH_TOKEN_PATH"] = str(token_file)
    return token


def ray_serve_up(tmp: Path, num_cpus: int = 2) -> int:
    """A private in-process Ray (token auth from the environment) with Serve's HTTP proxy on 127.0.0.1."""
    import logging

    import ray
    from ray import serve

    port = _free_port()
    ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, logging_level=logging.WARNING,
             _temp_dir=str(tmp / "ray"), log_to_driver=False)
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    return port


def start_ray_serve(onnx_bytes: bytes, token: str, tmp: Path) -> str:
    return ray_serve_deploy(onnx_bytes, token, ray_serve_up(tmp), replicas=1)


def ray_serve_deploy(onnx_bytes: bytes, token: str, port: int, replicas: int) -> str:
    """(Re)deploy the policy as a Serve application of ``replicas`` replicas (0.5 CPU each); its URL."""
    from ray import serve

    @serve.deployment(num_replicas=replicas, ray_actor_options={"num_cpus": 0.5})
    class Policy:
        def __init__(self, model: bytes, token: str) -> None:
            import hmac

            import numpy as np

            from rlfleet_agents.policy import OnnxPolicy

            self.np, self.hmac = np, hmac
            self.policy = OnnxPolicy(model, threads=1)
            self.expected = f"Bearer {token}".encode()

        async def __call__(self, request: Any) -> Any:
            from starlette.responses import JSONResponse

            auth = request.headers.get("authorization", "").encode()
            if not auth:
                return JSONResponse({"error": "missing token"}, status_code=401)
            if not self.hmac.compare_digest(auth, self.expected):
                return JSONResponse({"error": "invalid token"}, status_code=403)
            try:
                obs = self.policy.validate((await request.json())["observations"])
            except Exception as err:
                return JSONResponse({"error": str(err)}, status_code=422)
            return JSONResponse({"actions": self.policy.actions_to_json(self.policy.act(obs))})

    serve.run(Policy.bind(onnx_bytes, token), route_prefix="/v1/policies/cartpole/act", name="bench")
    return f"http://127.0.0.1:{port}/v1/policies/cartpole/act"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--duration", type=int, default=8, help="seconds per wrk run")
    ap.add_argument("--json-out")
    args = ap.parse_args()
    if not shutil.which("wrk"):
        sys.exit("wrk is not installed (apt-get install wrk)")
    import httpx

    tmp = Path(tempfile.mkdtemp(prefix="rlfb-", dir="/tmp"))
    token = ray_token_env(tmp)
    result: dict[str, Any] = {"machine": machine(), "request": {"observations": OBS}, "duration_s": args.duration}
    root = tmp / "root"
    ours_proc = None
    try:
        onnx_bytes = make_source_run(root)
        ours_proc, ours_url = start_ours(root, token)
        ray_url = start_ray_serve(onnx_bytes, token, tmp)
        for name, url in (("ours", ours_url), ("ray_serve", ray_url)):
            r = httpx.post(url, json={"observations": OBS}, headers={"Authorization": f"Bearer {token}"}, timeout=30)
            assert r.status_code == 200 and "actions" in r.json(), (name, r.status_code, r.text)
            assert httpx.post(url, json={"observations": OBS}, timeout=30).status_code == 401, name
        for name, url in (("ours", ours_url), ("ray_serve", ray_url)):
            result[name] = [wrk(url, token, c, args.duration, tmp) for c in (1, 16)]
            print(f"{name}: {result[name]}", file=sys.stderr)
        o1, s1 = result["ours"][0], result["ray_serve"][0]
        o16, s16 = result["ours"][1], result["ray_serve"][1]
        result["ratio_req_per_s_c1"] = round(o1["req_per_s"] / max(s1["req_per_s"], 1), 1)
        result["ratio_req_per_s_c16"] = round(o16["req_per_s"] / max(s16["req_per_s"], 1), 1)
    finally:
        if ours_proc is not None:
            ours_proc.send_signal(signal.SIGTERM)
            ours_proc.wait(20)
        try:
            import ray
            from ray import serve

            if ray.is_initialized():
                serve.shutdown()
                ray.shutdown()
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    emit(result, args.json_out)


if __name__ == "__main__":
    main()
