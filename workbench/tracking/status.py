"""How a run ends: the statuses, and ``StopRun`` for a hook that stops training early."""

from __future__ import annotations

STATUSES = ("FINISHED", "FAILED", "KILLED")


def _check_status(status: str) -> None:
    if status not in STATUSES:
        raise ValueError(f"run status {status!r}: must be one of {', '.join(STATUSES)}")


class StopRun(Exception):
    """Raised by a hook to stop training; the run ends with ``status`` and the reason."""

    def __init__(self, reason: str, status: str = "KILLED"):
        super().__init__(reason)
        self.reason = reason
        self.status = status
