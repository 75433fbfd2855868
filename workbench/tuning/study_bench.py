"""Benchmark: the same small Pendulum study with and without pruning, and with 1 and 2 workers.

    workbench tune-bench                                  # 30 trials x 10k steps; JSON
    workbench tune-bench --trials 24 --steps 8000 --scaling-trials 16   # a shorter run

Every study here uses the same spec (``studies/pendulum_ddpg.yaml`` with the flags applied)
and the same sampler seed; only the pruner or the number of workers differs. Each study gets a
fresh name in a fresh store, so nothing is resumed by accident. Targets: pruning spends <= 60%
of the env steps for a best value within 10% of the unpruned one; 2 workers give >= 1.6x the
trials/hour of 1. On a shared machine wrap it: ``flock /tmp/workbench-bench.lock workbench
tune-bench``.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BenchSettings:
    """What ``workbench tune-bench`` varies (its flags)."""

    spec: Path | None  # None: studies/pendulum_ddpg.yaml
    trials: int
    steps: int  # env steps per trial
    eval_every: int
    eval_episodes: int
    sampler_seed: int
    pruner: str  # the pruner of the pruned study
    pruner_args: dict[str, Any] | None  # None: defaults for successive_halving and hyperband
    scaling_trials: int | None  # trials of the 2-worker unpruned study (None: ``trials``)
    skip_scaling: bool
    dir: Path | None  # store folder (None: a temp dir)


def _spec_text(
    settings: BenchSettings, store: Path, name: str, pruner: str, pruner_args: dict
) -> str:
    path = settings.spec or Path(__file__).resolve().parents[2] / "studies" / "pendulum_ddpg.yaml"
    raw = yaml.safe_load(Path(path).read_text())
    raw["name"] = name
    raw["steps"] = settings.steps
    raw["eval_every"] = settings.eval_every
    raw["n_trials"] = settings.trials
    raw.pop("timeout", None)
    raw.pop("storage", None)
    raw["tracking"] = {"experiment": f"bench-{name}"}
    sampler = raw.get("sampler", "tpe")
    sampler = {"name": sampler} if isinstance(sampler, str) else dict(sampler)
    sampler["seed"] = settings.sampler_seed
    raw["sampler"] = sampler
    raw["pruner"] = {"name": pruner, **pruner_args}
    base = raw.setdefault("base", {})
    base["overrides"] = [
        *[o for o in base.get("overrides", []) if not o.startswith("eval.episodes=")],
        f"eval.episodes={settings.eval_episodes}",
        f"tracking.dir={store}",
    ]
    return yaml.safe_dump(raw, sort_keys=False)


def _run(
    settings: BenchSettings,
    store: Path,
    label: str,
    pruner: str,
    pruner_args: dict,
    workers: int,
    n_trials: int,
) -> dict[str, Any]:
    from workbench.tuning.launch import run_study
    from workbench.tuning.report import summarize
    from workbench.tuning.spec import parse_spec

    name = f"bench-{label}-{int(time.time())}"
    spec = parse_spec(
        _spec_text(settings, store, name, pruner, pruner_args), source=f"bench spec {label}"
    )
    t0 = time.perf_counter()
    outcome = run_study(spec, workers=workers, n_trials=n_trials)
    wall = time.perf_counter() - t0
    s = summarize(outcome.study, spec)
    result = {
        "study": name,
        "pruner": pruner,
        "workers": workers,
        "trials": s["n_trials"],
        "states": s["states"],
        "best_value": round(s["best_value"], 2) if s["best_value"] is not None else None,
        "best_trial": s["best_trial"],
        "env_steps": s["env_steps"],
        "wall_time_s": round(wall, 1),
        "trials_per_hour": round(s["n_trials"] / wall * 3600, 1),
    }
    log.info("tune-bench %s: %s", label, json.dumps(result))  # survives a later failure
    return result


def run_bench(settings: BenchSettings) -> dict[str, Any]:
    """Run the three studies and compare them: everything ``workbench tune-bench`` prints."""
    if settings.pruner_args is not None:
        pruner_args = settings.pruner_args
    elif settings.pruner in ("successive_halving", "hyperband"):
        pruner_args = {"min_resource": 2 * settings.eval_every, "reduction_factor": 3}
        if settings.pruner == "hyperband":
            pruner_args["max_resource"] = settings.steps
    else:
        pruner_args = {}
    tmp = None
    if settings.dir is None:
        tmp = tempfile.TemporaryDirectory(prefix="workbench-tune-bench-")
        store = Path(tmp.name)
    else:
        store = settings.dir.resolve()
    try:
        unpruned = _run(settings, store, "nopruning", "none", {}, 1, settings.trials)
        pruned = _run(settings, store, "pruning", settings.pruner, pruner_args, 1, settings.trials)
        scaling = None
        if not settings.skip_scaling:
            n = settings.scaling_trials or settings.trials
            scaling = _run(settings, store, "2workers", "none", {}, 2, n)
    finally:
        if tmp is not None:
            tmp.cleanup()
    bu, bp = unpruned["best_value"], pruned["best_value"]
    steps_ratio = pruned["env_steps"] / unpruned["env_steps"] if unpruned["env_steps"] else None
    gap = abs(bp - bu) / abs(bu) if bu not in (None, 0) and bp is not None else None
    out: dict[str, Any] = {
        "benchmark": "tune-bench",
        "machine": {
            "cpu": platform.processor() or platform.machine(),
            "cores": os.cpu_count(),
            "python": platform.python_version(),
        },
        "settings": {
            "spec": str(settings.spec or "studies/pendulum_ddpg.yaml"),
            "trials": settings.trials,
            "steps_per_trial": settings.steps,
            "eval_every": settings.eval_every,
            "eval_episodes": settings.eval_episodes,
            "sampler_seed": settings.sampler_seed,
            "pruner": settings.pruner,
            "pruner_args": pruner_args,
        },
        "unpruned_1_worker": unpruned,
        "pruned_1_worker": pruned,
        "pruning": {
            "env_steps_ratio": round(steps_ratio, 3) if steps_ratio is not None else None,
            "best_value_gap": round(gap, 3) if gap is not None else None,
            "target_met": bool(
                steps_ratio is not None and gap is not None and steps_ratio <= 0.6 and gap <= 0.1
            ),
        },
    }
    if scaling is not None:
        speedup = scaling["trials_per_hour"] / unpruned["trials_per_hour"]
        out["unpruned_2_workers"] = scaling
        out["scaling"] = {
            "trials_per_hour_1_worker": unpruned["trials_per_hour"],
            "trials_per_hour_2_workers": scaling["trials_per_hour"],
            "speedup": round(speedup, 2),
            "target_met": speedup >= 1.6,
        }
    return out
