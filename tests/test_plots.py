"""Learning-curve figures render off-screen for the shapes real runs produce."""

import matplotlib
import matplotlib.pyplot as plt
import numpy as np
import pytest
from artifact_checks import pixels_of, read_png

from workbench.plots import learning_curve, rolling_mean


def _save(fig, path):
    """Save, decode and return the pixels: a non-blank image of the figure's size."""
    width, height = (fig.get_size_inches() * fig.dpi).round().astype(int)
    fig.savefig(path)
    plt.close(fig)
    return read_png(path, (width, height))


def test_backend_is_headless():
    assert matplotlib.get_backend().lower() == "agg"


def test_learning_curve_with_train_and_eval(tmp_path):
    rng = np.random.default_rng(0)
    eval_steps = list(range(0, 20_000, 2_000))
    train_steps = sorted(rng.integers(0, 20_000, 80).tolist())
    fig = learning_curve(
        eval_steps,
        np.linspace(-1500, -200, len(eval_steps)),
        np.full(len(eval_steps), 50.0),
        train_steps=train_steps,
        train_returns=rng.normal(-800, 200, 80),
        title="ddpg pendulum s0",
    )
    ax = fig.axes[0]
    assert ax.get_xlabel() == "env steps"
    assert ax.get_ylabel() == "return"
    assert ax.get_title() == "ddpg pendulum s0"
    rgb = _save(fig, tmp_path / "full.png")
    assert rgb.shape == (400, 700, 3)  # 7 x 4 inches at 100 dpi
    assert pixels_of(rgb, "tab:blue") > 500  # the eval line and its band are drawn


def test_learning_curve_without_train_data(tmp_path):
    rgb = _save(
        learning_curve([0, 1000, 2000], [1.0, 2.0, 3.0], [0.5, 0.5, 0.5]), tmp_path / "e.png"
    )
    assert pixels_of(rgb, "tab:blue") > 500


def test_learning_curve_single_eval_point(tmp_path):
    rgb = _save(learning_curve([5000], [-300.0], [float("nan")]), tmp_path / "one.png")
    assert pixels_of(rgb, "tab:blue") > 10  # the one point's marker
    rgb = _save(
        learning_curve([5000], [-300.0], [20.0], train_steps=[200], train_returns=[-900.0]),
        tmp_path / "one_train.png",
    )
    assert pixels_of(rgb, "tab:blue") > 10


def test_learning_curve_with_nothing_yet(tmp_path):
    rgb = _save(learning_curve([], [], []), tmp_path / "empty.png")
    assert pixels_of(rgb, "tab:blue") == 0  # axes only: no curve


def test_mismatched_lengths_are_refused():
    with pytest.raises(ValueError, match="differ in length"):
        learning_curve([0, 1], [1.0], [0.0])
    with pytest.raises(ValueError, match="differ in length"):
        learning_curve([0], [1.0], [0.0], train_steps=[1, 2], train_returns=[1.0])


def test_rolling_mean_has_no_leading_gap():
    np.testing.assert_allclose(rolling_mean([1, 2, 3, 4], 2), [1.0, 1.5, 2.5, 3.5])
    assert rolling_mean([], 5).size == 0
