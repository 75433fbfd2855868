"""Training checkpoints: written atomically, pruned to the last N, loaded safely.

A checkpoint is one ``torch.save`` file of tensors and plain containers (no pickled
objects), read back with ``torch.load(weights_only=True)``. It is written to a temporary
file, fsynced and renamed into place, so a kill during a write never leaves a corrupt
latest checkpoint; the newest file that loads is the one to resume from.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import torch

FORMAT_VERSION = 1
_NAME = re.compile(r"^step-(\d{12})\.pt$")


class CheckpointError(RuntimeError):
    """A checkpoint is missing, corrupt or does not match the run being resumed."""


def checkpoint_dir(root: str | Path, run_id: str) -> Path:
    return Path(root).expanduser().resolve() / run_id


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_checkpoint(state: dict[str, Any], directory: Path, step: int, *, keep: int = 2) -> Path:
    """Write ``state`` as the checkpoint of ``step`` and prune all but the newest ``keep``."""
    directory.mkdir(parents=True, exist_ok=True)
    final = directory / f"step-{step:012d}.pt"
    tmp = directory / f".{final.name}.{os.getpid()}.tmp"
    payload = {"format_version": FORMAT_VERSION, "step": step, **state}
    with open(tmp, "wb") as f:
        torch.save(payload, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, final)
    _fsync_dir(directory)
    for old in list_checkpoints(directory)[:-keep] if keep > 0 else []:
        old.unlink(missing_ok=True)
    return final


def list_checkpoints(directory: Path) -> list[Path]:
    """Checkpoint files in ``directory``, oldest first (temporary files are ignored)."""
    if not directory.is_dir():
        return []
    return sorted(p for p in directory.iterdir() if _NAME.match(p.name))


def load_checkpoint(path: Path) -> dict[str, Any]:
    """Load one checkpoint file safely; a clear CheckpointError when it is unusable."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint {path} does not exist") from None
    except Exception as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CheckpointError(f"checkpoint {path} is corrupt or unreadable: {first}") from None
    if not isinstance(state, dict) or state.get("format_version") != FORMAT_VERSION:
        found = state.get("format_version") if isinstance(state, dict) else type(state).__name__
        raise CheckpointError(
            f"checkpoint {path} has format {found!r}; this workbench reads {FORMAT_VERSION}"
        )
    return state


def load_latest(directory: Path) -> dict[str, Any]:
    """The newest checkpoint that loads; older ones are tried if the newest is damaged."""
    candidates = list_checkpoints(directory)
    if not candidates:
        raise CheckpointError(f"no checkpoint in {directory}")
    errors = []
    for path in reversed(candidates):
        try:
            return load_checkpoint(path)
        except CheckpointError as err:
            errors.append(str(err))
    raise CheckpointError("no usable checkpoint: " + "; ".join(errors))


def check_compatible(state: dict[str, Any], expected: dict[str, Any]) -> None:
    """Refuse to resume into a run whose config or shapes differ from the checkpoint's."""
    problems = [
        f"{key}: checkpoint has {state.get(key)!r}, this run has {value!r}"
        for key, value in expected.items()
        if state.get(key) != value
    ]
    if problems:
        raise CheckpointError("checkpoint does not match this run: " + "; ".join(problems))
