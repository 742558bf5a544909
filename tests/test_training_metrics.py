"""CMC / mAP on hand-made rankings, and against a plain per-query loop."""
import numpy as np
import pytest

from training.metrics import evaluate, evaluate_ranking, mean_per_tracklet


def _loop(distmat, q_pids, g_pids, q_cams, g_cams, max_rank):
    cmcs, aps = [], []
    for i in range(len(q_pids)):
        order = np.argsort(distmat[i], kind="stable")
        keep = ~((g_pids[order] == q_pids[i]) & (g_cams[order] == q_cams[i]))
        match = (g_pids[order] == q_pids[i])[keep]
        if not match.any():
            continue
        hit = np.minimum(np.cumsum(match), 1)
        cmcs.append(np.concatenate([hit, np.ones(max_rank, int)])[:max_rank])
        precision = np.cumsum(match) / np.arange(1, len(match) + 1)
        aps.append(precision[match].mean())
    return np.mean(cmcs, axis=0), float(np.mean(aps))


def test_perfect_and_worst_rankings():
    g_pids = np.array([1, 2, 3, 4])
    g_cams = np.ones(4, int)
    perfect = np.array([[0.0, 1, 2, 3]])
    cmc, mAP = evaluate(perfect, np.array([1]), g_pids, np.array([0]), g_cams, max_rank=4)
    assert cmc.tolist() == [1, 1, 1, 1] and mAP == 1.0
    worst = np.array([[3.0, 2, 1, 0]])
    cmc, mAP = evaluate(worst, np.array([1]), g_pids, np.array([0]), g_cams, max_rank=4)
    assert cmc.tolist() == [0, 0, 0, 1] and mAP == pytest.approx(0.25)


def test_ties_are_broken_by_gallery_index():
    distmat = np.zeros((1, 3))  # all tied: stable order is 0, 1, 2
    cmc, mAP = evaluate(distmat, np.array([5]), np.array([5, 7, 5]), np.array([0]), np.array([1, 1, 1]), max_rank=3)
    assert cmc.tolist() == [1, 1, 1]
    assert mAP == pytest.approx((1 / 1 + 2 / 3) / 2)
    cmc, _ = evaluate(distmat, np.array([5]), np.array([7, 5, 5]), np.array([0]), np.array([1, 1, 1]), max_rank=3)
    assert cmc.tolist() == [0, 1, 1]


def test_same_identity_same_camera_is_removed_but_other_identities_stay():
    distmat = np.array([[0.0, 0.1, 0.2, 0.3]])
    g_pids = np.array([1, 2, 1, 1])
    g_cams = np.array([0, 0, 1, 0])  # entry 0 and 3: same id, same camera -> removed; entry 1 stays
    cmc, mAP = evaluate(distmat, np.array([1]), g_pids, np.array([0]), g_cams, max_rank=3)
    assert cmc.tolist() == [0, 1, 1]
    assert mAP == pytest.approx(1 / 2)


def test_queries_without_valid_match_are_skipped_and_counted():
    distmat = np.array([[0.0, 1.0], [1.0, 0.0]])
    result = evaluate_ranking(distmat, np.array([1, 9]), np.array([1, 2]), np.array([0, 0]), np.array([1, 1]),
                              max_rank=2)
    assert result.num_valid_queries == 1 and result.num_skipped_queries == 1
    assert np.isnan(result.per_query_ap[1])
    assert result.cmc.tolist() == [1, 1] and result.mAP == 1.0
    with pytest.raises(ValueError, match="no query has a valid match"):
        evaluate(distmat, np.array([8, 9]), np.array([1, 2]), np.array([0, 0]), np.array([1, 1]))


def test_trapezoid_ap_matches_the_official_formula():
    distmat = np.array([[0.0, 1.0, 2.0, 3.0]])
    args = (np.array([1]), np.array([2, 1, 3, 1]), np.array([0]), np.ones(4, int))
    # matches at ranks 2 and 4: step AP = (1/2 + 2/4) / 2; trapezoid averages precision before/at each hit
    assert evaluate(distmat, *args, max_rank=4)[1] == pytest.approx(0.5)
    expected = 0.5 * ((0 / 1 + 1 / 2) / 2) + 0.5 * ((1 / 3 + 2 / 4) / 2)
    assert evaluate(distmat, *args, max_rank=4, ap_mode="trapezoid")[1] == pytest.approx(expected)


def test_matches_a_per_query_loop_on_random_cases():
    rng = np.random.default_rng(0)
    for _ in range(30):
        nq, ng = int(rng.integers(1, 25)), int(rng.integers(1, 50))
        distmat = rng.integers(0, 4, (nq, ng)).astype(np.float32)  # many ties
        q_pids, g_pids = rng.integers(0, 5, nq), rng.integers(0, 5, ng)
        q_cams, g_cams = rng.integers(0, 3, nq), rng.integers(0, 3, ng)
        try:
            result = evaluate_ranking(distmat, q_pids, g_pids, q_cams, g_cams, max_rank=10, chunk_size=7)
        except ValueError:
            continue
        cmc, mAP = _loop(distmat, q_pids, g_pids, q_cams, g_cams, 10)
        np.testing.assert_allclose(result.cmc, cmc)
        assert result.mAP == pytest.approx(mAP)


def test_shape_mismatch_is_reported():
    with pytest.raises(ValueError, match="does not match"):
        evaluate(np.zeros((2, 3)), np.zeros(2), np.zeros(4), np.zeros(2), np.zeros(3))


def test_mean_per_tracklet_averages_clip_features():
    features = np.array([[1.0, 0.0], [3.0, 2.0], [5.0, 5.0]])
    np.testing.assert_allclose(mean_per_tracklet(features, np.array([0, 0, 1]), 2), [[2.0, 1.0], [5.0, 5.0]])
    with pytest.raises(ValueError, match="without any clip"):
        mean_per_tracklet(features, np.array([0, 0, 0]), 2)
