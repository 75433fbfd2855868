"""The training loop: ``train(cfg, tracker, hooks) -> RunResult``.

One flat loop — collect, store, update, report, evaluate, checkpoint — that ``workbench
train``, study trials and ablation runs all call. Its parts live where they belong: the
counters and history in ``runstate``, evaluation in ``evaluate``, checkpoints and
interrupts in ``checkpoint``, exploration in ``exploration``, random streams in ``seeding``.
The MLflow run it reports to always ends: FINISHED, FAILED with the reason, or KILLED
(interrupt, or a hook that stops the run early).
"""

from __future__ import annotations

import logging
import math
import tempfile
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
from workbench import seeding
from workbench.checkpoint import (
    Checkpointer,
    Interrupts,
    RunLock,
    capture,
    check_compatible,
    checkpoint_dir,
    prepare_resume,
    restore,
)
from workbench.config import Config, config_hash, flatten, to_dict, validate
from workbench.ddpg import DDPG
from workbench.display import ProgressDisplay
from workbench.errors import DivergenceError, Interrupted
from workbench.evaluate import Evaluator
from workbench.exploration import Explorer
from workbench.policy import ARTIFACT_DIR, policy_spec, save_policy
from workbench.replay import ReplayBuffer, make_replay_buffer
from workbench.runstate import RunState
from workbench.tracking import Ending, NullTracker, Tracker, ends_run, make_tracker
from workbench.tracking.status import StopRun
from workbench.tracking.tags import (
    CHECKPOINT_DIR_TAG,
    RESUMED_AT_STEP_TAG,
    run_name,
    run_tags,
)

__all__ = [
    "DivergenceError",
    "Hook",
    "Interrupted",
    "RunResult",
    "StopRun",
    "build_learner",
    "resolve_device",
    "run_name",
    "train",
]

log = logging.getLogger(__name__)


class Hook(Protocol):
    """Called after every evaluation; raise StopRun to end the run early (e.g. pruning)."""

    def on_evaluation(self, step: int, metrics: Mapping[str, float], agent: DDPG) -> None: ...


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
    # where the time went (seconds) and the replay footprint (bytes)
    perf: dict[str, float] = field(default_factory=dict)


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(f"device={device!r}: CUDA is not available on this machine")
    return torch.device(device)


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
) -> tuple[DDPG, ReplayBuffer]:
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
    seeding.seed_globals(cfg.seed)

    # Everything that can fail on bad input happens before the tracker's run exists.
    e = cfg.env
    options = envs_mod.env_options(e)
    envs = envs_mod.make_vec_env(
        e.id, e.n_envs, vectorization=e.vectorization, seed=cfg.seed, **options
    )
    try:
        video = "rgb_array" if cfg.eval.video else None
        eval_env = envs_mod.make_env(e.id, render_mode=video, **options)
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
        run = _Run.start(cfg, tracker, hooks, device, envs, eval_env, tags, resume_state, lock)
        return run.train(resume_state, handle_signals)
    finally:
        envs.close()
        eval_env.close()
        if lock is not None:
            lock.release()


