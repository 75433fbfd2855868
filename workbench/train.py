"""The training loop: ``train(cfg, tracker, hooks) -> RunResult``, for K members at once.

One flat loop — act, step the envs, store, update, report, evaluate, checkpoint — that
``workbench train``, study trials and ablation runs all call. It steps K members, each its
own run with its own values, seed, tracker and hooks, through one learner (``ddpg.DDPG``:
one batched forward to act, one batched update) and one replay storage: a run alone is
K=1 (``train``), a population K > 1 (``train_population``). The loop's parts live where
they belong: counters and history in ``runstate``, evaluation in ``evaluate``, checkpoints
and interrupts in ``checkpoint``, exploration in ``exploration``, random streams in
``seeding``, what members must share in ``population``.

Every MLflow run the loop reports to ends: FINISHED, FAILED with the reason, or KILLED
(interrupt, or a hook that stops the run early); a member's ending is its own.
"""

from __future__ import annotations

import logging
import math
import tempfile
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Protocol

import gymnasium as gym
import numpy as np
import torch
from omegaconf import OmegaConf

from workbench import envs as envs_mod
from workbench import population, seeding
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
from workbench.config import (
    Config,
    ConfigError,
    check_env,
    config_hash,
    flatten,
    to_dict,
    validate,
)
from workbench.ddpg import DDPG, Agent
from workbench.display import ProgressDisplay
from workbench.errors import DivergenceError, Interrupted
from workbench.evaluate import Evaluator
from workbench.exploration import Explorer
from workbench.policy import ARTIFACT_DIR, policy_spec, save_policy
from workbench.replay import Batch, ReplayBuffer, ReplayStorage, make_storage
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
    "Member",
    "RunResult",
    "StopRun",
    "build_learner",
    "resolve_device",
    "run_name",
    "train",
    "train_population",
]

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


