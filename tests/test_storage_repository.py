"""Round trips of every repository write/read method, on a SQLite file and on PostgreSQL."""
from __future__ import annotations

import numpy as np
import pytest

from storage import (
    NewClip,
    ReadOnlyError,
    StorageError,
    distances,
    open_repository,
    tracklet_descriptor,
    unit,
)


@pytest.fixture
def repo(db_url):
    with open_repository(db_url) as r:
        yield r


def _clip(tracklet_id, t0, desc, model="m1", frames=(0, 1, 2, 3)):
    return NewClip(tracklet_id=tracklet_id, frame_indices=list(frames), start_time=t0,
                   end_time=t0 + 1.0, descriptor=np.asarray(desc, np.float32), model_id=model)


def test_runs_and_cameras_round_trip(repo):
    run = repo.start_run({"cameras": ["a"], "threshold": 0.5})
    repo.upsert_camera("a", "Gate", "/v.avi", crop=(0, 0, 384, 576))
    repo.upsert_camera("b", source="rtsp://x")
    repo.update_camera_status("a", status="running", fps=9.5, last_frame_index=10,
                              last_frame_time=1.0, frames_processed=11)
    repo.upsert_camera("a", "Gate 2", "/v.avi")  # description update keeps the live status
    repo.finish_run(run, "finished")
    (record,) = repo.list_runs()
    assert record.id == run and record.status == "finished" and record.ended_at is not None
    assert record.config == {"cameras": ["a"], "threshold": 0.5} and record.pid > 0
    a, b = repo.list_cameras()
    assert (a.id, a.name, a.source, a.crop) == ("a", "Gate 2", "/v.avi", None)
    assert (a.status, a.fps, a.last_frame_index, a.frames_processed) == ("running", 9.5, 10, 11)
    assert a.updated_at is not None and a.created_at.tzinfo is not None
    assert (b.name, b.status, b.frames_processed) == ("b", None, 0)
    with pytest.raises(ValueError, match="unknown camera status field"):
        repo.update_camera_status("a", colour="red")
    with pytest.raises(StorageError, match="unknown camera 'zz'"):
        repo.update_camera_status("zz", status="x")


def test_tracklets_round_trip_filters_and_pagination(repo):
    run = repo.start_run({})
    repo.upsert_camera("a")
    repo.upsert_camera("b")
    ids = [repo.add_tracklet(run, "a" if i % 2 else "b", i, i * 10, float(i * 10))
           for i in range(10)]
    repo.update_tracklet(ids[3], last_frame=99, last_time=95.0, thumbnail=b"\xff\xd8jpeg",
                         finished=True)
    t = repo.get_tracklet(ids[3])
    assert (t.camera_id, t.track_id, t.first_frame, t.last_frame) == ("a", 3, 30, 99)
    assert (t.first_time, t.last_time, t.finished, t.thumbnail) == (30.0, 95.0, True, b"\xff\xd8jpeg")
    assert repo.get_tracklet(12345) is None
    assert [x.id for x in repo.list_tracklets()] == ids
    assert [x.id for x in repo.list_tracklets(offset=2, limit=3)] == ids[2:5]
    assert [x.track_id for x in repo.list_tracklets(camera_ids=["a"])] == [1, 3, 5, 7, 9]
    # time range keeps overlapping tracklets: #3 spans 30..95
    assert [x.track_id for x in repo.list_tracklets(time_range=(60, 75))] == [3, 6, 7]
    assert repo.count_tracklets(camera_ids=["b"], time_range=(0, 45)) == 3
    assert repo.count_tracklets(finished=True) == 1
    assert repo.list_tracklets(limit=1)[0].thumbnail is None
    assert repo.list_tracklets(camera_ids=["a"], limit=2, offset=1, thumbnails=True)[0].thumbnail
    assert repo.thumbnails([ids[3], ids[4]]) == {ids[3]: b"\xff\xd8jpeg", ids[4]: None}
    buckets = repo.activity("a", 25.0)
    assert [(b.start, b.count) for b in buckets] == [(0.0, 1), (25.0, 1), (50.0, 2), (75.0, 1)]  # t=10,30,50,70,90
    assert sum(b.count for b in repo.activity(None, 1000.0)) == 10
    with pytest.raises(StorageError, match="already has track id 3"):
        repo.add_tracklet(run, "a", 3, 0, 0.0)
    with pytest.raises(StorageError, match="unknown camera"):
        repo.add_tracklet(run, "nope", 1, 0, 0.0)


