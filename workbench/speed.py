"""``workbench bench``: how fast a run is, measured, next to Stable-Baselines3's DDPG.

A run's speed is the product's speed (studies and ablations multiply it by hundreds), so it
is measured here rather than guessed. One JSON document:

- ``update``: updates/s of our update step on the configured device, and of SB3's at
  identical settings, timed in alternating chunks in this process so that machine load
  affects both alike, with the ratio ours/SB3;
- ``env``: the env's raw step rate (random actions) with the run's vector-env setting;
- ``end_to_end``: steps/s of ``train()`` for ``total_steps`` at the configured update-to-data
  ratio, as a fraction of the raw env rate, the share of wall time spent inside tracker
  (MLflow) calls and in evaluation; and SB3's ``learn()`` at identical settings, alternated
  with ours when there are several rounds;
- ``replay``: bytes per transition x capacity, ours and SB3's.

``workbench bench --population K`` measures the K axis instead (``bench_population``): one
population of K members (``train_population``) against the same K runs trained one after
another (``train``), alternated in this process, as aggregate env steps/s and updates/s.

Only the optional ``bench`` extra (``pip install -e ".[bench]"``) brings SB3; without it the
SB3 fields are absent and ``sb3.available`` is false.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import os
import platform
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from workbench import envs as envs_mod
from workbench.config import Config, compose, to_dict
from workbench.networks import ACTIVATIONS
from workbench.replay import CompactReplayBuffer, ReplayBuffer
from workbench.tracking import Tracker, make_tracker
from workbench.tracking.tags import BENCH_TAG

# Applied before the user's overrides: the bench measures training, not the progress bar or
# a video encoder; evaluation still runs as configured at the end (and is reported).
BENCH_DEFAULTS = ("progress=false", "eval.every=0", "eval.video=false")

HALFCHEETAH_DIMS = (26, 6)


# ----------------------------------------------------------------------------- helpers


def machine() -> dict[str, Any]:
    """What the numbers were measured on."""
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    out: dict[str, Any] = {
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
    }
    with contextlib.suppress(OSError, AttributeError):
        out["load_avg_1m"] = round(os.getloadavg()[0], 2)
    if torch.cuda.is_available():
        out["gpu"] = torch.cuda.get_device_name()
    return out


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _r(x: float, digits: int = 1) -> float:
    return round(float(x), digits)


def utd(cfg: Config) -> float:
    """Updates per env step."""
    a = cfg.agent
    return a.gradient_steps / (a.train_freq * cfg.env.n_envs)


def _env_kw(cfg: Config) -> dict[str, Any]:
    return envs_mod.env_options(cfg.env)


def _dims(cfg: Config) -> tuple[int, int]:
    env = envs_mod.make_env(cfg.env.id, **_env_kw(cfg))
    try:
        obs_dim = int(np.prod(env.observation_space.shape))
        act_dim = int(np.prod(env.action_space.shape))
    finally:
        env.close()
    return obs_dim, act_dim


def _random_walk(
    obs_dim: int, act_dim: int, rows: int, n_envs: int, seed: int
) -> Iterator[tuple[np.ndarray, ...]]:
    """Transitions shaped like a run's: continuous per env, an episode end every 1000 steps."""
    rng = np.random.default_rng(seed)
    obs = rng.normal(size=(n_envs, obs_dim)).astype(np.float32)
    for t in range(rows // n_envs):
        nxt = rng.normal(size=(n_envs, obs_dim)).astype(np.float32)
        done = np.full(n_envs, (t + 1) % 1000 == 0)
        act = rng.uniform(-1, 1, size=(n_envs, act_dim)).astype(np.float32)
        rew = rng.normal(size=n_envs).astype(np.float32)
        yield obs, act, rew, nxt, np.zeros(n_envs, bool), done
        obs = np.where(done[:, None], rng.normal(size=nxt.shape), nxt).astype(np.float32)


# ----------------------------------------------------------------------------- SB3


def sb3_available() -> bool:
    try:
        import stable_baselines3  # noqa: F401
    except ImportError:
        return False
    return True


def sb3_model(cfg: Config, device: torch.device, env: Any) -> tuple[Any, list[str]]:
    """SB3's DDPG (or TD3 when TD3's toggles are on) at our settings; notes on mismatches."""
    import stable_baselines3 as sb3
    from stable_baselines3.common.noise import NormalActionNoise, OrnsteinUhlenbeckActionNoise

    a, n = cfg.agent, cfg.noise
    notes = []
    if a.actor_lr != a.critic_lr:
        notes.append("SB3 has one learning rate: using agent.critic_lr for both")
    if a.layer_norm or a.critic_weight_decay or a.max_grad_norm is not None:
        notes.append("SB3 has no layer norm, critic weight decay or gradient clipping here")
    if cfg.env.normalize_obs:
        notes.append("SB3 runs without observation normalization")
    act_dim = int(np.prod(env.action_space.shape))
    noise: Any = None
    if n.kind == "gaussian":
        noise = NormalActionNoise(np.zeros(act_dim), np.full(act_dim, n.sigma))
    elif n.kind == "ou":
        noise = OrnsteinUhlenbeckActionNoise(
            np.zeros(act_dim), np.full(act_dim, n.sigma), theta=n.theta, dt=n.dt
        )
    elif n.kind == "param":
        notes.append("SB3 has no parameter noise: running without exploration noise")
    activation = ACTIVATIONS[a.activation].module
    policy_kwargs: dict[str, Any] = {
        "net_arch": {"pi": list(a.actor_hidden), "qf": list(a.critic_hidden)},
        "activation_fn": activation,
        "n_critics": a.n_critics,
    }
    common = {
        "learning_rate": a.critic_lr,
        "buffer_size": a.buffer_size,
        "learning_starts": a.learning_starts,
        "batch_size": a.batch_size,
        "tau": a.tau,
        "gamma": a.gamma,
        "train_freq": (a.train_freq, "step"),
        "gradient_steps": a.gradient_steps,
        "action_noise": noise,
        "policy_kwargs": policy_kwargs,
        "device": str(device),
        "seed": cfg.seed,
        "verbose": 0,
    }
    td3_parts = a.n_critics != 1 or a.policy_delay != 1 or a.target_policy_noise > 0
    if td3_parts:
        model = sb3.TD3(
            "MlpPolicy",
            env,
            policy_delay=a.policy_delay,
            target_policy_noise=a.target_policy_noise,
            target_noise_clip=a.target_noise_clip,
            **common,
        )
    else:
        policy_kwargs.pop("n_critics")  # DDPG fixes it to 1
        model = sb3.DDPG("MlpPolicy", env, **common)
    return model, notes


def _sb3_env(cfg: Config) -> Any:
    """The same env (our wrappers) as SB3 would be given it: a plain env, or a vec env.

    One env always steps in SB3's own process (DummyVecEnv): SB3 never overlaps stepping
    with updates, so a worker process could only slow it down.
    """
    factory = functools.partial(envs_mod.make_env, cfg.env.id, **_env_kw(cfg))
    if cfg.env.n_envs == 1:
        return factory()
    from stable_baselines3.common.env_util import make_vec_env
    from stable_baselines3.common.vec_env import DummyVecEnv, SubprocVecEnv

    if cfg.env.vectorization == "async":
        return make_vec_env(
            factory,
            cfg.env.n_envs,
            vec_env_cls=SubprocVecEnv,
            vec_env_kwargs={"start_method": envs_mod._default_context()},
        )
    return make_vec_env(factory, cfg.env.n_envs, vec_env_cls=DummyVecEnv)


def sb3_bytes_per_transition(obs_dim: int, act_dim: int) -> int:
    """SB3's ReplayBuffer: obs and next obs, action, reward, done, timeout (float32)."""
    return 4 * (2 * obs_dim + act_dim + 3)


# ----------------------------------------------------------------------------- update


def _our_update_runner(
    cfg: Config, device: torch.device, obs_dim: int, act_dim: int, fill: int
) -> Callable[[int], None]:
    from workbench.train import build_learner

    learner, replay = build_learner(
        cfg, 1, obs_dim, act_dim, device, buffer_size=max(cfg.agent.buffer_size, fill)
    )
    torch.manual_seed(cfg.seed)
    learner.place(0, cfg.agent, seed=cfg.seed, normalize_obs=cfg.env.normalize_obs)
    buffer = replay.buffer(0, cfg.seed)
    for row in _random_walk(obs_dim, act_dim, fill, cfg.env.n_envs, cfg.seed):
        buffer.add(*row)
    sums: dict[str, torch.Tensor] = {}

    def run(n: int) -> None:
        for _ in range(n):
            batch = replay.gather([buffer.sample_indices(cfg.agent.batch_size)])
            (metrics,) = learner.update(batch, [True])
            assert metrics is not None
            for key, value in metrics.items():
                if key in sums:
                    sums[key] += value
                else:
                    sums[key] = value.clone()  # as the training loop does
        _sync(device)

    return run


def _sb3_update_runner(
    cfg: Config, device: torch.device, obs_dim: int, act_dim: int, fill: int
) -> tuple[Callable[[int], None], list[str]]:
    env = _sb3_env(cfg)
    model, notes = sb3_model(cfg, device, env)
    model._setup_learn(total_timesteps=1)  # what learn() does before collecting
    n_envs = model.n_envs
    for obs, act, rew, nxt, term, trunc in _random_walk(obs_dim, act_dim, fill, n_envs, cfg.seed):
        infos = [{"TimeLimit.truncated": bool(t)} for t in trunc]
        model.replay_buffer.add(obs, nxt, act, rew, np.logical_or(term, trunc), infos)
    batch = cfg.agent.batch_size

    def run(n: int) -> None:
        model.train(gradient_steps=n, batch_size=batch)
        _sync(device)

    return run, notes


def _timed(fn: Callable[[int], None], n: int) -> float:
    t0 = time.perf_counter()
    fn(n)
    return n / (time.perf_counter() - t0)


def bench_updates(
    cfg: Config,
    device: torch.device,
    *,
    updates: int,
    rounds: int,
    warmup: int,
    with_sb3: bool,
) -> dict[str, Any]:
    """Updates/s, ours and SB3's, in alternating chunks of ``updates`` (ABBA order)."""
    obs_dim, act_dim = _dims(cfg)
    fill = max(10 * cfg.agent.batch_size, 10_000)
    runners: dict[str, Callable[[int], None]] = {}
    notes: list[str] = []
    t0 = time.perf_counter()
    runners["ours"] = _our_update_runner(cfg, device, obs_dim, act_dim, fill)
    runners["ours"](warmup)  # includes torch.compile when it is on
    first_s = time.perf_counter() - t0
    if with_sb3:
        runners["sb3"], notes = _sb3_update_runner(cfg, device, obs_dim, act_dim, fill)
        runners["sb3"](warmup)
    rates: dict[str, list[float]] = {k: [] for k in runners}
    order = list(runners)
    for r in range(rounds):
        for name in order if r % 2 == 0 else order[::-1]:
            rates[name].append(_timed(runners[name], updates))
    out: dict[str, Any] = {
        "chunk_updates": updates,
        "rounds": rounds,
        "ours_updates_per_s": _r(statistics.median(rates["ours"])),
        "ours_ms_per_update": _r(1000 / statistics.median(rates["ours"]), 2),
        "ours_rounds": [_r(x) for x in rates["ours"]],
        "ours_setup_and_warmup_s": _r(first_s, 2),
    }
    if with_sb3:
        out["sb3_updates_per_s"] = _r(statistics.median(rates["sb3"]))
        out["sb3_ms_per_update"] = _r(1000 / statistics.median(rates["sb3"]), 2)
        out["sb3_rounds"] = [_r(x) for x in rates["sb3"]]
        out["ratio_ours_to_sb3"] = _r(out["ours_updates_per_s"] / out["sb3_updates_per_s"], 2)
        if notes:
            out["sb3_notes"] = notes
    return out


# ----------------------------------------------------------------------------- env


def env_step_rate(cfg: Config, steps: int) -> dict[str, Any]:
    """Raw env steps/s with random actions and the run's vector-env setting."""
    e = cfg.env
    envs = envs_mod.make_vec_env(
        e.id, e.n_envs, vectorization=e.vectorization, seed=cfg.seed, **_env_kw(cfg)
    )
    try:
        envs.reset(seed=cfg.seed)
        for _ in range(10):
            envs.step(envs.action_space.sample())
        vec_steps = max(1, steps // e.n_envs)
        t0 = time.perf_counter()
        for _ in range(vec_steps):
            envs.step(envs.action_space.sample())
        elapsed = time.perf_counter() - t0
    finally:
        envs.close()
    return {
        "steps": vec_steps * e.n_envs,
        "raw_steps_per_s": _r(vec_steps * e.n_envs / elapsed),
    }


# ----------------------------------------------------------------------------- end to end


class TimedTracker:
    """Wraps a tracker and adds up the wall time spent inside its calls."""

    def __init__(self, inner: Tracker):
        self.inner = inner
        self.seconds: dict[str, float] = {}

    @property
    def run_id(self) -> str | None:  # type: ignore[override]
        return self.inner.run_id

    @contextlib.contextmanager
    def _clock(self, name: str) -> Iterator[None]:
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - t0

    def total(self) -> float:
        return sum(self.seconds.values())

    def start(self, *, params: Mapping[str, Any], tags: Mapping[str, str]) -> str | None:
        with self._clock("start"):
            return self.inner.start(params=params, tags=tags)

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        with self._clock("log_metrics"):
            self.inner.log_metrics(metrics, step)

    def log_artifact(self, local_path: str | Path, artifact_path: str | None = None) -> None:
        with self._clock("artifacts"):
            self.inner.log_artifact(local_path, artifact_path)

    def log_artifacts(self, local_dir: str | Path, artifact_path: str | None = None) -> None:
        with self._clock("artifacts"):
            self.inner.log_artifacts(local_dir, artifact_path)

    def log_text(self, text: str, artifact_file: str) -> None:
        with self._clock("artifacts"):
            self.inner.log_text(text, artifact_file)

    def log_figure(self, fig: Any, artifact_file: str) -> None:
        with self._clock("artifacts"):
            self.inner.log_figure(fig, artifact_file)

    def set_tags(self, tags: Mapping[str, str]) -> None:
        with self._clock("tags"):
            self.inner.set_tags(tags)

    def flush(self) -> None:
        with self._clock("flush"):
            self.inner.flush()

    def end(self, status: str = "FINISHED", reason: str | None = None) -> str | None:
        with self._clock("end"):
            return self.inner.end(status, reason)


def _ours_end_to_end(cfg: Config) -> dict[str, Any]:
    from workbench.train import run_name, train

    inner = make_tracker(cfg.tracking, run_name=run_name(cfg))
    tracker = TimedTracker(inner)
    t0 = time.perf_counter()
    result = train(cfg, tracker, tags={BENCH_TAG: "true"})  # type: ignore[arg-type]
    wall = time.perf_counter() - t0
    perf = result.perf
    train_loop = perf["loop_s"] - perf["loop_eval_s"]
    eval_s = perf["loop_eval_s"] + perf["final_eval_s"]
    in_loop = tracker.seconds.get("log_metrics", 0.0)
    return {
        "steps": result.steps,
        "updates": int(perf["updates"]),
        "wall_s": _r(wall, 2),
        "sps": _r(result.steps / wall),
        "training_loop_s": _r(train_loop, 2),
        "sps_training_loop": _r(result.steps / train_loop),
        "tracking_s": _r(tracker.total(), 3),
        "tracking_share": round(tracker.total() / wall, 4),
        "tracking_loop_s": _r(in_loop, 3),
        "tracking_share_loop": round(in_loop / perf["loop_s"], 4),
        "tracking_by_call_s": {k: _r(v, 3) for k, v in sorted(tracker.seconds.items())},
        "eval_s": _r(eval_s, 2),
        "eval_share": round(eval_s / wall, 4),
        "replay_nbytes": int(perf["replay_nbytes"]),
        "final_return_mean": _r(result.final_return_mean, 2),
    }


def _sb3_end_to_end(cfg: Config, device: torch.device) -> dict[str, Any]:
    env = _sb3_env(cfg)
    model, _ = sb3_model(cfg, device, env)
    t0 = time.perf_counter()
    model.learn(total_timesteps=cfg.total_steps)
    learn_s = time.perf_counter() - t0
    model.get_env().close()
    return {
        "steps": int(model.num_timesteps),
        "learn_s": _r(learn_s, 2),
        "sps": _r(model.num_timesteps / learn_s),
    }


def _init_store(cfg: Config) -> None:
    """Create the (temporary) MLflow store once, as a user's store already exists."""
    if cfg.tracking.backend != "mlflow":
        return
    tracker = make_tracker(cfg.tracking, run_name="bench-store-init")
    tracker.start(params={}, tags={})
    tracker.end("FINISHED")


def bench_end_to_end(
    cfg: Config, device: torch.device, *, rounds: int, with_sb3: bool
) -> dict[str, Any]:
    """``train()`` for ``total_steps`` and SB3's ``learn()``, in ABBA order over rounds.

    Rates are pooled over rounds (all steps / all time), so load that drifts during the
    minutes a run takes weighs on both sides alike when there are two rounds or more.
    """
    _init_store(cfg)
    runs: dict[str, list[dict[str, Any]]] = {"ours": [], "sb3": []}
    jobs: list[tuple[str, Callable[[], dict[str, Any]]]] = [("ours", lambda: _ours_end_to_end(cfg))]
    if with_sb3:
        jobs.append(("sb3", lambda: _sb3_end_to_end(cfg, device)))
    for r in range(rounds):
        for name, job in jobs if r % 2 == 0 else jobs[::-1]:
            runs[name].append(job())

    def pooled(name: str, time_key: str) -> float:
        return sum(run["steps"] for run in runs[name]) / sum(run[time_key] for run in runs[name])

    out: dict[str, Any] = {"rounds": rounds}
    out["ours"] = runs["ours"][0] if rounds == 1 else {"runs": runs["ours"]}
    out["ours"]["sps_training_loop_pooled"] = _r(pooled("ours", "training_loop_s"))
    if with_sb3:
        out["sb3"] = runs["sb3"][0] if rounds == 1 else {"runs": runs["sb3"]}
        out["sb3"]["sps_pooled"] = _r(pooled("sb3", "learn_s"))
        # like for like: our collect/store/update/report loop against SB3's learn()
        ratio = pooled("ours", "training_loop_s") / pooled("sb3", "learn_s")
        out["ratio_ours_to_sb3"] = _r(ratio, 2)
        out["ratio_basis"] = (
            "ours: steps / training loop time (evaluation excluded); sb3: steps / learn() time"
        )
    return out


# ----------------------------------------------------------------------------- population


def _side(results: Sequence[Any], loop_s: float, wall: float) -> dict[str, Any]:
    """One side's figures for one round: K runs' steps and updates, and the training loop's
    time (``loop_s``, evaluation excluded) next to the whole call's wall time."""
    steps = sum(r.steps for r in results)
    updates = sum(int(r.perf["updates"]) for r in results)
    return {
        "steps": steps,
        "updates": updates,
        "training_loop_s": _r(loop_s, 3),
        "wall_s": _r(wall, 3),
        "eval_s": _r(sum(r.perf["loop_eval_s"] + r.perf["final_eval_s"] for r in results), 3),
        "finished": sum(r.status == "FINISHED" for r in results),
        "sps_training_loop": _r(steps / loop_s),
        "updates_per_s_training_loop": _r(updates / loop_s),
    }


def _population_round(configs: Sequence[Config]) -> dict[str, Any]:
    """The K configs as one population. Its members share one loop: each member's
    ``loop_s`` covers all of it, every member's periodic evaluation included, so the
    training loop is the longest member's ``loop_s`` less all members' ``loop_eval_s``."""
    from workbench.train import Member, run_name, train_population

    members = [
        Member(c, make_tracker(c.tracking, run_name=run_name(c)), tags={BENCH_TAG: "true"})
        for c in configs
    ]
    t0 = time.perf_counter()
    results = train_population(members)
    wall = time.perf_counter() - t0
    loop = max(r.perf["loop_s"] for r in results) - sum(r.perf["loop_eval_s"] for r in results)
    return _side(results, loop, wall)


def _sequential_round(configs: Sequence[Config]) -> dict[str, Any]:
    """The same K configs, one ``train()`` after another: the sum of their training loops."""
    from workbench.train import run_name, train

    results = []
    t0 = time.perf_counter()
    for c in configs:
        tracker = make_tracker(c.tracking, run_name=run_name(c))
        results.append(train(c, tracker, tags={BENCH_TAG: "true"}))
    wall = time.perf_counter() - t0
    loop = sum(r.perf["loop_s"] - r.perf["loop_eval_s"] for r in results)
    return _side(results, loop, wall)


def bench_population(cfg: Config, k: int, *, rounds: int) -> dict[str, Any]:
    """K members (``cfg`` with seeds 0..K-1) as one population against the same K runs one
    after another, in ABBA order over ``rounds``; rates pooled over rounds (all steps / all
    time), so drifting load weighs on both sides alike."""
    if k < 1:
        raise ValueError(f"population={k}: must be at least 1")
    if rounds < 1:
        raise ValueError(f"rounds={rounds}: must be at least 1")
    _init_store(cfg)
    configs = [dataclasses.replace(cfg, seed=seed) for seed in range(k)]
    runs: dict[str, list[dict[str, Any]]] = {"population": [], "sequential": []}
    jobs: list[tuple[str, Callable[[], dict[str, Any]]]] = [
        ("population", lambda: _population_round(configs)),
        ("sequential", lambda: _sequential_round(configs)),
    ]
    for r in range(rounds):
        for name, job in jobs if r % 2 == 0 else jobs[::-1]:
            runs[name].append(job())

    def pooled(name: str, count: str, time_key: str) -> float:
        return sum(x[count] for x in runs[name]) / sum(x[time_key] for x in runs[name])

    out: dict[str, Any] = {"k": k, "rounds": rounds, "seeds": list(range(k))}
    for name in runs:
        out[name] = {
            "runs": runs[name],
            "sps_training_loop_pooled": _r(pooled(name, "steps", "training_loop_s")),
            "updates_per_s_training_loop_pooled": _r(pooled(name, "updates", "training_loop_s")),
            "sps_wall_pooled": _r(pooled(name, "steps", "wall_s")),
        }
    pop, seq = out["population"], out["sequential"]
    out["ratio_vs_sequential"] = _r(
        pop["sps_training_loop_pooled"] / seq["sps_training_loop_pooled"], 2
    )
    out["ratio_basis"] = (
        "aggregate env steps/s of the training loop (evaluation excluded): population over "
        "K sequential runs at identical settings"
    )
    out["ratio_updates_vs_sequential"] = _r(
        pop["updates_per_s_training_loop_pooled"] / seq["updates_per_s_training_loop_pooled"], 2
    )
    out["ratio_wall_vs_sequential"] = _r(pop["sps_wall_pooled"] / seq["sps_wall_pooled"], 2)
    out["ratio_wall_basis"] = (
        "aggregate env steps / whole wall time (setup, evaluation, tracking included)"
    )
    return out


def _compose(overrides: Sequence[str], store: str) -> tuple[Config, torch.device]:
    """The benchmarked config (tracking into ``store``) and its device; threads set."""
    from workbench.train import resolve_device

    cfg = compose([*BENCH_DEFAULTS, f"tracking.dir={store}/mlruns", *overrides])
    if cfg.torch_threads is not None:
        torch.set_num_threads(cfg.torch_threads)
    return cfg, resolve_device(cfg.device)


def _settings(cfg: Config, device: torch.device, overrides: Sequence[str]) -> dict[str, Any]:
    """The settings a benchmark's numbers were measured at."""
    obs_dim, act_dim = _dims(cfg)
    a = cfg.agent
    return {
        "env_id": cfg.env.id,
        "obs_dim": obs_dim,
        "action_dim": act_dim,
        "n_envs": cfg.env.n_envs,
        "device": str(device),
        "torch_threads": cfg.torch_threads,
        "actor_hidden": list(a.actor_hidden),
        "critic_hidden": list(a.critic_hidden),
        "batch_size": a.batch_size,
        "n_critics": a.n_critics,
        "total_steps": cfg.total_steps,
        "learning_starts": a.learning_starts,
        "utd": utd(cfg),
        "tracking": cfg.tracking.backend,
        "eval_episodes": cfg.eval.episodes,
        "overrides": list(overrides),
    }


def run_population_bench(
    overrides: Sequence[str] = (), *, k: int, rounds: int = 2
) -> dict[str, Any]:
    """What ``workbench bench --population K`` prints."""

    with tempfile.TemporaryDirectory(prefix="workbench-bench-") as tmp:
        cfg, device = _compose(overrides, tmp)
        out: dict[str, Any] = {
            "bench": "workbench population",
            "machine": machine(),
            "settings": {
                **_settings(cfg, device, overrides),
                "population": k,
                "eval_every": cfg.eval.every,
            },
        }
        out["population"] = bench_population(cfg, k, rounds=rounds)
    return out


# ----------------------------------------------------------------------------- replay


def replay_footprint(cfg: Config, obs_dim: int, act_dim: int) -> dict[str, Any]:
    compact = cfg.perf.replay_compact
    cls: type[ReplayBuffer] = CompactReplayBuffer if compact else ReplayBuffer
    per = cls.bytes_per_transition(obs_dim, act_dim)
    cap = cfg.agent.buffer_size
    hc_obs, hc_act = HALFCHEETAH_DIMS
    return {
        "compact": compact,
        "bytes_per_transition": per,
        "capacity": cap,
        "footprint_bytes": per * cap,
        "footprint_mb": _r(per * cap / 1e6),
        "note": "compact: + 4 x obs_dim bytes per episode end (true final observations)"
        if compact
        else "obs and next obs stored in full",
        "sb3_bytes_per_transition": sb3_bytes_per_transition(obs_dim, act_dim),
        "halfcheetah_1m_mb": {
            "compact": _r(CompactReplayBuffer.bytes_per_transition(hc_obs, hc_act)),
            "plain": _r(ReplayBuffer.bytes_per_transition(hc_obs, hc_act)),
            "sb3": _r(sb3_bytes_per_transition(hc_obs, hc_act)),
        },
    }


# ----------------------------------------------------------------------------- main


def run_bench(
    overrides: Sequence[str] = (),
    *,
    updates: int = 200,
    rounds: int = 5,
    warmup: int = 50,
    env_steps: int = 5000,
    e2e: bool = True,
    e2e_rounds: int = 2,
    sb3: str = "auto",
) -> dict[str, Any]:
    """Everything ``workbench bench`` prints. ``sb3``: auto (if installed), yes, no."""

    if sb3 not in ("auto", "yes", "no"):
        raise ValueError(f"sb3={sb3!r}: must be auto, yes or no")
    if sb3 == "yes" and not sb3_available():
        raise ValueError("sb3=yes: stable-baselines3 is not installed (pip install -e '.[bench]')")
    with_sb3 = sb3 != "no" and sb3_available()
    with tempfile.TemporaryDirectory(prefix="workbench-bench-") as tmp:
        cfg, device = _compose(overrides, tmp)
        obs_dim, act_dim = _dims(cfg)
        out: dict[str, Any] = {
            "bench": "workbench",
            "machine": machine(),
            "settings": {
                **_settings(cfg, device, overrides),
                "vectorization": cfg.env.vectorization,
                "log_every": cfg.tracking.log_every,
                "perf": to_dict(cfg)["perf"],
            },
            "sb3": {"available": sb3_available(), "compared": with_sb3},
        }
        if with_sb3:
            import stable_baselines3

            out["sb3"]["version"] = stable_baselines3.__version__
        out["update"] = bench_updates(
            cfg, device, updates=updates, rounds=rounds, warmup=warmup, with_sb3=with_sb3
        )
        out["env"] = env_step_rate(cfg, env_steps)
        if e2e:
            end = bench_end_to_end(cfg, device, rounds=e2e_rounds, with_sb3=with_sb3)
            sps_loop = end["ours"]["sps_training_loop_pooled"]
            end["sps_fraction_of_raw_env"] = round(sps_loop / out["env"]["raw_steps_per_s"], 3)
            out["end_to_end"] = end
        out["replay"] = replay_footprint(cfg, obs_dim, act_dim)
    return out
