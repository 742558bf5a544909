"""One camera's worker process: VideoSource -> PoseTracker -> keypoints -> TrackletBuffer -> queue.

Runs in its own process (spawn), so a camera that crashes, hangs on a stream or fails to
decode affects no other camera, and each camera's tracker state and torch threads are its own.
Everything it sends to the main process is a small picklable message on a bounded queue:
`Ready`, `Output` (tracklet updates and clips of one frame, in order: a clip's tracklet is
announced before or with it), `Status` (about once a second) and `Finished` (always last,
with the reason when the camera failed).

Back-pressure (`QueueConfig.policy`): "block" waits for room (a file source simply slows);
"drop_oldest" keeps a bounded local backlog and drops its oldest *clips* when it overflows
(tracklet updates and status are never dropped), counting them in `Status.dropped_clips`.
"""
from __future__ import annotations

import logging
import multiprocessing
import os
import queue
import signal
import threading
import time
from collections import deque
from dataclasses import dataclass, field

import numpy as np

from tracking.types import Clip, Detection, TrackletUpdate

from .config import CameraConfig, ClipConfig, DetectorConfig, KeypointsConfig

LOG = logging.getLogger(__name__)
STATUS_INTERVAL_S = 1.0
STAGES = ("decode", "detect_track", "keypoints", "crop", "send")


@dataclass(frozen=True)
class WorkerSettings:
    """Everything a worker needs besides its camera (picklable, sent at spawn)."""

    detector: DetectorConfig
    keypoints: KeypointsConfig
    clips: ClipConfig
    policy: str  # "block" or "drop_oldest" (resolved from "auto" by the main process)
    pending_clips: int
    realtime: bool = False
    max_frames: int | None = None
    log_level: int = logging.INFO


@dataclass(frozen=True)
class Ready:
    camera_id: str
    keypoint_backend: str
    reason: str
    time: float  # time.monotonic() when the models were loaded


@dataclass(frozen=True)
class Output:
    """The results of one processed frame: tracklet updates first, then clips with their boxes."""

    camera_id: str
    updates: list[TrackletUpdate]
    clips: list[tuple[Clip, list[list[float]]]]


@dataclass(frozen=True)
class Status:
    camera_id: str
    frames: int  # frames processed (detected) so far
    fps: float  # processed frames per wall second over the last interval
    video_seconds: float  # stream time covered so far
    last_frame_index: int | None
    last_frame_time: float | None
    active_tracks: int
    clips: int
    dropped_clips: int
    reconnects: int
    stages: dict[str, float]  # cumulative seconds per stage
    first_frame_at: float | None  # time.monotonic() of the first frame


@dataclass(frozen=True)
class Finished:
    camera_id: str
    status: str  # "finished", "stopped" or "failed"
    reason: str | None
    final_status: Status | None = None
    last_at: float = field(default_factory=time.monotonic)


class _Outbox:
    """The worker's side of its queue: ordered sending with the back-pressure policy."""

    def __init__(self, out: multiprocessing.Queue, policy: str, pending_clips: int) -> None:
        self.out = out
        self.policy = policy
        self.pending: deque = deque()
        self.pending_clip_count = 0
        self.limit = pending_clips
        self.dropped = 0

    def send(self, message, *, force: bool = False) -> None:
        """Queue a message; `force` waits for room whatever the policy (used for the last one)."""
        self.pending.append(message)
        if isinstance(message, Output):
            self.pending_clip_count += len(message.clips)
        self.flush(block=self.policy == "block" or force)
        if self.policy == "drop_oldest":
            self._drop_excess()

    def flush(self, block: bool) -> None:
        while self.pending:
            message = self.pending[0]
            try:
                if block:
                    self.out.put(message, timeout=0.5)
                else:
                    self.out.put_nowait(message)
            except queue.Full:
                if not block:
                    return
                continue
            self.pending.popleft()
            if isinstance(message, Output):
                self.pending_clip_count -= len(message.clips)

    def _drop_excess(self) -> None:
        for index, message in enumerate(self.pending):
            if self.pending_clip_count <= self.limit:
                return
            if isinstance(message, Output) and message.clips:
                self.dropped += len(message.clips)
                self.pending_clip_count -= len(message.clips)
                self.pending[index] = Output(message.camera_id, message.updates, [])


def _exit_with_parent(interval: float = 0.5) -> None:
    """Watchdog thread: when the main process dies (even kill -9), end this worker at once.

    Without it a worker could wait forever: on a full queue, inside the queue's feeder thread
    (which joins at exit and blocks on a pipe nobody reads), or in a live source's backoff.
    A worker holds nothing that needs cleaning up, so `os._exit` is safe.
    """
    parent = multiprocessing.parent_process()
    if parent is None:
        return

    def watch() -> None:
        while parent.is_alive():
            time.sleep(interval)
        LOG.warning("the watcher's main process is gone; this camera stops")
        os._exit(0)

    threading.Thread(target=watch, name="exit-with-parent", daemon=True).start()


