"""Backbone weights that load completely or fail loudly.

timm's own file loading (`pretrained_cfg_overlay=dict(file=...)`) is non-strict once the
classifier is dropped (`num_classes=0`): a file whose keys do not fit leaves a randomly
initialised ViT behind a single log line. Here every source is mapped explicitly onto timm's
ViT names, then loaded with a strict check of the backbone: a missing or unexpected key, or a
shape that does not fit, raises `PretrainedMismatch` naming the keys. Only classifier /
pooling heads we never use are skipped (`IGNORED_KEYS`), and the position embedding is
resampled to the model's patch grid (e.g. 197 -> 129 tokens) by timm's `checkpoint_filter_fn`.

Sources (`pretrained=`):
- `timm:NAME` (e.g. `timm:vit_base_patch16_224.augreg_in21k`): timm downloads the weights
  from the Hugging Face hub; offline this fails with a message saying so (never silently).
- a timm / ImageNet state dict: `.pth`, `.pt`, `.bin` (torch) or `.safetensors`, optionally
  wrapped in `state_dict` / `model` and prefixed `module.` (DDP);
- a TransReID / VID-Trans-ReID state dict (`base.`-prefixed backbone; `base.Cam`, their
  camera embedding, initialises ours when the camera count fits);
- the original JAX/Flax `.npz` (through timm's JAX loader, which raises on a missing array);
- one of our checkpoints (`keyreid.checkpoint`): the backbone with its global block and norm
  strictly, plus the rest of the model (temporal attention, part block, camera embedding, BN
  necks) wherever names and shapes fit: fine-tuning from a MARS model onto one's own cameras.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import re
from pathlib import Path
from typing import Any

import timm
import torch
import torch.nn as nn
from timm.layers import resample_abs_pos_embed
from timm.models.vision_transformer import checkpoint_filter_fn

log = logging.getLogger(__name__)

TIMM_PREFIX = "timm:"
KEYREID_FORMAT = "keyreid.checkpoint"  # == reid.checkpoints.CHECKPOINT_FORMAT (that module imports this one)
IGNORED_KEYS = re.compile(r"^(head|head_dist|fc_norm|pre_logits)(\.|$)")
_CONTAINERS = ("state_dict", "model", "module", "net")


class PretrainedMismatch(ValueError):
    """The weight file does not fit the backbone; the message names the offending keys."""


@dataclasses.dataclass(frozen=True)
class LoadReport:
    """What a pretrained load did: `format` of the source, backbone tensors loaded, file keys
    deliberately ignored (heads), and for our checkpoints the non-backbone `extras` tensors
    (in KeyReID names) with those that could not be used."""

    source: str
    format: str
    loaded: int
    ignored: tuple[str, ...] = ()
    extras: dict[str, torch.Tensor] = dataclasses.field(default_factory=dict, repr=False)


def _short(keys: list[str], limit: int = 12) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f", ... ({len(keys)} in all)" if len(keys) > limit else "")


def read_weight_file(path: Path) -> Any:
    """The raw content of a torch / safetensors file (tensors only: no code is unpickled)."""
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path), device="cpu")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # pickle, zip and weights_only errors have several types
        raise PretrainedMismatch(f"{path}: not a readable torch weight file ({error})") from error


def _unwrap(payload: Any, source: str) -> dict[str, torch.Tensor]:
    """The tensor dict inside common containers (`state_dict`, `model`, ...), `module.` stripped."""
    while isinstance(payload, dict) and not any(isinstance(v, torch.Tensor) for v in payload.values()):
        inner = next((payload[k] for k in _CONTAINERS if isinstance(payload.get(k), dict)), None)
        if inner is None:
            raise PretrainedMismatch(f"{source}: no tensors found (top-level keys: {_short(sorted(payload))})")
        payload = inner
    if not isinstance(payload, dict):
        raise PretrainedMismatch(f"{source}: expected a state dict, got {type(payload).__name__}")
    state = {k: v for k, v in payload.items() if isinstance(v, torch.Tensor)}
    if state and all(k.startswith("module.") for k in state):
        state = {k.removeprefix("module."): v for k, v in state.items()}
    return state


def keyreid_to_timm(state: dict[str, torch.Tensor], depth: int) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Split one of our state dicts into (timm ViT names, everything else in KeyReID names).

    Our trunk is the ViT minus its last block; that block and the final norm live on as
    `global_block` / `global_norm` (reid.model.KeyReID), so they map back to `blocks.{depth-1}`
    and `norm`."""
    backbone, extras = {}, {}
    for key, value in state.items():
        if key.startswith("backbone."):
            backbone[key.removeprefix("backbone.")] = value
        elif key.startswith("global_block."):
            backbone[f"blocks.{depth - 1}." + key.removeprefix("global_block.")] = value
        elif key.startswith("global_norm."):
            backbone["norm." + key.removeprefix("global_norm.")] = value
        else:
            extras[key] = value
    return backbone, extras


