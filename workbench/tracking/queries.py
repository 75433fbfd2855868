"""Reading runs back: search and compare them, fetch a metric's history or a run's artifacts."""

from __future__ import annotations

import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from workbench.tracking.redact import _one_line, redact
from workbench.tracking.store import TrackingError, _client, _sqlite_path


@dataclass
class RunRecord:
    """What comparisons need of a run, read once from the store."""

    run_id: str
    run_name: str
    experiment_id: str
    status: str
    params: dict[str, str]
    metrics: dict[str, float]  # latest value of each metric
    tags: dict[str, str]
    artifact_uri: str = ""


def require_store(uri: str) -> None:
    """ValueError if ``uri`` is an embedded store that does not exist: a reader must not make
    an empty one where the user pointed by mistake."""
    db = _sqlite_path(uri)
    if db is not None and not db.exists():
        raise ValueError(
            f"no MLflow store at {db}: run commands where `workbench train` ran, or pass "
            "--tracking-uri (or set MLFLOW_TRACKING_URI)"
        )


def list_experiments(uri: str) -> list[tuple[str, str]]:
    """(name, id) of every active experiment in the store, oldest first; [] if it cannot be read."""
    db = _sqlite_path(uri)
    if db is not None and not db.exists():
        return []
    try:
        client = _client(uri)
        found = client.search_experiments()
    except Exception:
        return []
    return sorted(
        ((e.name, e.experiment_id) for e in found), key=lambda e: int(e[1]) if e[1].isdigit() else 0
    )


def search_runs(
    uri: str,
    *,
    experiments: Sequence[str] = (),
    filter_string: str = "",
    run_ids: Sequence[str] = (),
    max_results: int = 5000,
) -> list[RunRecord]:
    """Runs by experiment names (all experiments when none), MLflow filter, or explicit ids."""
    client = _client(uri)
    records: list[RunRecord] = []
    if run_ids:
        for run_id in run_ids:
            try:
                records.append(_record(client.get_run(run_id)))
            except Exception as err:
                raise ValueError(f"no run {run_id} in {redact(uri)}: {_one_line(err)}") from None
        return records
    if experiments:
        ids = []
        for name in experiments:
            exp = client.get_experiment_by_name(name)
            if exp is None:
                known = ", ".join(e.name for e in client.search_experiments()) or "none"
                raise ValueError(f"no experiment named {name!r} (experiments: {known})")
            ids.append(exp.experiment_id)
    else:
        ids = [e.experiment_id for e in client.search_experiments()]
    try:
        runs = client.search_runs(ids, filter_string=filter_string, max_results=max_results)
    except Exception as err:
        raise ValueError(f"bad filter {filter_string!r}: {_one_line(err)}") from None
    return [_record(r) for r in runs]


def _record(run: Any) -> RunRecord:
    return RunRecord(
        run_id=run.info.run_id,
        run_name=run.info.run_name or "",
        experiment_id=run.info.experiment_id,
        status=run.info.status,
        params=dict(run.data.params),
        metrics=dict(run.data.metrics),
        tags=dict(run.data.tags),
        artifact_uri=run.info.artifact_uri or "",
    )


def metric_history(uri: str, run_id: str, key: str) -> list[tuple[int, float]]:
    """All points of one metric of a run, as (step, value) sorted by step."""
    client = _client(uri)
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))


def _moved_artifacts(db: Path, artifact_uri: str) -> Path | None:
    """A run's artifact folder in an embedded store that was moved or copied (an archive):
    its db keeps the absolute paths of where the runs were made, so look for the same
    ``<experiment>/<run>/artifacts`` below this store's ``artifacts/``. None: not moved."""
    from urllib.parse import urlparse

    parsed = urlparse(artifact_uri)
    if parsed.scheme not in ("", "file") or Path(parsed.path).exists():
        return None
    here = db.parent / "artifacts" / Path(*Path(parsed.path).parts[-3:])
    return here if here.is_dir() else None


def download_artifacts(uri: str, run_id: str, artifact_path: str, dst: Path) -> Path:
    """Fetch a run's artifacts (``workbench eval <run-id>``); ValueError if there is no such run
    or artifact, TrackingError if the store cannot be reached."""
    from mlflow.exceptions import MlflowException

    db = _sqlite_path(uri)
    if db is not None and not db.exists():
        raise ValueError(f"no run {run_id} in {redact(uri)} (the store does not exist)")
    client = _client(uri)
    try:
        run = client.get_run(run_id)
    except MlflowException as err:
        if err.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
            raise ValueError(f"no run {run_id} in {redact(uri)}") from None
        raise TrackingError(
            f"cannot read run {run_id} from {redact(uri)}: {_one_line(err)}"
        ) from None
    dst = Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    moved = _moved_artifacts(db, run.info.artifact_uri) if db is not None else None
    if moved is not None:
        found = moved / artifact_path
        if not found.exists():
            raise ValueError(f"run {run_id} in {redact(uri)} has no artifact {artifact_path!r}")
        target = dst / found.name
        if found.is_dir():
            shutil.copytree(found, target, dirs_exist_ok=True)
        else:
            shutil.copy2(found, target)
        return target
    try:
        local = client.download_artifacts(run_id, artifact_path, dst_path=str(dst))
    except (MlflowException, OSError) as err:
        raise ValueError(
            f"run {run_id} in {redact(uri)} has no artifact {artifact_path!r} ({_one_line(err)})"
        ) from None
    return Path(local)
