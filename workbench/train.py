"""The training loop: ``train(cfg, tracker, hooks) -> RunResult``, for K members at once.

One flat loop — act, step the envs, store, update, report, evaluate, checkpoint — that
``workbench train``, study trials and ablation runs all call. It steps K members, each its
own run with its own values, seed, tracker and hooks, through one learner (``ddpg.DDPG``:
one batched forward to act, one batched update) and one replay storage: a run alone is
K=1 (``train``), a population K > 1 (``train_population``). The loop's parts live where
they belong: a member's run (its parts, its share of a step, its ending) in ``run``,
counters and history in ``runstate``, evaluation in ``evaluate``, checkpoints and
interrupts in ``checkpoint``, exploration in ``exploration``, random streams in ``seeding``,
what members must share in ``population``.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import torch

from workbench import population
from workbench.checkpoint import Interrupts, prepare_resume
from workbench.config import Config, ConfigError, validate
from workbench.ddpg import DDPG
from workbench.errors import DivergenceError, Interrupted
from workbench.replay import Batch, ReplayStorage, make_storage
from workbench.run import Hook, Member, Opening, Run, RunResult, open_run, resolve_device
from workbench.tracking import Tracker
from workbench.tracking.status import StopRun
from workbench.tracking.tags import run_name

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

Refill = Callable[[Member, RunResult | None], Member | None]


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
    openings: list[Opening] = []  # opened, not yet started
    runs: list[Run] = []  # every run started, in order
    # signals are held from the first run's creation to the last one's close: none finds a
    # run half-made, and each ending is the run's own (``Interrupts``)
    with interrupts:
        try:
            for member in members:  # bad input fails here, member by member, before any trains
                openings.append(open_run(member, alone=len(members) == 1))
            learner, replay = _population(openings[0], len(members))
            while openings:  # (an opening leaves the list once its run has started)
                runs.append(Run.start(len(runs), openings[0], learner, replay, interrupts))
                openings.pop(0)
            slots = list(runs)
            for run in slots:
                with run.guard():
                    run.reset()
            interrupts.check_before_training()
            t_loop = time.perf_counter()
            for run in slots:
                run.t_loop = t_loop  # one loop for all: its time starts once every member is in
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
            for opening in openings:
                opening.abandon(err)
            raise
        finally:
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


def _population(first: Opening, k: int) -> tuple[DDPG, ReplayStorage]:
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
                opening = open_run(member, alone=False)
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
