"""The statistics against known values and simulated coverage."""

import math

import numpy as np
import pytest

from workbench import stats


def test_iqm_of_known_arrays():
    assert stats.iqm([1, 2, 3, 4]) == pytest.approx(2.5)  # middle two
    assert stats.iqm(list(range(1, 9))) == pytest.approx(4.5)  # mean of 3..6
    # robust to outliers: 25% trimmed each side
    assert stats.iqm([0, 10, 10, 10, 10, 10, 10, 1000]) == pytest.approx(10.0)
    x = np.arange(100.0)
    assert stats.iqm(x) == pytest.approx(np.mean(x[25:75]))


def test_summary_fields():
    s = stats.summarize([1.0, 2.0, 3.0, 4.0, 100.0])
    assert s.n == 5
    assert s.mean == pytest.approx(22.0)
    assert s.median == pytest.approx(3.0)
    assert s.std == pytest.approx(np.std([1, 2, 3, 4, 100], ddof=1))
    lo, hi = s.ci["iqm"]
    assert lo <= s.iqm <= hi


def test_bootstrap_ci_covers_the_truth_in_most_draws():
    """Percentile bootstrap CI of the mean of N(3, 1) with 20 runs: ~95% coverage."""
    rng = np.random.default_rng(0)
    trials, covered = 200, 0
    for i in range(trials):
        x = rng.normal(3.0, 1.0, size=20)
        lo, hi = stats.bootstrap_ci(x, "mean", n_resamples=1000, seed=i)
        covered += lo <= 3.0 <= hi
    assert 0.88 <= covered / trials <= 0.99  # percentile bootstrap undercovers slightly


def test_probability_of_improvement():
    x = [1.0, 2.0, 3.0]
    assert stats.probability_of_improvement(x, x) == pytest.approx(0.5)
    assert stats.probability_of_improvement([5, 6], [1, 2]) == 1.0
    assert stats.probability_of_improvement([1, 2], [5, 6]) == 0.0
    assert stats.probability_of_improvement([1, 3], [2, 2]) == pytest.approx(0.5)
    rng = np.random.default_rng(1)
    a = rng.normal(0, 1, 50)
    b = rng.normal(0, 1, 50)
    assert stats.probability_of_improvement(a, b) + stats.probability_of_improvement(
        b, a
    ) == pytest.approx(1.0)


def test_mann_whitney_and_its_floor():
    u, p = stats.mann_whitney([10, 11, 12, 13, 14], [1, 2, 3, 4, 5])
    assert u == 25.0
    assert p == pytest.approx(stats.min_p_value(5, 5))  # perfectly separated: the floor
    assert stats.min_p_value(3, 3) == pytest.approx(0.1)  # 3 vs 3 can never reach 0.05


def test_verdicts():
    few = stats.compare_to_baseline([10, 11, 12], [1, 2, 3])
    assert few.verdict.startswith("too few seeds")
    assert "cannot reach p < 0.05" in few.verdict
    better = stats.compare_to_baseline(list(range(10, 18)), list(range(8)))
    assert better.verdict.startswith("better than baseline")
    worse = stats.compare_to_baseline(list(range(8)), list(range(10, 18)))
    assert worse.verdict.startswith("worse than baseline")
    rng = np.random.default_rng(3)
    same = stats.compare_to_baseline(rng.normal(0, 1, 10), rng.normal(0, 1, 10))
    assert same.verdict.startswith("no significant difference")


def test_curve_band_shapes_and_nan_handling():
    curves = np.array([[0.0, 1.0, 2.0], [0.0, 2.0, np.nan], [0.0, 3.0, 4.0], [0.0, 4.0, 6.0]])
    center, lo, hi = stats.curve_band(curves, "mean")
    assert center[0] == 0 and lo[0] == 0 and hi[0] == 0
    assert center[1] == pytest.approx(2.5)
    assert center[2] == pytest.approx(4.0)  # NaN ignored
    assert np.all(lo <= center) and np.all(center <= hi)
    one = stats.curve_band(np.array([[1.0, 2.0]]))
    assert np.array_equal(one[0], one[1]) and np.array_equal(one[0], one[2])


def test_degenerate_inputs():
    assert all(math.isnan(v) for v in stats.bootstrap_ci([1.0]))
    assert stats.bootstrap_ci([2.0, 2.0, 2.0]) == (2.0, 2.0)
    assert math.isnan(stats.probability_of_improvement([], [1.0]))
    assert stats.summarize([]).n == 0
