"""How a training run can end other than by finishing (besides a hook's ``StopRun``)."""

from __future__ import annotations

from pathlib import Path


class DivergenceError(RuntimeError):
    """A loss, Q value, action or evaluation return became NaN or infinite."""


class Interrupted(KeyboardInterrupt):
    """SIGINT/SIGTERM stopped the run after it wrote a checkpoint to resume from."""

    def __init__(self, reason: str, checkpoint: Path | None):
        super().__init__(reason)
        self.reason = reason
        self.checkpoint = checkpoint
