"""`python -m reid.export`: the encoder's optimised inference graph as ONNX, for OpenVINO / ONNX Runtime.

The exported graph is exactly what `KeyReID.forward` runs at inference (the global and part
blocks computed for [CLS] only, part keys/values shared, heatmaps from keypoints inside the
graph) followed by `KeyReID.descriptor`: clips in, descriptors out, batch dimension dynamic.
Inputs: `frames` float32 [B, T, 3, H, W] normalised, `keypoints` float32 [B, T, 17, 3] in
model-input pixels, `camera_ids` int64 [B] (-1 = unknown camera); output `descriptor` [B, dim].
A graph that does not use an input (no keypoints for `stripes`) may not declare it.
The graph ends at the full descriptor: `reid.Encoder` standardises it per camera and then
projects it to the compact descriptor (`reid.projection`) in numpy, for torch and the exported
runtimes alike. Both steps are keyed outside the graph (camera statistics by the site's camera
name), the projection must follow the statistics, and a [D, 1024] product is ~0.1% of the
encoder's cost, so one code path serves every runtime and a refitted projection never needs a
new export.

`cached_onnx` keeps one export per (weights, config, model code, torch version) in a cache
folder, checksummed, so a watcher exports once and a changed checkpoint or model code never
reuses a stale graph (the few most recently used per model name are kept). Only torch is needed to export; running needs `openvino` or `onnxruntime`.
`cached_int8` does the same for precision "int8": an NNCF post-training quantisation of that
export for OpenVINO, calibrated on rendered person clips (`reid.calibration`) or the caller's.
"""
from __future__ import annotations

import argparse
import functools
import hashlib
import importlib.util
import json
import logging
import os
import re
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn as nn

from .checkpoints import file_digest
from .model import KeyReID

if TYPE_CHECKING:
    import openvino as ov

Calibration = tuple[np.ndarray, np.ndarray, np.ndarray]  # preprocessed frames, keypoints, camera ids

log = logging.getLogger(__name__)

INPUTS = ("frames", "keypoints", "camera_ids")
OUTPUT = "descriptor"
OPSET = 17
EXPORT_LAYOUT = 1  # bump when the exported graph's contract changes
KEEP_PER_MODEL = 4  # cached exports kept per model name, most recently used first
CACHE_ENV = "KEYREID_CACHE"
RUNTIME_PACKAGES = {"openvino": "openvino", "onnxruntime": "onnxruntime"}
PRECISIONS = ("fp32", "bf16", "int8")  # of the exported graph; bf16 and int8 with OpenVINO only
CALIBRATION_CLIPS = 32  # ViT-Tiny, worst cosine to fp32: 16 clips 0.980, 32 0.995; 64 no better than 32
INT8_LAYOUT = 1  # bump when the quantisation recipe (`quantize_int8`) changes
# Only the trunk's transformer blocks are quantised (~92% of ViT-Tiny's MACs); the patch embedding,
# keypoint heatmaps, global / part blocks, temporal attention and BN necks stay in floating point.
# Site-adapted ViT-Tiny, worst cosine to fp32 on 64 clips of `training.synthetic`: calibrated on
# that renderer's clips, 0.974 with everything INT8, 0.995 like this; calibrated on
# `reid.calibration`'s (the default), 0.988 either way.
INT8_SCOPE = "/model/blocks/"
# The modules whose code shapes the graph: a change in any of them means a new export.
_GRAPH_MODULES = ("model", "blocks", "heatmaps", "keypoints", "config")


class DescriptorGraph(nn.Module):
    """`KeyReID` in eval mode from inputs to the inference descriptor (what gets exported)."""

    def __init__(self, model: KeyReID) -> None:
        super().__init__()
        self.model = model

    def forward(self, frames: torch.Tensor, keypoints: torch.Tensor, camera_ids: torch.Tensor) -> torch.Tensor:
        return self.model.descriptor(self.model(frames, keypoints, camera_ids))


def example_inputs(model: KeyReID, batch: int = 2) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Inputs of the right shapes and dtypes (values only need to be plausible for tracing)."""
    config = model.config
    height, width = config.img_size
    generator = torch.Generator().manual_seed(0)
    frames = torch.randn(batch, config.num_frames, 3, height, width, generator=generator)
    scale = torch.tensor([width - 1, height - 1, 1.0])
    keypoints = torch.rand(batch, config.num_frames, 17, 3, generator=generator) * scale
    cameras = torch.arange(batch, dtype=torch.long) % config.num_cameras
    return frames, keypoints, cameras


def export_onnx(model: KeyReID, path: str | os.PathLike) -> Path:
    """Write the optimised inference graph of `model` to `path` (ONNX, dynamic batch)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    graph = DescriptorGraph(model).eval()
    # TorchScript-based exporter: the camera-id range check is a Python `if` on a tensor, which
    # torch.export refuses; traced, it is dropped from the graph (`Encoder` checks ids itself).
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(graph, example_inputs(model), str(path), input_names=list(INPUTS),
                          output_names=[OUTPUT], opset_version=OPSET, dynamo=False,
                          dynamic_axes={name: {0: "batch"} for name in (*INPUTS, OUTPUT)})
    return path


