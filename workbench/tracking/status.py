"""How a run ends: the statuses, and one context manager that ends a run by how its block ended.

Training, study trials, a study's parent run and an ablation's parent run all end the same
way: FINISHED when the work is done, KILLED when a person (Ctrl-C) or a pruner stopped it,
FAILED with the error otherwise, and never left RUNNING. ``ends_run`` says that once.
Where the store cannot take the ending at that moment (a full disk), ``Ending.unrecorded``
says why, and a later command records it (``run.end_abandoned_runs``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Protocol

STATUSES = ("FINISHED", "FAILED", "KILLED")
INTERRUPTED_REASON = "interrupted"
# the reason a later command gives a run whose process died without ending it
ABANDONED_REASON = "abandoned"


def _check_status(status: str) -> None:
    if status not in STATUSES:
        raise ValueError(f"run status {status!r}: must be one of {', '.join(STATUSES)}")


class StopRun(Exception):
    """Raised by a hook to stop training; the run ends with ``status`` and the reason."""

    def __init__(self, reason: str, status: str = "KILLED"):
        super().__init__(reason)
        self.reason = reason
        self.status = status


class Endable(Protocol):
    """What ``ends_run`` needs of a run: a tracker, a study's or ablation's parent run."""

    def set_tags(self, tags: Mapping[str, str]) -> None: ...

    def end(self, status: str, reason: str | None = None) -> str | None:
        """End the run; the store's error if it could not take the ending, else None."""
        ...


@dataclass
class Ending:
    """How the run will end. The block may change it (``ending.set``); on an exception
    ``ends_run`` fills it in from the exception, which is in ``error``."""

    status: str = "FINISHED"
    reason: str | None = None
    error: BaseException | None = None
    unrecorded: str | None = None  # why the store could not take the ending, if it could not

    def set(self, status: str, reason: str | None = None) -> None:
        """End the run as ``status`` (with ``reason``) if the block finishes normally."""
        _check_status(status)
        self.status, self.reason = status, reason


def default_ending(err: BaseException) -> tuple[str, str]:
    """The status and reason an exception ends a run with, unless the caller says otherwise."""
    if isinstance(err, KeyboardInterrupt):
        reason = getattr(err, "reason", None)
        return "KILLED", reason if isinstance(reason, str) else INTERRUPTED_REASON
    status, reason = getattr(err, "status", None), getattr(err, "reason", None)
    if status in STATUSES and isinstance(reason, str):  # StopRun and its kind
        return status, reason
    return "FAILED", f"{type(err).__name__}: {err}"


@contextlib.contextmanager
def ends_run(
    run: Endable | None,
    *,
    reason: Callable[[BaseException], str | None] | None = None,
    tags: Callable[[Ending], Mapping[str, str] | None] | None = None,
    finish: bool = True,
) -> Iterator[Ending]:
    """End ``run`` according to how the ``with`` block ended, and re-raise what ended it.

    - normal exit: FINISHED, or what the block chose with ``ending.set(status, reason)``;
    - ``KeyboardInterrupt``: KILLED, the exception's ``reason`` attribute or "interrupted";
    - an exception with ``status`` and ``reason`` attributes (``StopRun``): those;
    - any other exception: FAILED, "ExcType: message".

    ``reason(err)`` may replace the reason recorded for an exception (None keeps the rule's
    reason: e.g. shorten, redact or reword it). ``tags(ending)`` may return tags to set just
    before the run ends (e.g. a trial's state); on a normal exit they are set inside the
    block's protection, so a store failure there ends the run as that exception does.
    ``run`` None (an untracked study) ends nothing. The exception is always re-raised.
    ``finish=False``: a normal exit ends nothing (the block is one stretch of a run's life,
    as each step of a population member is).
    """
    ending = Ending()
    try:
        yield ending
        if run is not None and tags is not None and finish:
            extra = tags(ending)
            if extra:
                run.set_tags(extra)
    except BaseException as err:
        ending.error = err
        ending.status, ending.reason = default_ending(err)
        if reason is not None:
            custom = reason(err)
            if custom is not None:
                ending.reason = custom
        if run is not None:
            try:
                extra = tags(ending) if tags is not None else None
                if extra:
                    run.set_tags(extra)
            finally:
                ending.unrecorded = run.end(ending.status, ending.reason)
        raise
    if run is not None and finish:
        ending.unrecorded = run.end(ending.status, ending.reason)
