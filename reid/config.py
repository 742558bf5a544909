"""The one description of a KeyRe-ID model: every variant in the registry and every checkpoint is a `ModelConfig`."""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace
from typing import Any

LOCAL_MODES = ("keypoints", "stripes", "whole", "none")
KPS_MODES = ("prior", "multiply")


@dataclass(frozen=True)
class ModelConfig:
    """Architecture and input conventions of one model.

    `local` picks the local branch: `keypoints` (KeyRe-ID's KPS, six body parts), `stripes`
    (VID-Trans-ReID's horizontal stripes), `whole` (one local token over all patches: the
    "without KPS" ablation) or `none` (global branch only). `use_global=False` is the
    "local branch only" ablation.
    """

    backbone: str = "vit_base_patch16_224"
    img_size: tuple[int, int] = (256, 128)
    patch_size: int = 16
    stride: int = 16
    depth: int | None = None
    num_frames: int = 4
    num_cameras: int = 8
    camera_weight: float = 3.0
    drop_path: float = 0.1
    use_global: bool = True
    local: str = "keypoints"
    kps_mode: str = "prior"
    prior_floor: float = 1e-4
    tcss: bool = True
    tcss_shift: int = 5
    tcss_groups: int = 2
    num_stripes: int = 4
    part_heads: int | None = None
    attention_dim: int = 256
    heatmap_sigma: float = 8.0
    keypoint_threshold: float = 0.1
    mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    std: tuple[float, float, float] = (0.5, 0.5, 0.5)
    num_classes: int = 0

    def __post_init__(self) -> None:
        problems = []
        if self.local not in LOCAL_MODES:
            problems.append(f"local={self.local!r} (choose from {LOCAL_MODES})")
        if self.kps_mode not in KPS_MODES:
            problems.append(f"kps_mode={self.kps_mode!r} (choose from {KPS_MODES})")
        if not self.use_global and self.local == "none":
            problems.append("use_global=False with local='none' leaves no branch")
        if self.stride <= 0 or self.stride > self.patch_size:
            problems.append(f"stride={self.stride} must be in 1..patch_size ({self.patch_size})")
        if self.num_frames < 1 or self.num_cameras < 1:
            problems.append("num_frames and num_cameras must be >= 1")
        if problems:
            raise ValueError("invalid model config: " + "; ".join(problems))

    @property
    def grid_size(self) -> tuple[int, int]:
        """Patch grid (rows, columns) produced by the patch embedding."""
        height, width = self.img_size
        return ((height - self.patch_size) // self.stride + 1, (width - self.patch_size) // self.stride + 1)

    @property
    def num_patches(self) -> int:
        rows, cols = self.grid_size
        return rows * cols

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "ModelConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown model config fields {unknown}: written by a newer keyreid?")
        tuples = {k: tuple(v) for k, v in values.items() if isinstance(v, list)}
        return cls(**{**values, **tuples})

    def with_overrides(self, **overrides: Any) -> "ModelConfig":
        known = {f.name for f in fields(self)}
        unknown = sorted(set(overrides) - known)
        if unknown:
            raise ValueError(f"unknown model option(s) {unknown}; valid options: {sorted(known)}")
        tuples = {k: tuple(v) for k, v in overrides.items() if isinstance(v, list)}
        return replace(self, **{**overrides, **tuples})
