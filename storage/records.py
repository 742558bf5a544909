"""Plain, frozen records returned by the repository.

Callers never see ORM objects: a record is a snapshot that stays valid after its session has
closed, can cross process boundaries (pickle) and cannot lazily trigger SQL from the dashboard
or the training data loader.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Literal

import numpy as np

LinkKind = Literal["new", "linked", "merged", "split", "confirmed", "rejected"]
LINK_KINDS: tuple[str, ...] = ("new", "linked", "merged", "split", "confirmed", "rejected")
# Decisions an operator made in the dashboard; a running linker applies them as constraints:
# merged / confirmed = must-link, split / rejected = cannot-link.
OPERATOR_KINDS: tuple[str, ...] = ("merged", "split", "confirmed", "rejected")
DescriptorDtype = Literal["float16", "float32"]


@dataclass(frozen=True, slots=True)
class RunRecord:
    id: int
    started_at: datetime
    ended_at: datetime | None
    status: str
    config: dict
    pid: int | None
    hostname: str | None
    calibration: dict | None = None  # the linker's separation figures (tracking.linking)


@dataclass(frozen=True, slots=True)
class CameraRecord:
    id: str
    name: str
    source: str
    crop: tuple[int, int, int, int] | None
    created_at: datetime
    status: str | None
    last_frame_time: float | None
    last_frame_index: int | None
    fps: float | None
    frames_processed: int
    updated_at: datetime | None
    status_reason: str | None = None
    reconnects: int = 0
    restarts: int = 0
    last_frame_wall_time: float | None = None


@dataclass(frozen=True, slots=True)
class TrackletRecord:
    id: int
    run_id: int
    camera_id: str
    track_id: int
    first_frame: int
    last_frame: int
    first_time: float
    last_time: float
    created_at: datetime
    identity_id: int | None
    finished: bool
    thumbnail: bytes | None = field(default=None, repr=False)
    first_wall_time: float | None = None  # capture wall clock, seconds since the epoch (UTC)
    last_wall_time: float | None = None
    end_reason: str | None = None

    @property
    def first_seen(self) -> float:
        """On the repository's time axis: wall-clock time when recorded, else stream time."""
        return self.first_time if self.first_wall_time is None else self.first_wall_time

    @property
    def last_seen(self) -> float:
        return self.last_time if self.last_wall_time is None else self.last_wall_time


@dataclass(frozen=True, slots=True, eq=False)
class ClipRecord:
    """One stored clip. `descriptor` is a read-only float32 vector of length `descriptor_dim`.

    `boxes` holds one (x1, y1, x2, y2) box per frame index in camera coordinates (after the
    camera's crop) and `keypoints` a read-only float32 array [T, K, 3] (x, y, confidence), so a
    training set can re-crop the frames from the camera source.
    """

    id: int
    tracklet_id: int
    frame_indices: tuple[int, ...]
    start_time: float
    end_time: float
    descriptor: np.ndarray = field(repr=False)
    descriptor_dtype: str
    descriptor_dim: int
    model_id: str
    boxes: tuple[tuple[float, float, float, float], ...] | None = field(default=None, repr=False)
    keypoints: np.ndarray | None = field(default=None, repr=False)
    start_wall_time: float | None = None
    end_wall_time: float | None = None


@dataclass(frozen=True, slots=True, eq=False)
class NewClip:
    """A clip to store; `descriptor` is a 1-D float vector (stored as the repository's dtype)."""

    tracklet_id: int
    frame_indices: tuple[int, ...] | list[int]
    start_time: float
    end_time: float
    descriptor: np.ndarray
    model_id: str
    boxes: tuple | list | None = None
    keypoints: np.ndarray | None = None
    start_wall_time: float | None = None
    end_wall_time: float | None = None


@dataclass(frozen=True, slots=True)
class IdentityRecord:
    """A global identity with a summary of its live members (merged-away identities excluded)."""

    id: int
    created_at: datetime
    label: str | None
    member_count: int
    camera_ids: tuple[str, ...]
    first_time: float | None
    last_time: float | None
    merged_into: int | None = None


@dataclass(frozen=True, slots=True, eq=False)
class IdentityMember:
    """A member tracklet as a restarted linker loads it; `descriptor` is its unit tracklet
    descriptor (`storage.similarity.tracklet_descriptor`); times on the wall-clock axis."""

    tracklet_id: int
    camera_id: str
    first_time: float
    last_time: float
    descriptor: np.ndarray = field(repr=False)


@dataclass(frozen=True, slots=True, eq=False)
class UnlinkedTracklet:
    """A finished tracklet no identity holds yet, as the site's linker takes it from storage:
    its clip descriptors [N, D] (float32) and the clips' start times [N], times on the
    wall-clock axis."""

    tracklet_id: int
    camera_id: str
    first_time: float
    last_time: float
    clips: np.ndarray = field(repr=False)
    clip_times: np.ndarray = field(repr=False)


@dataclass(frozen=True, slots=True, eq=False)
class IdentitySnapshot:
    identity_id: int
    members: tuple[IdentityMember, ...]


@dataclass(frozen=True, slots=True)
class LinkDecisionRecord:
    id: int
    tracklet_id: int
    identity_id: int
    kind: str
    distance: float | None
    candidate_identity_id: int | None
    created_at: datetime
    note: str | None
    margin: float | None = None
    false_link: float | None = None  # estimated probability that this link is wrong
    reason: str | None = None


@dataclass(frozen=True, slots=True)
class RepairReport:
    """What `Repository.repair` fixed after a crash of an earlier run."""

    runs_aborted: int
    tracklets_closed: int
    identities_removed: int

    def __str__(self) -> str:
        return (f"{self.runs_aborted} unfinished run(s) marked aborted, {self.tracklets_closed} "
                f"open tracklet(s) closed, {self.identities_removed} identity(ies) without "
                f"members removed")


@dataclass(frozen=True, slots=True)
class ActivityBucket:
    """Number of tracklets first seen in [start, start + bucket_seconds) (see `first_seen`)."""

    start: float
    count: int


@dataclass(frozen=True, slots=True)
class StorageStats:
    cameras: int
    runs: int
    tracklets: int
    clips: int
    identities: int


@dataclass(frozen=True, slots=True)
class SearchHit:
    """One ranked tracklet. `distance`: the one similarity's (`storage.similarity`, 0..2)
    between the query and the tracklet's descriptor; `clip_id`: its clip nearest the query."""

    rank: int
    distance: float
    tracklet_id: int
    clip_id: int
    camera_id: str
    track_id: int
    first_time: float
    last_time: float
    identity_id: int | None
