"""PPO (clipped surrogate, GAE), discrete or Box actions. Reads top to bottom like CleanRL's
ppo.py, split into ``collect_rollout`` -> ``compute_advantages`` -> ``update`` so the runner can
checkpoint, evaluate and stop between iterations (see trainer.py).

NEXT_STEP autoreset (envs.py): the step after an episode ends is dropped from the batch; the
episode's last transition bootstraps from the true final observation when it was truncated.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from rlfleet_agents.configs import PPOConfig
from rlfleet_agents.envs import EpisodeTracker, SpaceInfo, make_vec_env, vec_space_info
from rlfleet_agents.networks import ActorCritic, DeterministicPolicy, NumpyActorCritic
from rlfleet_agents.ppo_numpy import numpy_update

if TYPE_CHECKING:
    from rlfleet_agents.distributed import RunnerPool


class RewardScaler:
    """Divide rewards by the running std of the discounted return (training only)."""

    def __init__(self, num_envs: int, gamma: float) -> None:
        self.gamma = gamma
        self.ret = np.zeros(num_envs)
        self.mean, self.var, self.count = 0.0, 1.0, 1e-4

    def __call__(self, rewards: np.ndarray, dones: np.ndarray) -> np.ndarray:
        self.ret = self.ret * self.gamma + rewards
        b_mean, b_var, n = float(self.ret.mean()), float(self.ret.var()), len(self.ret)
        delta, tot = b_mean - self.mean, self.count + n
        self.mean += delta * n / tot
        self.var = (self.var * self.count + b_var * n + delta**2 * self.count * n / tot) / tot
        self.count = tot
        self.ret[dones] = 0.0
        return np.clip(rewards / np.sqrt(self.var + 1e-8), -10, 10)

    def state(self) -> dict[str, Any]:
        return {"mean": self.mean, "var": self.var, "count": self.count}

    def load(self, s: dict[str, Any]) -> None:
        self.mean, self.var, self.count = s["mean"], s["var"], s["count"]


class PPO:
    algo = "ppo"

    def __init__(self, cfg: PPOConfig, env_id: str, env_kwargs: dict[str, Any] | None, seed: int,
                 total_steps: int, device: torch.device) -> None:
        self.cfg, self.env_id, self.seed, self.device = cfg, env_id, seed, device
        self.total_steps = total_steps
        torch.manual_seed(seed)
        self.rng = np.random.default_rng(seed)
        self.runners: RunnerPool | None = None
        if cfg.env_runners:  # the rollouts run in Ray actors; the learner only needs the spaces
            from rlfleet_agents.distributed import RunnerPool

            probe = make_vec_env(env_id, 1, env_kwargs, mode=cfg.vectorization)
            self.info = vec_space_info(probe, env_id)
            self.obs = probe.reset(seed=seed)[0]
            probe.close()
            self.envs = None
            self.runners = RunnerPool(cfg, env_id, env_kwargs, seed)
        else:
            self.envs = make_vec_env(env_id, cfg.num_envs, env_kwargs, mode=cfg.vectorization)
            self.info = vec_space_info(self.envs, env_id)
        self.model = ActorCritic(self.info, cfg.hidden_sizes, cfg.normalize_obs, cfg.init_log_std).to(device)
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=cfg.learning_rate, eps=1e-5, fused=True)
        if self.envs is not None:
            self.obs, _ = self.envs.reset(seed=seed)
        self.tracker = EpisodeTracker(cfg.num_envs)
        scale = cfg.normalize_reward and self.runners is None  # runners scale their own rewards
        self.reward_scaler = RewardScaler(cfg.num_envs, cfg.gamma) if scale else None
        self.global_step = 0
        self.iteration = 0
        self.clip_coef = cfg.clip_coef

    # -- one iteration ----------------------------------------------------------------------
    def train_iteration(self) -> dict[str, float]:
        cfg = self.cfg
        frac = max(0.0, 1.0 - self.global_step / max(1, self.total_steps))
        if cfg.anneal_lr:
            self.optimizer.param_groups[0]["lr"] = frac * cfg.learning_rate
        self.clip_coef = frac * cfg.clip_coef if cfg.anneal_clip else cfg.clip_coef
        batch = self.collect_rollout()
        advantages, returns = self.compute_advantages(batch)
        stats = self.update(batch, advantages, returns)
        self.model.norm.update(torch.as_tensor(batch["obs"][batch["valid"]], device=self.device))
        self.iteration += 1
        stats["learning_rate"] = float(self.optimizer.param_groups[0]["lr"])
        return stats

    def collect_rollout(self) -> dict[str, np.ndarray]:
        if self.runners is not None:  # N runners' batches side by side: (T, N * num_envs, ...)
            batch, self.obs, (rets, lens) = self.runners.collect(self.model)
            self.tracker.finished_returns.extend(rets)
            self.tracker.finished_lengths.extend(lens)
        else:
            batch, self.obs = collect_rollout(self.cfg, self.info, self.envs, self.obs, self.tracker,
                                              self.reward_scaler, NumpyActorCritic(self.model, self.rng))
        self.global_step += int(batch["valid"].sum())
        return batch

    def compute_advantages(self, b: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        cfg = self.cfg
        T = cfg.num_steps
        adv = np.zeros_like(b["rewards"])
        last = np.zeros(b["rewards"].shape[1], dtype=np.float32)
        for t in reversed(range(T)):
            next_values = b["next_value"] if t == T - 1 else b["values"][t + 1]
            delta = b["rewards"][t] + cfg.gamma * next_values * (1.0 - b["terms"][t]) - b["values"][t]
            last = delta + cfg.gamma * cfg.gae_lambda * (1.0 - b["dones"][t]) * last
            adv[t] = last
        return adv, adv + b["values"]

    def update(self, b: dict[str, np.ndarray], advantages: np.ndarray, returns: np.ndarray) -> dict[str, float]:
        if self.device.type == "cpu":  # the same update, without autograd's per-op overhead (ppo_numpy.py)
            return numpy_update(self.model, self.optimizer, self.cfg, self.clip_coef, b, advantages, returns)
        return self.update_torch(b, advantages, returns)

    def update_torch(self, b: dict[str, np.ndarray], advantages: np.ndarray, returns: np.ndarray) -> dict[str, float]:
        cfg, dev = self.cfg, self.device
        valid = b["valid"]
        obs = torch.as_tensor(b["obs"][valid], device=dev)
        actions = torch.as_tensor(b["actions"][valid], device=dev)
        old_logp = torch.as_tensor(b["logp"][valid], device=dev)
        old_values = torch.as_tensor(b["values"][valid], device=dev)
        adv_all = torch.as_tensor(advantages[valid], device=dev)
        ret_all = torch.as_tensor(returns[valid], device=dev)
        n = obs.shape[0]
        mb = max(1, n // cfg.num_minibatches)
        want_entropy = cfg.ent_coef != 0.0
        clip = self.clip_coef
        stats: dict[str, float] = {}
        pg_sum = v_sum = 0.0
        updates = 0
        for epoch in range(cfg.update_epochs):
            # shuffle once per epoch, then slice contiguous minibatches (cheaper than fancy-indexing each)
            perm = torch.randperm(n, device=dev)
            e_obs, e_act, e_logp, e_val = obs[perm], actions[perm], old_logp[perm], old_values[perm]
            e_adv, e_ret = adv_all[perm], ret_all[perm]
            stop_early = False
            for start in range(0, n - mb + 1, mb):
                sl = slice(start, start + mb)
                logp, entropy, value = self.model.evaluate_actions(e_obs[sl], e_act[sl], entropy=want_entropy)
                log_ratio = logp - e_logp[sl]
                ratio = log_ratio.exp()
                adv = e_adv[sl]
                if cfg.norm_adv and mb > 1:
                    adv = (adv - adv.mean()) / (adv.std() + 1e-8)
                pg_loss = torch.max(-adv * ratio, -adv * ratio.clamp(1 - clip, 1 + clip)).mean()
                if cfg.clip_vloss:
                    v_clipped = e_val[sl] + (value - e_val[sl]).clamp(-clip, clip)
                    v_loss = 0.5 * torch.max((value - e_ret[sl]) ** 2, (v_clipped - e_ret[sl]) ** 2).mean()
                else:
                    v_loss = 0.5 * ((value - e_ret[sl]) ** 2).mean()
                loss = pg_loss + cfg.vf_coef * v_loss
                if want_entropy and entropy is not None:
                    loss = loss - cfg.ent_coef * entropy.mean()
                self.optimizer.zero_grad(set_to_none=True)
                loss.backward()
                nn.utils.clip_grad_norm_(self.model.parameters(), cfg.max_grad_norm, foreach=True)
                self.optimizer.step()
                updates += 1
                last = epoch == cfg.update_epochs - 1 and start + 2 * mb > n
                if cfg.target_kl is not None or last:
                    with torch.no_grad():
                        kl = float(((ratio - 1) - log_ratio).mean())
                        stats = {"approx_kl": kl,
                                 "clip_fraction": float(((ratio - 1.0).abs() > clip).float().mean())}
                    if cfg.target_kl is not None and kl > cfg.target_kl:
                        stop_early = True
                pg_sum += float(pg_loss.detach())
                v_sum += float(v_loss.detach())
                if stop_early:
                    break
            if stop_early:
                break
        u = max(1, updates)
        with torch.no_grad():
            _, ent, _ = self.model.evaluate_actions(obs[:mb], actions[:mb], entropy=True)
        entropy_mean = float(ent.mean()) if ent is not None else 0.0
        return {"loss_policy": pg_sum / u, "loss_value": v_sum / u, "entropy": entropy_mean,
                "approx_kl": stats.get("approx_kl", 0.0), "clip_fraction": stats.get("clip_fraction", 0.0),
                "updates": float(updates)}

    # -- policy, checkpoint -----------------------------------------------------------------
    @staticmethod
    def policy_network(info: SpaceInfo, cfg: dict[str, Any]) -> nn.Module:
        """The (untrained) network of a saved policy.pt, from its spaces and config dict."""
        return ActorCritic(info, cfg["hidden_sizes"], cfg["normalize_obs"], cfg.get("init_log_std", 0.0))

    def policy(self) -> DeterministicPolicy:
        return DeterministicPolicy(self.model, self.info.action_kind)

    def state_dict(self) -> dict[str, Any]:
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "global_step": self.global_step,
            "iteration": self.iteration,
            "reward_scaler": self.reward_scaler.state() if self.reward_scaler else None,
            "torch_rng": torch.get_rng_state(),
            "np_rng": self.rng.bit_generator.state,
        }

    def load_state_dict(self, s: dict[str, Any]) -> None:
        self.model.load_state_dict(s["model"])
        self.optimizer.load_state_dict(s["optimizer"])
        self.global_step = int(s["global_step"])
        self.iteration = int(s["iteration"])
        if self.reward_scaler is not None and s.get("reward_scaler"):
            self.reward_scaler.load(s["reward_scaler"])
        torch.set_rng_state(s["torch_rng"])
        self.rng.bit_generator.state = s["np_rng"]
        # The env state is not in the checkpoint: start fresh episodes on new seeds.
        if self.runners is not None:
            self.runners.reseed(self.seed + 7919 * (1 + self.iteration))
        elif self.envs is not None:
            self.obs, _ = self.envs.reset(seed=self.seed + 7919 * (1 + self.iteration))
        self.tracker = EpisodeTracker(self.cfg.num_envs)

    def close(self) -> None:
        if self.runners is not None:
            self.runners.close()
        if self.envs is not None:
            self.envs.close()


def collect_rollout(cfg: PPOConfig, info: SpaceInfo, envs: Any, obs: np.ndarray, tracker: EpisodeTracker,
                    reward_scaler: RewardScaler | None, fast: NumpyActorCritic,
                    ) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """One rollout of ``cfg.num_steps`` steps of ``envs`` from ``obs`` with the (fixed) weights in
    ``fast``: the batch and the observations it ends on. The learner calls it with its own envs
    (env_runners = 0), each env runner with its own (rlfleet_agents.distributed)."""
    T, N = cfg.num_steps, envs.num_envs
    obs_buf = np.zeros((T, N, *info.obs_shape), dtype=np.float32)
    act_shape: tuple[int, ...] = (T, N) if info.action_kind == "discrete" else (T, N, info.n_actions)
    act_buf = np.zeros(act_shape, dtype=np.int64 if info.action_kind == "discrete" else np.float32)
    logp_buf = np.zeros((T, N), dtype=np.float32)
    val_buf = np.zeros((T, N), dtype=np.float32)
    rew_buf = np.zeros((T, N), dtype=np.float32)
    term_buf = np.zeros((T, N), dtype=np.float32)
    done_buf = np.zeros((T, N), dtype=np.float32)
    valid_buf = np.zeros((T, N), dtype=bool)
    if info.action_kind == "box":
        low = np.asarray(info.action_low, dtype=np.float32)
        high = np.asarray(info.action_high, dtype=np.float32)
    for t in range(T):
        obs_buf[t] = obs
        a, logp, value = fast.sample(obs)
        env_a = np.clip(a, low, high) if info.action_kind == "box" else a
        obs, reward, term, trunc, _ = envs.step(env_a)
        valid = tracker.step(reward, term, trunc)
        done = (term | trunc) & valid
        if reward_scaler is not None:
            reward = reward_scaler(reward, done)
        act_buf[t], logp_buf[t], val_buf[t] = a, logp, value
        rew_buf[t], term_buf[t], done_buf[t], valid_buf[t] = reward, term & valid, done, valid
    next_value = fast.value(obs)
    return {"obs": obs_buf, "actions": act_buf, "logp": logp_buf, "values": val_buf,
            "rewards": rew_buf, "terms": term_buf, "dones": done_buf, "valid": valid_buf,
            "next_value": next_value}, obs
