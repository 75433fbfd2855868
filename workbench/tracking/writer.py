"""Writing runs: the ``Tracker`` seam training code talks to, its in-memory and MLflow
implementations, and ``RunHandle`` for runs this process did not start.

``MlflowTracker`` uses ``MlflowClient`` only (the fluent API keeps a thread-local active-run
stack, and trials run in worker threads and processes), queues metric points that a writer
thread sends with ``log_batch`` (a per-point ``log_metric`` costs ~9 ms on sqlite, and a store
outage must not stall training), and makes sure no run is left RUNNING when the process exits.
One writer thread per process serves every run the process tracks (``_Writer``): a population
of K members, or a study's parent and trials, is one writer sending one batch per run.
"""

from __future__ import annotations

import atexit
import contextlib
import getpass
import logging
import multiprocessing.util
import os
import re
import sys
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable
from urllib.parse import unquote, urlparse

from workbench.tracking.redact import _one_line, redact
from workbench.tracking.status import STATUSES, _check_status
from workbench.tracking.store import (
    TrackingError,
    _client,
    _sqlite_path,
    _store_lock,
    probe_store,
    resolve_uri,
)
from workbench.tracking.tags import (
    EXPERIMENT_KIND,
    EXPERIMENT_KIND_TAG,
    GIT_COMMIT_TAG,
    NOTE_TAG,
    PARENT_TAG,
    REASON_TAG,
    SOURCE_GIT_COMMIT_TAG,
    SOURCE_NAME_TAG,
    SOURCE_TYPE_TAG,
    USER_TAG,
)

if TYPE_CHECKING:
    from matplotlib.figure import Figure
    from mlflow.entities import Metric, Param
    from mlflow.tracking import MlflowClient

    from workbench.config import TrackingConfig

log = logging.getLogger(__name__)

MAX_PARAMS_PER_BATCH = 100  # MLflow REST limit (also for tags)
MAX_METRICS_PER_BATCH = 1000  # MLflow REST limit
MAX_PARAM_LEN = 6000
MAX_TAG_LEN = 8000
MAX_REASON_LEN = 5000
MAX_KEY_LEN = 250
EXIT_REASON = "process exited without ending the run"


@runtime_checkable
class Tracker(Protocol):
    """What training, tuning and ablation code may ask of a tracker."""

    run_id: str | None

    def start(self, *, params: Mapping[str, Any], tags: Mapping[str, str]) -> str | None: ...

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None: ...

    def log_artifact(self, local_path: str | Path, artifact_path: str | None = None) -> None: ...

    def log_artifacts(self, local_dir: str | Path, artifact_path: str | None = None) -> None: ...

    def log_text(self, text: str, artifact_file: str) -> None: ...

    def log_figure(self, fig: Figure, artifact_file: str) -> None: ...

    def set_tags(self, tags: Mapping[str, str]) -> None: ...

    def flush(self) -> None: ...

    def end(self, status: str = "FINISHED", reason: str | None = None) -> str | None:
        """End the run (never raises on store errors); the store's error if it could not
        take the ending, else None."""
        ...


_KEY_OK = re.compile(r"^[/\w.\- :]*$")


def _check_metric_key(key: str) -> None:
    """Reject a key MLflow would refuse, here, instead of poisoning the buffer."""
    norm = os.path.normpath(key) if key else ""
    if (
        not isinstance(key, str)
        or not key
        or len(key) > MAX_KEY_LEN
        or not _KEY_OK.match(key)
        or norm != key
        or key.startswith(("/", ".."))
    ):
        raise ValueError(
            f"metric key {key!r}: use up to {MAX_KEY_LEN} letters, digits, _ - . : space and "
            "single / between parts (e.g. 'eval/return_mean')"
        )


def _clean_key(key: str) -> str:
    """Make a param/tag key acceptable to MLflow (config keys normally already are)."""
    key = re.sub(r"[^/\w.\- :]", "_", str(key)).strip("/") or "_"
    return re.sub(r"/+", "/", key)[:MAX_KEY_LEN]


def _artifact_name(local_path: Path, artifact_path: str | None) -> str:
    return f"{artifact_path.strip('/')}/{local_path.name}" if artifact_path else local_path.name


def _param_batches(params: Mapping[str, Any]) -> list[list[Param]]:
    """Params as MLflow takes them: clean keys, redacted and bounded values, in batches."""
    from mlflow.entities import Param

    cleaned = {_clean_key(k): redact(str(v))[:MAX_PARAM_LEN] for k, v in params.items()}
    items = [Param(k, v) for k, v in cleaned.items()]
    return [items[i : i + MAX_PARAMS_PER_BATCH] for i in range(0, len(items), MAX_PARAMS_PER_BATCH)]


