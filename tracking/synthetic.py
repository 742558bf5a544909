"""Small synthetic videos written with PyAV, for tests and demos that must run offline."""
from __future__ import annotations

from collections.abc import Sequence
from fractions import Fraction
from pathlib import Path

import av
import numpy as np

# Rectangles that move across the frame: (colour RGB, start x, start y, w, h, dx/frame, dy/frame).
DEFAULT_MOVERS: tuple[tuple[tuple[int, int, int], int, int, int, int, int, int], ...] = (
    ((230, 40, 40), 2, 4, 10, 20, 1, 0),
    ((40, 200, 40), 40, 20, 8, 16, -1, 0),
)


def moving_rectangles(index: int, width: int, height: int,
                      movers: Sequence[tuple] = DEFAULT_MOVERS) -> np.ndarray:
    """The RGB image of frame `index`: coloured rectangles on grey, each moving linearly."""
    image = np.full((height, width, 3), 96, dtype=np.uint8)
    for colour, x, y, w, h, dx, dy in movers:
        x0 = int(np.clip(x + dx * index, 0, width - 1))
        y0 = int(np.clip(y + dy * index, 0, height - 1))
        image[y0:y0 + h, x0:x0 + w] = colour
    return image


def write_video(path: str | Path, frames: Sequence[np.ndarray] | np.ndarray, *, fps: int = 10,
                codec: str = "mpeg4") -> Path:
    """Write RGB uint8 frames (all the same size, even width and height) to `path`.

    The container follows the suffix (.mp4, .avi, .mkv, .ts); `mpeg4` is always available in
    PyAV's FFmpeg, `libx264` usually is.
    """
    path = Path(path)
    frames = list(frames)
    if not frames:
        raise ValueError("write_video needs at least one frame")
    height, width = frames[0].shape[:2]
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream(codec, rate=fps)
        stream.width, stream.height = width, height
        stream.pix_fmt = "yuv420p"
        stream.time_base = Fraction(1, fps)
        for image in frames:
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(image), format="rgb24")
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))
    return path


def write_moving_rectangles(path: str | Path, *, num_frames: int = 30, width: int = 64,
                            height: int = 48, fps: int = 10, codec: str = "mpeg4") -> Path:
    """A short video of coloured rectangles moving over grey (see `moving_rectangles`)."""
    frames = [moving_rectangles(i, width, height) for i in range(num_frames)]
    return write_video(path, frames, fps=fps, codec=codec)