def default_export_dir() -> Path:
    """`$KEYREID_CACHE/exports` (else `~/.cache/keyreid/exports`), shared with the detector's exports."""
    return Path(os.environ.get(CACHE_ENV) or "~/.cache/keyreid").expanduser() / "exports"


def graph_key(model: KeyReID) -> str:
    """Digest of everything the exported graph depends on: weights and buffers, config, the
    model code and the torch version (untrained weights depend on the latter two as well)."""
    digest = hashlib.sha256(f"layout{EXPORT_LAYOUT} torch{torch.__version__} opset{OPSET}".encode())
    digest.update(json.dumps(model.config.to_dict(), sort_keys=True, default=str).encode())
    for name in _GRAPH_MODULES:
        digest.update(Path(importlib.util.find_spec(f"reid.{name}").origin).read_bytes())
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:20]


def cached_onnx(model: KeyReID, name: str, export_dir: str | os.PathLike | None = None) -> Path:
    """The ONNX export of `model`, made on first use in `export_dir` and checked on reuse (a
    file whose checksum no longer matches is exported again)."""
    root = Path(export_dir) if export_dir is not None else default_export_dir()
    root.mkdir(parents=True, exist_ok=True)
    path = root / f"{name}-{graph_key(model)}.onnx"
    sidecar = path.with_suffix(".json")
    if path.is_file() and sidecar.is_file():
        try:
            if json.loads(sidecar.read_text()).get("sha256") == file_digest(path, length=64):
                log.info("encoder: reusing the ONNX export %s", path)
                os.utime(path)  # most recently used: kept by `_prune`
                return path
        except ValueError:
            pass
        log.warning("encoder: cached ONNX export %s is corrupt; exporting again", path)
    log.info("encoder: exporting the %s inference graph to %s (once)", name, path)
    handle, staging = tempfile.mkstemp(dir=root, prefix=f".{path.name}.", suffix=".onnx")
    os.close(handle)
    try:
        export_onnx(model, staging)
        sidecar.write_text(json.dumps({"sha256": file_digest(staging, length=64), "model": name}))
        os.replace(staging, path)  # concurrent exporters write identical files; last one wins
    finally:
        Path(staging).unlink(missing_ok=True)
    _prune(root, f"{name}-*.onnx")
    return path


def _prune(root: Path, pattern: str) -> None:
    """Keep the `KEEP_PER_MODEL` most recently used files matching `pattern` (with their
    sidecars): every change of weights or model code makes a new one, and a ViT-B graph is
    about 800 MB."""
    exports = sorted(root.glob(pattern), key=lambda p: p.stat().st_mtime, reverse=True)
    for stale in exports[KEEP_PER_MODEL:]:
        for companion in (stale, stale.with_suffix(".json"), stale.with_suffix(".bin")):
            companion.unlink(missing_ok=True)


def _digests(paths: list[Path]) -> dict[str, str]:
    return {path.suffix: file_digest(path, length=64) for path in paths}


