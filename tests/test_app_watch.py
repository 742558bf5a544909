"""keyreid-watch end to end on a synthetic video with real people (bus.jpg panned, written with
PyAV) split into two virtual cameras: clips, tracklets, descriptors, linking; broken cameras
failing alone; kill -9, restart, a second watcher, SIGTERM."""
from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import cv2
import numpy as np
import pytest

from storage import open_repository
from support import (HALVES, FlakyVideoServer, bus_video, run_watcher, stored_clip_count,
                     wait_for, watcher_config)

pytestmark = pytest.mark.slow



@pytest.fixture(scope="module")
def synthetic_run(tmp_path_factory, weights):
    """One watcher run: two virtual cameras from a file, and a third camera over HTTP whose
    connection drops half-way (it must reconnect with backoff and resume)."""
    folder = tmp_path_factory.mktemp("watch")
    bus_video(folder / "bus.mkv", 40)
    server = FlakyVideoServer(bus_video(folder / "bus.ts", 40).read_bytes(), failure="drop")
    config = watcher_config(folder, weights, HALVES + f"- {{id: web, source: '{server.url}', "
                                               f"max_fps: null}}\n")
    try:
        result = run_watcher(config)
    finally:
        server.close()
    return folder, result, server.requests


def test_two_virtual_cameras_give_tracklets_clips_descriptors_and_identities(synthetic_run):
    folder, result, _ = synthetic_run
    assert result.returncode == 0, result.stdout + result.stderr
    assert "camera left: finished" in result.stderr and "camera right: finished" in result.stderr

    from reid import Encoder
    dim = Encoder(depth=2).dim
    with open_repository(f"sqlite:///{folder / 'watch.db'}", readonly=True) as repo:
        runs = repo.list_runs()
        assert [r.status for r in runs] == ["finished"]
        cameras = {c.id: c for c in repo.list_cameras()}
        assert {c: cameras[c].status for c in cameras} == dict.fromkeys(
            ("left", "right", "web"), "finished")
        assert cameras["left"].frames_processed == 40 and cameras["left"].crop == (0, 0, 200, 560)
        tracklets = repo.list_tracklets(thumbnails=True)
        assert {t.camera_id for t in tracklets} == {"left", "right", "web"}
        for tracklet in tracklets:
            assert tracklet.finished and tracklet.identity_id is not None
            thumb = cv2.imdecode(np.frombuffer(tracklet.thumbnail, np.uint8), cv2.IMREAD_COLOR)
            assert thumb.shape == (256, 128, 3)
            clips = repo.tracklet_clips(tracklet.id)
            assert clips, f"tracklet {tracklet.id} has no clip"
            for clip in clips:
                frames = clip.frame_indices
                assert len(frames) == 4 and clip.descriptor_dim == dim
                assert clip.descriptor.shape == (dim,) and np.isfinite(clip.descriptor).all()
                assert tracklet.first_frame <= frames[0] and frames[-1] <= tracklet.last_frame
                assert all(a <= b for a, b in zip(frames, frames[1:]))
                assert len(clip.boxes) == 4 and clip.keypoints.shape == (4, 17, 3)
            regular = [c for c in clips if len(set(c.frame_indices)) == 4]
            assert all(a < b for c in regular for a, b in zip(c.frame_indices, c.frame_indices[1:]))
        per_camera = {c: sum(len(repo.tracklet_clips(t.id)) for t in tracklets if t.camera_id == c)
                      for c in ("left", "right")}
        assert per_camera["left"] >= 2 and per_camera["right"] >= 2, per_camera
        decisions = repo.link_decisions()
        assert {d.tracklet_id for d in decisions} == {t.id for t in tracklets}
        assert repo.count_identities() >= 1


def test_http_camera_that_drops_reconnects_and_resumes(synthetic_run):
    folder, result, requests = synthetic_run
    assert requests == 2
    assert "[camera web]" in result.stderr and "reconnecting in" in result.stderr
    with open_repository(f"sqlite:///{folder / 'watch.db'}", readonly=True) as repo:
        web = next(c for c in repo.list_cameras() if c.id == "web")
        assert web.status == "finished" and web.frames_processed == 40
        assert web.last_frame_index == 39  # every frame once: resumed after the last delivered


