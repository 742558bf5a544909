"""`keyreid-watch --backend ray` on a real Ray cluster (a head and one more node on this
machine): the same tracklets, clips and descriptors as the local backend, and a camera whose
actor is killed fails alone."""
from __future__ import annotations

import re
import subprocess
import sys

import numpy as np
import pytest

from storage import open_repository
from support import HALVES, bus_video, run_watcher, stored_clip_count, wait_for, watcher_config

pytestmark = pytest.mark.slow


def _stored(db) -> dict:
    """(camera, track) -> (first frame, last frame, clips' frame indices, descriptors)."""
    with open_repository(f"sqlite:///{db}", readonly=True) as repo:
        stored = {}
        for tracklet in repo.list_tracklets():
            clips = repo.tracklet_clips(tracklet.id)
            stored[(tracklet.camera_id, tracklet.track_id)] = (
                tracklet.first_frame, tracklet.last_frame,
                [tuple(c.frame_indices) for c in clips],
                np.stack([np.asarray(c.descriptor, np.float32) for c in clips]))
        return stored


def _comparable(config) -> None:
    """Exact arithmetic: fp32 encoder (OpenVINO bf16 is `auto` on CPUs with bf16 units), torch
    detector (what the shared detector runs)."""
    text = config.read_text().replace("reid: {", "reid: {precision: fp32, ")
    config.write_text(text.replace("detector: {", "detector: {runtime: torch, max_wait: 0.05, "))


def test_ray_backend_gives_the_same_tracklets_clips_and_descriptors_as_local(
        tmp_path, weights, ray_cluster):
    """Per-camera detectors and the shared detector (both cameras' frames in one batch)."""
    bus_video(tmp_path / "bus.mkv", 40)
    config = watcher_config(tmp_path, weights, HALVES)
    _comparable(config)
    local = run_watcher(config, "--db", f"sqlite:///{tmp_path / 'local.db'}")
    assert local.returncode == 0, local.stderr[-3000:]
    expected = _stored(tmp_path / "local.db")
    assert len(expected) >= 2 and sum(len(e[2]) for e in expected.values()) >= 10

    shared = config.with_name("shared.yaml")
    shared.write_text(config.read_text().replace("detector: {", "detector: {service: shared, "))
    for name, cams in (("per-camera", config), ("shared", shared)):
        db = tmp_path / f"ray-{name}.db"
        on_ray = run_watcher(cams, "--db", f"sqlite:///{db}", "--backend", "ray",
                             "--ray-address", ray_cluster.address, env=ray_cluster.env)
        log = on_ray.stderr + on_ray.stdout
        assert on_ray.returncode == 0, log[-4000:]
        assert "2 node(s)" in log and "CameraActor" in log
        if name == "shared":
            batches = re.search(r"shared detector: (\d+) frames in (\d+) batches .*largest (\d+)", log)
            assert batches and int(batches[3]) == 2, log[-3000:]  # both cameras in one pass
            assert int(batches[1]) >= 80  # every frame of both cameras (+ warm-ups)
        got = _stored(db)
        assert sorted(got) == sorted(expected), name
        for key, (first, last, frames, descriptors) in expected.items():
            assert got[key][:3] == (first, last, frames), (name, key)
            np.testing.assert_allclose(got[key][3], descriptors, atol=2e-3, err_msg=f"{name} {key}")


def _kill_actor(cluster, prefix: str) -> str:
    """Kill the actor named `prefix...` from another Ray driver, as an operator (or a lost
    node) would."""
    script = (
        "import ray, sys\n"
        "ray.init(address=sys.argv[1], logging_level='ERROR')\n"
        "names = [a for a in ray.util.list_named_actors(all_namespaces=True)\n"
        "         if a['name'].startswith(sys.argv[2])]\n"
        "assert len(names) == 1, names\n"
        "ray.kill(ray.get_actor(names[0]['name'], namespace=names[0]['namespace']))\n"
        "print(names[0]['name'])\n")
    result = subprocess.run([sys.executable, "-c", script, cluster.address, prefix],
                            capture_output=True, text=True, timeout=120, check=False,
                            env=cluster.env)
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout.strip().splitlines()[-1]


def test_a_killed_camera_actor_fails_that_camera_alone_a_killed_encoder_is_replaced(
        tmp_path, weights, ray_cluster):
    frames = 600  # the right camera is still running when both kills are done
    bus_video(tmp_path / "bus.mkv", frames)
    config = watcher_config(tmp_path, weights, HALVES)
    db = tmp_path / "watch.db"
    watcher = run_watcher(config, "--backend", "ray", "--ray-address", ray_cluster.address,
                          wait=False, env=ray_cluster.env)
    try:
        wait_for(lambda: stored_clip_count(db) > 0, 240, "the first clips", watcher)
        killed = _kill_actor(ray_cluster, "keyreid-camera-left-")
        wait_for(lambda: "camera left FAILED" in watcher.log.read_text(), 60,
                 "the left camera's failure", watcher)
        clips_before = stored_clip_count(db)
        _kill_actor(ray_cluster, "keyreid-encoder-")
        watcher.wait(timeout=300)
    finally:
        if watcher.poll() is None:
            watcher.kill()
    log = watcher.log.read_text()
    assert watcher.returncode == 1, log[-3000:]
    assert "camera left FAILED: Ray actor died" in log, log[-3000:]
    assert "camera right finished" in log
    assert "the encoder actor died; starting another" in log
    with open_repository(f"sqlite:///{db}", readonly=True) as repo:
        cameras = {c.id: c for c in repo.list_cameras()}
        assert cameras["left"].status == "failed" and "Ray actor died" in cameras["left"].status_reason
        assert cameras["right"].status == "finished" and cameras["right"].frames_processed == frames
        tracklets = repo.list_tracklets()
        assert all(t.finished for t in tracklets)
        assert {t.camera_id for t in tracklets} == {"left", "right"}
        assert repo.stats().clips > clips_before  # encoded by the replacement encoder
        right_clips = sum(len(repo.tracklet_clips(t.id)) for t in repo.list_tracklets(["right"]))
    sent = re.search(r"camera right: finished \(\d+ frames, [\d.]+ s of video, (\d+) clips", log)
    assert sent and int(sent[1]) == right_clips > 0, log[-2000:]  # every clip it sent, stored
    assert "set aside" not in log
    assert killed.startswith("keyreid-camera-left-")
