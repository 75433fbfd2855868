"""DDPG and TD3 for K members at once: one update step, batched over a member axis.

A ``DDPG`` learner has K slots. Every network's parameters, targets, gradients and Adam
moments are rows of stacked ``(K, n)`` buffers, and the TD3 step (the target with clipped
smoothing noise and the minimum over critics, the critic update, the delayed actor update,
Polyak) runs once for all members as batched matrix products over those rows. A run
trained alone is K=1 through the same step; a population (``train_population``) is K > 1.

What differs per member is applied per member: its learning rates and weight decay (Adam,
one fused kernel call per set of equal values), its tau (one ``lerp`` call per value), its
gamma and gradient clipping (columns of per-member values), its smoothing noise (from its
own generator) and its policy delay. Each member is also an ``Agent``: ordinary
``nn.Module`` networks whose parameters are views of its rows, for acting, evaluation,
parameter noise, export and checkpoints.

The passes are written out layer by layer (``StackedMLP``) with the ATen kernels autograd
would call: no graph, no per-parameter gradients, critic weight gradients only in the critic
step. A member equals the autograd formulation (``tests/oracle.py``) to float rounding; the
same command, config, seed and K give the same floats on the same machine. ``update`` never
logs, prints or reads a value back to the host: the loop reads the metrics at log time.
``compile=True`` wraps the two gradient passes in ``torch.compile`` (CUDA graphs on a GPU).
"""

from __future__ import annotations

import ctypes
import functools
import logging
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from workbench import seeding
from workbench.config import AgentConfig
from workbench.networks import ACTIVATIONS, Actor, Critic, ObsNormalizer, flat_views
from workbench.replay import Batch

log = logging.getLogger(__name__)

Metrics = dict[str, torch.Tensor]

# Adam's constants (torch's defaults; not configurable)
BETAS = (0.9, 0.999)
EPS = 1e-8
# What a checkpoint's optimizer states say besides the moments (torch.optim.Adam's format)
_ADAM_GROUP = {
    "betas": BETAS,
    "eps": EPS,
    "amsgrad": False,
    "maximize": False,
    "foreach": None,
    "capturable": False,
    "differentiable": False,
    "fused": None,
    "decoupled_weight_decay": False,
}

# The stacked buffers, by name: for each network its parameters, targets, gradients, Adam
# moments (the critic's row holds every critic, one after another).
BUFFERS = (
    "actor",
    "critic",
    "actor_target",
    "critic_target",
    "actor_grad",
    "critic_grad",
    "actor_exp_avg",
    "actor_exp_avg_sq",
    "critic_exp_avg",
    "critic_exp_avg_sq",
)


# ----------------------------------------------------------------------------- passes


@dataclass
class _Layer:
    """One linear layer of every member, as views of the stacked rows (laid out once, so a
    pass makes no views of its own), with its layer norm if it has one."""

    weight: torch.Tensor  # (R, out, in)
    weight_t: torch.Tensor  # (R, in, out)
    bias: torch.Tensor  # (R, 1, out)
    grad_weight: torch.Tensor | None  # (R, out, in)
    grad_bias: torch.Tensor | None  # (R, out)
    norm: tuple[torch.Tensor, torch.Tensor] | None = None  # gain, bias: (R, 1, out)
    grad_norm: tuple[torch.Tensor, torch.Tensor] | None = None  # (R, out) each
    eps: float = 1e-5


@dataclass(slots=True)
class Cache:
    """What the backward pass needs of a forward pass, per layer."""

    inputs: list[torch.Tensor]  # each linear layer's input
    saved: list[torch.Tensor]  # what each activation's backward reads (its input or output)
    normed: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor] | None]


