"""Site adaptation (`training.adapt`): cross-camera pseudo-identities that respect the free
negatives, and a real run from a watcher database (export, rounds, selection, resume, an
adapted checkpoint the encoder loads)."""
from __future__ import annotations

import json

import numpy as np
import pytest

from reid.checkpoints import read_checkpoint
from app.watcher.config import ReidConfig
from app.watcher.encoder_service import EncoderService
from reid.encoder import Encoder
from storage import NewClip, open_repository
from storage.similarity import unit
from tracking.synthetic import moving_rectangles, write_video
from training import adapt as adapt_cli
from training.adapt import (AdaptConfig, SiteTracklet, adapt, free_negatives, held_out_matches,
                            mine_identities, negative_threshold)
from training.train import TrainConfig, train


def _tracklet(i: int, camera: str, first: float, last: float, run: int = 1) -> SiteTracklet:
    return SiteTracklet(tracklet_id=i, camera=camera, run_id=run, first_time=first, last_time=last)


def test_free_negatives_are_same_camera_same_run_and_overlapping_in_time():
    tracklets = [_tracklet(0, "a", 0, 10), _tracklet(1, "a", 5, 15), _tracklet(2, "a", 16, 20),
                 _tracklet(3, "b", 0, 10), _tracklet(4, "a", 0, 10, run=2)]
    negatives = free_negatives(tracklets)
    assert {tuple(p) for p in np.argwhere(np.triu(negatives))} == {(0, 1)}
    assert (negatives == negatives.T).all() and not negatives.diagonal().any()


def test_the_threshold_passes_only_the_target_share_of_free_negatives():
    rng = np.random.default_rng(0)
    similarity = rng.uniform(-1, 1, (60, 60))
    similarity = (similarity + similarity.T) / 2
    negatives = np.zeros_like(similarity, dtype=bool)
    negatives[:30, :30] = True
    np.fill_diagonal(negatives, False)
    threshold = negative_threshold(similarity, negatives, 0.1)
    values = similarity[np.triu(negatives, 1)]
    assert (values > threshold).mean() == pytest.approx(0.1, abs=0.01)
    assert negative_threshold(similarity, np.zeros_like(negatives), 0.1) is None


def test_a_chain_of_confident_matches_never_joins_two_people_seen_together():
    """0 and 1 are in camera a at the same time. 0~2 (a-b) and 1~3 (a-c) and 2~3 (b-c) are each
    mutual nearest pairs: merging all three would put 0 and 1 in one identity; one is refused."""
    tracklets = [_tracklet(0, "a", 0, 10), _tracklet(1, "a", 0, 10), _tracklet(2, "b", 20, 30),
                 _tracklet(3, "c", 40, 50), _tracklet(4, "a", 100, 110), _tracklet(5, "a", 100, 110)]
    base = np.eye(6, 6)
    descriptors = np.stack([base[0] + 0.05 * base[4], base[1], base[0] + 0.04 * base[1] + 0.01 * base[5],
                            base[1] + 0.05 * base[0], base[4], base[5]])
    descriptors[2] = descriptors[0] + 0.3 * descriptors[3]
    mining = mine_identities(unit(descriptors), tracklets, free_negatives(tracklets), target_false_link=0.4)
    assert mining.refused_pairs >= 1
    assert mining.labels[0] < 0 or mining.labels[0] != mining.labels[1]


@pytest.mark.parametrize("seed", range(5))
def test_pseudo_labels_never_put_overlapping_same_camera_tracklets_in_one_identity(seed):
    """Random scenes: people walk through 3 cameras at random times, descriptors are the
    person's appearance plus noise large enough to make mistakes; whatever is mined, no
    identity holds two tracklets of one camera that overlap in time."""
    rng = np.random.default_rng(seed)
    people, cameras = 40, ("a", "b", "c")
    looks = rng.normal(size=(people, 16))
    tracklets, descriptors, truth = [], [], []
    for person in range(people):
        start = rng.uniform(0, 60)
        for k, camera in enumerate(cameras):
            if rng.random() < 0.8:
                first = start + 20 * k + rng.uniform(0, 5)
                tracklets.append(_tracklet(len(tracklets), camera, first, first + rng.uniform(2, 15)))
                descriptors.append(looks[person] + rng.normal(scale=0.9, size=16))
                truth.append(person)
    negatives = free_negatives(tracklets)
    mining = mine_identities(unit(np.array(descriptors)), tracklets, negatives, target_false_link=0.2)
    assert mining.identities > 3 and mining.free_negative_pairs > 0
    for label in set(mining.labels[mining.labels >= 0].tolist()):
        members = np.flatnonzero(mining.labels == label)
        assert not negatives[np.ix_(members, members)].any()
        assert len({tracklets[i].camera for i in members}) >= 2
    pairs = [(i, j) for label in set(mining.labels[mining.labels >= 0].tolist())
             for i in np.flatnonzero(mining.labels == label) for j in np.flatnonzero(mining.labels == label) if i < j]
    precision = np.mean([truth[i] == truth[j] for i, j in pairs])
    assert precision > 0.25  # ten times chance (1/40): the associations mean something


