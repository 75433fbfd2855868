"""Run K worker processes that each call a function; propagate Ctrl-C/SIGTERM; collect exit codes.

Processes, not threads: training is CPU-bound Python and the GIL would serialize threads.
The spawn start method gives every worker a fresh interpreter (no forked torch threads,
sqlite connections or MLflow writer threads inherited from the parent).

Signals. Ctrl-C on a terminal reaches the whole process group; SIGTERM reaches only the
parent, which forwards it. Either way each worker sees one ``KeyboardInterrupt`` (later
signals are ignored so its clean-up — ending MLflow runs, failing the Optuna trial — is not
cut short), and exits 130. The parent waits ``grace_s`` for workers to finish, kills what is
left, and raises ``KeyboardInterrupt`` itself once they are all reaped.

Exit codes: 0 done, 130 interrupted, 1 an exception (its traceback printed by the worker),
or the code the target returned or passed to ``sys.exit`` (an ablation worker: 1 where one of
its runs failed); a negative code is the signal that killed it.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import os
import signal
import sys
import threading
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

log = logging.getLogger(__name__)

INTERRUPTED = 130
LOOK_EVERY_S = 5.0  # how often the driver asks how far the work is (a study: its storage)
PROGRESS_EVERY_S = 60.0  # a progress line at least this often, news or not
# SIGHUP: a closed terminal or ssh session, to the whole process group as Ctrl-C is
_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


def _worker_signals() -> None:
    state = {"seen": False}

    def handler(signum: int, _frame: Any) -> None:
        if state["seen"]:
            return  # already stopping: let clean-up finish
        state["seen"] = True
        raise KeyboardInterrupt(f"signal {signal.Signals(signum).name}")

    for sig in _SIGNALS:
        signal.signal(sig, handler)


def call_unit(target: Callable[..., Any], args: tuple[Any, ...]) -> int:
    """Run one unit and return its exit code (see the module's docstring); a worker process
    exits with it, a Ray task returns it."""
    code = 0
    try:
        result = target(*args)
        if isinstance(result, int) and not isinstance(result, bool):
            code = result
    except KeyboardInterrupt:
        code = INTERRUPTED
    except SystemExit as err:
        code = err.code if isinstance(err.code, int) else (0 if err.code is None else 1)
    except BaseException:
        traceback.print_exc()
        code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    return code


# In a worker process: the parent's counters of units ended and failed (``unit_ended``).
_counters: tuple[Any, Any] | None = None


def unit_ended(failed: bool) -> None:
    """A worker process's target says one of its units ended, so that the parent's progress
    line counts it; nothing elsewhere (a Ray task is one unit: the driver counts tasks)."""
    if _counters is None:
        return
    for counter, add in zip(_counters, (1, int(failed)), strict=True):
        with counter.get_lock():
            counter.value += add


def _entry(target: Callable[..., Any], args: tuple[Any, ...], counters: tuple[Any, Any]) -> None:
    global _counters
    _counters = counters
    _worker_signals()
    os._exit(call_unit(target, args))  # skip the interpreter's teardown of half-stopped threads


class Progress:
    """The driver's progress line, ``name: describe(done, running, failed)``: said when it
    has news (the ETA alone is none) and at least every ``PROGRESS_EVERY_S``."""

    def __init__(self, name: str, describe: Callable[[int, int | None, int], str]):
        self.name, self.describe = name, describe
        self.said, self.t_said = "", time.monotonic()

    def look(self, done: int, running: int | None, failed: int) -> None:
        line = self.describe(done, running, failed)
        now = time.monotonic()
        if line.split(" [")[0] != self.said.split(" [")[0] or now - self.t_said > PROGRESS_EVERY_S:
            log.info("%s: %s", self.name, line)
            self.said, self.t_said = line, now


def live(running: int | None, not_done: int) -> str:
    """``2 running``, or ``3 queued or running`` where Ray cannot say which."""
    return f"{running} running" if running is not None else f"{not_done} queued or running"


def run_processes(
    target: Callable[..., Any],
    args_list: Sequence[tuple[Any, ...]],
    *,
    name: str = "worker",
    grace_s: float = 60.0,
    poll_s: float = 0.2,
    progress: Progress | None = None,
) -> list[int]:
    """Start ``target(*args)`` in one spawned process per entry of ``args_list``; wait for all.

    ``target`` must be importable (a module-level function) and its arguments picklable.
    Returns the exit codes in order; raises KeyboardInterrupt after a Ctrl-C/SIGTERM once
    every worker has exited. ``progress`` looks at the units the workers say have ended
    (``unit_ended``), a busy worker being one unit running.
    """
    ctx = mp.get_context("spawn")
    counters = (ctx.Value("i", 0), ctx.Value("i", 0))
    procs = [
        ctx.Process(target=_entry, args=(target, tuple(args), counters), name=f"{name}-{i}")
        for i, args in enumerate(args_list)
    ]
    interrupted = {"at": None}

    def on_signal(signum: int, _frame: Any) -> None:
        if interrupted["at"] is None:
            interrupted["at"] = time.monotonic()
            for p in procs:
                if p.pid is not None and p.is_alive():
                    os.kill(p.pid, signal.SIGTERM)

    old: dict[int, Any] = {}
    if threading.current_thread() is threading.main_thread():  # handlers live there only
        old = {s: signal.getsignal(s) for s in _SIGNALS}
        for s in old:
            signal.signal(s, on_signal)
    try:
        for p in procs:
            p.start()
        seen, t_look = 0, time.monotonic()
        while any(p.is_alive() for p in procs):
            if interrupted["at"] is not None and time.monotonic() - interrupted["at"] > grace_s:
                for p in procs:
                    if p.is_alive():
                        p.kill()
            done = counters[0].value
            if progress is not None and (done != seen or time.monotonic() - t_look > LOOK_EVERY_S):
                seen, t_look = done, time.monotonic()
                progress.look(done, sum(p.is_alive() for p in procs), counters[1].value)
            time.sleep(poll_s)
        for p in procs:
            p.join()
        if progress is not None and interrupted["at"] is None:
            progress.look(counters[0].value, 0, counters[1].value)
    finally:
        for s, h in old.items():
            signal.signal(s, h)
        for p in procs:  # an exception above must not leave orphans
            if p.is_alive():
                p.kill()
                p.join()
    codes = [int(p.exitcode) if p.exitcode is not None else 1 for p in procs]
    if interrupted["at"] is not None:
        raise KeyboardInterrupt(f"interrupted; worker exit codes {codes}")
    return codes


# ----------------------------------------------------------------------------- where work runs

# Tags a run carries when a Ray task trains it (``placement_tags``): which driver's job, which
# task (the same id on every retry of it) and which node. A later attempt of the task, or the
# driver once its tasks are over, ends FAILED a run an earlier attempt left RUNNING.
RAY_JOB_TAG = "workbench.ray.job"
RAY_TASK_TAG = "workbench.ray.task"
RAY_NODE_TAG = "workbench.ray.node"

_placement: dict[str, str] = {}  # set by the Ray task that runs this process's work


def placement_tags() -> dict[str, str]:
    """Where this process's work was placed, as run tags: empty for local worker processes
    (Ray is then never imported), the Ray job, task and node inside a Ray task."""
    return dict(_placement)


def set_placement(tags: dict[str, str]) -> None:
    _placement.clear()
    _placement.update(tags)


@dataclass(frozen=True)
class Resources:
    """What one unit of work (a run, a population, a study worker) asks of a machine."""

    cpus: float = 1.0
    gpus: float = 0.0


def parse_gpu_share(value: Any, key: str) -> float:
    """A GPU share ``key`` gives (``--ray-gpus``, ``hydra.launcher.gpus``): in (0, 1], as a
    unit trains on one device."""
    from workbench.errors import ConfigProblem

    try:
        share = float(value)
    except (TypeError, ValueError):
        share = float("nan")
    if not 0 < share <= 1:
        raise ConfigProblem(
            f"{key}={value!r}: must be a part of one GPU, in (0, 1] (1: a GPU for each unit, "
            "0.25: four units on one)"
        )
    return share


def resources_of(cfg: Any, *, gpus_present: bool = False, gpu_share: float = 1.0) -> Resources:
    """A unit's needs from its config: one CPU per torch thread plus one per env worker
    process (``env.vectorization=async``); ``gpu_share`` of a GPU where it trains on CUDA
    (``device=auto`` where the cluster has GPUs), the whole population on it: 1 gives each
    unit a GPU of its own, 0.25 packs four on one."""
    threads = cfg.torch_threads if cfg.torch_threads is not None else 1
    env_workers = cfg.env.n_envs if cfg.env.vectorization == "async" else 0
    device = str(cfg.device)
    cuda = device.startswith("cuda") or (device == "auto" and gpus_present)
    return Resources(cpus=float(threads + env_workers), gpus=gpu_share if cuda else 0.0)


def run_units(
    target: Callable[..., Any],
    args_list: Sequence[tuple[Any, ...]],
    *,
    name: str = "worker",
    cluster: Any = None,
    resources: Sequence[Resources] | None = None,
    describe: Callable[[int, int | None, int], str] | None = None,
) -> list[int]:
    """``target(*args)`` for each entry, in local worker processes (``run_processes``) or, with
    a ``cluster`` (``workbench.cluster.RayCluster``), as Ray tasks placed by Ray: the one place
    that chooses where. Exit codes come back in order either way; an interrupt is raised
    after every unit has stopped. ``describe(done, running, failed)``: the driver's progress
    line (``Progress``), ``running`` None where Ray cannot tell running from queued."""
    if cluster is None:
        progress = Progress(name, describe) if describe is not None else None
        return run_processes(target, args_list, name=name, progress=progress)
    return cluster.run(target, args_list, name=name, resources=resources, describe=describe)
