"""Export the watcher's stored tracklets as a training set (see `training.tracklets`).

    python -m training.export_tracklets --db sqlite:///keyreid.db --out data/site \\
        [--min-clips 2] [--camera lobby door] [--run 3] [--margin 0.1]

The database is opened read-only (safe beside a running watcher). Each camera's source video is
decoded again (with the camera's stored crop, frame indices counted as the watcher counts them)
and, for every frame of every stored clip, the person crop is written as a JPEG with its
keypoints in the crop's pixels. The watcher stores clip keypoints in the coordinates of its
resized clip crop (box grown by `clips.crop_margin`, resized to `clips.size`); they are mapped
back through the run's stored config. Crops use the same margin unless `--margin` says otherwise.

Resumable: a tracklet listed in the manifest with its keypoint cache is skipped. A camera whose
source file is missing is reported (camera and path) while the others export; live sources
(RTSP, HTTP, webcams) cannot be decoded again and are skipped with a message.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path

import cv2
import numpy as np
from tqdm import tqdm

from reid.keypoints import NUM_KEYPOINTS
from storage import CameraRecord, ClipRecord, RunRecord, open_repository
from storage import TrackletRecord as StoredTracklet
from training.records import keypoint_cache_path
from training.tracklets import FRAMES_DIR, KEYPOINT_BACKEND, MANIFEST_NAME, read_manifest, tracklet_key

log = logging.getLogger(__name__)

# app.watcher.config.ClipConfig defaults, for runs stored without a clips section.
WATCHER_CROP_MARGIN = 0.1
WATCHER_CLIP_SIZE = (256, 128)
JPEG_QUALITY = 95


@dataclasses.dataclass
class ExportSummary:
    """What one export did; `errors` name the camera and the problem (missing file, ...)."""

    exported: int = 0
    skipped_done: int = 0
    skipped_few_clips: int = 0
    skipped_no_boxes: int = 0
    frames: int = 0
    skipped_cameras: list[str] = dataclasses.field(default_factory=list)
    errors: list[str] = dataclasses.field(default_factory=list)


@dataclasses.dataclass
class _Frame:
    """One clip frame to export: its box in camera pixels and the watcher's stored keypoints."""

    index: int
    box: tuple[float, float, float, float]
    keypoints: np.ndarray | None  # [17, 3] in the watcher's resized clip crop


@dataclasses.dataclass
class _Job:
    tracklet: StoredTracklet
    frames: list[_Frame]
    margin: float  # the watcher's crop margin when it stored the keypoints
    clip_size: tuple[int, int]
    done: dict[int, tuple[str, np.ndarray]] = dataclasses.field(default_factory=dict)


def _watcher_geometry(run: RunRecord | None) -> tuple[float, tuple[int, int]]:
    clips = (run.config if run is not None else {}).get("clips") or {}
    margin = float(clips.get("crop_margin", WATCHER_CROP_MARGIN))
    height, width = clips.get("size", WATCHER_CLIP_SIZE)
    return margin, (int(height), int(width))


def _clip_frames(clips: Sequence[ClipRecord]) -> list[_Frame]:
    """Distinct frames of a tracklet's clips in frame order; frames without a known box (the
    watcher stores zeros when it lost the box) are left out."""
    frames: dict[int, _Frame] = {}
    for clip in clips:
        if clip.boxes is None:
            continue
        for position, (index, box) in enumerate(zip(clip.frame_indices, clip.boxes)):
            x1, y1, x2, y2 = box
            if index in frames or x2 <= x1 or y2 <= y1:
                continue
            keypoints = None if clip.keypoints is None else np.asarray(clip.keypoints[position])
            frames[index] = _Frame(index, (x1, y1, x2, y2), keypoints)
    return [frames[i] for i in sorted(frames)]


def watcher_keypoints_to_crop(keypoints: np.ndarray | None, box: Sequence[float], margin: float,
                              clip_size: tuple[int, int], crop: tuple[int, int, int, int],
                              width: int, height: int) -> np.ndarray:
    """Keypoints stored by the watcher (its resized clip crop of `box` grown by `margin`) ->
    pixels of the exported `crop` (x0, y0, x1, y1, end-exclusive). Missing keypoints and points
    outside the crop get score 0 and x = y = 0."""
    from tracking.tracklets import crop_box

    out = np.zeros((NUM_KEYPOINTS, 3), np.float32)
    if keypoints is None:
        return out
    x0, y0, xe, ye = crop_box(np.asarray(box), margin, width, height)
    out_h, out_w = clip_size
    points = np.asarray(keypoints, np.float32)
    # Inverse of tracking.tracklets.keypoints_to_crop (cv2.resize pixel-centre convention).
    frame_x = (points[:, 0] + 0.5) * (xe - x0) / out_w - 0.5 + x0
    frame_y = (points[:, 1] + 0.5) * (ye - y0) / out_h - 0.5 + y0
    cx0, cy0, cxe, cye = crop
    x, y = frame_x - cx0, frame_y - cy0
    keep = (points[:, 2] > 0) & (x >= -0.5) & (x <= cxe - cx0 - 0.5) & (y >= -0.5) & (y <= cye - cy0 - 0.5)
    out[:, 0], out[:, 1], out[:, 2] = np.where(keep, x, 0), np.where(keep, y, 0), np.where(keep, points[:, 2], 0)
    return out


