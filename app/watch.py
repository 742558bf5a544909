"""`keyreid-watch`: watch many cameras, store person clips and descriptors, link people across cameras.

The main process is the database's single writer and hosts the encoder service; each camera
runs in its own worker process (`app.worker`). Exit codes: 0 every camera finished (or the
watcher was stopped by Ctrl-C / SIGTERM / --duration), 1 at least one camera failed (the
others still ran to the end), 2 invalid configuration or arguments (nothing started),
3 the database was refused (another watcher holds it, newer schema, cannot open).
"""
from __future__ import annotations

import argparse
import logging
import multiprocessing
import queue
import signal
import sys
import time
from dataclasses import dataclass, field

import numpy as np

from storage import NewClip, StorageError, open_repository

from .config import ConfigError, WatchConfig, load_config
from .linking import Linker, TrackletSummary, tracklet_descriptor
from .worker import Finished, Output, Ready, Status, WorkerSettings, camera_main, thumbnail_jpeg

LOG = logging.getLogger("keyreid.watch")
DRAIN_TIMEOUT_S = 5.0
DB_STATUS_INTERVAL_S = 2.0
LOG_STATUS_INTERVAL_S = 10.0

EXIT_OK, EXIT_CAMERA_FAILED, EXIT_CONFIG, EXIT_DATABASE = 0, 1, 2, 3


@dataclass
class _Camera:
    """The main process's view of one worker."""

    config: object
    process: multiprocessing.Process
    queue: multiprocessing.Queue
    ready: Ready | None = None
    status: Status | None = None
    finished: Finished | None = None


@dataclass
class _Tracklet:
    db_id: int
    camera_id: str
    first_time: float
    last_time: float
    ended: bool = False
    pending: int = 0
    descriptors: list = field(default_factory=list)


@dataclass(frozen=True)
class CameraSummary:
    camera_id: str
    status: str
    reason: str | None
    frames: int
    clips: int
    dropped_clips: int
    video_seconds: float
    stages: dict
    keypoint_backend: str | None


@dataclass(frozen=True)
class WatchSummary:
    """What a run did; `stages` are seconds summed over cameras (worker) or in the main process."""

    run_id: int
    cameras: dict[str, CameraSummary]
    tracklets: int
    clips_stored: int
    identities: int
    linked: int
    encode_seconds: float
    store_seconds: float
    link_seconds: float
    first_frame_at: float | None
    finished_at: float
    model_id: str
    dim: int
    exit_code: int

    @property
    def failed(self) -> list[str]:
        return [c for c, s in self.cameras.items() if s.status == "failed"]


