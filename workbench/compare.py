"""``workbench compare``: which of these runs is better, and why.

Selects runs (experiment, MLflow filter, run ids, tags), groups them (config hash, a tag or a
param), prints the params that differ between groups and the metrics side by side with
robust statistics over each group's runs, and draws their learning curves with bands.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from rich.console import Console

from workbench import display, stats
from workbench.tracking import RunRecord, metric_history, search_runs
from workbench.tracking.tags import CONFIG_HASH_TAG

DEFAULT_METRIC = "eval/final_return_mean"
CURVE_METRIC = "eval/return_mean"
# params that vary between seeds of the same config: never a reason two groups differ
_NOISE_PARAMS = {"seed", "tracking.run_name"}


def group_key(by: str) -> Callable[[RunRecord], str]:
    """'config_hash', 'tag:<name>', 'param:<name>' or 'run' -> a function run -> group name."""
    if by == "config_hash":
        return lambda r: r.tags.get(CONFIG_HASH_TAG, "?")
    if by == "run":
        return lambda r: f"{r.run_name} ({r.run_id[:8]})"
    kind, _, name = by.partition(":")
    if kind == "tag" and name:
        return lambda r: r.tags.get(name, "(none)")
    if kind == "param" and name:
        return lambda r: r.params.get(name, "(none)")
    raise ValueError(f"--group-by={by!r}: must be config_hash, run, tag:<name> or param:<name>")


def select_runs(
    uri: str,
    *,
    experiments: Sequence[str] = (),
    filter_string: str = "",
    run_ids: Sequence[str] = (),
    tags: Sequence[str] = (),
) -> list[RunRecord]:
    clauses = [filter_string] if filter_string else []
    for tag in tags:
        key, sep, value = tag.partition("=")
        if not sep or not key:
            raise ValueError(f"--tag {tag!r}: expected KEY=VALUE")
        value = value.replace("'", "\\'")
        clauses.append(f"tags.`{key}` = '{value}'")
    return search_runs(
        uri, experiments=experiments, filter_string=" and ".join(clauses), run_ids=run_ids
    )


def group_runs(runs: Sequence[RunRecord], by: str) -> dict[str, list[RunRecord]]:
    key = group_key(by)
    groups: dict[str, list[RunRecord]] = {}
    for run in runs:
        groups.setdefault(key(run), []).append(run)
    return dict(sorted(groups.items()))


def _value_in_group(runs: Sequence[RunRecord], param: str) -> str:
    values = sorted({r.params.get(param, "(unset)") for r in runs})
    return values[0] if len(values) == 1 else " | ".join(values)


def differing_params(groups: dict[str, list[RunRecord]]) -> dict[str, dict[str, str]]:
    """{param: {group: value}} for the params whose value is not the same in every group."""
    keys = sorted({k for runs in groups.values() for r in runs for k in r.params})
    out = {}
    for key in keys:
        if key in _NOISE_PARAMS:
            continue
        per_group = {g: _value_in_group(runs, key) for g, runs in groups.items()}
        if len(set(per_group.values())) > 1:
            out[key] = per_group
    return out


@dataclass
class GroupSummary:
    group: str
    n: int
    summary: stats.Summary
    others: dict[str, float]  # mean of other metrics' latest values


def summarize_groups(
    groups: dict[str, list[RunRecord]], metric: str, others: Sequence[str] = ()
) -> list[GroupSummary]:
    out = []
    for name, runs in groups.items():
        values = [r.metrics[metric] for r in runs if metric in r.metrics]
        extra = {}
        for m in others:
            vals = [r.metrics[m] for r in runs if m in r.metrics]
            extra[m] = float(np.mean(vals)) if vals else math.nan
        out.append(GroupSummary(name, len(values), stats.summarize(values), extra))
    return out


def group_curves(
    uri: str, groups: dict[str, list[RunRecord]], key: str = CURVE_METRIC
) -> dict[str, tuple[list[int], np.ndarray, np.ndarray, np.ndarray]]:
    """IQM curve with a bootstrap band per group, runs aligned on their evaluation steps."""
    out = {}
    for name, runs in groups.items():
        histories = [dict(metric_history(uri, r.run_id, key)) for r in runs]
        steps = sorted({s for h in histories for s in h})
        if not steps:
            continue
        matrix = np.array([[h.get(s, math.nan) for s in steps] for h in histories])
        center, low, high = stats.curve_band(matrix, "iqm")
        out[name] = (steps, center, low, high)
    return out


def _fmt(x: float, digits: int = 1) -> str:
    return "-" if not math.isfinite(x) else f"{x:.{digits}f}"


def print_report(
    groups: dict[str, list[RunRecord]],
    summaries: Sequence[GroupSummary],
    diff: dict[str, dict[str, str]],
    metric: str,
    console: Console,
) -> None:
    table = display.table(f"{metric} by group (latest value per run)")
    table.add_column("group")
    table.add_column("runs", justify="right")
    table.add_column("IQM [95% CI]", justify="right")
    table.add_column("mean ± std", justify="right")
    table.add_column("median", justify="right")
    other_keys = list(summaries[0].others) if summaries else []
    for key in other_keys:
        table.add_column(f"{key} (mean)", justify="right")
    for s in summaries:
        lo, hi = s.summary.ci.get("iqm", (math.nan, math.nan))
        table.add_row(
            s.group,
            f"{s.n}/{len(groups[s.group])}",
            f"{_fmt(s.summary.iqm)} [{_fmt(lo)}, {_fmt(hi)}]",
            f"{_fmt(s.summary.mean)} ± {_fmt(s.summary.std)}",
            _fmt(s.summary.median),
            *(_fmt(s.others[k], 2) for k in other_keys),
        )
    console.print(table)
    if diff:
        ptable = display.table("params that differ between groups")
        ptable.add_column("param")
        for g in groups:
            ptable.add_column(g)
        for key, per_group in diff.items():
            ptable.add_row(key, *(per_group[g] for g in groups))
        console.print(ptable)
    else:
        console.print("no params differ between the groups")


def write_csv(
    path: Path,
    summaries: Sequence[GroupSummary],
    diff: dict[str, dict[str, str]],
    metric: str,
) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    other_keys = list(summaries[0].others) if summaries else []
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(
            ["group", "n", f"{metric}:iqm", "iqm_ci_low", "iqm_ci_high", "mean", "std", "median"]
            + [f"{k}:mean" for k in other_keys]
            + list(diff)
        )
        for s in summaries:
            lo, hi = s.summary.ci.get("iqm", (math.nan, math.nan))
            w.writerow(
                [s.group, s.n, s.summary.iqm, lo, hi, s.summary.mean, s.summary.std]
                + [s.summary.median]
                + [s.others[k] for k in other_keys]
                + [diff[k][s.group] for k in diff]
            )
