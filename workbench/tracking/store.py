"""Where the MLflow store is and whether it can be used: URI resolution, the embedded sqlite
store, quick probes of remote stores, and the one way to open a client.

Probes fail in seconds where MLflow's own HTTP and database retries take minutes to give up.
First use of a fresh sqlite db is guarded by a file lock: concurrent migrations corrupt it
(mlflow #4123).
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlparse

from filelock import FileLock
from filelock import Timeout as FileLockTimeout

from workbench.errors import RuntimeFailure
from workbench.tracking.redact import _one_line, redact

if TYPE_CHECKING:
    from mlflow.tracking import MlflowClient

# First use of a fresh db logs alembic's migration chatter at INFO, not news to the user.
for _name in ("alembic", "alembic.runtime.migration"):
    logging.getLogger(_name).setLevel(logging.WARNING)
# This one says "Creating initial MLflow database tables...", and logs a failed query with
# its traceback and SQL before MLflow raises it: the error reaches the user once, as ours.
logging.getLogger("mlflow.store.db.utils").setLevel(logging.CRITICAL)

PROBE_TIMEOUT_S = 5
LOCK_TIMEOUT_S = 120.0

# MLflow's HTTP client retries a dead server 7 times with backoff, 120 s per try (~4 min
# before a call fails). Ours: 4 quick retries (1+2+4+8 s) and 30 s per try, unless the user
# set them. MLflow also prints "View run ... at: <tracking URI>" when a run ends, with any
# credentials in that URI (and a link that opens the UI's GenAI view): off.
MLFLOW_DEFAULTS = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "4",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "30",
    "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",  # a bar per download, on stderr
}
for _key, _value in MLFLOW_DEFAULTS.items():
    os.environ.setdefault(_key, _value)
os.environ["MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT"] = "true"


class TrackingError(RuntimeFailure):
    """The tracking store cannot be used; the message says which (redacted) URI and why."""


REACH_HINT = "is it running? Or point tracking.uri (or MLFLOW_TRACKING_URI) at one that is"


def embedded_uri(store_dir: str | Path) -> str:
    """``sqlite:////abs/store_dir/mlflow.db``: absolute, so it means the same from any cwd."""
    path = Path(store_dir).expanduser().resolve()
    path.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{path / 'mlflow.db'}"


def driver_url(url: str) -> str:
    """``postgresql://`` with the driver we declare: SQLAlchemy 2.1 maps a bare
    ``postgresql://`` to psycopg 3, while the ``postgres`` extra installs psycopg2."""
    scheme, sep, rest = url.partition("://")
    if sep and scheme in ("postgresql", "postgres"):
        import importlib.util

        if importlib.util.find_spec("psycopg") is None and importlib.util.find_spec("psycopg2"):
            return f"postgresql+psycopg2://{rest}"
    return url


def resolve_uri(uri: str | None, store_dir: str | Path) -> str:
    """The explicit URI, else ``MLFLOW_TRACKING_URI``, else the embedded store in ``store_dir``.
    A plain path names an embedded store too, by its folder or its ``mlflow.db`` (MLflow would
    take a folder for its deprecated file store, which is not how ``mlruns/`` is kept)."""
    given = uri or os.environ.get("MLFLOW_TRACKING_URI", "").strip()
    if not given:
        return embedded_uri(store_dir)
    if "://" not in given and not given.startswith(("sqlite:", "file:")):
        path = Path(given).expanduser()
        return f"sqlite:///{path.resolve()}" if path.is_file() else embedded_uri(path)
    return driver_url(given)


def _sqlite_path(uri: str) -> Path | None:
    """The db file of a ``sqlite:`` URI; None for other stores and in-memory dbs."""
    if not uri.startswith("sqlite:"):
        return None
    from sqlalchemy.engine import make_url

    database = make_url(uri).database
    if not database or database == ":memory:" or database.startswith("file:"):
        return None
    return Path(database).expanduser().resolve()


