"""Cross-camera identity linking: finished tracklets in, identity decisions out.

A tracklet's descriptor is the mean of its clip descriptors, L2-normalised: KeyRe-ID
descriptors are un-normalised BN features whose norm varies with the clip, and linking should
compare directions. Distances are Euclidean between unit vectors: 0 = same direction,
sqrt(2) ~ 1.41 = unrelated (orthogonal), 2 = opposite; d^2 = 2 - 2 cos.

An identity's prototype is the normalised mean of its members' unit descriptors. A tracklet
may join an identity only when the identity
- has a member in another camera (linking is *cross*-camera; a new identity per tracklet
  otherwise),
- has no member in the tracklet's own camera that overlaps it in time (one person cannot be
  in one camera twice at once),
- was active within `time_window` seconds of the tracklet (when set),
- and its prototype is within `threshold`.
Tracklets that become ready together are assigned jointly and one-to-one
(`scipy.optimize.linear_sum_assignment` over the allowed pairs), in rounds: after each round
the earliest unplaced tracklet opens a new identity, which the others may then join.

Everything here is pure (numpy + scipy): the watcher keeps a `Linker` and stores its decisions.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Callable

import numpy as np
from scipy.optimize import linear_sum_assignment

_FORBIDDEN = 1e9


def normalise(vector: np.ndarray) -> np.ndarray:
    """L2-normalised float32 copy (a zero vector stays zero)."""
    vector = np.asarray(vector, dtype=np.float32)
    norm = float(np.linalg.norm(vector))
    return vector / norm if norm > 0 else vector.copy()


def tracklet_descriptor(clip_descriptors: np.ndarray) -> np.ndarray:
    """Mean of a tracklet's clip descriptors [N, D], L2-normalised [D]."""
    clip_descriptors = np.asarray(clip_descriptors, dtype=np.float32)
    if clip_descriptors.ndim != 2 or len(clip_descriptors) == 0:
        raise ValueError(f"need clip descriptors [N>=1, D], got shape {clip_descriptors.shape}")
    return normalise(clip_descriptors.mean(axis=0))


@dataclass(frozen=True)
class TrackletSummary:
    """What linking needs of a finished tracklet; `key` is the caller's id (e.g. database id)."""

    key: int
    camera_id: str
    first_time: float
    last_time: float
    descriptor: np.ndarray  # unit vector [D]


@dataclass
class Identity:
    """A linked person: its members and their running prototype."""

    id: int
    members: list[TrackletSummary] = field(default_factory=list)

    @property
    def prototype(self) -> np.ndarray:
        return normalise(np.mean([m.descriptor for m in self.members], axis=0))

    @property
    def cameras(self) -> set[str]:
        return {m.camera_id for m in self.members}

    @property
    def last_time(self) -> float:
        return max(m.last_time for m in self.members)

    @property
    def first_time(self) -> float:
        return min(m.first_time for m in self.members)

    def allows(self, tracklet: TrackletSummary, time_window: float | None) -> bool:
        """The constraints (not the distance): cross-camera, no same-camera overlap, recency."""
        if not self.cameras - {tracklet.camera_id}:
            return False
        for member in self.members:
            if (member.camera_id == tracklet.camera_id and member.first_time <= tracklet.last_time
                    and tracklet.first_time <= member.last_time):
                return False
        if time_window is not None and (tracklet.first_time - self.last_time > time_window
                                        or self.first_time - tracklet.last_time > time_window):
            return False
        return True


@dataclass(frozen=True)
class Decision:
    """One tracklet's outcome. kind "linked": joined `identity_id` at `distance`; kind "new":
    opened `identity_id` (a new id from the linker), `distance`/`candidate` name the closest
    allowed identity, if any, for the dashboard to explain why it was not joined."""

    key: int
    identity_id: int | None  # None only in a "new" decision not yet recorded
    kind: str
    distance: float | None
    candidate: int | None


