"""The writer locks: one writer per SQLite file, one linker per PostgreSQL site.

Exactly one watcher may write a database. SQLite would serialise two writers, but two watchers
would interleave runs, duplicate identities and fight over camera status. The lock is an
exclusive `fcntl.flock` on `<database>.lock`: the kernel drops it when the holding process
exits for any reason, kill -9 included, so a crash never leaves a stale lock to clean up by
hand. The file's content (owner, pid, host, time) only serves the error message; the lock file
is never deleted, because deleting it could let two processes lock two different inodes.

A PostgreSQL database is one site's store for several watchers, each writing its own cameras.
There `SiteSession` holds PostgreSQL session advisory locks on one dedicated connection kept
open for the watcher's life; the server drops them when that connection ends (process exit,
kill -9, a lost network), so nothing stale is left either:
- (SITE_KEY, LINKER) — exactly one watcher of the site links identities; another takes it over
  when the holder stops;
- (RUN_KEY, run id) — the run is alive: repair never closes a live watcher's open tracklets.
The schema is migrated under the transaction-level lock (SITE_KEY, MIGRATE), so two watchers
starting together never migrate at once.
"""
from __future__ import annotations

import fcntl
import json
import os
import socket
import time
from pathlib import Path

from sqlalchemy import Connection, Engine, text
from sqlalchemy.exc import SQLAlchemyError

from .errors import StorageUnavailableError, WriterLockedError

SITE_KEY = 0x4B524944  # "KRID": our advisory locks' first key, so other programs' stay apart
RUN_KEY = SITE_KEY + 1
MIGRATE, LINKER = 1, 2
# The server ends a lock session idle this long (a watcher pings it every second or two), so
# the locks of a watcher whose machine died are released without waiting for TCP keepalive.
IDLE_SESSION_TIMEOUT = "120s"


class WriterLock:
    """An exclusive, non-blocking OS lock on one file, released by `release()` or process exit."""

    def __init__(self, path: Path, owner: str) -> None:
        self.path = path
        self.owner = owner
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self) -> None:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _describe_holder(fd)
            os.close(fd)
            raise WriterLockedError(
                f"{self.path.with_suffix('')} already has a writer ({holder}); "
                "stop that process first (only one keyreid-watch may write a database)"
            ) from None
        info = {
            "owner": self.owner,
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "since": time.strftime("%Y-%m-%d %H:%M:%S"),
        }
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(info).encode(), 0)
        os.fsync(fd)
        self._fd = fd

    def release(self) -> None:
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def _describe_holder(fd: int) -> str:
    try:
        info = json.loads(os.pread(fd, 4096, 0).decode() or "{}")
    except (OSError, ValueError):
        info = {}
    if not info:
        return "holder unknown"
    return (
        f"held by {info.get('owner', '?')!s}, pid {info.get('pid', '?')} on host "
        f"{info.get('host', '?')} since {info.get('since', '?')}"
    )


def lock_for_migration(conn: Connection) -> None:
    """Wait for the site's migration lock inside `conn`'s transaction (released at its end)."""
    conn.execute(text("SELECT pg_advisory_xact_lock(:a, :b)"), {"a": SITE_KEY, "b": MIGRATE})


def alive_runs(conn: Connection) -> set[int]:
    """Ids of runs whose watcher holds its run lock now (PostgreSQL), from `pg_locks`."""
    rows = conn.execute(text(
        "SELECT objid FROM pg_locks WHERE locktype = 'advisory' AND classid = :a "
        "AND objsubid = 2 AND granted"), {"a": RUN_KEY})
    return {int(objid) for (objid,) in rows}


class SiteSession:
    """A watcher's dedicated PostgreSQL connection and the advisory locks it holds (see the
    module notes). If the connection is lost, its locks are gone with it: `ensure` reconnects
    and takes the run locks again, and the linker lock must be claimed again."""

    def __init__(self, engine: Engine, shown_url: str) -> None:
        self._engine = engine
        self._shown = shown_url
        self._conn: Connection | None = None
        self._runs: set[int] = set()
        self.linker = False

    def _try(self, conn: Connection, a: int, b: int) -> bool:
        """Take the session lock (a, b) if it is free (or already ours); never waits."""
        return bool(conn.execute(text("SELECT pg_try_advisory_lock(:a, :b)"),
                                 {"a": a, "b": b}).scalar())

    def ensure(self) -> Connection:
        """The live connection, reconnecting (run locks re-taken) when it was lost."""
        try:
            if self._conn is not None:
                self._conn.execute(text("SELECT 1"))
                return self._conn
        except SQLAlchemyError:
            self._conn = None
            self.linker = False
        try:
            conn = self._engine.connect().execution_options(isolation_level="AUTOCOMMIT")
        except SQLAlchemyError as exc:
            raise StorageUnavailableError(
                f"{self._shown}: the watcher's lock connection failed: {exc.orig or exc}") from exc
        try:
            conn.execute(text("SELECT set_config('idle_session_timeout', :t, false)"),
                         {"t": IDLE_SESSION_TIMEOUT})
            for run_id in self._runs:
                self._try(conn, RUN_KEY, run_id)
        except SQLAlchemyError as exc:
            conn.close()
            raise StorageUnavailableError(
                f"{self._shown}: the watcher's lock connection failed: {exc.orig or exc}") from exc
        self._conn = conn
        return conn

    def hold_run(self, run_id: int) -> None:
        """Mark `run_id` alive for as long as this session lives."""
        self._runs.add(run_id)
        self._try(self.ensure(), RUN_KEY, run_id)

    def alive_runs(self) -> set[int]:
        """`alive_runs` seen from this session (StorageUnavailableError if the server is gone)."""
        try:
            return alive_runs(self.ensure())
        except SQLAlchemyError as exc:
            raise StorageUnavailableError(
                f"{self._shown}: cannot see which watchers are alive: {exc}") from exc

    def claim_linker(self) -> bool:
        """Become the site's one linker if nobody is; True while this session is it."""
        conn = self.ensure()
        if not self.linker:
            try:
                self.linker = self._try(conn, SITE_KEY, LINKER)
            except SQLAlchemyError as exc:
                raise StorageUnavailableError(
                    f"{self._shown}: cannot take the linker lock: {exc}") from exc
        return self.linker

    def close(self) -> None:
        """End the connection: every lock it held is released."""
        if self._conn is not None:
            try:
                self._conn.close()
            except SQLAlchemyError:
                pass  # the connection is gone already, and its locks with it
            self._conn = None
        self.linker = False