def _append_manifest(out: Path, entry: dict) -> None:
    with (out / MANIFEST_NAME).open("a") as handle:
        handle.write(json.dumps(entry) + "\n")
        handle.flush()
        os.fsync(handle.fileno())


def _rewrite_manifest(out: Path, entries: dict[int, dict]) -> None:
    """Rewrite the manifest from its readable entries, so that lines appended on resume never
    follow a line torn by an interrupted export."""
    partial = out / f"{MANIFEST_NAME}.partial"
    partial.write_text("".join(json.dumps(entry) + "\n" for entry in entries.values()))
    partial.replace(out / MANIFEST_NAME)


def _finish(job: _Job, camera: CameraRecord, out: Path, summary: ExportSummary) -> None:
    """Write the keypoint cache (atomically) and then the manifest line: the tracklet is done."""
    tracklet = job.tracklet
    if not job.done:
        summary.errors.append(f"camera {camera.id!r}: tracklet {tracklet.id}: none of its "
                              f"{len(job.frames)} frames were found in {camera.source}")
        return
    if len(job.done) < len(job.frames):
        log.warning("camera %r: tracklet %d: %d of its %d frames are not in %s (video shorter than recorded?)",
                    camera.id, tracklet.id, len(job.frames) - len(job.done), len(job.frames), camera.source)
    indices = sorted(job.done)
    key = tracklet_key(tracklet.id)
    cache = keypoint_cache_path(out, KEYPOINT_BACKEND, key)
    cache.parent.mkdir(parents=True, exist_ok=True)
    partial = cache.with_suffix(".partial.npy")
    np.save(partial, np.stack([job.done[i][1] for i in indices]))
    partial.replace(cache)
    _append_manifest(out, {
        "tracklet_id": tracklet.id, "key": key, "camera": camera.id, "track_id": tracklet.track_id,
        "run_id": tracklet.run_id, "first_frame": tracklet.first_frame, "last_frame": tracklet.last_frame,
        "first_time": tracklet.first_time, "last_time": tracklet.last_time, "source": camera.source,
        "frames": [job.done[i][0] for i in indices],
    })
    summary.exported += 1
    summary.frames += len(indices)


def _export_camera(camera: CameraRecord, jobs: list[_Job], out: Path, margin: float | None,
                   summary: ExportSummary, progress: bool) -> None:
    """One decoding pass over the camera's source; each tracklet is finished as soon as the
    decoder has passed its last frame, so an interrupted export keeps what it finished."""
    from tracking.sources import SourceError, VideoSource
    from tracking.tracklets import crop_box

    wanted: dict[int, list[tuple[_Job, _Frame]]] = {}
    for job in jobs:
        for frame in job.frames:
            wanted.setdefault(frame.index, []).append((job, frame))
    pending = sorted(jobs, key=lambda j: j.frames[-1].index)
    last_needed = pending[-1].frames[-1].index
    source = VideoSource(camera.source, crop=camera.crop, name=f"camera {camera.id}")
    bar = tqdm(total=len(jobs), desc=f"camera {camera.id}", unit="tracklet", disable=not progress, dynamic_ncols=True)
    try:
        for frame in source:
            for job, item in wanted.pop(frame.index, ()):
                height, width = frame.image.shape[:2]
                crop = crop_box(np.asarray(item.box), job.margin if margin is None else margin, width, height)
                x0, y0, xe, ye = crop
                key = tracklet_key(job.tracklet.id)
                name = f"{key}/{key}_F{frame.index:07d}.jpg"
                path = out / FRAMES_DIR / name
                path.parent.mkdir(parents=True, exist_ok=True)
                pixels = cv2.cvtColor(frame.image[y0:ye, x0:xe], cv2.COLOR_RGB2BGR)
                if not cv2.imwrite(str(path), pixels, [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY]):
                    raise OSError(f"cannot write {path}")
                job.done[frame.index] = (name, watcher_keypoints_to_crop(
                    item.keypoints, item.box, job.margin, job.clip_size, crop, width, height))
            while pending and pending[0].frames[-1].index <= frame.index:
                _finish(pending.pop(0), camera, out, summary)
                bar.update()
            if frame.index >= last_needed:
                break
    except SourceError as exc:
        summary.errors.append(f"camera {camera.id!r}: cannot decode {camera.source}: {exc}")
    else:
        for job in pending:  # the video ended before these tracklets' last frames
            _finish(job, camera, out, summary)
            bar.update()
    finally:
        bar.close()


