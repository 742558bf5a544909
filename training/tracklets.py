"""The watcher's own tracklets as a training set (unsupervised site adaptation).

`python -m training.export_tracklets` writes, under one folder, the person crops of every stored
clip frame (`bbox_train/<key>/<key>_F<frame>.jpg`), one keypoint cache per tracklet
(`keypoints/watcher/<key>.npy`, in each crop's pixels) and `manifest.jsonl`, one JSON object per
exported tracklet (camera, tracklet id, time span, frame files). This module reads that folder.

Labels are pseudo-labels: every stored tracklet is its own identity (pid = tracklet id) within
its camera (camid = index of the camera id in sorted order). Tracklets that overlap in time in one
camera are different people, which one-identity-per-tracklet respects by construction (no two
tracklets ever share a pid). The converse does not hold: the same person leaving and coming back
is two tracklets, so two pseudo-identities: this label noise is the price of needing no labels.

There is no labelled test set: `query` and `gallery` are empty. Model selection uses
`TrackletDataset.validation_split`: held-out tracklets are cut in time, the first half becomes a
query with camera unknown (camid -1, as for an uploaded query photo) and the second half goes to
the gallery among the second halves of the other held-out tracklets. Its mAP says whether the
model finds the same person later in the same tracklet among other people: a proxy for model
selection, not a cross-camera re-id score.

To adapt a model to a site use `training.adapt` instead: one identity per tracklet trains one
person's tracklets in two cameras apart, and the temporal-halves proxy cannot see it (measured:
cross-camera mAP fell); adapt labels tracklets across cameras and selects on cross-camera matches.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np

from training.records import Dataset, TrackletRecord, attach_keypoints, relabel

MANIFEST_NAME = "manifest.jsonl"
FRAMES_DIR = "bbox_train"
KEYPOINT_BACKEND = "watcher"
UNKNOWN_CAMERA = -1  # the model's "camera unknown" id (mean camera embedding)


def tracklet_key(tracklet_id: int) -> str:
    """Folder and keypoint-cache name of one exported tracklet (database ids are unique)."""
    return f"T{int(tracklet_id):07d}"


def read_manifest(root: str | Path) -> dict[int, dict]:
    """Exported tracklets by tracklet id. A torn last line (export killed mid-write) is ignored:
    that tracklet is simply exported again on resume."""
    path = Path(root) / MANIFEST_NAME
    entries: dict[int, dict] = {}
    if not path.is_file():
        return entries
    for line in path.read_text().splitlines():
        try:
            entry = json.loads(line)
        except json.JSONDecodeError:
            continue
        entries[int(entry["tracklet_id"])] = entry
    return entries


class TrackletDataset(Dataset):
    """Pseudo-labelled tracklets: validation by temporal halves (see the module docstring)."""

    def validation_split(self, fraction: float = 0.1, seed: int = 0) -> Dataset:
        if not 0.0 < fraction < 1.0:
            raise ValueError(f"validation fraction must be in (0, 1), got {fraction}")
        usable = sorted({r.pid for r in self.train if len(r.frames) >= 2})
        num_val = max(2, int(round(len({r.pid for r in self.train}) * fraction)))
        if num_val > len(usable) or num_val >= self.num_train_pids:
            raise ValueError(f"{self.name}: {self.num_train_pids} tracklets ({len(usable)} with 2+ frames) are "
                             f"too few to hold out {num_val} for validation; export more tracklets")
        rng = np.random.default_rng(seed)
        held_out = set(rng.choice(usable, size=num_val, replace=False).tolist())
        query, gallery = [], []
        for record in self.train:
            if record.pid in held_out:
                first, second = temporal_halves(record)
                query.append(dataclasses.replace(first, camid=UNKNOWN_CAMERA))
                gallery.append(second)
        train = relabel([r for r in self.train if r.pid not in held_out])
        return Dataset(name=f"{self.name}-val", train=train, query=query, gallery=gallery,
                       num_cameras=self.num_cameras)


def temporal_halves(record: TrackletRecord) -> tuple[TrackletRecord, TrackletRecord]:
    """The first and second temporal halves of a tracklet, each with its slice of the keypoints."""
    middle = len(record.frames) // 2
    parts = []
    for start, stop, suffix in ((0, middle, "a"), (middle, len(record.frames), "b")):
        keypoints = None
        if record.keypoints is not None:
            keypoints = _keypoint_slice(record.keypoints, start, stop, suffix)
        parts.append(dataclasses.replace(record, frames=record.frames[start:stop], keypoints=keypoints,
                                         key=f"{record.key}-{suffix}"))
    return parts[0], parts[1]


def _keypoint_slice(path: str, start: int, stop: int, suffix: str) -> str:
    """A cache file holding rows start..stop of `path` (written once beside it, for the halves)."""
    source = Path(path)
    target = source.parent / "halves" / f"{source.stem}-{suffix}.npy"
    if not target.is_file() or target.stat().st_mtime < source.stat().st_mtime:
        target.parent.mkdir(parents=True, exist_ok=True)
        np.save(target, np.load(source)[start:stop])
    return str(target)


def load_tracklets(root: str | Path, keypoints: str | None = KEYPOINT_BACKEND) -> TrackletDataset:
    """The tracklets exported under `root` (`python -m training.export_tracklets`) as a training
    set: pid = tracklet, camid = camera index; query and gallery are empty."""
    root = Path(root)
    entries = read_manifest(root)
    if not entries:
        raise FileNotFoundError(f"no exported tracklets in {root / MANIFEST_NAME}: run "
                                f"`python -m training.export_tracklets --db URL --out {root}` first")
    cameras = sorted({entry["camera"] for entry in entries.values()})
    records = []
    for tracklet_id, entry in sorted(entries.items()):
        frames = tuple(str(root / FRAMES_DIR / name) for name in entry["frames"])
        if not Path(frames[0]).is_file():
            raise FileNotFoundError(f"tracklet {tracklet_id} (camera {entry['camera']!r}): missing frame {frames[0]}")
        records.append(TrackletRecord(frames=frames, pid=tracklet_id, camid=cameras.index(entry["camera"]),
                                      key=entry["key"]))
    return TrackletDataset(name="tracklets", train=attach_keypoints(relabel(records), root, keypoints),
                           query=[], gallery=[], num_cameras=len(cameras))
