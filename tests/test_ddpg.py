"""The learner's update step: its invariants (Polyak, bootstrapping, twin critics, delay,
smoothing) and the equivalence contract.

The contract: a member of a K-member learner equals the autograd formulation of its own
TD3 step (``tests/oracle.py``), and so its single run, to float rounding: after 40
updates every parameter of its networks and targets lies within ``REL`` of the oracle's,
relative to the tensor's largest magnitude (seen: below 5e-7), for DDPG and TD3, every
activation, layer norm, clipping and weight decay, members with different seeds, learning
rates, tau, gamma, smoothing and delays that start learning at different updates. What stays
bit for bit: the same inputs to the same learner (same K) give the same floats.
"""

import dataclasses

import numpy as np
import pytest
import torch
from oracle import Oracle
from torch import nn

from workbench.config import AgentConfig
from workbench.ddpg import DDPG, Agent, StackedMLP
from workbench.networks import ObsNormalizer
from workbench.replay import Batch

OBS, ACT, B = 5, 2, 32
REL = 1e-5
NETS = ("actor", "critic", "actor_target", "critic_target")


def _cfg(**overrides) -> AgentConfig:
    return AgentConfig(actor_hidden=[16, 16], critic_hidden=[16, 16], batch_size=B, **overrides)


def _learner(configs, normalize_obs=False, **kw) -> DDPG:
    """A learner with one member per config, member k initialized from seed k."""
    learner = DDPG(len(configs), OBS, ACT, configs[0], **kw)
    for slot, cfg in enumerate(configs):
        torch.manual_seed(slot)
        learner.place(slot, cfg, seed=slot, normalize_obs=normalize_obs)
    return learner


def _batch(k=1, *, seed=0, terminated=None, truncated=0.0) -> Batch:
    """K members' batches; ``terminated`` None: about one transition in ten ends."""
    g = torch.Generator().manual_seed(seed)
    ended = (torch.rand(k, B, generator=g) < 0.1).float()
    return Batch(
        obs=torch.randn(k, B, OBS, generator=g),
        actions=torch.rand(k, B, ACT, generator=g) * 2 - 1,
        rewards=torch.randn(k, B, generator=g),
        next_obs=torch.randn(k, B, OBS, generator=g),
        terminated=ended if terminated is None else torch.full((k, B), float(terminated)),
        truncated=torch.full((k, B), float(truncated)),
    )


def _agent(learner: DDPG, slot: int = 0) -> Agent:
    agent = learner.agents[slot]
    assert agent is not None
    return agent


def _params(module: nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in module.parameters()]