_TEXT_LIMIT = 4 << 20  # bigger files (videos, weights) are not text worth scanning


def _secret_free_text(path: Path) -> str | None:
    """The redacted text of a small text file that holds credentials; None for any other."""
    try:
        if path.stat().st_size > _TEXT_LIMIT:
            return None
        text = path.read_bytes().decode("utf-8")
    except (OSError, UnicodeDecodeError):
        return None
    cleaned = redact(text)
    return cleaned if cleaned != text else None


@contextlib.contextmanager
def _without_secrets(local: Path) -> Any:
    """``local`` (file or folder) as it may be stored: where a text file in it holds a
    password (a spec or config naming a store by URI), a copy with it redacted."""
    import shutil
    import tempfile

    files = [local] if local.is_file() else [p for p in local.rglob("*") if p.is_file()]
    cleaned = {p: t for p in files if (t := _secret_free_text(p)) is not None}
    if not cleaned:
        yield local
        return
    with tempfile.TemporaryDirectory(prefix="workbench-redacted-") as tmp:
        copy = Path(tmp) / local.name
        if local.is_file():
            shutil.copy2(local, copy)
        else:
            shutil.copytree(local, copy)
        for path, text in cleaned.items():
            target = copy if local.is_file() else copy / path.relative_to(local)
            target.write_text(text, encoding="utf-8")
        yield copy


def _end_tags(status: str, reason: str) -> dict[str, str]:
    """Why a run ended: the reason, and its first line as the run's note in the MLflow UI."""
    first = reason.strip().splitlines()[0] if reason.strip() else reason
    return {REASON_TAG: reason[:MAX_REASON_LEN], NOTE_TAG: f"{status}: {first[:300]}"}


# ----------------------------------------------------------------------------- null tracker


class NullTracker:
    """A tracker that keeps everything in memory: for tests and ``tracking=none``."""

    def __init__(self) -> None:
        self.run_id: str | None = None
        self.started = False
        self.params: dict[str, Any] = {}
        self.tags: dict[str, str] = {}
        self.metrics: dict[str, list[tuple[int, float]]] = {}
        self.artifacts: list[str] = []
        self.texts: dict[str, str] = {}
        self.status: str | None = None
        self.reason: str | None = None

    def start(self, *, params: Mapping[str, Any], tags: Mapping[str, str]) -> str | None:
        self.started = True
        self.params.update(params)
        self.tags.update({k: str(v) for k, v in tags.items()})
        return None

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        for key, value in metrics.items():
            _check_metric_key(key)
            self.metrics.setdefault(key, []).append((int(step), float(value)))

    def log_artifact(self, local_path: str | Path, artifact_path: str | None = None) -> None:
        path = Path(local_path)
        if not path.exists():
            raise FileNotFoundError(path)
        self.artifacts.append(_artifact_name(path, artifact_path))

    def log_artifacts(self, local_dir: str | Path, artifact_path: str | None = None) -> None:
        root = Path(local_dir)
        if not root.is_dir():
            raise NotADirectoryError(root)
        prefix = f"{artifact_path.strip('/')}/" if artifact_path else ""
        for file in sorted(p for p in root.rglob("*") if p.is_file()):
            self.artifacts.append(prefix + file.relative_to(root).as_posix())

    def log_text(self, text: str, artifact_file: str) -> None:
        self.texts[artifact_file] = text
        self.artifacts.append(artifact_file)

    def log_figure(self, fig: Figure, artifact_file: str) -> None:
        self.artifacts.append(artifact_file)

    def set_tags(self, tags: Mapping[str, str]) -> None:
        self.tags.update({k: str(v) for k, v in tags.items()})

    def flush(self) -> None:
        pass

    def end(self, status: str = "FINISHED", reason: str | None = None) -> str | None:
        _check_status(status)
        if self.status is not None:
            return None
        self.status, self.reason = status, reason
        if reason is not None:
            self.tags[REASON_TAG] = reason[:MAX_REASON_LEN]
        return None


# ----------------------------------------------------------------------------- exit hooks

_active: set[MlflowTracker] = set()
_active_lock = threading.Lock()
_hooks_pid: int | None = None


def _end_abandoned_runs() -> None:
    """At exit, end as FAILED every run this process started and did not end."""
    pid = os.getpid()
    with _active_lock:
        abandoned = [t for t in _active if t._pid == pid]
    for tracker in abandoned:
        try:
            tracker.end("FAILED", EXIT_REASON)
        except Exception as err:  # exit must go on
            log.warning("could not end MLflow run %s at exit: %s", tracker.run_id, err)


