"""`keyreid-watch`: watch many cameras, store person clips and descriptors, link people across cameras.

The main process is the database's writer for its cameras and hosts the encoder service; each camera
runs as a stage of its own (`app.watcher.worker`), placed by the backend (`app.watcher.backends`:
a worker process on this machine, or a Ray actor on a cluster with `--backend ray`), read by a
thread of its own so that no camera, even one killed half-way through a message, can block the
main loop. The promises, in order:

- Nothing committed is lost: every write is one short transaction. Writes that fail for a
  reason that may pass (disk full, database locked) wait in an ordered in-memory spool and are
  retried with backoff; encoder failures put their batch back; a descriptor that is not
  finite is set aside, counted, never stored.
- A fault stays with its camera: a failed or dead worker fails only its camera; a live camera
  is restarted with backoff (`supervision`), its track numbers continuing.
- The service stays up and says what is wrong: statuses (starting / running / reconnecting /
  failed / finished / stopped, with reasons) are written every few seconds, and a restart
  repairs what a crash left (open tracklets, identities without members).
- One linker per site: a SQLite file has one watcher, which links. A PostgreSQL database may
  have several (each with its own cameras): the one holding the site's linker lock links the
  finished tracklets of all of them, taken from the database in the order they ended; the
  others store only, and one of them takes the lock over when that watcher stops. A tracklet
  is marked finished only once every clip of it is stored, so the linker never sees half of one.

Exit codes: 0 every camera finished (or the watcher was stopped by Ctrl-C / SIGTERM / --duration),
1 at least one camera failed (the others still ran to the end), 2 invalid configuration or
arguments, or the backend could not start, e.g. no Ray cluster at the address (nothing started),
3 the database was refused (another watcher holds it, newer schema,
cannot open) or clips that were encoded could not be stored before the watcher had to stop.
"""
from __future__ import annotations

import argparse
import logging
import signal
import sys
import time
from collections import deque
from dataclasses import dataclass, field, replace
from typing import Callable

import numpy as np

from storage import (
    NewClip,
    Repository,
    StorageError,
    StorageUnavailableError,
    open_repository,
)
from tracking.linking import TrackletSummary
from tracking.redact import log_with_redaction, redact

from .backends import BACKENDS, BackendError, CameraHandle, make_backend
from .config import CameraConfig, ConfigError, WatchConfig, load_config
from .linking import SiteLinking
from .worker import Finished, Output, Ready, Status, WorkerSettings, thumbnail_jpeg

LOG = logging.getLogger("keyreid.watch")
DB_STATUS_INTERVAL_S = 2.0
LOG_STATUS_INTERVAL_S = 10.0
DEATH_GRACE_S = 1.0  # after a worker dies, how long its last complete messages may take to arrive
RETENTION_SLICE_S = 2.0  # at most this long per retention call (it resumes at the next)

EXIT_OK, EXIT_CAMERA_FAILED, EXIT_CONFIG, EXIT_DATABASE = 0, 1, 2, 3


@dataclass
class _Camera:
    """The main process's view of one camera and its (current) worker."""

    config: CameraConfig
    settings: WorkerSettings
    worker: CameraHandle | None = None  # its camera stage, as the backend runs it
    ready: Ready | None = None
    status: Status | None = None
    finished: Finished | None = None
    restart_at: float | None = None  # a restart is scheduled (monotonic time)
    restarts: list[float] = field(default_factory=list)  # when each restart happened
    last_failure: str | None = None
    max_track: int = 0  # highest track number seen: a restarted worker continues after it

    @property
    def running(self) -> bool:
        return self.finished is None or self.restart_at is not None


@dataclass
class _Tracklet:
    """A tracklet the main process is storing; times are capture wall-clock seconds (UTC), the
    clock linking compares across cameras."""

    camera_id: str
    track_id: int
    first_time: float
    last_time: float
    db_id: int | None = None  # known once its row is written (writes are spooled in order)
    ended: bool = False
    end_reason: str | None = None
    pending: int = 0  # clips submitted and not yet stored (or set aside)
    descriptors: list = field(default_factory=list)
    clip_times: list = field(default_factory=list)  # wall-clock start of each stored clip


