"""The final policy as a standalone artifact.

A run's ``policy/`` artifact holds ``policy.pt2`` — a ``torch.export`` program mapping raw
observations to env actions, with observation normalization and action rescaling baked in —
and ``spec.json`` describing the env it was trained on. Loading needs torch alone:

    policy = torch.export.load("policy.pt2").module()
    action = policy(torch.as_tensor(obs, dtype=torch.float32)[None])[0]

``workbench.policy.load_policy(run_id)`` does the download and the load in one call.
Neither path unpickles arbitrary objects.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.export import Dim

POLICY_FILE = "policy.pt2"
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


def save_policy(
    actor: nn.Module,
    obs_norm: nn.Module,
    low: np.ndarray,
    high: np.ndarray,
    spec: dict[str, Any],
    out_dir: Path,
) -> Path:
    """Export a CPU copy of the policy and its spec into ``out_dir``; returns the dir."""
    out_dir.mkdir(parents=True, exist_ok=True)
    module = ExportedPolicy(
        copy.deepcopy(actor).cpu().eval(), copy.deepcopy(obs_norm).cpu().eval(), low, high
    ).eval()
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
    policy_file, spec_file = path / POLICY_FILE, path / SPEC_FILE
    if not policy_file.is_file() or not spec_file.is_file():
        raise FileNotFoundError(
            f"no exported policy in {path} (expected {POLICY_FILE}, {SPEC_FILE})"
        )
    module = torch.export.load(policy_file).module()
    return LoadedPolicy(module=module, spec=json.loads(spec_file.read_text()))


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