@pytest.mark.parametrize("dtype, atol", [("float16", 2e-3), ("float32", 0.0)])
def test_clip_descriptor_round_trip(db_url, dtype, atol):
    rng = np.random.default_rng(0)
    with open_repository(db_url, descriptor_dtype=dtype) as repo:
        run = repo.start_run({})
        repo.upsert_camera("a")
        t = repo.add_tracklet(run, "a", 1, 0, 0.0)
        descs = rng.standard_normal((3, 20)).astype(np.float32)
        kps = rng.random((4, 17, 3)).astype(np.float32)
        clips = [_clip(t, i, descs[i], frames=(4 * i, 4 * i + 1, 4 * i + 2, 4 * i + 3))
                 for i in range(3)]
        clips[0] = NewClip(t, [0, 1, 2, 3], 0.0, 1.0, descs[0], "m1",
                           boxes=[(1, 2, 3, 4)] * 4, keypoints=kps, start_wall_time=1.7e9,
                           end_wall_time=1.7e9 + 1)
        ids = repo.add_clips(clips)
        assert len(ids) == 3 and ids == sorted(ids)
        got = repo.tracklet_clips(t)
        assert [c.id for c in got] == ids
        for clip, want in zip(got, descs):
            assert clip.descriptor.dtype == np.float32 and clip.descriptor.shape == (20,)
            assert (clip.descriptor_dtype, clip.descriptor_dim, clip.model_id) == (dtype, 20, "m1")
            np.testing.assert_allclose(clip.descriptor, want, rtol=atol, atol=atol)
            assert not clip.descriptor.flags.writeable
        assert got[0].boxes == ((1.0, 2.0, 3.0, 4.0),) * 4
        assert (got[0].start_wall_time, got[0].end_wall_time) == (1.7e9, 1.7e9 + 1)
        np.testing.assert_array_equal(got[0].keypoints, kps)
        assert got[1].boxes is None and got[1].keypoints is None
        assert got[2].frame_indices == (8, 9, 10, 11)
        mean = repo.tracklet_descriptor(t)  # the one similarity's: unit mean of unit clips
        assert mean.dtype == np.float32
        np.testing.assert_allclose(mean, tracklet_descriptor(descs), atol=2 * atol + 1e-6)
        assert np.linalg.norm(mean) == pytest.approx(1.0, abs=1e-6)
        assert repo.tracklet_descriptor(repo.add_tracklet(run, "a", 2, 0, 0.0)) is None


def test_add_clips_rejects_bad_input_and_writes_nothing(repo):
    run = repo.start_run({})
    repo.upsert_camera("a")
    t = repo.add_tracklet(run, "a", 1, 0, 0.0)
    with pytest.raises(ValueError, match="overflows float16"):
        repo.add_clips([_clip(t, 0, [1.0, 1e6])])
    with pytest.raises(ValueError, match="not finite"):
        repo.add_clips([_clip(t, 0, [1.0, np.nan])])
    with pytest.raises(ValueError, match="keypoints must have shape"):
        repo.add_clips([NewClip(t, [0, 1], 0, 1, np.ones(4), "m", keypoints=np.zeros((3, 17, 3)))])
    with pytest.raises(StorageError, match=r"unknown tracklet id\(s\) \[999\]"):
        repo.add_clips([_clip(t, 0, [1.0, 2.0]), _clip(999, 0, [1.0, 2.0])])
    assert repo.stats().clips == 0
    assert repo.add_clips([]) == []


def test_tracklet_descriptor_needs_model_when_mixed(repo):
    run = repo.start_run({})
    repo.upsert_camera("a")
    t = repo.add_tracklet(run, "a", 1, 0, 0.0)
    repo.add_clips([_clip(t, 0, [1, 1], model="m1"), _clip(t, 1, [3, 3, 3], model="m2")])
    with pytest.raises(StorageError, match="several models"):
        repo.tracklet_descriptor(t)
    np.testing.assert_allclose(repo.tracklet_descriptor(t, model_id="m2"), [3 ** -0.5] * 3,
                               rtol=1e-6)
    assert repo.model_ids() == ["m1", "m2"]


