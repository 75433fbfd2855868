"""One member's run: opened (config checked, envs made, its MLflow run started), then
started in its slot of the learner and replay storage, stepped by the loop (``train``), and
ended with its true status: FINISHED, FAILED with the reason, or KILLED (an interrupt, or a
hook that stops it early). A member's ending is its own; the others go on.
"""

from __future__ import annotations

import logging
import math
import tempfile
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import gymnasium as gym
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
    restore,
)
from workbench.config import Config, check_env, config_hash, flatten, to_dict, validate
from workbench.ddpg import DDPG, Agent
from workbench.display import ProgressDisplay
from workbench.errors import DeviceError, DivergenceError, Interrupted
from workbench.evaluate import Evaluator
from workbench.exploration import Explorer
from workbench.policy import ARTIFACT_DIR, policy_spec, save_policy
from workbench.replay import Batch, ReplayBuffer, ReplayStorage
from workbench.runstate import RunState
from workbench.tracking import Ending, NullTracker, Tracker, ends_run, make_tracker
from workbench.tracking.tags import (
    CHECKPOINT_DIR_TAG,
    RESUMED_AT_STEP_TAG,
    run_name,
    run_tags,
)

log = logging.getLogger(__name__)


class Hook(Protocol):
    """Called after every evaluation; raise StopRun to end the run early (e.g. pruning)."""

    def on_evaluation(self, step: int, metrics: Mapping[str, float], agent: Agent) -> None: ...


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
    # where the time went (seconds) and the replay footprint (bytes). ``loop_s`` is the
    # training loop's wall time, from its first step to the run's last (before the final
    # evaluation); a population's members share that loop, so each one's ``loop_s`` covers
    # every member's work in it (including their periodic evaluations, ``loop_eval_s``)
    perf: dict[str, float] = field(default_factory=dict)


@dataclass
class Member:
    """One run of a population: its config, tracker, hooks, tags and (resumed) state."""

    cfg: Config
    tracker: Tracker | None = None
    hooks: Sequence[Hook] = ()
    tags: Mapping[str, str] | None = None
    resume_state: Mapping[str, Any] | None = None
    error: BaseException | None = None  # what ended the run, if not finishing


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise DeviceError(f"device={device!r}: CUDA is not available here; use device=auto or cpu")
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


@dataclass
class Opening:
    """A member's run, opened: config checked, envs made, a resumed run's checkpoint
    checked, its MLflow run started. Its agent and buffer come with its slot (``Run``)."""

    member: Member
    cfg: Config
    device: torch.device
    envs: gym.vector.VectorEnv
    eval_env: gym.Env
    tracker: Tracker
    lock: RunLock
    header: dict[str, Any]  # config, hash and shapes: what a checkpoint must match
    run_key: str  # the MLflow run id (a made-up one when nothing is tracked)
    display: ProgressDisplay

    def abandon(self, reason: str) -> None:
        """End the run FAILED and free what was opened (its population never started)."""
        self.tracker.end("FAILED", reason)
        self.envs.close()
        self.eval_env.close()
        self.lock.release()


def open_run(member: Member, *, alone: bool) -> Opening:
    """Validate, make the envs, check a resumed run's checkpoint fits, then start (or
    reopen) the tracker's run: everything that can fail on bad input comes first."""
    cfg, resume_state = member.cfg, member.resume_state
    validate(cfg)
    check_env(cfg)
    device = resolve_device(cfg.device)
    if cfg.torch_threads is not None:
        torch.set_num_threads(cfg.torch_threads)
    e = cfg.env
    options = envs_mod.env_options(e)
    envs = envs_mod.make_vec_env(
        e.id, e.n_envs, vectorization=e.vectorization, seed=cfg.seed, **options
    )
    eval_env = lock = None
    try:
        video = "rgb_array" if cfg.eval.video else None
        eval_env = envs_mod.make_env(e.id, render_mode=video, **options)
        if resume_state is not None:
            assert cfg.resume is not None
            lock = RunLock(checkpoint_dir(cfg.checkpoint.dir, cfg.resume))
            lock.acquire()  # refuses a run that is still training elsewhere
        tracker = member.tracker or make_tracker(
            cfg.tracking,
            run_name=run_name(cfg, member.tags),
            resume_run_id=cfg.resume if resume_state is not None else None,
        )
        header = {
            "config_hash": config_hash(cfg),
            "obs_dim": int(np.prod(envs.single_observation_space.shape)),
            "action_dim": int(np.prod(envs.single_action_space.shape)),
        }
        extra_tags = member.tags
        if resume_state is not None:
            check_compatible(dict(resume_state), header)
            step = str(resume_state["step"])
            extra_tags = {**(extra_tags or {}), RESUMED_AT_STEP_TAG: step}
        config_tree = to_dict(cfg)
        config_tree["resume"] = None  # the run's config, not how this process was started
        tracker.start(params=flatten(config_tree), tags=run_tags(cfg, str(device), extra_tags))
        tracker.log_text(OmegaConf.to_yaml(config_tree), "config.yaml")
    except BaseException:
        envs.close()
        if eval_env is not None:
            eval_env.close()
        if lock is not None:
            lock.release()
        raise
    if tracker.run_id is not None:
        log.info("MLflow run %s (%s)", tracker.run_id, "resumed" if resume_state else "new")
    run_key = cfg.resume or tracker.run_id or uuid.uuid4().hex
    return Opening(
        member=member,
        cfg=cfg,
        device=device,
        envs=envs,
        eval_env=eval_env,
        tracker=tracker,
        lock=lock or RunLock(checkpoint_dir(cfg.checkpoint.dir, run_key)),
        header={**header, "config": to_dict(cfg)},
        run_key=run_key,
        display=ProgressDisplay(cfg.total_steps, enabled=cfg.progress and alone),
    )


