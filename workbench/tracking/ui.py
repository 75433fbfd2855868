"""What a researcher sees of the store in the MLflow UI: links to runs, experiment descriptions.

MLflow 3's UI (3.17 and 3.18 read alike) opens an experiment on its GenAI view unless the
browser was switched to "Model training" (localStorage ``mlflow.workflowType``); it ignores the
experiment's ``mlflow.experimentKind`` tag. A ``?workflowType=machine_learning`` query in the
link wins over the browser's setting, so every link workbench prints is built here with it.
"""

from __future__ import annotations

from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

from workbench.tracking.redact import _one_line, redact
from workbench.tracking.store import _client
from workbench.tracking.tags import NOTE_TAG
from workbench.tracking.writer import _call_bounded

DEFAULT_UI_URL = "http://127.0.0.1:5000"  # where `workbench ui` serves by default
DEFAULT_STORE_DIR = "mlruns"
LOOKUP_TIMEOUT_S = 5.0
_WILDCARD_HOSTS = ("0.0.0.0", "::", "[::]", "")


def ui_base_url(host: str, port: int) -> str:
    """The address a browser on this machine reaches a server bound to ``host:port`` by."""
    if host in _WILDCARD_HOSTS:
        host = "127.0.0.1"
    elif ":" in host and not host.startswith("["):
        host = f"[{host}]"  # an IPv6 literal
    return f"http://{host}:{port}"


def runs_view_url(tracking_uri: str, experiment_id: str, *, ui_url: str = DEFAULT_UI_URL) -> str:
    """The link that opens experiment ``experiment_id`` on its Runs table, from a fresh browser
    profile too. An http(s) tracking URI is a server with its own UI (its credentials are left
    out of the link); any other store (sqlite, PostgreSQL) is served by ``workbench ui`` at
    ``ui_url``."""
    parts = urlsplit(tracking_uri)
    if parts.scheme in ("http", "https"):
        netloc = parts.netloc.rpartition("@")[2]  # user:password@ never goes in a link
        base = urlunsplit((parts.scheme, netloc, parts.path.rstrip("/"), "", ""))
    else:
        base = ui_url.rstrip("/")
    return f"{base}/#/experiments/{experiment_id}?workflowType=machine_learning"


def ui_command(tracking_uri: str, store_dir: str | Path = DEFAULT_STORE_DIR) -> str | None:
    """The ``workbench ui`` command that serves ``tracking_uri``; None for a server (it has one)."""
    if urlsplit(tracking_uri).scheme in ("http", "https"):
        return None
    store = Path(store_dir).expanduser().resolve()
    if tracking_uri == f"sqlite:///{store / 'mlflow.db'}":
        same = store == Path(DEFAULT_STORE_DIR).resolve()
        return "workbench ui" if same else f"workbench ui --dir {store_dir}"
    return f"workbench ui --uri '{redact(tracking_uri)}'"


def runs_view_line(
    tracking_uri: str, run_id: str | None, store_dir: str | Path = DEFAULT_STORE_DIR
) -> str | None:
    """``MLflow UI: <link to the run's experiment> (after `workbench ui`)`` for the end of a
    command; None when there is no run or the store does not answer (a link is not worth an
    error at the end of finished work)."""
    if not run_id:
        return None
    found: list[str] = []

    def look_up() -> None:
        found.append(_client(tracking_uri).get_run(run_id).info.experiment_id)

    # MLflow retries a dead server for minutes; a link is worth a few seconds at most
    if _call_bounded(look_up, LOOKUP_TIMEOUT_S) is not None or not found:
        return None
    return experiment_line(tracking_uri, found[0], store_dir)


def experiment_line(
    tracking_uri: str, experiment_id: str, store_dir: str | Path = DEFAULT_STORE_DIR
) -> str:
    """``MLflow UI: <link> (after `workbench ui`)`` for an experiment already looked up."""
    line = f"MLflow UI: {runs_view_url(tracking_uri, experiment_id)}"
    command = ui_command(tracking_uri, store_dir)
    return f"{line} (after `{command}`)" if command else line


def describe_experiment(tracking_uri: str, run_id: str, description: str) -> str | None:
    """Show ``description`` (a study's or an ablation's) as the description of the experiment
    that holds ``run_id``; a description the user wrote in the UI is kept. Returns why not,
    or None: a label is no reason to stop the work."""
    if not description.strip():
        return None
    try:
        client = _client(tracking_uri)
        experiment = client.get_experiment(client.get_run(run_id).info.experiment_id)
        if not experiment.tags.get(NOTE_TAG, "").strip():
            client.set_experiment_tag(experiment.experiment_id, NOTE_TAG, description.strip())
    except Exception as err:
        return _one_line(err)
    return None
