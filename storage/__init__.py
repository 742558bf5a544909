"""Storage for KeyRe-ID Watch: schema, repository API and vector search.

Only `sqlalchemy`, `numpy` and the standard library are used here, so the dashboard and
training can read the database without importing torch.
"""
from .engine import validate_database_url
from .errors import (
    ReadOnlyError,
    SchemaTooNewError,
    SchemaTooOldError,
    StorageError,
    StorageUnavailableError,
    WriterLockedError,
)
from .records import (
    LINK_KINDS,
    OPERATOR_KINDS,
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
from .repository import DEFAULT_URL, Repository, open_repository
from .retention import RetentionPolicy, RetentionReport, enforce_retention
from .schema import SCHEMA_VERSION
from .search import GalleryIndex, nearest
from .similarity import describe, distances, similarity_percent, tracklet_descriptor, unit

__all__ = [
    "DEFAULT_URL",
    "LINK_KINDS",
    "OPERATOR_KINDS",
    "SCHEMA_VERSION",
    "ActivityBucket",
    "CameraRecord",
    "ClipRecord",
    "GalleryIndex",
    "IdentityMember",
    "IdentityRecord",
    "IdentitySnapshot",
    "LinkDecisionRecord",
    "NewClip",
    "RepairReport",
    "ReadOnlyError",
    "Repository",
    "RetentionPolicy",
    "RetentionReport",
    "RunRecord",
    "SchemaTooNewError",
    "SchemaTooOldError",
    "SearchHit",
    "StorageError",
    "StorageStats",
    "StorageUnavailableError",
    "TrackletRecord",
    "UnlinkedTracklet",
    "WriterLockedError",
    "describe",
    "distances",
    "enforce_retention",
    "nearest",
    "open_repository",
    "similarity_percent",
    "tracklet_descriptor",
    "unit",
    "validate_database_url",
]
