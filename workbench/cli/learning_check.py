"""``workbench learning-check``: train a preset on several seeds in parallel; print JSON.

Exit 0 when every seed reaches ``--target``, 1 otherwise.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

from workbench.logs import setup_logging


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("learning-check", help="train a preset on several seeds; print JSON")
    p.add_argument("--preset", default="pendulum_ddpg")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--workers", type=int, default=min(3, os.cpu_count() or 1))
    p.add_argument("--target", type=float, default=-200.0, help="every seed must reach this")
    p.add_argument("overrides", nargs="*", help="extra Hydra overrides")
    p.set_defaults(handler=cmd_learning_check)


def _learning_check_job(overrides: list[str]) -> dict[str, Any]:
    from workbench.config import compose
    from workbench.tracking.tags import CHECK_TAG
    from workbench.train import train

    setup_logging()  # spawned workers start with logging unconfigured
    cfg = compose(overrides)
    result = train(cfg, tags={CHECK_TAG: "learning"})
    return {
        "seed": cfg.seed,
        "final_return_mean": round(result.final_return_mean, 2),
        "final_return_std": round(result.final_return_std, 2),
        "run_id": result.run_id,
        "wall_time_s": round(result.wall_time_s, 1),
    }


def cmd_learning_check(args: argparse.Namespace) -> int:
    import multiprocessing as mp
    import time
    from concurrent.futures import ProcessPoolExecutor

    from workbench.config import ConfigError, compose
    from workbench.specfile import compose_error_text

    seeds = [int(s) for s in args.seeds.split(",")]
    base = [f"+experiment={args.preset}", "progress=false", *args.overrides]
    try:
        for s in seeds:  # every job's config is valid before any starts
            compose([*base, f"seed={s}"])
    except ConfigError as err:
        print(f"workbench: {err}", file=sys.stderr)
        return 2
    except Exception as err:  # Hydra: an override that does not compose
        print(f"workbench: invalid overrides: {compose_error_text(err)}", file=sys.stderr)
        return 2
    t0 = time.perf_counter()
    jobs = [[*base, f"seed={s}"] for s in seeds]
    with ProcessPoolExecutor(args.workers, mp_context=mp.get_context("spawn")) as pool:
        results = list(pool.map(_learning_check_job, jobs))
    returns = [r["final_return_mean"] for r in results]
    out = {
        "check": "learning",
        "preset": args.preset,
        "overrides": args.overrides,
        "target": args.target,
        "seeds": results,
        "final_returns": returns,
        "all_seeds_meet_target": all(r >= args.target for r in returns),
        "wall_time_s": round(time.perf_counter() - t0, 1),
    }
    print(json.dumps(out, indent=2))
    return 0 if out["all_seeds_meet_target"] else 1
