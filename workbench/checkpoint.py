"""Training checkpoints: written atomically, pruned to the last N, loaded safely.

A checkpoint is one ``torch.save`` file of tensors and plain containers (no pickled
objects), read back with ``torch.load(weights_only=True)``. It is written to a temporary
file, fsynced and renamed into place, so a kill during a write never leaves a corrupt
latest checkpoint; the newest file that loads is the one to resume from.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from workbench.config import Config

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


# ----------------------------------------------------------------------------- run lock


class RunLock:
    """An exclusive lock on a run's checkpoint folder, held while the run trains.

    A run whose process died without ending it (``kill -9``, power loss) stays RUNNING in
    MLflow; its lock died with the process, so resuming can tell such a run from one that is
    still training (resuming that would give two writers one run).
    """

    def __init__(self, directory: Path):
        self.directory = directory
        self.path = directory / ".lock"
        self._fd: int | None = None

    def acquire(self) -> None:
        if self._fd is not None:
            return
        self.directory.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 32).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise CheckpointError(
                f"run {self.directory.name} is still training in another process "
                f"(pid {holder}); stop it before resuming"
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        self._fd = fd

    def release(self) -> None:
        if self._fd is None:
            return
        with contextlib.suppress(OSError):
            fcntl.flock(self._fd, fcntl.LOCK_UN)
        os.close(self._fd)
        self._fd = None

    def remove_folder(self) -> None:
        """Delete the run's checkpoints (a finished run no longer needs them), then unlock."""
        shutil.rmtree(self.directory, ignore_errors=True)
        self.release()


# ----------------------------------------------------------------------------- resume


def _set(obj: Any, path: str, value: Any) -> None:
    *parents, last = path.split(".")
    for part in parents:
        obj = getattr(obj, part)
    setattr(obj, last, value)


def prepare_resume(cfg: Config, overrides: Sequence[str]) -> tuple[Config, dict[str, Any]]:
    """The config and training state to continue run ``cfg.resume`` with.

    The config is the checkpoint's; the command line may change only what never changes
    learning (``config.RUNTIME_KEYS``), and anything else it sets is refused by name.
    """
    from omegaconf import OmegaConf

    from workbench.config import (
        RUNTIME_KEYS,
        ConfigError,
        get_key,
        is_runtime_key,
        override_key,
        to_config,
        validate,
    )

    assert cfg.resume is not None
    keys = [override_key(o) for o in overrides if not o.startswith("hydra")]
    refused = [k for k in keys if not is_runtime_key(k)]
    if refused:
        allowed = ", ".join(k for k in RUNTIME_KEYS if k != "resume")
        raise ConfigError(
            [
                f"{k}: cannot be changed when resuming run {cfg.resume}: it continues with "
                f"its checkpoint's config (may change: {allowed})"
                for k in refused
            ]
        )
    directory = checkpoint_dir(cfg.checkpoint.dir, cfg.resume)
    if not list_checkpoints(directory):
        raise CheckpointError(
            f"no checkpoint for run {cfg.resume} in {directory}: runs write one every "
            "checkpoint.every steps and when interrupted (Ctrl-C, SIGTERM), and delete them "
            "when they finish (unless checkpoint.keep_after_finish=true); set checkpoint.dir "
            "if they were written elsewhere"
        )
    state = load_latest(directory)
    if state.get("run_id") != cfg.resume:
        raise CheckpointError(
            f"checkpoint in {directory} belongs to run {state.get('run_id')!r}, not {cfg.resume!r}"
        )
    resumed = to_config(OmegaConf.create(state["config"]))
    for key in keys:
        _set(resumed, key, get_key(cfg, key))
    resumed.resume = cfg.resume
    resumed.checkpoint.dir = cfg.checkpoint.dir  # where it was found: keep writing there
    validate(resumed)
    return resumed, state
