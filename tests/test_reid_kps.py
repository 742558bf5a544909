"""KPS must let the part importance steer the part token (DESIGN.md §4, defects 1 and 2)."""
import pytest
import torch

import reid
from reid.model import ReIDOutput

TINY = dict(depth=2, img_size=(64, 32), heatmap_sigma=2.0, drop_path=0.0)
GRID_COLS = 2  # 64x32 input, 16 px patches -> 4 x 2 grid


def _patch_centre(patch: int) -> tuple[float, float]:
    row, col = divmod(patch, GRID_COLS)
    return col * 16 + 7.5, row * 16 + 7.5


def _keypoints_on(patch: int, num_frames: int = 4) -> torch.Tensor:
    """Every joint on one patch's centre: every part's importance peaks there."""
    x, y = _patch_centre(patch)
    points = torch.tensor([x, y, 1.0]).expand(1, num_frames, 17, 3)
    return points.clone()


def _part_features(model, features, keypoints):
    out = ReIDOutput()
    model._local_branch(features, keypoints, out, reference=False)
    return out.part_feat


@pytest.mark.parametrize("tcss", [True, False])
def test_prior_part_token_depends_on_the_important_patch_only(tcss):
    torch.manual_seed(0)
    model = reid.build_model("keyreid_vit_tiny", **TINY, tcss=tcss).eval()
    important, far = 0, 7  # top-left and bottom-right patches
    features = torch.randn(1, 4, 9, model.embed_dim)
    keypoints = _keypoints_on(important)
    with torch.no_grad():
        base = _part_features(model, features, keypoints)

        def moved(patch):
            perturbed = features.clone()
            perturbed[:, :, 1 + patch] += torch.randn_like(perturbed[:, :, 1 + patch]) * 3.0
            return ((_part_features(model, perturbed, keypoints) - base).norm() / base.norm()).item()

        near_change, far_change = moved(important), moved(far)
    assert near_change > 1e-2, near_change
    assert far_change < 1e-3, far_change
    assert near_change > 100 * far_change


def test_prior_importance_changes_the_part_feature_far_beyond_noise():
    torch.manual_seed(0)
    model = reid.build_model("keyreid_vit_tiny", **TINY).eval()
    features = torch.randn(1, 4, 9, model.embed_dim)
    with torch.no_grad():
        a = _part_features(model, features, _keypoints_on(0))
        b = _part_features(model, features, _keypoints_on(7))
    assert ((a - b).norm() / a.norm()).item() > 1e-2


def test_literal_multiply_is_erased_by_layernorm_but_prior_is_not():
    """The paper's p_k = L_patch * m_k: positive row scalings before a pre-norm block barely move [CLS]."""
    torch.manual_seed(0)
    results = {}
    for mode in ("multiply", "prior"):
        model = reid.build_model("keyreid_vit_tiny", **TINY, kps_mode=mode).eval()
        generator = torch.Generator().manual_seed(1)
        cls = torch.randn(1, 1, 4 * model.embed_dim, generator=generator)
        rows = torch.randn(1, 8, 4 * model.embed_dim, generator=generator)
        uniform = torch.ones(1, 6, 8)
        varied = 0.5 + torch.rand(1, 6, 8, generator=generator)
        with torch.no_grad():
            a = model.part_tokens(cls, rows, uniform)
            b = model.part_tokens(cls, rows, varied)
        results[mode] = ((a - b).norm() / a.norm()).item()
    assert results["multiply"] < 1e-4, results  # measured about 1e-6 .. 1e-5: float noise
    assert results["prior"] > 1e-2, results
    assert results["prior"] > 1000 * results["multiply"]


def test_part_seen_in_no_frame_falls_back_to_plain_attention():
    torch.manual_seed(0)
    model = reid.build_model("keyreid_vit_tiny", **TINY).eval()
    features = torch.randn(1, 4, 9, model.embed_dim)
    nothing = torch.zeros(1, 4, 17, 3)
    whole = reid.build_model("keyreid_vit_tiny", **TINY, local="whole").eval()
    whole.part_block.load_state_dict(model.part_block.state_dict())
    whole.part_norm.load_state_dict(model.part_norm.state_dict())
    with torch.no_grad():
        parts = _part_features(model, features, nothing)
        plain = _part_features(whole, features, None)
    assert torch.allclose(parts, plain.expand_as(parts), atol=1e-5)
