"""Ray as the place where work runs: ``--ray [ADDRESS]`` on ``ablate``, ``tune`` and
``learning-check``.

Ray only places work. The unit a local worker process runs (an ablation unit through
``ablation.run_jobs``, a study worker's loop through ``launch.run_worker``, a learning-check
seed) is submitted as one Ray task, asking for the CPUs and GPUs its config needs
(``parallel.resources_of``); Ray queues what does not fit and retries a task whose node was
lost (``MAX_RETRIES``). Nothing here schedules.

A task runs in one of Ray's worker processes, kept for the next task as a local worker
process goes on with its next unit, in the driver's working directory where that exists on
its node (relative ``tracking.dir`` and ``checkpoint.dir`` then mean the same folder when it
is shared). The runs it trains are
tagged with the Ray job, task and node (``parallel.placement_tags``), so that a retried
attempt, or the driver when its tasks are over, can end FAILED a run a lost node left
RUNNING. Ctrl-C on the driver cancels the tasks (a KeyboardInterrupt in each: its runs write a
checkpoint and end KILLED), waits for them, then raises KeyboardInterrupt.

Ray is imported here only, and this module only where ``--ray`` was given.
"""

from __future__ import annotations

import logging
import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

from workbench import parallel
from workbench.errors import ConfigProblem, RuntimeFailure
from workbench.logs import Countdown, duration, setup_logging
from workbench.parallel import INTERRUPTED, LOOK_EVERY_S, Progress, Resources, live

log = logging.getLogger(__name__)

MAX_RETRIES = 3  # attempts after a lost node or a dead worker process (not after an error)
CONNECT_TIMEOUT_S = 10.0  # a cluster that does not answer fails within this (+ Ray's import)
GRACE_S = 60.0  # after Ctrl-C: how long cancelled tasks may take to end their runs


def embedded(uri: str | None) -> bool:
    """A store only this machine can reach: a sqlite file, a file store, a plain path."""
    if not uri:
        return False
    return "://" not in uri or uri.startswith(("sqlite:", "file:"))


