"""Schema creation, versioning, migration and URL validation."""
from __future__ import annotations

import hashlib
import sqlite3

import pytest
from sqlalchemy import text

import storage.repository as repository_module
from storage import (
    SCHEMA_VERSION,
    SchemaTooNewError,
    StorageError,
    open_repository,
    validate_database_url,
)
from storage.schema import Migration


def _digest(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _set_version(path, version: int) -> None:
    con = sqlite3.connect(path)
    con.execute("UPDATE schema_meta SET value = ? WHERE key = 'schema_version'", (str(version),))
    con.commit()
    con.close()


V2_COLUMNS = {"cameras": ("status_reason", "reconnects", "restarts", "last_frame_wall_time"),
              "tracklets": ("first_wall_time", "last_wall_time", "end_reason"),
              "clips": ("start_wall_time", "end_wall_time"),
              "link_decisions": ("margin", "false_link", "reason"), "runs": ("calibration",)}


def _as_v2(path) -> None:
    """Turn a database into one as release 2 wrote it, rows kept: decision kinds without the
    operator's "confirmed" and "rejected" (the CHECK constraint as v2 created it), version 2."""
    con = sqlite3.connect(path)
    table_sql, = con.execute("SELECT sql FROM sqlite_master WHERE name = 'link_decisions'").fetchone()
    index_sql = [sql for (sql,) in con.execute(
        "SELECT sql FROM sqlite_master WHERE type = 'index' AND tbl_name = 'link_decisions' "
        "AND sql IS NOT NULL")]
    v2_sql = table_sql.replace(", 'confirmed', 'rejected'", "")
    assert v2_sql != table_sql
    con.execute("ALTER TABLE link_decisions RENAME TO current_decisions")
    con.execute(v2_sql)
    con.execute("INSERT INTO link_decisions SELECT * FROM current_decisions")
    con.execute("DROP TABLE current_decisions")
    for sql in index_sql:
        con.execute(sql)
    con.commit()
    con.close()
    _set_version(path, 2)


def _v2_database(path) -> None:
    open_repository(f"sqlite:///{path}").close()
    _as_v2(path)


def _v1_database(path) -> None:
    """A database as release 1 wrote it: release 2's tables without the v2 columns, version 1."""
    _v2_database(path)
    con = sqlite3.connect(path)
    for index in ("ix_tracklets_created", "ix_identities_merged_into",
                  "ix_link_decisions_candidate"):
        con.execute(f"DROP INDEX {index}")
    for table, columns in V2_COLUMNS.items():
        for column in columns:
            con.execute(f"ALTER TABLE {table} DROP COLUMN {column}")
    con.commit()
    con.close()
    _set_version(path, 1)


def test_fresh_database_gets_current_schema(tmp_path):
    with open_repository(f"sqlite:///{tmp_path / 'k.db'}") as repo:
        assert repo.schema_version == SCHEMA_VERSION
        assert repo.integrity_check() == ["ok"]
    con = sqlite3.connect(tmp_path / "k.db")
    tables = {row[0] for row in con.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    assert {"cameras", "runs", "tracklets", "clips", "identities", "link_decisions",
            "schema_meta"} <= tables
    assert con.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    con.close()
    # reopening an up-to-date database changes nothing
    with open_repository(f"sqlite:///{tmp_path / 'k.db'}") as repo:
        assert repo.stats().cameras == 0


def test_newer_schema_is_refused_by_writer_and_reader_and_left_untouched(tmp_path):
    path = tmp_path / "new.db"
    with open_repository(f"sqlite:///{path}") as repo:
        repo.upsert_camera("a")
    _set_version(path, SCHEMA_VERSION + 1)
    before = _digest(path)
    for readonly in (False, True):
        with pytest.raises(SchemaTooNewError) as err:
            open_repository(f"sqlite:///{path}", readonly=readonly)
        message = str(err.value)
        assert str(path) in message
        assert f"schema version {SCHEMA_VERSION + 1}, this program supports {SCHEMA_VERSION}" \
            in message
    assert _digest(path) == before


def test_v1_database_is_migrated(tmp_path):
    """The real v2 (and v3) migrations: wall-clock and status columns added, data kept, clip
    thumbnails (never shown) freed; a reader may not migrate, it asks for the writer."""
    path = tmp_path / "old.db"
    _v1_database(path)
    con = sqlite3.connect(path)
    con.execute("INSERT INTO cameras (id, name, source, frames_processed, created_at) "
                "VALUES ('a', 'Gate', '/v.avi', 3, '2026-01-01 00:00:00')")
    con.commit()
    con.close()
    with pytest.raises(StorageError, match=f"schema version 1, this program needs {SCHEMA_VERSION}"):
        open_repository(f"sqlite:///{path}", readonly=True)
    with open_repository(f"sqlite:///{path}") as repo:
        assert repo.schema_version == SCHEMA_VERSION
        (camera,) = repo.list_cameras()
        assert (camera.name, camera.frames_processed, camera.restarts) == ("Gate", 3, 0)
        run = repo.start_run({})
        tracklet = repo.add_tracklet(run, "a", 1, 0, 0.0, first_wall_time=1.8e9)
        assert repo.get_tracklet(tracklet).first_wall_time == 1.8e9
    con = sqlite3.connect(path)
    for table, columns in V2_COLUMNS.items():
        assert set(columns) <= {row[1] for row in con.execute(f"PRAGMA table_info({table})")}
    assert con.execute("SELECT value FROM schema_meta").fetchone() == (str(SCHEMA_VERSION),)
    con.close()


def test_v2_database_is_migrated_to_v3(tmp_path):
    """The v3 migration rebuilds the decisions table with the operator's kinds: every decision
    and index is kept, and a rejection (refused by v2's CHECK) can be stored."""
    path = tmp_path / "v2.db"
    with open_repository(f"sqlite:///{path}") as repo:
        run = repo.start_run({})
        repo.upsert_camera("a")
        first = repo.add_tracklet(run, "a", 1, 0, 0.0)
        second = repo.add_tracklet(run, "a", 2, 0, 0.0)
        identity = repo.open_identity(first, evidence={"margin": 0.2, "reason": "no candidates"})
    _as_v2(path)
    con = sqlite3.connect(path)
    indexes_before = {name for (name,) in con.execute(
        "SELECT name FROM sqlite_master WHERE type = 'index' AND tbl_name = 'link_decisions'")}
    with pytest.raises(sqlite3.IntegrityError, match="ck_link_kind"):
        con.execute("INSERT INTO link_decisions (tracklet_id, identity_id, kind, created_at) "
                    "VALUES (?, ?, 'rejected', '2026-01-01')", (second, identity))
    con.close()
    with open_repository(f"sqlite:///{path}") as repo:
        assert repo.schema_version == 3
        (decision,) = repo.link_decisions()
        assert (decision.tracklet_id, decision.kind, decision.margin, decision.reason) == \
            (first, "new", 0.2, "no candidates")
        repo.reject_link(second, identity)
        assert repo.rejected_identities(second) == {identity}
    con = sqlite3.connect(path)
    assert {name for (name,) in con.execute(
        "SELECT name FROM sqlite_master WHERE type = 'index' AND tbl_name = 'link_decisions'"
    )} == indexes_before
    assert not con.execute("SELECT name FROM sqlite_master WHERE name = 'link_decisions_v2'"
                           ).fetchall()
    assert con.execute("PRAGMA integrity_check").fetchone() == ("ok",)
    con.close()


def test_failed_migration_rolls_back(tmp_path, monkeypatch):
    path = tmp_path / "old.db"
    _v1_database(path)

    def half_done(conn) -> None:
        conn.execute(text("ALTER TABLE cameras ADD COLUMN location TEXT"))
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(repository_module, "MIGRATIONS",
                        (Migration(2, "broken", half_done), Migration(3, "fine", lambda c: None)))
    with pytest.raises(RuntimeError, match="disk on fire"):
        open_repository(f"sqlite:///{path}")
    con = sqlite3.connect(path)
    columns = [row[1] for row in con.execute("PRAGMA table_info(cameras)")]
    assert "location" not in columns
    assert con.execute("SELECT value FROM schema_meta").fetchone() == ("1",)
    con.close()


def test_missing_migration_step_is_reported(tmp_path, monkeypatch):
    path = tmp_path / "old.db"
    _v1_database(path)
    monkeypatch.setattr(repository_module, "SCHEMA_VERSION", 3)
    monkeypatch.setattr(repository_module, "MIGRATIONS", (Migration(3, "x", lambda c: None),))
    with pytest.raises(StorageError, match="no complete migration path from schema version 1 to 3"):
        open_repository(f"sqlite:///{path}")


def test_foreign_and_corrupt_files_are_refused(tmp_path):
    foreign = tmp_path / "other.db"
    con = sqlite3.connect(foreign)
    con.execute("CREATE TABLE cameras (id TEXT)")  # a hand-made database without a version
    con.commit()
    con.close()
    with pytest.raises(StorageError, match=r"has tables \['cameras'\] but no keyreid schema"):
        open_repository(f"sqlite:///{foreign}")
    with pytest.raises(StorageError, match="no keyreid schema yet"):
        open_repository(f"sqlite:///{foreign}", readonly=True)
    junk = tmp_path / "junk.db"
    junk.write_bytes(b"this is not a database at all" * 100)
    for readonly in (False, True):
        with pytest.raises(StorageError, match="junk.db"):
            open_repository(f"sqlite:///{junk}", readonly=readonly)


@pytest.mark.parametrize("url, readonly, fragment", [
    ("nosuchdb://host/x", False, "unknown database dialect 'nosuchdb'"),
    ("not a url", False, "invalid database URL 'not a url'"),
    ("sqlite://", False, "in-memory"),
    ("sqlite:///{tmp}/missing/dir/k.db", False, "does not exist"),
    ("sqlite:///{tmp}/absent.db", True, "absent.db does not exist"),
    ("sqlite:///{tmp}", False, "is not a file"),
])
def test_bad_urls_are_reported_without_creating_anything(tmp_path, url, readonly, fragment):
    url = url.format(tmp=tmp_path)
    problem = validate_database_url(url, readonly=readonly)
    assert problem is not None and fragment in problem
    with pytest.raises(StorageError, match=fragment.replace("(", r"\(")):
        open_repository(url, readonly=readonly)
    assert list(tmp_path.iterdir()) == []


def test_valid_url_creates_nothing(tmp_path):
    assert validate_database_url(f"sqlite:///{tmp_path / 'k.db'}") is None
    assert list(tmp_path.iterdir()) == []


def test_storage_imports_neither_torch_nor_other_project_folders():
    import subprocess
    import sys
    from pathlib import Path

    code = ("import sys, storage, storage.bench; "
            "bad = [m for m in sys.modules if m.split('.')[0] in "
            "('torch', 'app', 'reid', 'tracking', 'training')]; print(bad)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parents[1])
    assert out.stdout.strip() == "[]"


# -- the same schema and migrations on PostgreSQL -----------------------------------------------
def _pg(url: str, *statements: str) -> None:
    """Run raw statements on a PostgreSQL database (what an older release left behind)."""
    from sqlalchemy import create_engine

    engine = create_engine(url)
    try:
        with engine.begin() as conn:
            for statement in statements:
                conn.exec_driver_sql(statement)
    finally:
        engine.dispose()


def _pg_set_version(url: str, version: int) -> None:
    _pg(url, f"UPDATE schema_meta SET value = '{version}' WHERE key = 'schema_version'")


def _pg_as_v2(url: str) -> None:
    _pg(url, "ALTER TABLE link_decisions DROP CONSTRAINT ck_link_kind",
        "ALTER TABLE link_decisions ADD CONSTRAINT ck_link_kind CHECK "
        "(kind IN ('new', 'linked', 'merged', 'split'))")
    _pg_set_version(url, 2)


def _pg_v1_database(url: str) -> None:
    open_repository(url).close()
    _pg_as_v2(url)
    _pg(url, *[f"DROP INDEX {index}" for index in ("ix_tracklets_created",
                                                   "ix_identities_merged_into",
                                                   "ix_link_decisions_candidate")],
        *[f"ALTER TABLE {table} DROP COLUMN {column}"
          for table, columns in V2_COLUMNS.items() for column in columns])
    _pg_set_version(url, 1)


def _pg_columns(url: str) -> dict[str, set[str]]:
    from sqlalchemy import create_engine, inspect

    engine = create_engine(url)
    try:
        inspector = inspect(engine)
        return {table: {c["name"] for c in inspector.get_columns(table)}
                for table in inspector.get_table_names()}
    finally:
        engine.dispose()


def test_fresh_postgresql_database_gets_current_schema_with_bytea_descriptors(postgres):
    from sqlalchemy import create_engine, inspect

    url = postgres.database()
    with open_repository(url) as repo:
        assert repo.schema_version == SCHEMA_VERSION and not repo.is_sqlite
    engine = create_engine(url)
    try:
        clips = {c["name"]: c["type"] for c in inspect(engine).get_columns("clips")}
        assert clips["descriptor"].__visit_name__.upper() == "BYTEA"
        with engine.connect() as conn:
            assert conn.exec_driver_sql("SELECT value FROM schema_meta").scalar() == \
                str(SCHEMA_VERSION)
    finally:
        engine.dispose()
    with open_repository(url, readonly=True) as reader:
        assert reader.stats().cameras == 0


def test_postgresql_v1_database_is_migrated_and_a_reader_never_migrates(postgres):
    url = postgres.database()
    _pg_v1_database(url)
    _pg(url, "INSERT INTO cameras (id, name, source, frames_processed, created_at) "
             "VALUES ('a', 'Gate', '/v.avi', 3, now())")
    with pytest.raises(StorageError, match=f"schema version 1, this program needs {SCHEMA_VERSION}"):
        open_repository(url, readonly=True)
    assert "status_reason" not in _pg_columns(url)["cameras"]  # the reader left it alone
    with open_repository(url) as repo:
        assert repo.schema_version == SCHEMA_VERSION
        (camera,) = repo.list_cameras()
        assert (camera.name, camera.frames_processed, camera.restarts) == ("Gate", 3, 0)
        run = repo.start_run({})
        first = repo.add_tracklet(run, "a", 1, 0, 0.0, first_wall_time=1.8e9)
        second = repo.add_tracklet(run, "a", 2, 0, 0.0)
        identity = repo.open_identity(first)
        repo.reject_link(second, identity)  # v3's kinds
        assert repo.get_tracklet(first).first_wall_time == 1.8e9
    columns = _pg_columns(url)
    for table, names in V2_COLUMNS.items():
        assert set(names) <= columns[table]


def test_postgresql_failed_migration_rolls_back_and_newer_schema_is_refused(postgres,
                                                                            monkeypatch):
    url = postgres.database()
    _pg_v1_database(url)

    def half_done(conn) -> None:
        conn.execute(text("ALTER TABLE cameras ADD COLUMN location TEXT"))
        raise RuntimeError("disk on fire")

    with monkeypatch.context() as patch:
        patch.setattr(repository_module, "MIGRATIONS",
                      (Migration(2, "broken", half_done), Migration(3, "fine", lambda c: None)))
        with pytest.raises(RuntimeError, match="disk on fire"):
            open_repository(url)
    assert "location" not in _pg_columns(url)["cameras"]
    open_repository(url).close()  # the real migrations
    _pg_set_version(url, SCHEMA_VERSION + 1)
    for readonly in (False, True):
        with pytest.raises(SchemaTooNewError, match=f"schema version {SCHEMA_VERSION + 1}"):
            open_repository(url, readonly=readonly)


def test_postgresql_foreign_database_and_missing_schema_are_refused(postgres):
    url = postgres.database()
    with pytest.raises(StorageError, match="no keyreid schema yet"):
        open_repository(url, readonly=True)
    _pg(url, "CREATE TABLE cameras (id TEXT)")
    with pytest.raises(StorageError, match=r"has tables \['cameras'\] but no keyreid schema"):
        open_repository(url)
    assert validate_database_url("postgresql+psycopg://u@127.0.0.1/") is not None