def test_identities_assign_merge_split(repo):
    run = repo.start_run({})
    repo.upsert_camera("a")
    repo.upsert_camera("b")
    t1 = repo.add_tracklet(run, "a", 1, 0, 0.0, last_time=5.0)
    t2 = repo.add_tracklet(run, "b", 1, 0, 10.0, last_time=12.0)
    t3 = repo.add_tracklet(run, "b", 2, 0, 20.0, last_time=30.0)
    i1, i2 = repo.create_identity(), repo.create_identity(label="visitor")
    repo.assign_identity(t1, i1, "new")
    repo.assign_identity(t2, i1, "linked", distance=0.4, candidate=i1, note="best match")
    repo.assign_identity(t3, i2, "new")
    (first, second) = repo.list_identities()
    assert (first.id, first.member_count, first.camera_ids) == (i1, 2, ("a", "b"))
    assert (first.first_time, first.last_time) == (0.0, 12.0)
    assert (second.label, second.member_count) == ("visitor", 1)
    assert [t.id for t in repo.identity_members(i1)] == [t1, t2]
    decision = repo.link_decisions(tracklet_id=t2)[0]
    assert (decision.kind, decision.distance, decision.candidate_identity_id, decision.note) == \
        ("linked", 0.4, i1, "best match")
    with pytest.raises(ValueError, match="unknown link kind"):
        repo.assign_identity(t1, i1, "guess")

    assert repo.merge_identities(i1, i2, note="operator") == [t3]
    assert repo.get_tracklet(t3).identity_id == i1
    assert [i.id for i in repo.list_identities()] == [i1] and repo.count_identities() == 1
    assert repo.get_identity(i2).merged_into == i1 and repo.get_identity(i2).member_count == 0
    merged = repo.link_decisions(tracklet_id=t3)[-1]
    assert (merged.kind, merged.identity_id, merged.candidate_identity_id, merged.note) == \
        ("merged", i1, i2, "operator")
    with pytest.raises(StorageError, match="was merged into"):
        repo.assign_identity(t1, i2)
    with pytest.raises(StorageError, match="into itself"):
        repo.merge_identities(i1, i1)

    new = repo.split_tracklet(t2)
    assert new not in (i1, i2) and repo.get_tracklet(t2).identity_id == new
    assert [t.id for t in repo.identity_members(i1)] == [t1, t3]
    split = repo.link_decisions(identity_id=new)
    assert [(d.kind, d.tracklet_id, d.candidate_identity_id) for d in split] == [("split", t2, i1)]
    # the old identity's history shows every decision that named it
    assert [d.kind for d in repo.link_decisions(identity_id=i1)] == \
        ["new", "linked", "merged", "split"]
    assert repo.stats().identities == 2
    orphan = repo.add_tracklet(run, "a", 9, 0, 50.0)
    with pytest.raises(StorageError, match="no identity"):
        repo.split_tracklet(orphan)