def _install_exit_hooks() -> None:
    """atexit covers normal exits; the multiprocessing finalizer covers fork workers, which
    leave through os._exit and never run atexit handlers."""
    global _hooks_pid
    pid = os.getpid()
    if _hooks_pid == pid:
        return
    _hooks_pid = pid
    atexit.register(_end_abandoned_runs)
    multiprocessing.util.Finalize(None, _end_abandoned_runs, exitpriority=100)


# ----------------------------------------------------------------------------- the writer


class _Writer:
    """The thread that sends every tracker's queued points: one per process.

    Trackers queue points under ``cv`` (shared by all of them); the thread picks the tracker
    whose points are due and waited longest, sends them with one ``log_batch`` per chunk of
    that run outside the lock, and lets a failing store's tracker back off while the others
    go on. A tracker leaves once it has ended and its points are out (or given up); the thread
    ends when no tracker is left and starts again with the next one. In a forked child the
    parent's thread does not exist: the child starts its own.
    """

    def __init__(self) -> None:
        self._reset()

    def _reset(self) -> None:
        """A fresh writer (also in a forked child: the parent's thread, runs and lock state
        are not the child's)."""
        self.cv = threading.Condition()
        self._trackers: list[MlflowTracker] = []
        self._thread: threading.Thread | None = None

    def add(self, tracker: MlflowTracker) -> None:
        with self.cv:
            tracker._writing = True
            self._trackers.append(tracker)
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._loop, name="mlflow-writer", daemon=True
                )
                self._thread.start()
            self.cv.notify_all()

    def _next(self) -> MlflowTracker | None:
        """Under ``cv``: the tracker to send for now, dropping the finished ones; None when
        there is none left (the thread ends)."""
        while True:
            now = time.monotonic()
            for t in [t for t in self._trackers if t._stopping and not t._pending]:
                self._trackers.remove(t)
                t._writing = False
                self.cv.notify_all()
            if not self._trackers:
                self._thread = None
                return None
            due = [t for t in self._trackers if t._due(now)]
            if due:
                return min(due, key=lambda t: t._last_flush)
            waits = [w for t in self._trackers if (w := t._wait_s(now)) is not None]
            self.cv.wait(min(waits) if waits else None)

    def _loop(self) -> None:
        while True:
            with self.cv:
                tracker = self._next()
                if tracker is None:
                    return
                batch = tracker._take()
            try:
                sent, dropped, err = tracker._send(batch)
            except Exception as unexpected:  # kept to retry: one run's trouble ends no thread
                sent, dropped, err = 0, 0, _one_line(unexpected)
            with self.cv:
                tracker._sent(batch, sent, dropped, err)
                self.cv.notify_all()


_WRITER = _Writer()
os.register_at_fork(after_in_child=_WRITER._reset)


# ----------------------------------------------------------------------------- mlflow tracker


def _call_bounded(fn: Any, timeout: float) -> str | None:
    """Run ``fn`` in a daemon thread for at most ``timeout`` s; the error as a line, or None."""
    errors: list[str] = []

    def target() -> None:
        try:
            fn()
        except Exception as err:
            errors.append(_one_line(err))

    thread = threading.Thread(target=target, name="mlflow-end", daemon=True)
    try:
        thread.start()
    except RuntimeError:  # no new threads at interpreter shutdown (3.12+): wait it out
        target()
        return errors[0] if errors else None
    thread.join(timeout)
    if thread.is_alive():
        return f"no answer within {timeout:.0f} s"
    return errors[0] if errors else None


def _unique_name(client: MlflowClient, experiment_id: str, name: str | None) -> str | None:
    """``name``, or ``name-2``, ``name-3`` ... when a run of the experiment has it: runs that
    differ should not share a name (nor, in the MLflow UI, a legend entry)."""
    if not name:
        return name
    quoted = name.replace("'", "''")

    def named(condition: str, max_results: int) -> set[str]:
        runs = client.search_runs(
            [experiment_id],
            filter_string=f"attributes.run_name {condition}",
            max_results=max_results,
        )
        return {r.info.run_name for r in runs}

    try:  # one small query when the name is free (the common case)
        taken = named(f"= '{quoted}'", 1)
        if taken:
            taken |= named(f"LIKE '{quoted}-%'", 50_000)
    except Exception as err:  # a name is worth no failed run: keep it as it is
        log.debug("could not look up run names: %s", _one_line(err))
        return name
    n = 1
    while (candidate := name if n == 1 else f"{name}-{n}") in taken:
        n += 1
    return candidate


