"""TrackletBuffer and the clip sampler on synthetic detections: edge cases, arithmetic, geometry."""
from __future__ import annotations

import numpy as np
import pytest

from tracking.tracklets import TrackletBuffer, crop_box, keypoints_to_crop, sample_positions
from tracking.types import Detection, VideoFrame

W, H = 160, 120


def frame(index: int) -> VideoFrame:
    image = np.zeros((H, W, 3), dtype=np.uint8)
    image[..., 0] = index % 256  # the frame index is readable back from any crop
    return VideoFrame(index=index, time=index / 10, image=image)


def person(track_id: int, x: float = 20, y: float = 10, w: float = 20, h: float = 60,
           score: float = 0.9, keypoints: np.ndarray | None = None) -> Detection:
    box = np.array([x, y, x + w, y + h], dtype=np.float32)
    return Detection(box=box, score=score, track_id=track_id, keypoints=keypoints)


def run(schedule: list[list[int]], **options) -> tuple[list, list, TrackletBuffer]:
    """Feed frames 0..n-1 where frame i shows the tracks schedule[i]; then flush."""
    buffer = TrackletBuffer("cam", **options)
    clips, updates = [], []
    for index, track_ids in enumerate(schedule):
        clips += buffer.update(frame(index), [person(t, x=20 + 40 * t) for t in track_ids])
        updates += buffer.pop_tracklet_updates()
    clips += buffer.flush()
    updates += buffer.pop_tracklet_updates()
    return clips, updates, buffer


@pytest.mark.parametrize("count, clip_length, expected", [
    (16, 4, [2, 6, 10, 14]),
    (8, 4, [1, 3, 5, 7]),
    (4, 4, [0, 1, 2, 3]),
    (5, 4, [0, 1, 3, 4]),
    (1, 4, [0, 0, 0, 0]),
    (2, 4, [0, 0, 1, 1]),
    (3, 4, [0, 1, 1, 2]),
    (10, 1, [5]),
])
def test_sample_positions(count, clip_length, expected):
    assert sample_positions(count, clip_length) == expected


@pytest.mark.parametrize("schedule, options, expected", [
    # (frames with their track ids, buffer options, [(track, frame indices, final), ...])
    ([[]] * 5, {}, []),
    ([[1]], {}, [(1, (0, 0, 0, 0), True)]),
    ([[1]] * 16, {}, [(1, (2, 6, 10, 14), False)]),
    # window 16 / overlap 8: a clip every 8 new observations, then what remains at the end
    ([[1]] * 24, {}, [(1, (2, 6, 10, 14), False), (1, (10, 14, 18, 22), False)]),
    ([[1]] * 26, {}, [(1, (2, 6, 10, 14), False), (1, (10, 14, 18, 22), False),
                      (1, (17, 19, 22, 24), True)]),
    ([[1]] * 8, {"window": 8, "overlap": 0}, [(1, (1, 3, 5, 7), False)]),
    ([[1]] * 10, {"window": 8, "overlap": 0}, [(1, (1, 3, 5, 7), False),
                                                (1, (8, 8, 9, 9), True)]),
    # two tracks interleaved keep separate buffers
    ([[1, 2]] * 3 + [[2]] * 2, {}, [(1, (0, 1, 1, 2), True), (2, (0, 1, 3, 4), True)]),
    # gaps shorter than lost_after keep the track; its clip spans the gap
    ([[1], [], [], [1], [1], [], [1]], {"lost_after": 5}, [(1, (0, 3, 4, 6), True)]),
])
def test_clip_schedule(schedule, options, expected):
    clips, _, _ = run(schedule, **options)
    got = sorted((c.track_id, c.frame_indices, c.final) for c in clips)
    assert got == sorted(expected)
    for clip in clips:  # the crop of each frame comes from that frame
        np.testing.assert_array_equal(clip.crops[:, 0, 0, 0], np.array(clip.frame_indices) % 256)
        np.testing.assert_allclose(clip.times, np.array(clip.frame_indices) / 10)


def test_lost_track_ends_and_a_reappearing_id_is_a_new_tracklet():
    schedule = [[1]] * 3 + [[]] * 4 + [[1]] * 2
    clips, updates, _ = run(schedule, lost_after=4)
    assert [(c.frame_indices, c.final) for c in clips] == [((0, 1, 1, 2), True),
                                                            ((7, 7, 8, 8), True)]
    ended = [(u.first_frame, u.last_frame, u.num_observations) for u in updates if u.ended]
    assert ended == [(0, 2, 3), (7, 8, 2)]


