"""Tiny study specs for the tuning tests: [16]-unit nets, a few hundred steps, a temp store."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

TINY_OVERRIDES = [
    "agent.actor_hidden=[16]",
    "agent.critic_hidden=[16]",
    "agent.batch_size=32",
    "agent.learning_starts=100",
    "eval.episodes=2",
    "tracking.log_every=100",
    "tracking.save_policy=false",
]

# a whole `workbench train` in a few seconds: what the CLI tests run
TINY_RUN = [
    "total_steps=300",
    "agent.learning_starts=100",
    "agent.actor_hidden=[8]",
    "agent.critic_hidden=[8]",
    "agent.batch_size=32",
    "eval.every=0",
    "eval.episodes=1",
    "eval.video=false",
    "progress=false",
]


def tiny_spec(tmp: Path, name: str = "tiny", **changes: Any) -> dict[str, Any]:
    """A spec dict; ``changes`` replace top-level keys."""
    spec: dict[str, Any] = {
        "name": name,
        "base": {
            "preset": "pendulum_ddpg",
            "overrides": [*TINY_OVERRIDES, f"tracking.dir={tmp / 'mlruns'}"],
        },
        "steps": 400,
        "eval_every": 100,
        "objective": {"score": "last_k", "k": 2, "seeds": 1},
        "space": {
            "noise": {"type": "categorical", "choices": ["gaussian", "ou"]},
            "noise.theta": {"type": "float", "low": 0.05, "high": 1.0, "when": {"noise": "ou"}},
            "agent.tau": {"type": "float", "low": 0.001, "high": 0.05, "log": True},
        },
        "sampler": {"name": "random", "seed": 0},
        "pruner": "none",
        "n_trials": 2,
        "enqueue_base": False,
    }
    spec.update(changes)
    return spec


def write_spec(tmp: Path, spec: dict[str, Any]) -> Path:
    path = tmp / f"{spec['name']}.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path