class _TrackletIds:
    """The watcher's own track numbers, 1, 2, ... per camera: one per tracklet.

    A tracker may report an id again after `TrackletBuffer` has ended that track (its
    `lost_after` is shorter than the tracker's memory, or the source reconnected); that is a
    new tracklet, so it gets a new number and stored track ids stay unique per camera and run.
    """

    def __init__(self) -> None:
        self.current: dict[int, int] = {}
        self.count = 0

    def relabel(self, detections: list[Detection]) -> list[Detection]:
        out = []
        for d in detections:
            number = self.current.get(d.track_id)
            if number is None:
                self.count += 1
                number = self.current[d.track_id] = self.count
            out.append(Detection(d.box, d.score, number, d.keypoints))
        return out

    def ended(self, updates: list[TrackletUpdate]) -> None:
        finished = {u.track_id for u in updates if u.ended}
        if finished:
            self.current = {t: n for t, n in self.current.items() if n not in finished}


class _BoxHistory:
    """Recent boxes per track, so each stored clip can carry its boxes (for re-cropping)."""

    def __init__(self, keep: int) -> None:
        self.keep = keep
        self.boxes: dict[int, deque] = {}

    def add(self, frame_index: int, detections: list[Detection]) -> None:
        for d in detections:
            self.boxes.setdefault(d.track_id, deque(maxlen=self.keep)).append(
                (frame_index, [float(v) for v in d.box]))

    def for_clip(self, clip: Clip) -> list[list[float]]:
        known = dict(self.boxes.get(clip.track_id, ()))
        if clip.final:
            self.boxes.pop(clip.track_id, None)
        return [known.get(i, [0.0, 0.0, 0.0, 0.0]) for i in clip.frame_indices]


