"""The repository: the only way the watcher, the dashboard and training touch the database.

Every public write is its own short transaction and commits before returning, so a watcher
killed with kill -9 loses nothing it was told was stored. Reads return frozen records
(`records.py`), never ORM objects.

Descriptors are stored as raw little-endian bytes with their dtype and dimension on each row.
float16 is the default: it halves the database and the in-memory gallery, and re-id rankings
are insensitive to its ~1e-3 relative rounding (descriptors are BN-normalised features of order
1). float32 is available per repository for exact round trips. Clips of different models
(`model_id`) may coexist; a search always uses a single model.
"""
from __future__ import annotations

import json
import os
import socket
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import numpy as np
from sqlalchemy import Engine, Integer, cast, func, inspect, or_, select, text, union
from sqlalchemy.exc import IntegrityError, OperationalError, SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from sqlalchemy.engine import make_url

from .engine import create_storage_engine, display_url, sqlite_path, validate_database_url
from .errors import (
    ReadOnlyError,
    SchemaTooNewError,
    SchemaTooOldError,
    StorageError,
    StorageUnavailableError,
)
from .lock import SiteSession, WriterLock, lock_for_migration
from .records import (
    LINK_KINDS,
    ActivityBucket,
    CameraRecord,
    ClipRecord,
    IdentityMember,
    IdentityRecord,
    IdentitySnapshot,
    LinkDecisionRecord,
    NewClip,
    RepairReport,
    RunRecord,
    SearchHit,
    StorageStats,
    TrackletRecord,
    UnlinkedTracklet,
)
from .schema import (
    MIGRATIONS,
    SCHEMA_VERSION,
    Base,
    Camera,
    Clip,
    Identity,
    LinkDecision,
    Run,
    Tracklet,
    read_schema_version,
    upgrade,
    utcnow,
    write_schema_version,
)
from .search import GalleryIndex
from .similarity import tracklet_descriptor

_DTYPES = {"float16": np.dtype("<f2"), "float32": np.dtype("<f4")}
# The time axis of filters, listings, timelines and search: the capture wall-clock time where
# the watcher recorded it (schema v2, comparable across cameras and runs), else stream time.
_FIRST_SEEN = func.coalesce(Tracklet.first_wall_time, Tracklet.first_time)
_LAST_SEEN = func.coalesce(Tracklet.last_wall_time, Tracklet.last_time)
_CLIP_START = func.coalesce(Clip.start_wall_time, Clip.start_time)
_CLIP_END = func.coalesce(Clip.end_wall_time, Clip.end_time)
_CAMERA_STATUS_FIELDS = ("status", "status_reason", "last_frame_time", "last_frame_index",
                         "last_frame_wall_time", "fps", "frames_processed", "reconnects",
                         "restarts")
DEFAULT_URL = "sqlite:///keyreid.db"


def _aware(value: datetime | None) -> datetime | None:
    """SQLite returns naive datetimes; everything we store is UTC."""
    if value is None or value.tzinfo is not None:
        return value
    return value.replace(tzinfo=timezone.utc)


def encode_descriptor(descriptor: np.ndarray, dtype: str) -> tuple[bytes, int]:
    """(bytes, dim) of a 1-D float descriptor stored as `dtype`; rejects NaN and overflow."""
    vector = np.asarray(descriptor, dtype=np.float32)
    if vector.ndim == 2 and vector.shape[0] == 1:
        vector = vector[0]
    if vector.ndim != 1 or vector.size == 0:
        raise ValueError(f"a descriptor must be a non-empty 1-D vector, got shape {vector.shape}")
    with np.errstate(over="ignore"):
        stored = vector.astype(_DTYPES[dtype])
    if not np.all(np.isfinite(stored)):
        detail = "is not finite" if not np.all(np.isfinite(vector)) else f"overflows {dtype}"
        raise ValueError(f"descriptor {detail} (max |value| {np.nanmax(np.abs(vector)):.3g})")
    return stored.tobytes(), int(vector.size)


def decode_descriptor(blob: bytes, dtype: str, dim: int) -> np.ndarray:
    """A read-only float32 vector from stored bytes."""
    if dtype not in _DTYPES or len(blob) != dim * _DTYPES[dtype].itemsize:
        raise StorageError(f"corrupt descriptor: {len(blob)} bytes for {dim} x {dtype}")
    vector = np.frombuffer(blob, dtype=_DTYPES[dtype]).astype(np.float32)
    vector.flags.writeable = False
    return vector


