"""`python -m app.bench`: how fast the watcher runs on the demo, per stage, next to detection alone.

Two measurements in one run, on the same cameras, frames and settings (the config's imgsz,
tracker, stride / max_fps, torch threads, one process per camera in both cases):

1. ultralytics' detection + tracking alone: each camera's sampled frames are decoded first
   (untimed), then only `PoseTracker.update` is timed;
2. the whole watcher (`app.watcher.watch.Watcher`): decode, detect+track, keypoints, crop, encode,
   store and link, into a temporary database.

It prints seconds of video processed per wall second (>= 1.0 keeps up with real time, per
camera), the cost of each stage, and the ratio whole / detection-only. Model loading, runtime
exports and process exit are not counted (both clocks start at the first frame; the watcher's
stops when its last result is stored and linked, before its workers' processes are joined,
which takes about 0.8 s of interpreter teardown at the end of a run).

`--runtime torch openvino` measures each detector runtime in turn in the same run and prints
them side by side (people per frame included, to show a faster runtime finds as many people);
`--precision auto int8` does the same for the detector's precision, `--imgsz 640 960` for the
detector's input size and `--max-fps 5 10` for the cameras' sampling rate (several options: every
combination), and `--rounds 2` repeats the columns interleaved (A B A B) on a box whose load
changes.
"""
from __future__ import annotations

import argparse
import logging
import multiprocessing
import os
import resource
import sys
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path

from tracking.runtimes import resolve_runtime

from .watcher.config import (
    DETECTOR_PRECISIONS,
    PRECISIONS,
    RUNTIMES,
    CameraConfig,
    DetectorConfig,
    WatchConfig,
    load_config,
)
from .watcher.watch import Watcher

DEFAULT_CONFIG = Path(__file__).resolve().parent.parent / "examples" / "cams.yaml"


def _detect_only(camera: CameraConfig, detector: DetectorConfig, max_frames: int | None,
                 out: multiprocessing.Queue, start_barrier) -> None:
    """One camera: decode its sampled frames, then time YOLO-pose + tracker on them."""
    from tracking.sources import VideoSource

    from .watcher.worker import build_tracker

    source = VideoSource(camera.source, crop=camera.crop, stride=camera.stride,
                         max_fps=camera.max_fps, live=camera.live, name=camera.id)
    frames = []
    for frame in source:
        if max_frames is not None and frame.index >= max_frames:
            break
        frames.append(frame)
    tracker = build_tracker(camera, detector)
    tracker.warm_up(*frames[0].image.shape[:2])  # outside the clock, as the watcher's workers do
    start_barrier.wait()
    start, cpu_start = time.monotonic(), time.process_time()
    people = 0
    for frame in frames:
        people += len(tracker.update(frame.image))
    elapsed, cpu = time.monotonic() - start, time.process_time() - cpu_start
    video = frames[-1].time - frames[0].time + (frames[1].time - frames[0].time
                                                  if len(frames) > 1 else 0.0)
    label = tracker.runtime + ("-int8" if tracker.precision == "int8" else "")
    out.put((camera.id, len(frames), video, elapsed, people, label, cpu))


def detection_baseline(cameras: tuple[CameraConfig, ...], detector: DetectorConfig,
                       max_frames: int | None) -> dict[str, tuple[int, float, float, int, str, float]]:
    """camera id -> (frames, video seconds, detect+track seconds, people found, runtime, CPU
    seconds of the timed loop: every thread of the process), run in parallel."""
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


@dataclass
class _Measured:
    """One bench run at one detector runtime: per-stage ms per frame and the headline figures."""

    runtime: str
    frames: int
    stages_ms: dict[str, float]
    video_per_wall: float
    frames_per_camera_per_s: float
    clips: int
    tracklets: int
    base_video_per_wall: float | None
    ratio: float | None
    people_per_frame: float | None
    base_cpu_ms: float | None
    load: tuple[float, float]
    cpu_per_frame: float  # CPU seconds (all processes, start-up included) per processed frame
    cpu_bound_video_per_wall: float  # what the cores could do if this run had them to itself


