"""`Encoder`: clips of person crops in, float32 KeyRe-ID descriptors out.

CPU preprocessing (resize, keypoint rescaling, normalisation) is separate from the batched
model step so a service can prepare clips on workers and batch them on the accelerator.
"""
from __future__ import annotations

import hashlib
import importlib.util
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F

from .checkpoints import file_digest, load_model
from .normalisation import CROSS_GENUINE_KEY, PAYLOAD_KEY, CameraNormalisation
from .projection import PAYLOAD_KEY as PROJECTION_KEY
from .projection import Projection, needs_projection
from .registry import build_model

if TYPE_CHECKING:
    from .export import OnnxRunner

log = logging.getLogger(__name__)

UNTRAINED_SEED = 0


def _network_digest(network: torch.nn.Module) -> str:
    """12 hex digits of SHA-256 over the model's configuration and weights."""
    digest = hashlib.sha256(repr(getattr(network, "config", None)).encode())
    for name, tensor in network.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:12]
RUNTIMES = ("auto", "torch", "openvino", "onnxruntime")


def resolve_runtime(runtime: str, device: torch.device, precision: str = "auto") -> tuple[str, str]:
    """The runtime to use and why. `auto`: torch on CUDA; on the CPU ONNX Runtime, else OpenVINO,
    else torch (whichever is installed), OpenVINO first for bf16 and int8 (ONNX Runtime has neither), which
    precision `auto` is on a CPU with bf16 units (`reid.export.resolve_precision`). For
    ViT-Tiny at one thread, interleaved: ONNX Runtime 11-13 clips/s, torch and OpenVINO fp32
    8-9, OpenVINO bf16 16-18. An explicit runtime that is not installed falls back to torch with
    the reason, so the service never fails for a speed-up."""
    if runtime not in RUNTIMES:
        raise ValueError(f"runtime={runtime!r}: choose {', '.join(RUNTIMES)}")
    if runtime == "torch":
        return "torch", "runtime: torch (configured)"
    if runtime == "auto":
        if device.type != "cpu":
            return "torch", f"runtime auto: torch on {device.type}"
        openvino_only = precision in ("bf16", "int8") or (precision == "auto" and _openvino_bf16_available())
        order = ("openvino", "onnxruntime") if openvino_only else ("onnxruntime", "openvino")
        for candidate in order:
            if importlib.util.find_spec(candidate) is not None:
                return candidate, f"runtime auto: {candidate} on the CPU"
        return "torch", "runtime auto: torch (neither openvino nor onnxruntime is installed)"
    if importlib.util.find_spec(runtime) is None:
        return "torch", f"runtime {runtime} unavailable (not installed): torch"
    return runtime, f"runtime: {runtime} (configured)"


def _openvino_bf16_available() -> bool:
    if importlib.util.find_spec("openvino") is None:
        return False
    from .export import openvino_cpu_has_bf16

    return openvino_cpu_has_bf16()


def _resolve_device(device: str | torch.device | None) -> torch.device:
    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device 'cuda' was requested but CUDA is not available on this machine")
    return device