class Linker:
    """The in-memory identity gallery of one run.

    `record` stores each decision before the linker's memory changes (e.g. a database write)
    and returns the identity id the tracklet got: the new id for kind "new" (whose
    `identity_id` is passed as None), possibly another one for "linked" (an identity an
    operator merged meanwhile). If it raises, the tracklets not yet placed stay unplaced and
    memory matches what was recorded. By default ids count from 1.
    """

    def __init__(self, threshold: float, time_window: float | None = None,
                 record: Callable[[Decision], int] | None = None) -> None:
        if threshold <= 0:
            raise ValueError(f"threshold must be > 0, got {threshold}")
        self.threshold = threshold
        self.time_window = time_window
        self.identities: dict[int, Identity] = {}
        self._counter = 0
        self._record = record or self._count

    def _count(self, decision: Decision) -> int:
        if decision.identity_id is not None:
            return decision.identity_id
        self._counter += 1
        return self._counter

    def link(self, tracklets: list[TrackletSummary]) -> list[Decision]:
        """Place every tracklet into an existing or a new identity; decisions in order made."""
        decisions: list[Decision] = []
        remaining = sorted(tracklets, key=lambda t: (t.first_time, t.key))
        while remaining:
            candidates = list(self.identities.values())
            distances = distance_matrix(remaining, candidates, self.time_window)
            placed = set()
            for row, col in assign(distances, self.threshold):
                tracklet = remaining[row]
                proposed = Decision(tracklet.key, candidates[col].id, "linked",
                                    float(distances[row, col]), None)
                decisions.append(self._place(tracklet, proposed))
                placed.add(row)
            if not placed:
                # Nobody could join anything: the earliest tracklet opens a new identity.
                first = remaining[0]
                best = int(np.argmin(distances[0])) if candidates else -1
                near = best >= 0 and distances[0, best] < _FORBIDDEN
                proposed = Decision(first.key, None, "new",
                                    float(distances[0, best]) if near else None,
                                    candidates[best].id if near else None)
                decisions.append(self._place(first, proposed))
                placed.add(0)
            remaining = [t for i, t in enumerate(remaining) if i not in placed]
        return decisions

    def _place(self, tracklet: TrackletSummary, proposed: Decision) -> Decision:
        identity_id = self._record(proposed)
        self.identities.setdefault(identity_id, Identity(identity_id)).members.append(tracklet)
        return replace(proposed, identity_id=identity_id)

    def merge(self, keep_id: int, merged_id: int) -> None:
        """An operator merged `merged_id` into `keep_id`: its members now count for `keep_id`."""
        merged = self.identities.pop(merged_id, None)
        if merged is not None:
            self.identities.setdefault(keep_id, Identity(keep_id)).members.extend(merged.members)

    def split(self, key: int, new_id: int) -> None:
        """An operator moved tracklet `key` out of its identity into the new `new_id`."""
        for identity in list(self.identities.values()):
            moved = [m for m in identity.members if m.key == key]
            if moved:
                identity.members = [m for m in identity.members if m.key != key]
                if not identity.members:
                    del self.identities[identity.id]
                self.identities.setdefault(new_id, Identity(new_id)).members.extend(moved)


def distance_matrix(tracklets: list[TrackletSummary], identities: list[Identity],
                    time_window: float | None) -> np.ndarray:
    """[tracklets, identities] distances to prototypes; `_FORBIDDEN` where constraints forbid."""
    out = np.full((len(tracklets), len(identities)), _FORBIDDEN, dtype=np.float64)
    if not tracklets or not identities:
        return out
    queries = np.stack([t.descriptor for t in tracklets]).astype(np.float64)
    prototypes = np.stack([i.prototype for i in identities]).astype(np.float64)
    squared = ((queries[:, None, :] - prototypes[None, :, :]) ** 2).sum(-1)
    distances = np.sqrt(np.maximum(squared, 0.0))
    for r, tracklet in enumerate(tracklets):
        for c, identity in enumerate(identities):
            if identity.allows(tracklet, time_window):
                out[r, c] = distances[r, c]
    return out


def assign(distances: np.ndarray, threshold: float) -> list[tuple[int, int]]:
    """One-to-one (row, column) pairs minimising total distance, each pair within `threshold`."""
    if distances.size == 0:
        return []
    cost = np.where(distances <= threshold, distances, _FORBIDDEN)
    rows, cols = linear_sum_assignment(cost)
    return [(int(r), int(c)) for r, c in zip(rows, cols) if cost[r, c] < _FORBIDDEN]
