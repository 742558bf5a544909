"""Detector runtimes: choice, the export cache, and parity with torch on real demo frames.

Parity and tracking tests need the demo video (`keyreid-fetch-demo --offline`) and the runtime's
packages (`pip install -e .[cpu-fast]`, done by scripts/setup.sh); they skip saying which is missing.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path

import cv2
import numpy as np
import pytest
from scipy.optimize import linear_sum_assignment

from tracking import runtimes
from tracking.detector import PoseTracker

EXPORTED = ("openvino", "onnxruntime")
DEMO_VIDEOS = [Path(os.environ.get("KEYREID_CACHE") or "~/.cache/keyreid").expanduser() / "vtest.avi",
               Path("/usr/share/doc/opencv-doc/examples/data/vtest.avi")]
IMGSZ = 960  # the demo's detector size


def needs(runtime: str) -> None:
    missing = runtimes.missing_packages(runtime)
    if missing:
        pytest.skip(f"{runtime} not installed ({', '.join(missing)}): pip install -e .[cpu-fast]")


def needs_nncf() -> None:
    import importlib.util

    if importlib.util.find_spec("nncf") is None:
        pytest.skip("nncf not installed (INT8): pip install nncf")


def any_exported_runtime() -> str:
    for runtime in EXPORTED:
        if not runtimes.missing_packages(runtime):
            return runtime
    pytest.skip("neither openvino nor onnxruntime is installed: pip install -e .[cpu-fast]")


@pytest.fixture(scope="module")
def demo_halves() -> list[np.ndarray]:
    """Every 10th frame of vtest.avi's first 300, as the demo's two 384x576 half cameras (RGB)."""
    video = next((p for p in DEMO_VIDEOS if p.is_file()), None)
    if video is None:
        pytest.skip(f"demo video not found ({', '.join(map(str, DEMO_VIDEOS))}): "
                    f"run keyreid-fetch-demo --offline")
    capture = cv2.VideoCapture(str(video))
    halves = []
    for index in range(300):
        ok, frame = capture.read()
        if not ok:
            break
        if index % 10 == 0:
            rgb = cv2.cvtColor(frame, cv2.COLOR_BGR2RGB)
            halves += [np.ascontiguousarray(rgb[:, :384]), np.ascontiguousarray(rgb[:, 384:])]
    capture.release()
    return halves


@pytest.fixture(scope="module")
def demo_camera(demo_halves) -> list[np.ndarray]:
    """The demo's right camera at its 5 fps sampling: every 2nd frame of the first 48."""
    capture = cv2.VideoCapture(str(next(p for p in DEMO_VIDEOS if p.is_file())))
    frames = []
    for index in range(48):
        ok, frame = capture.read()
        if ok and index % 2 == 0:
            frames.append(np.ascontiguousarray(cv2.cvtColor(frame, cv2.COLOR_BGR2RGB)[:, 384:]))
    capture.release()
    return frames


@pytest.fixture(scope="module")
def export_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("exports")


def _detect(tracker: PoseTracker, images: list[np.ndarray]) -> list[tuple[np.ndarray, np.ndarray]]:
    """Raw detections (before tracking) of each image: boxes [n, 4] and keypoints [n, 17, 3]."""
    tracker.warm_up(*images[0].shape[:2])  # builds the predictor and pins the runtime threads
    found = []
    for image in images:
        result = tracker.model.predict(np.ascontiguousarray(image[..., ::-1]), classes=[0],
                                       imgsz=tracker.imgsz, conf=tracker.conf, iou=tracker.iou,
                                       verbose=False)[0]
        found.append((result.boxes.xyxy.cpu().numpy(), result.keypoints.data.cpu().numpy()))
    return found


def _iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    top_left = np.maximum(a[:, None, :2], b[None, :, :2])
    bottom_right = np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.prod(np.clip(bottom_right - top_left, 0, None), axis=-1)
    area = lambda boxes: np.prod(boxes[:, 2:] - boxes[:, :2], axis=-1)  # noqa: E731
    return inter / (area(a)[:, None] + area(b)[None, :] - inter)


@pytest.fixture(scope="module")
def torch_detections(weights, demo_halves):
    return _detect(PoseTracker(weights, imgsz=IMGSZ, runtime="torch", threads=1), demo_halves)


@pytest.mark.parametrize("runtime", EXPORTED)
def test_exported_detector_finds_the_same_people_as_torch(runtime, weights, demo_halves,
                                                          torch_detections, export_dir):
    needs(runtime)
    tracker = PoseTracker(weights, imgsz=IMGSZ, runtime=runtime, threads=1, export_dir=export_dir)
    assert tracker.runtime == runtime, tracker.runtime_reason
    exported = _detect(tracker, demo_halves)
    reference_count = sum(len(boxes) for boxes, _ in torch_detections)
    count = sum(len(boxes) for boxes, _ in exported)
    matched, keypoint_errors = 0, []
    for (ref_boxes, ref_points), (boxes, points) in zip(torch_detections, exported):
        if len(ref_boxes) and len(boxes):
            overlap = _iou(ref_boxes, boxes)
            rows, cols = linear_sum_assignment(-overlap)
            good = overlap[rows, cols] >= 0.9
            matched += int(good.sum())
            errors = np.abs(ref_points[rows, :, :2] - points[cols, :, :2]).max(axis=(1, 2))
            keypoint_errors += list(errors[good])
    assert reference_count >= 100  # the frames really contain people
    assert abs(count - reference_count) <= 0.03 * reference_count, (count, reference_count)
    assert matched >= 0.95 * reference_count, (matched, reference_count)
    # exported pose models keep their keypoints, in the same places
    assert all(points.shape[1:] == (17, 3) for _, points in exported if len(points))
    assert np.median(keypoint_errors) < 1.0


