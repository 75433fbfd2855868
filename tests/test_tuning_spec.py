"""Study specs: validation at load, sampling into the composed config, scoring. No training."""

from pathlib import Path

import optuna
import pytest
import yaml
from tuning_helpers import tiny_spec, write_spec

from workbench.cli import main
from workbench.config import compose
from workbench.stats import iqm
from workbench.tuning.launch import base_values
from workbench.tuning.objective import score_curve
from workbench.tuning.spec import SpecError, load_spec, parse_spec, sample, to_overrides

STUDIES = Path(__file__).resolve().parents[1] / "studies"


@pytest.mark.parametrize("name", ["pendulum_ddpg", "halfcheetah_ddpg", "hopper_td3"])
def test_shipped_specs_load_and_cover_the_issue_space(name):
    spec = load_spec(STUDIES / f"{name}.yaml")
    assert spec.name == name
    keys = {p.name for p in spec.space}
    assert {"noise", "noise.sigma", "agent.tau", "agent.actor_lr", "agent.critic_lr"} <= keys
    assert {"schedule", "schedule.end", "schedule.duration", "epsilon.start"} <= keys
    conditional = {p.name: dict(p.when) for p in spec.space if p.when}
    assert conditional["noise.theta"] == {"noise": ("ou",)}
    assert "constant" not in conditional["schedule.end"]["schedule"]


def _problems(tmp_path, **changes):
    with pytest.raises(SpecError) as err:
        parse_spec(yaml.safe_dump(tiny_spec(tmp_path, **changes)))
    return str(err.value)


@pytest.mark.parametrize(
    ("changes", "expected"),
    [
        ({"space": {"agent.tua": {"type": "float", "low": 0.1, "high": 1}}}, "agent.tua"),
        ({"space": {"agent.tau": {"type": "float", "low": 0.1, "high": 0.01}}}, "must be < high"),
        ({"space": {"agent.tau": {"type": "float", "low": 0, "high": 1, "log": True}}}, "> 0"),
        ({"space": {"noise": {"type": "categorical", "choices": []}}}, "non-empty list"),
        ({"space": {"noise": {"type": "categorical", "choices": ["ou", "pink"]}}}, "pink"),
        ({"space": {"agent.tau": {"type": "real", "low": 0, "high": 1}}}, "float, int"),
        ({"objective": {"score": "median"}}, "objective.score='median'"),
        ({"objective": {"metric": "eval/return"}}, "objective.metric"),
        ({"objective": {"seeds": 0}}, "objective.seeds"),
        ({"sampler": "bayes"}, "tpe, random, cmaes, gp, qmc"),
        ({"sampler": {"name": "tpe", "sede": 1}}, "sampler.sede=1: not an option of tpe"),
        ({"pruner": "early"}, "median, percentile, successive_halving, hyperband, wilcoxon"),
        ({"n_trials": None}, "n_trials and/or timeout"),
        ({"base": {"preset": "nope"}}, "base.preset='nope'"),
        ({"base": {"overrides": ["agent.tau=2"]}}, "agent.tau=2.0: must be in (0.0, 1.0]"),
        (
            {"space": {"agent.tau": {"type": "float", "low": 0.1, "high": 1, "when": {"x": 1}}}},
            "must name an earlier parameter",
        ),
    ],
)
def test_spec_errors_name_key_value_and_what_is_allowed(tmp_path, changes, expected):
    assert expected in _problems(tmp_path, **changes)


def test_bad_spec_fails_before_any_storage_or_run(tmp_path, capsys):
    spec = tiny_spec(tmp_path, space={"agent.tau": {"type": "float", "low": 1, "high": 0}})
    code = main(["tune", str(write_spec(tmp_path, spec))])
    assert code == 2
    assert "space.agent.tau.low=1: must be < high (0)" in capsys.readouterr().err
    assert not (tmp_path / "mlruns").exists()


SPACE = {
    "noise": {"type": "categorical", "choices": ["gaussian", "ou"]},
    "noise.theta": {"type": "float", "low": 0.05, "high": 1.0, "when": {"noise": "ou"}},
    "schedule": {"type": "categorical", "choices": ["constant", "linear"]},
    "schedule.end": {
        "type": "float",
        "low": 0.001,
        "high": 0.1,
        "log": True,
        "when": {"schedule": ["linear"]},
    },
    "agent.tau": {"type": "float", "low": 0.001, "high": 0.05, "log": True},
    "agent.batch_size": {"type": "int", "low": 16, "high": 64, "step": 16},
    "agent.gradient_steps": {"type": "int", "low": 1, "high": 4, "log": True},
    "agent.actor_hidden": {"type": "categorical", "choices": [[16], [8, 8]]},
    "agent.layer_norm": {"type": "categorical", "choices": [True, False]},
}


