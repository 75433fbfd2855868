"""Hand-written MLP passes and a flat Adam: the pieces of the fused update step.

Autograd records a graph, allocates a gradient per parameter and runs an optimizer kernel
per tensor; at the sizes DDPG uses (two or three hidden layers, a few hundred units, batch
256) that bookkeeping costs about as much as the matrix products on a CPU. Here each network
keeps its parameters, gradients and Adam moments in one flat buffer each (see
``networks.flatten_parameters``); the backward pass is written out layer by layer with the
same ATen kernels autograd would call, writing weight gradients straight into the flat
gradient buffer; Adam is one fused kernel per network and Polyak one ``lerp_``.

What it does not compute: critic weight gradients in the actor step (only the input
gradient flows through the critic) and the input gradient of every first layer.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from workbench.networks import ACTIVATIONS, flat_views


def supports(activation: str, layer_norm: bool) -> bool:
    """Whether the fused passes cover this network shape (else the autograd path runs)."""
    return activation in ACTIVATIONS and not layer_norm


@dataclass
class _Linear:
    weight: torch.Tensor  # (out, in), a view of the network's flat parameters
    bias: torch.Tensor
    grad_weight: torch.Tensor | None  # views of the flat gradient buffer (None: no grads)
    grad_bias: torch.Tensor | None


@dataclass
class Cache:
    """What the backward pass needs from a forward pass: each layer's input and saved value."""

    inputs: list[torch.Tensor]
    saved: list[torch.Tensor]


class FusedMLP:
    """Forward and backward of an ``mlp()`` (Linear -> activation ... -> Linear) by hand.

    ``grads`` are views (in ``parameters()`` order) the weight gradients are written into;
    without them the network only runs forward and passes input gradients back.
    """

    def __init__(
        self, net: nn.Sequential, activation: str, grads: list[torch.Tensor] | None = None
    ):
        linears = [m for m in net if isinstance(m, nn.Linear)]
        others = [m for m in net if not isinstance(m, nn.Linear)]
        if len(others) != len(linears) - 1 or not supports(activation, False):
            raise ValueError("FusedMLP needs Linear -> activation -> ... -> Linear")
        act = ACTIVATIONS[activation]
        self.forward_act, self.needs_pre, self.backward_act = (
            act.forward,
            act.needs_pre,
            act.backward,
        )
        self.layers: list[_Linear] = []
        for i, lin in enumerate(linears):
            gw = grads[2 * i] if grads is not None else None
            gb = grads[2 * i + 1] if grads is not None else None
            self.layers.append(_Linear(lin.weight, lin.bias, gw, gb))

    def forward(self, x: torch.Tensor, *, keep: bool = False) -> tuple[torch.Tensor, Cache]:
        """Output of the last linear layer (no output activation), and the cache if ``keep``."""
        cache = Cache([], [])
        h = x
        last = len(self.layers) - 1
        for i, layer in enumerate(self.layers):
            if keep:
                cache.inputs.append(h)
            z = torch.addmm(layer.bias, h, layer.weight.t())
            if i == last:
                return z, cache
            if self.needs_pre:
                h = self.forward_act(z)
                if keep:
                    cache.saved.append(z)
            else:
                h = self.forward_act(z)  # in place: z is h
                if keep:
                    cache.saved.append(h)
        raise AssertionError("unreachable")

    def backward(
        self,
        grad_out: torch.Tensor,
        cache: Cache,
        *,
        param_grads: bool,
        input_columns: slice | None = None,
    ) -> torch.Tensor | None:
        """Backpropagate ``grad_out`` (d loss / d output); returns d loss / d input[:, cols].

        ``param_grads`` writes weight and bias gradients into the flat gradient buffer
        (overwriting it: one backward per step); without it only the input gradient flows.
        """
        g = grad_out
        for i in range(len(self.layers) - 1, -1, -1):
            layer = self.layers[i]
            if param_grads:
                assert layer.grad_weight is not None and layer.grad_bias is not None
                torch.mm(g.t(), cache.inputs[i], out=layer.grad_weight)
                torch.sum(g, 0, out=layer.grad_bias)
            if i == 0:
                if input_columns is None:
                    return None
                return torch.mm(g, layer.weight[:, input_columns])
            # one output (a critic's head): the product is an outer product, no sums
            grad_in = g * layer.weight if g.shape[1] == 1 else torch.mm(g, layer.weight)
            g = self.backward_act(grad_in, cache.saved[i - 1])
        raise AssertionError("unreachable")


def clip_grad_norm_(flat_grad: torch.Tensor, max_norm: float) -> torch.Tensor:
    """``nn.utils.clip_grad_norm_`` over one flat buffer: one norm, one scale, no host sync."""
    total = torch.linalg.vector_norm(flat_grad)
    coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
    flat_grad.mul_(coef)
    return total


