"""Losses against values computed by hand on tiny tensors."""
import math

import pytest
import torch

from reid.losses import (
    CenterLoss,
    KeyReIDLoss,
    attention_regularization,
    batch_hard_triplet,
    label_smoothed_cross_entropy,
)
from reid.model import ReIDOutput


def test_label_smoothed_cross_entropy_by_hand():
    logits = torch.tensor([[2.0, 0.0, 0.0]])
    log_p = torch.log_softmax(logits, 1)[0]
    # target 0 with eps 0.1 over 3 classes: q = [0.9 + 0.1/3, 0.1/3, 0.1/3]
    expected = -((0.9 + 0.1 / 3) * log_p[0] + (0.1 / 3) * log_p[1] + (0.1 / 3) * log_p[2])
    assert label_smoothed_cross_entropy(logits, torch.tensor([0])).item() == pytest.approx(expected.item(), rel=1e-6)


def test_batch_hard_soft_margin_triplet_by_hand():
    features = torch.tensor([[0.0, 0.0], [3.0, 0.0], [0.0, 1.0], [0.0, 5.0]])
    pids = torch.tensor([0, 0, 1, 1])
    # anchor 0: hardest positive 3 (to 1), hardest negative 1 (to 2) -> softplus(2)
    # anchor 1: positive 3, negatives sqrt(10), sqrt(34) -> softplus(3 - sqrt(10))
    # anchor 2: positive 4, negatives 1, sqrt(10) -> softplus(3)
    # anchor 3: positive 4, negatives 5, sqrt(34) -> softplus(-1)
    softplus = lambda v: math.log1p(math.exp(v))  # noqa: E731
    expected = (softplus(2) + softplus(3 - math.sqrt(10)) + softplus(3) + softplus(-1)) / 4
    assert batch_hard_triplet(features, pids).item() == pytest.approx(expected, rel=1e-5)


def test_center_loss_by_hand():
    loss = CenterLoss(2, 2)
    with torch.no_grad():
        loss.centers.copy_(torch.tensor([[0.0, 0.0], [1.0, 1.0]]))
    features = torch.tensor([[1.0, 0.0], [1.0, 3.0]])
    # squared distances 1 and 4 -> mean 2.5
    assert loss(features, torch.tensor([0, 1])).item() == pytest.approx(2.5)


def test_attention_regularization_is_mass_on_erased_frames():
    attention = torch.tensor([[0.1, 0.2, 0.3, 0.4], [0.25, 0.25, 0.25, 0.25]])
    erased = torch.tensor([[1, 0, 0, 1], [0, 0, 0, 0]], dtype=torch.bool)
    assert attention_regularization(attention, erased).item() == pytest.approx((0.5 + 0.0) / 2)


def test_total_weights_global_and_mean_of_parts():
    torch.manual_seed(0)
    criterion = KeyReIDLoss(num_classes=3, global_dim=2, part_dim=2, num_parts=2)
    pids = torch.tensor([0, 0, 1, 1])
    out = ReIDOutput(
        global_feat=torch.randn(4, 2), global_logits=torch.randn(4, 3), temporal_attention=torch.full((4, 4), 0.25),
        part_feat=torch.randn(4, 2, 2), part_logits=torch.randn(4, 2, 3),
    )
    erased = torch.zeros(4, 4, dtype=torch.bool)
    erased[0, 0] = True
    total, log = criterion(out, pids, erased)

    def branch(logits, features, center):
        return label_smoothed_cross_entropy(logits, pids) + batch_hard_triplet(features, pids) + 0.0005 * center(features, pids)

    global_loss = branch(out.global_logits, out.global_feat, criterion.global_center) + 0.25 / 4
    parts = [branch(out.part_logits[:, k], out.part_feat[:, k], criterion.part_centers[k]) for k in range(2)]
    expected = 0.75 * global_loss + 0.25 * (parts[0] + parts[1]) / 2
    assert total.item() == pytest.approx(expected.item(), rel=1e-6)
    assert log["global_attention"] == pytest.approx(0.0625)
    assert len(criterion.center_parameters()) == 3  # every center is optimised, part centers included
