"""VideoSource on small synthetic videos: sampling, crops, times, broken files, flaky HTTP."""
from __future__ import annotations

import logging
import os
import socket
import threading
import time

import numpy as np
import pytest

from support import FlakyVideoServer
from tracking.sources import LatestFrames, ReconnectPolicy, SourceError, VideoSource
from tracking.synthetic import moving_rectangles, write_moving_rectangles, write_video

FAST_RETRY = ReconnectPolicy(initial_delay=0.05, max_delay=0.2, max_attempts=3)


@pytest.fixture(scope="module")
def video(tmp_path_factory) -> str:
    """30 frames, 64x48, 10 fps, mpeg4 in mp4."""
    return str(write_moving_rectangles(tmp_path_factory.mktemp("v") / "rects.mp4"))


def test_reads_every_frame_with_times(video):
    frames = list(VideoSource(video))
    assert [f.index for f in frames] == list(range(30))
    np.testing.assert_allclose([f.time for f in frames], np.arange(30) / 10, atol=1e-6)
    first = frames[0].image
    assert first.dtype == np.uint8 and first.shape == (48, 64, 3)
    # RGB order: the red rectangle is red, not blue (lossy codec: compare loosely).
    red = first[8:20, 3:10].reshape(-1, 3).mean(axis=0)
    assert red[0] > 150 and red[2] < 100


@pytest.mark.parametrize("stride, max_fps, expected", [
    (1, None, list(range(30))),
    (3, None, list(range(0, 30, 3))),
    (1, 5.0, list(range(0, 30, 2))),
    (1, 2.5, list(range(0, 30, 4))),
    (2, 2.5, list(range(0, 30, 4))),
    (7, None, [0, 7, 14, 21, 28]),
    (1, 100.0, list(range(30))),
])
def test_stride_and_fps_limit(video, stride, max_fps, expected):
    assert [f.index for f in VideoSource(video, stride=stride, max_fps=max_fps)] == expected


def test_crop_makes_a_virtual_camera(video):
    full = next(iter(VideoSource(video)))
    right = next(iter(VideoSource(video, crop=(32, 8, 32, 40))))
    assert right.image.shape == (40, 32, 3) and right.image.flags.c_contiguous
    np.testing.assert_array_equal(right.image, full.image[8:48, 32:64])


def test_realtime_paces_a_file(tmp_path):
    path = write_video(tmp_path / "short.mkv", [moving_rectangles(i, 64, 48) for i in range(6)],
                       fps=20)
    start = time.monotonic()
    assert len(list(VideoSource(str(path), realtime=True))) == 6
    assert time.monotonic() - start >= 0.24  # 5 frame intervals of 50 ms


def _error_for(source: str | VideoSource, **kwargs) -> str:
    if not isinstance(source, VideoSource):
        source = VideoSource(source, **kwargs)
    with pytest.raises(SourceError) as info:
        list(source)
    return str(info.value)


def test_missing_file(tmp_path):
    message = _error_for(str(tmp_path / "nope.mp4"))
    assert "nope.mp4" in message and "file not found" in message


def test_random_bytes(tmp_path):
    path = tmp_path / "noise.mp4"
    path.write_bytes(os.urandom(4000))
    message = _error_for(str(path))
    assert "noise.mp4" in message and "cannot open" in message