class StackedMLP:
    """An ``mlp()`` (Linear -> [LayerNorm] -> activation ... -> Linear) for each of R
    members, its parameters rows of one ``(R, n)`` buffer, forward and backward by hand.

    ``template`` gives the layout (``parameters()`` order); ``grad`` (R, n) receives the
    parameter gradients (None: the network only runs forward and passes input gradients
    back, for the inputs ``input_columns``).
    """

    def __init__(
        self,
        template: nn.Sequential,
        flat: torch.Tensor,
        grad: torch.Tensor | None,
        activation: str,
        *,
        input_columns: slice | None = None,
    ):
        act = ACTIVATIONS[activation]
        self.forward_act, self.needs_pre, self.backward_act = (
            act.forward,
            act.needs_pre,
            act.backward,
        )
        r = flat.shape[0]
        offset = 0

        def take(shape: torch.Size, buffer: torch.Tensor) -> torch.Tensor:
            return buffer[:, offset : offset + shape.numel()].view(r, *shape)

        self.layers: list[_Layer] = []
        for module in template:
            if isinstance(module, nn.Linear):
                w = take(module.weight.shape, flat)
                gw = take(module.weight.shape, grad) if grad is not None else None
                offset += module.weight.numel()
                b = take(module.bias.shape, flat)
                gb = take(module.bias.shape, grad) if grad is not None else None
                offset += module.bias.numel()
                self.layers.append(_Layer(w, w.transpose(1, 2), b.unsqueeze(1), gw, gb))
            elif isinstance(module, nn.LayerNorm):
                shape = module.weight.shape
                gain = take(shape, flat)
                grad_gain = take(shape, grad) if grad is not None else None
                offset += module.weight.numel()
                shift = take(shape, flat)
                grad_shift = take(shape, grad) if grad is not None else None
                offset += module.bias.numel()
                layer = self.layers[-1]
                layer.norm, layer.eps = (gain.unsqueeze(1), shift.unsqueeze(1)), module.eps
                if grad_gain is not None and grad_shift is not None:
                    layer.grad_norm = (grad_gain, grad_shift)
            elif not isinstance(module, act.module):
                raise ValueError(f"StackedMLP cannot run a {type(module).__name__} layer")
        if offset != flat.shape[1]:
            raise ValueError(f"the buffer has {flat.shape[1]} values per member, the net {offset}")
        self.head_transposed = r > 1 and self.layers[-1].weight.shape[1] == 1
        # the first layer's weights for the inputs whose gradient is asked for
        self.input_weight = (
            self.layers[0].weight[:, :, input_columns] if input_columns is not None else None
        )

    def forward(self, x: torch.Tensor, *, keep: bool = False) -> tuple[torch.Tensor, Cache]:
        """The last linear layer's output (R, B, out), and the cache if ``keep``."""
        cache = Cache([], [], [])
        h = x
        last = len(self.layers) - 1
        for i, layer in enumerate(self.layers):
            if keep:
                cache.inputs.append(h)
            if i == last and self.head_transposed:
                # one output per member: K matrix-vector products run ~3x faster batched
                # with the vector on the left, (W h^T + b)^T
                z = torch.baddbmm(layer.bias, layer.weight, h.transpose(1, 2)).transpose(1, 2)
            else:
                z = torch.baddbmm(layer.bias, h, layer.weight_t)
            if i == last:
                return z, cache
            if layer.norm is not None:
                gain, shift = layer.norm
                xhat, mean, rstd = torch.native_layer_norm(z, z.shape[-1:], None, None, layer.eps)
                if keep:
                    cache.normed.append((z, xhat, mean, rstd))
                z = torch.addcmul(shift, xhat, gain)
            elif keep:
                cache.normed.append(None)
            h = self.forward_act(z)  # in place unless the backward needs z
            if keep:
                cache.saved.append(z if self.needs_pre else h)
        raise AssertionError("unreachable")

    def backward(
        self, grad_out: torch.Tensor, cache: Cache, *, param_grads: bool
    ) -> torch.Tensor | None:
        """Backpropagate ``grad_out`` (d loss / d output); returns d loss / d input for the
        ``input_columns`` (None without them).

        ``param_grads`` writes the parameter gradients into the gradient buffer (overwriting
        it: one backward per step); without it only the input gradient flows.
        """
        g = grad_out
        for i in range(len(self.layers) - 1, -1, -1):
            layer = self.layers[i]
            if param_grads:
                assert layer.grad_weight is not None and layer.grad_bias is not None
                torch.bmm(g.transpose(1, 2), cache.inputs[i], out=layer.grad_weight)
                torch.sum(g, 1, out=layer.grad_bias)
            if i == 0:
                return None if self.input_weight is None else torch.bmm(g, self.input_weight)
            # one output (a critic's head): the product is an outer product, no sums
            grad_in = g * layer.weight if g.shape[2] == 1 else torch.bmm(g, layer.weight)
            g = self.backward_act(grad_in, cache.saved[i - 1])
            if self.layers[i - 1].norm is not None:
                g = self._norm_backward(self.layers[i - 1], g, cache.normed[i - 1], param_grads)
        raise AssertionError("unreachable")

    @staticmethod
    def _norm_backward(
        layer: _Layer,
        g: torch.Tensor,
        normed: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor] | None,
        param_grads: bool,
    ) -> torch.Tensor:
        """Through a layer norm (identity without one): its gain and bias gradients, and the
        gradient of its input."""
        if layer.norm is None or normed is None:
            return g
        z, xhat, mean, rstd = normed
        if param_grads:
            assert layer.grad_norm is not None
            grad_gain, grad_shift = layer.grad_norm
            torch.sum(g * xhat, 1, out=grad_gain)
            torch.sum(g, 1, out=grad_shift)
        grad_z, _, _ = torch.ops.aten.native_layer_norm_backward(
            g * layer.norm[0], z, z.shape[-1:], mean, rstd, None, None, [True, False, False]
        )
        return grad_z


