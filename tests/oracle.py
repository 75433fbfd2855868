"""The autograd formulation of the TD3 step: the oracle the learner's hand-written, batched
step (``workbench.ddpg``) is tested against.

Test-only: one member at a time, ordinary modules, autograd and ``torch.optim.Adam``, as a
textbook DDPG/TD3 writes it. It starts from a copy of a member's networks, observation
statistics and smoothing-noise generator, and draws the same noise in the same order.
"""

from __future__ import annotations

import torch
from torch import nn

from workbench.ddpg import Agent
from workbench.networks import copy_module
from workbench.replay import Batch


def polyak_update(target: nn.Module, source: nn.Module, tau: float) -> None:
    """target <- (1 - tau) * target + tau * source."""
    with torch.no_grad():
        for t, s in zip(target.parameters(), source.parameters(), strict=True):
            t.lerp_(s, tau)


class Oracle:
    def __init__(self, agent: Agent):
        cfg = self.cfg = agent.cfg
        self.actor = copy_module(agent.actor).requires_grad_(True)
        self.critic = copy_module(agent.critic).requires_grad_(True)
        self.actor_target = copy_module(agent.actor_target)
        self.critic_target = copy_module(agent.critic_target)
        self.obs_norm = copy_module(agent.obs_norm)
        self.actor_opt = torch.optim.Adam(self.actor.parameters(), lr=cfg.actor_lr)
        self.critic_opt = torch.optim.Adam(
            self.critic.parameters(), lr=cfg.critic_lr, weight_decay=cfg.critic_weight_decay
        )
        self.generator = torch.Generator()
        self.generator.set_state(agent.generator.get_state())
        self.n_updates = 0

    def nets(self) -> dict[str, nn.Module]:
        return {
            "actor": self.actor,
            "critic": self.critic,
            "actor_target": self.actor_target,
            "critic_target": self.critic_target,
        }

    def target(self, batch: Batch) -> torch.Tensor:
        cfg = self.cfg
        with torch.no_grad():
            next_obs = self.obs_norm(batch.next_obs)
            next_actions = self.actor_target(next_obs)
            if cfg.target_policy_noise > 0:
                noise = torch.randn(next_actions.shape, generator=self.generator)
                noise = (noise * cfg.target_policy_noise).clamp(
                    -cfg.target_noise_clip, cfg.target_noise_clip
                )
                next_actions = (next_actions + noise).clamp(-1.0, 1.0)
            next_q = self.critic_target(next_obs, next_actions).min(dim=0).values
            return batch.rewards + cfg.gamma * (1.0 - batch.terminated) * next_q

    def critic_step(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        cfg = self.cfg
        target = self.target(batch)
        q = self.critic(self.obs_norm(batch.obs), batch.actions)  # (n_critics, B)
        loss = (q - target).square().mean(dim=1).sum()
        self.critic_opt.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.max_grad_norm is not None:
            nn.utils.clip_grad_norm_(self.critic.parameters(), cfg.max_grad_norm)
        self.critic_opt.step()
        return loss.detach(), q.detach().mean()

    def actor_step(self, batch: Batch) -> torch.Tensor:
        cfg = self.cfg
        obs = self.obs_norm(batch.obs)
        # gradients flow through the critic to the actions; only the actor's are applied
        loss = -self.critic.q1(obs, self.actor(obs)).mean()
        self.actor_opt.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.max_grad_norm is not None:
            nn.utils.clip_grad_norm_(self.actor.parameters(), cfg.max_grad_norm)
        self.actor_opt.step()
        polyak_update(self.critic_target, self.critic, cfg.tau)
        polyak_update(self.actor_target, self.actor, cfg.tau)
        return loss.detach()

    def update(self, batch: Batch) -> dict[str, torch.Tensor]:
        critic_loss, q_mean = self.critic_step(batch)
        self.n_updates += 1
        metrics = {"loss/critic": critic_loss, "q/mean": q_mean}
        if self.n_updates % self.cfg.policy_delay == 0:
            metrics["loss/actor"] = self.actor_step(batch)
        return metrics
