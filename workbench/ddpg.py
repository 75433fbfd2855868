"""DDPG agent state and its update step, with TD3's three changes as independent toggles.

``DDPG.update`` takes a batch of tensors and returns metrics as tensors. It never logs,
prints, reads a value back to the host or touches MLflow: the training loop accumulates the
metrics on the device and reads them at logging time.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from workbench.config import AgentConfig
from workbench.networks import Actor, Critic, ObsNormalizer
from workbench.replay import Batch


def polyak_update(target: nn.Module, source: nn.Module, tau: float) -> None:
    """target <- (1 - tau) * target + tau * source, fused over all parameters."""
    with torch.no_grad():
        torch._foreach_lerp_(list(target.parameters()), list(source.parameters()), tau)


class DDPG:
    def __init__(
        self,
        obs_dim: int,
        action_dim: int,
        cfg: AgentConfig,
        *,
        device: torch.device | str = "cpu",
        normalize_obs: bool = False,
        seed: int = 0,
    ):
        self.cfg = cfg
        self.device = torch.device(device)
        net_kw = {"activation": cfg.activation, "layer_norm": cfg.layer_norm}
        self.obs_norm = ObsNormalizer(obs_dim, enabled=normalize_obs).to(self.device)
        self.actor = Actor(obs_dim, action_dim, cfg.actor_hidden, **net_kw).to(self.device)
        self.critic = Critic(
            obs_dim, action_dim, cfg.critic_hidden, n_critics=cfg.n_critics, **net_kw
        ).to(self.device)
        self.actor_target = Actor(obs_dim, action_dim, cfg.actor_hidden, **net_kw).to(self.device)
        self.critic_target = Critic(
            obs_dim, action_dim, cfg.critic_hidden, n_critics=cfg.n_critics, **net_kw
        ).to(self.device)
        self.actor_target.load_state_dict(self.actor.state_dict())
        self.critic_target.load_state_dict(self.critic.state_dict())
        for p in (*self.actor_target.parameters(), *self.critic_target.parameters()):
            p.requires_grad_(False)
        self.actor_opt = torch.optim.Adam(self.actor.parameters(), lr=cfg.actor_lr)
        self.critic_opt = torch.optim.Adam(
            self.critic.parameters(), lr=cfg.critic_lr, weight_decay=cfg.critic_weight_decay
        )
        self._actor_params = list(self.actor.parameters())
        self.generator = torch.Generator(device=self.device)
        self.generator.manual_seed(seed)
        self.n_updates = 0  # critic updates so far; the actor follows every policy_delay

    @torch.no_grad()
    def act(self, obs: torch.Tensor) -> torch.Tensor:
        """Deterministic action in normalized units for raw observations."""
        return self.actor(self.obs_norm(obs))

    def target_q(self, batch: Batch, next_obs: torch.Tensor) -> torch.Tensor:
        """r + gamma * (1 - terminated) * min_i Q'_i(s', mu'(s') + clipped noise)."""
        cfg = self.cfg
        with torch.no_grad():
            next_actions = self.actor_target(next_obs)
            if cfg.target_policy_noise > 0:
                noise = torch.randn(
                    next_actions.shape, device=self.device, generator=self.generator
                )
                noise = (noise * cfg.target_policy_noise).clamp(
                    -cfg.target_noise_clip, cfg.target_noise_clip
                )
                next_actions = (next_actions + noise).clamp(-1.0, 1.0)
            next_q = self.critic_target(next_obs, next_actions).min(dim=0).values
            return batch.rewards + cfg.gamma * (1.0 - batch.terminated) * next_q

    def update(self, batch: Batch) -> dict[str, torch.Tensor]:
        cfg = self.cfg
        obs = self.obs_norm(batch.obs)
        next_obs = self.obs_norm(batch.next_obs)
        target = self.target_q(batch, next_obs)

        q = self.critic(obs, batch.actions)  # (n_critics, B)
        critic_loss = (q - target).square().mean(dim=1).sum()
        self.critic_opt.zero_grad(set_to_none=True)
        critic_loss.backward()
        if cfg.max_grad_norm is not None:
            nn.utils.clip_grad_norm_(self.critic.parameters(), cfg.max_grad_norm)
        self.critic_opt.step()
        self.n_updates += 1
        metrics = {"loss/critic": critic_loss.detach(), "q/mean": q.detach().mean()}

        if self.n_updates % cfg.policy_delay == 0:
            # Gradients flow through the critic to the actions, but only the actor's
            # parameter gradients are computed.
            actor_loss = -self.critic.q1(obs, self.actor(obs)).mean()
            grads = torch.autograd.grad(actor_loss, self._actor_params)
            for p, g in zip(self._actor_params, grads, strict=True):
                p.grad = g
            if cfg.max_grad_norm is not None:
                nn.utils.clip_grad_norm_(self._actor_params, cfg.max_grad_norm)
            self.actor_opt.step()
            polyak_update(self.critic_target, self.critic, cfg.tau)
            polyak_update(self.actor_target, self.actor, cfg.tau)
            metrics["loss/actor"] = actor_loss.detach()
        return metrics

    # -------------------------------------------------------------------- persistence

    def state_dict(self) -> dict[str, Any]:
        return {
            "actor": self.actor.state_dict(),
            "critic": self.critic.state_dict(),
            "actor_target": self.actor_target.state_dict(),
            "critic_target": self.critic_target.state_dict(),
            "actor_opt": self.actor_opt.state_dict(),
            "critic_opt": self.critic_opt.state_dict(),
            "obs_norm": self.obs_norm.state_dict(),
            "generator": self.generator.get_state(),
            "n_updates": self.n_updates,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.actor.load_state_dict(state["actor"])
        self.critic.load_state_dict(state["critic"])
        self.actor_target.load_state_dict(state["actor_target"])
        self.critic_target.load_state_dict(state["critic_target"])
        self.actor_opt.load_state_dict(state["actor_opt"])
        self.critic_opt.load_state_dict(state["critic_opt"])
        self.obs_norm.load_state_dict(state["obs_norm"])
        self.generator.set_state(state["generator"])
        self.n_updates = int(state["n_updates"])