# ----------------------------------------------------------------------------- members


def _adam_state(
    params: Sequence[torch.Tensor],
    exp_avg: torch.Tensor,
    exp_avg_sq: torch.Tensor,
    step: torch.Tensor,
    lr: float,
    weight_decay: float,
) -> dict[str, Any]:
    """One network's Adam state in ``torch.optim.Adam``'s format (copies, not views)."""
    holder = nn.ParameterList([nn.Parameter(p, requires_grad=False) for p in params])
    moments = zip(flat_views(exp_avg, holder), flat_views(exp_avg_sq, holder), strict=True)
    return {
        "state": {
            i: {"step": step.clone(), "exp_avg": m.clone(), "exp_avg_sq": v.clone()}
            for i, (m, v) in enumerate(moments)
        },
        "param_groups": [
            {
                **_ADAM_GROUP,
                "lr": lr,
                "weight_decay": weight_decay,
                "params": list(range(len(params))),
            }
        ],
    }


def _load_adam_state(
    state: dict[str, Any],
    params: Sequence[torch.Tensor],
    exp_avg: torch.Tensor,
    exp_avg_sq: torch.Tensor,
    step: torch.Tensor,
) -> None:
    per_param = [state["state"].get(i, {}) for i in range(len(params))]
    if not all("exp_avg" in s for s in per_param):  # saved before the first step
        exp_avg.zero_()
        exp_avg_sq.zero_()
        step.zero_()
        return
    holder = nn.ParameterList([nn.Parameter(p, requires_grad=False) for p in params])
    for s, m, v in zip(
        per_param, flat_views(exp_avg, holder), flat_views(exp_avg_sq, holder), strict=True
    ):
        m.copy_(s["exp_avg"])
        v.copy_(s["exp_avg_sq"])
    step.copy_(torch.as_tensor(per_param[0]["step"], dtype=step.dtype))