class FlatAdam(torch.optim.Adam):
    """Adam whose step is one fused kernel over a network's flat parameter buffer.

    It is a ``torch.optim.Adam`` over the network's parameters, and its per-parameter
    state tensors are views of the flat moment buffers, so ``state_dict()`` is the ordinary
    per-parameter format: a checkpoint moves freely between the fused and the plain path.
    """

    def __init__(
        self,
        params: Iterable[nn.Parameter],
        flat: torch.Tensor,
        flat_grad: torch.Tensor,
        *,
        lr: float,
        weight_decay: float = 0.0,
    ):
        super().__init__(list(params), lr=lr, weight_decay=weight_decay)
        if len(self.param_groups) != 1:
            raise ValueError("FlatAdam takes a single parameter group")
        self.flat, self.flat_grad = flat, flat_grad
        self.exp_avg = torch.zeros_like(flat)
        self.exp_avg_sq = torch.zeros_like(flat)
        # fused Adam keeps its step count on the parameters' device: no host sync
        self.step_count = torch.zeros((), dtype=torch.float32, device=flat.device)
        self._alias_state()

    def rehome(
        self,
        flat: torch.Tensor,
        flat_grad: torch.Tensor,
        exp_avg: torch.Tensor,
        exp_avg_sq: torch.Tensor,
    ) -> None:
        """Use these buffers (already holding the values) from now on (``DDPG.rehome``)."""
        self.flat, self.flat_grad, self.exp_avg, self.exp_avg_sq = (
            flat,
            flat_grad,
            exp_avg,
            exp_avg_sq,
        )
        self._alias_state()

    def _params(self) -> list[torch.Tensor]:
        return list(self.param_groups[0]["params"])

    def _alias_state(self) -> None:
        holder = nn.ParameterList(self._params())  # only to get views in parameters() order
        avg = flat_views(self.exp_avg, holder)
        avg_sq = flat_views(self.exp_avg_sq, holder)
        for p, m, v in zip(self._params(), avg, avg_sq, strict=True):
            self.state[p] = {"step": self.step_count, "exp_avg": m, "exp_avg_sq": v}

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> None:  # type: ignore[override]
        if closure is not None:
            raise ValueError("FlatAdam.step takes no closure")
        self.flat_step()

    def flat_step(self) -> None:
        """The step itself, without ``Optimizer.step``'s hook and profiler wrapper (~0.1 ms)."""
        self.step_count += 1
        _fused_adam([self], self.hyper())

    def hyper(self) -> tuple[float, float, float, float, float]:
        """(lr, beta1, beta2, weight_decay, eps): optimizers alike in these step as one."""
        group = self.param_groups[0]
        if group["amsgrad"] or group["maximize"]:
            raise ValueError("FlatAdam supports plain Adam only (no amsgrad, no maximize)")
        beta1, beta2 = group["betas"]
        return (group["lr"], beta1, beta2, group["weight_decay"], group["eps"])

    def state_dict(self) -> dict:  # type: ignore[override]
        """The standard per-parameter format, as a snapshot (copies, not views)."""
        out = super().state_dict()
        out["state"] = {
            k: {name: t.clone() for name, t in v.items()} for k, v in out["state"].items()
        }
        return out

    def load_state_dict(self, state_dict: dict) -> None:  # type: ignore[override]
        super().load_state_dict(state_dict)
        with torch.no_grad():
            loaded = [self.state.get(p, {}) for p in self._params()]
            if all("exp_avg" in s for s in loaded):
                holder = nn.ParameterList(self._params())
                for s, m, v in zip(
                    loaded,
                    flat_views(self.exp_avg, holder),
                    flat_views(self.exp_avg_sq, holder),
                    strict=True,
                ):
                    m.copy_(s["exp_avg"])
                    v.copy_(s["exp_avg_sq"])
                self.step_count.copy_(torch.as_tensor(loaded[0]["step"]))
            else:  # a state saved before the first step
                self.exp_avg.zero_()
                self.exp_avg_sq.zero_()
                self.step_count.zero_()
        self._alias_state()


def _fused_adam(opts: list[FlatAdam], hyper: tuple[float, float, float, float, float]) -> None:
    lr, beta1, beta2, weight_decay, eps = hyper
    torch._fused_adam_(
        [o.flat for o in opts],
        [o.flat_grad for o in opts],
        [o.exp_avg for o in opts],
        [o.exp_avg_sq for o in opts],
        [],
        [o.step_count for o in opts],
        lr=lr,
        beta1=beta1,
        beta2=beta2,
        weight_decay=weight_decay,
        eps=eps,
        amsgrad=False,
        maximize=False,
    )


def flat_adam_steps(opts: Sequence[FlatAdam]) -> None:
    """``flat_step`` of each optimizer, one fused kernel call per set of equal
    hyperparameters: the kernel works tensor by tensor, so each buffer gets the very floats
    its own ``flat_step`` would give."""
    if not opts:
        return
    for o in opts:
        o.step_count += 1
    groups: dict[tuple[float, ...], list[FlatAdam]] = {}
    for o in opts:
        groups.setdefault(o.hyper(), []).append(o)
    for hyper, alike in groups.items():
        _fused_adam(alike, hyper)  # type: ignore[arg-type]
