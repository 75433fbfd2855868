"""Run a study: the launcher (storage, study, parent MLflow run, workers, report) and the
worker loop each process runs against the shared storage.

The same command is the whole user interface: it creates the study or joins it, and runs
trials until the study holds ``n_trials`` counted trials or ``timeout`` passes. Re-running it
resumes; running it on another machine with the same PostgreSQL storage and MLflow server
joins the same study.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from workbench import parallel
from workbench.config import compose, flatten, to_dict
from workbench.logs import Countdown
from workbench.tracking import ParentRun, describe_experiment, ends_run, redact, resolve_uri
from workbench.tracking.tags import (
    BEST_TRIAL_TAG,
    N_TRIALS_TAG,
    ROLE_TAG,
    STORAGE_TAG,
    STUDY_TAG,
)
from workbench.tuning import run_tree as runs
from workbench.tuning.objective import Objective
from workbench.tuning.spec import StudySpec, choice_key
from workbench.tuning.study import (
    ENV_STEPS,
    FAIL_REASON,
    MLFLOW_RUN,
    PARENT_ATTR,
    PRUNE_REASON,
    SPEC_ATTR,
    counts,
    default_storage,
    make_storage,
    open_study,
    progress,
)
from workbench.tuning.worker import Worker

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Target:
    """Where a study lives: its Optuna storage and its MLflow store (None: not tracked)."""

    storage_url: str
    tracking_uri: str | None
    tracking_dir: str


def resolve_target(spec: StudySpec, storage: str | None = None) -> Target:
    cfg = compose([*spec.base(), *spec.run_overrides()])
    t = cfg.tracking
    uri = resolve_uri(t.uri, t.dir) if t.backend == "mlflow" else None
    url = storage or spec.storage or default_storage(spec, t.dir)
    return Target(url, uri, t.dir)


def storage_for(spec: StudySpec, target: Target, on_stale: Any = None) -> Any:
    return make_storage(
        target.storage_url,
        heartbeat_interval=spec.heartbeat_interval,
        grace_period=spec.grace_period,
        on_stale=on_stale,
    )


# ----------------------------------------------------------------------------- worker


@dataclass(frozen=True)
class WorkerContext:
    spec: StudySpec
    target: Target
    parent_run_id: str | None
    worker_index: int
    n_trials: int | None
    deadline: float | None  # time.time() after which no trial starts
    population: int = 1  # trials trained at once, as one population (tune --population)


class StudyMetrics:
    """After each trial: study-level points on the parent run, and one log line that says
    which trial it was, how far the study is and when it should be done.

    ``study/n_complete``, ``n_pruned``, ``n_failed`` and ``best_value`` are read from the
    storage (all workers' trials) and stepped by the number of counted trials at that moment:
    trials end out of trial-number order (several workers, populations), and a step that
    grows with what has ended keeps each count a curve that only goes up, whose last point is
    the latest. ``study/value`` and ``trial_env_steps`` are the trial's own, at its number.
    """

    def __init__(
        self, parent: ParentRun | None, direction: str, n_trials: int | None = None, done: int = 0
    ):
        self.parent, self.maximize = parent, direction == "maximize"
        self.eta = Countdown(n_trials, done)  # ``done``: trials counted when the worker began

    def __call__(self, study: optuna.Study, trial: FrozenTrial) -> None:
        trials = study.get_trials(deepcopy=False)
        steps = trial.user_attrs.get(ENV_STEPS)
        detail = (
            f"value {trial.value:.2f}"
            if trial.state == TrialState.COMPLETE
            else trial.user_attrs.get(PRUNE_REASON) or trial.user_attrs.get(FAIL_REASON) or ""
        )
        done = sum(counts(t) for t in trials)
        log.info(
            "trial %d %s: %s (%s env steps) [%s]",
            trial.number,
            trial.state.name.lower(),
            detail,
            steps,
            self.eta.update(done),
        )
        if self.parent is None or not counts(trial):
            return
        own = {}
        if trial.state == TrialState.COMPLETE and trial.value is not None:
            own["study/value"] = trial.value
        if steps is not None:
            own["study/trial_env_steps"] = float(steps)
        if own:
            self.parent.log_metrics(own, trial.number)
        log_counts(self.parent, trials, self.maximize)


def log_counts(parent: ParentRun, trials: list[FrozenTrial], maximize: bool) -> None:
    """The study's counts and best value so far, at step = trials counted (see above)."""
    counted = [t for t in trials if counts(t)]
    values = [t.value for t in counted if t.state == TrialState.COMPLETE and t.value is not None]
    metrics = {
        "study/n_complete": sum(t.state == TrialState.COMPLETE for t in counted),
        "study/n_pruned": sum(t.state == TrialState.PRUNED for t in counted),
        "study/n_failed": sum(t.state == TrialState.FAIL for t in counted),
    }
    if values:
        metrics["study/best_value"] = max(values) if maximize else min(values)
    parent.log_metrics(metrics, len(counted))


def run_worker(ctx: WorkerContext) -> int:
    """Run trials until the study has its count or the deadline passes (one process)."""
    if not logging.getLogger().handlers:
        logging.basicConfig(
            level=logging.INFO,
            format=f"%(asctime)s worker-{ctx.worker_index} %(levelname)s %(name)s: %(message)s",
        )
    spec, uri = ctx.spec, ctx.target.tracking_uri

    def on_stale(_study: optuna.Study, trial: FrozenTrial) -> None:
        run_id = trial.user_attrs.get(MLFLOW_RUN)
        if uri and run_id:
            runs.end_abandoned_trial(uri, run_id, "its worker stopped sending heartbeats")

    study = open_study(spec, storage_for(spec, ctx.target, on_stale), ctx.worker_index)
    objective = Objective(spec, parent_run_id=ctx.parent_run_id, n_trials=ctx.n_trials)
    parent = runs.parent_logger(uri, ctx.parent_run_id) if uri and ctx.parent_run_id else None
    callback = StudyMetrics(parent, spec.objective.direction, ctx.n_trials, progress(study)[0])
    Worker(study, objective, ctx.population, deadline=ctx.deadline, on_trial_end=callback).run()
    return 0


# ----------------------------------------------------------------------------- launcher


@dataclass
class Outcome:
    study: optuna.Study
    spec: StudySpec
    target: Target
    parent_run_id: str | None
    exit_codes: list[int]
    wall_time_s: float
    report_dir: Path | None = None


def base_values(spec: StudySpec) -> dict[str, Any]:
    """The base experiment's value of every active search parameter: the known-good trial."""
    from workbench.tuning.export import compose_with_choices

    cfg, choices = compose_with_choices([*spec.base(), *spec.run_overrides()])
    flat = flatten(to_dict(cfg))
    values: dict[str, Any] = {}
    for p in spec.space:
        if not p.active(values):
            continue
        v = choices.get(p.name) if p.is_group else flat.get(p.name)
        if p.type == "categorical":
            if choice_key(v) not in {choice_key(c) for c in p.choices}:
                log.warning("base %s=%r is not among the choices; it will be sampled", p.name, v)
                continue
            values[p.name] = choice_key(v)
        else:
            if v is None or not (p.low <= v <= p.high):  # type: ignore[operator]
                log.warning(
                    "base %s=%r is outside [%s, %s]; it will be sampled", p.name, v, p.low, p.high
                )
                continue
            values[p.name] = int(v) if p.type == "int" else float(v)
    return values


def _spec_params(spec: StudySpec, n_trials: int | None) -> dict[str, Any]:
    """The parent run's params. MLflow params cannot change, so a resumed study keeps the
    first ``study.n_trials``; the count it runs to now is the ``N_TRIALS_TAG`` tag."""
    o = spec.objective
    params: dict[str, Any] = {
        "study.name": spec.name,
        "study.base": " ".join(spec.base()) or "(defaults)",
        "study.steps": spec.steps,
        "study.n_trials": n_trials,
        "study.timeout": spec.timeout,
        "study.sampler": spec.sampler,
        "study.sampler_args": dict(spec.sampler_args),
        "study.pruner": spec.pruner,
        "study.pruner_args": dict(spec.pruner_args),
        "study.objective": f"{o.direction} {o.score} of {o.metric}",
        "study.seeds": ",".join(map(str, o.seeds)),
        "study.aggregate": o.aggregate,
    }
    for p in spec.space:
        rng = list(p.choices) if p.type == "categorical" else f"[{p.low}, {p.high}]"
        cond = f" when {dict(p.when)}" if p.when else ""
        params[f"space.{p.name}"] = f"{p.type} {rng}{' log' if p.log else ''}{cond}"
    return params


def prepare(spec: StudySpec, *, storage: str | None = None) -> tuple[optuna.Study, Target]:
    """Open or create the study (tables, spec attr, the enqueued base trial)."""
    target = resolve_target(spec, storage)
    study = open_study(spec, storage_for(spec, target))
    stored = study.user_attrs.get(SPEC_ATTR)
    if stored is not None and stored != spec.text:
        log.warning("the spec changed since the study began; continuing with the new one")
    if stored != spec.text:
        study.set_user_attr(SPEC_ATTR, spec.text)
    if spec.enqueue_base and not study.get_trials(deepcopy=False):
        study.enqueue_trial(base_values(spec), user_attrs={"workbench.enqueued": "base"})
    return study, target


def run_study(
    spec: StudySpec,
    *,
    workers: int = 1,
    storage: str | None = None,
    n_trials: int | None = None,
    timeout: float | None = None,
    first_worker: int = 0,
    report_dir: Path | None = None,
    population: int = 1,
    cluster: Any = None,
) -> Outcome:
    """Run (or resume, or join) a study with ``workers`` local processes, then report.

    ``population``: each worker trains that many trials at once as one population.
    ``cluster``: a ``workbench.cluster.RayCluster``; each worker is then a Ray task running
    the same loop against the shared storage, placed by Ray."""
    from workbench.tuning import report

    if workers < 1:
        raise ValueError(f"--workers={workers}: must be >= 1")
    n_trials = n_trials if n_trials is not None else spec.n_trials
    timeout = timeout if timeout is not None else spec.timeout
    t0 = time.perf_counter()
    if cluster is not None:
        target = resolve_target(spec, storage)
        cluster.require_shared_stores(
            tracking_uri=target.tracking_uri, storage_url=target.storage_url
        )
        if target.tracking_uri is not None:  # the tasks' nodes see the driver's store
            spec = dataclasses.replace(spec, tracking_uri=target.tracking_uri)
    study, target = prepare(spec, storage=storage)
    log.info(
        "study %s in %s: %d of %s trials done; %d worker(s)",
        spec.name,
        redact(target.storage_url),
        progress(study)[0],
        n_trials if n_trials is not None else "(timeout)",
        workers,
    )
    parent = None
    if target.tracking_uri is not None:
        cfg = compose([*spec.base(), *spec.run_overrides()])
        tracking = dataclasses.replace(cfg.tracking, experiment=spec.experiment_name)
        parent = ParentRun.open(
            tracking,
            run_name=f"study-{spec.name}",
            existing=study.user_attrs.get(PARENT_ATTR),
            params=_spec_params(spec, n_trials),
            tags={
                STUDY_TAG: spec.name,
                ROLE_TAG: "study",
                STORAGE_TAG: redact(target.storage_url),
                N_TRIALS_TAG: str(n_trials) if n_trials is not None else "(timeout)",
            },
            texts={"study.yaml": spec.text},
        )
        if study.user_attrs.get(PARENT_ATTR) != parent.run_id:
            study.set_user_attr(PARENT_ATTR, parent.run_id)
        if problem := describe_experiment(parent.uri, parent.run_id, spec.description):
            log.warning("could not set the experiment's description: %s", problem)
    deadline = time.time() + timeout if timeout is not None else None
    contexts = [
        WorkerContext(
            spec,
            target,
            parent.run_id if parent else None,
            first_worker + i,
            n_trials,
            deadline,
            population,
        )
        for i in range(workers)
    ]
    with ends_run(parent, reason=_parent_reason) as ending:
        if workers == 1 and cluster is None:
            codes = [run_worker(contexts[0])]
        else:
            codes = parallel.run_units(
                run_worker,
                [(c,) for c in contexts],
                name=f"tune-{spec.name}",
                cluster=cluster,
                resources=_worker_resources(spec, cluster, workers),
                # local workers say it themselves: each trial's line counts the study
                describe=_study_progress(study, n_trials) if cluster is not None else None,
            )
        outcome = Outcome(
            study, spec, target, parent.run_id if parent else None, codes, time.perf_counter() - t0
        )
        try:
            outcome.report_dir = report.write_report(
                study, spec, report_dir or report.default_dir(spec, target)
            )
        except Exception as err:  # the trials are safe in the storage; say so and go on
            log.warning("could not write the study report: %s", err)
        if parent is not None:
            try:
                if outcome.report_dir is not None:
                    parent.log_artifacts(outcome.report_dir, "report")
                summary = report.summarize(study, spec)
                if summary["best_value"] is not None:
                    parent.log_metrics({"study/final_best_value": summary["best_value"]}, 0)
                parent.set_tags({BEST_TRIAL_TAG: str(summary["best_trial"])})
                log_counts(
                    parent,
                    study.get_trials(deepcopy=False),
                    spec.objective.direction == "maximize",
                )
            except Exception as err:
                log.warning("could not log the study report: %s", err)
            done = progress(study)[0]
            if any(c != 0 for c in codes):
                ending.set("FAILED", f"worker exit codes {codes}")
            elif n_trials is not None and done < n_trials:
                ending.set("FINISHED", f"stopped at {done} of {n_trials} trials (timeout)")
    return outcome


def _worker_resources(spec: StudySpec, cluster: Any, workers: int) -> Any:
    """What each worker asks of a Ray node: its trials' config's CPUs and GPUs (None
    locally)."""
    if cluster is None:
        return None
    cfg = compose([*spec.base(), *spec.run_overrides()], validate_config=False)
    return [cluster.resources_of(cfg)] * workers


def _study_progress(study: optuna.Study, n_trials: int | None) -> Any:
    """The driver's progress line on a cluster: trials, from the shared storage."""
    countdown = Countdown(n_trials, progress(study)[0])

    def describe(done: int, running: int | None, failed: int) -> str:
        trials = study.get_trials(deepcopy=False)
        counted = sum(counts(t) for t in trials)
        live = sum(t.state == TrialState.RUNNING for t in trials)
        bad = sum(t.state == TrialState.FAIL for t in trials)
        return (
            f"{counted}/{n_trials if n_trials is not None else '?'} trials done, {live} "
            f"running, {bad} failed; {done} worker task(s) ended "
            f"[{countdown.update(counted)}]"
        )

    return describe


def _parent_reason(err: BaseException) -> str:
    """Why the study's parent run ended early: the workers' error, or Ctrl-C."""
    return "interrupted" if isinstance(err, KeyboardInterrupt) else str(err)[:500]
