"""A study worker: trials trained K at a time as one population (``tune --population K``);
K=1, the default, is one trial after another through the same code.

Optuna is asked for trials (ask/tell); each occupies a slot of one ``train_population``
program, its seeds running one after another in that slot. Every evaluation is reported to
the pruner (``objective.PruningHook``: the running aggregate over the trial's seeds so far);
a trial that completes, is pruned or fails is told to Optuna (``Worker.finish``, the one
place a trial ends) and its slot goes to the next trial, so the population stays full until
the study has its count. Each trial has a trial run with one child run per seed. Optuna's
heartbeat covers a worker that dies: the next worker fails its trials and retries them.
"""

from __future__ import annotations

import logging
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import optuna
from optuna.storages._heartbeat import get_heartbeat_thread
from optuna.trial import FrozenTrial, TrialState

from workbench import population
from workbench.config import Config, ConfigError
from workbench.errors import DivergenceError
from workbench.specfile import Problems
from workbench.tracking import NullTracker, StopRun, Tracker, TrackingError, make_tracker
from workbench.tracking.tags import TRIAL_STATE_TAG
from workbench.train import Member, RunResult, train_population
from workbench.tuning import run_tree as runs
from workbench.tuning.objective import (
    MAX_CONSECUTIVE_ERRORS,
    VERDICTS,
    Objective,
    PruningHook,
    StudyError,
    Surplus,
    aggregate,
    failure_reason,
    score_curve,
)
from workbench.tuning.spec import StudySpec, sample, to_overrides
from workbench.tuning.study import (
    ENV_STEPS,
    ERROR_ATTR,
    FAIL_REASON,
    MLFLOW_RUN,
    OVERRIDES,
    PRUNE_REASON,
    SEED_SCORES,
    progress,
)

log = logging.getLogger(__name__)


@dataclass
class _Trial:
    """A trial in its slot: its configs (one per seed), its MLflow trial run, its curves."""

    trial: optuna.Trial
    sampled: list[str]
    configs: list[Config]
    tracker: Tracker
    heartbeat: Any
    seed_index: int = 0
    curves: list[list[float]] = field(default_factory=list)
    scores: list[float] = field(default_factory=list)
    steps: list[int] = field(default_factory=list)
    env_steps: int = 0
    hook: PruningHook | None = None


