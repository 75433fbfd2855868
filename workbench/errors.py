"""The errors a user or the machine causes, and how the CLI says them: one line, one code.

Two kinds, told apart by whose move it is:

    ConfigProblem  (exit 2)  the command, a config key, a spec or a file named on the
                             command line is wrong; the message names the key or file
    RuntimeFailure (exit 1)  the inputs are fine but the machine or a store failed (store
                             unreachable or read-only, disk full, divergence, no CUDA, an
                             env that cannot be made); the message says what and what to do

``explain`` maps any exception to (exit code, line), translating the library errors that
reach the CLI (MLflow, sqlite/SQLAlchemy, OSError, Gymnasium, torch) at that one boundary.
Also here: how a training run can end other than by finishing (besides ``StopRun``).
"""

from __future__ import annotations

import errno
import os
from pathlib import Path

DEBUG_ENV = "WORKBENCH_DEBUG"
DEBUG_HINT = f"rerun with --debug (or {DEBUG_ENV}=1) for the traceback"


class WorkbenchError(Exception):
    """An error the CLI reports in one line with ``exit_code``."""

    exit_code = 1


class ConfigProblem(WorkbenchError, ValueError):
    """The user's input is wrong: a config key, a spec, an argument, a file named."""

    exit_code = 2


class RuntimeFailure(WorkbenchError, RuntimeError):
    """The input is fine, the machine or a store is not; the message says what to do."""

    exit_code = 1


class DivergenceError(RuntimeFailure):
    """A loss, Q value, action or evaluation return became NaN or infinite."""


class EnvError(RuntimeFailure, ValueError):
    """An environment cannot be made as configured, or has spaces DDPG cannot use.
    (A ValueError too, as these were before they had a class.)"""


class DeviceError(RuntimeFailure):
    """The device asked for (CUDA) is not there."""


class Interrupted(KeyboardInterrupt):
    """SIGINT/SIGTERM stopped the run after it wrote a checkpoint to resume from."""

    def __init__(self, reason: str, checkpoint: Path | None):
        super().__init__(reason)
        self.reason = reason
        self.checkpoint = checkpoint


def debug_requested(argv: list[str]) -> tuple[bool, list[str]]:
    """Whether ``--debug`` (anywhere) or WORKBENCH_DEBUG asks for tracebacks; argv without it.

    Taken out before any parser sees it: ``train`` hands its arguments to Hydra.
    """
    rest = [a for a in argv if a != "--debug"]
    env = os.environ.get(DEBUG_ENV, "").strip().lower()
    return len(rest) != len(argv) or env not in ("", "0", "false", "no"), rest


def explain(err: BaseException) -> tuple[int, str]:
    """(exit code, one line without credentials) for an error that reached the CLI."""
    from workbench.tracking.redact import redact

    code, text = _classify(err)
    text = one_line(text)
    low = text.lower()
    for marks, hint in _HINTS:  # what to do about the machine's state, whoever said it
        if any(m in low for m in marks) and hint not in text:
            text = f"{text}; {hint}"
            break
    return code, redact(text)


def one_line(text: str) -> str:
    """``head:\\n  - a\\n  - b`` (a config or spec error's list) as ``head: a; b``."""
    lines = [line.strip() for line in str(text).splitlines() if line.strip()]
    if len(lines) <= 1:
        return lines[0] if lines else ""
    items = [line.removeprefix("- ") for line in lines[1:]]
    return f"{lines[0].rstrip(':')}: {'; '.join(items)}"


# ------------------------------------------------------------------------- translation

STORE_HINT = "check that it runs and tracking.uri (or MLFLOW_TRACKING_URI) points at it"
READ_ONLY_HINT = "it cannot be written: use a writable copy, or another place (tracking.dir, --out)"
DISK_HINT = (
    "free some space, then run the command again "
    "(an interrupted training run continues with resume=<run id>)"
)


_HINTS = (
    (("disk is full", "no space left", "disk quota"), DISK_HINT),
    (("readonly database", "read-only file system", "read-only database"), READ_ONLY_HINT),
)


def _chain(err: BaseException) -> list[BaseException]:
    """``err`` and what caused it, outermost first (``raise ... from None`` ends it)."""
    seen: list[BaseException] = []
    while isinstance(err, BaseException) and all(err is not e for e in seen):
        seen.append(err)
        context = None if err.__suppress_context__ else err.__context__
        err = err.__cause__ or getattr(err, "orig", None) or context
    return seen


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def _classify(err: BaseException) -> tuple[int, str]:
    if isinstance(err, WorkbenchError):
        if isinstance(err, DivergenceError):
            return 1, (
                f"the run diverged ({err}) and was marked FAILED; lower the learning rates, "
                "set agent.max_grad_norm, or try another seed"
            )
        return err.exit_code, str(err)
    chain = _chain(err)
    for cause in chain:  # the outermost error we know says it in our words
        found = _library(cause)
        if found is not None:
            return found
    if isinstance(err, ValueError):  # our own argument checks (--workers 0, --group-by x)
        return 2, str(err)
    return 1, f"unexpected error: {type(err).__name__}: {_first_line(err)}; {DEBUG_HINT}"


def _library(err: BaseException) -> tuple[int, str] | None:
    """A known library error as (code, line); None for anything else."""
    text = _first_line(err)
    low = text.lower()
    if isinstance(err, FileNotFoundError):
        name = err.filename or text
        return 2, f"{name}: no such file or directory"
    if isinstance(err, OSError) and err.errno is not None:
        where = f" ({err.filename})" if err.filename else ""
        if err.errno in (errno.ENOSPC, errno.EDQUOT):
            return 1, f"no space left on the device{where}"
        if err.errno == errno.EROFS:
            return 1, f"read-only file system{where}"
        if err.errno in (errno.EACCES, errno.EPERM):
            return 1, f"permission denied{where}: check the file's owner and mode"
        if err.filename:
            return 1, f"cannot use {err.filename}: {err.strerror or text}"
        return 1, f"{err.strerror or text}"
    if type(err).__name__ in ("OperationalError", "DatabaseError") and (
        "sqlite" in type(err).__module__ or "sqlalchemy" in type(err).__module__
    ):
        if "disk i/o" in low:
            return 1, f"the store's disk failed ({text}); check the disk and free space"
        if "locked" in low:
            return 1, f"the store is locked ({text}): another process holds it; try again"
        return 1, f"the store cannot be used: {text}"
    module = type(err).__module__
    if module.startswith(("requests", "urllib3")) and "connection" in type(err).__name__.lower():
        return 1, f"cannot reach the MLflow tracking server: {text}; {STORE_HINT}"
    if module.startswith("mlflow") and type(err).__name__ == "MlflowException":
        return 1, f"MLflow: {text}"
    if module.startswith("gymnasium"):
        return 1, f"cannot make the environment: {text}"
    if module.startswith("optuna") and "Storage" in type(err).__name__:
        return 1, f"the Optuna storage failed: {text}"
    if "cuda" in low and ("not available" in low or "not compiled" in low or "no cuda" in low):
        return 1, f"CUDA was asked for but is not available ({text}): use device=cpu or auto"
    return None
