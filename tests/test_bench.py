"""`workbench bench`: the JSON it prints, the accounting behind it, SB3 at our settings.

No timing is asserted anywhere: only that every figure is there, positive and consistent.
"""

from __future__ import annotations

import json

import pytest

from workbench import speed
from workbench.cli import main
from workbench.config import compose
from workbench.tracking import NullTracker

TINY = [
    "agent.actor_hidden=[16]",
    "agent.critic_hidden=[16]",
    "agent.batch_size=32",
    "agent.buffer_size=2000",
    "agent.learning_starts=100",
    "total_steps=300",
    "eval.episodes=1",
]
QUICK = {"updates": 5, "rounds": 2, "warmup": 2, "env_steps": 50, "e2e_rounds": 1}


def test_bench_reports_every_figure_with_sb3_when_installed():
    out = speed.run_bench(TINY, **QUICK)
    assert out["settings"]["env_id"] == "Pendulum-v1"
    assert out["settings"]["utd"] == 1.0
    assert out["settings"]["perf"]["replay_compact"] is True
    assert out["machine"]["torch_threads"] == 1

    up = out["update"]
    assert up["ours_updates_per_s"] > 0 and len(up["ours_rounds"]) == 2
    assert out["env"]["raw_steps_per_s"] > 0

    e2e = out["end_to_end"]["ours"]
    assert e2e["steps"] == 300 and e2e["updates"] == 201  # learning from step 100
    assert 0 < e2e["tracking_share"] < 1 and 0 <= e2e["tracking_share_loop"] < 1
    assert 0 < e2e["eval_share"] < 1
    assert e2e["sps_training_loop"] >= e2e["sps"] > 0
    # one round: pooled = that run's rate (up to the 10 ms rounding of the times it pools)
    assert e2e["sps_training_loop_pooled"] == pytest.approx(e2e["sps_training_loop"], rel=0.1)
    assert set(e2e["tracking_by_call_s"]) >= {"start", "log_metrics", "end"}
    assert out["end_to_end"]["sps_fraction_of_raw_env"] > 0

    rep = out["replay"]
    assert rep["bytes_per_transition"] == 4 * (3 + 1 + 1) + 6
    assert rep["footprint_bytes"] == rep["bytes_per_transition"] * 2000
    assert rep["halfcheetah_1m_mb"]["compact"] < 200 < rep["halfcheetah_1m_mb"]["plain"]

    if speed.sb3_available():
        assert out["sb3"]["compared"]
        assert up["sb3_updates_per_s"] > 0 and len(up["sb3_rounds"]) == 2
        assert up["ratio_ours_to_sb3"] == pytest.approx(
            up["ours_updates_per_s"] / up["sb3_updates_per_s"], abs=0.01
        )
        assert out["end_to_end"]["sb3"]["steps"] == 300
        assert out["end_to_end"]["ratio_ours_to_sb3"] == pytest.approx(
            e2e["sps_training_loop_pooled"] / out["end_to_end"]["sb3"]["sps_pooled"], abs=0.02
        )
    else:
        assert not out["sb3"]["compared"] and "sb3_updates_per_s" not in up


def test_end_to_end_rounds_alternate_and_pool(monkeypatch):
    calls = []

    def ours(cfg):
        calls.append("ours")
        return {"steps": 100, "training_loop_s": 1.0 if len(calls) < 3 else 3.0}

    def sb3(cfg, device):
        calls.append("sb3")
        return {"steps": 100, "learn_s": 2.0}

    monkeypatch.setattr(speed, "_ours_end_to_end", ours)
    monkeypatch.setattr(speed, "_sb3_end_to_end", sb3)
    monkeypatch.setattr(speed, "_init_store", lambda cfg: None)
    out = speed.bench_end_to_end(compose(TINY), None, rounds=2, with_sb3=True)
    assert calls == ["ours", "sb3", "sb3", "ours"]  # ABBA
    assert out["ours"]["sps_training_loop_pooled"] == 50.0  # 200 steps in 4 s
    assert out["sb3"]["sps_pooled"] == 50.0 and out["ratio_ours_to_sb3"] == 1.0
    assert len(out["ours"]["runs"]) == len(out["sb3"]["runs"]) == 2


def test_bench_command_prints_json_without_sb3(capsys):
    assert main(["bench", "--no-e2e", "--sb3", "no", "--updates", "3", "--rounds", "1",
                 "--warmup", "1", "--env-steps", "20", *TINY]) == 0  # fmt: skip
    out = json.loads(capsys.readouterr().out)
    assert "end_to_end" not in out and "sb3_updates_per_s" not in out["update"]
    assert out["settings"]["batch_size"] == 32


