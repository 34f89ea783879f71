"""Distributed rollouts for PPO (``config.env_runners: N``): N Ray actors, spread over the cluster's
nodes, each stepping its own ``num_envs`` vectorized envs (seeded distinctly) with the weights the
learner broadcasts (one ``ray.put`` per iteration). The learner is the run's own process (Ray
places it by the spec's ``resources``: ``gpus: 1`` puts it on a GPU node) and updates on the N
batches side by side, exactly as on one batch of ``N * num_envs`` envs.

A runner that dies (its node lost, its process killed) is replaced by a new actor (fresh envs on a
new seed) and the iteration's rollouts are collected again; an exception raised by the env itself
is the user's error and fails the run at once, with its message. Ray does the placement (actor
``SPREAD`` scheduling); nothing here picks nodes.
"""

from __future__ import annotations

import os
import threading
import time
from typing import Any

import numpy as np

from rlfleet_agents.configs import PPOConfig

RETRIES_PER_ITERATION = 3  # runner replacements in one iteration before the run gives up
READY_TIMEOUT_S = float(os.environ.get("RLFLEET_RUNNER_READY_TIMEOUT_S", "300"))
_SEED_STRIDE = 1_000_003  # runner i's seeds: seed + stride * (i + 1) (+ a new offset per replacement)


class EnvRunner:
    """One env runner (a Ray actor): its own vector env, tracker and reward scaler, and a CPU copy
    of the policy network that takes the broadcast weights before every rollout."""

    def __init__(self, cfg: PPOConfig, env_id: str, env_kwargs: dict[str, Any] | None, seed: int) -> None:
        import torch

        from rlfleet_agents.envs import EpisodeTracker, make_vec_env, vec_space_info
        from rlfleet_agents.networks import ActorCritic
        from rlfleet_agents.ppo import RewardScaler

        torch.set_num_threads(1)
        torch.manual_seed(seed)
        self.cfg = cfg
        self.rng = np.random.default_rng(seed)
        self.envs = make_vec_env(env_id, cfg.num_envs, env_kwargs, mode=cfg.vectorization)
        self.info = vec_space_info(self.envs, env_id)
        self.model = ActorCritic(self.info, cfg.hidden_sizes, cfg.normalize_obs, cfg.init_log_std)
        self.obs, _ = self.envs.reset(seed=seed)
        self.tracker = EpisodeTracker(cfg.num_envs)
        self.reward_scaler = RewardScaler(cfg.num_envs, cfg.gamma) if cfg.normalize_reward else None

    def where(self) -> dict[str, Any]:
        import ray

        return {"node_id": ray.get_runtime_context().get_node_id(), "node_ip": ray.util.get_node_ip_address(),
                "pid": os.getpid()}

    def reseed(self, seed: int) -> None:
        from rlfleet_agents.envs import EpisodeTracker

        self.obs, _ = self.envs.reset(seed=seed)
        self.tracker = EpisodeTracker(self.cfg.num_envs)

    def sample(self, weights: dict[str, Any]) -> dict[str, Any]:
        from rlfleet_agents.networks import NumpyActorCritic
        from rlfleet_agents.ppo import collect_rollout

        self.model.load_state_dict(weights)
        t0 = time.monotonic()
        batch, self.obs = collect_rollout(self.cfg, self.info, self.envs, self.obs, self.tracker,
                                          self.reward_scaler, NumpyActorCritic(self.model, self.rng))
        rets, lens = self.tracker.pop()
        return {"batch": batch, "obs": self.obs, "returns": rets, "lengths": lens,
                "seconds": time.monotonic() - t0}


