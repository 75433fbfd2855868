"""One member's run: opened (config checked, envs made, its MLflow run started), then
started in its slot of the learner and replay storage, stepped by the loop (``train``), and
ended with its true status: FINISHED, FAILED with the reason, or KILLED (an interrupt, or a
hook that stops it early). A member's ending is its own; the others go on. Each ending is
said on stderr as the store has it; one the store could not take (a full disk) is kept in
the run's lock file, held from its creation to its end, and recorded by the next command
that looks (``end_abandoned_runs``), which also ends FAILED the runs whose process died.
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import socket
import tempfile
import time
import uuid
from collections.abc import Callable, Collection, Mapping, Sequence
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
    list_checkpoints,
    restore,
)
from workbench.config import (
    Config,
    TrackingConfig,
    check_env,
    config_hash,
    flatten,
    to_dict,
    validate,
)
from workbench.ddpg import DDPG, Agent
from workbench.display import ProgressDisplay
from workbench.errors import DeviceError, DivergenceError, Interrupted
from workbench.evaluate import Evaluator
from workbench.exploration import Explorer
from workbench.policy import ARTIFACT_DIR, policy_spec, save_policy
from workbench.replay import Batch, ReplayBuffer, ReplayStorage
from workbench.runstate import RunState
from workbench.tracking import (
    Ending,
    NullTracker,
    RunHandle,
    RunRecord,
    Tracker,
    ends_run,
    make_tracker,
    redact,
    resolve_uri,
    search_runs,
)
from workbench.tracking.status import ABANDONED_REASON, default_ending
from workbench.tracking.tags import (
    CHECKPOINT_DIR_TAG,
    PROCESS_TAG,
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

    def abandon(self, err: BaseException) -> None:
        """End the run as ``err`` ends it (an interrupt: KILLED) and free what was opened:
        its population never started."""
        status, reason = default_ending(err)
        if status == "FAILED":
            reason = f"its population could not start: {reason}"
        unrecorded = self.tracker.end(status, reason)
        _say_ending(
            self.run_key, status, reason, unrecorded, self.lock, self.cfg.tracking.experiment
        )
        self.envs.close()
        self.eval_env.close()
        _let_go(self.lock, kept=unrecorded is not None, finished=False)


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
    eval_env = lock = tracker = None
    started = False
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
        # which process trains it: a later command tells a dead one by it (``end_abandoned``)
        extra_tags = {**(member.tags or {}), PROCESS_TAG: f"{socket.gethostname()}:{os.getpid()}"}
        if resume_state is not None:
            check_compatible(dict(resume_state), header)
            extra_tags[RESUMED_AT_STEP_TAG] = str(resume_state["step"])
        config_tree = to_dict(cfg)
        config_tree["resume"] = None  # the run's config, not how this process was started
        tracker.start(params=flatten(config_tree), tags=run_tags(cfg, str(device), extra_tags))
        started = True
        if lock is None and tracker.run_id is not None:
            # held from now to the run's end: while it is, the run is alive (``probe``)
            lock = RunLock(checkpoint_dir(cfg.checkpoint.dir, tracker.run_id))
            lock.acquire()
        tracker.log_text(OmegaConf.to_yaml(config_tree), "config.yaml")
    except BaseException as err:
        unrecorded = None
        if started and tracker is not None:  # an interrupt or error right after its creation
            status, reason = default_ending(err)
            unrecorded = tracker.end(status, reason)
            _say_ending(tracker.run_id, status, reason, unrecorded, lock, cfg.tracking.experiment)
        envs.close()
        if eval_env is not None:
            eval_env.close()
        if lock is not None:
            _let_go(lock, kept=unrecorded is not None, finished=False)
        raise
    if tracker.run_id is not None:
        log.info("MLflow run %s (%s)", tracker.run_id, "resumed" if resume_state else "new")
        if member.tracker is None:  # a run of its own (``workbench train``): tidy up after others
            end_abandoned_runs(
                cfg.tracking,
                [cfg.checkpoint.dir],
                skip={tracker.run_id},
                by="a later `workbench train` in this experiment",
            )
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
    unrecorded: str | None = None  # why the store could not take its ending, if it could not
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
            self._ended(ending.status, ending.reason, ending.unrecorded)
            return not isinstance(final, KeyboardInterrupt) or isinstance(final, Interrupted)

    def _reason(self, err: BaseException) -> str | None:
        """An interrupt's reason says how to continue from the latest checkpoint."""
        if not isinstance(err, KeyboardInterrupt):
            return None  # StopRun's own reason; "ExcType: message" for a failure
        return self.checkpointer.interrupted_reason(self.state.step, err)

    def _end(self, status: str, reason: str | None) -> None:
        """End the run (the loop's own ending: finished)."""
        kept = self.cfg.checkpoint.keep_after_finish
        if status == "FINISHED" and not kept and list_checkpoints(self.opening.lock.directory):
            self.tracker.set_tags({CHECKPOINT_DIR_TAG: "(deleted: the run finished)"})
        self._ended(status, reason, self.tracker.end(status, reason))

    def _ended(self, status: str, reason: str | None, unrecorded: str | None) -> None:
        self.running = False
        self.result.status, self.result.reason = status, reason
        self.unrecorded = unrecorded
        o = self.opening
        _say_ending(o.run_key, status, reason, unrecorded, o.lock, self.cfg.tracking.experiment)
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
        finished = self.result.status == "FINISHED" and not self.cfg.checkpoint.keep_after_finish
        _let_go(o.lock, kept=self.unrecorded is not None, finished=finished)

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