def export_tracklets(db: str, out: str | Path, *, min_clips: int = 1, cameras: Sequence[str] | None = None,
                     run_id: int | None = None, margin: float | None = None,
                     progress: bool = True) -> ExportSummary:
    """Export the stored tracklets of `db` under `out` (see the module docstring).

    `margin`: crop margin (fraction of the box on every side); None = the watcher run's own.
    """
    if min_clips < 1:
        raise ValueError(f"min_clips must be >= 1, got {min_clips}")
    if margin is not None and not 0.0 <= margin <= 1.0:
        raise ValueError(f"margin must be in [0, 1], got {margin}")
    from tracking.sources import UnsetVariable, VideoSource, expand_variables

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    done = read_manifest(out)
    _rewrite_manifest(out, done)
    summary = ExportSummary()
    with open_repository(db, readonly=True) as repo:
        stored_cameras = {c.id: c for c in repo.list_cameras()}
        unknown = sorted(set(cameras or ()) - set(stored_cameras))
        if unknown:
            raise ValueError(f"camera(s) {unknown} not in {repo.url}; stored: {sorted(stored_cameras)}")
        runs = {r.id: r for r in repo.list_runs()}
        for camera_id in sorted(cameras or stored_cameras):
            camera = stored_cameras[camera_id]
            try:  # stored as written in cams.yaml, `${VAR}`s unexpanded: expand as the watcher did
                camera = dataclasses.replace(camera, source=expand_variables(camera.source))
            except UnsetVariable as unset:
                summary.errors.append(f"camera {camera_id!r}: its source {camera.source} names ${{{unset.args[0]}}}, "
                                      "which is not set in this environment")
                log.error(summary.errors[-1])
                continue
            if VideoSource(camera.source).kind != "file":
                summary.skipped_cameras.append(camera_id)
                log.warning("camera %r: live source %s cannot be decoded again: skipped", camera_id, camera.source)
                continue
            jobs = []
            for tracklet in repo.list_tracklets([camera_id], run_id=run_id):
                if tracklet.id in done and keypoint_cache_path(out, KEYPOINT_BACKEND, tracklet_key(tracklet.id)).is_file():
                    summary.skipped_done += 1
                    continue
                clips = repo.tracklet_clips(tracklet.id)
                if len(clips) < min_clips:
                    summary.skipped_few_clips += 1
                    continue
                frames = _clip_frames(clips)
                if not frames:
                    summary.skipped_no_boxes += 1
                    continue
                watcher_margin, clip_size = _watcher_geometry(runs.get(tracklet.run_id))
                jobs.append(_Job(tracklet, frames, watcher_margin, clip_size))
            if not jobs:
                continue
            if not Path(camera.source).is_file():
                summary.errors.append(f"camera {camera_id!r}: source file {camera.source} does not exist "
                                      f"({len(jobs)} tracklets not exported)")
                log.error(summary.errors[-1])
                continue
            _export_camera(camera, jobs, out, margin, summary, progress)
    return summary


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m training.export_tracklets", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--db", required=True, help="database URL, e.g. sqlite:///keyreid.db (opened read-only)")
    parser.add_argument("--out", required=True, help="dataset folder to write (or resume)")
    parser.add_argument("--min-clips", type=int, default=1, help="skip tracklets with fewer stored clips")
    parser.add_argument("--camera", nargs="+", default=None, metavar="ID", help="only these cameras")
    parser.add_argument("--run", type=int, default=None, help="only tracklets of this watcher run")
    parser.add_argument("--margin", type=float, default=None,
                        help="crop margin around each box (default: the watcher run's clips.crop_margin)")
    parser.add_argument("--no-progress", action="store_true")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    summary = export_tracklets(args.db, args.out, min_clips=args.min_clips, cameras=args.camera, run_id=args.run,
                               margin=args.margin, progress=not args.no_progress)
    print(f"exported {summary.exported} tracklets ({summary.frames} frames) to {args.out}; skipped: "
          f"{summary.skipped_done} already exported, {summary.skipped_few_clips} with < {args.min_clips} clips, "
          f"{summary.skipped_no_boxes} without boxes, live cameras {summary.skipped_cameras or 'none'}")
    for error in summary.errors:
        print(f"error: {error}", file=sys.stderr)
    return 1 if summary.errors else 0


if __name__ == "__main__":
    sys.exit(main())
