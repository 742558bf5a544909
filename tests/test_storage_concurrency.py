"""One writer per SQLite file, several per PostgreSQL site (one linker), concurrent readers,
and crash safety, with real subprocesses."""
from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from storage import StorageError, WriterLockedError, open_repository

ROOT = Path(__file__).resolve().parents[1]


def _spawn(code: str, *args: str) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.Popen([sys.executable, "-c", textwrap.dedent(code), *args], env=env,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def _expect_line(proc: subprocess.Popen, want: str) -> None:
    line = proc.stdout.readline().strip()
    assert line == want, f"child said {line!r}; stderr: {proc.stderr.read() if not line else ''}"


HOLD_LOCK = """
import sys
from storage import open_repository
repo = open_repository(sys.argv[1])
repo.acquire_writer("test-holder")
print("locked", flush=True)
sys.stdin.readline()
"""


@pytest.mark.sqlite_only(reason="the single-writer file lock (PostgreSQL takes several writers: below)")
def test_second_writer_is_refused_while_first_lives(tmp_path):
    url = f"sqlite:///{tmp_path / 'k.db'}"
    holder = _spawn(HOLD_LOCK, url)
    try:
        _expect_line(holder, "locked")
        with open_repository(url) as repo:
            with pytest.raises(WriterLockedError) as err:
                repo.acquire_writer("second")
            message = str(err.value)
            assert "test-holder" in message and f"pid {holder.pid}" in message
            assert str(tmp_path / "k.db") in message
    finally:
        holder.kill()
        holder.wait()
    # the kernel released the lock with the process (kill -9)
    with open_repository(url) as repo:
        repo.acquire_writer("after")
        assert repo.holds_writer_lock
        repo.release_writer()
        assert not repo.holds_writer_lock


@pytest.mark.sqlite_only(reason="the single-writer file lock")
def test_writer_lock_within_one_process_and_release_on_close(tmp_path):
    url = f"sqlite:///{tmp_path / 'k.db'}"
    first = open_repository(url)
    first.acquire_writer("first")
    with open_repository(url) as second:
        with pytest.raises(WriterLockedError, match="held by first"):
            second.acquire_writer("second")
        first.close()
        second.acquire_writer("second")


HOLD_WRITE_TRANSACTION = """
import sqlite3, sys
con = sqlite3.connect(sys.argv[1], isolation_level=None)
con.execute("BEGIN IMMEDIATE")
con.execute("INSERT INTO identities (created_at, label) VALUES ('2024-01-01', 'pending')")
print("writing", flush=True)
sys.stdin.readline()
con.execute("COMMIT")
print("committed", flush=True)
sys.stdin.readline()
"""


@pytest.mark.sqlite_only(reason="SQLite's WAL snapshot beside a raw sqlite3 writer")
def test_reader_reads_while_another_process_holds_a_write_transaction(tmp_path):
    path = tmp_path / "k.db"
    with open_repository(f"sqlite:///{path}") as writer:
        writer.create_identity(label="committed")
    writer_proc = _spawn(HOLD_WRITE_TRANSACTION, str(path))
    try:
        _expect_line(writer_proc, "writing")
        with open_repository(f"sqlite:///{path}", readonly=True) as reader:
            started = time.monotonic()
            labels = [i.label for i in reader.list_identities()]
            assert time.monotonic() - started < 2.0  # not waiting on the busy timeout
            assert labels == ["committed"]  # the open transaction is invisible
            assert reader.stats().identities == 1
            writer_proc.stdin.write("\n")
            writer_proc.stdin.flush()
            _expect_line(writer_proc, "committed")
            assert [i.label for i in reader.list_identities()] == ["committed", "pending"]
    finally:
        writer_proc.kill()
        writer_proc.wait()


@pytest.mark.sqlite_only(reason="SQLite's WAL snapshot beside a raw sqlite3 reader")
def test_writer_is_not_blocked_by_an_open_read_transaction(tmp_path):
    path = tmp_path / "k.db"
    with open_repository(f"sqlite:///{path}") as writer:
        writer.upsert_camera("a")
        reader = sqlite3.connect(path, isolation_level=None)
        reader.execute("BEGIN")
        assert reader.execute("SELECT count(*) FROM cameras").fetchone() == (1,)
        started = time.monotonic()
        writer.upsert_camera("b")
        writer.create_identity()
        assert time.monotonic() - started < 2.0
        assert reader.execute("SELECT count(*) FROM cameras").fetchone() == (1,)  # snapshot
        reader.execute("COMMIT")
        assert reader.execute("SELECT count(*) FROM cameras").fetchone() == (2,)
        reader.close()


WRITE_LOOP = """
import sys
import numpy as np
from storage import NewClip, open_repository
repo = open_repository(sys.argv[1])
repo.acquire_writer("crash-test")
run = repo.start_run({"test": True})
repo.upsert_camera("cam")
tracklet = repo.add_tracklet(run, "cam", 1, 0, 0.0)
rng = np.random.default_rng(0)
i = 0
while True:
    batch = [NewClip(tracklet, [i, i + 1, i + 2, i + 3], i / 10, (i + 3) / 10,
                     rng.standard_normal(64).astype(np.float32), "m") for _ in range(4)]
    ids = repo.add_clips(batch)
    repo.update_tracklet(tracklet, last_frame=i + 3, last_time=(i + 3) / 10)
    print(" ".join(map(str, ids)), flush=True)
    i += 4
"""


def test_kill_9_mid_write_loses_nothing_committed(db_url):
    url = db_url
    proc = _spawn(WRITE_LOOP, url)
    reported: list[int] = []
    try:
        while len(reported) < 200:
            line = proc.stdout.readline()
            assert line, f"writer died early: {proc.stderr.read()}"
            reported += [int(x) for x in line.split()]
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    with open_repository(url) as repo:
        if repo.is_sqlite:
            assert repo.integrity_check() == ["ok"]
        (tracklet,) = repo.list_tracklets()
        stored = {c.id for c in repo.tracklet_clips(tracklet.id)}
        assert set(reported) <= stored
        repo.acquire_writer("restart")  # the dead writer's lock is gone
        report = repo.repair(repo.start_run({}))
        assert (report.runs_aborted, report.tracklets_closed) == (1, 1)
        runs = repo.list_runs()
        assert runs[0].status.startswith("aborted") and runs[1].status == "running"
        assert repo.list_tracklets()[0].finished and "repaired" in repo.list_tracklets()[0].end_reason


def test_in_memory_database_is_refused():
    """Other processes (the dashboard) could never see it, and it could not be locked."""
    with pytest.raises(StorageError, match="in-memory"):
        open_repository("sqlite:///:memory:")


# -- PostgreSQL: several watchers of one site ---------------------------------------------------
SITE_WRITER = """
import sys
import numpy as np
from storage import NewClip, open_repository
url, camera, count = sys.argv[1], sys.argv[2], int(sys.argv[3])
repo = open_repository(url)
repo.acquire_writer("site-test")
run = repo.start_run({"camera": camera})
repo.upsert_camera(camera)
print("linker" if repo.claim_linker() else "stores only", flush=True)
rng = np.random.default_rng(0)
for track in range(count):
    tracklet = repo.add_tracklet(run, camera, track, 0, float(track))
    ids = repo.add_clips([NewClip(tracklet, [0, 1, 2, 3], 0.0, 1.0,
                                  rng.standard_normal(64).astype(np.float32), "m")
                          for _ in range(3)])
    repo.update_tracklet(tracklet, last_frame=3, finished=True)
    print(tracklet, *ids, flush=True)
print("done", flush=True)
sys.stdin.readline()
"""


def _site_writer(url: str, camera: str, count: int) -> subprocess.Popen:
    return _spawn(SITE_WRITER, url, camera, str(count))


def _lines_until_done(proc: subprocess.Popen) -> list[list[int]]:
    rows = []
    for line in proc.stdout:
        if line.strip() == "done":
            return rows
        rows.append([int(x) for x in line.split()])
    raise AssertionError(f"writer died: {proc.stderr.read()}")


def test_several_writers_share_a_postgresql_site_and_exactly_one_links(postgres):
    """Three processes write one database at once (a fresh one: they also create its schema
    together, under the migration lock): every tracklet and clip each reported is stored,
    exactly one of them holds the linker lock, and when it exits another can take it."""
    url = postgres.database()
    writers = [_site_writer(url, f"cam-{i}", 40) for i in range(3)]
    try:
        roles = [proc.stdout.readline().strip() for proc in writers]
        assert sorted(roles) == ["linker", "stores only", "stores only"], \
            [proc.stderr.read() for proc in writers if proc.poll() is not None]
        reported = [_lines_until_done(proc) for proc in writers]
        with open_repository(url) as repo:
            assert repo.stats().tracklets == 120 and repo.stats().clips == 360
            for i, rows in enumerate(reported):
                stored = {t.id for t in repo.list_tracklets(camera_ids=[f"cam-{i}"])}
                assert stored == {row[0] for row in rows}
                for tracklet, *clips in rows:
                    assert [c.id for c in repo.tracklet_clips(tracklet)] == clips
            repo.acquire_writer("observer")
            assert not repo.claim_linker()  # the linker still lives
            assert repo.other_writers_alive(run_id=0)
            linker = writers[roles.index("linker")]
            linker.kill()
            linker.wait()
            deadline = time.monotonic() + 10
            while not repo.claim_linker():  # the server drops the dead session's locks
                assert time.monotonic() < deadline, "the linker lock was not released"
                time.sleep(0.1)
            assert repo.claim_linker()  # held: asking again keeps it
    finally:
        for proc in writers:
            proc.kill()
            proc.wait()


def test_repair_on_postgresql_leaves_live_watchers_alone(postgres):
    url = postgres.database()
    live = _site_writer(url, "live", 1)
    try:
        assert live.stdout.readline().strip() == "linker"
        _lines_until_done(live)
        with open_repository(url) as repo:
            live_run = repo.list_runs()[0].id
            repo.upsert_camera("ghost")
            dead_run = repo.start_run({})  # no writer lock: nobody holds this run alive
            repo.add_tracklet(dead_run, "ghost", 1, 0, 0.0)
            repo.add_tracklet(live_run, "live", 99, 0, 0.0)  # open, but its watcher lives
            repo.acquire_writer("restarted")
            report = repo.repair(repo.start_run({}))
            assert (report.runs_aborted, report.tracklets_closed) == (1, 1)
            runs = {r.id: r.status for r in repo.list_runs()}
            assert runs[live_run] == "running" and runs[dead_run].startswith("aborted")
            assert repo.list_tracklets(run_id=dead_run)[0].finished
            assert [t.finished for t in repo.list_tracklets(camera_ids=["live"])
                    if t.track_id == 99] == [False]
    finally:
        live.kill()
        live.wait()


def test_an_unreachable_server_is_named_and_its_password_hidden(postgres):
    url = f"postgresql+psycopg://keyreid:s3cret@127.0.0.1:{_closed_port()}/keyreid"
    with pytest.raises(StorageError) as err:
        open_repository(url)
    message = str(err.value)
    assert "s3cret" not in message and "***" in message
    assert "cannot open database" in message and "refused" in message.lower()


def _closed_port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_a_link_waits_for_a_merge_in_progress_on_postgresql_and_follows_it(postgres):
    """A linker's assignment to an identity an operator is merging away right now waits for
    that merge and lands in the identity it was merged into (never in the merged-away one)."""
    import threading

    import psycopg

    url = postgres.database()
    with open_repository(url) as repo:
        run = repo.start_run({})
        repo.upsert_camera("a")
        first, second, third = (repo.add_tracklet(run, "a", n, 0, 10.0 * n) for n in (1, 2, 3))
        keep, merged = repo.open_identity(first), repo.open_identity(second)
        operator = psycopg.connect(f"host=127.0.0.1 port={postgres.port} user={postgres.USER} "
                                   f"dbname={url.rsplit('/', 1)[1]}")
        try:  # the merge's transaction, open: the identity row is locked and changed
            operator.execute("UPDATE tracklets SET identity_id = %s WHERE identity_id = %s",
                             (keep, merged))
            operator.execute("UPDATE identities SET merged_into = %s WHERE id = %s",
                             (keep, merged))
            result = []
            linker = threading.Thread(target=lambda: result.append(
                repo.assign_identity(third, merged, "linked", 0.1, follow_merges=True)))
            linker.start()
            linker.join(timeout=1.0)
            assert linker.is_alive(), "the assignment did not wait for the merge"
            operator.commit()
            linker.join(timeout=10)
        finally:
            operator.close()
        assert result == [keep]
        assert repo.get_tracklet(third).identity_id == keep
        assert repo.get_identity(merged).member_count == 0


def test_a_lost_lock_session_is_reconnected_with_its_run_locks(postgres):
    """The server ends a watcher's lock session (idle timeout, restart, an administrator):
    `keep_alive` reconnects, the run is alive again, and the linker lock can be claimed again."""
    url = postgres.database()
    with open_repository(url) as repo:
        repo.acquire_writer("watcher")
        run = repo.start_run({})
        assert repo.claim_linker()
        postgres.sql("SELECT pg_terminate_backend(pid) FROM pg_locks "
                     "WHERE locktype = 'advisory' AND pid <> pg_backend_pid()",
                     database=url.rsplit("/", 1)[1])
        with open_repository(url) as observer:
            observer.acquire_writer("observer")
            assert not observer.other_writers_alive(run_id=0)  # the session and its locks gone
            repo.keep_alive()
            assert observer.other_writers_alive(run_id=0) and run in observer._site.alive_runs()
        assert repo.claim_linker()
