"""Keypoints -> body-part heatmaps -> per-patch part importance.

The paper draws a Gaussian per joint at full image resolution, averages the joints of each
part (Eq. 5), average-pools onto the patch grid and averages over the clip's frames. A
Gaussian is separable, so pooling it over a rectangular patch window equals the product of
its pooled x and y profiles: `part_patch_importance` computes exactly the pooled result
without ever building an H x W map (the full-resolution maps stay available for tests and
visualisation). The released code's heatmap script drew nothing at all (DESIGN.md §4, defect 3).

Conventions: keypoints are `[..., 17, 3]` rows of (x, y, score) in input-pixel index
coordinates; a joint with score below `threshold` is missing. A part's heatmap is the mean
over its *visible* joints; a frame where a part is invisible does not dilute the clip
average (it is averaged over the frames that see the part), and a part seen in no frame
gets an all-zero importance (the model then falls back to uniform attention).
"""
from __future__ import annotations

import torch

from .keypoints import BODY_PARTS, NUM_KEYPOINTS

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


def part_heatmaps(keypoints: torch.Tensor, size: tuple[int, int], sigma: float, threshold: float = 0.1) -> torch.Tensor:
    """Full-resolution part heatmaps `[..., 6, H, W]` (Eq. 5 over visible joints)."""
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
) -> torch.Tensor:
    """Clip-level importance of every patch for every part: `[B, 6, n]` from keypoints `[B, T, 17, 3]`.

    Equals average-pooling `part_heatmaps` with the patch embedding's window and stride,
    flattening row-major like the patch tokens, and averaging over the frames that see the part.
    """
    height, width = img_size
    keypoints = keypoints.float()
    visible = _visibility(keypoints, threshold)
    pool_x = _window_average_matrix(width, patch_size, stride, keypoints.device, keypoints.dtype)
    pool_y = _window_average_matrix(height, patch_size, stride, keypoints.device, keypoints.dtype)
    pooled_x = _gaussian_profile(keypoints[..., 0], width, sigma) @ pool_x.T  # [B, T, 17, cols]
    pooled_y = _gaussian_profile(keypoints[..., 1], height, sigma) @ pool_y.T  # [B, T, 17, rows]
    joint_cells = pooled_y[..., :, None] * pooled_x[..., None, :]  # [B, T, 17, rows, cols]
    parts, part_seen = _part_average(joint_cells.flatten(-2), visible)  # [B, T, 6, n], [B, T, 6]
    frames_seen = part_seen.to(parts.dtype).sum(1)  # [B, 6]
    return parts.sum(1) / frames_seen.clamp(min=1.0)[..., None]
