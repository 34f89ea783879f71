"""Small torch networks: observation normalizer, PPO actor/critic, DQN Q-network, and the
deterministic "exportable" policy modules that go to ONNX."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from torch import nn

from rlfleet_agents.envs import SpaceInfo


class ObsNormalizer(nn.Module):
    """Running mean/variance (Welford over batches); part of every policy module, so the
    exported ONNX graph normalizes exactly like training did. Identity when disabled."""

    mean: torch.Tensor
    var: torch.Tensor
    count: torch.Tensor

    def __init__(self, shape: int, enabled: bool, clip: float = 10.0) -> None:
        super().__init__()
        self.enabled = enabled
        self.clip = clip
        self.register_buffer("mean", torch.zeros(shape, dtype=torch.float32))
        self.register_buffer("var", torch.ones(shape, dtype=torch.float32))
        self.register_buffer("count", torch.tensor(1e-4, dtype=torch.float64))

    @torch.no_grad()
    def update(self, x: torch.Tensor) -> None:
        if not self.enabled:
            return
        x = x.reshape(-1, self.mean.shape[0]).to(torch.float64)
        b_mean, b_var, b_n = x.mean(0), x.var(0, unbiased=False), x.shape[0]
        mean, var, n = self.mean.double(), self.var.double(), self.count
        delta = b_mean - mean
        tot = n + b_n
        new_mean = mean + delta * b_n / tot
        m2 = var * n + b_var * b_n + delta.pow(2) * n * b_n / tot
        self.mean.copy_(new_mean.float())
        self.var.copy_((m2 / tot).float())
        self.count.fill_(float(tot))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return x
        return torch.clamp((x - self.mean) / torch.sqrt(self.var + 1e-8), -self.clip, self.clip)


class Tanh(nn.Module):
    """tanh as 2*sigmoid(2x) - 1: the same function, but on this CPU torch's tanh kernel costs ~65 us
    on a 256x64 batch against ~14 us for sigmoid (measured), and the update is mostly activations."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 2.0 * torch.sigmoid(2.0 * x) - 1.0


def mlp(sizes: list[int], act: type[nn.Module], out_gain: float) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i in range(len(sizes) - 1):
        lin = nn.Linear(sizes[i], sizes[i + 1])
        last = i == len(sizes) - 2
        nn.init.orthogonal_(lin.weight, out_gain if last else math.sqrt(2))
        nn.init.zeros_(lin.bias)
        layers.append(lin)
        if not last:
            layers.append(act())
    return nn.Sequential(*layers)