class Worker:
    """Runs a study's trials K at a time in one process, until it has its count."""

    def __init__(
        self,
        study: optuna.Study,
        objective: Objective,
        k: int,
        *,
        deadline: float | None,
        on_trial_end: Callable[[optuna.Study, FrozenTrial], None],
    ):
        self.study, self.objective, self.k = study, objective, k
        self.spec = objective.spec
        self.deadline, self.on_trial_end = deadline, on_trial_end
        self.trials: dict[int, _Trial] = {}  # id(Member) -> its trial
        self.first: Member | None = None  # the population's first member: its shape
        self.waiting: Member | None = None  # a trial's first run that fits the next population
        self.consecutive_errors = 0
        self.last_error = ""

    def run(self) -> None:
        """Populations until the study has its count: when this worker's slots have all
        closed while other workers' trials still run, it waits, in case one of them dies and
        its trial is handed back (heartbeat). Raises ``StudyError`` when trials keep breaking
        for reasons unrelated to their parameters."""
        poll_s = min(5.0, self.spec.grace_period / 4)
        while True:
            first = self._first(self.k)
            if first:
                self._train(first)
            if self.consecutive_errors >= MAX_CONSECUTIVE_ERRORS:
                raise StudyError(
                    f"{self.consecutive_errors} trials in a row broke for reasons unrelated to "
                    f"their parameters (last: {self.last_error}); fix that and run the same "
                    "command to resume"
                )
            if self.deadline is not None and time.time() >= self.deadline:
                return
            done, running, _ = progress(self.study)
            n = self.objective.n_trials
            if n is None or done >= n:
                return
            if running and self.waiting is None:
                time.sleep(poll_s)  # the rest are running (or their worker died: wait it out)

    def _first(self, k: int) -> list[Member]:
        """The first runs of up to K trials that can share one population."""
        members = [self.waiting] if self.waiting is not None else []
        self.waiting = None
        while len(members) < k and (member := self._next()) is not None:
            if members and not self._fits(members[0], member):
                self.waiting = member
                break
            members.append(member)
        return members

    def _fits(self, first: Member, member: Member) -> bool:
        """Whether ``member`` can join ``first``'s population (``population.problems``); a
        trial that cannot waits for the next one (only where K=1 studies search such keys)."""
        return not population.problems([first.cfg, member.cfg])

    def _train(self, first: list[Member]) -> list[RunResult]:
        self.first = first[0]
        try:
            return train_population(first, refill=self._refill)
        except BaseException as err:  # Ctrl-C, or a store that fails: the trials in flight end
            in_flight = {id(t): t for t in self.trials.values()}  # a trial's run, or its next
            self.trials.clear()
            self.waiting = None
            for t in in_flight.values():
                self.finish(t, err)
            raise

    # ----------------------------------------------------------------------------- asking

    def _wanted(self) -> bool:
        """Whether another trial should start (count not reached, deadline not passed)."""
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            optuna.storages.fail_stale_trials(self.study)
        if self.deadline is not None and time.time() >= self.deadline:
            return False
        n = self.objective.n_trials
        if n is None:
            return True
        done, running, _ = progress(self.study)
        return done + running < n

    def _next(self) -> Member | None:
        """Ask Optuna for the next trial and the member that runs its first seed."""
        while self.consecutive_errors < MAX_CONSECUTIVE_ERRORS and self._wanted():
            with warnings.catch_warnings():  # "heartbeat ... used with Study.optimize": we beat
                warnings.simplefilter("ignore", UserWarning)
                trial = self.study.ask()
            t = _Trial(trial, [], [], NullTracker(), _heartbeat(self.study, trial))
            try:
                self.objective.check_surplus(trial)
                t.sampled = to_overrides(sample(trial, self.spec.space))
                trial.set_user_attr(OVERRIDES, t.sampled)
                t.configs = self.objective.configs(t.sampled)
                t.tracker = self.objective.start_trial_run(trial, t.configs[0], t.sampled)
            except (Surplus, ConfigError) as err:  # no run started: told and done
                self.finish(t, err)
                continue
            except BaseException as err:
                self.finish(t, err)
                raise
            if t.tracker.run_id is not None:
                trial.set_user_attr(MLFLOW_RUN, t.tracker.run_id)
            seeds = ",".join(str(c.seed) for c in t.configs)
            log.info(
                "trial %d started: %s (seed %s)", trial.number, " ".join(t.sampled) or "-", seeds
            )
            return self._member(t)
        return None

    def _member(self, t: _Trial) -> Member:
        """The member that runs seed ``t.seed_index`` of trial ``t``."""
        cfg = t.configs[t.seed_index]
        t.hook = PruningHook(t.trial, self.spec, t.seed_index, t.curves, t.tracker)
        tracker: Tracker = NullTracker()
        if cfg.tracking.backend != "none":
            tracker = make_tracker(
                cfg.tracking,
                run_name=f"{runs.trial_run_name(t.trial.number)}-s{cfg.seed}",
                parent_run_id=t.tracker.run_id,
            )
        member = Member(cfg, tracker, [t.hook], self.objective.seed_tags(t.trial, t.sampled))
        self.trials[id(member)] = t
        return member

    # ----------------------------------------------------------------------------- telling

    def _refill(self, member: Member, result: RunResult | None) -> Member | None:
        """A seed run ended: go on with the trial's next seed, or end the trial and start
        the next in this slot (if it fits this population; else it waits for the next)."""
        t = self.trials.pop(id(member))
        err = member.error
        if isinstance(err, StopRun) and member.tracker is not None:
            try:  # the seed run says it was pruned, as its trial run does
                member.tracker.set_tags({TRIAL_STATE_TAG: "pruned"})
            except TrackingError as tag_err:
                log.warning("could not tag trial %d pruned: %s", t.trial.number, tag_err)
        if err is None and result is not None and result.status == "FINISHED":
            obj = self.spec.objective
            t.env_steps += result.steps
            t.curves.append(result.eval_returns)
            t.steps = result.eval_steps
            score = score_curve(t.steps, result.eval_returns, obj.score, obj.k, obj.direction)
            t.scores.append(score)
            t.tracker.log_metrics({"trial/seed_score": score}, t.seed_index)
            t.seed_index += 1
            if t.seed_index < len(t.configs):
                return self._member(t)
        self.finish(t, err)  # None: its last seed finished
        if isinstance(err, TrackingError):
            raise err  # the store failed: this worker stops (the trial is not counted)
        nxt = self._next()
        if nxt is not None and self.first is not None and not self._fits(self.first, nxt):
            self.waiting, nxt = nxt, None
        return nxt

    def finish(self, t: _Trial, err: BaseException | None) -> None:
        """End trial ``t`` by how its last run ended, in MLflow and in Optuna: complete
        (``err`` None); pruned (``StopRun``); failed with a verdict on its parameters
        (diverged, a config they made unusable: counted); interrupted, surplus or broken
        for another reason (not counted; broken trials in a row stop the worker). A store
        that fails gets no state tag (it would fail again)."""
        trial, obj = t.trial, self.spec.objective
        t.env_steps += t.hook.last_step if t.hook is not None and err is not None else 0
        value: float | None = None
        reason: str | None = None
        if err is None:
            state, tag, status = TrialState.COMPLETE, "complete", "FINISHED"
            value = aggregate(t.scores, obj.aggregate)
            trial.set_user_attr(SEED_SCORES, t.scores)
            for j, step in enumerate(t.steps):
                col = [c[j] for c in t.curves if j < len(c)]
                t.tracker.log_metrics({obj.metric: aggregate(col, obj.aggregate)}, step)
            t.tracker.log_metrics({"trial/score": value}, t.env_steps)
            self.consecutive_errors = 0
        elif isinstance(err, StopRun):
            state, tag, status, reason = TrialState.PRUNED, "pruned", err.status, err.reason
            trial.set_user_attr(PRUNE_REASON, reason)
            self.consecutive_errors = 0
        elif isinstance(err, Surplus):  # started after the count was reached: no run
            state, tag, status = TrialState.FAIL, "", "FAILED"
        elif isinstance(err, KeyboardInterrupt):
            state, tag, status, reason = TrialState.FAIL, "interrupted", "KILLED", "interrupted"
        elif isinstance(err, TrackingError):
            state, tag, status, reason = TrialState.FAIL, "", "FAILED", "the tracking store failed"
        elif isinstance(err, (*VERDICTS, DivergenceError)):
            state, tag, status, reason = TrialState.FAIL, "failed", "FAILED", failure_reason(err)
            trial.set_user_attr(FAIL_REASON, reason)
            self.consecutive_errors = 0
            log.warning("trial %d failed: %s", trial.number, reason)
        else:
            state, tag, status, reason = TrialState.FAIL, "failed", "FAILED", failure_reason(err)
            trial.set_user_attr(ERROR_ATTR, reason)
            self.consecutive_errors += 1
            self.last_error = reason
            log.error("trial %d broke (not counted): %s", trial.number, reason)
        if not isinstance(err, Surplus):
            trial.set_user_attr(ENV_STEPS, t.env_steps)
        try:
            if tag:
                t.tracker.set_tags({TRIAL_STATE_TAG: tag})
        finally:
            t.tracker.end(status, reason)
            t.heartbeat.join()
            frozen = self.study.tell(trial, value, state=state, skip_if_finished=True)
            self.on_trial_end(self.study, frozen)


def check_population(spec: StudySpec, *, source: str) -> None:
    """Refuse ``--population`` for a study whose trials could not share one population: a
    searched key (or config group) that members must share (``population.SHARED_KEYS``).
    Before anything starts."""
    c = Problems()
    for p in spec.space:
        if population.is_shared(p.name):
            c.fail(
                f"space.{p.name}",
                p.type,
                "sets tensor shapes, the device or the replay storage, which the members of a "
                "population share: trials drawing different values cannot share one; run this "
                "study without --population",
            )
    c.check(f"{source} with --population")


def _heartbeat(study: optuna.Study, trial: optuna.Trial) -> Any:
    """Optuna's heartbeat for a trial run by ask/tell (``optimize`` starts one itself): a
    worker that dies stops beating, and the next worker fails and re-enqueues its trials."""
    thread = get_heartbeat_thread(trial._trial_id, study._storage)
    thread.start()
    return thread
