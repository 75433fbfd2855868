"""Specs and names checked like configs; configs that cannot learn; quick looks at a spec;
exported presets outside the source tree.

Classes covered, each with its cases:
- a spec value of the wrong type or range, in any part of a study or ablation spec (sampler
  and pruner options included), is refused at load naming the file and the key, and leaves no
  Optuna storage and no MLflow store behind;
- YAML keys that become the same name (``1`` and ``'1'``, ``1`` and ``1.0``), path-unsafe
  names (``..``), and files that are not UTF-8 are refused, naming the file;
- ``ablate`` counts below one (``--workers 0``) exit 2;
- a config that ends before its first update is refused naming both keys and a fix;
- ``tune --steps`` / ``ablate --steps --seeds`` (with overrides of the base anywhere among
  the options) run apart from the full study or ablation;
- ``study-report`` says how many completed trials importances need;
- ``--export`` writes where Hydra finds it and git does not see it, and says where.
"""

from __future__ import annotations

import sys
import textwrap
from pathlib import Path

import optuna
import pytest
import yaml
from mlflow.tracking import MlflowClient
from optuna.distributions import FloatDistribution
from optuna.trial import TrialState, create_trial
from tuning_helpers import TINY_OVERRIDES, tiny_spec, write_spec

from workbench.cli import build_parser, main
from workbench.config import ConfigError, compose, conf_dir
from workbench.specfile import QuickLook, SpecError, parse_yaml
from workbench.tracking import embedded_uri


@pytest.fixture
def cli(tmp_path, monkeypatch, capsys):
    """``workbench ARGS`` in-process in an empty cwd: (exit code, stdout, stderr)."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setattr(sys, "argv", ["workbench"])

    def run(*args: str) -> tuple[int, str, str]:
        try:
            code = main(list(args))
        except SystemExit as exit_:
            code = exit_.code
        out = capsys.readouterr()
        return code, out.out, out.err

    yield run


def _nothing_created(root: Path) -> None:
    assert sorted(root.rglob("*.db")) == [], "an MLflow store or Optuna storage was created"
    assert not list(root.rglob("optuna")) and not list(root.rglob("artifacts"))


ABLATION = """\
name: tiny
base: [agent.learning_starts=50]
steps: 300
seeds: 1
baseline: a
variants:
  a: []
  b: [agent.tau=0.01]
