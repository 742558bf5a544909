"""End to end on fake trees in the official MARS and iLIDS-VID layouts: the validation protocol
(every query has a match), retraining on all ids, community vs official protocol, keypoint
coverage, provenance, packed frames, the distributed sampler and a world-size-1 DDP run."""
from __future__ import annotations

import json
import socket

import numpy as np
import pytest
import torch

from reid.checkpoints import read_checkpoint
from training import bench_data, evaluate
from training.datasets import build_dataset, ilidsvid_splits
from training.packed import FileFrames, PackedFrames, frame_reader, pack_frames
from training.records import unmatched_queries
from training.sampling import RandomIdentitySampler
from training.train import TrainConfig, Trainer, train
from training.transforms import ClipDataset

TINY = {"depth": 1, "img_size": [64, 32], "drop_path": 0.0}
MARS_OPTIONS = {"num_ids": 16, "min_frames": 6, "max_frames": 10, "num_distractors": 2, "num_junk": 1}
ILIDS_OPTIONS = {"layout": "ilidsvid", "num_ids": 16, "min_frames": 6, "max_frames": 10}


@pytest.fixture(scope="module")
def mars_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("mars") / "MARS"
    build_dataset("synthetic", root, **MARS_OPTIONS)  # the official MARS layout, groundtruth keypoints
    return root


@pytest.fixture(scope="module")
def ilids_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("ilids") / "iLIDS-VID"
    build_dataset("synthetic", root, **ILIDS_OPTIONS)
    return root


def _config(dataset, root, out, **changes) -> TrainConfig:
    values = dict(dataset=dataset, root=str(root), keypoints="groundtruth", model="keyreid_vit_tiny",
                  model_options=TINY, epochs=2, warmup=1, eval_every=1, workers=0, device="cpu", out=str(out),
                  progress=False, val_fraction=0.25, optimizer="adamw", lr=3e-4)
    values.update(changes)
    return TrainConfig(**values)


def test_every_validation_query_has_a_match_on_both_layouts(mars_root, ilids_root):
    mars = build_dataset("mars", mars_root, keypoints="groundtruth")
    for split_seed in range(5):
        val = mars.validation_split(0.25, seed=split_seed)
        # 2 held-out ids x 3 cameras x 2 tracklets: one query per id and camera, every one matched
        assert len(val.query) == 6 and len(val.gallery) == 6 and unmatched_queries(val.query, val.gallery) == []
        assert len({(r.pid, r.camid) for r in val.query}) == 6 and len({r.pid for r in val.query}) == 2
    held = [frozenset(r.frames for r in mars.validation_split(0.25, seed=s).query) for s in range(5)]
    assert len(set(held)) > 1  # the split seed chooses the held-out ids
    for split in range(10):  # all ten official splits read; one query camera, one tracklet per camera
        ilids = build_dataset("ilidsvid", ilids_root, split=split, keypoints="groundtruth")
        val = ilids.validation_split(0.25, seed=0)
        assert {r.camid for r in val.query} == {0} and {r.camid for r in val.gallery} == {1}
        assert len(val.query) == len(val.gallery) == 2 and unmatched_queries(val.query, val.gallery) == []
    assert len(ilidsvid_splits(ilids_root)) == 10


def test_ilidsvid_split_trains_validates_retrains_on_all_ids_and_tests(ilids_root, tmp_path):
    out = tmp_path / "ilids-split3"
    result = train(_config("ilidsvid", ilids_root, out, split=3))
    assert result.completed and result.best_epoch in (1, 2) and result.test is not None
    results = json.loads((out / "results.json").read_text())
    assert results["dataset"] == "ilidsvid-split3" and results["test_queries"] == results["test_gallery"] == 8
    assert results["test_model"].startswith("final/final.pt (all 8 training ids")
    assert results["validation"] == {"split_seed": 0, "held_out_ids": 2, "queries": 2, "gallery": 2, "train_ids": 6}
    assert results["protocol"] == "community" and results["ap"].startswith("step")
    assert results["keypoints"] == "groundtruth" and results["keypoint_coverage"]["all"] == 1.0
    assert results["precision"] == "fp32" and len(results["git"]["commit"]) == 40
    assert len(results["dataset_fingerprint"]) == 16
    final = read_checkpoint(out / "final" / "final.pt")
    assert final["config"]["num_classes"] == 8 and final["training"]["epoch"] == result.best_epoch
    assert read_checkpoint(out / "best.pt")["config"]["num_classes"] == 6
    assert results["test"] == json.loads((out / "final" / "results.json").read_text())["test"]
    # The evaluate CLI on the retrained model reproduces the reported test figures.
    scores = evaluate.evaluate_checkpoints(str(out / "final" / "final.pt"), "ilidsvid", ilids_root, split=3,
                                           device="cpu", progress=False)
    assert scores["splits"][0]["mAP"] == pytest.approx(results["test"]["mAP"])


