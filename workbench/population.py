"""A population: K DDPG/TD3 agents of one shape, updated by one batched step.

Each member is an ordinary ``DDPG`` agent with its own hyperparameters (learning rates,
tau, gamma, weight decay, target smoothing, policy delay, gradient clipping), its own
generator and its own optimizer state, but its flat buffers (parameters, targets,
gradients, Adam moments; see ``DDPG.rehome``) are rows of stacked ``(K, n)`` tensors. The
gradient passes, the costly part, run once for all members as batched matrix products over
those rows (``torch.baddbmm``/``torch.bmm``, the K axis leading); what differs per member
is applied per member on its own rows: the Adam step with its learning rates, the Polyak
step with its tau, the target with its gamma, its target noise from its own generator.

Exactness. For most shapes the batched product gives, member by member, the very floats of
the single agent's product; for some (a critic's one-unit head, a single observation when
acting, tiny layers) the BLAS library picks another kernel for one matrix than for a batch
and the last bits differ. Each product shape is probed once (``_batched_is_exact``): it is
batched where that gives the single kernel's floats and done member by member where it does
not. So on a CPU a member is updated bit for bit as its single agent would be
(``tests/test_population.py``): it is the agent ``workbench train`` trains with its seed.
On an accelerator the products are always batched (no bitwise claim there).
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence
from dataclasses import dataclass, fields

import torch

from workbench import fused as fz
from workbench.config import Config
from workbench.ddpg import DDPG, Metrics
from workbench.networks import ACTIVATIONS, flat_views
from workbench.replay import Batch, ReplayBuffer, StackedReplay, stand_ins

# What members of one population must share: everything that sets a tensor's shape (the
# env sets the observation and action sizes), and the update path the population batches.
SHAPE_KEYS = (
    "agent.actor_hidden",
    "agent.critic_hidden",
    "agent.activation",
    "agent.layer_norm",
    "agent.n_critics",
    "agent.batch_size",
    "env.id",
    "env.n_envs",
    "env.time_feature",
    "env.kwargs",
    "device",
)


def check_members(configs: Sequence[Config]) -> None:
    """Refuse a population whose members cannot share one batched program, before anything
    starts: every key of ``SHAPE_KEYS`` as member 0's, the fused update, no compilation."""
    from workbench.config import ConfigError, get_key, validate

    problems = []
    for k, cfg in enumerate(configs):
        try:
            validate(cfg)
        except ConfigError as err:
            problems += [f"member {k}: {p}" for p in err.problems]
        for key in SHAPE_KEYS:
            mine, first = get_key(cfg, key), get_key(configs[0], key)
            if mine != first:
                problems.append(
                    f"member {k}: {key}={mine!r}: must be member 0's ({first!r}) in one "
                    "population (it sets tensor shapes); members that differ here are trained "
                    "in separate populations"
                )
        if len(configs) == 1:
            continue
        for key, value, why in (
            ("perf.fused_update", False, "a population batches the fused update"),
            ("perf.compile", True, "a population's update runs eagerly"),
            ("agent.layer_norm", True, "the fused update has no layer norm"),
        ):
            if get_key(cfg, key) == value:
                problems.append(f"member {k}: {key}={value}: {why}")
    if problems:
        raise ConfigError(problems)


_PROBED: dict[tuple[object, ...], bool] = {}
_PROBE_DRAWS = 8


def _batched_is_exact(
    kind: str, k: int, rows: int, n_in: int, n_out: int, device: torch.device
) -> bool:
    """Whether the batched kernel for this product gives the per-member kernel's floats.

    kinds: ``fwd`` (x W^T + b), ``fwdT`` (the same, transposed: (W x^T + b)^T), ``gw``
    (g^T x), ``gb`` (sum of g over rows), ``gi`` (g W), ``gc`` (g W[:, cols], cols = the
    last ``n_in`` columns of a wider W).
    """
    if device.type != "cpu":
        return True
    key = (kind, k, rows, n_in, n_out)
    if key not in _PROBED:
        # For some shapes (a one-row, one-unit product) the kernels differ only for some
        # data: several draws, and the same draws whatever was probed before.
        g = torch.Generator().manual_seed(zlib.crc32(repr(key).encode()))
        same = True
        for _ in range(_PROBE_DRAWS):
            w = torch.randn(k, n_out, n_in + (3 if kind == "gc" else 0), generator=g)
            b = torch.randn(k, n_out, generator=g)
            x = torch.randn(k, rows, n_in, generator=g)
            d = torch.randn(k, rows, n_out, generator=g)
            if kind == "fwd":
                got = torch.baddbmm(b.unsqueeze(1), x, w.transpose(1, 2))
                want = [torch.addmm(b[j], x[j], w[j].t()) for j in range(k)]
            elif kind == "fwdT":
                got = _forward_transposed(x, w, b)
                want = [torch.addmm(b[j], x[j], w[j].t()) for j in range(k)]
            elif kind == "gw":
                got = torch.bmm(d.transpose(1, 2), x)
                want = [torch.mm(d[j].t(), x[j]) for j in range(k)]
            elif kind == "gb":  # into rows of a wider buffer, as the gradient rows are
                got = torch.sum(d, 1, out=torch.empty(k, n_out + 3)[:, 3:])
                want = [torch.sum(d[j], 0) for j in range(k)]
            elif kind == "gi":
                got = torch.bmm(d, w)
                want = [torch.mm(d[j], w[j]) for j in range(k)]
            else:
                got = torch.bmm(d, w[:, :, 3:])
                want = [torch.mm(d[j], w[j][:, 3:]) for j in range(k)]
            same = same and torch.equal(got, torch.stack(want))
        _PROBED[key] = same
    return _PROBED[key]


