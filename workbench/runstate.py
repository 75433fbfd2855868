"""What the training loop counts and remembers, as one object a checkpoint saves and restores.

Counters (env steps, vector steps, updates, the last log point), the evaluation and episode
history (so a resumed run's final learning curve is whole), the stream of uniform actions
before learning starts, the update metrics summed since the last log point, and the global
random generators. Timing (``last_log_time``) is the one thing a resumed run starts afresh.
"""

from __future__ import annotations

import random
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from workbench import seeding


class MetricMeans:
    """Running sums of update metrics kept on the device; one host read per log point."""

    def __init__(self) -> None:
        self.sums: dict[str, torch.Tensor] = {}
        self.counts: dict[str, int] = {}

    def add(self, metrics: Mapping[str, torch.Tensor]) -> None:
        for key, value in metrics.items():
            if key in self.sums:
                self.sums[key] += value
                self.counts[key] += 1
            else:
                self.sums[key] = value.clone()
                self.counts[key] = 1

    def pop(self) -> dict[str, float]:
        if not self.sums:
            return {}
        keys = list(self.sums)
        values = torch.stack([self.sums[k] for k in keys]).tolist()
        out = {k: v / self.counts[k] for k, v in zip(keys, values, strict=True)}
        self.sums.clear()
        self.counts.clear()
        return out

    def state_dict(self) -> dict[str, Any]:
        return {"sums": {k: v.clone() for k, v in self.sums.items()}, "counts": dict(self.counts)}

    def load_state_dict(self, state: Mapping[str, Any], device: torch.device) -> None:
        # floats too: a run may resume with the other perf.device_metrics setting
        self.sums = {
            k: torch.as_tensor(v, dtype=torch.float32, device=device)
            for k, v in state["sums"].items()
        }
        self.counts = dict(state["counts"])


class HostMetricMeans(MetricMeans):
    """The plain path (``perf.device_metrics=false``): read every metric at every update."""

    def add(self, metrics: Mapping[str, torch.Tensor]) -> None:
        for key, value in metrics.items():
            self.sums[key] = self.sums.get(key, 0.0) + value.item()  # type: ignore[assignment]
            self.counts[key] = self.counts.get(key, 0) + 1

    def pop(self) -> dict[str, float]:
        out = {k: float(v) / self.counts[k] for k, v in self.sums.items()}
        self.sums.clear()
        self.counts.clear()
        return out

    def state_dict(self) -> dict[str, Any]:
        return {"sums": dict(self.sums), "counts": dict(self.counts)}

    def load_state_dict(self, state: Mapping[str, Any], device: torch.device) -> None:
        self.sums = {k: float(v) for k, v in state["sums"].items()}  # type: ignore[misc]
        self.counts = dict(state["counts"])


@dataclass
class RunState:
    seed: int
    device_metrics: bool = True
    step: int = 0  # env steps, all envs together
    vec_steps: int = 0  # steps of the vector env
    updates: int = 0
    last_log_step: int = 0
    updates_since_log: int = 0
    last_log_time: float = field(default_factory=time.perf_counter)
    eval_steps: list[int] = field(default_factory=list)
    eval_returns: list[float] = field(default_factory=list)
    eval_stds: list[float] = field(default_factory=list)
    train_steps: list[int] = field(default_factory=list)
    train_returns: list[float] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.rng = seeding.numpy_rng(self.seed, "random_actions")  # actions before learning
        self.means = MetricMeans() if self.device_metrics else HostMetricMeans()

    def advance(self, n_envs: int) -> int:
        """One vector step; returns the step count before it."""
        prev = self.step
        self.step += n_envs
        self.vec_steps += 1
        return prev

    def record_eval(self, step: int, mean: float, std: float) -> None:
        self.eval_steps.append(step)
        self.eval_returns.append(mean)
        self.eval_stds.append(std)

    def record_episode(self, step: int, episode_return: float) -> None:
        self.train_steps.append(step)
        self.train_returns.append(episode_return)

    def log_point(self, now: float) -> dict[str, float]:
        """The update metrics since the last log point, with the rates over that span."""
        metrics = self.means.pop()
        elapsed = max(now - self.last_log_time, 1e-9)
        metrics["perf/sps"] = (self.step - self.last_log_step) / elapsed
        metrics["perf/updates_per_s"] = self.updates_since_log / elapsed
        self.last_log_step, self.last_log_time, self.updates_since_log = self.step, now, 0
        return metrics

    # ------------------------------------------------------------------------ checkpoints

    def state_dict(self) -> dict[str, Any]:
        return {
            "counters": {
                "step": self.step,
                "n_vec_steps": self.vec_steps,
                "last_log_step": self.last_log_step,
                "updates_since_log": self.updates_since_log,
                "updates": self.updates,
            },
            "history": {
                "eval_steps": list(self.eval_steps),
                "eval_returns": list(self.eval_returns),
                "eval_stds": list(self.eval_stds),
                "train_steps": list(self.train_steps),
                "train_returns": list(self.train_returns),
            },
            "metric_means": self.means.state_dict(),
            "rng": _rng_states(self.rng),
        }

    def load_state_dict(self, state: Mapping[str, Any], device: torch.device) -> None:
        c, h = state["counters"], state["history"]
        self.step, self.vec_steps = int(c["step"]), int(c["n_vec_steps"])
        self.last_log_step = int(c["last_log_step"])
        self.updates_since_log, self.updates = int(c["updates_since_log"]), int(c["updates"])
        self.eval_steps[:], self.eval_returns[:] = h["eval_steps"], h["eval_returns"]
        self.eval_stds[:] = h["eval_stds"]
        self.train_steps[:], self.train_returns[:] = h["train_steps"], h["train_returns"]
        self.means.load_state_dict(state["metric_means"], device)
        _set_rng_states(self.rng, state["rng"])
        self.last_log_time = time.perf_counter()


def _rng_states(rng: np.random.Generator) -> dict[str, Any]:
    """The loop's own stream and the global generators, as plain values and tensors."""
    _, keys, pos, has_gauss, cached = np.random.get_state()
    states: dict[str, Any] = {
        "actions": rng.bit_generator.state,
        "python": random.getstate(),
        "numpy": {
            "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def _set_rng_states(rng: np.random.Generator, states: Mapping[str, Any]) -> None:
    rng.bit_generator.state = states["actions"]
    random.setstate(states["python"])
    n = states["numpy"]
    keys = n["keys"].numpy().astype(np.uint32)
    np.random.set_state(("MT19937", keys, n["pos"], n["has_gauss"], n["cached_gaussian"]))
    torch.set_rng_state(states["torch"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])