def test_track_is_ended_exactly_after_lost_after_frames():
    buffer = TrackletBuffer("cam", lost_after=3)
    assert buffer.update(frame(0), [person(1)]) == []
    assert buffer.update(frame(1), []) == [] and buffer.update(frame(2), []) == []
    clips = buffer.update(frame(3), [])
    assert [c.frame_indices for c in clips] == [(0, 0, 0, 0)] and buffer.active_tracks == 0


def test_no_empty_final_clip_when_the_last_window_was_already_clipped():
    clips, updates, _ = run([[1]] * 16)
    assert [c.final for c in clips] == [False]
    assert [u.ended for u in updates] == [False, True]


def test_clip_shapes_and_tracklet_updates():
    clips, updates, _ = run([[1]] * 20, clip_size=(64, 32))
    clip = clips[0]
    assert clip.camera_id == "cam" and len(clip) == 4
    assert clip.crops.shape == (4, 64, 32, 3) and clip.crops.dtype == np.uint8
    assert clip.keypoints.shape == (4, 17, 3) and clip.keypoints.dtype == np.float32
    assert not clip.keypoints[..., 2].any()  # no keypoints given: all unknown
    first, last = updates
    assert (first.ended, last.ended) == (False, True)
    assert (last.first_frame, last.last_frame, last.num_observations) == (0, 19, 20)
    assert last.first_time == 0.0 and last.last_time == pytest.approx(1.9)
    assert last.thumbnail.shape == (64, 32, 3)


def test_indices_strictly_increasing_inside_the_track_span():
    rng = np.random.default_rng(1)
    schedule = [[t for t in (1, 2, 3) if rng.random() < 0.6] for _ in range(120)]
    clips, updates, _ = run(schedule, lost_after=6)
    spans = [(u.track_id, u.first_frame, u.last_frame) for u in updates if u.ended]
    assert clips
    for clip in clips:
        if len(set(clip.frame_indices)) == len(clip.frame_indices) or not clip.final:
            assert all(a < b for a, b in zip(clip.frame_indices, clip.frame_indices[1:]))
        else:
            assert all(a <= b for a, b in zip(clip.frame_indices, clip.frame_indices[1:]))
        assert any(t == clip.track_id and lo <= clip.frame_indices[0]
                   and clip.frame_indices[-1] <= hi for t, lo, hi in spans)
        assert all(schedule[i].count(clip.track_id) for i in clip.frame_indices)


def test_thumbnail_is_the_largest_most_confident_box():
    buffer = TrackletBuffer("cam", clip_size=(32, 16))
    for index, (h, score) in enumerate([(30, 0.9), (80, 0.8), (80, 0.3), (40, 0.99)]):
        buffer.update(frame(index), [person(1, h=h, score=score)])
    buffer.flush()
    (update,) = buffer.pop_tracklet_updates()
    assert update.thumbnail[0, 0, 0] == 1  # frame 1: 80 px at 0.8


def test_min_box_height_ignores_small_people():
    buffer = TrackletBuffer("cam", min_box_height=50)
    buffer.update(frame(0), [person(1, h=40), person(2, x=80, h=60)])
    assert buffer.active_tracks == 1
    assert {c.track_id for c in buffer.flush()} == {2}


def test_memory_is_bounded_by_the_window():
    buffer = TrackletBuffer("cam", window=8, overlap=4)
    for index in range(100):
        buffer.update(frame(index), [person(1)])
        assert len(buffer._tracks[1].observations) < 8


@pytest.mark.parametrize("options", [
    {"clip_length": 0}, {"window": 3}, {"overlap": 16}, {"overlap": -1}, {"lost_after": 0},
])
def test_bad_options(options):
    with pytest.raises(ValueError):
        TrackletBuffer("cam", **options)


def test_frames_must_advance():
    buffer = TrackletBuffer("cam")
    buffer.update(frame(5), [person(1)])
    with pytest.raises(ValueError, match="cam"):
        buffer.update(frame(5), [person(1)])


