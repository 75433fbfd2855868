"""The launcher's config group entry: ``hydra/launcher=ray`` (``hydra.launcher.address``)."""

from dataclasses import dataclass

from hydra.core.config_store import ConfigStore


@dataclass
class RayLauncherConf:
    _target_: str = "hydra_plugins.workbench_ray_launcher.ray_launcher.RayLauncher"
    # what ray.init takes: auto, HEAD:6379, ray://HEAD:10001; null: a local Ray
    address: str | None = None
    # the part of a GPU each job that trains on CUDA asks for: 1 a GPU each, 0.25 four on one
    gpus: float = 1.0


ConfigStore.instance().store(
    group="hydra/launcher", name="ray", node=RayLauncherConf, provider="workbench"
)
