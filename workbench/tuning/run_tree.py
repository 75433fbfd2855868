"""The study's MLflow run tree: one parent run per study, one child run per trial, and each
seed of a trial as a run nested under its trial run.

    study-<name>                     parent: the spec, study/* metrics by trial number, report/
    ├── trial-0000                   child: sampled params, the reported curve, score, state tag
    │   ├── trial-0000-s0            the train() run of seed 0 (full metrics, artifacts)
    │   └── trial-0000-s1
    └── trial-0001 ...

Several worker processes write to the parent run. Each writes only the metric points stepped
by the trial numbers it ran, and MLflow appends points, so no two processes write one point.
Ending and reopening the parent happens in the launcher only. The parent is a
``workbench.tracking.ParentRun``, as an ablation's is; this module adds what is study-specific.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from workbench.config import TrackingConfig
from workbench.tracking import (
    MlflowTracker,
    ParentRun,
    RunHandle,
    Tracker,
    make_tracker,
)
from workbench.tracking.tags import ROLE_TAG, STUDY_TAG, TRIAL_TAG
from workbench.tracking.tags import TRIAL_STATE_TAG as STATE_TAG

log = logging.getLogger(__name__)


def trial_run_name(number: int) -> str:
    return f"trial-{number:04d}"


def parent_logger(uri: str, run_id: str) -> ParentRun:
    """A worker's handle on the parent run, for study/* metrics only."""
    return ParentRun(uri, run_id)


def end_abandoned_trial(uri: str, trial_run_id: str, reason: str) -> None:
    """End a dead worker's trial run and its RUNNING seed runs as FAILED."""
    try:
        handle = RunHandle(uri, trial_run_id)
    except Exception as err:
        log.warning("could not end the MLflow runs of a dead worker's trial: %s", err)
        return
    handle.end_with_running_children("FAILED", reason)
    handle.set_tags({STATE_TAG: "failed"})


def start_trial_run(
    tracking: TrackingConfig,
    *,
    number: int,
    parent_run_id: str | None,
    params: Mapping[str, Any],
    tags: Mapping[str, str],
) -> Tracker:
    from workbench.parallel import placement_tags

    tracker = make_tracker(tracking, run_name=trial_run_name(number), parent_run_id=parent_run_id)
    # on a Ray cluster: the job, task and node that trains it (none locally)
    tracker.start(params=params, tags={**tags, **placement_tags()})
    return tracker


__all__ = [
    "ROLE_TAG",
    "STATE_TAG",
    "STUDY_TAG",
    "TRIAL_TAG",
    "MlflowTracker",
    "ParentRun",
    "end_abandoned_trial",
    "parent_logger",
    "start_trial_run",
    "trial_run_name",
]
