"""The small data types that flow out of `tracking/`, defined once for the whole project.

Coordinates are pixel-index coordinates (the centre of the top-left pixel is (0, 0)), the
convention `reid.keypoints.flip_keypoints` uses. Keypoints are COCO-17 rows of (x, y, score);
a score of 0 means "unknown".
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np


@dataclass(frozen=True, eq=False)
class VideoFrame:
    """One decoded frame of a source.

    `index` counts decoded frames of the source (before any stride or fps limit), so it is
    stable whatever sampling the camera uses; `time` is the stream time in seconds
    (pts * time_base, or index / fps when the stream carries no timestamps).
    `image` is RGB uint8, H x W x 3, already cropped when the source has a crop.
    `wall_time` is when the frame was captured, in seconds since the Unix epoch (UTC): the clock
    every camera and run shares (a live frame's arrival; a file's start plus its stream time).
    `connection` counts the source's (re)connections, so a consumer can tell an outage.
    """

    index: int
    time: float
    image: np.ndarray
    wall_time: float = field(default_factory=time.time)
    connection: int = 0


@dataclass(frozen=True, eq=False)
class FrameDetections:
    """One frame's people before tracking, as a shared detector returns them.

    `boxes` is float32 [N, 6] (x1, y1, x2, y2, score, class) in frame pixels; `keypoints`
    float32 [N, 17, 3] in frame pixels (None for a detector without them); `shape` the
    frame's (height, width).
    """

    boxes: np.ndarray
    keypoints: np.ndarray | None
    shape: tuple[int, int]


@dataclass(frozen=True, eq=False)
class Detection:
    """One tracked person in one frame of one camera.

    `box` is float32 [4] (x1, y1, x2, y2) in frame pixels; `track_id` is unique within its
    camera only; `keypoints` is float32 [17, 3] (x, y, score) in frame pixels, or None when
    no keypoint backend has filled it in yet.
    """

    box: np.ndarray
    score: float
    track_id: int
    keypoints: np.ndarray | None = None

    @property
    def height(self) -> float:
        return float(self.box[3] - self.box[1])

    @property
    def width(self) -> float:
        return float(self.box[2] - self.box[0])


@dataclass(frozen=True, eq=False)
class Clip:
    """T crops of one track, ready for the re-id encoder.

    `crops` is uint8 [T, H, W, 3] RGB, resized to the clip size (256 x 128 by default);
    `keypoints` is float32 [T, 17, 3] in the resized crop's pixel coordinates (score 0 where
    unknown or outside the crop). `frame_indices` and `times` refer to the source frames the
    crops came from; they are strictly increasing whenever the track had at least T frames to
    choose from (a short final clip repeats frames and so repeats indices). `final` marks a
    clip cut because its track ended (lost or source ended); a track whose last observations
    were all in an earlier clip ends without one (its `TrackletUpdate` says it ended).
    """

    camera_id: str
    track_id: int
    frame_indices: tuple[int, ...]
    times: tuple[float, ...]
    crops: np.ndarray
    keypoints: np.ndarray
    final: bool
    wall_times: tuple[float, ...] = ()  # capture wall-clock times of the frames (see VideoFrame)
    boxes: np.ndarray | None = None  # float32 [T, 4] (x1, y1, x2, y2) in frame pixels

    def __len__(self) -> int:
        return len(self.frame_indices)


@dataclass(frozen=True, eq=False)
class TrackletUpdate:
    """What the app stores about a track (a tracklet): its span and a representative thumbnail.

    Emitted when a track gives its first clip, and again (with `ended=True`) when it ends, so a
    tracklet row exists before its first clip is stored. `thumbnail` is the crop (RGB uint8, at
    the clip size) of the track's best observation so far: the largest, most confident box.
    """

    camera_id: str
    track_id: int
    first_frame: int
    last_frame: int
    first_time: float
    last_time: float
    num_observations: int
    thumbnail: np.ndarray
    ended: bool
    first_wall_time: float | None = None  # capture wall-clock span (see VideoFrame)
    last_wall_time: float | None = None