def test_held_out_matches_count_mutual_cross_camera_matches_above_the_threshold():
    tracklets = [_tracklet(0, "a", 0, 10), _tracklet(1, "a", 0, 10), _tracklet(2, "b", 20, 30),
                 _tracklet(3, "b", 20, 30)]
    descriptors = np.array([[1, 0, 0], [0, 1, 0], [1, 0.1, 0], [0, 0, 1.0]])
    figures = held_out_matches(unit(descriptors), tracklets, free_negatives(tracklets), np.array([0, 1]), 0.1)
    assert figures["held_out"] == 2 and figures["matched"] == 1 and figures["score"] == 0.5


# ---- a real run from a watcher database -------------------------------------------------------
WIDTH, HEIGHT, NUM_FRAMES = 192, 96, 24
MOVERS = (((230, 40, 40), 4, 20, 14, 40, 1, 0), ((40, 200, 40), 50, 26, 14, 36, 1, 0),
          ((40, 60, 220), 100, 12, 12, 34, 1, 0), ((220, 220, 60), 150, 30, 14, 38, -1, 0))
CLIPS = ((0, 2, 4, 6), (8, 10, 12, 14), (16, 18, 20, 22))
TINY = {"depth": 1, "img_size": [64, 32], "drop_path": 0.0}


@pytest.fixture(scope="module")
def site_db(tmp_path_factory):
    """Two cameras, the second one dimmer, see the same four people together, the second one
    20 s later: 8 tracklets, 6 free negative pairs per camera."""
    folder = tmp_path_factory.mktemp("site")
    frames = [moving_rectangles(i, WIDTH, HEIGHT, MOVERS) for i in range(NUM_FRAMES)]
    videos = {"door": write_video(folder / "door.mp4", frames),
              "hall": write_video(folder / "hall.mp4", [(f * 0.6).astype(np.uint8) for f in frames])}
    url = f"sqlite:///{folder / 'site.db'}"
    with open_repository(url) as repo:
        run = repo.start_run({"clips": {"crop_margin": 0.1, "size": [256, 128]}})
        for camera, delay in (("door", 0.0), ("hall", 20.0)):
            repo.upsert_camera(camera, source=str(videos[camera]))
            for track, (_, x, y, w, h, dx, _) in enumerate(MOVERS):
                tracklet = repo.add_tracklet(run, camera, track, 0, delay, last_frame=22, last_time=delay + 2.2,
                                             finished=True)
                repo.add_clips([NewClip(tracklet, frames_, delay + frames_[0] / 10, delay + frames_[-1] / 10,
                                        np.ones(8), "test-model",
                                        boxes=[(x + dx * i, y, x + dx * i + w, y + h) for i in frames_])
                                for frames_ in CLIPS])
    return url


@pytest.fixture(scope="module")
def source_checkpoint(tmp_path_factory):
    """A tiny model trained for one epoch on synthetic people (the realistic starting point)."""
    folder = tmp_path_factory.mktemp("source")
    result = train(TrainConfig(dataset="synthetic", root=str(folder / "data"), model="keyreid_vit_tiny",
                               model_options=TINY, epochs=1, warmup=0, optimizer="adamw", lr=3e-4,
                               dataset_options={"num_ids": 8, "min_frames": 6, "max_frames": 10,
                                                "num_distractors": 1, "num_junk": 1}, batch_p=2, batch_k=2, workers=0, progress=False,
                               out=str(folder / "run"), validate=False))
    return str(result.run_dir / "final.pt")


