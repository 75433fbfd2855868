"""Every config group and preset composes and validates; bad values fail with their message."""

import subprocess
import sys
from pathlib import Path

import pytest
from hydra.errors import ConfigCompositionException, MissingConfigException

from workbench.config import (
    ConfigError,
    compose,
    conf_dir,
    config_hash,
    flatten,
    is_runtime_key,
    to_dict,
)

GROUPS = ["env", "agent", "noise", "schedule", "tracking"]


def _options(group: str) -> list[str]:
    return sorted(p.stem for p in (conf_dir() / group).glob("*.yaml"))


@pytest.mark.parametrize(
    "override", [f"{g}={o}" for g in GROUPS for o in _options(g)], ids=lambda s: s
)
def test_every_group_option_composes_and_validates(override):
    cfg = compose([override])
    group, option = override.split("=")
    if group == "env":
        assert cfg.env.name == option
    if group == "agent":
        assert cfg.agent.name == option


@pytest.mark.parametrize("preset", _options("experiment"))
def test_every_experiment_preset_composes_and_validates(preset):
    cfg = compose([f"+experiment={preset}"])
    env_name, agent_name = preset.rsplit("_", 1)
    assert cfg.env.name == env_name
    assert cfg.agent.name == agent_name
    assert cfg.agent.gamma == 0.98
    assert cfg.agent.actor_hidden == [400, 300]


def test_required_presets_exist():
    required = {"pendulum_ddpg", "halfcheetah_ddpg", "halfcheetah_td3", "hopper_td3"}
    assert required | {"humanoid_flagrun_td3"} <= set(_options("experiment"))


def test_pybullet_presets_start_from_rl_zoo_values():
    cfg = compose(["+experiment=halfcheetah_td3"])
    a = cfg.agent
    assert (a.gamma, a.buffer_size, a.learning_starts, a.batch_size) == (0.98, 200_000, 10_000, 256)
    assert (a.actor_lr, a.critic_lr) == (7e-4, 7e-4)
    assert (cfg.noise.kind, cfg.noise.sigma) == ("gaussian", 0.1)
    assert (a.n_critics, a.policy_delay, a.target_policy_noise) == (2, 2, 0.2)
    p = compose(["+experiment=pendulum_ddpg"])
    assert (p.total_steps, p.agent.gamma, p.agent.actor_lr) == (20_000, 0.98, 1e-3)


def test_td3_is_ddpg_plus_toggles():
    ddpg, td3 = compose(["agent=ddpg", "env=hopper"]), compose(["agent=td3", "env=hopper"])
    diff = {k for k, v in flatten(to_dict(td3)).items() if flatten(to_dict(ddpg))[k] != v}
    toggles = {"agent.n_critics", "agent.policy_delay", "agent.target_policy_noise"}
    assert diff == {"agent.name", *toggles}


