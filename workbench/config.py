"""Config schema for a training run, and its validation.

Hydra composes ``conf/`` into these dataclasses (registered in the ConfigStore as the
schema every group is merged into), so unknown keys and wrong types fail at compose time.
``validate`` then checks ranges and cross-field rules, all at once, before any run exists.

The dataclasses are the one source of default values: ``conf/config.yaml`` lists the groups,
and a group option (``conf/noise/ou.yaml``) holds only what that option changes.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf

from workbench.errors import ConfigProblem

NOISE_KINDS = ("gaussian", "ou", "param", "none")
SCHEDULE_KINDS = ("constant", "linear", "exponential", "cosine")
VECTORIZATION = ("sync", "async")
TRACKING_BACKENDS = ("mlflow", "none")
REPLAY_STORAGE = ("device", "host")
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
# the activations networks.ACTIVATIONS implements (a test holds the two together)
ACTIVATION_NAMES = ("relu", "tanh", "elu", "gelu", "silu", "leaky_relu")


class ConfigError(ConfigProblem):
    """A config value is unusable. The message names each key, its value and what is allowed."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        lines = "\n".join(f"  - {p}" for p in problems)
        super().__init__(f"invalid configuration ({len(problems)} problem(s)):\n{lines}")


@dataclass
class EnvConfig:
    name: str = "pendulum"  # short name, used in run and experiment names
    id: str = "Pendulum-v1"  # Gymnasium id (PyBullet ids are registered on demand)
    n_envs: int = 1
    vectorization: str = "sync"  # sync | async (worker processes, for slow simulators)
    normalize_obs: bool = False  # running mean/std, saved with the policy
    time_feature: bool = False  # append remaining-time fraction to the observation
    max_episode_steps: int | None = None  # None: the env's registered limit
    kwargs: dict[str, Any] = field(default_factory=dict)  # passed to gymnasium.make


@dataclass
class AgentConfig:
    name: str = "ddpg"
    actor_hidden: list[int] = field(default_factory=lambda: [400, 300])
    critic_hidden: list[int] = field(default_factory=lambda: [400, 300])
    activation: str = "relu"
    layer_norm: bool = False
    actor_lr: float = 1e-3
    critic_lr: float = 1e-3
    critic_weight_decay: float = 0.0
    gamma: float = 0.99
    tau: float = 0.005
    batch_size: int = 256
    buffer_size: int = 1_000_000
    learning_starts: int = 10_000  # env steps of uniform random actions before learning
    train_freq: int = 1  # update every train_freq env steps (per env)
    gradient_steps: int = 1  # gradient updates each time
    max_grad_norm: float | None = None
    # TD3's three changes, each an independent toggle
    n_critics: int = 1  # 2: clipped double Q (min over critics)
    policy_delay: int = 1  # actor and target updates every k critic updates
    target_policy_noise: float = 0.0  # std of target policy smoothing noise (0: off)
    target_noise_clip: float = 0.5


@dataclass
class NoiseConfig:
    kind: str = "gaussian"  # gaussian | ou | param | none
    # Start scale, in normalized action units ([-1, 1]). For param noise: the target
    # action-space distance the weight perturbation is adapted to.
    sigma: float = 0.1
    theta: float = 0.15  # OU mean reversion
    dt: float = 1e-2  # OU time step
    initial_stddev: float = 0.1  # param noise: initial weight perturbation std
    adaptation_coef: float = 1.01  # param noise: multiply/divide std by this
    adapt_every: int = 50  # param noise: env steps between adaptations


@dataclass
class ScheduleConfig:
    """How the noise scale moves from ``noise.sigma`` to ``end``."""

    kind: str = "constant"
    end: float | None = None  # None: stay at the start value
    duration: float = 1.0  # fraction of total_steps over which it moves, then holds


@dataclass
class EpsilonConfig:
    """Probability of replacing the action with a uniform random one."""

    start: float = 0.0
    end: float | None = None
    kind: str = "constant"
    duration: float = 1.0


@dataclass
class EvalConfig:
    every: int = 2500  # env steps between evaluations (0: only the final one)
    episodes: int = 10
    video: bool = True  # record one episode of the final evaluation (envs that render)
    video_max_frames: int = 1000
    video_fps: int = 30