@pytest.mark.parametrize("suffix, reason", [
    (".mp4", "cannot open"),  # the index (moov atom) is at the end: unreadable
    (".avi", "cannot open"),
    (".mkv", "truncated"),  # plays up to the cut, then the declared duration gives it away
])
def test_truncated_file(tmp_path, suffix, reason):
    full = write_moving_rectangles(tmp_path / f"full{suffix}")
    cut = tmp_path / f"cut{suffix}"
    cut.write_bytes(full.read_bytes()[: full.stat().st_size // 2])
    message = _error_for(str(cut))
    assert f"cut{suffix}" in message and reason in message


def test_truncated_mpegts_just_ends_early(tmp_path):
    """MPEG-TS declares no length, so a cut file cannot be told from a short one: honest limit."""
    full = write_moving_rectangles(tmp_path / "full.ts")
    cut = tmp_path / "cut.ts"
    cut.write_bytes(full.read_bytes()[: full.stat().st_size // 2])
    assert 5 < len(list(VideoSource(str(cut)))) < 30


def test_corrupt_bytes_mid_file_do_not_kill_the_source(tmp_path):
    rng = np.random.default_rng(0)
    frames = rng.integers(0, 255, (30, 48, 64, 3), dtype=np.uint8)  # noise: big packets
    path = write_video(tmp_path / "noise.mkv", frames)
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    data[middle:middle + 300] = rng.integers(0, 255, 300, dtype=np.uint8).tobytes()
    path.write_bytes(bytes(data))
    source = VideoSource(str(path))
    assert len(list(source)) >= 25  # FFmpeg conceals or drops the damaged frames
    assert source.stats.frames_yielded >= 25


def test_crop_outside_the_frame(video):
    message = _error_for(video, crop=(40, 0, 32, 48))
    assert "crop" in message and "64x48" in message


@pytest.mark.parametrize("kwargs", [{"stride": 0}, {"max_fps": 0}, {"crop": (0, 0, 0, 10)},
                                    {"crop": (-1, 0, 10, 10)}])
def test_bad_options(video, kwargs):
    with pytest.raises(ValueError):
        VideoSource(video, **kwargs)


@pytest.mark.parametrize("source, kind, live", [
    (0, "webcam", True), ("1", "webcam", True), ("/dev/video2", "webcam", True),
    ("rtsp://cam.local/stream", "url", True), ("http://cam.local/v.ts", "url", False),
    ("clips/a.mp4", "file", False),
])
def test_source_kinds(source, kind, live):
    src = VideoSource(source)
    assert (src.kind, src.live) == (kind, live)
    assert (src.reconnect is None) == (kind == "file")


@pytest.mark.parametrize("failure, reason", [("drop", "read failed"), ("stall", "stalled")])
def test_http_source_reconnects_and_resumes(tmp_path, caplog, failure, reason):
    data = write_moving_rectangles(tmp_path / "v.ts", num_frames=60).read_bytes()
    server = FlakyVideoServer(data, failure)
    try:
        source = VideoSource(server.url, reconnect=FAST_RETRY, open_timeout=2, read_timeout=0.5)
        with caplog.at_level(logging.WARNING, logger="tracking.sources"):
            indices = [frame.index for frame in source]
    finally:
        server.close()
    # The second connection starts over; frames already delivered are skipped, none repeated.
    assert indices == list(range(60))
    assert server.requests == 2 and source.stats.reconnects == 1
    assert any(reason in r.message and "reconnecting" in r.message for r in caplog.records)


def test_unreachable_url_gives_up_after_max_attempts(caplog):
    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    url = f"http://127.0.0.1:{port}/video.ts"
    source = VideoSource(url, reconnect=ReconnectPolicy(initial_delay=0.01, max_attempts=2),
                         open_timeout=1)
    with caplog.at_level(logging.WARNING, logger="tracking.sources"):
        message = _error_for(source)
    assert "gave up after 2 reconnect attempts" in message and url in message
    assert source.stats.reconnects == 2


def test_backoff_delays():
    policy = ReconnectPolicy(initial_delay=0.5, max_delay=3.0, multiplier=2.0)
    assert [policy.delay(n) for n in range(1, 6)] == [0.5, 1.0, 2.0, 3.0, 3.0]


def test_stop_interrupts_backoff():
    source = VideoSource("http://127.0.0.1:9/none.ts", open_timeout=0.5,
                         reconnect=ReconnectPolicy(initial_delay=30.0))
    threading.Timer(0.3, source.stop).start()
    start = time.monotonic()
    assert list(source) == []  # stopping ends the iteration quietly
    assert time.monotonic() - start < 5 and source.stats.reconnects == 1


def test_live_source_reconnects_at_end_of_stream_and_keeps_counting(tmp_path):
    """A live stream that ends is re-opened; frame indices and times continue, not restart."""
    data = write_moving_rectangles(tmp_path / "v.ts", num_frames=30).read_bytes()
    server = FlakyVideoServer(data, failure="none")  # the first response ends half-way
    source = VideoSource(server.url, live=True, reconnect=FAST_RETRY, read_timeout=1)
    frames = []
    try:
        for frame in source:
            frames.append(frame)
            if len(frames) == 50:
                source.stop()
    finally:
        server.close()
    indices, times = [f.index for f in frames], [f.time for f in frames]
    assert indices == list(range(50))
    assert all(b - a == pytest.approx(0.1, abs=1e-3) for a, b in zip(times, times[1:]))
    assert source.stats.reconnects >= 2


def test_latest_frames_skips_what_a_slow_consumer_cannot_take(tmp_path):
    """A consumer slower than the source gets the newest frame each time, never a backlog."""
    frames = [np.full((32, 32, 3), i * 4, np.uint8) for i in range(60)]
    path = write_video(tmp_path / "v.mkv", frames, fps=30)
    latest = LatestFrames(VideoSource(path, realtime=True))
    seen = []
    for frame in latest:
        seen.append(frame.index)
        time.sleep(0.2)  # 6 source frames per consumed one
    assert seen[-1] >= 50 and len(seen) < 20
    assert latest.skipped == 60 - len(seen)
    assert all(a < b for a, b in zip(seen, seen[1:]))


def test_latest_frames_raises_the_source_error_and_stops_promptly(tmp_path):
    with pytest.raises(SourceError, match="file not found"):
        list(LatestFrames(VideoSource(tmp_path / "missing.mkv")))
    policy = ReconnectPolicy(initial_delay=30.0)
    latest = LatestFrames(VideoSource("rtsp://user:hunter2@127.0.0.1:9/x", reconnect=policy,
                                      open_timeout=1.0))
    started = time.monotonic()
    threading.Timer(1.5, latest.stop).start()
    assert list(latest) == []
    assert time.monotonic() - started < 5.0
    assert latest.stats.state == "ended" and "hunter2" not in (latest.stats.last_error or "")
