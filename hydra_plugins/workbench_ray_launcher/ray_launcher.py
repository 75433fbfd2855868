"""A Hydra launcher that runs each job of a multirun as a Ray task.

Hydra's own Ray launcher (hydra-ray-launcher 1.2.x) pins Ray 1.x and cannot be installed
next to Ray 2.60; this one places the jobs through ``workbench.cluster`` as ``ablate --ray``
and ``tune --ray`` do: one task per job, with the CPUs and GPUs its config asks for, retried
on a lost node. Each task runs the job as Hydra's joblib launcher runs it in a worker.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from hydra.core.singleton import Singleton
from hydra.core.utils import JobReturn, configure_log, filter_overrides, run_job, setup_globals
from hydra.plugins.launcher import Launcher
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig, open_dict

log = logging.getLogger(__name__)


def _execute_job(
    idx: int,
    overrides: Sequence[str],
    hydra_context: HydraContext,
    config: DictConfig,
    task_function: TaskFunction,
    singleton_state: dict[Any, Any],
) -> JobReturn:
    """One job, in a Ray task: Hydra's state as the driver had it, then ``run_job``."""
    setup_globals()
    Singleton.set_state(singleton_state)
    sweep_config = hydra_context.config_loader.load_sweep_config(config, list(overrides))
    with open_dict(sweep_config):
        sweep_config.hydra.job.id = f"{sweep_config.hydra.job.name}_{idx}"
        sweep_config.hydra.job.num = idx
    HydraConfig.instance().set_config(sweep_config)
    return run_job(
        hydra_context=hydra_context,
        config=sweep_config,
        task_function=task_function,
        job_dir_key="hydra.sweep.dir",
        job_subdir_key="hydra.sweep.subdir",
    )


def _job_config(hydra_context: HydraContext, config: DictConfig, overrides: Sequence[str]) -> Any:
    """The workbench config of a job, composed as Hydra will compose it in the task."""
    from workbench.config import to_config

    sweep = hydra_context.config_loader.load_sweep_config(config, list(overrides))
    with open_dict(sweep):
        del sweep["hydra"]
    return to_config(sweep)


class RayLauncher(Launcher):
    def __init__(self, address: str | None = None, gpus: float = 1.0) -> None:
        from workbench.parallel import parse_gpu_share

        self.address = address
        self.gpus = parse_gpu_share(gpus, "hydra.launcher.gpus")
        self.config: DictConfig | None = None
        self.task_function: TaskFunction | None = None
        self.hydra_context: HydraContext | None = None

    def setup(
        self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig
    ) -> None:
        self.config, self.task_function, self.hydra_context = config, task_function, hydra_context

    def launch(
        self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int
    ) -> Sequence[JobReturn]:
        from workbench.cluster import connect
        from workbench.tracking import resolve_uri

        setup_globals()
        assert self.config is not None and self.task_function is not None
        assert self.hydra_context is not None
        configure_log(self.config.hydra.hydra_logging, self.config.hydra.verbose)
        Path(str(self.config.hydra.sweep.dir)).mkdir(parents=True, exist_ok=True)
        cluster = connect(self.address, self.gpus)
        try:
            configs = [_job_config(self.hydra_context, self.config, o) for o in job_overrides]
            for cfg in configs:
                if cfg.tracking.backend == "mlflow":
                    cluster.require_shared_stores(
                        tracking_uri=resolve_uri(cfg.tracking.uri, cfg.tracking.dir)
                    )
            log.info("Ray launcher: %d job(s) as Ray tasks", len(job_overrides))
            for idx, overrides in enumerate(job_overrides):
                log.info("\t#%d : %s", initial_job_idx + idx, " ".join(filter_overrides(overrides)))
            state = Singleton.get_state()
            runs = cluster.map(
                _execute_job,
                [
                    (
                        initial_job_idx + idx,
                        overrides,
                        self.hydra_context,
                        self.config,
                        self.task_function,
                        state,
                    )
                    for idx, overrides in enumerate(job_overrides)
                ],
                name="sweep",
                resources=[cluster.resources_of(cfg) for cfg in configs],
            )
        finally:
            cluster.shutdown()
        return runs
