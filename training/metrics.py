"""Re-id ranking metrics (CMC and mAP) over a query x gallery distance matrix.

Protocol (DESIGN.md §8): per query, gallery entries with the same identity AND the same camera
are removed; queries left without any valid match are skipped (and counted). Distance ties are
broken by gallery index (stable sort) so results are reproducible. The whole matrix is sorted at
once in row chunks, which keeps a 2,000 x 10,000 matrix to a few seconds and bounded memory.

Two AP definitions: "step" (the usual non-interpolated mean of precision at each true match,
as in torchreid) and "trapezoid" (the official Market-1501 / MARS MATLAB `compute_AP.m`, which
averages the precision before and at each recall step).
"""
from __future__ import annotations

import dataclasses

import numpy as np

AP_MODES: tuple[str, ...] = ("step", "trapezoid")


@dataclasses.dataclass(frozen=True)
class RankingResult:
    """CMC curve `[max_rank]`, mean AP, per-query AP (NaN for skipped queries) and the skip count."""

    cmc: np.ndarray
    mAP: float
    per_query_ap: np.ndarray
    num_valid_queries: int
    num_skipped_queries: int


def evaluate_ranking(distmat: np.ndarray, q_pids: np.ndarray, g_pids: np.ndarray, q_camids: np.ndarray,
                     g_camids: np.ndarray, max_rank: int = 20, ap_mode: str = "step",
                     chunk_size: int = 256) -> RankingResult:
    """CMC and mAP with the detail needed for reports (see module docstring)."""
    if ap_mode not in AP_MODES:
        raise ValueError(f"ap_mode {ap_mode!r} not in {AP_MODES}")
    distmat = np.asarray(distmat)
    q_pids, g_pids = np.asarray(q_pids).reshape(-1), np.asarray(g_pids).reshape(-1)
    q_camids, g_camids = np.asarray(q_camids).reshape(-1), np.asarray(g_camids).reshape(-1)
    num_q, num_g = distmat.shape if distmat.ndim == 2 else (-1, -1)
    if num_q != len(q_pids) or num_q != len(q_camids) or num_g != len(g_pids) or num_g != len(g_camids):
        raise ValueError(f"distmat shape {distmat.shape} does not match {len(q_pids)} query pids, "
                         f"{len(q_camids)} query cams, {len(g_pids)} gallery pids, {len(g_camids)} gallery cams")
    first_rank = np.full(num_q, np.iinfo(np.int64).max, dtype=np.int64)
    per_query_ap = np.full(num_q, np.nan, dtype=np.float64)
    for start in range(0, num_q, chunk_size):
        stop = min(start + chunk_size, num_q)
        order = np.argsort(distmat[start:stop], axis=1, kind="stable")
        same_pid = g_pids[order] == q_pids[start:stop, None]
        keep = ~(same_pid & (g_camids[order] == q_camids[start:stop, None]))
        match = same_pid & keep
        rank_kept = np.cumsum(keep, axis=1, dtype=np.int32)  # 1-based rank among kept entries
        hits = np.cumsum(match, axis=1, dtype=np.int32)  # matches seen up to this position
        num_matches = hits[:, -1] if num_g else np.zeros(stop - start, dtype=np.int32)
        valid = num_matches > 0
        precision = np.where(match, hits / np.maximum(rank_kept, 1), 0.0)
        if ap_mode == "step":
            ap_sum = precision.sum(axis=1)
        else:
            previous = np.where(rank_kept > 1, (hits - 1) / np.maximum(rank_kept - 1, 1), 1.0)
            ap_sum = (np.where(match, previous, 0.0) + precision).sum(axis=1) / 2.0
        per_query_ap[start:stop][valid] = ap_sum[valid] / num_matches[valid]
        first_pos = np.argmax(match, axis=1)
        rows = np.arange(stop - start)
        first_rank[start:stop][valid] = rank_kept[rows, first_pos][valid] - 1
    valid_all = ~np.isnan(per_query_ap)
    num_valid = int(valid_all.sum())
    if num_valid == 0:
        raise ValueError("no query has a valid match in the gallery (different camera, same identity)")
    ranks = first_rank[valid_all]
    cmc = (ranks[:, None] <= np.arange(max_rank)[None, :]).mean(axis=0)
    return RankingResult(cmc=cmc.astype(np.float64), mAP=float(per_query_ap[valid_all].mean()),
                         per_query_ap=per_query_ap, num_valid_queries=num_valid,
                         num_skipped_queries=num_q - num_valid)


def evaluate(distmat: np.ndarray, q_pids: np.ndarray, g_pids: np.ndarray, q_camids: np.ndarray,
             g_camids: np.ndarray, max_rank: int = 20, ap_mode: str = "step") -> tuple[np.ndarray, float]:
    """`(cmc [max_rank], mAP)` under the protocol in the module docstring."""
    result = evaluate_ranking(distmat, q_pids, g_pids, q_camids, g_camids, max_rank=max_rank, ap_mode=ap_mode)
    return result.cmc, result.mAP


def mean_per_tracklet(features: np.ndarray, tracklet_ids: np.ndarray, num_tracklets: int) -> np.ndarray:
    """Average clip features `[num_clips, D]` into one descriptor per tracklet `[num_tracklets, D]`
    (test time: every tracklet is cut into consecutive clips, see `training.sampling`)."""
    features = np.asarray(features, dtype=np.float64)
    tracklet_ids = np.asarray(tracklet_ids, dtype=np.int64)
    sums = np.zeros((num_tracklets, features.shape[1]), dtype=np.float64)
    np.add.at(sums, tracklet_ids, features)
    counts = np.bincount(tracklet_ids, minlength=num_tracklets)
    if (counts == 0).any():
        raise ValueError(f"tracklets without any clip: {np.flatnonzero(counts == 0)[:10].tolist()}")
    return (sums / counts[:, None]).astype(np.float32)