# ----------------------------------------------------------------------------- endings


def _say_ending(
    name: str | None,
    status: str,
    reason: str | None,
    unrecorded: str | None,
    lock: RunLock | None,
    experiment: str,
) -> None:
    """Say how the run ended, as the store has it; where the store could not take the
    ending, say so and keep it in the run's lock file for the command that records it."""
    if unrecorded is None:
        if status != "FINISHED":
            level = logging.WARNING if status == "FAILED" else logging.INFO
            log.log(level, "run %s ended %s: %s", name, status, reason)
        return
    kept = lock is not None and lock.record_ending(status, reason, unrecorded)
    how = f"{status} ({reason})" if reason else status
    later = (
        f"records it as kept in {lock.path}"
        if kept and lock is not None
        else f"marks it FAILED ({ABANDONED_REASON})"
    )
    log.error(
        "run %s ended %s, but the store could not record that (%s): it shows RUNNING there "
        "until the next `workbench train` in experiment %r (or a re-run of its ablation) %s",
        name,
        how,
        unrecorded,
        experiment,
        later,
    )


def _let_go(lock: RunLock, *, kept: bool, finished: bool) -> None:
    """Release the run's folder, or remove it where nothing is left in it to use: no
    checkpoint to resume (or the run finished), and no ending the store still lacks."""
    if not kept and (finished or not list_checkpoints(lock.directory)):
        lock.remove_folder()
    else:
        lock.release()


def end_abandoned_runs(
    tracking: TrackingConfig,
    checkpoint_roots: Sequence[str | Path],
    *,
    filter_string: str = "",
    skip: Collection[str] = (),
    by: str,
) -> list[str]:
    """End the runs of ``tracking.experiment`` (matching ``filter_string``) that are RUNNING
    with no process behind them any more, and return their ids.

    A run holds its lock file (``checkpoint.RunLock``, in ``<root>/<run id>``) from its start
    to its end, so a free lock means its process died (``kill -9``, out of memory) or could
    not write its ending to the store (a full disk: the lock file then holds that ending,
    which is recorded now). A run without a lock file is judged by its process tag on this
    machine; a run started elsewhere is left as it is. ``by`` names the command, for the
    reason recorded.
    """
    if tracking.backend == "none":
        return []
    uri = resolve_uri(tracking.uri, tracking.dir)
    running = "attributes.status = 'RUNNING'"
    try:
        runs = search_runs(
            uri,
            experiments=[tracking.experiment],
            filter_string=f"{running} and {filter_string}" if filter_string else running,
        )
    except Exception as err:  # tidying up must not stop the command
        log.warning("could not look for abandoned runs in %s: %s", redact(uri), _line(err))
        return []
    ended = []
    for run in runs:
        found = None if run.run_id in skip else _abandoned(run, checkpoint_roots, by)
        if found is None:
            continue
        status, reason, folder = found
        if RunHandle(uri, run.run_id).end(status, reason) is not None:
            continue  # said by RunHandle; the next command tries again
        ended.append(run.run_id)
        log.warning(
            "run %s (%s) was left RUNNING: ended %s: %s", run.run_id, run.run_name, status, reason
        )
        if folder is not None and not list_checkpoints(folder):
            shutil.rmtree(folder, ignore_errors=True)  # only its lock file: nothing to resume
    return ended


def _abandoned(
    run: RunRecord, roots: Sequence[str | Path], by: str
) -> tuple[str, str, Path | None] | None:
    """How a RUNNING run whose process is gone should end (status, reason, its folder);
    None while it may be alive, or where nothing here can tell."""
    tagged = run.tags.get(CHECKPOINT_DIR_TAG, "")
    folders = [Path(tagged)] if os.path.isabs(tagged) else []
    folders += [checkpoint_dir(root, run.run_id) for root in roots]
    for folder in folders:
        if not (folder / ".lock").exists():
            continue
        state = RunLock.probe(folder)
        if state is None:
            return None  # held: it is training
        if state.status is None:
            return "FAILED", _abandoned_reason(f"pid {state.pid}", by), folder
        late = f"recorded by {by}: the store could not be written when the run ended"
        if state.store_error and state.store_error not in (state.reason or ""):
            late += f" ({state.store_error})"
        if state.status == "FINISHED":  # its last metrics or artifacts may be missing too
            return "FAILED", f"finished, but {late}", folder
        return state.status, f"{state.reason} ({late})", folder
    host, _, pid = run.tags.get(PROCESS_TAG, "").rpartition(":")
    if host == socket.gethostname() and pid.isdigit() and not _alive(int(pid)):
        return "FAILED", _abandoned_reason(f"pid {pid}", by), None
    return None


def _abandoned_reason(process: str, by: str) -> str:
    return (
        f"{ABANDONED_REASON}: its process ({process}) ended without ending the run (killed "
        f"with SIGKILL, out of memory, or the machine stopped); found by {by}"
    )


def _alive(pid: int) -> bool:
    """Whether process ``pid`` runs on this machine (a zombie does not)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return stat.rpartition(")")[2].split()[:1] != ["Z"]


def _line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


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