@dataclass
class TrackingConfig:
    backend: str = "mlflow"  # mlflow | none
    uri: str | None = None  # None: embedded sqlite store in `dir`; or a server / db URI
    dir: str = "mlruns"  # embedded store location, relative to the working directory
    experiment: str = "${env.name}"
    run_name: str | None = None  # None: <agent>-<env>-s<seed>
    log_every: int = 1000  # env steps between loss/q/exploration metric points
    flush_every_s: float = 10.0  # max seconds metrics wait in the buffer
    save_policy: bool = True
    tags: dict[str, str] = field(default_factory=dict)


@dataclass
class PerfConfig:
    """How fast a run goes, never what it learns: left out of the config hash.

    Every switch has a plain counterpart that gives the same result for the same seed
    (to float rounding for ``compile``; exactly for the rest).
    """

    compile: bool = False  # torch.compile the update step (eager if compilation fails)
    compile_mode: str | None = None  # None: reduce-overhead with CUDA graphs, else default
    cuda_graphs: bool = True  # on CUDA with compile: capture the update in CUDA graphs
    replay_storage: str = "device"  # device | host (copy every batch over: the plain path)
    replay_compact: bool = True  # store each observation once (next obs by index)
    device_metrics: bool = True  # sum update metrics on the device; read per log_every
    async_overlap: bool = True  # async envs step while the update runs (when exact)


@dataclass
class CheckpointConfig:
    """Training state saved for ``workbench train resume=<run-id>``: never what is learned."""

    every: int = 50_000  # env steps between checkpoints (0: only when interrupted)
    keep: int = 2  # newest checkpoints kept per run
    dir: str = "${tracking.dir}/checkpoints"  # one folder per MLflow run id below this
    # A checkpoint waits for a step where every env has just ended an episode, so that the
    # resumed run restarts each env exactly there; after this many env steps (per env), or
    # wait_s seconds after an interrupt, it is written mid-episode (resume then starts the
    # interrupted episodes afresh).
    wait_steps: int = 1000
    wait_s: float = 30.0
    keep_after_finish: bool = False  # a FINISHED run deletes its checkpoints


