"""The training loop: ``train(cfg, tracker, hooks) -> RunResult``, and its K axis.

One flat loop — collect, store, update, report, evaluate, checkpoint — that ``workbench
train``, study trials and ablation runs all call. It steps a population of members
(``train_population``): each its own run with its own values and seed, acting through one
batched forward pass and learning through one batched update (``workbench.population``);
``train`` is the population of one, whose agent updates itself. The loop's parts live where
they belong: counters and history in ``runstate``, evaluation in ``evaluate``, checkpoints
and interrupts in ``checkpoint``, exploration in ``exploration``, random streams in
``seeding``.
The MLflow run it reports to always ends: FINISHED, FAILED with the reason, or KILLED
(interrupt, or a hook that stops the run early).
"""

from __future__ import annotations

import contextlib
import logging
import math
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
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
from workbench.replay import Batch, ReplayBuffer, make_replay_buffer
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
    # where the time went (seconds) and the replay footprint (bytes). ``loop_s`` is the
    # training loop's wall time, from its first step to the run's last (before the final
    # evaluation); a population's members share that loop, so each one's ``loop_s`` covers
    # every member's work in it (including their periodic evaluations, ``loop_eval_s``)
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

    The population loop with one member. With ``cfg.resume`` set, the run continues from its
    latest checkpoint (``resume_state`` when the caller has loaded it already, see
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


def train_population(members: Sequence[Member], *, refill: Refill | None = None) -> list[RunResult]:
    """Train K runs of one shape as one program: the same loop, one batched update.

    ``refill(ended, result)`` is called when a member's run ends (``result`` None when it
    could not even start: ``ended.error`` says why); a Member it returns takes the ended
    one's slot (its values copied into the slot's rows), so the population stays full (a
    study's next trial). Results are returned for every run, in the order they started.

    Every member is its own run (own tracker, hooks, seed, values); an error or a hook's
    ``StopRun`` ends that member alone (its ``error`` says why) and the others go on.
    Members share what sets tensor shapes (``population.SHAPE_KEYS``, the env). Each
    member writes its periodic checkpoints as a single run would; Ctrl-C ends every member
    KILLED at once (no checkpoint on the interrupt).
    """
    from workbench.population import check_members

    check_members([m.cfg for m in members])
    return _train(list(members), handle_signals=False, refill=refill)


def _train(
    members: list[Member], *, handle_signals: bool, refill: Refill | None = None
) -> list[RunResult]:
    runs: list[_Run] = []  # every run started, in order
    interrupts = Interrupts(handle_signals and len(members) == 1)
    try:
        for k, member in enumerate(members):
            runs.append(_Run.open(k, member, len(members)))  # bad input fails here, run by run
        slots = list(runs)
        for run in slots:
            with run.guard():
                run.build(interrupts)
        learner = _learner(slots)
        t_loop = time.perf_counter()
        for run in slots:
            run.t_loop = t_loop  # one loop for all: its time starts once every member is built
        refill_slots = None
        if refill is not None:

            def refill_slots() -> None:
                _refill(slots, runs, learner, refill, interrupts)

        with interrupts:
            _loop(slots, learner, refill_slots)
    except KeyboardInterrupt as err:
        for run in runs:
            if run.running:
                run.end_by(err)
        raise
    finally:
        for run in runs:
            run.close()
    return [run.result for run in runs]


def _refill(
    slots: list[_Run], runs: list[_Run], learner: Any, refill: Refill, interrupts: Interrupts
) -> None:
    """Give each ended slot the member ``refill`` returns.

    A member whose config cannot join (another shape, a bad value) or whose run fails to
    start is handed back to ``refill`` as ended, with no result, and the slot asks again.
    """
    from workbench.population import check_members

    for k, ended in enumerate(slots):
        if ended.running or ended.refilled:
            continue
        ended.refilled = True
        member = refill(ended.member, ended.result)
        while member is not None:
            try:
                check_members([runs[0].cfg, member.cfg])
                run = _Run.open(k, member, len(slots))
            except Exception as err:
                member.error = err
                member = refill(member, None)
                continue
            runs.append(run)
            with run.guard():
                run.build(interrupts)
                run.t_loop = time.perf_counter()
                if learner is not None:
                    learner.replace(k, run.agent, run.buffer)
            if run.running:
                slots[k] = run
                break
            run.refilled = True
            member = refill(member, run.result)


def _learner(runs: Sequence[_Run]) -> Any:
    """The batched update over the members (None for one run: its agent updates itself)."""
    if len(runs) == 1:
        return None
    from workbench.population import Population

    broken = [run.k for run in runs if not hasattr(run, "agent")]
    if broken:  # the others end FAILED ("another member of its population failed to start")
        raise RuntimeError(f"population members {broken} failed to build their agents")
    return Population([run.agent for run in runs], [run.buffer for run in runs])


def _loop(runs: Sequence[_Run], learner: Any, refill: Callable[[], None] | None = None) -> None:
    """Collect, store, update, report, evaluate, checkpoint: every member, step by step.
    A slot whose run ended is refilled at the end of the step (``refill``), if asked."""
    single = learner is None
    while live := [r for r in runs if r.running]:
        actions = _act(live, learner)
        for run in live:
            run.start_step(actions.get(run.k))
        # with one run, updates whose batch avoids the rows this step writes run while
        # async envs simulate (the batch, so the update, is the same)
        early, held = live[0].early_updates() if single else (0, None)
        for run in live:
            with run.guard():
                run.finish_step()
        _learn([r for r in live if r.running and r.learn], learner, early, held)
        for run in live:
            with run.guard():
                if run.running:
                    run.after_step()
        # the members whose last step this was stop the loop's clock together, before any
        # of them evaluates for the last time
        t_end = time.perf_counter()
        for run in live:
            with run.guard():
                if run.running and run.state.step >= run.cfg.total_steps:
                    run.finish(t_end)
        if refill is not None and any(not r.running and not r.refilled for r in runs):
            refill()


def _act(live: Sequence[_Run], learner: Any) -> dict[int, np.ndarray]:
    """Each member's actions: uniform until its learning starts, then its explorer's on its
    policy's actions (one batched forward for a population; parameter noise acts with each
    member's own perturbed copy)."""
    batched = None
    acting = [r for r in live if r.learning_started and r.explorer.kind != "param"]
    if learner is not None and acting:
        first = acting[0]
        obs = torch.zeros(learner.k, *first.obs.shape, device=first.device)
        for run in acting:
            obs[run.k] = torch.as_tensor(run.obs, dtype=torch.float32, device=run.device)
        batched = learner.act(obs)
    out: dict[int, np.ndarray] = {}
    for run in live:
        with run.guard():
            out[run.k] = run.act(batched[run.k] if batched is not None else None)
    return out


def _learn(learning: Sequence[_Run], learner: Any, early: int, held: torch.Tensor | None) -> None:
    """This step's updates of the members that learn now."""
    if not learning:
        return
    if learner is None:
        (run,) = learning
        run.update_alone(run.cfg.agent.gradient_steps - early, held)
        return
    from workbench.population import member_batch

    last: dict[int, Batch] = {}
    for g in range(max(r.cfg.agent.gradient_steps for r in learning)):
        indices: list[torch.Tensor | None] = [None] * learner.k
        for run in learning:
            if g < run.cfg.agent.gradient_steps:
                indices[run.k] = run.buffer.sample_indices(run.cfg.agent.batch_size)
        metrics, batch = learner.learn(indices)
        for run in learning:
            if metrics[run.k] is not None:
                run.state.means.add(metrics[run.k])
                if run.cfg.noise.kind == "param":  # it adapts on its last batch
                    last[run.k] = member_batch(batch, run.k)
    for run in learning:
        run.updated(last.get(run.k))


@dataclass
class _Run:
    """One member's parts, as the loop uses them."""

    k: int  # index in the population
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
    member: Member
    resume_state: Mapping[str, Any] | None
    t_start: float = field(default_factory=time.perf_counter)
    t_loop: float = 0.0  # when the training loop started
    running: bool = False
    refilled: bool = False  # its slot has been handed on
    checkpointer: Checkpointer | None = None
    obs: np.ndarray = field(default_factory=lambda: np.zeros(0))
    learn: bool = False
    prev_step: int = 0
    done: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=bool))

    # ----------------------------------------------------------------------------- start

    @classmethod
    def open(cls, k: int, member: Member, population: int) -> _Run:
        """Validate, make the envs, check a resumed run's checkpoint fits, then start (or
        reopen) the tracker's run: everything that can fail on bad input comes first."""
        cfg, resume_state = member.cfg, member.resume_state
        validate(cfg)
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
            obs_dim = int(np.prod(envs.single_observation_space.shape))
            action_dim = int(np.prod(envs.single_action_space.shape))
            header = {
                "config_hash": config_hash(cfg),
                "obs_dim": obs_dim,
                "action_dim": action_dim,
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
        perf = {"loop_s": 0.0, "final_s": 0.0, "loop_eval_s": 0.0, "final_eval_s": 0.0}
        return cls(
            k=k,
            cfg=cfg,
            tracker=tracker,
            hooks=member.hooks,
            device=device,
            envs=envs,
            eval_env=eval_env,
            header={**header, "config": to_dict(cfg)},
            ckpt_lock=lock or RunLock(checkpoint_dir(cfg.checkpoint.dir, run_key)),
            run_key=run_key,
            state=RunState(cfg.seed, cfg.perf.device_metrics),
            result=RunResult(tracker.run_id, "RUNNING", 0, math.nan, math.nan, perf=perf),
            display=ProgressDisplay(cfg.total_steps, enabled=cfg.progress and population == 1),
            member=member,
            resume_state=resume_state,
            running=True,
        )

    def build(self, interrupts: Interrupts) -> None:
        """The agent (initialized from the member's seed), buffer, explorer, evaluator and
        checkpointer; then the first observations (or the checkpoint's state)."""
        cfg, e = self.cfg, self.cfg.env
        obs_dim, action_dim = self.header["obs_dim"], self.header["action_dim"]
        seeding.seed_globals(cfg.seed)
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
        tracker = self.tracker
        self.checkpointer = Checkpointer(
            cfg.checkpoint,
            self.ckpt_lock,
            self.run_key,
            self.header,
            interrupts,
            on_first=lambda d: tracker.set_tags({CHECKPOINT_DIR_TAG: str(d)}),
            flush=tracker.flush,
        )
        self.obs = self._first_obs(self.resume_state)

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

    # ------------------------------------------------------------------------------ step

    @property
    def learning_started(self) -> bool:
        return self.state.step >= self.cfg.agent.learning_starts

    def act(self, policy_actions: torch.Tensor | None) -> np.ndarray:
        """Uniform actions until learning starts, then the explorer's (on the population's
        batched ``policy_actions`` when given, else on this agent's own forward pass)."""
        state, e = self.state, self.cfg.env
        if not self.learning_started:
            shape = (e.n_envs, self.header["action_dim"])
            return state.rng.uniform(-1.0, 1.0, size=shape).astype(np.float32)
        if policy_actions is not None:
            actions = self.explorer.explore(policy_actions, state.step)
        else:
            obs_t = torch.as_tensor(self.obs, dtype=torch.float32, device=self.device)
            actions = self.explorer.act(self.agent.actor, self.agent.obs_norm(obs_t), state.step)
        if not np.isfinite(actions).all():
            raise DivergenceError(f"non-finite action {actions.tolist()} at step {state.step}")
        return actions

    def start_step(self, actions: np.ndarray | None) -> None:
        if not self.running or actions is None:
            return
        a, n_envs = self.cfg.agent, self.cfg.env.n_envs
        self.learn = (
            self.state.step + n_envs >= a.learning_starts
            and (self.state.vec_steps + 1) % a.train_freq == 0
            and a.gradient_steps > 0
        )
        self.actions = actions
        self.stepper.start(self.scale.to_env(actions))

    def finish_step(self) -> None:
        """The envs' answer: store the transitions, record ended episodes, next observation."""
        if not self.running:
            return
        next_obs, rewards, terminated, truncated, infos = self.stepper.finish()
        real_next = envs_mod.real_next_obs(next_obs, infos)
        self.buffer.add(self.obs, self.actions, rewards, real_next, terminated, truncated)
        self.prev_step = self.state.advance(self.cfg.env.n_envs)
        for _, ep_return, ep_length in envs_mod.finished_episodes(infos):
            self._episode(ep_return, ep_length)
        self.done = np.logical_or(terminated, truncated)
        if self.done.any():
            self.explorer.on_episode_end(self.agent.actor, self.done)
        self.obs = next_obs
        self.agent.obs_norm.update(next_obs)

    def early_updates(self) -> tuple[int, torch.Tensor | None]:
        """Updates whose batch does not touch the rows this step will write: they can run
        while the envs simulate, and the batch, so the update, is the same. Returns how many
        ran, and the first batch's indices that had to wait (to use after the write)."""
        a, n_envs = self.cfg.agent, self.cfg.env.n_envs
        early = 0
        while self.running and self.stepper.overlap and self.learn and early < a.gradient_steps:
            idx = self.buffer.sample_indices(a.batch_size, upcoming=n_envs)
            if self.buffer.hits_pending(idx, n_envs):
                return early, idx
            self.state.means.add(self.agent.update(self.buffer.gather(idx)))
            early += 1
        return early, None

    def update_alone(self, n: int, held: torch.Tensor | None) -> None:
        """This step's updates of a run trained on its own."""
        a = self.cfg.agent
        batch = None
        for _ in range(n):
            idx = held if held is not None else self.buffer.sample_indices(a.batch_size)
            held = None
            batch = self.buffer.gather(idx)
            self.state.means.add(self.agent.update(batch))
        self.updated(batch)

    def updated(self, last_batch: Batch | None) -> None:
        """Count this step's updates; parameter noise adapts on the last batch."""
        state, a = self.state, self.cfg.agent
        state.updates_since_log += a.gradient_steps
        state.updates += a.gradient_steps
        if last_batch is not None and self.cfg.noise.kind == "param":
            obs = self.agent.obs_norm(last_batch.obs)
            self.explorer.adapt(self.agent.actor, obs, state.step)

    def after_step(self) -> None:
        """Report, evaluate (hooks may stop the run), checkpoint (the loop calls ``finish``
        after the last step)."""
        cfg, state = self.cfg, self.state
        prev, step = self.prev_step, state.step
        if _crossed(prev, step, cfg.tracking.log_every):
            self._report()
        self.display.advance(step)
        if _crossed(prev, step, cfg.eval.every) and step < cfg.total_steps:
            metrics = self.evaluator(step)
            for hook in self.hooks:
                hook.on_evaluation(step, metrics, self.agent)
        if step < cfg.total_steps:  # a finished run has nothing left to resume
            assert self.checkpointer is not None
            self.checkpointer.after_step(
                prev, step, state.vec_steps, bool(self.done.all()), self._snapshot
            )

    def finish(self, t_end: float) -> None:
        """The last step is done: the loop's time ends at ``t_end``; the final evaluation."""
        self.result.perf["loop_s"] = t_end - self.t_loop
        self._finish()
        self._end("FINISHED", None)

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

    @contextlib.contextmanager
    def guard(self) -> Iterator[None]:
        """A member's error (or a hook's StopRun) ends its run alone, by ``tracking.ends_run``'s
        rule; Ctrl-C, which ends every member, goes on up once this one is ended."""
        if not self.running:
            yield
            return
        ending = Ending()
        try:
            with ends_run(self.tracker, reason=self._reason, finish=False) as ending:
                yield
        except BaseException as err:
            self.member.error = err
            self._ended(ending.status, ending.reason)
            if isinstance(err, KeyboardInterrupt):
                raise

    def _reason(self, err: BaseException) -> str | None:
        """An interrupt's reason says how to continue from the latest checkpoint."""
        if not isinstance(err, KeyboardInterrupt):
            return None  # StopRun's own reason; "ExcType: message" for a failure
        step, c = self.state.step, self.checkpointer
        return c.interrupted_reason(step, err) if c else f"interrupted at step {step}"

    def end_by(self, err: BaseException) -> None:
        """End the run as ``err`` would have ended it inside ``guard``."""
        with contextlib.suppress(KeyboardInterrupt), self.guard():
            raise err

    def _end(self, status: str, reason: str | None) -> None:
        """End the run (the loop's own endings: finished, or never started)."""
        ck = self.cfg.checkpoint
        if status == "FINISHED" and not ck.keep_after_finish and self.ckpt_lock.directory.is_dir():
            self.tracker.set_tags({CHECKPOINT_DIR_TAG: "(deleted: the run finished)"})
        self.tracker.end(status, reason)
        self._ended(status, reason)

    def _ended(self, status: str, reason: str | None) -> None:
        self.running = False
        self.result.status, self.result.reason = status, reason
        self._record_result()  # complete when refill() reads it

    def close(self) -> None:
        """Fill in the result, close the envs, release (or remove) the checkpoint folder."""
        if self.running:  # never started its loop: a failure while building the others
            self._end("FAILED", "another member of its population failed to start")
        self.display.close()
        self._record_result()
        self.envs.close()
        self.eval_env.close()
        if self.result.status == "FINISHED" and not self.cfg.checkpoint.keep_after_finish:
            self.ckpt_lock.remove_folder()  # only this run's folder: nothing is left to resume
        else:
            self.ckpt_lock.release()  # an unfinished run keeps its checkpoints to resume

    def _record_result(self) -> None:
        result, state, perf = self.result, self.state, self.result.perf
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
        if self.checkpointer is not None and self.checkpointer.seconds:
            perf["checkpoint_s"] = self.checkpointer.seconds


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
