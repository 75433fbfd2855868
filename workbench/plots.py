"""Figures for runs, studies and ablations, drawn off-screen (Agg): runs have no display."""

from __future__ import annotations

from collections.abc import Sequence

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # after matplotlib.use: the backend must be chosen first
import numpy as np
from matplotlib.figure import Figure

__all__ = ["curves_with_bands", "interval_estimates", "learning_curve", "rolling_mean"]


def rolling_mean(values: Sequence[float], window: int) -> np.ndarray:
    """Trailing mean over up to ``window`` points (shorter at the start, so no leading gap)."""
    x = np.asarray(values, dtype=float)
    if x.size == 0:
        return x
    window = max(1, min(window, x.size))
    csum = np.cumsum(np.insert(x, 0, 0.0))
    ends = np.arange(1, x.size + 1)
    starts = np.maximum(0, ends - window)
    return (csum[ends] - csum[starts]) / (ends - starts)


def learning_curve(
    eval_steps: Sequence[int],
    eval_mean: Sequence[float],
    eval_std: Sequence[float],
    *,
    train_steps: Sequence[int] = (),
    train_returns: Sequence[float] = (),
    title: str = "",
) -> Figure:
    """Evaluation mean with a ±std band over noisy training returns: one glance shows
    whether the policy improves and how much exploration noise hides it."""
    e_steps = np.asarray(eval_steps, dtype=float)
    e_mean = np.asarray(eval_mean, dtype=float)
    e_std = np.asarray(eval_std, dtype=float)
    if not (e_steps.shape == e_mean.shape == e_std.shape):
        raise ValueError(
            f"eval_steps, eval_mean and eval_std differ in length: "
            f"{e_steps.size}, {e_mean.size}, {e_std.size}"
        )
    t_steps = np.asarray(train_steps, dtype=float)
    t_ret = np.asarray(train_returns, dtype=float)
    if t_steps.shape != t_ret.shape:
        raise ValueError(
            f"train_steps and train_returns differ in length: {t_steps.size}, {t_ret.size}"
        )

    fig, ax = plt.subplots(figsize=(7, 4), layout="constrained")
    if t_steps.size:
        ax.scatter(t_steps, t_ret, s=6, alpha=0.2, color="tab:gray", label="train episodes")
        window = max(1, t_ret.size // 20)
        ax.plot(
            t_steps,
            rolling_mean(t_ret, window),
            color="tab:gray",
            linewidth=1.2,
            label=f"train, rolling mean ({window})",
        )
    if e_steps.size:
        ax.fill_between(e_steps, e_mean - e_std, e_mean + e_std, color="tab:blue", alpha=0.25)
        if e_steps.size == 1:  # a band of one point has no width: show the std as a bar
            ax.errorbar(e_steps, e_mean, yerr=e_std, fmt="none", color="tab:blue", capsize=4)
        ax.plot(
            e_steps,
            e_mean,
            color="tab:blue",
            marker="o" if e_steps.size < 30 else None,
            markersize=3,
            linewidth=1.8,
            label="eval mean ± std",
        )
    ax.set_xlabel("env steps")
    ax.set_ylabel("return")
    if title:
        ax.set_title(title)
    ax.grid(alpha=0.3)
    if e_steps.size or t_steps.size:
        ax.legend(loc="best", fontsize="small")
    return fig


def curves_with_bands(
    series: dict[str, tuple[Sequence[int], Sequence[float], Sequence[float], Sequence[float]]],
    *,
    title: str = "",
    ylabel: str = "return",
    center_label: str = "IQM",
) -> Figure:
    """One line per group with its bootstrap band: ``{name: (steps, center, low, high)}``."""
    fig, ax = plt.subplots(figsize=(7, 4), constrained_layout=True)
    for name, (steps, center, low, high) in series.items():
        (line,) = ax.plot(steps, center, marker=".", label=name)
        ax.fill_between(steps, low, high, color=line.get_color(), alpha=0.2, linewidth=0)
    ax.set_xlabel("env steps")
    ax.set_ylabel(f"{ylabel} ({center_label}, 95% CI)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    if series:
        ax.legend(fontsize="small")
    return fig


def interval_estimates(
    rows: Sequence[tuple[str, float, float, float]],
    *,
    title: str = "",
    xlabel: str = "final eval return (IQM, 95% CI)",
    baseline: str | None = None,
) -> Figure:
    """Point estimate and CI per group, one row each: ``(name, center, low, high)``."""
    fig, ax = plt.subplots(figsize=(7, 0.5 * len(rows) + 1.2), constrained_layout=True)
    for i, (name, center, low, high) in enumerate(rows):
        color = "tab:gray" if name == baseline else "tab:blue"
        ax.plot([low, high], [i, i], color=color, linewidth=6, alpha=0.35, solid_capstyle="butt")
        ax.plot([center], [i], marker="|", markersize=14, color=color)
    ax.set_yticks(range(len(rows)), [r[0] for r in rows])
    ax.invert_yaxis()
    ax.set_xlabel(xlabel)
    ax.set_title(title)
    ax.grid(axis="x", alpha=0.3)
    return fig
