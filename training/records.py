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
    query_camera: int | None = None  # the camera queries come from (iLIDS-VID: cam1), None: any

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
        selection (the test set is never looked at); the remaining ids are relabelled 0..N-1.

        The protocol mirrors the benchmarks' test protocols. With a `query_camera` (iLIDS-VID:
        cam1) each held-out identity gives one query from that camera and the rest go to the
        gallery. Otherwise (MARS: one query per identity and camera) each held-out identity
        gives one query tracklet per camera, cameras in random order, as long as every query
        keeps a gallery match in another camera; its other tracklets are the gallery. Only
        identities seen by at least two cameras (one of them the query camera) are held out,
        so every query has a valid match (same id, another camera): checked. `seed` is the
        split seed (`--split-seed`), separate from the training seed."""
        if not 0.0 < fraction < 1.0:
            raise ValueError(f"validation fraction must be in (0, 1), got {fraction}")
        pids = sorted({r.pid for r in self.train})
        cameras_of: dict[int, set[int]] = defaultdict(set)
        for record in self.train:
            cameras_of[record.pid].add(record.camid)
        eligible = [pid for pid in pids if len(cameras_of[pid]) > 1
                    and (self.query_camera is None or self.query_camera in cameras_of[pid])]
        num_val = max(1, int(round(len(pids) * fraction)))
        if num_val >= len(pids) or num_val > len(eligible):
            raise ValueError(f"{self.name}: cannot hold out {num_val} of {len(pids)} training ids for validation "
                             f"({len(eligible)} are seen by two cameras{'' if self.query_camera is None else ' including the query camera'})")
        rng = np.random.default_rng(seed)
        held_out = sorted(rng.choice(eligible, size=num_val, replace=False).tolist())
        query, gallery = [], []
        for pid in held_out:
            remaining = [i for i, r in enumerate(self.train) if r.pid == pid]
            cameras = [self.query_camera] if self.query_camera is not None else rng.permutation(sorted(cameras_of[pid]))
            chosen: list[int] = []
            for camera in cameras:
                candidate = int(rng.choice([i for i in remaining if self.train[i].camid == camera]))
                left = [i for i in remaining if i != candidate]
                left_cameras = {self.train[i].camid for i in left}
                if all(left_cameras - {self.train[q].camid} for q in chosen + [candidate]):
                    chosen.append(candidate)
                    remaining = left
            query.extend(self.train[i] for i in chosen)
            gallery.extend(self.train[i] for i in remaining)
        unmatched = unmatched_queries(query, gallery)
        if unmatched:
            raise RuntimeError(f"{self.name}: validation queries without a match: {unmatched[:5]}")
        kept = set(held_out)
        train = relabel([r for r in self.train if r.pid not in kept])
        return Dataset(name=f"{self.name}-val", train=train, query=query, gallery=gallery,
                       num_cameras=self.num_cameras, query_camera=self.query_camera)


def unmatched_queries(query: list[TrackletRecord], gallery: list[TrackletRecord]) -> list[int]:
    """Indices of queries with no gallery tracklet of the same identity from another camera
    (the metric skips them: a protocol should have none)."""
    seen: dict[int, set[int]] = defaultdict(set)
    for record in gallery:
        seen[record.pid].add(record.camid)
    return [i for i, r in enumerate(query) if not seen[r.pid] - {r.camid}]