@pytest.mark.parametrize("runtime", EXPORTED)
def test_exported_detector_tracks_with_pinned_threads(runtime, weights, demo_camera, export_dir):
    needs(runtime)
    tracker = PoseTracker(weights, imgsz=IMGSZ, runtime=runtime, threads=1, export_dir=export_dir)
    tracks = [tracker.update(frame) for frame in demo_camera]
    backend = tracker.model.predictor.model.backend
    if runtime == "openvino":
        assert backend.ov_compiled_model.get_property("INFERENCE_NUM_THREADS") == 1
        # pinned, every camera worker's thread went to the same core (README, Performance)
        assert backend.ov_compiled_model.get_property("ENABLE_CPU_PINNING") is False
        from reid.export import openvino_core

        # recompiled on the process's one Core, so the one ultralytics made is freed (why:
        # tests/test_reid_encoder.py::test_released_openvino_encoders_leave_signal_handling_working)
        assert backend.compile_model.func == openvino_core().compile_model
    else:
        assert backend.session.get_session_options().intra_op_num_threads == 1
    people = [p for frame in tracks for p in frame]
    assert len(people) >= 2 * len(demo_camera)
    assert all(p.track_id >= 1 and p.keypoints.shape == (17, 3) for p in people)
    ids = [{p.track_id for p in frame} for frame in tracks]
    assert ids[-1] & set().union(*ids[:-1])  # ids persist across frames (persist=True works)


def _matches(reference, found) -> tuple[int, int, int]:
    """(people torch found, people found, people found again with box IoU >= 0.9)."""
    matched = 0
    for (ref_boxes, _), (boxes, _) in zip(reference, found):
        if len(ref_boxes) and len(boxes):
            overlap = _iou(ref_boxes, boxes)
            rows, cols = linear_sum_assignment(-overlap)
            matched += int((overlap[rows, cols] >= 0.9).sum())
    return sum(len(b) for b, _ in reference), sum(len(b) for b, _ in found), matched


def test_int8_detector_finds_the_same_people_and_is_cached_by_calibration(
        weights, demo_halves, torch_detections, export_dir):
    """INT8 (NNCF) calibrated on the demo video: the acceptance rule of the fp32 exports
    (IoU >= 0.9 for >= 95%, count within 3%); a second start reads no frame; other calibration
    frames (another camera, a changed file) are another model."""
    needs("openvino")
    needs_nncf()
    calls = []

    def calibration():
        calls.append(1)
        return demo_halves[::3]  # both halves, spread over the first 300 frames

    where = {"source": "vtest.avi", "frames": len(demo_halves[::3])}
    tracker = PoseTracker(weights, imgsz=IMGSZ, runtime="openvino", threads=1, precision="int8",
                          calibration=calibration, calibration_id=where, export_dir=export_dir)
    assert tracker.precision == "int8" and "INT8" in tracker.runtime_reason, tracker.runtime_reason
    assert "_int8_openvino_model" in tracker.model_path.name and calls == [1]
    reference, count, matched = _matches(torch_detections, _detect(tracker, demo_halves))
    assert reference >= 100
    assert abs(count - reference) <= 0.03 * reference, (count, reference)
    assert matched >= 0.95 * reference, (matched, reference)

    again = PoseTracker(weights, imgsz=IMGSZ, runtime="openvino", precision="int8",
                        calibration=calibration, calibration_id=where, export_dir=export_dir)
    assert again.model_path == tracker.model_path and calls == [1]  # reused, no frame read
    assert runtimes.verify_export(tracker.model_path.parent) is None
    other = runtimes.quantized_model(weights, IMGSZ, lambda: demo_halves[:4],
                                     {**where, "size": 1}, export_dir)
    assert other != tracker.model_path


def test_int8_falls_back_to_the_export_or_torch_with_the_reason(weights, tmp_path, monkeypatch):
    torch_tracker = PoseTracker(weights, imgsz=640, runtime="torch", precision="int8",
                                calibration=list, export_dir=tmp_path)
    assert torch_tracker.runtime == "torch" and torch_tracker.precision == "auto"
    assert "INT8 needs the openvino runtime" in torch_tracker.runtime_reason
    needs("openvino")

    def broken(*args, **kwargs):
        raise RuntimeError("quantiser exploded")

    monkeypatch.setattr(runtimes, "_quantize", broken)
    needs_nncf()
    tracker = PoseTracker(weights, imgsz=640, runtime="openvino", precision="int8",
                          calibration=lambda: [np.zeros((64, 64, 3), np.uint8)],
                          calibration_id={"source": "x"}, export_dir=tmp_path)
    assert tracker.runtime == "openvino" and tracker.precision == "auto"
    assert "quantiser exploded" in tracker.runtime_reason
    assert tracker.model_path.name.endswith("_openvino_model")  # the fp32 export runs
    assert not [p for p in tmp_path.iterdir() if p.is_dir() and "int8" in p.name]
    with pytest.raises(ValueError, match="precision"):
        PoseTracker(weights, imgsz=640, runtime="torch", precision="int4")