def test_issue_example_composes():
    cfg = compose(["env=halfcheetah", "agent=td3", "noise=ou", "agent.tau=0.01"])
    assert cfg.env.id == "HalfCheetahBulletEnv-v0"
    assert (cfg.agent.tau, cfg.noise.kind, cfg.agent.n_critics) == (0.01, "ou", 2)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["agent.tau=0"], "agent.tau=0.0: must be in (0.0, 1.0]"),
        (["agent.tau=1.5"], "agent.tau=1.5: must be in (0.0, 1.0]"),
        (["agent.actor_lr=0"], "agent.actor_lr=0.0: must be > 0"),
        (["agent.critic_lr=-1e-3"], "agent.critic_lr=-0.001: must be > 0"),
        (["agent.gamma=0"], "agent.gamma=0.0: must be in (0.0, 1.0]"),
        (["agent.gamma=1.01"], "agent.gamma=1.01: must be in (0.0, 1.0]"),
        (
            ["agent.batch_size=512", "agent.buffer_size=100"],
            "agent.batch_size=512: must not exceed agent.buffer_size (100)",
        ),
        (["env.id=HalfCheetahBullet-v0"], "did you mean HalfCheetahBulletEnv-v0"),
        (["noise.kind=pink"], "noise.kind='pink': must be one of gaussian, ou, param, none"),
        (["agent.n_critics=3"], "agent.n_critics=3: must be 1 or 2"),
        (["agent.activation=swish"], "agent.activation='swish': must be one of"),
        (["epsilon.start=1.5"], "epsilon.start=1.5: must be in [0.0, 1.0]"),
        (["schedule=linear", "schedule.end=null"], "a linear schedule needs an end value"),
        (["schedule=exponential", "schedule.end=0"], "needs an end value > 0"),
        (["schedule=linear", "schedule.duration=0"], "schedule.duration=0.0: must be in (0.0"),
        (["noise=ou", "noise.theta=0"], "noise.theta=0.0: must be > 0"),
        (["noise=param", "noise.adaptation_coef=0.9"], "noise.adaptation_coef=0.9: must be > 1"),
        (["total_steps=0"], "total_steps=0: must be an integer >= 1"),
        (["device=tpu"], "device='tpu': must be auto, cpu, cuda or cuda:N"),
        (["env.n_envs=0"], "env.n_envs=0: must be an integer >= 1"),
        (["env.vectorization=threads"], "env.vectorization='threads': must be one of sync, async"),
        (["agent.actor_hidden=[]"], "agent.actor_hidden=[]: must be a non-empty list"),
        (["agent.tau=nan"], "agent.tau=nan: must be a finite number"),
    ],
)
def test_invalid_values_are_rejected_with_key_value_and_rule(overrides, message):
    with pytest.raises(ConfigError) as err:
        compose(overrides)
    assert message in str(err.value)


@pytest.mark.parametrize("override", ["+agent.taux=0.1", "+noise.sigmaa=0.2", "+lr=0.1"])
def test_keys_added_with_plus_are_still_unknown(override):
    key = override[1:].split("=")[0]
    with pytest.raises(ConfigError, match=f"{key}: unknown key; allowed keys here"):
        compose([override])


def test_all_problems_are_reported_at_once():
    with pytest.raises(ConfigError) as err:
        compose(["agent.tau=0", "agent.gamma=2", "agent.actor_lr=0"])
    assert len(err.value.problems) == 3


@pytest.mark.parametrize(
    ("overrides", "exc", "message"),
    [
        (["agent.taux=0.1"], ConfigCompositionException, "agent.taux"),
        (["agent.tau=fast"], ConfigCompositionException, "agent.tau=fast"),
        (["agent.batch_size=1.5"], ConfigCompositionException, "agent.batch_size"),
        (["env=nope"], MissingConfigException, "env/nope"),
    ],
)
def test_unknown_keys_and_wrong_types_fail_at_compose(overrides, exc, message):
    with pytest.raises(exc) as err:
        compose(overrides, validate_config=False)
    assert message in str(err.value)


def test_config_hash_ignores_seed_and_what_never_changes_learning():
    base = compose([])
    same = ["seed=7", "tracking.experiment=x", "device=cpu", "torch_threads=2", "eval.video=false"]
    assert config_hash(base) == config_hash(compose(same))
    assert config_hash(base) != config_hash(compose(["agent.tau=0.01"]))
    assert config_hash(base) != config_hash(compose(["eval.episodes=3"]))


def test_resume_may_change_exactly_the_keys_the_hash_leaves_out():
    """One list: a key a resumed run may change is a key the config hash ignores."""
    base = compose([])
    for key, value in flatten(to_dict(base)).items():
        if is_runtime_key(key) and isinstance(value, int) and not isinstance(value, bool):
            changed = compose([f"{key}=7"], validate_config=False)
            assert config_hash(changed) == config_hash(base), key
    assert is_runtime_key("device") and is_runtime_key("perf.compile")
    assert not is_runtime_key("agent.tau") and not is_runtime_key("eval.episodes")


