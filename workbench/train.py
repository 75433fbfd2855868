"""The training loop: ``train(cfg, tracker, hooks) -> RunResult``.

One flat loop — collect, store, update, evaluate, report — that ``workbench train``, study
trials and ablation runs all call. The MLflow run it reports to always ends: FINISHED,
FAILED with the reason, or KILLED (interrupt, or a hook that stops the run early).
"""

from __future__ import annotations

import logging
import math
import random
import signal
import tempfile
import threading
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from omegaconf import OmegaConf

from workbench import envs as envs_mod
from workbench.checkpoint import (
    RunLock,
    check_compatible,
    checkpoint_dir,
    prepare_resume,
    save_checkpoint,
)
from workbench.config import Config, config_hash, flatten, to_dict, validate
from workbench.ddpg import DDPG
from workbench.display import ProgressDisplay
from workbench.evaluate import evaluate
from workbench.exploration import Explorer
from workbench.policy import ARTIFACT_DIR, save_policy
from workbench.replay import make_replay_buffer
from workbench.tracking import NullTracker, Tracker, git_info, make_tracker
from workbench.tracking.status import StopRun

log = logging.getLogger(__name__)

EVAL_SEED_OFFSET = 10_000  # evaluation episodes never share seeds with training


class Hook(Protocol):
    """Called after every evaluation; raise StopRun to end the run early (e.g. pruning)."""

    def on_evaluation(self, step: int, metrics: Mapping[str, float], agent: DDPG) -> None: ...


class DivergenceError(RuntimeError):
    """A loss, Q value or action became NaN or infinite."""


class Interrupted(KeyboardInterrupt):
    """SIGINT/SIGTERM stopped the run after it wrote a checkpoint to resume from."""

    def __init__(self, reason: str, checkpoint: Path | None):
        super().__init__(reason)
        self.reason = reason
        self.checkpoint = checkpoint


class _Interrupts:
    """First SIGINT/SIGTERM: ask the loop to checkpoint and stop. Second: stop at once.

    Installed only where asked (``workbench train``, ablation workers) and only in the main
    thread. A signal within a second of the first counts as the same interrupt: a terminal's
    Ctrl-C reaches a worker both directly and forwarded by its parent (workbench.parallel).
    """

    SAME_INTERRUPT_S = 1.0

    def __init__(self, enabled: bool):
        self.enabled = enabled and threading.current_thread() is threading.main_thread()
        self.signum: int | None = None
        self.at = 0.0
        self._old: dict[int, Any] = {}

    def __enter__(self) -> _Interrupts:
        if self.enabled:
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._old[sig] = signal.getsignal(sig)
                signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._old.items():
            signal.signal(sig, handler)
        self._old.clear()

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name if self.signum is not None else ""

    def _handle(self, signum: int, _frame: Any) -> None:
        if self.signum is not None:
            if time.monotonic() - self.at < self.SAME_INTERRUPT_S:
                return  # one Ctrl-C reaching us twice: from the terminal and from a parent
            raise KeyboardInterrupt(f"second signal ({signal.Signals(signum).name})")
        self.signum, self.at = signum, time.monotonic()
        log.warning(
            "%s: writing a checkpoint at the next episode boundary, then stopping "
            "(send it again to stop at once, without a new checkpoint)",
            signal.Signals(signum).name,
        )

    def waited(self, seconds: float) -> bool:
        return self.signum is not None and time.monotonic() - self.at >= seconds


@dataclass
class RunResult:
    run_id: str | None
    status: str
    steps: int
    final_return_mean: float
    final_return_std: float
    eval_steps: list[int] = field(default_factory=list)
    eval_returns: list[float] = field(default_factory=list)
    eval_stds: list[float] = field(default_factory=list)
    wall_time_s: float = 0.0
    reason: str | None = None
    # where the time went (seconds) and the replay footprint (bytes): see _train
    perf: dict[str, float] = field(default_factory=dict)


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(f"device={device!r}: CUDA is not available on this machine")
    return torch.device(device)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


