"""The inference object: checkpoints, preprocessing, validation, local pretrained weights."""
import logging

import numpy as np
import pytest
import timm
import torch

import reid
from reid.checkpoints import load_model, save_checkpoint

TINY = dict(depth=2, img_size=(64, 32))


def _clips(count=3, height=90, width=40, seed=0):
    rng = np.random.default_rng(seed)
    frames = rng.integers(0, 256, size=(count, 4, height, width, 3), dtype=np.uint8)
    keypoints = np.concatenate(
        [rng.uniform([0, 0], [width - 1, height - 1], size=(count, 4, 17, 2)), rng.uniform(0, 1, (count, 4, 17, 1))], -1
    ).astype(np.float32)
    return frames, keypoints


def test_untrained_encoder_says_so_loudly_and_is_reproducible(caplog):
    with caplog.at_level(logging.WARNING):
        first = reid.Encoder(model="keyreid_vit_tiny", device="cpu", **TINY)
    assert "UNTRAINED" in caplog.text
    assert not first.trained and first.model_id == "keyreid_vit_tiny[depth=2,img_size=(64,32)]@untrained-seed0"
    assert reid.Encoder(device="cpu").model_id == "keyreid_vit_tiny@untrained-seed0"
    second = reid.Encoder(model="keyreid_vit_tiny", device="cpu", **TINY)
    frames, keypoints = _clips()
    a = first.encode(frames, keypoints, [0, 1, -1])
    assert a.dtype == np.float32 and a.shape == (3, first.dim)
    np.testing.assert_array_equal(a, second.encode(frames, keypoints, [0, 1, -1]))


def test_checkpoint_round_trip_gives_identical_descriptors(tmp_path):
    model = reid.build_model("keyreid_vit_tiny", num_classes=5, **TINY)
    with torch.no_grad():  # make the BN statistics non-trivial, as after training
        for neck in model.part_necks:
            neck.bn.running_mean.uniform_(-1, 1)
    path = save_checkpoint(model, tmp_path / "model.pt", name="keyreid_vit_tiny", epoch=3)
    first, second = reid.Encoder(path, device="cpu"), reid.Encoder(path, device="cpu")
    assert first.trained and first.model_id.startswith("keyreid_vit_tiny@")
    frames, keypoints = _clips()
    np.testing.assert_array_equal(first.encode(frames, keypoints), second.encode(frames, keypoints))
    small_batches = reid.Encoder(path, device="cpu", batch_size=2).encode(frames, keypoints)
    np.testing.assert_allclose(small_batches, first.encode(frames, keypoints), rtol=1e-4, atol=1e-5)
    reference = model.eval()
    images, points = first.preprocess(frames, keypoints)
    with torch.no_grad():
        expected = reference.descriptor(reference(images, points, torch.full((3,), -1)))
    np.testing.assert_allclose(first.encode(frames, keypoints), expected.numpy(), rtol=1e-4, atol=1e-5)
    loaded, payload = load_model(path)
    assert payload["epoch"] == 3 and loaded.config == model.config


def test_bad_checkpoints_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.pt"):
        reid.Encoder(tmp_path / "missing.pt")
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="junk.pt"):
        reid.Encoder(junk)
    foreign = tmp_path / "foreign.pt"
    torch.save({"state_dict": {}}, foreign)
    with pytest.raises(ValueError, match="not a keyreid checkpoint"):
        reid.Encoder(foreign)


def test_input_validation_names_the_problem():
    encoder = reid.Encoder(device="cpu", **TINY)
    frames, keypoints = _clips()
    with pytest.raises(ValueError, match="uint8"):
        encoder.encode(frames.astype(np.float32), keypoints)
    with pytest.raises(ValueError, match="4 frames"):
        encoder.encode(frames[:, :3], keypoints[:, :3])
    with pytest.raises(ValueError, match="keypoints"):
        encoder.encode(frames, keypoints[:, :, :5])
    with pytest.raises(ValueError, match="camera ids"):
        encoder.encode(frames, keypoints, [0])
    assert encoder.encode(frames[:0], keypoints[:0]).shape == (0, encoder.dim)


def test_preprocessing_rescales_keypoints_with_the_crop():
    encoder = reid.Encoder(device="cpu", **TINY)  # input 64 x 32
    frames = np.zeros((1, 4, 128, 64, 3), dtype=np.uint8)
    keypoints = np.zeros((1, 4, 17, 3), dtype=np.float32)
    keypoints[..., 0, :] = [31.5, 63.5, 1.0]  # the crop's centre
    images, points = encoder.preprocess(frames, keypoints)
    assert images.shape == (1, 4, 3, 64, 32)
    assert torch.allclose(points[0, 0, 0], torch.tensor([15.5, 31.5, 1.0]))
    assert torch.allclose(images, torch.full_like(images, -1.0))  # (0 - 0.5) / 0.5


def test_local_pretrained_weights_load_with_resized_position_embedding(tmp_path):
    source = timm.create_model("vit_tiny_patch16_224", depth=2, num_classes=0)
    path = tmp_path / "vit_tiny.pth"
    torch.save(source.state_dict(), path)
    model = reid.build_model("keyreid_vit_tiny", pretrained=path, depth=2)
    assert model.backbone.pos_embed.shape == (1, 129, 192)  # 197 tokens at 224x224 -> 16x8 + [CLS]
    assert torch.equal(model.backbone.patch_embed.proj.weight, source.patch_embed.proj.weight)
    assert torch.equal(model.global_block.attn.qkv.weight, source.blocks[-1].attn.qkv.weight)
    with pytest.raises(FileNotFoundError, match="nowhere.pth"):
        reid.build_model("keyreid_vit_tiny", pretrained=tmp_path / "nowhere.pth")
