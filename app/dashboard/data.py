"""What the dashboard shows, computed without Streamlit: settings, database access, searches.

Kept apart from the Streamlit script so the rules (read-only access, which encoder a search
by upload must use, how search hits are annotated) are plain functions with plain inputs.
Every read goes through a read-only `storage` repository; the only writes (merge, split,
confirm or reject a link) open a short-lived normal repository, never the watcher's writer
lock.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import re
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
from sqlalchemy.engine import make_url

from storage import (
    CameraRecord,
    GalleryIndex,
    LinkDecisionRecord,
    Repository,
    SchemaTooNewError,
    SearchHit,
    StorageError,
    TrackletRecord,
    open_repository,
    validate_database_url,
)
from storage.ann import ANN_MIN_GALLERY, AnnIndex
from storage.engine import sqlite_path
from storage.similarity import describe, similarity_percent
from tracking.redact import redact

ENV_DB = "KEYREID_DASHBOARD_DB"
ENV_CHECKPOINT = "KEYREID_DASHBOARD_CHECKPOINT"
ENV_MODEL = "KEYREID_DASHBOARD_MODEL"
ENV_DEVICE = "KEYREID_DASHBOARD_DEVICE"
ENV_MAX_UPLOAD_MB = "KEYREID_DASHBOARD_MAX_UPLOAD_MB"
ENV_INDEX_DIR = "KEYREID_DASHBOARD_INDEX_DIR"
DEFAULT_MODEL = "keyreid_vit_tiny"
DEFAULT_MAX_UPLOAD_MB = 20


class DashboardError(Exception):
    """A problem to show the operator as it is (the message names the file or database)."""


def as_database_url(value: str) -> str:
    """A database URL; a bare file path becomes a SQLite URL."""
    return value if "://" in value else f"sqlite:///{Path(value).expanduser().resolve()}"


@dataclass(frozen=True)
class DashboardSettings:
    """How the dashboard was started (`keyreid-dashboard` passes these as environment variables).

    `checkpoint`/`model`: the encoder for search by upload; None means "the one the watcher's
    last run used" (its run config), then the untrained default.
    """

    db_url: str
    checkpoint: str | None = None
    model: str | None = None
    device: str | None = None
    max_upload_mb: float = DEFAULT_MAX_UPLOAD_MB

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None) -> DashboardSettings:
        env = os.environ if environ is None else environ
        url = env.get(ENV_DB, "").strip()
        if not url:
            raise DashboardError(f"no database given: start the dashboard with "
                                 f"`keyreid-dashboard --db sqlite:///keyreid.db` "
                                 f"(or set {ENV_DB})")
        raw_mb = env.get(ENV_MAX_UPLOAD_MB, str(DEFAULT_MAX_UPLOAD_MB))
        try:
            max_mb = float(raw_mb)
        except ValueError:
            raise DashboardError(f"{ENV_MAX_UPLOAD_MB}={raw_mb!r} is not a number") from None
        return cls(db_url=as_database_url(url), checkpoint=env.get(ENV_CHECKPOINT) or None,
                   model=env.get(ENV_MODEL) or None, device=env.get(ENV_DEVICE) or None,
                   max_upload_mb=max_mb)


def open_readonly(url: str) -> Repository:
    """The dashboard's read-only repository, or DashboardError with a message for the operator."""
    problem = validate_database_url(url, readonly=True)
    if problem:
        raise DashboardError(problem)
    try:
        return open_repository(url, readonly=True)
    except SchemaTooNewError as exc:
        raise DashboardError(f"{exc}. The dashboard did not open it.") from None
    except StorageError as exc:
        raise DashboardError(str(exc)) from None


WALL_CLOCK_AFTER = 1e8  # larger times are capture wall-clock (epoch seconds), smaller video time


def is_wall_clock(seconds: float) -> bool:
    return seconds >= WALL_CLOCK_AFTER


