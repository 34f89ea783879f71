"""Policy inference latency: ONNX Runtime vs torch eager, batch 1 and 256, on the same exported policy
(a 4-64-64-2 PPO actor for CartPole-v1, with observation normalization on).

Usage: PYTHONPATH=sdk:agents .venv/bin/python bench/bench_inference.py [--json-out F]   (~20 s)
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Any

import numpy as np

sys.path.insert(0, os.path.dirname(__file__))
from common import emit, machine, median


def _time_per_call(fn: Any, n: int, repeats: int = 5) -> float:
    for _ in range(max(10, n // 20)):
        fn()
    samples = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        samples.append((time.perf_counter() - t0) / n)
    return median(samples)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--json-out")
    args = ap.parse_args()

    import torch

    from rlfleet_agents.envs import make_vec_env, vec_space_info
    from rlfleet_agents.export import export_onnx
    from rlfleet_agents.networks import ActorCritic, DeterministicPolicy
    from rlfleet_agents.policy import OnnxPolicy

    torch.set_num_threads(1)
    torch.manual_seed(0)
    envs = make_vec_env("CartPole-v1", 2)
    info = vec_space_info(envs, "CartPole-v1")
    envs.close()
    model = ActorCritic(info, [64, 64], normalize_obs=True)
    model.norm.update(torch.randn(1000, 4))
    policy = DeterministicPolicy(model, "discrete").eval()
    ort_policy = OnnxPolicy(export_onnx(policy, info, {}), threads=1)

    result: dict[str, Any] = {"machine": machine(), "model": "PPO actor 4-64-64-2 (tanh) + obs normalizer",
                              "threads": 1, "batches": {}}
    rng = np.random.default_rng(0)
    for batch in (1, 256):
        obs = rng.normal(size=(batch, 4)).astype(np.float32)
        n = 20_000 if batch == 1 else 2_000
        t_ort = _time_per_call(lambda obs=obs: ort_policy.act(obs), n)

        def torch_call(obs: np.ndarray = obs) -> Any:
            with torch.no_grad():
                return policy(torch.from_numpy(obs))[0].numpy()

        t_torch = _time_per_call(torch_call, n)
        assert np.array_equal(ort_policy.act(obs), torch_call())
        result["batches"][str(batch)] = {"ort_us": round(t_ort * 1e6, 2), "torch_eager_us": round(t_torch * 1e6, 2),
                                         "speedup_ort": round(t_torch / t_ort, 2)}
        print(f"batch {batch}: ORT {t_ort * 1e6:.1f} us, torch {t_torch * 1e6:.1f} us", file=sys.stderr)
    emit(result, args.json_out)


if __name__ == "__main__":
    main()
