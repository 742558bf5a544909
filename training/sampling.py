"""Batch sampling (P identities x K tracklets) and temporal clip construction.

Batch-hard triplet and center losses need several tracklets of each identity in a batch, hence
the identity sampler (the released default is 4 x 4). Training clips take one random frame per
equal temporal segment (T=4), which covers the whole tracklet and varies between epochs; test
clips cut the tracklet into consecutive T-frame clips so every frame is seen once and clip
features can be averaged per tracklet. Padding repeats frames; keypoints are indexed with the
very same indices, so a padded frame always keeps its own keypoints (the released code
zero-pads the heatmaps instead, which silently drops the part guidance on padded frames).
"""
from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterator, Sequence

import numpy as np
import torch.utils.data

from training.records import TrackletRecord


def train_clip_indices(num_frames: int, T: int = 4, rng: np.random.Generator | None = None) -> np.ndarray:
    """T frame indices, one drawn uniformly from each of T equal segments of the tracklet; a
    tracklet shorter than T is padded by repeating its last frame."""
    if num_frames < 1 or T < 1:
        raise ValueError(f"need at least one frame and T >= 1 (got {num_frames} frames, T={T})")
    rng = rng if rng is not None else np.random.default_rng()
    if num_frames < T:
        return np.concatenate([np.arange(num_frames), np.full(T - num_frames, num_frames - 1)]).astype(np.int64)
    bounds = np.linspace(0, num_frames, T + 1).astype(np.int64)  # segment i = [bounds[i], bounds[i+1])
    return rng.integers(bounds[:-1], bounds[1:]).astype(np.int64)


def test_clip_indices(num_frames: int, T: int = 4) -> np.ndarray:
    """`[num_clips, T]` consecutive clips covering every frame once; the last clip is padded by
    repeating the tracklet's last frame."""
    if num_frames < 1 or T < 1:
        raise ValueError(f"need at least one frame and T >= 1 (got {num_frames} frames, T={T})")
    num_clips = -(-num_frames // T)
    indices = np.arange(num_clips * T)
    return np.minimum(indices, num_frames - 1).reshape(num_clips, T).astype(np.int64)


test_clip_indices.__test__ = False  # a library function, not a pytest test, when imported by tests


class RandomIdentitySampler(torch.utils.data.Sampler[list[int]]):
    """Batch sampler yielding lists of P*K record indices: P identities, K tracklets each.

    Per epoch every identity's tracklets are shuffled and cut into groups of K (an identity with
    fewer than K tracklets is filled up by sampling with replacement; a short last group is
    completed from the identity's other tracklets); batches then take P identities at random
    among those with groups left, until fewer than P remain. Each `__iter__` is a new epoch,
    deterministic from (seed, epoch); `set_epoch` pins the epoch (for resuming).

    Distributed (DDP): every rank draws the same global batches of `num_replicas` x P identities
    from the same (seed, epoch) and keeps its own P of them, so each rank's batch is P whole
    identities x K tracklets (batch-hard triplets stay per rank) and ranks never share a group."""

    def __init__(self, records: Sequence[TrackletRecord], P: int = 4, K: int = 4, seed: int = 0,
                 num_replicas: int = 1, rank: int = 0) -> None:
        if P < 1 or K < 1:
            raise ValueError(f"P and K must be positive (got P={P}, K={K})")
        if not 0 <= rank < num_replicas:
            raise ValueError(f"rank {rank} not in 0..{num_replicas - 1}")
        self.by_pid: dict[int, list[int]] = defaultdict(list)
        for index, record in enumerate(records):
            self.by_pid[record.pid].append(index)
        if len(self.by_pid) < P * num_replicas:
            raise ValueError(f"P={P} identities per batch x {num_replicas} ranks but the data has only "
                             f"{len(self.by_pid)}")
        self.P, self.K, self.seed = P, K, seed
        self.num_replicas, self.rank = num_replicas, rank
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _groups(self, rng: np.random.Generator) -> dict[int, list[list[int]]]:
        groups = {}
        for pid, indices in self.by_pid.items():
            if len(indices) < self.K:
                chosen = rng.choice(indices, size=self.K, replace=True).tolist()
            else:
                chosen = rng.permutation(indices).tolist()
                short = -len(chosen) % self.K
                if short:
                    extra = [i for i in indices if i not in chosen[-(self.K - short):]]
                    chosen += rng.choice(extra, size=short, replace=False).tolist()
            groups[pid] = [chosen[i:i + self.K] for i in range(0, len(chosen), self.K)]
        return groups

    def __iter__(self) -> Iterator[list[int]]:
        rng = np.random.default_rng([self.seed, self.epoch])
        self.epoch += 1
        groups = self._groups(rng)
        available = sorted(groups)
        span = self.P * self.num_replicas
        while len(available) >= span:
            batch = []
            for position, pid in enumerate(rng.choice(available, size=span, replace=False).tolist()):
                group = groups[pid].pop()
                if position // self.P == self.rank:
                    batch.extend(group)
                if not groups[pid]:
                    available.remove(pid)
            yield batch

    def __len__(self) -> int:
        """Upper bound on the batches of an epoch (identities running out early can end it sooner)."""
        num_groups = sum(max(1, -(-len(v) // self.K)) for v in self.by_pid.values())
        return num_groups // (self.P * self.num_replicas)