@dataclass
class _Run:
    """One run's parts, as the loop uses them."""

    cfg: Config
    tracker: Tracker
    hooks: Sequence[Hook]
    device: torch.device
    envs: Any
    eval_env: Any
    header: dict[str, Any]  # config, hash and shapes: what a checkpoint must match
    ckpt_lock: RunLock
    run_key: str  # the MLflow run id (a made-up one when nothing is tracked)
    state: RunState
    result: RunResult
    display: ProgressDisplay
    t_start: float = field(default_factory=time.perf_counter)

    @classmethod
    def start(
        cls,
        cfg: Config,
        tracker: Tracker,
        hooks: Sequence[Hook],
        device: torch.device,
        envs: Any,
        eval_env: Any,
        extra_tags: Mapping[str, str] | None,
        resume_state: Mapping[str, Any] | None,
        lock: RunLock | None,
    ) -> _Run:
        """Check a resumed run's checkpoint fits, then start (or reopen) the tracker's run."""
        obs_dim = int(np.prod(envs.single_observation_space.shape))
        action_dim = int(np.prod(envs.single_action_space.shape))
        config_tree = to_dict(cfg)
        config_tree["resume"] = None  # the run's config, not how this process was started
        header = {"config_hash": config_hash(cfg), "obs_dim": obs_dim, "action_dim": action_dim}
        if resume_state is not None:
            check_compatible(dict(resume_state), header)
            step = str(resume_state["step"])
            extra_tags = {**(extra_tags or {}), RESUMED_AT_STEP_TAG: step}
        tracker.start(params=flatten(config_tree), tags=run_tags(cfg, str(device), extra_tags))
        tracker.log_text(OmegaConf.to_yaml(config_tree), "config.yaml")
        if tracker.run_id is not None:
            log.info("MLflow run %s (%s)", tracker.run_id, "resumed" if resume_state else "new")
        run_key = cfg.resume or tracker.run_id or uuid.uuid4().hex
        return cls(
            cfg=cfg,
            tracker=tracker,
            hooks=hooks,
            device=device,
            envs=envs,
            eval_env=eval_env,
            header={**header, "config": to_dict(cfg)},
            ckpt_lock=lock or RunLock(checkpoint_dir(cfg.checkpoint.dir, run_key)),
            run_key=run_key,
            state=RunState(cfg.seed, cfg.perf.device_metrics),
            result=RunResult(
                tracker.run_id,
                "RUNNING",
                0,
                math.nan,
                math.nan,
                perf={"loop_s": 0.0, "final_s": 0.0, "loop_eval_s": 0.0, "final_eval_s": 0.0},
            ),
            display=ProgressDisplay(cfg.total_steps, enabled=cfg.progress),
        )

    def train(self, resume_state: Mapping[str, Any] | None, handle_signals: bool) -> RunResult:
        """Build the learner, run the loop, finish; end the tracker's run however it ends."""
        cfg, tracker, result, state = self.cfg, self.tracker, self.result, self.state
        ck, perf = cfg.checkpoint, result.perf
        checkpointer: Checkpointer | None = None

        def interrupted(err: BaseException) -> str | None:
            if not isinstance(err, KeyboardInterrupt):
                return None  # StopRun's own reason; "ExcType: message" for a failure
            if checkpointer is None:
                return f"interrupted at step {state.step}"
            return checkpointer.interrupted_reason(state.step, err)

        def last_tags(ending: Ending) -> dict[str, str] | None:
            finished = ending.status == "FINISHED" and not ck.keep_after_finish
            if finished and self.ckpt_lock.directory.is_dir():
                return {CHECKPOINT_DIR_TAG: "(deleted: the run finished)"}
            return None

        ending = Ending()
        try:
            with ends_run(tracker, reason=interrupted, tags=last_tags) as ending:
                self._build()
                interrupts = Interrupts(handle_signals)
                checkpointer = Checkpointer(
                    ck,
                    self.ckpt_lock,
                    self.run_key,
                    self.header,
                    interrupts,
                    on_first=lambda d: tracker.set_tags({CHECKPOINT_DIR_TAG: str(d)}),
                    flush=tracker.flush,
                )
                obs = self._first_obs(resume_state)
                t_loop = time.perf_counter()
                with interrupts:
                    self._loop(obs, checkpointer)
                perf["loop_s"] = time.perf_counter() - t_loop
                self._finish()
        finally:
            result.status, result.reason = ending.status, ending.reason
            self._close(checkpointer)  # an unfinished run keeps its checkpoints to resume
        if ck.keep_after_finish:
            self.ckpt_lock.release()
        else:
            self.ckpt_lock.remove_folder()  # only this run's folder: nothing is left to resume
        return result

    # ------------------------------------------------------------------------------ parts

    def _build(self) -> None:
        cfg, e = self.cfg, self.cfg.env
        obs_dim, action_dim = self.header["obs_dim"], self.header["action_dim"]
        self.agent, self.buffer = build_learner(cfg, obs_dim, action_dim, self.device)
        self.result.perf["replay_nbytes"] = float(self.buffer.nbytes)
        self.explorer = Explorer(
            cfg.noise,
            cfg.schedule,
            cfg.epsilon,
            total_steps=cfg.total_steps,
            n_envs=e.n_envs,
            action_dim=action_dim,
            actor=self.agent.actor,
            seed=cfg.seed,
        )
        self.scale = envs_mod.ActionScale(self.envs.single_action_space)
        self.stepper = envs_mod.EnvStepper(self.envs, overlaps(cfg))
        self.evaluator = Evaluator(
            cfg.eval,
            self.eval_env,
            self._policy,
            seed=seeding.eval_seed(cfg.seed),
            tracker=self.tracker,
            state=self.state,
            display=self.display,
        )

    def _policy(self, obs: np.ndarray) -> np.ndarray:
        """The deterministic policy on one raw observation, in env units (evaluation)."""
        x = torch.as_tensor(obs, dtype=torch.float32, device=self.device).reshape(1, -1)
        return self.scale.to_env(self.agent.act(x)[0].cpu().numpy())

    def _first_obs(self, resume_state: Mapping[str, Any] | None) -> np.ndarray:
        if resume_state is None:
            obs, _ = self.envs.reset(seed=seeding.env_seeds(self.cfg.seed, self.cfg.env.n_envs))
            self.agent.obs_norm.update(obs)
            return obs
        obs = restore(
            dict(resume_state),
            agent=self.agent,
            buffer=self.buffer,
            explorer=self.explorer,
            state=self.state,
            envs=self.envs,
            seed=self.cfg.seed,
        )
        log.info("resumed run %s at step %d", self.cfg.resume, self.state.step)
        self.display.advance(self.state.step)
        return obs

    def _snapshot(self, exact: bool) -> dict[str, Any]:
        return capture(
            exact=exact,
            agent=self.agent,
            buffer=self.buffer,
            explorer=self.explorer,
            state=self.state,
            envs=self.envs,
        )

    # ------------------------------------------------------------------------------- loop

    def _loop(self, obs: np.ndarray, checkpointer: Checkpointer) -> None:
        cfg, a, n_envs = self.cfg, self.cfg.agent, self.cfg.env.n_envs
        agent, buffer, explorer, state = self.agent, self.buffer, self.explorer, self.state
        while state.step < cfg.total_steps:
            # collect: uniform actions until learning starts, then the explorer's
            actions = self._act(obs)
            learn = (
                state.step + n_envs >= a.learning_starts
                and (state.vec_steps + 1) % a.train_freq == 0
                and a.gradient_steps > 0
            )
            self.stepper.start(self.scale.to_env(actions))
            early, held = self._early_updates(learn)  # while async envs simulate
            next_obs, rewards, terminated, truncated, infos = self.stepper.finish()
            real_next = envs_mod.real_next_obs(next_obs, infos)
            buffer.add(obs, actions, rewards, real_next, terminated, truncated)
            prev_step = state.advance(n_envs)
            for _, ep_return, ep_length in envs_mod.finished_episodes(infos):
                self._episode(ep_return, ep_length)
            done = np.logical_or(terminated, truncated)
            if done.any():
                explorer.on_episode_end(agent.actor, done)
            obs = next_obs
            agent.obs_norm.update(obs)

            if learn:  # the rest of this step's updates
                self._updates(a.gradient_steps - early, held)
            if _crossed(prev_step, state.step, cfg.tracking.log_every):
                self._report()
            self.display.advance(state.step)
            if _crossed(prev_step, state.step, cfg.eval.every) and state.step < cfg.total_steps:
                metrics = self.evaluator(state.step)
                for hook in self.hooks:
                    hook.on_evaluation(state.step, metrics, agent)
            if state.step < cfg.total_steps:  # a finished run has nothing left to resume
                checkpointer.after_step(
                    prev_step, state.step, state.vec_steps, bool(done.all()), self._snapshot
                )

    def _act(self, obs: np.ndarray) -> np.ndarray:
        state, e = self.state, self.cfg.env
        if state.step < self.cfg.agent.learning_starts:
            shape = (e.n_envs, self.header["action_dim"])
            return state.rng.uniform(-1.0, 1.0, size=shape).astype(np.float32)
        obs_t = torch.as_tensor(obs, dtype=torch.float32, device=self.device)
        actions = self.explorer.act(self.agent.actor, self.agent.obs_norm(obs_t), state.step)
        if not np.isfinite(actions).all():
            raise DivergenceError(f"non-finite action {actions.tolist()} at step {state.step}")
        return actions

    def _early_updates(self, learn: bool) -> tuple[int, torch.Tensor | None]:
        """Updates whose batch does not touch the rows this step will write: they can run
        while the envs simulate, and the batch, so the update, is the same. Returns how many
        ran, and the first batch's indices that had to wait (to use after the write)."""
        a, n_envs = self.cfg.agent, self.cfg.env.n_envs
        early = 0
        while self.stepper.overlap and learn and early < a.gradient_steps:
            idx = self.buffer.sample_indices(a.batch_size, upcoming=n_envs)
            if self.buffer.hits_pending(idx, n_envs):
                return early, idx
            self.state.means.add(self.agent.update(self.buffer.gather(idx)))
            early += 1
        return early, None

    def _updates(self, n: int, held: torch.Tensor | None) -> None:
        a, state = self.cfg.agent, self.state
        batch = None
        for _ in range(n):
            idx = held if held is not None else self.buffer.sample_indices(a.batch_size)
            held = None
            batch = self.buffer.gather(idx)
            state.means.add(self.agent.update(batch))
        state.updates_since_log += a.gradient_steps
        state.updates += a.gradient_steps
        if batch is not None and self.cfg.noise.kind == "param":
            obs = self.agent.obs_norm(batch.obs)
            self.explorer.adapt(self.agent.actor, obs, state.step)

    def _episode(self, ep_return: float, ep_length: int) -> None:
        step = self.state.step
        metrics = {"train/episode_return": ep_return, "train/episode_length": ep_length}
        self.tracker.log_metrics(metrics, step)
        self.state.record_episode(step, ep_return)
        self.display.update(step, last_return=ep_return)

    def _report(self) -> None:
        state = self.state
        metrics = state.log_point(time.perf_counter())
        bad = [k for k, v in metrics.items() if not math.isfinite(v)]
        if bad:
            values = ", ".join(f"{k}={metrics[k]}" for k in bad)
            raise DivergenceError(f"non-finite {values} at step {state.step}")
        metrics.update(self.explorer.metrics(state.step))
        self.tracker.log_metrics(metrics, state.step)
        self.display.update(state.step, sps=metrics["perf/sps"])

    # ----------------------------------------------------------------------------- ending

    def _finish(self) -> None:
        """The final evaluation (with a video where the env renders), figure and policy."""
        cfg, tracker, step, perf = self.cfg, self.tracker, self.state.step, self.result.perf
        perf["replay_nbytes"] = float(self.buffer.nbytes)  # the side store grows with episodes
        t0 = time.perf_counter()
        with tempfile.TemporaryDirectory(prefix="workbench-") as tmp:
            tmp_dir = Path(tmp)
            video = tmp_dir / "eval.mp4" if cfg.eval.video else None
            metrics = self.evaluator(step, video_path=video, final=True)
            for hook in self.hooks:
                hook.on_evaluation(step, metrics, self.agent)
            tracker.log_metrics({"eval/final_return_mean": metrics["eval/return_mean"]}, step)
            _log_figure(tracker, cfg, self.state)
            if cfg.tracking.save_policy and tracker.run_id is not None:
                h, scale = self.header, self.scale
                spec = policy_spec(
                    cfg.env,
                    h["obs_dim"],
                    h["action_dim"],
                    scale.low,
                    scale.high,
                    config_hash=h["config_hash"],
                    steps=step,
                )
                agent = self.agent
                folder = save_policy(
                    agent.actor, agent.obs_norm, scale.low, scale.high, spec, tmp_dir / "p"
                )
                tracker.log_artifacts(folder, ARTIFACT_DIR)
            tracker.flush()
        perf["final_s"] = time.perf_counter() - t0

    def _close(self, checkpointer: Checkpointer | None) -> None:
        result, state, perf = self.result, self.state, self.result.perf
        self.display.close()
        result.steps, result.wall_time_s = state.step, time.perf_counter() - self.t_start
        result.eval_steps, result.eval_returns = state.eval_steps, state.eval_returns
        result.eval_stds = state.eval_stds
        if state.eval_returns:
            result.final_return_mean = state.eval_returns[-1]
            result.final_return_std = state.eval_stds[-1]
        perf["updates"] = float(state.updates)
        if hasattr(self, "evaluator"):
            perf["loop_eval_s"] = self.evaluator.seconds["loop"]
            perf["final_eval_s"] = self.evaluator.seconds["final"]
        if checkpointer is not None and checkpointer.seconds:
            perf["checkpoint_s"] = checkpointer.seconds
        self.ckpt_lock.release()


def _crossed(prev: int, now: int, every: int) -> bool:
    return every > 0 and now // every > prev // every


def _log_figure(tracker: Tracker, cfg: Config, state: RunState) -> None:
    if isinstance(tracker, NullTracker):
        return
    import matplotlib.pyplot as plt

    from workbench import plots

    fig = plots.learning_curve(
        state.eval_steps,
        state.eval_returns,
        state.eval_stds,
        train_steps=state.train_steps,
        train_returns=state.train_returns,
        title=f"{cfg.agent.name} on {cfg.env.id} (seed {cfg.seed})",
    )
    tracker.log_figure(fig, "learning_curve.png")
    plt.close(fig)
