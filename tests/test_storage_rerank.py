"""k-reciprocal re-ranking: a hub nearest by raw distance loses to the query's reciprocal
neighbours, alone and through GalleryIndex.search (filters and k still hold)."""
from __future__ import annotations

import numpy as np
import pytest

from storage import GalleryIndex
from storage.rerank import k_reciprocal
from storage.similarity import distances, unit

PEOPLE, TRACKLETS, DIM = 6, 5, 32


def scene():
    """Six people of five tracklets each around orthonormal centres, one hub tracklet (the
    mean direction of all people: moderately close to everyone) and a query of person 0 seen
    oddly (part hub, part a direction nobody has), so that the hub is its nearest tracklet."""
    rng = np.random.default_rng(0)
    centres = np.linalg.qr(rng.standard_normal((DIM, DIM)))[0][:PEOPLE + 1].astype(np.float32)
    people = unit(np.repeat(centres[:PEOPLE], TRACKLETS, 0)
                  + 0.15 * rng.standard_normal((PEOPLE * TRACKLETS, DIM)))
    hub = unit(centres[:PEOPLE].sum(0))
    query = unit(0.6 * centres[0] + 0.55 * hub + 0.8 * centres[PEOPLE])
    labels = np.append(np.repeat(np.arange(PEOPLE), TRACKLETS), -1)  # -1: the hub
    return query, np.concatenate([people, hub[None]]), labels


def test_reciprocal_neighbours_beat_the_hub():
    query, gallery, labels = scene()
    raw = distances(query[None], gallery)
    assert labels[np.argmin(raw[0])] == -1  # by raw distance the hub comes first
    reranked = k_reciprocal(raw, distances(gallery, gallery))
    assert reranked.shape == raw.shape and reranked.dtype == np.float32
    order = np.argsort(reranked[0], kind="stable")
    assert labels[order[:TRACKLETS]].tolist() == [0] * TRACKLETS


def test_lambda_one_is_the_original_distance_and_queries_can_share_a_set():
    query, gallery, _ = scene()
    queries = np.stack([query, gallery[7], gallery[20]])
    qg, gg, qq = distances(queries, gallery), distances(gallery, gallery), distances(queries,
                                                                                     queries)
    np.testing.assert_allclose(k_reciprocal(qg, gg, lambda_=1.0), qg, atol=1e-6)
    alone = k_reciprocal(qg, gg)
    np.testing.assert_allclose(alone[1:2], k_reciprocal(qg[1:2], gg), atol=1e-6)
    together = k_reciprocal(qg, gg, qq, k1=8, k2=3)
    assert together.shape == (3, len(gallery)) and np.all((together >= 0) & (together <= 2))
    assert np.argmin(together[1]) == 7 and np.argmin(together[2]) == 20  # themselves
    assert k_reciprocal(qg[:0], gg).shape == (0, len(gallery))
    assert k_reciprocal(qg[:, :0], gg[:0, :0]).shape == (3, 0)


@pytest.mark.parametrize("kwargs, message", [
    ({"gallery_gallery": np.zeros((2, 2))}, "gallery_gallery must be"),
    ({"query_query": np.zeros((2, 2))}, "query_query must be"),
    ({"k1": 0}, "k1 >= 1"),
    ({"lambda_": 1.5}, "lambda_"),
])
def test_bad_inputs(kwargs, message):
    arguments = {"query_gallery": np.zeros((1, 3)), "gallery_gallery": np.zeros((3, 3))}
    with pytest.raises(ValueError, match=message):
        k_reciprocal(**(arguments | kwargs))


def index_of(gallery: np.ndarray) -> GalleryIndex:
    """One clip per tracklet; tracklet i is on camera "a" when i is even, else "b"."""
    n = len(gallery)
    return GalleryIndex(
        descriptors=gallery.copy(), clip_ids=np.arange(n, dtype=np.int64) + 1000,
        tracklet_ids=np.arange(n, dtype=np.int64),
        camera_ids=np.array(["a" if i % 2 == 0 else "b" for i in range(n)], dtype=object),
        start_times=np.arange(n, dtype=np.float64), end_times=np.arange(n) + 0.5,
        tracklets={i: ("a" if i % 2 == 0 else "b", i, float(i), i + 0.5, None)
                   for i in range(n)},
        model_id="m")


def test_gallery_search_reranks_and_keeps_filters_and_k():
    query, gallery, labels = scene()
    index = index_of(gallery)
    hub = len(gallery) - 1
    plain = index.search(query, 5)
    assert plain[0].tracklet_id == hub
    hits = index.search(query, 5, rerank=True)
    assert [labels[h.tracklet_id] for h in hits] == [0] * TRACKLETS
    assert [h.rank for h in hits] == [1, 2, 3, 4, 5]
    raw = distances(query[None], gallery)[0]
    for hit in hits:  # the hits keep the one similarity's distance, not the re-ranked one
        assert hit.distance == pytest.approx(float(raw[hit.tracklet_id]), abs=1e-5)
        assert hit.clip_id == hit.tracklet_id + 1000
    assert len(index.search(query, 3, rerank=True)) == 3
    only_a = index.search(query, 40, camera_ids=["a"], rerank=True)
    assert only_a and all(h.camera_id == "a" for h in only_a)
    assert len(only_a) == sum(i % 2 == 0 for i in range(len(gallery)))
    assert all(h.tracklet_id != 2 for h in index.search(query, 40, exclude_tracklet_id=2,
                                                        rerank=True))
    assert all(h.camera_id != "b" for h in index.search(query, 40, exclude_camera_id="b",
                                                        rerank=True))
    timed = index.search(query, 40, time_range=(3.0, 9.2), rerank=True)
    assert sorted(h.tracklet_id for h in timed) == list(range(3, 10))
    near = index.search(query, 40, max_distance=1.0, rerank=True)
    assert near and all(h.distance <= 1.0 for h in near)
    assert {h.tracklet_id for h in near} == set(np.flatnonzero(raw <= 1.0).tolist())
