"""Retention on real SQLite files: budgets hold, oldest first, the file shrinks, nothing breaks
for a writer and the dashboard working at the same time. The age limit and what it deletes
also on PostgreSQL (the size budget, measured on files, is SQLite's)."""
from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
import textwrap
import threading
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pytest

from app.dashboard.data import (
    DashboardError,
    activity_points,
    camera_rows,
    open_readonly,
    search_by_descriptor,
    search_by_tracklet,
    time_bounds,
)
from storage import (
    NewClip,
    ReadOnlyError,
    RetentionPolicy,
    StorageError,
    enforce_retention,
    open_repository,
)
from storage.retention import convert_to_incremental, used_bytes

ROOT = Path(__file__).resolve().parents[1]
DIM = 4800  # keyreid_vit_tiny's full descriptor, 9.6 KB as float16: fills pages faster than the watcher's compact 1,024-d
MODEL = "retention-test-model"
CLIPS_PER_TRACKLET = 4


def add_people(repo, run_id: int, count: int, *, first_track: int = 0, finished: bool = True,
               camera: str = "cam-a", seed: int = 0) -> list[int]:
    """`count` tracklets with realistic clips (descriptor, boxes, keypoints), oldest first."""
    rng = np.random.default_rng(seed)
    ids = []
    for i in range(count):
        track = first_track + i
        tid = repo.add_tracklet(run_id, camera, track, first_frame=track * 40,
                                first_time=track * 4.0, last_frame=track * 40 + 39,
                                last_time=track * 4.0 + 3.9, finished=finished)
        repo.add_clips([NewClip(tid, list(range(c * 10, c * 10 + 4)), track * 4.0 + c,
                                track * 4.0 + c + 0.9, rng.standard_normal(DIM).astype(np.float32),
                                MODEL, boxes=[[10, 20, 60, 140]] * 4,
                                keypoints=rng.random((4, 17, 3), dtype=np.float32))
                        for c in range(CLIPS_PER_TRACKLET)])
        ids.append(tid)
    return ids


def new_repo(where: Path | str):
    """A repository with a run and two cameras: a SQLite file at a path, or a database URL."""
    repo = open_repository(f"sqlite:///{where}" if isinstance(where, Path) else where)
    run = repo.start_run({"test": "retention"})
    repo.upsert_camera("cam-a", source="a.mp4")
    repo.upsert_camera("cam-b", source="b.mp4")
    return repo, run


def file_bytes(path: Path) -> int:
    """The database file's size once its WAL is checkpointed into it and truncated."""
    with sqlite3.connect(path) as con:
        busy, _, _ = con.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
    assert busy == 0, "checkpoint blocked"
    return path.stat().st_size


def assert_sound(path: Path) -> None:
    with sqlite3.connect(path) as con:
        assert con.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
        assert con.execute("PRAGMA foreign_key_check").fetchall() == []


def stored_ids(repo) -> list[int]:
    return sorted(t.id for t in repo.list_tracklets())


def tracklet_ids(path: Path) -> list[int]:
    with sqlite3.connect(path) as con:
        return [r[0] for r in con.execute("SELECT id FROM tracklets ORDER BY id")]


@pytest.mark.sqlite_only(reason="SQLite's incremental auto-vacuum")
def test_new_databases_reclaim_space_incrementally(tmp_path):
    repo, _ = new_repo(tmp_path / "k.db")
    repo.close()
    with sqlite3.connect(tmp_path / "k.db") as con:
        assert con.execute("PRAGMA auto_vacuum").fetchone()[0] == 2  # INCREMENTAL


