"""Keypoint backends: 17 COCO keypoints per tracked person, behind one small protocol.

- `yolo-pose`: the keypoints the pose detector already produced (no second network).
- `pifpaf`: OpenPifPaf on each person crop, the path of the KeyRe-ID paper (optional extra).
- `auto`: PifPaf when it is installed and its checkpoint loads, else YOLO-pose, with the reason.
"""
from __future__ import annotations

import importlib
import importlib.util
import logging
import os
from pathlib import Path
from typing import Protocol, runtime_checkable

import cv2
import numpy as np

from reid.keypoints import NUM_KEYPOINTS

from .tracklets import crop_box
from .types import Detection

LOG = logging.getLogger(__name__)

BACKEND_NAMES = ("auto", "pifpaf", "yolo-pose")


class KeypointBackendError(RuntimeError):
    """A keypoint backend was asked for but cannot run; the message says why and what to do."""


@runtime_checkable
class KeypointBackend(Protocol):
    """Estimates keypoints for the people detected in one frame."""

    name: str

    def estimate(self, image_rgb: np.ndarray, detections: list[Detection]) -> list[np.ndarray]:
        """One float32 [17, 3] (x, y, score) array in frame pixels per detection, same order."""
        ...


def _empty() -> np.ndarray:
    return np.zeros((NUM_KEYPOINTS, 3), dtype=np.float32)


class YoloPoseKeypoints:
    """The pose detector's own keypoints, passed through (zeros when a detection has none)."""

    name = "yolo-pose"

    def estimate(self, image_rgb: np.ndarray, detections: list[Detection]) -> list[np.ndarray]:
        return [np.asarray(d.keypoints, dtype=np.float32) if d.keypoints is not None else _empty()
                for d in detections]


