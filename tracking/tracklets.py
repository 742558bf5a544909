"""Per-track buffering of person crops and the clip sampler (T frames per window).

Each track keeps at most `window` observations (one resized crop + keypoints each), so memory
per camera is bounded by tracks x window x clip size. When a track has `window` observations
it emits a clip of `clip_length` frames, one from the middle of each equal segment of the
window, and keeps the last `overlap` observations for the next window. A track not seen for
`lost_after` processed frames ends with a final clip; `flush()` ends every track.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass

import cv2
import numpy as np

from reid.keypoints import NUM_KEYPOINTS

from .types import Clip, Detection, TrackletUpdate, VideoFrame


def sample_positions(count: int, clip_length: int) -> list[int]:
    """Positions (0..count-1) of the middle of `clip_length` equal segments of `count` items.

    Deterministic; strictly increasing when count >= clip_length, repeating positions when
    there are fewer items than the clip needs.
    """
    if count < 1:
        raise ValueError("cannot sample a clip from an empty track")
    return [min(count - 1, int((i + 0.5) * count / clip_length)) for i in range(clip_length)]


def crop_box(box: np.ndarray, margin: float, width: int, height: int) -> tuple[int, int, int, int]:
    """The integer crop (x0, y0, x1, y1), end-exclusive, of `box` grown by `margin` of its size
    on every side and clipped to the image; at least one pixel each way."""
    x1, y1, x2, y2 = (float(v) for v in box)
    dx, dy = (x2 - x1) * margin, (y2 - y1) * margin
    x0 = int(np.clip(np.floor(x1 - dx), 0, width - 1))
    y0 = int(np.clip(np.floor(y1 - dy), 0, height - 1))
    xe = int(np.clip(np.ceil(x2 + dx), x0 + 1, width))
    ye = int(np.clip(np.ceil(y2 + dy), y0 + 1, height))
    return x0, y0, xe, ye


def keypoints_to_crop(keypoints: np.ndarray | None, crop: tuple[int, int, int, int],
                      size: tuple[int, int]) -> np.ndarray:
    """Map frame-pixel keypoints [17, 3] into the resized crop's pixel coordinates.

    Uses the pixel-centre convention of cv2.resize (x' = (x - x0 + 0.5) * sx - 0.5), so a
    keypoint on a pixel lands on the pixel it was resized to. Points outside the crop and
    missing keypoints get score 0.
    """
    out = np.zeros((NUM_KEYPOINTS, 3), dtype=np.float32)
    if keypoints is None:
        return out
    x0, y0, xe, ye = crop
    out_h, out_w = size
    sx, sy = out_w / (xe - x0), out_h / (ye - y0)
    points = np.asarray(keypoints, dtype=np.float32)
    out[:, 0] = (points[:, 0] - x0 + 0.5) * sx - 0.5
    out[:, 1] = (points[:, 1] - y0 + 0.5) * sy - 0.5
    inside = ((out[:, 0] >= -0.5) & (out[:, 0] <= out_w - 0.5)
              & (out[:, 1] >= -0.5) & (out[:, 1] <= out_h - 0.5))
    out[:, 2] = np.where(inside, points[:, 2], 0.0)
    return out


@dataclass(frozen=True, eq=False)
class _Observation:
    frame_index: int
    time: float
    wall_time: float
    box: np.ndarray  # float32 [4] in frame pixels, kept so a stored clip can be re-cropped
    crop: np.ndarray  # uint8 [H, W, 3] at the clip size
    keypoints: np.ndarray  # float32 [17, 3] in crop coordinates


class _Track:
    """One track's recent observations, its span and its best thumbnail so far."""

    def __init__(self, track_id: int, window: int) -> None:
        self.track_id = track_id
        self.observations: deque[_Observation] = deque(maxlen=window)
        self.first_frame = self.last_frame = -1
        self.first_time = self.last_time = 0.0
        self.first_wall_time = self.last_wall_time = 0.0
        self.count = 0
        self.new_since_clip = 0
        self.clips = 0
        self.last_seen_step = 0
        self.thumbnail: np.ndarray | None = None
        self.thumbnail_quality = -1.0

    def add(self, observation: _Observation, quality: float, step: int) -> None:
        if self.count == 0:
            self.first_frame, self.first_time = observation.frame_index, observation.time
            self.first_wall_time = observation.wall_time
        self.last_frame, self.last_time = observation.frame_index, observation.time
        self.last_wall_time = observation.wall_time
        self.observations.append(observation)
        self.count += 1
        self.new_since_clip += 1
        self.last_seen_step = step
        if quality > self.thumbnail_quality:
            self.thumbnail, self.thumbnail_quality = observation.crop, quality


class TrackletBuffer:
    """Turns one camera's tracked detections into clips and tracklet summaries.

    Args:
        camera_id: copied into every clip and update.
        clip_length: T, frames per clip.
        window: observations a regular clip is sampled from (one per window / T segment).
        overlap: observations kept after a clip, shared with the next window
            (a new clip every window - overlap observations).
        lost_after: processed frames (calls to `update`) a track may go unseen before it ends.
        clip_size: (height, width) of the crops.
        crop_margin: fraction of the box size added on every side before cropping.
        min_box_height: detections smaller than this (pixels) are ignored: too few pixels to
            re-identify and they would be upscaled a lot.
    """

    def __init__(self, camera_id: str, *, clip_length: int = 4, window: int = 16,
                 overlap: int = 8, lost_after: int = 30, clip_size: tuple[int, int] = (256, 128),
                 crop_margin: float = 0.1, min_box_height: float = 0.0) -> None:
        if clip_length < 1:
            raise ValueError(f"clip_length must be >= 1, got {clip_length}")
        if window < clip_length:
            raise ValueError(f"window ({window}) must be >= clip_length ({clip_length})")
        if not 0 <= overlap < window:
            raise ValueError(f"overlap must be in [0, window), got {overlap} (window {window})")
        if lost_after < 1:
            raise ValueError(f"lost_after must be >= 1, got {lost_after}")
        self.camera_id = camera_id
        self.clip_length = clip_length
        self.window = window
        self.overlap = overlap
        self.lost_after = lost_after
        self.clip_size = (int(clip_size[0]), int(clip_size[1]))
        self.crop_margin = crop_margin
        self.min_box_height = min_box_height
        self._tracks: dict[int, _Track] = {}
        self._updates: list[TrackletUpdate] = []
        self._step = 0

    @property
    def active_tracks(self) -> int:
        return len(self._tracks)

    def update(self, frame: VideoFrame, detections: list[Detection]) -> list[Clip]:
        """Add one processed frame's detections; return the clips that became ready.

        Call `pop_tracklet_updates()` afterwards and store those first: a clip's tracklet is
        announced before (or with) its first clip. Track ids are the tracker's, unique per
        camera; keep `lost_after` >= the tracker's own lost-track buffer (ByteTrack: 30
        frames) so an id the tracker re-finds is still the same tracklet here.
        """
        self._step += 1
        clips: list[Clip] = []
        height, width = frame.image.shape[:2]
        for detection in detections:
            if detection.height < self.min_box_height:
                continue
            track = self._tracks.get(detection.track_id)
            if track is None:
                track = self._tracks[detection.track_id] = _Track(detection.track_id, self.window)
            elif frame.index <= track.last_frame:
                raise ValueError(f"camera {self.camera_id!r}: frame {frame.index} is not after "
                                 f"frame {track.last_frame} of track {detection.track_id}")
            track.add(self._observe(frame, detection, width, height),
                      quality=detection.width * detection.height * detection.score,
                      step=self._step)
            if len(track.observations) == self.window:
                clips.append(self._clip(track, final=False))
                for _ in range(self.window - self.overlap):
                    track.observations.popleft()
        for track_id in [t for t, track in self._tracks.items()
                         if self._step - track.last_seen_step >= self.lost_after]:
            clips.extend(self._end(track_id))
        return clips

    def flush(self) -> list[Clip]:
        """End every track (the source ended): their final clips."""
        clips: list[Clip] = []
        for track_id in list(self._tracks):
            clips.extend(self._end(track_id))
        return clips

    def pop_tracklet_updates(self) -> list[TrackletUpdate]:
        """Tracklet summaries produced since the last call, oldest first.

        A track reports when it gives its first clip (so the tracklet can be stored before the
        clip) and when it ends (`ended=True`, its full span and best thumbnail).
        """
        updates, self._updates = self._updates, []
        return updates

    def _observe(self, frame: VideoFrame, detection: Detection, width: int,
                 height: int) -> _Observation:
        crop = crop_box(detection.box, self.crop_margin, width, height)
        x0, y0, xe, ye = crop
        out_h, out_w = self.clip_size
        pixels = frame.image[y0:ye, x0:xe]
        interpolation = cv2.INTER_AREA if (ye - y0) > out_h else cv2.INTER_LINEAR
        resized = cv2.resize(pixels, (out_w, out_h), interpolation=interpolation)
        return _Observation(frame.index, frame.time, frame.wall_time,
                            np.asarray(detection.box, dtype=np.float32), resized,
                            keypoints_to_crop(detection.keypoints, crop, self.clip_size))

    def _clip(self, track: _Track, *, final: bool) -> Clip:
        observations = list(track.observations)
        chosen = [observations[p] for p in sample_positions(len(observations), self.clip_length)]
        track.new_since_clip = 0
        track.clips += 1
        if track.clips == 1 and not final:
            self._updates.append(self._summary(track, ended=False))
        return Clip(
            camera_id=self.camera_id, track_id=track.track_id,
            frame_indices=tuple(o.frame_index for o in chosen),
            times=tuple(o.time for o in chosen),
            crops=np.stack([o.crop for o in chosen]),
            keypoints=np.stack([o.keypoints for o in chosen]),
            final=final,
            wall_times=tuple(o.wall_time for o in chosen),
            boxes=np.stack([o.box for o in chosen]),
        )

    def _end(self, track_id: int) -> list[Clip]:
        """Remove a track: a final clip when it has observations no clip covered yet."""
        track = self._tracks.pop(track_id)
        clips = [self._clip(track, final=True)] if track.new_since_clip else []
        self._updates.append(self._summary(track, ended=True))
        return clips

    def _summary(self, track: _Track, *, ended: bool) -> TrackletUpdate:
        return TrackletUpdate(
            camera_id=self.camera_id, track_id=track.track_id,
            first_frame=track.first_frame, last_frame=track.last_frame,
            first_time=track.first_time, last_time=track.last_time,
            num_observations=track.count, thumbnail=track.thumbnail, ended=ended,
            first_wall_time=track.first_wall_time, last_wall_time=track.last_wall_time,
        )
