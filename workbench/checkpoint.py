"""Training checkpoints: what they hold, when they are written, how a run resumes from one.

A checkpoint is one ``torch.save`` file of tensors and plain containers (no pickled
objects), read back with ``torch.load(weights_only=True)``. It is written to a temporary
file, fsynced and renamed into place, so a kill during a write never leaves a corrupt
latest checkpoint; the newest file that loads is the one to resume from.

``capture`` and ``restore`` are the whole training state: agent, replay buffer, explorer,
the loop's ``RunState`` and each env's episode number. ``Checkpointer`` decides when to
write: every ``checkpoint.every`` steps and on an interrupt (``Interrupts``), at a step
where every env has just ended an episode (so the resumed run restarts each env exactly
there) or once waiting for one is over.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import re
import shutil
import signal
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from workbench import seeding
from workbench.errors import Interrupted, RuntimeFailure

if TYPE_CHECKING:
    from workbench.config import CheckpointConfig, Config

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
_NAME = re.compile(r"^step-(\d{12})\.pt$")


class CheckpointError(RuntimeFailure):
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
    """An exclusive lock on a run's checkpoint folder, held from the run's start to its end.

    A run whose process died without ending it (``kill -9``, power loss) stays RUNNING in
    MLflow; its lock died with the process, so resuming can tell such a run from one that is
    still training (resuming that would give two writers one run), and ``probe`` lets a later
    command end it (``run.end_abandoned_runs``). The lock file holds the holder's pid and,
    when the store could not take the run's ending (a full disk), that ending
    (``record_ending``): space for it is reserved when the lock is taken.
    """

    RESERVED = 4096  # bytes kept for the ending, so it fits on a disk that has since filled
    WAIT_S = 2.0  # a probe holds the lock for an instant: wait that out before refusing

    def __init__(self, directory: Path):
        self.directory = directory
        self.path = directory / ".lock"
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self) -> None:
        if self._fd is not None:
            return
        self.directory.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        deadline = time.monotonic() + self.WAIT_S
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() < deadline:
                    time.sleep(0.05)
                    continue
                holder = _read_lock_file(fd).pid or "?"
                os.close(fd)
                raise CheckpointError(
                    f"run {self.directory.name} is still training in another process "
                    f"(pid {holder}); stop it before resuming"
                ) from None
        try:
            os.ftruncate(fd, 0)
            with contextlib.suppress(OSError):  # where the file system cannot reserve space
                os.posix_fallocate(fd, 0, self.RESERVED)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd

    def record_ending(self, status: str, reason: str | None, store_error: str) -> bool:
        """Keep the ending the store could not take, for the command that records it later
        (``probe``). False when even that failed."""
        if self._fd is None:
            return False
        record = {"status": status, "reason": reason, "store_error": store_error}
        data = f"{os.getpid()}\n{json.dumps(record)}\n".encode()
        if len(data) > self.RESERVED:
            record["reason"] = (reason or "")[: self.RESERVED // 2]
            record["store_error"] = store_error[: self.RESERVED // 4]
            data = f"{os.getpid()}\n{json.dumps(record)}\n".encode()[: self.RESERVED]
        try:
            os.pwrite(self._fd, data, 0)
            os.fsync(self._fd)
        except OSError:
            return False
        return True

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

    @staticmethod
    def probe(directory: Path) -> LockState | None:
        """Whether the run of ``directory`` is still held by a live process: None when it
        is or when nothing says (no lock file, or one being created); else what the dead
        holder left in its lock file. Never waits: a held lock is answered at once."""
        try:
            fd = os.open(directory / ".lock", os.O_RDONLY)
        except OSError:
            return None
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                return None  # held: the run is training
            try:
                state = _read_lock_file(fd)
            finally:
                fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)
        return state if state.pid else None  # no pid yet: its holder is taking it now


@dataclass
class LockState:
    """What a run's lock file says: the pid that held it, and the ending the store could
    not take (``RunLock.record_ending``), if any."""

    pid: str
    status: str | None = None
    reason: str | None = None
    store_error: str | None = None


def _read_lock_file(fd: int) -> LockState:
    text = os.pread(fd, RunLock.RESERVED, 0).split(b"\0", 1)[0].decode(errors="replace")
    pid, _, rest = text.partition("\n")
    state = LockState(pid.strip())
    with contextlib.suppress(ValueError, AttributeError):
        record = json.loads(rest.strip() or "null")
        if isinstance(record, dict) and isinstance(record.get("status"), str):
            state.status, state.reason = record["status"], record.get("reason")
            state.store_error = record.get("store_error")
    return state


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
    saved = state["config"]
    saved.get("perf", {}).pop("fused_update", None)  # a switch of earlier versions: gone
    resumed = to_config(OmegaConf.create(saved))
    for key in keys:
        _set(resumed, key, get_key(cfg, key))
    resumed.resume = cfg.resume
    resumed.checkpoint.dir = cfg.checkpoint.dir  # where it was found: keep writing there
    validate(resumed)
    return resumed, state


# ----------------------------------------------------------------------------- what is saved


def capture(*, exact: bool, agent: Any, buffer: Any, explorer: Any, state: Any, envs: Any) -> dict:
    """The training state at this step (``exact``: every env has just ended an episode)."""
    return {
        "exact": exact,
        "agent": agent.state_dict(),
        "replay": buffer.state_dict(),
        "explorer": explorer.state_dict(),
        **state.state_dict(),  # counters, history, metric_means, rng
        "env_episodes": [int(k) for k in envs.get_attr("episode")],
    }


def restore(
    saved: dict, *, agent: Any, buffer: Any, explorer: Any, state: Any, envs: Any, seed: int
) -> np.ndarray:
    """Load a checkpoint into a new run's parts; returns the envs' current observations.

    After an exact checkpoint each env restarts the episode it was about to begin; after a
    mid-episode one the interrupted episodes start afresh (with a warning).
    """
    agent.load_state_dict(saved["agent"])
    buffer.load_state_dict(saved["replay"])
    explorer.load_state_dict(saved["explorer"])
    state.load_state_dict(saved, agent.device)
    exact = bool(saved["exact"])
    envs.reset(seed=seeding.env_seeds(seed, envs.num_envs))  # each env's base seed
    envs.set_attr("episode", [int(k) - 1 if exact else int(k) for k in saved["env_episodes"]])
    obs, _ = envs.reset()
    if not exact:
        agent.obs_norm.update(obs)
        explorer.on_episode_end(agent.actor, np.ones(envs.num_envs, dtype=bool))
        log.warning(
            "resuming from a mid-episode checkpoint: the episodes in progress at step %d start "
            "afresh, so this run will not match an uninterrupted one",
            state.step,
        )
    return obs


# ----------------------------------------------------------------------------- when


class Interrupts:
    """First SIGINT/SIGTERM/SIGHUP: ask the loop to checkpoint and stop (before the loop has
    started: to stop before training). Second: stop at once. Later ones are ignored: they
    would cut short the runs' endings.

    Installed only where asked (``workbench train``, ablation workers) and only in the main
    thread, for the whole of training: from opening the runs to closing them, so that no
    signal finds a run half-made. SIGHUP is a closed terminal or ssh session. A signal within
    a second of the first counts as the same interrupt: a terminal's Ctrl-C reaches a worker
    both directly and forwarded by its parent (workbench.parallel).
    """

    SAME_INTERRUPT_S = 1.0
    SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)

    def __init__(self, enabled: bool):
        self.enabled = enabled and threading.current_thread() is threading.main_thread()
        self.signum: int | None = None
        self.at = 0.0
        self.training = False  # the loop has started: a checkpoint is worth writing
        self.stopping = False  # the second signal stopped training: the runs are ending
        self._old: dict[int, Any] = {}

    def __enter__(self) -> Interrupts:
        if self.enabled:
            for sig in self.SIGNALS:
                self._old[sig] = signal.getsignal(sig)
                signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._old.items():
            signal.signal(sig, handler)
        self._old.clear()

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name if self.signum is not None else ""

    def _handle(self, signum: int, _frame: Any) -> None:
        if self.stopping:  # a third: the runs are being ended; cutting that short loses it
            log.warning(
                "%s: still ending the runs (kill -9 stops at once; a later command then "
                "records them as abandoned)",
                signal.Signals(signum).name,
            )
            return
        if self.signum is not None:
            if time.monotonic() - self.at < self.SAME_INTERRUPT_S:
                return  # one Ctrl-C reaching us twice: from the terminal and from a parent
            self.stopping = True
            raise KeyboardInterrupt(f"second signal ({signal.Signals(signum).name})")
        self.signum, self.at = signum, time.monotonic()
        name = signal.Signals(signum).name
        if not self.training:
            log.warning("%s: stopping before training starts", name)
            return
        log.warning(
            "%s: writing a checkpoint at the next episode boundary, then stopping "
            "(send it again to stop at once, without a new checkpoint)",
            name,
        )

    def check_before_training(self) -> None:
        """Stop here if a signal came while the runs were being opened; else training starts
        (a later signal checkpoints first)."""
        if self.signum is not None:
            raise Interrupted(f"interrupted ({self.name}) before training started", None)
        self.training = True

    def waited(self, seconds: float) -> bool:
        return self.signum is not None and time.monotonic() - self.at >= seconds


class Checkpointer:
    """Writes a run's checkpoints when they are due, into ``<checkpoint.dir>/<run key>``."""

    def __init__(
        self,
        ck: CheckpointConfig,
        lock: RunLock,
        run_key: str,
        header: dict[str, Any],
        interrupts: Interrupts,
        on_first: Callable[[Path], None],
        flush: Callable[[], None],
    ):
        self.ck, self.lock, self.run_key, self.header = ck, lock, run_key, header
        self.interrupts, self.on_first, self.flush = interrupts, on_first, flush
        self.pending: int | None = None  # vector step a checkpoint was asked at
        self.last: Path | None = None
        self.seconds = 0.0

    def after_step(
        self,
        prev_step: int,
        step: int,
        vec_steps: int,
        all_done: bool,
        snapshot: Callable[[bool], dict],
    ) -> None:
        """Ask for a checkpoint every ``every`` steps or on an interrupt; write it when every
        env has just ended an episode (exact resume) or once waiting is over; after an
        interrupt's checkpoint, raise ``Interrupted``."""
        ck = self.ck
        if self.pending is None and (
            (ck.every > 0 and step // ck.every > prev_step // ck.every)
            or self.interrupts.signum is not None
        ):
            self.pending = vec_steps
        if self.pending is None:
            return
        late = vec_steps - self.pending >= ck.wait_steps or self.interrupts.waited(ck.wait_s)
        if not (all_done or late):
            return
        self.last = self.write(snapshot(all_done), step, exact=all_done)
        self.pending = None
        if self.interrupts.signum is not None:
            raise Interrupted(
                f"interrupted ({self.interrupts.name}) at step {step}; checkpoint written: "
                f"continue with `workbench train resume={self.run_key}`",
                self.last,
            )

    def write(self, state: dict, step: int, *, exact: bool) -> Path:
        t0 = time.perf_counter()
        if not list_checkpoints(self.lock.directory):  # the folder exists from the start
            self.on_first(self.lock.directory)
        self.lock.acquire()
        # what was logged up to here is in the store before the checkpoint exists, so a run
        # resumed from it after a hard kill has lost no metric point
        self.flush()
        path = save_checkpoint(
            {**self.header, "run_id": self.run_key, **state},
            self.lock.directory,
            step,
            keep=self.ck.keep,
        )
        self.seconds += time.perf_counter() - t0
        log.info(
            "step %d: checkpoint %s (%s, %.1fs)",
            step,
            path,
            "episode boundary" if exact else "mid-episode",
            time.perf_counter() - t0,
        )
        return path

    def interrupted_reason(self, step: int, err: BaseException) -> str:
        """Why a run stopped by an interrupt ended, and how to continue it."""
        if isinstance(err, Interrupted):
            return err.reason
        if self.last is not None:
            return (
                f"interrupted at step {step}; latest checkpoint {self.last.name}: continue with "
                f"`workbench train resume={self.run_key}`"
            )
        return f"interrupted at step {step}"
