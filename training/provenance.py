"""What a result was computed from: code version, dataset identity, keypoint coverage.

Written into results.json and checkpoints so a number can be traced back (and two runs on
different copies of a dataset, or with different keypoint caches, are not compared blindly).
"""
from __future__ import annotations

import hashlib
import subprocess
from pathlib import Path
from typing import Any

from training.records import Dataset, TrackletRecord

MAX_MISSING_KEYPOINTS = 0.02  # a keypoint-guided model refuses data with more tracklets lacking a cache


def git_commit(path: str | Path | None = None) -> dict[str, Any]:
    """`{"commit": sha or None, "dirty": bool or None}` of the checkout holding this package."""
    where = Path(path) if path is not None else Path(__file__).resolve().parent
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=where, capture_output=True, text=True,
                                check=True, timeout=10).stdout.strip()
        status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=where,
                                capture_output=True, text=True, check=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "dirty": None}
    return {"commit": commit, "dirty": bool(status.strip())}


def _records_digest(records: list[TrackletRecord], digest: Any) -> None:
    for record in records:
        digest.update(f"{record.key or record.frames[0]}|{record.pid}|{record.camid}|{len(record.frames)}\n".encode())


def dataset_fingerprint(dataset: Dataset) -> str:
    """sha256 (16 hex) of the train / query / gallery lists (tracklet key, id, camera, frame count).

    It identifies the protocol's content (split, gallery mode, junk and distractor handling),
    not pixel bytes: hashing ~1.19M MARS frames would cost minutes at every start."""
    digest = hashlib.sha256(dataset.name.encode())
    for subset in (dataset.train, dataset.query, dataset.gallery):
        digest.update(b"--\n")
        _records_digest(subset, digest)
    return digest.hexdigest()[:16]


def keypoint_coverage(dataset: Dataset) -> dict[str, float]:
    """Fraction of tracklets with a keypoint cache, per subset and over all of them."""
    coverage: dict[str, float] = {}
    everything: list[TrackletRecord] = []
    for name in ("train", "query", "gallery"):
        records = getattr(dataset, name)
        everything.extend(records)
        if records:
            coverage[name] = sum(r.keypoints is not None for r in records) / len(records)
    coverage["all"] = sum(r.keypoints is not None for r in everything) / max(1, len(everything))
    return coverage


def check_keypoint_coverage(dataset: Dataset, backend: str | None, allow_missing: bool) -> dict[str, float]:
    """Refuse (ValueError) a dataset where more than MAX_MISSING_KEYPOINTS of the tracklets have
    no keypoint cache, unless `allow_missing`: a "KeyRe-ID" number must not come from a model
    that never saw a keypoint. Returns the coverage."""
    coverage = keypoint_coverage(dataset)
    missing = 1.0 - coverage["all"]
    if missing > MAX_MISSING_KEYPOINTS and not allow_missing:
        raise ValueError(
            f"{dataset.name}: {100 * missing:.1f}% of tracklets have no keypoints (backend {backend!r}; "
            f"coverage {', '.join(f'{k} {100 * v:.1f}%' for k, v in coverage.items())}), more than the "
            f"{100 * MAX_MISSING_KEYPOINTS:.0f}% a keypoint-guided model accepts. Extract them with "
            f"`python -m training.keypoints`, or pass --allow-missing-keypoints to train with a flat part prior "
            f"where they are missing.")
    return coverage