def camera_main(camera: CameraConfig, settings: WorkerSettings, out: multiprocessing.Queue,
                stop: multiprocessing.synchronize.Event) -> None:
    """Process entry point: run one camera until its source ends, it fails, or `stop` is set."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the main process decides when to stop
    _exit_with_parent()
    logging.basicConfig(level=settings.log_level,
                        format=f"%(asctime)s %(levelname)s [camera {camera.id}] %(message)s")
    outbox = _Outbox(out, settings.policy, settings.pending_clips)
    status: Status | None = None
    try:
        state = _CameraRun(camera, settings, outbox, stop)
        status = state.status
        outcome, reason = state.run()
        status = state.status
    except Exception as exc:  # noqa: BLE001 - any failure ends this camera alone, with its reason
        LOG.exception("camera %s failed", camera.id)
        outcome, reason = "failed", f"{type(exc).__name__}: {exc}"
    outbox.send(Finished(camera.id, outcome, reason, status), force=True)


class _CameraRun:
    """The per-frame loop of one camera, with stage timings and counters."""

    def __init__(self, camera: CameraConfig, settings: WorkerSettings, outbox: _Outbox,
                 stop) -> None:
        from tracking.detector import PoseTracker
        from tracking.keypoints import select_keypoint_backend
        from tracking.sources import VideoSource
        from tracking.tracklets import TrackletBuffer

        self.camera = camera
        self.settings = settings
        self.outbox = outbox
        self.stop = stop
        det = settings.detector
        self.source = VideoSource(camera.source, crop=camera.crop, stride=camera.stride,
                                  max_fps=camera.max_fps, realtime=settings.realtime,
                                  live=camera.live, name=camera.id)
        self.tracker = PoseTracker(det.weights, imgsz=det.imgsz, conf=det.conf, iou=det.iou,
                                   tracker=det.tracker, device=det.device,
                                   threads=det.threads, runtime=det.runtime)
        height, width = (camera.crop[3], camera.crop[2]) if camera.crop else (480, 640)
        self.tracker.warm_up(height, width)  # before Ready: the first frame then costs what others do
        kp = settings.keypoints
        options = {"checkpoint": kp.checkpoint, "device": kp.device, "download": kp.download}
        self.keypoints, reason = select_keypoint_backend(kp.backend, **options)
        LOG.info("keypoints: %s", reason)
        clips = settings.clips
        self.buffer = TrackletBuffer(camera.id, clip_length=clips.length, window=clips.window,
                                     overlap=clips.overlap, lost_after=clips.lost_after,
                                     clip_size=clips.size, crop_margin=clips.crop_margin,
                                     min_box_height=clips.min_box_height)
        self.boxes = _BoxHistory(keep=clips.window * 2 + clips.lost_after)
        self.ids = _TrackletIds()
        self.announced: set[int] = set()  # tracks whose tracklet the main process knows
        self.stages = dict.fromkeys(STAGES, 0.0)
        self.frames = 0
        self.clips = 0
        self.first_frame_at: float | None = None
        self.first_time: float | None = None
        self.last_index: int | None = None
        self.last_time: float | None = None
        self._interval_start = time.monotonic()
        self._interval_frames = 0
        self._fps = 0.0
        outbox.send(Ready(camera.id, self.keypoints.name, reason, time.monotonic()))

    @property
    def status(self) -> Status:
        video = (self.last_time - self.first_time) if self.first_time is not None else 0.0
        return Status(self.camera.id, self.frames, self._fps, video, self.last_index,
                      self.last_time, self.buffer.active_tracks, self.clips, self.outbox.dropped,
                      self.source.stats.reconnects, dict(self.stages), self.first_frame_at)

    def run(self) -> tuple[str, str | None]:
        from tracking.sources import SourceError

        frames = iter(self.source)
        max_frames = self.settings.max_frames
        try:
            while not self.stop.is_set():
                t0 = time.monotonic()
                frame = next(frames, None)
                t1 = time.monotonic()
                if frame is None or (max_frames is not None and frame.index >= max_frames):
                    break
                if self.first_frame_at is None:
                    self.first_frame_at, self.first_time = t0, frame.time
                self.stages["decode"] += t1 - t0
                self._process(frame, t1)
        except SourceError as exc:
            self._finish_tracks()
            return "failed", str(exc)
        finally:
            self.source.stop()
        self._finish_tracks()
        return ("stopped" if self.stop.is_set() else "finished"), None

    def _process(self, frame, t1: float) -> None:
        detections = self.ids.relabel(self.tracker.update(frame.image))
        t2 = time.monotonic()
        if self.keypoints.name != "yolo-pose":
            estimated = self.keypoints.estimate(frame.image, detections)
            detections = [Detection(d.box, d.score, d.track_id, k)
                          for d, k in zip(detections, estimated)]
        t3 = time.monotonic()
        self.boxes.add(frame.index, detections)
        clips = self.buffer.update(frame, detections)
        updates = self.buffer.pop_tracklet_updates()
        self.ids.ended(updates)
        t4 = time.monotonic()
        self.frames += 1
        self._interval_frames += 1
        self.last_index, self.last_time = frame.index, frame.time
        self._emit(clips, updates)
        if t4 - self._interval_start >= STATUS_INTERVAL_S:
            self._fps = self._interval_frames / (t4 - self._interval_start)
            self._interval_start, self._interval_frames = t4, 0
            self.outbox.send(self.status)
        elif self.outbox.pending and self.outbox.policy == "drop_oldest":
            self.outbox.flush(block=False)
        t5 = time.monotonic()
        self.stages["detect_track"] += t2 - t1
        self.stages["keypoints"] += t3 - t2
        self.stages["crop"] += t4 - t3
        self.stages["send"] += t5 - t4

    def _finish_tracks(self) -> None:
        """End every track (source ended, failed or stopped): their final clips are sent."""
        clips = self.buffer.flush()
        updates = self.buffer.pop_tracklet_updates()
        self._emit(clips, updates, force=True)

    def _emit(self, clips: list[Clip], updates: list[TrackletUpdate], force: bool = False) -> None:
        """Send one frame's results, without final clips of fewer than `min_frames` distinct
        frames (short track tails, brief false detections): each clip costs an encoder pass.
        A track that never had a clip of its own is then not stored at all."""
        minimum = self.settings.clips.min_frames
        kept = []
        for clip in clips:
            if clip.final and len(set(clip.frame_indices)) < minimum:
                self.boxes.for_clip(clip)  # forget its boxes
                continue
            kept.append(clip)
            self.announced.add(clip.track_id)
        updates = [u for u in updates if u.track_id in self.announced]
        self.announced -= {u.track_id for u in updates if u.ended}
        if kept or updates:
            self.clips += len(kept)
            self.outbox.send(Output(self.camera.id, updates,
                                    [(c, self.boxes.for_clip(c)) for c in kept]), force=force)


def thumbnail_jpeg(image: np.ndarray | None, quality: int = 85) -> bytes | None:
    """RGB uint8 image -> JPEG bytes (what storage keeps as a thumbnail)."""
    import cv2

    if image is None:
        return None
    ok, data = cv2.imencode(".jpg", np.ascontiguousarray(image[..., ::-1]),
                            [cv2.IMWRITE_JPEG_QUALITY, quality])
    return data.tobytes() if ok else None