@dataclass
class Config:
    env: EnvConfig = field(default_factory=EnvConfig)
    agent: AgentConfig = field(default_factory=AgentConfig)
    noise: NoiseConfig = field(default_factory=NoiseConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    epsilon: EpsilonConfig = field(default_factory=EpsilonConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    perf: PerfConfig = field(default_factory=PerfConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    total_steps: int = 15_000
    torch_threads: int | None = 1  # None: torch's default
    progress: bool = True  # live display on a terminal
    resume: str | None = None  # MLflow run id to continue from its latest checkpoint


_SECTIONS: dict[str, type] = {
    cls.__name__: cls
    for cls in (
        EnvConfig,
        AgentConfig,
        NoiseConfig,
        ScheduleConfig,
        EpsilonConfig,
        EvalConfig,
        TrackingConfig,
        PerfConfig,
        CheckpointConfig,
    )
}


def register_schema() -> None:
    """Register the schema that ``conf/config.yaml`` lists first in its defaults."""
    ConfigStore.instance().store(name="workbench_schema", node=Config)


register_schema()


# ----------------------------------------------------------------------------- composition


def conf_dir() -> Path:
    """The config tree: $WORKBENCH_CONF, the checkout's conf/, or the copy inside the wheel."""
    if env := os.environ.get("WORKBENCH_CONF"):
        return Path(env).resolve()
    here = Path(__file__).resolve().parent
    for candidate in (here.parent / "conf", here / "conf"):
        if (candidate / "config.yaml").is_file():
            return candidate
    raise FileNotFoundError("workbench config tree not found (set WORKBENCH_CONF)")


def user_conf_dir() -> Path:
    """Configs workbench writes for the user (presets exported from a study): outside any
    source tree, so that writing one never marks later runs ``git.dirty``, and on Hydra's
    search path after conf/ (``search_path_overrides``), so that ``+experiment=<name>`` finds
    them. $WORKBENCH_USER_CONF, else $XDG_CONFIG_HOME/workbench/conf, else
    ~/.config/workbench/conf."""
    if env := os.environ.get("WORKBENCH_USER_CONF"):
        return Path(env).expanduser().resolve()
    base = os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config"
    return Path(base).expanduser().resolve() / "workbench" / "conf"


def search_path_overrides(overrides: Sequence[str] = ()) -> list[str]:
    """The Hydra override that adds ``user_conf_dir()`` to the config search path, when it
    exists (Hydra warns of a missing one) and ``overrides`` set no search path of their own."""
    folder = user_conf_dir()
    if not folder.is_dir() or any(override_key(o) == "hydra.searchpath" for o in overrides):
        return []
    text = f"file://{folder}".replace("\\", "\\\\").replace("'", "\\'")
    return [f"hydra.searchpath=['{text}']"]


def preset_names() -> list[str]:
    """The ``experiment`` presets Hydra can find: conf/'s and the user's."""
    folders = (conf_dir() / "experiment", user_conf_dir() / "experiment")
    return sorted({p.stem for folder in folders for p in folder.glob("*.yaml")})


def compose(overrides: Sequence[str] = (), *, validate_config: bool = True) -> Config:
    """Compose conf/ in-process with Hydra overrides (tests, study trials, ablations)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    overrides = [*search_path_overrides(overrides), *overrides]
    with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
        raw = hydra_compose(config_name="config", overrides=overrides)
    cfg = to_config(raw)
    if validate_config:
        validate(cfg)
        check_env(cfg)
    return cfg


def check_env(cfg: Config) -> None:
    """Refuse an env id the Gymnasium registry (with PyBullet's ids) does not know, before
    anything is made. The one config check that imports the registry (gymnasium, pybullet)."""
    from workbench.envs import check_env_id

    try:
        check_env_id(cfg.env.id)
    except ValueError as err:
        raise ConfigError([f"env.id={cfg.env.id!r}: {err}"]) from None


# ----------------------------------------------------------------------------- conversion


def _unknown_keys(node: Any, schema: type, prefix: str = "") -> list[str]:
    """Keys present in a composed node but not in its dataclass (``+key=`` slips them in)."""
    fields = {f.name: f for f in dataclasses.fields(schema)}
    problems = []
    for key in node:
        path = f"{prefix}{key}"
        if key not in fields:
            allowed = ", ".join(sorted(fields))
            problems.append(f"{path}: unknown key; allowed keys here: {allowed}")
            continue
        sub_schema = fields[key].type
        value = node[key]
        if isinstance(value, DictConfig) and isinstance(sub_schema, str):
            sub = _SECTIONS.get(sub_schema)
            if sub is not None:
                problems.extend(_unknown_keys(value, sub, f"{path}."))
    return problems


def override_key(override: str) -> str:
    """The key a Hydra override sets: ``+agent.tau=0.1`` -> ``agent.tau``."""
    return override.split("=", 1)[0].lstrip("+~")


def to_config(cfg: DictConfig | Config) -> Config:
    """Resolve interpolations and turn a composed DictConfig into the typed Config."""
    if isinstance(cfg, Config):
        return cfg
    if problems := _unknown_keys(cfg, Config):
        raise ConfigError(problems)
    obj = OmegaConf.to_object(cfg)
    if not isinstance(obj, Config):  # composed without the schema
        merged = OmegaConf.merge(OmegaConf.structured(Config), cfg)
        obj = OmegaConf.to_object(merged)
    assert isinstance(obj, Config)
    return obj


def to_dict(cfg: Config) -> dict[str, Any]:
    return OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True)  # type: ignore[return-value]


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{'agent': {'tau': 0.01}} -> {'agent.tau': 0.01}; lists stay whole."""
    out: dict[str, Any] = {}
    for key, value in tree.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out.update(flatten(value, f"{path}."))
        else:
            out[path] = value
    return out


# What changes how a run executes or where it is recorded, never what it learns (dotted keys
# and whole sections). Left out of the config hash, and the only keys a resumed run may change.
RUNTIME_KEYS = (
    "resume",
    "progress",
    "torch_threads",
    "device",
    "perf",
    "checkpoint",
    "tracking",
    "eval.video",
    "eval.video_max_frames",
    "eval.video_fps",
)


def is_runtime_key(key: str) -> bool:
    """Whether ``key`` (dotted) is, or lies under, one of ``RUNTIME_KEYS``."""
    return any(key == k or key.startswith(f"{k}.") for k in RUNTIME_KEYS)


def inert_keys(cfg: Config) -> dict[str, str]:
    """Keys whose value cannot matter given the rest of ``cfg``, each with the reason.

    ``validate`` refuses them at any value but their default (a value that does nothing is a
    mistake: the user meant something else), and ``config_hash`` leaves them out.
    """
    n, s, ep, a = cfg.noise, cfg.schedule, cfg.epsilon, cfg.agent
    out: dict[str, str] = {}
    if n.kind != "ou":
        for key in ("theta", "dt"):
            out[f"noise.{key}"] = f"only noise.kind=ou uses it (noise.kind is {n.kind})"
    if n.kind != "param":
        for key in ("initial_stddev", "adaptation_coef", "adapt_every"):
            out[f"noise.{key}"] = f"only noise.kind=param uses it (noise.kind is {n.kind})"
    if n.kind == "none":
        for key in ("noise.sigma", "schedule.kind", "schedule.end", "schedule.duration"):
            out[key] = "noise.kind=none adds no noise (no scale to set or schedule)"
    elif s.kind == "constant":
        for key in ("end", "duration"):
            out[f"schedule.{key}"] = "schedule.kind=constant keeps noise.sigma throughout"
    if ep.kind == "constant":
        for key in ("end", "duration"):
            out[f"epsilon.{key}"] = "epsilon.kind=constant keeps epsilon.start throughout"
    if a.target_policy_noise == 0:
        out["agent.target_noise_clip"] = "agent.target_policy_noise=0 turns target smoothing off"
    return out


def config_hash(cfg: Config) -> str:
    """Hash of everything that shapes learning except the seed: group by it to average seeds.

    Left out: the seed, ``RUNTIME_KEYS`` and ``inert_keys`` (values that cannot matter).
    """
    inert = inert_keys(cfg)
    tree = {
        k: v
        for k, v in flatten(to_dict(cfg)).items()
        if k != "seed" and not is_runtime_key(k) and k not in inert
    }
    blob = json.dumps(tree, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:12]


def get_key(obj: Any, key: str) -> Any:
    """The value at a dotted ``key`` of a Config (or any nested dataclass)."""
    for part in key.split("."):
        obj = getattr(obj, part)
    return obj


# ----------------------------------------------------------------------------- validation


class _Checker:
    def __init__(self) -> None:
        self.problems: list[str] = []

    def fail(self, key: str, value: Any, allowed: str) -> None:
        self.problems.append(f"{key}={value!r}: {allowed}")

    def choice(self, key: str, value: str, allowed: tuple[str, ...]) -> None:
        if value not in allowed:
            self.fail(key, value, f"must be one of {', '.join(allowed)}")

    def finite(self, key: str, value: float) -> bool:
        if not math.isfinite(value):
            self.fail(key, value, "must be a finite number")
            return False
        return True

    def positive(self, key: str, value: float) -> None:
        if self.finite(key, value) and value <= 0:
            self.fail(key, value, "must be > 0")

    def non_negative(self, key: str, value: float) -> None:
        if self.finite(key, value) and value < 0:
            self.fail(key, value, "must be >= 0")

    def interval(self, key: str, value: float, lo: float, hi: float, *, lo_open: bool) -> None:
        if not self.finite(key, value):
            return
        ok = (lo < value if lo_open else lo <= value) and value <= hi
        if not ok:
            self.fail(key, value, f"must be in {'(' if lo_open else '['}{lo}, {hi}]")

    def at_least(self, key: str, value: int, lo: int) -> None:
        if value < lo:
            self.fail(key, value, f"must be an integer >= {lo}")


def _check_schedule(
    c: _Checker, prefix: str, kind: str, start: float, end: float | None, duration: float
) -> None:
    c.choice(f"{prefix}.kind", kind, SCHEDULE_KINDS)
    c.interval(f"{prefix}.duration", duration, 0.0, 1.0, lo_open=True)
    if end is not None:
        c.finite(f"{prefix}.end", end)
    if kind == "exponential":
        if not start > 0:
            c.fail(f"{prefix} start", start, "an exponential schedule needs a start value > 0")
        if end is not None and not end > 0:
            c.fail(f"{prefix}.end", end, "an exponential schedule needs an end value > 0")
    if kind != "constant" and end is None:
        c.fail(f"{prefix}.end", end, f"a {kind} schedule needs an end value")


def _check_learns(c: _Checker, cfg: Config) -> None:
    """Refuse a run that would end before its first update: it would train nothing, yet end
    FINISHED like any other (``env=halfcheetah total_steps=3000``: learning starts at 10,000).

    ``gradient_steps=0`` is left alone: it asks for no updates in so many words."""
    a, total = cfg.agent, cfg.total_steps
    if min(total, a.train_freq, a.gradient_steps, cfg.env.n_envs) < 1 or a.learning_starts < 0:
        return  # already refused above, or no updates asked for
    if a.learning_starts >= total:
        c.fail(
            "agent.learning_starts",
            a.learning_starts,
            f"must be < total_steps ({total}), or the run ends before learning starts and "
            f"never updates; set agent.learning_starts={max(1, total // 10)} (say) "
            f"or total_steps above {a.learning_starts}",
        )
        return
    # Updates come every train_freq-th vector step once learning has started (Run.updates_due).
    n = cfg.env.n_envs
    vector_steps = -(-total // n)
    last_update_step = vector_steps // a.train_freq * a.train_freq
    if last_update_step < 1 or last_update_step * n < a.learning_starts:
        c.fail(
            "agent.train_freq",
            a.train_freq,
            f"no update would happen: no multiple of it among the {vector_steps} vector steps "
            f"(total_steps={total} over env.n_envs={n}) falls at or after "
            f"agent.learning_starts={a.learning_starts}; lower agent.train_freq or raise "
            "total_steps",
        )


def validate(cfg: Config) -> None:
    """Raise ConfigError listing every unusable value: a pure function of the config (no
    env registry, no tracker, no torch; ``check_env`` asks the registry)."""
    c = _Checker()
    a, n, e = cfg.agent, cfg.noise, cfg.env

    # env
    c.at_least("env.n_envs", e.n_envs, 1)
    c.choice("env.vectorization", e.vectorization, VECTORIZATION)
    if e.max_episode_steps is not None:
        c.at_least("env.max_episode_steps", e.max_episode_steps, 1)

    # agent
    for key in ("actor_hidden", "critic_hidden"):
        sizes = getattr(a, key)
        if not sizes or any(s < 1 for s in sizes):
            c.fail(f"agent.{key}", list(sizes), "must be a non-empty list of layer sizes >= 1")
    c.choice("agent.activation", a.activation, ACTIVATION_NAMES)
    c.positive("agent.actor_lr", a.actor_lr)
    c.positive("agent.critic_lr", a.critic_lr)
    c.non_negative("agent.critic_weight_decay", a.critic_weight_decay)
    c.interval("agent.gamma", a.gamma, 0.0, 1.0, lo_open=True)
    c.interval("agent.tau", a.tau, 0.0, 1.0, lo_open=True)
    c.at_least("agent.batch_size", a.batch_size, 1)
    c.at_least("agent.buffer_size", a.buffer_size, 1)
    if a.batch_size > a.buffer_size:
        c.fail(
            "agent.batch_size",
            a.batch_size,
            f"must not exceed agent.buffer_size ({a.buffer_size})",
        )
    c.at_least("agent.learning_starts", a.learning_starts, 0)
    c.at_least("agent.train_freq", a.train_freq, 1)
    c.at_least("agent.gradient_steps", a.gradient_steps, 0)
    if a.max_grad_norm is not None:
        c.positive("agent.max_grad_norm", a.max_grad_norm)
    if a.n_critics not in (1, 2):
        c.fail("agent.n_critics", a.n_critics, "must be 1 or 2")
    c.at_least("agent.policy_delay", a.policy_delay, 1)
    c.non_negative("agent.target_policy_noise", a.target_policy_noise)
    c.non_negative("agent.target_noise_clip", a.target_noise_clip)

    # exploration
    c.choice("noise.kind", n.kind, NOISE_KINDS)
    c.non_negative("noise.sigma", n.sigma)
    if n.kind == "ou":
        c.positive("noise.theta", n.theta)
        c.positive("noise.dt", n.dt)
    if n.kind == "param":
        c.positive("noise.sigma", n.sigma)
        c.positive("noise.initial_stddev", n.initial_stddev)
        if c.finite("noise.adaptation_coef", n.adaptation_coef) and n.adaptation_coef <= 1:
            c.fail("noise.adaptation_coef", n.adaptation_coef, "must be > 1")
        c.at_least("noise.adapt_every", n.adapt_every, 1)
    s = cfg.schedule
    _check_schedule(c, "schedule", s.kind, n.sigma, s.end, s.duration)
    if s.end is not None:
        c.non_negative("schedule.end", s.end)
    ep = cfg.epsilon
    _check_schedule(c, "epsilon", ep.kind, ep.start, ep.end, ep.duration)
    c.interval("epsilon.start", ep.start, 0.0, 1.0, lo_open=False)
    if ep.end is not None:
        c.interval("epsilon.end", ep.end, 0.0, 1.0, lo_open=False)

    # run
    c.at_least("total_steps", cfg.total_steps, 1)
    c.at_least("seed", cfg.seed, 0)
    if not (cfg.device in ("auto", "cpu", "cuda") or cfg.device.startswith("cuda:")):
        c.fail("device", cfg.device, "must be auto, cpu, cuda or cuda:N")
    if cfg.torch_threads is not None:
        c.at_least("torch_threads", cfg.torch_threads, 1)
    c.at_least("eval.every", cfg.eval.every, 0)
    c.at_least("eval.episodes", cfg.eval.episodes, 1)
    c.at_least("eval.video_max_frames", cfg.eval.video_max_frames, 1)
    c.at_least("eval.video_fps", cfg.eval.video_fps, 1)
    _check_learns(c, cfg)

    # tracking
    t = cfg.tracking
    c.choice("tracking.backend", t.backend, TRACKING_BACKENDS)
    c.at_least("tracking.log_every", t.log_every, 1)
    c.positive("tracking.flush_every_s", t.flush_every_s)
    if t.backend == "mlflow" and not t.experiment:
        c.fail("tracking.experiment", t.experiment, "must be a non-empty name")

    # checkpoints
    ck = cfg.checkpoint
    c.at_least("checkpoint.every", ck.every, 0)
    c.at_least("checkpoint.keep", ck.keep, 1)
    c.at_least("checkpoint.wait_steps", ck.wait_steps, 0)
    c.non_negative("checkpoint.wait_s", ck.wait_s)
    if not ck.dir:
        c.fail("checkpoint.dir", ck.dir, "must be a folder path")
    if cfg.resume is not None and not re.fullmatch(r"[0-9a-f]{32}", cfg.resume):
        c.fail("resume", cfg.resume, "must be an MLflow run id (32 hex digits)")

    # perf
    c.choice("perf.replay_storage", cfg.perf.replay_storage, REPLAY_STORAGE)
    if cfg.perf.compile_mode is not None:
        c.choice("perf.compile_mode", cfg.perf.compile_mode, COMPILE_MODES)
    if cfg.perf.replay_compact and a.buffer_size < 2 * e.n_envs:
        c.fail(
            "agent.buffer_size",
            a.buffer_size,
            f"must be >= 2 x env.n_envs ({2 * e.n_envs}) with perf.replay_compact=true",
        )

    # keys that do nothing here, set to something else than their default
    defaults = Config()
    for key, why in inert_keys(cfg).items():
        value, default = get_key(cfg, key), get_key(defaults, key)
        if value != default:
            c.fail(key, value, f"does nothing here: {why}; remove it (default {default!r})")

    if c.problems:
        raise ConfigError(c.problems)
