"""The study report: best value and params, a trials table (CSV), optimization history,
parameter importances, parallel coordinates, slice and intermediate-value plots (PNG, via
Optuna's matplotlib backend: no kaleido, no browser), a summary JSON, and a terminal table.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import TrialState

from workbench.tuning.spec import StudySpec
from workbench.tuning.study import (
    ENV_STEPS,
    FAIL_REASON,
    PRUNE_REASON,
    best_trial,
    completed,
    state_name,
    visible,
)

log = logging.getLogger(__name__)


def default_dir(spec: StudySpec, target: Any) -> Path:
    return Path(target.tracking_dir).expanduser().resolve() / "optuna" / f"{spec.name}-report"


# Fewer completed trials than this give no parameter importances (nothing to rank against).
MIN_TRIALS_FOR_IMPORTANCE = 3


def importances(study: optuna.Study) -> dict[str, float]:
    """Parameter importances (Optuna's default evaluator); {} when there is too little data.
    Conditional parameters are judged over the trials where they were active."""
    done = completed(study)
    if len(done) < MIN_TRIALS_FOR_IMPORTANCE:
        return {}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return dict(optuna.importance.get_param_importances(study))
    except Exception as err:
        log.info("no parameter importances: %s", err)
    # Conditional params make some evaluators refuse; fall back to the always-active ones.
    always = [p for p in done[0].params if all(p in t.params for t in done)]
    if not always:
        return {}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return dict(optuna.importance.get_param_importances(study, params=always))
    except Exception as err:
        log.info("no parameter importances: %s", err)
        return {}


def importance_note(n_complete: int, found: dict[str, float], params: list[str]) -> str:
    """Why a parameter has no importance in the report ("" when every one has one)."""
    if n_complete < MIN_TRIALS_FOR_IMPORTANCE:
        return (
            f"importances need at least {MIN_TRIALS_FOR_IMPORTANCE} completed trials "
            f"({n_complete} so far)"
        )
    if not found:
        return "importances could not be computed from these trials (see the log)"
    if any(p not in found for p in params):
        return "-: not ranked (a conditional parameter, not active in every completed trial)"
    return ""


def summarize(study: optuna.Study, spec: StudySpec) -> dict[str, Any]:
    trials = [t for t in study.get_trials(deepcopy=False) if visible(t)]
    best = best_trial(study)
    by_state: dict[str, int] = {}
    for t in trials:
        by_state[state_name(t)] = by_state.get(state_name(t), 0) + 1
    return {
        "study": spec.name,
        "direction": spec.objective.direction,
        "objective": f"{spec.objective.score} of {spec.objective.metric} "
        f"({spec.objective.aggregate} over seeds {list(spec.objective.seeds)})",
        "n_trials": len(trials),
        "states": by_state,
        "env_steps": int(sum(t.user_attrs.get(ENV_STEPS, 0) for t in trials)),
        "best_trial": best.number if best else None,
        "best_value": best.value if best else None,
        "best_params": dict(best.params) if best else {},
        "importances": (found := importances(study)),
        "importances_note": importance_note(
            len(completed(study)), found, list(best.params) if best else []
        ),
    }


def rows(study: optuna.Study) -> list[dict[str, Any]]:
    out = []
    for t in study.get_trials(deepcopy=False):
        if not visible(t):
            continue
        duration = (
            (t.datetime_complete - t.datetime_start).total_seconds()
            if t.datetime_complete and t.datetime_start
            else None
        )
        last_step = max(t.intermediate_values) if t.intermediate_values else None
        out.append(
            {
                "number": t.number,
                "state": state_name(t),
                "value": t.value if t.state == TrialState.COMPLETE else None,
                "last_reported": None if last_step is None else t.intermediate_values[last_step],
                "env_steps": t.user_attrs.get(ENV_STEPS),
                "last_reported_step": last_step,
                "duration_s": round(duration, 1) if duration is not None else None,
                "reason": t.user_attrs.get(PRUNE_REASON) or t.user_attrs.get(FAIL_REASON) or "",
                **{f"params_{k}": v for k, v in t.params.items()},
            }
        )
    return out


def _plots() -> dict[str, Callable[[optuna.Study], Any]]:
    m = optuna.visualization.matplotlib
    return {
        "optimization_history.png": m.plot_optimization_history,
        "param_importances.png": m.plot_param_importances,
        "parallel_coordinate.png": m.plot_parallel_coordinate,
        "slice.png": m.plot_slice,
        "intermediate_values.png": m.plot_intermediate_values,
    }


def write_report(study: optuna.Study, spec: StudySpec, out_dir: Path) -> Path:
    """Write trials.csv, summary.json and the figures into ``out_dir``; return it."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    table = rows(study)
    keys: list[str] = []
    for r in table:
        keys.extend(k for k in r if k not in keys)
    with open(out_dir / "trials.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=keys or ["number"])
        writer.writeheader()
        writer.writerows(table)
    summary = summarize(study, spec)
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    if len(completed(study)) >= 1:
        for name, plot in _plots().items():
            if name == "param_importances.png" and not summary["importances"]:
                continue
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    ax = plot(study)
                    first = ax.flat[0] if hasattr(ax, "flat") else ax
                    fig = first.figure
                    fig.set_size_inches(max(fig.get_size_inches()[0], 10), 6)
                    fig.tight_layout()
                    fig.savefig(out_dir / name, dpi=100)
                plt.close(fig)
            except Exception as err:  # one plot that cannot be drawn must not lose the rest
                log.info("skipped %s: %s", name, err)
    return out_dir


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        if math.isnan(v):
            return "nan"
        return f"{v:.6g}" if abs(v) >= 1 else f"{v:.4g}"
    return str(v)


def print_report(
    study: optuna.Study, spec: StudySpec, *, top: int = 15, console: Any = None
) -> None:
    """A readable terminal report: summary, best params, importances, top trials."""
    from workbench import display

    console = console or display.console()
    s = summarize(study, spec)
    states = ", ".join(f"{n} {k}" for k, n in sorted(s["states"].items()))
    console.print(
        f"[bold]study {spec.name}[/bold]: {s['n_trials']} trials ({states or 'none'}), "
        f"{s['env_steps']:,} env steps; objective: {s['direction']} {s['objective']}"
    )
    if s["best_trial"] is None:
        console.print("no completed trial yet")
        return
    best = display.table(f"best: trial {s['best_trial']}, value {_fmt(s['best_value'])}")
    best.add_column("parameter")
    best.add_column("value", justify="right")
    if s["importances"]:
        best.add_column("importance", justify="right")
    for k, v in s["best_params"].items():
        best.add_row(k, _fmt(v), *([_fmt(s["importances"].get(k))] if s["importances"] else []))
    console.print(best)
    if s["importances_note"]:  # a line of its own: a caption would wrap to the table's width
        console.print(s["importances_note"], soft_wrap=True)
    maximize = spec.objective.direction == "maximize"
    ranked = sorted(
        rows(study),
        key=lambda r: (r["value"] is None, -(r["value"] or 0) if maximize else (r["value"] or 0)),
    )[:top]
    params = sorted({k for r in ranked for k in r if k.startswith("params_")})
    t = display.table(f"top {len(ranked)} trials")
    for col in ("#", "state", "value", "env steps", *[p.removeprefix("params_") for p in params]):
        t.add_column(col, justify="right" if col != "state" else "left", overflow="fold")
    for r in ranked:
        t.add_row(
            str(r["number"]),
            r["state"],
            _fmt(r["value"]),
            _fmt(r["env_steps"]),
            *[_fmt(r.get(p)) for p in params],
        )
    console.print(t)


__all__ = ["TrialState", "default_dir", "print_report", "summarize", "write_report"]