class Repository:
    """Schema-aware access to one database. Create it with `open_repository`."""

    def __init__(self, engine: Engine, url: str, *, readonly: bool, descriptor_dtype: str,
                 schema_version: int) -> None:
        self._engine = engine
        self._sessions = sessionmaker(engine, expire_on_commit=False)
        self._url = url
        self._readonly = readonly
        self._descriptor_dtype = descriptor_dtype
        self._schema_version = schema_version
        self._lock: WriterLock | None = None  # SQLite: the one writer's file lock
        self._site: SiteSession | None = None  # PostgreSQL: this watcher's advisory locks

    # -- lifecycle -------------------------------------------------------------------------
    @property
    def url(self) -> str:
        return display_url(self._url)

    @property
    def readonly(self) -> bool:
        return self._readonly

    @property
    def engine(self) -> Engine:
        """The SQLAlchemy engine, for storage's own maintenance (retention's raw SQLite work)."""
        return self._engine

    @property
    def descriptor_dtype(self) -> str:
        return self._descriptor_dtype

    @property
    def schema_version(self) -> int:
        return self._schema_version

    @property
    def is_sqlite(self) -> bool:
        return self._engine.dialect.name == "sqlite"

    @property
    def holds_writer_lock(self) -> bool:
        if self._site is not None:
            return True
        return self._lock is not None and self._lock.held

    def acquire_writer(self, owner: str) -> None:
        """Become a writer of the database, as a watcher is.

        SQLite has one writer: the file lock, or WriterLockedError naming its holder.
        PostgreSQL takes several (one per watcher, each with its own cameras): a dedicated
        connection that keeps this writer's runs marked alive and can hold the site's linker
        lock (`claim_linker`); StorageUnavailableError when the server cannot be reached.
        """
        self._require_writable()
        if self.holds_writer_lock:
            return
        path = sqlite_path(self._engine.url)
        if path is None:
            site = SiteSession(self._engine, self.url)
            site.ensure()
            self._site = site
            return
        lock = WriterLock(Path(f"{path}.lock"), owner)
        lock.acquire()
        self._lock = lock

    def release_writer(self) -> None:
        if self._lock is not None:
            self._lock.release()
            self._lock = None
        if self._site is not None:
            self._site.close()
            self._site = None

    def claim_linker(self) -> bool:
        """Whether this writer is (now) the one that links identities: SQLite's single writer
        always is; on PostgreSQL the first watcher to take the site's linker lock, until it
        stops (then the next claim of another watcher succeeds)."""
        if not self.holds_writer_lock:
            raise StorageError(f"{self.url}: linking needs the writer lock")
        return self._site is None or self._site.claim_linker()

    def keep_alive(self) -> None:
        """Ping this writer's lock session (PostgreSQL), reconnecting and taking its run locks
        again if it was lost: the server ends a session idle too long (`storage.lock`), and a
        watcher that does not link would otherwise look dead to the others. No-op on SQLite."""
        if self._site is not None:
            self._site.ensure()

    def other_writers_alive(self, run_id: int) -> bool:
        """Whether a run other than `run_id` has a live watcher (always False on SQLite, whose
        one writer is this one)."""
        if self._site is None:
            return False
        return bool(self._site.alive_runs() - {run_id})

    def close(self) -> None:
        """Release the writer lock and close every pooled connection."""
        self.release_writer()
        self._engine.dispose()

    def __enter__(self) -> Repository:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _require_writable(self) -> None:
        if self._readonly:
            raise ReadOnlyError(f"{self.url} was opened read-only; writes are not allowed")

    @contextmanager
    def _write(self) -> Iterator[Session]:
        """One write transaction; a failure that may pass is a `StorageUnavailableError`."""
        self._require_writable()
        try:
            with self._sessions.begin() as session:
                yield session
        except OperationalError as exc:  # disk full, locked past busy_timeout, read-only, I/O
            raise StorageUnavailableError(f"{self.url}: write failed: {exc.orig or exc}") from exc

    @contextmanager
    def _read(self) -> Iterator[Session]:
        """One transaction per read: a consistent snapshot even while a writer commits. A
        failure that may pass (a database server down or restarting) is a
        `StorageUnavailableError`, so a watcher retries instead of stopping."""
        try:
            with self._sessions.begin() as session:
                yield session
        except OperationalError as exc:
            raise StorageUnavailableError(f"{self.url}: read failed: {exc.orig or exc}") from exc

    def integrity_check(self) -> list[str]:
        """SQLite's `PRAGMA integrity_check` result lines (["ok"] for a sound file); a server
        database checks its own pages, so there this is refused."""
        if not self.is_sqlite:
            raise StorageError(f"{self.url}: integrity_check is a SQLite file check")
        with self._engine.connect() as conn:
            return [row[0] for row in conn.execute(text("PRAGMA integrity_check"))]

    # -- runs and cameras ------------------------------------------------------------------
    def start_run(self, config: dict) -> int:
        """Record a new run of the watcher (`repair` then cleans up after earlier ones)."""
        with self._write() as s:
            run = Run(config=json.dumps(config, sort_keys=True, default=str),
                      pid=os.getpid(), hostname=socket.gethostname(), status="running")
            s.add(run)
            s.flush()
            if self._site is not None:  # locked before it is visible: never seen as dead
                self._site.hold_run(run.id)
            return run.id

    def finish_run(self, run_id: int, status: str = "finished") -> None:
        with self._write() as s:
            run = self._get(s, Run, run_id, "run")
            run.status = status
            run.ended_at = utcnow()

    def update_run_calibration(self, run_id: int, calibration: dict) -> None:
        """The linker's current separation figures for this run (the dashboard's gauge)."""
        with self._write() as s:
            self._get(s, Run, run_id, "run").calibration = json.dumps(calibration, default=str)

    def repair(self, current_run_id: int) -> RepairReport:
        """Clean up after writers that died (kill -9, power loss) before `current_run_id`.

        Their open tracklets are closed (`end_reason` says why) and identities left without a
        member and named by no decision are removed. Requires the writer lock: on SQLite no
        other run can then be alive; on PostgreSQL the runs of live watchers (their run locks
        are held) are left alone.
        """
        if not self.holds_writer_lock:
            raise StorageError(f"{self.url}: repair needs the writer lock")
        alive = self._site.alive_runs() if self._site is not None else set()
        alive.add(current_run_id)
        with self._write() as s:
            aborted = list(s.scalars(select(Run).where(Run.id.not_in(alive),
                                                       Run.status == "running")))
            for run in aborted:
                run.status = "aborted: the writer stopped without finishing this run"
                run.ended_at = run.ended_at or utcnow()
            open_tracklets = list(s.scalars(select(Tracklet).where(
                Tracklet.run_id.not_in(alive), Tracklet.finished.is_(False))))
            for tracklet in open_tracklets:
                tracklet.finished = True
                tracklet.end_reason = (f"run {tracklet.run_id} ended without closing it "
                                       f"(repaired at the start of run {current_run_id})")
            referenced = union(
                select(Tracklet.identity_id).where(Tracklet.identity_id.is_not(None)),
                select(LinkDecision.identity_id),
                select(LinkDecision.candidate_identity_id)
                .where(LinkDecision.candidate_identity_id.is_not(None)),
                select(Identity.merged_into).where(Identity.merged_into.is_not(None)))
            orphans = list(s.scalars(select(Identity.id).where(
                Identity.merged_into.is_(None), ~Identity.id.in_(referenced))))
            if orphans:
                s.execute(Identity.__table__.delete().where(Identity.id.in_(orphans)))
            return RepairReport(len(aborted), len(open_tracklets), len(orphans))

    def resume_after(self, camera_id: str, source: str) -> int | None:
        """The last source frame index stored for `camera_id` reading `source` (None: nothing),
        so a restarted file camera continues there instead of storing everyone twice."""
        with self._read() as s:
            camera = s.get(Camera, camera_id)
            if camera is None or camera.source != source:
                return None
            return s.scalar(select(func.max(Tracklet.last_frame))
                            .where(Tracklet.camera_id == camera_id))

    def list_runs(self) -> list[RunRecord]:
        with self._read() as s:
            return [
                RunRecord(id=r.id, started_at=_aware(r.started_at), ended_at=_aware(r.ended_at),
                          status=r.status, config=json.loads(r.config or "{}"), pid=r.pid,
                          hostname=r.hostname,
                          calibration=json.loads(r.calibration) if r.calibration else None)
                for r in s.scalars(select(Run).order_by(Run.id))
            ]

    def upsert_camera(self, camera_id: str, name: str | None = None, source: str = "",
                      crop: Sequence[int] | None = None) -> CameraRecord:
        """Create or update a camera's description (its live status is left as it is)."""
        if not camera_id:
            raise ValueError("camera id must be a non-empty string")
        crop_json = None if crop is None else json.dumps([int(v) for v in crop])
        with self._write() as s:
            camera = s.get(Camera, camera_id)
            if camera is None:
                camera = Camera(id=camera_id, frames_processed=0, created_at=utcnow())
                s.add(camera)
            camera.name = name or camera_id
            camera.source = source
            camera.crop = crop_json
            s.flush()
            return _camera_record(camera)

    def update_camera_status(self, camera_id: str, **fields) -> None:
        """Set live status fields: status, last_frame_time, last_frame_index, fps, frames_processed."""
        unknown = sorted(set(fields) - set(_CAMERA_STATUS_FIELDS))
        if unknown:
            raise ValueError(
                f"unknown camera status field(s) {unknown}; allowed: {list(_CAMERA_STATUS_FIELDS)}"
            )
        with self._write() as s:
            camera = self._get(s, Camera, camera_id, "camera")
            for key, value in fields.items():
                setattr(camera, key, value)
            camera.updated_at = utcnow()

    def list_cameras(self) -> list[CameraRecord]:
        with self._read() as s:
            return [_camera_record(c) for c in s.scalars(select(Camera).order_by(Camera.id))]

    # -- tracklets -------------------------------------------------------------------------
    def add_tracklet(self, run_id: int, camera_id: str, track_id: int, first_frame: int,
                     first_time: float, *, last_frame: int | None = None,
                     last_time: float | None = None, thumbnail: bytes | None = None,
                     finished: bool = False, first_wall_time: float | None = None,
                     last_wall_time: float | None = None) -> int:
        """A new tracklet; its last frame/time default to the first."""
        with self._write() as s:
            self._get(s, Run, run_id, "run")
            self._get(s, Camera, camera_id, "camera")
            tracklet = Tracklet(
                run_id=run_id, camera_id=camera_id, track_id=int(track_id),
                first_frame=int(first_frame), first_time=float(first_time),
                last_frame=int(first_frame if last_frame is None else last_frame),
                last_time=float(first_time if last_time is None else last_time),
                thumbnail=thumbnail, finished=bool(finished), created_at=utcnow(),
                first_wall_time=first_wall_time,
                last_wall_time=first_wall_time if last_wall_time is None else last_wall_time,
            )
            s.add(tracklet)
            try:
                s.flush()
            except IntegrityError as exc:
                raise StorageError(
                    f"cannot add tracklet: run {run_id}, camera {camera_id!r} already has "
                    f"track id {track_id}"
                ) from exc
            return tracklet.id

    def update_tracklet(self, tracklet_id: int, *, last_frame: int | None = None,
                        last_time: float | None = None, thumbnail: bytes | None = None,
                        finished: bool | None = None, last_wall_time: float | None = None,
                        end_reason: str | None = None) -> None:
        """Extend a tracklet / replace its thumbnail / mark it finished; None leaves a field."""
        with self._write() as s:
            tracklet = self._get(s, Tracklet, tracklet_id, "tracklet")
            if last_wall_time is not None:
                tracklet.last_wall_time = float(last_wall_time)
            if end_reason is not None:
                tracklet.end_reason = end_reason
            if last_frame is not None:
                tracklet.last_frame = int(last_frame)
            if last_time is not None:
                tracklet.last_time = float(last_time)
            if thumbnail is not None:
                tracklet.thumbnail = thumbnail
            if finished is not None:
                tracklet.finished = bool(finished)

    def get_tracklet(self, tracklet_id: int) -> TrackletRecord | None:
        with self._read() as s:
            tracklet = s.get(Tracklet, tracklet_id)
            return None if tracklet is None else _tracklet_record(tracklet, True)

    def _tracklet_filter(self, camera_ids, time_range, identity_id, run_id, finished) -> list:
        conditions = []
        if camera_ids is not None:
            conditions.append(Tracklet.camera_id.in_(list(camera_ids)))
        if time_range is not None:
            start, end = time_range
            conditions += [_FIRST_SEEN <= end, _LAST_SEEN >= start]
        if identity_id is not None:
            conditions.append(Tracklet.identity_id == identity_id)
        if run_id is not None:
            conditions.append(Tracklet.run_id == run_id)
        if finished is not None:
            conditions.append(Tracklet.finished == finished)
        return conditions

    def list_tracklets(self, camera_ids: Iterable[str] | None = None,
                       time_range: tuple[float, float] | None = None,
                       identity_id: int | None = None, *, run_id: int | None = None,
                       finished: bool | None = None, offset: int = 0, limit: int | None = None,
                       thumbnails: bool = False) -> list[TrackletRecord]:
        """Tracklets ordered by first seen, then id. A time range keeps tracklets overlapping it.

        Thumbnails are loaded only when asked for, so listing many tracklets stays cheap.
        """
        conditions = self._tracklet_filter(camera_ids, time_range, identity_id, run_id, finished)
        query = (select(Tracklet).where(*conditions)
                 .order_by(_FIRST_SEEN, Tracklet.id).offset(offset).limit(limit))
        with self._read() as s:
            return [_tracklet_record(t, thumbnails) for t in s.scalars(query)]

    def count_tracklets(self, camera_ids: Iterable[str] | None = None,
                        time_range: tuple[float, float] | None = None,
                        identity_id: int | None = None, *, run_id: int | None = None,
                        finished: bool | None = None) -> int:
        conditions = self._tracklet_filter(camera_ids, time_range, identity_id, run_id, finished)
        with self._read() as s:
            return s.scalar(select(func.count(Tracklet.id)).where(*conditions)) or 0

    def thumbnails(self, tracklet_ids: Iterable[int]) -> dict[int, bytes | None]:
        """Tracklet thumbnails (JPEG bytes) by id, for a page of search results."""
        ids = [int(i) for i in tracklet_ids]
        with self._read() as s:
            rows = s.execute(select(Tracklet.id, Tracklet.thumbnail).where(Tracklet.id.in_(ids)))
            return {tid: thumb for tid, thumb in rows}

    def activity(self, camera_id: str | None = None,
                 bucket_seconds: float = 60.0) -> list[ActivityBucket]:
        """Tracklets started per time bucket (video seconds), for a timeline; empty buckets omitted."""
        if bucket_seconds <= 0:
            raise ValueError(f"bucket_seconds must be > 0, got {bucket_seconds}")
        ratio = _FIRST_SEEN / bucket_seconds
        # SQLite may lack floor(); CAST truncates, which equals floor for video times >= 0.
        sqlite = self._engine.dialect.name == "sqlite"
        bucket = cast(ratio, Integer) if sqlite else func.floor(ratio)
        query = select(bucket.label("b"), func.count(Tracklet.id)).group_by("b").order_by("b")
        if camera_id is not None:
            query = query.where(Tracklet.camera_id == camera_id)
        with self._read() as s:
            return [ActivityBucket(start=float(b) * bucket_seconds, count=int(n))
                    for b, n in s.execute(query)]

    # -- clips -----------------------------------------------------------------------------
    def add_clips(self, clips: Sequence[NewClip]) -> list[int]:
        """Store clips in one transaction; returns their ids in input order."""
        rows = [self._clip_row(i, clip) for i, clip in enumerate(clips)]
        if not rows:
            return []
        with self._write() as s:
            wanted = {row.tracklet_id for row in rows}
            found = set(s.scalars(select(Tracklet.id).where(Tracklet.id.in_(wanted))))
            if wanted - found:
                raise StorageError(f"cannot add clips: unknown tracklet id(s) {sorted(wanted - found)}")
            s.add_all(rows)
            s.flush()
            return [row.id for row in rows]

    def _clip_row(self, position: int, clip: NewClip) -> Clip:
        frames = [int(f) for f in clip.frame_indices]
        where = f"clip {position} (tracklet {clip.tracklet_id})"
        if not frames:
            raise ValueError(f"{where}: frame_indices is empty")
        try:
            blob, dim = encode_descriptor(clip.descriptor, self._descriptor_dtype)
        except ValueError as exc:
            raise ValueError(f"{where}: {exc}") from None
        boxes = None
        if clip.boxes is not None:
            box_list = [[float(v) for v in box] for box in clip.boxes]
            if len(box_list) != len(frames) or any(len(b) != 4 for b in box_list):
                raise ValueError(f"{where}: boxes must be one (x1, y1, x2, y2) per frame index")
            boxes = json.dumps(box_list)
        keypoints = None
        if clip.keypoints is not None:
            kp = np.asarray(clip.keypoints, dtype=np.float32)
            if kp.ndim != 3 or kp.shape[0] != len(frames) or kp.shape[2] != 3:
                raise ValueError(f"{where}: keypoints must have shape [T={len(frames)}, K, 3], "
                                 f"got {kp.shape}")
            keypoints = kp.astype("<f4").tobytes()
        return Clip(tracklet_id=int(clip.tracklet_id), frame_indices=json.dumps(frames),
                    start_time=float(clip.start_time), end_time=float(clip.end_time),
                    descriptor=blob, descriptor_dtype=self._descriptor_dtype, descriptor_dim=dim,
                    model_id=clip.model_id, boxes=boxes, keypoints=keypoints,
                    start_wall_time=clip.start_wall_time, end_wall_time=clip.end_wall_time)

    def tracklet_clips(self, tracklet_id: int, *,
                       model_id: str | None = None) -> list[ClipRecord]:
        """A tracklet's clips in time order, with descriptors, boxes and keypoints."""
        query = select(Clip).where(Clip.tracklet_id == tracklet_id)
        if model_id is not None:
            query = query.where(Clip.model_id == model_id)
        with self._read() as s:
            return [_clip_record(c)
                    for c in s.scalars(query.order_by(Clip.start_time, Clip.id))]

    def tracklet_descriptor(self, tracklet_id: int,
                            model_id: str | None = None) -> np.ndarray | None:
        """The tracklet's unit descriptor (`storage.similarity.tracklet_descriptor` of its
        clips, float32), or None when it has no clips; what search and the linker compare."""
        query = select(Clip.descriptor, Clip.descriptor_dtype, Clip.descriptor_dim,
                       Clip.model_id).where(Clip.tracklet_id == tracklet_id)
        if model_id is not None:
            query = query.where(Clip.model_id == model_id)
        with self._read() as s:
            rows = s.execute(query).all()
        if not rows:
            return None
        models = {row[3] for row in rows}
        if len(models) > 1:
            raise StorageError(f"tracklet {tracklet_id} has clips of several models "
                               f"{sorted(models)}; pass model_id")
        return tracklet_descriptor(np.stack([decode_descriptor(b, d, n) for b, d, n, _ in rows]))

    # -- identities ------------------------------------------------------------------------
    def create_identity(self, label: str | None = None) -> int:
        with self._write() as s:
            identity = Identity(label=label, created_at=utcnow())
            s.add(identity)
            s.flush()
            return identity.id

    def open_identity(self, tracklet_id: int, distance: float | None = None,
                      candidate: int | None = None, note: str | None = None,
                      evidence: dict | None = None) -> int:
        """A new identity whose first member is `tracklet_id` (decision "new"), in one
        transaction, so a crash can never leave an identity without a member; returns its id.
        `evidence`: the linker's `margin`, `false_link` and `reason`, stored with the decision."""
        with self._write() as s:
            tracklet = self._get(s, Tracklet, tracklet_id, "tracklet")
            identity = Identity(created_at=utcnow())
            s.add(identity)
            s.flush()
            tracklet.identity_id = identity.id
            self._decide(s, tracklet_id, identity.id, "new", distance, candidate, note, evidence)
            return identity.id

    def assign_identity(self, tracklet_id: int, identity_id: int, kind: str = "linked",
                        distance: float | None = None, candidate: int | None = None,
                        note: str | None = None, *, follow_merges: bool = False,
                        evidence: dict | None = None) -> int:
        """Set a tracklet's identity and record why; returns the identity assigned.

        An identity merged away (by an operator) is refused, or with `follow_merges` replaced
        by the identity it was merged into, so a linker that has not yet seen a merge still
        links into the right identity.
        """
        if kind not in LINK_KINDS:
            raise ValueError(f"unknown link kind {kind!r}; expected one of {LINK_KINDS}")
        with self._write() as s:
            tracklet = self._get(s, Tracklet, tracklet_id, "tracklet")
            if follow_merges:
                identity_id = self._resolve_merges(s, identity_id, lock=True)
            self._live_identity(s, identity_id)
            tracklet.identity_id = identity_id
            self._decide(s, tracklet_id, identity_id, kind, distance, candidate, note, evidence)
            return identity_id

    def _resolve_merges(self, s: Session, identity_id: int, lock: bool = False) -> int:
        """The identity `identity_id` was merged into, in the end (itself if it was not);
        `lock` as in `_get`, for writes that then use it."""
        seen = set()
        identity = self._get(s, Identity, identity_id, "identity", lock)
        while identity.merged_into is not None and identity.id not in seen:
            seen.add(identity.id)
            identity = self._get(s, Identity, identity.merged_into, "identity", lock)
        return identity.id

    def merge_identities(self, keep_id: int, merge_id: int, note: str | None = None) -> list[int]:
        """Move every member of `merge_id` to `keep_id`; returns the moved tracklet ids.

        The merged identity stays as a record (`merged_into` = keep_id) so earlier decisions
        that name it remain explainable; it no longer appears in `list_identities`.
        """
        if keep_id == merge_id:
            raise StorageError(f"cannot merge identity {keep_id} into itself")
        with self._write() as s:
            self._live_identity(s, keep_id)
            merged = self._live_identity(s, merge_id)
            members = list(s.scalars(select(Tracklet).where(Tracklet.identity_id == merge_id)
                                     .order_by(Tracklet.id)))
            for tracklet in members:
                tracklet.identity_id = keep_id
                self._decide(s, tracklet.id, keep_id, "merged", None, merge_id, note)
            merged.merged_into = keep_id
            return [t.id for t in members]

    def split_tracklet(self, tracklet_id: int, note: str | None = None) -> int:
        """Move one tracklet out of its identity into a new identity; returns the new id."""
        with self._write() as s:
            tracklet = self._get(s, Tracklet, tracklet_id, "tracklet")
            if tracklet.identity_id is None:
                raise StorageError(f"tracklet {tracklet_id} has no identity to split from")
            old = tracklet.identity_id
            identity = Identity(created_at=utcnow())
            s.add(identity)
            s.flush()
            tracklet.identity_id = identity.id
            self._decide(s, tracklet_id, identity.id, "split", None, old, note)
            return identity.id

    def confirm_link(self, tracklet_id: int, identity_id: int, note: str | None = None) -> int:
        """Operator must-link: the tracklet belongs to `identity_id` (merges followed); returns
        the identity it joined. A tracklet alone in an identity takes it along (merged away into
        the target, so decisions naming it stay explainable); a member of a larger identity just
        moves. Recorded as "confirmed"; the running linker applies it at once."""
        with self._write() as s:
            tracklet = self._get(s, Tracklet, tracklet_id, "tracklet")
            target = self._resolve_merges(s, identity_id, lock=True)
            self._live_identity(s, target)
            old = tracklet.identity_id
            if old == target:
                return target
            tracklet.identity_id = target
            self._decide(s, tracklet_id, target, "confirmed", None, old, note)
            if old is not None and not s.scalar(select(func.count(Tracklet.id))
                                                .where(Tracklet.identity_id == old)):
                self._get(s, Identity, old, "identity").merged_into = target
            return target

    def reject_link(self, tracklet_id: int, identity_id: int, note: str | None = None) -> None:
        """Operator cannot-link: the tracklet must never join `identity_id` (merges followed).
        Recorded as "rejected" (identity_id = the rejected identity). For a tracklet that is a
        member of that identity use `split_tracklet`."""
        with self._write() as s:
            tracklet = self._get(s, Tracklet, tracklet_id, "tracklet")
            target = self._resolve_merges(s, identity_id, lock=True)
            if tracklet.identity_id == target:
                raise StorageError(f"tracklet {tracklet_id} is a member of identity {target}: "
                                   "split it out instead of rejecting the link")
            self._decide(s, tracklet_id, target, "rejected", None, tracklet.identity_id, note)

    def rejected_identities(self, tracklet_id: int) -> set[int]:
        """Identities an operator ruled out for this tracklet (as they are now, after merges)."""
        with self._read() as s:
            rejected = s.scalars(select(LinkDecision.identity_id).where(
                LinkDecision.tracklet_id == tracklet_id, LinkDecision.kind == "rejected"))
            return {self._resolve_merges(s, identity_id) for identity_id in rejected}

    def _unlinked_filter(self, camera_ids, time_range) -> list:
        """Finished tracklets the linker left alone: no identity yet (still pending in a running
        watcher), or alone in an identity it opened without being confident that this is a new
        person ("new" decisions other than "confidently nobody known")."""
        members = (select(func.count(Tracklet.id)).where(Tracklet.identity_id == Identity.id)
                   .correlate(Identity).scalar_subquery())
        latest = (select(func.max(LinkDecision.id))  # a rejected candidate leaves it unlinked
                  .where(LinkDecision.tracklet_id == Tracklet.id, LinkDecision.kind != "rejected")
                  .correlate(Tracklet).scalar_subquery())
        alone_unsure = (
            select(Identity.id)
            .join(LinkDecision, LinkDecision.id == latest)
            .where(Identity.id == Tracklet.identity_id, Identity.merged_into.is_(None),
                   members == 1, LinkDecision.kind == "new",
                   or_(LinkDecision.reason.is_(None),
                       LinkDecision.reason.not_like("confidently nobody known%")))
            .correlate(Tracklet).exists()
        )
        return [*self._tracklet_filter(camera_ids, time_range, None, None, True),
                or_(Tracklet.identity_id.is_(None), alone_unsure)]

    def unlinked_tracklets(self, *, camera_ids: Iterable[str] | None = None,
                           time_range: tuple[float, float] | None = None, offset: int = 0,
                           limit: int | None = None,
                           thumbnails: bool = True) -> list[TrackletRecord]:
        """Tracklets waiting for an operator (see `_unlinked_filter`), newest first; a time
        range keeps those overlapping it."""
        query = (select(Tracklet).where(*self._unlinked_filter(camera_ids, time_range))
                 .order_by(_FIRST_SEEN.desc(), Tracklet.id.desc()).offset(offset).limit(limit))
        with self._read() as s:
            return [_tracklet_record(t, thumbnails) for t in s.scalars(query)]

    def count_unlinked(self, camera_ids: Iterable[str] | None = None,
                       time_range: tuple[float, float] | None = None) -> int:
        with self._read() as s:
            return s.scalar(select(func.count(Tracklet.id))
                            .where(*self._unlinked_filter(camera_ids, time_range))) or 0

    def recent_identities(self, since: float, model_id: str) -> list[IdentitySnapshot]:
        """Live identities with a member seen at or after `since` (wall-clock seconds), each
        with every member's unit tracklet descriptor of `model_id` (members without a clip of
        that model are left out): what a restarted linker needs to continue them."""
        with self._read() as s:
            recent = (select(Tracklet.identity_id).where(Tracklet.identity_id.is_not(None),
                                                          _LAST_SEEN >= since).distinct())
            rows = s.execute(
                select(Tracklet.identity_id, Tracklet.id, Tracklet.camera_id, _FIRST_SEEN,
                       _LAST_SEEN)
                .join(Identity, Identity.id == Tracklet.identity_id)
                .where(Tracklet.identity_id.in_(recent), Identity.merged_into.is_(None))
                .order_by(Tracklet.identity_id, _FIRST_SEEN, Tracklet.id)).all()
            clips: dict[int, list[np.ndarray]] = {}
            ids = [row[1] for row in rows]
            for start in range(0, len(ids), 500):
                for tracklet_id, blob, dtype, dim in s.execute(
                        select(Clip.tracklet_id, Clip.descriptor, Clip.descriptor_dtype,
                               Clip.descriptor_dim)
                        .where(Clip.tracklet_id.in_(ids[start:start + 500]),
                               Clip.model_id == model_id)):
                    clips.setdefault(tracklet_id, []).append(decode_descriptor(blob, dtype, dim))
        snapshots: dict[int, list[IdentityMember]] = {}
        for identity_id, tracklet_id, camera_id, first, last in rows:
            if tracklet_id in clips:
                snapshots.setdefault(identity_id, []).append(IdentityMember(
                    tracklet_id, camera_id, float(first), float(last),
                    tracklet_descriptor(np.stack(clips[tracklet_id]))))
        return [IdentitySnapshot(identity_id, tuple(members))
                for identity_id, members in snapshots.items()]

    def tracklets_to_link(self, model_id: str, *, exclude: Iterable[int] = (),
                          limit: int = 500) -> list[UnlinkedTracklet]:
        """Finished tracklets of any watcher that no identity holds yet, with clips of
        `model_id`, in the order they ended: what the site's one linker takes from the
        database (`exclude`: those it already holds). A watcher marks a tracklet finished only
        once every clip of it is stored. Old ones are included: the linker decides them too
        (one that ended longer than its time window ago opens an identity of its own)."""
        conditions = [Tracklet.finished.is_(True), Tracklet.identity_id.is_(None),
                      select(Clip.id).where(Clip.tracklet_id == Tracklet.id,
                                            Clip.model_id == model_id).exists()]
        excluded = sorted({int(key) for key in exclude})
        if excluded:
            conditions.append(Tracklet.id.not_in(excluded))
        with self._read() as s:
            rows = s.execute(select(Tracklet.id, Tracklet.camera_id, _FIRST_SEEN, _LAST_SEEN)
                             .where(*conditions).order_by(_LAST_SEEN, Tracklet.id)
                             .limit(limit)).all()
            clips: dict[int, list[tuple[float, np.ndarray]]] = {}
            ids = [row[0] for row in rows]
            for start in range(0, len(ids), 500):
                for tracklet_id, when, blob, dtype, dim in s.execute(
                        select(Clip.tracklet_id, _CLIP_START, Clip.descriptor,
                               Clip.descriptor_dtype, Clip.descriptor_dim)
                        .where(Clip.tracklet_id.in_(ids[start:start + 500]),
                               Clip.model_id == model_id).order_by(Clip.id)):
                    clips.setdefault(tracklet_id, []).append(
                        (float(when), decode_descriptor(blob, dtype, dim)))
        return [UnlinkedTracklet(tracklet_id, camera_id, float(first), float(last),
                                 np.stack([d for _, d in clips[tracklet_id]]),
                                 np.asarray([t for t, _ in clips[tracklet_id]]))
                for tracklet_id, camera_id, first, last in rows]

    def get_identity(self, identity_id: int) -> IdentityRecord | None:
        with self._read() as s:
            identity = s.get(Identity, identity_id)
            if identity is None:
                return None
            return self._identity_records(s, [identity])[0]

    def list_identities(self, offset: int = 0, limit: int | None = None) -> list[IdentityRecord]:
        """Live (not merged-away) identities ordered by id, with member summaries."""
        query = (select(Identity).where(Identity.merged_into.is_(None))
                 .order_by(Identity.id).offset(offset).limit(limit))
        with self._read() as s:
            return self._identity_records(s, list(s.scalars(query)))

    def count_identities(self) -> int:
        with self._read() as s:
            return s.scalar(select(func.count(Identity.id))
                            .where(Identity.merged_into.is_(None))) or 0

    def identity_members(self, identity_id: int, *, thumbnails: bool = True) -> list[TrackletRecord]:
        """The identity's tracklets ordered by time (with thumbnails, for a timeline)."""
        return self.list_tracklets(identity_id=identity_id, thumbnails=thumbnails)

    def link_decisions(self, tracklet_id: int | None = None,
                       identity_id: int | None = None, *, kinds: Iterable[str] | None = None,
                       after_id: int | None = None) -> list[LinkDecisionRecord]:
        """Decisions in the order made; an identity filter matches the decided or the candidate id.

        `kinds` and `after_id` let a running linker fetch only the operator's merges and splits
        made since it last looked.
        """
        query = select(LinkDecision).order_by(LinkDecision.id)
        if kinds is not None:
            query = query.where(LinkDecision.kind.in_(list(kinds)))
        if after_id is not None:
            query = query.where(LinkDecision.id > after_id)
        if tracklet_id is not None:
            query = query.where(LinkDecision.tracklet_id == tracklet_id)
        if identity_id is not None:
            query = query.where(or_(LinkDecision.identity_id == identity_id,
                                    LinkDecision.candidate_identity_id == identity_id))
        with self._read() as s:
            return [
                LinkDecisionRecord(id=d.id, tracklet_id=d.tracklet_id, identity_id=d.identity_id,
                                   kind=d.kind, distance=d.distance,
                                   candidate_identity_id=d.candidate_identity_id,
                                   created_at=_aware(d.created_at), note=d.note,
                                   margin=d.margin, false_link=d.false_link, reason=d.reason)
                for d in s.scalars(query)
            ]

    def last_decision_id(self) -> int:
        """The newest decision's id (0 when none): where a linker starts watching for changes."""
        with self._read() as s:
            return s.scalar(select(func.max(LinkDecision.id))) or 0

    def _identity_records(self, s: Session, identities: list[Identity]) -> list[IdentityRecord]:
        ids = [i.id for i in identities]
        summary = {
            iid: (n, t0, t1) for iid, n, t0, t1 in s.execute(
                select(Tracklet.identity_id, func.count(Tracklet.id), func.min(_FIRST_SEEN),
                       func.max(_LAST_SEEN))
                .where(Tracklet.identity_id.in_(ids)).group_by(Tracklet.identity_id))
        }
        cameras: dict[int, list[str]] = {}
        for iid, cam in s.execute(select(Tracklet.identity_id, Tracklet.camera_id).distinct()
                                  .where(Tracklet.identity_id.in_(ids))
                                  .order_by(Tracklet.camera_id)):
            cameras.setdefault(iid, []).append(cam)
        records = []
        for identity in identities:
            n, t0, t1 = summary.get(identity.id, (0, None, None))
            records.append(IdentityRecord(
                id=identity.id, created_at=_aware(identity.created_at), label=identity.label,
                member_count=n, camera_ids=tuple(cameras.get(identity.id, ())), first_time=t0,
                last_time=t1, merged_into=identity.merged_into))
        return records

    def _live_identity(self, s: Session, identity_id: int) -> Identity:
        """The identity a write is about to use, locked (see `_get`), unless merged away."""
        identity = self._get(s, Identity, identity_id, "identity", lock=True)
        if identity.merged_into is not None:
            raise StorageError(
                f"identity {identity_id} was merged into {identity.merged_into}; use that one"
            )
        return identity

    @staticmethod
    def _decide(s: Session, tracklet_id: int, identity_id: int, kind: str,
                distance: float | None, candidate: int | None, note: str | None,
                evidence: dict | None = None) -> int:
        evidence = evidence or {}
        unknown = set(evidence) - {"margin", "false_link", "reason"}
        if unknown:
            raise ValueError(f"unknown decision evidence {sorted(unknown)}")
        number = lambda v: None if v is None else float(v)  # noqa: E731
        decision = LinkDecision(tracklet_id=tracklet_id, identity_id=identity_id, kind=kind,
                                distance=number(distance), candidate_identity_id=candidate,
                                note=note, created_at=utcnow(),
                                margin=number(evidence.get("margin")),
                                false_link=number(evidence.get("false_link")),
                                reason=evidence.get("reason"))
        s.add(decision)
        s.flush()
        return decision.id

    @staticmethod
    def _get(s: Session, model, key, what: str, lock: bool = False):
        """The row or StorageError. `lock` reads it FOR UPDATE, fresh: on PostgreSQL several
        writers (a linker, an operator's merge) may change one identity at once, and the
        second must see what the first committed (SQLite's writers are serialised anyway)."""
        options = {"with_for_update": True, "populate_existing": True} if lock else {}
        row = s.get(model, key, **options)
        if row is None:
            raise StorageError(f"unknown {what} {key!r}")
        return row

    # -- statistics and search -------------------------------------------------------------
    def stats(self) -> StorageStats:
        with self._read() as s:
            count = lambda column, *where: s.scalar(select(func.count(column)).where(*where)) or 0
            return StorageStats(
                cameras=count(Camera.id), runs=count(Run.id), tracklets=count(Tracklet.id),
                clips=count(Clip.id),
                identities=count(Identity.id, Identity.merged_into.is_(None)))

    def model_ids(self) -> list[str]:
        """Distinct model ids of stored clips."""
        with self._read() as s:
            return sorted(s.scalars(select(Clip.model_id).distinct()))

    def gallery_index(self, model_id: str | None = None, *,
                      camera_ids: Iterable[str] | None = None,
                      time_range: tuple[float, float] | None = None,
                      batch_rows: int = 10_000) -> GalleryIndex:
        """Load one model's clip descriptors into memory for repeated tracklet searches.

        `camera_ids` / `time_range` keep only tracklets of those cameras / with a clip
        overlapping that time; a kept tracklet brings all its clips of the model, so its
        descriptor in the index is the same as `tracklet_descriptor`'s.
        """
        if model_id is None:
            models = self.model_ids()
            if len(models) > 1:
                raise StorageError(f"{self.url} holds clips of several models {models}; "
                                   "choose one with model_id")
            model_id = models[0] if models else None
        conditions = [Clip.model_id == model_id]
        if camera_ids is not None:
            conditions.append(Tracklet.camera_id.in_(list(camera_ids)))
        if time_range is not None:
            conditions.append(Clip.tracklet_id.in_(
                select(Clip.tracklet_id).where(Clip.model_id == model_id,
                                               _CLIP_START <= time_range[1],
                                               _CLIP_END >= time_range[0])))
        query = (select(Clip.id, Clip.tracklet_id, Tracklet.camera_id,
                        _CLIP_START.label("start_time"), _CLIP_END.label("end_time"),
                        Clip.descriptor, Clip.descriptor_dtype, Clip.descriptor_dim)
                 .join(Tracklet, Tracklet.id == Clip.tracklet_id).where(*conditions)
                 .order_by(Clip.id).execution_options(yield_per=batch_rows))
        meta: list[tuple] = []
        blocks: list[np.ndarray] = []
        dim: int | None = None
        with self._read() as s:
            for rows in s.execute(query).partitions():
                for row in rows:
                    if dim is None:
                        dim = row.descriptor_dim
                    elif row.descriptor_dim != dim:
                        raise StorageError(f"model {model_id!r} has descriptors of dimensions "
                                           f"{dim} and {row.descriptor_dim} (clip {row.id})")
                block = np.empty((len(rows), dim), dtype=np.float32)
                for i, row in enumerate(rows):
                    block[i] = decode_descriptor(row.descriptor, row.descriptor_dtype, dim)
                    meta.append((row.id, row.tracklet_id, row.camera_id, row.start_time,
                                 row.end_time))
                blocks.append(block)
            tracklet_ids = sorted({m[1] for m in meta})
            tracklets = {}
            for start in range(0, len(tracklet_ids), 30_000):
                chunk = tracklet_ids[start:start + 30_000]
                for t in s.execute(select(Tracklet.id, Tracklet.camera_id, Tracklet.track_id,
                                          _FIRST_SEEN.label("first_time"),
                                          _LAST_SEEN.label("last_time"),
                                          Tracklet.identity_id).where(Tracklet.id.in_(chunk))):
                    tracklets[t.id] = (t.camera_id, t.track_id, t.first_time, t.last_time,
                                       t.identity_id)
        columns = list(zip(*meta)) if meta else [(), (), (), (), ()]
        return GalleryIndex(
            descriptors=np.concatenate(blocks) if blocks else np.zeros((0, dim or 0), np.float32),
            clip_ids=np.asarray(columns[0], dtype=np.int64),
            tracklet_ids=np.asarray(columns[1], dtype=np.int64),
            camera_ids=np.asarray(columns[2], dtype=object),
            start_times=np.asarray(columns[3], dtype=np.float64),
            end_times=np.asarray(columns[4], dtype=np.float64),
            tracklets=tracklets, model_id=model_id)

    def search_tracklets(self, query: np.ndarray, k: int = 20, *, model_id: str | None = None,
                         camera_ids: Iterable[str] | None = None,
                         time_range: tuple[float, float] | None = None,
                         exclude_camera_id: str | None = None,
                         exclude_tracklet_id: int | None = None,
                         max_distance: float | None = None,
                         rerank: bool = False) -> list[SearchHit]:
        """Rank tracklets by the one similarity's distance to `query` [D] (`GalleryIndex.search`).

        Loads the gallery for this one search; for repeated searches keep a `gallery_index`.
        """
        index = self.gallery_index(model_id, camera_ids=camera_ids, time_range=time_range)
        return index.search(query, k, exclude_camera_id=exclude_camera_id,
                            exclude_tracklet_id=exclude_tracklet_id, max_distance=max_distance,
                            rerank=rerank)