def _probe_http(uri: str, experiment: str) -> None:
    """One request, no retries, short timeout: fail in seconds, not after minutes of backoff."""
    from mlflow.utils.credentials import get_default_host_creds
    from mlflow.utils.rest_utils import http_request

    try:
        resp = http_request(
            get_default_host_creds(uri),
            "/api/2.0/mlflow/experiments/get-by-name",
            "GET",
            max_retries=0,
            timeout=PROBE_TIMEOUT_S,
            raise_on_status=False,
            params={"experiment_name": experiment or "Default"},
        )
    except Exception as err:
        raise TrackingError(
            f"cannot reach the MLflow tracking server {redact(uri)}: {_one_line(err)}; "
            + REACH_HINT
        ) from None
    if resp.status_code in (401, 403):
        raise TrackingError(
            f"the MLflow tracking server {redact(uri)} refused the credentials "
            f"(HTTP {resp.status_code}); set MLFLOW_TRACKING_USERNAME/PASSWORD or _TOKEN"
        )
    if resp.status_code == 404 and "error_code" not in resp.text:
        raise TrackingError(
            f"{redact(uri)} answers but is not an MLflow tracking server "
            f"(HTTP 404 for the experiments API); check the host, port and path"
        )
    if resp.status_code >= 500:
        raise TrackingError(
            f"the MLflow tracking server {redact(uri)} is not answering properly "
            f"(HTTP {resp.status_code} {resp.reason})"
        )


def _probe_database(uri: str) -> None:
    """Connect once with a short timeout; MLflow's own engine setup retries for ~100 s."""
    import sqlalchemy

    connect_args: dict[str, Any] = {}
    if uri.startswith(("postgresql", "mysql")):
        connect_args["connect_timeout"] = PROBE_TIMEOUT_S
    elif uri.startswith("mssql"):
        connect_args["timeout"] = PROBE_TIMEOUT_S
    try:
        engine = sqlalchemy.create_engine(uri, connect_args=connect_args)
    except ModuleNotFoundError as err:
        raise TrackingError(
            f"cannot open the MLflow database {redact(uri)}: its driver is not installed "
            f"({err}); e.g. pip install psycopg2-binary for PostgreSQL, pymysql for MySQL"
        ) from None
    except Exception as err:
        raise TrackingError(
            f"cannot open the MLflow database {redact(uri)}: {_one_line(err)}"
        ) from None
    try:
        with engine.connect():
            pass
    except Exception as err:
        orig = getattr(err, "orig", None) or err
        raise TrackingError(
            f"cannot reach the MLflow database {redact(uri)}: {_one_line(orig)}; " + REACH_HINT
        ) from None
    finally:
        engine.dispose()


def probe_store(uri: str, experiment: str) -> None:
    """Raise TrackingError in seconds if the store at ``uri`` cannot be used.

    One quick request: MLflow's own client retries an unreachable server for minutes.
    """
    scheme = urlparse(uri).scheme.lower()
    if scheme in ("http", "https"):
        _probe_http(uri, experiment)
    elif scheme.split("+")[0] in ("postgresql", "postgres", "mysql", "mssql"):
        _probe_database(uri)


@contextlib.contextmanager
def _store_lock(uri: str):
    """Serialize first use of a local sqlite db across processes (migrations race)."""
    db = _sqlite_path(uri)
    if db is None:
        yield
        return
    lock = FileLock(str(db) + ".lock", timeout=LOCK_TIMEOUT_S)
    try:
        db.parent.mkdir(parents=True, exist_ok=True)
        lock.acquire()
    except FileLockTimeout:
        raise TrackingError(
            f"waited {LOCK_TIMEOUT_S:.0f} s for {lock.lock_file} while opening {redact(uri)}; "
            "is another process stuck creating the store?"
        ) from None
    except OSError as err:
        # a read-only store or archive: nobody migrates it, so there is nothing to guard
        if err.errno not in (errno.EROFS, errno.EACCES, errno.EPERM) or not db.is_file():
            raise TrackingError(f"cannot open the MLflow store {redact(uri)}: {err}") from None
        lock = None
    try:
        yield
    finally:
        if lock is not None:
            lock.release()


def _client(uri: str, *, probe: bool = True) -> MlflowClient:
    """An MlflowClient; constructing it opens (and on first use, migrates) the store.
    ``probe``: first one quick request, so that a dead server or database fails in seconds."""
    from mlflow.tracking import MlflowClient

    if probe:
        probe_store(uri, "Default")
    with _store_lock(uri):
        try:
            return MlflowClient(tracking_uri=uri)
        except TrackingError:
            raise
        except Exception as err:
            raise TrackingError(
                f"cannot open the MLflow store {redact(uri)}: {_one_line(err)}"
            ) from None


def _dispose_engines_after_fork() -> None:
    """A forked child must not reuse the parent's pooled sqlite/db connections."""
    store_mod = sys.modules.get("mlflow.store.tracking.sqlalchemy_store")
    engines = getattr(getattr(store_mod, "SqlAlchemyStore", None), "_engine_map", {})
    for engine in list(engines.values()):
        with contextlib.suppress(Exception):
            engine.dispose(close=False)


os.register_at_fork(after_in_child=_dispose_engines_after_fork)
