"""`python -m app.bench`: how fast the watcher runs on the demo, per stage, next to detection alone.

Two measurements in one run, on the same cameras, frames and settings (the config's imgsz,
tracker, stride / max_fps, torch threads, one process per camera in both cases):

1. ultralytics' detection + tracking alone: each camera's sampled frames are decoded first
   (untimed), then only `PoseTracker.update` is timed;
2. the whole watcher (`app.watch.Watcher`): decode, detect+track, keypoints, crop, encode,
   store and link, into a temporary database.

It prints seconds of video processed per wall second (>= 1.0 keeps up with real time, per
camera), the cost of each stage, and the ratio whole / detection-only. Model loading is not
counted (both start their clocks at the first frame).
"""
from __future__ import annotations

import argparse
import logging
import multiprocessing
import os
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

from .config import CameraConfig, DetectorConfig, load_config
from .watch import Watcher

DEFAULT_CONFIG = Path(__file__).resolve().parent.parent / "examples" / "cams.yaml"


def _detect_only(camera: CameraConfig, detector: DetectorConfig, max_frames: int | None,
                 out: multiprocessing.Queue, start_barrier) -> None:
    """One camera: decode its sampled frames, then time YOLO-pose + tracker on them."""
    from tracking.detector import PoseTracker
    from tracking.sources import VideoSource

    source = VideoSource(camera.source, crop=camera.crop, stride=camera.stride,
                         max_fps=camera.max_fps, live=camera.live, name=camera.id)
    frames = []
    for frame in source:
        if max_frames is not None and frame.index >= max_frames:
            break
        frames.append(frame)
    tracker = PoseTracker(detector.weights, imgsz=detector.imgsz, conf=detector.conf,
                          iou=detector.iou, tracker=detector.tracker, device=detector.device,
                          threads=detector.threads, runtime=detector.runtime)
    tracker.warm_up(*frames[0].image.shape[:2])  # outside the clock, as the watcher's workers do
    start_barrier.wait()
    start = time.monotonic()
    people = 0
    for frame in frames:
        people += len(tracker.update(frame.image))
    elapsed = time.monotonic() - start
    video = frames[-1].time - frames[0].time + (frames[1].time - frames[0].time
                                                  if len(frames) > 1 else 0.0)
    out.put((camera.id, len(frames), video, elapsed, people))


def detection_baseline(cameras: tuple[CameraConfig, ...], detector: DetectorConfig,
                       max_frames: int | None) -> dict[str, tuple[int, float, float, int]]:
    """camera id -> (frames, video seconds, detect+track seconds, people found), run in parallel."""
    context = multiprocessing.get_context("spawn")
    out = context.Queue()
    barrier = context.Barrier(len(cameras))
    processes = [context.Process(target=_detect_only, args=(c, detector, max_frames, out, barrier))
                 for c in cameras]
    for p in processes:
        p.start()
    results = {}
    for _ in processes:
        camera_id, *values = out.get(timeout=3600)
        results[camera_id] = tuple(values)
    for p in processes:
        p.join()
    return results


def run_bench(config_path: str | os.PathLike = DEFAULT_CONFIG, max_frames: int | None = None,
              baseline: bool = True) -> str:
    config = load_config(config_path)
    cameras = config.enabled_cameras
    lines = [f"# app.bench: {config_path}, {len(cameras)} camera(s), imgsz {config.detector.imgsz}, "
             f"{config.detector.tracker}, max_fps {[c.max_fps for c in cameras]}, stride "
             f"{[c.stride for c in cameras]}, encoder {config.reid.model}, "
             f"cpu count {os.cpu_count()}, load average {os.getloadavg()[0]:.2f} at start"]
    base = detection_baseline(cameras, config.detector, max_frames) if baseline else {}
    with tempfile.TemporaryDirectory() as tmp, open(os.devnull, "w") as quiet:
        watch_config = replace(config, database=f"sqlite:///{Path(tmp) / 'bench.db'}")
        summary = Watcher(watch_config, max_frames=max_frames, status_stream=quiet).run()
    wall = summary.finished_at - (summary.first_frame_at or summary.finished_at)
    video = {c: s.video_seconds for c, s in summary.cameras.items()}
    frames = sum(s.frames for s in summary.cameras.values())
    total_video = sum(video.values())
    per_camera = max(video.values()) if video else 0.0
    stages: dict[str, float] = {}
    for s in summary.cameras.values():
        for name, seconds in s.stages.items():
            stages[name] = stages.get(name, 0.0) + seconds
    stages.update(encode=summary.encode_seconds, store=summary.store_seconds,
                  link=summary.link_seconds)
    lines += ["", "| stage | seconds (all cameras) | ms per frame | video s per stage s |",
              "|---|---:|---:|---:|"]
    for name, seconds in stages.items():
        rate = f"{total_video / seconds:.1f}" if seconds > 0 else "-"
        lines.append(f"| {name} | {seconds:.2f} | {1000 * seconds / max(frames, 1):.1f} | {rate} |")
    lines += ["", f"whole pipeline: {frames} frames, {per_camera:.1f} s of video per camera in "
              f"{wall:.1f} s wall -> {per_camera / wall:.2f} s of video per wall second per camera "
              f"({'keeps up' if per_camera >= wall else 'does NOT keep up'} with real time); "
              f"{summary.clips_stored} clips, {summary.tracklets} tracklets, "
              f"{summary.identities} identities"]
    if base:
        base_wall = max(v[2] for v in base.values())
        base_video = max(v[1] for v in base.values())
        people = sum(v[3] for v in base.values()) / max(sum(v[0] for v in base.values()), 1)
        lines.append(f"detection + tracking alone: {base_video:.1f} s of video per camera in "
                     f"{base_wall:.1f} s -> {base_video / base_wall:.2f} s of video per wall second "
                     f"({people:.1f} people per frame)")
        lines.append(f"ratio whole / detection-only wall time: {wall / base_wall:.2f}x "
                     f"(target <= 1.25x)")
    worker_stages = {k: v for k, v in stages.items() if k in ("decode", "detect_track",
                                                               "keypoints", "crop")}
    if worker_stages:
        limiting = max(worker_stages, key=worker_stages.get)
        lines.append(f"limiting stage: {limiting}")
    lines.append(f"load average at end: {os.getloadavg()[0]:.2f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m app.bench", description=__doc__.split("\n")[0])
    parser.add_argument("--cameras", default=str(DEFAULT_CONFIG), help="cams.yaml (default: the demo)")
    parser.add_argument("--max-frames", type=int, help="stop each camera at this source frame index")
    parser.add_argument("--no-baseline", action="store_true", help="skip detection-only timing")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    print(run_bench(args.cameras, args.max_frames, baseline=not args.no_baseline))
    return 0


if __name__ == "__main__":
    sys.exit(main())