@dataclass
class Run:
    """One member's run in its slot: its opened parts, its agent and buffer (the slot's rows
    of the learner and replay storage), exploration, evaluation, checkpoints, counters."""

    slot: int
    opening: Opening
    cfg: Config
    tracker: Tracker
    device: torch.device
    agent: Agent
    buffer: ReplayBuffer
    explorer: Explorer
    scale: envs_mod.ActionScale
    stepper: envs_mod.EnvStepper
    state: RunState
    evaluator: Evaluator
    checkpointer: Checkpointer
    result: RunResult
    obs: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float32))
    t_start: float = field(default_factory=time.perf_counter)
    t_loop: float = 0.0  # when the training loop started
    running: bool = True
    handed_on: bool = False  # its slot has been given to the next member (refill)
    _guard: _Guard = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self._guard = _Guard(self)

    @classmethod
    def start(
        cls,
        slot: int,
        opening: Opening,
        learner: DDPG,
        replay: ReplayStorage,
        interrupts: Interrupts,
    ) -> Run:
        """The member's agent in ``slot`` of the learner (its networks initialized from its
        seed), its buffer in that row of the replay storage, and the rest of its parts."""
        cfg, e, tracker = opening.cfg, opening.cfg.env, opening.tracker
        action_dim = opening.header["action_dim"]
        seeding.seed_globals(cfg.seed)
        agent = learner.place(slot, cfg.agent, seed=cfg.seed, normalize_obs=e.normalize_obs)
        buffer = replay.buffer(slot, cfg.seed)
        state = RunState(cfg.seed, cfg.perf.device_metrics)
        scale = envs_mod.ActionScale(opening.envs.single_action_space)
        perf = {"loop_s": 0.0, "final_s": 0.0, "loop_eval_s": 0.0, "final_eval_s": 0.0}
        perf["replay_nbytes"] = float(buffer.nbytes)
        return cls(
            slot=slot,
            opening=opening,
            cfg=cfg,
            tracker=tracker,
            device=opening.device,
            agent=agent,
            buffer=buffer,
            explorer=Explorer(
                cfg.noise,
                cfg.schedule,
                cfg.epsilon,
                total_steps=cfg.total_steps,
                n_envs=e.n_envs,
                action_dim=action_dim,
                actor=agent.actor,
                seed=cfg.seed,
            ),
            scale=scale,
            stepper=envs_mod.EnvStepper(opening.envs, overlaps(cfg)),
            state=state,
            evaluator=Evaluator(
                cfg.eval,
                opening.eval_env,
                _policy(agent, scale, opening.device),
                seed=seeding.eval_seed(cfg.seed),
                tracker=tracker,
                state=state,
                display=opening.display,
            ),
            checkpointer=Checkpointer(
                cfg.checkpoint,
                opening.lock,
                opening.run_key,
                opening.header,
                interrupts,
                on_first=lambda d: tracker.set_tags({CHECKPOINT_DIR_TAG: str(d)}),
                flush=tracker.flush,
            ),
            result=RunResult(tracker.run_id, "RUNNING", 0, math.nan, math.nan, perf=perf),
        )

    def reset(self) -> None:
        """The first observations: a fresh episode per env, or the checkpoint's state."""
        resume_state = self.opening.member.resume_state
        if resume_state is None:
            seeds = seeding.env_seeds(self.cfg.seed, self.cfg.env.n_envs)
            self.obs, _ = self.opening.envs.reset(seed=seeds)
            self.agent.obs_norm.update(self.obs)
            return
        self.obs = restore(
            dict(resume_state),
            agent=self.agent,
            buffer=self.buffer,
            explorer=self.explorer,
            state=self.state,
            envs=self.opening.envs,
            seed=self.cfg.seed,
        )
        log.info("resumed run %s at step %d", self.cfg.resume, self.state.step)
        self.opening.display.advance(self.state.step)

    # ------------------------------------------------------------------------------ step

    @property
    def acts_by_policy(self) -> bool:
        """Whether its actions come from the learner's batched forward pass this step (not
        uniform before learning starts; not a perturbed copy's, under parameter noise)."""
        return self.state.step >= self.cfg.agent.learning_starts and self.explorer.kind != "param"

    def explore(self, policy: torch.Tensor | None) -> np.ndarray:
        """Uniform actions until learning starts, then the explorer's on the policy's
        actions (the learner's ``policy`` rows, or under parameter noise its own copy's)."""
        state, e = self.state, self.cfg.env
        if state.step < self.cfg.agent.learning_starts:
            shape = (e.n_envs, self.opening.header["action_dim"])
            return state.rng.uniform(-1.0, 1.0, size=shape).astype(np.float32)
        if self.acts_by_policy:
            assert policy is not None
            actions = self.explorer.explore(policy[self.slot], state.step)
        else:
            obs = torch.as_tensor(self.obs, dtype=torch.float32, device=self.device)
            actions = self.explorer.act(self.agent.actor, self.agent.obs_norm(obs), state.step)
        if not np.isfinite(actions).all():
            raise DivergenceError(f"non-finite action {actions.tolist()} at step {state.step}")
        return actions

    def updates_due(self) -> bool:
        """Whether this step (not yet counted) ends with updates."""
        a, state = self.cfg.agent, self.state
        return (
            state.step + self.cfg.env.n_envs >= a.learning_starts
            and (state.vec_steps + 1) % a.train_freq == 0
            and a.gradient_steps > 0
        )

    def store(self, actions: np.ndarray) -> tuple[int, np.ndarray]:
        """The envs' answer: the transitions stored, ended episodes recorded, the next
        observations. Returns the step count before this step and which envs ended."""
        next_obs, rewards, terminated, truncated, infos = self.stepper.finish()
        real_next = envs_mod.real_next_obs(next_obs, infos)
        self.buffer.add(self.obs, actions, rewards, real_next, terminated, truncated)
        prev_step = self.state.advance(self.cfg.env.n_envs)
        for _, ep_return, ep_length in envs_mod.finished_episodes(infos):
            self._episode(ep_return, ep_length)
        done = np.logical_or(terminated, truncated)
        if done.any():
            self.explorer.on_episode_end(self.agent.actor, done)
        self.obs = next_obs
        self.agent.obs_norm.update(next_obs)
        return prev_step, done

    def updated(self, last_batch: Batch | None) -> None:
        """Count this step's updates; parameter noise adapts on the last batch."""
        state, n = self.state, self.cfg.agent.gradient_steps
        state.updates_since_log += n
        state.updates += n
        if last_batch is not None:
            obs = self.agent.obs_norm(last_batch.obs)
            self.explorer.adapt(self.agent.actor, obs, state.step)

    def after_step(self, prev_step: int, done: np.ndarray, t_end: float) -> None:
        """Report, evaluate (hooks may stop the run), checkpoint; after the last step the
        final evaluation, and the run ends (the loop's time ends at ``t_end``)."""
        cfg, state, step = self.cfg, self.state, self.state.step
        if _crossed(prev_step, step, cfg.tracking.log_every):
            self._report()
        self.opening.display.advance(step)
        if step >= cfg.total_steps:
            self.result.perf["loop_s"] = t_end - self.t_loop
            self._finish()
            self._end("FINISHED", None)
            return
        if _crossed(prev_step, step, cfg.eval.every):
            metrics = self.evaluator(step)
            for hook in self.opening.member.hooks:
                hook.on_evaluation(step, metrics, self.agent)
        # (a finished run has nothing left to resume: no checkpoint after the last step)
        all_done = bool(done.all())
        self.checkpointer.after_step(prev_step, step, state.vec_steps, all_done, self._snapshot)

    def _snapshot(self, exact: bool) -> dict[str, Any]:
        return capture(
            exact=exact,
            agent=self.agent,
            buffer=self.buffer,
            explorer=self.explorer,
            state=self.state,
            envs=self.opening.envs,
        )

    def _episode(self, ep_return: float, ep_length: int) -> None:
        step = self.state.step
        metrics = {"train/episode_return": ep_return, "train/episode_length": ep_length}
        self.tracker.log_metrics(metrics, step)
        self.state.record_episode(step, ep_return)
        self.opening.display.update(step, last_return=ep_return)

    def _report(self) -> None:
        state = self.state
        metrics = state.log_point(time.perf_counter())
        bad = [k for k, v in metrics.items() if not math.isfinite(v)]
        if bad:
            values = ", ".join(f"{k}={metrics[k]}" for k in bad)
            raise DivergenceError(f"non-finite {values} at step {state.step}")
        metrics.update(self.explorer.metrics(state.step))
        self.tracker.log_metrics(metrics, state.step)
        self.opening.display.update(state.step, sps=metrics["perf/sps"])

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
            for hook in self.opening.member.hooks:
                hook.on_evaluation(step, metrics, self.agent)
            tracker.log_metrics({"eval/final_return_mean": metrics["eval/return_mean"]}, step)
            _log_figure(tracker, cfg, self.state)
            if cfg.tracking.save_policy and tracker.run_id is not None:
                h, scale = self.opening.header, self.scale
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

    def guard(self) -> _Guard:
        """A member's error, a hook's StopRun, or an interrupt after its checkpoint ends its
        run alone (by ``tracking.ends_run``'s rule); a plain Ctrl-C, which ends every member,
        goes on up once this one is ended."""
        return self._guard

    def end_by(self, err: BaseException) -> bool:
        """End the run as ``err`` ends it; True when the loop goes on without it."""
        ending = Ending()
        try:
            with ends_run(self.tracker, reason=self._reason, finish=False) as ending:
                raise err
        except BaseException as final:  # err, or the store's error while ending the run
            self.opening.member.error = final
            self._ended(ending.status, ending.reason)
            return not isinstance(final, KeyboardInterrupt) or isinstance(final, Interrupted)

    def _reason(self, err: BaseException) -> str | None:
        """An interrupt's reason says how to continue from the latest checkpoint."""
        if not isinstance(err, KeyboardInterrupt):
            return None  # StopRun's own reason; "ExcType: message" for a failure
        return self.checkpointer.interrupted_reason(self.state.step, err)

    def _end(self, status: str, reason: str | None) -> None:
        """End the run (the loop's own ending: finished)."""
        kept = self.cfg.checkpoint.keep_after_finish
        if status == "FINISHED" and not kept and self.opening.lock.directory.is_dir():
            self.tracker.set_tags({CHECKPOINT_DIR_TAG: "(deleted: the run finished)"})
        self.tracker.end(status, reason)
        self._ended(status, reason)

    def _ended(self, status: str, reason: str | None) -> None:
        self.running = False
        self.result.status, self.result.reason = status, reason
        self._record_result()  # complete when refill() reads it

    def close(self) -> None:
        """Fill in the result, close the envs, release (or remove) the checkpoint folder."""
        if self.running:  # never reached its loop: an error while starting the others
            self._end("FAILED", "another member of its population failed to start")
        o = self.opening
        o.display.close()
        self._record_result()
        o.envs.close()
        o.eval_env.close()
        if self.result.status == "FINISHED" and not self.cfg.checkpoint.keep_after_finish:
            o.lock.remove_folder()  # only this run's folder: nothing is left to resume
        else:
            o.lock.release()  # an unfinished run keeps its checkpoints to resume

    def _record_result(self) -> None:
        result, state, perf = self.result, self.state, self.result.perf
        result.steps, result.wall_time_s = state.step, time.perf_counter() - self.t_start
        result.eval_steps, result.eval_returns = state.eval_steps, state.eval_returns
        result.eval_stds = state.eval_stds
        if state.eval_returns:
            result.final_return_mean = state.eval_returns[-1]
            result.final_return_std = state.eval_stds[-1]
        perf["updates"] = float(state.updates)
        perf["loop_eval_s"] = self.evaluator.seconds["loop"]
        perf["final_eval_s"] = self.evaluator.seconds["final"]
        if self.checkpointer.seconds:
            perf["checkpoint_s"] = self.checkpointer.seconds


class _Guard:
    """``Run.guard``: no work unless the block raises (it is entered several times per
    member and step)."""

    def __init__(self, run: Run):
        self.run = run

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind: object, err: BaseException | None, tb: object) -> bool:
        return err is not None and self.run.running and self.run.end_by(err)


def _policy(
    agent: Agent, scale: envs_mod.ActionScale, device: torch.device
) -> Callable[[np.ndarray], np.ndarray]:
    """The deterministic policy on one raw observation, in env units (evaluation)."""

    def policy(obs: np.ndarray) -> np.ndarray:
        x = torch.as_tensor(obs, dtype=torch.float32, device=device).reshape(1, -1)
        return scale.to_env(agent.act(x)[0].cpu().numpy())

    return policy


def _crossed(prev: int, now: int, every: int) -> bool:
    return every > 0 and now // every > prev // every


def _log_figure(tracker: Tracker, cfg: Config, state: RunState) -> None:
    if isinstance(tracker, NullTracker):
        return
    import matplotlib.pyplot as plt  # matplotlib only when a figure is made (startup time)

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