def test_stats_and_search(repo):
    run = repo.start_run({})
    for cam in ("a", "b"):
        repo.upsert_camera(cam)
    rng = np.random.default_rng(1)
    person = rng.standard_normal(16).astype(np.float32)
    ta = repo.add_tracklet(run, "a", 1, 0, 0.0)
    tb = repo.add_tracklet(run, "b", 1, 0, 5.0)
    others = [repo.add_tracklet(run, "b", 10 + i, 0, 6.0 + i) for i in range(5)]
    repo.add_clips([_clip(ta, 0, person)])
    tb_clips = repo.add_clips([_clip(tb, 5, person + 0.01), _clip(tb, 6, person + 0.5)])
    repo.add_clips([_clip(t, 7, rng.standard_normal(16) * 3) for t in others])
    stats = repo.stats()
    assert (stats.cameras, stats.runs, stats.tracklets, stats.clips) == (2, 1, 7, 8)
    hits = repo.search_tracklets(person, k=3, exclude_camera_id="a")
    assert hits[0].tracklet_id == tb and hits[0].camera_id == "b" and hits[0].rank == 1
    assert len({h.tracklet_id for h in hits}) == 3  # best clip per tracklet, no duplicates
    assert [h.distance for h in hits] == sorted(h.distance for h in hits)
    # the one similarity: unit query against tb's unit descriptor; its best clip is the first
    want = distances(unit(person[None]), repo.tracklet_descriptor(tb)[None])[0, 0]
    assert hits[0].distance == pytest.approx(float(want), abs=1e-5)
    assert hits[0].clip_id == tb_clips[0]
    scaled = repo.search_tracklets(person * 7, k=3, exclude_camera_id="a")  # scale-free
    assert [(h.tracklet_id, h.clip_id) for h in scaled] == [(h.tracklet_id, h.clip_id) for h in hits]
    near = repo.search_tracklets(person, k=5, max_distance=1.0)
    assert [h.tracklet_id for h in near] == [ta, tb] and near[-1].distance <= 1.0
    reranked = repo.search_tracklets(person, k=3, exclude_camera_id="a", rerank=True)
    assert len(reranked) == 3 and all(h.camera_id == "b" for h in reranked)
    only_b = repo.search_tracklets(person, k=10, exclude_tracklet_id=tb, camera_ids=["b"])
    assert sorted(h.tracklet_id for h in only_b) == others
    assert all(h.tracklet_id != tb for h in repo.search_tracklets(person, 10, exclude_tracklet_id=tb))
    assert len(repo.search_tracklets(person, k=50)) == 7
    # tracklets with a clip overlapping 0..5.5 (ta, tb), with all their clips (tb: both)
    index = repo.gallery_index(time_range=(0.0, 5.5))
    assert index.size == 3 and index.dim == 16 and index.tracklet_rows.tolist() == [ta, tb]
    np.testing.assert_allclose(index.tracklet_descriptors[1], repo.tracklet_descriptor(tb),
                               atol=1e-6)


def test_readonly_repository_cannot_write(db_url):
    url = db_url
    with open_repository(url) as writer:
        writer.upsert_camera("a")
    with open_repository(url, readonly=True) as reader:
        assert [c.id for c in reader.list_cameras()] == ["a"]
        for write in (lambda: reader.upsert_camera("b"), reader.create_identity,
                      lambda: reader.start_run({}), lambda: reader.acquire_writer("me")):
            with pytest.raises(ReadOnlyError, match="read-only"):
                write()
        # the database itself refuses writes (SQLite's mode=ro, PostgreSQL's read-only
        # transactions), not only our check
        with (pytest.raises(Exception, match="readonly|read-only|query_only"),
              reader._engine.begin() as conn):
            conn.exec_driver_sql("INSERT INTO identities (created_at) VALUES ('2020-01-01')")
        assert reader.stats().identities == 0


def test_open_identity_is_one_transaction_and_merges_can_be_followed(repo):
    run = repo.start_run({})
    repo.upsert_camera("a")
    t1, t2, t3 = (repo.add_tracklet(run, "a", n, 0, 10.0 * n) for n in (1, 2, 3))
    i1 = repo.open_identity(t1, distance=0.9, candidate=None, note="nobody close",
                            evidence={"margin": 0.2, "false_link": 0.3, "reason": "ambiguous"})
    assert repo.get_tracklet(t1).identity_id == i1
    (decision,) = repo.link_decisions(tracklet_id=t1)
    assert (decision.kind, decision.identity_id, decision.distance) == ("new", i1, 0.9)
    assert (decision.margin, decision.false_link, decision.reason) == (0.2, 0.3, "ambiguous")
    repo.update_run_calibration(run, {"auc": 0.91, "ready": True})
    assert repo.list_runs()[-1].calibration == {"auc": 0.91, "ready": True}
    i2 = repo.open_identity(t2)
    repo.merge_identities(i1, i2)
    with pytest.raises(StorageError, match="was merged into"):
        repo.assign_identity(t3, i2, "linked", 0.3)
    assert repo.assign_identity(t3, i2, "linked", 0.3, follow_merges=True) == i1
    assert repo.get_tracklet(t3).identity_id == i1
    changes = repo.link_decisions(kinds=("merged", "split"), after_id=decision.id)
    assert [(c.kind, c.identity_id, c.candidate_identity_id) for c in changes] == \
        [("merged", i1, i2)]
    assert repo.link_decisions(kinds=("merged",), after_id=changes[-1].id) == []


