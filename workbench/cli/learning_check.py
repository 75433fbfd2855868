"""``workbench learning-check``: train a preset on several seeds in parallel; print JSON.

Exit 0 when every seed reaches ``--target``, 1 otherwise. With ``--population K`` the seeds
(0..K-1 unless given) are also trained as one population, and the check is that the
population's final-return IQM lies within the 95% bootstrap CI of the single runs' IQM (the
members equal their single runs to float rounding, which long training may grow).
"""

from __future__ import annotations

import argparse
import json
import os
from typing import Any

from workbench.cli.args import add_ray_option, ray_cluster
from workbench.logs import setup_logging


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("learning-check", help="train a preset on several seeds; print JSON")
    p.add_argument("--preset", default="pendulum_ddpg")
    p.add_argument("--seeds", default=None, help="comma-separated (default 0,1,2; 0..K-1)")
    p.add_argument(
        "--population",
        type=int,
        default=1,
        metavar="K",
        help="also train the seeds as one population and compare it with the single runs",
    )
    p.add_argument(
        "--workers",
        type=int,
        default=min(3, os.cpu_count() or 1),
        help="worker processes; with --ray each seed is a task, placed by Ray",
    )
    p.add_argument("--target", type=float, default=-200.0, help="every seed must reach this")
    add_ray_option(p, "each seed (and population) as a task")
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


def _population_job(jobs: list[list[str]]) -> list[dict[str, Any]]:
    from workbench.config import compose
    from workbench.tracking.tags import CHECK_TAG
    from workbench.train import Member, train_population

    setup_logging()
    members = [Member(compose(o), tags={CHECK_TAG: "learning-population"}) for o in jobs]
    results = train_population(members)
    return [
        {
            "seed": m.cfg.seed,
            "status": r.status,
            "final_return_mean": round(r.final_return_mean, 2),
            "run_id": r.run_id,
            "wall_time_s": round(r.wall_time_s, 1),
        }
        for m, r in zip(members, results, strict=True)
    ]


def cmd_learning_check(args: argparse.Namespace) -> int:
    import multiprocessing as mp
    import time
    from concurrent.futures import ProcessPoolExecutor

    from workbench.config import ConfigError, compose
    from workbench.errors import ConfigProblem
    from workbench.specfile import compose_error_text
    from workbench.tracking import resolve_uri

    if args.population < 1:
        raise ValueError(f"--population={args.population}: must be >= 1")
    default = ",".join(map(str, range(args.population))) if args.population > 1 else "0,1,2"
    seeds = [int(s) for s in (args.seeds or default).split(",")]
    base = [f"+experiment={args.preset}", "progress=false", *args.overrides]
    try:
        for s in seeds:  # every job's config is valid before any starts
            compose([*base, f"seed={s}"])
    except ConfigError:
        raise
    except Exception as err:  # Hydra: an override that does not compose
        raise ConfigProblem(f"invalid overrides: {compose_error_text(err)}") from None
    t0 = time.perf_counter()
    jobs = [[*base, f"seed={s}"] for s in seeds]
    chunks = [jobs[i : i + args.population] for i in range(0, len(jobs), args.population)]
    population = None
    if args.ray is not None:  # the same jobs as Ray tasks, placed by Ray
        with ray_cluster(args.ray, args.ray_gpus) as cluster:
            cfg = compose(jobs[0])
            if cfg.tracking.backend == "mlflow":
                uri = resolve_uri(cfg.tracking.uri, cfg.tracking.dir)
                cluster.require_shared_stores(tracking_uri=uri)
                # the tasks' nodes see the driver's store, whatever their environment says
                jobs = [[*j, f"tracking.uri={uri}"] for j in jobs]
                chunks = [
                    jobs[i : i + args.population] for i in range(0, len(jobs), args.population)
                ]
            need = [cluster.resources_of(cfg)]
            if args.population > 1:
                population = [
                    r
                    for rs in cluster.map(
                        _population_job,
                        [(c,) for c in chunks],
                        name="learning-check-population",
                        resources=need * len(chunks),
                    )
                    for r in rs
                ]
            results = cluster.map(
                _learning_check_job,
                [(j,) for j in jobs],
                name="learning-check",
                resources=need * len(jobs),
            )
    else:
        with ProcessPoolExecutor(args.workers, mp_context=mp.get_context("spawn")) as pool:
            if args.population > 1:  # populations of K, side by side with the single runs
                pending = [pool.submit(_population_job, chunk) for chunk in chunks]
            results = list(pool.map(_learning_check_job, jobs))
            if args.population > 1:
                population = [r for job in pending for r in job.result()]
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
    if population is not None:
        from workbench import stats

        lo, hi = stats.bootstrap_ci(returns, "iqm")
        pop_returns = [r["final_return_mean"] for r in population]
        pop_iqm = float(stats.iqm(pop_returns))
        out["population"] = {
            "size": args.population,
            "seeds": population,
            "final_returns": pop_returns,
            "iqm": round(pop_iqm, 2),
        }
        out["single_runs_iqm"] = round(float(stats.iqm(returns)), 2)
        out["single_runs_iqm_ci95"] = [round(lo, 2), round(hi, 2)]
        out["population_iqm_within_ci"] = bool(lo <= pop_iqm <= hi)
        # a member equals its single run to float rounding (``ddpg``), which training can
        # grow: how far the final returns ended apart, and whether they are the same numbers
        diffs = [abs(p - r) for p, r in zip(pop_returns, returns, strict=True)]
        out["population_max_return_difference"] = round(max(diffs), 4)
        out["population_equals_single_runs"] = pop_returns == returns
    print(json.dumps(out, indent=2))
    ok = out["all_seeds_meet_target"] and out.get("population_iqm_within_ci", True)
    return 0 if ok else 1