def _is_permanent(err: Exception) -> bool:
    """Errors a retry cannot fix (bad value, deleted run): drop the points, don't loop."""
    code = getattr(err, "error_code", None)
    return code in ("INVALID_PARAMETER_VALUE", "RESOURCE_DOES_NOT_EXIST", "INVALID_STATE")


class MlflowTracker:
    """One MLflow run, written through ``MlflowClient`` with buffered, batched metrics."""

    def __init__(
        self,
        *,
        uri: str,
        experiment: str,
        run_name: str | None = None,
        artifact_root: Path | None = None,
        parent_run_id: str | None = None,
        flush_every_s: float = 10.0,
        max_buffer: int = 1000,
        resume_run_id: str | None = None,
        resume_finished: bool = True,
    ) -> None:
        if max_buffer < 1:
            raise ValueError(f"max_buffer={max_buffer}: must be >= 1")
        self.uri = uri
        self.experiment = experiment
        self.run_name = run_name
        self.artifact_root = Path(artifact_root) if artifact_root is not None else None
        self.parent_run_id = parent_run_id
        self.resume_run_id = resume_run_id  # continue this run instead of creating one
        self.resume_finished = resume_finished  # False: refuse to reopen a FINISHED run
        self.flush_every_s = flush_every_s
        self.max_buffer = max_buffer
        # Bound memory while the store is down: keep the newest points, say what was dropped.
        self.max_pending = max(100 * max_buffer, 100_000)
        self.run_id: str | None = None
        self.experiment_id: str | None = None
        self._artifact_uri: str | None = None
        self._client: MlflowClient | None = None
        # Metric points wait in _pending; a writer thread sends them, so a slow or unreachable
        # store (MLflow retries HTTP for minutes) never stalls the training loop.
        self._pending: list[Metric] = []
        self._cv = _WRITER.cv  # the process's writer's lock (see _Writer)
        self._queued = 0  # points ever queued
        self._done = 0  # points written or given up on
        self._failures = 0  # failed write passes
        self._flush_requested = False
        self._stopping = False
        self._next_try = 0.0  # monotonic time before which a failing store is left alone
        self._last_flush = time.monotonic()
        self._failing = False
        self._backoff = 1.0  # seconds before the next try while the store fails
        self._final_attempts = 3  # tries left for the last points once the run ends
        self._writing = False  # registered with the writer: points may still go out
        self._ended = False
        self.end_timeout_s = 60.0
        self._pid = os.getpid()

    def __repr__(self) -> str:
        return f"MlflowTracker(uri={redact(self.uri)!r}, run_id={self.run_id!r})"

    # -- lifecycle

    def start(self, *, params: Mapping[str, Any], tags: Mapping[str, str]) -> str | None:
        """Create the run (and experiment if needed); raise TrackingError fast if unusable."""
        if self.run_id is not None:
            raise RuntimeError(f"run {self.run_id} already started")
        probe_store(self.uri, self.experiment)
        client = _client(self.uri, probe=False)  # probed just above
        all_tags = self._run_tags(tags)
        if self.resume_run_id is not None:
            run = self._reopen(client)
            experiment_id, rest = run.info.experiment_id, all_tags
            params = {k: v for k, v in params.items() if _clean_key(k) not in run.data.params}
        else:
            first, rest = all_tags[:MAX_PARAMS_PER_BATCH], all_tags[MAX_PARAMS_PER_BATCH:]
            # the lock also keeps two local processes from taking one name
            with _store_lock(self.uri):
                experiment_id = self._get_or_create_experiment(client)
                self.run_name = _unique_name(client, experiment_id, self.run_name)
                try:
                    run = client.create_run(experiment_id, run_name=self.run_name, tags=dict(first))
                except Exception as err:
                    raise TrackingError(
                        f"cannot create a run in experiment {self.experiment!r} at "
                        f"{redact(self.uri)}: {_one_line(err)}"
                    ) from None
        self._client, self.experiment_id = client, experiment_id
        self.run_id, self._artifact_uri = run.info.run_id, run.info.artifact_uri
        self._pid = os.getpid()
        _install_exit_hooks()
        with _active_lock:
            _active.add(self)
        self._last_flush = time.monotonic()
        _WRITER.add(self)
        try:
            self._log_params_and_tags(params, rest)
        except Exception as err:
            reason = f"could not log params/tags: {_one_line(err)}"
            self.end("FAILED", reason)
            raise TrackingError(f"run {self.run_id} at {redact(self.uri)}: {reason}") from None
        return self.run_id

    def _reopen(self, client: MlflowClient) -> Any:
        """Mark an existing run RUNNING again so this process continues it."""
        assert self.resume_run_id is not None
        try:
            run = client.get_run(self.resume_run_id)
            if not self.resume_finished and run.info.status == "FINISHED":
                raise TrackingError(
                    f"run {self.resume_run_id} has already FINISHED; only a KILLED, FAILED "
                    "or abandoned (still RUNNING) run can be continued"
                )
            client.update_run(run.info.run_id, status="RUNNING")
            if REASON_TAG in run.data.tags:  # why it ended last time no longer holds
                client.delete_tag(run.info.run_id, REASON_TAG)
        except TrackingError:
            raise
        except Exception as err:
            raise TrackingError(
                f"cannot continue run {self.resume_run_id} at {redact(self.uri)}: {_one_line(err)}"
            ) from None
        return run

    def _get_or_create_experiment(self, client: MlflowClient) -> str:
        from mlflow.exceptions import MlflowException

        def lookup() -> str | None:
            exp = client.get_experiment_by_name(self.experiment)
            if exp is None:
                return None
            if exp.lifecycle_stage != "active":
                raise TrackingError(
                    f"experiment {self.experiment!r} in {redact(self.uri)} is deleted: restore "
                    "it (mlflow experiments restore) or choose another tracking.experiment"
                )
            if EXPERIMENT_KIND_TAG not in exp.tags:  # a kind the user set stays
                try:
                    client.set_experiment_tag(
                        exp.experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND
                    )
                except Exception as err:  # a label for the UI is no reason to stop a run
                    log.debug("cannot tag experiment %s: %s", exp.experiment_id, _one_line(err))
            return exp.experiment_id

        try:
            found = lookup()
            if found is not None:
                return found
            location = None
            if self.artifact_root is not None:
                folder = re.sub(r"[^\w.\-]+", "_", self.experiment).strip("._") or "experiment"
                location = (self.artifact_root.expanduser().resolve() / folder).as_uri()
            try:
                return client.create_experiment(
                    self.experiment,
                    artifact_location=location,
                    tags={EXPERIMENT_KIND_TAG: EXPERIMENT_KIND},
                )
            except MlflowException:
                found = lookup()  # another process (not sharing our file lock) won the race
                if found is None:
                    raise
                return found
        except TrackingError:
            raise
        except Exception as err:
            raise TrackingError(
                f"cannot get or create experiment {self.experiment!r} in {redact(self.uri)}: "
                f"{_one_line(err)}"
            ) from None

    def _run_tags(self, tags: Mapping[str, str]) -> list[tuple[str, str]]:
        merged: dict[str, str] = {
            SOURCE_TYPE_TAG: "LOCAL",
            SOURCE_NAME_TAG: Path(sys.argv[0]).name if sys.argv and sys.argv[0] else "",
        }
        with contextlib.suppress(Exception):
            merged[USER_TAG] = getpass.getuser()
        merged.update({_clean_key(k): redact(str(v))[:MAX_TAG_LEN] for k, v in tags.items()})
        if GIT_COMMIT_TAG in merged:
            merged.setdefault(SOURCE_GIT_COMMIT_TAG, merged[GIT_COMMIT_TAG])
        if self.parent_run_id:
            merged[PARENT_TAG] = self.parent_run_id
        # parent tag first so it is always in the create_run call
        return sorted(merged.items(), key=lambda kv: kv[0] != PARENT_TAG)

    def _log_params_and_tags(self, params: Mapping[str, Any], tags: list[tuple[str, str]]) -> None:
        from mlflow.entities import RunTag

        assert self._client is not None and self.run_id is not None
        for chunk in _param_batches(params):
            self._client.log_batch(self.run_id, params=chunk, synchronous=True)
        tag_items = [RunTag(k, v) for k, v in tags]
        for i in range(0, len(tag_items), MAX_PARAMS_PER_BATCH):
            chunk = tag_items[i : i + MAX_PARAMS_PER_BATCH]
            self._client.log_batch(self.run_id, tags=chunk, synchronous=True)

    def end(self, status: str = "FINISHED", reason: str | None = None) -> str | None:
        """Flush, record why, mark the run terminated. Never raises on store errors: it runs
        in ``finally`` blocks and at exit, where an exception would hide the real one; it
        returns the error instead (None: the store has the ending)."""
        _check_status(status)
        with self._cv:
            if self._ended or self.run_id is None:
                return None
            self._ended = self._stopping = True
            self._next_try = 0.0  # the last points go now, even while backing off
            self._cv.notify_all()
        with _active_lock:
            _active.discard(self)
        assert self._client is not None
        deadline = time.monotonic() + self.end_timeout_s
        with self._cv:
            if not self._cv.wait_for(lambda: not self._writing, timeout=self.end_timeout_s):
                log.warning(
                    "gave up waiting %.0f s for metrics of run %s to reach %s",
                    self.end_timeout_s,
                    self.run_id,
                    redact(self.uri),
                )
        client, run_id = self._client, self.run_id

        def terminate() -> None:
            if reason:
                self.set_tags(_end_tags(status, reason))
            client.set_terminated(run_id, status)

        # MLflow retries a dead HTTP server for ~4 minutes per call; bound the wait so exit
        # handlers and failing workers are not held hostage (the attempt goes on meanwhile).
        err = _call_bounded(terminate, max(10.0, deadline - time.monotonic()))
        if err is not None:
            log.warning(
                "could not mark MLflow run %s %s in %s: %s", run_id, status, redact(self.uri), err
            )
        return err

    # -- metrics

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        """Queue points (no I/O here); the writer sends them once max_buffer points wait or
        flush_every_s has passed. NaN is logged as NaN; MLflow stores +-inf as +-1.8e308."""
        from mlflow.entities import Metric

        if self.run_id is None:
            raise RuntimeError("log_metrics before start()")
        now_ms = int(time.time() * 1000)
        step = int(step)
        points = []
        for key, value in metrics.items():
            _check_metric_key(key)
            points.append(Metric(key, float(value), now_ms, step))
        with self._cv:
            if self._ended:
                log.warning("metrics logged after the run ended are ignored: %s", list(metrics))
                return
            was_empty = not self._pending
            self._pending.extend(points)
            self._queued += len(points)
            if was_empty or len(self._pending) >= self.max_buffer:
                self._cv.notify_all()

    def flush(self, timeout: float | None = 60.0) -> None:
        """Send the queued points now and wait (up to ``timeout``) for the attempt; on a store
        error they stay queued for the next try."""
        with self._cv:
            if not self._writing:
                return
            target, failures = self._queued, self._failures
            self._flush_requested = True
            self._next_try = 0.0  # now, even while backing off
            self._cv.notify_all()
            self._cv.wait_for(
                lambda: self._done >= target or self._failures > failures, timeout=timeout
            )

    def _due(self, now: float) -> bool:
        if not self._pending or now < self._next_try:
            return False
        if self._stopping or self._flush_requested:
            return True
        full = len(self._pending) >= self.max_buffer
        return full or now - self._last_flush >= self.flush_every_s

    def _wait_s(self, now: float) -> float | None:
        if not self._pending:
            return None  # log_metrics wakes the writer
        if self._stopping or self._flush_requested:
            return max(0.0, self._next_try - now)
        wake = self._last_flush + self.flush_every_s
        return max(0.0, max(wake, self._next_try) - now)

    def _take(self) -> list[Metric]:
        """The writer takes the queued points (under ``_cv``)."""
        batch, self._pending = self._pending, []
        self._flush_requested = False
        return batch

    def _sent(self, batch: list[Metric], sent: int, dropped: int, err: str | None) -> None:
        """The writer's bookkeeping after a send (under ``_cv``): count, or requeue and back
        off while the store fails; once the run ends, give up after the last tries."""
        self._done += sent + dropped
        self._last_flush = time.monotonic()
        if err is None:
            self._backoff = 1.0
            if self._failing:
                log.warning("MLflow store %s is taking metrics again", redact(self.uri))
                self._failing = False
            return
        self._pending[:0] = batch[sent + dropped :]
        self._failures += 1
        if not self._failing:
            log.warning(
                "MLflow store %s failed to take metrics (%s); keeping %d points to retry",
                redact(self.uri),
                err,
                len(self._pending),
            )
        self._failing = True
        overflow = len(self._pending) - self.max_pending
        if overflow > 0:
            log.warning("store still failing: dropping the %d oldest points", overflow)
            del self._pending[:overflow]
            self._done += overflow
        self._next_try = time.monotonic() + (0.5 if self._stopping else self._backoff)
        self._backoff = min(self._backoff * 2, 60.0)
        if self._stopping:
            self._final_attempts -= 1
            if self._final_attempts <= 0:
                log.warning(
                    "%d metric points of run %s could not be written to %s",
                    len(self._pending),
                    self.run_id,
                    redact(self.uri),
                )
                self._done += len(self._pending)
                self._pending.clear()

    def _send(self, batch: list[Metric]) -> tuple[int, int, str | None]:
        """Write ``batch`` in chunks: (points sent, points dropped as invalid, error or None)."""
        assert self._client is not None and self.run_id is not None
        sent = dropped = 0
        while sent + dropped < len(batch):
            start = sent + dropped
            chunk = batch[start : start + MAX_METRICS_PER_BATCH]
            try:
                self._client.log_batch(self.run_id, metrics=chunk, synchronous=True)
            except Exception as err:
                if not _is_permanent(err):
                    return sent, dropped, _one_line(err)
                log.warning(
                    "dropping %d metric points the store refused: %s", len(chunk), _one_line(err)
                )
                dropped += len(chunk)
                continue
            sent += len(chunk)
        return sent, dropped, None

    # -- tags and artifacts

    def _require_run(self) -> tuple[MlflowClient, str]:
        if self._client is None or self.run_id is None:
            raise RuntimeError("the run is not started")
        return self._client, self.run_id

    def _wrap(self, what: str, call: Any, *args: Any, **kwargs: Any) -> None:
        try:
            call(*args, **kwargs)
        except Exception as err:
            raise TrackingError(
                f"{what} for run {self.run_id} at {redact(self.uri)} failed: {_one_line(err)}"
            ) from err

    def set_tags(self, tags: Mapping[str, str]) -> None:
        from mlflow.entities import RunTag

        client, run_id = self._require_run()
        items = [RunTag(_clean_key(k), redact(str(v))[:MAX_TAG_LEN]) for k, v in tags.items()]
        for i in range(0, len(items), MAX_PARAMS_PER_BATCH):
            chunk = items[i : i + MAX_PARAMS_PER_BATCH]
            self._wrap("setting tags", client.log_batch, run_id, tags=chunk, synchronous=True)

    def log_artifact(self, local_path: str | Path, artifact_path: str | None = None) -> None:
        client, run_id = self._require_run()
        with _without_secrets(Path(local_path)) as path:
            self._wrap(
                f"logging {local_path}", client.log_artifact, run_id, str(path), artifact_path
            )

    def log_artifacts(self, local_dir: str | Path, artifact_path: str | None = None) -> None:
        client, run_id = self._require_run()
        with _without_secrets(Path(local_dir)) as path:
            self._wrap(
                f"logging {local_dir}", client.log_artifacts, run_id, str(path), artifact_path
            )

    def log_text(self, text: str, artifact_file: str) -> None:
        client, run_id = self._require_run()
        text = redact(text)
        self._wrap(f"logging {artifact_file}", client.log_text, run_id, text, artifact_file)

    def log_figure(self, fig: Figure, artifact_file: str) -> None:
        client, run_id = self._require_run()
        self._wrap(f"logging {artifact_file}", client.log_figure, run_id, fig, artifact_file)

    @property
    def artifact_uri(self) -> str | None:
        return self._artifact_uri

    def artifact_dir(self) -> Path | None:
        """The run's artifact folder when the artifact store is local, else None."""
        uri = self._artifact_uri
        if not uri:
            return None
        parsed = urlparse(uri)
        if parsed.scheme == "file":
            return Path(unquote(parsed.path))
        if parsed.scheme == "" or (len(parsed.scheme) == 1 and os.name == "nt"):
            return Path(uri)
        return None


