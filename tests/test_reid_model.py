"""Contract tests over every registered variant (timm style) plus the ablation switches."""
import pytest
import torch

import reid
from reid.losses import KeyReIDLoss

TINY = dict(depth=2, img_size=(64, 32), num_classes=4, num_cameras=3)
ABLATIONS = [
    ("keyreid_vit_tiny", dict(kps_mode="multiply")),
    ("keyreid_vit_tiny", dict(tcss=False)),
    ("keyreid_vit_tiny", dict(local="whole")),
    ("keyreid_vit_tiny", dict(local="none")),
    ("keyreid_vit_tiny", dict(use_global=False)),
    ("keyreid_vit_tiny", dict(stride=12)),
]
CASES = [(name, {}) for name in reid.list_models()] + ABLATIONS


def _ids(case):
    name, overrides = case
    return name + "".join(f"-{k}={v}" for k, v in overrides.items())


def _inputs(config, batch=4, seed=0):
    generator = torch.Generator().manual_seed(seed)
    height, width = config.img_size
    frames = torch.randn(batch, config.num_frames, 3, height, width, generator=generator)
    keypoints = torch.rand(batch, config.num_frames, 17, 3, generator=generator) * torch.tensor([width, height, 1.0])
    return frames, keypoints, torch.tensor([0, 1, 2, -1])[:batch]


@pytest.mark.parametrize("case", CASES, ids=[_ids(c) for c in CASES])
def test_forward_backward_every_parameter_gets_a_gradient(case):
    name, overrides = case
    torch.manual_seed(0)
    model = reid.build_model(name, **TINY, **overrides).train()
    frames, keypoints, cams = _inputs(model.config)
    pids = torch.tensor([0, 0, 1, 1])
    out = model(frames, keypoints, cams)
    criterion = KeyReIDLoss.for_model(model)
    erased = torch.tensor([[1, 0, 0, 0]] * 4, dtype=torch.bool)
    loss, components = criterion(out, pids, erased)
    loss.backward()
    assert torch.isfinite(loss)
    missing = [n for n, p in model.named_parameters() if p.requires_grad and (p.grad is None or not p.grad.abs().sum() > 0)]
    assert not missing, f"parameters without gradient: {missing}"
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    assert all(c.centers.grad is not None for c in criterion.modules() if hasattr(c, "centers"))
    model.eval()
    with torch.no_grad():
        descriptor = model.descriptor(model(frames, keypoints, cams))
    assert descriptor.shape == (4, model.descriptor_dim)
    assert torch.isfinite(descriptor).all()


@pytest.mark.parametrize("case", CASES, ids=[_ids(c) for c in CASES])
def test_cls_only_inference_equals_straightforward(case):
    name, overrides = case
    torch.manual_seed(1)
    model = reid.build_model(name, **{**TINY, "drop_path": 0.0}, **overrides).eval()
    frames, keypoints, cams = _inputs(model.config, seed=1)
    with torch.no_grad():
        fast = model.descriptor(model(frames, keypoints, cams))
        reference = model.descriptor(model(frames, keypoints, cams, reference=True))
    relative = (fast - reference).norm() / reference.norm()
    assert relative < 1e-5, f"{name}: optimised inference differs from the reference by {relative:.2e}"


def test_descriptor_dimensions_follow_the_paper():
    base = reid.build_model("keyreid_vit_base", depth=1)
    assert base.descriptor_dim == 768 + 6 * 4 * 768  # global + six parts of T*D
    assert reid.build_model("vidtrans_vit_tiny", depth=1).descriptor_dim == 192 + 4 * 4 * 192


def test_registry_rejects_unknown_names_and_options():
    with pytest.raises(KeyError, match="unknown model"):
        reid.build_model("resnet50")
    with pytest.raises(ValueError, match="unknown model option"):
        reid.get_config("keyreid_vit_tiny", colour="red")
    with pytest.raises(ValueError, match="kps_mode"):
        reid.get_config("keyreid_vit_tiny", kps_mode="sum")


def test_seeded_builds_are_identical_and_leave_global_rng_alone():
    torch.manual_seed(123)
    before = torch.rand(1)
    torch.manual_seed(123)
    a = reid.build_model("keyreid_vit_tiny", depth=1, seed=7)
    after = torch.rand(1)
    b = reid.build_model("keyreid_vit_tiny", depth=1, seed=7)
    assert torch.equal(before, after)
    for (name, pa), pb in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(pa, pb), name


