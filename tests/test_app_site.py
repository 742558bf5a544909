"""One PostgreSQL database for a site: two real `keyreid-watch` processes with cameras of their
own write it at the same time; nothing is lost, exactly one of them links (the other says so),
identities span both watchers' cameras, and the dashboard's data functions serve it."""
from __future__ import annotations

import re
import signal
import textwrap

import numpy as np
import pytest
from support import bus_video, run_watcher, wait_for

from app.dashboard.data import (
    activity_points,
    camera_rows,
    journey,
    open_readonly,
    search_by_tracklet,
    time_bounds,
)
from storage import open_repository

pytestmark = pytest.mark.slow

LINKS = "this watcher links the site's tracklets"
STORES_ONLY = "another watcher links this site's tracklets"
TAKES_OVER = "takes over linking"


def _long_bus_video(path, num_frames: int):
    """`support.bus_video`'s frames repeated (it pans with a period of 32 frames), written as
    they are made: a long video without holding it in memory."""
    import av

    bus_video(path.with_name("period.mkv"), 32)
    with av.open(str(path.with_name("period.mkv"))) as source:
        period = [frame.to_ndarray(format="rgb24") for frame in source.decode(video=0)]
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("mpeg4", rate=10)
        stream.width, stream.height = period[0].shape[1], period[0].shape[0]
        stream.pix_fmt = "yuv420p"
        for i in range(num_frames):
            frame = av.VideoFrame.from_ndarray(period[i % len(period)], format="rgb24")
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))


def _config(folder, weights, url: str, camera: str, source: str):
    """A watcher of one camera on the bus video; linking without a transit prior (both
    cameras see the same people at the same moment)."""
    path = folder / f"{camera}.yaml"
    path.write_text(textwrap.dedent(f"""
        database: {url}
        detector: {{weights: {weights}, imgsz: 640}}
        keypoints: {{backend: yolo-pose}}
        reid: {{overrides: {{depth: 2}}, batch_size: 8, max_wait: 0.2}}
        clips: {{window: 8, overlap: 4, lost_after: 10}}
        linking: {{transit_prior: false}}
        cameras:
          - {{id: {camera}, source: {source}, max_fps: null}}
    """))
    return path


def _seed_calibration(url: str) -> None:
    """An earlier run of the watchers' (untrained) model whose linker had learnt that the same
    person is at distance ~0 and different people far away: the site's linker starts from it,
    so the same person seen by both watchers' cameras is linked (the untrained encoder could
    never calibrate itself in a test this short)."""
    from reid import Encoder

    model_id = Encoder(model="keyreid_vit_tiny", device="cpu", runtime="torch",
                       depth=2).model_id
    rng = np.random.default_rng(0)
    with open_repository(url) as repo:
        run = repo.start_run({"seeded": True})
        repo.update_run_calibration(run, {
            "model_id": model_id,
            "genuine_samples": np.abs(rng.normal(0.0, 0.01, 2000)).round(5).tolist(),
            "impostor_samples": rng.normal(0.8, 0.1, 2000).round(5).tolist()})
        repo.finish_run(run)


def _clips_of(url: str, camera: str) -> int:
    with open_repository(url, readonly=True) as repo:
        return sum(len(repo.tracklet_clips(t.id)) for t in repo.list_tracklets([camera]))


def _summary(log: str) -> tuple[int, int, int]:
    """(run id, tracklets, clips) from the watcher's summary line."""
    found = re.search(r"^run (\d+): (\d+) tracklets, (\d+) clips", log, re.MULTILINE)
    assert found, log[-3000:]
    return int(found[1]), int(found[2]), int(found[3])


