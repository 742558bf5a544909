"""Keypoints -> body-part heatmaps -> per-patch part importance.

The paper draws a Gaussian per joint at full image resolution, averages the joints of each
part (Eq. 5), average-pools onto the patch grid and averages over the clip's frames. A
Gaussian is separable, so pooling it over a rectangular patch window equals the product of
its pooled x and y profiles: `part_patch_importance` computes exactly the pooled result
without ever building an H x W map (the full-resolution maps stay available for tests and
visualisation). The released code's heatmap script drew nothing at all (DESIGN.md §4, defect 3).

Two keypoint-to-part maps (`maps=`): `joints` is the paper's Eq. 5 above. With the sigma the
paper leaves open, joint blobs miss most of a part: at sigma 8 px on 256x128 crops the middle
of the torso (the shirt) is several sigma from every shoulder and hip. `limbs` draws a
Gaussian tube of the same sigma around each part's joint-to-joint segments (`PART_SEGMENTS`:
upper arms from the shoulder, thighs from the hip, the torso's outline and diagonals), the
part map being the maximum over its segments, so a part covers its whole body region. Limb
maps are not separable; they are pooled by averaging a 4-pixel sub-grid of each patch.

Conventions: keypoints are `[..., 17, 3]` rows of (x, y, score) in input-pixel index
coordinates; a joint with score below `threshold` is missing. A part's heatmap is the mean
over its *visible* joints; a frame where a part is invisible does not dilute the clip
average (it is averaged over the frames that see the part), and a part seen in no frame
gets an all-zero importance (the model then falls back to uniform attention).
"""
from __future__ import annotations

import torch

from .keypoints import BODY_PARTS, COCO_KEYPOINTS, NUM_KEYPOINTS

PART_MAPS: tuple[str, ...] = ("limbs", "joints")
_J = {name: i for i, name in enumerate(COCO_KEYPOINTS)}
# Segments (joint a, joint b) per part, in BODY_PARTS order; a == b is a single joint.
PART_SEGMENTS: dict[str, tuple[tuple[int, int], ...]] = {
    "head": tuple((j, j) for j in BODY_PARTS["head"]) + ((_J["left_ear"], _J["right_ear"]),),
    "torso": ((5, 6), (11, 12), (5, 11), (6, 12), (5, 12), (6, 11)),  # shoulders 5/6, hips 11/12
    "left_arm": ((_J["left_shoulder"], _J["left_elbow"]), (_J["left_elbow"], _J["left_wrist"])),
    "right_arm": ((_J["right_shoulder"], _J["right_elbow"]), (_J["right_elbow"], _J["right_wrist"])),
    "left_leg": ((_J["left_hip"], _J["left_knee"]), (_J["left_knee"], _J["left_ankle"])),
    "right_leg": ((_J["right_hip"], _J["right_knee"]), (_J["right_knee"], _J["right_ankle"])),
}
assert tuple(PART_SEGMENTS) == tuple(BODY_PARTS)
_SEGMENT_A = torch.tensor([a for segments in PART_SEGMENTS.values() for a, _ in segments])
_SEGMENT_B = torch.tensor([b for segments in PART_SEGMENTS.values() for _, b in segments])
_SEGMENT_PART = [part for part, segments in enumerate(PART_SEGMENTS.values()) for _ in segments]
_LIMB_SAMPLE_SPACING = 4  # pixels between sub-grid samples when pooling limb maps onto patches

_PART_MEMBERSHIP = torch.zeros(len(BODY_PARTS), NUM_KEYPOINTS)
for _part, _joints in enumerate(BODY_PARTS.values()):
    _PART_MEMBERSHIP[_part, list(_joints)] = 1.0
del _part, _joints


