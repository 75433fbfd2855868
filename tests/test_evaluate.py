"""Deterministic evaluation and evaluation videos (headless)."""

from __future__ import annotations

import logging
from pathlib import Path

import gymnasium as gym
import imageio.v2 as imageio
import numpy as np
import pytest
from artifact_checks import is_drawn, read_video

from workbench.envs import make_env
from workbench.evaluate import EvalResult, evaluate, write_video


def _pendulum_policy(obs: np.ndarray) -> np.ndarray:
    """A fixed, deterministic controller (damping toward upright), not a learned one."""
    _cos, sin, vel = obs
    return np.clip([-2.0 * sin - 0.5 * vel], -2.0, 2.0).astype(np.float32)


def _zero_policy(env: gym.Env):
    shape = env.action_space.shape
    return lambda obs: np.zeros(shape, dtype=np.float32)


def _frame_count(path: Path) -> int:
    reader = imageio.get_reader(str(path), format="FFMPEG")  # type: ignore[arg-type]
    try:
        return sum(1 for _ in reader)
    finally:
        reader.close()


def test_eval_result_metrics() -> None:
    result = EvalResult(returns=np.array([1.0, 3.0]), lengths=np.array([10, 20]))
    assert result.mean == 2.0
    assert result.std == 1.0
    assert result.metrics() == {
        "eval/return_mean": 2.0,
        "eval/return_std": 1.0,
        "eval/length_mean": 15.0,
    }
    assert result.video_path is None


def test_evaluate_is_a_function_of_the_seed() -> None:
    env = make_env("Pendulum-v1", max_episode_steps=50)
    first = evaluate(_pendulum_policy, env, 3, seed=4)
    again = evaluate(_pendulum_policy, env, 3, seed=4)
    other = evaluate(_pendulum_policy, env, 3, seed=5)
    env.close()
    assert first.returns.shape == (3,)
    np.testing.assert_array_equal(first.lengths, [50, 50, 50])
    np.testing.assert_array_equal(first.returns, again.returns)
    assert not np.allclose(first.returns, other.returns)
    # episodes after the first are unseeded, so they differ from one another
    assert len(set(first.returns.tolist())) == 3


def test_evaluate_matches_a_hand_rollout() -> None:
    env = make_env("Pendulum-v1", max_episode_steps=20)
    result = evaluate(_pendulum_policy, env, 2, seed=9)
    expected = []
    obs, _ = env.reset(seed=9)
    for episode in range(2):
        if episode:
            obs, _ = env.reset()
        total, done = 0.0, False
        while not done:
            obs, reward, terminated, truncated, _ = env.step(_pendulum_policy(obs))
            total += float(reward)
            done = terminated or truncated
        expected.append(total)
    env.close()
    np.testing.assert_allclose(result.returns, expected)


def test_evaluate_rejects_zero_episodes() -> None:
    env = make_env("Pendulum-v1")
    with pytest.raises(ValueError, match="episodes"):
        evaluate(_pendulum_policy, env, 0, seed=0)
    env.close()


def test_bullet_render_and_video(tmp_path: Path) -> None:
    env = make_env("HopperBulletEnv-v0", render_mode="rgb_array", max_episode_steps=150)
    env.reset(seed=0)
    frame = env.render()
    assert isinstance(frame, np.ndarray)
    assert frame.dtype == np.uint8
    assert frame.ndim == 3 and frame.shape[2] == 3
    assert len(np.unique(frame.reshape(-1, 3), axis=0)) > 1

    policy = _zero_policy(env)
    video = tmp_path / "videos" / "hopper.mp4"
    result = evaluate(policy, env, 3, seed=1, video_path=video, video_max_frames=50)
    assert result.video_path == video
    shown = read_video(video)  # the first episode, as rendered, capped at 50 frames
    assert shown.n_frames == min(int(result.lengths[0]) + 1, 50)
    assert shown.size == (frame.shape[1], frame.shape[0])
    assert is_drawn(shown.first) and shown.changes > 0
    # Hopper falls without control: terminated episodes, deterministic across evaluations
    assert np.all(result.lengths < 150)
    assert result.lengths.sum() >= 150
    again = evaluate(policy, env, 3, seed=1)
    np.testing.assert_array_equal(result.returns, again.returns)
    # a freshly made env gives the same episodes (its first episode is not special)
    fresh = make_env("HopperBulletEnv-v0", max_episode_steps=150)
    np.testing.assert_array_equal(evaluate(policy, fresh, 3, seed=1).returns, result.returns)
    fresh.close()
    env.close()


def test_pendulum_video_headless(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("DISPLAY", raising=False)
    monkeypatch.delenv("SDL_VIDEODRIVER", raising=False)
    env = make_env("Pendulum-v1", render_mode="rgb_array", max_episode_steps=30)
    video = tmp_path / "pendulum.mp4"
    result = evaluate(_pendulum_policy, env, 2, seed=0, video_path=video, fps=15)
    env.close()
    assert result.video_path == video
    shown = read_video(video)
    assert shown.n_frames == 31  # the reset frame and one per step
    assert (shown.size, shown.fps) == ((500, 500), 15.0)
    assert is_drawn(shown.first) and shown.changes > 0  # the pendulum swings


def test_video_skipped_without_rgb_array(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    env = make_env("Pendulum-v1", max_episode_steps=10)
    video = tmp_path / "none.mp4"
    with caplog.at_level(logging.WARNING, logger="workbench.evaluate"):
        result = evaluate(_pendulum_policy, env, 2, seed=0, video_path=video)
    env.close()
    assert result.video_path is None
    assert not video.exists()
    assert len(result.returns) == 2
    assert "render_mode" in caplog.text


class _BrokenRender(gym.Wrapper):
    def render(self):
        raise RuntimeError("no GL context")


def test_video_skipped_when_render_fails(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    env = _BrokenRender(make_env("Pendulum-v1", render_mode="rgb_array", max_episode_steps=10))
    video = tmp_path / "broken.mp4"
    with caplog.at_level(logging.WARNING, logger="workbench.evaluate"):
        result = evaluate(_pendulum_policy, env, 2, seed=0, video_path=video)
    env.close()
    assert result.video_path is None
    assert not video.exists()
    np.testing.assert_array_equal(result.lengths, [10, 10])
    assert "no GL context" in caplog.text


def test_write_video_odd_size_is_quiet(tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    rng = np.random.default_rng(0)
    frames = [rng.integers(0, 256, size=(33, 45, 3), dtype=np.uint8) for _ in range(8)]
    path = write_video(frames, tmp_path / "odd.mp4", fps=10)
    out, err = capfd.readouterr()
    assert out == "" and err == ""
    reader = imageio.get_reader(str(path), format="FFMPEG")  # type: ignore[arg-type]
    first = reader.get_data(0)
    reader.close()
    assert first.shape == (34, 46, 3)  # padded to even, not rescaled to 16-pixel blocks
    assert _frame_count(path) == 8


def test_write_video_rejects_empty_and_mixed_sizes(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="no frames"):
        write_video([], tmp_path / "empty.mp4", fps=10)
    frames = [np.zeros((8, 8, 3), np.uint8), np.zeros((10, 8, 3), np.uint8)]
    with pytest.raises(ValueError, match="frame size"):
        write_video(frames, tmp_path / "mixed.mp4", fps=10)
