"""COCO-17 keypoint conventions shared by the model, the trackers and the training augmentation."""
from __future__ import annotations

import numpy as np

COCO_KEYPOINTS: tuple[str, ...] = (
    "nose", "left_eye", "right_eye", "left_ear", "right_ear",
    "left_shoulder", "right_shoulder", "left_elbow", "right_elbow",
    "left_wrist", "right_wrist", "left_hip", "right_hip",
    "left_knee", "right_knee", "left_ankle", "right_ankle",
)
NUM_KEYPOINTS = len(COCO_KEYPOINTS)

# Index permutation that maps a keypoint array of a mirrored image back to COCO order:
# after a horizontal flip the person's left wrist is where a right wrist would be.
COCO_FLIP_INDEX: tuple[int, ...] = (0, 2, 1, 4, 3, 6, 5, 8, 7, 10, 9, 12, 11, 14, 13, 16, 15)

# The paper's Table 1: six body parts, each the mean of its joints' Gaussians.
BODY_PARTS: dict[str, tuple[int, ...]] = {
    "head": (0, 1, 2, 3, 4),
    "torso": (5, 6, 11, 12),
    "left_arm": (7, 9),
    "right_arm": (8, 10),
    "left_leg": (13, 15),
    "right_leg": (14, 16),
}
PART_NAMES: tuple[str, ...] = tuple(BODY_PARTS)
# Flipping the clip turns the left arm's heatmap into the right arm's (and so on).
PART_FLIP_INDEX: tuple[int, ...] = (0, 1, 3, 2, 5, 4)


def flip_keypoints(keypoints: np.ndarray, width: int) -> np.ndarray:
    """Mirror keypoints `[..., 17, 3]` (x, y, score in pixel-index coordinates) of an image
    `width` pixels wide, relabelling left and right so the array stays in COCO order."""
    flipped = np.array(keypoints, dtype=np.float32, copy=True)[..., COCO_FLIP_INDEX, :]
    flipped[..., 0] = (width - 1) - flipped[..., 0]
    return flipped
