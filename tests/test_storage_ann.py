"""The FAISS path of `storage.search` (`storage.ann`): same results as exact on clustered data,
exact distances, incremental updates, persistence, damage detection, model changes, no faiss."""
from __future__ import annotations

import importlib.util
import json
import logging
import os
import shutil
import sys

import numpy as np
import pytest

from app.dashboard import data as dashboard_data
from storage import GalleryIndex, nearest
from storage.ann import MANIFEST, AnnIndex, AnnIndexDamaged, open_index
from storage.bench import clustered_gallery
from storage.similarity import distances

N, DIM = 3000, 64
needs_faiss = pytest.mark.skipif(importlib.util.find_spec("faiss") is None,
                                 reason="faiss-cpu (the `site` extra) is not installed")


@pytest.fixture(scope="module")
def clustered():
    return clustered_gallery(N, DIM, 50, np.random.default_rng(1))


@pytest.fixture(scope="module")
def built(clustered) -> AnnIndex:
    """An index of the whole clustered gallery, ids = row numbers (read-only for tests)."""
    return AnnIndex.build(clustered[0], np.arange(N), None, "m")


@pytest.fixture(scope="module")
def saved(built, tmp_path_factory):
    """A folder holding `built`, saved; tests copy it before damaging it."""
    folder = tmp_path_factory.mktemp("saved") / "index"
    built.save(folder)
    return folder


@pytest.fixture
def folder(saved, tmp_path):
    return shutil.copytree(saved, tmp_path / "index")


def _recall(found: np.ndarray, truth: np.ndarray) -> float:
    return float(np.mean([len(np.intersect1d(a, b)) / truth.shape[1]
                          for a, b in zip(found, truth)]))


def _exact(queries, gallery, k=10, **kw):
    return nearest(queries, gallery, k, gallery_sq_norms=np.ones(len(gallery), np.float32), **kw)


@needs_faiss
def test_faiss_path_matches_exact_on_clustered_data_with_exact_distances(clustered, built):
    gallery, queries = clustered
    index = built
    truth_d, truth = _exact(queries, gallery)
    dist, rows = _exact(queries, gallery, index=index)
    assert dist.dtype == np.float32 and rows.dtype == np.int64 and rows.shape == (50, 10)
    assert _recall(rows, truth) >= 0.95
    for q, d, r in zip(queries, dist, rows):
        # re-ranked exactly: the one similarity's distances, ascending
        np.testing.assert_allclose(d, distances(q[None], gallery[r])[0], atol=1e-6)
        assert np.all(np.diff(d) >= 0)
    same = (rows == truth).all(axis=1)
    # where the rows agree so do the distances (to float32 rounding: a batched matmul sums in
    # another order than a single query's)
    np.testing.assert_allclose(dist[same], truth_d[same], atol=1e-6)


@needs_faiss
def test_valid_mask_travels_into_faiss_and_narrow_filters_fall_back_to_exact(clustered, built):
    gallery, queries = clustered
    index = built
    valid = np.arange(N) % 3 != 0
    truth = _exact(queries, gallery, valid=valid)[1]
    rows = _exact(queries, gallery, valid=valid, index=index)[1]
    assert valid[rows].all() and _recall(rows, truth) >= 0.95
    narrow = np.zeros(N, bool)
    narrow[[5, 900, N - 1]] = True  # fewer valid rows than k: answered by the exact search
    np.testing.assert_array_equal(_exact(queries, gallery, valid=narrow, index=index)[1],
                                  _exact(queries, gallery, valid=narrow)[1])


@needs_faiss
def test_an_index_that_does_not_cover_the_gallery_is_refused(clustered, built):
    gallery, queries = clustered
    with pytest.raises(ValueError, match="update it first"):
        _exact(queries, gallery[:-1], index=built)


def _full_scan(index: AnnIndex, queries: np.ndarray) -> list[dict[int, float]]:
    """Every indexed id with its code distance, per query (all lists visited)."""
    import faiss

    params = faiss.SearchParametersIVF(nprobe=faiss.extract_index_ivf(index.index).nlist)
    dist, labels = index.index.search(queries, len(index), params=params)
    return [dict(zip(row.tolist(), d.tolist())) for row, d in zip(labels, dist)]


