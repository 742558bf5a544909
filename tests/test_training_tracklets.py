"""The watcher's tracklets as a training set: export from a watcher-like database (crops are the
box contents, keypoints land where they were, resume, missing and live sources), the
`tracklets` dataset and its validation split, and a 1-epoch training run without a test set."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from reid.checkpoints import load_model

from storage import NewClip, open_repository
from tracking.synthetic import moving_rectangles, write_video
from tracking.tracklets import crop_box, keypoints_to_crop
from training import export_tracklets as export_cli
from training.datasets import build_dataset
from training.export_tracklets import export_tracklets
from training.tracklets import MANIFEST_NAME, UNKNOWN_CAMERA, read_manifest
from training.evaluate import extract_descriptors
from training.train import TrainConfig, train
from training.transforms import load_frame

WIDTH, HEIGHT, NUM_FRAMES = 160, 96, 20
# (colour, x, y, w, h, dx, dy): three people who never overlap during the video.
MOVERS = (((230, 40, 40), 10, 20, 16, 40, 2, 0),
          ((40, 200, 40), 120, 30, 14, 36, -1, 0),
          ((40, 60, 220), 60, 10, 12, 30, 1, 1))
CROP = (8, 4, 144, 88)  # the "left" camera is a virtual camera: this part of the frame
CLIPS = ((0, 2, 4, 6), (8, 10, 12, 14))
WATCHER_MARGIN, WATCHER_SIZE = 0.1, (256, 128)
TINY = {"depth": 1, "img_size": [64, 32], "drop_path": 0.0}


def _box(mover, index: int, offset=(0, 0)) -> tuple[float, float, float, float]:
    _, x, y, w, h, dx, dy = mover
    x0, y0 = x + dx * index - offset[0], y + dy * index - offset[1]
    return (float(x0), float(y0), float(x0 + w), float(y0 + h))


def _true_keypoints(box) -> np.ndarray:
    """Frame-pixel keypoints: nose at the box centre, left shoulder 3 px inside its top-left
    corner, everything else missing."""
    points = np.zeros((17, 3), np.float32)
    x1, y1, x2, y2 = box
    points[0] = ((x1 + x2) / 2, (y1 + y2) / 2, 0.9)
    points[5] = (x1 + 3, y1 + 3, 0.8)
    return points


def _add_tracklet(repo, run_id: int, camera: str, track_id: int, mover, offset=(0, 0)) -> int:
    tracklet = repo.add_tracklet(run_id, camera, track_id, CLIPS[0][0], CLIPS[0][0] / 10,
                                 last_frame=CLIPS[-1][-1], last_time=CLIPS[-1][-1] / 10, finished=True)
    width, height = (CROP[2], CROP[3]) if offset != (0, 0) else (WIDTH, HEIGHT)
    clips = []
    for frames in CLIPS:
        boxes = [_box(mover, i, offset) for i in frames]
        # What the watcher stores: keypoints in its resized clip crop (tracking.tracklets).
        keypoints = np.stack([keypoints_to_crop(_true_keypoints(b), crop_box(np.array(b), WATCHER_MARGIN, width, height),
                                                WATCHER_SIZE) for b in boxes])
        clips.append(NewClip(tracklet, frames, frames[0] / 10, frames[-1] / 10, np.ones(8), "test-model",
                             boxes=boxes, keypoints=keypoints))
    repo.add_clips(clips)
    return tracklet


@pytest.fixture(scope="module")
def watcher_db(tmp_path_factory):
    """A database as the watcher writes it: cameras "full" and "left" (crop) on one video, plus a
    camera whose file is missing and a live camera."""
    folder = tmp_path_factory.mktemp("watcher")
    video = write_video(folder / "street.mp4", [moving_rectangles(i, WIDTH, HEIGHT, MOVERS) for i in range(NUM_FRAMES)])
    url = f"sqlite:///{folder / 'watch.db'}"
    with open_repository(url) as repo:
        run = repo.start_run({"clips": {"crop_margin": WATCHER_MARGIN, "size": list(WATCHER_SIZE)}})
        repo.upsert_camera("full", source=str(video))
        repo.upsert_camera("left", source=str(video), crop=CROP)
        repo.upsert_camera("gone", source=str(folder / "deleted.mp4"))
        repo.upsert_camera("live", source="rtsp://192.0.2.1/stream")
        ids = {("full", n): _add_tracklet(repo, run, "full", n, m) for n, m in enumerate(MOVERS)}
        ids |= {("left", n): _add_tracklet(repo, run, "left", n, m, CROP[:2]) for n, m in enumerate(MOVERS)}
        for camera in ("gone", "live"):
            _add_tracklet(repo, run, camera, 0, MOVERS[0])
        repo.finish_run(run)
    return url, ids, folder / "deleted.mp4"


@pytest.fixture(scope="module")
def exported(watcher_db, tmp_path_factory):
    url, ids, _ = watcher_db
    out = tmp_path_factory.mktemp("export") / "site"
    return out, export_tracklets(url, out, progress=False), ids


def test_export_writes_every_clip_frame_of_every_decodable_tracklet(exported, watcher_db):
    out, summary, ids = exported
    assert summary.exported == 6 and summary.frames == 6 * 8
    assert summary.skipped_cameras == ["live"]
    # The missing file is an error naming its camera and path; the other cameras still exported.
    assert len(summary.errors) == 1
    assert "'gone'" in summary.errors[0] and str(watcher_db[2]) in summary.errors[0]
    manifest = read_manifest(out)
    assert sorted(manifest) == sorted(ids.values())
    entry = manifest[ids[("left", 1)]]
    assert entry["camera"] == "left" and entry["first_time"] == 0.0 and entry["last_time"] == pytest.approx(1.4)
    assert [int(name[-11:-4]) for name in entry["frames"]] == [i for clip in CLIPS for i in clip]


@pytest.mark.parametrize("camera, offset", [("full", (0, 0)), ("left", CROP[:2])])
def test_crops_hold_the_box_contents_and_keypoints_land_where_they_were(exported, camera, offset):
    out, _, ids = exported
    width, height = (CROP[2], CROP[3]) if camera == "left" else (WIDTH, HEIGHT)
    dataset = build_dataset("tracklets", out)
    for number, mover in enumerate(MOVERS):
        entry = read_manifest(out)[ids[(camera, number)]]
        record = next(r for r in dataset.train if r.key == entry["key"])
        keypoints = np.load(record.keypoints)
        assert keypoints.shape == (8, 17, 3)
        for position, index in enumerate(i for clip in CLIPS for i in clip):
            box = _box(mover, index, offset)
            image = load_frame(record.frames[position])
            x0, y0, xe, ye = crop_box(np.array(box), WATCHER_MARGIN, width, height)
            assert image.shape[:2] == (ye - y0, xe - x0)  # the watcher's margin by default
            # The person (rectangle) fills the box: its inside has the person's colour.
            bx, by = int(box[0]) - x0, int(box[1]) - y0
            inside = image[by + 3:by + mover[4] - 3, bx + 3:bx + mover[3] - 3].reshape(-1, 3).mean(0)
            assert np.abs(inside - mover[0]).max() < 30, (camera, number, index, inside)
            truth = _true_keypoints(box)
            expected = truth[:, :2] - (x0, y0)
            np.testing.assert_allclose(keypoints[position, [0, 5], :2], expected[[0, 5]], atol=0.02)
            np.testing.assert_allclose(keypoints[position, :, 2], truth[:, 2], atol=1e-6)
            assert not keypoints[position, 1:5].any()  # missing keypoints stay zero


def test_margin_zero_crops_exactly_the_box(watcher_db, tmp_path):
    url, ids, _ = watcher_db
    summary = export_tracklets(url, tmp_path, cameras=["full"], margin=0.0, progress=False)
    assert summary.exported == 3 and not summary.errors
    entry = read_manifest(tmp_path)[ids[("full", 0)]]
    image = load_frame(str(tmp_path / "bbox_train" / entry["frames"][0]))
    assert image.shape[:2] == (40, 16)
    assert np.abs(image[3:-3, 3:-3].reshape(-1, 3).mean(0) - MOVERS[0][0]).max() < 30
    keypoints = np.load(tmp_path / "keypoints" / "watcher" / f"{entry['key']}.npy")
    np.testing.assert_allclose(keypoints[0, 0, :2], (8.0, 20.0), atol=0.02)  # the box centre


def test_export_resumes_after_an_interruption(watcher_db, tmp_path):
    url, ids, _ = watcher_db
    first = export_tracklets(url, tmp_path, cameras=["full", "left"], progress=False)
    assert first.exported == 6
    again = export_tracklets(url, tmp_path, cameras=["full", "left"], progress=False)
    assert again.exported == 0 and again.skipped_done == 6
    # Killed while writing the manifest: two complete lines and a torn one remain.
    manifest = tmp_path / MANIFEST_NAME
    lines = manifest.read_text().splitlines()
    manifest.write_text("\n".join(lines[:2]) + "\n" + lines[2][:10])
    resumed = export_tracklets(url, tmp_path, cameras=["full", "left"], progress=False)
    assert resumed.exported == 4 and resumed.skipped_done == 2
    assert sorted(read_manifest(tmp_path)) == sorted(v for (camera, _), v in ids.items())


def test_filters_and_the_command_line(watcher_db, tmp_path, capsys):
    url, _, missing = watcher_db
    assert export_tracklets(url, tmp_path / "a", min_clips=3, progress=False).skipped_few_clips == 7  # live: not read
    assert export_tracklets(url, tmp_path / "b", run_id=99, progress=False).exported == 0
    with pytest.raises(ValueError, match="nowhere"):
        export_tracklets(url, tmp_path / "c", cameras=["nowhere"], progress=False)
    code = export_cli.main(["--db", url, "--out", str(tmp_path / "d"), "--camera", "full", "gone", "live",
                            "--no-progress"])
    captured = capsys.readouterr()
    assert code == 1 and "exported 3 tracklets (24 frames)" in captured.out
    assert "camera 'gone'" in captured.err and str(missing) in captured.err


def test_tracklets_dataset_is_pseudo_labelled_with_a_temporal_validation_split(exported):
    out, _, _ = exported
    dataset = build_dataset("tracklets", out)
    assert dataset.num_cameras == 2 and dataset.query == [] and dataset.gallery == []
    assert sorted(r.pid for r in dataset.train) == list(range(6))  # one pseudo-identity per tracklet
    assert sorted(r.camid for r in dataset.train) == [0, 0, 0, 1, 1, 1]  # "full", "left"
    assert all(len(r.frames) == 8 and r.keypoints for r in dataset.train)
    val = dataset.validation_split(0.34, seed=1)
    assert len(val.query) == len(val.gallery) == 2 and val.num_train_pids == 4
    assert {r.camid for r in val.query} == {UNKNOWN_CAMERA}
    for query, gallery in zip(val.query, val.gallery):
        assert query.pid == gallery.pid and query.frames[-1] < gallery.frames[0]  # first half, second half
        assert np.load(query.keypoints).shape == (4, 17, 3) and np.load(gallery.keypoints).shape == (4, 17, 3)
    with pytest.raises(ValueError, match="too few"):
        dataset.validation_split(0.95)  # all 6 tracklets


def test_one_epoch_of_training_without_a_test_set(exported, tmp_path):
    out, _, _ = exported
    config = TrainConfig(dataset="tracklets", root=str(out), model="keyreid_vit_tiny", model_options=TINY,
                         epochs=1, warmup=0, eval_every=1, batch_p=2, batch_k=2, val_fraction=0.34,
                         workers=0, device="cpu", out=str(tmp_path / "run"), progress=False)
    result = train(config)
    assert result.completed and result.test is None and result.best_epoch == 1
    # The reported validation mAP is that of best.pt's descriptors, recomputed here by hand.
    model, _ = load_model(tmp_path / "run" / "best.pt")
    val = build_dataset("tracklets", out).validation_split(config.val_fraction, seed=config.split_seed)
    query = extract_descriptors(model, val.query, torch.device("cpu"), progress=False)
    gallery = extract_descriptors(model, val.gallery, torch.device("cpu"), progress=False)
    average_precisions = []
    for q, record in enumerate(val.query):
        order = np.argsort(np.linalg.norm(gallery - query[q], axis=1), kind="stable")
        match = np.array([val.gallery[g].pid == record.pid for g in order])
        ranks = np.flatnonzero(match) + 1  # one-based positions of the true matches
        average_precisions.append(np.mean(np.arange(1, len(ranks) + 1) / ranks))
    assert result.best_val["val_mAP"] == pytest.approx(100.0 * np.mean(average_precisions), abs=1e-6)
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results["test"] is None and results["keypoints"] == "watcher"
    assert (tmp_path / "run" / "best.pt").is_file()


def test_sources_stored_with_variables_are_expanded_as_the_watcher_expands_them(tmp_path, monkeypatch):
    """The watcher stores sources as written (`${KEYREID_CACHE}/...`, the demo's): the export
    expands them the same way; a variable that is not set is an error naming the camera."""
    write_video(tmp_path / "street.mp4", [moving_rectangles(i, WIDTH, HEIGHT, MOVERS) for i in range(NUM_FRAMES)])
    url = f"sqlite:///{tmp_path / 'watch.db'}"
    with open_repository(url) as repo:
        run = repo.start_run({"clips": {"crop_margin": WATCHER_MARGIN, "size": list(WATCHER_SIZE)}})
        repo.upsert_camera("cached", source="${KEYREID_CACHE}/street.mp4")
        repo.upsert_camera("elsewhere", source="${KEYREID_TEST_UNSET_FOLDER}/street.mp4")
        for camera in ("cached", "elsewhere"):
            _add_tracklet(repo, run, camera, 0, MOVERS[0])
        repo.finish_run(run)
    monkeypatch.setenv("KEYREID_CACHE", str(tmp_path))
    monkeypatch.delenv("KEYREID_TEST_UNSET_FOLDER", raising=False)
    summary = export_tracklets(url, tmp_path / "out", progress=False)
    assert summary.exported == 1
    assert summary.errors == ["camera 'elsewhere': its source ${KEYREID_TEST_UNSET_FOLDER}/street.mp4 names "
                              "${KEYREID_TEST_UNSET_FOLDER}, which is not set in this environment"]
