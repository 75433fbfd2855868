"""``workbench compare``: grouped metrics with robust statistics, differing params, curves.

Exit 1 when no run matches the selection, else 0.
"""

from __future__ import annotations

import argparse
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    from workbench.compare import CURVE_METRIC, DEFAULT_METRIC

    p = sub.add_parser("compare", help="compare runs: grouped metrics, differing params, curves")
    p.add_argument("--experiment", action="append", default=[], help="experiment name (repeat)")
    p.add_argument(
        "--filter", default="", help="MLflow filter, e.g. \"params.`agent.tau` = '0.01'\""
    )
    p.add_argument("--runs", action="append", default=[], help="run ids, comma-separated")
    p.add_argument("--tag", action="append", default=[], help="KEY=VALUE (repeat)")
    p.add_argument(
        "--group-by",
        default="config_hash",
        help="config_hash (default: seeds of one config together), run, tag:<name>, param:<name>",
    )
    p.add_argument("--metric", default=DEFAULT_METRIC)
    p.add_argument(
        "--also",
        nargs="*",
        default=["eval/return_mean", "perf/sps"],
        help="more metrics to show side by side (group means)",
    )
    p.add_argument("--curve-metric", default=CURVE_METRIC)
    p.add_argument("--csv", type=Path, default=None, help="write the group table as CSV")
    p.add_argument("--png", type=Path, default=None, help="write learning curves with bands")
    p.add_argument("--tracking-uri", default=None, help="default: MLFLOW_TRACKING_URI or mlruns/")
    p.set_defaults(handler=cmd_compare)


def cmd_compare(args: argparse.Namespace) -> int:
    from workbench import compare, display
    from workbench.tracking import require_store, resolve_uri

    uri = resolve_uri(args.tracking_uri, "mlruns")
    require_store(uri)
    runs = compare.select_runs(
        uri,
        experiments=args.experiment,
        filter_string=args.filter,
        run_ids=[r for ids in args.runs for r in ids.split(",") if r],
        tags=args.tag,
    )
    runs = [r for r in runs if args.metric in r.metrics]
    console = display.console()
    if not runs:
        console.print(f"no runs with metric {args.metric!r} match the selection")
        return 1
    groups = compare.group_runs(runs, args.group_by)
    summaries = compare.summarize_groups(groups, args.metric, args.also)
    diff = compare.differing_params(groups)
    compare.print_report(groups, summaries, diff, args.metric, console)
    if args.csv:
        compare.write_csv(args.csv, summaries, diff, args.metric)
        console.print(f"wrote {args.csv}")
    if args.png:
        from workbench import plots

        curves = compare.group_curves(uri, groups, args.curve_metric)
        fig = plots.curves_with_bands(curves, title=f"{args.curve_metric} by {args.group_by}")
        args.png.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(args.png, dpi=120)
        console.print(f"wrote {args.png}")
    return 0