@pytest.mark.sqlite_only(reason="a size budget is measured on SQLite files")
def test_size_budget_deletes_oldest_first_and_the_file_shrinks(tmp_path):
    path = tmp_path / "k.db"
    repo, run = new_repo(path)
    ids = add_people(repo, run, 150)
    decided = repo.open_identity(ids[0])  # a decision of a deleted tracklet goes with it
    before = used_bytes(repo)
    size_before = file_bytes(path)
    share = before / len(ids)
    budget = before // 2
    report = enforce_retention(repo, RetentionPolicy(max_age_days=None, max_bytes=budget,
                                                     batch_tracklets=25))
    after = used_bytes(repo)
    kept = tracklet_ids(path)
    assert report.within_budget and report.reclaimable
    assert after <= budget < after + 3 * share, "deleted far more than the budget asked for"
    assert report.bytes_before == before and report.bytes_after == after
    assert kept == ids[len(ids) - len(kept):], "not the oldest tracklets were deleted"
    assert report.tracklets_deleted == len(ids) - len(kept)
    assert report.clips_deleted == CLIPS_PER_TRACKLET * report.tracklets_deleted
    assert report.decisions_deleted == 1 and report.deleted_identity_ids == (decided,)
    assert repo.stats().clips == CLIPS_PER_TRACKLET * len(kept)
    assert report.batches > 1 and report.pages_reclaimed > 0
    size_after = file_bytes(path)
    assert size_after < size_before * 0.6, (size_before, size_after)
    assert size_after <= budget + 64 * 4096  # free pages given back, not kept in the file
    assert_sound(path)
    repo.close()


@pytest.mark.sqlite_only(reason="a size budget is measured on SQLite files")
def test_open_tracklets_are_kept_over_the_size_budget(tmp_path):
    path = tmp_path / "k.db"
    repo, run = new_repo(path)
    open_ids = add_people(repo, run, 20, finished=False)  # the oldest: still being extended
    done = add_people(repo, run, 20, first_track=20)
    report = enforce_retention(repo, RetentionPolicy(max_age_days=None, max_bytes=4096))
    assert not report.within_budget
    assert tracklet_ids(path) == open_ids
    assert report.tracklets_deleted == len(done)
    repo.close()


@pytest.mark.sqlite_only(reason="a size budget is measured on SQLite files")
def test_a_time_budget_spreads_the_work_over_calls(tmp_path):
    path = tmp_path / "k.db"
    repo, run = new_repo(path)
    ids = add_people(repo, run, 30)
    policy = RetentionPolicy(max_age_days=None, max_bytes=used_bytes(repo) // 3,
                             batch_tracklets=5)
    first = enforce_retention(repo, policy, time_budget_s=0.0)
    assert not first.within_budget and first.tracklets_deleted == 5  # one batch, then stop
    rest = enforce_retention(repo, policy)
    assert rest.within_budget and used_bytes(repo) <= policy.max_bytes
    assert tracklet_ids(path) == ids[first.tracklets_deleted + rest.tracklets_deleted:]
    repo.close()


def test_age_limit_deletes_old_tracklets_finished_or_not(db_url):
    repo, run = new_repo(db_url)
    old = add_people(repo, run, 10) + add_people(repo, run, 5, first_track=10, finished=False)
    time.sleep(0.01)
    boundary = datetime.now(UTC)
    time.sleep(0.01)
    new = add_people(repo, run, 5, first_track=15, finished=False)
    report = enforce_retention(repo, RetentionPolicy(max_age_days=2, max_bytes=None),
                               now=boundary + timedelta(days=2))
    assert stored_ids(repo) == new
    assert report.tracklets_deleted == len(old) and report.within_budget
    assert report.clips_deleted == CLIPS_PER_TRACKLET * len(old)
    # The same limit a day earlier keeps everything that is left.
    again = enforce_retention(repo, RetentionPolicy(max_age_days=3, max_bytes=None),
                              now=boundary + timedelta(days=2))
    assert again.tracklets_deleted == 0 and stored_ids(repo) == new
    assert repo.stats().clips == CLIPS_PER_TRACKLET * len(new)
    if repo.is_sqlite:
        assert_sound(Path(repo.engine.url.database))
    repo.close()


