"""Calibration clips for the INT8 encoder (`reid.export.cached_int8`), drawn here, offline.

Why drawn people: INT8 scales come from the activations of the clips the quantiser sees, and
they must look like person crops. On a site-adapted ViT-Tiny, calibrating on Gaussian noise left
descriptors at cosine 0.2-0.6 to fp32; rendered walkers gave > 0.99. `reid` may not import
`training` (whose renderer made the synthetic training data and the labelled scene), so this
is a small numpy renderer of its own: a walking figure of limb capsules between COCO keypoints,
random garment colours, front or back view, over a shaded and cluttered background with noise,
with the exact keypoints. A pure function of its arguments. `Encoder` draws them at half its
input size, so that they are upscaled as crops of people 50-170 px tall are (site-adapted
ViT-Tiny on 64 clips of `training.synthetic`, worst cosine of its standardised INT8 descriptors
to fp32's: 0.991 calibrated on half-size clips, 0.986 on full-size ones).
"""
from __future__ import annotations

import numpy as np

from .keypoints import COCO_KEYPOINTS

# (x, y) of each joint in person heights, x from the body's midline (the person's left is +x
# when seen from behind), y from the top of the head.
_POSE = {
    "nose": (0.0, 0.10), "eye": (0.025, 0.08), "ear": (0.058, 0.085), "shoulder": (0.12, 0.20),
    "elbow": (0.145, 0.37), "wrist": (0.15, 0.53), "hip": (0.075, 0.50), "knee": (0.08, 0.73),
    "ankle": (0.075, 0.96),
}
_LIMBS = (("shoulder", "elbow", "shirt", 0.032), ("elbow", "wrist", "sleeves", 0.027),
          ("hip", "knee", "trousers", 0.040), ("knee", "ankle", "trousers", 0.034))
_INDEX = {name: i for i, name in enumerate(COCO_KEYPOINTS)}


def _skeleton(height: float, cx: float, foot_y: float, phase: float, width_scale: float, front: bool) -> np.ndarray:
    """COCO keypoints [17, 3] (x, y, visible) of a walker at gait `phase`."""
    keypoints = np.ones((len(COCO_KEYPOINTS), 3), np.float32)
    top = foot_y - height
    for name, index in _INDEX.items():
        side, _, joint = name.partition("_") if name != "nose" else ("", "", "nose")
        x, y = _POSE[joint]
        sign = {"left": 1.0, "right": -1.0, "": 0.0}[side] * (-1.0 if front else 1.0)
        swing = np.sin(phase) * sign * (1.0 if joint in ("knee", "ankle") else -0.6 if joint in ("elbow", "wrist") else 0.0)
        keypoints[index, 0] = cx + (sign * x * width_scale + 0.03 * swing) * height
        keypoints[index, 1] = top + (y - 0.02 * max(swing, 0.0)) * height
    if not front:  # the face is hidden from behind
        keypoints[[_INDEX["nose"], _INDEX["left_eye"], _INDEX["right_eye"]], 2] = 0.0
    return keypoints


def _capsule(grid: tuple[np.ndarray, np.ndarray], a: np.ndarray, b: np.ndarray, radius: float) -> np.ndarray:
    """Pixels within `radius` of the segment a-b."""
    ys, xs = grid
    d = b - a
    t = np.clip(((xs - a[0]) * d[0] + (ys - a[1]) * d[1]) / max(float(d @ d), 1e-6), 0.0, 1.0)
    return (xs - a[0] - t * d[0]) ** 2 + (ys - a[1] - t * d[1]) ** 2 <= radius * radius


def synthetic_clips(count: int, num_frames: int, height: int, width: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """`count` clips of a rendered walker: uint8 RGB `[count, num_frames, height, width, 3]` and
    keypoints `[count, num_frames, 17, 3]` in pixels (what `Encoder.preprocess` takes)."""
    rng = np.random.default_rng(seed)
    grid = np.mgrid[0:height, 0:width].astype(np.float32)
    grid = (grid[0], grid[1])
    frames = np.empty((count, num_frames, height, width, 3), np.uint8)
    keypoints = np.empty((count, num_frames, len(COCO_KEYPOINTS), 3), np.float32)
    for clip in range(count):
        colours = {part: rng.uniform(20, 235, 3) for part in ("shirt", "sleeves", "trousers", "hair", "wall", "floor")}
        skin = rng.uniform(0.3, 0.95) * np.array([255.0, 210.0, 175.0])
        horizon = int(height * rng.uniform(0.5, 0.75))
        background = np.empty((height, width, 3), np.float32)
        background[:horizon], background[horizon:] = colours["wall"], colours["floor"] * 0.7
        background *= np.linspace(0.85, 1.15, height, dtype=np.float32)[:, None, None]
        for _ in range(int(rng.integers(1, 4))):  # posters, doors
            y0, x0 = int(rng.integers(0, horizon)), int(rng.integers(0, width))
            y1, x1 = y0 + int(rng.integers(1, height // 3 + 2)), x0 + int(rng.integers(1, width // 2 + 2))
            background[y0:y1, x0:x1] = rng.uniform(20, 235, 3)
        person = height * rng.uniform(0.8, 0.95)
        cx, width_scale, front = width * rng.uniform(0.42, 0.58), rng.uniform(0.85, 1.2), bool(rng.random() < 0.5)
        phase, gain, noise = rng.uniform(0, 2 * np.pi), rng.uniform(0.7, 1.25, 3), rng.uniform(2.0, 7.0)
        for t in range(num_frames):
            points = _skeleton(person, cx, height * 0.98, phase + t * 0.6, width_scale, front)
            joint = {name: points[i, :2] for name, i in _INDEX.items()}
            canvas = background.copy()
            for side in ("left", "right"):
                for a, b, part, radius in _LIMBS:
                    canvas[_capsule(grid, joint[f"{side}_{a}"], joint[f"{side}_{b}"], radius * person * width_scale)] = colours[part]
                canvas[_capsule(grid, joint[f"{side}_wrist"], joint[f"{side}_wrist"], 0.025 * person)] = skin
            shoulders = (joint["left_shoulder"] + joint["right_shoulder"]) / 2
            hips = (joint["left_hip"] + joint["right_hip"]) / 2
            canvas[_capsule(grid, shoulders, hips, 0.1 * person * width_scale)] = colours["shirt"]
            head = (joint["left_ear"] + joint["right_ear"]) / 2
            canvas[_capsule(grid, head, head, 0.068 * person)] = skin
            canvas[_capsule(grid, head - (0, 0.03 * person), head - (0, 0.03 * person), 0.06 * person)] = colours["hair"]
            canvas = canvas * gain + rng.normal(0.0, noise, canvas.shape)
            frames[clip, t] = np.clip(canvas, 0, 255).astype(np.uint8)
            keypoints[clip, t] = points
    return frames, keypoints
