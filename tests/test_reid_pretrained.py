"""Pretrained backbone weights load completely (timm, TransReID, our checkpoints) or are refused
with the offending keys named; never a silently random ViT."""
from __future__ import annotations

import numpy as np
import pytest
import timm
import torch
from safetensors.torch import save_file

import reid
from reid.checkpoints import save_checkpoint
from reid.pretrained import PretrainedMismatch

TINY = dict(depth=2, img_size=(64, 32), num_cameras=3)


def _timm_state(seed: int = 0) -> dict[str, torch.Tensor]:
    """An ImageNet-shaped timm ViT-Tiny state dict (224 px: 197 position tokens, 1000-way head)."""
    torch.manual_seed(seed)
    return timm.create_model("vit_tiny_patch16_224", depth=2, num_classes=1000).state_dict()


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_timm_file_loads_every_backbone_tensor(tmp_path, suffix):
    state = _timm_state()
    path = tmp_path / f"vit{suffix}"
    if suffix == ".safetensors":
        save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    else:
        torch.save({"model": state}, path)
    model = reid.build_model("keyreid_vit_tiny", pretrained=path, **TINY)
    report = model.pretrained_report
    assert report.format == "timm-state-dict" and set(report.ignored) == {"head.weight", "head.bias"}
    assert report.loaded == len(state) - 2  # zero missing: the strict check passed
    assert torch.equal(model.backbone.blocks[0].attn.qkv.weight, state["blocks.0.attn.qkv.weight"])
    assert torch.equal(model.backbone.patch_embed.proj.weight, state["patch_embed.proj.weight"])
    # The last block and the final norm seed the global branch.
    assert torch.equal(model.global_block.mlp.fc1.weight, state["blocks.1.mlp.fc1.weight"])
    assert torch.equal(model.global_norm.weight, state["norm.weight"])
    assert torch.equal(model.backbone.cls_token, state["cls_token"])
    assert model.backbone.pos_embed.shape == (1, 1 + 4 * 2, 192)  # 197 resampled to the 4x2 grid


def test_transreid_style_file_loads_with_its_camera_embedding(tmp_path):
    state = _timm_state(1)
    transreid = {f"base.{k}": v for k, v in state.items() if not k.startswith("head")}
    camera = torch.randn(3, 1, 192)
    transreid.update({"base.Cam": camera, "b1.0.attn.qkv.weight": torch.randn(576, 192),
                      "bottleneck.weight": torch.randn(192), "classifier.weight": torch.randn(625, 192)})
    torch.save(transreid, tmp_path / "vid_trans_reid.pth")
    model = reid.build_model("keyreid_vit_tiny", pretrained=tmp_path / "vid_trans_reid.pth", **TINY)
    assert model.pretrained_report.format == "transreid"
    assert model.pretrained_report.loaded == len(state) - 2
    assert torch.equal(model.backbone.blocks[0].norm1.weight, state["blocks.0.norm1.weight"])
    assert torch.equal(model.camera_embed, camera)


def test_foreign_keys_are_refused_and_named(tmp_path):
    torch.save({"conv1.weight": torch.randn(64, 3, 7, 7), "fc.weight": torch.randn(1000, 2048)}, tmp_path / "resnet.pth")
    with pytest.raises(PretrainedMismatch, match=r"unexpected \(2\): conv1.weight, fc.weight") as error:
        reid.build_model("keyreid_vit_tiny", pretrained=tmp_path / "resnet.pth", **TINY)
    assert "missing (30): blocks.0.attn.proj.bias" in str(error.value)

    partial = {k: v for k, v in _timm_state().items() if not k.startswith("blocks.1.")}
    torch.save(partial, tmp_path / "partial.pth")
    with pytest.raises(PretrainedMismatch, match=r"missing \(12\): blocks.1.attn.proj.bias"):
        reid.build_model("keyreid_vit_tiny", pretrained=tmp_path / "partial.pth", **TINY)

    small = timm.create_model("vit_small_patch16_224", depth=2).state_dict()  # D=384, not 192
    torch.save(small, tmp_path / "small.pth")
    with pytest.raises(PretrainedMismatch, match="shape mismatch"):
        reid.build_model("keyreid_vit_tiny", pretrained=tmp_path / "small.pth", **TINY)
    with pytest.raises(FileNotFoundError):
        reid.build_model("keyreid_vit_tiny", pretrained=tmp_path / "absent.pth", **TINY)


def test_our_checkpoint_initialises_the_whole_model_but_the_classifiers(tmp_path):
    source = reid.build_model("keyreid_vit_tiny", seed=5, num_classes=4, **TINY)
    save_checkpoint(source, tmp_path / "best.pt", "keyreid_vit_tiny")
    model = reid.build_model("keyreid_vit_tiny", seed=6, num_classes=7, pretrained=tmp_path / "best.pt", **TINY)
    assert model.pretrained_report.format == "keyreid-checkpoint"
    mine, theirs = model.state_dict(), source.state_dict()
    different = sorted(k for k in mine if mine[k].shape != theirs[k].shape or not torch.equal(mine[k], theirs[k]))
    assert different == ["global_neck.classifier.weight"] + [f"part_necks.{k}.classifier.weight" for k in range(6)]