class RayCluster:
    """A connection to a Ray cluster (or a local one-node Ray) that runs units as tasks."""

    def __init__(self, address: str | None, gpu_share: float = 1.0):
        self.address = address
        self.gpu_share = gpu_share
        self.job_id = ""
        self._no_state_api = False

    # ------------------------------------------------------------------ connection

    def connect(self) -> RayCluster:
        import ray

        _probe(self.address)
        # Our progress and errors are the driver's lines; Ray's own go to its log files.
        kwargs: dict[str, Any] = {"logging_level": logging.WARNING, "log_to_driver": True}
        if self.address in (None, "", "local"):
            kwargs["include_dashboard"] = False
        else:
            kwargs["address"] = self.address
        try:
            try:
                ray.init(**kwargs)
            except ConnectionAbortedError as err:
                # Ray Client's server process on the head dies in a few % of starts (a gRPC
                # fork race, ray-project/ray#63202); a second start is a fresh process
                if not str(self.address).startswith("ray://"):
                    raise
                log.warning("Ray Client: %s; connecting once more", _first_line(err))
                ray.init(**kwargs)
        except Exception as err:
            raise RuntimeFailure(
                f"cannot connect to the Ray cluster at {self.address or 'a new local Ray'}: "
                f"{_first_line(err)}; start it with `ray start --head` (see README, "
                "'Across machines')"
            ) from None
        self.job_id = ray.get_runtime_context().get_job_id()
        res = ray.cluster_resources()
        log.info(
            "Ray cluster %s: %d node(s), %g CPU(s), %g GPU(s); job %s",
            self.address or "(local)",
            self.nodes(),
            res.get("CPU", 0),
            res.get("GPU", 0),
            self.job_id,
        )
        return self

    def nodes(self) -> int:
        import ray

        return sum(1 for n in ray.nodes() if n.get("Alive"))

    def has_gpus(self) -> bool:
        import ray

        return ray.cluster_resources().get("GPU", 0) > 0

    def resources_of(self, cfg: Any) -> Resources:
        """What a unit with config ``cfg`` asks of a node here (``parallel.resources_of``
        with this cluster's GPUs and ``--ray-gpus`` share)."""
        return parallel.resources_of(cfg, gpus_present=self.has_gpus(), gpu_share=self.gpu_share)

    def shutdown(self) -> None:
        import ray

        if ray.is_initialized():
            ray.shutdown()

    def require_shared_stores(
        self, *, tracking_uri: str | None = None, storage_url: str | None = None
    ) -> None:
        """Refuse stores the other nodes cannot reach; a one-node Ray may use them."""
        from workbench.tracking import redact

        n = self.nodes()
        if n <= 1:
            return
        if embedded(tracking_uri):
            raise ConfigProblem(
                f"the MLflow store {redact(str(tracking_uri))} is on this machine only and the "
                f"Ray cluster has {n} nodes: start `mlflow server --serve-artifacts "
                "--backend-store-uri postgresql://... --host 0.0.0.0` and pass --tracking-uri "
                "http://<this host>:5000"
            )
        if embedded(storage_url):
            raise ConfigProblem(
                f"the Optuna storage {redact(str(storage_url))} is on this machine only and "
                f"the Ray cluster has {n} nodes: start PostgreSQL and pass --storage "
                "postgresql://user@<db host>/<db>"
            )

    # ------------------------------------------------------------------ running

    def run(
        self,
        target: Callable[..., Any],
        args_list: Sequence[tuple[Any, ...]],
        *,
        name: str = "worker",
        resources: Sequence[Resources] | None = None,
        describe: Callable[[int, int | None, int], str] | None = None,
    ) -> list[int]:
        """``target(*args)`` as one Ray task per entry; exit codes in order, as
        ``parallel.run_processes`` gives them."""
        values = self._submit_and_wait(_task, target, args_list, name, resources, describe)
        return [v if isinstance(v, int) else 1 for v in values]

    def map(
        self,
        fn: Callable[..., Any],
        args_list: Sequence[tuple[Any, ...]],
        *,
        name: str = "worker",
        resources: Sequence[Resources] | None = None,
    ) -> list[Any]:
        """``fn(*args)``'s return values, one task each; the first error is raised."""
        values = self._submit_and_wait(_call, fn, args_list, name, resources, None)
        for v in values:
            if isinstance(v, BaseException):
                raise v
        return values

    def _submit_and_wait(
        self,
        entry: Callable[..., Any],
        target: Callable[..., Any],
        args_list: Sequence[tuple[Any, ...]],
        name: str,
        resources: Sequence[Resources] | None,
        describe: Callable[[int, int | None, int], str] | None,
    ) -> list[Any]:
        import ray

        n = len(args_list)
        needs = list(resources) if resources is not None else [Resources()] * n
        # Ray's worker processes are kept for later tasks, as a local worker process runs its
        # share of units one after another: imports (torch, MLflow) are paid once per process
        remote = ray.remote(entry)
        cwd = os.getcwd()
        refs = [
            remote.options(
                num_cpus=r.cpus,
                num_gpus=r.gpus,
                max_retries=MAX_RETRIES,
                retry_exceptions=False,
                name=f"{name}-{i}",
            ).remote(target, tuple(args), cwd)
            for i, (args, r) in enumerate(zip(args_list, needs, strict=True))
        ]
        index = {ref: i for i, ref in enumerate(refs)}
        values: list[Any] = [None] * n
        pending, failed = list(refs), 0
        countdown = Countdown(n)

        def tasks(done: int, running: int | None, failed: int) -> str:
            eta = countdown.update(done)
            return f"{done}/{n} tasks done, {live(running, n - done)}, {failed} failed [{eta}]"

        progress = Progress(name, describe or tasks)
        t_look = time.monotonic()
        try:
            while pending:
                ready, pending = ray.wait(pending, num_returns=1, timeout=1.0)
                for ref in ready:
                    i = index[ref]
                    values[i] = _result(ray, ref, f"{name}-{i}")
                    failed += _failed(values[i])
                now = time.monotonic()
                if ready or now - t_look > LOOK_EVERY_S:
                    t_look = now
                    progress.look(n - len(pending), self._running(), failed)
        except KeyboardInterrupt:
            self._cancel(ray, pending, name)
            raise KeyboardInterrupt(f"interrupted; {len(pending)} Ray task(s) cancelled") from None
        return values

    def _running(self) -> int | None:
        """Tasks of this job running now, by Ray's state API (the dashboard's); None where
        that is not served (then only "not done" is known: queued or running)."""
        if self._no_state_api:
            return None
        try:
            from ray.util.state import list_tasks

            tasks = list_tasks(
                filters=[("job_id", "=", self.job_id), ("state", "=", "RUNNING")],
                timeout=2,
                raise_on_missing_output=False,
            )
            return len(tasks)
        except Exception:
            self._no_state_api = True  # asked once: no dashboard here
            return None

    def _cancel(self, ray: Any, pending: list[Any], name: str) -> None:
        """Cancel every task not done (each running one sees a KeyboardInterrupt and ends its
        runs KILLED); after ``GRACE_S`` kill what is left."""
        log.warning("%s: interrupted; cancelling %d Ray task(s)", name, len(pending))
        for ref in pending:
            ray.cancel(ref, force=False)
        t0 = time.monotonic()
        while pending and time.monotonic() - t0 < GRACE_S:
            try:
                _, pending = ray.wait(pending, num_returns=len(pending), timeout=1.0)
            except KeyboardInterrupt:
                break  # a second Ctrl-C: stop waiting
        for ref in pending:
            ray.cancel(ref, force=True)
        if pending:
            log.warning("%s: %d task(s) killed after %s", name, len(pending), duration(GRACE_S))