class PifPafKeypoints:
    """OpenPifPaf (0.13 `openpifpaf.Predictor`) on each person's crop.

    Crops (box plus `crop_margin`) are resized to `crop_height` pixels tall before inference:
    people in surveillance video are often < 100 px, too small for PifPaf's stride-16 fields.
    In each crop the annotation whose keypoints best fall inside the detected box is taken.

    Args:
        checkpoint: a checkpoint file, or an OpenPifPaf model name (e.g. "shufflenetv2k16")
            found in its cache (torch hub `checkpoints/`) or downloaded when `download` is set.
        device: torch device string.
        download: let OpenPifPaf download a named checkpoint that is not cached.

    OpenPifPaf keeps its settings on classes (`Predictor.device`, `network.Factory.checkpoint`,
    ...). This adapter never calls `configure()`; it restores the class attribute the
    Predictor constructor writes and keeps device and model on the instance, so several
    cameras (or a test) can build differently configured backends in one process.
    """

    name = "pifpaf"

    def __init__(self, checkpoint: str | os.PathLike = "shufflenetv2k16", *, device: str = "cpu",
                 download: bool = True, crop_height: int = 256, crop_margin: float = 0.1,
                 min_score: float = 0.0) -> None:
        if importlib.util.find_spec("openpifpaf") is None:
            raise KeypointBackendError(
                "openpifpaf is not installed (optional extra: pip install 'keyreid[pifpaf]'; "
                "see DESIGN.md section 6 for building it against torch 2.x)")
        import torch
        openpifpaf = importlib.import_module("openpifpaf")
        factory_module = importlib.import_module("openpifpaf.network.factory")
        resolved = self._resolve_checkpoint(str(checkpoint), factory_module, download)
        factory_class = openpifpaf.network.Factory
        saved_checkpoint = factory_class.checkpoint
        try:
            predictor = openpifpaf.Predictor(checkpoint=resolved)
        except Exception as exc:  # any failure to build or load the network disqualifies it
            raise KeypointBackendError(f"checkpoint {checkpoint} could not be loaded: {exc}") from exc
        finally:
            factory_class.checkpoint = saved_checkpoint
        # Instance attributes shadow Predictor's class-level device for this predictor only.
        predictor.device = torch.device(device)
        predictor.model = predictor.model_cpu.to(predictor.device)
        self.predictor = predictor
        self.checkpoint = resolved
        self.crop_height = crop_height
        self.crop_margin = crop_margin
        self.min_score = min_score

    @staticmethod
    def _resolve_checkpoint(checkpoint: str, factory_module, download: bool) -> str:
        path = Path(checkpoint).expanduser()
        if path.suffix in (".pt", ".pkl", ".ckpt") or os.sep in checkpoint:
            if not path.is_file():
                raise KeypointBackendError(f"checkpoint {path} does not exist")
            return str(path)
        cached = factory_module.local_checkpoint_path(checkpoint)
        if cached:
            return cached
        if checkpoint not in factory_module.CHECKPOINT_URLS:
            raise KeypointBackendError(f"checkpoint {checkpoint!r} is neither a file nor an "
                                       f"OpenPifPaf model name")
        if not download:
            raise KeypointBackendError(f"checkpoint {checkpoint!r} is not in the OpenPifPaf "
                                       f"cache and downloads are off")
        return checkpoint  # OpenPifPaf downloads it into its cache

    def estimate(self, image_rgb: np.ndarray, detections: list[Detection]) -> list[np.ndarray]:
        height, width = image_rgb.shape[:2]
        out = []
        for detection in detections:
            x0, y0, xe, ye = crop_box(detection.box, self.crop_margin, width, height)
            scale = self.crop_height / (ye - y0)
            crop = cv2.resize(image_rgb[y0:ye, x0:xe],
                              (max(1, round((xe - x0) * scale)), self.crop_height),
                              interpolation=cv2.INTER_LINEAR)
            predictions, _, _ = self.predictor.numpy_image(crop)
            best = self._best_annotation(predictions, detection, (x0, y0), scale)
            out.append(best if best is not None else _empty())
        return out

    def _best_annotation(self, predictions, detection: Detection, origin: tuple[int, int],
                         scale: float) -> np.ndarray | None:
        """Frame-pixel keypoints of the annotation most inside the detected box."""
        x1, y1, x2, y2 = detection.box
        best, best_score = None, 0.0
        for annotation in predictions:
            data = np.asarray(annotation.data, dtype=np.float32)[:NUM_KEYPOINTS].copy()
            data[:, 0] = (data[:, 0] + 0.5) / scale - 0.5 + origin[0]
            data[:, 1] = (data[:, 1] + 0.5) / scale - 0.5 + origin[1]
            data[data[:, 2] < self.min_score, 2] = 0.0
            inside = ((data[:, 0] >= x1) & (data[:, 0] <= x2)
                      & (data[:, 1] >= y1) & (data[:, 1] <= y2))
            score = float((data[:, 2] * inside).sum())
            if score > best_score:
                best, best_score = data, score
        return best


def select_keypoint_backend(name: str = "auto", **options) -> tuple[KeypointBackend, str]:
    """Build the keypoint backend `name` ("auto", "pifpaf" or "yolo-pose").

    Returns the backend and a one-line reason for the choice, for the start-up log. `options`
    go to `PifPafKeypoints` (checkpoint, device, download, ...). `auto` falls back to YOLO-pose
    when OpenPifPaf is missing or its checkpoint does not load; an explicit "pifpaf" raises
    `KeypointBackendError` instead.
    """
    if name not in BACKEND_NAMES:
        raise ValueError(f"unknown keypoint backend {name!r}: use one of {BACKEND_NAMES}")
    if name == "yolo-pose":
        return YoloPoseKeypoints(), "yolo-pose requested: keypoints come from the detector"
    try:
        backend = PifPafKeypoints(**options)
    except KeypointBackendError as exc:
        if name == "pifpaf":
            raise
        reason = f"auto: using yolo-pose because {exc}"
        LOG.warning("keypoint backend %s", reason)
        return YoloPoseKeypoints(), reason
    return backend, f"{name}: OpenPifPaf with checkpoint {backend.checkpoint}"
