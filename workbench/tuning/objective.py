"""The study objective: what a trial is (a config per seed, its MLflow runs), how it is
pruned, and how it is scored. ``worker.Worker`` trains the trials.

Seeds and pruning. A trial's seeds run one after another, in the spec's order. After every
evaluation the pruning hook reports the *running aggregate* of the learning curve: at the i-th
evaluation of seed j it reports mean/IQM over seeds 0..j of their i-th evaluation, at the step
``j * steps + env_step``. Every trial reports at the same steps, so the pruner compares like
with like; a trial is pruned as soon as its curve (averaged over the seeds seen so far) falls
behind, which may be during its first seed. A pruned run really stops: the hook raises
``StopRun`` inside the training loop, which ends that MLflow run FINISHED with the reason
and the ``workbench.trial_state`` tag "pruned" (KILLED would show as a failure in the UI).

Scores. Each seed's eval curve is scored (final eval, mean of the last k, best, or area under
the curve normalised by its span, i.e. the mean return over training) and the seed scores are
aggregated (mean or IQM) into the trial's value.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import optuna
from optuna.trial import TrialState

from workbench import stats
from workbench.config import Config, ConfigError, compose, config_hash, flatten, to_dict
from workbench.errors import RuntimeFailure
from workbench.tracking import (
    NullTracker,
    StopRun,
    Tracker,
    redact,
)
from workbench.tracking.tags import (
    CONFIG_HASH_TAG,
    OVERRIDES_TAG,
    ROLE_TAG,
    SAMPLED_TAG,
    STUDY_TAG,
    TRIAL_STATE_TAG,
    TRIAL_TAG,
)
from workbench.train import DivergenceError
from workbench.tuning import run_tree as runs
from workbench.tuning.spec import StudySpec
from workbench.tuning.study import (
    SURPLUS,
    counts,
)

log = logging.getLogger(__name__)


class StudyError(RuntimeFailure):
    """A worker gave up: trials keep breaking for reasons unrelated to their parameters."""


MAX_CONSECUTIVE_ERRORS = 3  # trials in a row broken for reasons unrelated to their values
VERDICTS = (DivergenceError, ConfigError)  # failures that are a result about the parameters


class Surplus(Exception):
    """The study already had its trials when this one started (a race between workers)."""


# ----------------------------------------------------------------------------- scoring


def aggregate(values: Sequence[float], how: str) -> float:
    return float(stats.iqm(values)) if how == "iqm" else float(np.mean(values))


def score_curve(
    steps: Sequence[int], returns: Sequence[float], how: str, k: int, direction: str
) -> float:
    if not returns:
        return math.nan
    if how == "final":
        return float(returns[-1])
    if how == "last_k":
        return float(np.mean(returns[-k:]))
    if how == "best":
        return float(max(returns) if direction == "maximize" else min(returns))
    if len(returns) == 1:  # auc
        return float(returns[0])
    span = steps[-1] - steps[0]
    return float(np.trapezoid(returns, steps) / span)


# ----------------------------------------------------------------------------- pruning hook


class PruningHook:
    """Reports each evaluation to Optuna and stops the run when the pruner says so."""

    def __init__(
        self,
        trial: optuna.Trial,
        spec: StudySpec,
        seed_index: int,
        prior: Sequence[Sequence[float]],
        trial_tracker: Tracker,
    ):
        self.trial, self.spec, self.seed_index = trial, spec, seed_index
        self.prior = prior
        self.tracker = trial_tracker
        self.last = seed_index == len(spec.objective.seeds) - 1
        self.curve: list[float] = []
        self.last_step = 0

    def on_evaluation(self, step: int, metrics: Mapping[str, float], agent: Any) -> None:
        value = float(metrics[self.spec.objective.metric])
        i = len(self.curve)
        self.curve.append(value)
        self.last_step = step
        seen = [c[i] for c in self.prior if i < len(c)] + [value]
        reported = aggregate(seen, self.spec.objective.aggregate)
        at = self.seed_index * self.spec.steps + step
        self.trial.report(reported, at)
        self.tracker.log_metrics({"trial/reported_value": reported}, at)
        if self.last and step >= self.spec.steps:
            return  # the work is done; pruning now would only throw the result away
        if self.trial.should_prune():
            seed = self.spec.objective.seeds[self.seed_index]
            # FINISHED, not KILLED: the MLflow UI draws KILLED as it draws FAILED, and a
            # pruned trial is a study's normal outcome (its state tag says "pruned")
            reason = f"pruned at step {step} of seed {seed} (reported {reported:.2f})"
            raise StopRun(reason, status="FINISHED")


# ----------------------------------------------------------------------------- objective


def failure_reason(err: BaseException) -> str:
    """One redacted line: a config error says it all; anything else is named by its type."""
    text = str(err) if isinstance(err, ConfigError) else f"{type(err).__name__}: {err}"
    return redact(" ".join(text.split()))[:1000]


class Objective:
    """What a trial is: its configs (one per seed), its MLflow trial run and its seed runs'
    tags; one instance per worker process (``worker.Worker`` runs the trials)."""

    def __init__(self, spec: StudySpec, *, parent_run_id: str | None, n_trials: int | None):
        self.spec = spec
        self.parent_run_id = parent_run_id
        self.n_trials = n_trials
        self.consecutive_errors = 0
        self.last_error = ""

    def check_surplus(self, trial: optuna.Trial) -> None:
        if self.n_trials is None:
            return
        trials = trial.study.get_trials(deepcopy=False)
        ahead = sum(counts(t) for t in trials) + sum(
            t.state == TrialState.RUNNING and t.number < trial.number for t in trials
        )
        if ahead >= self.n_trials:
            trial.set_user_attr(SURPLUS, True)
            raise Surplus(f"the study already has its {self.n_trials} trials")

    def configs(self, sampled: Sequence[str]) -> list[Config]:
        # a trial is re-run whole when its worker dies: training checkpoints would only
        # fill the disk (pruned trials end KILLED, which keeps them)
        base = [*self.spec.base(), "checkpoint.every=0", *self.spec.run_overrides(), *sampled]
        return [compose([*base, f"seed={s}"]) for s in self.spec.objective.seeds]

    def start_trial_run(self, trial: optuna.Trial, cfg: Config, sampled: Sequence[str]) -> Tracker:
        if cfg.tracking.backend == "none":
            return NullTracker()
        params = {k: v for k, v in flatten(to_dict(cfg)).items() if k != "seed"}
        params["trial.seeds"] = ",".join(map(str, self.spec.objective.seeds))
        tags = {
            STUDY_TAG: self.spec.name,
            TRIAL_TAG: str(trial.number),
            TRIAL_STATE_TAG: "running",
            ROLE_TAG: "trial",
            CONFIG_HASH_TAG: config_hash(cfg),
            SAMPLED_TAG: " ".join(sampled) or "(none)",
        }
        return runs.start_trial_run(
            cfg.tracking,
            number=trial.number,
            parent_run_id=self.parent_run_id,
            params=params,
            tags=tags,
        )

    def seed_tags(self, trial: optuna.Trial, sampled: Sequence[str]) -> dict[str, str]:
        return {
            STUDY_TAG: self.spec.name,
            TRIAL_TAG: str(trial.number),
            ROLE_TAG: "seed",
            OVERRIDES_TAG: " ".join([*self.spec.base(), *sampled]),
        }
