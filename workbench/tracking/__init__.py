"""The one package that talks to MLflow: store location, runs, metrics, artifacts, run trees.

Everything else hands a ``Tracker`` plain ``dict[str, float]`` at an env step.

    store     where the store is, probes that fail fast, the store lock
    redact    credentials out of anything printed, logged or stored
    tags      every tag name, defined once; the git tags of a run
    status    run statuses, ``StopRun``, and ``ends_run``: end a run by how its block ended
    writer    ``Tracker``, ``NullTracker``, ``MlflowTracker`` (batched metrics, exit hooks),
              ``RunHandle`` (runs this process did not start), ``make_tracker``
    parent    ``ParentRun``: the parent run of a study or an ablation, created or reopened
    queries   ``search_runs``, ``require_store``, ``metric_history``, ``download_artifacts``
    ui        what the MLflow UI shows: ``runs_view_url`` (every link printed), experiment
              descriptions
"""

from workbench.tracking.parent import ParentRun
from workbench.tracking.queries import (
    RunRecord,
    download_artifacts,
    list_experiments,
    metric_history,
    require_store,
    search_runs,
)
from workbench.tracking.redact import redact
from workbench.tracking.status import STATUSES, Ending, StopRun, ends_run
from workbench.tracking.store import (
    LOCK_TIMEOUT_S,
    PROBE_TIMEOUT_S,
    TrackingError,
    driver_url,
    embedded_uri,
    probe_store,
    resolve_uri,
)
from workbench.tracking.tags import (
    EXPERIMENT_KIND,
    EXPERIMENT_KIND_TAG,
    NOTE_TAG,
    PARENT_TAG,
    REASON_TAG,
    git_info,
    run_name,
    run_tags,
)
from workbench.tracking.ui import (
    describe_experiment,
    experiment_line,
    runs_view_line,
    runs_view_url,
    ui_base_url,
    ui_command,
)
from workbench.tracking.writer import (
    EXIT_REASON,
    MAX_KEY_LEN,
    MAX_METRICS_PER_BATCH,
    MAX_PARAM_LEN,
    MAX_PARAMS_PER_BATCH,
    MAX_REASON_LEN,
    MAX_TAG_LEN,
    MlflowTracker,
    NullTracker,
    RunHandle,
    Tracker,
    make_tracker,
)

__all__ = [
    "EXIT_REASON",
    "EXPERIMENT_KIND",
    "EXPERIMENT_KIND_TAG",
    "LOCK_TIMEOUT_S",
    "MAX_KEY_LEN",
    "MAX_METRICS_PER_BATCH",
    "MAX_PARAMS_PER_BATCH",
    "MAX_PARAM_LEN",
    "MAX_REASON_LEN",
    "MAX_TAG_LEN",
    "NOTE_TAG",
    "PARENT_TAG",
    "PROBE_TIMEOUT_S",
    "REASON_TAG",
    "STATUSES",
    "Ending",
    "MlflowTracker",
    "NullTracker",
    "ParentRun",
    "RunHandle",
    "RunRecord",
    "StopRun",
    "Tracker",
    "TrackingError",
    "describe_experiment",
    "download_artifacts",
    "driver_url",
    "embedded_uri",
    "ends_run",
    "experiment_line",
    "git_info",
    "list_experiments",
    "make_tracker",
    "metric_history",
    "probe_store",
    "redact",
    "require_store",
    "resolve_uri",
    "run_name",
    "run_tags",
    "runs_view_line",
    "runs_view_url",
    "search_runs",
    "ui_base_url",
    "ui_command",
]