class ActorCritic(nn.Module):
    """Separate actor and critic MLPs (tanh), CleanRL-style initialization."""

    act_low: torch.Tensor
    act_high: torch.Tensor

    def __init__(self, info: SpaceInfo, hidden: list[int], normalize_obs: bool, init_log_std: float = 0.0):
        super().__init__()
        self.discrete = info.action_kind == "discrete"
        d = info.obs_dim
        self.norm = ObsNormalizer(d, normalize_obs)
        self.critic = mlp([d, *hidden, 1], Tanh, 1.0)
        self.actor = mlp([d, *hidden, info.n_actions], Tanh, 0.01)
        if not self.discrete:
            self.log_std = nn.Parameter(torch.full((info.n_actions,), float(init_log_std)))
            self.register_buffer("act_low", torch.tensor(info.action_low, dtype=torch.float32))
            self.register_buffer("act_high", torch.tensor(info.action_high, dtype=torch.float32))

    def value(self, obs: torch.Tensor) -> torch.Tensor:
        return self.critic(self.norm(obs)).squeeze(-1)

    def heads(self, obs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(actor output: logits or Gaussian mean, value)."""
        x = self.norm(obs)
        return self.actor(x), self.critic(x).squeeze(-1)

    # Hand-written distributions: torch.distributions is a large share of a small PPO's
    # rollout time (measured; see ../shared/notes/components.md).
    def sample(self, obs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        out, value = self.heads(obs)
        if self.discrete:
            logp_all = torch.log_softmax(out, -1)
            u = torch.rand_like(logp_all).clamp_(1e-10, 1.0)
            action = torch.argmax(logp_all - torch.log(-torch.log(u)), -1)  # Gumbel-max
            logp = logp_all.gather(-1, action.unsqueeze(-1)).squeeze(-1)
        else:
            std = self.log_std.exp()
            action = out + std * torch.randn_like(out)
            logp = _normal_logp(action, out, self.log_std)
        return action, logp, value

    def evaluate_actions(
        self, obs: torch.Tensor, actions: torch.Tensor, entropy: bool = True
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
        out, value = self.heads(obs)
        ent: torch.Tensor | None = None
        if self.discrete:
            logp_all = torch.log_softmax(out, -1)
            logp = logp_all.gather(-1, actions.long().unsqueeze(-1)).squeeze(-1)
            if entropy:
                ent = -(logp_all.exp() * logp_all).sum(-1)
        else:
            logp = _normal_logp(actions, out, self.log_std)
            if entropy:
                ent = (0.5 + 0.5 * math.log(2 * math.pi) + self.log_std).sum().expand(obs.shape[0])
        return logp, ent, value


class NumpyActorCritic:
    """A numpy copy of an ActorCritic's weights for the rollout: a small MLP forward in numpy
    is several times cheaper than torch eager at rollout batch sizes (measured: notes). Sampling
    uses the same distributions as ``ActorCritic.sample``; the update recomputes log-probs in
    torch, so any float difference only shows up as a ratio of ~1 +- 1e-6."""

    def __init__(self, model: ActorCritic, rng: np.random.Generator) -> None:
        self.rng = rng
        self.discrete = model.discrete
        with torch.no_grad():
            self.norm = model.norm.enabled
            self.mean = model.norm.mean.cpu().numpy().astype(np.float32)
            self.inv_std = (1.0 / torch.sqrt(model.norm.var + 1e-8)).cpu().numpy().astype(np.float32)
            self.clip = model.norm.clip
            self.actor = [(m.weight.cpu().numpy().T.copy(), m.bias.cpu().numpy().copy())
                          for m in model.actor if isinstance(m, nn.Linear)]
            self.critic = [(m.weight.cpu().numpy().T.copy(), m.bias.cpu().numpy().copy())
                           for m in model.critic if isinstance(m, nn.Linear)]
            if not self.discrete:
                self.log_std = model.log_std.cpu().numpy().astype(np.float32)
                self.std = np.exp(self.log_std)

    @staticmethod
    def _mlp(layers: list[tuple[np.ndarray, np.ndarray]], x: np.ndarray) -> np.ndarray:
        for i, (w, b) in enumerate(layers):
            x = x @ w + b
            if i < len(layers) - 1:
                np.tanh(x, out=x)
        return x

    def sample(self, obs: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        x = obs.reshape(obs.shape[0], -1).astype(np.float32, copy=False)
        if self.norm:
            x = np.clip((x - self.mean) * self.inv_std, -self.clip, self.clip)
        out = self._mlp(self.actor, x)
        value = self._mlp(self.critic, x)[:, 0]
        if self.discrete:
            z = out - out.max(-1, keepdims=True)
            logp_all = z - np.log(np.exp(z).sum(-1, keepdims=True))
            u = np.clip(self.rng.random(logp_all.shape, dtype=np.float32), 1e-10, 1.0)
            action = np.argmax(logp_all - np.log(-np.log(u)), -1)
            logp = np.take_along_axis(logp_all, action[:, None], -1)[:, 0]
        else:
            action = (out + self.std * self.rng.standard_normal(out.shape, dtype=np.float32)).astype(np.float32)
            logp = (-((action - out) ** 2) / (2 * self.std**2) - self.log_std - 0.5 * math.log(2 * math.pi)).sum(-1)
        return action, logp.astype(np.float32), value.astype(np.float32)

    def value(self, obs: np.ndarray) -> np.ndarray:
        x = obs.reshape(obs.shape[0], -1).astype(np.float32, copy=False)
        if self.norm:
            x = np.clip((x - self.mean) * self.inv_std, -self.clip, self.clip)
        return self._mlp(self.critic, x)[:, 0]


def _normal_logp(x: torch.Tensor, mean: torch.Tensor, log_std: torch.Tensor) -> torch.Tensor:
    return (-((x - mean) ** 2) / (2 * torch.exp(2 * log_std)) - log_std - 0.5 * math.log(2 * math.pi)).sum(-1)


class QNetwork(nn.Module):
    def __init__(self, info: SpaceInfo, hidden: list[int], normalize_obs: bool):
        super().__init__()
        d = info.obs_dim
        self.norm = ObsNormalizer(d, normalize_obs)
        self.q = mlp([d, *hidden, info.n_actions], nn.ReLU, 1.0)

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        return self.q(self.norm(obs))


class DeterministicPolicy(nn.Module):
    """What is exported: obs -> (action, raw output). Discrete: argmax of logits/Q-values;
    continuous: the Gaussian mean clipped to the action bounds."""

    def __init__(self, model: nn.Module, kind: str):
        super().__init__()
        self.model: Any = model
        self.kind = kind

    def forward(self, obs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if isinstance(self.model, QNetwork):
            out = self.model(obs)
        else:
            out = self.model.actor(self.model.norm(obs))
        if self.kind == "discrete":
            return torch.argmax(out, dim=-1), out
        return torch.max(torch.min(out, self.model.act_high), self.model.act_low), out


def torch_act_fn(policy: DeterministicPolicy, device: torch.device):
    """numpy obs -> numpy actions, for evaluation during training."""

    @torch.no_grad()
    def act(obs: np.ndarray) -> np.ndarray:
        a, _ = policy(torch.as_tensor(obs, dtype=torch.float32, device=device).reshape(obs.shape[0], -1))
        return a.cpu().numpy()

    return act