class RunnerPool:
    """The learner's side: start the runners, broadcast weights, gather batches, replace the dead."""

    def __init__(self, cfg: PPOConfig, env_id: str, env_kwargs: dict[str, Any] | None, seed: int) -> None:
        import ray

        connect_ray()
        self.cfg, self.env_id, self.env_kwargs, self.seed = cfg, env_id, env_kwargs, seed
        self.n = cfg.env_runners
        _check_fits(cfg)
        self.remote = ray.remote(EnvRunner)
        self.restarts = [0] * self.n
        self.placements: list[dict[str, Any]] = [{} for _ in range(self.n)]
        self.actors: list[Any] = [self._spawn(i) for i in range(self.n)]
        self._wait_ready(range(self.n))

    def _seed(self, i: int) -> int:
        return self.seed + _SEED_STRIDE * (i + 1) + 7_919 * self.restarts[i]

    def _spawn(self, i: int) -> Any:
        return self.remote.options(
            num_cpus=self.cfg.runner_cpus, scheduling_strategy="SPREAD", max_restarts=0, max_concurrency=1,
        ).remote(self.cfg, self.env_id, self.env_kwargs, self._seed(i))  # fmt: skip

    def _wait_ready(self, which: Any) -> None:
        import ray

        idx = list(which)
        refs = [self.actors[i].where.remote() for i in idx]
        ready, _ = ray.wait(refs, num_returns=len(refs), timeout=READY_TIMEOUT_S)
        if len(ready) < len(refs):
            raise RuntimeError(
                f"config.env_runners: {len(refs) - len(ready)} of {len(refs)} env runners could not be placed "
                f"within {READY_TIMEOUT_S:.0f} s ({self.cfg.runner_cpus:g} CPUs each); the cluster's free CPUs "
                "are taken: lower env_runners or runner_cpus, or add nodes"
            )
        for i, ref in zip(idx, refs, strict=True):
            self.placements[i] = {"runner": i, "restarts": self.restarts[i], **ray.get(ref)}
        print("env runners on nodes: " + ", ".join(
            f"{p['runner']}@{p['node_ip']}" for p in self.placements), flush=True)

    def nodes(self) -> list[dict[str, Any]]:
        """Where each runner runs now (index, node id and IP, pid, replacements so far)."""
        return [dict(p) for p in self.placements]

    def collect(self, model: Any) -> tuple[dict[str, np.ndarray], np.ndarray, tuple[list[float], list[int]]]:
        """One rollout from every runner with ``model``'s weights: the batches side by side (env axis),
        runner 0's last observations, the episodes finished."""
        import ray
        from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError, RayTaskError

        weights = ray.put({k: v.detach().cpu() for k, v in model.state_dict().items()})  # one broadcast
        for attempt in range(RETRIES_PER_ITERATION + 1):
            refs = [a.sample.remote(weights) for a in self.actors]
            results: list[dict[str, Any] | None] = []
            dead: list[tuple[int, Exception]] = []
            for i, ref in enumerate(refs):
                try:
                    results.append(ray.get(ref))
                except (ActorDiedError, ActorUnavailableError, RayActorError) as err:
                    results.append(None)
                    dead.append((i, err))
                except RayTaskError as err:  # the env (user code) raised: the run fails with its message
                    raise err.cause if isinstance(err.cause, Exception) else err from None
            if not dead:
                out = [r for r in results if r is not None]
                batch = {k: np.concatenate([r["batch"][k] for r in out], axis=0 if k == "next_value" else 1)
                         for k in out[0]["batch"]}
                rets = [x for r in out for x in r["returns"]]
                lens = [x for r in out for x in r["lengths"]]
                return batch, out[0]["obs"], (rets, lens)
            if attempt == RETRIES_PER_ITERATION:
                i, cause = dead[0]
                raise RuntimeError(f"env runner {i} died {RETRIES_PER_ITERATION + 1} times in one iteration: "
                                   f"{type(cause).__name__}: {str(cause).splitlines()[0]}")
            for i, cause in dead:
                print(f"env runner {i} on node {self.placements[i].get('node_ip')} died "
                      f"({type(cause).__name__}); replacing it and collecting the iteration again", flush=True)
                self.restarts[i] += 1
                self.actors[i] = self._spawn(i)
            self._wait_ready(i for i, _ in dead)
        raise AssertionError("unreachable")

    def reseed(self, seed: int) -> None:
        import ray

        ray.get([a.reseed.remote(seed + _SEED_STRIDE * (i + 1)) for i, a in enumerate(self.actors)])

    def close(self) -> None:
        import ray

        for a in self.actors:
            ray.kill(a, no_restart=True)
        self.actors = []


def _check_fits(cfg: PPOConfig) -> None:
    """Runners that no node of the cluster could ever hold fail the run at once, in one line."""
    import ray

    nodes = [n for n in ray.nodes() if n.get("Alive")]
    cpus = [float(n.get("Resources", {}).get("CPU", 0.0)) for n in nodes]
    if not cpus or max(cpus) < cfg.runner_cpus:
        raise ValueError(f"config.runner_cpus: {cfg.runner_cpus:g} CPUs per env runner, but the largest node of "
                         f"this cluster has {max(cpus, default=0):g}; lower runner_cpus")
    total = sum(int(c // cfg.runner_cpus) for c in cpus)
    if cfg.env_runners > total:
        raise ValueError(f"config.env_runners: {cfg.env_runners} runners of {cfg.runner_cpus:g} CPUs do not fit "
                         f"on this cluster ({len(nodes)} nodes, {sum(cpus):g} CPUs: at most {total} runners); "
                         "lower env_runners or runner_cpus, or add nodes")


_CONNECT = threading.Lock()
NODE_IP_ENV = "RLFLEET_NODE_IP"  # set by 'rlfleet local up --nodes N' for every process of a node


def connect_ray(**kw: Any) -> None:
    """``ray.init(address="auto")`` once per process (thread-safe), on this process's own node.

    Ray finds "its" raylet by scanning the machine's processes and prefers the head when several run
    on one host (the local multi-node cluster: nodes are network namespaces of one machine); the
    node IP that rlfleet gives each such node's processes (``RLFLEET_NODE_IP``) picks the right one.
    Elsewhere (one raylet per machine) Ray's own choice stands."""
    import ray

    with _CONNECT:
        if ray.is_initialized():
            return
        ip = os.environ.get(NODE_IP_ENV)
        if ip:
            kw["_node_ip_address"] = ip
        ray.init(address="auto", **kw)


def node_address() -> str:
    """This process's node as Ray names it: ``RLFLEET_NODE_IP`` on a local multi-node cluster, the
    node IP once Ray is connected, else the IPv4 address of the first non-loopback interface, else
    127.0.0.1. The ``node`` label of a run's metrics."""
    import socket
    import sys

    if os.environ.get(NODE_IP_ENV):
        return os.environ[NODE_IP_ENV]

    ray = sys.modules.get("ray")
    node = getattr(getattr(ray, "_private", None), "worker", None) if ray else None
    if node is not None and getattr(node, "_global_node", None) is not None:
        return str(node._global_node.node_ip_address)
    import fcntl
    import struct

    for _, name in socket.if_nameindex():
        if name == "lo":
            continue
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            try:  # SIOCGIFADDR
                packed = fcntl.ioctl(s.fileno(), 0x8915, struct.pack("256s", name[:15].encode()))
            except OSError:
                continue
        return socket.inet_ntoa(packed[20:24])
    return "127.0.0.1"