"""


def _ablation(tmp_path: Path, text: str = ABLATION, **changes) -> Path:
    data = yaml.safe_load(text)
    data.update(changes)
    path = tmp_path / "ablation.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


# ---------------------------------------------- every spec value type-checked at load


@pytest.mark.parametrize(
    ("changes", "expected"),
    [
        ({"sampler": {"name": "tpe", "seed": "abc"}}, "sampler.seed='abc': must be an integer"),
        (
            {"sampler": {"name": "tpe", "gamma": 0.1}},
            "sampler.gamma=0.1: must be null (a Callable cannot be given in a spec)",
        ),
        (
            {"sampler": {"name": "tpe", "n_startup_trials": -3}},
            "sampler.n_startup_trials=-3: must be an integer >= 0",
        ),
        (
            {"sampler": {"name": "qmc", "qmc_type": "foo"}},
            "Optuna refuses these options: The `qmc_type='foo'` is invalid",
        ),
        (
            {"pruner": {"name": "median", "n_startup_trials": 1.5}},
            "pruner.n_startup_trials=1.5: must be an integer",
        ),
        (
            {"pruner": {"name": "successive_halving", "reduction_factor": 1}},
            "must be `reduction_factor >= 2`",
        ),
        ({"pruner": {"name": "percentile", "percentile": 150}}, "Percentile must be between"),
        ({"description": ["a", "b"]}, "description=['a', 'b']: must be a string"),
        ({"name": ".."}, "name='..': must be a name of letters, digits"),
        ({"name": "a/b"}, "name='a/b': must be a name"),
        ({"name": "x" * 101}, "at most 100 characters"),
        ({"storage": ""}, "storage='': must be a storage URL"),
        (
            {"space": {"noise": {"type": "categorical", "choices": [{"a": 1}]}}},
            "each choice must be a number, string, true/false, null or a list of them",
        ),
        (
            {
                "space": {
                    "agent.tau": {"type": "float", "low": 0.001, "high": 0.05},
                    "agent.gamma": {
                        "type": "float",
                        "low": 0.9,
                        "high": 0.99,
                        "when": {"agent.tau": 0.01},
                    },
                }
            },
            "agent.tau is a float parameter, which never equals a given value",
        ),
    ],
    ids=lambda v: None if isinstance(v, str) else next(iter(v)),
)
def test_a_bad_study_spec_value_exits_2_naming_file_and_key_and_creates_nothing(
    cli, tmp_path, changes, expected
):
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump({**tiny_spec(tmp_path), **changes}, sort_keys=False))
    code, _, err = cli("tune", str(path))
    assert code == 2, err
    assert f"study spec {path}" in err and expected in err
    assert "Traceback" not in err
    _nothing_created(tmp_path)


def test_a_password_in_a_mistyped_storage_url_is_not_shown(cli, tmp_path):
    path = write_spec(tmp_path, tiny_spec(tmp_path, storage="postgresql//user:s3cr3tpw@h/db"))
    code, _, err = cli("tune", str(path))
    assert code == 2 and "storage='***@h/db': must be a storage URL" in err
    assert "s3cr3tpw" not in err


@pytest.mark.parametrize(
    ("changes", "expected"),
    [
        ({"name": ".."}, "name='..': must be a name of letters, digits"),
        ({"name": "../elsewhere"}, "name='../elsewhere': must be a name"),
        ({"variants": {"a": [], "../b": []}}, "variants.../b='../b': must be a name"),
        ({"seeds": [True]}, "seeds=[True]: must be a count >= 1 or a list of ints"),
        ({"steps": True}, "steps=True: must be an integer >= 1"),
        ({"description": {"a": 1}}, "description={'a': 1}: must be a string"),
        ({"tracking": {"dir": 3}}, "tracking.dir=3: must be a non-empty string"),
        ({"base": [1]}, "base=[1]: must be a list of Hydra overrides (strings"),
        ({"baseline": ["a"]}, "baseline=['a']: must be the name of one of the variants"),
    ],
    ids=lambda v: None if isinstance(v, str) else next(iter(v)),
)
def test_a_bad_ablation_spec_value_exits_2_naming_file_and_key_and_creates_nothing(
    cli, tmp_path, changes, expected
):
    path = _ablation(tmp_path, **changes)
    code, _, err = cli("ablate", str(path))
    assert code == 2, err
    assert f"ablation spec {path}" in err and expected in err
    _nothing_created(tmp_path)


def test_keys_that_become_the_same_name_are_refused(cli, tmp_path):
    path = tmp_path / "ablation.yaml"
    path.write_text(ABLATION.replace("  b: [agent.tau=0.01]", "  1: []\n  '1': [agent.tau=0.01]"))
    code, _, err = cli("ablate", str(path))
    assert code == 2 and "keys 1 and '1' (line 9) collide: both name '1'" in err
    _nothing_created(tmp_path)
    # equal to Python, so one would silently replace the other
    for text, shown in (("1: a\n1.0: b\n", "keys 1 and 1.0"), ("true: a\n1: b\n", "True and 1")):
        with pytest.raises(SpecError, match=shown):
            parse_yaml(text, "spec")
    assert parse_yaml("a: 1\nb: 2\n", "spec") == {"a": 1, "b": 2}


@pytest.mark.parametrize("command", ["tune", "ablate"])
def test_a_file_that_is_not_utf8_is_named(cli, tmp_path, command):
    path = tmp_path / "spec.yaml"
    path.write_bytes(b"name: caf\xe9\nsteps: 100\n")
    code, _, err = cli(command, str(path))
    assert code == 2
    assert f"{path}: not UTF-8 text (byte 0xe9 on line 1)" in err
    assert "codec" not in err  # not Python's own words


@pytest.mark.parametrize(
    ("flags", "expected"),
    [
        (["--workers", "0"], "--workers=0: must be >= 1"),
        (["--population", "0"], "--population=0: must be >= 1"),
        (["--steps", "0"], "--steps=0: must be >= 1"),
        (["--seeds", "0"], "--seeds='0': must be a count >= 1"),
        (["--seeds", "1,1"], "--seeds='1,1': must be a count >= 1 or a comma-separated list"),
        (["--seeds", "two"], "--seeds='two'"),
    ],
)
def test_ablate_counts_below_one_exit_2(cli, tmp_path, flags, expected):
    code, _, err = cli("ablate", str(_ablation(tmp_path)), *flags)
    assert code == 2 and expected in err
    _nothing_created(tmp_path)


# ---------------------------------------------------------- a config that cannot learn


def test_a_run_that_ends_before_learning_starts_is_refused_naming_both_keys():
    with pytest.raises(ConfigError) as err:
        compose(["env=halfcheetah", "total_steps=3000"])
    text = str(err.value)
    assert "agent.learning_starts=10000: must be < total_steps (3000)" in text
    assert "never updates" in text
    assert "set agent.learning_starts=300 (say) or total_steps above 10000" in text
    with pytest.raises(ConfigError, match=r"agent.learning_starts=500: must be < total_steps"):
        compose(["total_steps=500", "agent.learning_starts=500"])  # the last step: one update
    compose(["total_steps=500", "agent.learning_starts=499"])
    compose(["total_steps=500", "agent.learning_starts=600", "agent.gradient_steps=0"])  # asked


def test_a_train_freq_that_no_step_reaches_is_refused():
    base = ["total_steps=1000", "agent.learning_starts=100"]
    with pytest.raises(ConfigError, match=r"agent.train_freq=1001: no update would happen"):
        compose([*base, "agent.train_freq=1001"])
    # 2 envs: 500 vector steps; the 500th is the last multiple of 250 and is past step 100
    compose([*base, "env.n_envs=2", "agent.train_freq=250"])
    with pytest.raises(ConfigError, match=r"over env\.n_envs=2"):
        compose([*base, "env.n_envs=2", "agent.train_freq=501"])


def test_train_refuses_it_before_any_run_exists(cli, tmp_path):
    code, _, err = cli("train", "env=halfcheetah", "total_steps=3000")
    assert code == 2
    assert "agent.learning_starts=10000: must be < total_steps (3000)" in err
    assert not (tmp_path / "mlruns").exists()


def test_a_study_whose_steps_end_before_learning_starts_is_refused(cli, tmp_path):
    path = write_spec(tmp_path, tiny_spec(tmp_path, steps=80))  # learning starts at 100
    code, _, err = cli("tune", str(path))
    assert code == 2 and "base: agent.learning_starts=100: must be < total_steps (80)" in err
    _nothing_created(tmp_path)


# -------------------------------------------------------------------------- quick looks


def test_a_quick_look_at_a_study_is_a_spec_of_its_own(tmp_path):
    from workbench.tuning.spec import load_spec, parse_spec

    path = write_spec(tmp_path, tiny_spec(tmp_path))
    full = load_spec(path)
    quick = load_spec(path, QuickLook(steps=200, overrides=("eval.episodes=1",)))
    assert quick.name.startswith("tiny-quick-200-") and quick.name != full.name
    assert quick.experiment_name == "study-tiny-quick"
    assert quick.steps == 200 and quick.base()[-1] == "eval.episodes=1"
    assert quick.space == full.space and quick.objective == full.objective
    # the text stored with the study is the quick look's: a report or resume sees what ran
    again = parse_spec(quick.text)
    assert (again.name, again.steps, again.base()) == (quick.name, 200, quick.base())
    assert quick.text.startswith("# quick look (--steps 200 eval.episodes=1)")
    # other overrides, another study; the same ones, the same study
    other = load_spec(path, QuickLook(steps=200, overrides=("eval.episodes=2",)))
    assert other.name != quick.name
    assert load_spec(path, QuickLook(steps=200, overrides=("eval.episodes=1",))).name == quick.name
    assert load_spec(path, QuickLook(steps=200)).name == "tiny-quick-200"


def test_overrides_may_come_anywhere_among_the_options():
    parser = build_parser()
    for argv in (
        ["tune", "S", "--steps", "20", "a=1", "b=2"],
        ["tune", "S", "a=1", "--steps", "20", "b=2"],
        ["tune", "--steps", "20", "S", "a=1", "b=2"],
    ):
        args = parser.parse_args(argv)
        assert (str(args.spec), args.steps, args.overrides) == ("S", 20, ["a=1", "b=2"])
    args = parser.parse_args(["ablate", "S", "--steps", "20", "a=1", "--seeds", "2", "b=2"])
    assert (args.steps, args.seeds, args.overrides) == (20, "2", ["a=1", "b=2"])
    with pytest.raises(SystemExit):
        parser.parse_args(["tune", "S", "--steps", "20", "--nope"])


def test_tune_quick_look_runs_apart_and_its_report_says_importances_need_trials(cli, tmp_path):
    spec = tiny_spec(tmp_path, n_trials=3)
    path = write_spec(tmp_path, spec)
    code, out, err = cli("tune", str(path), "--steps", "200", "--trials", "1", "eval.episodes=1")
    assert code == 0, err
    assert "quick look at" in err and "tiny-quick-200-" in err
    dbs = [p.name for p in (tmp_path / "mlruns" / "optuna").glob("*.db")]
    assert len(dbs) == 1 and dbs[0].startswith("tiny-quick-200-")  # not tiny.db
    name = dbs[0].removesuffix(".db")
    study = optuna.load_study(
        study_name=name, storage=f"sqlite:///{tmp_path}/mlruns/optuna/{dbs[0]}"
    )
    (trial,) = study.trials
    assert trial.state == TrialState.COMPLETE
    client = MlflowClient(embedded_uri(tmp_path / "mlruns"))
    assert client.get_experiment_by_name("study-tiny") is None
    assert client.get_experiment_by_name("study-tiny-quick") is not None
    # one trial is too few to rank parameters: the report says so, not "-"
    assert "importances need at least 3 completed trials (1 so far)" in out
    code, out, err = cli("study-report", name, "--dir", str(tmp_path / "mlruns"))
    assert code == 0, err
    assert "importances need at least 3 completed trials (1 so far)" in out


def test_ablate_quick_look_runs_apart_from_the_full_ablation(cli, tmp_path):
    path = _ablation(tmp_path, steps=100_000, tracking={"dir": str(tmp_path / "mlruns")})
    flags = ["--steps", "150", "--seeds", "1", "eval.every=0", "eval.episodes=1"]
    base = ["eval.video=false", "tracking.save_policy=false", "agent.actor_hidden=[16]"]
    code, _, err = cli("ablate", str(path), *flags, *base, "agent.batch_size=16")
    assert code == 0, err
    reports = [p.name for p in (tmp_path / "mlruns" / "ablations").iterdir()]
    assert len(reports) == 1 and reports[0].startswith("tiny-quick-150-")
    client = MlflowClient(embedded_uri(tmp_path / "mlruns"))
    assert client.get_experiment_by_name("ablation-tiny") is None
    experiment = client.get_experiment_by_name("ablation-tiny-quick")
    runs = client.search_runs([experiment.experiment_id])
    children = [r for r in runs if r.data.tags.get("workbench.role") == "child"]
    assert sorted(r.data.params["total_steps"] for r in children) == ["150", "150"]
    assert {r.data.tags["workbench.ablation"] for r in runs} == {reports[0]}


# ---------------------------------------------------------------- the importance note


def test_the_report_says_why_a_parameter_has_no_importance(tmp_path):
    from workbench.tuning.report import print_report, summarize
    from workbench.tuning.spec import parse_spec

    spec = parse_spec(yaml.safe_dump(tiny_spec(tmp_path)))
    study = optuna.create_study(direction="maximize")
    dist = {"agent.tau": FloatDistribution(0.001, 0.05, log=True)}
    for i, tau in enumerate((0.002, 0.01)):
        study.add_trial(create_trial(params={"agent.tau": tau}, distributions=dist, value=-i))
    assert summarize(study, spec)["importances_note"] == (
        "importances need at least 3 completed trials (2 so far)"
    )
    from rich.console import Console

    console = Console(record=True, width=120)
    print_report(study, spec, console=console)
    text = console.export_text()
    assert "importances need at least 3 completed trials (2 so far)" in text
    (header,) = [line for line in text.splitlines() if "parameter" in line]
    assert "importance" not in header  # no column of dashes
    study.add_trial(create_trial(params={"agent.tau": 0.03}, distributions=dist, value=5.0))
    summary = summarize(study, spec)
    assert summary["importances"] and summary["importances_note"] == ""


# ------------------------------------------------------------------ exported presets


def _study_with_a_best_trial(tmp_path):
    from workbench.tuning.spec import parse_spec
    from workbench.tuning.study import OVERRIDES

    spec = parse_spec(yaml.safe_dump(tiny_spec(tmp_path, name="exp")))
    study = optuna.create_study(direction="maximize")
    dist = {"agent.tau": FloatDistribution(0.001, 0.05, log=True)}
    study.add_trial(
        create_trial(
            params={"agent.tau": 0.0123},
            distributions=dist,
            value=1.0,
            user_attrs={OVERRIDES: ["agent.tau=0.0123"]},
        )
    )
    return study, spec


def test_export_writes_outside_the_source_tree_where_hydra_finds_it(tmp_path, monkeypatch):
    from workbench.tuning.export import export_best, where_written

    user_conf = tmp_path / "user conf"  # a space: the search path is quoted
    monkeypatch.setenv("WORKBENCH_USER_CONF", str(user_conf))
    before = sorted(p.name for p in (conf_dir() / "experiment").iterdir())
    study, spec = _study_with_a_best_trial(tmp_path)
    path = export_best(study, spec)
    assert path == user_conf / "experiment" / "exp_best.yaml" and path.is_file()
    assert sorted(p.name for p in (conf_dir() / "experiment").iterdir()) == before
    assert compose(["+experiment=exp_best"]).agent.tau == pytest.approx(0.0123)
    said = where_written(path)
    assert f"written to {path} (workbench train +experiment=exp_best)" in said
    assert "git.dirty" not in said
    # a study may start from it
    from workbench.tuning.spec import parse_spec

    base = {"preset": "exp_best", "overrides": [*TINY_OVERRIDES]}
    assert parse_spec(yaml.safe_dump(tiny_spec(tmp_path, base=base))).base_preset == "exp_best"


def test_export_to_a_path_hydra_does_not_search_says_so(tmp_path):
    from workbench.tuning.export import export_best, where_written

    study, spec = _study_with_a_best_trial(tmp_path)
    path = export_best(study, spec, tmp_path / "elsewhere" / "mine.yaml")
    said = where_written(path)
    assert f"written to {path}" in said and "move it there to use it as +experiment=mine" in said


def test_export_into_the_source_tree_says_runs_will_be_dirty(tmp_path):
    from workbench.tuning.export import _in_source_tree, where_written

    inside = conf_dir() / "experiment" / "never_written_best.yaml"
    if not _in_source_tree(inside):
        pytest.skip("the code does not run from a git checkout")
    said = where_written(inside)
    assert "+experiment=never_written_best" in said and "tagged git.dirty" in said
    assert not _in_source_tree(conf_dir().parent / "mlruns" / "x.yaml")  # git-ignored


def test_train_finds_an_exported_preset_and_keeps_the_search_path_out_of_its_tags(
    cli, tmp_path, monkeypatch
):
    user_conf = tmp_path / "user-conf"
    (user_conf / "experiment").mkdir(parents=True)
    (user_conf / "experiment" / "mine.yaml").write_text(
        textwrap.dedent(
            """\
            # @package _global_
            agent:
              tau: 0.0234
            """
        )
    )
    monkeypatch.setenv("WORKBENCH_USER_CONF", str(user_conf))
    args = [
        "+experiment=mine", "total_steps=120", "agent.learning_starts=60",
        "agent.actor_hidden=[8]", "agent.critic_hidden=[8]", "agent.batch_size=16",
        "eval.every=0", "eval.episodes=1", "eval.video=false", "tracking.save_policy=false",
        "progress=false",
    ]  # fmt: skip
    code, _, err = cli("train", *args)
    assert code == 0, err
    client = MlflowClient(embedded_uri(tmp_path / "mlruns"))
    (run,) = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert run.data.params["agent.tau"] == "0.0234"
    assert run.data.tags["workbench.overrides"] == " ".join(args)