@needs_faiss
def test_incremental_update_equals_a_rebuild(clustered):
    import faiss

    gallery, queries = clustered
    ids = np.arange(N) * 2 + 10  # tracklet-like ids, not row numbers
    versions = np.zeros(N, np.uint64)
    index = AnnIndex.build(gallery[:2000], ids[:2000], versions[:2000], "m")
    # 1,000 new rows, 300 rows that changed (a tracklet gained a clip), 200 deleted
    moved = gallery.copy()
    moved[100:400] += 0.5 * gallery[2000:2300]
    moved[100:400] /= np.linalg.norm(moved[100:400], axis=1, keepdims=True)
    versions[100:400] = 1
    keep = np.ones(N, bool)
    keep[1500:1700] = False
    final, final_ids = moved[keep], ids[keep]
    added, removed = index.update(final, final_ids, versions[keep])
    assert (added, removed) == (1000 + 300, 300 + 200)
    assert len(index) == keep.sum() and index.ids.tolist() == final_ids.tolist()
    assert index.update(final, final_ids, versions[keep]) == (0, 0)
    # the same quantiser given the final rows at once holds exactly the same codes and ids
    rebuilt = AnnIndex(index=faiss.clone_index(index.index), model_id="m", dim=DIM,
                       ids=final_ids, versions=versions[keep], trained_rows=2000,
                       factory=index.factory)
    rebuilt.index.reset()
    rebuilt.index.add_with_ids(final, final_ids)
    assert _full_scan(index, queries[:5]) == _full_scan(rebuilt, queries[:5])
    # and a rebuild from scratch (new quantiser) finds the same neighbours
    truth = _exact(queries, final)[1]
    fresh = AnnIndex.build(final, final_ids, versions[keep], "m")
    for candidate in (index, fresh):
        assert _recall(_exact(queries, final, index=candidate, ids=final_ids)[1], truth) >= 0.9


@needs_faiss
def test_persistence_round_trip(clustered, tmp_path, caplog):
    gallery, queries = clustered
    folder = tmp_path / "index"
    first = open_index(folder, gallery[:2500], np.arange(2500), None, "m")
    names = sorted(p.name for p in folder.iterdir())
    assert MANIFEST in names and len(names) == 3  # manifest, index, entries; no temp files
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="storage.ann"):
        again = open_index(folder, gallery[:2500], np.arange(2500), None, "m")
    assert "0 rows added, 0 removed" in caplog.text and "building" not in caplog.text
    np.testing.assert_array_equal(again.search(queries, 50), first.search(queries, 50))
    grown = open_index(folder, gallery, np.arange(N), None, "m")  # incremental, saved again
    assert len(grown) == N and len(AnnIndex.load(folder, "m", DIM)) == N
    assert len(list(folder.iterdir())) == 3  # the previous generation's files are gone