def format_time(seconds: float | None) -> str:
    """A time of the repository's axis: wall-clock as a UTC date and time, video time (rows
    written before wall-clock times were recorded) as h:mm:ss.s; '–' when unknown."""
    if seconds is None or not math.isfinite(seconds):
        return "–"
    if is_wall_clock(seconds):
        return datetime.fromtimestamp(seconds, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
    whole = int(seconds)
    tenths = round((seconds - whole) * 10)
    if tenths == 10:
        whole, tenths = whole + 1, 0
    return f"{whole // 3600}:{whole // 60 % 60:02d}:{whole % 60:02d}.{tenths}"


def time_bounds(repo: Repository, cameras: list[CameraRecord]) -> tuple[float, float] | None:
    """The span of recorded video time (first tracklet start to the latest frame), or None."""
    first = repo.list_tracklets(limit=1)
    if not first:
        return None
    start = first[0].first_seen
    ends = [c.last_frame_wall_time if is_wall_clock(start) else c.last_frame_time
            for c in cameras]
    ends = [e for e in ends if e is not None]
    buckets = repo.activity(bucket_seconds=1.0)
    if buckets:
        ends.append(buckets[-1].start + 1.0)
    end = max([start + 1.0, *ends])
    return float(math.floor(start)), float(math.ceil(end))


def camera_rows(repo: Repository, cameras: list[CameraRecord],
                gallery: GalleryIndex | None) -> list[dict]:
    """One status row per camera for the overview table."""
    clip_counts: dict[str, int] = {}
    if gallery is not None and gallery.size:
        names, counts = np.unique(gallery.camera_ids.astype(str), return_counts=True)
        clip_counts = dict(zip(names.tolist(), counts.tolist()))
    return [{
        "camera": c.id,
        "name": c.name,
        "source": redact(c.source or ""),  # older databases may hold a source unredacted
        "status": c.status or "–",
        "reason": c.status_reason or "",
        "restarts": c.restarts,
        "last frame at": format_time(c.last_frame_wall_time),
        "last frame (video time)": format_time(c.last_frame_time),
        "fps": None if c.fps is None else round(float(c.fps), 1),
        "frames processed": c.frames_processed,
        "tracklets": repo.count_tracklets(camera_ids=[c.id]),
        "clips": clip_counts.get(c.id, 0),
        "updated": "–" if c.updated_at is None else c.updated_at.strftime("%Y-%m-%d %H:%M:%S UTC"),
    } for c in cameras]


def activity_points(repo: Repository, cameras: list[CameraRecord],
                    bucket_seconds: float) -> list[dict]:
    """Tracklets started per time bucket and camera, as chart rows."""
    return [{"time (s)": b.start, "end (s)": b.start + bucket_seconds,
             "tracklets started": b.count, "camera": c.id}
            for c in cameras for b in repo.activity(c.id, bucket_seconds=bucket_seconds)]


def index_directory(url: str, model_id: str | None,
                    environ: dict[str, str] | None = None) -> Path | None:
    """The folder of one model's FAISS search index (`storage.ann`): a sub-folder per model
    of $KEYREID_DASHBOARD_INDEX_DIR when set, else of `<database file>.index/` beside a
    SQLite file. None (kept in memory, rebuilt per dashboard start) for other databases
    without that variable. One folder per model, so switching models never mixes them."""
    env = os.environ if environ is None else environ
    if env.get(ENV_INDEX_DIR):
        root = Path(env[ENV_INDEX_DIR]).expanduser()
    else:
        database = sqlite_path(make_url(url))
        if database is None:
            return None
        root = database.with_name(database.name + ".index")
    name = str(model_id)
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "_", name)[:48]
    return root / f"{slug}-{hashlib.sha256(name.encode()).hexdigest()[:8]}"