@dataclass
class _Write:
    """One spooled database write. `apply` runs it; `settle` runs once it is stored or dropped."""

    what: str
    apply: Callable[[Repository], None]
    settle: Callable[[], None] | None = None
    clips: int = 0


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
    restarts: int = 0


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
    drained_at: float | None  # every result stored and linked, before the workers are joined
    finished_at: float
    model_id: str
    dim: int
    exit_code: int
    set_aside: int = 0
    lost_writes: int = 0
    repaired: str = ""
    separation: str = ""

    @property
    def failed(self) -> list[str]:
        return [c for c, s in self.cameras.items() if s.status == "failed"]


class Watcher:
    """Runs one watch: spawn workers, encode, store, link, until the cameras end or a stop."""

    def __init__(self, config: WatchConfig, *, realtime: bool = False,
                 duration: float | None = None, max_frames: int | None = None,
                 start_over: bool = False, status_stream=None, backend: str = "local",
                 ray_address: str | None = None) -> None:
        self.config = config
        self.backend_name = backend
        self.ray_address = ray_address
        self.realtime = realtime
        self.duration = duration
        self.max_frames = max_frames
        self.start_over = start_over
        self.status_stream = status_stream if status_stream is not None else sys.stderr
        self._stop_requested = False
        self._force = False

    def _report_camera_statistics(self) -> None:
        """A site-adapted encoder standardises each camera's descriptors by its own statistics;
        a camera it was not adapted on gets the pooled ones: say which (adapt again to add it)."""
        normalisation = self.encoder.info.camera_normalisation
        if normalisation is None:
            return
        known = sorted(set(self.cameras) & set(normalisation.cameras))
        unknown = sorted(set(self.cameras) - set(normalisation.cameras))
        LOG.info("encoder: site-adapted; per-camera statistics for %s", ", ".join(known) or "no camera")
        if unknown:
            LOG.warning("encoder: camera(s) %s not in the adapted checkpoint's statistics (it knows %s): "
                        "pooled statistics; run `python -m training.adapt` again to include them",
                        ", ".join(unknown), ", ".join(sorted(normalisation.cameras)))

    def request_stop(self) -> None:
        """Drain and stop (a second request stops without waiting for workers)."""
        if self._stop_requested:
            self._force = True
        self._stop_requested = True

    def run(self) -> WatchSummary:
        """Raises StorageError (incl. WriterLockedError) before anything starts, and
        BackendError when the backend cannot start (e.g. no Ray cluster at the address)."""
        if self.config.detector.service == "shared" and self.backend_name != "ray":
            raise BackendError("detector: service shared needs --backend ray (the local "
                               "backend runs a detector in each camera's process)")
        repo = open_repository(self.config.database)
        try:
            repo.acquire_writer(owner="keyreid-watch")
            self.backend = make_backend(self.backend_name, self.config.queues.size,
                                        ray_address=self.ray_address,
                                        cameras=len(self.config.enabled_cameras),
                                        threads=self.config.detector.threads or 1)
            try:
                return self._run(repo)
            finally:
                self.backend.close()
        finally:
            repo.close()

    # -- start-up ------------------------------------------------------------------------------
    def _start(self, repo: Repository) -> None:
        config = self.config
        self.repo = repo
        self.run_id = repo.start_run(config.to_dict())
        self.repair_report = repo.repair(self.run_id)
        LOG.info("run %d on %s with %d camera(s); repair: %s", self.run_id, repo.url,
                 len(config.enabled_cameras), self.repair_report)
        self.cameras: dict[str, _Camera] = {}
        for camera in config.enabled_cameras:
            start_after = None
            if camera.is_file and not self.start_over:
                start_after = repo.resume_after(camera.id, camera.shown_source)
                if start_after is not None:
                    LOG.info("camera %s resumes after frame %d, the last one stored by an "
                             "earlier run (--start-over processes the file again)", camera.id,
                             start_after)
            repo.upsert_camera(camera.id, camera.name, camera.shown_source, camera.crop)
            repo.update_camera_status(camera.id, status="starting", status_reason=None,
                                      frames_processed=0, restarts=0, reconnects=0)
            policy = config.queues.policy
            if policy == "auto":
                policy = "drop_oldest" if camera.is_live else "block"
            settings = WorkerSettings(config.detector, config.keypoints, config.clips, policy,
                                      config.queues.pending_clips, self.realtime,
                                      self.max_frames, logging.getLogger().getEffectiveLevel(),
                                      start_after=start_after,
                                      open_timeout=config.supervision.open_timeout)
            self.cameras[camera.id] = _Camera(camera, settings)
            self._spawn(self.cameras[camera.id])

        from .encoder_service import EncoderService
        self.encoder = EncoderService(config.reid, self.backend.encoder(config.reid))
        self._report_camera_statistics()
        self.tracklets: dict[tuple[str, int], _Tracklet] = {}
        self.spool: deque[_Write] = deque()
        self.drained_at: float | None = None  # time.monotonic() when the last result was handled
        self.spool_clips = 0
        self.db_error: str | None = None
        self.db_retry_at = 0.0
        self.db_retry_delay = config.storage.retry_delay
        self.encode_retry_at = 0.0
        self.counts = {"tracklets": 0, "clips": 0, "set_aside": 0, "dropped_writes": 0}
        self.store_seconds = 0.0
        self.linking = SiteLinking(config.linking, repo, self.encoder.info, self.run_id,
                                   start_over=self.start_over,
                                   unavailable=lambda reason: self._database_unavailable(reason, time.monotonic()),
                                   direct=self._direct)
        self.linking.claim()

    def _spawn(self, camera: _Camera) -> None:
        settings = replace(camera.settings, first_track_number=camera.max_track)
        camera.worker = self.backend.start_camera(camera.config, settings)
        camera.ready = camera.finished = camera.restart_at = None

    # -- the main loop -------------------------------------------------------------------------
    def _run(self, repo: Repository) -> WatchSummary:
        self._start(repo)
        config = self.config
        started = time.monotonic()
        stopping_since: float | None = None
        last_db_status = last_status = last_log = last_retention = started
        recent: list[tuple[float, int]] = [(started, 0)]
        max_backlog = max(config.reid.batch_size * 4, config.queues.pending_clips // 4)
        drain = config.supervision.drain_timeout
        try:
            while True:
                now = time.monotonic()
                if self.duration is not None and now - started >= self.duration:
                    self._stop_requested = True
                if self._stop_requested and stopping_since is None:
                    LOG.info("stopping: draining the cameras' queues")
                    self.backend.stop_cameras()
                    for camera in self.cameras.values():
                        camera.restart_at = None
                    stopping_since = now
                progressed = False
                room = (self.encoder.backlog < max_backlog
                        and self.spool_clips < config.storage.spool_clips)
                if room or stopping_since is not None:
                    progressed = self._read_inboxes()
                self._check_processes(now)
                if stopping_since is None:
                    self._restart_due(now)
                running = [c for c in self.cameras.values() if c.running]
                if now >= self.encode_retry_at and (
                        self.encoder.due(now)
                        or (self.encoder.backlog and (not running or stopping_since))):
                    progressed = self._encode_and_store() or progressed
                self._finish_stored()
                self._flush_spool(now)
                self.linking.claim(now)
                if not self.spool and self.db_error is None:
                    self.linking.link_ready()
                if not running and not self.encoder.backlog and not self.spool:
                    self.drained_at = time.monotonic()
                    break
                if stopping_since is not None and (self._force or now - stopping_since > drain):
                    self._abandon(running)
                    self._drain_after_stop(drain)
                    self.drained_at = time.monotonic()
                    break
                if now - last_db_status >= DB_STATUS_INTERVAL_S:
                    self._store_camera_status()
                    self._direct("the writer's lock session", self.repo.keep_alive)
                    last_db_status = now
                if now - last_retention >= config.retention.interval:
                    self._enforce_retention()
                    last_retention = now
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
            self.backend.stop_cameras()
            deadline = time.monotonic() + 2.0  # one grace period for all workers together
            for camera in self.cameras.values():
                if camera.worker is not None:
                    camera.worker.join(timeout=max(0.0, deadline - time.monotonic()))
            for camera in self.cameras.values():
                if camera.worker is not None and camera.worker.is_alive():
                    camera.worker.kill()
                    camera.worker.join(timeout=2.0)
        return self._finish(started)

    def _drain_after_stop(self, drain: float) -> None:
        """Encode what is left, then keep trying to store it for one more drain period."""
        while self.encoder.backlog:
            if not self._encode_and_store():
                break
        deadline = time.monotonic() + drain
        while self.spool and time.monotonic() < deadline and not self._force:
            self._flush_spool(time.monotonic())
            time.sleep(0.05)

    def _read_inboxes(self) -> bool:
        progressed = False
        for camera in self.cameras.values():
            if camera.worker is None:
                continue
            for message in camera.worker.take(64):
                progressed = True
                self._handle(camera, message)
        return progressed

    def _handle(self, camera: _Camera, message) -> None:
        if isinstance(message, Output):
            for update in message.updates:
                self._tracklet_update(camera, update)
            for clip in message.clips:
                tracklet = self.tracklets.get((clip.camera_id, clip.track_id))
                if tracklet is None:
                    LOG.warning("camera %s: clip of unannounced track %d skipped", clip.camera_id,
                                clip.track_id)
                    continue
                tracklet.pending += 1
                self.encoder.submit(clip.crops, clip.keypoints, (tracklet, clip), clip.camera_id)
        elif isinstance(message, Status):
            camera.status = message
            camera.max_track = max(camera.max_track, message.last_track_number)
        elif isinstance(message, Ready):
            camera.ready = message
            LOG.info("camera %s ready (keypoints: %s)", message.camera_id, message.reason)
        elif isinstance(message, Finished):
            self._camera_finished(camera, message)

    def _tracklet_update(self, camera: _Camera, update) -> None:
        key = (update.camera_id, update.track_id)
        camera.max_track = max(camera.max_track, update.track_id)
        tracklet = self.tracklets.get(key)
        thumbnail = thumbnail_jpeg(update.thumbnail)
        if tracklet is None:
            tracklet = self.tracklets[key] = _Tracklet(update.camera_id, update.track_id,
                                                       update.first_wall_time, update.last_wall_time)
            self.counts["tracklets"] += 1

            def add(repo: Repository, t=tracklet, u=update, thumb=thumbnail) -> None:
                t.db_id = repo.add_tracklet(
                    self.run_id, u.camera_id, u.track_id, u.first_frame, u.first_time,
                    last_frame=u.last_frame, last_time=u.last_time, thumbnail=thumb,
                    first_wall_time=u.first_wall_time, last_wall_time=u.last_wall_time)
            self._spool(_Write(f"tracklet {update.camera_id}/{update.track_id}", add))
        else:
            def extend(repo: Repository, t=tracklet, u=update, thumb=thumbnail) -> None:
                if t.db_id is not None:
                    repo.update_tracklet(t.db_id, last_frame=u.last_frame, last_time=u.last_time,
                                         thumbnail=thumb, last_wall_time=u.last_wall_time)
            self._spool(_Write(f"tracklet {update.camera_id}/{update.track_id}", extend))
        tracklet.last_time = update.last_wall_time
        tracklet.ended = tracklet.ended or update.ended

    def _encode_and_store(self) -> bool:
        """Encode one batch and spool its clips; False when the encoder failed (retried later)."""
        try:
            results = self.encoder.encode_batch()
        except Exception as exc:  # noqa: BLE001 - the batch is back in the queue; retry later
            LOG.error("encoder failed on a batch (%s: %s); its clips wait and are retried in "
                      "2 s", type(exc).__name__, exc)
            self.encode_retry_at = time.monotonic() + 2.0
            return False
        kept = []
        for (tracklet, clip), descriptor in results:
            if np.all(np.isfinite(descriptor)):
                kept.append((tracklet, clip, descriptor))
                continue
            self.counts["set_aside"] += 1
            tracklet.pending -= 1
            LOG.warning("camera %s track %d: a clip's descriptor is not finite; set aside, not "
                        "stored (%d so far)", clip.camera_id, clip.track_id,
                        self.counts["set_aside"])
        if kept:
            self._spool(self._clip_write(kept))
        return True

    def _clip_write(self, kept: list) -> _Write:
        model_id = self.encoder.model_id

        def add(repo: Repository) -> None:
            rows = [NewClip(t.db_id, c.frame_indices, c.times[0], c.times[-1], d, model_id,
                            boxes=c.boxes, keypoints=c.keypoints,
                            start_wall_time=c.wall_times[0] if c.wall_times else None,
                            end_wall_time=c.wall_times[-1] if c.wall_times else None)
                    for t, c, d in kept if t.db_id is not None]
            start = time.monotonic()
            repo.add_clips(rows)
            self.store_seconds += time.monotonic() - start
            self.counts["clips"] += len(rows)
            for tracklet, clip, descriptor in kept:
                tracklet.descriptors.append(descriptor)
                tracklet.clip_times.append(clip.wall_times[0] if clip.wall_times
                                           else tracklet.first_time)

        def settle() -> None:
            for tracklet, _, _ in kept:
                tracklet.pending -= 1

        return _Write(f"{len(kept)} clip(s)", add, settle, clips=len(kept))

    # -- the write spool -----------------------------------------------------------------------
    def _spool(self, write: _Write) -> None:
        self.spool.append(write)
        self.spool_clips += write.clips
        self._flush_spool(time.monotonic())

    def _flush_spool(self, now: float, *, now_or_never: bool = False) -> None:
        """Run spooled writes in order until one fails for a reason that may pass (retried after
        a backoff; `now_or_never` tries at once, for the last attempt at the end of a run)."""
        if self.db_error is not None and now < self.db_retry_at and not now_or_never:
            return
        while self.spool:
            write = self.spool[0]
            try:
                write.apply(self.repo)
            except StorageUnavailableError as exc:
                self._database_unavailable(str(exc), now)
                return
            except (StorageError, ValueError) as exc:
                self.counts["dropped_writes"] += 1
                LOG.error("a write was refused and dropped (%s): %s", write.what, exc)
            self.spool.popleft()
            self.spool_clips -= write.clips
            if write.settle is not None:
                write.settle()
        if self.db_error is not None:
            LOG.warning("database writable again: every spooled write is stored")
            self.db_error = None
            self.db_retry_delay = self.config.storage.retry_delay

    def _database_unavailable(self, reason: str, now: float) -> None:
        if self.db_error is None:
            LOG.error("DATABASE UNAVAILABLE: %s. Cameras keep running; %d write(s) (%d clips) "
                      "wait in memory and are retried (at most %d clips wait, then cameras "
                      "slow down or drop their oldest clips)", reason, len(self.spool),
                      self.spool_clips, self.config.storage.spool_clips)
        self.db_error = reason
        self.db_retry_at = now + self.db_retry_delay
        self.db_retry_delay = min(self.db_retry_delay * 2, self.config.storage.retry_max_delay)

    def _direct(self, what: str, write: Callable[[], None]) -> bool:
        """A write that is not spooled (statuses are rewritten soon anyway); False if it failed."""
        if self.db_error is not None:
            return False
        try:
            write()
            return True
        except StorageUnavailableError as exc:
            self._database_unavailable(str(exc), time.monotonic())
        except StorageError as exc:
            LOG.error("could not store %s: %s", what, exc)
        return False

    # -- finished tracklets, to the link stage ---------------------------------------------------
    def _finish_stored(self, final: bool = False) -> None:
        """Mark a tracklet finished once it ended and every clip of it is stored (or set
        aside): only then is it complete in the database, where the site's linker takes it
        from. At the end of the run every tracklet with nothing in flight is finished. The
        linker of this watcher keeps its own tracklets' exact descriptors for that moment."""
        for key, tracklet in list(self.tracklets.items()):
            if not (tracklet.ended or final) or tracklet.pending or tracklet.db_id is None:
                continue
            del self.tracklets[key]
            if self.linking.active and tracklet.descriptors:
                self.linking.tracklet_finished(TrackletSummary.from_clips(
                    tracklet.db_id, tracklet.camera_id, np.stack(tracklet.descriptors),
                    tracklet.clip_times, first_time=tracklet.first_time,
                    last_time=tracklet.last_time))

            def finish(repo: Repository, t=tracklet) -> None:
                repo.update_tracklet(t.db_id, finished=True, end_reason=t.end_reason)
            self._spool(_Write(f"tracklet {tracklet.camera_id}/{tracklet.track_id} finished",
                               finish))

    # -- cameras -----------------------------------------------------------------------------------
    def _check_processes(self, now: float) -> None:
        """A worker that died without saying so (crash, kill) is a failed camera; its complete
        messages are still taken (for a short grace period), a half-written one is not."""
        for camera in self.cameras.values():
            if camera.finished is not None or camera.worker is None or camera.worker.is_alive():
                continue
            deadline = time.monotonic() + DEATH_GRACE_S
            while camera.finished is None and time.monotonic() < deadline:
                messages = camera.worker.take(64)
                for message in messages:
                    self._handle(camera, message)
                if not messages:
                    if not camera.worker.reader_alive():
                        break
                    time.sleep(0.05)
            if camera.finished is None:
                self._camera_finished(camera, Finished(camera.config.id, "failed",
                                                       camera.worker.exit_reason()))

    def _camera_finished(self, camera: _Camera, finished: Finished) -> None:
        camera.finished = finished
        if finished.final_status is not None:
            camera.status = finished.final_status
            camera.max_track = max(camera.max_track, finished.final_status.last_track_number)
        camera_id = camera.config.id
        if finished.status != "failed":
            LOG.info("camera %s %s", camera_id, finished.status)
            return
        reason = redact(finished.reason or "unknown")
        camera.last_failure = reason
        LOG.error("camera %s FAILED: %s", camera_id, reason)
        self._close_tracklets(camera_id, f"camera worker failed: {reason}")
        supervision = self.config.supervision
        now = time.monotonic()
        recent = [t for t in camera.restarts if now - t <= supervision.restart_window]
        if (camera.config.is_live and supervision.restart_live and not self._stop_requested
                and len(recent) < supervision.max_restarts):
            delay = min(supervision.restart_delay * 2 ** len(recent),
                        supervision.restart_max_delay)
            camera.restart_at = now + delay
            LOG.warning("camera %s: restarting its worker in %.0f s (restart %d of at most %d "
                        "per %.0f s)", camera_id, delay, len(recent) + 1, supervision.max_restarts,
                        supervision.restart_window)

    def _close_tracklets(self, camera_id: str, reason: str) -> None:
        """The tracklets a dead worker left open end here (their stored clips are kept); each
        is finished, with the reason, once its clips in flight are stored (`_finish_stored`)."""
        for tracklet in self.tracklets.values():
            if tracklet.camera_id == camera_id and not tracklet.ended:
                tracklet.ended, tracklet.end_reason = True, reason

    def _restart_due(self, now: float) -> None:
        for camera in self.cameras.values():
            if camera.restart_at is not None and now >= camera.restart_at:
                camera.restarts.append(now)
                LOG.info("camera %s: starting a new worker (restart %d)", camera.config.id,
                         len(camera.restarts))
                self._spawn(camera)

    def _abandon(self, running: list[_Camera]) -> None:
        for camera in running:
            camera.restart_at = None
            if camera.finished is not None or camera.worker is None:
                continue
            LOG.warning("camera %s did not stop within %.0f s; terminating its worker",
                        camera.config.id, self.config.supervision.drain_timeout)
            camera.worker.kill()
            camera.finished = Finished(camera.config.id, "stopped", "terminated while draining")
            self._close_tracklets(camera.config.id, "stopped: terminated while draining")

    def _camera_state(self, camera: _Camera) -> tuple[str, str | None]:
        """(status, reason) as operators see it."""
        if camera.restart_at is not None:
            return "reconnecting", f"worker restarting after: {camera.last_failure}"
        if camera.finished is not None:
            if camera.finished.status == "failed":
                return "failed", redact(camera.finished.reason or "unknown")
            return camera.finished.status, None
        status = camera.status
        if camera.ready is None or status is None:
            return "starting", None
        if status.source_state == "reconnecting":
            return "reconnecting", f"{status.reason} (attempt {status.attempt})"
        if status.source_state == "connecting":
            return "starting", None
        return "running", None

    def _store_camera_status(self, final: bool = False) -> None:
        for camera in self.cameras.values():
            state, reason = self._camera_state(camera)
            if final and state not in ("failed", "finished"):
                state, reason = "stopped", None
            fields = {"status": state, "status_reason": reason,
                      "restarts": len(camera.restarts)}
            status = camera.status
            if status is not None:
                fields.update(fps=status.fps, frames_processed=status.frames,
                              last_frame_index=status.last_frame_index,
                              last_frame_time=status.last_frame_time,
                              last_frame_wall_time=status.last_frame_wall_time,
                              reconnects=status.reconnects)
            self._direct(f"camera {camera.config.id} status",
                         lambda c=camera.config.id, f=fields: self.repo.update_camera_status(c, **f))

    def _enforce_retention(self) -> None:
        policy = self.config.retention
        if policy.max_age_days is None and policy.max_gb is None:
            return
        from storage import RetentionPolicy, enforce_retention

        max_bytes = None if policy.max_gb is None else int(policy.max_gb * 1e9)
        try:  # a short slice per call: the cameras' writes never wait long behind it
            report = enforce_retention(self.repo, RetentionPolicy(policy.max_age_days, max_bytes),
                                       time_budget_s=RETENTION_SLICE_S)
        except StorageUnavailableError as exc:
            self._database_unavailable(str(exc), time.monotonic())
            return
        self.linking.identities_deleted(report.deleted_identity_ids)
        if report.tracklets_deleted:
            LOG.info("retention: deleted %d tracklets, %d clips, %d identities; database %.1f "
                     "-> %.1f MB%s", report.tracklets_deleted, report.clips_deleted,
                     report.identities_deleted, report.bytes_before / 1e6,
                     report.bytes_after / 1e6,
                     "" if report.reclaimable else " (space is reused, not returned: see "
                     "README, retention)")

    def _status_line(self, recent: list[tuple[float, int]]) -> str:
        parts = []
        for camera_id, camera in self.cameras.items():
            state, _ = self._camera_state(camera)
            s = camera.status
            if state != "running" or s is None:
                parts.append(f"{camera_id}: {state.upper() if state == 'failed' else state}")
                continue
            extra = "".join(f" {n} {what}" for n, what in (
                (s.dropped_clips, "dropped"), (s.skipped_frames, "frames skipped"),
                (len(camera.restarts), "restarts")) if n)
            parts.append(f"{camera_id}: {s.fps:4.1f} fps {s.active_tracks} tracks "
                         f"{s.clips} clips{extra}")
        (t0, n0), (t1, n1) = recent[0], recent[-1]
        rate = (n1 - n0) / (t1 - t0) if t1 > t0 else 0.0
        line = (" | ".join(parts) + f" | encoder: queue {self.encoder.backlog}, {rate:.1f} clips/s"
                f" | identities {self.linking.identities_opened} | {self.linking.status()}")
        if self.counts["set_aside"]:
            line += f" | {self.counts['set_aside']} clips set aside (not finite)"
        if self.spool or self.db_error:
            line += (f" | spool {len(self.spool)} writes ({self.spool_clips} clips)"
                     + (" DATABASE UNAVAILABLE" if self.db_error else ""))
        return line

    def _finish(self, started: float) -> WatchSummary:
        """Link what is left, store final statuses and close the run: each step attempted even
        when an earlier one failed, so the run never stays "running"."""
        try:
            self._finish_stored(final=True)
            self._flush_spool(time.monotonic(), now_or_never=True)
            if not self.spool and self.db_error is None:
                self.linking.link_ready(final=True)
        except Exception:  # noqa: BLE001 - the run must still be closed
            LOG.exception("final linking failed")
        lost = self.spool_clips
        if self.spool:
            LOG.error("%d write(s) (%d encoded clips) could not be stored: %s", len(self.spool),
                      lost, self.db_error)
        cameras = {}
        for camera_id, camera in self.cameras.items():
            s, f = camera.status, camera.finished
            status = f.status if f else "stopped"
            cameras[camera_id] = CameraSummary(
                camera_id, status, redact(f.reason) if f and f.reason else None,
                s.frames if s else 0, s.clips if s else 0, s.dropped_clips if s else 0,
                s.video_seconds if s else 0.0, dict(s.stages) if s else {},
                camera.ready.keypoint_backend if camera.ready else None, len(camera.restarts))
        self.db_error = None  # try the final writes whatever happened before
        self._store_camera_status(final=True)
        failed = [c for c, s in cameras.items() if s.status == "failed"]
        status = ("failed cameras: " + ", ".join(failed) if failed
                  else "stopped" if self._stop_requested else "finished")
        if self.spool:
            status += f"; {lost} encoded clips not stored (database unavailable)"
        self._direct("the run's end", lambda: self.repo.finish_run(self.run_id, status))
        firsts = [c.status.first_frame_at for c in self.cameras.values()
                  if c.status is not None and c.status.first_frame_at is not None]
        exit_code = (EXIT_DATABASE if self.spool else EXIT_CAMERA_FAILED if failed else EXIT_OK)
        return WatchSummary(
            run_id=self.run_id, cameras=cameras, tracklets=self.counts["tracklets"],
            clips_stored=self.counts["clips"], identities=self.linking.identities_opened,
            linked=self.linking.links_made, encode_seconds=self.encoder.encode_seconds,
            store_seconds=self.store_seconds, link_seconds=self.linking.seconds,
            first_frame_at=min(firsts) if firsts else None, drained_at=self.drained_at,
            finished_at=time.monotonic(),
            model_id=self.encoder.model_id, dim=self.encoder.dim, exit_code=exit_code,
            set_aside=self.counts["set_aside"], lost_writes=len(self.spool),
            repaired=str(self.repair_report),
            separation=self.linking.separation())


def format_summary(summary: WatchSummary) -> str:
    lines = [f"run {summary.run_id}: {summary.tracklets} tracklets, {summary.clips_stored} clips "
             f"({summary.model_id}, dim {summary.dim}), {summary.identities} identities, "
             f"{summary.linked} cross-camera links"]
    if summary.separation:
        lines.append(f"  linker: {summary.separation}")
    if summary.set_aside:
        lines.append(f"  {summary.set_aside} clips set aside: their descriptors were not finite")
    if summary.lost_writes:
        lines.append(f"  {summary.lost_writes} writes could not be stored (database unavailable)")
    for s in summary.cameras.values():
        extra = f": {s.reason}" if s.reason else ""
        drop = f", {s.dropped_clips} clips dropped" if s.dropped_clips else ""
        restarts = f", {s.restarts} restarts" if s.restarts else ""
        lines.append(f"  camera {s.camera_id}: {s.status}{extra} ({s.frames} frames, "
                     f"{s.video_seconds:.1f} s of video, {s.clips} clips{drop}{restarts})")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="keyreid-watch", description=__doc__.split("\n")[0],
        epilog="Exit codes: 0 all cameras finished or stopped on request, 1 some camera failed, "
               "2 invalid configuration, 3 database refused (e.g. another watcher holds it) or "
               "encoded clips could not be stored.")
    parser.add_argument("--cameras", required=True, help="the cams.yaml file")
    parser.add_argument("--db", help="database URL (overrides the file's `database`)")
    parser.add_argument("--device", help="cpu, cuda, cuda:N: detector and encoder device")
    parser.add_argument("--realtime", action="store_true",
                        help="pace file sources to real time, as if they were live cameras")
    parser.add_argument("--duration", type=float, help="stop (draining) after this many seconds")
    parser.add_argument("--max-frames", type=int,
                        help="stop each camera at this source frame index (tests, benchmarks)")
    parser.add_argument("--start-over", action="store_true",
                        help="process file cameras from their first frame, even where an "
                             "earlier run already stored them")
    parser.add_argument("--backend", choices=BACKENDS, default="local",
                        help="where the cameras' stages run: local worker processes (default) "
                             "or actors on a Ray cluster")
    parser.add_argument("--ray-address",
                        help="with --backend ray: the cluster's address (host:port of its head, "
                             "or 'auto'); default: a Ray instance of its own on this machine")
    parser.add_argument("--log-level", default="INFO")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    log_with_redaction(args.log_level.upper(), "%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.duration is not None and args.duration <= 0 or (args.max_frames is not None
                                                           and args.max_frames < 1):
        print("keyreid-watch: --duration and --max-frames must be positive", file=sys.stderr)
        return EXIT_CONFIG
    try:
        config = load_config(args.cameras, database=args.db, device=args.device)
    except ConfigError as exc:
        print(redact(f"keyreid-watch: invalid configuration {exc}\nnothing was started."),
              file=sys.stderr)
        return EXIT_CONFIG
    for warning in config.warnings:
        LOG.warning("%s", warning)
    if args.ray_address and args.backend != "ray":
        print("keyreid-watch: --ray-address needs --backend ray", file=sys.stderr)
        return EXIT_CONFIG
    watcher = Watcher(config, realtime=args.realtime, duration=args.duration,
                      max_frames=args.max_frames, start_over=args.start_over,
                      backend=args.backend, ray_address=args.ray_address)
    previous = {sig: signal.signal(sig, lambda *_: watcher.request_stop())
                for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        summary = watcher.run()
    except StorageError as exc:
        print(f"keyreid-watch: {redact(str(exc))}", file=sys.stderr)
        return EXIT_DATABASE
    except BackendError as exc:
        print(f"keyreid-watch: {redact(str(exc))}\nnothing was started.", file=sys.stderr)
        return EXIT_CONFIG
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    print(format_summary(summary), file=sys.stderr)
    return summary.exit_code


if __name__ == "__main__":
    sys.exit(main())