def _same(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


def _worst(a: nn.Module, b: nn.Module) -> float:
    """The largest difference of two networks' tensors, relative to each tensor's scale."""
    return max(
        ((x - y).abs().max() / y.abs().max().clamp(min=1e-12)).item()
        for x, y in zip(a.parameters(), b.parameters(), strict=True)
    )


# ----------------------------------------------------------------------------- the contract

VARIANTS = {
    "ddpg": {},
    "td3": {"n_critics": 2, "policy_delay": 2, "target_policy_noise": 0.2},
    "tanh": {"activation": "tanh"},
    "gelu": {"activation": "gelu"},
    "elu": {"activation": "elu"},
    "silu": {"activation": "silu"},
    "leaky_relu-twin": {"activation": "leaky_relu", "n_critics": 2},
    "layer_norm": {"layer_norm": True},
    "layer_norm-td3": {"layer_norm": True, "n_critics": 2, "target_policy_noise": 0.2},
}
MEMBERS = [
    {"actor_lr": 1e-3, "critic_lr": 2e-3, "tau": 0.005, "gamma": 0.99},
    {"actor_lr": 3e-4, "critic_lr": 1e-3, "tau": 0.05, "gamma": 0.9, "critic_weight_decay": 1e-2},
    {"actor_lr": 2e-3, "critic_lr": 5e-4, "tau": 0.2, "gamma": 0.98, "max_grad_norm": 0.5},
]


@pytest.mark.parametrize("k", [1, 3])
@pytest.mark.parametrize("variant", VARIANTS.values(), ids=VARIANTS.keys())
def test_each_member_equals_the_autograd_step_to_float_rounding(variant, k):
    configs = [_cfg(**m, **variant) for m in MEMBERS[:k]]
    if k > 1 and variant.get("target_policy_noise"):  # a member with its own delay, smoothing
        configs[1] = dataclasses.replace(configs[1], policy_delay=3, target_policy_noise=0.1)
    learner = _learner(configs)
    oracles = [Oracle(_agent(learner, slot)) for slot in range(k)]
    starts = [0, 5, 12][:k]  # updates before which a member does not learn yet
    for step in range(40):
        batch = _batch(k, seed=step)
        active = [step >= s for s in starts]
        got = learner.update(batch, active)
        for slot, oracle in enumerate(oracles):
            if not active[slot]:
                assert got[slot] is None
                continue
            want = oracle.update(batch.member(slot))
            metrics = got[slot]
            assert metrics is not None and metrics.keys() == want.keys()
            for key, value in want.items():
                torch.testing.assert_close(metrics[key], value, rtol=REL, atol=1e-6)
    for slot, oracle in enumerate(oracles):
        agent = _agent(learner, slot)
        assert agent.n_updates == oracle.n_updates
        for name, net in oracle.nets().items():
            assert _worst(getattr(agent, name), net) < REL, name


def test_the_same_inputs_give_the_same_floats():
    """Bit for bit: the same learner (K, configs, seeds) on the same batches."""
    configs = [_cfg(**m, **VARIANTS["td3"]) for m in MEMBERS]
    a, b = _learner(configs), _learner(configs)
    for step in range(10):
        batch = _batch(3, seed=step)
        a.update(batch, [True, step > 2, True])
        b.update(batch, [True, step > 2, True])
    for name, tensor in a.storage.items():
        assert torch.equal(tensor, b.storage[name]), name


def test_a_member_state_moves_between_learners_of_any_size():
    """A member's state_dict (torch's formats) loads into another learner's slot and goes on
    as the original does, to float rounding: a population member's checkpoint resumes alone."""
    configs = [_cfg(**m, **VARIANTS["td3"]) for m in MEMBERS]
    population = _learner(configs)
    for step in range(3):
        population.update(_batch(3, seed=step), [True] * 3)
    member = _agent(population, 1)
    state = member.state_dict()
    adam = torch.optim.Adam(Oracle(member).critic.parameters())
    adam.load_state_dict(state["critic_opt"])  # torch.optim.Adam's own format
    alone = _learner([configs[1]])
    _agent(alone).load_state_dict(state)
    assert _agent(alone).n_updates == 3
    for step in range(3, 6):
        batch = _batch(3, seed=step)
        population.update(batch, [True] * 3)
        alone.update(Batch(*(t[1:2] for t in vars(batch).values())), [True])
    for name in NETS:
        assert _worst(getattr(_agent(alone), name), getattr(member, name)) < REL, name
    opt_state = _agent(alone).state_dict()["critic_opt"]["state"]
    assert {float(s["step"]) for s in opt_state.values()} == {6.0}


def test_state_dict_is_a_snapshot_of_the_rows():
    learner = _learner([_cfg()])
    learner.update(_batch(), [True])
    state = _agent(learner).state_dict()
    saved = state["critic_opt"]["state"][0]["exp_avg"].clone()
    weight = state["actor"]["net.0.weight"].clone()
    learner.update(_batch(seed=1), [True])
    assert torch.equal(state["critic_opt"]["state"][0]["exp_avg"], saved)
    assert torch.equal(state["actor"]["net.0.weight"], weight)
    # a copy of its own: saving it does not save the learner's whole storage
    assert state["actor"]["net.0.weight"].untyped_storage().nbytes() == weight.numel() * 4


# ----------------------------------------------------------------------------- invariants


@pytest.mark.parametrize("tau", [1.0, 0.3])
def test_update_moves_targets_by_tau(tau):
    learner = _learner([_cfg(tau=tau)])
    agent = _agent(learner)
    old_target = _params(agent.critic_target)
    learner.update(_batch(), [True])
    new_online = _params(agent.critic)
    expected = [(1 - tau) * t + tau * o for t, o in zip(old_target, new_online, strict=True)]
    got = _params(agent.critic_target)
    assert all(torch.allclose(x, y, atol=1e-6) for x, y in zip(got, expected, strict=True))


def test_termination_cuts_the_bootstrap_and_truncation_does_not():
    learner = _learner([_cfg(gamma=0.9)])
    agent = _agent(learner)
    with torch.no_grad():
        term = _batch(terminated=1.0, truncated=0.0)
        got = learner.target(term.rewards, term.terminated, term.next_obs)
        assert torch.allclose(got, term.rewards)
        trunc = _batch(terminated=0.0, truncated=1.0)
        next_obs = trunc.next_obs[0]
        next_q = agent.critic_target(next_obs, agent.actor_target(next_obs))[0]
        expected = trunc.rewards[0] + 0.9 * next_q
        got = learner.target(trunc.rewards, trunc.terminated, trunc.next_obs)[0]
    assert torch.allclose(got, expected, atol=1e-6)
    assert not torch.allclose(expected, trunc.rewards[0])


def test_twin_critics_take_the_minimum():
    learner = _learner([_cfg(n_critics=2)])
    agent = _agent(learner)
    batch = _batch(terminated=0.0)
    with torch.no_grad():
        next_obs = batch.next_obs[0]
        qs = agent.critic_target(next_obs, agent.actor_target(next_obs))
        got = learner.target(batch.rewards, batch.terminated, batch.next_obs)[0]
    assert qs.shape == (2, B)
    assert not torch.allclose(qs[0], qs[1])  # independent initializations
    assert torch.allclose(got, batch.rewards[0] + 0.99 * torch.minimum(qs[0], qs[1]), atol=1e-6)


def test_policy_delay_delays_actor_and_target_updates():
    learner = _learner([_cfg(policy_delay=3, tau=0.5)])
    agent = _agent(learner)
    before = {name: _params(getattr(agent, name)) for name in NETS}
    for i in range(2):
        (metrics,) = learner.update(_batch(seed=i), [True])
        assert "loss/actor" not in metrics
    assert not _same(_params(agent.critic), before["critic"])  # the critic learns every update
    for name in ("actor", "actor_target", "critic_target"):
        assert _same(_params(getattr(agent, name)), before[name]), name
    (metrics,) = learner.update(_batch(seed=2), [True])
    assert "loss/actor" in metrics
    for name in ("actor", "actor_target", "critic_target"):
        assert not _same(_params(getattr(agent, name)), before[name]), name


def test_target_policy_smoothing_is_clipped():
    learner = _learner([_cfg(target_policy_noise=100.0, target_noise_clip=0.1)])
    agent = _agent(learner)
    noise = learner.target_noise([agent], B)
    assert noise is not None and noise.shape == (1, B, ACT)
    assert torch.equal(noise.abs(), torch.full_like(noise, 0.1))  # huge noise: at the bound
    batch = _batch(terminated=0.0)
    with torch.no_grad():
        next_obs = batch.next_obs[0]
        actions = (agent.actor_target(next_obs) + noise[0]).clamp(-1, 1)
        want = batch.rewards[0] + 0.99 * agent.critic_target(next_obs, actions)[0]
        got = learner.target(batch.rewards, batch.terminated, batch.next_obs, noise)[0]
    assert torch.allclose(got, want, atol=1e-6)


def test_no_smoothing_noise_when_off():
    learner = _learner([_cfg(target_policy_noise=0.0), _cfg(target_policy_noise=0.3)])
    first, second = _agent(learner, 0), _agent(learner, 1)
    assert learner.target_noise([first], B) is None
    both = learner.target_noise([first, second], B)
    assert (
        both is not None and torch.equal(both[0], torch.zeros(B, ACT)) and both[1].abs().max() > 0
    )


def test_the_actor_step_leaves_the_critic_gradients_of_the_critic_loss():
    """No critic weight gradients in the actor step: the gradient row still holds the
    critic loss's (the oracle's after its critic step)."""
    learner = _learner([_cfg()])
    oracle = Oracle(_agent(learner))
    batch = _batch()
    learner.update(batch, [True])  # critic step, then actor step (policy_delay=1)
    oracle.critic_step(batch.member(0))
    ref = torch.cat([p.grad.reshape(-1) for p in oracle.critic.parameters()])
    assert torch.allclose(learner.storage["critic_grad"][0], ref, atol=1e-6)


def test_per_member_values_really_differ_in_effect():
    """tau=1 copies the online networks into the targets; tau=0 leaves the targets alone."""
    learner = _learner([_cfg(tau=1.0), _cfg(tau=0.0)])
    before = [learner.storage["actor_target"][k].clone() for k in range(2)]
    learner.update(_batch(2), [True, True])
    s = learner.storage
    assert torch.equal(s["actor_target"][0], s["actor"][0])
    assert torch.equal(s["critic_target"][0], s["critic"][0])
    assert not torch.equal(s["actor_target"][0], before[0])
    assert torch.equal(s["actor_target"][1], before[1])
    assert not torch.equal(s["actor"][1], s["actor_target"][1])


def test_members_act_as_their_own_policies():
    learner = _learner([_cfg(), _cfg()], normalize_obs=True)
    _agent(learner, 1).obs_norm.update(np.random.default_rng(0).normal(3, 2, (50, OBS)))
    obs = torch.randn(2, 4, OBS)
    both = learner.act(obs)
    for k in range(2):
        assert torch.allclose(both[k], _agent(learner, k).act(obs[k]), atol=1e-6)
    assert not torch.allclose(both[0], both[1])


def test_a_slot_takes_a_new_member_with_nothing_of_the_old():
    learner = _learner([_cfg(), _cfg()])
    for step in range(3):
        learner.update(_batch(2, seed=step), [True, True])
    torch.manual_seed(7)
    fresh = learner.place(0, _cfg(tau=0.02), seed=7, normalize_obs=False)
    assert fresh.n_updates == 0 and learner.steps["critic"][0] == 0
    for name in ("actor_exp_avg", "critic_exp_avg_sq", "critic_grad"):
        assert not learner.storage[name][0].any(), name
    assert torch.equal(learner.storage["actor_target"][0], learner.storage["actor"][0])
    alone = DDPG(1, OBS, ACT, _cfg())
    torch.manual_seed(7)
    alone.place(0, _cfg(tau=0.02), seed=7, normalize_obs=False)  # its own initial values
    assert torch.equal(alone.storage["actor"][0], learner.storage["actor"][0])


@pytest.mark.usefixtures("one_torch_thread")  # 3,000 updates of tiny nets
def test_update_learns_a_simple_regression():
    """With gamma ~ 0 the critic must fit the reward; the actor must climb it."""
    cfg = AgentConfig(
        actor_hidden=[16, 16], critic_hidden=[64, 64], gamma=1e-6, critic_lr=3e-3, actor_lr=1e-3
    )
    learner = _learner([cfg])
    for i in range(3000):
        b = _batch(seed=i)
        b = dataclasses.replace(b, rewards=-(b.actions - 0.5).square().sum(-1))
        (m,) = learner.update(b, [True])
    assert float(m["loss/critic"]) < 0.05
    with torch.no_grad():
        a = _agent(learner).actor(torch.randn(64, OBS))
    assert torch.allclose(a, torch.full_like(a, 0.5), atol=0.15)


def test_obs_normalizer_matches_numpy_stats():
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


def test_an_agents_networks_are_ordinary_modules_over_its_rows():
    learner = _learner([_cfg(), _cfg()])
    actor = _agent(learner, 1).actor
    x = torch.randn(4, OBS)
    assert all(p.is_leaf and isinstance(p, nn.Parameter) for p in actor.parameters())
    first = next(actor.parameters())
    assert first.data_ptr() == learner.storage["actor"][1].data_ptr()  # the row itself
    with torch.no_grad():
        learner.storage["actor"][1].zero_()
    assert all(bool((p == 0).all()) for p in actor.parameters())
    other = _agent(learner, 0).actor
    actor.load_state_dict(other.state_dict())  # in place: into the row
    assert torch.equal(learner.storage["actor"][1], learner.storage["actor"][0])
    assert torch.equal(actor(x), other(x))


def test_stacked_mlp_refuses_layers_it_cannot_run():
    net = nn.Sequential(nn.Linear(3, 4), nn.Dropout(), nn.ReLU(), nn.Linear(4, 1))
    with pytest.raises(ValueError, match="Dropout"):
        StackedMLP(net, torch.zeros(1, 21), None, "relu")


# ----------------------------------------------------------------------------- compile


def test_the_compiled_step_matches_the_eager_step():
    """``perf.compile`` compiles the same step: within 1e-5 after 6 updates."""
    configs = [_cfg(**VARIANTS["td3"], **m) for m in MEMBERS[:2]]
    eager, compiled = _learner(configs), _learner(configs, compile=True)
    assert compiled.compiled
    for step in range(6):
        batch = _batch(2, seed=step)
        eager.update(batch, [True, True])
        compiled.update(batch, [True, True])
    assert compiled.compile_fallbacks == []  # both passes really ran compiled
    for name, tensor in eager.storage.items():
        if not name.endswith("_grad"):
            torch.testing.assert_close(compiled.storage[name], tensor, rtol=1e-5, atol=1e-5)


def test_a_failed_compile_falls_back_to_the_eager_step(monkeypatch):
    def broken_compile(fn, **kwargs):
        def run(*args):
            fn.__self__.storage["critic"].add_(1.0)  # a half-done step, then failure
            raise RuntimeError("no C++ compiler")

        return run

    eager = _learner([_cfg()])
    monkeypatch.setattr(torch, "compile", broken_compile)
    learner = _learner([_cfg()], compile=True)
    for step in range(3):
        eager.update(_batch(seed=step), [True])
        learner.update(_batch(seed=step), [True])
    assert learner.compile_fallbacks == ["critic", "actor"]
    for name, tensor in eager.storage.items():
        assert torch.equal(learner.storage[name], tensor), name


def test_exported_policy_of_an_agent_runs(tmp_path):
    from workbench.policy import save_policy

    learner = _learner([_cfg(), _cfg()])
    learner.update(_batch(2), [True, True])
    agent = _agent(learner, 1)
    low, high = -np.ones(ACT, np.float32), np.ones(ACT, np.float32)
    out = save_policy(agent.actor, agent.obs_norm, low, high, {"obs_dim": OBS}, tmp_path)
    program = torch.export.load(str(next(out.glob("*.pt2")))).module()
    obs = torch.randn(3, OBS)
    assert torch.allclose(program(obs), agent.act(obs), atol=1e-6)
    # the member's tensors alone, not the learner's whole storage
    saved = torch.load(out / "weights.pt", weights_only=True)["actor.net.0.weight"]
    assert saved.untyped_storage().nbytes() == saved.numel() * saved.element_size()