def search_index(repo: Repository, gallery: GalleryIndex, *,
                 min_rows: int = ANN_MIN_GALLERY) -> AnnIndex | None:
    """The gallery's approximate index once it holds `min_rows` tracklets (None: exact
    search), opened once per gallery, i.e. each time the dashboard reloads it after new
    clips: loaded from its folder, updated with the new, grown and deleted tracklets and saved
    (`GalleryIndex.ann_index`)."""
    return gallery.ann_index(index_directory(repo.url, gallery.model_id), min_rows=min_rows)


@dataclass(frozen=True)
class AnnotatedHit:
    """A search hit with what the result card shows: the tracklet now (identity, thumbnail)."""

    hit: SearchHit
    tracklet: TrackletRecord | None
    same_identity: bool


def annotate_hits(repo: Repository, hits: list[SearchHit],
                  query_identity: int | None) -> list[AnnotatedHit]:
    """Attach each hit's current tracklet (the gallery's identity ids may predate a merge)."""
    annotated = []
    for hit in hits:
        tracklet = repo.get_tracklet(hit.tracklet_id)
        identity = tracklet.identity_id if tracklet is not None else hit.identity_id
        annotated.append(AnnotatedHit(
            hit=hit, tracklet=tracklet,
            same_identity=query_identity is not None and identity == query_identity))
    return annotated


def search_by_tracklet(repo: Repository, gallery: GalleryIndex, tracklet_id: int, k: int, *,
                       camera_ids: list[str] | None = None,
                       time_range: tuple[float, float] | None = None,
                       max_distance: float | None = None,
                       rerank: bool = False) -> list[AnnotatedHit]:
    """Rank tracklets of OTHER cameras against one stored tracklet (its unit descriptor) by
    the one similarity (`GalleryIndex.search`); see `search_by_descriptor` on `rerank`."""
    query = repo.get_tracklet(tracklet_id)
    if query is None:
        raise DashboardError(f"tracklet {tracklet_id} does not exist in {repo.url}")
    descriptor = repo.tracklet_descriptor(tracklet_id, model_id=gallery.model_id)
    if descriptor is None:
        raise DashboardError(f"tracklet {tracklet_id} has no clip of model {gallery.model_id!r} "
                             "yet: nothing to search with")
    hits = gallery.search(descriptor, k, camera_ids=camera_ids, time_range=time_range,
                          exclude_camera_id=query.camera_id, max_distance=max_distance,
                          rerank=rerank, index=search_index(repo, gallery))
    return annotate_hits(repo, hits, query.identity_id)


def search_by_descriptor(repo: Repository, gallery: GalleryIndex, descriptor: np.ndarray, k: int,
                         *, camera_ids: list[str] | None = None,
                         time_range: tuple[float, float] | None = None,
                         max_distance: float | None = None,
                         rerank: bool = False) -> list[AnnotatedHit]:
    """Rank gallery tracklets against a descriptor computed from an upload.

    `rerank`: k-reciprocal re-ranking of the top candidates (`storage.rerank`). Off by
    default because it did not help where measured (`python -m app.evaluate --rerank`,
    cross-camera mAP / rank-1 of tracklets, k1 = 20, k2 = 6, lambda = 0.3): training.scene
    12 people 60 s, untrained encoder 48.0 / 25.0 -> 51.3 / 31.2 (16 queries); 24 people
    90 s seed 1, untrained 62.6 / 44.4 -> 51.1 / 27.8, tiny synthetic-trained 54.5 / 38.9 ->
    49.2 / 27.8 (36 queries each). Galleries of ~10-20 tracklets, 1-3 per person, are far
    smaller than the k1 = 20 neighbourhoods the method assumes.
    """
    hits = gallery.search(descriptor, k, camera_ids=camera_ids, time_range=time_range,
                          max_distance=max_distance, rerank=rerank,
                          index=search_index(repo, gallery))
    return annotate_hits(repo, hits, None)


@dataclass(frozen=True)
class EncoderChoice:
    """How a search by upload makes its query (shown in the UI): the encoder, and the crop
    margin and size of the watcher's clips. `overrides` is JSON (model options), hashable."""

    checkpoint: str | None
    model: str
    reason: str
    overrides: str = "{}"
    crop_margin: float = 0.1
    clip_size: tuple[int, int] = (256, 128)