def test_identities_left_without_references_are_removed(db_url):
    repo, run = new_repo(db_url)
    t = add_people(repo, run, 8)  # t[0..4] old, deleted below
    time.sleep(0.01)
    boundary = datetime.now(UTC)
    time.sleep(0.01)
    t += add_people(repo, run, 5, first_track=8)  # t[8..12] stay
    gone = repo.open_identity(t[0])  # its members all expire
    repo.assign_identity(t[1], gone)
    mixed = repo.open_identity(t[2])  # one old member, one new: stays
    repo.assign_identity(t[8], mixed, candidate=gone)  # a kept decision naming `gone`
    merged = repo.open_identity(t[3])  # merged into a kept identity, then its member expires
    keeper = repo.open_identity(t[9])
    repo.merge_identities(keeper, merged)
    chain_a = repo.open_identity(t[4])  # a -> b, every member old: both go
    chain_b = repo.open_identity(t[5])
    repo.merge_identities(chain_b, chain_a)
    origin = repo.open_identity(t[6])  # its member expires, but a kept tracklet was split
    repo.assign_identity(t[10], origin)  # away from it: that history still names it
    repo.split_tracklet(t[10])
    fresh = repo.create_identity()  # a linker's identity not yet given its member: untouched
    report = enforce_retention(repo, RetentionPolicy(max_age_days=1, max_bytes=None),
                               now=boundary + timedelta(days=1))
    assert stored_ids(repo) == t[8:]
    assert sorted(report.deleted_identity_ids) == sorted([gone, merged, chain_a, chain_b])
    assert report.identities_deleted == 4
    for kept in (mixed, keeper, origin, fresh):
        assert repo.get_identity(kept) is not None
    assert repo.get_identity(mixed).member_count == 1
    decision = [d for d in repo.link_decisions(tracklet_id=t[8])]
    assert [d.candidate_identity_id for d in decision] == [None]
    if repo.is_sqlite:
        assert_sound(Path(repo.engine.url.database))
    repo.close()


@pytest.mark.sqlite_only(reason="SQLite's page and vacuum settings")
def test_a_file_without_incremental_vacuum_is_bounded_then_converted(tmp_path):
    path = tmp_path / "old.db"
    repo, run = new_repo(path)
    add_people(repo, run, 60)
    repo.close()
    with sqlite3.connect(path) as con:  # what files created before this release look like
        con.execute("PRAGMA auto_vacuum = NONE")
        con.execute("VACUUM")
        assert con.execute("PRAGMA auto_vacuum").fetchone()[0] == 0
    repo = open_repository(f"sqlite:///{path}")
    size_before = file_bytes(path)
    budget = used_bytes(repo) // 3
    report = enforce_retention(repo, RetentionPolicy(max_age_days=None, max_bytes=budget))
    assert report.within_budget and not report.reclaimable and report.pages_reclaimed == 0
    assert used_bytes(repo) <= budget
    assert file_bytes(path) >= size_before  # the freed pages stay in the file, for reuse
    convert_to_incremental(repo)
    size_after = file_bytes(path)
    assert size_after <= budget + 64 * 4096 and size_after < size_before / 2
    with sqlite3.connect(path) as con:
        assert con.execute("PRAGMA auto_vacuum").fetchone()[0] == 2
    assert enforce_retention(repo, RetentionPolicy(None, budget)).reclaimable
    assert_sound(path)
    repo.close()


def test_a_readonly_repository_cannot_enforce_retention(db_url):
    repo, run = new_repo(db_url)
    add_people(repo, run, 1)
    with open_repository(repo._url, readonly=True) as reader, pytest.raises(ReadOnlyError):
        enforce_retention(reader, RetentionPolicy(max_age_days=1, max_bytes=None))
    repo.close()


def test_a_size_budget_is_refused_on_postgresql(postgres):
    repo, run = new_repo(postgres.database())
    add_people(repo, run, 2)
    with pytest.raises(StorageError, match="size budget .* only measured on SQLite files"):
        enforce_retention(repo, RetentionPolicy(max_age_days=None, max_bytes=10))
    assert repo.stats().tracklets == 2
    repo.close()


@pytest.mark.parametrize("kwargs", [{"max_age_days": 0, "max_bytes": None},
                                    {"max_age_days": None, "max_bytes": -1},
                                    {"max_age_days": None, "max_bytes": 1, "batch_tracklets": 0}])
def test_policy_values_are_checked(kwargs):
    with pytest.raises(ValueError):
        RetentionPolicy(**kwargs)