def test_auto_prefers_openvino_then_onnxruntime_on_cpu_and_torch_on_cuda(monkeypatch):
    installed: set[str] = set()
    monkeypatch.setattr(runtimes, "missing_packages",
                        lambda runtime: [] if runtime in installed else [runtime])
    assert runtimes.resolve_runtime("auto", "cpu")[0] == "torch"
    installed.add("onnxruntime")
    assert runtimes.resolve_runtime("auto", "cpu")[0] == "onnxruntime"
    installed.add("openvino")
    assert runtimes.resolve_runtime("auto", "cpu")[0] == "openvino"
    assert runtimes.resolve_runtime("auto", "cuda:0")[0] == "torch"
    assert runtimes.resolve_runtime("torch", "cpu")[0] == "torch"
    assert runtimes.resolve_runtime("onnxruntime", "cpu")[0] == "onnxruntime"
    with pytest.raises(ValueError, match="tensorrt"):
        runtimes.resolve_runtime("tensorrt", "cpu")


def test_missing_runtime_packages_fall_back_to_torch(weights, monkeypatch):
    monkeypatch.setattr(runtimes.importlib.util, "find_spec",
                        lambda name: None if name in ("openvino", "onnxruntime") else object())
    runtime, reason = runtimes.resolve_runtime("openvino", "cpu")
    assert runtime == "torch" and "openvino not installed" in reason
    tracker = PoseTracker(weights, imgsz=640, runtime="auto", device="cpu")
    assert tracker.runtime == "torch" and tracker.model_path == weights


def test_failed_export_falls_back_to_torch_with_the_reason(weights, tmp_path, monkeypatch, caplog):
    runtime = any_exported_runtime()

    def broken(*args, **kwargs):
        raise RuntimeError("converter exploded")

    monkeypatch.setattr(runtimes, "_export", broken)
    with caplog.at_level(logging.WARNING, logger="tracking.detector"):
        tracker = PoseTracker(weights, imgsz=640, runtime=runtime, export_dir=tmp_path)
    assert tracker.runtime == "torch" and tracker.model_path == weights
    assert "converter exploded" in tracker.runtime_reason and "converter exploded" in caplog.text
    assert not [p for p in tmp_path.iterdir() if p.is_dir()]  # nothing half-made is cached
    assert tracker.update(np.zeros((480, 640, 3), np.uint8)) == []


def test_export_cache_reuses_rebuilds_and_rekeys(weights, tmp_path, monkeypatch, caplog):
    import torch

    runtime = any_exported_runtime()
    exports: list[tuple[str, int]] = []
    real_export = runtimes._export

    def counting(source: Path, imgsz: int, *args):
        exports.append((source.name, imgsz))
        return real_export(source, imgsz, *args)

    monkeypatch.setattr(runtimes, "_export", counting)
    first = runtimes.exported_model(weights, 640, runtime, tmp_path)
    assert runtimes.exported_model(weights, 640, runtime, tmp_path) == first  # second start
    assert len(exports) == 1

    assert runtimes.exported_model(weights, 480, runtime, tmp_path) != first  # new input size
    assert exports[-1] == (weights.name, 480)

    changed = tmp_path / "retrained" / weights.name  # same name, different content
    changed.parent.mkdir()
    checkpoint = torch.load(weights, map_location="cpu", weights_only=False)
    checkpoint["date"] = "retrained"
    torch.save(checkpoint, changed)
    other = runtimes.exported_model(changed, 640, runtime, tmp_path)
    assert other != first and len(exports) == 3

    folder = first.parent  # the cache entry: manifest, and the model ultralytics loads
    payload = max((p for p in folder.rglob("*") if p.suffix in (".bin", ".onnx")),
                  key=lambda p: p.stat().st_size)
    data = bytearray(payload.read_bytes())
    data[len(data) // 2: len(data) // 2 + 64] = bytes(64)
    payload.write_bytes(bytes(data))
    assert "checksum" in runtimes.verify_export(folder)
    with caplog.at_level(logging.WARNING, logger="tracking.runtimes"):
        rebuilt = runtimes.exported_model(weights, 640, runtime, tmp_path)
    assert rebuilt == first and len(exports) == 4 and "corrupt" in caplog.text
    assert runtimes.verify_export(folder) is None

    (folder / runtimes.MANIFEST).write_text("{not json")
    assert "manifest" in runtimes.verify_export(folder)
    runtimes.exported_model(weights, 640, runtime, tmp_path)
    assert len(exports) == 5
