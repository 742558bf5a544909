"""`nearest` against a brute-force reference, and GalleryIndex ranking per tracklet."""
from __future__ import annotations

import numpy as np
import pytest

import storage.search as search_module
from storage import GalleryIndex, nearest
from storage.similarity import distances, tracklet_descriptor, unit


def _reference(queries, gallery, k, valid=None):
    q = queries.astype(np.float64)
    g = gallery.astype(np.float64)
    d = np.sqrt(((q[:, None, :] - g[None, :, :]) ** 2).sum(-1))
    if valid is not None:
        d[:, ~valid] = np.inf
    order = np.argsort(d, axis=1, kind="stable")
    k = min(k, g.shape[0] if valid is None else int(valid.sum()))
    order = order[:, :k]
    return np.take_along_axis(d, order, 1), order


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
@pytest.mark.parametrize("n, k", [(1, 1), (50, 5), (1000, 20), (300, 300)])
def test_matches_brute_force(dtype, n, k):
    rng = np.random.default_rng(n + k)
    gallery = rng.standard_normal((n, 24)).astype(dtype)
    queries = rng.standard_normal((7, 24)).astype(np.float32)
    dist, idx = nearest(queries, gallery, k)
    ref_d, ref_i = _reference(queries, gallery, k)
    assert dist.dtype == np.float32 and idx.dtype == np.int64 and dist.shape == (7, k)
    np.testing.assert_allclose(dist, ref_d, rtol=1e-4, atol=1e-4)
    # indices agree except where float32 rounding reorders near-equal distances
    true_d = np.sqrt(((queries[:, None, :].astype(np.float64) - gallery[idx].astype(np.float64))
                      ** 2).sum(-1))
    np.testing.assert_allclose(true_d, ref_d, rtol=1e-4, atol=1e-4)
    assert all(len(set(row)) == len(row) for row in idx.tolist())
    assert (idx == ref_i).mean() > 0.99


def test_chunked_path_matches_unchunked(monkeypatch):
    rng = np.random.default_rng(3)
    gallery = rng.standard_normal((5000, 16)).astype(np.float32)
    gallery[4000] = gallery[10]  # an exact duplicate across chunks
    queries = np.concatenate([gallery[10:11], rng.standard_normal((2, 16)).astype(np.float32)])
    whole = nearest(queries, gallery, 25)
    monkeypatch.setattr(search_module, "_BLOCK_ELEMENTS", 300)  # 256-row chunks
    chunked = nearest(queries, gallery, 25)
    np.testing.assert_array_equal(whole[1], chunked[1])
    np.testing.assert_array_equal(whole[0], chunked[0])
    assert list(chunked[1][0, :2]) == [10, 4000]


def test_ties_are_broken_by_gallery_index():
    gallery = np.array([[1, 0], [0, 1], [-1, 0], [0, -1], [0, 0], [2, 0]], np.float32)
    query = np.zeros((1, 2), np.float32)
    dist, idx = nearest(query, gallery, 5)
    assert idx.tolist() == [[4, 0, 1, 2, 3]]
    assert dist.tolist() == [[0, 1, 1, 1, 1]]
    dist, idx = nearest(query, gallery, 3)
    assert idx.tolist() == [[4, 0, 1]]
    same = np.ones((10, 3), np.float32)  # all equal: identity order, and no negative zeros
    dist, idx = nearest(same[:1], same, 10)
    assert idx.tolist() == [list(range(10))] and not np.signbit(dist).any()


def test_k_larger_than_gallery_and_empty_inputs():
    gallery = np.eye(3, dtype=np.float32)
    dist, idx = nearest(np.zeros((2, 3), np.float32), gallery, 10)
    assert dist.shape == idx.shape == (2, 3)
    dist, idx = nearest(np.zeros((2, 3), np.float32), np.zeros((0, 3), np.float32), 5)
    assert dist.shape == idx.shape == (2, 0)
    dist, idx = nearest(np.zeros((0, 3), np.float32), gallery, 5)
    assert dist.shape == (0, 3)
    assert nearest(np.zeros((1, 3), np.float32), gallery, 0)[0].shape == (1, 0)


def test_valid_mask():
    rng = np.random.default_rng(5)
    gallery = rng.standard_normal((200, 8)).astype(np.float32)
    queries = gallery[:4] + 0.001
    valid = rng.random(200) > 0.5
    valid[:2] = False
    _, idx = nearest(queries, gallery, 10, valid=valid)
    _, ref_i = _reference(queries, gallery, 10, valid)
    np.testing.assert_array_equal(idx, ref_i)
    assert valid[idx].all() and 0 not in idx[0] and 1 not in idx[1]
    few = np.zeros(200, bool)
    few[[7, 3]] = True
    assert nearest(queries, gallery, 10, valid=few)[1].shape == (4, 2)
    assert nearest(queries, gallery, 10, valid=np.zeros(200, bool))[1].shape == (4, 0)