Refill = Callable[[Member, RunResult | None], Member | None]


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
    k: int,
    obs_dim: int,
    action_dim: int,
    device: torch.device,
    *,
    buffer_size: int | None = None,
) -> tuple[DDPG, ReplayStorage]:
    """The learner and replay storage of K members of ``cfg``'s shape (``population``),
    as its agent and perf sections ask for; members are placed in them by ``Run.start``."""
    a, p = cfg.agent, cfg.perf
    learner = DDPG(
        k,
        obs_dim,
        action_dim,
        a,
        device=device,
        compile=p.compile,
        compile_mode=p.compile_mode,
        cuda_graphs=p.cuda_graphs,
    )
    replay = make_storage(
        k,
        buffer_size or a.buffer_size,
        obs_dim,
        action_dim,
        device=device,
        compact=p.replay_compact,
        storage=p.replay_storage,
    )
    return learner, replay


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

    The loop with one member. With ``cfg.resume`` set, the run continues from its latest
    checkpoint (``resume_state`` when the caller has loaded it already, see
    ``checkpoint.prepare_resume``). ``handle_signals``: the first SIGINT/SIGTERM writes a
    checkpoint and ends the run KILLED. An error that ends the run is raised here.
    """
    if cfg.resume is not None and resume_state is None:
        cfg, resume_state = prepare_resume(cfg, ())
    member = Member(cfg, tracker, hooks, tags, resume_state)
    (result,) = _train([member], handle_signals=handle_signals)
    if member.error is not None:
        raise member.error
    return result


def train_population(
    members: Sequence[Member], *, refill: Refill | None = None, handle_signals: bool = False
) -> list[RunResult]:
    """Train K runs of one shape as one program: the same loop, one batched update.

    ``refill(ended, result)`` is called when a member's run ends (``result`` None when it
    could not even start: ``ended.error`` says why); a Member it returns takes the ended
    one's slot (its values written into the slot's rows), so the population stays full (a
    study's next trial). Results are returned for every run, in the order they started.

    Every member is its own run (own tracker, hooks, seed, values, checkpoints); an error or
    a hook's ``StopRun`` ends that member alone (its ``error`` says why) and the others go
    on. Members share ``population.SHARED_KEYS``. ``handle_signals``: the first
    SIGINT/SIGTERM has each member write a checkpoint and end KILLED.
    """
    problems = []
    for k, member in enumerate(members):
        try:
            validate(member.cfg)
        except ConfigError as err:
            problems += [f"member {k}: {p}" for p in err.problems]
    problems += [str(p) for p in population.problems([m.cfg for m in members])]
    if problems:
        raise ConfigError(problems)
    return _train(list(members), handle_signals=handle_signals, refill=refill)


def _train(
    members: list[Member], *, handle_signals: bool, refill: Refill | None = None
) -> list[RunResult]:
    interrupts = Interrupts(handle_signals)
    openings: list[_Opening] = []  # opened, not yet started
    runs: list[Run] = []  # every run started, in order
    try:
        for member in members:  # bad input fails here, member by member, before any trains
            openings.append(_open(member, alone=len(members) == 1))
        learner, replay = _population(openings[0], len(members))
        while openings:
            runs.append(Run.start(len(runs), openings.pop(0), learner, replay, interrupts))
        slots = list(runs)
        for run in slots:
            with run.guard():
                run.reset()
        t_loop = time.perf_counter()
        for run in slots:
            run.t_loop = t_loop  # one loop for all: its time starts once every member is in
        with interrupts:
            while True:
                if refill is not None:  # the slots whose run ended (or never started)
                    _refill(slots, runs, learner, replay, refill, interrupts)
                live = [run for run in slots if run.running]
                if not live:
                    break
                _step(live, learner, replay)
    except BaseException as err:  # Ctrl-C, or an error of the population as a whole
        for run in runs:
            if run.running:
                run.end_by(err)
        raise
    finally:
        for opening in openings:
            opening.abandon("another member of its population failed to start")
        for run in runs:
            run.close()
    return [run.result for run in runs]


def _step(live: Sequence[Run], learner: DDPG, replay: ReplayStorage) -> None:
    """One vector step of every live member: act, step the envs, store, update, report,
    evaluate, checkpoint. An error (or a hook's StopRun) ends its member alone."""
    # act: the members acting by their policy in one batched forward pass
    by_policy = [run for run in live if run.acts_by_policy]
    policy = learner.act(_observations(by_policy, learner.k)) if by_policy else None
    started: list[tuple[Run, np.ndarray, bool]] = []
    for run in live:
        with run.guard():
            actions = run.explore(policy)
            updates_now = run.updates_due()  # before the step is counted
            run.stepper.start(run.scale.to_env(actions))
            started.append((run, actions, updates_now))

    # update, while async envs simulate: the updates whose batches avoid the rows this step
    # is about to write (the batch, so the update, is the same)
    updating = _Updates([run for run, _, due in started if due])
    if updating.runs and all(run.stepper.overlap for run in updating.runs):
        updating.run(learner, replay, early=True)

    # store: the envs' answer
    stored: list[tuple[Run, int, np.ndarray]] = []
    for run, actions, _ in started:
        with run.guard():
            stored.append((run, *run.store(actions)))

    updating.runs = [run for run in updating.runs if run.running]
    updating.run(learner, replay, early=False)
    for run in updating.runs:
        with run.guard():
            run.updated(updating.last.get(run.slot))

    # report, evaluate, checkpoint; a member whose last step this was ends. The loop's clock
    # stops for all of them before any evaluates for the last time
    t_end = time.perf_counter()
    for run, prev_step, done in stored:
        with run.guard():
            if run.running:
                run.after_step(prev_step, done, t_end)


def _observations(runs: Sequence[Run], k: int) -> torch.Tensor:
    """The members' current observations as (K, n_envs, obs_dim) rows (zeros elsewhere)."""
    first = runs[0]
    if k == 1:
        obs = first.obs[None]
    else:
        obs = np.zeros((k, *first.obs.shape), dtype=np.float32)
        for run in runs:
            obs[run.slot] = run.obs
    return torch.as_tensor(obs, dtype=torch.float32, device=first.device)


@dataclass
class _Updates:
    """A step's updates: the members that update now, each ``gradient_steps`` times, one
    batched update per gradient step."""

    runs: list[Run]
    done: int = 0  # gradient steps done
    held: list[torch.Tensor | None] | None = None  # indices drawn that had to wait
    last: dict[int, Batch] = field(default_factory=dict)  # a member's last batch, by slot

    def run(self, learner: DDPG, replay: ReplayStorage, *, early: bool) -> None:
        """The updates not done yet; ``early``: only while no member's batch would read a
        row this step is about to write (the first that would is held for later)."""
        if not self.runs:
            return
        total = max(run.cfg.agent.gradient_steps for run in self.runs)
        while self.done < total:
            indices = self.held or self._draw(learner.k, early)
            self.held = None
            if early and any(
                (i := indices[run.slot]) is not None
                and run.buffer.hits_pending(i, run.cfg.env.n_envs)
                for run in self.runs
            ):
                self.held = indices
                return
            batch = replay.gather(indices)
            metrics = learner.update(batch, [i is not None for i in indices])
            for run in self.runs:
                m = metrics[run.slot]
                if m is not None:
                    run.state.means.add(m)
                    if run.explorer.kind == "param":  # it adapts on its last batch
                        self.last[run.slot] = batch.member(run.slot)
            self.done += 1

    def _draw(self, k: int, early: bool) -> list[torch.Tensor | None]:
        """Each member's batch indices for this gradient step (None: it has done its own)."""
        indices: list[torch.Tensor | None] = [None] * k
        for run in self.runs:
            a = run.cfg.agent
            if self.done < a.gradient_steps:
                upcoming = run.cfg.env.n_envs if early else 0
                indices[run.slot] = run.buffer.sample_indices(a.batch_size, upcoming=upcoming)
        return indices


def _population(first: _Opening, k: int) -> tuple[DDPG, ReplayStorage]:
    """The learner and replay storage of K members of ``first``'s shape."""
    h = first.header
    return build_learner(first.cfg, k, h["obs_dim"], h["action_dim"], first.device)


def _refill(
    slots: list[Run],
    runs: list[Run],
    learner: DDPG,
    replay: ReplayStorage,
    refill: Refill,
    interrupts: Interrupts,
) -> None:
    """Give each slot whose run ended the member ``refill`` returns.

    A member whose config cannot join (``population.problems``, a bad value) or whose run
    fails to start is handed back to ``refill`` as ended, with no result, and the slot asks
    again.
    """
    for k, ended in enumerate(slots):
        if ended.running or ended.handed_on:
            continue
        ended.handed_on = True
        member = refill(ended.opening.member, ended.result)
        while member is not None:
            try:
                problems = population.problems([runs[0].cfg, member.cfg])
                if problems:
                    raise ConfigError([str(replace(p, member=k)) for p in problems])
                opening = _open(member, alone=False)
            except Exception as err:
                member.error = err
                member = refill(member, None)
                continue
            run = Run.start(k, opening, learner, replay, interrupts)
            runs.append(run)
            with run.guard():
                run.reset()
                run.t_loop = time.perf_counter()
            if run.running:
                slots[k] = run
                break
            run.handed_on = True
            member = refill(member, run.result)


# ----------------------------------------------------------------------------- a member


@dataclass
class _Opening:
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


def _open(member: Member, *, alone: bool) -> _Opening:
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
            run_name=run_name(cfg),
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
    return _Opening(
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
    opening: _Opening
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
        opening: _Opening,
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
