"""Estimate 17 COCO keypoints on every frame of a dataset once and cache them per tracklet.

    python -m training.keypoints --dataset mars --root data/MARS --backend pifpaf
    python -m training.keypoints --dataset ilidsvid --root data/iLIDS-VID --backend yolo-pose

Frames of re-id datasets are already person crops, so no detector/tracker is needed:
- `yolo-pose`: YOLO-pose (weights from `tracking.detector.find_pose_weights`) runs on each crop
  and the most confident person's keypoints are kept; a crop where it finds nobody gets zeros
  (score 0 = missing, which the model handles as "no keypoints").
- `pifpaf`: OpenPifPaf through `tracking.keypoints.select_keypoint_backend("pifpaf")`, with the
  whole crop as the person box (the paper's keypoint source).

Frames are decoded by `--workers` loader processes and reach the estimator in batches of
`--batch-size` crops that span tracklets (YOLO-pose runs each batch as one call, on the GPU with
`--device cuda`); the run reports frames/s. OpenPifPaf goes through the tracking package's
one-crop adapter, so it is the slower path: days for MARS's ~1.19M frames on a CPU.

The cache is `records.keypoint_cache_path(root, backend, key)`: float32 `[frames, 17, 3]`
(x, y, score) in frame pixels, written atomically per tracklet, so an interrupted run resumes
by skipping the tracklets already cached. The tracking package is imported here only, lazily.
"""
from __future__ import annotations

import argparse
import logging
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch.utils.data
from tqdm import tqdm

from reid.keypoints import NUM_KEYPOINTS
from training.datasets import build_dataset
from training.evaluate import parse_key_values
from training.records import TrackletRecord, keypoint_cache_path
from training.transforms import limit_worker_threads, load_frame, worker_context

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


class _TrackletFrames(torch.utils.data.Dataset):
    """Item i: (i, the decoded RGB frames of tracklet i): loader workers decode, the model batches."""

    def __init__(self, records: Sequence[TrackletRecord]) -> None:
        self.records = list(records)

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> tuple[int, list[np.ndarray]]:
        return index, [load_frame(f) for f in self.records[index].frames]


def _unchanged(item: tuple[int, list[np.ndarray]]) -> tuple[int, list[np.ndarray]]:
    """Keep numpy frames as they are (the default collation would turn them into tensors)."""
    return item


def extract_keypoints(records: Sequence[TrackletRecord], root: str | Path, backend: str,
                      estimator: FrameEstimator, batch_size: int = 32, progress: bool = True,
                      workers: int = 0) -> dict[str, float]:
    """Cache keypoints for every record not cached yet; returns counts of tracklets written and
    skipped, of frames in which nobody was found, and the estimation rate (frames/s).

    `workers` loader processes decode the frames; the estimator sees batches of `batch_size`
    crops that span tracklets (short MARS tracklets would otherwise make small batches)."""
    counts: dict[str, float] = {"written": 0, "skipped": 0, "frames": 0, "frames_without_person": 0}
    todo = []
    for record in unique_records(records):
        if cache_is_complete(keypoint_cache_path(root, backend, record.key), len(record.frames)):
            counts["skipped"] += 1
        else:
            todo.append(record)
    loader = torch.utils.data.DataLoader(_TrackletFrames(todo), batch_size=None, shuffle=False, num_workers=workers,
                                         collate_fn=_unchanged, worker_init_fn=limit_worker_threads if workers else None,
                                         multiprocessing_context=worker_context(workers))
    pending: list[tuple[int, list[np.ndarray]]] = []
    started = time.perf_counter()

    def flush() -> None:
        crops = [crop for _, frames in pending for crop in frames]
        keypoints = np.concatenate([estimator(crops[i:i + batch_size]) for i in range(0, len(crops), batch_size)])
        start = 0
        for index, frames in pending:
            _write_cache(keypoint_cache_path(root, backend, todo[index].key), keypoints[start:start + len(frames)], counts)
            start += len(frames)
        pending.clear()

    for item in tqdm(loader, total=len(todo), desc=f"keypoints ({backend})", disable=not progress, dynamic_ncols=True):
        pending.append(item)
        if sum(len(frames) for _, frames in pending) >= batch_size:
            flush()
    if pending:
        flush()
    elapsed = time.perf_counter() - started
    counts["frames_per_s"] = counts["frames"] / elapsed if counts["frames"] and elapsed > 0 else 0.0
    return counts


def _write_cache(path: Path, keypoints: np.ndarray, counts: dict[str, float]) -> None:
    keypoints = keypoints.astype(np.float32)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(path.stem + ".partial.npy")
    np.save(temporary, keypoints)
    temporary.replace(path)  # a tracklet's cache appears complete or not at all
    counts["written"] += 1
    counts["frames"] += len(keypoints)
    counts["frames_without_person"] += int((keypoints[..., 2].max(axis=1) <= 0).sum())


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
    parser.add_argument("--batch-size", type=int, default=32, help="crops per estimator call (across tracklets)")
    parser.add_argument("--workers", type=int, default=2, help="frame-decoding loader workers")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if args.backend == "yolo-pose":
        estimator = yolo_pose_estimator(args.weights, args.imgsz, device=args.device)
    else:
        estimator = pifpaf_estimator(args.pifpaf_checkpoint, device=args.device or "cpu")
    records = dataset_records(args.dataset, args.root, parse_key_values(args.dataset_opt))
    counts = extract_keypoints(records, args.root, args.backend, estimator, args.batch_size,
                               progress=not args.no_progress, workers=args.workers)
    print(f"{counts['written']} tracklets written, {counts['skipped']} already cached; "
          f"{counts['frames_without_person']} of {counts['frames']} new frames without a person "
          f"({counts['frames_per_s']:.1f} frames/s) -> {Path(args.root) / 'keypoints' / args.backend}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
