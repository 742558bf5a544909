"""Estimate 17 COCO keypoints on every frame of a dataset once and cache them per tracklet.

    python -m training.keypoints --dataset mars --root data/MARS --backend pifpaf
    python -m training.keypoints --dataset ilidsvid --root data/iLIDS-VID --backend yolo-pose

Frames of re-id datasets are already person crops, so no detector/tracker is needed:
- `yolo-pose`: YOLO-pose (weights from `tracking.detector.find_pose_weights`) runs on each crop
  and the most confident person's keypoints are kept; a crop where it finds nobody gets zeros
  (score 0 = missing, which the model handles as "no keypoints").
- `pifpaf`: OpenPifPaf through `tracking.keypoints.select_keypoint_backend("pifpaf")`, with the
  whole crop as the person box (the paper's keypoint source).

The cache is `records.keypoint_cache_path(root, backend, key)`: float32 `[frames, 17, 3]`
(x, y, score) in frame pixels, written atomically per tracklet, so an interrupted run resumes
by skipping the tracklets already cached. The tracking package is imported here only, lazily.
"""
from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from reid.keypoints import NUM_KEYPOINTS
from training.datasets import build_dataset
from training.evaluate import parse_key_values
from training.records import TrackletRecord, keypoint_cache_path
from training.transforms import load_frame

log = logging.getLogger(__name__)

ESTIMATOR_BACKENDS: tuple[str, ...] = ("pifpaf", "yolo-pose")
FrameEstimator = Callable[[list[np.ndarray]], np.ndarray]  # RGB crops -> [N, 17, 3]


def yolo_pose_estimator(weights: str | None = None, imgsz: int = 320, conf: float = 0.25,
                        device: str | None = None) -> FrameEstimator:
    """YOLO-pose on a batch of person crops: the most confident person per crop, or zeros."""
    from tracking.detector import find_pose_weights
    from ultralytics import YOLO

    model = YOLO(str(find_pose_weights(weights)), task="pose")

    def estimate(crops: list[np.ndarray]) -> np.ndarray:
        out = np.zeros((len(crops), NUM_KEYPOINTS, 3), np.float32)
        bgr = [np.ascontiguousarray(crop[..., ::-1]) for crop in crops]  # ultralytics reads numpy as BGR
        results = model.predict(bgr, imgsz=imgsz, conf=conf, classes=[0], device=device, verbose=False)
        for index, result in enumerate(results):
            if result.boxes is None or len(result.boxes) == 0 or result.keypoints is None:
                continue
            best = int(result.boxes.conf.argmax())
            out[index] = result.keypoints.data[best].cpu().numpy().astype(np.float32)
        return out

    return estimate


def pifpaf_estimator(checkpoint: str = "shufflenetv2k16", device: str = "cpu", download: bool = True) -> FrameEstimator:
    """OpenPifPaf on each crop, the whole crop being the person box."""
    from tracking.keypoints import select_keypoint_backend
    from tracking.types import Detection

    backend, reason = select_keypoint_backend("pifpaf", checkpoint=checkpoint, device=device, download=download)
    log.info("keypoint backend: %s", reason)

    def estimate(crops: list[np.ndarray]) -> np.ndarray:
        rows = []
        for crop in crops:
            height, width = crop.shape[:2]
            box = np.array([0, 0, width - 1, height - 1], np.float32)
            rows.append(backend.estimate(crop, [Detection(box=box, score=1.0, track_id=0)])[0])
        return np.stack(rows).astype(np.float32)

    return estimate


def unique_records(records: Sequence[TrackletRecord]) -> list[TrackletRecord]:
    """Records with distinct cache keys (MARS queries also appear in the 'all' gallery)."""
    seen: dict[str, TrackletRecord] = {}
    for record in records:
        if not record.key:
            raise ValueError(f"tracklet starting at {record.frames[0]} has no cache key")
        seen.setdefault(record.key, record)
    return list(seen.values())


def cache_is_complete(path: Path, num_frames: int) -> bool:
    if not path.is_file():
        return False
    try:
        return np.load(path, mmap_mode="r").shape == (num_frames, NUM_KEYPOINTS, 3)
    except (ValueError, OSError):
        return False


def extract_keypoints(records: Sequence[TrackletRecord], root: str | Path, backend: str,
                      estimator: FrameEstimator, batch_size: int = 32, progress: bool = True) -> dict[str, int]:
    """Cache keypoints for every record not cached yet; returns counts of tracklets written and
    skipped and of frames in which nobody was found."""
    counts = {"written": 0, "skipped": 0, "frames": 0, "frames_without_person": 0}
    for record in tqdm(unique_records(records), desc=f"keypoints ({backend})", disable=not progress,
                       dynamic_ncols=True):
        path = keypoint_cache_path(root, backend, record.key)
        if cache_is_complete(path, len(record.frames)):
            counts["skipped"] += 1
            continue
        parts = []
        for start in range(0, len(record.frames), batch_size):
            parts.append(estimator([load_frame(f) for f in record.frames[start:start + batch_size]]))
        keypoints = np.concatenate(parts).astype(np.float32)
        path.parent.mkdir(parents=True, exist_ok=True)
        temporary = path.with_name(path.stem + ".partial.npy")
        np.save(temporary, keypoints)
        temporary.replace(path)  # a tracklet's cache appears complete or not at all
        counts["written"] += 1
        counts["frames"] += len(keypoints)
        counts["frames_without_person"] += int((keypoints[..., 2].max(axis=1) <= 0).sum())
    return counts


def dataset_records(dataset: str, root: str | Path, options: dict[str, Any] | None = None) -> list[TrackletRecord]:
    """Every tracklet of the dataset (train, query, gallery; for iLIDS-VID split 0 covers all people)."""
    data = build_dataset(dataset, root, keypoints=None, **(options or {}))
    return data.train + data.query + data.gallery


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m training.keypoints", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", required=True, choices=["mars", "ilidsvid", "synthetic"])
    parser.add_argument("--root", required=True)
    parser.add_argument("--backend", required=True, choices=ESTIMATOR_BACKENDS)
    parser.add_argument("--dataset-opt", nargs="*", default=[], metavar="KEY=VALUE",
                        help="dataset options (e.g. the synthetic generator's num_ids=16)")
    parser.add_argument("--weights", default=None, help="yolo-pose weights (default: tracking.detector.find_pose_weights)")
    parser.add_argument("--imgsz", type=int, default=320, help="yolo-pose inference size for the crops")
    parser.add_argument("--pifpaf-checkpoint", default="shufflenetv2k16")
    parser.add_argument("--device", default=None, help="cpu, cuda, ... (default: the backend's choice)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if args.backend == "yolo-pose":
        estimator = yolo_pose_estimator(args.weights, args.imgsz, device=args.device)
    else:
        estimator = pifpaf_estimator(args.pifpaf_checkpoint, device=args.device or "cpu")
    records = dataset_records(args.dataset, args.root, parse_key_values(args.dataset_opt))
    counts = extract_keypoints(records, args.root, args.backend, estimator, args.batch_size,
                               progress=not args.no_progress)
    print(f"{counts['written']} tracklets written, {counts['skipped']} already cached; "
          f"{counts['frames_without_person']} of {counts['frames']} new frames without a person "
          f"-> {Path(args.root) / 'keypoints' / args.backend}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
