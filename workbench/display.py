"""Live progress display for a training run.

On a terminal: a rich progress bar with steps, SPS, the last episode return and the last
evaluation. Anywhere else (CI logs, worker processes, files) it prints nothing; the training
loop's evaluation log lines are the record there.
"""

from __future__ import annotations

import math
import sys

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)


class ProgressDisplay:
    def __init__(self, total_steps: int, *, enabled: bool = True):
        console = Console(file=sys.stderr)
        self.enabled = enabled and console.is_terminal
        self.fields = {"sps": math.nan, "last_return": math.nan, "last_eval": math.nan}
        self._progress: Progress | None = None
        self._shown = 0
        if not self.enabled:
            return
        self._progress = Progress(
            TextColumn("[bold]train"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[sps]:>6.0f} sps"),
            TextColumn("ep return {task.fields[last_return]:>8.1f}"),
            TextColumn("eval {task.fields[last_eval]:>8.1f}"),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            console=console,
            refresh_per_second=4,
        )
        self._task = self._progress.add_task("train", total=total_steps, **self.fields)
        self._progress.start()

    def update(self, step: int, **fields: float) -> None:
        """Record new field values (sps, last_return, last_eval); cheap when disabled."""
        if self._progress is None:
            return
        self.fields.update(fields)
        self._progress.update(self._task, completed=step, **self.fields)

    def advance(self, step: int) -> None:
        if self._progress is not None and step - self._shown >= 100:
            self._shown = step
            self._progress.update(self._task, completed=step)

    def close(self) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None