def _cpu_seconds() -> float:
    """User + system CPU time of this process and of its finished (joined) children."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def _measure(config: WatchConfig, max_frames: int | None, baseline: bool) -> _Measured:
    cameras = config.enabled_cameras
    load_start = os.getloadavg()[0]
    base = detection_baseline(cameras, config.detector, max_frames) if baseline else {}
    cpu_start = _cpu_seconds()
    with tempfile.TemporaryDirectory() as tmp, open(os.devnull, "w") as quiet:
        watch_config = replace(config, database=f"sqlite:///{Path(tmp) / 'bench.db'}")
        summary = Watcher(watch_config, max_frames=max_frames, status_stream=quiet).run()
    deadline = time.monotonic() + 30
    while multiprocessing.active_children() and time.monotonic() < deadline:
        time.sleep(0.05)  # reaps finished workers, so their CPU time is counted in this run
    cpu = _cpu_seconds() - cpu_start
    end = summary.drained_at or summary.finished_at  # the workers' interpreter exit is not work
    wall = end - (summary.first_frame_at or end)
    frames = sum(s.frames for s in summary.cameras.values())
    per_camera = max((s.video_seconds for s in summary.cameras.values()), default=0.0)
    stages: dict[str, float] = {}
    for s in summary.cameras.values():
        for name, seconds in s.stages.items():
            stages[name] = stages.get(name, 0.0) + seconds
    stages.update(encode=summary.encode_seconds, store=summary.store_seconds,
                  link=summary.link_seconds)
    runtime = ", ".join(sorted({v[4] for v in base.values()})) if base else \
        resolve_runtime(config.detector.runtime, config.detector.device)[0] + (
            "-int8?" if config.detector.precision == "int8" else "")
    measured = _Measured(
        runtime=runtime, frames=frames, stages_ms={k: 1000 * v / max(frames, 1) for k, v in stages.items()},
        video_per_wall=per_camera / wall if wall > 0 else 0.0,
        frames_per_camera_per_s=frames / max(len(summary.cameras), 1) / wall if wall > 0 else 0.0,
        clips=summary.clips_stored, tracklets=summary.tracklets, base_video_per_wall=None,
        ratio=None, people_per_frame=None, base_cpu_ms=None, load=(load_start, os.getloadavg()[0]),
        cpu_per_frame=cpu / max(frames, 1),
        cpu_bound_video_per_wall=(os.cpu_count() or 1) * per_camera / cpu if cpu > 0 else 0.0)
    if base:
        base_wall = max(v[2] for v in base.values())
        measured.base_video_per_wall = max(v[1] for v in base.values()) / base_wall
        measured.ratio = wall / base_wall
        base_frames = max(sum(v[0] for v in base.values()), 1)
        measured.people_per_frame = sum(v[3] for v in base.values()) / base_frames
        measured.base_cpu_ms = 1000 * sum(v[5] for v in base.values()) / base_frames
    return measured


def _with_max_fps(config: WatchConfig, max_fps: float | None) -> WatchConfig:
    if max_fps is None:
        return config
    return replace(config, cameras=tuple(replace(c, max_fps=max_fps) for c in config.cameras))


def run_bench(config_path: str | os.PathLike = DEFAULT_CONFIG, max_frames: int | None = None,
              baseline: bool = True, runtimes: list[str] | None = None,
              imgsz: list[int] | None = None, max_fps: list[float] | None = None,
              threads: int | None = None, reid_runtime: str | None = None,
              precisions: list[str] | None = None, rounds: int = 1,
              reid_precisions: list[str] | None = None) -> str:
    """The bench as a markdown report: one column per detector runtime x precision x input size x
    max_fps x encoder precision, measured one after the other in this run (so they share the machine's load), the
    whole sequence `rounds` times (A B A B ...: interleaved, for a box whose load changes);
    the other overrides apply to every column."""
    config = load_config(config_path)
    detector = replace(config.detector, threads=threads) if threads is not None else config.detector
    reid = replace(config.reid, runtime=reid_runtime) if reid_runtime else config.reid
    if reid_runtime in ("torch", "onnxruntime") and reid.precision in ("bf16", "int8"):
        reid = replace(reid, precision="auto")  # the config's is OpenVINO's; the runtime's own
    config = _with_max_fps(replace(config, detector=detector, reid=reid),
                           max_fps[0] if max_fps and len(max_fps) == 1 else None)
    enabled = config.enabled_cameras
    lines = [f"# app.bench: {config_path}, {len(enabled)} camera(s), imgsz "
             f"{imgsz or detector.imgsz}, {detector.tracker}, max_fps "
             f"{max_fps or [c.max_fps for c in enabled]}, threads {detector.threads} per camera, "
             f"precision {precisions or detector.precision}, encoder "
             f"{config.reid.model} (runtime {config.reid.runtime}), max frames {max_frames}, "
             f"cpu count {os.cpu_count()}"]
    columns = [(r, p, size, fps, rp) for r in (runtimes or [detector.runtime])
               for p in (precisions or [detector.precision])
               for size in (imgsz or [detector.imgsz])
               for fps in (max_fps if max_fps and len(max_fps) > 1 else [None])
               for rp in (reid_precisions or [reid.precision])]
    results = []
    for round_ in range(rounds):
        for r, p, size, fps, rp in columns:
            column = replace(config, detector=replace(detector, runtime=r, precision=p, imgsz=size),
                             reid=replace(reid, precision=rp))
            measured = _measure(_with_max_fps(column, fps), max_frames, baseline)
            if reid_precisions:
                measured.runtime += f" enc-{rp}"
            if imgsz and len(imgsz) > 1:
                measured.runtime += f" @{size}"
            if fps is not None:
                measured.runtime += f" {fps:g} fps"
            if rounds > 1:
                measured.runtime += f" #{round_ + 1}"
            results.append(measured)
    stage_names = list(dict.fromkeys(k for m in results for k in m.stages_ms))
    lines += ["", "| ms per processed frame (all stages, summed over cameras) | "
              + " | ".join(m.runtime for m in results) + " |",
              "|---|" + "---:|" * len(results)]
    lines += [f"| {name} | " + " | ".join(f"{m.stages_ms.get(name, 0.0):.1f}" for m in results) + " |"
              for name in stage_names]

    def row(label: str, values: list[float | None], spec: str = ".2f") -> str:
        return f"| {label} | " + " | ".join("-" if v is None else format(v, spec) for v in values) + " |"

    lines += [
        row("**whole pipeline: s of video per wall s per camera**", [m.video_per_wall for m in results]),
        row("processed frames (all cameras)", [m.frames for m in results], "d"),
        row("processed frames per s per camera", [m.frames_per_camera_per_s for m in results], ".1f"),
        row("detection + tracking alone: s of video per wall s", [m.base_video_per_wall for m in results]),
        row("whole / detection-only wall time (target <= 1.25)", [m.ratio for m in results]),
        row("people per frame (detection-only run)", [m.people_per_frame for m in results]),
        row("detection + tracking alone: CPU ms per frame (all threads)",
            [m.base_cpu_ms for m in results], ".1f"),
        row("CPU s per processed frame, all processes (start-up included)",
            [m.cpu_per_frame for m in results], ".3f"),
        row(f"if the {os.cpu_count()} cores were ours: s of video per wall s per camera "
            f"(cores x video s per camera / CPU s)", [m.cpu_bound_video_per_wall for m in results]),
        row("clips stored", [m.clips for m in results], "d"),
        row("tracklets", [m.tracklets for m in results], "d"),
        "| load average (1 min) at start / end | "
        + " | ".join(f"{a:.2f} / {b:.2f}" for a, b in (m.load for m in results)) + " |",
    ]
    worker = [k for k in stage_names if k in ("decode", "detect_track", "keypoints", "crop")]
    if worker:
        lines.append("")
        lines += [f"limiting stage with {m.runtime}: {max(worker, key=lambda k: m.stages_ms.get(k, 0.0))}"
                  for m in results]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m app.bench", description=__doc__.split("\n")[0])
    parser.add_argument("--cameras", default=str(DEFAULT_CONFIG), help="cams.yaml (default: the demo)")
    parser.add_argument("--max-frames", type=int, help="stop each camera at this source frame index")
    parser.add_argument("--no-baseline", action="store_true", help="skip detection-only timing")
    parser.add_argument("--runtime", nargs="+", choices=RUNTIMES, dest="runtimes",
                        help="detector runtime(s) to compare side by side (default: the config's)")
    parser.add_argument("--precision", nargs="+", choices=DETECTOR_PRECISIONS, dest="precisions",
                        help="detector precision(s) to compare side by side (default: the config's)")
    parser.add_argument("--rounds", type=int, default=1,
                        help="repeat the columns this many times, interleaved (A B A B)")
    parser.add_argument("--imgsz", type=int, nargs="+",
                        help="detector input size(s) to compare side by side (default: the config's)")
    parser.add_argument("--max-fps", type=float, nargs="+",
                        help="every camera's max_fps; several: compared side by side")
    parser.add_argument("--threads", type=int, help="override detector.threads (per camera)")
    parser.add_argument("--reid-runtime", choices=RUNTIMES, help="override reid.runtime")
    parser.add_argument("--reid-precision", nargs="+", choices=PRECISIONS, dest="reid_precisions",
                        help="encoder precision(s) to compare side by side (default: the config's)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    print(run_bench(args.cameras, args.max_frames, baseline=not args.no_baseline,
                    runtimes=args.runtimes, imgsz=args.imgsz, max_fps=args.max_fps,
                    threads=args.threads, reid_runtime=args.reid_runtime,
                    precisions=args.precisions, rounds=args.rounds,
                    reid_precisions=args.reid_precisions))
    return 0


if __name__ == "__main__":
    sys.exit(main())