def test_every_parameter_type_and_conditions_reach_the_composed_config(tmp_path):
    spec = parse_spec(yaml.safe_dump(tiny_spec(tmp_path, space=SPACE)))
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    study.enqueue_trial({"noise": "ou", "schedule": "linear"})
    study.enqueue_trial({"noise": "gaussian", "schedule": "constant"})
    seen = set()
    for _ in range(8):
        trial = study.ask()
        values = sample(trial, spec.space)
        cfg = compose([*spec.base(), *spec.run_overrides(), *to_overrides(values)])
        assert cfg.noise.kind == values["noise"]
        assert cfg.schedule.kind == values["schedule"]
        assert cfg.agent.tau == values["agent.tau"]
        assert cfg.agent.batch_size == values["agent.batch_size"] and cfg.agent.batch_size % 16 == 0
        assert cfg.agent.gradient_steps == values["agent.gradient_steps"]
        assert cfg.agent.actor_hidden == values["agent.actor_hidden"]
        assert cfg.agent.layer_norm is values["agent.layer_norm"]
        assert ("noise.theta" in values) == (values["noise"] == "ou")
        if values["noise"] == "ou":
            assert cfg.noise.theta == values["noise.theta"]
        assert ("schedule.end" in values) == (values["schedule"] == "linear")
        if values["schedule"] == "linear":
            assert cfg.schedule.end == values["schedule.end"]
        seen.add((values["noise"], values["schedule"]))
        study.tell(trial, 0.0)
    assert {("ou", "linear"), ("gaussian", "constant")} <= seen


def test_the_base_preset_is_the_enqueued_first_point():
    spec = load_spec(STUDIES / "pendulum_ddpg.yaml")
    values = base_values(spec)
    assert values["noise"] == "gaussian"
    assert values["schedule"] == "constant"
    assert "noise.theta" not in values and "schedule.end" not in values
    assert values["agent.tau"] == 0.005 and values["agent.actor_lr"] == 1e-3
    assert values["noise.sigma"] == 0.1


def test_scores_and_iqm():
    steps, curve = [100, 200, 300, 400], [-4.0, -3.0, -1.0, -2.0]
    assert score_curve(steps, curve, "final", 2, "maximize") == -2.0
    assert score_curve(steps, curve, "last_k", 2, "maximize") == -1.5
    assert score_curve(steps, curve, "best", 2, "maximize") == -1.0
    assert score_curve(steps, curve, "best", 2, "minimize") == -4.0
    assert score_curve(steps, curve, "auc", 2, "maximize") == pytest.approx(-7.0 / 3.0)
    assert iqm([0, 1, 2, 100]) == 1.5
    assert iqm([1.0, 3.0]) == 2.0


@pytest.mark.parametrize("sampler", ["tpe", "random", "cmaes", "gp", "qmc"])
def test_every_sampler_is_seeded_and_samples_the_space(tmp_path, sampler):
    from workbench.tuning.study import make_pruner, make_sampler

    args = {"n_startup_trials": 2} if sampler in ("tpe", "gp", "cmaes") else {}
    spec = parse_spec(
        yaml.safe_dump(tiny_spec(tmp_path, sampler={"name": sampler, "seed": 3, **args}))
    )

    def draw(worker):
        study = optuna.create_study(
            sampler=make_sampler(spec, worker), pruner=make_pruner(spec), direction="maximize"
        )
        points = []
        for i in range(4):
            trial = study.ask()
            points.append(sample(trial, spec.space))
            study.tell(trial, -float(i))
        return points

    first = draw(0)
    assert first == draw(0)  # seeded: the same points again
    assert all(0.001 <= p["agent.tau"] <= 0.05 for p in first)
    if sampler != "qmc":  # QMC shares one sequence across workers by design
        assert draw(1) != first


@pytest.mark.parametrize(
    "pruner", ["median", "percentile", "successive_halving", "hyperband", "wilcoxon", "none"]
)
def test_every_pruner_builds(tmp_path, pruner):
    from workbench.tuning.study import make_pruner

    spec = parse_spec(yaml.safe_dump(tiny_spec(tmp_path, pruner=pruner)))
    assert isinstance(make_pruner(spec), optuna.pruners.BasePruner)


def test_a_duplicate_key_is_refused_like_in_an_ablation_spec(tmp_path):
    """One YAML loader for both kinds of spec: PyYAML alone keeps the last of two keys."""
    text = yaml.safe_dump(tiny_spec(tmp_path)) + "n_trials: 7\n"
    with pytest.raises(SpecError, match=r"duplicate key 'n_trials' \(line \d+\)"):
        parse_spec(text)
