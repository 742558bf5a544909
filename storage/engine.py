"""Database URLs and engines.

SQLite is the default store. The watcher is its one writer and the dashboard reads it at the
same time, so every SQLite connection is set up for that:

* WAL journal: readers see the last committed snapshot and never block the writer (nor it them).
* `synchronous=NORMAL`: in WAL mode a commit survives a process crash (kill -9); only a power
  loss can drop the last few commits, never corrupt the file.
* `busy_timeout`: short write transactions from a second writer (e.g. a dashboard merge) wait
  instead of failing with "database is locked".
* The writer starts every transaction with `BEGIN IMMEDIATE`, taking the write lock up front,
  so a read-then-write transaction can never fail half-way on a lock upgrade.
* Read-only engines open the file with the `mode=ro` URI: SQLite itself refuses writes, so a
  bug in a reader cannot damage the database, and `query_only` is set as well.

PostgreSQL (`postgresql+psycopg://user@host/db`) holds one site's data for several watchers.
None of the above applies there (the server has its own concurrency control); its read-only
engines open every transaction read-only (`default_transaction_read_only`), so the server
itself refuses a reader's write, and connections time out after `CONNECT_TIMEOUT_S` instead of
hanging on a server that is down.
"""
from __future__ import annotations

import os
import sqlite3
from pathlib import Path

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import ArgumentError, NoSuchModuleError
from sqlalchemy.pool import QueuePool

from .errors import StorageError

BUSY_TIMEOUT_S = 10.0
WAL_SIZE_LIMIT = 64 * 2**20
CONNECT_TIMEOUT_S = 10


def display_url(url: URL | str) -> str:
    """The URL as text with any password hidden, for messages."""
    if isinstance(url, str):
        try:
            url = make_url(url)
        except ArgumentError:
            return url
    return url.render_as_string(hide_password=True)


def sqlite_path(url: URL) -> Path | None:
    """The database file of a SQLite URL (None for other dialects and in-memory SQLite)."""
    if url.get_backend_name() != "sqlite":
        return None
    return Path(url.database).expanduser() if url.database else None


def validate_database_url(url: str, *, readonly: bool = False) -> str | None:
    """A message describing why `url` cannot be opened, or None; creates nothing."""
    try:
        parsed = make_url(url)
    except ArgumentError as exc:
        return f"invalid database URL {url!r}: {exc}"
    shown = display_url(parsed)
    try:
        dialect = parsed.get_dialect()
        dialect.import_dbapi()
    except NoSuchModuleError:
        return f"database URL {shown!r}: unknown database dialect {parsed.drivername!r}"
    except ImportError as exc:
        return f"database URL {shown!r}: its driver is not installed ({exc})"
    if parsed.get_backend_name() == "postgresql" and not parsed.database:
        return (f"database URL {shown!r}: name the database, e.g. "
                "postgresql+psycopg://user@host:5432/keyreid")
    if parsed.get_backend_name() != "sqlite":
        return None
    if parsed.database in (None, "", ":memory:") or parsed.database.startswith("file:"):
        return (
            f"database URL {shown!r}: give a SQLite file path such as sqlite:///keyreid.db "
            "(in-memory and URI forms are not supported: other processes could not share them)"
        )
    path = Path(parsed.database).expanduser()
    if path.exists():
        if not path.is_file():
            return f"database URL {shown!r}: {path} is not a file"
        if not os.access(path, os.R_OK if readonly else os.R_OK | os.W_OK):
            mode = "readable" if readonly else "readable and writable"
            return f"database URL {shown!r}: {path} is not {mode}"
        return None
    if readonly:
        return f"database URL {shown!r}: {path} does not exist (nothing has been recorded yet?)"
    parent = path.resolve().parent
    if not parent.is_dir():
        return f"database URL {shown!r}: folder {parent} does not exist"
    if not os.access(parent, os.W_OK | os.X_OK):
        return f"database URL {shown!r}: folder {parent} is not writable"
    return None


def _install_sqlite_listeners(engine: Engine, *, readonly: bool) -> None:
    """Apply the connection pragmas and our own transaction control (see module docstring)."""
    begin = "BEGIN" if readonly else "BEGIN IMMEDIATE"

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection, _record) -> None:
        # Let SQLAlchemy's "begin" event emit BEGIN itself instead of pysqlite's implicit one,
        # so DDL is transactional and the writer's BEGIN IMMEDIATE is honoured.
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        try:
            cursor.execute(f"PRAGMA busy_timeout = {int(BUSY_TIMEOUT_S * 1000)}")
            if readonly:
                cursor.execute("PRAGMA query_only = ON")
            else:
                # Only takes effect on a file without tables (so before the first CREATE
                # TABLE); lets retention give freed pages back (storage/retention.py).
                cursor.execute("PRAGMA auto_vacuum = INCREMENTAL")
                cursor.execute("PRAGMA journal_mode = WAL")
                cursor.execute("PRAGMA synchronous = NORMAL")
                cursor.execute("PRAGMA foreign_keys = ON")
                # After a checkpoint the WAL file is truncated to this size, so a big clean-up
                # (retention) cannot leave a WAL as large as what it deleted.
                cursor.execute(f"PRAGMA journal_size_limit = {WAL_SIZE_LIMIT}")
        finally:
            cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn) -> None:
        conn.exec_driver_sql(begin)


def _server_engine(url: URL, *, readonly: bool) -> Engine:
    """A client/server database's engine (PostgreSQL): stale pooled connections are replaced
    (`pool_pre_ping`, e.g. after a server restart), connecting gives up after a timeout, and a
    read-only engine's transactions are read-only on the server."""
    connect_args: dict = {}
    if url.get_backend_name() == "postgresql":
        connect_args["connect_timeout"] = CONNECT_TIMEOUT_S
        if readonly:
            connect_args["options"] = "-c default_transaction_read_only=on"
    return create_engine(url, pool_pre_ping=True, connect_args=connect_args)


def create_storage_engine(url: str, *, readonly: bool) -> Engine:
    """An engine for `url` set up as described above; raises StorageError on a bad URL."""
    problem = validate_database_url(url, readonly=readonly)
    if problem:
        raise StorageError(problem)
    parsed = make_url(url)
    path = sqlite_path(parsed)
    if path is None:
        return _server_engine(parsed, readonly=readonly)
    if readonly:
        uri = f"{path.resolve().as_uri()}?mode=ro"

        def connect() -> sqlite3.Connection:
            return sqlite3.connect(uri, uri=True, timeout=BUSY_TIMEOUT_S, check_same_thread=False)

        engine = create_engine("sqlite://", creator=connect, poolclass=QueuePool)
    else:
        engine = create_engine(parsed, connect_args={"timeout": BUSY_TIMEOUT_S})
    _install_sqlite_listeners(engine, readonly=readonly)
    return engine
