"""The launcher's config group entry: ``hydra/launcher=ray`` (``hydra.launcher.address``)."""

from dataclasses import dataclass

from hydra.core.config_store import ConfigStore


@dataclass
class RayLauncherConf:
    _target_: str = "hydra_plugins.workbench_ray_launcher.ray_launcher.RayLauncher"
    # what ray.init takes: auto, HEAD:6379, ray://HEAD:10001; null: a local Ray
    address: str | None = None


ConfigStore.instance().store(
    group="hydra/launcher", name="ray", node=RayLauncherConf, provider="workbench"
)