def transreid_to_timm(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """TransReID / VID-Trans-ReID (`self.base = vit(...)`): `base.*` is a timm-named ViT with all
    its blocks; `base.Cam` `[cameras, 1, D]` is their camera embedding. Their heads (`b1`, `b2`,
    bottlenecks, classifiers) belong to a different architecture and are not used."""
    backbone, extras = {}, {}
    for key, value in state.items():
        if key == "base.Cam":
            extras["camera_embed"] = value
        elif key.startswith("base."):
            backbone[key.removeprefix("base.")] = value
    return backbone, extras


def _checkpoint_grid(payload: dict[str, Any]) -> tuple[int, int]:
    from .config import ModelConfig

    return ModelConfig.from_dict(payload["config"]).grid_size


def _resample_grid(state: dict[str, torch.Tensor], source: tuple[int, int], target: tuple[int, int]) -> None:
    """Resample our checkpoints' position embedding from their own (non-square) patch grid:
    timm can only guess a square source grid from the token count."""
    if "pos_embed" in state and source != target:
        state["pos_embed"] = resample_abs_pos_embed(state["pos_embed"], new_size=target, old_size=source,
                                                    num_prefix_tokens=1)


def _timm_hub_state(name: str) -> dict[str, torch.Tensor]:
    """Weights of timm's pretrained `name`, downloaded through timm (Hugging Face hub)."""
    if not timm.list_pretrained(name):
        raise ValueError(f"timm has no pretrained weights named {name!r} (see timm.list_pretrained('vit_*'))")
    try:
        return timm.create_model(name, pretrained=True).state_dict()
    except Exception as error:  # hub / HTTP / offline errors come in many types
        raise RuntimeError(
            f"--pretrained {TIMM_PREFIX}{name}: timm could not fetch the weights ({type(error).__name__}: {error}). "
            f"This machine looks offline (HF_HUB_OFFLINE={os.environ.get('HF_HUB_OFFLINE', 'unset')}): "
            f"download them where there is a network, e.g. "
            f"`timm.create_model('{name}', pretrained=True)` then `torch.save(model.state_dict(), 'vit.pth')`, "
            f"and pass the file") from error


def load_backbone_weights(backbone: nn.Module, source: str | Path) -> LoadReport:
    """Load `source` (see the module docstring) into a full timm ViT `backbone` strictly.

    Raises FileNotFoundError, PretrainedMismatch (naming missing / unexpected / misshapen keys)
    or RuntimeError (a `timm:` download that failed)."""
    text = str(source)
    extras: dict[str, torch.Tensor] = {}
    if text.startswith(TIMM_PREFIX):
        state, kind = _timm_hub_state(text.removeprefix(TIMM_PREFIX)), "timm-hub"
    else:
        path = Path(source)
        if not path.is_file():
            raise FileNotFoundError(f"pretrained weights not found: {path}")
        if path.suffix == ".npz":
            try:
                backbone.load_pretrained(str(path))
            except KeyError as error:
                raise PretrainedMismatch(f"{path}: the JAX/Flax checkpoint lacks array {error} for "
                                         f"{type(backbone).__name__}") from error
            log.info("loaded %s (JAX .npz through timm)", path)
            return LoadReport(source=text, format="jax-npz", loaded=len(backbone.state_dict()))
        payload = read_weight_file(path)
        if isinstance(payload, dict) and payload.get("format") == KEYREID_FORMAT:
            state, extras = keyreid_to_timm(_unwrap(payload["state_dict"], text), len(backbone.blocks))
            _resample_grid(state, _checkpoint_grid(payload), tuple(backbone.patch_embed.grid_size))
            kind = "keyreid-checkpoint"
        else:
            state = _unwrap(payload, text)
            if any(k.startswith("base.") for k in state):
                state, extras = transreid_to_timm(state)
                kind = "transreid"
            else:
                kind = "timm-state-dict"
    ignored = sorted(k for k in state if IGNORED_KEYS.match(k))
    state = {k: v for k, v in state.items() if not IGNORED_KEYS.match(k)}
    try:
        state = checkpoint_filter_fn(state, backbone)  # resamples pos_embed / patch kernel to this model
    except Exception as error:
        raise PretrainedMismatch(f"{text}: timm could not adapt the weights to {type(backbone).__name__} ({error})") from error
    expected = backbone.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    misshapen = sorted(f"{k} {tuple(state[k].shape)} vs {tuple(expected[k].shape)}"
                       for k in set(state) & set(expected) if state[k].shape != expected[k].shape)
    if missing or unexpected or misshapen:
        problems = [f"{label} ({len(keys)}): {_short(keys)}" for label, keys in
                    (("missing", missing), ("unexpected", unexpected), ("shape mismatch", misshapen)) if keys]
        raise PretrainedMismatch(f"{text} ({kind}) does not fit the {len(expected)}-tensor backbone; "
                                 + "; ".join(problems))
    backbone.load_state_dict(state, strict=True)
    log.info("loaded %d backbone tensors from %s (%s)%s", len(state), text, kind,
             f"; ignored heads: {_short(ignored)}" if ignored else "")
    return LoadReport(source=text, format=kind, loaded=len(state), ignored=tuple(ignored), extras=extras)
