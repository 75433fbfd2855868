"""Read back the files runs write (PNG figures, mp4 videos) and check what they show."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import imageio.v2 as imageio
import matplotlib.colors
import matplotlib.image
import numpy as np

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def read_png(path: str | Path, size: tuple[int, int] | None = None) -> np.ndarray:
    """Decode a PNG and check it is a drawn picture; return its RGB pixels as uint8 (h, w, 3).

    ``size`` is the expected (width, height) in pixels (figure inches x dpi); without it,
    any size a figure plausibly has. Not blank: many colours, and over 1% of the pixels
    differ from the background (the most common colour).
    """
    path = Path(path)
    assert path.read_bytes()[:8] == PNG_SIGNATURE, f"{path.name} is not a PNG"
    img = matplotlib.image.imread(path)  # float32 in [0, 1] for PNGs
    assert img.ndim == 3 and img.shape[2] in (3, 4), img.shape
    height, width = img.shape[:2]
    if size is not None:
        assert (width, height) == size, f"{path.name}: {width}x{height} px, expected {size}"
    else:
        assert 200 <= width <= 4000 and 150 <= height <= 4000, f"{path.name}: {width}x{height}"
    rgb = (img[..., :3] * 255).round().astype(np.uint8)
    flat = rgb.reshape(-1, 3).astype(np.int32)
    packed = (flat[:, 0] << 16) | (flat[:, 1] << 8) | flat[:, 2]
    colours, counts = np.unique(packed, return_counts=True)
    assert len(colours) > 20, f"{path.name}: only {len(colours)} colours"
    bg = colours[counts.argmax()]
    background = np.array([bg >> 16, (bg >> 8) & 255, bg & 255])
    ink = (np.abs(flat - background).sum(axis=1) > 30).mean()
    assert ink > 0.01, f"{path.name} is blank: {ink:.2%} of pixels differ from the background"
    return rgb


def pixels_of(rgb: np.ndarray, colour: str, tol: int = 12, alpha: float = 1.0) -> int:
    """How many pixels are (within ``tol`` per channel) the matplotlib ``colour``, drawn
    with ``alpha`` over a white background."""
    return int(where_is(rgb, colour, tol, alpha).sum())


def where_is(rgb: np.ndarray, colour: str, tol: int = 12, alpha: float = 1.0) -> np.ndarray:
    """Boolean (h, w) mask of the pixels :func:`pixels_of` counts."""
    want = alpha * np.array(matplotlib.colors.to_rgb(colour)) + (1 - alpha)
    want = (want * 255).round().astype(np.int16)
    return (np.abs(rgb.astype(np.int16) - want) <= tol).all(axis=-1)


@dataclass
class Video:
    n_frames: int
    size: tuple[int, int]  # (width, height)
    fps: float
    first: np.ndarray  # uint8 (h, w, 3)
    last: np.ndarray
    changes: int  # frames that differ visibly from the one before


def read_video(path: str | Path) -> Video:
    """Decode every frame of a video (one kept at a time) and describe it."""
    reader = imageio.get_reader(str(path), format="FFMPEG")  # type: ignore[arg-type]
    try:
        fps = float(reader.get_meta_data()["fps"])
        n, changes, first, prev = 0, 0, None, None
        for frame in reader:
            frame = np.asarray(frame)
            assert frame.ndim == 3 and frame.shape[2] == 3 and frame.dtype == np.uint8
            if first is None:
                first = frame
            elif np.abs(frame.astype(np.int16) - prev).mean() > 0.1:  # prev: int16
                changes += 1
            prev = frame.astype(np.int16)
            n += 1
    finally:
        reader.close()
    assert first is not None and prev is not None, f"{Path(path).name} has no frames"
    height, width = first.shape[:2]
    return Video(n, (width, height), fps, first, prev.astype(np.uint8), changes)


def is_drawn(frame: np.ndarray) -> bool:
    """A rendered scene, not a blank frame: many colours, not one flat fill."""
    flat = frame.reshape(-1, 3).astype(np.int32)
    packed = (flat[:, 0] << 16) | (flat[:, 1] << 8) | flat[:, 2]
    return len(np.unique(packed)) > 20 and float(frame.std()) > 5.0
