"""Bounded storage: delete the oldest tracklets until the age and size budgets hold.

The watcher runs for weeks and every clip costs ~20 KB, so something must delete. What goes:
whole tracklets, oldest first by `created_at`, with their clips and link decisions; then the
identities that are left with nothing referring to them. What stays: runs and cameras (a few
rows each), and tracklets that are not `finished` (a running watcher is still extending them)
unless they are older than the age limit.

Every batch is its own short `BEGIN IMMEDIATE` transaction, so the watcher's writes and a
dashboard merge wait at most one batch (milliseconds), never the whole clean-up; choosing the
next batch is a plain read outside the write lock. Readers (the dashboard) are never blocked:
in WAL mode they keep their snapshot while rows vanish.

Size is what the file would be after reclaiming its free pages: (page_count - freelist_count)
x page_size. Deleting rows only puts pages on SQLite's freelist; the file shrinks when
`PRAGMA incremental_vacuum` gives them back (in small steps, each its own transaction) and the
WAL is checkpointed. That needs `auto_vacuum = INCREMENTAL`, which `storage/engine.py` sets on
every new database. A file created before that has `auto_vacuum = NONE`: retention still keeps
it within budget (freed pages are reused by new rows, so the file stops growing), but it cannot
shrink until `convert_to_incremental` has rewritten it once.

On PostgreSQL the same deletes run through SQLAlchemy, in the same short batches; only the age
limit applies there: the server keeps the space of deleted rows for new ones (autovacuum), so
what a database "would use" is not measured the way it is for a SQLite file, and a size budget
is refused rather than enforced by guesswork.
"""
from __future__ import annotations

import math
import sqlite3
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from sqlalchemy import Connection, Engine, delete, func, select, update
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import aliased

from .errors import ReadOnlyError, StorageError, StorageUnavailableError
from .repository import Repository
from .schema import Base, Clip, Identity, LinkDecision, Tracklet

AUTO_VACUUM_INCREMENTAL = 2  # PRAGMA auto_vacuum values: 0 NONE, 1 FULL, 2 INCREMENTAL
MAX_BATCH = 10_000  # stays far below SQLite's limit on bound parameters in one IN (...)


@dataclass(frozen=True)
class RetentionPolicy:
    """Keep tracklets at most `max_age_days` old and the database at most `max_bytes`.

    None disables a budget. `batch_tracklets` bounds one delete transaction (its write-lock
    hold); `vacuum_pages` bounds one incremental-vacuum step.
    """

    max_age_days: float | None
    max_bytes: int | None
    batch_tracklets: int = 200
    vacuum_pages: int = 1024

    def __post_init__(self) -> None:
        if self.max_age_days is not None and not self.max_age_days > 0:
            raise ValueError(f"max_age_days must be > 0 or None, got {self.max_age_days}")
        if self.max_bytes is not None and self.max_bytes <= 0:
            raise ValueError(f"max_bytes must be > 0 or None, got {self.max_bytes}")
        if not 1 <= self.batch_tracklets <= MAX_BATCH:
            raise ValueError(f"batch_tracklets must be in 1..{MAX_BATCH}, "
                             f"got {self.batch_tracklets}")
        if self.vacuum_pages < 1:
            raise ValueError(f"vacuum_pages must be >= 1, got {self.vacuum_pages}")


@dataclass(frozen=True)
class RetentionReport:
    """What one `enforce_retention` call did.

    bytes_* are used bytes (free pages excluded). `within_budget` is False when only open or
    brand-new tracklets are left over budget, or the time budget ran out: call again later.
    `reclaimable` is False for a file without incremental auto-vacuum (see the module notes).
    `deleted_identity_ids` lets the watcher's linker forget identities that no longer exist.
    """

    tracklets_deleted: int
    clips_deleted: int
    decisions_deleted: int
    identities_deleted: int
    deleted_identity_ids: tuple[int, ...]
    bytes_before: int
    bytes_after: int
    pages_reclaimed: int
    reclaimable: bool
    within_budget: bool
    batches: int
    longest_write_s: float
    seconds: float


