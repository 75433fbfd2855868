"""A study worker that trains K trials at once as one population (``tune --population K``).

Optuna is asked for K trials (ask/tell); each occupies a slot of one ``train_population``
program, its seeds running one after another in that slot. Every evaluation is reported to
the pruner as in a sequential worker (``objective.PruningHook``: the running aggregate over
the trial's seeds so far); a pruned, finished or failed trial is told to Optuna and its slot
is refilled with the next trial, so the population stays full until the study has its
count. Each trial has the same MLflow runs as in a sequential worker (a trial run with one
child run per seed), the same counting (complete, pruned, or failed with a verdict) and,
through Optuna's heartbeat, the same stale-trial handling when a worker dies.
"""

from __future__ import annotations

import logging
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import optuna
from optuna.trial import TrialState

from workbench.config import Config, ConfigError
from workbench.errors import DivergenceError
from workbench.tracking import NullTracker, StopRun, Tracker, make_tracker
from workbench.tracking.tags import TRIAL_STATE_TAG
from workbench.train import Member, RunResult, train_population
from workbench.tuning import run_tree as runs
from workbench.tuning.objective import (
    VERDICTS,
    Objective,
    PruningHook,
    Surplus,
    _failure_reason,
    aggregate,
    score_curve,
)
from workbench.tuning.spec import sample, to_overrides
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


