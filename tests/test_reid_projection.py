"""Compact descriptors (`reid.projection`): rankings kept, 2 KiB stored, the random projection
fixed across processes, a fitted one carried by the checkpoint and named in model_id, the same
descriptors from the exported runtimes, and clear errors. CPU, tiny models, synthetic data."""
from __future__ import annotations

import importlib.util
import subprocess
import sys

import numpy as np
import pytest
import torch

import reid
from reid.checkpoints import read_checkpoint, save_checkpoint, write_checkpoint
from reid.projection import COMPACT_DIM, PAYLOAD_KEY, Projection, needs_projection
from storage.repository import encode_descriptor
from training import project
from training.datasets import build_dataset
from training.metrics import evaluate_ranking

TINY = {"depth": 1, "img_size": (64, 32)}
FULL_DIM = 4800  # ViT-Tiny's descriptor: global 192 + 6 parts x (4 frames x 192)
STORED_LIMIT = 2048  # bytes per clip as stored
DATA_OPTIONS = {"num_ids": 16, "min_frames": 6, "max_frames": 8, "num_distractors": 2, "num_junk": 1}


def _clips(count=3, seed=0):
    rng = np.random.default_rng(seed)
    frames = rng.integers(0, 256, size=(count, 4, 90, 40, 3), dtype=np.uint8)
    keypoints = np.concatenate([rng.uniform([0, 0], [39, 89], size=(count, 4, 17, 2)),
                                rng.uniform(0, 1, (count, 4, 17, 1))], -1).astype(np.float32)
    return frames, keypoints


def _people(ids, clips_per_id, rng, latent=48, dim=FULL_DIM):
    """Clustered descriptors as a trained model's are: identities in a low-dimensional subspace
    of a wide descriptor (its parts share one backbone), per-clip variation and a little noise."""
    basis = np.linalg.qr(np.random.default_rng(99).standard_normal((dim, latent)))[0]
    centres = rng.standard_normal((ids, latent)) * 3.0
    codes = np.repeat(centres, clips_per_id, 0) + rng.standard_normal((ids * clips_per_id, latent))
    labels = np.repeat(np.arange(ids), clips_per_id)
    descriptors = codes @ basis.T + 0.05 * rng.standard_normal((len(codes), dim))
    return descriptors.astype(np.float32), labels


def _map(descriptors, labels):
    """Leave-one-out mAP: every clip queries all the others."""
    squared = (descriptors ** 2).sum(1)
    distances = np.sqrt(np.maximum(squared[:, None] + squared[None] - 2.0 * descriptors @ descriptors.T, 0))
    cameras = np.arange(len(labels))  # the query itself is the only same-camera entry: removed
    return evaluate_ranking(distances, labels, labels, cameras, cameras).mAP


def test_compact_descriptors_keep_the_full_descriptors_rankings():
    rng = np.random.default_rng(0)
    train, _ = _people(60, 30, rng)  # 1,800 training clips: other people than the test's
    test, labels = _people(40, 6, rng)
    full = _map(test, labels)
    fitted = Projection.fit(train, COMPACT_DIM)
    assert fitted.dim == COMPACT_DIM and fitted.input_dim == FULL_DIM
    np.testing.assert_allclose(fitted.components.T @ fitted.components, np.eye(COMPACT_DIM), atol=1e-4)
    random = Projection.random(FULL_DIM)
    whitened = Projection.fit(train, COMPACT_DIM, whiten=True)
    for projection, loss in ((fitted, 0.005), (random, 0.02), (whitened, 0.05)):
        compact = projection.apply(test)
        assert compact.shape == (len(test), COMPACT_DIM) and compact.dtype == np.float32
        assert _map(compact, labels) >= full - loss, projection.tag
    # the fitted PCA keeps the geometry itself: distances shrink by ~1%, the isotropic noise
    # outside the people's subspace that it drops
    pair = test[:50] - test[50:100]
    kept = np.linalg.norm(fitted.apply(test[:50]) - fitted.apply(test[50:100]), axis=1) / np.linalg.norm(pair, axis=1)
    assert kept.min() > 0.98 and kept.max() < 1.0 + 1e-5
    np.testing.assert_allclose(np.linalg.norm(whitened.apply(test), axis=1), 1.0, rtol=1e-5)


def test_fewer_clips_than_dimensions_keep_everything_they_span():
    rng = np.random.default_rng(1)
    few = rng.standard_normal((200, 3000)).astype(np.float32)
    projection = Projection.fit(few, COMPACT_DIM)
    # their 200 directions, completed by random orthogonal ones to the full size
    assert projection.dim == COMPACT_DIM
    np.testing.assert_allclose(projection.components.T @ projection.components, np.eye(COMPACT_DIM), atol=1e-4)
    assert Projection.fit(few, COMPACT_DIM, whiten=True).dim == 199  # centred; nothing to whiten the rest by
    d_full = np.linalg.norm(few[:100] - few[100:], axis=1)
    d_projected = np.linalg.norm(projection.apply(few[:100]) - projection.apply(few[100:]), axis=1)
    np.testing.assert_allclose(d_projected, d_full, rtol=1e-4)


