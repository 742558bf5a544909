"""Worker pieces without a camera: tracklet numbering and the back-pressure policies."""
from __future__ import annotations

import queue

import numpy as np

from app.watcher.worker import Output, Status, _Outbox, _TrackletIds
from tracking.types import Clip, Detection, TrackletUpdate


def _detection(track_id: int) -> Detection:
    return Detection(np.array([0, 0, 10, 20], np.float32), 0.9, track_id)


def _update(track_id: int, ended: bool) -> TrackletUpdate:
    return TrackletUpdate("cam", track_id, 0, 1, 0.0, 0.1, 2, np.zeros((4, 2, 3), np.uint8), ended)


def _clip(track_id: int, start: int) -> Clip:
    frames = tuple(range(start, start + 4))
    return Clip("cam", track_id, frames, tuple(f / 10 for f in frames),
                np.zeros((4, 8, 4, 3), np.uint8), np.zeros((4, 17, 3), np.float32), False)


def test_a_tracker_id_seen_again_after_its_tracklet_ended_is_a_new_tracklet():
    ids = _TrackletIds()
    assert [d.track_id for d in ids.relabel([_detection(7), _detection(3)])] == [1, 2]
    assert [d.track_id for d in ids.relabel([_detection(3), _detection(9)])] == [2, 3]
    ids.ended([_update(2, ended=True), _update(1, ended=False)])
    assert [d.track_id for d in ids.relabel([_detection(3), _detection(7)])] == [4, 1]


def _outbox(policy: str, size: int, pending: int) -> tuple[_Outbox, queue.Queue]:
    """An outbox over an in-process queue with the same put / put_nowait / Full contract."""
    out = queue.Queue(size)
    return _Outbox(out, policy, pending), out


def _drain(outbox: _Outbox, out: queue.Queue) -> list:
    """What the main process would read, letting the outbox send what it still holds."""
    messages = []
    while True:
        try:
            messages.append(out.get_nowait())
        except queue.Empty:
            if not outbox.pending:
                return messages
            outbox.flush(block=False)


def test_drop_oldest_drops_only_clips_and_counts_them():
    outbox, out = _outbox("drop_oldest", size=1, pending=2)
    outbox.send(Output("cam", [_update(1, False)], [_clip(1, 0)]))  # fits in the queue
    for start in (4, 8, 12, 16):
        outbox.send(Output("cam", [], [_clip(1, start)]))
    outbox.send(Output("cam", [_update(1, True)], [_clip(1, 20)]))
    assert outbox.dropped == 3  # 5 clips waited locally, 2 may wait: the 3 oldest went
    messages = _drain(outbox, out)
    clips = [c.frame_indices[0] for m in messages for c in m.clips]
    updates = [(u.track_id, u.ended) for m in messages for u in m.updates]
    assert clips == [0, 16, 20]
    assert updates == [(1, False), (1, True)]  # tracklet updates are never dropped


def test_block_policy_loses_nothing():
    outbox, out = _outbox("block", size=8, pending=1)
    for start in range(0, 20, 4):
        outbox.send(Output("cam", [], [_clip(1, start)]))
    outbox.send(Status("cam", 1, 1.0, 0.1, 0, 0.0, 1, 5, 0, 0, {}, None))
    messages = _drain(outbox, out)
    assert outbox.dropped == 0 and len(messages) == 6 and isinstance(messages[-1], Status)


def test_a_restarted_worker_continues_numbering_and_a_reset_starts_new_tracklets():
    ids = _TrackletIds(start=41)
    assert [d.track_id for d in ids.relabel([_detection(1), _detection(2)])] == [42, 43]
    ids.reset()  # after an outage the tracker's id 1 is somebody new
    assert [d.track_id for d in ids.relabel([_detection(1)])] == [44]


def test_int8_calibration_reads_the_cameras_own_crop_and_keys_on_the_file(tmp_path):
    """Calibration frames: the camera's crop, spread over the video (0.5 fps of stream time),
    capped; the cache key names the source and changes when the file does."""
    import os

    from support import bus_video

    from app.watcher.config import CameraConfig
    from app.watcher.worker import calibration_frames, calibration_id

    video = bus_video(tmp_path / "bus.mkv", 60)  # 6 s at 10 fps
    camera = CameraConfig("left", str(video), crop=(0, 0, 200, 560))
    frames = calibration_frames(camera, count=48)
    assert len(frames) == 3 and all(f.shape == (560, 200, 3) for f in frames)  # t = 0, 2, 4 s
    assert len(calibration_frames(camera, count=2)) == 2
    key = calibration_id(camera)
    assert key["crop"] == [0, 0, 200, 560] and key["source"] == str(video)
    assert calibration_id(CameraConfig("right", str(video), crop=(200, 0, 200, 560))) != key
    os.utime(video, ns=(1, 1))
    assert calibration_id(camera) != key
    missing = CameraConfig("gone", str(tmp_path / "none.mkv"))
    import pytest

    from tracking.sources import SourceError
    with pytest.raises(SourceError):
        calibration_frames(missing)
