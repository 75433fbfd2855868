"""Bad input is refused before any work starts, through the real CLI, one test per class.

Each case runs ``workbench train|tune|ablate`` in-process in an empty working directory and
checks: exit code 2 (also for overrides Hydra cannot compose: ``workbench train`` composes
them itself first), a message on stderr naming the key, the bad value and what is
allowed, and that nothing was created: no MLflow store or run (``mlruns/mlflow.db``) and no
Optuna storage, study or trial (``mlruns/optuna/<study>.db``).

``tune`` also refuses a search range that reaches values the config rejects (agent.gamma up
to 1.5): every corner of the space is composed and validated before the study is opened.

Already covered elsewhere, and not repeated here: ``tests/test_config.py`` (every range rule
at compose level; ``train`` with agent.tau=2, agent.taux, an unknown env.id and batch_size >
buffer_size in a subprocess), ``tests/test_tuning_spec.py`` (spec rules at load; ``tune``
with low > high), ``tests/test_ablation.py`` (spec rules at load; ``ablate`` with env=nope)
and ``tests/test_e2e.py`` (``train`` against an unreachable tracking server or database).
"""

from __future__ import annotations

import sys
import textwrap
import time
from pathlib import Path

import pytest
from tuning_helpers import TINY_OVERRIDES, tiny_spec, write_spec

from workbench.cli import main

HYDRA = 2  # overrides that do not compose: workbench composes them first and says why
SECRET = "s3cr3tpw"
PG = f"postgresql://user:{SECRET}@127.0.0.1:9/db"  # nothing listens on port 9
PG_SHOWN = "user:***@127.0.0.1:9/db"  # after postgresql:// or postgresql+psycopg2://
HTTP = "http://127.0.0.1:9"