class Agent:
    """One member of a learner: its values, its generator, and ordinary modules whose
    parameters are views of its rows (what acting, evaluation, parameter noise, export and
    checkpoints use)."""

    def __init__(
        self,
        cfg: AgentConfig,
        slot: int,
        nets: dict[str, nn.Module],
        obs_norm: ObsNormalizer,
        rows: dict[str, torch.Tensor],
        steps: dict[str, torch.Tensor],
        generator: torch.Generator,
    ):
        self.cfg, self.slot = cfg, slot
        self.actor: Actor = nets["actor"]  # type: ignore[assignment]
        self.critic: Critic = nets["critic"]  # type: ignore[assignment]
        self.actor_target: Actor = nets["actor_target"]  # type: ignore[assignment]
        self.critic_target: Critic = nets["critic_target"]  # type: ignore[assignment]
        self.obs_norm = obs_norm
        self.rows = rows  # this member's row of each of BUFFERS
        self.steps = steps  # its Adam step count per network (0-d views)
        self.generator = generator  # TD3's target smoothing noise
        self.n_updates = 0  # critic updates so far; the actor follows every policy_delay
        self.device = rows["actor"].device
        # what its Adam steps take, per network: (lr, weight decay), and its rows
        self.adam_values = {
            "actor": (cfg.actor_lr, 0.0),
            "critic": (cfg.critic_lr, cfg.critic_weight_decay),
        }
        parts = ("", "_grad", "_exp_avg", "_exp_avg_sq")
        self.adam_steps = {"actor": 0, "critic": 0}  # the step counts, read on the host
        self.adam_rows = {
            net: (*(rows[f"{net}{part}"] for part in parts), steps[net])
            for net in ("actor", "critic")
        }

    @torch.no_grad()
    def act(self, obs: torch.Tensor) -> torch.Tensor:
        """Deterministic action in normalized units for raw observations."""
        return self.actor(self.obs_norm(obs))

    def state_dict(self) -> dict[str, Any]:
        """Networks, targets and Adam states in torch's usual formats (copies of the rows)."""
        out: dict[str, Any] = {
            name: {k: v.clone() for k, v in getattr(self, name).state_dict().items()}
            for name in ("actor", "critic", "actor_target", "critic_target")
        }
        for net in ("actor", "critic"):
            module = getattr(self, net)
            out[f"{net}_opt"] = _adam_state(
                list(module.parameters()),
                self.rows[f"{net}_exp_avg"],
                self.rows[f"{net}_exp_avg_sq"],
                self.steps[net],
                *self.adam_values[net],
            )
        out["obs_norm"] = self.obs_norm.state_dict()
        out["generator"] = self.generator.get_state()
        out["n_updates"] = self.n_updates
        return out

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for name in ("actor", "critic", "actor_target", "critic_target"):
            getattr(self, name).load_state_dict(state[name])  # in place: into the rows
        with torch.no_grad():
            for net in ("actor", "critic"):
                _load_adam_state(
                    state[f"{net}_opt"],
                    list(getattr(self, net).parameters()),
                    self.rows[f"{net}_exp_avg"],
                    self.rows[f"{net}_exp_avg_sq"],
                    self.steps[net],
                )
        self.obs_norm.load_state_dict(state["obs_norm"])
        self.generator.set_state(state["generator"])
        self.n_updates = int(state["n_updates"])
        self.adam_steps = {net: int(step.item()) for net, step in self.steps.items()}


def _adopt(module: nn.Module, row: torch.Tensor) -> None:
    """Copy ``module``'s parameters into ``row`` and make them views of it."""
    with torch.no_grad():
        for p, view in zip(module.parameters(), flat_views(row, module), strict=True):
            view.copy_(p)
            p.data = view
    module.requires_grad_(False)


# ----------------------------------------------------------------------------- learner