def test_stored_descriptor_is_at_most_2_kib_for_tiny_and_base():
    encoder = reid.Encoder(device="cpu", **TINY)
    assert encoder.full_dim == FULL_DIM and encoder.dim == COMPACT_DIM
    frames, keypoints = _clips()
    descriptors = encoder.encode(frames, keypoints)
    assert descriptors.shape == (3, COMPACT_DIM)
    blob, dim = encode_descriptor(descriptors[0], "float16")  # storage's default dtype
    assert dim == COMPACT_DIM and len(blob) <= STORED_LIMIT
    with torch.device("meta"):  # ViT-B's 19,200-d descriptor, shapes only
        base_dim = reid.build_model("keyreid_vit_base").descriptor_dim
    assert base_dim == 19200 and needs_projection(base_dim) and not needs_projection(COMPACT_DIM)
    full = reid.Encoder(device="cpu", compact=False, **TINY)
    assert full.projection is None and full.dim == FULL_DIM
    assert encoder.model_id.startswith(full.model_id + "+rand1024")
    np.testing.assert_allclose(descriptors, encoder.projection.apply(full.encode(frames, keypoints)),
                               rtol=1e-5, atol=1e-5)


def test_random_projection_is_fixed_across_processes(tmp_path):
    here = Projection.random(FULL_DIM)
    np.testing.assert_allclose(here.components.T @ here.components, np.eye(COMPACT_DIM), atol=1e-4)
    saved = tmp_path / "there.npy"
    code = ("import sys, numpy as np, torch; from reid.projection import Projection; torch.set_num_threads(2); "
            "p = Projection.random(4800); np.save(sys.argv[1], p.components); print(p.tag)")
    printed = subprocess.run([sys.executable, "-c", code, str(saved)], capture_output=True, text=True,
                             check=True).stdout.split()
    assert printed == [here.tag]
    # the same matrix, up to the QR's rounding under another thread count
    np.testing.assert_allclose(np.load(saved), here.components, atol=1e-5)
    assert np.abs(Projection.random(FULL_DIM, seed=1).components - here.components).max() > 0.01


def test_fitted_projection_round_trips_through_a_checkpoint_and_changes_model_id(tmp_path):
    model = reid.build_model("keyreid_vit_tiny", num_classes=4, **TINY)
    path = save_checkpoint(model, tmp_path / "model.pt", name="keyreid_vit_tiny", epoch=2)
    unfitted = reid.Encoder(path, device="cpu")
    assert unfitted.projection.kind == "random" and "+rand1024" in unfitted.model_id
    frames, keypoints = _clips(count=24, seed=3)
    full = reid.Encoder(path, device="cpu", compact=False).encode(frames, keypoints)
    fitted = Projection.fit(full, 16)
    payload = read_checkpoint(path)
    payload[PAYLOAD_KEY] = fitted.to_payload()
    write_checkpoint(payload, tmp_path / "compact.pt")
    compact = reid.Encoder(tmp_path / "compact.pt", device="cpu")
    assert compact.projection.kind == "pca" and compact.dim == 16 and compact.projection.tag == fitted.tag
    assert compact.model_id.endswith("+" + fitted.tag) and compact.model_id != unfitted.model_id
    assert read_checkpoint(tmp_path / "compact.pt")["epoch"] == 2  # the other keys are kept
    np.testing.assert_allclose(compact.encode(frames, keypoints), fitted.apply(full), rtol=1e-4, atol=1e-5)
    whitened = Projection.fit(full, 16, whiten=True)
    assert whitened.tag != fitted.tag and Projection.from_payload(whitened.to_payload()).tag == whitened.tag


@pytest.mark.parametrize("runtime", ("onnxruntime", "openvino"))
def test_exported_runtime_applies_the_same_projection(runtime, tmp_path):
    if importlib.util.find_spec(runtime) is None:
        pytest.skip(f"{runtime} not installed: pip install -e .[cpu-fast]")
    model = reid.build_model("keyreid_vit_tiny", num_classes=4, **TINY)
    path = save_checkpoint(model, tmp_path / "model.pt", name="keyreid_vit_tiny")
    frames, keypoints = _clips(count=20, seed=4)
    payload = read_checkpoint(path)
    payload[PAYLOAD_KEY] = Projection.fit(reid.Encoder(path, device="cpu", compact=False).encode(frames, keypoints),
                                          8).to_payload()
    write_checkpoint(payload, path)
    expected = reid.Encoder(path, device="cpu").encode(frames[:3], keypoints[:3])
    exported = reid.Encoder(path, device="cpu", runtime=runtime, threads=1, precision="fp32", export_dir=tmp_path)
    assert exported.runtime == runtime, exported.runtime_reason
    got = exported.encode(frames[:3], keypoints[:3])
    assert got.shape == expected.shape == (3, 8)
    relative = np.linalg.norm(got - expected, axis=1) / np.linalg.norm(expected, axis=1)
    assert relative.max() <= 1e-4
    assert exported.encode(frames[:0], keypoints[:0]).shape == (0, exported.dim)