class Encoder:
    """Inference wrapper around a KeyRe-ID model.

    `checkpoint`: a file written by `reid.checkpoints.save_checkpoint` or by training (it
    carries its own config, so `model` is ignored). Without one, the named variant is built
    with a fixed seed: every process gets the same, *untrained*, embeddings — useful for
    plumbing, useless for re-identification, and said loudly.
    `precision`: "auto" (bf16 autocast on CUDA when supported, else fp16; on the CPU bf16 with
    OpenVINO where the CPU has bf16 units, else fp32), "fp32", "bf16", "fp16" or "int8"
    (OpenVINO only: `reid.export.cached_int8`, an NNCF quantisation of the export calibrated
    once, about 15 s for ViT-Tiny, on `calibration`: uint8 clips and keypoints as `encode` takes
    them, by default `reid.calibration.synthetic_clips`, rendered walkers).
    `runtime`: "torch", "openvino", "onnxruntime" or "auto" (`resolve_runtime`). The latter two
    run the optimised inference graph exported to ONNX (`reid.export`, cached in `export_dir`)
    on the CPU, with `threads` threads (None: the runtime's default, every core); in fp32 their
    descriptors are within 1e-4 relative of torch (bf16: ~1e-2). If the export fails the
    encoder runs torch and says why (`runtime_reason`).
    A site-adapted checkpoint (`training.adapt`) also carries per-camera descriptor statistics
    (`reid.normalisation`): `encode(..., cameras=[...])` then standardises each clip's
    descriptor by its camera's statistics (`camera_normalisation`, None otherwise), and the
    distances of its mined cross-camera associations (`cross_camera_genuine`), which the
    watcher's linker takes as cross-camera genuine labels.
    `compact` (default): descriptors are projected to `reid.projection.COMPACT_DIM` (2 KiB per
    clip in storage's float16) after that normalisation, by the checkpoint's fitted PCA
    (`training.project`) or, without one, a fixed seeded random projection; `model_id` names
    the projection. `compact=False` gives the full descriptor (evaluation, comparison, fitting
    a projection), under the id the full descriptor always had.
    """

    def __init__(
        self,
        checkpoint: str | Path | None = None,
        model: str = "keyreid_vit_tiny",
        device: str | torch.device | None = None,
        batch_size: int = 32,
        precision: str = "auto",
        runtime: str = "torch",
        threads: int | None = None,
        export_dir: str | Path | None = None,
        compact: bool = True,
        calibration: tuple[np.ndarray, np.ndarray] | None = None,
        **overrides,
    ) -> None:
        self.device = _resolve_device(device)
        self.runtime, self.runtime_reason = resolve_runtime(runtime, self.device, precision)
        self.camera_normalisation: CameraNormalisation | None = None
        self.cross_camera_genuine: np.ndarray | None = None
        fitted: Projection | None = None
        if checkpoint is not None:
            network, payload = load_model(checkpoint)
            if payload.get(PROJECTION_KEY) is not None:
                fitted = Projection.from_payload(payload[PROJECTION_KEY])
            if payload.get(PAYLOAD_KEY) is not None:
                self.camera_normalisation = CameraNormalisation.from_payload(payload[PAYLOAD_KEY])
            if payload.get(CROSS_GENUINE_KEY) is not None:
                self.cross_camera_genuine = np.asarray(payload[CROSS_GENUINE_KEY], dtype=np.float64)
            self.model_name = payload.get("model_name", "custom")
            self.model_id = f"{self.model_name}@{file_digest(checkpoint)}"
            self.trained = True
        else:
            network = build_model(model, seed=UNTRAINED_SEED, **overrides)
            self.model_name = model
            # The id names everything that shapes the descriptors, so stores never mix
            # embeddings: the overrides in words, and a digest of the resolved configuration and
            # weights (a release that changes a default or the initialisation gets a new id).
            changed = "".join(f",{k}={v}" for k, v in sorted(overrides.items())).replace(" ", "")
            self.model_id = (f"{model}{'[' + changed[1:] + ']' if changed else ''}"
                             f"@untrained-seed{UNTRAINED_SEED}-{_network_digest(network)}")
            self.trained = False
            log.warning(
                "\n%s\nNO RE-ID CHECKPOINT: %s is randomly initialised. Its embeddings are UNTRAINED and will\n"
                "not re-identify people. Train one with `python -m training.train` and pass it as a checkpoint.\n%s",
                "!" * 78, model, "!" * 78,
            )
        self.projection = self._projection(network.descriptor_dim, fitted) if compact else None
        if self.projection is not None:
            self.model_id += f"+{self.projection.tag}"
        self.model = network.to(self.device).eval()
        self.config = network.config
        self.batch_size = batch_size
        self.autocast_dtype = self._autocast_dtype(precision)
        self._mean = torch.tensor(self.config.mean).view(1, 1, 3, 1, 1)
        self._std = torch.tensor(self.config.std).view(1, 1, 3, 1, 1)
        self.runner = None
        if self.runtime != "torch":
            self.runner = self._exported_runner(export_dir, threads, precision, calibration)
        log.info("encoder: %s", self.runtime_reason)

    @staticmethod
    def _projection(full_dim: int, fitted: Projection | None) -> Projection | None:
        """The checkpoint's fitted projection, else the seeded random one (None at or below the
        compact size: nothing to gain)."""
        if fitted is not None:
            if fitted.input_dim != full_dim:
                raise ValueError(f"the checkpoint's projection takes {fitted.input_dim}-d descriptors but its "
                                 f"model makes {full_dim}-d ones: refit it (`python -m training.project`)")
            return fitted
        return Projection.random(full_dim) if needs_projection(full_dim) else None

    def _autocast_dtype(self, precision: str) -> torch.dtype | None:
        choices = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
        if precision == "auto":
            if self.device.type != "cuda":
                return None
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        if precision == "int8":
            if self.runtime == "torch":
                raise ValueError("precision='int8' needs runtime='openvino' (or 'auto' with OpenVINO installed), "
                                 f"not torch ({self.runtime_reason})")
            return None  # if the INT8 model fails, torch runs fp32
        if precision not in choices:
            raise ValueError(f"precision={precision!r}: choose auto, fp32, bf16, fp16 or int8 (OpenVINO)")
        return choices[precision]

    def _exported_runner(self, export_dir: str | Path | None, threads: int | None, precision: str,
                         calibration: tuple[np.ndarray, np.ndarray] | None) -> "OnnxRunner | None":
        """The OpenVINO / ONNX Runtime runner of the exported graph; None (torch) if that fails."""
        from .export import OnnxRunner, cached_int8, cached_onnx, resolve_precision

        if self.device.type != "cpu":
            raise ValueError(f"runtime {self.runtime!r} runs on the CPU, not {self.device}")
        exported_precision = resolve_precision(self.runtime, precision)
        self.runtime_reason += f", {exported_precision}"
        try:
            path = cached_onnx(self.model, self.model_name, export_dir)
            if exported_precision == "int8":
                path = cached_int8(path, self._calibration_inputs(calibration))
            return OnnxRunner(path, self.runtime, threads=threads, precision=exported_precision)
        except Exception as exc:  # noqa: BLE001 - any export / load failure: run torch, say why
            self.runtime_reason = f"{self.runtime} failed ({type(exc).__name__}: {exc}); falling back to torch"
            log.warning("encoder: %s", self.runtime_reason)
            self.runtime = "torch"
            return None

    def _calibration_inputs(self, calibration: tuple[np.ndarray, np.ndarray] | None) -> tuple[np.ndarray, ...]:
        """The INT8 calibration clips as the graph takes them (unknown camera, as the watcher encodes)."""
        from .calibration import synthetic_clips
        from .export import CALIBRATION_CLIPS

        if calibration is None:  # drawn at half size and upscaled, as camera crops of people are
            height, width = self.config.img_size
            calibration = synthetic_clips(CALIBRATION_CLIPS, self.num_frames, height // 2, width // 2)
        images, points = self.preprocess(*calibration)
        return images.numpy(), points.numpy(), np.full(images.shape[0], -1, dtype=np.int64)

    @property
    def dim(self) -> int:
        """The dimension `encode` returns (projected when `compact`)."""
        return self.full_dim if self.projection is None else self.projection.dim

    @property
    def full_dim(self) -> int:
        """The model's own descriptor dimension (what `encode_tensors` returns)."""
        return self.model.descriptor_dim

    @property
    def num_frames(self) -> int:
        return self.config.num_frames

    def preprocess(self, frames: np.ndarray, keypoints: np.ndarray | None) -> tuple[torch.Tensor, torch.Tensor]:
        """uint8 `[N, T, h, w, 3]` RGB crops (any size) and keypoints `[N, T, 17, 3]` in crop pixels ->
        normalised float `[N, T, 3, H, W]` and keypoints in model-input pixels (CPU)."""
        frames = np.asarray(frames)
        if frames.ndim != 5 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
            raise ValueError(f"frames must be uint8 [N, T, H, W, 3] RGB, got {frames.dtype} {frames.shape}")
        count, num_frames, height, width = frames.shape[:4]
        if num_frames != self.num_frames:
            raise ValueError(f"clips must have {self.num_frames} frames, got {num_frames}")
        if keypoints is None:
            keypoints = np.zeros((count, num_frames, 17, 3), dtype=np.float32)
        keypoints = np.asarray(keypoints, dtype=np.float32)
        if keypoints.shape != (count, num_frames, 17, 3):
            raise ValueError(f"keypoints must be [N, T, 17, 3] = {(count, num_frames, 17, 3)}, got {keypoints.shape}")
        out_h, out_w = self.config.img_size
        images = torch.from_numpy(frames).flatten(0, 1).permute(0, 3, 1, 2).float().div_(255.0)
        if (height, width) != (out_h, out_w):
            images = F.interpolate(images, size=(out_h, out_w), mode="bilinear", align_corners=False, antialias=True)
        images = images.view(count, num_frames, 3, out_h, out_w)
        images = (images - self._mean) / self._std
        scaled = torch.from_numpy(keypoints).clone()
        # pixel-index coordinates: centre of pixel i sits at i, so scale about the pixel edges
        scaled[..., 0] = (scaled[..., 0] + 0.5) * (out_w / width) - 0.5
        scaled[..., 1] = (scaled[..., 1] + 0.5) * (out_h / height) - 0.5
        return images, scaled

    @torch.inference_mode()
    def encode_tensors(self, images: torch.Tensor, keypoints: torch.Tensor, camera_ids: torch.Tensor) -> np.ndarray:
        """The batched accelerator step on preprocessed clips: full `[N, full_dim]` descriptors
        (`encode` then normalises and projects them)."""
        if self.runner is not None:
            return self._encode_exported(images, keypoints, camera_ids)
        outputs = []
        for start in range(0, images.shape[0], self.batch_size):
            stop = start + self.batch_size
            batch = images[start:stop].to(self.device, non_blocking=True)
            points = keypoints[start:stop].to(self.device, non_blocking=True)
            cams = camera_ids[start:stop].to(self.device)
            with torch.autocast(self.device.type, dtype=self.autocast_dtype, enabled=self.autocast_dtype is not None):
                descriptors = self.model.descriptor(self.model(batch, points, cams))
            outputs.append(descriptors.float().cpu())
        if not outputs:
            return np.zeros((0, self.full_dim), dtype=np.float32)
        return torch.cat(outputs).numpy()

    def _encode_exported(self, images: torch.Tensor, keypoints: torch.Tensor, camera_ids: torch.Tensor) -> np.ndarray:
        if camera_ids.numel() and int(camera_ids.max()) >= self.config.num_cameras:
            # the torch model raises this itself; the exported graph has no such check
            raise ValueError(f"camera id {int(camera_ids.max())} >= num_cameras={self.config.num_cameras}")
        outputs = [self.runner(images[start:start + self.batch_size].numpy(), keypoints[start:start + self.batch_size].numpy(),
                               camera_ids[start:start + self.batch_size].numpy())
                   for start in range(0, images.shape[0], self.batch_size)]
        if not outputs:
            return np.zeros((0, self.full_dim), dtype=np.float32)
        return np.concatenate(outputs).astype(np.float32, copy=False)

    def encode(self, frames: np.ndarray, keypoints: np.ndarray | None, camera_ids: np.ndarray | list[int] | None = None,
               cameras: Sequence[str | None] | None = None) -> np.ndarray:
        """Descriptors float32 `[N, dim]` for N clips. Camera ids index the model's camera
        embedding; -1 (the default) means a camera the model was not trained on. `cameras`: the
        site's camera id of each clip, for a checkpoint with camera statistics (None, or an id
        the statistics do not know: pooled statistics)."""
        images, points = self.preprocess(frames, keypoints)
        count = images.shape[0]
        if camera_ids is None:
            cams = torch.full((count,), -1, dtype=torch.long)
        else:
            cams = torch.as_tensor(np.asarray(camera_ids), dtype=torch.long).view(-1)
            if cams.shape[0] != count:
                raise ValueError(f"{cams.shape[0]} camera ids for {count} clips")
        descriptors = self.encode_tensors(images, points, cams)
        if self.camera_normalisation is not None:
            descriptors = self.camera_normalisation.apply(descriptors, cameras)
        if self.projection is not None:
            # in numpy for torch and the exported runtimes alike: it follows the per-camera
            # statistics, which are applied here by camera name, outside any graph
            descriptors = self.projection.apply(descriptors)
        return descriptors
