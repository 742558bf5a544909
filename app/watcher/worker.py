"""One camera's worker process: VideoSource -> PoseTracker -> keypoints -> TrackletBuffer -> queue.

Runs in its own process (spawn), so a camera that crashes, hangs on a stream or fails to
decode affects no other camera, and each camera's tracker state and torch threads are its own.
Everything it sends to the main process is a picklable message on a bounded queue: `Ready`,
`Output` (tracklet updates and clips of one frame, in order: a clip's tracklet is announced
before or with it), `Status` (every second from a heartbeat thread, so a camera waiting to
reconnect still reports) and `Finished` (always last, with the reason when the camera failed).
The main process reads each queue in a thread of its own, so a worker that dies half-way
through a message can never block it.

The main process owns shutdown: workers ignore SIGINT and SIGTERM (systemd signals the whole
process group) and stop when the shared stop event is set, which also interrupts a source's
reconnect backoff. Live sources are read through `LatestFrames` (processing always takes the
newest frame); after an outage longer than `lost_after` frames every open track ends and the
tracker starts afresh, so no track joins two people across the gap.

Back-pressure (`QueueConfig.policy`): "block" waits for room (a file source simply slows);
"drop_oldest" keeps a bounded local backlog and drops its oldest *clips* when it overflows
(tracklet updates and status are never dropped), counting them in `Status.dropped_clips`.
"""
from __future__ import annotations

import logging
import multiprocessing
import os
import pickle
import queue
import signal
import struct
import threading
import time
from collections import deque
from dataclasses import dataclass, field

import numpy as np

from tracking.redact import log_with_redaction, redact
from tracking.types import Clip, Detection, TrackletUpdate

from .config import CameraConfig, ClipConfig, DetectorConfig, KeypointsConfig

LOG = logging.getLogger(__name__)
STATUS_INTERVAL_S = 1.0
STAGES = ("decode", "detect_track", "keypoints", "crop", "send")
CALIBRATION_FRAMES = 48  # INT8 calibration: frames of the camera's own video (once, cached)
CALIBRATION_FPS = {"file": 0.5, "live": 2.0}  # spread over 96 s of a file, 24 s of a stream
CALIBRATION_TIMEOUT_S = 60.0
HALF_SEND_FAULT_ENV = "KEYREID_FAULT_HALF_SEND"  # test hook: camera id that dies mid-message


@dataclass(frozen=True)
class WorkerSettings:
    """Everything a worker needs besides its camera (picklable, sent at spawn).

    `start_after`: skip source frames up to this index (a file camera resuming where an earlier
    run stopped). `first_track_number`: tracklet numbers continue after this one (a restarted
    worker must not reuse its predecessor's numbers).
    """

    detector: DetectorConfig
    keypoints: KeypointsConfig
    clips: ClipConfig
    policy: str  # "block" or "drop_oldest" (resolved from "auto" by the main process)
    pending_clips: int
    realtime: bool = False
    max_frames: int | None = None
    log_level: int = logging.INFO
    start_after: int | None = None
    first_track_number: int = 0
    open_timeout: float = 5.0


@dataclass(frozen=True)
class Ready:
    camera_id: str
    keypoint_backend: str
    reason: str
    time: float  # time.monotonic() when the models were loaded


@dataclass(frozen=True)
class Output:
    """The results of one processed frame: tracklet updates first, then its clips."""

    camera_id: str
    updates: list[TrackletUpdate]
    clips: list[Clip]


@dataclass(frozen=True)
class Status:
    """A worker's heartbeat. `source_state`: "connecting", "streaming", "reconnecting" (with
    `reason` and `attempt`) or "ended" (`tracking.SourceStats`)."""

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
    source_state: str = "connecting"
    reason: str | None = None
    attempt: int = 0
    skipped_frames: int = 0  # live frames replaced by newer ones before processing
    last_frame_wall_time: float | None = None
    last_track_number: int = 0
    outages: int = 0  # outages after which the tracker was reset


@dataclass(frozen=True)
class Finished:
    camera_id: str
    status: str  # "finished", "stopped" or "failed"
    reason: str | None
    final_status: Status | None = None
    last_at: float = field(default_factory=time.monotonic)


