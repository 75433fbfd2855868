"""Optuna plumbing: samplers, pruners, storage, and which trials count toward a study's total.

Storage. The default is an SQLite file per study, ``<tracking.dir>/optuna/<study>.db``, opened
through ``RDBStorage`` with a heartbeat. Why not ``JournalStorage(JournalFileBackend)``, which is
built for several local processes? It has no heartbeat: a worker killed with ``kill -9`` leaves
its trial RUNNING forever, and a study that counts trials would either never finish or count a
trial that never ran. With RDBStorage every running trial beats every ``heartbeat.interval``
seconds; a trial silent for ``heartbeat.grace_period`` seconds is failed by the next worker that
looks, and ``RetryHeartbeatStaleTrialCallback`` enqueues it again with the same parameters.
SQLite serializes writes with a file lock, which is plenty for a handful of local workers that
write a few rows a minute (a busy timeout covers the rare collision). Across machines the same
code takes a ``postgresql://`` URL.

Counting. ``n_trials`` counts trials that reached a verdict: COMPLETE, PRUNED, or FAIL with a
reason we recorded (diverged, bad config). A trial failed because its worker died, was
interrupted, or started after the count was already reached ("surplus") does not count, so
re-running the command, or a retry, fills the gap and the study ends at exactly ``n_trials``.
"""

from __future__ import annotations

import logging
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import optuna
import sqlalchemy.exc
from optuna.trial import FrozenTrial, TrialState

from workbench.errors import RuntimeFailure
from workbench.tracking import driver_url, redact
from workbench.tuning.components import component_class

if TYPE_CHECKING:
    from workbench.tuning.spec import StudySpec

log = logging.getLogger(__name__)

SCHEMA_RACE_TRIES = 5  # opening a storage whose tables another process is creating
FAIL_REASON = "workbench.fail_reason"  # user attr: why a trial failed (it counts)
PRUNE_REASON = "workbench.prune_reason"
ERROR_ATTR = "workbench.error"  # user attr: broke for a reason unrelated to its params
SURPLUS = "workbench.surplus"  # user attr: started after the count was reached
ENV_STEPS = "workbench.env_steps"
OVERRIDES = "workbench.overrides"
MLFLOW_RUN = "workbench.mlflow_run_id"
SEED_SCORES = "workbench.seed_scores"
SPEC_ATTR = "workbench.spec"
PARENT_ATTR = "workbench.mlflow_parent_run_id"
SQLITE_BUSY_TIMEOUT_S = 60