@needs_faiss
@pytest.mark.parametrize("damage", ["truncate", "flip", "manifest"])
def test_a_damaged_index_on_disk_is_detected_and_rebuilt(clustered, folder, caplog, damage):
    gallery, queries = clustered
    assert len(AnnIndex.load(folder, "m", DIM)) == N
    (path,) = folder.glob("index-*.faiss")
    if damage == "truncate":
        os.truncate(path, path.stat().st_size // 2)
    elif damage == "flip":
        raw = bytearray(path.read_bytes())
        raw[len(raw) // 2] ^= 0xFF
        path.write_bytes(bytes(raw))
    else:
        (folder / MANIFEST).write_text('{"format": 1, "mod')
    with pytest.raises(AnnIndexDamaged):
        AnnIndex.load(folder, "m", DIM)
    with caplog.at_level(logging.WARNING, logger="storage.ann"):
        index = open_index(folder, gallery, np.arange(N), None, "m")
    assert "building the search index" in caplog.text
    assert _recall(_exact(queries, gallery, index=index)[1], _exact(queries, gallery)[1]) >= 0.95
    assert len(AnnIndex.load(folder, "m", DIM)) == N  # the rebuilt index was saved, intact


@needs_faiss
def test_a_model_change_rebuilds(clustered, folder, caplog):
    gallery, _ = clustered
    other = np.ascontiguousarray(gallery[::-1])  # model b: other descriptors, same ids
    with caplog.at_level(logging.WARNING, logger="storage.ann"):
        index = open_index(folder, other, np.arange(N), None, "model-b")
    assert "model 'm'" in caplog.text and index.model_id == "model-b"
    assert json.loads((folder / MANIFEST).read_text())["model_id"] == "model-b"
    # nothing of model m is left: the index finds model b's rows
    rows = _exact(other[:20], other, k=1, index=index)[1]
    assert rows[:, 0].tolist() == list(range(20))


def _gallery_index(gallery: np.ndarray, model_id: str = "m") -> GalleryIndex:
    """A tracklet gallery: clip pairs as tracklets on two cameras."""
    tracklet_ids = np.arange(len(gallery)) // 2 + 1
    return GalleryIndex(
        descriptors=gallery.copy(), clip_ids=np.arange(len(gallery), dtype=np.int64) + 1,
        tracklet_ids=tracklet_ids, camera_ids=np.where(tracklet_ids % 2, "a", "b").astype(object),
        start_times=np.zeros(len(gallery)), end_times=np.ones(len(gallery)),
        tracklets={int(t): ("a" if t % 2 else "b", int(t), 0.0, 1.0, None)
                   for t in tracklet_ids}, model_id=model_id)


@needs_faiss
def test_gallery_search_through_the_index_returns_the_exact_kind_of_hits(clustered, tmp_path):
    gallery, queries = clustered
    index = _gallery_index(gallery)
    ann = index.ann_index(tmp_path / "index", min_rows=0)
    assert ann is not None and index.ann_index(tmp_path / "index", min_rows=0) is ann
    assert index.ann_index(tmp_path / "index") is None or len(index.tracklet_rows) >= 50_000
    agree = []
    for q in queries[:20]:
        exact = index.search(q, 10, exclude_camera_id="b")
        approximate = index.search(q, 10, exclude_camera_id="b", index=ann)
        assert all(type(h) is type(e) for h, e in zip(approximate, exact))
        assert all(h.camera_id == "a" for h in approximate)
        agree.append(len({h.tracklet_id for h in exact} & {h.tracklet_id for h in approximate}))
        for hit in approximate:
            row = int(np.searchsorted(index.tracklet_rows, hit.tracklet_id))
            expected = distances(q[None] / np.linalg.norm(q),
                                 index.tracklet_descriptors[row:row + 1])[0, 0]
            assert hit.distance == pytest.approx(float(expected), abs=1e-6)
    assert np.mean(agree) / 10 >= 0.95


def test_dashboard_keeps_one_index_folder_per_model_beside_the_database(tmp_path):
    url = f"sqlite:///{tmp_path / 'keyreid.db'}"
    a = dashboard_data.index_directory(url, "keyreid_vit_tiny:abc/1", environ={})
    b = dashboard_data.index_directory(url, "other", environ={})
    assert a.parent == b.parent == tmp_path / "keyreid.db.index" and a != b
    assert "/" not in a.name and a.name.startswith("keyreid_vit_tiny_abc_1-")
    assert dashboard_data.index_directory("postgresql://u@h/db", "m", environ={}) is None
    given = dashboard_data.index_directory(
        "postgresql://u@h/db", "m", environ={dashboard_data.ENV_INDEX_DIR: str(tmp_path)})
    assert given.parent == tmp_path


@needs_faiss
def test_dashboard_search_index_lives_beside_the_database(tmp_path):
    from storage import NewClip, open_repository

    url = f"sqlite:///{tmp_path / 'keyreid.db'}"
    rng = np.random.default_rng(2)
    people = clustered_gallery(300, DIM, 1, rng)[0]
    with open_repository(url) as repo:
        repo.acquire_writer("test")
        run = repo.start_run({})
        for camera in ("cam_a", "cam_b"):
            repo.upsert_camera(camera, name=camera, source=f"{camera}.mp4")
        for row, person in enumerate(people):
            camera = "cam_a" if row % 2 else "cam_b"
            tid = repo.add_tracklet(run, camera, track_id=row, first_frame=0, first_time=row,
                                    last_frame=10, last_time=row + 1.0, finished=True)
            repo.add_clips([NewClip(tracklet_id=tid, frame_indices=[1, 2, 3, 4],
                                    start_time=row + c, end_time=row + c + 0.5, model_id="m",
                                    descriptor=person + 0.02 * rng.standard_normal(DIM))
                            for c in range(2)])
        repo.finish_run(run)
    with open_repository(url, readonly=True) as repo:
        gallery = repo.gallery_index("m")
        assert dashboard_data.search_index(repo, gallery) is None  # 300 < ANN_MIN_GALLERY
        index = dashboard_data.search_index(repo, gallery, min_rows=0)
        folder = dashboard_data.index_directory(url, "m", environ={})
        assert index is not None and (folder / MANIFEST).exists()
        assert folder.parent == tmp_path / "keyreid.db.index"
        for query in people[:10]:
            exact = gallery.search(query, 5, exclude_camera_id="cam_a")
            approximate = gallery.search(query, 5, exclude_camera_id="cam_a", index=index)
            assert [h.tracklet_id for h in approximate] == [h.tracklet_id for h in exact]
            assert [h.distance for h in approximate] == pytest.approx(
                [h.distance for h in exact], abs=1e-6)


def test_without_faiss_the_search_is_exact_and_says_why(clustered, tmp_path, monkeypatch,
                                                        caplog):
    gallery, queries = clustered
    index = _gallery_index(gallery)
    monkeypatch.setitem(sys.modules, "faiss", None)  # `import faiss` raises ImportError
    with caplog.at_level(logging.WARNING, logger="storage.search"):
        assert index.ann_index(tmp_path / "index", min_rows=0) is None
    assert "exact search" in caplog.text and "faiss is not importable" in caplog.text
    assert not (tmp_path / "index").exists()
    hits = index.search(queries[0], 5, index=index.ann_index(tmp_path / "index", min_rows=0))
    assert [h.rank for h in hits] == [1, 2, 3, 4, 5]
