"""Live progress display for a training run.

On a terminal: a rich progress bar with steps, SPS, the last episode return and the last
evaluation, and while the policy is evaluated a second bar over its episodes (the
final evaluation of a long-episode env can take as long as the training). Anywhere else (CI
logs, worker processes, files) it prints nothing: no redraws in a file; the training loop's
log lines are the record there. A value not known yet is shown as "-", never "nan".
"""

from __future__ import annotations

import math
import sys

from rich import box
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    Task,
    TextColumn,
    TimeRemainingColumn,
)
from rich.table import Table
from rich.text import Text


def _value(x: float, spec: str) -> str:
    return format(x, spec) if math.isfinite(x) else "-"


class _Fields(ProgressColumn):
    """sps, last episode return, last evaluation: the training bar's fields, "-" until known
    (the evaluation bar has none)."""

    def render(self, task: Task) -> Text:
        f = task.fields
        if "sps" not in f:
            return Text("")
        return Text(
            f"{_value(f['sps'], '.0f')} sps ret {_value(f['last_return'], '.1f')} "
            f"eval {_value(f['last_eval'], '.1f')}"
        )


class ProgressDisplay:
    def __init__(self, total_steps: int, *, enabled: bool = True):
        console = Console(file=sys.stderr)
        self.enabled = enabled and console.is_terminal
        self.fields = {"sps": math.nan, "last_return": math.nan, "last_eval": math.nan}
        self._progress: Progress | None = None
        self._eval_task: int | None = None
        self._shown = 0
        if not self.enabled:
            return
        # one line in 80 columns
        self._progress = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(bar_width=10),
            MofNCompleteColumn(),
            _Fields(),
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

    def evaluating(self, episodes: int) -> None:
        """An evaluation of ``episodes`` episodes begins: a bar over them."""
        if self._progress is None:
            return
        self._eval_task = self._progress.add_task("eval", total=episodes)

    def evaluated(self, episodes: int | None) -> None:
        """``episodes`` of the evaluation done; None: it is over (its bar goes)."""
        if self._progress is None or self._eval_task is None:
            return
        if episodes is None:
            self._progress.remove_task(self._eval_task)
            self._eval_task = None
        else:
            self._progress.update(self._eval_task, completed=episodes)

    def close(self) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None


# ----------------------------------------------------------------------------- tables

# The width of tables written to a file or a pipe: wide enough not to wrap, which no reader
# of a log would resize for. On a terminal, its own width.
FILE_WIDTH = 160


def console() -> Console:
    """stdout for the commands' tables: a terminal's width there; elsewhere wide, and plain
    text (rich writes no colour codes where stdout is not a terminal)."""
    out = Console()
    if not out.is_terminal:
        out.width = FILE_WIDTH
    return out


def table(title: str) -> Table:
    """A table that spends its width on the values (no outer frame, one rule under the
    header): what lets the commands' tables fit 80 columns."""
    return Table(
        title=title, box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False, collapse_padding=True
    )
