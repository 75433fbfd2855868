"""A population trains each member as its single run would (to float rounding; the update
step's contract is in ``tests/test_ddpg.py``), with its own values, and ends each alone."""

import numpy as np
import pytest
import torch

# End to end, a member's evaluation returns stay within this of its single run's (relative):
# the runs differ only by float rounding in the batched products (seen: below 1e-6 after
# 1,000 updates; rounding differences grow as training goes on, so longer runs drift apart).
RETURNS_RTOL = 1e-4

TINY = [
    "total_steps=1200",
    "agent.actor_hidden=[16]",
    "agent.critic_hidden=[16]",
    "agent.batch_size=32",
    "agent.learning_starts=100",  # below every total_steps here: each member updates
    "eval.every=400",
    "eval.episodes=2",
    "eval.video=false",
    "tracking=none",
    "progress=false",
]


@pytest.mark.parametrize("shared", [[], ["agent.layer_norm=true"]], ids=["plain", "layer_norm"])
def test_a_population_member_trains_as_its_single_run(shared):
    """Each member (own seed, learning rates, tau, gamma, noise, learning start, delay) ends
    with its single run's evaluation curve, to float rounding."""
    from workbench.config import compose
    from workbench.train import Member, train, train_population

    values = [
        ["seed=0", "agent.learning_starts=200"],
        ["seed=1", "agent.learning_starts=300", "agent.tau=0.05", "agent.actor_lr=3e-4",
         "noise=ou", "agent.gamma=0.95"],
        ["seed=2", "agent.learning_starts=100", "agent.target_policy_noise=0.2",
         "agent.policy_delay=3", "schedule=linear", "schedule.end=0.0", "epsilon.start=0.2"],
    ]  # fmt: skip
    configs = [compose([*TINY, *shared, *v]) for v in values]
    alone = [train(cfg) for cfg in configs]
    together = train_population([Member(cfg) for cfg in configs])
    for a, p in zip(alone, together, strict=True):
        assert p.status == "FINISHED" and p.steps == a.steps == 1200
        assert p.eval_steps == a.eval_steps == [400, 800, 1200]
        assert np.allclose(p.eval_returns, a.eval_returns, rtol=RETURNS_RTOL, atol=0)
    assert len({tuple(r.eval_returns) for r in together}) == 3  # the members differ


def test_the_same_population_gives_the_same_floats():
    """Bit for bit: the same members (configs, seeds, K) again."""
    from workbench.config import compose
    from workbench.train import Member, train_population

    configs = [compose([*TINY, "total_steps=600", "eval.every=300", f"seed={s}"]) for s in (3, 4)]
    first = train_population([Member(c) for c in configs])
    again = train_population([Member(c) for c in configs])
    assert [r.eval_returns for r in first] == [r.eval_returns for r in again]


def test_a_failing_member_ends_alone():
    from workbench.config import compose
    from workbench.train import DivergenceError, Member, train_population

    class Poison:
        def on_evaluation(self, step, metrics, agent):
            with torch.no_grad():
                agent.actor.net[0].weight.fill_(float("nan"))

    members = [Member(compose([*TINY, f"seed={s}"])) for s in range(2)]
    members[0].hooks = [Poison()]
    first, second = train_population(members)
    # the NaN weights fail the member at its next action (it acts by its policy after step 100)
    assert first.status == "FAILED" and "DivergenceError: non-finite action" in first.reason
    assert isinstance(members[0].error, DivergenceError)
    assert second.status == "FINISHED" and second.steps == 1200


def test_members_that_differ_in_shape_are_refused_naming_the_member():
    from workbench.config import ConfigError, compose
    from workbench.train import Member, train_population

    members = [Member(compose([*TINY])), Member(compose([*TINY, "agent.critic_hidden=[8]"]))]
    with pytest.raises(
        ConfigError, match=r"member 1: agent\.critic_hidden: \[8\] is not member 0's \[16\]"
    ):
        train_population(members)


def test_the_batching_rule_names_member_key_and_why():
    from workbench.config import compose
    from workbench.population import Problem, problems

    base = compose([*TINY])
    others = [
        compose([*TINY, "agent.tau=0.1", "seed=3", "noise=ou"]),  # its own values: fine
        compose([*TINY, "agent.buffer_size=5000", "device=cpu"]),
    ]
    found = problems([base, *others])
    assert [(p.member, p.key) for p in found] == [(2, "agent.buffer_size"), (2, "device")]
    assert all(isinstance(p, Problem) and "member 0's" in p.why for p in found)


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
        alone = train(cfg).eval_returns
        assert np.allclose(result.eval_returns, alone, rtol=RETURNS_RTOL, atol=0), cfg.seed


def test_learning_check_compares_a_population_with_single_runs(tmp_path, monkeypatch, capsys):
    import json

    from workbench.cli import main

    monkeypatch.chdir(tmp_path)
    args = ["learning-check", "--population", "2", "--workers", "2", "--target", "-5000"]
    small = ["total_steps=600", "eval.every=300", *TINY[1:3], "eval.episodes=2", "tracking=none"]
    assert main([*args, *small, "eval.video=false"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert [r["seed"] for r in out["population"]["seeds"]] == [0, 1]
    returns = out["population"]["final_returns"]
    assert np.allclose(returns, out["final_returns"], rtol=RETURNS_RTOL, atol=0.01)
    assert out["population_iqm_within_ci"]
    assert out["population_max_return_difference"] <= RETURNS_RTOL * max(map(abs, returns)) + 0.01
