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

import argparse
import json
import logging
import os
import platform
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

log = logging.getLogger(__name__)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--spec", type=Path, default=None, help="default: studies/pendulum_ddpg.yaml")
    p.add_argument("--trials", type=int, default=30)
    p.add_argument("--steps", type=int, default=10_000, help="env steps per trial")
    p.add_argument("--eval-every", type=int, default=1000)
    p.add_argument("--eval-episodes", type=int, default=5)
    p.add_argument("--sampler-seed", type=int, default=0)
    p.add_argument("--pruner", default="successive_halving", help="pruner of the pruned study")
    p.add_argument(
        "--pruner-args",
        default=None,
        help="JSON keyword arguments of the pruner (default for successive_halving and "
        "hyperband: min_resource 2 x eval-every, reduction_factor 3)",
    )
    p.add_argument(
        "--scaling-trials",
        type=int,
        default=None,
        help="trials of the 2-worker unpruned study (default: --trials)",
    )
    p.add_argument("--skip-scaling", action="store_true", help="no 2-worker run")
    p.add_argument("--dir", type=Path, default=None, help="store folder (default: a temp dir)")


def _spec_text(args: argparse.Namespace, name: str, pruner: str, pruner_args: dict) -> str:
    path = args.spec or Path(__file__).resolve().parents[2] / "studies" / "pendulum_ddpg.yaml"
    raw = yaml.safe_load(Path(path).read_text())
    raw["name"] = name
    raw["steps"] = args.steps
    raw["eval_every"] = args.eval_every
    raw["n_trials"] = args.trials
    raw.pop("timeout", None)
    raw.pop("storage", None)
    raw["tracking"] = {"experiment": f"bench-{name}"}
    sampler = raw.get("sampler", "tpe")
    sampler = {"name": sampler} if isinstance(sampler, str) else dict(sampler)
    sampler["seed"] = args.sampler_seed
    raw["sampler"] = sampler
    raw["pruner"] = {"name": pruner, **pruner_args}
    base = raw.setdefault("base", {})
    base["overrides"] = [
        *[o for o in base.get("overrides", []) if not o.startswith("eval.episodes=")],
        f"eval.episodes={args.eval_episodes}",
        f"tracking.dir={args.store}",
    ]
    return yaml.safe_dump(raw, sort_keys=False)


def _run(
    args: argparse.Namespace,
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
    spec = parse_spec(_spec_text(args, name, pruner, pruner_args), source=f"bench spec {label}")
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


def cmd_bench(args: argparse.Namespace) -> int:
    for key in ("trials", "steps", "eval_every", "eval_episodes"):
        if getattr(args, key) < 1:
            raise ValueError(f"--{key.replace('_', '-')}={getattr(args, key)}: must be >= 1")
    if args.pruner_args is not None:
        pruner_args = json.loads(args.pruner_args)
    elif args.pruner in ("successive_halving", "hyperband"):
        pruner_args = {"min_resource": 2 * args.eval_every, "reduction_factor": 3}
        if args.pruner == "hyperband":
            pruner_args["max_resource"] = args.steps
    else:
        pruner_args = {}
    tmp = None
    if args.dir is None:
        tmp = tempfile.TemporaryDirectory(prefix="workbench-tune-bench-")
        args.store = Path(tmp.name)
    else:
        args.store = args.dir.resolve()
    try:
        unpruned = _run(args, "nopruning", "none", {}, 1, args.trials)
        pruned = _run(args, "pruning", args.pruner, pruner_args, 1, args.trials)
        scaling = None
        if not args.skip_scaling:
            scaling = _run(args, "2workers", "none", {}, 2, args.scaling_trials or args.trials)
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
            "spec": str(args.spec or "studies/pendulum_ddpg.yaml"),
            "trials": args.trials,
            "steps_per_trial": args.steps,
            "eval_every": args.eval_every,
            "eval_episodes": args.eval_episodes,
            "sampler_seed": args.sampler_seed,
            "pruner": args.pruner,
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
    print(json.dumps(out, indent=2))
    return 0