def choose_encoder(settings: DashboardSettings, repo: Repository) -> EncoderChoice:
    """The dashboard option first, else the watcher's latest run, else the untrained default.

    The run config is the watcher's `WatchConfig.to_dict()`: its `reid` section names the
    checkpoint / model / overrides and its `clips` section the crop policy, so the query
    descriptor comes from the same network and the same kind of crop as the stored ones (the
    caller still checks the encoder's model id against the gallery's).
    """
    runs = repo.list_runs()
    config = runs[-1].config if runs else {}
    reid = config.get("reid") if isinstance(config.get("reid"), dict) else {}
    clips = config.get("clips") if isinstance(config.get("clips"), dict) else {}
    crop = {"crop_margin": float(clips.get("crop_margin", 0.1)),
            "clip_size": tuple(int(v) for v in clips.get("size", (256, 128)))}
    if settings.checkpoint or settings.model:
        return EncoderChoice(settings.checkpoint, settings.model or DEFAULT_MODEL,
                             "given on the dashboard's command line", **crop)
    if reid:
        return EncoderChoice(reid.get("checkpoint") or None, reid.get("model") or DEFAULT_MODEL,
                             f"taken from the watcher's run {runs[-1].id} configuration",
                             json.dumps(reid.get("overrides") or {}, sort_keys=True), **crop)
    return EncoderChoice(None, DEFAULT_MODEL,
                         "default: no checkpoint given and none found in the watcher's runs",
                         **crop)


def merge_identities(url: str, keep_id: int, merge_id: int) -> list[int]:
    """Merge `merge_id` into `keep_id` through storage; returns the moved tracklet ids.

    Opens a normal repository for this one short transaction: it waits behind the watcher's
    writes (busy timeout) and does not take the writer lock.
    """
    with open_repository(url) as repo:
        return repo.merge_identities(keep_id, merge_id, note="merged in the dashboard")


def split_tracklet(url: str, tracklet_id: int) -> int:
    """Move one tracklet out of its identity through storage; returns the new identity id."""
    with open_repository(url) as repo:
        return repo.split_tracklet(tracklet_id, note="split in the dashboard")


def confirm_link(url: str, tracklet_id: int, identity_id: int) -> int:
    """Operator must-link through storage: the tracklet joins `identity_id`; returns the identity
    it is in now (merges followed). The running watcher applies it as a constraint."""
    with open_repository(url) as repo:
        return repo.confirm_link(tracklet_id, identity_id, note="confirmed in the dashboard")


def reject_link(url: str, tracklet_id: int, identity_id: int) -> None:
    """Operator cannot-link through storage: this tracklet is not the person of `identity_id`."""
    with open_repository(url) as repo:
        repo.reject_link(tracklet_id, identity_id, note="rejected in the dashboard")


def format_duration(seconds: float) -> str:
    """A span for people: '4.0 s', '2 min 05 s', '1 h 03 min'."""
    seconds = max(0.0, float(seconds))
    if seconds < 60:
        return f"{seconds:.1f} s"
    whole = round(seconds)
    if whole < 3600:
        return f"{whole // 60} min {whole % 60:02d} s"
    return f"{whole // 3600} h {whole // 60 % 60:02d} min"


OPERATOR_WORDS = {"confirmed": "confirmed by an operator", "merged": "merged by an operator",
                  "split": "split out by an operator"}
PLACING_KINDS = ("new", "linked", "confirmed", "merged", "split")  # decisions that set an identity


def link_confidence(decision: LinkDecisionRecord | None) -> str:
    """How sure the link that put a tracklet in its identity is, in plain words.

    The linker's own estimate where it stored one (`false_link`), the operator's word for their
    changes, and an honest "no judgement" for links made without a calibrated model."""
    if decision is None:
        return "no decision recorded"
    if decision.kind in OPERATOR_WORDS:
        return OPERATOR_WORDS[decision.kind]
    if decision.kind == "new":
        return "opened this identity" + (f" ({decision.reason})" if decision.reason else "")
    if decision.distance is None:
        return "linked (no distance recorded)"
    same = None if decision.false_link is None else 1.0 - decision.false_link
    return describe(decision.distance, same)


