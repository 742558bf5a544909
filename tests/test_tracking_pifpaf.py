"""The PifPaf backend against the real OpenPifPaf library (installed by scripts/setup.sh when it builds).

No pretrained checkpoint exists offline, so the test writes a randomly initialised
shufflenetv2k16 COCO-keypoint network in OpenPifPaf's own checkpoint format and checks the
adapter loads it, runs it on a person crop and returns frame-coordinate keypoint arrays.
"""
from pathlib import Path

import numpy as np
import pytest

openpifpaf = pytest.importorskip("openpifpaf", reason="openpifpaf is not installed (its build is optional)")


@pytest.fixture(scope="module")
def random_checkpoint(tmp_path_factory) -> Path:
    import torch
    from openpifpaf.network import Factory
    from openpifpaf.plugins.coco import CocoKp

    network, _ = Factory(base_name="shufflenetv2k16").factory(head_metas=CocoKp().head_metas)
    path = tmp_path_factory.mktemp("pifpaf") / "shufflenetv2k16-random.pkl"
    torch.save({"model": network, "epoch": 0}, path)
    return path


def test_pifpaf_backend_runs_the_real_library(random_checkpoint):
    import cv2
    import ultralytics

    from tracking.keypoints import PifPafKeypoints, select_keypoint_backend
    from tracking.types import Detection

    backend, reason = select_keypoint_backend("pifpaf", checkpoint=str(random_checkpoint))
    assert isinstance(backend, PifPafKeypoints) and "OpenPifPaf" in reason
    image = cv2.imread(str(Path(ultralytics.__file__).parent / "assets" / "bus.jpg"))[:, :, ::-1].copy()
    people = [Detection(box=np.array([50, 400, 250, 900], np.float32), score=0.9, track_id=1),
              Detection(box=np.array([220, 400, 350, 860], np.float32), score=0.8, track_id=2)]
    keypoints = backend.estimate(image, people)
    assert len(keypoints) == 2
    for points in keypoints:
        assert points.shape == (17, 3) and points.dtype == np.float32
        assert np.isfinite(points).all()


def test_explicit_pifpaf_with_a_missing_checkpoint_is_a_clear_error(tmp_path):
    from tracking.keypoints import KeypointBackendError, select_keypoint_backend

    with pytest.raises(KeypointBackendError, match="does not exist"):
        select_keypoint_backend("pifpaf", checkpoint=str(tmp_path / "nope.pkl"))