class _MetricMeans:
    """Running sums of update metrics kept on the device; one host read per log point."""

    def __init__(self) -> None:
        self.sums: dict[str, torch.Tensor] = {}
        self.counts: dict[str, int] = {}

    def add(self, metrics: Mapping[str, torch.Tensor]) -> None:
        for key, value in metrics.items():
            if key in self.sums:
                self.sums[key] += value
                self.counts[key] += 1
            else:
                self.sums[key] = value.clone()
                self.counts[key] = 1

    def pop(self) -> dict[str, float]:
        if not self.sums:
            return {}
        keys = list(self.sums)
        values = torch.stack([self.sums[k] for k in keys]).tolist()
        out = {k: v / self.counts[k] for k, v in zip(keys, values, strict=True)}
        self.sums.clear()
        self.counts.clear()
        return out

    def state_dict(self) -> dict[str, Any]:
        return {"sums": {k: v.clone() for k, v in self.sums.items()}, "counts": dict(self.counts)}

    def load_state_dict(self, state: Mapping[str, Any], device: torch.device) -> None:
        # floats too: a run may resume with the other perf.device_metrics setting
        self.sums = {
            k: torch.as_tensor(v, dtype=torch.float32, device=device)
            for k, v in state["sums"].items()
        }
        self.counts = dict(state["counts"])


class _HostMetricMeans:
    """The plain path (``perf.device_metrics=false``): read every metric at every update."""

    def __init__(self) -> None:
        self.sums: dict[str, float] = {}
        self.counts: dict[str, int] = {}

    def add(self, metrics: Mapping[str, torch.Tensor]) -> None:
        for key, value in metrics.items():
            self.sums[key] = self.sums.get(key, 0.0) + value.item()
            self.counts[key] = self.counts.get(key, 0) + 1

    def pop(self) -> dict[str, float]:
        out = {k: v / self.counts[k] for k, v in self.sums.items()}
        self.sums.clear()
        self.counts.clear()
        return out

    def state_dict(self) -> dict[str, Any]:
        return {"sums": dict(self.sums), "counts": dict(self.counts)}

    def load_state_dict(self, state: Mapping[str, Any], device: torch.device) -> None:
        self.sums = {k: float(v) for k, v in state["sums"].items()}
        self.counts = dict(state["counts"])


class _EnvStepper:
    """``envs.step`` split in two, so an update can run while async workers simulate."""

    def __init__(self, envs: Any, overlap: bool):
        self.envs, self.overlap = envs, overlap
        self._actions: np.ndarray | None = None

    def start(self, actions: np.ndarray) -> None:
        if self.overlap:
            self.envs.step_async(actions)
        else:
            self._actions = actions

    def finish(self) -> tuple[Any, ...]:
        if self.overlap:
            return self.envs.step_wait()
        actions, self._actions = self._actions, None
        return self.envs.step(actions)


def overlaps(cfg: Config) -> bool:
    """Whether the loop steps async envs during updates. Only where that changes nothing:
    running statistics (normalize_obs) and parameter noise read the actor or the data of the
    step in flight, so with those the loop waits for the envs first."""
    return (
        cfg.perf.async_overlap
        and cfg.env.vectorization == "async"
        and not cfg.env.normalize_obs
        and cfg.noise.kind != "param"
    )


def build_learner(
    cfg: Config,
    obs_dim: int,
    action_dim: int,
    device: torch.device,
    *,
    buffer_size: int | None = None,
) -> tuple[DDPG, Any]:
    """The agent and its replay buffer as ``cfg`` (agent and perf sections) asks for."""
    a, p = cfg.agent, cfg.perf
    agent = DDPG(
        obs_dim,
        action_dim,
        a,
        device=device,
        normalize_obs=cfg.env.normalize_obs,
        seed=cfg.seed,
        fused=p.fused_update,
        compile=p.compile,
        compile_mode=p.compile_mode,
        cuda_graphs=p.cuda_graphs,
    )
    buffer = make_replay_buffer(
        buffer_size or a.buffer_size,
        obs_dim,
        action_dim,
        device=device,
        seed=cfg.seed,
        compact=p.replay_compact,
        storage=p.replay_storage,
    )
    return agent, buffer


