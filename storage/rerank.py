"""k-reciprocal re-ranking (Zhong, Zheng, Cao, Li, CVPR 2017), on the one similarity's distances.

Why: a plain nearest-neighbour ranking is fooled by "hub" tracklets that are close to many
queries. Re-ranking keeps a gallery item near the query only when the two are in each other's
neighbourhoods. Written from the paper; for a probe p and items g of the joint set
{queries} + {gallery} with distance d (here `storage.similarity.distances`, 0..2):

- N(p, k): p's k nearest items (p itself first); R(p, k) = {g in N(p, k) : p in N(g, k)}, the
  k-reciprocal neighbours (Eq. 3).
- R*(p, k) (Eq. 6): R(p, k) united with R(q, k/2) for every q in R(p, k) whose half-size set
  shares at least 2/3 of its members with R(p, k), which recovers true matches hidden by pose
  or view changes.
- V[p, g] = exp(-d(p, g)) for g in R*(p, k1), else 0 (Eq. 7), then local query expansion:
  V[p] = mean of V[g] over g in N(p, k2) (Eq. 11).
- Jaccard distance d_J(p, g) = 1 - sum_j min(V[p, j], V[g, j]) / sum_j max(V[p, j], V[g, j])
  (Eq. 10), final distance d* = (1 - lambda) d_J + lambda d (Eq. 12).

Cost: with M = queries + gallery items, time and memory are O(k1 M^2) (the M x M distance
matrix and its sort, and the neighbour-set products; peak 75 MB at M = 1,000), so callers
re-rank only the top few hundred candidates of a large gallery
(`storage.search.RERANK_CANDIDATES` = 200: about +20 ms per search on this CPU).
"""
from __future__ import annotations

import numpy as np

_BLOCK_ELEMENTS = 4 * 1024 * 1024  # float32 elements per Jaccard block


def _neighbour_sets(order: np.ndarray, k: int) -> np.ndarray:
    """Bool [M, M]: row p marks N(p, k), p's k nearest items (p included)."""
    m = order.shape[0]
    sets = np.zeros((m, m), dtype=bool)
    sets[np.arange(m)[:, None], order[:, :min(k, m)]] = True
    return sets


def _jaccard(v: np.ndarray, queries: int) -> np.ndarray:
    """Jaccard distances [Q, G] between the first `queries` rows of v [M, M] and the rest."""
    gallery = v[queries:]
    mass = v.sum(axis=1)
    out = np.empty((queries, gallery.shape[0]), dtype=np.float32)
    step = max(1, _BLOCK_ELEMENTS // max(1, gallery.size))
    for start in range(0, queries, step):
        stop = min(start + step, queries)
        shared = np.minimum(v[start:stop, None, :], gallery[None, :, :]).sum(axis=2)
        union = mass[start:stop, None] + mass[None, queries:] - shared  # sum of the maxima
        out[start:stop] = 1.0 - np.divide(shared, union, out=np.zeros_like(shared),
                                          where=union > 0)
    return out


def k_reciprocal(query_gallery: np.ndarray, gallery_gallery: np.ndarray,
                 query_query: np.ndarray | None = None, *, k1: int = 20, k2: int = 6,
                 lambda_: float = 0.3) -> np.ndarray:
    """Re-ranked distances [Q, G] (the paper's d*) from distances of the one similarity.

    query_gallery [Q, G], gallery_gallery [G, G] and, optionally, query_query [Q, Q]. Without
    query_query each query is re-ranked alone (the joint set is that query plus the gallery),
    as a dashboard search does; with it, queries are each other's neighbours too, as in the
    paper's benchmark protocol. k1: size of the k-reciprocal sets; k2: local query expansion
    (1 = none); lambda_: weight of the original distance. Lower d* is a better match; it is
    not on the 0..2 scale, rank with it and show the original distance.
    """
    query_gallery = np.asarray(query_gallery, dtype=np.float32)
    gallery_gallery = np.asarray(gallery_gallery, dtype=np.float32)
    q, g = query_gallery.shape
    if gallery_gallery.shape != (g, g):
        raise ValueError(f"gallery_gallery must be [{g}, {g}], got {gallery_gallery.shape}")
    if k1 < 1 or k2 < 1 or not 0.0 <= lambda_ <= 1.0:
        raise ValueError(f"need k1 >= 1, k2 >= 1 and 0 <= lambda_ <= 1, got {k1}, {k2}, "
                         f"{lambda_}")
    if query_query is None:
        return np.concatenate([
            k_reciprocal(query_gallery[i:i + 1], gallery_gallery, np.zeros((1, 1), np.float32),
                         k1=k1, k2=k2, lambda_=lambda_) for i in range(q)
        ]) if q else np.zeros((0, g), np.float32)
    query_query = np.asarray(query_query, dtype=np.float32)
    if query_query.shape != (q, q):
        raise ValueError(f"query_query must be [{q}, {q}], got {query_query.shape}")
    if g == 0:
        return np.zeros((q, 0), np.float32)
    d = np.block([[query_query, query_gallery], [query_gallery.T, gallery_gallery]])
    m = d.shape[0]
    # Each item is its own nearest neighbour whatever float rounding says about its diagonal.
    ranked = d.copy()
    np.fill_diagonal(ranked, -1.0)
    order = np.argsort(ranked, axis=1, kind="stable")

    near = _neighbour_sets(order, k1 + 1)
    reciprocal = near & near.T  # R(p, k1), p included
    half_near = _neighbour_sets(order, round(k1 / 2) + 1)
    half = half_near & half_near.T  # R(q, k1 / 2)
    # For each p and each candidate q among its k1 + 1 nearest: does R(q, k1/2) qualify?
    candidates = order[:, :min(k1 + 1, m)]  # [M, K]
    candidate_half = half[candidates]  # [M, K, M]
    overlap = (candidate_half & reciprocal[:, None, :]).sum(axis=2)
    size = candidate_half.sum(axis=2)
    is_member = np.take_along_axis(reciprocal, candidates, axis=1)
    qualifies = is_member & (overlap >= (2.0 / 3.0) * size)
    expanded = reciprocal | (candidate_half & qualifies[:, :, None]).any(axis=1)  # R*(p, k1)

    v = np.where(expanded, np.exp(-d), 0.0).astype(np.float32)
    if k2 > 1:
        v = v[order[:, :min(k2, m)]].mean(axis=1)
    jaccard = _jaccard(v, q)
    return (1.0 - lambda_) * jaccard + lambda_ * query_gallery
