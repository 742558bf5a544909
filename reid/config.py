"""The one description of a KeyRe-ID model: every variant in the registry and every checkpoint is a `ModelConfig`."""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace
from typing import Any

LOCAL_MODES = ("keypoints", "stripes", "whole", "none")
KPS_MODES = ("prior", "multiply")
TCSS_MODES = ("random", "fixed")
PART_MAPS = ("limbs", "joints")
PART_SCALES = ("sqrt", "k")
# What a config written before a field existed meant (old checkpoints keep their behaviour).
LEGACY_DEFAULTS = {"tcss_mode": "fixed", "part_maps": "joints", "part_scale": "k"}


@dataclass(frozen=True)
class ModelConfig:
    """Architecture and input conventions of one model.

    `local` picks the local branch: `keypoints` (KeyRe-ID's KPS, six body parts), `stripes`
    (VID-Trans-ReID's horizontal stripes), `whole` (one local token over all patches: the
    "without KPS" ablation) or `none` (global branch only). `use_global=False` is the
    "local branch only" ablation.

    `tcss_mode`: `random` (the paper's TCSS: a random per-patch circular shift of the frames,
    a training-time perturbation, off at inference) or `fixed` (the rotation by patch index
    applied at training and inference alike, as this project first did). `part_maps`: `limbs`
    (Gaussian tube around each part's joint-to-joint segments, the default) or `joints` (the
    paper's Eq. 5: mean of per-joint Gaussians), both with `heatmap_sigma` in input pixels.
    `part_scale`: parts enter the descriptor divided by `sqrt` K (the local block keeps the
    same weight next to the global feature whatever the number K of parts, so ablations with
    K = 1, 4 or 6 compare part mechanisms, not descriptor balances) or by `k` (the paper's).
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
    tcss_mode: str = "random"
    tcss_shift: int = 5
    tcss_groups: int = 2
    num_stripes: int = 4
    part_heads: int | None = None
    attention_dim: int = 256
    heatmap_sigma: float = 8.0
    part_maps: str = "limbs"
    part_scale: str = "sqrt"
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
        for name, allowed in (("tcss_mode", TCSS_MODES), ("part_maps", PART_MAPS), ("part_scale", PART_SCALES)):
            if getattr(self, name) not in allowed:
                problems.append(f"{name}={getattr(self, name)!r} (choose from {allowed})")
        if self.heatmap_sigma <= 0:
            problems.append(f"heatmap_sigma={self.heatmap_sigma} must be > 0")
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
        legacy = {k: v for k, v in LEGACY_DEFAULTS.items() if k not in values}
        return cls(**{**legacy, **values, **tuples})

    def with_overrides(self, **overrides: Any) -> "ModelConfig":
        known = {f.name for f in fields(self)}
        unknown = sorted(set(overrides) - known)
        if unknown:
            raise ValueError(f"unknown model option(s) {unknown}; valid options: {sorted(known)}")
        tuples = {k: tuple(v) for k, v in overrides.items() if isinstance(v, list)}
        return replace(self, **{**overrides, **tuples})