def test_unknown_camera_uses_mean_embedding_and_out_of_range_is_refused():
    model = reid.build_model("keyreid_vit_tiny", **TINY).eval()
    frames, keypoints, _ = _inputs(model.config, batch=1)
    with pytest.raises(ValueError, match="num_cameras"):
        model(frames, keypoints, torch.tensor([3]))
    embedding = model._camera_embedding(torch.tensor([-1, 1]))
    assert torch.allclose(embedding[0], model.camera_embed.mean(0))
    assert torch.equal(embedding[1], model.camera_embed[1])


def test_importing_reid_keypoints_does_not_load_torch():
    import subprocess
    import sys

    code = "import sys, reid.keypoints; print('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip() == "False"


def test_optimised_vit_base_costs_about_the_bare_backbone():
    """The acceptance bound of issue 2: optimised ViT-B <= 1.25x backbone-only GMAC per clip."""
    from reid.bench import _gmac, example_clip
    import timm

    model = reid.build_model("keyreid_vit_base").eval()
    frames, keypoints, cameras = example_clip(model)
    backbone = timm.create_model("vit_base_patch16_224", img_size=(256, 128), num_classes=0, global_pool="").eval()
    optimised = _gmac(lambda: model(frames, keypoints, cameras))
    bare = _gmac(lambda: backbone.forward_features(frames.flatten(0, 1)))
    assert 40 < bare < 50  # about 45 GMAC for four 256x128 frames
    assert optimised <= 1.25 * bare


def test_tcss_perturbs_the_training_forward_and_not_the_inference_one():
    options = dict(TINY, drop_path=0.0)
    model = reid.build_model("keyreid_vit_tiny", seed=3, **options)  # tcss_mode="random" by default
    plain = reid.build_model("keyreid_vit_tiny", seed=3, tcss=False, **options)
    fixed = reid.build_model("keyreid_vit_tiny", seed=3, tcss_mode="fixed", **options)
    frames, keypoints, cams = _inputs(model.config)

    def part_feat(network, training, seed=0):
        network.train(training)
        torch.manual_seed(seed)
        with torch.no_grad():
            return network(frames, keypoints, cams).part_feat

    def differs(a, b):
        return ((a - b).norm() / b.norm()).item()

    assert torch.equal(part_feat(model, False), part_feat(plain, False))  # off at inference
    assert differs(part_feat(model, True, seed=1), part_feat(plain, True)) > 1e-2  # on in training
    assert differs(part_feat(model, True, seed=1), part_feat(model, True, seed=2)) > 1e-2  # and random
    # The fixed rotation (this project's first TCSS) is the same at training and inference.
    assert torch.allclose(part_feat(fixed, True), part_feat(fixed, False), atol=1e-6)
    assert differs(part_feat(fixed, False), part_feat(plain, False)) > 1e-2


def test_configs_written_before_new_fields_keep_their_behaviour():
    from reid.config import LEGACY_DEFAULTS, ModelConfig

    current = reid.get_config("keyreid_vit_tiny")
    assert (current.tcss_mode, current.part_maps, current.part_scale) == ("random", "limbs", "sqrt")
    old = ModelConfig.from_dict({k: v for k, v in current.to_dict().items() if k not in LEGACY_DEFAULTS})
    assert (old.tcss_mode, old.part_maps, old.part_scale) == ("fixed", "joints", "k")
    assert ModelConfig.from_dict(current.to_dict()) == current
    with pytest.raises(ValueError, match="part_maps"):
        reid.get_config("keyreid_vit_tiny", part_maps="blobs")


@pytest.mark.parametrize("local,parts", [("keypoints", 6), ("whole", 1), ("stripes", 4)])
def test_descriptor_keeps_the_global_local_balance_whatever_the_part_count(local, parts):
    model = reid.build_model("keyreid_vit_tiny", local=local, **TINY).eval()
    frames, keypoints, cams = _inputs(model.config)
    with torch.no_grad():
        out = model(frames, keypoints, cams)
        descriptor = model.descriptor(out)
    width = model.embed_dim
    assert torch.equal(descriptor[:, :width], out.global_bn)
    assert torch.allclose(descriptor[:, width:], out.part_bn.flatten(1) / parts ** 0.5)
