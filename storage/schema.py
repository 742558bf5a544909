"""Database schema (SQLAlchemy 2.x declarative) and its versioned migrations.

The schema version lives in `schema_meta`. A fresh database gets `create_all` and is stamped
with `SCHEMA_VERSION`; an existing older one is upgraded by the ordered `MIGRATIONS`, each a
function applied inside the same transaction as the version bump (SQLite DDL is
transactional, so a crash mid-migration leaves the old version intact). A database with a
newer version is refused before anything touches it: an older program must never "repair" a
schema it does not understand.
"""
from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Callable

from sqlalchemy import (
    Boolean,
    CheckConstraint,
    Connection,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    String,
    Text,
    UniqueConstraint,
    inspect,
    select,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from .errors import StorageError
from .records import LINK_KINDS

SCHEMA_VERSION = 3


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


class Base(DeclarativeBase):
    pass


class SchemaMeta(Base):
    __tablename__ = "schema_meta"
    key: Mapped[str] = mapped_column(String(64), primary_key=True)
    value: Mapped[str] = mapped_column(Text)


class Camera(Base):
    __tablename__ = "cameras"
    id: Mapped[str] = mapped_column(String(128), primary_key=True)
    name: Mapped[str] = mapped_column(String(256))
    source: Mapped[str] = mapped_column(Text)
    crop: Mapped[str | None] = mapped_column(Text)  # JSON [x, y, w, h]
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    status: Mapped[str | None] = mapped_column(Text)
    last_frame_time: Mapped[float | None] = mapped_column(Float)
    last_frame_index: Mapped[int | None] = mapped_column(Integer)
    fps: Mapped[float | None] = mapped_column(Float)
    frames_processed: Mapped[int] = mapped_column(Integer, default=0)
    updated_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    # v2: why the camera is in its status (reconnecting / failed), and its supervision counters.
    status_reason: Mapped[str | None] = mapped_column(Text)
    reconnects: Mapped[int] = mapped_column(Integer, default=0)
    restarts: Mapped[int] = mapped_column(Integer, default=0)
    last_frame_wall_time: Mapped[float | None] = mapped_column(Float)


class Run(Base):
    __tablename__ = "runs"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    started_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    ended_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    status: Mapped[str] = mapped_column(Text, default="running")
    config: Mapped[str] = mapped_column(Text, default="{}")  # JSON
    pid: Mapped[int | None] = mapped_column(Integer)
    hostname: Mapped[str | None] = mapped_column(String(256))
    # v2: how well the linker's model separates people on this site (JSON, see tracking.linking)
    calibration: Mapped[str | None] = mapped_column(Text)


class Identity(Base):
    __tablename__ = "identities"
    __table_args__ = (Index("ix_identities_merged_into", "merged_into"),)  # v2
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    label: Mapped[str | None] = mapped_column(Text)
    # Set when this identity was merged into another; kept so old decisions stay explainable.
    merged_into: Mapped[int | None] = mapped_column(ForeignKey("identities.id"))


class Tracklet(Base):
    __tablename__ = "tracklets"
    __table_args__ = (
        UniqueConstraint("run_id", "camera_id", "track_id", name="uq_tracklet_run_camera_track"),
        Index("ix_tracklets_camera_time", "camera_id", "first_time"),
        Index("ix_tracklets_time", "first_time"),
        Index("ix_tracklets_created", "created_at"),  # v2: retention deletes oldest first
    )
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    run_id: Mapped[int] = mapped_column(ForeignKey("runs.id"))
    camera_id: Mapped[str] = mapped_column(ForeignKey("cameras.id"))
    track_id: Mapped[int] = mapped_column(Integer)
    first_frame: Mapped[int] = mapped_column(Integer)
    last_frame: Mapped[int] = mapped_column(Integer)
    first_time: Mapped[float] = mapped_column(Float)
    last_time: Mapped[float] = mapped_column(Float)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    thumbnail: Mapped[bytes | None] = mapped_column(LargeBinary)
    identity_id: Mapped[int | None] = mapped_column(ForeignKey("identities.id"), index=True)
    finished: Mapped[bool] = mapped_column(Boolean, default=False)
    # v2: capture wall-clock times (seconds since the Unix epoch, UTC), comparable across
    # cameras and runs (first_time / last_time are per-connection stream seconds), and why the
    # tracklet ended when something other than its track did (a crash repaired, an outage).
    first_wall_time: Mapped[float | None] = mapped_column(Float)
    last_wall_time: Mapped[float | None] = mapped_column(Float)
    end_reason: Mapped[str | None] = mapped_column(Text)


class Clip(Base):
    __tablename__ = "clips"
    __table_args__ = (
        CheckConstraint("descriptor_dtype IN ('float16', 'float32')", name="ck_clip_dtype"),
        CheckConstraint("descriptor_dim > 0", name="ck_clip_dim"),
    )
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    tracklet_id: Mapped[int] = mapped_column(ForeignKey("tracklets.id"), index=True)
    frame_indices: Mapped[str] = mapped_column(Text)  # JSON list of ints
    start_time: Mapped[float] = mapped_column(Float)
    end_time: Mapped[float] = mapped_column(Float)
    descriptor: Mapped[bytes] = mapped_column(LargeBinary)
    descriptor_dtype: Mapped[str] = mapped_column(String(16))
    descriptor_dim: Mapped[int] = mapped_column(Integer)
    model_id: Mapped[str] = mapped_column(String(256), index=True)
    boxes: Mapped[str | None] = mapped_column(Text)  # JSON [[x1, y1, x2, y2], ...] per frame
    keypoints: Mapped[bytes | None] = mapped_column(LargeBinary)  # float32 [T, K, 3]
    thumbnail: Mapped[bytes | None] = mapped_column(LargeBinary)  # v1 only: no longer written
    start_wall_time: Mapped[float | None] = mapped_column(Float)  # v2, see Tracklet
    end_wall_time: Mapped[float | None] = mapped_column(Float)


class LinkDecision(Base):
    __tablename__ = "link_decisions"
    __table_args__ = (
        CheckConstraint(f"kind IN ({', '.join(repr(k) for k in LINK_KINDS)})",
                        name="ck_link_kind"),
        Index("ix_link_decisions_candidate", "candidate_identity_id"),  # v2
    )
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    tracklet_id: Mapped[int] = mapped_column(ForeignKey("tracklets.id"), index=True)
    identity_id: Mapped[int] = mapped_column(ForeignKey("identities.id"), index=True)
    kind: Mapped[str] = mapped_column(String(16))
    distance: Mapped[float | None] = mapped_column(Float)
    candidate_identity_id: Mapped[int | None] = mapped_column(ForeignKey("identities.id"))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    note: Mapped[str | None] = mapped_column(Text)
    # v2: the linker's evidence (second-best minus best distance, estimated probability that
    # the link is wrong) and its reason in plain words
    margin: Mapped[float | None] = mapped_column(Float)
    false_link: Mapped[float | None] = mapped_column(Float)
    reason: Mapped[str | None] = mapped_column(Text)


@dataclass(frozen=True)
class Migration:
    """Upgrade from `version - 1` to `version`; `apply` runs inside the migration transaction."""

    version: int
    description: str
    apply: Callable[[Connection], None]


def _add_columns(conn: Connection, table: str, columns: dict[str, str]) -> None:
    for name, sql_type in columns.items():
        conn.exec_driver_sql(f"ALTER TABLE {table} ADD COLUMN {name} {sql_type}")


def _v2(conn: Connection) -> None:
    _add_columns(conn, "cameras", {"status_reason": "TEXT", "reconnects": "INTEGER DEFAULT 0",
                                   "restarts": "INTEGER DEFAULT 0",
                                   "last_frame_wall_time": "FLOAT"})
    _add_columns(conn, "tracklets", {"first_wall_time": "FLOAT", "last_wall_time": "FLOAT",
                                     "end_reason": "TEXT"})
    _add_columns(conn, "clips", {"start_wall_time": "FLOAT", "end_wall_time": "FLOAT"})
    _add_columns(conn, "link_decisions", {"margin": "FLOAT", "false_link": "FLOAT",
                                          "reason": "TEXT"})
    _add_columns(conn, "runs", {"calibration": "TEXT"})
    for name, table, column in (("ix_tracklets_created", "tracklets", "created_at"),
                                ("ix_identities_merged_into", "identities", "merged_into"),
                                ("ix_link_decisions_candidate", "link_decisions",
                                 "candidate_identity_id")):
        conn.exec_driver_sql(f"CREATE INDEX {name} ON {table} ({column})")
    # Per-clip thumbnails were never shown (the tracklet's thumbnail is): free their space.
    conn.exec_driver_sql("UPDATE clips SET thumbnail = NULL")


def _v3(conn: Connection) -> None:
    """Widen the decision kinds by the operator's "confirmed" (must-link) and "rejected"
    (cannot-link). SQLite cannot alter a CHECK constraint, so there the table is rebuilt (the
    documented rename / create / copy / drop); other databases replace the constraint."""
    table = LinkDecision.__table__
    if conn.dialect.name != "sqlite":
        conn.exec_driver_sql("ALTER TABLE link_decisions DROP CONSTRAINT ck_link_kind")
        conn.exec_driver_sql("ALTER TABLE link_decisions ADD CONSTRAINT ck_link_kind CHECK "
                             f"(kind IN ({', '.join(repr(k) for k in LINK_KINDS)}))")
        return
    for (index,) in conn.exec_driver_sql(
            "SELECT name FROM sqlite_master WHERE type = 'index' AND tbl_name = 'link_decisions' "
            "AND sql IS NOT NULL").all():
        conn.exec_driver_sql(f'DROP INDEX "{index}"')
    conn.exec_driver_sql("ALTER TABLE link_decisions RENAME TO link_decisions_v2")
    table.create(conn)
    columns = ", ".join(column.name for column in table.columns)
    conn.exec_driver_sql(f"INSERT INTO link_decisions ({columns}) "
                         f"SELECT {columns} FROM link_decisions_v2")
    conn.exec_driver_sql("DROP TABLE link_decisions_v2")


# Ordered upgrades for databases created by older releases.
MIGRATIONS: tuple[Migration, ...] = (
    Migration(2, "wall-clock times, camera status reasons and counters, tracklet end reasons, "
                 "link evidence, run calibration; per-clip thumbnails dropped", _v2),
    Migration(3, "operator decisions: confirmed (must-link) and rejected (cannot-link)", _v3),
)


def read_schema_version(conn: Connection) -> int | None:
    """The stored schema version, or None when the database has no `schema_meta` table."""
    if not inspect(conn).has_table(SchemaMeta.__tablename__):
        return None
    value = conn.execute(
        select(SchemaMeta.__table__.c.value).where(SchemaMeta.__table__.c.key == "schema_version")
    ).scalar_one_or_none()
    return None if value is None else int(value)


def write_schema_version(conn: Connection, version: int) -> None:
    table = SchemaMeta.__table__
    updated = conn.execute(
        table.update().where(table.c.key == "schema_version").values(value=str(version))
    ).rowcount
    if not updated:
        conn.execute(table.insert().values(key="schema_version", value=str(version)))


def upgrade(
    conn: Connection,
    current: int,
    target: int = SCHEMA_VERSION,
    migrations: tuple[Migration, ...] = MIGRATIONS,
) -> list[Migration]:
    """Apply every migration in (current, target] in order and stamp `target`; returns them."""
    steps = [m for m in migrations if current < m.version <= target]
    expected = list(range(current + 1, target + 1))
    if [m.version for m in sorted(steps, key=lambda m: m.version)] != expected:
        raise StorageError(
            f"no complete migration path from schema version {current} to {target} "
            f"(have {[m.version for m in migrations]})"
        )
    for step in sorted(steps, key=lambda m: m.version):
        step.apply(conn)
        write_schema_version(conn, step.version)
    return steps