def make_sampler(spec: StudySpec, worker_index: int = 0) -> optuna.samplers.BaseSampler:
    """Seeded sampler. Each worker gets ``seed + worker_index`` so two processes never draw the
    same random points — except QMC, whose points are indexed by trial number and must share
    one seed to form one low-discrepancy sequence."""
    cls, _ = component_class("sampler", spec.sampler)
    args = dict(spec.sampler_args)
    seed = args.pop("seed", 0)
    if seed is not None and spec.sampler != "qmc":
        seed = int(seed) + worker_index
    if spec.sampler == "tpe":
        args.setdefault("multivariate", True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return cls(seed=seed, **args)


def make_pruner(spec: StudySpec) -> optuna.pruners.BasePruner:
    cls, _ = component_class("pruner", spec.pruner)
    args = dict(spec.pruner_args)
    if spec.pruner == "percentile":
        args.setdefault("percentile", 25.0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return cls(**args)


def default_storage(spec: StudySpec, tracking_dir: str | Path) -> str:
    path = Path(tracking_dir).expanduser().resolve() / "optuna" / f"{spec.name}.db"
    return f"sqlite:///{path}"


def make_storage(
    url: str,
    *,
    heartbeat_interval: int,
    grace_period: int,
    on_stale: Callable[[optuna.Study, FrozenTrial], None] | None = None,
) -> optuna.storages.RDBStorage:
    """RDBStorage with heartbeat and retry of stale trials; tables created on first use."""
    engine_kwargs: dict[str, Any] = {}
    if url.startswith("sqlite:"):
        db = url.removeprefix("sqlite:///")
        Path(db).parent.mkdir(parents=True, exist_ok=True)
        engine_kwargs["connect_args"] = {"timeout": SQLITE_BUSY_TIMEOUT_S}
    elif url.startswith(("postgresql", "postgres")):
        engine_kwargs["connect_args"] = {"connect_timeout": 10}
        engine_kwargs["pool_pre_ping"] = True
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        retry = optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=3)

    def stale(study: optuna.Study, trial: FrozenTrial) -> None:
        log.warning(
            "trial %d stopped sending heartbeats (its worker died); failed and re-enqueued",
            trial.number,
        )
        retry(study, trial)
        if on_stale is not None:
            on_stale(study, trial)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        try:
            for attempt in range(SCHEMA_RACE_TRIES):
                try:
                    return optuna.storages.RDBStorage(
                        driver_url(url),
                        engine_kwargs=engine_kwargs,
                        heartbeat_interval=heartbeat_interval,
                        grace_period=grace_period,
                        heartbeat_stale_trial_callback=stale,
                    )
                except (sqlalchemy.exc.IntegrityError, sqlalchemy.exc.OperationalError) as err:
                    # another process is creating the tables of a new storage at this moment
                    # (workers, or a reader, starting together): once it is done, they are there
                    raced = isinstance(err, sqlalchemy.exc.IntegrityError) or (
                        "already exists" in str(err)
                    )
                    if not raced or attempt == SCHEMA_RACE_TRIES - 1:
                        raise
                    time.sleep(0.5 * (attempt + 1))
        except ModuleNotFoundError as err:
            raise RuntimeFailure(
                f"storage {redact(url)}: its database driver is not installed ({err}); "
                'for PostgreSQL: pip install "workbench[postgres]"'
            ) from None
        except Exception as err:
            msg = " ".join(str(getattr(err, "orig", err)).split())[:300]
            raise RuntimeFailure(f"cannot open the Optuna storage {redact(url)}: {msg}") from None


def open_study(
    spec: StudySpec, storage: optuna.storages.BaseStorage, worker_index: int = 0
) -> optuna.Study:
    """Create the study or join it; concurrent creators settle on one (load_if_exists)."""
    # Our own log line per trial says what happened; Optuna's repeats it with a traceback.
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    return optuna.create_study(
        storage=storage,
        study_name=spec.name,
        direction=spec.objective.direction,
        sampler=make_sampler(spec, worker_index),
        pruner=make_pruner(spec),
        load_if_exists=True,
    )


def counts(trial: FrozenTrial) -> bool:
    """Does this trial count toward n_trials? (see the module docstring)"""
    if trial.state in (TrialState.COMPLETE, TrialState.PRUNED):
        return True
    return trial.state == TrialState.FAIL and FAIL_REASON in trial.user_attrs


def visible(trial: FrozenTrial) -> bool:
    """Trials a report shows: everything but surplus starts and leftovers still waiting."""
    return trial.state != TrialState.WAITING and not trial.user_attrs.get(SURPLUS)


def state_name(trial: FrozenTrial) -> str:
    if trial.state == TrialState.FAIL and ERROR_ATTR in trial.user_attrs:
        return "error (not counted)"
    if trial.state == TrialState.FAIL and FAIL_REASON not in trial.user_attrs:
        return "stopped (not counted)"
    return {
        TrialState.COMPLETE: "complete",
        TrialState.PRUNED: "pruned",
        TrialState.FAIL: "failed",
        TrialState.RUNNING: "running",
        TrialState.WAITING: "waiting",
    }[trial.state]


def progress(study: optuna.Study) -> tuple[int, int, int]:
    """(counted, running, waiting) trials right now."""
    trials = study.get_trials(deepcopy=False)
    done = sum(counts(t) for t in trials)
    running = sum(t.state == TrialState.RUNNING for t in trials)
    waiting = sum(t.state == TrialState.WAITING for t in trials)
    return done, running, waiting


def completed(study: optuna.Study) -> list[FrozenTrial]:
    return [t for t in study.get_trials(deepcopy=False) if t.state == TrialState.COMPLETE]


def best_trial(study: optuna.Study) -> FrozenTrial | None:
    done = completed(study)
    if not done:
        return None
    key = (lambda t: t.value) if study.direction.name == "MAXIMIZE" else (lambda t: -t.value)
    return max(done, key=key)