WATCHER = """
import os, sys, time
import numpy as np
from storage import NewClip, open_repository
url, stop_file = sys.argv[1], sys.argv[2]
repo = open_repository(url)
repo.acquire_writer("test-watcher")
run = repo.start_run({})
rng = np.random.default_rng(1)
print("ready", flush=True)
written, longest, track = 0, 0.0, 100_000
while not os.path.exists(stop_file):
    start = time.perf_counter()
    tid = repo.add_tracklet(run, "cam-b", track, first_frame=0, first_time=float(track))
    repo.add_clips([NewClip(tid, [0, 1, 2, 3], float(track), track + 1.0,
                            rng.standard_normal(4800).astype(np.float32), "retention-test-model")
                    for _ in range(4)])
    repo.update_tracklet(tid, last_frame=39, last_time=track + 3.9, finished=True)
    longest = max(longest, time.perf_counter() - start)
    written += 1
    track += 1
print(written, longest, flush=True)
"""


@pytest.mark.sqlite_only(reason="a size budget, and SQLite's file lock and WAL beside a writer and a reader")
def test_retention_beside_a_writing_watcher_and_a_reading_dashboard(tmp_path):
    path = tmp_path / "k.db"
    url = f"sqlite:///{path}"
    repo, run = new_repo(path)
    old = add_people(repo, run, 300)
    for tid in old[::10]:  # people for the identities page, whose members expire
        repo.open_identity(tid)
    budget = used_bytes(repo) // 4
    size_before = file_bytes(path)
    stop_file = tmp_path / "stop"
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    watcher = subprocess.Popen([sys.executable, "-c", textwrap.dedent(WATCHER), url,
                                str(stop_file)], env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    errors: list[BaseException] = []
    reads = [0]
    done = threading.Event()

    def dashboard() -> None:
        """What the dashboard's pages read, in a loop, with a gallery that goes stale."""
        try:
            reader = open_readonly(url)
            stale = reader.gallery_index(MODEL)
            query = stale.descriptors[0].copy()
            while not done.is_set():
                cameras = reader.list_cameras()
                gallery = reader.gallery_index(MODEL)
                assert reader.stats().clips >= 0
                reader.list_tracklets(limit=50)
                camera_rows(reader, cameras, gallery)
                time_bounds(reader, cameras)
                activity_points(reader, cameras, 60.0)
                for hit in search_by_descriptor(reader, stale, query, 5):
                    # Hits of deleted tracklets stay in a stale gallery; shown without a row.
                    assert hit.tracklet is None or hit.tracklet.id == hit.hit.tracklet_id
                try:  # the oldest tracklet, as a search page opened before retention asks
                    search_by_tracklet(reader, gallery, int(stale.tracklet_ids[0]), 5)
                except DashboardError as exc:  # it was deleted: the page says so
                    assert "does not exist" in str(exc)
                for identity in reader.list_identities(limit=20):
                    reader.identity_members(identity.id, thumbnails=False)
                reads[0] += 1
            reader.close()
        except BaseException as exc:  # noqa: BLE001 - reported by the main thread
            errors.append(exc)

    reader = threading.Thread(target=dashboard)
    try:
        assert watcher.stdout.readline().strip() == "ready", watcher.stderr.read()
        reader.start()
        time.sleep(0.5)
        reports = [enforce_retention(repo, RetentionPolicy(None, budget, batch_tracklets=20))
                   for _ in range(3)]
        stop_file.touch()
        out, err = watcher.communicate(timeout=60)
    finally:
        done.set()
        reader.join(timeout=60)
        if watcher.poll() is None:
            watcher.kill()
    assert watcher.returncode == 0, err
    written, longest_watcher_write = out.split()
    assert not errors, errors
    assert reads[0] >= 3, "the dashboard did not keep reading"
    assert int(written) > 0
    assert float(longest_watcher_write) < 2.0, "the watcher waited long for the write lock"
    deleted = sum(r.tracklets_deleted for r in reports)
    assert sum(r.identities_deleted for r in reports) > 0
    assert deleted >= len(old) // 2 and set(tracklet_ids(path)).isdisjoint(old[:deleted])
    assert max(r.longest_write_s for r in reports) < 1.0
    assert file_bytes(path) < size_before
    assert_sound(path)
    with sqlite3.connect(path) as con:
        stored = con.execute("SELECT count(*) FROM tracklets WHERE camera_id = 'cam-b'").fetchone()
    assert 0 < stored[0] <= int(written)
    repo.close()
