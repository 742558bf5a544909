"""One file = one usable model: weights plus the config that built them.

Training checkpoints add optimizer state and the like under other keys; `load_model` reads
only what inference needs, so the watcher's `Encoder` loads a training checkpoint directly.
"""
from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import torch

from .config import ModelConfig
from .model import KeyReID

CHECKPOINT_FORMAT = "keyreid.checkpoint"
CHECKPOINT_VERSION = 1


def checkpoint_payload(model: KeyReID, name: str, **extra: Any) -> dict[str, Any]:
    """The dict `save_checkpoint` writes; training adds its own keys (optimizer, epoch, ...)."""
    return {
        "format": CHECKPOINT_FORMAT,
        "version": CHECKPOINT_VERSION,
        "model_name": name,
        "config": model.config.to_dict(),
        "state_dict": model.state_dict(),
        **extra,
    }


def save_checkpoint(model: KeyReID, path: str | Path, name: str, **extra: Any) -> Path:
    return write_checkpoint(checkpoint_payload(model, name, **extra), path)


def write_checkpoint(payload: dict[str, Any], path: str | Path) -> Path:
    """Write a payload (`checkpoint_payload`, or `read_checkpoint`'s with keys added, as
    `training.project` adds a projection) atomically: a crash never leaves a half-written file."""
    if payload.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"not a keyreid checkpoint payload (no '{CHECKPOINT_FORMAT}' format marker)")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_suffix(path.suffix + ".tmp")
    torch.save(payload, temporary)
    temporary.replace(path)
    return path


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"re-id checkpoint not found: {path}")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises several types for foreign or corrupt files
        raise ValueError(f"{path}: not a readable checkpoint ({error})") from error
    if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path}: not a keyreid checkpoint (no '{CHECKPOINT_FORMAT}' format marker)")
    if payload.get("version", 0) > CHECKPOINT_VERSION:
        raise ValueError(f"{path}: checkpoint version {payload['version']} is newer than this program ({CHECKPOINT_VERSION})")
    return payload


def load_model(path: str | Path) -> tuple[KeyReID, dict[str, Any]]:
    """Rebuild the model a checkpoint describes and load its weights (strictly)."""
    payload = read_checkpoint(path)
    config = ModelConfig.from_dict(payload["config"])
    model = KeyReID(config)
    model.load_state_dict(payload["state_dict"])
    return model, payload


def file_digest(path: str | Path, length: int = 12) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()[:length]