def test_two_watchers_write_one_postgresql_database_and_one_links(tmp_path, weights, postgres):
    url = postgres.database()
    _long_bus_video(tmp_path / "long.mkv", 1200)
    bus_video(tmp_path / "bus.mkv", 64)
    _seed_calibration(url)
    north = _config(tmp_path, weights, url, "north", "long.mkv")
    south = _config(tmp_path, weights, url, "south", "bus.mkv")
    # North takes the linker lock first and reads 2 minutes of the video in real time (like a
    # live camera); it is stopped once south has read the same scene's first 64 frames.
    first = run_watcher(north, "--realtime", wait=False)
    second = None
    try:
        wait_for(lambda: LINKS in first.log.read_text(), 180, "north to take the linker lock",
                 first)
        second = run_watcher(south, wait=False)
        second.wait(timeout=240)
        south_log = second.log.read_text()
        assert second.returncode == 0, south_log[-3000:]
        first.send_signal(signal.SIGINT)  # a stop: drain, link what is left, exit 0
        first.wait(timeout=120)
    finally:
        for process in (first, second):
            if process is not None and process.poll() is None:
                process.kill()
                process.wait()
    north_log = first.log.read_text()
    assert first.returncode == 0, north_log[-3000:]
    assert LINKS in north_log and STORES_ONLY not in north_log
    assert STORES_ONLY in south_log and LINKS not in south_log and TAKES_OVER not in south_log
    assert "linker calibration continues from run 1" in north_log

    with open_repository(url, readonly=True) as repo:
        for log, camera in ((north_log, "north"), (south_log, "south")):
            run_id, tracklets, clips = _summary(log)
            stored = repo.list_tracklets(run_id=run_id)
            assert len(stored) == tracklets > 0 and {t.camera_id for t in stored} == {camera}
            assert sum(len(repo.tracklet_clips(t.id)) for t in stored) == clips > 0
            produced = sum(int(n) for n in re.findall(
                rf"^  camera {camera}: .*?, (\d+) clips", log, re.MULTILINE))
            assert clips == produced  # every clip the camera made is stored
            assert all(t.finished and t.identity_id is not None for t in stored)
        assert [r.status for r in repo.list_runs()] == ["finished", "stopped", "finished"]
        spanning = [i for i in repo.list_identities() if set(i.camera_ids) == {"north", "south"}]
        assert spanning, [i.camera_ids for i in repo.list_identities()]

        # the dashboard's pages, on the same database
        dashboard = open_readonly(url)
        try:
            cameras = dashboard.list_cameras()
            gallery = dashboard.gallery_index()
            rows = {row["camera"]: row for row in camera_rows(dashboard, cameras, gallery)}
            assert rows["north"]["tracklets"] and rows["south"]["clips"]
            assert time_bounds(dashboard, cameras) is not None
            assert activity_points(dashboard, cameras, 60.0)
            sightings = journey(dashboard, spanning[0].id, {c.id: c.name for c in cameras})
            assert {s.tracklet.camera_id for s in sightings} == {"north", "south"}
            member = next(s.tracklet for s in sightings if s.tracklet.camera_id == "south")
            hits = search_by_tracklet(dashboard, gallery, member.id, 5)
            assert hits and all(h.hit.camera_id == "north" for h in hits)
            assert hits[0].same_identity
        finally:
            dashboard.close()


def test_when_the_linking_watcher_dies_another_takes_linking_over(tmp_path, weights, postgres):
    """kill -9 of the linking watcher: the server drops its lock with its connection, the other
    watcher takes linking over within seconds (and says so) and links what is finished."""
    url = postgres.database()
    _long_bus_video(tmp_path / "long.mkv", 1200)
    north = _config(tmp_path, weights, url, "north", "long.mkv")
    south = _config(tmp_path, weights, url, "south", "long.mkv")
    first = run_watcher(north, "--realtime", wait=False)
    second = None
    try:
        wait_for(lambda: LINKS in first.log.read_text(), 180, "north to take the linker lock",
                 first)
        second = run_watcher(south, "--realtime", wait=False)
        wait_for(lambda: STORES_ONLY in second.log.read_text(), 180, "south to store only",
                 second)
        wait_for(lambda: _clips_of(url, "south") >= 4, 180, "south's first clips", second)
        first.kill()
        first.wait(timeout=10)
        wait_for(lambda: TAKES_OVER in second.log.read_text(), 30, "south to take over linking",
                 second)
        second.send_signal(signal.SIGINT)
        second.wait(timeout=120)
    finally:
        for process in (first, second):
            if process is not None and process.poll() is None:
                process.kill()
                process.wait()
    south_log = second.log.read_text()
    assert second.returncode == 0, south_log[-3000:]
    with open_repository(url, readonly=True) as repo:
        north_run, south_run = (r for r in repo.list_runs())
        assert north_run.status == "running"  # killed: the next repair marks it aborted
        finished = repo.list_tracklets(run_id=south_run.id)
        assert finished and all(t.finished and t.identity_id is not None for t in finished)
        assert repo.count_identities() >= 1