@pytest.fixture
def cli(tmp_path, monkeypatch, capsys):
    """Run ``workbench ARGS`` in-process in an empty cwd: (exit code, stderr)."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")
    monkeypatch.setattr(sys, "argv", ["workbench"])  # `train` rewrites it for Hydra

    def run(*args: str) -> tuple[int, str]:
        try:
            code = main(list(args))
        except SystemExit as exit_:  # `train` runs under hydra.main, which exits
            code = exit_.code
        return code, capsys.readouterr().err

    yield run


def _argv(tmp_path: Path, command: str, payload) -> list[str]:
    """``train`` + overrides; ``tune`` + a tiny spec with ``payload`` as top-level changes;
    ``ablate`` + a spec whose ``variants:`` block is ``payload`` (YAML text)."""
    if command == "train":
        return ["train", *payload]
    if command == "tune":
        return ["tune", str(write_spec(tmp_path, tiny_spec(tmp_path, name="bad", **payload)))]
    assert command == "ablate"
    path = tmp_path / "ablation.yaml"
    path.write_text(
        "name: bad\nbaseline: a\nseeds: 1\nsteps: 100\n"
        "base: [agent.learning_starts=50]\nvariants:\n"
        + textwrap.indent(textwrap.dedent(payload).strip(), "  ")
        + "\n"
    )
    return ["ablate", str(path)]


def _base(*extra: str) -> dict:
    """A tiny spec's ``base`` with ``extra`` overrides appended (tune payload); the store is
    the default ``mlruns/`` in the working directory."""
    return {"preset": "pendulum_ddpg", "overrides": [*TINY_OVERRIDES, *extra]}


def _range(key: str, low, high, **extra) -> dict:
    """A search space of one number (tune payload): float if ``low`` is a float, else int."""
    kind = "float" if isinstance(low, float) else "int"
    return {"space": {key: {"type": kind, "low": low, "high": high, **extra}}}


def _case_id(command: str, payload) -> str:
    if command == "train":
        what = " ".join(payload)
    elif command == "ablate":
        what = payload.strip().splitlines()[-1]
    else:
        key, value = next(iter(payload.items()))
        if key == "space":
            name, definition = next(iter(value.items()))
            what = f"space.{name} " + " ".join(f"{k}={v}" for k, v in definition.items())
        elif key == "base":
            what = "base " + value["overrides"][-1]
        else:
            what = f"{key}={value}"
    return f"{command}: {what}"


def _cases(*cases: tuple) -> list:
    return [pytest.param(*case, id=_case_id(*case[:2])) for case in cases]


def _assert_nothing_created(root: Path) -> None:
    dbs = sorted(str(p.relative_to(root)) for p in root.rglob("*.db"))
    assert dbs == [], "an MLflow store or Optuna storage was created"
    assert not list(root.rglob("optuna")), "an Optuna storage folder was created"
    assert not list(root.rglob("artifacts")), "MLflow artifacts were written"
    assert not list(root.rglob("hydra")), "a Hydra output folder was made"


def _check(cli, tmp_path, command, payload, code, fragments):
    began = time.monotonic()
    got, err = cli(*_argv(tmp_path, command, payload))
    assert got != 0, err
    if code is not None:
        assert got == code, err
    for fragment in fragments:
        assert fragment in err, f"{fragment!r} not in stderr:\n{err}"
    assert "Traceback" not in err
    assert time.monotonic() - began < 30
    _assert_nothing_created(tmp_path)


# ------------------------------------------------------------------- (a) unknown config keys

AGENT_KEYS = "allowed keys here: activation, actor_hidden, actor_lr, batch_size"


@pytest.mark.parametrize(
    ("command", "payload", "code", "fragments"),
    _cases(
        ("train", ["+agent.taux=0.1"], 2, ["agent.taux: unknown key", AGENT_KEYS, "tau"]),
        ("train", ["+lr=0.1"], 2, ["lr: unknown key", "total_steps"]),
        ("train", ["+noise.sigmaa=0.2"], 2, ["noise.sigmaa: unknown key", "sigma"]),
        ("tune", {"sampeler": "tpe"}, 2, ["sampeler='tpe': unknown key; allowed:", "sampler"]),
        (
            "tune",
            {"base": _base("+agent.taux=0.1")},
            2,
            ["base: agent.taux: unknown key", AGENT_KEYS],
        ),
        (
            "tune",
            {"base": _base("agent.taux=0.1")},
            2,
            ["base.overrides=", "Key 'taux' not in 'AgentConfig'", AGENT_KEYS],
        ),
        ("ablate", "a: []\nb: [+agent.taux=0.1]", 2, ["variant 'b'", "agent.taux", AGENT_KEYS]),
        ("ablate", "a: []\nb: [agent.taux=0.1]", 2, ["variant 'b'", "agent.taux", AGENT_KEYS]),
    ),
)
def test_unknown_config_keys(cli, tmp_path, command, payload, code, fragments):
    _check(cli, tmp_path, command, payload, code, fragments)


# ------------------------------------------------------------------------ (b) wrong types


@pytest.mark.parametrize(
    ("command", "payload", "code", "fragments"),
    _cases(
        (
            "train",
            ["agent.tau=abc"],
            HYDRA,
            ["agent.tau", "'abc'", "could not be converted to Float"],
        ),
        ("train", ["agent.batch_size=1.5"], HYDRA, ["agent.batch_size", "'1.5'", "Integer"]),
        ("train", ["env.n_envs=two"], HYDRA, ["env.n_envs", "'two'", "Integer"]),
        ("tune", {"steps": "many"}, 2, ["steps='many': must be an integer >= 1"]),
        (
            "tune",
            {"space": {"agent.tau": {"type": "float", "low": "a", "high": 1}}},
            2,
            ["space.agent.tau.low='a': must be a finite number"],
        ),
        (
            "tune",
            {"base": _base("agent.tau=abc")},
            2,
            [
                "base.overrides=",
                "agent.tau=abc",
                "'abc' of type 'str' could not be converted to Float",
            ],
        ),
        ("ablate", "a: []\nb: [agent.tau=abc]", 2, ["variant 'b'", "agent.tau=abc", "Float"]),
    ),
)
def test_wrong_types(cli, tmp_path, command, payload, code, fragments):
    _check(cli, tmp_path, command, payload, code, fragments)


# ------------------------------------------------------------------ (c) out-of-range numbers


@pytest.mark.parametrize(
    ("command", "payload", "code", "fragments"),
    _cases(
        ("train", ["agent.gamma=1.5"], 2, ["agent.gamma=1.5: must be in (0.0, 1.0]"]),
        ("train", ["agent.tau=0"], 2, ["agent.tau=0.0: must be in (0.0, 1.0]"]),
        ("train", ["agent.actor_lr=0"], 2, ["agent.actor_lr=0.0: must be > 0"]),
        ("train", ["agent.critic_lr=-1e-3"], 2, ["agent.critic_lr=-0.001: must be > 0"]),
        ("train", ["noise.sigma=-0.1"], 2, ["noise.sigma=-0.1: must be >= 0"]),
        ("train", ["noise=param", "noise.sigma=0"], 2, ["noise.sigma=0.0: must be > 0"]),
        ("train", ["epsilon.start=1.5"], 2, ["epsilon.start=1.5: must be in [0.0, 1.0]"]),
        (
            "train",
            ["schedule=linear", "schedule.duration=1.5"],
            2,
            ["schedule.duration=1.5: must be in (0.0, 1.0]"],
        ),
        ("train", ["total_steps=0"], 2, ["total_steps=0: must be an integer >= 1"]),
        ("train", ["eval.episodes=0"], 2, ["eval.episodes=0: must be an integer >= 1"]),
        (
            "train",
            ["agent.batch_size=64", "agent.buffer_size=32", "agent.tau=2"],
            2,
            ["must not exceed agent.buffer_size (32)", "agent.tau=2.0", "2 problem(s)"],
        ),
        # a search range reaching past what the config allows: refused before any trial
        (
            "tune",
            _range("agent.gamma", 0.9, 1.5),
            2,
            ["space.agent.gamma.high=1.5:", "agent.gamma=1.5: must be in (0.0, 1.0]"],
        ),
        (
            "tune",
            _range("agent.tau", 0.0, 0.05),
            2,
            ["space.agent.tau.low=0.0:", "agent.tau=0.0: must be in (0.0, 1.0]"],
        ),
        (
            "tune",
            _range("agent.batch_size", 128, 300000),
            2,
            ["space.agent.batch_size.high=300000:", "must not exceed agent.buffer_size (200000)"],
        ),
        (
            "tune",
            {"space": {"agent.n_critics": {"type": "categorical", "choices": [1, 2, 3]}}},
            2,
            ["space.agent.n_critics.choices=[1, 2, 3]:", "agent.n_critics=3: must be 1 or 2"],
        ),
        (
            "ablate",
            "a: []\nb: [agent.gamma=1.5]",
            2,
            ["variant 'b'", "agent.gamma=1.5: must be in"],
        ),
    ),
)
def test_out_of_range_numbers(cli, tmp_path, command, payload, code, fragments):
    _check(cli, tmp_path, command, payload, code, fragments)


# ------------------------------------------------- (d) unknown env, noise, sampler, pruner


@pytest.mark.parametrize(
    ("command", "payload", "code", "fragments"),
    _cases(
        ("train", ["env.id=Pendulum-v9"], 2, ["env.id='Pendulum-v9'", "Pendulum-v1"]),
        ("train", ["env=nope"], HYDRA, ["env/nope", "Available options in 'env'", "pendulum"]),
        ("train", ["noise.kind=pink"], 2, ["noise.kind='pink': must be one of gaussian, ou"]),
        ("train", ["noise=pink"], HYDRA, ["noise/pink", "Available options in 'noise'", "ou"]),
        (
            "tune",
            {"sampler": "bayes"},
            2,
            ["sampler.name='bayes': must be one of tpe, random, cmaes, gp, qmc"],
        ),
        ("tune", {"pruner": "early"}, 2, ["pruner.name='early': must be one of median"]),
        (
            "tune",
            {"space": {"noise": {"type": "categorical", "choices": ["ou", "pink"]}}},
            2,
            ["space.noise.choices=['ou', 'pink']", "gaussian, none, ou, param"],
        ),
        (
            "tune",
            {"base": _base("env.id=NoSuchEnv-v9")},
            2,
            ["env.id='NoSuchEnv-v9': unknown environment id"],
        ),
        (
            "ablate",
            "a: []\nb: [noise=pink]",
            2,
            ["variant 'b'", "noise/pink", "Available options in 'noise': gaussian, none, ou"],
        ),
    ),
)
def test_unknown_env_noise_sampler_pruner(cli, tmp_path, command, payload, code, fragments):
    _check(cli, tmp_path, command, payload, code, fragments)


# ----------------------------------------------------------------- (e) malformed study specs


@pytest.mark.parametrize(
    ("command", "payload", "code", "fragments"),
    _cases(
        (
            "tune",
            _range("agent.tua", 0.1, 1.0),
            2,
            ["space.agent.tua='agent.tua': unknown config key; keys under agent:", "tau"],
        ),
        (
            "tune",
            {"space": {"policy": {"type": "categorical", "choices": ["a"]}}},
            2,
            ["space.policy='policy': not a config group; groups: env, agent, noise"],
        ),
        (
            "tune",
            _range("agent.tau", 0.0, 0.1, log=True),
            2,
            ["space.agent.tau.low=0.0: must be > 0 when log"],
        ),
        (
            "tune",
            _range("agent.tau", -1.0, 0.1, log=True),
            2,
            ["space.agent.tau.low=-1.0: must be > 0"],
        ),
        (
            "tune",
            _range("agent.tau", 0.1, 0.1),
            2,
            ["space.agent.tau.low=0.1: must be < high (0.1)"],
        ),
        (
            "tune",
            {"space": {"noise": {"type": "categorical", "choices": []}}},
            2,
            ["space.noise.choices=[]: must be a non-empty list"],
        ),
        (
            "tune",
            {"objective": {"metric": "eval/return"}},
            2,
            ["objective.metric='eval/return': must be one of eval/return_mean"],
        ),
        (
            "tune",
            {"objective": {"direction": "up"}},
            2,
            ["objective.direction='up': must be one of maximize, minimize"],
        ),
    ),
)
def test_malformed_study_specs(cli, tmp_path, command, payload, code, fragments):
    _check(cli, tmp_path, command, payload, code, fragments)


# --------------------------------------------------------------------- (f) ablation specs


@pytest.mark.parametrize(
    ("command", "payload", "code", "fragments"),
    _cases(
        ("ablate", "a: []\nb: []\na: [agent=td3]", 2, ["duplicate key 'a' (line 9)"]),
        (
            "ablate",
            "a: []\nb: [+experiment=nope]",
            2,
            ["variant 'b': overrides do not compose", "Available options in 'experiment':"],
        ),
        (
            "ablate",
            "a: []\nb: ['agent.tau=[1']",
            2,
            ["variant 'b': overrides do not compose", "'[1'"],
        ),
        (
            "ablate",
            "a: []\nb: [agent=sac]",
            2,
            ["variant 'b': overrides do not compose", "agent/sac", "ddpg, td3"],
        ),
    ),
)
def test_ablation_specs(cli, tmp_path, command, payload, code, fragments):
    _check(cli, tmp_path, command, payload, code, fragments)


# ------------------------------------------------- (g) unreachable tracking store / storage


def _ablation_tracked_at(tmp_path: Path, uri: str) -> list[str]:
    path = tmp_path / "ablation.yaml"
    path.write_text(
        f"name: x\nbaseline: a\nseeds: 1\nsteps: 100\nbase: [agent.learning_starts=50]\n"
        f"variants: {{a: [], b: []}}\n"
        f"tracking: {{uri: '{uri}'}}\n"
    )
    return ["ablate", str(path)]


def _tune(tmp_path: Path, *flags: str) -> list[str]:
    spec = tiny_spec(tmp_path, name="reach", enqueue_base=True)
    return ["tune", str(write_spec(tmp_path, spec)), *flags]


@pytest.mark.parametrize(
    ("make_argv", "shown"),
    [
        (lambda tmp: _tune(tmp, "--tracking-uri", HTTP), f"MLflow tracking server {HTTP}"),
        (lambda tmp: _tune(tmp, "--tracking-uri", PG), f"reach the MLflow database {PG[:10]}"),
        (lambda tmp: _tune(tmp, "--storage", PG), "storage postgresql://"),
        (lambda tmp: _ablation_tracked_at(tmp, HTTP), f"MLflow tracking server {HTTP}"),
        (lambda tmp: _ablation_tracked_at(tmp, PG), f"reach the MLflow database {PG[:10]}"),
    ],
    ids=["tune-tracking-http", "tune-tracking-pg", "tune-storage-pg", "ablate-http", "ablate-pg"],
)
def test_unreachable_stores_are_reported_in_one_line(cli, tmp_path, make_argv, shown):
    began = time.monotonic()
    code, err = cli(*make_argv(tmp_path))
    assert time.monotonic() - began < 20  # one probe, not MLflow's minutes of retries
    assert code == 1, err  # the machine's state, not the input: a runtime failure
    said = [line for line in err.splitlines() if line.startswith("workbench:")]
    assert len(said) == 1 and shown in said[0], err
    if "127.0.0.1:9/db" in said[0]:
        assert PG_SHOWN in said[0], err
    assert "Traceback" not in err
    assert SECRET not in err
    _assert_nothing_created(tmp_path)