class DDPG:
    """K DDPG/TD3 members of one shape (networks, activation, layer norm, critics), each in
    a slot of stacked storage, updated by one batched step.

    ``place`` puts a member in a slot (its networks initialized from torch's global
    generator, which the caller seeds); ``update`` is one update of the members a batch is
    for; ``act`` is every member's deterministic action in one forward pass.
    """

    def __init__(
        self,
        k: int,
        obs_dim: int,
        action_dim: int,
        shape: AgentConfig,
        *,
        device: torch.device | str = "cpu",
        compile: bool = False,
        compile_mode: str | None = None,
        cuda_graphs: bool = True,
    ):
        self.k, self.obs_dim, self.action_dim = k, obs_dim, action_dim
        self.shape = shape
        if k > 1:
            keep_freed_memory()
        self.device = torch.device(device)
        self.n_critics = shape.n_critics
        # the networks' layout, without values (no draw from torch's generator)
        kw = _net_kw(shape)
        actor = Actor(obs_dim, action_dim, shape.actor_hidden, **kw).to("meta")
        q = Critic(obs_dim, action_dim, shape.critic_hidden, n_critics=1, **kw).to("meta")
        sizes = {
            "actor": sum(p.numel() for p in actor.parameters()),
            "critic": sum(p.numel() for p in q.parameters()) * self.n_critics,
        }
        self.storage = {
            name: torch.zeros(k, sizes[name.split("_")[0]], device=self.device) for name in BUFFERS
        }
        self.steps = {net: torch.zeros(k, device=self.device) for net in ("actor", "critic")}
        s, act, c = self.storage, shape.activation, self.n_critics

        def critics(name: str) -> torch.Tensor:  # every critic of every member: (K * C, n_q)
            return s[name].view(k * c, -1)

        q_net = q.qs[0]
        self.actor = StackedMLP(actor.net, s["actor"], s["actor_grad"], act)
        self.actor_target = StackedMLP(actor.net, s["actor_target"], None, act)
        self.critic = StackedMLP(q_net, critics("critic"), critics("critic_grad"), act)
        self.critic_target = StackedMLP(q_net, critics("critic_target"), None, act)
        # the critic the actor climbs (the first), through which only input gradients flow
        first = s["critic"][:, : sizes["critic"] // c]
        self.critic_first = StackedMLP(q_net, first, None, act, input_columns=slice(obs_dim, None))
        # per-member values, as columns
        self.gamma = torch.zeros(k, 1, device=self.device)
        self.max_grad_norm = torch.full((k, 1), float("inf"), device=self.device)
        self.agents: list[Agent | None] = [None] * k
        self._normalizing = False  # whether any member normalizes its observations

        self._critic_step: Callable[..., tuple[torch.Tensor, torch.Tensor]] = self._critic_grads
        self._actor_step: Callable[[torch.Tensor], torch.Tensor] = self._actor_grads
        self.compiled = False
        self.compile_fallbacks: list[str] = []  # steps that run eagerly after a failed compile
        self._cuda_graphs = False
        self._unverified: set[str] = set()
        if compile:
            self._compile(compile_mode, cuda_graphs)

    # ------------------------------------------------------------------------- members

    def place(self, slot: int, cfg: AgentConfig, *, seed: int, normalize_obs: bool) -> Agent:
        """A new member in ``slot``: networks initialized from torch's global generator,
        targets equal to them, Adam moments zero (whatever the slot held is overwritten)."""
        if [getattr(cfg, f) for f in _SHAPE] != [getattr(self.shape, f) for f in _SHAPE]:
            raise ValueError(f"slot {slot}: the member's networks differ from the learner's")
        obs_dim, action_dim, dev, kw = self.obs_dim, self.action_dim, self.device, _net_kw(cfg)
        hidden_c, n_c = cfg.critic_hidden, cfg.n_critics
        nets: dict[str, nn.Module] = {
            "actor": Actor(obs_dim, action_dim, cfg.actor_hidden, **kw).to(dev),
            "critic": Critic(obs_dim, action_dim, hidden_c, n_critics=n_c, **kw).to(dev),
            "actor_target": Actor(obs_dim, action_dim, cfg.actor_hidden, **kw).to(dev),
            "critic_target": Critic(obs_dim, action_dim, hidden_c, n_critics=n_c, **kw).to(dev),
        }
        rows = {name: t[slot] for name, t in self.storage.items()}
        for name, module in nets.items():
            _adopt(module, rows[name])
        with torch.no_grad():
            rows["actor_target"].copy_(rows["actor"])
            rows["critic_target"].copy_(rows["critic"])
            for name in BUFFERS[4:]:  # gradients and moments
                rows[name].zero_()
            for steps in self.steps.values():
                steps[slot] = 0.0
            self.gamma[slot] = cfg.gamma
            norm = cfg.max_grad_norm
            self.max_grad_norm[slot] = float("inf") if norm is None else norm
        agent = Agent(
            cfg,
            slot,
            nets,
            ObsNormalizer(obs_dim, enabled=normalize_obs).to(dev),
            rows,
            {net: steps[slot] for net, steps in self.steps.items()},
            seeding.torch_generator(seed, "target_noise", dev),
        )
        self.agents[slot] = agent
        self._normalizing = any(a is not None and a.obs_norm.enabled for a in self.agents)
        return agent

    # ---------------------------------------------------------------------------- acting

    @torch.no_grad()
    def act(self, obs: torch.Tensor) -> torch.Tensor:
        """Every member's deterministic action: (K, n, obs_dim) raw -> (K, n, action_dim)."""
        return torch.tanh(self.actor.forward(self._normalized(obs))[0])

    def _normalized(self, obs: torch.Tensor) -> torch.Tensor:
        """Each member's rows through its own observation normalizer (if it has one on)."""
        if not self._normalizing:
            return obs
        return torch.stack(
            [a.obs_norm(o) if a is not None else o for a, o in zip(self.agents, obs, strict=True)]
        )

    # ---------------------------------------------------------------------------- update

    def update(self, batch: Batch, active: Sequence[bool]) -> list[Metrics | None]:
        """One update of each member with ``active[k]`` on its rows of ``batch`` (K, B, ...):
        a critic step, and for the members whose policy delay is up an actor step and the
        targets' Polyak step. Returns each member's metrics (None where it had none)."""
        members = [a for a, on in zip(self.agents, active, strict=True) if a is not None and on]
        metrics: list[Metrics | None] = [None] * self.k
        if not members:
            return metrics
        obs, next_obs = self._normalized(batch.obs), self._normalized(batch.next_obs)
        noise = self.target_noise(members, batch.rewards.shape[1])
        args = (obs, batch.actions, batch.rewards, next_obs, batch.terminated)
        critic_loss, q_mean = self._call(
            "critic", self._critic_step, *args, *(() if noise is None else (noise,))
        )
        self._clip("critic", members)
        self._adam("critic", members)
        due = []
        losses, qs = critic_loss.unbind(), q_mean.unbind()
        for agent in members:
            agent.n_updates += 1
            metrics[agent.slot] = {"loss/critic": losses[agent.slot], "q/mean": qs[agent.slot]}
            if agent.n_updates % agent.cfg.policy_delay == 0:
                due.append(agent)
        if due:
            actor_loss = self._call("actor", self._actor_step, obs).unbind()
            self._clip("actor", due)
            self._adam("actor", due)
            self._polyak(due)
            for agent in due:
                metrics[agent.slot]["loss/actor"] = actor_loss[agent.slot]  # type: ignore[index]
        return metrics

    def target_noise(self, members: Sequence[Agent], size: int) -> torch.Tensor | None:
        """TD3's clipped target smoothing noise (K, B, action_dim), each member's from its own
        generator (zeros for a member without it); None when no member smooths."""
        draws = {}
        for agent in members:
            c = agent.cfg
            if c.target_policy_noise > 0:
                noise = torch.randn(
                    (size, self.action_dim), device=self.device, generator=agent.generator
                )
                draws[agent.slot] = (noise * c.target_policy_noise).clamp(
                    -c.target_noise_clip, c.target_noise_clip
                )
        if not draws:
            return None
        if self.k == 1:
            return draws[0].unsqueeze(0)
        out = torch.zeros(self.k, size, self.action_dim, device=self.device)
        for slot, noise in draws.items():
            out[slot] = noise
        return out

    def target(
        self,
        rewards: torch.Tensor,
        terminated: torch.Tensor,
        next_obs: torch.Tensor,
        noise: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """r + gamma * (1 - terminated) * min_i Q'_i(s', clip(mu'(s') + noise)): (K, B).

        A member without smoothing noise adds zeros: tanh lies within [-1, 1], so the clamp
        leaves its actions as they are."""
        next_actions = torch.tanh(self.actor_target.forward(next_obs)[0])
        if noise is not None:
            next_actions = (next_actions + noise).clamp(-1.0, 1.0)
        x = self._for_each_critic(torch.cat([next_obs, next_actions], dim=-1))
        qs = self.critic_target.forward(x)[0]
        if self.n_critics == 1:
            next_q = qs.view(self.k, -1)
        else:
            next_q = qs.view(self.k, self.n_critics, -1).amin(dim=1)
        return torch.addcmul(rewards, self.gamma * (1.0 - terminated), next_q)

    def _for_each_critic(self, x: torch.Tensor) -> torch.Tensor:
        """(K, B, in) -> (K * n_critics, B, in): every critic of a member sees its input."""
        if self.n_critics == 1:
            return x
        k, b, n = x.shape
        return x.unsqueeze(1).expand(k, self.n_critics, b, n).reshape(-1, b, n)

    def _critic_grads(
        self,
        obs: torch.Tensor,
        actions: torch.Tensor,
        rewards: torch.Tensor,
        next_obs: torch.Tensor,
        terminated: torch.Tensor,
        noise: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The critic loss's gradients into ``critic_grad``: sum over critics of the mean
        squared TD error. Returns each member's loss and mean Q, (K,) each."""
        target = self.target(rewards, terminated, next_obs, noise)
        x = self._for_each_critic(torch.cat([obs, actions], dim=-1))
        z, cache = self.critic.forward(x, keep=True)
        q = z.view(self.k, self.n_critics, -1)  # (K, n_critics, B)
        diff = q - target.unsqueeze(1)
        critic_loss = diff.square().mean(dim=2).sum(dim=1)
        grad_q = diff * (2.0 / diff.shape[2])  # d loss / d q
        self.critic.backward(grad_q.view(z.shape), cache, param_grads=True)
        return critic_loss, q.mean(dim=(1, 2))

    def _actor_grads(self, obs: torch.Tensor) -> torch.Tensor:
        """The actor loss (-Q of the first critic) gradients into ``actor_grad``; through
        the critic to its action inputs only (no critic weight gradients). Returns (K,)."""
        z, actor_cache = self.actor.forward(obs, keep=True)
        actions = torch.tanh(z)
        q, critic_cache = self.critic_first.forward(torch.cat([obs, actions], dim=-1), keep=True)
        actor_loss = -q.mean(dim=(1, 2))
        grad_q = torch.full_like(q, -1.0 / q.shape[1])
        grad_actions = self.critic_first.backward(grad_q, critic_cache, param_grads=False)
        assert grad_actions is not None
        grad_z = torch.ops.aten.tanh_backward(grad_actions, actions)
        self.actor.backward(grad_z, actor_cache, param_grads=True)
        return actor_loss

    def _clip(self, net: str, members: Sequence[Agent]) -> None:
        """``nn.utils.clip_grad_norm_`` of each member's gradient row, by its own bound."""
        if all(a.cfg.max_grad_norm is None for a in members):
            return
        grad = self.storage[f"{net}_grad"]
        total = torch.linalg.vector_norm(grad, dim=1, keepdim=True)
        grad.mul_(torch.clamp(self.max_grad_norm / (total + 1e-6), max=1.0))

    def _adam(self, net: str, members: Sequence[Agent]) -> None:
        """Adam on each member's rows: one fused call per set of equal (lr, weight decay,
        step count); every member alike, one call on the stacked buffers. The kernel works
        element by element, so each row gets the floats of its own step."""
        groups: dict[tuple[float, float, int], list[Agent]] = {}
        for agent in members:
            agent.adam_steps[net] += 1
            key = (*agent.adam_values[net], agent.adam_steps[net])
            groups.setdefault(key, []).append(agent)
        for (lr, weight_decay, _), alike in groups.items():
            if len(alike) == self.k:
                self.steps[net].add_(1.0)
                s, step = self.storage, self.steps[net][0]
                tensors = [[s[net]], [s[f"{net}_grad"]], [s[f"{net}_exp_avg"]]]
                tensors += [[s[f"{net}_exp_avg_sq"]], [], [step]]
            else:
                rows = [list(t) for t in zip(*(a.adam_rows[net] for a in alike), strict=True)]
                torch._foreach_add_(rows[4], 1.0)
                tensors = [*rows[:4], [], rows[4]]
            torch._fused_adam_(
                *tensors,
                lr=lr,
                beta1=BETAS[0],
                beta2=BETAS[1],
                weight_decay=weight_decay,
                eps=EPS,
                amsgrad=False,
                maximize=False,
            )

    def _polyak(self, members: Sequence[Agent]) -> None:
        """Each member's targets toward its networks by its own tau: one lerp call per tau
        (every member alike: on the stacked buffers)."""
        by_tau: dict[float, list[Agent]] = {}
        for agent in members:
            by_tau.setdefault(agent.cfg.tau, []).append(agent)
        for tau, alike in by_tau.items():
            rows = [self.storage] if len(alike) == self.k else [a.rows for a in alike]
            targets = [r[n] for r in rows for n in ("critic_target", "actor_target")]
            sources = [r[n] for r in rows for n in ("critic", "actor")]
            torch._foreach_lerp_(targets, sources, tau)

    # --------------------------------------------------------------------------- compile

    def _compile(self, mode: str | None, cuda_graphs: bool) -> None:
        """Wrap both gradient passes in torch.compile; CUDA graphs (reduce-overhead) on a GPU.

        Compilation happens on the first call of each pass; if it fails there (no C++
        compiler, an unsupported platform) the buffers are restored and that pass runs
        eagerly from then on (see ``_call``).
        """
        if not hasattr(torch, "compile"):
            log.warning("torch.compile is not available; the update runs eagerly")
            return
        self._cuda_graphs = cuda_graphs and self.device.type == "cuda"
        if mode is None:
            mode = "reduce-overhead" if self._cuda_graphs else "default"
        if self._cuda_graphs:  # buffers mutated in place must keep their addresses
            for t in (*self.storage.values(), *self.steps.values()):
                torch._dynamo.mark_static_address(t)
        kw: dict[str, Any] = {} if mode == "default" else {"mode": mode}
        self._critic_step = torch.compile(self._critic_step, **kw)
        self._actor_step = torch.compile(self._actor_step, **kw)
        self._unverified = {"critic", "actor"}
        self.compiled = True

    def _call(self, which: str, fn: Callable[..., Any], *args: torch.Tensor) -> Any:
        """Run a (possibly compiled) pass; a failed first compilation falls back to eager."""
        if self._cuda_graphs:
            torch.compiler.cudagraph_mark_step_begin()
        if which not in self._unverified:
            return fn(*args)
        snapshot = {name: t.clone() for name, t in self.storage.items()}
        try:
            out = fn(*args)
        except Exception as err:  # compilation is best effort; the eager pass is the same
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            log.warning("torch.compile of the %s step failed, running it eagerly: %s", which, first)
            self.compile_fallbacks.append(which)
            for name, t in self.storage.items():
                t.copy_(snapshot[name])
            eager = self._critic_grads if which == "critic" else self._actor_grads
            setattr(self, f"_{which}_step", eager)
            out = eager(*args)
        self._unverified.discard(which)
        return out


@functools.cache
def keep_freed_memory() -> None:
    """Let glibc keep freed memory for the next allocation (once per process, on Linux).

    A batched pass allocates temporaries of K x batch x width floats (0.5 MB each at K=8,
    width 64). glibc serves blocks that large by mmap and hands them back on free, so each
    pass page-faults its temporaries in again: a population's first run in a process took
    27.6 s instead of 19.6 s (Pendulum, K=8, 5k steps each). PyTorch's CPU tuning guide
    points to the same remedy (a caching malloc such as jemalloc).
    """
    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:  # another C library: its own rules
        return
    m_trim_threshold, m_mmap_threshold = -1, -3  # malloc.h
    libc.mallopt(m_mmap_threshold, 64 << 20)
    libc.mallopt(m_trim_threshold, 256 << 20)


# What a member must share with its learner: the networks' shapes
_SHAPE = ("actor_hidden", "critic_hidden", "activation", "layer_norm", "n_critics")


def _net_kw(cfg: AgentConfig) -> dict[str, Any]:
    return {"activation": cfg.activation, "layer_norm": cfg.layer_norm}
