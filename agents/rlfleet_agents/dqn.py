"""DQN (double-Q target, Huber loss, epsilon-greedy with linear decay), discrete actions.

One ``train_iteration`` = ``steps_per_iteration`` vector steps; transitions are stored only for
real steps (the NEXT_STEP autoreset step is dropped, see envs.py).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from rlfleet_agents.configs import DQNConfig
from rlfleet_agents.envs import EnvError, EpisodeTracker, SpaceInfo, make_vec_env, vec_space_info
from rlfleet_agents.networks import DeterministicPolicy, QNetwork


class ReplayBuffer:
    def __init__(self, capacity: int, obs_shape: list[int]) -> None:
        self.obs = np.zeros((capacity, *obs_shape), dtype=np.float32)
        self.next_obs = np.zeros((capacity, *obs_shape), dtype=np.float32)
        self.actions = np.zeros(capacity, dtype=np.int64)
        self.rewards = np.zeros(capacity, dtype=np.float32)
        self.terms = np.zeros(capacity, dtype=np.float32)
        self.capacity, self.pos, self.size = capacity, 0, 0

    def add(self, obs: np.ndarray, act: np.ndarray, rew: np.ndarray, nxt: np.ndarray, term: np.ndarray) -> None:
        for i in range(len(obs)):
            p = self.pos
            self.obs[p], self.actions[p], self.rewards[p], self.next_obs[p], self.terms[p] = (
                obs[i], act[i], rew[i], nxt[i], term[i])
            self.pos = (p + 1) % self.capacity
            self.size = min(self.size + 1, self.capacity)

    def sample(self, n: int, rng: np.random.Generator) -> tuple[np.ndarray, ...]:
        idx = rng.integers(0, self.size, size=n)
        return self.obs[idx], self.actions[idx], self.rewards[idx], self.next_obs[idx], self.terms[idx]


class DQN:
    algo = "dqn"
    steps_per_iteration = 64

    def __init__(self, cfg: DQNConfig, env_id: str, env_kwargs: dict[str, Any] | None, seed: int,
                 total_steps: int, device: torch.device) -> None:
        self.cfg, self.env_id, self.seed, self.device = cfg, env_id, seed, device
        self.total_steps = total_steps
        torch.manual_seed(seed)
        self.rng = np.random.default_rng(seed)
        self.envs = make_vec_env(env_id, cfg.num_envs, env_kwargs, mode=cfg.vectorization)
        self.info = vec_space_info(self.envs, env_id)
        if self.info.action_kind != "discrete":
            self.envs.close()
            raise EnvError(f"env {env_id!r}: DQN needs a Discrete action space; use agent 'ppo' for Box actions")
        self.model = QNetwork(self.info, cfg.hidden_sizes, cfg.normalize_obs).to(device)
        self.target = QNetwork(self.info, cfg.hidden_sizes, cfg.normalize_obs).to(device)
        self.target.load_state_dict(self.model.state_dict())
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=cfg.learning_rate, foreach=True)
        self.buffer = ReplayBuffer(cfg.buffer_size, self.info.obs_shape)
        self.obs, _ = self.envs.reset(seed=seed)
        self.tracker = EpisodeTracker(cfg.num_envs)
        self.global_step = 0
        self.iteration = 0
        self._since_train = 0
        self._since_target = 0

    def epsilon(self) -> float:
        c = self.cfg
        span = max(1.0, c.exploration_fraction * self.total_steps)
        frac = min(1.0, self.global_step / span)
        return c.epsilon_start + frac * (c.epsilon_end - c.epsilon_start)

    def train_iteration(self) -> dict[str, float]:
        cfg = self.cfg
        losses: list[float] = []
        q_means: list[float] = []
        for _ in range(self.steps_per_iteration):
            eps = self.epsilon()
            with torch.no_grad():
                q = self.model(torch.as_tensor(self.obs, dtype=torch.float32, device=self.device))
            actions = q.argmax(-1).cpu().numpy()
            explore = self.rng.random(cfg.num_envs) < eps
            if explore.any():
                actions[explore] = self.rng.integers(0, self.info.n_actions, size=int(explore.sum()))
            next_obs, reward, term, trunc, _ = self.envs.step(actions)
            valid = self.tracker.step(reward, term, trunc)
            if valid.any():
                self.buffer.add(self.obs[valid], actions[valid], reward[valid], next_obs[valid], term[valid])
                if cfg.normalize_obs and self.global_step < 0.1 * self.total_steps:
                    self.model.norm.update(torch.as_tensor(self.obs[valid], device=self.device))
                    self.target.norm.load_state_dict(self.model.norm.state_dict())
            n_valid = int(valid.sum())
            self.obs = next_obs
            self.global_step += n_valid
            self._since_train += n_valid
            self._since_target += n_valid
            if self.global_step >= cfg.learning_starts and self._since_train >= cfg.train_every:
                self._since_train = 0
                for _ in range(cfg.gradient_steps):
                    loss, qm = self._gradient_step()
                    losses.append(loss)
                    q_means.append(qm)
            if self._since_target >= cfg.target_update_every:
                self._since_target = 0
                with torch.no_grad():
                    for tp, p in zip(self.target.parameters(), self.model.parameters(), strict=True):
                        tp.mul_(1.0 - cfg.tau).add_(cfg.tau * p)
            if self.global_step >= self.total_steps:
                break
        self.iteration += 1
        return {"loss_td": float(np.mean(losses)) if losses else 0.0,
                "q_mean": float(np.mean(q_means)) if q_means else 0.0, "epsilon": self.epsilon()}

    def _gradient_step(self) -> tuple[float, float]:
        cfg, dev = self.cfg, self.device
        o, a, r, o2, d = (torch.as_tensor(x, device=dev) for x in self.buffer.sample(cfg.batch_size, self.rng))
        with torch.no_grad():
            q_next_target = self.target(o2)
            if cfg.double_q:
                best = self.model(o2).argmax(-1, keepdim=True)
                q_next = q_next_target.gather(-1, best).squeeze(-1)
            else:
                q_next = q_next_target.max(-1).values
            target = r + cfg.gamma * (1.0 - d) * q_next
        q = self.model(o).gather(-1, a.unsqueeze(-1)).squeeze(-1)
        loss = F.smooth_l1_loss(q, target)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(self.model.parameters(), cfg.max_grad_norm)
        self.optimizer.step()
        return float(loss.item()), float(q.mean().item())

    @staticmethod
    def policy_network(info: SpaceInfo, cfg: dict[str, Any]) -> nn.Module:
        """The (untrained) network of a saved policy.pt, from its spaces and config dict."""
        return QNetwork(info, cfg["hidden_sizes"], cfg["normalize_obs"])

    def policy(self) -> DeterministicPolicy:
        return DeterministicPolicy(self.model, "discrete")

    def state_dict(self) -> dict[str, Any]:
        b = self.buffer
        return {
            "model": self.model.state_dict(), "target": self.target.state_dict(),
            "optimizer": self.optimizer.state_dict(), "global_step": self.global_step,
            "iteration": self.iteration, "torch_rng": torch.get_rng_state(),
            "np_rng": self.rng.bit_generator.state,
            "buffer": {"obs": b.obs[: b.size], "next_obs": b.next_obs[: b.size], "actions": b.actions[: b.size],
                       "rewards": b.rewards[: b.size], "terms": b.terms[: b.size], "pos": b.pos},
        }

    def load_state_dict(self, s: dict[str, Any]) -> None:
        self.model.load_state_dict(s["model"])
        self.target.load_state_dict(s["target"])
        self.optimizer.load_state_dict(s["optimizer"])
        self.global_step, self.iteration = int(s["global_step"]), int(s["iteration"])
        torch.set_rng_state(s["torch_rng"])
        self.rng.bit_generator.state = s["np_rng"]
        bs = s["buffer"]
        n = min(len(bs["obs"]), self.buffer.capacity)
        b = self.buffer
        b.obs[:n], b.next_obs[:n], b.actions[:n] = bs["obs"][:n], bs["next_obs"][:n], bs["actions"][:n]
        b.rewards[:n], b.terms[:n] = bs["rewards"][:n], bs["terms"][:n]
        b.size, b.pos = n, int(bs["pos"]) % b.capacity
        self.obs, _ = self.envs.reset(seed=self.seed + 7919 * (1 + self.iteration))
        self.tracker = EpisodeTracker(self.cfg.num_envs)

    def close(self) -> None:
        self.envs.close()