INERT = [
    (["noise=gaussian", "noise.theta=0.3"], "noise.theta=0.3", "only noise.kind=ou uses it"),
    (["noise=ou", "noise.adapt_every=10"], "noise.adapt_every=10", "only noise.kind=param"),
    (["schedule=constant", "schedule.end=0.05"], "schedule.end=0.05", "schedule.kind=constant"),
    (["epsilon.start=0.2", "epsilon.end=0.1"], "epsilon.end=0.1", "epsilon.kind=constant"),
    (["noise=none", "noise.sigma=0.3"], "noise.sigma=0.3", "noise.kind=none adds no noise"),
    (["noise=none", "schedule=linear"], "schedule.kind='linear'", "noise.kind=none"),
    (["schedule=constant", "schedule.duration=0.5"], "schedule.duration=0.5", "kind=constant"),
    (["agent=ddpg", "agent.target_noise_clip=0.3"], "agent.target_noise_clip=0.3", "noise=0"),
]


@pytest.mark.parametrize(("overrides", "key", "why"), INERT, ids=lambda x: str(x))
def test_a_key_that_does_nothing_is_refused_and_left_out_of_the_hash(overrides, key, why):
    with pytest.raises(ConfigError) as err:
        compose(overrides)
    (problem,) = [p for p in err.value.problems if p.startswith(key)]
    assert "does nothing here" in problem and why in problem
    # and it could not split a group of seeds: the hash ignores it
    unset = overrides[:-1]
    assert config_hash(compose(overrides, validate_config=False)) == config_hash(compose(unset))


def test_the_same_keys_do_something_where_they_are_used():
    for overrides in (
        ["noise=ou", "noise.theta=0.3"],
        ["schedule=linear", "schedule.end=0.05", "schedule.duration=0.5"],
        ["epsilon.start=0.2", "epsilon.kind=linear", "epsilon.end=0.0"],
        ["agent=td3", "agent.target_noise_clip=0.3"],
    ):
        cfg = compose(overrides)
        assert config_hash(cfg) != config_hash(compose(overrides[:1])), overrides


IDENTITY = {"env": ("name", "id"), "agent": ("name",), "noise": ("kind",), "schedule": ("kind",)}


@pytest.mark.parametrize("group", GROUPS)
def test_group_options_restate_no_schema_default(group):
    """The dataclasses hold every default once; an option holds only what it changes (and
    its own name), so the two can never disagree again."""
    import dataclasses

    import yaml

    from workbench.config import Config

    section = getattr(Config(), group)
    defaults = {f.name: getattr(section, f.name) for f in dataclasses.fields(section)}
    identity = IDENTITY.get(group, ("backend",))
    for path in sorted((conf_dir() / group).glob("*.yaml")):
        values = yaml.safe_load(path.read_text()) or {}
        values.pop("defaults", None)
        restated = {
            k: v for k, v in values.items() if k not in identity and defaults.get(k, object()) == v
        }
        assert not restated, f"{path.name} restates schema defaults {restated}"


def test_config_yaml_holds_no_values_only_groups_and_hydra_settings():
    import yaml

    assert set(yaml.safe_load((conf_dir() / "config.yaml").read_text())) == {"defaults", "hydra"}


def _cli(args, cwd):
    return subprocess.run(
        [sys.executable, "-m", "workbench.cli", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["train", "agent.tau=2"], "agent.tau=2.0: must be in (0.0, 1.0]"),
        (["train", "agent.taux=2"], "agent.taux"),
        (["train", "env.id=NoSuchEnv-v9"], "env.id='NoSuchEnv-v9'"),
        (["train", "agent.batch_size=64", "agent.buffer_size=32"], "must not exceed"),
    ],
)
def test_cli_rejects_bad_config_before_any_run_exists(tmp_path: Path, args, message):
    proc = _cli(args, tmp_path)
    assert proc.returncode != 0
    assert message in proc.stderr
    assert not (tmp_path / "mlruns" / "mlflow.db").exists()


def test_validation_is_a_pure_function_of_the_config():
    """config.validate imports neither torch nor gymnasium; the activation names it allows
    are the ones the networks implement."""
    import subprocess
    import sys

    code = (
        "import sys; from workbench.config import Config, validate; validate(Config()); "
        "print(sorted(m for m in ('torch', 'gymnasium') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"

    from workbench.config import ACTIVATION_NAMES
    from workbench.networks import ACTIVATIONS

    assert set(ACTIVATIONS) == set(ACTIVATION_NAMES)