def _camera_record(c: Camera) -> CameraRecord:
    return CameraRecord(
        id=c.id, name=c.name, source=c.source,
        crop=None if c.crop is None else tuple(json.loads(c.crop)),
        created_at=_aware(c.created_at), status=c.status, last_frame_time=c.last_frame_time,
        last_frame_index=c.last_frame_index, fps=c.fps, frames_processed=c.frames_processed or 0,
        updated_at=_aware(c.updated_at), status_reason=c.status_reason,
        reconnects=c.reconnects or 0, restarts=c.restarts or 0,
        last_frame_wall_time=c.last_frame_wall_time)


def _tracklet_record(t: Tracklet, with_thumbnail: bool) -> TrackletRecord:
    return TrackletRecord(
        id=t.id, run_id=t.run_id, camera_id=t.camera_id, track_id=t.track_id,
        first_frame=t.first_frame, last_frame=t.last_frame, first_time=t.first_time,
        last_time=t.last_time, created_at=_aware(t.created_at), identity_id=t.identity_id,
        finished=bool(t.finished), thumbnail=t.thumbnail if with_thumbnail else None,
        first_wall_time=t.first_wall_time, last_wall_time=t.last_wall_time,
        end_reason=t.end_reason)


def _clip_record(c: Clip) -> ClipRecord:
    frames = tuple(json.loads(c.frame_indices))
    keypoints = None
    if c.keypoints is not None:
        keypoints = np.frombuffer(c.keypoints, dtype="<f4").astype(np.float32)
        keypoints = keypoints.reshape(len(frames), -1, 3)
        keypoints.flags.writeable = False
    return ClipRecord(
        id=c.id, tracklet_id=c.tracklet_id, frame_indices=frames, start_time=c.start_time,
        end_time=c.end_time,
        descriptor=decode_descriptor(c.descriptor, c.descriptor_dtype, c.descriptor_dim),
        descriptor_dtype=c.descriptor_dtype, descriptor_dim=c.descriptor_dim, model_id=c.model_id,
        boxes=None if c.boxes is None else tuple(tuple(b) for b in json.loads(c.boxes)),
        keypoints=keypoints, start_wall_time=c.start_wall_time, end_wall_time=c.end_wall_time)