class PopulationWorker:
    """Runs a study's trials K at a time in one process, until it has its count."""

    def __init__(
        self,
        study: optuna.Study,
        objective: Objective,
        k: int,
        *,
        deadline: float | None,
        on_trial_end: Callable[[optuna.Study, Any], None],
    ):
        self.study, self.objective, self.k = study, objective, k
        self.spec = objective.spec
        self.deadline, self.on_trial_end = deadline, on_trial_end
        self.slots: dict[int, _Trial] = {}  # id(Member) -> its trial
        self.consecutive_errors = 0
        self.last_error = ""

    def run(self) -> list[RunResult]:
        """Populations until the study has its count: when this worker's slots have all
        closed while other workers' trials still run, it waits, as a sequential worker does,
        in case one of them dies and its trial is handed back (heartbeat)."""
        results: list[RunResult] = []
        poll_s = min(5.0, self.spec.grace_period / 4)
        while True:
            first = [m for m in (self._next() for _ in range(self.k)) if m is not None]
            if first:
                results += self._train(first)
            if self.consecutive_errors >= 3:
                return results
            if self.deadline is not None and time.time() >= self.deadline:
                return results
            done, running, _ = progress(self.study)
            n = self.objective.n_trials
            if n is None or done >= n or not running:
                if n is None or done >= n:
                    return results
                continue  # trials are missing and none runs: start them
            time.sleep(poll_s)

    def _train(self, first: list[Member]) -> list[RunResult]:
        try:
            return train_population(first, refill=self._refill)
        except BaseException:  # Ctrl-C: the trials in flight end, not counted
            for t in {id(t): t for t in self.slots.values()}.values():
                t.tracker.set_tags({TRIAL_STATE_TAG: "interrupted"})
                t.tracker.end("KILLED", "interrupted")
                self._tell(t.trial, TrialState.FAIL, t.heartbeat)
            self.slots.clear()
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
        while self._wanted():
            if self.consecutive_errors >= 3:
                return None  # run() reports it: trials keep breaking for other reasons
            with warnings.catch_warnings():  # "heartbeat ... used with Study.optimize": we beat
                warnings.simplefilter("ignore", UserWarning)
                trial = self.study.ask()
            heartbeat = _heartbeat(self.study, trial)
            try:
                self.objective._check_surplus(trial)
            except Surplus:
                self._tell(trial, TrialState.FAIL, heartbeat)
                continue
            sampled = to_overrides(sample(trial, self.spec.space))
            trial.set_user_attr(OVERRIDES, sampled)
            try:
                configs = self.objective.configs(sampled)
            except ConfigError as err:  # a verdict on the sampled values: counted
                trial.set_user_attr(FAIL_REASON, _failure_reason(err))
                trial.set_user_attr(ENV_STEPS, 0)
                self._tell(trial, TrialState.FAIL, heartbeat)
                continue
            tracker = self.objective._start_trial_run(trial, configs[0], sampled)
            if tracker.run_id is not None:
                trial.set_user_attr(MLFLOW_RUN, tracker.run_id)
            return self._member(_Trial(trial, sampled, configs, tracker, heartbeat))
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
        tags = self.objective._seed_tags(t.trial, t.sampled)
        member = Member(cfg, tracker, [t.hook], tags)
        self.slots[id(member)] = t
        return member

    # ----------------------------------------------------------------------------- telling

    def _refill(self, member: Member, result: RunResult | None) -> Member | None:
        """A seed run ended: go on with the trial's next seed, or tell Optuna and start the
        next trial in this slot."""
        t = self.slots.pop(id(member))
        obj = self.spec.objective
        err = member.error
        if err is None and result is not None and result.status == "FINISHED":
            t.env_steps += result.steps
            t.curves.append(result.eval_returns)
            t.steps = result.eval_steps
            score = score_curve(t.steps, result.eval_returns, obj.score, obj.k, obj.direction)
            t.scores.append(score)
            t.tracker.log_metrics({"trial/seed_score": score}, t.seed_index)
            t.seed_index += 1
            if t.seed_index < len(t.configs):
                return self._member(t)
            self._complete(t)
        elif isinstance(err, StopRun):
            self._pruned(t, err)
        else:
            self._failed(t, err or RuntimeError("the run did not finish"))
        return self._next()

    def _complete(self, t: _Trial) -> None:
        obj = self.spec.objective
        value = aggregate(t.scores, obj.aggregate)
        t.trial.set_user_attr(ENV_STEPS, t.env_steps)
        t.trial.set_user_attr(SEED_SCORES, t.scores)
        for j, step in enumerate(t.steps):
            col = [c[j] for c in t.curves if j < len(c)]
            t.tracker.log_metrics({obj.metric: aggregate(col, obj.aggregate)}, step)
        t.tracker.log_metrics({"trial/score": value}, t.env_steps)
        t.tracker.set_tags({TRIAL_STATE_TAG: "complete"})
        t.tracker.end("FINISHED")
        self.consecutive_errors = 0
        self._tell(t.trial, TrialState.COMPLETE, t.heartbeat, value)

    def _pruned(self, t: _Trial, stop: StopRun) -> None:
        t.env_steps += t.hook.last_step if t.hook is not None else 0
        t.trial.set_user_attr(ENV_STEPS, t.env_steps)
        t.trial.set_user_attr(PRUNE_REASON, stop.reason)
        t.tracker.set_tags({TRIAL_STATE_TAG: "pruned"})
        t.tracker.end(stop.status, stop.reason)
        self.consecutive_errors = 0
        self._tell(t.trial, TrialState.PRUNED, t.heartbeat)

    def _failed(self, t: _Trial, err: BaseException) -> None:
        t.env_steps += t.hook.last_step if t.hook is not None else 0
        reason = _failure_reason(err)
        t.trial.set_user_attr(ENV_STEPS, t.env_steps)
        t.tracker.set_tags({TRIAL_STATE_TAG: "failed"})
        t.tracker.end("FAILED", reason)
        if isinstance(err, (*VERDICTS, DivergenceError)):
            self.consecutive_errors = 0
            t.trial.set_user_attr(FAIL_REASON, reason)
            log.warning("trial %d failed: %s", t.trial.number, reason)
        else:  # says nothing about the parameters: not counted
            self.consecutive_errors += 1
            self.last_error = reason
            t.trial.set_user_attr(ERROR_ATTR, reason)
            log.error("trial %d broke (not counted): %s", t.trial.number, reason)
        self._tell(t.trial, TrialState.FAIL, t.heartbeat)

    def _tell(
        self, trial: optuna.Trial, state: TrialState, heartbeat: Any, value: float | None = None
    ) -> None:
        heartbeat.join()
        frozen = self.study.tell(trial, value, state=state, skip_if_finished=True)
        self.on_trial_end(self.study, frozen)


def check_population(spec: Any, *, source: str) -> None:
    """Refuse ``--population`` for a study whose trials could not share one population: a
    searched key (or config group) that members must share (``population.SHARED_KEYS``).
    Before anything starts."""
    from workbench.population import is_shared
    from workbench.specfile import Problems

    c = Problems()
    for p in spec.space:
        if is_shared(p.name):
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
    from optuna.storages._heartbeat import get_heartbeat_thread

    thread = get_heartbeat_thread(trial._trial_id, study._storage)
    thread.start()
    return thread