@pytest.mark.parametrize("queries, gallery, k, valid, message", [
    (np.zeros((1, 3)), np.zeros((4, 2)), 1, None, "dimensions differ"),
    (np.zeros(3), np.zeros((4, 3)), 1, None, "must be 2-D"),
    (np.zeros((1, 3)), np.zeros((4, 3)), -1, None, "k must be"),
    (np.full((1, 3), np.nan), np.zeros((4, 3)), 1, None, "NaN"),
    (np.zeros((1, 3)), np.zeros((4, 3)), 1, np.ones(3, bool), "valid mask shape"),
])
def test_bad_inputs(queries, gallery, k, valid, message):
    with pytest.raises(ValueError, match=message):
        nearest(queries, gallery, k, valid=valid)


def _index(descriptors, tracklet_ids, cameras, starts):
    tracklets = {t: (c, t, s, s + 1.0, None) for t, c, s in zip(tracklet_ids, cameras, starts)}
    return GalleryIndex(
        descriptors=np.asarray(descriptors, np.float32),
        clip_ids=np.arange(100, 100 + len(tracklet_ids), dtype=np.int64),
        tracklet_ids=np.asarray(tracklet_ids, np.int64),
        camera_ids=np.asarray(cameras, dtype=object),
        start_times=np.asarray(starts, np.float64),
        end_times=np.asarray(starts, np.float64) + 1.0,
        tracklets=tracklets, model_id="m")


def _angle(degrees):
    return [np.cos(np.radians(degrees)), np.sin(np.radians(degrees))]


def test_gallery_index_holds_unit_clips_and_tracklet_descriptors():
    rng = np.random.default_rng(4)
    clips = rng.standard_normal((9, 6)).astype(np.float32) * rng.uniform(0.5, 20, (9, 1))
    tracklet_ids = [7, 3, 7, 5, 3, 7, 5, 5, 9]  # unordered, as a caller may pass them
    index = _index(clips.copy(), tracklet_ids, ["a"] * 9, list(range(9)))
    np.testing.assert_allclose(np.linalg.norm(index.descriptors, axis=1), 1.0, rtol=1e-6)
    assert index.tracklet_rows.tolist() == [3, 5, 7, 9]
    for row, tid in enumerate(index.tracklet_rows):
        mine = clips[np.asarray(tracklet_ids) == tid]
        np.testing.assert_allclose(index.tracklet_descriptors[row], tracklet_descriptor(mine),
                                   atol=1e-6)
    assert index.tracklet_descriptors.dtype == np.float32 and (index.size, index.dim) == (9, 6)
    assert _index(np.zeros((0, 6)), [], [], []).search(np.ones(6), 3) == []


def test_gallery_index_ranks_tracklets_by_the_one_similarity():
    """Tracklet 1 has one clip right on the query but a mean far from it: ranked by its
    tracklet descriptor (about 63 degrees away) it comes last; a best-clip ranking put it first."""
    descriptors = [_angle(0)] + [_angle(80)] * 3 + [_angle(10), _angle(45), _angle(60),
                                                     _angle(20), _angle(25)]
    tracklet_ids = [1, 1, 1, 1, 4, 2, 3, 4, 5]
    cameras = ["a"] * 4 + ["c", "b", "b", "c", "a"]
    index = _index(descriptors, tracklet_ids, cameras, list(range(9)))
    query = np.array([3.0, 0.0])  # made unit by the search
    hits = index.search(query, 3)
    assert [h.tracklet_id for h in hits] == [4, 5, 2]
    assert [h.rank for h in hits] == [1, 2, 3]
    assert hits[0].clip_id == 104 and hits[0].camera_id == "c"  # its clip nearest the query
    want = distances(unit(query[None]), tracklet_descriptor(np.array([_angle(10), _angle(20)]))[None])
    assert hits[0].distance == pytest.approx(float(want[0, 0]), abs=1e-6)
    assert hits[1].distance == pytest.approx(2 * np.sin(np.radians(25) / 2), abs=1e-6)
    everything = index.search(query, 10)
    assert [h.tracklet_id for h in everything] == [4, 5, 2, 3, 1]
    assert [h.distance for h in everything] == sorted(h.distance for h in everything)
    assert all(0 <= h.distance <= 2 for h in everything)
    assert [h.tracklet_id for h in index.search(query, 10, exclude_camera_id="a")] == [4, 2, 3]
    assert [h.tracklet_id for h in index.search(query, 10, camera_ids=["b"])] == [2, 3]
    assert [h.tracklet_id for h in index.search(query, 10, exclude_tracklet_id=4)] == [5, 2, 3, 1]
    cut = 2 * np.sin(np.radians(45) / 2) + 1e-4  # chord of 45 degrees: tracklet 2 just inside
    assert [h.tracklet_id for h in index.search(query, 10, max_distance=cut)] == [4, 5, 2]
    # a tracklet matches a time range when one of its clips overlaps it (tracklet 1: clip 0)
    assert [h.tracklet_id for h in index.search(query, 10, time_range=(0.5, 0.7))] == [1]
    assert [h.tracklet_id for h in index.search(query, 10, time_range=(6.5, 7.5))] == [4, 3]
    assert index.search(query, 5, exclude_tracklet_id=1, camera_ids=["a"], time_range=(0, 3)) == []
    assert index.search(query, 0) == []
    with pytest.raises(ValueError, match="dimension"):
        index.search(np.zeros(3), 1)
