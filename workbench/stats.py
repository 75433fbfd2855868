"""Robust statistics for comparing RL runs across seeds (Agarwal et al. 2021, "Deep RL at
the edge of the statistical precipice"): interquartile mean, percentile bootstrap confidence
intervals, probability of improvement, Mann-Whitney U, and learning-curve bands.

Built on scipy (``trim_mean``, ``bootstrap``, ``mannwhitneyu``). With one task per ablation,
the stratified bootstrap reduces to resampling runs within each variant. Every function takes
plain arrays so it can be tested against known values.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
from scipy import stats as sps

Statistic = Literal["mean", "median", "iqm"]

MIN_SEEDS_FOR_CLAIM = 5  # below this the report says a claim cannot be made


def iqm(x: Sequence[float] | np.ndarray, axis: int = 0) -> float | np.ndarray:
    """Interquartile mean: the mean of the middle 50% (25% trimmed from each end)."""
    return sps.trim_mean(np.asarray(x, dtype=float), 0.25, axis=axis)


_STATISTICS = {
    "mean": lambda x, axis=0: np.mean(x, axis=axis),
    "median": lambda x, axis=0: np.median(x, axis=axis),
    "iqm": iqm,
}


def bootstrap_ci(
    x: Sequence[float] | np.ndarray,
    statistic: Statistic = "iqm",
    *,
    confidence: float = 0.95,
    n_resamples: int = 5000,
    seed: int = 0,
) -> tuple[float, float]:
    """Percentile bootstrap CI of a statistic over runs; (nan, nan) with fewer than 2 runs."""
    data = np.asarray(x, dtype=float)
    if data.size < 2:
        return (math.nan, math.nan)
    if np.all(data == data[0]):
        return (float(data[0]), float(data[0]))
    res = sps.bootstrap(
        (data,),
        _STATISTICS[statistic],
        n_resamples=n_resamples,
        confidence_level=confidence,
        method="percentile",
        vectorized=True,
        rng=np.random.default_rng(seed),
    )
    return (float(res.confidence_interval.low), float(res.confidence_interval.high))


@dataclass
class Summary:
    n: int
    mean: float
    median: float
    iqm: float
    std: float
    ci: dict[str, tuple[float, float]] = field(default_factory=dict)  # per statistic


def summarize(
    x: Sequence[float] | np.ndarray, *, confidence: float = 0.95, seed: int = 0
) -> Summary:
    data = np.asarray(x, dtype=float)
    if data.size == 0:
        nan = math.nan
        return Summary(0, nan, nan, nan, nan, {})
    return Summary(
        n=int(data.size),
        mean=float(np.mean(data)),
        median=float(np.median(data)),
        iqm=float(iqm(data)),
        std=float(np.std(data, ddof=1)) if data.size > 1 else 0.0,
        ci={
            s: bootstrap_ci(data, s, confidence=confidence, seed=seed)
            for s in ("mean", "median", "iqm")
        },
    )


def probability_of_improvement(x: Sequence[float], y: Sequence[float]) -> float:
    """P(X > Y) + 0.5 P(X = Y) over all pairs of runs: 0.5 means no difference."""
    a, b = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    if a.size == 0 or b.size == 0:
        return math.nan
    diff = a[:, None] - b[None, :]
    return float(np.mean(diff > 0) + 0.5 * np.mean(diff == 0))


def probability_of_improvement_ci(
    x: Sequence[float],
    y: Sequence[float],
    *,
    confidence: float = 0.95,
    n_resamples: int = 2000,
    seed: int = 0,
) -> tuple[float, float]:
    """Bootstrap CI of P(X > Y), resampling runs of each variant independently (stratified)."""
    a, b = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    if a.size < 2 or b.size < 2:
        return (math.nan, math.nan)
    rng = np.random.default_rng(seed)
    ia = rng.integers(0, a.size, size=(n_resamples, a.size))
    ib = rng.integers(0, b.size, size=(n_resamples, b.size))
    ra, rb = a[ia], b[ib]  # (R, n), (R, m)
    diff = ra[:, :, None] - rb[:, None, :]
    draws = np.mean(diff > 0, axis=(1, 2)) + 0.5 * np.mean(diff == 0, axis=(1, 2))
    alpha = (1 - confidence) / 2
    return (float(np.quantile(draws, alpha)), float(np.quantile(draws, 1 - alpha)))


def min_p_value(n: int, m: int) -> float:
    """Smallest two-sided p-value an exact Mann-Whitney test can give with n and m runs."""
    if n == 0 or m == 0:
        return 1.0
    return min(1.0, 2.0 / math.comb(n + m, n))


def mann_whitney(x: Sequence[float], y: Sequence[float]) -> tuple[float, float]:
    """Two-sided Mann-Whitney U test: (U statistic of x, p-value)."""
    a, b = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    if a.size == 0 or b.size == 0:
        return (math.nan, math.nan)
    res = sps.mannwhitneyu(a, b, alternative="two-sided")
    return (float(res.statistic), float(res.pvalue))


@dataclass
class Comparison:
    """A variant against the baseline, with a verdict that says what can be claimed."""

    n: int
    n_baseline: int
    p_improvement: float
    p_improvement_ci: tuple[float, float]
    u_statistic: float
    p_value: float
    min_p_value: float
    verdict: str


def compare_to_baseline(
    x: Sequence[float],
    baseline: Sequence[float],
    *,
    alpha: float = 0.05,
    confidence: float = 0.95,
    seed: int = 0,
) -> Comparison:
    a, b = np.asarray(x, dtype=float), np.asarray(baseline, dtype=float)
    poi = probability_of_improvement(a, b)
    poi_ci = probability_of_improvement_ci(a, b, confidence=confidence, seed=seed)
    u, p = mann_whitney(a, b)
    floor = min_p_value(a.size, b.size)
    if a.size < MIN_SEEDS_FOR_CLAIM or b.size < MIN_SEEDS_FOR_CLAIM:
        reach = "can" if floor < alpha else "cannot"
        verdict = (
            f"too few seeds for a claim ({a.size} vs {b.size}; want >= {MIN_SEEDS_FOR_CLAIM} "
            f"each): the test {reach} reach p < {alpha} (smallest possible p = {floor:.3g})"
        )
    elif p < alpha and poi_ci[0] > 0.5:
        verdict = f"better than baseline (p = {p:.3g}, P(improvement) = {poi:.2f})"
    elif p < alpha and poi_ci[1] < 0.5:
        verdict = f"worse than baseline (p = {p:.3g}, P(improvement) = {poi:.2f})"
    else:
        verdict = f"no significant difference (p = {p:.3g}, P(improvement) = {poi:.2f})"
    return Comparison(a.size, b.size, poi, poi_ci, u, p, floor, verdict)


def curve_band(
    curves: np.ndarray,
    statistic: Statistic = "iqm",
    *,
    confidence: float = 0.95,
    n_resamples: int = 2000,
    seed: int = 0,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Aggregate learning curves (runs x points) to (center, low, high) per point.

    The band is a percentile bootstrap over runs at each point; NaN (a run without that
    point) is ignored in the center and band. One run gives a band equal to the curve.
    """
    data = np.asarray(curves, dtype=float)
    if data.ndim != 2:
        raise ValueError(f"curves must be 2-D (runs x points), got shape {data.shape}")
    fn = _STATISTICS[statistic]
    n_points = data.shape[1]
    center = np.full(n_points, math.nan)
    low = np.full(n_points, math.nan)
    high = np.full(n_points, math.nan)
    rng = np.random.default_rng(seed)
    alpha = (1 - confidence) / 2
    for j in range(n_points):
        col = data[:, j]
        col = col[np.isfinite(col)]
        if col.size == 0:
            continue
        center[j] = fn(col)
        if col.size == 1:
            low[j] = high[j] = col[0]
            continue
        idx = rng.integers(0, col.size, size=(n_resamples, col.size))
        draws = fn(col[idx], axis=1)
        low[j], high[j] = np.quantile(draws, alpha), np.quantile(draws, 1 - alpha)
    return center, low, high
