"""Deterministic policy evaluation, with an optional video of the first episode.

Evaluation runs on its own single env (not the training vector env), so its episodes are
whole and its seed sequence is independent of training. ``Evaluator`` is a training run's
evaluations: each one logged, checked, and kept in the run's history.
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import gymnasium as gym
import numpy as np

if TYPE_CHECKING:
    from workbench.config import EvalConfig
    from workbench.runstate import RunState

log = logging.getLogger(__name__)


@dataclass
class EvalResult:
    """Per-episode returns and lengths of one evaluation."""

    returns: np.ndarray
    lengths: np.ndarray
    video_path: Path | None = None

    @property
    def mean(self) -> float:
        return float(np.mean(self.returns)) if len(self.returns) else float("nan")

    @property
    def std(self) -> float:
        return float(np.std(self.returns)) if len(self.returns) else float("nan")

    def metrics(self) -> dict[str, float]:
        """The values logged to the tracker after each evaluation."""
        length = float(np.mean(self.lengths)) if len(self.lengths) else float("nan")
        return {
            "eval/return_mean": self.mean,
            "eval/return_std": self.std,
            "eval/length_mean": length,
        }


def evaluate(
    policy: Callable[[np.ndarray], np.ndarray],
    env: gym.Env,
    episodes: int,
    *,
    seed: int,
    video_path: Path | None = None,
    video_max_frames: int = 1000,
    fps: int = 30,
    on_episode: Callable[[int], None] | None = None,
) -> EvalResult:
    """Run ``episodes`` whole episodes of ``policy`` (one obs -> one action) on ``env``.

    Only the first reset is seeded, so the episodes are a function of ``seed`` alone.
    With ``video_path`` and an ``rgb_array`` env, the first episode (up to
    ``video_max_frames`` frames) is written as an mp4; an env that cannot render gives a
    warning and ``video_path=None`` rather than a failed run. ``on_episode(n)`` is called
    after each episode with the number done (a progress display).
    """
    if episodes < 1:
        raise ValueError(f"episodes must be >= 1, got {episodes}")
    recording = video_path is not None and _can_record(env)
    frames: list[np.ndarray] = []
    returns = np.zeros(episodes, dtype=np.float64)
    lengths = np.zeros(episodes, dtype=np.int64)
    written: Path | None = None

    for episode in range(episodes):
        obs, _ = env.reset(seed=seed) if episode == 0 else env.reset()
        if recording:
            recording = _grab(env, frames)
        total, steps, done = 0.0, 0, False
        while not done:
            action = np.asarray(policy(obs))
            obs, reward, terminated, truncated, _ = env.step(action)
            total += float(reward)
            steps += 1
            done = bool(terminated or truncated)
            if recording and len(frames) < video_max_frames:
                recording = _grab(env, frames)
        returns[episode], lengths[episode] = total, steps
        if on_episode is not None:
            on_episode(episode + 1)

        if episode == 0 and recording:
            try:
                written = write_video(frames[:video_max_frames], Path(video_path), fps)
            except Exception as err:  # a missing codec must not lose the evaluation
                log.warning("could not write video %s: %s", video_path, err)
            recording = False
            frames.clear()

    return EvalResult(returns=returns, lengths=lengths, video_path=written)


class Evaluator:
    """A training run's evaluations: run, logged to the tracker, checked for divergence,
    recorded in the run's history and shown on the progress display."""

    def __init__(
        self,
        cfg: EvalConfig,
        env: gym.Env,
        policy: Callable[[np.ndarray], np.ndarray],
        *,
        seed: int,
        tracker: Any,
        state: RunState,
        display: Any,
    ):
        self.cfg, self.env, self.policy, self.seed = cfg, env, policy, seed
        self.tracker, self.state, self.display = tracker, state, display
        self.seconds = {"loop": 0.0, "final": 0.0}
        # which run a log line is about, where several share a log (ablations, studies)
        name = getattr(tracker, "run_name", None)
        self.prefix = f"{name}: " if name else ""

    def __call__(
        self, step: int, *, video_path: Path | None = None, final: bool = False
    ) -> dict[str, float]:
        from workbench.errors import DivergenceError

        t0 = time.perf_counter()
        episodes = self.cfg.episodes
        if final:  # it can take a while (whole episodes, a video): say so where no bar shows
            log.info("%sstep %d: final evaluation (%d episodes)", self.prefix, step, episodes)
        self.display.evaluating(episodes)
        try:
            res = evaluate(
                self.policy,
                self.env,
                episodes,
                seed=self.seed,
                video_path=video_path,
                video_max_frames=self.cfg.video_max_frames,
                fps=self.cfg.video_fps,
                on_episode=self.display.evaluated,
            )
        finally:
            self.display.evaluated(None)
        metrics = res.metrics()
        elapsed = time.perf_counter() - t0
        self.seconds["final" if final else "loop"] += elapsed
        mean, std = metrics["eval/return_mean"], metrics["eval/return_std"]
        if not math.isfinite(mean):
            raise DivergenceError(f"evaluation return is {mean}")
        self.tracker.log_metrics(metrics, step)
        self.state.record_eval(step, mean, std)
        self.display.update(step, last_eval=mean)
        log.info(
            "%sstep %d: eval return %.1f +- %.1f (%.1fs)", self.prefix, step, mean, std, elapsed
        )
        if res.video_path is not None:
            self.tracker.log_artifact(res.video_path, "video")
        return metrics


