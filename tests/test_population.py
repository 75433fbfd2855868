"""A population member is updated exactly as its single agent would be, with its own values."""

import dataclasses

import pytest
import torch

from workbench.config import AgentConfig
from workbench.ddpg import DDPG
from workbench.population import Population
from workbench.replay import Batch

OBS, ACT, B = 5, 2, 32


def _cfg(**values):
    base = AgentConfig(actor_hidden=[16, 16], critic_hidden=[16, 16], batch_size=B)
    return dataclasses.replace(base, **values)


MEMBERS = [
    {"actor_lr": 1e-3, "critic_lr": 2e-3, "tau": 0.005, "gamma": 0.99},
    {"actor_lr": 3e-4, "critic_lr": 1e-3, "tau": 0.05, "gamma": 0.9, "critic_weight_decay": 1e-2},
    {"actor_lr": 2e-3, "critic_lr": 5e-4, "tau": 0.2, "gamma": 0.98, "max_grad_norm": 0.5},
]


def _batch(g: torch.Generator) -> Batch:
    return Batch(
        obs=torch.randn(B, OBS, generator=g),
        actions=torch.rand(B, ACT, generator=g) * 2 - 1,
        rewards=torch.randn(B, generator=g),
        next_obs=torch.randn(B, OBS, generator=g),
        terminated=(torch.rand(B, generator=g) < 0.1).float(),
        truncated=torch.zeros(B),
    )


def _agents(configs, seeds):
    out = []
    for cfg, seed in zip(configs, seeds, strict=True):
        torch.manual_seed(seed)  # network init, as a run seeds it
        out.append(DDPG(OBS, ACT, cfg, seed=seed, fused=True))
    return out


@pytest.mark.parametrize(
    "td3",
    [{}, {"n_critics": 2, "policy_delay": 2, "target_policy_noise": 0.2}],
    ids=["ddpg", "td3"],
)
def test_members_match_their_single_agents_bit_for_bit(td3):
    configs = [_cfg(**m, **td3) for m in MEMBERS]
    if td3:  # one member with its own delay and smoothing
        configs[1] = dataclasses.replace(configs[1], policy_delay=3, target_policy_noise=0.1)
    seeds = [0, 1, 2]
    singles = _agents(configs, seeds)
    population = Population(_agents(configs, seeds))
    starts = [0, 5, 12]  # updates before which a member does not learn yet
    data = torch.Generator().manual_seed(7)
    for step in range(40):
        batches = [_batch(data) for _ in configs]
        batches = [b if step >= s else None for b, s in zip(batches, starts, strict=True)]
        got = population.update(batches)
        for k, (agent, batch) in enumerate(zip(singles, batches, strict=True)):
            if batch is None:
                assert got[k] is None
                continue
            want = agent.update(batch)
            assert set(got[k]) == set(want)
            for key, value in want.items():
                torch.testing.assert_close(got[k][key], value, rtol=1e-6, atol=1e-6)
    for single, member in zip(singles, population.agents, strict=True):
        assert single.n_updates == member.n_updates
        for name in DDPG.FLAT_BUFFERS:
            if name.endswith("_grad"):
                continue  # scratch: the batched actor pass also fills members not yet due
            assert torch.equal(single.flat_buffer(name), member.flat_buffer(name)), name
        assert torch.equal(single.generator.get_state(), member.generator.get_state())


def test_learning_from_stacked_buffers_equals_gathering_member_by_member():
    """``Population.learn`` gathers every member's batch in one go from stacked buffers;
    where the buffers cannot be stacked it gathers member by member: the same updates."""
    import numpy as np

    from workbench.replay import make_replay_buffer

    def population():
        buffers = [make_replay_buffer(64, OBS, ACT, seed=s) for s in range(3)]
        rng = np.random.default_rng(0)
        for _ in range(50):
            for buf in buffers:
                obs, nxt = rng.normal(size=(2, 1, OBS)).astype(np.float32)
                ended = rng.random(1) < 0.1
                buf.add(obs, rng.uniform(-1, 1, (1, ACT)), rng.normal(size=1), nxt, ended, ended)
        return Population(_agents([_cfg(**m) for m in MEMBERS], [0, 1, 2]), buffers)

    stacked, one_by_one = population(), population()
    assert stacked.replay is not None
    one_by_one.replay = None
    for step in range(6):
        draws = [
            [b.sample_indices(B) if step or k else None for k, b in enumerate(p.buffers)]
            for p in (stacked, one_by_one)
        ]
        (got, got_batch), (want, want_batch) = stacked.learn(draws[0]), one_by_one.learn(draws[1])
        for name in vars(want_batch):
            assert torch.equal(getattr(got_batch, name), getattr(want_batch, name)), name
        for a, b in zip(got, want, strict=True):
            assert (a is None) == (b is None) and (a is None or a.keys() == b.keys())
    for a, b in zip(stacked.agents, one_by_one.agents, strict=True):
        assert torch.equal(a.actor_flat, b.actor_flat) and torch.equal(a.critic_flat, b.critic_flat)


def test_per_member_values_really_differ_in_effect():
    """tau=1 copies the online networks into the targets; tau=0 leaves the targets alone."""
    configs = [_cfg(tau=1.0), _cfg(tau=0.0)]
    population = Population(_agents(configs, [0, 1]))
    before = [m.actor_target_flat.clone() for m in population.agents]
    data = torch.Generator().manual_seed(0)
    population.update([_batch(data), _batch(data)])
    copy, frozen = population.agents
    assert torch.equal(copy.actor_target_flat, copy.actor_flat)
    assert torch.equal(copy.critic_target_flat, copy.critic_flat)
    assert not torch.equal(copy.actor_target_flat, before[0])
    assert torch.equal(frozen.actor_target_flat, before[1])
    assert not torch.equal(frozen.actor_flat, frozen.actor_target_flat)