def test_mars_community_and_official_protocols(mars_root, tmp_path):
    community = train(_config("mars", mars_root, tmp_path / "community", epochs=1, warmup=0, final="best"))
    official = train(_config("mars", mars_root, tmp_path / "official", epochs=1, warmup=0, final="best",
                             protocol="official"))
    first = json.loads((tmp_path / "community" / "results.json").read_text())
    second = json.loads((tmp_path / "official" / "results.json").read_text())
    data = build_dataset("mars", mars_root)
    assert first["test_gallery"] == len(data.gallery)
    assert second["test_gallery"] == len(data.gallery) + len(data.query)  # every test tracklet
    assert first["ap"].startswith("step") and second["ap"].startswith("trapezoid")
    assert second["protocol"] == "official" and community.test and official.test
    # Same weights (same seed and data), so the protocols' numbers differ only by gallery and AP.
    report = evaluate.evaluate_checkpoints(str(tmp_path / "community" / "best.pt"), "mars", mars_root, device="cpu",
                                           progress=False, protocol="official")
    assert report["protocol"] == "official" and report["splits"][0]["num_gallery"] == second["test_gallery"]
    assert report["splits"][0]["mAP"] == pytest.approx(second["test"]["mAP"])
    with pytest.raises(ValueError, match="drop gallery="):
        evaluate.protocol_options("mars", "official", {"gallery": "community"})
    # bf16 descriptors are checked against fp32 on a sample of queries, and the report says so.
    bf16 = evaluate.evaluate_checkpoints(str(tmp_path / "community" / "best.pt"), "mars", mars_root, device="cpu",
                                         progress=False, amp="bf16")
    assert bf16["precision"] == "bfloat16" and 0.0 < bf16["splits"][0]["precision_check"] < 0.1
    assert "bfloat16 descriptors" in evaluate.format_report(bf16)


def test_keypoint_guided_training_refuses_data_without_keypoints(mars_root, tmp_path):
    no_cache = _config("mars", mars_root, tmp_path / "a", keypoints="pifpaf")  # no pifpaf cache exists
    with pytest.raises(ValueError, match=r"100.0% of tracklets have no keypoints"):
        Trainer(no_cache)
    allowed = Trainer(_config("mars", mars_root, tmp_path / "b", keypoints="pifpaf", allow_missing_keypoints=True))
    assert allowed.coverage["all"] == 0.0
    global_only = Trainer(_config("mars", mars_root, tmp_path / "c", keypoints="pifpaf",
                                  model_options={**TINY, "local": "none"}))
    assert global_only.coverage["all"] == 0.0  # a model without keypoint guidance does not need them


def test_packed_frames_are_the_original_pixels(mars_root, tmp_path):
    data = build_dataset("mars", mars_root, keypoints="groundtruth")
    records = data.train + data.query + data.gallery
    frames = [f for r in records for f in r.frames]
    summary = pack_frames(mars_root, frames, shard_mb=1, progress=False)  # several 1 MB shards
    try:
        assert summary["frames"] == len(set(frames)) and summary["shards"] > 1
        packed, files = frame_reader(mars_root), FileFrames()
        assert isinstance(packed, PackedFrames)  # auto: the pack exists
        for path in frames[::7]:
            assert np.array_equal(packed(path), files(path))
        with pytest.raises(KeyError, match="not in the pack"):
            packed(str(mars_root / "bbox_train" / "nobody.jpg"))
        clips_files = ClipDataset(data.query, mode="test", T=4, size=(64, 32))
        clips_packed = ClipDataset(data.query, mode="test", T=4, size=(64, 32), frames=packed)
        assert torch.equal(clips_files[3]["frames"], clips_packed[3]["frames"])
    finally:
        import shutil

        shutil.rmtree(mars_root / "packed")


def test_bench_data_prints_clips_per_second_and_the_mars_epoch(mars_root, capsys):
    assert bench_data.main(["--dataset", "mars", "--root", str(mars_root), "--workers", "0", "--seconds", "0.5",
                            "--size", "64", "32"]) == 0
    printed = capsys.readouterr().out
    assert "clips/s" in printed and "min" in printed.splitlines()[-1]


def test_distributed_sampler_gives_each_rank_whole_distinct_identities(mars_root):
    records = build_dataset("mars", mars_root).train
    ranks = [list(RandomIdentitySampler(records, P=2, K=2, seed=1, num_replicas=2, rank=r)) for r in (0, 1)]
    assert 0 < len(ranks[0]) == len(ranks[1]) <= len(RandomIdentitySampler(records, P=2, K=2, num_replicas=2))
    for mine, theirs in zip(*ranks):
        pids_mine = [records[i].pid for i in mine]
        pids_theirs = [records[i].pid for i in theirs]
        assert len(mine) == 4 and sorted(set(pids_mine)) == sorted(pids_mine)[::2]  # 2 ids x 2 tracklets
        assert not set(pids_mine) & set(pids_theirs)
    with pytest.raises(ValueError, match="ranks"):
        RandomIdentitySampler(records, P=8, K=2, num_replicas=2)


def test_world_size_one_ddp_run_on_the_cpu(mars_root, tmp_path, monkeypatch):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    for key, value in {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
                       "MASTER_PORT": str(port)}.items():
        monkeypatch.setenv(key, value)
    result = train(_config("mars", mars_root, tmp_path / "ddp", epochs=1, warmup=0, final="best"))
    assert result.completed and result.test is not None
    assert json.loads((tmp_path / "ddp" / "results.json").read_text())["world_size"] == 1
    assert not torch.distributed.is_initialized()  # the run closed its process group