class Watcher:
    """Runs one watch: spawn workers, encode, store, link, until the cameras end or a stop."""

    def __init__(self, config: WatchConfig, *, realtime: bool = False,
                 duration: float | None = None, max_frames: int | None = None,
                 status_stream=None) -> None:
        self.config = config
        self.realtime = realtime
        self.duration = duration
        self.max_frames = max_frames
        self.status_stream = status_stream if status_stream is not None else sys.stderr
        self._stop_requested = False
        self._force = False

    def request_stop(self) -> None:
        """Drain and stop (a second request stops without waiting for workers)."""
        if self._stop_requested:
            self._force = True
        self._stop_requested = True

    def run(self) -> WatchSummary:
        """Raises StorageError (incl. WriterLockedError) before anything starts."""
        config = self.config
        repo = open_repository(config.database)
        try:
            repo.acquire_writer(owner="keyreid-watch")
            return self._run(repo)
        finally:
            repo.close()

    # -- the main loop -------------------------------------------------------------------------
    def _run(self, repo) -> WatchSummary:
        config = self.config
        self.repo = repo
        self.run_id = repo.start_run(config.to_dict())
        LOG.info("run %d on %s with %d camera(s)", self.run_id, repo.url,
                 len(config.enabled_cameras))
        for camera in config.enabled_cameras:
            repo.upsert_camera(camera.id, camera.name, camera.source, camera.crop)
            repo.update_camera_status(camera.id, status="starting", frames_processed=0)
        context = multiprocessing.get_context("spawn")
        self.stop_event = context.Event()
        self.cameras: dict[str, _Camera] = {}
        for camera in config.enabled_cameras:
            policy = config.queues.policy
            if policy == "auto":
                policy = "block" if camera.is_file and not camera.live else "drop_oldest"
            settings = WorkerSettings(config.detector, config.keypoints, config.clips, policy,
                                      config.queues.pending_clips, self.realtime,
                                      self.max_frames, logging.getLogger().getEffectiveLevel())
            out = context.Queue(config.queues.size)
            process = context.Process(target=camera_main, name=f"keyreid-camera-{camera.id}",
                                      args=(camera, settings, out, self.stop_event), daemon=True)
            process.start()
            self.cameras[camera.id] = _Camera(camera, process, out)

        from .encoder_service import EncoderService
        self.encoder = EncoderService(config.reid)
        self.tracklets: dict[tuple[str, int], _Tracklet] = {}
        self.linker = Linker(config.linking.threshold, config.linking.time_window,
                             new_identity=repo.create_identity)
        self.counts = {"tracklets": 0, "clips": 0, "linked": 0, "identities": 0}
        self.timing = {"store": 0.0, "link": 0.0}
        started = time.monotonic()
        stopping_since: float | None = None
        last_db_status = last_status = last_log = started
        recent: list[tuple[float, int]] = [(started, 0)]
        max_backlog = max(config.reid.batch_size * 4, config.queues.pending_clips // 4)
        try:
            while True:
                now = time.monotonic()
                if self.duration is not None and now - started >= self.duration:
                    self._stop_requested = True
                if self._stop_requested and stopping_since is None:
                    LOG.info("stopping: draining the cameras' queues")
                    self.stop_event.set()
                    stopping_since = now
                progressed = False
                if self.encoder.backlog < max_backlog or stopping_since is not None:
                    progressed = self._read_queues()
                self._check_processes()
                running = [c for c in self.cameras.values() if c.finished is None]
                if self.encoder.due(now) or (self.encoder.backlog and (not running or stopping_since)):
                    self._encode_and_store()
                    progressed = True
                if not running and not self.encoder.backlog:
                    break
                if stopping_since is not None and (self._force
                                                   or now - stopping_since > DRAIN_TIMEOUT_S):
                    self._abandon(running)
                    while self.encoder.backlog:
                        self._encode_and_store()
                    break
                if now - last_db_status >= DB_STATUS_INTERVAL_S:
                    self._store_camera_status()
                    last_db_status = now
                if now - last_status >= 1.0:
                    recent = [(t, n) for t, n in recent if now - t <= 10.0] + [
                        (now, self.encoder.encoded_clips)]
                    line = self._status_line(recent)
                    if self.status_stream.isatty():
                        self.status_stream.write("\r\033[K" + line)
                        self.status_stream.flush()
                    elif now - last_log >= LOG_STATUS_INTERVAL_S:
                        LOG.info("%s", line)
                        last_log = now
                    last_status = now
                if not progressed:
                    time.sleep(0.01)
        finally:
            if self.status_stream.isatty():
                self.status_stream.write("\n")
            self.stop_event.set()
            for camera in self.cameras.values():
                camera.process.join(timeout=2.0)
                if camera.process.is_alive():
                    camera.process.terminate()
        self._link_ready(final=True)
        self._store_camera_status(final=True)
        return self._finish(started)

    def _read_queues(self) -> bool:
        progressed = False
        for camera in self.cameras.values():
            for _ in range(64):
                try:
                    message = camera.queue.get_nowait()
                except queue.Empty:
                    break
                progressed = True
                self._handle(camera, message)
        return progressed

    def _handle(self, camera: _Camera, message) -> None:
        if isinstance(message, Output):
            start = time.monotonic()
            for update in message.updates:
                self._tracklet_update(update)
            for clip, boxes in message.clips:
                tracklet = self.tracklets.get((clip.camera_id, clip.track_id))
                if tracklet is None:
                    LOG.warning("camera %s: clip of unannounced track %d skipped", clip.camera_id,
                                clip.track_id)
                    continue
                tracklet.pending += 1
                self.encoder.submit(clip.crops, clip.keypoints, (tracklet, clip, boxes))
            self.timing["store"] += time.monotonic() - start
        elif isinstance(message, Status):
            camera.status = message
        elif isinstance(message, Ready):
            camera.ready = message
            LOG.info("camera %s ready (keypoints: %s)", message.camera_id, message.reason)
            self.repo.update_camera_status(message.camera_id, status="running")
        elif isinstance(message, Finished):
            camera.finished = message
            if message.final_status is not None:
                camera.status = message.final_status
            if message.status == "failed":
                LOG.error("camera %s FAILED: %s", message.camera_id, message.reason)
            else:
                LOG.info("camera %s %s", message.camera_id, message.status)

    def _tracklet_update(self, update) -> None:
        key = (update.camera_id, update.track_id)
        tracklet = self.tracklets.get(key)
        thumbnail = thumbnail_jpeg(update.thumbnail)
        if tracklet is None:
            db_id = self.repo.add_tracklet(self.run_id, update.camera_id, update.track_id,
                                           update.first_frame, update.first_time,
                                           last_frame=update.last_frame,
                                           last_time=update.last_time, thumbnail=thumbnail,
                                           finished=update.ended)
            tracklet = self.tracklets[key] = _Tracklet(db_id, update.camera_id,
                                                       update.first_time, update.last_time)
            self.counts["tracklets"] += 1
        else:
            self.repo.update_tracklet(tracklet.db_id, last_frame=update.last_frame,
                                      last_time=update.last_time, thumbnail=thumbnail,
                                      finished=update.ended)
        tracklet.last_time = update.last_time
        tracklet.ended = tracklet.ended or update.ended

    def _encode_and_store(self) -> None:
        results = self.encoder.encode_batch()
        start = time.monotonic()
        rows = []
        for (tracklet, clip, boxes), descriptor in results:
            rows.append(NewClip(tracklet.db_id, clip.frame_indices, clip.times[0], clip.times[-1],
                                descriptor, self.encoder.model_id, boxes=boxes,
                                keypoints=clip.keypoints))
        self.repo.add_clips(rows)
        for (tracklet, _, _), descriptor in results:
            tracklet.pending -= 1
            tracklet.descriptors.append(descriptor)
        self.counts["clips"] += len(rows)
        self.timing["store"] += time.monotonic() - start
        self._link_ready()

    def _link_ready(self, final: bool = False) -> None:
        """Link tracklets that ended and have every clip stored (all remaining ones when final)."""
        ready = [(key, t) for key, t in self.tracklets.items()
                 if (t.ended or final) and t.pending == 0]
        if not ready:
            return
        start = time.monotonic()
        summaries = {}
        for key, tracklet in ready:
            del self.tracklets[key]
            if tracklet.descriptors:
                summaries[tracklet.db_id] = TrackletSummary(
                    tracklet.db_id, tracklet.camera_id, tracklet.first_time, tracklet.last_time,
                    tracklet_descriptor(np.stack(tracklet.descriptors)))
        if summaries and self.config.linking.enabled:
            before = len(self.linker.identities)
            for decision in self.linker.link(list(summaries.values())):
                self.repo.assign_identity(decision.key, decision.identity_id, decision.kind,
                                          decision.distance, decision.candidate)
                if decision.kind == "linked":
                    self.counts["linked"] += 1
            self.counts["identities"] += len(self.linker.identities) - before
        self.timing["link"] += time.monotonic() - start

    def _check_processes(self) -> None:
        """A worker that died without saying so (crash, kill) is a failed camera."""
        for camera in self.cameras.values():
            if camera.finished is not None or camera.process.is_alive():
                continue
            try:
                while True:
                    self._handle(camera, camera.queue.get(timeout=0.2))
                    if camera.finished is not None:
                        break
            except queue.Empty:
                pass
            if camera.finished is None:
                reason = f"worker process exited with code {camera.process.exitcode}"
                LOG.error("camera %s FAILED: %s", camera.config.id, reason)
                camera.finished = Finished(camera.config.id, "failed", reason)

    def _abandon(self, running: list[_Camera]) -> None:
        for camera in running:
            LOG.warning("camera %s did not stop within %.0f s; terminating its worker",
                        camera.config.id, DRAIN_TIMEOUT_S)
            camera.process.terminate()
            camera.finished = Finished(camera.config.id, "stopped", "terminated while draining")

    def _store_camera_status(self, final: bool = False) -> None:
        for camera in self.cameras.values():
            fields = {}
            if final or camera.finished is not None:
                finished = camera.finished
                fields["status"] = ("failed: " + (finished.reason or "unknown")
                                    if finished and finished.status == "failed"
                                    else (finished.status if finished else "stopped"))
            status = camera.status
            if status is not None:
                fields.update(fps=status.fps, frames_processed=status.frames,
                              last_frame_index=status.last_frame_index,
                              last_frame_time=status.last_frame_time)
            if fields:
                self.repo.update_camera_status(camera.config.id, **fields)

    def _status_line(self, recent: list[tuple[float, int]]) -> str:
        parts = []
        for camera_id, camera in self.cameras.items():
            s = camera.status
            if camera.finished is not None and camera.finished.status == "failed":
                parts.append(f"{camera_id}: FAILED")
            elif s is None:
                parts.append(f"{camera_id}: starting")
            else:
                drop = f" {s.dropped_clips} dropped" if s.dropped_clips else ""
                parts.append(f"{camera_id}: {s.fps:4.1f} fps {s.active_tracks} tracks "
                             f"{s.clips} clips{drop}")
        (t0, n0), (t1, n1) = recent[0], recent[-1]
        rate = (n1 - n0) / (t1 - t0) if t1 > t0 else 0.0
        return (" | ".join(parts) + f" | encoder: queue {self.encoder.backlog}, {rate:.1f} clips/s"
                f" | identities {self.counts['identities']}")

    def _finish(self, started: float) -> WatchSummary:
        cameras = {}
        for camera_id, camera in self.cameras.items():
            s, f = camera.status, camera.finished
            cameras[camera_id] = CameraSummary(
                camera_id, f.status if f else "stopped", f.reason if f else None,
                s.frames if s else 0, s.clips if s else 0, s.dropped_clips if s else 0,
                s.video_seconds if s else 0.0, dict(s.stages) if s else {},
                camera.ready.keypoint_backend if camera.ready else None)
        failed = [c for c, s in cameras.items() if s.status == "failed"]
        stopped = self._stop_requested
        status = ("failed cameras: " + ", ".join(failed) if failed
                  else "stopped" if stopped else "finished")
        self.repo.finish_run(self.run_id, status)
        firsts = [c.status.first_frame_at for c in self.cameras.values()
                  if c.status is not None and c.status.first_frame_at is not None]
        return WatchSummary(
            run_id=self.run_id, cameras=cameras, tracklets=self.counts["tracklets"],
            clips_stored=self.counts["clips"], identities=self.counts["identities"],
            linked=self.counts["linked"], encode_seconds=self.encoder.encode_seconds,
            store_seconds=self.timing["store"], link_seconds=self.timing["link"],
            first_frame_at=min(firsts) if firsts else None, finished_at=time.monotonic(),
            model_id=self.encoder.model_id, dim=self.encoder.dim,
            exit_code=EXIT_CAMERA_FAILED if failed else EXIT_OK)


def format_summary(summary: WatchSummary) -> str:
    lines = [f"run {summary.run_id}: {summary.tracklets} tracklets, {summary.clips_stored} clips "
             f"({summary.model_id}, dim {summary.dim}), {summary.identities} identities, "
             f"{summary.linked} cross-camera links"]
    for s in summary.cameras.values():
        extra = f": {s.reason}" if s.reason else ""
        drop = f", {s.dropped_clips} clips dropped" if s.dropped_clips else ""
        lines.append(f"  camera {s.camera_id}: {s.status}{extra} ({s.frames} frames, "
                     f"{s.video_seconds:.1f} s of video, {s.clips} clips{drop})")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="keyreid-watch", description=__doc__.split("\n")[0],
        epilog="Exit codes: 0 all cameras finished or stopped on request, 1 some camera failed, "
               "2 invalid configuration, 3 database refused (e.g. another watcher holds it).")
    parser.add_argument("--cameras", required=True, help="the cams.yaml file")
    parser.add_argument("--db", help="database URL (overrides the file's `database`)")
    parser.add_argument("--device", help="cpu, cuda, cuda:N: detector and encoder device")
    parser.add_argument("--realtime", action="store_true",
                        help="pace file sources to real time, as if they were live cameras")
    parser.add_argument("--duration", type=float, help="stop (draining) after this many seconds")
    parser.add_argument("--max-frames", type=int,
                        help="stop each camera at this source frame index (tests, benchmarks)")
    parser.add_argument("--log-level", default="INFO")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.duration is not None and args.duration <= 0 or (args.max_frames is not None
                                                           and args.max_frames < 1):
        print("keyreid-watch: --duration and --max-frames must be positive", file=sys.stderr)
        return EXIT_CONFIG
    try:
        config = load_config(args.cameras, database=args.db, device=args.device)
    except ConfigError as exc:
        print(f"keyreid-watch: invalid configuration {exc}\nnothing was started.", file=sys.stderr)
        return EXIT_CONFIG
    for warning in config.warnings:
        LOG.warning("%s", warning)
    watcher = Watcher(config, realtime=args.realtime, duration=args.duration,
                      max_frames=args.max_frames)
    previous = {sig: signal.signal(sig, lambda *_: watcher.request_stop())
                for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        summary = watcher.run()
    except StorageError as exc:
        print(f"keyreid-watch: {exc}", file=sys.stderr)
        return EXIT_DATABASE
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    print(format_summary(summary), file=sys.stderr)
    return summary.exit_code


if __name__ == "__main__":
    sys.exit(main())
