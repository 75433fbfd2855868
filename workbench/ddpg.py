"""DDPG agent state and its update step, with TD3's three changes as independent toggles.

``DDPG.update`` takes a batch of tensors and returns metrics as tensors. It never logs,
prints, reads a value back to the host or touches MLflow: the training loop accumulates the
metrics on the device and reads them at logging time.

Two implementations of the same step: the autograd path (the reference) and the fused path
(``fused=True``: flat parameter buffers, hand-written backward, one Adam kernel and one
Polyak kernel per network; see ``workbench.fused``), which is what makes a CPU run fast.
Either can be wrapped in ``torch.compile`` (``compile=True``; CUDA graphs on a GPU).
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from workbench import fused as fz
from workbench import seeding
from workbench.config import AgentConfig
from workbench.networks import Actor, Critic, ObsNormalizer, flat_views, flatten_parameters
from workbench.replay import Batch

log = logging.getLogger(__name__)

Metrics = dict[str, torch.Tensor]


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
        fused: bool = False,
        compile: bool = False,
        compile_mode: str | None = None,
        cuda_graphs: bool = True,
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
        self.obs_dim, self.action_dim = obs_dim, action_dim
        self.fused = fused and fz.supports(cfg.activation, cfg.layer_norm)
        if fused and not self.fused:
            log.info(
                "fused update covers activations %s without layer norm; "
                "using the autograd path with fused Adam",
                ", ".join(fz.ACTIVATIONS),
            )
        if self.fused:
            self._setup_fused()
        else:
            # fused=True asked for speed: the per-tensor optimizer kernels go at least
            opt_kw = {"fused": True} if fused else {}
            self.actor_opt = torch.optim.Adam(self.actor.parameters(), lr=cfg.actor_lr, **opt_kw)
            self.critic_opt = torch.optim.Adam(
                self.critic.parameters(),
                lr=cfg.critic_lr,
                weight_decay=cfg.critic_weight_decay,
                **opt_kw,
            )
        self._actor_params = list(self.actor.parameters())
        self.generator = seeding.torch_generator(seed, "target_noise", self.device)
        self.n_updates = 0  # critic updates so far; the actor follows every policy_delay
        self._critic_step: Callable[..., tuple[torch.Tensor, torch.Tensor]]
        self._actor_step: Callable[[torch.Tensor], torch.Tensor]
        if self.fused:  # the gradient passes; the optimizer kernels run after them (update)
            self._critic_step, self._actor_step = self._fused_critic, self._fused_actor
        else:
            self._critic_step, self._actor_step = self._autograd_critic, self._autograd_actor
        self.compiled = False
        self.compile_fallbacks: list[str] = []  # steps that run eagerly after a failed compile
        self._cuda_graphs = False
        self._unverified: set[str] = set()
        if compile:
            self._compile(compile_mode, cuda_graphs)

    # ------------------------------------------------------------------------ fused setup

    def _setup_fused(self) -> None:
        """Flat buffers per network, hand-written passes over views of them, flat Adam."""
        cfg = self.cfg
        self.actor_flat = flatten_parameters(self.actor)
        self.critic_flat = flatten_parameters(self.critic)
        self.actor_target_flat = flatten_parameters(self.actor_target)
        self.critic_target_flat = flatten_parameters(self.critic_target)
        self.actor_grad = torch.zeros_like(self.actor_flat)
        self.critic_grad = torch.zeros_like(self.critic_flat)
        self._actor_flat_opt = fz.FlatAdam(
            self.actor.parameters(), self.actor_flat, self.actor_grad, lr=cfg.actor_lr
        )
        self._critic_flat_opt = fz.FlatAdam(
            self.critic.parameters(),
            self.critic_flat,
            self.critic_grad,
            lr=cfg.critic_lr,
            weight_decay=cfg.critic_weight_decay,
        )
        self.actor_opt: torch.optim.Adam = self._actor_flat_opt
        self.critic_opt: torch.optim.Adam = self._critic_flat_opt
        self._fused_passes()

    def _fused_passes(self) -> None:
        """The hand-written passes over the networks and their flat gradient buffers."""
        act = self.cfg.activation
        self._f_actor = fz.FusedMLP(
            self.actor.net, act, flat_views(self.actor_grad, self.actor.net)
        )
        self._f_actor_target = fz.FusedMLP(self.actor_target.net, act)
        grads = flat_views(self.critic_grad, self.critic)
        per_q = len(grads) // len(self.critic.qs)
        self._f_critics = [
            fz.FusedMLP(q, act, grads[i * per_q : (i + 1) * per_q])
            for i, q in enumerate(self.critic.qs)
        ]
        self._f_critic_targets = [fz.FusedMLP(q, act) for q in self.critic_target.qs]

    # The fused path's flat buffers, by name: parameters, targets, gradients, Adam moments.
    FLAT_BUFFERS = (
        "actor_flat",
        "critic_flat",
        "actor_target_flat",
        "critic_target_flat",
        "actor_grad",
        "critic_grad",
        "actor_exp_avg",
        "actor_exp_avg_sq",
        "critic_exp_avg",
        "critic_exp_avg_sq",
    )

    def flat_buffer(self, name: str) -> torch.Tensor:
        if name.endswith(("_exp_avg", "_exp_avg_sq")):
            net, _, moment = name.partition("_")
            return getattr(getattr(self, f"_{net}_flat_opt"), moment)
        return getattr(self, name)

    def rehome(self, rows: dict[str, torch.Tensor]) -> None:
        """Move every flat buffer (``FLAT_BUFFERS``) into the given 1-D tensors, values kept.

        A population keeps its members' buffers as rows of stacked ``(K, n)`` tensors so one
        batched pass updates them all, while each member stays an ordinary agent: its
        parameters, optimizers, state_dict and acting read and write its own rows.
        """
        if not self.fused:
            raise ValueError("only the fused update keeps its state in flat buffers")
        for name in self.FLAT_BUFFERS:
            rows[name].copy_(self.flat_buffer(name))
        nets = {
            "actor_flat": self.actor,
            "critic_flat": self.critic,
            "actor_target_flat": self.actor_target,
            "critic_target_flat": self.critic_target,
        }
        for name, module in nets.items():
            for p, view in zip(module.parameters(), flat_views(rows[name], module), strict=True):
                p.data = view
            setattr(self, name, rows[name])
        self.actor_grad, self.critic_grad = rows["actor_grad"], rows["critic_grad"]
        for net in ("actor", "critic"):
            opt = getattr(self, f"_{net}_flat_opt")
            opt.rehome(
                rows[f"{net}_flat"],
                rows[f"{net}_grad"],
                rows[f"{net}_exp_avg"],
                rows[f"{net}_exp_avg_sq"],
            )
        self._fused_passes()

    def _compile(self, mode: str | None, cuda_graphs: bool) -> None:
        """Wrap both steps in torch.compile; CUDA graphs (reduce-overhead) on a GPU.

        Compilation happens on the first call of each step; if it fails there (no C++
        compiler, an unsupported platform) the agent state is restored and that step runs
        eagerly from then on (see ``_call``).
        """
        if not hasattr(torch, "compile"):
            log.warning("torch.compile is not available; the update runs eagerly")
            return
        self._cuda_graphs = cuda_graphs and self.device.type == "cuda"
        if mode is None:
            mode = "reduce-overhead" if self._cuda_graphs else "default"
        if self._cuda_graphs and self.fused:
            # buffers mutated in place must keep their addresses for graph replays
            mark = torch._dynamo.mark_static_address
            for opt in (self._actor_flat_opt, self._critic_flat_opt):
                for t in (opt.exp_avg, opt.exp_avg_sq, opt.step_count):
                    mark(t)
            for t in (
                self.actor_flat,
                self.critic_flat,
                self.actor_target_flat,
                self.critic_target_flat,
                self.actor_grad,
                self.critic_grad,
            ):
                mark(t)
        kw: dict[str, Any] = {} if mode == "default" else {"mode": mode}
        self._critic_step = torch.compile(self._critic_step, **kw)
        self._actor_step = torch.compile(self._actor_step, **kw)
        self._unverified = {"critic", "actor"}
        self.compiled = True

    def _call(self, which: str, fn: Callable[..., Any], *args: torch.Tensor) -> Any:
        """Run a (possibly compiled) step; a failed first compilation falls back to eager."""
        if self._cuda_graphs:
            torch.compiler.cudagraph_mark_step_begin()
        if which not in self._unverified:
            return fn(*args)
        snapshot = copy.deepcopy(self.state_dict())
        try:
            out = fn(*args)
        except Exception as err:  # compilation is best effort; the eager step is the same
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            log.warning("torch.compile of the %s step failed, running it eagerly: %s", which, first)
            self.compile_fallbacks.append(which)
            self.load_state_dict(snapshot)
            eager = getattr(self, f"_{'fused' if self.fused else 'autograd'}_{which}")
            setattr(self, f"_{which}_step", eager)
            out = eager(*args)
        self._unverified.discard(which)
        return out

    @torch.no_grad()
    def act(self, obs: torch.Tensor) -> torch.Tensor:
        """Deterministic action in normalized units for raw observations."""
        return self.actor(self.obs_norm(obs))

    def target_noise(self, batch_size: int) -> torch.Tensor | None:
        """Clipped target policy smoothing noise (TD3), or None when it is off."""
        cfg = self.cfg
        if cfg.target_policy_noise <= 0:
            return None
        noise = torch.randn(
            (batch_size, self.action_dim), device=self.device, generator=self.generator
        )
        return (noise * cfg.target_policy_noise).clamp(
            -cfg.target_noise_clip, cfg.target_noise_clip
        )

    def target_q(
        self, batch: Batch, next_obs: torch.Tensor, noise: torch.Tensor | None = None
    ) -> torch.Tensor:
        """r + gamma * (1 - terminated) * min_i Q'_i(s', mu'(s') + clipped noise)."""
        cfg = self.cfg
        if noise is None:
            noise = self.target_noise(next_obs.shape[0])
        with torch.no_grad():
            next_actions = self.actor_target(next_obs)
            if noise is not None:
                next_actions = (next_actions + noise).clamp(-1.0, 1.0)
            next_q = self.critic_target(next_obs, next_actions).min(dim=0).values
            return batch.rewards + cfg.gamma * (1.0 - batch.terminated) * next_q

    def update(self, batch: Batch) -> Metrics:
        """One critic step and, every ``policy_delay`` of them, an actor and target step."""
        noise = self.target_noise(batch.rewards.shape[0])
        args = (batch.obs, batch.actions, batch.rewards, batch.next_obs, batch.terminated)
        if noise is not None:
            args = (*args, noise)
        critic_loss, q_mean = self._call("critic", self._critic_step, *args)
        if self.fused:
            self._critic_flat_opt.flat_step()
        self.n_updates += 1
        metrics = {"loss/critic": critic_loss, "q/mean": q_mean}
        if self.n_updates % self.cfg.policy_delay == 0:
            metrics["loss/actor"] = self._call("actor", self._actor_step, batch.obs)
            if self.fused:
                self._actor_flat_opt.flat_step()
                self.critic_target_flat.lerp_(self.critic_flat, self.cfg.tau)
                self.actor_target_flat.lerp_(self.actor_flat, self.cfg.tau)
        return metrics

    # --------------------------------------------------------------------- autograd path

    def _autograd_critic(
        self,
        obs: torch.Tensor,
        actions: torch.Tensor,
        rewards: torch.Tensor,
        next_obs: torch.Tensor,
        terminated: torch.Tensor,
        noise: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        cfg = self.cfg
        obs = self.obs_norm(obs)
        with torch.no_grad():
            next_obs = self.obs_norm(next_obs)
            next_actions = self.actor_target(next_obs)
            if noise is not None:
                next_actions = (next_actions + noise).clamp(-1.0, 1.0)
            next_q = self.critic_target(next_obs, next_actions).min(dim=0).values
            target = rewards + cfg.gamma * (1.0 - terminated) * next_q
        q = self.critic(obs, actions)  # (n_critics, B)
        critic_loss = (q - target).square().mean(dim=1).sum()
        self.critic_opt.zero_grad(set_to_none=True)
        critic_loss.backward()
        if cfg.max_grad_norm is not None:
            nn.utils.clip_grad_norm_(self.critic.parameters(), cfg.max_grad_norm)
        self.critic_opt.step()
        return critic_loss.detach(), q.detach().mean()

    def _autograd_actor(self, obs: torch.Tensor) -> torch.Tensor:
        cfg = self.cfg
        obs = self.obs_norm(obs)
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
        return actor_loss.detach()

    # ------------------------------------------------------------------------ fused path

    @torch.no_grad()
    def _fused_critic(  # gradients into critic_grad; update() runs the Adam kernel
        self,
        obs: torch.Tensor,
        actions: torch.Tensor,
        rewards: torch.Tensor,
        next_obs: torch.Tensor,
        terminated: torch.Tensor,
        noise: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        cfg = self.cfg
        if self.obs_norm.enabled:
            obs, next_obs = self.obs_norm(obs), self.obs_norm(next_obs)
        next_actions = torch.tanh(self._f_actor_target.forward(next_obs)[0])
        if noise is not None:
            next_actions = (next_actions + noise).clamp(-1.0, 1.0)
        x_next = torch.cat([next_obs, next_actions], dim=-1)
        next_qs = [f.forward(x_next)[0].squeeze(-1) for f in self._f_critic_targets]
        next_q = next_qs[0] if len(next_qs) == 1 else torch.stack(next_qs).min(dim=0).values
        target = rewards + cfg.gamma * (1.0 - terminated) * next_q

        x = torch.cat([obs, actions], dim=-1)
        outs = [f.forward(x, keep=True) for f in self._f_critics]
        # (n_critics, B)
        q = outs[0][0].t() if len(outs) == 1 else torch.stack([z.squeeze(-1) for z, _ in outs])
        diff = q - target
        critic_loss = diff.square().mean(dim=1).sum()
        # d loss / d q, as autograd forms it: (1 / B) * (2 * diff)
        grad_q = (diff * 2.0) * (1.0 / diff.shape[1])
        for i, (f, (_, cache)) in enumerate(zip(self._f_critics, outs, strict=True)):
            f.backward(grad_q[i].unsqueeze(-1), cache, param_grads=True)
        if cfg.max_grad_norm is not None:
            fz.clip_grad_norm_(self.critic_grad, cfg.max_grad_norm)
        return critic_loss, q.mean()

    @torch.no_grad()
    def _fused_actor(self, obs: torch.Tensor) -> torch.Tensor:  # then Adam + Polyak: update()
        cfg = self.cfg
        if self.obs_norm.enabled:
            obs = self.obs_norm(obs)
        z, actor_cache = self._f_actor.forward(obs, keep=True)
        actions = torch.tanh(z)
        q, critic_cache = self._f_critics[0].forward(torch.cat([obs, actions], dim=-1), keep=True)
        actor_loss = -q.mean()
        grad_q = torch.full_like(q, -1.0 / q.shape[0])
        # through the critic to its action inputs only: no critic weight gradients
        grad_actions = self._f_critics[0].backward(
            grad_q, critic_cache, param_grads=False, input_columns=slice(self.obs_dim, None)
        )
        assert grad_actions is not None
        grad_z = torch.ops.aten.tanh_backward(grad_actions, actions)
        self._f_actor.backward(grad_z, actor_cache, param_grads=True)
        if cfg.max_grad_norm is not None:
            fz.clip_grad_norm_(self.actor_grad, cfg.max_grad_norm)
        return actor_loss

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
