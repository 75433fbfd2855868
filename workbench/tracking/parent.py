"""Parent runs: the run a study's trials, or an ablation's variant x seed runs, hang under.

A parent run is created once and reopened each time its study or ablation is run again, so
one run tree holds all of it. Several worker processes may write to it (a study's study/*
metrics, stepped by trial number so no two write one point); each write goes straight to
the store. Opening and ending it is the launcher's job only.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from workbench.tracking.redact import redact
from workbench.tracking.store import resolve_uri
from workbench.tracking.tags import git_info
from workbench.tracking.writer import RunHandle, Tracker, make_tracker

if TYPE_CHECKING:
    from workbench.config import TrackingConfig

log = logging.getLogger(__name__)

REOPEN_REASON = "resumed"


class ParentRun:
    """A study's or an ablation's parent run: started by ``open``, or a worker's handle on it."""

    def __init__(self, uri: str, run_id: str, tracker: Tracker | None = None):
        self.uri, self.run_id, self._tracker = uri, run_id, tracker
        self._handle = RunHandle(uri, run_id)

    @classmethod
    def open(
        cls,
        tracking: TrackingConfig,
        *,
        run_name: str,
        existing: str | None,
        params: Mapping[str, Any],
        tags: Mapping[str, str],
        texts: Mapping[str, str] | None = None,
    ) -> ParentRun:
        """Reopen ``existing`` (a resumed study, a re-run ablation) if the store has it, else
        start a new run called ``run_name`` in ``tracking.experiment``.

        A reopened run gets the params it lacks and ``tags`` again; a new one also gets the
        git tags and ``texts`` (artifact file -> content, e.g. the spec).
        """
        uri = resolve_uri(tracking.uri, tracking.dir)
        if existing:
            handle = RunHandle(uri, existing)
            if handle.reopen(reason=REOPEN_REASON):
                handle.add_params(params)
                handle.set_tags(tags)
                return cls(uri, existing)
            log.warning("parent run %s is not in %s: starting a new one", existing, redact(uri))
        tracker = make_tracker(tracking, run_name=run_name)
        tracker.start(params=params, tags={**git_info(), **tags})
        for artifact_file, text in (texts or {}).items():
            tracker.log_text(text, artifact_file)
        if tracker.run_id is None:
            raise ValueError(f"tracking.backend={tracking.backend!r}: a parent run needs MLflow")
        return cls(uri, tracker.run_id, tracker)

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        # straight to the store: several workers write this run, none owns it
        self._handle.log_metrics(metrics, step)

    def log_artifact(self, local_path: str | Path, artifact_path: str | None = None) -> None:
        self._handle.log_artifact(local_path, artifact_path)

    def log_artifacts(self, local_dir: str | Path, artifact_path: str | None = None) -> None:
        self._handle.log_artifacts(local_dir, artifact_path)

    def log_image(self, png: str | Path, key: str, step: int) -> None:
        self._handle.log_image(png, key, step)

    def set_tags(self, tags: Mapping[str, str]) -> None:
        self._handle.set_tags(tags)

    def end(self, status: str, reason: str | None = None) -> str | None:
        if self._tracker is not None:
            return self._tracker.end(status, reason)
        error = self._handle.end(status, reason)
        if reason is None and error is None:  # a reopened run that ends well: "resumed" no
            self._handle.clear_reason()  # longer says why
        return error
