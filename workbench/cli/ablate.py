"""``workbench ablate SPEC``: run an ablation spec (variants x seeds) and report.

Exit 2 for a bad spec or option, 1 when a run failed or the store cannot be used, else 0.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

from workbench.cli.args import add_ray_option, ray_cluster


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("ablate", help="run an ablation spec (variants x seeds) and report")
    p.add_argument("spec", type=Path, help="ablation spec YAML, e.g. studies/ablations/tau.yaml")
    p.add_argument(
        "--workers",
        type=int,
        default=1,
        help="worker processes (default 1); with --ray each cell is a task and Ray runs as "
        "many at once as the cluster's CPUs allow",
    )
    p.add_argument(
        "--population",
        type=int,
        default=1,
        metavar="K",
        help="train up to K runs that differ only in per-member values (not in "
        "population.SHARED_KEYS) as one population; default 1: one run at a time",
    )
    p.add_argument(
        "--out", type=Path, default=None, help="report folder (default mlruns/ablations/<name>)"
    )
    p.add_argument("--report-only", action="store_true", help="report on finished runs only")
    p.add_argument(
        "--tracking-uri",
        default=None,
        metavar="URI",
        help="MLflow tracking URI of the runs (default: the spec's tracking.uri, else "
        "MLFLOW_TRACKING_URI, else the embedded store); on a Ray cluster a server started "
        "with --serve-artifacts",
    )
    add_ray_option(p, "each cell (or population) as a task")
    p.add_argument(
        "--steps",
        type=int,
        default=None,
        metavar="N",
        help="quick look: N env steps per run instead of the spec's; runs as an ablation "
        "of its own, <name>-quick-N, apart from the full one's runs and report",
    )
    p.add_argument(
        "--seeds",
        default=None,
        metavar="S",
        help="quick look: S seeds (0..S-1), or a comma-separated list of seeds",
    )
    p.add_argument(
        "overrides",
        nargs="*",
        metavar="key=value",
        help="quick look: Hydra overrides appended to the spec's base (e.g. "
        "agent.learning_starts=500); the name then carries a hash of them",
    )
    p.set_defaults(handler=cmd_ablate)


def _at_least_one(flag: str, value: int | None) -> None:
    if value is not None and value < 1:
        raise ValueError(f"{flag}={value}: must be >= 1")


def _seeds(text: str | None) -> tuple[int, ...] | None:
    """``--seeds 3``: seeds 0, 1, 2; ``--seeds 0,5``: those seeds."""
    if text is None:
        return None
    allowed = "must be a count >= 1 or a comma-separated list of distinct seeds >= 0"
    try:
        values = [int(v) for v in text.split(",")]
    except ValueError:
        raise ValueError(f"--seeds={text!r}: {allowed}") from None
    if "," not in text:
        if values[0] < 1:
            raise ValueError(f"--seeds={text!r}: {allowed}")
        return tuple(range(values[0]))
    if min(values) < 0 or len(set(values)) != len(values):
        raise ValueError(f"--seeds={text!r}: {allowed}")
    return tuple(values)


def cmd_ablate(args: argparse.Namespace) -> int:
    from workbench import ablation, display
    from workbench.specfile import QuickLook
    from workbench.tracking import resolve_uri, runs_view_line

    for flag in ("workers", "population", "steps"):
        _at_least_one(f"--{flag}", getattr(args, flag))
    quick = QuickLook(steps=args.steps, seeds=_seeds(args.seeds), overrides=tuple(args.overrides))
    spec = ablation.load_spec(args.spec, quick)
    if args.tracking_uri:
        spec = dataclasses.replace(spec, tracking_uri=args.tracking_uri)
    if quick:
        print(
            f"quick look at {args.spec} as ablation {spec.name!r} (experiment "
            f"{spec.experiment!r}; the full ablation's runs and report are not touched)",
            file=sys.stderr,
        )
    with ray_cluster(
        None if args.report_only else args.ray, None if args.report_only else args.ray_gpus
    ) as cluster:
        result = ablation.run_ablation(
            spec,
            workers=args.workers,
            population=args.population,
            out_dir=args.out,
            run=not args.report_only,
            cluster=cluster,
        )
    console = display.console()
    ablation.print_table(result, result.rows, console)
    console.print(
        f"ran {result.ran}, reused {result.skipped} finished run(s), {len(result.failed)} failed; "
        f"report: {result.files.get('markdown')}; parent run: {result.parent_run_id}"
    )
    for job in result.failed:
        console.print(f"  failed: {job.variant} seed {job.seed}")
    uri = resolve_uri(spec.tracking_uri, spec.tracking_dir)
    if link := runs_view_line(uri, result.parent_run_id, spec.tracking_dir):
        print(link, file=sys.stderr)
    return 1 if result.failed else 0