def test_repair_closes_open_tracklets_and_removes_identities_without_members(db_url):
    url = db_url
    with open_repository(url) as repo:
        run = repo.start_run({})
        repo.upsert_camera("a", source="/videos/a.mp4")
        kept = repo.add_tracklet(run, "a", 1, 0, 0.0, last_frame=40, finished=True)
        repo.open_identity(kept)
        repo.add_tracklet(run, "a", 2, 50, 5.0, last_frame=120)  # open when the writer died
        repo.create_identity()  # committed before its first member: the old crash window
    with open_repository(url) as repo:
        repo.acquire_writer("test")
        assert repo.resume_after("a", "/videos/a.mp4") == 120
        assert repo.resume_after("a", "/videos/other.mp4") is None
        assert repo.resume_after("b", "/videos/a.mp4") is None
        report = repo.repair(repo.start_run({}))
        assert (report.runs_aborted, report.tracklets_closed, report.identities_removed) == (1, 1, 1)
        assert "1 open tracklet(s) closed" in str(report)
        assert all(t.finished for t in repo.list_tracklets())
        assert repo.count_identities() == 1
        assert repo.repair(repo.list_runs()[-1].id) == type(report)(0, 0, 0)
        if repo.is_sqlite:
            assert repo.integrity_check() == ["ok"]


def test_repair_needs_the_writer_lock(repo):
    with pytest.raises(StorageError, match="writer lock"):
        repo.repair(repo.start_run({}))


@pytest.mark.sqlite_only(reason="SQLite's file write lock and busy timeout")
def test_a_locked_database_is_a_retryable_error_and_nothing_is_half_written(tmp_path, monkeypatch):
    import sqlite3

    from storage import StorageUnavailableError
    from storage import engine as engine_module

    monkeypatch.setattr(engine_module, "BUSY_TIMEOUT_S", 0.2)
    path = tmp_path / "k.db"
    with open_repository(f"sqlite:///{path}") as repo:
        run = repo.start_run({})
        repo.upsert_camera("a")
        blocker = sqlite3.connect(path, isolation_level=None)
        blocker.execute("BEGIN IMMEDIATE")  # another writer holds the lock past busy_timeout
        try:
            with pytest.raises(StorageUnavailableError, match="locked"):
                repo.add_tracklet(run, "a", 1, 0, 0.0)
        finally:
            blocker.execute("ROLLBACK")
            blocker.close()
        assert repo.count_tracklets() == 0
        repo.add_tracklet(run, "a", 1, 0, 0.0)  # the same write, retried, succeeds
        assert repo.count_tracklets() == 1


def test_a_postgresql_outage_is_a_retryable_error_and_nothing_is_lost():
    """The server stops under a writer: writes and reads fail as retryable, nothing
    half-written; the write succeeds, retried as it was, once the server is back (the
    watcher's spool does this)."""
    pytest.importorskip("psycopg", reason="psycopg (the `site` extra) is not installed")
    from support import PostgresServer
    from storage import StorageUnavailableError

    try:
        server = PostgresServer()  # its own: this test stops it
    except (RuntimeError, OSError) as exc:
        pytest.skip(f"no PostgreSQL server: {exc}")
    try:
        with open_repository(server.database()) as repo:
            run = repo.start_run({})
            repo.upsert_camera("a")
            repo.add_tracklet(run, "a", 1, 0, 0.0)
            server.halt()
            try:
                with pytest.raises(StorageUnavailableError, match="write failed"):
                    repo.add_tracklet(run, "a", 2, 0, 0.0)
                with pytest.raises(StorageUnavailableError, match="read failed"):
                    repo.count_tracklets()
            finally:
                server.start()
            repo.add_tracklet(run, "a", 2, 0, 0.0)
            assert [t.track_id for t in repo.list_tracklets()] == [1, 2]
    finally:
        server.stop()


def test_permission_denied_on_postgresql_is_named(postgres):
    url = postgres.database()
    postgres.sql("CREATE ROLE visitor LOGIN")
    try:
        with pytest.raises(StorageError, match="permission denied"):
            open_repository(url.replace(f"{postgres.USER}@", "visitor@"))
    finally:
        postgres.sql("DROP ROLE visitor")