def test_broken_cameras_fail_alone_while_the_good_one_finishes(tmp_path, weights):
    bus_video(tmp_path / "bus.mkv", 24)
    (tmp_path / "random.mp4").write_bytes(np.random.default_rng(0).bytes(50_000))
    whole = (tmp_path / "bus.mkv").read_bytes()
    (tmp_path / "truncated.mkv").write_bytes(whole[: len(whole) // 3])
    config = watcher_config(tmp_path, weights, """
        - {id: good, source: bus.mkv, max_fps: null}
        - {id: missing, source: nowhere.mp4}
        - {id: noise, source: random.mp4}
        - {id: cut, source: truncated.mkv, max_fps: null}
    """)
    result = run_watcher(config)
    assert result.returncode == 1, result.stderr
    log = result.stderr
    assert "camera good: finished" in log
    assert "camera missing FAILED" in log and "file not found" in log
    assert "camera noise FAILED" in log
    assert "camera cut FAILED" in log and "truncated" in log
    with open_repository(f"sqlite:///{tmp_path / 'watch.db'}", readonly=True) as repo:
        cameras = {c.id: c for c in repo.list_cameras()}
        assert cameras["good"].status == "finished"
        for camera_id in ("missing", "noise", "cut"):
            assert cameras[camera_id].status == "failed" and cameras[camera_id].status_reason
        assert "file not found" in cameras["missing"].status_reason
        assert repo.count_tracklets(camera_ids=["good"]) >= 2
        assert repo.list_runs()[-1].status.startswith("failed cameras:")


def _children(pid: int) -> list[int]:
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except OSError:
        return []
    return [int(p) for p in text.split()]


def test_kill_9_keeps_committed_clips_restart_continues_second_watcher_refused(tmp_path, weights):
    # 40 s at --realtime: the first run must still be running when it is killed, even on a
    # loaded machine where the refused second watcher takes a while to start
    bus_video(tmp_path / "bus.mkv", 400)
    config = watcher_config(tmp_path, weights, HALVES)
    db = tmp_path / "watch.db"
    first = run_watcher(config, "--realtime", wait=False)
    try:
        wait_for(lambda: stored_clip_count(db) >= 2, 180, "the first clips", first)
        refused = run_watcher(config)
        assert refused.returncode == 3
        assert "already has a writer" in refused.stderr and "keyreid-watch" in refused.stderr
        workers = _children(first.pid)
        committed = stored_clip_count(db)
        os.kill(first.pid, signal.SIGKILL)
        first.wait(timeout=10)
    finally:
        if first.poll() is None:
            first.kill()
    # orphaned camera workers notice their parent is gone and exit on their own
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline and any(Path(f"/proc/{p}").exists() and
                                              "Z" not in Path(f"/proc/{p}/stat").read_text().split()[2]
                                              for p in workers):
        time.sleep(0.3)
    alive = [p for p in workers if Path(f"/proc/{p}").exists()
             and Path(f"/proc/{p}/stat").read_text().split()[2] != "Z"]
    assert not alive, f"camera workers still running after kill -9 of the watcher: {alive}"

    with open_repository(f"sqlite:///{db}", readonly=True) as repo:
        assert repo.integrity_check() == ["ok"]
        assert repo.stats().clips >= committed
        kept = repo.stats().clips

    # restart: a new run, the killed one is marked aborted; SIGTERM stops it cleanly. The first
    # run may have reached the end of the file meanwhile: --start-over processes it again.
    second = run_watcher(config, "--realtime", "--start-over", wait=False)
    try:
        wait_for(lambda: stored_clip_count(db) >= kept + 2, 180, "clips of the second run", second)
        stop = time.monotonic()
        second.send_signal(signal.SIGTERM)
        second.wait(timeout=30)
        assert second.returncode == 0, second.log.read_text()[-3000:]
        assert time.monotonic() - stop < 15
    finally:
        if second.poll() is None:
            second.kill()
    with open_repository(f"sqlite:///{db}", readonly=True) as repo:
        runs = repo.list_runs()
        assert [r.status for r in runs][0].startswith("aborted")
        assert runs[1].status == "stopped" and runs[1].ended_at is not None
        second_run = repo.list_tracklets(run_id=runs[1].id)
        assert second_run and all(t.finished for t in second_run)
        assert repo.integrity_check() == ["ok"]
