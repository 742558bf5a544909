"""Keypoint backend selection and the two adapters (OpenPifPaf is faked: it is not installed)."""
from __future__ import annotations

import importlib.machinery
import importlib.util
import sys
import types

import numpy as np
import pytest

from tracking.keypoints import (KeypointBackend, KeypointBackendError, PifPafKeypoints,
                                YoloPoseKeypoints, select_keypoint_backend)
from tracking.types import Detection

OPENPIFPAF_INSTALLED = importlib.util.find_spec("openpifpaf") is not None


def detection(keypoints: np.ndarray | None, box=(10, 20, 50, 120)) -> Detection:
    return Detection(np.array(box, np.float32), 0.9, 1, keypoints)


def test_yolo_pose_passes_the_detector_keypoints_through():
    keypoints = np.random.default_rng(0).random((17, 3)).astype(np.float32)
    backend, reason = select_keypoint_backend("yolo-pose")
    assert isinstance(backend, YoloPoseKeypoints) and isinstance(backend, KeypointBackend)
    assert "yolo-pose" in reason
    out = backend.estimate(np.zeros((8, 8, 3), np.uint8), [detection(keypoints), detection(None)])
    np.testing.assert_array_equal(out[0], keypoints)
    assert out[1].shape == (17, 3) and not out[1].any()
    assert backend.estimate(np.zeros((8, 8, 3), np.uint8), []) == []


@pytest.mark.skipif(OPENPIFPAF_INSTALLED, reason="openpifpaf is installed here")
def test_auto_falls_back_to_yolo_pose_when_openpifpaf_is_missing():
    backend, reason = select_keypoint_backend("auto")
    assert backend.name == "yolo-pose"
    assert "openpifpaf is not installed" in reason


@pytest.mark.skipif(OPENPIFPAF_INSTALLED, reason="openpifpaf is installed here")
def test_explicit_pifpaf_without_openpifpaf_is_a_clear_error():
    with pytest.raises(KeypointBackendError, match="openpifpaf is not installed"):
        select_keypoint_backend("pifpaf")


def test_unknown_backend_name():
    with pytest.raises(ValueError, match="openpose"):
        select_keypoint_backend("openpose")


class _FakeAnnotation:
    def __init__(self, data: np.ndarray) -> None:
        self.data = data


@pytest.fixture
def fake_openpifpaf(monkeypatch, tmp_path):
    """A stand-in for openpifpaf 0.13's API surface the adapter uses: Predictor,
    network.Factory.checkpoint (class state), network.factory.local_checkpoint_path."""
    package = types.ModuleType("openpifpaf")
    package.__spec__ = importlib.machinery.ModuleSpec("openpifpaf", None, is_package=True)
    network = types.ModuleType("openpifpaf.network")
    factory_module = types.ModuleType("openpifpaf.network.factory")
    cached = tmp_path / "shufflenetv2k16-cached.pkl"
    cached.write_bytes(b"weights")
    factory_module.CHECKPOINT_URLS = {"shufflenetv2k16": "https://x/shufflenetv2k16.pkl",
                                      "resnet50": "https://x/resnet50.pkl"}
    factory_module.local_checkpoint_path = (
        lambda name: str(cached) if name == "shufflenetv2k16" else None)

    class Factory:
        checkpoint = "class-default"

    class _Model:
        def to(self, device):
            return self

    class Predictor:
        seen_crops: list = []

        def __init__(self, checkpoint=None):
            Factory.checkpoint = checkpoint  # what the real constructor does: class state
            if "broken" in str(checkpoint):
                raise RuntimeError("unexpected key in state_dict")
            self.model_cpu = _Model()

        def numpy_image(self, image):
            Predictor.seen_crops.append(image.shape)
            height, width = image.shape[:2]
            good = np.zeros((17, 3), np.float32)
            good[:, 0], good[:, 1], good[:, 2] = width / 2, height / 2, 0.7
            outside = np.full((17, 3), -100.0, np.float32)
            outside[:, 2] = 0.9
            return [_FakeAnnotation(outside), _FakeAnnotation(good)], [], {}

    network.Factory = Factory
    network.factory = factory_module
    package.network = network
    package.Predictor = Predictor
    for name, module in [("openpifpaf", package), ("openpifpaf.network", network),
                         ("openpifpaf.network.factory", factory_module)]:
        monkeypatch.setitem(sys.modules, name, module)
    return package


def test_pifpaf_adapter_maps_crop_keypoints_back_to_the_frame(fake_openpifpaf):
    backend, reason = select_keypoint_backend("auto")
    assert isinstance(backend, PifPafKeypoints) and "cached" in reason
    assert fake_openpifpaf.network.Factory.checkpoint == "class-default"  # no leaked state
    image = np.zeros((200, 100, 3), np.uint8)
    (keypoints,) = backend.estimate(image, [detection(None, box=(10, 20, 50, 120))])
    # crop (margin 0.1) = x 6..54, y 10..130 -> 120 px tall resized to 256; the fake puts every
    # keypoint at the crop centre, which maps back to the box centre (30, 70) in the frame.
    assert fake_openpifpaf.Predictor.seen_crops[-1][0] == 256
    np.testing.assert_allclose(keypoints[:, :2], np.tile([30.0, 70.0], (17, 1)), atol=0.6)
    np.testing.assert_allclose(keypoints[:, 2], 0.7)


def test_auto_falls_back_when_the_checkpoint_does_not_load(fake_openpifpaf, tmp_path):
    broken = tmp_path / "broken.pkl"
    broken.write_bytes(b"not a checkpoint")
    backend, reason = select_keypoint_backend("auto", checkpoint=str(broken))
    assert backend.name == "yolo-pose"
    assert f"checkpoint {broken} could not be loaded" in reason and "state_dict" in reason
    assert fake_openpifpaf.network.Factory.checkpoint == "class-default"


@pytest.mark.parametrize("options, message", [
    ({"checkpoint": "resnet50", "download": False}, "not in the OpenPifPaf cache"),
    ({"checkpoint": "/nowhere/model.pkl"}, "does not exist"),
    ({"checkpoint": "mystery"}, "neither a file nor an OpenPifPaf model name"),
])
def test_explicit_pifpaf_checkpoint_errors(fake_openpifpaf, options, message):
    with pytest.raises(KeypointBackendError, match=message):
        select_keypoint_backend("pifpaf", **options)