def _forward_transposed(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """x W^T + b for every member, computed as (W x^T + b)^T: (K, rows, out), a view."""
    return torch.baddbmm(b.unsqueeze(2), w, x.transpose(1, 2)).transpose(1, 2)


@dataclass
class _Layer:
    weight: torch.Tensor  # (K, out, in): views of the stacked parameter rows
    bias: torch.Tensor  # (K, out)
    grad_weight: torch.Tensor | None
    grad_bias: torch.Tensor | None


class _StackedMLP:
    """``fused.FusedMLP`` with a leading member axis (products batched where that is exact)."""

    def __init__(
        self,
        net: torch.nn.Module,
        flat: torch.Tensor,
        offset: int,
        grad: torch.Tensor | None,
        activation: str,
    ):
        act = ACTIVATIONS[activation]
        self.forward_act, self.needs_pre, self.backward_act = (
            act.forward,
            act.needs_pre,
            act.backward,
        )
        self.layers: list[_Layer] = []  # views of the rows, laid out as ``net``
        k = flat.shape[0]
        for lin in (m for m in net if isinstance(m, torch.nn.Linear)):
            out_f, in_f = lin.weight.shape
            w = slice(offset, offset + out_f * in_f)
            b = slice(w.stop, w.stop + out_f)
            self.layers.append(
                _Layer(
                    flat[:, w].view(k, out_f, in_f),
                    flat[:, b],
                    grad[:, w].view(k, out_f, in_f) if grad is not None else None,
                    grad[:, b] if grad is not None else None,
                )
            )
            offset = b.stop
        self.end = offset

    def forward(self, x: torch.Tensor, *, keep: bool = False) -> tuple[torch.Tensor, fz.Cache]:
        cache = fz.Cache([], [])
        h = x
        last = len(self.layers) - 1
        for i, layer in enumerate(self.layers):
            if keep:
                cache.inputs.append(h)
            z = self._linear(layer, h)
            if i == last:
                return z, cache
            h = self.forward_act(z)  # in place unless the backward needs z
            if keep:
                cache.saved.append(z if self.needs_pre else h)
        raise AssertionError("unreachable")

    def _linear(self, layer: _Layer, h: torch.Tensor) -> torch.Tensor:
        k, rows, n_in = h.shape
        w, b = layer.weight, layer.bias
        if _batched_is_exact("fwd", k, rows, n_in, w.shape[1], h.device):
            return torch.baddbmm(b.unsqueeze(1), h, w.transpose(1, 2))
        # a one-unit head: (1 x in)(in x rows) gives the single kernel's floats where
        # (rows x in)(in x 1) does not
        if _batched_is_exact("fwdT", k, rows, n_in, w.shape[1], h.device):
            return _forward_transposed(h, w, b)
        return torch.stack([torch.addmm(b[j], h[j], w[j].t()) for j in range(k)])

    def backward(
        self,
        grad_out: torch.Tensor,
        cache: fz.Cache,
        *,
        param_grads: bool,
        input_columns: slice | None = None,
    ) -> torch.Tensor | None:
        g = grad_out
        for i in range(len(self.layers) - 1, -1, -1):
            layer = self.layers[i]
            k, rows, n_out = g.shape
            x, w = cache.inputs[i], layer.weight
            if param_grads:
                assert layer.grad_weight is not None and layer.grad_bias is not None
                n_in = x.shape[2]
                if _batched_is_exact("gw", k, rows, n_in, n_out, g.device):
                    layer.grad_weight.copy_(torch.bmm(g.transpose(1, 2), x))
                else:
                    for j in range(k):
                        torch.mm(g[j].t(), x[j], out=layer.grad_weight[j])
                if _batched_is_exact("gb", k, rows, n_in, n_out, g.device):
                    torch.sum(g, 1, out=layer.grad_bias)  # into the rows: no copy
                else:
                    for j in range(k):
                        torch.sum(g[j], 0, out=layer.grad_bias[j])
            if i == 0:
                if input_columns is None:
                    return None
                cols = w[:, :, input_columns]
                if _batched_is_exact("gc", k, rows, cols.shape[2], n_out, g.device):
                    return torch.bmm(g, cols)
                return torch.stack([torch.mm(g[j], cols[j]) for j in range(k)])
            # one output (a critic's head): an outer product, no sums
            if n_out == 1:
                grad_in = g * w
            elif _batched_is_exact("gi", k, rows, w.shape[2], n_out, g.device):
                grad_in = torch.bmm(g, w)
            else:
                grad_in = torch.stack([torch.mm(g[j], w[j]) for j in range(k)])
            g = self.backward_act(grad_in, cache.saved[i - 1])
        raise AssertionError("unreachable")


def _stack_batches(batches: Sequence[Batch]) -> Batch:
    """Per-member batches as one, each field with a leading K axis."""
    columns = zip(*(_batch_fields(b) for b in batches), strict=True)
    return Batch(*(torch.stack(column) for column in columns))


def _batch_fields(batch: Batch) -> tuple[torch.Tensor, ...]:
    """The batch's tensors in field order (``dataclasses.astuple`` would copy them)."""
    return tuple(getattr(batch, f.name) for f in fields(batch))


def member_batch(batch: Batch, k: int) -> Batch:
    """Member ``k``'s rows of a stacked batch (views)."""
    return Batch(*(t[k] for t in _batch_fields(batch)))


def _polyak(agents: Sequence[DDPG]) -> None:
    """Each agent's targets toward its networks by its own tau: one ``lerp`` call per tau,
    tensor by tensor (each row gets the floats of the agent's own ``lerp_``)."""
    by_tau: dict[float, list[DDPG]] = {}
    for agent in agents:
        by_tau.setdefault(agent.cfg.tau, []).append(agent)
    for tau, alike in by_tau.items():
        targets = [t for a in alike for t in (a.critic_target_flat, a.actor_target_flat)]
        sources = [t for a in alike for t in (a.critic_flat, a.actor_flat)]
        torch._foreach_lerp_(targets, sources, tau)


def _check_fits(k: int, agent: DDPG, other: DDPG) -> None:
    """Member ``k`` can share the batched update with ``other`` (same shapes, fused path)."""
    if not agent.fused:
        raise ValueError(f"member {k}: a population needs the fused update")
    if agent.compiled:
        raise ValueError(f"member {k}: a population does not compile its update")
    for key in (key for key in SHAPE_KEYS if key.startswith("agent.")):
        name = key.split(".")[1]
        if getattr(agent.cfg, name) != getattr(other.cfg, name):
            raise ValueError(f"member {k}: {key} differs from member 0 ({key} sets shapes)")
    if (agent.obs_dim, agent.action_dim) != (other.obs_dim, other.action_dim):
        raise ValueError(f"member {k}: observation or action size differs from member 0")


class Population:
    """K fused agents of one shape whose flat buffers are rows of stacked storage; with
    their replay buffers (``buffers``), one gather samples every member's batch
    (``StackedReplay``) where the buffers fit one stacked storage."""

    def __init__(self, agents: Sequence[DDPG], buffers: Sequence[ReplayBuffer] | None = None):
        if not agents:
            raise ValueError("a population needs at least one agent")
        if buffers is not None and len(buffers) != len(agents):
            raise ValueError(f"{len(buffers)} replay buffers for {len(agents)} agents")
        first = agents[0]
        for i, agent in enumerate(agents):
            _check_fits(i, agent, first)
        self.agents = list(agents)
        self.k = len(agents)
        self.obs_dim = first.obs_dim
        device = first.device
        self.storage = {
            name: torch.stack([a.flat_buffer(name) for a in agents]) for name in DDPG.FLAT_BUFFERS
        }
        for k, agent in enumerate(agents):
            agent.rehome({name: rows[k] for name, rows in self.storage.items()})
        s, act = self.storage, first.cfg.activation
        self.actor = _StackedMLP(first.actor.net, s["actor_flat"], 0, s["actor_grad"], act)
        self.actor_target = _StackedMLP(first.actor.net, s["actor_target_flat"], 0, None, act)
        self.critics, self.critic_targets = [], []
        offset = 0
        for i in range(len(first.critic.qs)):
            net = first.critic.qs[i]
            q = _StackedMLP(net, s["critic_flat"], offset, s["critic_grad"], act)
            qt = _StackedMLP(net, s["critic_target_flat"], offset, None, act)
            self.critics.append(q)
            self.critic_targets.append(qt)
            offset = q.end
        assert offset == s["critic_flat"].shape[1]
        # per member, as (K, 1) columns: the target's discount
        self.gamma = torch.tensor([[a.cfg.gamma] for a in agents], device=device)
        self._check_views(agents)
        self.buffers = list(buffers) if buffers is not None else None
        self.replay = (
            StackedReplay(self.buffers)
            if self.buffers is not None and StackedReplay.fits(self.buffers)
            else None
        )

    def replace(self, k: int, agent: DDPG, buffer: ReplayBuffer | None = None) -> None:
        """Put a new member in slot ``k`` (a finished or pruned member's): its values (and
        its buffer's rows) are copied into the slot's storage; from then on it trains there."""
        _check_fits(k, agent, self.agents[0] if k else self.agents[-1])
        if (self.buffers is None) != (buffer is None):
            raise ValueError(f"member {k}: a replay buffer goes with every member or none")
        agent.rehome({name: rows[k] for name, rows in self.storage.items()})
        self.agents[k] = agent
        self.gamma[k, 0] = agent.cfg.gamma
        self._check_views([agent], offset=k)
        if self.buffers is not None and buffer is not None:
            self.buffers[k] = buffer
            if self.replay is not None and StackedReplay.fits(self.buffers):
                self.replay.replace(k, buffer)
            else:  # another capacity: batches are gathered member by member from now on
                self.replay = None

    def learn(self, indices: Sequence[torch.Tensor | None]) -> tuple[list[Metrics | None], Batch]:
        """One update of every member with row ``indices`` into its buffer (None: it does
        not learn now): the batches gathered in one go where the buffers are stacked.
        Returns each member's metrics and the stacked batch (``(K, B, ...)``)."""
        if self.buffers is None:
            raise ValueError("learn() needs the members' replay buffers")
        active = [i is not None for i in indices]
        if not any(active):
            raise ValueError("learn() with no member learning")
        if self.replay is not None:
            batch = self.replay.gather(list(indices))
        else:
            owners = stand_ins(list(indices))
            batch = _stack_batches([self.buffers[k].gather(i) for k, i in owners])
        return self._update(batch, active), batch

    def _check_views(self, agents: Sequence[DDPG], offset: int = 0) -> None:
        """Every member's parameters are views of its row (what rehome promised)."""
        for k, agent in enumerate(agents, start=offset):
            views = flat_views(self.storage["actor_flat"][k], agent.actor)
            assert all(
                p.data_ptr() == v.data_ptr()
                for p, v in zip(agent.actor.parameters(), views, strict=True)
            )

    @torch.no_grad()
    def act(self, obs: torch.Tensor) -> torch.Tensor:
        """Deterministic actions of every member: (K, n, obs_dim) raw -> (K, n, action_dim)."""
        x = torch.stack([a.obs_norm(o) for a, o in zip(self.agents, obs, strict=True)])
        return torch.tanh(self.actor.forward(x)[0])

    @torch.no_grad()
    def update(self, batches: Sequence[Batch | None]) -> list[Metrics | None]:
        """One update of every member with a batch (None: that member does not learn now).

        Returns each member's metrics, as ``DDPG.update`` would (None where it had none).
        """
        if len(batches) != self.k:
            raise ValueError(f"{len(batches)} batches for {self.k} members")
        active = [b is not None for b in batches]
        if not any(active):
            return [None] * self.k
        template = next(b for b in batches if b is not None)
        return self._update(
            _stack_batches([b if b is not None else template for b in batches]), active
        )

    def _update(self, batch: Batch, active: Sequence[bool]) -> list[Metrics | None]:
        """``update`` on the members' batches stacked ``(K, B, ...)`` (inactive members'
        rows are ignored)."""
        agents = self.agents
        size = batch.rewards.shape[1]
        obs, next_obs = batch.obs, batch.next_obs
        if any(a.obs_norm.enabled for a in agents):
            obs = torch.stack([a.obs_norm(o) for a, o in zip(agents, obs, strict=True)])
            next_obs = torch.stack([a.obs_norm(o) for a, o in zip(agents, next_obs, strict=True)])
        actions, rewards, terminated = batch.actions, batch.rewards, batch.terminated
        noise = None  # (K, B, action_dim) when a learning member smooths its target
        for k, agent in enumerate(agents):
            if active[k]:  # from its own generator, as its single run draws
                member_noise = agent.target_noise(size)
                if member_noise is not None:
                    if noise is None:
                        noise = torch.zeros(self.k, *member_noise.shape, device=obs.device)
                    noise[k] = member_noise

        # critic step (all members; applied to the active ones)
        critic_loss, q_mean = self._critic_grads(obs, actions, rewards, next_obs, terminated, noise)
        due = []
        for k, agent in enumerate(agents):
            if not active[k]:
                due.append(False)
                continue
            if agent.cfg.max_grad_norm is not None:
                fz.clip_grad_norm_(agent.critic_grad, agent.cfg.max_grad_norm)
            agent.n_updates += 1
            due.append(agent.n_updates % agent.cfg.policy_delay == 0)
        fz.flat_adam_steps([a._critic_flat_opt for a, on in zip(agents, active, strict=True) if on])
        metrics: list[Metrics | None] = [
            {"loss/critic": critic_loss[k], "q/mean": q_mean[k]} if active[k] else None
            for k in range(self.k)
        ]
        if not any(due):
            return metrics

        # actor and target step for the members whose policy delay is up
        actor_loss = self._actor_grads(obs)
        stepping = [agent for agent, on in zip(agents, due, strict=True) if on]
        for k, agent in enumerate(agents):
            if due[k]:
                if agent.cfg.max_grad_norm is not None:
                    fz.clip_grad_norm_(agent.actor_grad, agent.cfg.max_grad_norm)
                metrics[k]["loss/actor"] = actor_loss[k]  # type: ignore[index]
        fz.flat_adam_steps([a._actor_flat_opt for a in stepping])
        _polyak(stepping)
        return metrics

    def _critic_grads(
        self,
        obs: torch.Tensor,
        actions: torch.Tensor,
        rewards: torch.Tensor,
        next_obs: torch.Tensor,
        terminated: torch.Tensor,
        noise: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The fused critic pass of ``DDPG._fused_critic`` for every member at once."""
        next_actions = torch.tanh(self.actor_target.forward(next_obs)[0])
        # a member without target smoothing adds zeros: tanh is within [-1, 1], so the clamp
        # leaves its actions as they are, bit for bit
        if noise is not None:
            next_actions = (next_actions + noise).clamp(-1.0, 1.0)
        x_next = torch.cat([next_obs, next_actions], dim=-1)
        next_qs = [f.forward(x_next)[0].squeeze(-1) for f in self.critic_targets]
        next_q = next_qs[0] if len(next_qs) == 1 else torch.stack(next_qs).min(dim=0).values
        target = rewards + self.gamma * (1.0 - terminated) * next_q  # (K, B)

        x = torch.cat([obs, actions], dim=-1)
        outs = [f.forward(x, keep=True) for f in self.critics]
        q = torch.stack([z.squeeze(-1) for z, _ in outs], dim=1)  # (K, n_critics, B)
        diff = q - target.unsqueeze(1)
        critic_loss = diff.square().mean(dim=2).sum(dim=1)
        grad_q = (diff * 2.0) * (1.0 / diff.shape[2])
        for i, (f, (_, cache)) in enumerate(zip(self.critics, outs, strict=True)):
            f.backward(grad_q[:, i].unsqueeze(-1), cache, param_grads=True)
        return critic_loss, q.mean(dim=(1, 2))

    def _actor_grads(self, obs: torch.Tensor) -> torch.Tensor:
        """The fused actor pass of ``DDPG._fused_actor`` for every member at once."""
        z, actor_cache = self.actor.forward(obs, keep=True)
        actions = torch.tanh(z)
        critic = self.critics[0]
        q, critic_cache = critic.forward(torch.cat([obs, actions], dim=-1), keep=True)
        actor_loss = -q.mean(dim=(1, 2))
        grad_q = torch.full_like(q, -1.0 / q.shape[1])
        grad_actions = critic.backward(
            grad_q, critic_cache, param_grads=False, input_columns=slice(self.obs_dim, None)
        )
        assert grad_actions is not None
        grad_z = torch.ops.aten.tanh_backward(grad_actions, actions)
        self.actor.backward(grad_z, actor_cache, param_grads=True)
        return actor_loss
