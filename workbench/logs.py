"""Logging set-up for the processes the workbench starts (the CLI, and the worker processes
it spawns, which start with logging unconfigured), and ``Countdown``: the ``k/N, ETA`` of the
log lines of work that ends piece by piece (an ablation's runs, a study's trials)."""

from __future__ import annotations

import logging
import math
import multiprocessing
import os
import sys
import time

FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
# a worker process's lines say which worker wrote them (``ablation-1``, ``tune-<study>-0``)
WORKER_FORMAT = "%(asctime)s %(processName)s %(levelname)s %(name)s: %(message)s"


def setup_logging() -> None:
    """INFO to stderr with timestamps; a no-op where logging is already configured.

    Where stderr is not a terminal (a file, a CI log), MLflow's artifact progress bars are
    turned off: their carriage-return redraws are junk in a file."""
    if not sys.stderr.isatty():
        os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    main = multiprocessing.current_process().name == "MainProcess"
    logging.basicConfig(level=logging.INFO, format=FORMAT if main else WORKER_FORMAT)


def duration(seconds: float) -> str:
    """``42s``, ``3m05s``, ``2h07m``: short enough for a log line."""
    if not math.isfinite(seconds):
        return "?"
    s = max(0, round(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


class Countdown:
    """How far a piece of work is: ``3/12, ETA 4m10s`` from the rate since it started.

    ``done`` may count pieces this process did not do (another worker's trials in the shared
    storage): the rate is then the whole study's, which is what the ETA should use. ``total``
    None (a study that runs until a timeout) gives ``3 done``."""

    def __init__(self, total: int | None, done: int = 0):
        self.total, self.start_done, self.t0 = total, done, time.monotonic()

    def update(self, done: int) -> str:
        if self.total is None:
            return f"{done} done"
        left = self.total - done
        if left <= 0:
            return f"{done}/{self.total}, done"
        rate = (done - self.start_done) / max(time.monotonic() - self.t0, 1e-9)
        eta = duration(left / rate) if rate > 0 else "?"
        return f"{done}/{self.total}, ETA {eta}"