@pytest.mark.parametrize("box, margin, expected", [
    ((20, 10, 40, 70), 0.0, (20, 10, 40, 70)),
    ((20, 10, 40, 70), 0.1, (18, 4, 42, 76)),
    ((-5, -5, 10, 200), 0.1, (0, 0, 12, H)),  # clipped to the image
    ((150.2, 100.5, 170, 130), 0.0, (150, 100, W, H)),
    ((200, 200, 210, 210), 0.0, (W - 1, H - 1, W, H)),  # fully outside: one pixel, no crash
])
def test_crop_box(box, margin, expected):
    assert crop_box(np.array(box, dtype=np.float32), margin, W, H) == expected


def test_keypoint_transform_matches_the_resized_pixels():
    """Mark pixels in a frame, crop + resize it, and find the marks where the keypoints say."""
    image = np.zeros((H, W, 3), dtype=np.uint8)
    points = np.array([[30, 20], [45, 80], [25, 60], [52, 35]], dtype=np.float32)
    for x, y in points.astype(int):
        image[y - 1:y + 2, x - 1:x + 2] = 255  # 3x3 marks survive resizing
    keypoints = np.zeros((17, 3), dtype=np.float32)
    keypoints[:4, :2], keypoints[:4, 2] = points, 0.8
    keypoints[4] = (150, 5, 0.9)  # outside the crop: score must drop to 0
    buffer = TrackletBuffer("cam", clip_length=1, window=1, overlap=0, crop_margin=0.1)
    detection = Detection(np.array([20, 15, 60, 95], np.float32), 0.9, 7, keypoints)
    (clip,) = buffer.update(VideoFrame(0, 0.0, image), [detection])
    crop, mapped = clip.crops[0], clip.keypoints[0]
    for x, y, score in mapped[:4]:
        assert score == pytest.approx(0.8)
        row, col = int(round(y)), int(round(x))
        assert crop[row, col].mean() > 200, (x, y)
    # brightest blob centre agrees with the mapped coordinate to within a pixel
    ys, xs = np.nonzero(crop[..., 0] > 128)
    near = np.hypot(xs - mapped[0, 0], ys - mapped[0, 1]) < 10
    assert abs(xs[near].mean() - mapped[0, 0]) < 1 and abs(ys[near].mean() - mapped[0, 1]) < 1
    assert mapped[4, 2] == 0 and not mapped[5:, 2].any()


def test_keypoints_to_crop_exact_scaling():
    keypoints = np.zeros((17, 3), dtype=np.float32)
    keypoints[0] = (10 - 0.5, 20 - 0.5, 1.0)  # the top-left corner of the crop (pixel edges)
    keypoints[1] = (30 - 0.5, 60 - 0.5, 1.0)  # the bottom-right corner
    mapped = keypoints_to_crop(keypoints, (10, 20, 30, 60), (80, 40))
    np.testing.assert_allclose(mapped[0, :2], (-0.5, -0.5))
    np.testing.assert_allclose(mapped[1, :2], (39.5, 79.5))


def test_clips_carry_their_boxes_and_wall_times_and_a_long_run_keeps_no_state():
    """Tracks that end exactly on a clip boundary (no final clip) used to leave their boxes
    behind in the worker; clips now carry their own boxes, and nothing outlives a track."""
    buffer = TrackletBuffer("cam", clip_length=4, window=8, overlap=0, lost_after=2)
    clips, largest = [], 0
    for index in range(3000):
        track = index // 10  # each track is seen for 8 frames then lost: one clip, no tail
        visible = [person(track, x=20 + 5 * (index % 10))] if index % 10 < 8 else []
        image = frame(index)
        image = VideoFrame(image.index, image.time, image.image, wall_time=1.8e9 + index / 10)
        clips += buffer.update(image, visible)
        buffer.pop_tracklet_updates()
        largest = max(largest, buffer.active_tracks)
    assert largest <= 2 and buffer.active_tracks == 0 and not buffer._tracks
    assert len(clips) == 300 and not any(c.final for c in clips)
    first = clips[0]
    assert first.boxes.shape == (4, 4) and first.boxes.dtype == np.float32
    np.testing.assert_allclose(first.boxes[:, 0], [20 + 5 * i for i in first.frame_indices])
    assert first.wall_times == tuple(1.8e9 + i / 10 for i in first.frame_indices)
