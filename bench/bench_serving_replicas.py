"""Serving with replicas, side by side in one run: ours (a named deployment: HAProxy + N replicas on
the local target) vs Ray Serve (one application of N replicas behind its HTTP proxy), N = 1, 2, 4,
plus one deploy-run server without a balancer.

Same ONNX policy (an untrained CartPole MLP, exported and parity-checked like a train run's), same
batch-1 request, bearer token checked by every server, wrk on 127.0.0.1 (keep-alive) at concurrency
1 and 16, bounded: ``--duration`` seconds per measurement. Ours is reached through the local target's
loopback forwarder (the Ray head lives in its own network namespace), Ray Serve's proxy directly:
ours pays one more hop. Ray Serve runs in a private Ray (token auth on; in a child process, as Ray
reads its auth settings once per process) after the local target is down, so the two never share the
machine at the same time. Each measurement follows a 1 s warm-up (not recorded). Each row records the 1-minute
load average when it was measured: the machine is shared, so ratios within one run are what to read.

Usage: PYTHONPATH=sdk:agents .venv/bin/python bench/bench_serving_replicas.py [--duration 5] [--json-out F]
~3 minutes at the default duration.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, os.path.dirname(__file__))
from bench_deployments import policy_run
from bench_serving import OBS, ray_serve_deploy, ray_serve_up, ray_token_env, wrk
from common import emit, machine

CONNECTIONS = (1, 16)
REPO = Path(__file__).resolve().parents[1]


def measure(url: str, token: str, duration: int, workdir: Path) -> list[dict[str, Any]]:
    import httpx

    r = httpx.post(url, json={"observations": OBS}, headers={"Authorization": f"Bearer {token}"}, timeout=60)
    assert r.status_code == 200 and "actions" in r.json(), (url, r.status_code, r.text)
    assert httpx.post(url, json={"observations": OBS}, timeout=60).status_code == 401, url
    wrk(url, token, 16, 1, workdir)  # warm-up (new replicas, connections), not recorded
    return [{**wrk(url, token, c, duration, workdir), "load_1m": round(os.getloadavg()[0], 2)} for c in CONNECTIONS]


def ours(replicas: list[int], duration: int, home: Path) -> tuple[dict[str, Any], bytes]:
    from rlfleet import RunSpec, submit_run
    from rlfleet.deployments import deploy
    from rlfleet.local import ensure_local_up, local_down

    out: dict[str, Any] = {}
    try:
        store = ensure_local_up().store()
        src = policy_run(store, "rl-20000101-000000-bench01", 1)
        onnx = store.run(src).read_bytes("policy.onnx")
        single = submit_run(RunSpec(kind="deploy", source=src, deploy={"name": "single"}), target="local")
        single.wait(120)
        ep = single.endpoint()
        out["one_server"] = measure(ep.act_url, ep.token, duration, home)
        print(f"ours, one server: {out['one_server']}", file=sys.stderr)
        single.cancel()
        dep = deploy("bench", src, replicas=replicas[0], target="local")
        dep_ep = dep.endpoint()
        for n in replicas:
            dep.scale(n)
            out[str(n)] = measure(dep_ep.act_url, dep_ep.token, duration, home)
            print(f"ours, {n} replicas: {out[str(n)]}", file=sys.stderr)
        dep.undeploy()
    finally:
        local_down()
    return out, onnx


def ray_serve(onnx: bytes, replicas: list[int], duration: int, tmp: Path) -> dict[str, Any]:
    """In a fresh process: Ray reads its auth settings once per process, and ours already imported it."""
    (tmp / "policy.onnx").write_bytes(onnx)
    out = tmp / "ray_serve.json"
    env = {**{k: v for k, v in os.environ.items() if not k.startswith(("RLFLEET_", "RAY_"))},
           "PYTHONPATH": os.pathsep.join([str(REPO / "sdk"), str(REPO / "agents")])}
    subprocess.run([sys.executable, __file__, "--ray-serve-part", str(tmp), "--replicas",
                    ",".join(map(str, replicas)), "--duration", str(duration)], env=env, check=True,
                   timeout=600 + 60 * len(replicas) * duration)
    return json.loads(out.read_text())


def ray_serve_part(replicas: list[int], duration: int, tmp: Path) -> None:
    token = ray_token_env(tmp)  # before Ray is imported: it reads its auth settings then
    import ray
    from ray import serve

    onnx = (tmp / "policy.onnx").read_bytes()
    out: dict[str, Any] = {}
    try:
        port = ray_serve_up(tmp, num_cpus=max(2, max(replicas)))  # logical CPUs: 0.5 per replica fits
        for n in replicas:
            url = ray_serve_deploy(onnx, token, port, n)
            out[str(n)] = measure(url, token, duration, tmp)
            print(f"Ray Serve, {n} replicas: {out[str(n)]}", file=sys.stderr)
    finally:
        if ray.is_initialized():
            serve.shutdown()
            ray.shutdown()
    (tmp / "ray_serve.json").write_text(json.dumps(out))


def table(result: dict[str, Any]) -> str:
    rows = ["| system | replicas | connections | req/s | p50 | p99 | load (1 min) | req/s ours / Ray Serve |",
            "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for i, c in enumerate(CONNECTIONS):
        o = result["ours"]["one_server"][i]
        rows.append(f"| ours, one server (no balancer) | 1 | {c} | {o['req_per_s']:,} | {o['p50_ms']} ms | "
                    f"{o['p99_ms']} ms | {o['load_1m']} | |")
        for n in result["replicas"]:
            o, s = result["ours"][str(n)][i], result["ray_serve"][str(n)][i]
            ratio = result["ratio_req_per_s"][f"{n}_c{c}"]
            rows.append(f"| ours (HAProxy + replicas) | {n} | {c} | {o['req_per_s']:,} | {o['p50_ms']} ms | "
                        f"{o['p99_ms']} ms | {o['load_1m']} | **{ratio}x** |")
            rows.append(f"| Ray Serve | {n} | {c} | {s['req_per_s']:,} | {s['p50_ms']} ms | {s['p99_ms']} ms | "
                        f"{s['load_1m']} | |")
    return "\n".join(rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--duration", type=int, default=5, help="seconds per wrk run")
    ap.add_argument("--replicas", default="1,2,4", help="comma-separated replica counts")
    ap.add_argument("--json-out")
    ap.add_argument("--ray-serve-part", help=argparse.SUPPRESS)  # internal: the Ray Serve half, in its own process
    args = ap.parse_args()
    if not shutil.which("wrk") or not shutil.which("haproxy"):
        sys.exit("needs wrk and haproxy (apt-get install wrk haproxy)")
    try:
        replicas = [int(n) for n in args.replicas.split(",")]
        assert replicas and all(1 <= n <= 8 for n in replicas)
    except (ValueError, AssertionError):
        sys.exit(f"--replicas {args.replicas!r}: give comma-separated counts from 1 to 8, e.g. 1,2,4")
    if args.ray_serve_part:
        ray_serve_part(replicas, args.duration, Path(args.ray_serve_part))
        return
    tmp = Path(tempfile.mkdtemp(prefix="rlfbr-", dir="/tmp"))
    os.environ["RLFLEET_HOME"] = str(tmp / "home")
    os.environ.pop("RLFLEET_TARGET", None)
    result: dict[str, Any] = {"machine": machine(), "duration_s": args.duration, "replicas": replicas,
                              "request": {"observations": OBS}}
    try:
        result["ours"], onnx = ours(replicas, args.duration, tmp)
        result["ray_serve"] = ray_serve(onnx, replicas, args.duration, tmp)
    except BaseException:
        log = tmp / "home" / "local" / "ray-start.log"  # the local target's, removed with tmp below
        if log.exists():
            print("".join(log.read_text(errors="replace").splitlines(keepends=True)[-30:]), file=sys.stderr)
        raise
    finally:
        subprocess.run(["rm", "-rf", str(tmp)], check=False)
    result["ratio_req_per_s"] = {
        f"{n}_c{c}": round(result["ours"][str(n)][i]["req_per_s"] / max(1, result["ray_serve"][str(n)][i]["req_per_s"]),
                           1)
        for n in replicas for i, c in enumerate(CONNECTIONS)}
    result["load_avg_1m_at_end"] = round(os.getloadavg()[0], 2)
    print(table(result), file=sys.stderr)
    emit(result, args.json_out)


if __name__ == "__main__":
    main()
