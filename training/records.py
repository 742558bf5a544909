"""Shared dataset types: one tracklet record and the train/query/gallery container.

Every loader (MARS, iLIDS-VID, synthetic, own tracklets) produces the same records so the
sampler, the augmentation and the evaluation never care where data came from. Keypoints live
in a per-tracklet cache beside the dataset; `keypoint_cache_path` is the one place that says
where, so the extractor CLI, the synthetic generator and the loaders agree.
"""
from __future__ import annotations

import dataclasses
from collections import defaultdict
from pathlib import Path

import numpy as np

KEYPOINT_BACKENDS: tuple[str, ...] = ("groundtruth", "yolo-pose", "pifpaf", "watcher")  # watcher: training.tracklets


@dataclasses.dataclass(frozen=True)
class TrackletRecord:
    """One tracklet: frame paths in temporal order, identity, 0-based camera, and the path of
    its cached keypoints (float32 `[len(frames), 17, 3]`, x/y in frame pixels, score 0 =
    missing) or None when no cache exists."""

    frames: tuple[str, ...]
    pid: int
    camid: int
    keypoints: str | None = None
    key: str = ""  # stable name of the tracklet inside its dataset (used for the keypoint cache)


def keypoint_cache_path(root: str | Path, backend: str, tracklet_key: str) -> Path:
    """Where the keypoints of one tracklet are cached: `<root>/keypoints/<backend>/<key>.npy`."""
    if backend not in KEYPOINT_BACKENDS:
        raise ValueError(f"unknown keypoint backend {backend!r}; expected one of {KEYPOINT_BACKENDS}")
    if not tracklet_key or tracklet_key.startswith("/") or ".." in Path(tracklet_key).parts:
        raise ValueError(f"tracklet key {tracklet_key!r} must be a relative path inside the dataset")
    return Path(root) / "keypoints" / backend / f"{tracklet_key}.npy"


def attach_keypoints(records: list[TrackletRecord], root: str | Path, backend: str | None) -> list[TrackletRecord]:
    """Fill `keypoints` with the cache path of each record whose cache file exists."""
    if backend is None:
        return list(records)
    out = []
    for record in records:
        path = keypoint_cache_path(root, backend, record.key)
        out.append(dataclasses.replace(record, keypoints=str(path) if path.is_file() else None))
    return out


def relabel(records: list[TrackletRecord]) -> list[TrackletRecord]:
    """Map the pids of training records onto 0..N-1 (sorted by original pid) for the classifier."""
    mapping = {pid: label for label, pid in enumerate(sorted({r.pid for r in records}))}
    return [dataclasses.replace(r, pid=mapping[r.pid]) for r in records]


@dataclasses.dataclass
class Dataset:
    """Train / query / gallery tracklets of one benchmark (train pids are 0..N-1)."""

    name: str
    train: list[TrackletRecord]
    query: list[TrackletRecord]
    gallery: list[TrackletRecord]
    num_cameras: int

    @property
    def num_train_pids(self) -> int:
        return len({r.pid for r in self.train})

    def summary(self) -> str:
        """One line per subset: ids, tracklets, frames (for logs and the README)."""
        lines = [f"{self.name}: {self.num_cameras} cameras"]
        for subset in ("train", "query", "gallery"):
            records = getattr(self, subset)
            frames = sum(len(r.frames) for r in records)
            with_kp = sum(r.keypoints is not None for r in records)
            lines.append(f"  {subset:8s} ids {len({r.pid for r in records}):5d}  tracklets {len(records):6d}  "
                         f"frames {frames:8d}  with keypoints {with_kp:6d}")
        return "\n".join(lines)

    def validation_split(self, fraction: float = 0.1, seed: int = 0) -> "Dataset":
        """Hold out `fraction` of the TRAINING identities as a validation query/gallery for model
        selection (the test set is never looked at). For each held-out identity one tracklet per
        camera becomes a query and the rest go to the gallery, so every query whose identity was
        seen by another camera has a valid match. The remaining training ids are relabelled."""
        if not 0.0 < fraction < 1.0:
            raise ValueError(f"validation fraction must be in (0, 1), got {fraction}")
        pids = sorted({r.pid for r in self.train})
        num_val = max(1, int(round(len(pids) * fraction)))
        if num_val >= len(pids):
            raise ValueError(f"{self.name}: {len(pids)} training ids are too few to hold out {num_val}")
        rng = np.random.default_rng(seed)
        held_out = set(rng.choice(pids, size=num_val, replace=False).tolist())
        by_pid_cam: dict[tuple[int, int], list[int]] = defaultdict(list)
        for index, record in enumerate(self.train):
            if record.pid in held_out:
                by_pid_cam[(record.pid, record.camid)].append(index)
        cameras_of: dict[int, int] = defaultdict(int)
        for pid, _ in by_pid_cam:
            cameras_of[pid] += 1
        # An identity seen by one camera only can never be matched: keep it as a gallery distractor.
        query_indices = {int(rng.choice(indices)) for (pid, _), indices in sorted(by_pid_cam.items())
                         if cameras_of[pid] > 1}
        query, gallery = [], []
        for _, indices in sorted(by_pid_cam.items()):
            for index in indices:
                (query if index in query_indices else gallery).append(self.train[index])
        train = relabel([r for r in self.train if r.pid not in held_out])
        return Dataset(name=f"{self.name}-val", train=train, query=query, gallery=gallery,
                       num_cameras=self.num_cameras)