def cached_int8(onnx: str | os.PathLike, calibration: Calibration) -> Path:
    """The OpenVINO INT8 model (`quantize_int8`) of the cached export `onnx`, built on first use
    beside it and checksummed like it (a damaged model is quantised again). Keyed by the export
    (whose name holds the graph's key), the quantisation recipe, the NNCF and OpenVINO versions
    and the calibration inputs themselves, so other clips or versions never reuse it."""
    import nncf
    import openvino as ov

    onnx = Path(onnx)
    digest = hashlib.sha256(f"int8-layout{INT8_LAYOUT} nncf{nncf.__version__} openvino{ov.__version__}".encode())
    for array in calibration:
        digest.update(np.ascontiguousarray(array).tobytes())
    xml = onnx.with_name(f"{onnx.stem}-int8-{digest.hexdigest()[:12]}.xml")
    files, sidecar = [xml, xml.with_suffix(".bin")], xml.with_suffix(".json")
    if all(f.is_file() for f in files) and sidecar.is_file():
        try:
            if json.loads(sidecar.read_text()).get("sha256") == _digests(files):
                log.info("encoder: reusing the INT8 model %s", xml)
                os.utime(xml)  # most recently used: kept by `_prune`
                return xml
        except ValueError:
            pass
        log.warning("encoder: cached INT8 model %s is corrupt; quantising again", xml)
    log.info("encoder: INT8-quantising %s on %d calibration clips (once, about 15 s for ViT-Tiny; "
             "cached as %s)", onnx.name, len(calibration[0]), xml)
    staging = Path(tempfile.mkdtemp(dir=onnx.parent, prefix=f".{xml.stem}."))
    try:
        staged = [staging / f.name for f in files]
        ov.save_model(quantize_int8(onnx, calibration), staged[0], compress_to_fp16=False)
        sidecar.write_text(json.dumps({"sha256": _digests(staged), "export": onnx.name}))
        for source, target in zip(staged[::-1], files[::-1]):  # weights first: the xml names them
            os.replace(source, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    _prune(onnx.parent, f"{onnx.stem.rsplit('-', 1)[0]}-*-int8-*.xml")
    return xml


def quantize_int8(onnx: str | os.PathLike, calibration: Calibration) -> "ov.Model":
    """NNCF post-training quantisation of an exported graph for OpenVINO, as NNCF recommends for
    transformers (`ModelType.TRANSFORMER`: mixed preset, attention matmuls quantised, softmax /
    LayerNorm / GELU left in floating point), only inside `INT8_SCOPE` and without SmoothQuant
    (which NNCF applies to transformers by default; worst cosine to fp32 as for `INT8_SCOPE`:
    0.985 with it, 0.988 without; untrained ViT-Tiny 0.982 / 0.989)."""
    import nncf
    from nncf.quantization.advanced_parameters import AdvancedQuantizationParameters, AdvancedSmoothQuantParameters

    model = openvino_core().read_model(str(onnx))
    if not any(op.get_friendly_name().startswith(INT8_SCOPE) for op in model.get_ordered_ops()):
        raise RuntimeError(f"no {INT8_SCOPE} operations in {onnx}: nothing to quantise")
    given = dict(zip(INPUTS, calibration))
    names = [next(n for n in port.get_names() if n in INPUTS) for port in model.inputs]
    samples = [{name: given[name][i:i + 1] for name in names} for i in range(len(calibration[0]))]
    chatty = logging.getLogger("nncf")
    level = chatty.level
    chatty.setLevel(max(level, logging.WARNING))  # NNCF logs a line per operation it skips
    try:
        return nncf.quantize(model, nncf.Dataset(samples), model_type=nncf.ModelType.TRANSFORMER,
                             subset_size=len(samples),
                             ignored_scope=nncf.IgnoredScope(patterns=[f"^(?!{re.escape(INT8_SCOPE)}).*"], validate=False),
                             advanced_parameters=AdvancedQuantizationParameters(
                                 smooth_quant_alphas=AdvancedSmoothQuantParameters(matmul=-1)))
    finally:
        chatty.setLevel(level)


@functools.cache
def openvino_core() -> "ov.Core":
    """The process's one OpenVINO `Core`, for every model this project compiles (encoder and
    detector, `tracking.runtimes.configure_backend`); kept until the process exits.

    Why one, and never released: each `Core` makes its own CPU plugin, and the plugin (OpenVINO
    2026.4) swaps in a signal stack of its own for the creating thread, then on release restores
    the stack it found there only if its own is still current, and unmaps its own regardless.
    Two plugins released oldest first therefore leave the thread on an unmapped signal stack, and
    the next Python signal handler there (SIGINT / SIGTERM for the watcher's drain, SIGCHLD for
    DataLoader workers) dies with SIGSEGV (`tests/test_reid_encoder.py` reproduces it). A single
    plugin that lives as long as the process never does that, and OpenVINO recommends one `Core`
    per process anyway (compiled models share its plugin and its thread pools)."""
    import openvino as ov

    return ov.Core()


def openvino_cpu_has_bf16() -> bool:
    """Whether OpenVINO runs bf16 natively on this CPU (AVX512-BF16 or AMX): where it does,
    OpenVINO bf16 is the encoder's `auto` precision on the CPU (`resolve_precision`)."""
    return "BF16" in openvino_core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")


def resolve_precision(runtime: str, precision: str) -> str:
    """The exported graph's precision: `auto` is bf16 with OpenVINO on a CPU with bf16 units
    (ViT-Tiny 41 ms per clip at one thread against 78 for ONNX Runtime fp32, and on the labelled
    scene of README "Identities" the same cross-camera mAP: 93.50 / 93.50 and 72.65 / 72.60 for
    two checkpoints, bf16 / fp32), otherwise fp32 (ONNX Runtime's CPU provider has no bf16)."""
    if precision != "auto":
        check_precision(runtime, precision)
        return precision
    return "bf16" if runtime == "openvino" and openvino_cpu_has_bf16() else "fp32"


def check_precision(runtime: str, precision: str) -> None:
    """fp32 everywhere; bf16 and int8 only with OpenVINO (ONNX Runtime's CPU provider computes
    fp32; the INT8 model is an OpenVINO one, `cached_int8`)."""
    if precision not in PRECISIONS or (precision != "fp32" and runtime != "openvino"):
        raise ValueError(f"precision {precision!r} is not available with runtime {runtime}: use "
                         + ("fp32, bf16 or int8" if runtime == "openvino" else "fp32 (bf16 and int8 need runtime openvino)"))


class OnnxRunner:
    """Runs an exported descriptor graph with OpenVINO or ONNX Runtime on the CPU.

    `threads`: OpenVINO `INFERENCE_NUM_THREADS` / ONNX Runtime intra-op threads (None: the
    runtime's default, every core). `precision`: "fp32" or (OpenVINO only) "bf16" or "int8"
    (`path` is then the `cached_int8` model). OpenVINO's own default on CPUs with bf16 units is
    bf16, which moves ViT descriptors by ~1e-2 relative, so fp32 is asked for explicitly; the
    INT8 model's floating-point layers run at that default (bf16 there and fp32 gave the same
    descriptors, bf16 faster).
    """

    def __init__(self, path: str | os.PathLike, runtime: str, threads: int | None = None,
                 precision: str = "fp32") -> None:
        check_precision(runtime, precision)
        self.runtime, self.path = runtime, Path(path)
        if runtime == "openvino":
            config: dict = {"PERFORMANCE_HINT": "LATENCY"}
            if precision != "int8":
                config["INFERENCE_PRECISION_HINT"] = "f32" if precision == "fp32" else "bf16"
            if threads is not None:  # a share of the cores: not pinned to the ones OpenVINO
                config["INFERENCE_NUM_THREADS"] = threads  # would pick for a whole machine
                config["ENABLE_CPU_PINNING"] = False  # (tracking.runtimes.configure_backend)
            self._compiled = openvino_core().compile_model(str(path), "CPU", config)
            # OpenVINO may give an input extra tensor names; keep the one we exported.
            self.inputs = [next(n for n in port.get_names() if n in INPUTS) for port in self._compiled.inputs]
        elif runtime == "onnxruntime":
            import onnxruntime as ort

            options = ort.SessionOptions()
            if threads is not None:
                options.intra_op_num_threads = threads
                options.inter_op_num_threads = 1
            self._session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
            self.inputs = [port.name for port in self._session.get_inputs()]
        else:
            raise ValueError(f"unknown runtime {runtime!r}: use openvino or onnxruntime")

    def __call__(self, frames: np.ndarray, keypoints: np.ndarray, camera_ids: np.ndarray) -> np.ndarray:
        given = {"frames": frames.astype(np.float32, copy=False), "keypoints": keypoints.astype(np.float32, copy=False),
                 "camera_ids": camera_ids.astype(np.int64, copy=False)}
        feeds = {name: given[name] for name in self.inputs}
        if self.runtime == "openvino":
            return self._compiled(feeds)[self._compiled.output(0)]
        return self._session.run([OUTPUT], feeds)[0]


def relative_error(got: np.ndarray, expected: np.ndarray) -> float:
    """Largest per-descriptor ||got - expected|| / ||expected||."""
    norms = np.linalg.norm(expected, axis=1).clip(min=1e-12)
    return float((np.linalg.norm(got - expected, axis=1) / norms).max())


def main(argv: list[str] | None = None) -> None:
    from .checkpoints import load_model
    from .registry import build_model, list_models

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", help="re-id checkpoint (default: the untrained seed-0 variant)")
    parser.add_argument("--model", default="keyreid_vit_tiny", choices=list_models())
    parser.add_argument("--out", help="ONNX file to write (default: the encoder's export cache)")
    parser.add_argument("--no-check", action="store_true", help="skip comparing the installed runtimes with torch")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    if args.checkpoint:
        model, payload = load_model(args.checkpoint)
        name = payload.get("model_name", "custom")
    else:
        from .encoder import UNTRAINED_SEED

        model, name = build_model(args.model, seed=UNTRAINED_SEED), args.model
    model.eval()
    path = export_onnx(model, args.out) if args.out else cached_onnx(model, name)
    print(f"exported {name} ({model.descriptor_dim}-d descriptor, dynamic batch) to {path} "
          f"({path.stat().st_size / 1e6:.1f} MB)")
    if args.no_check:
        return
    frames, keypoints, cameras = example_inputs(model, batch=3)
    with torch.inference_mode():
        expected = DescriptorGraph(model)(frames, keypoints, cameras).numpy()
    for runtime, package in RUNTIME_PACKAGES.items():
        if importlib.util.find_spec(package) is None:
            print(f"{runtime:<12} not installed (pip install -e .[cpu-fast])")
            continue
        got = OnnxRunner(path, runtime)(frames.numpy(), keypoints.numpy(), cameras.numpy())
        print(f"{runtime:<12} max relative difference from torch: {relative_error(got, expected):.2e}")


if __name__ == "__main__":
    main()
