"""``workbench ablate SPEC``: run an ablation spec (variants x seeds) and report.

Exit 2 for a bad spec or option, 1 when a run failed or the store cannot be used, else 0.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("ablate", help="run an ablation spec (variants x seeds) and report")
    p.add_argument("spec", type=Path, help="ablation spec YAML, e.g. studies/ablations/tau.yaml")
    p.add_argument("--workers", type=int, default=1, help="worker processes (default 1)")
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
    p.set_defaults(handler=cmd_ablate)


def cmd_ablate(args: argparse.Namespace) -> int:
    from rich.console import Console

    from workbench import ablation

    if args.population < 1:
        print(f"workbench: --population={args.population}: must be >= 1", file=sys.stderr)
        return 2
    spec = ablation.load_spec(args.spec)
    result = ablation.run_ablation(
        spec,
        workers=args.workers,
        population=args.population,
        out_dir=args.out,
        run=not args.report_only,
    )
    console = Console()
    if not console.is_terminal:
        console.width = 180
    ablation.print_table(result, result.rows, console)
    console.print(
        f"ran {result.ran}, reused {result.skipped} finished run(s), {len(result.failed)} failed; "
        f"report: {result.files.get('markdown')}; parent run: {result.parent_run_id}"
    )
    for job in result.failed:
        console.print(f"  failed: {job.variant} seed {job.seed}")
    return 1 if result.failed else 0
