"""Actor and critic networks, and the running observation normalizer.

The actor outputs actions in normalized units ([-1, 1], tanh); rescaling to the env's bounds
happens at the env boundary and inside the exported policy, so the agent never sees them.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

_aten = torch.ops.aten


@dataclass(frozen=True)
class Activation:
    """One activation, everywhere it is needed: the module the networks are built of, and
    for the hand-written passes (``ddpg.StackedMLP``) its forward (in place on the pre-activation
    when ``needs_pre`` is false), whether its backward needs the pre-activation (else the
    output is enough), and the backward ATen kernel autograd itself uses for that module,
    so the hand-written passes compute what autograd computes."""

    module: type[nn.Module]
    forward: Callable[[torch.Tensor], torch.Tensor]
    needs_pre: bool
    backward: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


# The one table of activations (config validates agent.activation against its keys).
# relu and tanh overwrite the incoming gradient, which is a temporary: one buffer fewer.
ACTIVATIONS: dict[str, Activation] = {
    "relu": Activation(
        nn.ReLU,
        torch.relu_,
        False,
        lambda g, y: _aten.threshold_backward.grad_input(g, y, 0, grad_input=g),
    ),
    "tanh": Activation(
        nn.Tanh,
        torch.tanh_,
        False,
        lambda g, y: _aten.tanh_backward.grad_input(g, y, grad_input=g),
    ),
    "elu": Activation(
        nn.ELU,
        nn.functional.elu,
        True,
        lambda g, z: _aten.elu_backward(g, 1.0, 1, 1, False, z),
    ),
    "gelu": Activation(nn.GELU, nn.functional.gelu, True, lambda g, z: _aten.gelu_backward(g, z)),
    "silu": Activation(nn.SiLU, nn.functional.silu, True, lambda g, z: _aten.silu_backward(g, z)),
    "leaky_relu": Activation(
        nn.LeakyReLU,
        lambda z: nn.functional.leaky_relu(z, 0.01),
        True,
        lambda g, z: _aten.leaky_relu_backward(g, z, 0.01, False),
    ),
}


def mlp(
    in_dim: int, hidden: Sequence[int], out_dim: int, *, activation: str, layer_norm: bool
) -> nn.Sequential:
    """Linear -> [LayerNorm] -> activation per hidden layer, then a linear head."""
    layers: list[nn.Module] = []
    prev = in_dim
    for width in hidden:
        layers.append(nn.Linear(prev, width))
        if layer_norm:
            layers.append(nn.LayerNorm(width))
        layers.append(ACTIVATIONS[activation].module())
        prev = width
    layers.append(nn.Linear(prev, out_dim))
    return nn.Sequential(*layers)


class Actor(nn.Module):
    """Deterministic policy mu(s) in [-1, 1]^action_dim."""

    def __init__(
        self,
        obs_dim: int,
        action_dim: int,
        hidden: Sequence[int],
        *,
        activation: str = "relu",
        layer_norm: bool = False,
    ):
        super().__init__()
        self.net = mlp(obs_dim, hidden, action_dim, activation=activation, layer_norm=layer_norm)

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.net(obs))


class Critic(nn.Module):
    """Q(s, a) for one or more critics; returns shape (n_critics, batch)."""

    def __init__(
        self,
        obs_dim: int,
        action_dim: int,
        hidden: Sequence[int],
        *,
        n_critics: int = 1,
        activation: str = "relu",
        layer_norm: bool = False,
    ):
        super().__init__()
        self.qs = nn.ModuleList(
            mlp(obs_dim + action_dim, hidden, 1, activation=activation, layer_norm=layer_norm)
            for _ in range(n_critics)
        )

    def forward(self, obs: torch.Tensor, action: torch.Tensor) -> torch.Tensor:
        x = torch.cat([obs, action], dim=-1)
        return torch.stack([q(x).squeeze(-1) for q in self.qs])

    def q1(self, obs: torch.Tensor, action: torch.Tensor) -> torch.Tensor:
        """First critic only: what the actor climbs (DDPG and TD3 alike)."""
        return self.qs[0](torch.cat([obs, action], dim=-1)).squeeze(-1)


def flat_views(flat: torch.Tensor, module: nn.Module) -> list[torch.Tensor]:
    """Views of ``flat`` shaped like ``module``'s parameters, in ``parameters()`` order."""
    views, offset = [], 0
    for p in module.parameters():
        views.append(flat[offset : offset + p.numel()].view_as(p))
        offset += p.numel()
    if offset != flat.numel():
        raise ValueError(f"flat buffer has {flat.numel()} elements, the module {offset}")
    return views


def copy_module(module: nn.Module) -> nn.Module:
    """A deep copy of ``module`` whose tensors own their memory (a plain deep copy of an
    agent's network copies the whole stacked buffer its parameters are views of)."""
    clone = copy.deepcopy(module)
    for t in (*clone.parameters(), *clone.buffers()):
        t.data = t.data.clone()
    return clone


class ObsNormalizer(nn.Module):
    """Running mean/std of observations (parallel Welford), applied with clipping.

    Statistics live in buffers so they travel with ``state_dict`` and the exported policy.
    When disabled it is the identity, which keeps one code path.
    """

    def __init__(self, obs_dim: int, *, enabled: bool, clip: float = 10.0, eps: float = 1e-8):
        super().__init__()
        self.enabled = enabled
        self.clip = clip
        self.eps = eps
        self.register_buffer("mean", torch.zeros(obs_dim, dtype=torch.float64))
        self.register_buffer("var", torch.ones(obs_dim, dtype=torch.float64))
        self.register_buffer("count", torch.tensor(0.0, dtype=torch.float64))

    @torch.no_grad()
    def update(self, batch: np.ndarray | torch.Tensor) -> None:
        if not self.enabled:
            return
        x = torch.as_tensor(batch, dtype=torch.float64, device=self.mean.device).reshape(
            -1, self.mean.shape[0]
        )
        n = float(x.shape[0])
        batch_mean = x.mean(0)
        batch_var = x.var(0, unbiased=False)
        total = self.count + n
        delta = batch_mean - self.mean
        self.mean += delta * (n / total)
        m2 = self.var * self.count + batch_var * n + delta.square() * (self.count * n / total)
        self.var.copy_(m2 / total)
        self.count.copy_(total)

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return obs
        std = torch.sqrt(self.var + self.eps).to(obs.dtype)
        return ((obs - self.mean.to(obs.dtype)) / std).clamp(-self.clip, self.clip)