def headless_pygame() -> None:
    """Let pygame-based envs (classic control) render without a display, and quietly."""
    os.environ.setdefault("SDL_VIDEODRIVER", "dummy")
    os.environ.setdefault("PYGAME_HIDE_SUPPORT_PROMPT", "1")


def _can_record(env: gym.Env) -> bool:
    mode = getattr(env, "render_mode", None)
    if mode != "rgb_array":
        log.warning("skipping evaluation video: render_mode is %r, not 'rgb_array'", mode)
        return False
    headless_pygame()
    return True


def _grab(env: gym.Env, frames: list[np.ndarray]) -> bool:
    """Append one rendered frame; False (and a warning) if the env cannot render."""
    try:
        frame = env.render()
    except Exception as err:
        log.warning("skipping evaluation video: render failed: %s", err)
        frames.clear()
        return False
    if frame is None:
        log.warning("skipping evaluation video: render returned no frame")
        frames.clear()
        return False
    frames.append(np.asarray(frame))
    return True


def write_video(frames: Sequence[np.ndarray], path: Path, fps: int) -> Path:
    """Write RGB frames as an H.264 mp4 that browsers (and the MLflow UI) play.

    Odd sizes are padded to even ones (yuv420p needs them) instead of letting imageio
    rescale to 16-pixel blocks; ffmpeg is told to log errors only.
    """
    import imageio.v2 as imageio

    if not frames:
        raise ValueError("no frames to write")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    first = _as_rgb(frames[0])
    height, width = first.shape[:2]
    pad = ((0, height % 2), (0, width % 2), (0, 0))
    writer = imageio.get_writer(
        str(path),
        format="FFMPEG",  # type: ignore[arg-type]
        mode="I",
        fps=fps,
        codec="libx264",
        pixelformat="yuv420p",
        macro_block_size=1,
        ffmpeg_log_level="error",
    )
    try:
        for frame in frames:
            rgb = _as_rgb(frame)
            if rgb.shape[:2] != (height, width):
                raise ValueError(f"frame size {rgb.shape[:2]} differs from {(height, width)}")
            writer.append_data(np.pad(rgb, pad, mode="edge") if any(p[1] for p in pad) else rgb)
    finally:
        writer.close()
    return path


def _as_rgb(frame: np.ndarray) -> np.ndarray:
    arr = np.asarray(frame)
    if arr.dtype != np.uint8:
        if np.issubdtype(arr.dtype, np.floating) and arr.size and arr.max() <= 1.0:
            arr = arr * 255.0
        arr = np.clip(arr, 0, 255).astype(np.uint8)
    if arr.ndim == 2:
        arr = np.stack([arr] * 3, axis=-1)
    if arr.ndim != 3 or arr.shape[2] not in (3, 4):
        raise ValueError(f"expected an (H, W, 3) frame, got shape {arr.shape}")
    return np.ascontiguousarray(arr[..., :3])