def _check_version(version: int | None, url: str, *, readonly: bool) -> None:
    if version is not None and version > SCHEMA_VERSION:
        raise SchemaTooNewError(
            f"database {url} has schema version {version}, this program supports "
            f"{SCHEMA_VERSION}; upgrade keyreid (the database was left untouched)"
        )
    if readonly and version is None:
        raise StorageError(f"database {url} has no keyreid schema yet "
                           "(start keyreid-watch on it first)")
    if readonly and version < SCHEMA_VERSION:
        raise SchemaTooOldError(
            f"database {url} has schema version {version}, this program needs "
            f"{SCHEMA_VERSION}; open it once with keyreid-watch to migrate it"
        )


def _prepare_schema(engine: Engine, url: str) -> int:
    """Create or migrate the schema in one write transaction; returns the resulting version.
    On PostgreSQL under the site's migration lock, so watchers starting together take turns
    (the second finds the schema current)."""
    with engine.begin() as conn:
        if engine.dialect.name == "postgresql":
            lock_for_migration(conn)  # several watchers of a site may start at once
        version = read_schema_version(conn)
        _check_version(version, url, readonly=False)
        if version is None:
            existing = sorted(inspect(conn).get_table_names())
            if existing:
                raise StorageError(f"database {url} has tables {existing} but no keyreid schema "
                                   "version; refusing to use a database of another program")
            Base.metadata.create_all(conn)
            write_schema_version(conn, SCHEMA_VERSION)
        elif version < SCHEMA_VERSION:
            upgrade(conn, version, SCHEMA_VERSION, MIGRATIONS)
    return SCHEMA_VERSION