@dataclass(frozen=True)
class Sighting:
    """One stop of an identity's journey: where and when, how sure its link is, and the gap
    since the previous stop ended (None for the first; negative when they overlap)."""

    tracklet: TrackletRecord
    camera: str
    confidence: str
    gap: float | None
    camera_changed: bool


def journey(repo: Repository, identity_id: int, names: dict[str, str]) -> list[Sighting]:
    """The identity's tracklets in time order, each with the confidence of its latest placing
    decision into this identity (a merged-in tracklet's decision names the kept identity)."""
    members = sorted(repo.identity_members(identity_id), key=lambda t: (t.first_seen, t.id))
    placed: dict[int, LinkDecisionRecord] = {}
    for decision in repo.link_decisions(identity_id=identity_id, kinds=PLACING_KINDS):
        if decision.identity_id == identity_id:
            placed[decision.tracklet_id] = decision
    sightings = []
    for previous, tracklet in zip([None, *members], members):
        sightings.append(Sighting(
            tracklet=tracklet, camera=names.get(tracklet.camera_id, tracklet.camera_id),
            confidence=link_confidence(placed.get(tracklet.id)),
            gap=None if previous is None else tracklet.first_seen - previous.last_seen,
            camera_changed=previous is not None and previous.camera_id != tracklet.camera_id))
    return sightings


def transit_words(sighting: Sighting, previous_camera: str) -> str:
    """The step between two sightings, e.g. 'after 26.0 s, from Camera A to Camera B'."""
    gap = sighting.gap or 0.0
    where = (f"from {previous_camera} to {sighting.camera}" if sighting.camera_changed
             else f"again on {sighting.camera}")
    if gap < 0:
        return f"overlapping by {format_duration(-gap)}, {where}"
    return f"after {format_duration(gap)}, {where}"


@dataclass(frozen=True)
class Candidate:
    """An identity an unlinked tracklet might belong to: its hits, best first."""

    identity_id: int
    similarity: float  # percent, of the best hit (storage.similarity.similarity_percent)
    hits: tuple[AnnotatedHit, ...]


def candidate_identities(repo: Repository, gallery: GalleryIndex, tracklet: TrackletRecord,
                         limit: int = 3, pool: int = 30) -> list[Candidate]:
    """The best `limit` identities for a tracklet the linker left alone, from the `pool`
    closest tracklets of other cameras, grouped by their identity now; its own identity and the
    identities an operator already rejected for it are skipped (asking again would be noise)."""
    skip = set(repo.rejected_identities(tracklet.id))
    if tracklet.identity_id is not None:
        skip.add(tracklet.identity_id)
    grouped: dict[int, list[AnnotatedHit]] = {}
    for item in search_by_tracklet(repo, gallery, tracklet.id, pool):
        identity = item.tracklet.identity_id if item.tracklet else item.hit.identity_id
        if identity is None or identity in skip or (identity not in grouped
                                                    and len(grouped) == limit):
            continue
        grouped.setdefault(identity, []).append(item)
    return [Candidate(identity, float(similarity_percent(hits[0].hit.distance)), tuple(hits))
            for identity, hits in grouped.items()]


def unlinked_reason(repo: Repository, tracklet: TrackletRecord) -> str:
    """Why the tracklet stands alone: the linker's stored reason, or that it is still pending."""
    if tracklet.identity_id is None:
        return "pending: the running watcher has not decided on it yet"
    decisions = repo.link_decisions(tracklet_id=tracklet.id, kinds=("new",))
    reason = decisions[-1].reason if decisions else None
    return f"left alone by the linker: {reason}" if reason else "left alone by the linker"