def test_adapt_from_a_checkpoint_writes_an_adapted_model_that_the_encoder_loads(site_db, source_checkpoint,
                                                                               tmp_path):
    out = tmp_path / "adapt"
    config = AdaptConfig(db=site_db, out=str(out), source=source_checkpoint, budget_minutes=0.05, rounds=1,
                         held_out=0.25, target_false_link=0.2, batch_p=2, batch_k=2, progress=False)
    results = adapt(config)
    assert results["adapted_on"]["tracklets"] == 8
    assert results["adapted_on"]["tracklets_per_camera"] == {"door": 4, "hall": 4}
    assert results["adapted_on"]["free_negative_pairs"] == 12
    assert "cross-camera" in results["selection_signal"]
    (round_1,) = results["per_round"]
    assert round_1["mining"]["identities"] >= 2 and round_1["training"]["steps"] > 0
    assert results["selected"] in ("start", "round 1")
    payload = read_checkpoint(out / "adapted.pt")
    assert payload["adaptation"]["adapted_on"]["cameras"] == ["door", "hall"]
    assert payload["adaptation"]["before"]["score"] == results["before"]["score"]
    # The associations' distances travel with it: the linker's cross-camera genuine labels.
    assert len(payload["cross_camera_genuine"]) == results["cross_camera_genuine"]["pairs"] >= 1
    saved = json.loads((out / "results.json").read_text())
    assert saved["selected"] == results["selected"]
    # The encoder standardises each clip by its camera's statistics (pooled for unknown ones).
    encoder = Encoder(checkpoint=out / "adapted.pt", device="cpu")
    assert encoder.camera_normalisation is not None
    assert set(encoder.camera_normalisation.cameras) == {"door", "hall"}
    assert encoder.cross_camera_genuine is not None and (0 <= encoder.cross_camera_genuine).all()
    clip = np.random.default_rng(0).integers(0, 255, (1, 4, 64, 32, 3), dtype=np.uint8)
    door, hall = encoder.encode(clip, None, cameras=["door"]), encoder.encode(clip, None, cameras=["hall"])
    pooled = encoder.encode(clip, None)
    assert door.shape == (1, encoder.dim) and not np.allclose(door, hall)
    # ... then projects it by the PCA fitted on this site's clips (reid.projection)
    assert encoder.projection.kind == "pca" and encoder.projection.fitted_on == 24
    assert payload["adaptation"]["projection"]["tag"] == encoder.projection.tag
    assert np.allclose(encoder.encode(clip, None, cameras=["new camera"]), pooled)
    raw = Encoder(checkpoint=source_checkpoint, device="cpu")
    assert raw.camera_normalisation is None

    # The watcher's encoder service hands each clip's camera to it.
    service = EncoderService(ReidConfig(checkpoint=str(out / "adapted.pt"), device="cpu", runtime="torch"))
    keypoints = np.zeros((4, 17, 3), np.float32)
    service.submit(clip[0], keypoints, "a", camera="door")
    service.submit(clip[0], keypoints, "b", camera="hall")
    encoded = dict(service.encode_batch())
    assert np.allclose(encoded["a"], door[0], atol=1e-5) and np.allclose(encoded["b"], hall[0], atol=1e-5)

    # A rerun with more rounds resumes after round 1; other settings are refused.
    more = adapt(AdaptConfig(**{**config.__dict__, "rounds": 2}))
    assert [r["round"] for r in more["per_round"]][:1] == [1]
    assert more["per_round"][0] == round_1
    with pytest.raises(ValueError, match="other settings.*seed"):
        adapt(AdaptConfig(**{**config.__dict__, "seed": 5}))

    # --rounds 0: the starting weights with this site's camera statistics, no training.
    statistics_only = adapt(AdaptConfig(**{**config.__dict__, "out": str(tmp_path / "stats"), "rounds": 0}))
    assert statistics_only["selected"] == "start" and statistics_only["per_round"] == []
    assert Encoder(checkpoint=tmp_path / "stats" / "adapted.pt", device="cpu").camera_normalisation is not None


def test_the_command_line_from_scratch_and_its_errors(site_db, tmp_path, capsys):
    out = tmp_path / "scratch"
    code = adapt_cli.main(["--db", site_db, "--out", str(out), "--budget", "0.03", "--rounds", "1",
                           "--held-out", "0.25", "--target-false-link", "0.2", "--batch-p", "2", "--batch-k", "2",
                           "--no-progress", "--model", "keyreid_vit_tiny", "--model-opt", "depth=1",
                           "img_size=[64,32]"])
    printed = capsys.readouterr()
    assert code == 0, printed.err
    assert "adapted checkpoint:" in printed.out and "held-out cross-camera matches" in printed.out
    assert (out / "adapted.pt").is_file()
    assert adapt_cli.main(["--db", site_db, "--out", str(tmp_path / "x"), "--budget", "0"]) == 2
    assert "budget must be > 0" in capsys.readouterr().err