def test_our_checkpoint_at_another_input_size_resamples_its_own_grid(tmp_path):
    source = reid.build_model("keyreid_vit_tiny", seed=5, depth=2, img_size=(64, 32))  # 4 x 2 patches
    save_checkpoint(source, tmp_path / "small.pt", "keyreid_vit_tiny")
    model = reid.build_model("keyreid_vit_tiny", depth=2, img_size=(128, 64), pretrained=tmp_path / "small.pt")
    assert model.backbone.pos_embed.shape == (1, 1 + 8 * 4, 192)
    grid = model.backbone.pos_embed[0, 1:].reshape(8, 4, 192)
    corner = source.backbone.pos_embed[0, 1].detach()  # the top-left patch stays top-left
    assert (grid[0, 0] - corner).norm() < (grid[-1, -1] - corner).norm()
    assert torch.equal(model.backbone.cls_token, source.backbone.cls_token)


def _jax_arrays(state: dict[str, torch.Tensor], heads: int = 3) -> dict[str, np.ndarray]:
    """A timm ViT state dict in the original JAX/Flax `.npz` layout (the inverse of timm's loader)."""
    def a(t: torch.Tensor) -> np.ndarray:
        return t.detach().numpy()

    out = {"embedding/kernel": a(state["patch_embed.proj.weight"].permute(2, 3, 1, 0)),
           "embedding/bias": a(state["patch_embed.proj.bias"]), "cls": a(state["cls_token"]),
           "Transformer/posembed_input/pos_embedding": a(state["pos_embed"]),
           "Transformer/encoder_norm/scale": a(state["norm.weight"]), "Transformer/encoder_norm/bias": a(state["norm.bias"])}
    blocks = 1 + max(int(k.split(".")[1]) for k in state if k.startswith("blocks."))
    for i in range(blocks):
        p, b = f"Transformer/encoderblock_{i}/", f"blocks.{i}."
        width = state[b + "norm1.weight"].shape[0]
        for name, norm in (("LayerNorm_0", "norm1"), ("LayerNorm_2", "norm2")):
            out[f"{p}{name}/scale"], out[f"{p}{name}/bias"] = a(state[b + norm + ".weight"]), a(state[b + norm + ".bias"])
        for n, (weight, bias) in enumerate(zip(state[b + "attn.qkv.weight"].chunk(3), state[b + "attn.qkv.bias"].chunk(3))):
            part = ("query", "key", "value")[n]
            out[f"{p}MultiHeadDotProductAttention_1/{part}/kernel"] = a(weight.T.reshape(width, heads, -1))
            out[f"{p}MultiHeadDotProductAttention_1/{part}/bias"] = a(bias.reshape(heads, -1))
        out[f"{p}MultiHeadDotProductAttention_1/out/kernel"] = a(state[b + "attn.proj.weight"].reshape(width, heads, -1).permute(1, 2, 0))
        out[f"{p}MultiHeadDotProductAttention_1/out/bias"] = a(state[b + "attn.proj.bias"])
        for r in range(2):
            out[f"{p}MlpBlock_3/Dense_{r}/kernel"] = a(state[b + f"mlp.fc{r + 1}.weight"].T)
            out[f"{p}MlpBlock_3/Dense_{r}/bias"] = a(state[b + f"mlp.fc{r + 1}.bias"])
    return out


def test_jax_npz_loads_and_a_missing_array_is_refused(tmp_path):
    state = _timm_state(2)
    arrays = _jax_arrays(state)
    np.savez(tmp_path / "vit.npz", **arrays)
    model = reid.build_model("keyreid_vit_tiny", pretrained=tmp_path / "vit.npz", **TINY)
    assert model.pretrained_report.format == "jax-npz"
    for ours, key in ((model.backbone.blocks[0].attn.qkv.weight, "blocks.0.attn.qkv.weight"),
                      (model.backbone.blocks[0].attn.proj.weight, "blocks.0.attn.proj.weight"),
                      (model.global_block.mlp.fc2.weight, "blocks.1.mlp.fc2.weight"),
                      (model.backbone.patch_embed.proj.weight, "patch_embed.proj.weight"),
                      (model.backbone.cls_token, "cls_token")):
        assert torch.allclose(ours, state[key], atol=1e-6), key
    del arrays["Transformer/encoderblock_1/MlpBlock_3/Dense_0/kernel"]
    np.savez(tmp_path / "partial.npz", **arrays)
    with pytest.raises(PretrainedMismatch, match="encoderblock_1/MlpBlock_3/Dense_0/kernel"):
        reid.build_model("keyreid_vit_tiny", pretrained=tmp_path / "partial.npz", **TINY)


def test_timm_download_offline_says_so(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(RuntimeError, match="offline"):
        reid.build_model("keyreid_vit_tiny", pretrained="timm:vit_tiny_patch16_224.augreg_in21k", **TINY)
    with pytest.raises(ValueError, match="no pretrained weights"):
        reid.build_model("keyreid_vit_tiny", pretrained="timm:not_a_model", **TINY)
