"""Named model variants (timm style): `list_models()` and `build_model(name, **overrides)`."""
from __future__ import annotations

from pathlib import Path
from types import MappingProxyType
from typing import Any

import torch

from .config import ModelConfig
from .model import KeyReID

_PAPER = ModelConfig(backbone="vit_base_patch16_224")

MODEL_CONFIGS: MappingProxyType[str, ModelConfig] = MappingProxyType({
    # The paper's configuration: ViT-B/16 (ImageNet-21K weights from a file), KPS with six parts.
    "keyreid_vit_base": _PAPER,
    # CPU-friendly widths with the same architecture.
    "keyreid_vit_small": _PAPER.with_overrides(backbone="vit_small_patch16_224"),
    "keyreid_vit_tiny": _PAPER.with_overrides(backbone="vit_tiny_patch16_224"),
    # VID-Trans-ReID, the paper's primary baseline: four TCSS stripes, no keypoints; its released
    # TCSS is a fixed shift and shuffle applied at training and test alike.
    "vidtrans_vit_base": _PAPER.with_overrides(local="stripes", tcss_mode="fixed"),
    "vidtrans_vit_tiny": _PAPER.with_overrides(backbone="vit_tiny_patch16_224", local="stripes", tcss_mode="fixed"),
})


def list_models() -> list[str]:
    return sorted(MODEL_CONFIGS)


def get_config(name: str, **overrides: Any) -> ModelConfig:
    if name not in MODEL_CONFIGS:
        raise KeyError(f"unknown model {name!r}; available: {', '.join(list_models())}")
    return MODEL_CONFIGS[name].with_overrides(**overrides)


def build_model(name: str, pretrained: str | Path | None = None, seed: int | None = None, **overrides: Any) -> KeyReID:
    """Build a registered variant; `pretrained` is a local backbone weight file; `seed` makes the
    random initialisation reproducible without touching the global RNG."""
    config = get_config(name, **overrides)
    if seed is None:
        return KeyReID(config, pretrained)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return KeyReID(config, pretrained)