def test_bench_command_names_a_bad_override(capsys):
    assert main(["bench", "--no-e2e", "--sb3", "no", "agent.tau=2"]) == 2
    assert "agent.tau=2.0" in capsys.readouterr().err


def test_timed_tracker_adds_up_time_per_call_and_passes_everything_through():
    inner = NullTracker()
    timed = speed.TimedTracker(inner)
    timed.start(params={"a": 1}, tags={"t": "x"})
    timed.log_metrics({"loss/critic": 1.0}, 10)
    timed.log_text("hello", "note.txt")
    timed.flush()
    timed.end("FINISHED")
    assert inner.params == {"a": 1} and inner.metrics["loss/critic"] == [(10, 1.0)]
    assert inner.status == "FINISHED" and inner.artifacts == ["note.txt"]
    assert inner.texts == {"note.txt": "hello"}
    assert set(timed.seconds) == {"start", "log_metrics", "artifacts", "flush", "end"}
    assert timed.total() == pytest.approx(sum(timed.seconds.values()))
    assert timed.run_id is None


@pytest.mark.skipif(not speed.sb3_available(), reason="needs the bench extra (SB3)")
@pytest.mark.parametrize(
    ("overrides", "algo"),
    [([], "DDPG"), (["agent=td3"], "TD3"), (["noise=ou", "agent.actor_lr=1e-4"], "DDPG")],
)
def test_sb3_model_uses_our_settings(overrides, algo):
    import torch

    cfg = compose([*TINY, *overrides])
    env = speed._sb3_env(cfg)
    model, notes = speed.sb3_model(cfg, torch.device("cpu"), env)
    assert type(model).__name__ == algo
    a = cfg.agent
    assert (model.batch_size, model.tau, model.gamma) == (a.batch_size, a.tau, a.gamma)
    assert model.learning_starts == a.learning_starts and model.gradient_steps == 1
    assert model.policy.actor.mu[0].out_features == a.actor_hidden[0]
    if algo == "TD3":
        assert model.policy_delay == 2 and model.target_policy_noise == 0.2
        assert len(model.policy.critic.q_networks) == 2
    if "agent.actor_lr=1e-4" in overrides:
        assert any("one learning rate" in n for n in notes)
        assert type(model.action_noise).__name__ == "OrnsteinUhlenbeckActionNoise"
    env.close()


def test_population_bench_trains_k_members_on_each_side(capsys):
    """K=2 on each side, two rounds (ABBA): every figure there, steps and updates as the
    settings say; no timing asserted."""
    args = ["bench", "--population", "2", "--e2e-rounds", "2", *TINY, "tracking=none"]
    assert main(args) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["settings"]["population"] == 2 and out["settings"]["tracking"] == "none"
    assert out["machine"]["torch_threads"] == 1
    pop = out["population"]
    assert pop["k"] == 2 and pop["rounds"] == 2 and pop["seeds"] == [0, 1]
    for side in ("population", "sequential"):
        runs = pop[side]["runs"]
        assert len(runs) == 2
        for run in runs:
            assert run["finished"] == 2
            assert run["steps"] == 2 * 300 and run["updates"] == 2 * 201  # learning from 100
            assert 0 < run["training_loop_s"] < run["wall_s"]
            assert run["sps_training_loop"] > 0 and run["updates_per_s_training_loop"] > 0
        assert pop[side]["sps_training_loop_pooled"] > 0
        assert pop[side]["updates_per_s_training_loop_pooled"] > 0
        assert pop[side]["sps_wall_pooled"] > 0
    ratio = (
        pop["population"]["sps_training_loop_pooled"]
        / pop["sequential"]["sps_training_loop_pooled"]
    )
    assert pop["ratio_vs_sequential"] == pytest.approx(ratio, abs=0.01)
    assert pop["ratio_wall_vs_sequential"] > 0 and "evaluation excluded" in pop["ratio_basis"]


def test_population_bench_alternates_sides(monkeypatch):
    calls = []

    def side(name):
        def run(configs):
            calls.append((name, [c.seed for c in configs]))
            return {"steps": 600, "updates": 400, "training_loop_s": 2.0, "wall_s": 3.0}

        return run

    monkeypatch.setattr(speed, "_population_round", side("population"))
    monkeypatch.setattr(speed, "_sequential_round", side("sequential"))
    out = speed.bench_population(compose([*TINY, "tracking=none"]), 3, rounds=2)
    assert [c[0] for c in calls] == ["population", "sequential", "sequential", "population"]
    assert all(seeds == [0, 1, 2] for _, seeds in calls)
    assert out["population"]["sps_training_loop_pooled"] == 300.0
    assert out["ratio_vs_sequential"] == 1.0 and out["ratio_wall_vs_sequential"] == 1.0
