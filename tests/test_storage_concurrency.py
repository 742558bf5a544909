"""One writer, concurrent readers, and crash safety, with real subprocesses."""
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


def test_kill_9_mid_write_loses_nothing_committed(tmp_path):
    path = tmp_path / "k.db"
    url = f"sqlite:///{path}"
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