def connect(address: str | None, gpu_share: float = 1.0) -> RayCluster:
    """``--ray`` without a value (None): a local Ray; else what ``ray.init`` takes.
    ``gpu_share``: the part of a GPU each unit that trains on CUDA asks for."""
    return RayCluster(address, gpu_share).connect()


def _probe(address: str | None) -> None:
    """One TCP connection to the head, then one request to its GCS, each bounded: Ray's own
    client waits minutes for a cluster that is not there or does not answer."""
    if address in (None, "", "local", "auto"):
        return
    host, _, port = address.removeprefix("ray://").rpartition(":")
    if not host or not port.isdigit():
        raise ConfigProblem(
            f"--ray {address}: must be host:port (the head's GCS, e.g. 10.0.0.1:6379), "
            "ray://host:10001, auto, or nothing for a local Ray"
        )
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=CONNECT_TIMEOUT_S):
            pass
    except OSError as err:
        raise RuntimeFailure(
            f"cannot reach the Ray cluster at {address}: {err.strerror or err}; check that "
            "`ray start --head` runs there and the port is open"
        ) from None
    if address.startswith("ray://"):
        _probe_client(address, host, int(port))
        return
    # A port that answers but is no Ray head (or a head that hangs): Ray's client would try
    # for minutes. One GCS request, in a process of its own that can be stopped.
    probe = f"from ray._raylet import GcsClient; GcsClient(address={address!r}, cluster_id=None)"
    try:
        subprocess.run(
            [sys.executable, "-c", probe],
            capture_output=True,
            timeout=CONNECT_TIMEOUT_S,
            check=True,
        )
    except subprocess.TimeoutExpired:
        raise RuntimeFailure(
            f"the Ray cluster at {address} did not answer within {CONNECT_TIMEOUT_S:g} s: "
            "is it the head's GCS port (ray start --head --port ...)?"
        ) from None
    except subprocess.CalledProcessError as err:
        last = (err.stderr or b"").decode(errors="replace").strip().splitlines()[-1:] or ["?"]
        raise RuntimeFailure(f"cannot connect to the Ray cluster at {address}: {last[0]}") from None


def _probe_client(address: str, host: str, port: int) -> None:
    """A Ray Client port must finish a gRPC handshake within the bound: Ray's client tries
    for ~35 s. (Skipped under RAY_USE_TLS: a plain channel cannot tell a TLS server.)"""
    if os.environ.get("RAY_USE_TLS", "0").lower() in ("1", "true"):
        return
    import grpc

    channel = grpc.insecure_channel(f"{host}:{port}")
    try:
        grpc.channel_ready_future(channel).result(timeout=CONNECT_TIMEOUT_S)
    except grpc.FutureTimeoutError:
        raise RuntimeFailure(
            f"the Ray cluster at {address} did not answer within {CONNECT_TIMEOUT_S:g} s: is "
            "it the head's Ray Client port (ray start --head --ray-client-server-port ...)?"
        ) from None
    finally:
        channel.close()


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def _failed(value: Any) -> int:
    return int(isinstance(value, BaseException) or (isinstance(value, int) and value != 0))


def _result(ray: Any, ref: Any, label: str) -> Any:
    """A task's value; an error it raised or a loss Ray gave up on, as the exception."""
    from ray.exceptions import RayTaskError, TaskCancelledError

    try:
        return ray.get(ref)
    except TaskCancelledError:
        return INTERRUPTED
    except RayTaskError as err:
        cause = err.as_instanceof_cause()
        log.error("%s failed: %s", label, _first_line(cause))
        return cause
    except Exception as err:  # the node or worker lost more than MAX_RETRIES times
        log.error("%s lost: %s", label, _first_line(err))
        return RuntimeFailure(f"{label} lost: {_first_line(err)}")


# ----------------------------------------------------------------------------- in the task


def _enter(cwd: str) -> None:
    import ray

    ctx = ray.get_runtime_context()
    parallel.set_placement(
        {
            parallel.RAY_JOB_TAG: ctx.get_job_id(),
            parallel.RAY_TASK_TAG: ctx.get_task_id() or "",
            parallel.RAY_NODE_TAG: ctx.get_node_id(),
        }
    )
    if os.path.isdir(cwd):  # the driver's folder, where this node shares it
        os.chdir(cwd)
    setup_logging()


def _task(target: Callable[..., Any], args: tuple[Any, ...], cwd: str) -> int:
    """A unit in a Ray task: ``parallel.call_unit``'s exit code, returned, not exited."""
    _enter(cwd)
    return parallel.call_unit(target, args)


def _call(fn: Callable[..., Any], args: tuple[Any, ...], cwd: str) -> Any:
    _enter(cwd)
    return fn(*args)
