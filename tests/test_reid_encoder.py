"""The inference object: checkpoints, preprocessing, validation, local pretrained weights."""
import importlib.util
import logging
import re
import subprocess
import sys

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
    assert not first.trained
    # the compact descriptor's id names its (seeded random) projection: reid.projection
    assert re.fullmatch(r"keyreid_vit_tiny\[depth=2,img_size=\(64,32\)\]@untrained-seed0-[0-9a-f]{12}"
                        r"\+rand1024s0v1", first.model_id)
    default = reid.Encoder(device="cpu").model_id
    assert re.fullmatch(r"keyreid_vit_tiny@untrained-seed0-[0-9a-f]{12}\+rand1024s0v1", default)
    # a changed default that alters the descriptors changes the id, so stores never mix them
    assert reid.Encoder(device="cpu", part_scale="k").model_id.split("-")[-1] \
        != default.split("-")[-1]
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
        expected = reference.descriptor(reference(images, points, torch.full((3,), -1))).numpy()
    np.testing.assert_allclose(reid.Encoder(path, device="cpu", compact=False).encode(frames, keypoints), expected,
                               rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(first.encode(frames, keypoints), first.projection.apply(expected), rtol=1e-4, atol=1e-5)
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


# --- exported runtimes (OpenVINO / ONNX Runtime on the CPU) --------------------------------------

EXPORTED = ("onnxruntime", "openvino")
CI_MAX_PARAMS = 60e6  # tiny and small variants; ViT-B ones are exported by `python -m reid.bench`


def _needs(runtime):
    if importlib.util.find_spec(runtime) is None:
        pytest.skip(f"{runtime} not installed: pip install -e .[cpu-fast]")


def _ci_sized_variants():
    sized = []
    for name in reid.list_models():
        with torch.device("meta"):  # shapes only: counts parameters without allocating them
            count = sum(p.numel() for p in reid.build_model(name).parameters())
        if count <= CI_MAX_PARAMS:
            sized.append(name)
    return sized


def _relative(got, expected):
    return float((np.linalg.norm(got - expected, axis=1) / np.linalg.norm(expected, axis=1)).max())


@pytest.fixture(scope="module")
def export_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("encoder-exports")


@pytest.mark.parametrize("name", _ci_sized_variants())
def test_exported_graph_matches_torch_for_every_ci_sized_variant(name, export_dir):
    """Full-size registered variants (256x128, full depth), fp32, batches of 2 and 1 through one
    dynamic-batch graph; cameras known and unknown (-1)."""
    available = [r for r in EXPORTED if importlib.util.find_spec(r) is not None]
    if not available:
        pytest.skip("neither onnxruntime nor openvino is installed: pip install -e .[cpu-fast]")
    assert {"keyreid_vit_tiny", "vidtrans_vit_tiny"} <= set(_ci_sized_variants())
    frames, keypoints = _clips(count=3, height=200, width=80, seed=1)
    cameras = [0, 5, -1]
    expected = reid.Encoder(model=name, device="cpu").encode(frames, keypoints, cameras)
    for runtime in available:
        encoder = reid.Encoder(model=name, device="cpu", runtime=runtime, threads=1, batch_size=2,
                               export_dir=export_dir, precision="fp32")
        assert encoder.runtime == runtime, encoder.runtime_reason
        if runtime == "openvino":  # a share of the cores, left to the OS to place
            assert encoder.runner._compiled.get_property("INFERENCE_NUM_THREADS") == 1
            assert encoder.runner._compiled.get_property("ENABLE_CPU_PINNING") is False
        got = encoder.encode(frames, keypoints, cameras)
        assert got.dtype == np.float32 and got.shape == expected.shape
        assert _relative(got, expected) <= 1e-4, (runtime, _relative(got, expected))


def test_openvino_auto_precision_is_bf16_on_bf16_cpus_and_close_to_torch(export_dir):
    """The watcher's CPU default: descriptors ~1e-2 from torch fp32, the same neighbours."""
    _needs("openvino")
    from reid import export

    frames, keypoints = _clips(count=6, height=200, width=80, seed=2)
    expected = reid.Encoder(device="cpu").encode(frames, keypoints)
    encoder = reid.Encoder(device="cpu", runtime="openvino", threads=1, export_dir=export_dir)
    precision = "bf16" if export.openvino_cpu_has_bf16() else "fp32"
    assert encoder.runtime_reason.endswith(precision)
    assert encoder.runner._compiled.get_property("INFERENCE_PRECISION_HINT").to_string() == \
        {"bf16": "bf16", "fp32": "f32"}[precision]
    got = encoder.encode(frames, keypoints)
    assert _relative(got, expected) <= (5e-2 if precision == "bf16" else 1e-4)
    cosine = (got * expected).sum(1) / np.linalg.norm(got, axis=1) / np.linalg.norm(expected, axis=1)
    assert cosine.min() > 0.999


@pytest.mark.parametrize("runtime", EXPORTED)
def test_exported_encoder_checks_camera_ids_and_empty_input(runtime, tmp_path):
    _needs(runtime)
    encoder = reid.Encoder(device="cpu", runtime=runtime, export_dir=tmp_path, **TINY)
    frames, keypoints = _clips()
    with pytest.raises(ValueError, match="num_cameras"):
        encoder.encode(frames, keypoints, [0, 1, 8])
    assert encoder.encode(frames[:0], keypoints[:0]).shape == (0, encoder.dim)


RELEASE_THEN_SIGNAL = """
import gc, os, signal, sys
import reid
first = reid.Encoder(device="cpu", runtime="openvino", export_dir=sys.argv[1], depth=2, img_size=(64, 32))
second = reid.Encoder(device="cpu", runtime="openvino", export_dir=sys.argv[1], depth=1, img_size=(64, 32))
del first  # the older one first
gc.collect()
del second
gc.collect()
signal.signal(signal.SIGUSR1, lambda *_: print("handled", flush=True))
os.kill(os.getpid(), signal.SIGUSR1)
"""


def test_released_openvino_encoders_leave_signal_handling_working(tmp_path):
    """Regression: each OpenVINO Core's CPU plugin swaps the thread's signal stack and unmaps its
    own on release; two released oldest first left the stack unmapped, and the next Python signal
    handler (the watcher's SIGINT drain, DataLoader's SIGCHLD) killed the process with SIGSEGV
    (the full test suite died so). Encoders now share one Core (`reid.export.openvino_core`)."""
    _needs("openvino")
    done = subprocess.run([sys.executable, "-c", RELEASE_THEN_SIGNAL, str(tmp_path)], capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.strip() == "handled", (done.returncode, done.stderr[-2000:])


def test_export_cache_reuses_rekeys_and_rebuilds(tmp_path, monkeypatch, caplog):
    from reid import export

    runtime = next((r for r in EXPORTED if importlib.util.find_spec(r) is not None), None)
    if runtime is None:
        pytest.skip("neither onnxruntime nor openvino is installed")
    made = []
    real = export.export_onnx
    monkeypatch.setattr(export, "export_onnx", lambda model, path: made.append(path) or real(model, path))
    first = reid.Encoder(device="cpu", runtime=runtime, export_dir=tmp_path, **TINY)
    again = reid.Encoder(device="cpu", runtime=runtime, export_dir=tmp_path, **TINY)
    assert len(made) == 1  # second start reuses the export
    frames, keypoints = _clips()
    np.testing.assert_array_equal(first.encode(frames, keypoints), again.encode(frames, keypoints))

    model = reid.build_model("keyreid_vit_tiny", **TINY)  # other weights, same name and config
    path = save_checkpoint(model, tmp_path / "trained.pt", name="keyreid_vit_tiny")
    trained = reid.Encoder(path, device="cpu", runtime=runtime, export_dir=tmp_path)
    assert len(made) == 2 and len(list(tmp_path.glob("*.onnx"))) == 2
    reference = reid.Encoder(path, device="cpu").encode(frames, keypoints)
    assert _relative(trained.encode(frames, keypoints), reference) <= 1e-4

    onnx_file = max(tmp_path.glob("*.onnx"), key=lambda p: p.stat().st_mtime)
    data = bytearray(onnx_file.read_bytes())
    data[len(data) // 2: len(data) // 2 + 32] = bytes(32)
    onnx_file.write_bytes(bytes(data))
    with caplog.at_level(logging.WARNING, logger="reid.export"):
        rebuilt = reid.Encoder(path, device="cpu", runtime=runtime, export_dir=tmp_path)
    assert len(made) == 3 and "corrupt" in caplog.text
    assert _relative(rebuilt.encode(frames, keypoints), reference) <= 1e-4

    monkeypatch.setattr(export, "KEEP_PER_MODEL", 1)  # stale exports are pruned, newest kept
    reid.Encoder(device="cpu", runtime=runtime, export_dir=tmp_path, **{**TINY, "depth": 1})
    assert len(made) == 4 and len(list(tmp_path.glob("*.onnx"))) == len(list(tmp_path.glob("*.json"))) == 1


def test_runtime_choice_and_torch_fallbacks(tmp_path, monkeypatch, caplog):
    from reid import encoder as encoder_module
    from reid import export

    cpu = torch.device("cpu")
    assert encoder_module.resolve_runtime("auto", torch.device("cuda"))[0] == "torch"
    with pytest.raises(ValueError, match="tensorrt"):
        reid.Encoder(device="cpu", runtime="tensorrt", **TINY)
    if importlib.util.find_spec("onnxruntime") is not None:
        assert encoder_module.resolve_runtime("auto", cpu, "fp32")[0] == "onnxruntime"  # fastest fp32
    if importlib.util.find_spec("openvino") is not None:
        assert encoder_module.resolve_runtime("auto", cpu, "bf16")[0] == "openvino"
        # auto precision: OpenVINO bf16 where the CPU has bf16 units, else the fastest fp32
        bf16_cpu = export.openvino_cpu_has_bf16()
        assert export.resolve_precision("openvino", "auto") == ("bf16" if bf16_cpu else "fp32")
        assert export.resolve_precision("onnxruntime", "auto") == "fp32"
        if bf16_cpu:
            assert encoder_module.resolve_runtime("auto", cpu)[0] == "openvino"
        with pytest.raises(ValueError, match="fp16"):
            reid.Encoder(device="cpu", runtime="openvino", precision="fp16", export_dir=tmp_path, **TINY)
    with pytest.raises(ValueError, match="bf16"):
        export.check_precision("onnxruntime", "bf16")

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(encoder_module.importlib.util, "find_spec",
                        lambda name, *a: None if name in EXPORTED else real_find_spec(name, *a))
    assert encoder_module.resolve_runtime("auto", cpu)[0] == "torch"
    missing = reid.Encoder(device="cpu", runtime="openvino", **TINY)
    assert missing.runtime == "torch" and "not installed" in missing.runtime_reason
    monkeypatch.undo()

    runtime = next((r for r in EXPORTED if real_find_spec(r) is not None), None)
    if runtime is None:
        return
    def broken(model, path):
        raise RuntimeError("exporter exploded")

    monkeypatch.setattr(export, "export_onnx", broken)
    with caplog.at_level(logging.WARNING, logger="reid.encoder"):
        fallback = reid.Encoder(device="cpu", runtime=runtime, export_dir=tmp_path / "x", **TINY)
    assert fallback.runtime == "torch" and "exporter exploded" in caplog.text
    frames, keypoints = _clips()
    np.testing.assert_array_equal(fallback.encode(frames, keypoints),
                                  reid.Encoder(device="cpu", **TINY).encode(frames, keypoints))
    assert not list((tmp_path / "x").glob("*.onnx"))


def test_export_cli_writes_a_checked_graph(tmp_path, capsys):
    from reid import export

    out = tmp_path / "tiny.onnx"
    export.main(["--model", "vidtrans_vit_tiny", "--out", str(out)])
    printed = capsys.readouterr().out
    assert out.is_file() and "dynamic batch" in printed
    for line in printed.splitlines():
        if "max relative difference" in line:
            assert float(line.rsplit(" ", 1)[1]) <= 1e-4, line