def part_membership(device: torch.device | None = None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """`[6, 17]` 0/1 matrix: which joints make up which part."""
    return _PART_MEMBERSHIP.to(device=device, dtype=dtype)


def _gaussian_profile(centres: torch.Tensor, length: int, sigma: float) -> torch.Tensor:
    """`[..., length]` unnormalised 1-D Gaussian around each centre (peak 1 at the centre pixel)."""
    positions = torch.arange(length, device=centres.device, dtype=centres.dtype)
    return torch.exp(-((positions - centres[..., None]) ** 2) / (2.0 * sigma**2))


def _visibility(keypoints: torch.Tensor, threshold: float) -> torch.Tensor:
    return (keypoints[..., 2] >= threshold) & (keypoints[..., 2] > 0)


def joint_heatmaps(keypoints: torch.Tensor, size: tuple[int, int], sigma: float, threshold: float = 0.1) -> torch.Tensor:
    """Full-resolution Gaussian per joint: `[..., 17, H, W]`, zero for missing joints."""
    height, width = size
    keypoints = keypoints.float()
    gx = _gaussian_profile(keypoints[..., 0], width, sigma)
    gy = _gaussian_profile(keypoints[..., 1], height, sigma)
    visible = _visibility(keypoints, threshold).to(gx.dtype)
    return gy[..., :, None] * gx[..., None, :] * visible[..., None, None]


def _part_average(joint_values: torch.Tensor, visible: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Average `[..., 17, *S]` joint maps into `[..., 6, *S]` part maps over visible joints."""
    membership = part_membership(joint_values.device, joint_values.dtype)
    spatial = joint_values.shape[visible.dim():]
    weights = membership * visible[..., None, :].to(joint_values.dtype)  # [..., 6, 17]
    counts = weights.sum(-1)  # [..., 6]
    flat = joint_values.reshape(*visible.shape, -1)  # [..., 17, S]
    parts = weights @ flat / counts.clamp(min=1.0)[..., None]
    return parts.reshape(*counts.shape, *spatial), counts > 0


def limb_maps(keypoints: torch.Tensor, ys: torch.Tensor, xs: torch.Tensor, sigma: float,
              threshold: float = 0.1) -> tuple[torch.Tensor, torch.Tensor]:
    """Limb part maps on the grid `ys x xs`: `[..., 6, len(ys), len(xs)]`, and `[..., 6]` whether
    the part has a visible segment (both ends visible). Value: max over the part's segments of
    exp(-d^2 / 2 sigma^2), d the distance to the segment."""
    keypoints = keypoints.float()
    visible = _visibility(keypoints, threshold)
    start, end = keypoints[..., _SEGMENT_A, :2], keypoints[..., _SEGMENT_B, :2]  # [..., S, 2]
    seg_visible = visible[..., _SEGMENT_A] & visible[..., _SEGMENT_B]  # [..., S]
    py, px = torch.meshgrid(ys.to(keypoints), xs.to(keypoints), indexing="ij")
    px, py = px.reshape(-1), py.reshape(-1)  # [N]
    ax, ay = start[..., 0, None], start[..., 1, None]  # [..., S, 1]
    dx, dy = end[..., 0, None] - ax, end[..., 1, None] - ay
    length2 = (dx * dx + dy * dy).clamp(min=1e-12)
    along = (((px - ax) * dx + (py - ay) * dy) / length2).clamp(0.0, 1.0)  # [..., S, N]
    distance2 = (px - ax - along * dx) ** 2 + (py - ay - along * dy) ** 2
    tubes = torch.exp(-distance2 / (2.0 * sigma**2)) * seg_visible[..., None].to(distance2.dtype)
    part_index = torch.tensor(_SEGMENT_PART, device=keypoints.device)
    maps = torch.stack([tubes[..., part_index == k, :].amax(-2) for k in range(len(BODY_PARTS))], dim=-2)
    seen = torch.stack([seg_visible[..., part_index == k].any(-1) for k in range(len(BODY_PARTS))], dim=-1)
    return maps.unflatten(-1, (len(ys), len(xs))), seen


def part_heatmaps(keypoints: torch.Tensor, size: tuple[int, int], sigma: float, threshold: float = 0.1,
                  maps: str = "joints") -> torch.Tensor:
    """Full-resolution part heatmaps `[..., 6, H, W]`: Eq. 5 over visible joints, or limb tubes."""
    if maps == "limbs":
        height, width = size
        return limb_maps(keypoints, torch.arange(height), torch.arange(width), sigma, threshold)[0]
    if maps != "joints":
        raise ValueError(f"part maps {maps!r} not in {PART_MAPS}")
    joints = joint_heatmaps(keypoints, size, sigma, threshold)
    parts, _ = _part_average(joints, _visibility(keypoints.float(), threshold))
    return parts


def _window_average_matrix(length: int, patch: int, stride: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """`[cells, length]` matrix that averages a 1-D profile over each patch window."""
    cells = (length - patch) // stride + 1
    starts = torch.arange(cells, device=device) * stride
    positions = torch.arange(length, device=device)
    inside = (positions[None, :] >= starts[:, None]) & (positions[None, :] < starts[:, None] + patch)
    return inside.to(dtype) / patch


def part_patch_importance(
    keypoints: torch.Tensor,
    img_size: tuple[int, int],
    patch_size: int,
    stride: int,
    sigma: float,
    threshold: float = 0.1,
    maps: str = "joints",
) -> torch.Tensor:
    """Clip-level importance of every patch for every part: `[B, 6, n]` from keypoints `[B, T, 17, 3]`.

    Equals average-pooling `part_heatmaps` with the patch embedding's window and stride (for
    `limbs`: the average over a sub-grid of samples 4 px apart in each window), flattening
    row-major like the patch tokens, and averaging over the frames that see the part.
    """
    height, width = img_size
    keypoints = keypoints.float()
    if maps == "limbs":
        rows, cols = (height - patch_size) // stride + 1, (width - patch_size) // stride + 1
        samples = max(1, patch_size // _LIMB_SAMPLE_SPACING)
        offsets = (torch.arange(samples, dtype=torch.float32) + 0.5) * (patch_size / samples) - 0.5
        ys = (torch.arange(rows)[:, None] * stride + offsets).reshape(-1)
        xs = (torch.arange(cols)[:, None] * stride + offsets).reshape(-1)
        sampled, part_seen = limb_maps(keypoints, ys, xs, sigma, threshold)  # [B, T, 6, rows*s, cols*s]
        parts = sampled.unflatten(-1, (cols, samples)).unflatten(-3, (rows, samples)).mean((-1, -3)).flatten(-2)
        frames_seen = part_seen.to(parts.dtype).sum(1)
        return parts.sum(1) / frames_seen.clamp(min=1.0)[..., None]
    if maps != "joints":
        raise ValueError(f"part maps {maps!r} not in {PART_MAPS}")
    visible = _visibility(keypoints, threshold)
    pool_x = _window_average_matrix(width, patch_size, stride, keypoints.device, keypoints.dtype)
    pool_y = _window_average_matrix(height, patch_size, stride, keypoints.device, keypoints.dtype)
    pooled_x = _gaussian_profile(keypoints[..., 0], width, sigma) @ pool_x.T  # [B, T, 17, cols]
    pooled_y = _gaussian_profile(keypoints[..., 1], height, sigma) @ pool_y.T  # [B, T, 17, rows]
    joint_cells = pooled_y[..., :, None] * pooled_x[..., None, :]  # [B, T, 17, rows, cols]
    parts, part_seen = _part_average(joint_cells.flatten(-2), visible)  # [B, T, 6, n], [B, T, 6]
    frames_seen = part_seen.to(parts.dtype).sum(1)  # [B, 6]
    return parts.sum(1) / frames_seen.clamp(min=1.0)[..., None]
