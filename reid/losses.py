"""KeyRe-ID training objective (paper Eq. 9-11).

global = CE(label smoothing 0.1) + soft-margin batch-hard triplet + beta * center + attention reg.
part k = CE + triplet + beta * center;  total = alpha * global + (1 - alpha) * mean_k part k.
CE uses the BN-neck logits; triplet and center losses use the features before the neck.
Every center (the global D-wide one and each T*D-wide part one) is a parameter of this module,
returned by `center_parameters()` for its own SGD (the released code left the part centers
at their random init: defect 4).
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .model import ReIDOutput


def label_smoothed_cross_entropy(logits: torch.Tensor, targets: torch.Tensor, epsilon: float = 0.1) -> torch.Tensor:
    """Cross-entropy against (1 - eps) one-hot + eps / classes."""
    return F.cross_entropy(logits, targets, label_smoothing=epsilon)


def batch_hard_triplet(features: torch.Tensor, targets: torch.Tensor,
                       allowed_negatives: torch.Tensor | None = None) -> torch.Tensor:
    """Soft-margin triplet on the hardest positive and hardest negative of each anchor (Euclidean).
    `allowed_negatives` `[B, B]` bool: the pairs that may serve as negatives (default: every pair
    of different targets; pseudo-labels use it to skip pairs not known to be two people)."""
    distances = torch.cdist(features, features).clamp(min=1e-12)
    same = targets[:, None] == targets[None, :]
    negative = ~same if allowed_negatives is None else ~same & allowed_negatives
    hardest_positive = distances.masked_fill(~same, float("-inf")).amax(dim=1)
    hardest_negative = distances.masked_fill(~negative, float("inf")).amin(dim=1)
    valid = torch.isfinite(hardest_negative)
    if not valid.any():
        return features.sum() * 0.0
    return F.softplus(hardest_positive[valid] - hardest_negative[valid]).mean()


class CenterLoss(nn.Module):
    """Mean squared distance of each feature to its class center."""

    def __init__(self, num_classes: int, dim: int) -> None:
        super().__init__()
        self.centers = nn.Parameter(torch.randn(num_classes, dim))

    def forward(self, features: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return (features - self.centers[targets]).pow(2).sum(dim=1).mean()


def attention_regularization(attention: torch.Tensor, erased: torch.Tensor) -> torch.Tensor:
    """Temporal attention mass the clip puts on randomly erased frames, averaged over clips."""
    return (attention * erased.to(attention.dtype)).sum(dim=1).mean()


class KeyReIDLoss(nn.Module):
    def __init__(
        self,
        num_classes: int,
        global_dim: int | None,
        part_dim: int | None,
        num_parts: int,
        center_weight: float = 0.0005,
        global_weight: float = 0.75,
        label_smoothing: float = 0.1,
    ) -> None:
        super().__init__()
        self.center_weight = center_weight
        self.global_weight = global_weight
        self.label_smoothing = label_smoothing
        self.global_center = CenterLoss(num_classes, global_dim) if global_dim else None
        self.part_centers = nn.ModuleList(CenterLoss(num_classes, part_dim) for _ in range(num_parts if part_dim else 0))

    @classmethod
    def for_model(cls, model: nn.Module, **options: float) -> "KeyReIDLoss":
        config = model.config
        if config.num_classes <= 0:
            raise ValueError("the model has no classifier (num_classes=0): build it with num_classes for training")
        global_dim = model.embed_dim if config.use_global else None
        part_dim = config.num_frames * model.embed_dim if model.num_parts else None
        return cls(config.num_classes, global_dim, part_dim, model.num_parts, **options)

    def center_parameters(self) -> list[nn.Parameter]:
        return list(self.parameters())

    def _branch(self, logits: torch.Tensor, features: torch.Tensor, targets: torch.Tensor, center: CenterLoss) -> dict:
        return {
            "id": label_smoothed_cross_entropy(logits, targets, self.label_smoothing),
            "triplet": batch_hard_triplet(features, targets),
            "center": center(features, targets),
        }

    def forward(self, out: ReIDOutput, targets: torch.Tensor, erased: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, float]]:
        """Total loss and a dict of its detached components for logging."""
        log: dict[str, float] = {}
        branch_losses = []
        if self.global_center is not None:
            terms = self._branch(out.global_logits, out.global_feat, targets, self.global_center)
            if erased is not None:
                terms["attention"] = attention_regularization(out.temporal_attention, erased)
            global_loss = terms["id"] + terms["triplet"] + self.center_weight * terms["center"] + terms.get("attention", 0.0)
            log.update({f"global_{k}": float(v.detach()) for k, v in terms.items()})
            branch_losses.append(("global", global_loss))
        if len(self.part_centers):
            part_losses = []
            for k, center in enumerate(self.part_centers):
                terms = self._branch(out.part_logits[:, k], out.part_feat[:, k], targets, center)
                part_losses.append(terms["id"] + terms["triplet"] + self.center_weight * terms["center"])
                for name, value in terms.items():
                    log[f"part_{name}"] = log.get(f"part_{name}", 0.0) + float(value.detach()) / len(self.part_centers)
            branch_losses.append(("local", torch.stack(part_losses).mean()))
        if len(branch_losses) == 2:
            total = self.global_weight * branch_losses[0][1] + (1 - self.global_weight) * branch_losses[1][1]
        else:
            total = branch_losses[0][1]
        log.update({name: float(value.detach()) for name, value in branch_losses})
        log["total"] = float(total.detach())
        return total, log
