"""The final policy as a standalone artifact.

A run's ``policy/`` artifact holds:

- ``weights.pt``: the policy's tensors (actor, observation statistics, action scale), read
  with ``torch.load(weights_only=True)``, which never unpickles code;
- ``spec.json``: the env it was trained on and the network's architecture;
- ``policy.pt2``: the same policy as a ``torch.export`` program, for deployment without any
  Python class. ``torch.export.load`` may unpickle parts of the file, so load only ``.pt2``
  files you trust.

``workbench.policy.load_policy(run_id or folder)`` downloads (for a run id), rebuilds the
network from ``spec.json`` and loads ``weights.pt`` safely: one call, no training code.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.export import Dim

from workbench.networks import ACTIVATIONS, Actor, ObsNormalizer, copy_module

POLICY_FILE = "policy.pt2"
WEIGHTS_FILE = "weights.pt"
SPEC_FILE = "spec.json"
ARTIFACT_DIR = "policy"


class ExportedPolicy(nn.Module):
    """Raw observation batch -> action batch in the env's units."""

    def __init__(self, actor: nn.Module, obs_norm: nn.Module, low: np.ndarray, high: np.ndarray):
        super().__init__()
        self.actor = actor
        self.obs_norm = obs_norm
        low_t = torch.as_tensor(low, dtype=torch.float32)
        high_t = torch.as_tensor(high, dtype=torch.float32)
        self.register_buffer("scale", (high_t - low_t) / 2)
        self.register_buffer("bias", (high_t + low_t) / 2)

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        return self.actor(self.obs_norm(obs)) * self.scale + self.bias


def describe(actor: Actor, obs_norm: ObsNormalizer) -> dict[str, Any]:
    """The architecture of an actor and normalizer, enough to rebuild them from weights."""
    linears = [m for m in actor.net if isinstance(m, nn.Linear)]
    names = {a.module: name for name, a in ACTIVATIONS.items()}
    activation = next(names[type(m)] for m in actor.net if type(m) in names)
    return {
        "hidden": [m.out_features for m in linears[:-1]],
        "activation": activation,
        "layer_norm": any(isinstance(m, nn.LayerNorm) for m in actor.net),
        "normalize_obs": obs_norm.enabled,
        "obs_clip": obs_norm.clip,
    }


def build(spec: dict[str, Any]) -> ExportedPolicy:
    """An untrained policy module with the architecture ``spec`` describes."""
    arch = spec["architecture"]
    obs_dim, action_dim = int(spec["obs_dim"]), int(spec["action_dim"])
    actor = Actor(
        obs_dim,
        action_dim,
        arch["hidden"],
        activation=arch["activation"],
        layer_norm=arch["layer_norm"],
    )
    norm = ObsNormalizer(obs_dim, enabled=arch["normalize_obs"], clip=arch["obs_clip"])
    low = np.asarray(spec["action_low"], dtype=np.float32)
    high = np.asarray(spec["action_high"], dtype=np.float32)
    return ExportedPolicy(actor, norm, low, high).eval()


def policy_spec(
    env_cfg: Any, obs_dim: int, action_dim: int, low: np.ndarray, high: np.ndarray, **extra: Any
) -> dict[str, Any]:
    """What ``load_policy`` needs besides the weights: the env to run it on, its bounds."""
    return {
        "env_id": env_cfg.id,
        "env_kwargs": dict(env_cfg.kwargs),
        "max_episode_steps": env_cfg.max_episode_steps,
        "time_feature": env_cfg.time_feature,
        "obs_dim": obs_dim,
        "action_dim": action_dim,
        "action_low": low.tolist(),
        "action_high": high.tolist(),
        "normalize_obs": env_cfg.normalize_obs,
        **extra,
    }


def save_policy(
    actor: Actor,
    obs_norm: ObsNormalizer,
    low: np.ndarray,
    high: np.ndarray,
    spec: dict[str, Any],
    out_dir: Path,
) -> Path:
    """Export a CPU copy of the policy and its spec into ``out_dir``; returns the dir."""
    out_dir.mkdir(parents=True, exist_ok=True)
    module = ExportedPolicy(
        copy_module(actor).cpu().eval(), copy_module(obs_norm).cpu().eval(), low, high
    ).eval()
    spec = {**spec, "architecture": describe(actor, obs_norm)}
    torch.save(module.state_dict(), out_dir / WEIGHTS_FILE)
    obs_dim = int(spec["obs_dim"])
    example = torch.zeros(2, obs_dim, dtype=torch.float32)
    program = torch.export.export(
        module, (example,), dynamic_shapes={"obs": {0: Dim("batch", min=1)}}
    )
    torch.export.save(program, out_dir / POLICY_FILE)
    (out_dir / SPEC_FILE).write_text(json.dumps(spec, indent=2, sort_keys=True))
    return out_dir


@dataclass
class LoadedPolicy:
    """A loaded policy: ``module`` maps an observation batch to actions; ``spec`` its env."""

    module: nn.Module
    spec: dict[str, Any]

    def __call__(self, obs: np.ndarray) -> np.ndarray:
        """One raw observation -> one env action (numpy in, numpy out)."""
        with torch.no_grad():
            x = torch.as_tensor(np.asarray(obs, dtype=np.float32)).reshape(1, -1)
            return self.module(x)[0].numpy()

    def as_fn(self) -> Callable[[np.ndarray], np.ndarray]:
        return self.__call__


def load_policy_dir(path: str | Path) -> LoadedPolicy:
    path = Path(path)
    if path.is_file():
        path = path.parent
    weights_file, spec_file = path / WEIGHTS_FILE, path / SPEC_FILE
    if not weights_file.is_file() or not spec_file.is_file():
        raise FileNotFoundError(
            f"no saved policy in {path} (expected {WEIGHTS_FILE} and {SPEC_FILE})"
        )
    spec = json.loads(spec_file.read_text())
    module = build(spec)
    try:
        state = torch.load(weights_file, map_location="cpu", weights_only=True)
        module.load_state_dict(state)
    except Exception as err:
        first = str(err).strip().splitlines()[0]
        raise ValueError(
            f"{weights_file} does not load as this policy's weights: {first}"
        ) from None
    return LoadedPolicy(module=module, spec=spec)


def load_policy(run_or_path: str | Path, *, tracking_uri: str | None = None) -> LoadedPolicy:
    """Load a policy from a local ``policy/`` folder or from an MLflow run id."""
    candidate = Path(run_or_path)
    if candidate.exists():
        return load_policy_dir(candidate)
    import tempfile

    from workbench.tracking import download_artifacts, resolve_uri

    uri = resolve_uri(tracking_uri, "mlruns")
    dst = Path(tempfile.mkdtemp(prefix="workbench-policy-"))
    local = download_artifacts(uri, str(run_or_path), ARTIFACT_DIR, dst)
    return load_policy_dir(local)
