"""The INT8 encoder (`precision="int8"`, OpenVINO): close to torch, cached, rebuilt, refused elsewhere."""
import logging

import numpy as np
import pytest

import reid
from reid import export

pytest.importorskip("openvino", reason="openvino not installed: pip install -e .[cpu-fast]")
pytest.importorskip("nncf", reason="nncf not installed: pip install -e .[cpu-fast]")

TINY = dict(depth=2, img_size=(64, 32))


def _walkers(count=8, seed=3):
    """Person clips from the training data's renderer (not the calibration one): uint8 crops, keypoints."""
    from training.synthetic import SyntheticConfig, make_camera, make_identities, render_tracklet

    config = SyntheticConfig(num_ids=8, family_size=2, seed=seed)
    rng = np.random.default_rng(seed)
    looks = make_identities(config, rng)
    clips = [render_tracklet(config, make_camera(config, i % 3, rng), looks[i % len(looks)][0], 4, rng)
             for i in range(count)]
    return np.stack([np.stack(frames) for frames, _ in clips]), np.stack([points for _, points in clips])


def _cosine(a, b):
    return (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


def test_int8_descriptors_stay_close_to_torch_fp32(tmp_path, caplog):
    """The watcher's model at full size (untrained ViT-Tiny, 256x128). Measured here (AVX512 VNNI
    + BF16): cosine to torch fp32 0.991 worst, 0.996 mean on these clips; the bound leaves room
    for other CPUs' kernels. A trained model's retrieval is in README "Performance"."""
    frames, keypoints = _walkers()
    expected = reid.Encoder(device="cpu", compact=False).encode(frames, keypoints)
    with caplog.at_level(logging.INFO, logger="reid.export"):
        encoder = reid.Encoder(device="cpu", runtime="openvino", precision="int8", threads=1,
                               export_dir=tmp_path, compact=False)
    assert "INT8-quantising" in caplog.text  # once, said in the log
    assert encoder.runtime == "openvino" and encoder.runtime_reason.endswith("int8")
    got = encoder.encode(frames, keypoints)
    assert got.dtype == np.float32 and got.shape == expected.shape
    assert _cosine(got, expected).min() > 0.985
    assert "FakeQuantize" in next(tmp_path.glob("*-int8-*.xml")).read_text()  # quantised indeed


def test_int8_model_is_cached_rekeyed_and_rebuilt_when_corrupt(tmp_path, monkeypatch, caplog):
    """Caller-supplied calibration clips (two, to be quick) key the model as the default ones do."""
    quantised = []
    real = export.quantize_int8
    monkeypatch.setattr(export, "quantize_int8", lambda onnx, calibration: quantised.append(onnx) or real(onnx, calibration))
    frames, keypoints = _walkers(count=3)
    calibration = _walkers(count=2, seed=4)

    def int8_encoder(clips=calibration):
        return reid.Encoder(device="cpu", runtime="openvino", precision="int8", export_dir=tmp_path,
                            calibration=clips, **TINY)

    first = int8_encoder()
    with caplog.at_level(logging.INFO, logger="reid.export"):
        again = int8_encoder()
    assert len(quantised) == 1 and "reusing the INT8 model" in caplog.text  # second start: no calibration
    reference = first.encode(frames, keypoints)
    np.testing.assert_array_equal(again.encode(frames, keypoints), reference)
    int8_encoder(_walkers(count=2, seed=5))
    assert len(quantised) == 2 and len(list(tmp_path.glob("*-int8-*.xml"))) == 2  # other clips, other model

    weights = first.runner.path.with_suffix(".bin")
    data = bytearray(weights.read_bytes())
    data[len(data) // 2: len(data) // 2 + 32] = bytes(32)
    weights.write_bytes(bytes(data))
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="reid.export"):
        rebuilt = int8_encoder()
    assert len(quantised) == 3 and "corrupt" in caplog.text
    np.testing.assert_array_equal(rebuilt.encode(frames, keypoints), reference)

    monkeypatch.setattr(export, "KEEP_PER_MODEL", 1)  # stale INT8 models are pruned like exports
    int8_encoder(_walkers(count=2, seed=6))
    assert len(list(tmp_path.glob("*-int8-*.xml"))) == len(list(tmp_path.glob("*-int8-*.bin"))) == 1


def test_int8_is_refused_outside_openvino(tmp_path):
    with pytest.raises(ValueError, match="'int8'.*onnxruntime"):
        reid.Encoder(device="cpu", runtime="onnxruntime", precision="int8", export_dir=tmp_path, **TINY)
    with pytest.raises(ValueError, match="int8.*torch"):
        reid.Encoder(device="cpu", runtime="torch", precision="int8", **TINY)
    with pytest.raises(ValueError, match="int8"):
        export.check_precision("onnxruntime", "int8")
    export.check_precision("openvino", "int8")
    from reid.encoder import resolve_runtime

    assert resolve_runtime("auto", reid.Encoder(device="cpu", **TINY).device, "int8")[0] == "openvino"
    assert not list(tmp_path.glob("*"))  # refused before anything was exported