def _rng_states(rng: np.random.Generator) -> dict[str, Any]:
    """Every random stream the loop draws from outside the agent, explorer and buffer."""
    _, keys, pos, has_gauss, cached = np.random.get_state()
    states: dict[str, Any] = {
        "actions": rng.bit_generator.state,
        "python": random.getstate(),
        "numpy": {
            "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def _set_rng_states(rng: np.random.Generator, states: Mapping[str, Any]) -> None:
    rng.bit_generator.state = states["actions"]
    random.setstate(states["python"])
    n = states["numpy"]
    keys = n["keys"].numpy().astype(np.uint32)
    np.random.set_state(("MT19937", keys, n["pos"], n["has_gauss"], n["cached_gaussian"]))
    torch.set_rng_state(states["torch"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def _reset_envs_at(envs: Any, seed: int, episodes: Sequence[int], exact: bool) -> np.ndarray:
    """Put each env back at the start of the episode it was in (``exact``) or of its next."""
    envs.reset(seed=seed)  # each env's base seed, as at the start of the run
    envs.set_attr("episode", [int(k) - 1 if exact else int(k) for k in episodes])
    obs, _ = envs.reset()
    return obs


def _crossed(prev: int, now: int, every: int) -> bool:
    return every > 0 and now // every > prev // every


def run_name(cfg: Config) -> str:
    return cfg.tracking.run_name or f"{cfg.agent.name}-{cfg.env.name}-s{cfg.seed}"


def run_tags(cfg: Config, device: torch.device, extra: Mapping[str, str] | None) -> dict[str, str]:
    tags = {
        "workbench.config_hash": config_hash(cfg),
        "workbench.seed": str(cfg.seed),
        "workbench.device": str(device),
        "workbench.env_id": cfg.env.id,
        "workbench.agent": cfg.agent.name,
        **git_info(),
        **{k: str(v) for k, v in cfg.tracking.tags.items()},
    }
    tags.update(extra or {})
    return tags


def train(
    cfg: Config,
    tracker: Tracker | None = None,
    hooks: Sequence[Hook] = (),
    *,
    tags: Mapping[str, str] | None = None,
    resume_state: Mapping[str, Any] | None = None,
    handle_signals: bool = False,
) -> RunResult:
    """Train one DDPG/TD3 agent as ``cfg`` says and report everything to ``tracker``.

    With ``cfg.resume`` set, the run continues from its latest checkpoint (``resume_state``
    when the caller has loaded it already, see ``checkpoint.prepare_resume``).
    ``handle_signals``: the first SIGINT/SIGTERM writes a checkpoint and ends the run KILLED.
    """
    if cfg.resume is not None and resume_state is None:
        cfg, resume_state = prepare_resume(cfg, ())
    validate(cfg)
    device = resolve_device(cfg.device)
    if cfg.torch_threads is not None:
        torch.set_num_threads(cfg.torch_threads)
    seed_everything(cfg.seed)

    # Everything that can fail on bad input happens before the tracker's run exists.
    e = cfg.env
    env_kw = {
        "max_episode_steps": e.max_episode_steps,
        "time_feature": e.time_feature,
        "env_kwargs": dict(e.kwargs),
    }
    envs = envs_mod.make_vec_env(
        e.id, e.n_envs, vectorization=e.vectorization, seed=cfg.seed, **env_kw
    )
    try:
        eval_env = envs_mod.make_env(
            e.id, render_mode="rgb_array" if cfg.eval.video else None, **env_kw
        )
    except Exception:
        envs.close()
        raise
    lock: RunLock | None = None
    try:
        if resume_state is not None:
            assert cfg.resume is not None
            lock = RunLock(checkpoint_dir(cfg.checkpoint.dir, cfg.resume))
            lock.acquire()  # refuses a run that is still training elsewhere
        tracker = tracker or make_tracker(
            cfg.tracking,
            run_name=run_name(cfg),
            resume_run_id=cfg.resume if resume_state is not None else None,
        )
        return _train(
            cfg, tracker, hooks, device, envs, eval_env, tags, resume_state, lock, handle_signals
        )
    finally:
        envs.close()
        eval_env.close()
        if lock is not None:
            lock.release()


def _train(
    cfg: Config,
    tracker: Tracker,
    hooks: Sequence[Hook],
    device: torch.device,
    envs: Any,
    eval_env: Any,
    extra_tags: Mapping[str, str] | None,
    resume_state: Mapping[str, Any] | None,
    lock: RunLock | None,
    handle_signals: bool,
) -> RunResult:
    a, e, ck = cfg.agent, cfg.env, cfg.checkpoint
    obs_dim = int(np.prod(envs.single_observation_space.shape))
    action_dim = int(np.prod(envs.single_action_space.shape))
    low = envs.single_action_space.low.astype(np.float32)
    high = envs.single_action_space.high.astype(np.float32)
    if not (np.all(np.isfinite(low)) and np.all(np.isfinite(high))):
        raise ValueError(f"env.id={e.id!r}: DDPG needs a bounded action space, got {low}..{high}")

    shapes = {"config_hash": config_hash(cfg), "obs_dim": obs_dim, "action_dim": action_dim}
    if resume_state is not None:
        check_compatible(dict(resume_state), shapes)
        extra_tags = {**(extra_tags or {}), "workbench.resumed_at_step": str(resume_state["step"])}

    config_tree = to_dict(cfg)
    config_tree["resume"] = None  # the run's config, not how this process was started
    tracker.start(params=flatten(config_tree), tags=run_tags(cfg, device, extra_tags))
    tracker.log_text(OmegaConf.to_yaml(config_tree), "config.yaml")

    t_start = time.perf_counter()
    step = 0
    if tracker.run_id is not None:
        log.info("MLflow run %s (%s)", tracker.run_id, "resumed" if resume_state else "new")
    result = RunResult(tracker.run_id, "RUNNING", 0, math.nan, math.nan)
    perf = result.perf
    perf.update(loop_s=0.0, loop_eval_s=0.0, final_s=0.0, final_eval_s=0.0, updates=0.0)
    display = ProgressDisplay(cfg.total_steps, enabled=cfg.progress)
    # checkpoints go to <checkpoint.dir>/<run id> (a made-up id when nothing is tracked)
    run_key = cfg.resume or tracker.run_id or uuid.uuid4().hex
    ckpt_lock = lock or RunLock(checkpoint_dir(ck.dir, run_key))
    last_ckpt: Path | None = None
    try:
        p = cfg.perf
        agent, buffer = build_learner(cfg, obs_dim, action_dim, device)
        perf["replay_nbytes"] = float(buffer.nbytes)
        explorer = Explorer(
            cfg.noise,
            cfg.schedule,
            cfg.epsilon,
            total_steps=cfg.total_steps,
            n_envs=e.n_envs,
            action_dim=action_dim,
            actor=agent.actor,
            seed=cfg.seed,
        )
        rng = np.random.default_rng(cfg.seed)
        means: _MetricMeans | _HostMetricMeans = (
            _MetricMeans() if p.device_metrics else _HostMetricMeans()
        )
        overlap = overlaps(cfg)
        stepper = _EnvStepper(envs, overlap)
        train_curve: tuple[list[int], list[float]] = ([], [])

        def to_env(actions: np.ndarray) -> np.ndarray:
            return low + (actions + 1.0) * 0.5 * (high - low)

        def policy_fn(obs: np.ndarray) -> np.ndarray:
            x = torch.as_tensor(obs, dtype=torch.float32, device=device).reshape(1, -1)
            return to_env(agent.act(x)[0].cpu().numpy())

        def run_eval(video_path: Path | None = None, *, final: bool = False) -> dict[str, float]:
            t0 = time.perf_counter()
            res = evaluate(
                policy_fn,
                eval_env,
                cfg.eval.episodes,
                seed=cfg.seed + EVAL_SEED_OFFSET,
                video_path=video_path,
                video_max_frames=cfg.eval.video_max_frames,
                fps=cfg.eval.video_fps,
            )
            metrics = res.metrics()
            perf["final_eval_s" if final else "loop_eval_s"] += time.perf_counter() - t0
            if not math.isfinite(metrics["eval/return_mean"]):
                raise DivergenceError(f"evaluation return is {metrics['eval/return_mean']}")
            tracker.log_metrics(metrics, step)
            result.eval_steps.append(step)
            result.eval_returns.append(metrics["eval/return_mean"])
            result.eval_stds.append(metrics["eval/return_std"])
            result.final_return_mean = metrics["eval/return_mean"]
            result.final_return_std = metrics["eval/return_std"]
            display.update(step, last_eval=metrics["eval/return_mean"])
            log.info(
                "step %d: eval return %.1f +- %.1f (%.1fs)",
                step,
                metrics["eval/return_mean"],
                metrics["eval/return_std"],
                time.perf_counter() - t0,
            )
            if res.video_path is not None:
                tracker.log_artifact(res.video_path, "video")
            return metrics

        last_log_step, last_log_time, updates_since_log = 0, time.perf_counter(), 0
        n_vec_steps = 0
        if resume_state is None:
            obs, _ = envs.reset(seed=cfg.seed)
            agent.obs_norm.update(obs)
        else:
            r = resume_state
            agent.load_state_dict(r["agent"])
            buffer.load_state_dict(r["replay"])
            explorer.load_state_dict(r["explorer"])
            means.load_state_dict(r["metric_means"], device)
            _set_rng_states(rng, r["rng"])
            c = r["counters"]
            step, n_vec_steps = int(c["step"]), int(c["n_vec_steps"])
            last_log_step, updates_since_log = int(c["last_log_step"]), int(c["updates_since_log"])
            perf["updates"] = float(c["updates"])
            h = r["history"]
            result.eval_steps[:], result.eval_returns[:] = h["eval_steps"], h["eval_returns"]
            result.eval_stds[:] = h["eval_stds"]
            if result.eval_returns:
                result.final_return_mean = result.eval_returns[-1]
                result.final_return_std = result.eval_stds[-1]
            train_curve[0][:], train_curve[1][:] = h["train_steps"], h["train_returns"]
            obs = _reset_envs_at(envs, cfg.seed, r["env_episodes"], r["exact"])
            if not r["exact"]:  # the interrupted episodes start afresh
                agent.obs_norm.update(obs)
                explorer.on_episode_end(agent.actor, np.ones(e.n_envs, dtype=bool))
                log.warning(
                    "resuming from a mid-episode checkpoint: the episodes in progress at step "
                    "%d start afresh, so this run will not match an uninterrupted one",
                    step,
                )
            log.info("resumed run %s at step %d", cfg.resume, step)
            display.advance(step)

        # checkpoints: every ck.every steps and on an interrupt, at an episode boundary
        pending: int | None = None  # vector step a checkpoint was asked at

        def write_checkpoint(exact: bool) -> Path:
            t0 = time.perf_counter()
            if not ckpt_lock.directory.is_dir():
                tracker.set_tags({"workbench.checkpoint_dir": str(ckpt_lock.directory)})
            ckpt_lock.acquire()
            state = {
                **shapes,
                "run_id": run_key,
                "config": to_dict(cfg),
                "exact": exact,
                "counters": {
                    "step": step,
                    "n_vec_steps": n_vec_steps,
                    "last_log_step": last_log_step,
                    "updates_since_log": updates_since_log,
                    "updates": int(perf["updates"]),
                },
                "agent": agent.state_dict(),
                "replay": buffer.state_dict(),
                "explorer": explorer.state_dict(),
                "metric_means": means.state_dict(),
                "rng": _rng_states(rng),
                "env_episodes": [int(k) for k in envs.get_attr("episode")],
                "history": {
                    "eval_steps": list(result.eval_steps),
                    "eval_returns": list(result.eval_returns),
                    "eval_stds": list(result.eval_stds),
                    "train_steps": list(train_curve[0]),
                    "train_returns": list(train_curve[1]),
                },
            }
            # what was logged up to here is in the store before the checkpoint exists, so a
            # run resumed from it after a hard kill has lost no metric point
            tracker.flush()
            path = save_checkpoint(state, ckpt_lock.directory, step, keep=ck.keep)
            perf["checkpoint_s"] = perf.get("checkpoint_s", 0.0) + time.perf_counter() - t0
            log.info(
                "step %d: checkpoint %s (%s, %.1fs)",
                step,
                path,
                "episode boundary" if exact else "mid-episode",
                time.perf_counter() - t0,
            )
            return path

        t_loop = time.perf_counter()
        interrupts = _Interrupts(handle_signals)
        with interrupts:
            while step < cfg.total_steps:
                # collect
                if step < a.learning_starts:
                    actions = rng.uniform(-1.0, 1.0, size=(e.n_envs, action_dim)).astype(np.float32)
                else:
                    obs_t = torch.as_tensor(obs, dtype=torch.float32, device=device)
                    actions = explorer.act(agent.actor, agent.obs_norm(obs_t), step)
                    if not np.isfinite(actions).all():
                        raise DivergenceError(
                            f"non-finite action {actions.tolist()} at step {step}"
                        )
                learn = (
                    step + e.n_envs >= a.learning_starts
                    and (n_vec_steps + 1) % a.train_freq == 0
                    and a.gradient_steps > 0
                )
                stepper.start(to_env(actions))
                # Updates whose batch does not touch the rows this step will write can run
                # while the envs simulate: the batch, and so the update, is the same.
                early, held = 0, None
                while overlap and learn and early < a.gradient_steps:
                    idx = buffer.sample_indices(a.batch_size, upcoming=e.n_envs)
                    if buffer.hits_pending(idx, e.n_envs):
                        held = idx
                        break
                    means.add(agent.update(buffer.gather(idx)))
                    early += 1
                next_obs, rewards, terminated, truncated, infos = stepper.finish()
                buffer.add(
                    obs,
                    actions,
                    rewards,
                    envs_mod.real_next_obs(next_obs, infos),
                    terminated,
                    truncated,
                )
                prev_step, step, n_vec_steps = step, step + e.n_envs, n_vec_steps + 1
                for _, ep_return, ep_length in envs_mod.finished_episodes(infos):
                    tracker.log_metrics(
                        {"train/episode_return": ep_return, "train/episode_length": ep_length}, step
                    )
                    train_curve[0].append(step)
                    train_curve[1].append(ep_return)
                    display.update(step, last_return=ep_return)
                done = np.logical_or(terminated, truncated)
                if done.any():
                    explorer.on_episode_end(agent.actor, done)
                obs = next_obs
                agent.obs_norm.update(obs)

                # learn
                if learn:
                    batch = None
                    for _ in range(a.gradient_steps - early):
                        idx = held if held is not None else buffer.sample_indices(a.batch_size)
                        held = None
                        batch = buffer.gather(idx)
                        means.add(agent.update(batch))
                    updates_since_log += a.gradient_steps
                    perf["updates"] += a.gradient_steps
                    if batch is not None and cfg.noise.kind == "param":
                        explorer.adapt(agent.actor, agent.obs_norm(batch.obs), step)

                # report
                if _crossed(prev_step, step, cfg.tracking.log_every):
                    now = time.perf_counter()
                    metrics = means.pop()
                    bad = [k for k, v in metrics.items() if not math.isfinite(v)]
                    if bad:
                        values = ", ".join(f"{k}={metrics[k]}" for k in bad)
                        raise DivergenceError(f"non-finite {values} at step {step}")
                    elapsed = max(now - last_log_time, 1e-9)
                    metrics["perf/sps"] = (step - last_log_step) / elapsed
                    metrics["perf/updates_per_s"] = updates_since_log / elapsed
                    metrics.update(explorer.metrics(step))
                    tracker.log_metrics(metrics, step)
                    display.update(step, sps=metrics["perf/sps"])
                    last_log_step, last_log_time, updates_since_log = step, now, 0
                display.advance(step)

                if _crossed(prev_step, step, cfg.eval.every) and step < cfg.total_steps:
                    eval_metrics = run_eval()
                    for hook in hooks:
                        hook.on_evaluation(step, eval_metrics, agent)

                # checkpoint: asked for every ck.every steps or by an interrupt; written when
                # every env has just ended an episode (exact resume) or once waiting is over
                if step >= cfg.total_steps:
                    continue  # the run is done: nothing left to resume
                if pending is None and (
                    _crossed(prev_step, step, ck.every) or interrupts.signum is not None
                ):
                    pending = n_vec_steps
                if pending is not None:
                    boundary = bool(done.all())
                    late = n_vec_steps - pending >= ck.wait_steps or interrupts.waited(ck.wait_s)
                    if boundary or late:
                        last_ckpt = write_checkpoint(exact=boundary)
                        pending = None
                        if interrupts.signum is not None:
                            raise Interrupted(
                                f"interrupted ({interrupts.name}) at step {step}; checkpoint "
                                f"written: continue with `workbench train resume={run_key}`",
                                last_ckpt,
                            )

        perf["loop_s"] = time.perf_counter() - t_loop
        perf["replay_nbytes"] = float(buffer.nbytes)  # the side store grows with episodes
        t_final = time.perf_counter()
        # final evaluation, with a video where the env renders
        with tempfile.TemporaryDirectory(prefix="workbench-") as tmp:
            tmp_dir = Path(tmp)
            video = tmp_dir / "eval.mp4" if cfg.eval.video else None
            final_metrics = run_eval(video, final=True)
            for hook in hooks:
                hook.on_evaluation(step, final_metrics, agent)
            tracker.log_metrics({"eval/final_return_mean": final_metrics["eval/return_mean"]}, step)
            _log_figure(tracker, cfg, result, train_curve)
            if cfg.tracking.save_policy and tracker.run_id is not None:
                spec = {
                    "env_id": e.id,
                    "env_kwargs": dict(e.kwargs),
                    "max_episode_steps": e.max_episode_steps,
                    "time_feature": e.time_feature,
                    "obs_dim": obs_dim,
                    "action_dim": action_dim,
                    "action_low": low.tolist(),
                    "action_high": high.tolist(),
                    "normalize_obs": e.normalize_obs,
                    "config_hash": config_hash(cfg),
                    "steps": step,
                }
                pdir = save_policy(agent.actor, agent.obs_norm, low, high, spec, tmp_dir / "p")
                tracker.log_artifacts(pdir, ARTIFACT_DIR)
            tracker.flush()
        perf["final_s"] = time.perf_counter() - t_final
    except KeyboardInterrupt as err:
        result.status = "KILLED"
        if isinstance(err, Interrupted):
            result.reason = err.reason
        elif last_ckpt is not None:
            result.reason = (
                f"interrupted at step {step}; latest checkpoint {last_ckpt.name}: continue "
                f"with `workbench train resume={run_key}`"
            )
        else:
            result.reason = f"interrupted at step {step}"
        tracker.end("KILLED", result.reason)
        raise
    except StopRun as stop:
        result.status, result.reason = stop.status, stop.reason
        tracker.end(stop.status, stop.reason)
        raise
    except BaseException as err:
        result.status, result.reason = "FAILED", f"{type(err).__name__}: {err}"
        tracker.end("FAILED", result.reason)
        raise
    finally:
        display.close()
        result.steps = step
        result.wall_time_s = time.perf_counter() - t_start
        if result.status != "RUNNING":  # ended early: its checkpoints stay for a resume
            ckpt_lock.release()
    result.status = "FINISHED"
    if not ck.keep_after_finish and ckpt_lock.directory.is_dir():
        tracker.set_tags({"workbench.checkpoint_dir": "(deleted: the run finished)"})
    tracker.end("FINISHED")
    if ck.keep_after_finish:
        ckpt_lock.release()
    else:
        ckpt_lock.remove_folder()  # only this run's folder: nothing is left to resume
    return result


def _log_figure(
    tracker: Tracker, cfg: Config, result: RunResult, train_curve: tuple[list[int], list[float]]
) -> None:
    if isinstance(tracker, NullTracker):
        return
    from workbench import plots

    fig = plots.learning_curve(
        result.eval_steps,
        result.eval_returns,
        result.eval_stds,
        train_steps=train_curve[0],
        train_returns=train_curve[1],
        title=f"{cfg.agent.name} on {cfg.env.id} (seed {cfg.seed})",
    )
    tracker.log_figure(fig, "learning_curve.png")
    import matplotlib.pyplot as plt

    plt.close(fig)