def _stored_version(url: str) -> int | None:
    """The schema version read through a read-only connection (None: no file or no schema)."""
    engine = create_storage_engine(url, readonly=True)
    try:
        with engine.connect() as conn:
            return read_schema_version(conn)
    finally:
        engine.dispose()


def open_repository(url: str = DEFAULT_URL, *, readonly: bool = False,
                    descriptor_dtype: str = "float16") -> Repository:
    """Open (and as a writer, create or migrate) the database at `url`.

    readonly=True never writes: it is what the dashboard uses beside a running watcher.
    `descriptor_dtype` ("float16" or "float32") is how this repository stores new descriptors.
    Raises StorageError (bad URL, missing or foreign database), SchemaTooNewError.
    """
    if descriptor_dtype not in _DTYPES:
        raise ValueError(f"descriptor_dtype must be one of {sorted(_DTYPES)}, "
                         f"got {descriptor_dtype!r}")
    shown = display_url(url)
    engine = None
    try:
        if readonly:
            engine = create_storage_engine(url, readonly=True)
            with engine.connect() as conn:
                version = read_schema_version(conn)
            _check_version(version, shown, readonly=True)
        else:
            path = sqlite_path(make_url(url)) if validate_database_url(url) is None else None
            if path is not None and path.exists() and path.stat().st_size > 0:
                # Check before the writer's pragmas (WAL) touch the file.
                _check_version(_stored_version(url), shown, readonly=False)
            engine = create_storage_engine(url, readonly=False)
            version = _prepare_schema(engine, shown)
    except StorageError:
        if engine is not None:
            engine.dispose()
        raise
    except SQLAlchemyError as exc:
        if engine is not None:
            engine.dispose()
        reason = getattr(exc, "orig", None) or exc
        raise StorageError(f"cannot open database {shown}: {reason}") from exc
    return Repository(engine, url, readonly=readonly, descriptor_dtype=descriptor_dtype,
                      schema_version=version)