class _Outbox:
    """The worker's side of its queue: ordered sending with the back-pressure policy.

    Thread-safe: the heartbeat thread sends `Status` while the frame loop sends `Output`.
    `half_send_fault` (tests only) makes the worker die half-way through writing its first
    clip message, as a SIGKILL at the worst moment would.
    """

    def __init__(self, out: multiprocessing.Queue | queue.Queue, policy: str, pending_clips: int,
                 half_send_fault: bool = False) -> None:
        self.out = out
        self.policy = policy
        self.pending: deque = deque()
        self.pending_clip_count = 0
        self.limit = pending_clips
        self.dropped = 0
        self.half_send_fault = half_send_fault
        self._lock = threading.RLock()

    def send(self, message, *, force: bool = False) -> None:
        """Queue a message; `force` waits for room whatever the policy (used for the last one)."""
        if self.half_send_fault and isinstance(message, Output) and message.clips:
            self._die_half_way_through(message)
        with self._lock:
            self.pending.append(message)
            if isinstance(message, Output):
                self.pending_clip_count += len(message.clips)
            self.flush(block=self.policy == "block" or force)
            if self.policy == "drop_oldest":
                self._drop_excess()

    def flush(self, block: bool) -> None:
        with self._lock:
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

    def _die_half_way_through(self, message: Output) -> None:
        """Write the length header and half of `message` into the queue's pipe, then SIGKILL.

        The queue's write lock is held, so no earlier message is cut: exactly one message is
        left half-written, with nothing after it, like a worker killed while sending.
        """
        payload = pickle.dumps(message)
        with self.out._wlock:  # noqa: SLF001 - the test hook must bypass the feeder thread
            os.write(self.out._writer.fileno(),  # noqa: SLF001
                     struct.pack("!i", len(payload)) + payload[: len(payload) // 2])
            os.kill(os.getpid(), signal.SIGKILL)


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
    Numbering starts after `start` (a restarted worker continues its predecessor's numbers).
    """

    def __init__(self, start: int = 0) -> None:
        self.current: dict[int, int] = {}
        self.count = start

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

    def reset(self) -> None:
        """The tracker starts afresh: its ids from now on are new tracks."""
        self.current = {}


def camera_main(camera: CameraConfig, settings: WorkerSettings, out: multiprocessing.Queue,
                stop: multiprocessing.synchronize.Event) -> None:
    """Process entry point: run one camera until its source ends, it fails, or `stop` is set."""
    for signum in (signal.SIGINT, signal.SIGTERM):  # the main process decides when to stop
        signal.signal(signum, signal.SIG_IGN)
    _exit_with_parent()
    log_with_redaction(settings.log_level,
                       f"%(asctime)s %(levelname)s [camera {camera.id}] %(message)s")
    outbox = _Outbox(out, settings.policy, settings.pending_clips,
                     half_send_fault=os.environ.get(HALF_SEND_FAULT_ENV) == camera.id)
    run_camera(camera, settings, outbox, stop)


def run_camera(camera: CameraConfig, settings: WorkerSettings, outbox: _Outbox, stop,
               tracker=None) -> None:
    """Run one camera wherever it was placed (a worker process, a Ray actor); `stop` is any
    event with `is_set()`; `tracker` replaces the camera's own detector + tracker (a
    `tracking.SharedDetectorTracker` over a shared detector). `Finished` is always the last
    message, with the reason on failure."""
    status: Status | None = None
    try:
        state = _CameraRun(camera, settings, outbox, stop, tracker)
        outcome, reason = state.run()
        status = state.status
    except Exception as exc:  # noqa: BLE001 - any failure ends this camera alone, with its reason
        LOG.exception("camera %s failed", camera.id)
        outcome, reason = "failed", redact(f"{type(exc).__name__}: {exc}")
    outbox.send(Finished(camera.id, outcome, reason, status), force=True)


def calibration_id(camera: CameraConfig, count: int = CALIBRATION_FRAMES) -> dict:
    """Where a camera's INT8 calibration frames come from: the quantised model's cache key (a
    file that changed, by size or time, is a new video)."""
    from pathlib import Path

    where = {"source": camera.shown_source, "crop": list(camera.crop or ()), "frames": count,
             "fps": CALIBRATION_FPS["live" if camera.is_live else "file"]}
    if camera.is_file and Path(camera.source).is_file():
        stat = Path(camera.source).stat()
        where.update(size=stat.st_size, mtime_ns=stat.st_mtime_ns)
    return where


def calibration_frames(camera: CameraConfig, count: int = CALIBRATION_FRAMES,
                       timeout: float = CALIBRATION_TIMEOUT_S, open_timeout: float = 5.0) -> list:
    """Up to `count` RGB frames of the camera (its crop), spread over its first minute or two:
    what INT8 calibration sees. Never reconnects; gives up after `timeout` seconds (a live
    camera that is down: the detector then runs at the runtime's own precision this time)."""
    from tracking.sources import VideoSource

    source = VideoSource(camera.source, crop=camera.crop, live=camera.live, reconnect=None,
                         max_fps=CALIBRATION_FPS["live" if camera.is_live else "file"],
                         open_timeout=open_timeout, read_timeout=open_timeout,
                         name=camera.id)
    timer = threading.Timer(timeout, source.stop)
    timer.daemon = True
    timer.start()
    frames = []
    try:
        for frame in source:
            frames.append(frame.image)
            if len(frames) >= count:
                break
    finally:
        timer.cancel()
        source.stop()
    return frames


def build_tracker(camera: CameraConfig, det: DetectorConfig):
    """The camera's `PoseTracker` as configured (INT8 calibrated on this camera's video)."""
    from tracking.detector import PoseTracker

    return PoseTracker(det.weights, imgsz=det.imgsz, conf=det.conf, iou=det.iou,
                       tracker=det.tracker, device=det.device, threads=det.threads,
                       runtime=det.runtime, precision=det.precision,
                       calibration=lambda: calibration_frames(camera),
                       calibration_id=calibration_id(camera))


class _CameraRun:
    """The per-frame loop of one camera, with stage timings and counters."""

    def __init__(self, camera: CameraConfig, settings: WorkerSettings, outbox: _Outbox,
                 stop, tracker=None) -> None:
        from tracking.keypoints import select_keypoint_backend
        from tracking.sources import LatestFrames, VideoSource
        from tracking.tracklets import TrackletBuffer

        self.camera = camera
        self.settings = settings
        self.outbox = outbox
        self.stop = stop
        det = settings.detector
        source = VideoSource(camera.source, crop=camera.crop, stride=camera.stride,
                             max_fps=camera.max_fps, realtime=settings.realtime,
                             live=camera.live, name=camera.id,
                             open_timeout=settings.open_timeout,
                             read_timeout=settings.open_timeout)
        self.source = LatestFrames(source) if source.live else source
        self.tracker = tracker if tracker is not None else build_tracker(camera, det)
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
        # An outage longer than `lost_after` processed frames ends every track.
        self.outage_limit = clips.lost_after / (camera.max_fps or 10.0)
        self.ids = _TrackletIds(settings.first_track_number)
        self.announced: set[int] = set()  # tracks whose tracklet the main process knows
        self.stages = dict.fromkeys(STAGES, 0.0)
        self.frames = 0
        self.clips = 0
        self.outages = 0
        self.first_frame_at: float | None = None
        self.first_time: float | None = None
        self.last_index: int | None = None
        self.last_time: float | None = None
        self.last_wall: float | None = None
        self.last_connection = 0
        self._interval_start = time.monotonic()
        self._interval_frames = 0
        self._fps = 0.0
        outbox.send(Ready(camera.id, self.keypoints.name, reason, time.monotonic()))

    @property
    def status(self) -> Status:
        video = (self.last_time - self.first_time) if self.first_time is not None else 0.0
        stats = self.source.stats
        return Status(self.camera.id, self.frames, self._fps, video, self.last_index,
                      self.last_time, self.buffer.active_tracks, self.clips, self.outbox.dropped,
                      stats.reconnects, dict(self.stages), self.first_frame_at,
                      source_state=stats.state,
                      reason=stats.last_error if stats.state == "reconnecting" else None,
                      attempt=stats.attempt, skipped_frames=getattr(self.source, "skipped", 0),
                      last_frame_wall_time=self.last_wall, last_track_number=self.ids.count,
                      outages=self.outages)

    def _heartbeat(self, done: threading.Event) -> None:
        """Report status every second, whatever the frame loop is waiting for; relay a stop to
        the source, which ends its reconnect backoff or frame wait at once."""
        while not done.wait(STATUS_INTERVAL_S):
            now = time.monotonic()
            self._fps = self._interval_frames / (now - self._interval_start)
            self._interval_start, self._interval_frames = now, 0
            if self.stop.is_set():
                self.source.stop()
            self.outbox.send(self.status)

    def run(self) -> tuple[str, str | None]:
        from tracking.sources import SourceError

        done = threading.Event()
        heartbeat = threading.Thread(target=self._heartbeat, args=(done,), name="heartbeat",
                                     daemon=True)
        heartbeat.start()
        frames = iter(self.source)
        max_frames = self.settings.max_frames
        start_after = self.settings.start_after
        try:
            while not self.stop.is_set():
                t0 = time.monotonic()
                frame = next(frames, None)
                t1 = time.monotonic()
                if frame is None or (max_frames is not None and frame.index >= max_frames):
                    break
                if start_after is not None and frame.index <= start_after:
                    continue
                if self.first_frame_at is None:
                    self.first_frame_at, self.first_time = t0, frame.time
                self.stages["decode"] += t1 - t0
                self._end_tracks_after_outage(frame)
                self._process(frame, t1)
        except SourceError as exc:
            self._finish_tracks()
            return "failed", str(exc)
        finally:
            done.set()
            self.source.stop()
            heartbeat.join(timeout=2 * STATUS_INTERVAL_S)  # `Finished` must be the last message
        self._finish_tracks()
        return ("stopped" if self.stop.is_set() else "finished"), None

    def _end_tracks_after_outage(self, frame) -> None:
        if frame.connection == self.last_connection:
            return
        gap = frame.wall_time - self.last_wall if self.last_wall is not None else 0.0
        self.last_connection = frame.connection
        if self.last_wall is not None and gap > self.outage_limit:
            LOG.warning("camera %s was down for %.1f s (back at frame %d): its %d open "
                        "track(s) end and the tracker starts afresh", self.camera.id, gap,
                        frame.index, self.buffer.active_tracks)
            self.outages += 1
            self._finish_tracks()
            self.tracker.reset()
            self.ids.reset()

    def _process(self, frame, t1: float) -> None:
        detections = self.ids.relabel(self.tracker.update(frame.image))
        t2 = time.monotonic()
        if self.keypoints.name != "yolo-pose":
            estimated = self.keypoints.estimate(frame.image, detections)
            detections = [Detection(d.box, d.score, d.track_id, k)
                          for d, k in zip(detections, estimated)]
        t3 = time.monotonic()
        clips = self.buffer.update(frame, detections)
        updates = self.buffer.pop_tracklet_updates()
        self.ids.ended(updates)
        t4 = time.monotonic()
        self.frames += 1
        self._interval_frames += 1
        self.last_index, self.last_time, self.last_wall = frame.index, frame.time, frame.wall_time
        self._emit(clips, updates)
        if self.outbox.pending and self.outbox.policy == "drop_oldest":
            self.outbox.flush(block=False)
        t5 = time.monotonic()
        self.stages["detect_track"] += t2 - t1
        self.stages["keypoints"] += t3 - t2
        self.stages["crop"] += t4 - t3
        self.stages["send"] += t5 - t4

    def _finish_tracks(self) -> None:
        """End every track (source ended, failed, stopped, or an outage): final clips are sent."""
        clips = self.buffer.flush()
        updates = self.buffer.pop_tracklet_updates()
        self.ids.ended(updates)
        self._emit(clips, updates, force=True)

    def _emit(self, clips: list[Clip], updates: list[TrackletUpdate], force: bool = False) -> None:
        """Send one frame's results, without final clips of fewer than `min_frames` distinct
        frames (short track tails, brief false detections): each clip costs an encoder pass.
        A track that never had a clip of its own is then not stored at all."""
        minimum = self.settings.clips.min_frames
        kept = [c for c in clips if not (c.final and len(set(c.frame_indices)) < minimum)]
        self.announced.update(c.track_id for c in kept)
        updates = [u for u in updates if u.track_id in self.announced]
        self.announced -= {u.track_id for u in updates if u.ended}
        if kept or updates:
            self.clips += len(kept)
            self.outbox.send(Output(self.camera.id, updates, kept), force=force)


def thumbnail_jpeg(image: np.ndarray | None, quality: int = 85) -> bytes | None:
    """RGB uint8 image -> JPEG bytes (what storage keeps as a thumbnail)."""
    import cv2

    if image is None:
        return None
    ok, data = cv2.imencode(".jpg", np.ascontiguousarray(image[..., ::-1]),
                            [cv2.IMWRITE_JPEG_QUALITY, quality])
    return data.tobytes() if ok else None