class RunHandle:
    """Writes to a run this process did not start: a study's parent run from its workers, a
    reopened parent run, or the runs of a worker that died. Each call goes to the store at
    once (no writer thread). Metrics, tags and ends never raise on store errors (these are
    summaries and clean-ups, not the record); artifacts raise TrackingError."""

    def __init__(self, uri: str, run_id: str):
        self.uri, self.run_id = uri, run_id
        self._client = _client(uri)

    def _try(self, what: str, fn: Any, *args: Any) -> None:
        try:
            fn(*args)  # a store error must not stop a study for a summary
        except Exception as err:
            log.warning("could not %s run %s: %s", what, self.run_id, _one_line(err))

    def _must(self, what: str, fn: Any, *args: Any) -> None:
        try:
            fn(*args)
        except Exception as err:
            raise TrackingError(
                f"{what} for run {self.run_id} at {redact(self.uri)} failed: {_one_line(err)}"
            ) from err

    def reopen(self, reason: str) -> bool:
        """Mark the run RUNNING again; False if the store has no such (active) run."""
        try:
            run = self._client.get_run(self.run_id)
        except Exception:
            return False
        if run.info.lifecycle_stage != "active":
            return False
        self._client.update_run(self.run_id, status="RUNNING")
        self._client.set_tag(self.run_id, REASON_TAG, reason)
        return True

    def add_params(self, params: Mapping[str, Any]) -> None:
        """Log the params the run does not have yet (MLflow params cannot change)."""

        def add() -> None:
            have = self._client.get_run(self.run_id).data.params
            for chunk in _param_batches(params):
                new = [p for p in chunk if p.key not in have]
                if new:
                    self._client.log_batch(self.run_id, params=new, synchronous=True)

        self._try("log params to", add)

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        points = [Metric(k, float(v), now, int(step)) for k, v in metrics.items()]
        self._try(
            "log metrics to",
            lambda: self._client.log_batch(self.run_id, metrics=points, synchronous=True),
        )

    def log_artifact(self, local_path: str | Path, artifact_path: str | None = None) -> None:
        with _without_secrets(Path(local_path)) as path:
            self._must(
                f"logging {local_path}",
                self._client.log_artifact,
                self.run_id,
                str(path),
                artifact_path,
            )

    def log_artifacts(self, local_dir: str | Path, artifact_path: str | None = None) -> None:
        with _without_secrets(Path(local_dir)) as path:
            self._must(
                f"logging {local_dir}",
                self._client.log_artifacts,
                self.run_id,
                str(path),
                artifact_path,
            )

    def log_text(self, text: str, artifact_file: str) -> None:
        text = redact(text)
        self._must(
            f"logging {artifact_file}", self._client.log_text, self.run_id, text, artifact_file
        )

    def log_image(self, png: str | Path, key: str, step: int) -> None:
        """A figure as an MLflow image under ``key``: the run's charts show it, and its
        newest ``step`` first (a summary: never raises)."""
        from PIL import Image

        def log() -> None:
            with Image.open(png) as image:
                self._client.log_image(
                    self.run_id, image.convert("RGB"), key=key, step=step, synchronous=True
                )

        self._try(f"log image {key} to", log)

    def set_tags(self, tags: Mapping[str, str]) -> None:
        for k, v in tags.items():
            self._try("tag", self._client.set_tag, self.run_id, k, redact(str(v)))

    def end(self, status: str, reason: str | None = None) -> str | None:
        return self._end(self.run_id, status, reason)

    def clear_reason(self) -> None:
        """Drop the reason and the status note a reopened run still has from before."""
        try:
            tags = self._client.get_run(self.run_id).data.tags
            if REASON_TAG in tags:
                self._client.delete_tag(self.run_id, REASON_TAG)
            if tags.get(NOTE_TAG, "").startswith(tuple(f"{s}:" for s in STATUSES)):
                self._client.delete_tag(self.run_id, NOTE_TAG)
        except Exception as err:
            log.warning("could not clear the reason of run %s: %s", self.run_id, _one_line(err))

    def end_with_running_children(self, status: str, reason: str) -> None:
        """End this run and its children still RUNNING (a dead worker's trial and seeds)."""
        try:
            run = self._client.get_run(self.run_id)
            children = self._client.search_runs(
                [run.info.experiment_id],
                filter_string=f"tags.`{PARENT_TAG}` = '{self.run_id}' "
                "and attributes.status = 'RUNNING'",
            )
        except Exception as err:
            log.warning("could not find the runs under %s: %s", self.run_id, _one_line(err))
            return
        for r in [*children, run]:
            if r.info.status == "RUNNING":
                self._end(r.info.run_id, status, reason)

    def _end(self, run_id: str, status: str, reason: str | None) -> str | None:
        _check_status(status)
        try:
            if reason:
                for key, value in _end_tags(status, redact(reason)).items():
                    self._client.set_tag(run_id, key, value)
            self._client.set_terminated(run_id, status)
        except Exception as err:
            log.warning("could not end run %s: %s", run_id, _one_line(err))
            return _one_line(err)
        return None


def make_tracker(
    cfg: TrackingConfig,
    *,
    run_name: str,
    parent_run_id: str | None = None,
    resume_run_id: str | None = None,
) -> Tracker:
    """The tracker a config asks for; artifacts of a local sqlite store go next to its db.

    ``resume_run_id`` continues that (unfinished) training run instead of creating one.
    """
    if cfg.backend == "none":
        return NullTracker()
    uri = resolve_uri(cfg.uri, cfg.dir)
    db = _sqlite_path(uri)
    return MlflowTracker(
        uri=uri,
        experiment=cfg.experiment,
        run_name=run_name,
        artifact_root=db.parent / "artifacts" if db is not None else None,
        parent_run_id=parent_run_id,
        flush_every_s=cfg.flush_every_s,
        resume_run_id=resume_run_id,
        resume_finished=False,
    )


# ----------------------------------------------------------------------------- protocol