def test_bad_shapes_and_mismatched_projections_are_named(tmp_path):
    projection = Projection.random(64, 8)
    with pytest.raises(ValueError, match=r"do not match the projection's input \[N, 64\]"):
        projection.apply(np.zeros((2, 65), np.float32))
    with pytest.raises(ValueError, match="do not match"):
        projection.apply(np.zeros(64, np.float32))
    with pytest.raises(ValueError, match="N >= 2"):
        Projection.fit(np.zeros((1, 64)), 8)
    with pytest.raises(ValueError, match="dimension must be in"):
        Projection.fit(np.ones((10, 64)), 64)
    with pytest.raises(ValueError, match="span nothing"):
        Projection.fit(np.zeros((10, 64)), 8)
    with pytest.raises(ValueError, match="NaN"):
        Projection.fit(np.full((10, 64), np.nan), 8)
    with pytest.raises(ValueError, match="kind"):
        Projection("lda", projection.components, projection.mean)
    with pytest.raises(ValueError, match="mean"):
        Projection("pca", projection.components, np.zeros(3, np.float32))
    model = reid.build_model("keyreid_vit_tiny", num_classes=4, **TINY)
    path = save_checkpoint(model, tmp_path / "model.pt", name="keyreid_vit_tiny",
                           **{PAYLOAD_KEY: projection.to_payload()})
    with pytest.raises(ValueError, match="takes 64-d descriptors but its model makes 4800-d"):
        reid.Encoder(path, device="cpu")
    with pytest.raises(ValueError, match="format marker"):
        write_checkpoint({"state_dict": {}}, tmp_path / "junk.pt")


def test_project_cli_fits_on_training_clips_and_compares_on_the_test_set(tmp_path, capsys):
    root = tmp_path / "data"
    build_dataset("synthetic", root, **DATA_OPTIONS)
    model = reid.build_model("keyreid_vit_tiny", num_classes=8, **TINY)
    source = save_checkpoint(model, tmp_path / "model.pt", name="keyreid_vit_tiny")
    out = tmp_path / "compact.pt"
    code = project.main(["--checkpoint", str(source), "--out", str(out), "--dataset", "synthetic",
                         "--root", str(root), "--dim", "32", "--compare", "--device", "cpu", "--no-progress",
                         "--dataset-opt", *[f"{k}={v}" for k, v in DATA_OPTIONS.items()]])
    assert code == 0
    printed = capsys.readouterr().out
    assert "4800 -> 32 dims" in printed and "full" in printed and "PCA (fitted)" in printed
    encoder = reid.Encoder(out, device="cpu")
    assert encoder.dim == 32 and encoder.projection.kind == "pca" and encoder.projection.fitted_on > 32
    assert project.main(["--checkpoint", str(source), "--dataset", "synthetic", "--root", str(root),
                         "--dim", "5000", "--device", "cpu", "--no-progress",
                         "--dataset-opt", *[f"{k}={v}" for k, v in DATA_OPTIONS.items()]]) == 2
    assert "dimension must be in" in capsys.readouterr().err


def test_fitting_samples_whole_training_tracklets_up_to_the_clip_budget():
    from training.records import TrackletRecord

    records = [TrackletRecord(tuple(f"{i}/{f}.jpg" for f in range(8 + i % 5)), i, 0) for i in range(50)]
    chosen = project.fitting_records(records, 40, 4, seed=1)
    clips = sum(-(-len(r.frames) // 4) for r in chosen)
    assert 40 <= clips < 40 + 4 and chosen == sorted(chosen, key=lambda r: r.pid)
    assert project.fitting_records(records, 40, 4, seed=1) == chosen  # seeded
    assert project.fitting_records(records, 10_000, 4) == records


def test_the_randomized_fit_of_wide_descriptors_finds_the_exact_fits_components():
    from reid.projection import _top_eigen

    data, _ = _people(30, 20, np.random.default_rng(5), latent=24, dim=700)
    exact_values, exact = _top_eigen(data.astype(np.float64), 24)
    values, randomized = _top_eigen(data.astype(np.float64), 24, exact_limit=100)  # ViT-B's path
    np.testing.assert_allclose(values, exact_values, rtol=1e-6)
    # the same subspace: every principal angle's cosine is ~1
    np.testing.assert_allclose(np.linalg.svd(exact.T @ randomized, compute_uv=False), 1.0, atol=1e-6)
