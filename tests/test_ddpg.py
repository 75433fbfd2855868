"""Invariants of the update step: Polyak, bootstrapping, twin critics, delay, smoothing."""

import copy

import pytest
import torch
from torch import nn

from workbench.config import AgentConfig
from workbench.ddpg import DDPG, polyak_update
from workbench.networks import ObsNormalizer
from workbench.replay import Batch

OBS, ACT, B = 3, 2, 32


def _agent(**overrides) -> DDPG:
    cfg = AgentConfig(actor_hidden=[16, 16], critic_hidden=[16, 16], **overrides)
    return DDPG(OBS, ACT, cfg, seed=0)


def _batch(terminated=0.0, truncated=0.0, seed=0) -> Batch:
    g = torch.Generator().manual_seed(seed)
    return Batch(
        obs=torch.randn(B, OBS, generator=g),
        actions=torch.rand(B, ACT, generator=g) * 2 - 1,
        rewards=torch.randn(B, generator=g),
        next_obs=torch.randn(B, OBS, generator=g),
        terminated=torch.full((B,), terminated),
        truncated=torch.full((B,), truncated),
    )


def _params(module: nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in module.parameters()]


def _same(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


def test_polyak_tau_one_copies_and_tau_zero_keeps():
    src, dst = nn.Linear(4, 3), nn.Linear(4, 3)
    before = _params(dst)
    polyak_update(dst, src, 0.0)
    assert _same(_params(dst), before)
    polyak_update(dst, src, 1.0)
    assert _same(_params(dst), _params(src))


def test_polyak_interpolates():
    src, dst = nn.Linear(4, 3), nn.Linear(4, 3)
    expected = [0.75 * d + 0.25 * s for d, s in zip(_params(dst), _params(src), strict=True)]
    polyak_update(dst, src, 0.25)
    assert all(torch.allclose(x, y) for x, y in zip(_params(dst), expected, strict=True))


@pytest.mark.parametrize("tau", [1.0, 0.3])
def test_update_moves_targets_by_tau(tau):
    agent = _agent(tau=tau)
    old_target = _params(agent.critic_target)
    agent.update(_batch())
    new_online = _params(agent.critic)
    expected = [(1 - tau) * t + tau * o for t, o in zip(old_target, new_online, strict=True)]
    got = _params(agent.critic_target)
    assert all(torch.allclose(x, y, atol=1e-6) for x, y in zip(got, expected, strict=True))


def test_termination_cuts_the_bootstrap_and_truncation_does_not():
    agent = _agent(gamma=0.9)
    term = _batch(terminated=1.0, truncated=0.0)
    assert torch.allclose(agent.target_q(term, term.next_obs), term.rewards)

    trunc = _batch(terminated=0.0, truncated=1.0)
    with torch.no_grad():
        next_q = agent.critic_target(trunc.next_obs, agent.actor_target(trunc.next_obs))[0]
    expected = trunc.rewards + 0.9 * next_q
    assert torch.allclose(agent.target_q(trunc, trunc.next_obs), expected)
    assert not torch.allclose(expected, trunc.rewards)


def test_twin_critics_take_the_minimum():
    agent = _agent(n_critics=2)
    batch = _batch()
    with torch.no_grad():
        qs = agent.critic_target(batch.next_obs, agent.actor_target(batch.next_obs))
    assert qs.shape == (2, B)
    assert not torch.allclose(qs[0], qs[1])  # independent initializations
    expected = batch.rewards + agent.cfg.gamma * torch.minimum(qs[0], qs[1])
    assert torch.allclose(agent.target_q(batch, batch.next_obs), expected)


def test_policy_delay_delays_actor_and_target_updates():
    agent = _agent(policy_delay=3, tau=0.5)
    actor0, actor_t0, critic_t0 = (
        _params(agent.actor),
        _params(agent.actor_target),
        _params(agent.critic_target),
    )
    critic0 = _params(agent.critic)
    for i in range(2):
        metrics = agent.update(_batch(seed=i))
        assert "loss/actor" not in metrics
    assert not _same(_params(agent.critic), critic0)  # the critic learns every update
    assert _same(_params(agent.actor), actor0)
    assert _same(_params(agent.actor_target), actor_t0)
    assert _same(_params(agent.critic_target), critic_t0)
    metrics = agent.update(_batch(seed=2))
    assert "loss/actor" in metrics
    assert not _same(_params(agent.actor), actor0)
    assert not _same(_params(agent.actor_target), actor_t0)
    assert not _same(_params(agent.critic_target), critic_t0)


class _Recorder(nn.Module):
    """Wraps a critic and records the actions it is asked about."""

    def __init__(self, critic: nn.Module):
        super().__init__()
        self.critic = critic
        self.seen: list[torch.Tensor] = []

    def forward(self, obs, action):
        self.seen.append(action.detach().clone())
        return self.critic(obs, action)


def test_target_policy_smoothing_is_clipped():
    agent = _agent(target_policy_noise=100.0, target_noise_clip=0.1)
    recorder = _Recorder(agent.critic_target)
    agent.critic_target = recorder
    batch = _batch()
    agent.target_q(batch, batch.next_obs)
    with torch.no_grad():
        clean = agent.actor_target(batch.next_obs)
    used = recorder.seen[0]
    delta = used - clean
    inside = used.abs() < 1.0  # away from the [-1, 1] action clamp the offset is the noise
    assert delta[inside].abs().max() <= 0.1 + 1e-6
    assert delta[inside].abs().max() > 0.09  # huge noise is clipped to exactly the bound
    assert used.abs().max() <= 1.0


def test_no_smoothing_noise_when_off():
    agent = _agent(target_policy_noise=0.0)
    recorder = _Recorder(agent.critic_target)
    agent.critic_target = recorder
    batch = _batch()
    agent.target_q(batch, batch.next_obs)
    with torch.no_grad():
        assert torch.equal(recorder.seen[0], agent.actor_target(batch.next_obs))


def test_actor_step_leaves_critic_gradients_from_the_critic_loss_only():
    agent = _agent()
    twin = copy.deepcopy(agent)
    batch = _batch()
    agent.update(batch)
    # the critic gradients left after a full update are exactly the critic-loss gradients
    obs = twin.obs_norm(batch.obs)
    q = twin.critic(obs, batch.actions)
    loss = (q - twin.target_q(batch, twin.obs_norm(batch.next_obs))).square().mean(1).sum()
    loss.backward()
    for p, ref in zip(agent.critic.parameters(), twin.critic.parameters(), strict=True):
        assert torch.allclose(p.grad, ref.grad, atol=1e-6)


@pytest.mark.usefixtures("one_torch_thread")  # 1,500 updates of tiny nets
def test_update_learns_a_simple_regression():
    """With gamma ~ 0 the critic must fit the reward; the actor must climb it."""
    torch.manual_seed(0)
    cfg = AgentConfig(
        actor_hidden=[16, 16], critic_hidden=[64, 64], gamma=1e-6, critic_lr=3e-3, actor_lr=1e-3
    )
    agent = DDPG(OBS, ACT, cfg, seed=0)
    for i in range(1500):
        b = _batch(seed=i)
        b = Batch(
            b.obs,
            b.actions,
            -(b.actions - 0.5).square().sum(1),
            b.next_obs,
            b.terminated,
            b.truncated,
        )
        m = agent.update(b)
    assert float(m["loss/critic"]) < 0.05
    with torch.no_grad():
        a = agent.actor(torch.randn(64, OBS))
    assert torch.allclose(a, torch.full_like(a, 0.5), atol=0.15)


def test_state_dict_round_trip():
    agent = _agent(n_critics=2, policy_delay=2)
    for i in range(3):
        agent.update(_batch(seed=i))
    other = _agent(n_critics=2, policy_delay=2)
    other.load_state_dict(agent.state_dict())
    assert other.n_updates == 3
    b = _batch(seed=9)
    torch.manual_seed(1)
    m1 = agent.update(b)
    torch.manual_seed(1)
    m2 = other.update(b)
    assert torch.equal(m1["loss/critic"], m2["loss/critic"])


def test_obs_normalizer_matches_numpy_stats():
    import numpy as np

    rng = np.random.default_rng(0)
    norm = ObsNormalizer(3, enabled=True)
    data = rng.normal([1.0, -2.0, 5.0], [0.5, 2.0, 3.0], size=(3000, 3))
    for chunk in np.split(data, 30):
        norm.update(chunk)
    assert np.allclose(norm.mean.numpy(), data.mean(0))
    assert np.allclose(norm.var.numpy(), data.var(0))
    out = norm(torch.as_tensor(data, dtype=torch.float32))
    assert torch.allclose(out.mean(0), torch.zeros(3), atol=1e-3)
    assert not ObsNormalizer(3, enabled=False)(torch.ones(2, 3)).equal(torch.zeros(2, 3))
