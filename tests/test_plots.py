"""Learning-curve figures render off-screen for the shapes real runs produce."""

import matplotlib
import matplotlib.pyplot as plt
import numpy as np
import pytest

from workbench.plots import learning_curve, rolling_mean


def _save(fig, path):
    fig.savefig(path)
    plt.close(fig)
    assert path.stat().st_size > 1000
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


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
    _save(fig, tmp_path / "full.png")


def test_learning_curve_without_train_data(tmp_path):
    _save(learning_curve([0, 1000, 2000], [1.0, 2.0, 3.0], [0.5, 0.5, 0.5]), tmp_path / "e.png")


def test_learning_curve_single_eval_point(tmp_path):
    _save(learning_curve([5000], [-300.0], [float("nan")]), tmp_path / "one.png")
    _save(
        learning_curve([5000], [-300.0], [20.0], train_steps=[200], train_returns=[-900.0]),
        tmp_path / "one_train.png",
    )


def test_learning_curve_with_nothing_yet(tmp_path):
    _save(learning_curve([], [], []), tmp_path / "empty.png")


def test_mismatched_lengths_are_refused():
    with pytest.raises(ValueError, match="differ in length"):
        learning_curve([0, 1], [1.0], [0.0])
    with pytest.raises(ValueError, match="differ in length"):
        learning_curve([0], [1.0], [0.0], train_steps=[1, 2], train_returns=[1.0])


def test_rolling_mean_has_no_leading_gap():
    np.testing.assert_allclose(rolling_mean([1, 2, 3, 4], 2), [1.0, 1.5, 2.5, 3.5])
    assert rolling_mean([], 5).size == 0