def test_members_act_as_their_own_policies():
    population = Population(_agents([_cfg(), _cfg()], [0, 1]))
    obs = torch.randn(2, 4, OBS)
    both = population.act(obs)
    for k, agent in enumerate(population.agents):
        assert torch.equal(both[k], agent.act(obs[k]))
    assert not torch.equal(both[0], both[1])


def test_members_must_share_shapes():
    with pytest.raises(ValueError, match=r"agent\.critic_hidden differs"):
        Population(_agents([_cfg(), _cfg(critic_hidden=[8])], [0, 1]))


TINY = [
    "total_steps=1200",
    "agent.actor_hidden=[16]",
    "agent.critic_hidden=[16]",
    "agent.batch_size=32",
    "eval.every=400",
    "eval.episodes=2",
    "eval.video=false",
    "tracking=none",
    "progress=false",
]


def test_a_population_member_trains_exactly_as_its_single_run():
    """Each member (own seed, learning rates, tau, gamma, noise, learning start, delay) ends
    with the single run's evaluation curve and every episode return, bit for bit (CPU)."""
    from workbench.config import compose
    from workbench.train import Member, train, train_population

    values = [
        ["seed=0", "agent.learning_starts=200"],
        ["seed=1", "agent.learning_starts=300", "agent.tau=0.05", "agent.actor_lr=3e-4",
         "noise=ou", "agent.gamma=0.95"],
        ["seed=2", "agent.learning_starts=100", "agent.target_policy_noise=0.2",
         "agent.policy_delay=3", "schedule=linear", "schedule.end=0.0", "epsilon.start=0.2"],
    ]  # fmt: skip
    configs = [compose([*TINY, *v]) for v in values]
    alone = [train(cfg) for cfg in configs]
    together = train_population([Member(cfg) for cfg in configs])
    for a, p in zip(alone, together, strict=True):
        assert p.status == "FINISHED" and p.steps == a.steps == 1200
        assert p.eval_steps == a.eval_steps == [400, 800, 1200]
        assert p.eval_returns == a.eval_returns
    assert len({tuple(r.eval_returns) for r in together}) == 3  # the members differ


def test_a_failing_member_ends_alone():
    from workbench.config import compose
    from workbench.train import DivergenceError, Member, train_population

    class Poison:
        def on_evaluation(self, step, metrics, agent):
            with torch.no_grad():
                agent.actor_flat.fill_(float("nan"))

    members = [Member(compose([*TINY, f"seed={s}"])) for s in range(2)]
    members[0].hooks = [Poison()]
    first, second = train_population(members)
    assert first.status == "FAILED" and "DivergenceError: evaluation return is nan" in first.reason
    assert isinstance(members[0].error, DivergenceError)
    assert second.status == "FINISHED" and second.steps == 1200


def test_members_that_differ_in_shape_are_refused_naming_the_member():
    from workbench.config import ConfigError, compose
    from workbench.train import Member, train_population

    members = [Member(compose([*TINY])), Member(compose([*TINY, "agent.critic_hidden=[8]"]))]
    with pytest.raises(
        ConfigError, match=r"member 1: agent\.critic_hidden=\[8\]: must be member 0"
    ):
        train_population(members)


def test_an_ended_slot_is_refilled_and_the_newcomer_trains_as_alone():
    """A study keeps its population full: when a member ends, the next takes its slot. The
    newcomer starts from its own initial values (nothing of the old member's weights or Adam
    moments leaks into it) and again trains exactly as its single run."""
    from workbench.config import compose
    from workbench.train import Member, train, train_population

    first = [compose([*TINY, "seed=0", "total_steps=400"]), compose([*TINY, "seed=1"])]
    later = [compose([*TINY, "seed=2", "agent.tau=0.02"]), compose([*TINY, "seed=3"])]
    queue = list(later)
    ended = []

    def refill(member, result):
        ended.append((member.cfg.seed, result.status if result else None))
        return Member(queue.pop(0)) if queue else None

    results = train_population([Member(c) for c in first], refill=refill)
    assert [r.status for r in results] == ["FINISHED"] * 4
    # seed 0 ends at step 400 and seed 2 takes its slot; seed 1 ends at 1200, then seed 3
    assert ended == [(0, "FINISHED"), (1, "FINISHED"), (2, "FINISHED"), (3, "FINISHED")]
    for cfg, result in zip(first + later, results, strict=True):
        assert result.eval_returns == train(cfg).eval_returns, cfg.seed


def test_learning_check_compares_a_population_with_single_runs(tmp_path, monkeypatch, capsys):
    import json

    from workbench.cli import main

    monkeypatch.chdir(tmp_path)
    args = ["learning-check", "--population", "2", "--workers", "2", "--target", "-5000"]
    small = ["total_steps=600", "eval.every=300", *TINY[1:3], "eval.episodes=2", "tracking=none"]
    assert main([*args, *small, "eval.video=false"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert [r["seed"] for r in out["population"]["seeds"]] == [0, 1]
    assert out["population"]["final_returns"] == out["final_returns"]  # bit for bit
    assert out["population_iqm_within_ci"] and out["population_equals_single_runs"]
