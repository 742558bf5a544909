"""Video in, person clips out: sources, detection + tracking, keypoints, tracklets and clips.

Per camera: `VideoSource` -> `PoseTracker.update` -> a `KeypointBackend` -> `TrackletBuffer`
-> `Clip`s (and `TrackletUpdate`s) for the encoder and storage. With a shared detector (one
model batching many cameras' frames, e.g. on a GPU) `PoseTracker` splits in two:
`PoseDetector.detect` (many frames) -> `FrameDetections` -> each camera's `CameraTracks`. Importing this package is
cheap: ultralytics / torch (and openpifpaf) load only when a detector or backend is built.
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from .types import Clip, Detection, FrameDetections, TrackletUpdate, VideoFrame

_LAZY = {
    "VideoSource": "sources", "SourceError": "sources", "ReconnectPolicy": "sources",
    "SourceStats": "sources",
    "PoseTracker": "detector", "find_pose_weights": "detector", "WeightsNotFoundError": "detector",
    "PoseDetector": "detector", "CameraTracks": "detector", "SharedDetectorTracker": "detector",
    "KeypointBackend": "keypoints", "YoloPoseKeypoints": "keypoints",
    "PifPafKeypoints": "keypoints", "select_keypoint_backend": "keypoints",
    "KeypointBackendError": "keypoints",
    "TrackletBuffer": "tracklets",
}

__all__ = ["Clip", "Detection", "FrameDetections", "TrackletUpdate", "VideoFrame", *_LAZY]

if TYPE_CHECKING:
    from .detector import (CameraTracks, PoseDetector, PoseTracker, SharedDetectorTracker,
                           WeightsNotFoundError, find_pose_weights)
    from .keypoints import (KeypointBackend, KeypointBackendError, PifPafKeypoints,
                            YoloPoseKeypoints, select_keypoint_backend)
    from .sources import ReconnectPolicy, SourceError, SourceStats, VideoSource
    from .tracklets import TrackletBuffer


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
