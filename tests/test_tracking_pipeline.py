"""End to end through tracking/: PyAV video -> VideoSource -> (detector) -> TrackletBuffer -> clips."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import cv2
import numpy as np
import pytest

from tracking.detector import PoseTracker
from tracking.keypoints import select_keypoint_backend
from tracking.sources import VideoSource
from tracking.synthetic import DEFAULT_MOVERS, write_moving_rectangles, write_video
from tracking.tracklets import TrackletBuffer
from tracking.types import Detection

ASSETS = Path(importlib.util.find_spec("ultralytics").submodule_search_locations[0]) / "assets"


def _mover_detections(index: int, width: int, height: int) -> list[Detection]:
    """The ground-truth boxes of the synthetic rectangles, as a tracker would report them."""
    out = []
    for track_id, (_, x, y, w, h, dx, dy) in enumerate(DEFAULT_MOVERS, start=1):
        x0 = int(np.clip(x + dx * index, 0, width - 1))
        y0 = int(np.clip(y + dy * index, 0, height - 1))
        box = np.array([x0, y0, min(x0 + w, width), min(y0 + h, height)], dtype=np.float32)
        keypoints = np.zeros((17, 3), dtype=np.float32)
        keypoints[0] = (x0 + w / 2, y0 + 2, 0.9)  # "nose" near the top centre
        out.append(Detection(box, 0.9, track_id, keypoints))
    return out


def test_synthetic_video_to_clips(tmp_path):
    path = write_moving_rectangles(tmp_path / "rects.mp4", num_frames=30)
    buffer = TrackletBuffer("left", window=8, overlap=4, clip_size=(64, 32))
    clips, updates = [], []
    for frame in VideoSource(str(path), stride=2):
        clips += buffer.update(frame, _mover_detections(frame.index, 64, 48))
        updates += buffer.pop_tracklet_updates()
    clips += buffer.flush()
    updates += buffer.pop_tracklet_updates()

    ended = {u.track_id: u for u in updates if u.ended}
    assert set(ended) == {1, 2}
    assert all(u.first_frame == 0 and u.last_frame == 28 and u.num_observations == 15
               for u in ended.values())
    # 15 observations per track, window 8, overlap 4: clips after 8 and 12, a final one with 3 new
    for track_id in (1, 2):
        own = [c for c in clips if c.track_id == track_id]
        assert [c.final for c in own] == [False, False, True]
        for clip in own:
            indices = clip.frame_indices
            assert all(a < b for a, b in zip(indices, indices[1:]))
            assert 0 <= indices[0] and indices[-1] <= 28 and all(i % 2 == 0 for i in indices)
            assert clip.crops.shape == (4, 64, 32, 3)
            np.testing.assert_allclose(clip.times, np.array(indices) / 10, atol=1e-6)
    # the red rectangle's crops are red in the middle; the nose keypoint stays near the top
    red = next(c for c in clips if c.track_id == 1)
    centre = red.crops[:, 24:40, 12:20].reshape(-1, 3).mean(axis=0)
    assert centre[0] > 150 and centre[1] < 100
    nose = red.keypoints[:, 0]
    assert (nose[:, 2] == pytest.approx(0.9)) and np.all(nose[:, 1] < 16)
    assert ended[1].thumbnail.shape == (64, 32, 3)


@pytest.mark.slow
def test_real_detector_on_a_panned_photo_video(tmp_path, weights):
    """bus.jpg panned a few pixels per frame: YOLO-pose + ByteTrack give tracks and clips."""
    bus = cv2.cvtColor(cv2.imread(str(ASSETS / "bus.jpg")), cv2.COLOR_BGR2RGB)
    bus = cv2.resize(bus, (432, 576), interpolation=cv2.INTER_AREA)
    frames = [np.ascontiguousarray(bus[8 - i // 2: 8 - i // 2 + 560, 2 * i: 2 * i + 400])
              for i in range(12)]
    path = write_video(tmp_path / "bus.mkv", frames, fps=10)

    tracker = PoseTracker(weights, imgsz=640)
    keypoints, reason = select_keypoint_backend("yolo-pose")
    buffer = TrackletBuffer("bus", window=8, overlap=4)
    clips, updates = [], []
    for frame in VideoSource(str(path)):
        detections = tracker.update(frame.image)
        estimated = keypoints.estimate(frame.image, detections)
        detections = [Detection(d.box, d.score, d.track_id, k)
                      for d, k in zip(detections, estimated)]
        clips += buffer.update(frame, detections)
        updates += buffer.pop_tracklet_updates()
    clips += buffer.flush()
    updates += buffer.pop_tracklet_updates()

    ended = [u for u in updates if u.ended]
    long_tracks = [u for u in ended if u.num_observations >= 10]
    assert len(long_tracks) >= 2, [(u.track_id, u.num_observations) for u in ended]
    assert all(u.thumbnail.shape == (256, 128, 3) for u in ended)
    regular = [c for c in clips if not c.final]
    assert len(regular) >= 3
    spans = {u.track_id: (u.first_frame, u.last_frame) for u in ended}
    for clip in clips:
        lo, hi = spans[clip.track_id]
        assert lo <= clip.frame_indices[0] and clip.frame_indices[-1] <= hi
        assert clip.crops.shape == (4, 256, 128, 3)
    for clip in regular:
        assert all(a < b for a, b in zip(clip.frame_indices, clip.frame_indices[1:]))
        # confident keypoints lie inside the 256x128 crop
        visible = clip.keypoints[..., 2] > 0.5
        xs, ys = clip.keypoints[..., 0][visible], clip.keypoints[..., 1][visible]
        assert xs.min() >= -0.5 and xs.max() <= 127.5 and ys.min() >= -0.5 and ys.max() <= 255.5
    # the two people in full view have (almost) every joint in every frame of their clips
    whole = [c for c in regular if (c.keypoints[..., 2] > 0.5).mean() > 0.9]
    assert len({c.track_id for c in whole}) >= 2