def _engine(repo: Repository) -> Engine:
    # Retention needs raw SQLite control (BEGIN IMMEDIATE per batch, PRAGMAs that pysqlite
    # cannot step through SQLAlchemy).
    engine = repo.engine
    if engine.dialect.name != "sqlite":
        raise StorageError(f"{repo.url}: retention is only implemented for SQLite")
    return engine


@contextmanager
def _raw_connection(repo: Repository) -> Iterator[sqlite3.Connection]:
    """A pooled writer connection in autocommit mode (engine.py sets isolation_level=None)."""
    if repo.readonly:
        raise ReadOnlyError(f"{repo.url} was opened read-only; retention deletes rows")
    fairy = _engine(repo).raw_connection()
    try:
        yield fairy.driver_connection
    except sqlite3.OperationalError as exc:  # locked past busy_timeout, disk full, I/O: retry
        raise StorageUnavailableError(f"retention on {repo.url}: {exc}") from exc
    except sqlite3.Error as exc:
        raise StorageError(f"retention on {repo.url}: {exc}") from exc
    finally:
        fairy.close()


class _Writes:
    """Short write transactions on one connection, timing how long each holds the lock."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self.conn = conn
        self.count = 0
        self.longest = 0.0

    @contextmanager
    def _timed(self) -> Iterator[None]:
        """Count one write transaction and how long it held the lock; roll back on failure."""
        start = time.perf_counter()
        try:
            yield
        except BaseException:
            if self.conn.in_transaction:
                self.conn.execute("ROLLBACK")
            raise
        finally:
            self.count += 1
            self.longest = max(self.longest, time.perf_counter() - start)

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        self.conn.execute("BEGIN IMMEDIATE")  # waits up to busy_timeout for another writer
        with self._timed():
            yield self.conn
            self.conn.execute("COMMIT")

    def script(self, sql: str) -> None:
        """Run `sql` inside one write transaction with `executescript`, which steps every row
        (`execute` steps `PRAGMA incremental_vacuum(N)` once and so frees a single page)."""
        with self._timed():
            self.conn.executescript(f"BEGIN IMMEDIATE; {sql}; COMMIT;")


def _pragma(conn: sqlite3.Connection, name: str) -> int:
    return int(conn.execute(f"PRAGMA {name}").fetchone()[0])


def _used_bytes(conn: sqlite3.Connection) -> int:
    pages = _pragma(conn, "page_count") - _pragma(conn, "freelist_count")
    return pages * _pragma(conn, "page_size")


def used_bytes(repo: Repository) -> int:
    """Bytes the database would occupy with its free pages reclaimed (WAL not counted)."""
    with _raw_connection(repo) as conn:
        return _used_bytes(conn)


def _stamp(moment: datetime) -> str:
    """`moment` in the text form SQLAlchemy stores SQLite DateTime columns in (UTC, naive),
    so that comparing the stored strings compares the times."""
    if moment.tzinfo is not None:
        moment = moment.astimezone(UTC).replace(tzinfo=None)
    return moment.strftime("%Y-%m-%d %H:%M:%S.%f")


def _tracklet_count(conn: sqlite3.Connection) -> int:
    return int(conn.execute("SELECT count(*) FROM tracklets").fetchone()[0])


def _marks(count: int) -> str:
    return ",".join("?" * count)


def _delete_tracklets(conn: sqlite3.Connection, ids: Sequence[int], condition: str,
                      bound: str) -> tuple[int, int, int, list[int]]:
    """Delete the tracklets of `ids` that still satisfy `condition` (re-checked inside the
    transaction: a tracklet may have been finished or deleted since it was chosen), with their
    clips and decisions, then the identities this orphaned. Returns the counts and identity ids."""
    chosen = conn.execute(f"SELECT id, identity_id FROM tracklets WHERE id IN ({_marks(len(ids))})"
                          f" AND {condition}", [*ids, bound]).fetchall()
    if not chosen:
        return 0, 0, 0, []
    tracklet_ids = [row[0] for row in chosen]
    marks = _marks(len(tracklet_ids))
    touched = {row[1] for row in chosen}
    for identity_id, candidate in conn.execute(
            f"SELECT identity_id, candidate_identity_id FROM link_decisions "
            f"WHERE tracklet_id IN ({marks})", tracklet_ids):
        touched.update((identity_id, candidate))
    decisions = conn.execute(f"DELETE FROM link_decisions WHERE tracklet_id IN ({marks})",
                             tracklet_ids).rowcount
    clips = conn.execute(f"DELETE FROM clips WHERE tracklet_id IN ({marks})",
                         tracklet_ids).rowcount
    conn.execute(f"DELETE FROM tracklets WHERE id IN ({marks})", tracklet_ids)
    identities = _delete_orphans(conn, {i for i in touched if i is not None})
    return len(tracklet_ids), clips, decisions, identities


def _delete_orphans(conn: sqlite3.Connection, candidates: set[int]) -> list[int]:
    """Delete the candidate identities nothing refers to any more: no member tracklet, no link
    decision naming them as the decided identity (a remaining tracklet's history), no identity
    merged into them. Decisions naming one as the candidate forget it (NULL). An identity
    merged into a deleted one is then checked too. Only identities that lost references in this
    batch are candidates: one the watcher has just created for its next assignment is not."""
    deleted: list[int] = []
    while candidates:
        ids = sorted(candidates)
        marks = _marks(len(ids))
        free = [row[0] for row in conn.execute(
            f"SELECT i.id FROM identities i WHERE i.id IN ({marks})"
            " AND NOT EXISTS (SELECT 1 FROM tracklets t WHERE t.identity_id = i.id)"
            " AND NOT EXISTS (SELECT 1 FROM link_decisions d WHERE d.identity_id = i.id)"
            " AND i.id NOT IN (SELECT merged_into FROM identities WHERE merged_into IS NOT NULL)",
            ids)]
        if not free:
            break
        marks = _marks(len(free))
        targets = {row[0] for row in conn.execute(
            f"SELECT merged_into FROM identities WHERE id IN ({marks}) AND merged_into IS NOT NULL",
            free)}
        conn.execute(f"UPDATE link_decisions SET candidate_identity_id = NULL "
                     f"WHERE candidate_identity_id IN ({marks})", free)
        conn.execute(f"DELETE FROM identities WHERE id IN ({marks})", free)
        deleted += free
        candidates = targets
    return deleted


def _reclaim(writes: _Writes, step: int) -> int:
    """Give free pages back to the file system, `step` pages per transaction; returns pages."""
    conn = writes.conn
    reclaimed = 0
    free = _pragma(conn, "freelist_count")
    while free:
        writes.script(f"PRAGMA incremental_vacuum({step})")
        left = _pragma(conn, "freelist_count")
        if left >= free:  # a concurrent writer took the pages, or nothing can move
            break
        reclaimed += free - left
        free = left
    return reclaimed


def _server_bytes(conn: Connection) -> int:
    """Bytes the schema's tables take on the server (rows, TOAST, indexes)."""
    return int(sum(conn.execute(select(func.pg_total_relation_size(name))).scalar() or 0
                   for name in Base.metadata.tables))


def _delete_on_server(conn: Connection, ids: Sequence[int],
                      cutoff: datetime) -> tuple[int, int, int, list[int]]:
    """`_delete_tracklets` through SQLAlchemy: the chosen tracklets still older than `cutoff`
    (locked, re-checked in the transaction), their clips and decisions, then the identities
    this orphaned."""
    chosen = conn.execute(select(Tracklet.id, Tracklet.identity_id)
                          .where(Tracklet.id.in_(list(ids)), Tracklet.created_at < cutoff)
                          .with_for_update()).all()
    if not chosen:
        return 0, 0, 0, []
    tracklet_ids = [row[0] for row in chosen]
    touched = {row[1] for row in chosen}
    for identity_id, candidate in conn.execute(
            select(LinkDecision.identity_id, LinkDecision.candidate_identity_id)
            .where(LinkDecision.tracklet_id.in_(tracklet_ids))):
        touched.update((identity_id, candidate))
    decisions = conn.execute(delete(LinkDecision)
                             .where(LinkDecision.tracklet_id.in_(tracklet_ids))).rowcount
    clips = conn.execute(delete(Clip).where(Clip.tracklet_id.in_(tracklet_ids))).rowcount
    conn.execute(delete(Tracklet).where(Tracklet.id.in_(tracklet_ids)))
    return (len(tracklet_ids), clips, decisions,
            _delete_orphans_on_server(conn, {i for i in touched if i is not None}))


def _delete_orphans_on_server(conn: Connection, candidates: set[int]) -> list[int]:
    """`_delete_orphans` through SQLAlchemy (the same rule: see there)."""
    merged = aliased(Identity)
    deleted: list[int] = []
    while candidates:
        free = list(conn.scalars(select(Identity.id).where(
            Identity.id.in_(sorted(candidates)),
            ~select(Tracklet.id).where(Tracklet.identity_id == Identity.id).exists(),
            ~select(LinkDecision.id).where(LinkDecision.identity_id == Identity.id).exists(),
            ~select(merged.id).where(merged.merged_into == Identity.id).exists())))
        if not free:
            break
        targets = set(conn.scalars(select(Identity.merged_into).where(
            Identity.id.in_(free), Identity.merged_into.is_not(None))))
        conn.execute(update(LinkDecision).where(LinkDecision.candidate_identity_id.in_(free))
                     .values(candidate_identity_id=None))
        conn.execute(delete(Identity).where(Identity.id.in_(free)))
        deleted += free
        candidates = targets
    return deleted


def _enforce_on_server(repo: Repository, policy: RetentionPolicy, now: datetime | None,
                       time_budget_s: float | None) -> RetentionReport:
    """The age limit on a server database (see the module notes), in short batches."""
    if repo.readonly:
        raise ReadOnlyError(f"{repo.url} was opened read-only; retention deletes rows")
    if policy.max_bytes is not None:
        raise StorageError(f"{repo.url}: a size budget (retention.max_gb) is only measured on "
                           "SQLite files; on PostgreSQL use max_age_days (the server reuses "
                           "the space of deleted rows)")
    started = time.perf_counter()
    totals = [0, 0, 0]
    identity_ids: list[int] = []
    batches, longest, within = 0, 0.0, policy.max_age_days is None
    try:
        with repo.engine.connect() as conn:
            bytes_before = _server_bytes(conn)
            conn.commit()
            while not within:
                cutoff = (now or datetime.now(UTC)) - timedelta(days=policy.max_age_days)
                if (time_budget_s is not None and batches
                        and time.perf_counter() - started > time_budget_s):
                    break
                ids = list(conn.scalars(select(Tracklet.id).where(Tracklet.created_at < cutoff)
                                        .order_by(Tracklet.created_at, Tracklet.id)
                                        .limit(policy.batch_tracklets)))
                conn.commit()
                if not ids:
                    within = True
                    break
                start = time.perf_counter()
                with conn.begin():
                    tracklets, clips, decisions, identities = _delete_on_server(conn, ids, cutoff)
                batches += 1
                longest = max(longest, time.perf_counter() - start)
                totals = [totals[0] + tracklets, totals[1] + clips, totals[2] + decisions]
                identity_ids += identities
            bytes_after = _server_bytes(conn)
            conn.commit()
    except OperationalError as exc:  # server gone, deadlock, read-only: retry later
        raise StorageUnavailableError(f"retention on {repo.url}: {exc.orig or exc}") from exc
    return RetentionReport(
        tracklets_deleted=totals[0], clips_deleted=totals[1], decisions_deleted=totals[2],
        identities_deleted=len(identity_ids), deleted_identity_ids=tuple(identity_ids),
        bytes_before=bytes_before, bytes_after=bytes_after, pages_reclaimed=0,
        reclaimable=False, within_budget=within, batches=batches, longest_write_s=longest,
        seconds=time.perf_counter() - started)


def enforce_retention(repo: Repository, policy: RetentionPolicy, *, now: datetime | None = None,
                      time_budget_s: float | None = None) -> RetentionReport:
    """Delete the oldest tracklets (with clips, decisions, orphaned identities) in small batches
    until every tracklet is younger than `max_age_days` before `now` and the database uses at
    most `max_bytes`; reclaim the freed space when the file allows it.

    Only finished tracklets created before this call are deleted for size (so a writer adding
    data meanwhile cannot keep it running forever); the age limit applies to all. With
    `time_budget_s` it starts no further batch once that many seconds have passed (one always
    runs; `within_budget` then says whether it got there), so a caller such as the watcher's
    main loop can spread a large clean-up over many short calls. On PostgreSQL only the age
    limit applies (see the module notes).
    """
    if repo.engine.dialect.name != "sqlite":
        return _enforce_on_server(repo, policy, now, time_budget_s)
    started = time.perf_counter()
    wall = datetime.now(UTC)
    cutoff = None
    if policy.max_age_days is not None:
        cutoff = _stamp((now or wall) - timedelta(days=policy.max_age_days))
    created_before = _stamp(wall)
    totals = [0, 0, 0]
    identity_ids: list[int] = []
    pages = 0
    with _raw_connection(repo) as conn:
        writes = _Writes(conn)
        reclaimable = _pragma(conn, "auto_vacuum") == AUTO_VACUUM_INCREMENTAL
        bytes_before = used = _used_bytes(conn)
        within = False
        while True:
            if cutoff is not None and conn.execute(
                    "SELECT 1 FROM tracklets WHERE created_at < ? LIMIT 1", [cutoff]).fetchone():
                condition, bound, limit = "created_at < ?", cutoff, policy.batch_tracklets
            elif policy.max_bytes is not None and used > policy.max_bytes:
                condition, bound = "finished = 1 AND created_at <= ?", created_before
                count = _tracklet_count(conn)
                # Aim at the excess from the average tracklet's share of the file: fewer
                # batches than one at a time, and little overshoot below the budget.
                share = used / max(count, 1)
                limit = min(policy.batch_tracklets,
                            max(1, math.ceil((used - policy.max_bytes) / share)))
            else:
                within = True
                break
            if (time_budget_s is not None and writes.count
                    and time.perf_counter() - started > time_budget_s):
                break
            ids = [row[0] for row in conn.execute(
                f"SELECT id FROM tracklets WHERE {condition} ORDER BY created_at, id LIMIT ?",
                [bound, limit])]
            if not ids:
                break  # over budget, but only open or brand-new tracklets are left
            with writes.transaction():
                tracklets, clips, decisions, identities = _delete_tracklets(
                    conn, ids, condition, bound)
            totals = [totals[0] + tracklets, totals[1] + clips, totals[2] + decisions]
            identity_ids += identities
            if reclaimable:
                pages += _reclaim(writes, policy.vacuum_pages)
            used = _used_bytes(conn)
        bytes_after = _used_bytes(conn)
    return RetentionReport(
        tracklets_deleted=totals[0], clips_deleted=totals[1], decisions_deleted=totals[2],
        identities_deleted=len(identity_ids), deleted_identity_ids=tuple(identity_ids),
        bytes_before=bytes_before, bytes_after=bytes_after, pages_reclaimed=pages,
        reclaimable=reclaimable, within_budget=within, batches=writes.count,
        longest_write_s=writes.longest, seconds=time.perf_counter() - started)


def convert_to_incremental(repo: Repository) -> None:
    """Switch a file created without incremental auto-vacuum to it, so retention can shrink it.

    A one-time long operation: VACUUM rewrites the whole file (needing as much free disk
    again) and holds the write lock throughout, so run it with the watcher stopped; readers
    keep working. A file that already has it is left alone.
    """
    with _raw_connection(repo) as conn:
        if _pragma(conn, "auto_vacuum") == AUTO_VACUUM_INCREMENTAL:
            return
        conn.execute("PRAGMA auto_vacuum = INCREMENTAL")
        conn.execute("VACUUM")
        if _pragma(conn, "auto_vacuum") != AUTO_VACUUM_INCREMENTAL:
            raise StorageError(f"{repo.url}: VACUUM did not switch auto_vacuum to INCREMENTAL")
