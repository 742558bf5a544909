"""Calibrated online identity linking: finished tracklets in, identity decisions out.

Why calibrated: a fixed distance threshold means nothing for a model whose distances are all
alike. Every site labels pairs for free, so the linker measures its own descriptors online:
- impostor pairs: a tracklet and another tracklet (or an identity holding one) of the same
  camera overlapping it in time are different people; their distance is taken at decision
  scale (tracklet vs prototype / tracklet), in the same matrix product the decision uses;
- genuine pairs: the early and the late half of one tracklet whose clips span at least
  `min_genuine_gap` seconds are the same person (tracklet-half vs tracklet-half).

`Calibrator` fits one Gaussian per class to these distances (a sliding window of the most recent
labels). Parametric, because histograms and kernel densities put zero impostor density beyond
the closest impostor seen, which is infinite confidence from finite data; two parameters are
stable from a few dozen labels and update cheaply. Both estimators err towards *not* linking:
the impostor fit uses mean/std (look-alikes widen its lower tail), the genuine fit uses
median/MAD (tracker id switches put impostor-like distances among the "genuine" labels, which a
moment fit would turn into same-person evidence at impostor distances). Each class is a split
normal whose far side gets at least the other class's spread, which keeps the ratio monotone
(a farther candidate never earns more confidence) and near 1 for inseparable classes.

The decision is a posterior over the allowed candidates (Bayes with "at most one of the n
candidates is this person, with prior probability `prior_same`"):
    P(candidate j) = (p/n) L_j / ((1 - p) + (p/n) sum_k L_k),   L = f_same(d) / f_diff(d)
so the false-link probability 1 - P(best) grows with the number of candidates (more chances
of a look-alike) and with a close second, and an inseparable model (L ~ 1) never links.
A tracklet links to its best candidate only when that probability is below
`target_false_link`, the best beats the second by `margin`, and (optionally) the tracklet is
also the candidate's closest pending tracklet. Otherwise it stays pending and is re-decided on
every later call (new identities, re-submitted with more clips, more labels); it opens its own
identity ("new") when it is confidently nobody known, has no candidate at all, or ages out.
Too few labels: nothing links, and every pending decision says so.

Constraints: no same-camera time overlap with any member; operator merges/splits/confirmations
(must-link, cannot-link) applied at once; optional camera-pair transit prior (nobody crosses
between two cameras faster than `transit_slack` times the fastest transit the linker or an
operator confirmed). Scale: identities are rows of one float32 matrix of unit prototypes,
updated in place per new member, evicted outside the time window; each round is one matrix
product of the pending tracklets against it; conflicts are resolved by
`scipy.optimize.linear_sum_assignment` among pairs that each passed the rule, so a tracklet is
never traded to its second choice to make room for more links.

Times are wall-clock seconds (UTC epoch floats). Pure numpy/scipy; `record` is the caller's
transactional hook (a database write) called before memory changes.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace

import numpy as np
from scipy.optimize import linear_sum_assignment
from scipy.special import logsumexp

from storage.similarity import distances, tracklet_descriptor, unit

_MAD_TO_STD = 1.4826
_MIN_STD = 1e-3


# -- configuration and values ---------------------------------------------------------------------
@dataclass(frozen=True)
class CalibrationConfig:
    """How many labels make a calibration, and how many recent ones it keeps (per class)."""

    min_genuine: int = 50
    min_impostor: int = 50
    min_cross_genuine: int = 10  # cross-camera genuine labels before they judge cross-camera pairs
    capacity: int = 20_000

    def __post_init__(self) -> None:
        if self.min_genuine < 2 or self.min_impostor < 2 or self.min_cross_genuine < 2:
            raise ValueError("a calibration needs at least 2 labels per class")
        if self.capacity < max(self.min_genuine, self.min_impostor):
            raise ValueError("capacity must hold at least the minimum number of labels")


@dataclass(frozen=True)
class LinkerConfig:
    """Decision rule and constraints; times in seconds."""

    target_false_link: float = 0.01  # link only below this estimated probability of a wrong link
    margin: float = 0.05  # best candidate must be this much closer than the second (distance)
    mutual: bool = True  # ... and the tracklet the closest pending one to that candidate
    prior_same: float = 0.5  # prior that a tracklet's person is among its candidates
    time_window: float | None = 3600.0  # candidates within this gap; None = unlimited
    pending_timeout: float | None = None  # unlinked this long after its end -> "new"; None = window
    min_genuine_gap: float = 2.0  # the halves of a tracklet this far apart make a genuine label
    transit_prior: bool = True
    transit_min_links: int = 3  # confirmed links of a camera pair before its transit prior applies
    transit_slack: float = 0.5  # forbid gaps under this fraction of the fastest observed transit
    calibration: CalibrationConfig = field(default_factory=CalibrationConfig)

    def __post_init__(self) -> None:
        if not 0 < self.target_false_link < 0.5:
            raise ValueError(f"target_false_link must be in (0, 0.5), got {self.target_false_link}")
        if not 0 < self.prior_same < 1:
            raise ValueError(f"prior_same must be in (0, 1), got {self.prior_same}")
        if self.margin < 0 or not 0 <= self.transit_slack <= 1:
            raise ValueError("margin must be >= 0 and transit_slack in [0, 1]")
        for name in ("time_window", "pending_timeout"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise ValueError(f"{name} must be > 0 or None, got {value}")

    @property
    def pending_limit(self) -> float | None:
        return self.pending_timeout if self.pending_timeout is not None else self.time_window


@dataclass(frozen=True, eq=False)
class TrackletSummary:
    """A finished tracklet as linking sees it; `key` is the caller's id (e.g. database id).

    `clips` / `clip_times` (optional) are its clip descriptors [N, D] and wall-clock times [N];
    they only feed genuine labels and are not kept."""

    key: int
    camera_id: str
    first_time: float
    last_time: float
    descriptor: np.ndarray  # unit [D], storage.similarity.tracklet_descriptor
    clips: np.ndarray | None = None
    clip_times: np.ndarray | None = None

    @classmethod
    def from_clips(cls, key: int, camera_id: str, clips: np.ndarray, clip_times: Sequence[float],
                   first_time: float | None = None,
                   last_time: float | None = None) -> TrackletSummary:
        """The summary of a tracklet from its clips (times default to the clips' span)."""
        times = np.asarray(clip_times, dtype=np.float64)
        return cls(key, camera_id, float(times.min() if first_time is None else first_time),
                   float(times.max() if last_time is None else last_time),
                   tracklet_descriptor(clips), np.asarray(clips, dtype=np.float32), times)


@dataclass(frozen=True, eq=False)
class Member:
    """A tracklet inside an identity. `descriptor` is kept for tracklets linked in this run (so a
    split can take it out of the prototype); identities reloaded from storage may omit it."""

    key: int
    camera_id: str
    first_time: float
    last_time: float
    descriptor: np.ndarray | None = None


@dataclass(frozen=True)
class Decision:
    """One tracklet's outcome in one `link` call.

    kind "linked": joined `identity_id`; "new": opened `identity_id`; "pending": left unlinked
    for now (`identity_id` None; re-decided later). The evidence, always about the best allowed
    candidate (an identity `candidate`, or a pending tracklet `candidate_tracklet`):
    `distance` to it (0..2), `margin` = second-best distance minus best (None with one candidate),
    `false_link` = estimated probability that linking to it is wrong (None when uncalibrated or
    no candidate), `reason` in plain words."""

    key: int
    kind: str
    identity_id: int | None
    distance: float | None
    candidate: int | None
    candidate_tracklet: int | None
    margin: float | None
    false_link: float | None
    reason: str


@dataclass(frozen=True)
class Separation:
    """How well this model separates people on this site, from its free labels. They are all
    within-camera pairs, so this is an upper bound on the separation across cameras (measured on
    a labelled scene: within-camera AUC 0.95 with 0.62 across cameras, untrained encoder)."""

    ready: bool
    reason: str
    genuine_count: int
    impostor_count: int
    auc: float | None  # P(genuine distance < impostor distance); 0.5 = no separation
    genuine_mean: float | None
    genuine_std: float | None
    impostor_mean: float | None
    impostor_std: float | None
    threshold: float | None  # a lone candidate closer than this links at the target rate
    target_false_link: float

    def __str__(self) -> str:
        if self.auc is None:
            return f"separation unknown: {self.reason}"
        # The labels are within-camera pairs: an upper bound on separation across cameras.
        verdict = ("separates people" if self.auc >= 0.9 else
                   "separates people poorly" if self.auc >= 0.7 else "does not separate people")
        verdict += " within a camera"
        limit = (f"links below distance {self.threshold:.2f} ({self.target_false_link:.0%} false "
                 "links)" if self.threshold is not None else "cannot link at the target rate")
        state = "" if self.ready else f" (not linking yet: {self.reason})"
        return (f"model {verdict}: AUC {self.auc:.3f}, {limit}; {self.genuine_count} genuine / "
                f"{self.impostor_count} impostor labels{state}")


@dataclass(frozen=True)
class TransitStat:
    """Fastest transit seen between two cameras in confirmed links (negative: seen in both at
    once, i.e. overlapping views) and how many links it is based on."""

    fastest: float
    links: int


# -- calibration ---------------------------------------------------------------------------------
class _Ring:
    """The most recent `capacity` values."""

    def __init__(self, capacity: int, values: Iterable[float] = ()) -> None:
        self._data = np.empty(capacity, dtype=np.float64)
        self._next = 0
        self._count = 0
        self.add(np.fromiter(values, dtype=np.float64))

    def add(self, values: np.ndarray) -> None:
        values = np.asarray(values, dtype=np.float64).ravel()[-len(self._data):]
        for chunk in (values[:len(self._data) - self._next], values[len(self._data) - self._next:]):
            self._data[self._next:self._next + len(chunk)] = chunk
            self._next = (self._next + len(chunk)) % len(self._data)
        self._count = min(len(self._data), self._count + len(values))

    def values(self) -> np.ndarray:
        return self._data[:self._count].copy()

    def __len__(self) -> int:
        return self._count


@dataclass(frozen=True)
class _Fit:
    genuine_mean: float
    genuine_std: float
    impostor_mean: float
    impostor_std: float


def _fit(genuine: np.ndarray, impostor: np.ndarray) -> _Fit:
    """Robust genuine centre and spread (median, MAD: labels hold outliers), impostor moments."""
    centre = float(np.median(genuine))
    spread = _MAD_TO_STD * float(np.median(np.abs(genuine - centre)))
    return _Fit(centre, max(spread, _MIN_STD), float(impostor.mean()), max(float(impostor.std()), _MIN_STD))


class Calibrator:
    """Genuine and impostor distance distributions of one model, maintained online.

    Keep one per model (descriptors of different models are not comparable); `model_id` is for
    the caller. Restore a persisted state by passing the stored samples back in.

    The free genuine labels are a tracklet's halves: one camera, seconds apart, far closer than
    one person in two cameras, so alone they put the link threshold below every cross-camera
    pair (measured on a labelled scene: threshold 0.13, cross-camera genuine distances from 0.27).
    `cross_genuine`, distances of pairs known or mined to be one person in two cameras (a
    site-adapted checkpoint carries them, `training.adapt`), give cross-camera candidates their
    own genuine distribution once there are `min_cross_genuine` of them; impostors are shared
    (same-camera people seen together: closer than cross-camera impostors, so conservative)."""

    def __init__(self, config: CalibrationConfig = CalibrationConfig(), model_id: str = "",
                 genuine: Iterable[float] = (), impostor: Iterable[float] = (),
                 cross_genuine: Iterable[float] = ()) -> None:
        self.config = config
        self.model_id = model_id
        self._genuine = _Ring(config.capacity, genuine)
        self._impostor = _Ring(config.capacity, impostor)
        self._cross_genuine = _Ring(config.capacity, cross_genuine)
        self._fit: _Fit | None = None
        self._cross_fit: _Fit | None = None

    def add_genuine(self, values: float | Iterable[float]) -> None:
        self._genuine.add(np.atleast_1d(np.asarray(values, dtype=np.float64)))
        self._fit = None

    def add_impostor(self, values: float | Iterable[float]) -> None:
        self._impostor.add(np.atleast_1d(np.asarray(values, dtype=np.float64)))
        self._fit = self._cross_fit = None

    def add_cross_genuine(self, values: float | Iterable[float]) -> None:
        self._cross_genuine.add(np.atleast_1d(np.asarray(values, dtype=np.float64)))
        self._cross_fit = None

    def cross_genuine_samples(self) -> np.ndarray:
        return self._cross_genuine.values()

    @property
    def cross_ready(self) -> bool:
        """Cross-camera candidates have their own genuine distribution."""
        return self.ready and len(self._cross_genuine) >= self.config.min_cross_genuine

    def genuine_samples(self) -> np.ndarray:
        return self._genuine.values()

    def impostor_samples(self) -> np.ndarray:
        return self._impostor.values()

    @property
    def ready(self) -> bool:
        return (len(self._genuine) >= self.config.min_genuine
                and len(self._impostor) >= self.config.min_impostor)

    def status(self) -> str:
        if self.ready:
            return "calibrated"
        return (f"uncalibrated: {len(self._genuine)} of {self.config.min_genuine} genuine and "
                f"{len(self._impostor)} of {self.config.min_impostor} impostor labels")

    def _fitted(self, cross: bool = False) -> _Fit:
        if cross:
            if self._cross_fit is None:
                self._cross_fit = _fit(self._cross_genuine.values(), self._impostor.values())
            return self._cross_fit
        if self._fit is None:
            self._fit = _fit(self._genuine.values(), self._impostor.values())
        return self._fit

    def log_likelihood_ratio(self, d: np.ndarray, cross: bool = False) -> np.ndarray:
        """log f_same(d) / f_diff(d), monotone non-increasing in d; 0 (no evidence) for a model
        whose genuine distances are not smaller than its impostor ones. Requires `ready`.

        Each class is a split normal whose far side (genuine below its centre, impostor above
        its centre) gets at least the other class's spread. That keeps the ratio monotone (a
        farther candidate never earns more confidence) and lets a candidate closer than a typical
        genuine label count as stronger evidence, since genuine labels (tracklet halves) are
        noisier than the whole-tracklet-vs-prototype distances decisions see, but never more
        steeply than both spreads allow: for inseparable classes the ratio stays near 1.
        `cross`: with the cross-camera genuine distribution (requires `cross_ready`)."""
        if not (self.cross_ready if cross else self.ready):
            raise RuntimeError(self.status() if self.ready else
                               f"{len(self._cross_genuine)} of {self.config.min_cross_genuine} cross-camera genuine labels")
        fit = self._fitted(cross)
        d = np.asarray(d, dtype=np.float64)
        if fit.genuine_mean >= fit.impostor_mean:
            return np.zeros_like(d)
        wide = max(fit.genuine_std, fit.impostor_std)
        same = np.where(d < fit.genuine_mean, wide, fit.genuine_std)
        diff = np.where(d > fit.impostor_mean, wide, fit.impostor_std)
        return (0.5 * np.square((d - fit.impostor_mean) / diff) + math.log(fit.impostor_std)
                - 0.5 * np.square((d - fit.genuine_mean) / same) - math.log(fit.genuine_std))

    def threshold(self, target_false_link: float, prior_same: float) -> float | None:
        """Largest distance at which a lone candidate links at `target_false_link` (None if none)."""
        if not self.ready:
            return None
        fit = self._fitted()
        needed = math.log((1 - target_false_link) * (1 - prior_same)
                          / (target_false_link * prior_same))
        lo, hi = 0.0, fit.impostor_mean
        if fit.genuine_mean >= hi or float(self.log_likelihood_ratio(np.array(lo))) < needed:
            return None
        for _ in range(50):  # bisection on the monotone ratio
            mid = 0.5 * (lo + hi)
            lo, hi = (mid, hi) if float(self.log_likelihood_ratio(np.array(mid))) >= needed \
                else (lo, mid)
        return lo

    def separation(self, target_false_link: float = 0.01, prior_same: float = 0.5) -> Separation:
        genuine, impostor = self._genuine.values(), self._impostor.values()
        auc = None
        if len(genuine) and len(impostor):  # Mann-Whitney: P(genuine < impostor), ties half
            ordered = np.sort(impostor)
            below = np.searchsorted(ordered, genuine, side="left")
            ties = np.searchsorted(ordered, genuine, side="right") - below
            auc = float(((len(ordered) - below - ties) + 0.5 * ties).sum()
                        / (len(genuine) * len(ordered)))
        fit = self._fitted() if len(genuine) >= 2 and len(impostor) >= 2 else None
        return Separation(
            self.ready, self.status(), len(genuine), len(impostor), auc,
            fit and fit.genuine_mean, fit and fit.genuine_std, fit and fit.impostor_mean,
            fit and fit.impostor_std, self.threshold(target_false_link, prior_same),
            target_false_link)


def genuine_distance(clips: np.ndarray, clip_times: np.ndarray, min_gap: float) -> float | None:
    """Distance between the early and the late half of one tracklet, if their mean times are at
    least `min_gap` seconds apart (a same-person label at tracklet scale), else None."""
    clips = np.asarray(clips, dtype=np.float32)
    times = np.asarray(clip_times, dtype=np.float64)
    if len(clips) < 2 or len(times) != len(clips):
        return None
    order = np.argsort(times, kind="stable")
    early, late = order[:len(order) // 2], order[len(order) // 2:]
    if times[late].mean() - times[early].mean() < min_gap:
        return None
    pair = np.stack([tracklet_descriptor(clips[early]), tracklet_descriptor(clips[late])])
    return float(distances(pair[:1], pair[1:])[0, 0])


def _posterior(llr: np.ndarray, prior: float) -> tuple[np.ndarray, float]:
    """P(each candidate is the person) and P(none is), for `llr` of all allowed candidates."""
    log_weights = math.log(prior / len(llr)) + llr
    log_none = math.log(1 - prior)
    log_total = np.logaddexp(log_none, logsumexp(log_weights))
    return np.exp(log_weights - log_total), math.exp(log_none - log_total)


# -- memory --------------------------------------------------------------------------------------
@dataclass(eq=False)
class _Identity:
    id: int
    row: int
    norm: float  # |sum of member unit descriptors|: prototype * norm is the running sum
    members: list[Member]


@dataclass(eq=False)
class _Pending:
    summary: TrackletSummary
    order: int  # arrival order, for stable ties
    clips: int = 0  # clips its genuine label was taken from (a re-submission adds one only if more)
    fresh: bool = True  # impostor labels not yet taken


class _Intervals:
    """Member time intervals of one camera with their identity rows, for vectorised checks."""

    def __init__(self) -> None:
        self.first = np.empty(64)
        self.last = np.empty(64)
        self.row = np.full(64, -1, dtype=np.int64)
        self.size = 0
        self.dead = 0
        self.index: dict[int, int] = {}

    def add(self, key: int, first: float, last: float, row: int) -> None:
        if self.size == len(self.first):
            self.first, self.last = (np.resize(a, 2 * len(a)) for a in (self.first, self.last))
            self.row = np.concatenate([self.row, np.full(len(self.row), -1, dtype=np.int64)])
        self.first[self.size], self.last[self.size], self.row[self.size] = first, last, row
        self.index[key] = self.size
        self.size += 1

    def remove(self, key: int) -> None:
        self.row[self.index.pop(key)] = -1
        self.dead += 1
        if self.dead > 64 and 2 * self.dead > self.size:
            keep = np.flatnonzero(self.row[:self.size] >= 0)
            position = np.full(self.size, -1, dtype=np.int64)
            position[keep] = np.arange(len(keep))
            for array in (self.first, self.last, self.row):
                array[:len(keep)] = array[keep]
            self.row[len(keep):] = -1
            self.index = {k: int(position[i]) for k, i in self.index.items()}
            self.size, self.dead = len(keep), 0

    def rows_near(self, lo: float, hi: float) -> np.ndarray:
        """Identity rows with a member interval touching [lo, hi]."""
        n = self.size
        hit = (self.first[:n] <= hi) & (self.last[:n] >= lo) & (self.row[:n] >= 0)
        return np.unique(self.row[:n][hit])


def _gap(a_first: float, a_last: float, b_first: float, b_last: float) -> float:
    """Seconds between two intervals; <= 0 when they overlap (or touch)."""
    return max(a_first - b_last, b_first - a_last)


@dataclass(frozen=True)
class _Candidates:
    """Per pending tracklet, a summary of one block of candidates (identities or pending)."""

    best: np.ndarray  # column of the closest allowed candidate (identity row, or n + pending)
    nearest: np.ndarray  # its distance (inf: none allowed)
    second: np.ndarray  # second-closest distance
    count: np.ndarray  # allowed candidates
    evidence: np.ndarray  # log sum of their likelihood ratios (NaN: uncalibrated)
    best_llr: np.ndarray  # log likelihood ratio of the closest


@dataclass(frozen=True)
class _Stage:
    """The rule's inputs for every pending tracklet against one candidate set (one row each)."""

    best: np.ndarray  # column of the closest allowed candidate
    distance: np.ndarray  # its distance (inf: no candidate)
    margin: np.ndarray  # second-closest minus closest (inf: a single candidate)
    false_link: np.ndarray  # 1 - posterior of the closest (NaN: uncalibrated)
    p_none: np.ndarray  # posterior that none of the candidates is the person


class Linker:
    """The calibrated identity gallery of one model at one site.

    `record(decision)` stores a "new" or "linked" decision before memory changes (e.g. a database
    write) and returns the identity id the tracklet got: the new id for "new" (its `identity_id`
    is None), possibly another one for "linked" (an identity an operator merged meanwhile). If it
    raises, the exception propagates, the tracklets not yet placed stay pending, and memory
    matches what was recorded. "pending" decisions are returned, never recorded. Without
    `record`, ids count from 1.
    """

    def __init__(self, config: LinkerConfig = LinkerConfig(),
                 record: Callable[[Decision], int] | None = None,
                 calibrator: Calibrator | None = None, capacity: int = 1024,
                 on_evict: Callable[[list[int]], None] | None = None) -> None:
        self.config = config
        self._on_evict = on_evict
        self.calibrator = calibrator or Calibrator(config.calibration)
        self._record = record or self._count
        self._counter = 0
        self._capacity = max(1, capacity)
        self._protos: np.ndarray | None = None  # [capacity, D] unit prototypes
        self._first = np.zeros(self._capacity)
        self._last = np.zeros(self._capacity)
        self._row_id = np.full(self._capacity, -1, dtype=np.int64)  # identity id per row
        self._rows = 0  # high-water mark of used rows
        self._free: list[int] = []
        self._identities: dict[int, _Identity] = {}
        self._member_of: dict[int, int] = {}
        self._cameras: dict[str, _Intervals] = {}
        self._pending: dict[int, _Pending] = {}
        self._arrivals = 0
        self._cannot: dict[int, set[int]] = {}  # tracklet key -> identity ids it must not join
        self._transit: dict[tuple[str, str], TransitStat] = {}
        self._clock = -math.inf

    def _count(self, decision: Decision) -> int:
        if decision.identity_id is not None:
            return decision.identity_id
        self._counter += 1
        return self._counter

    # -- reading -----------------------------------------------------------------------------------
    @property
    def active_identities(self) -> int:
        return len(self._identities)

    def identity_ids(self) -> list[int]:
        return list(self._identities)

    def identity_of(self, key: int) -> int | None:
        return self._member_of.get(key)

    def members(self, identity_id: int) -> tuple[Member, ...]:
        return tuple(self._identities[identity_id].members)

    def prototype(self, identity_id: int) -> np.ndarray:
        assert self._protos is not None
        return self._protos[self._identities[identity_id].row].copy()

    @property
    def gallery_bytes(self) -> int:
        """Memory held by the prototype matrix (capacity rows x D float32)."""
        return 0 if self._protos is None else self._protos.nbytes

    def pending_keys(self) -> list[int]:
        return list(self._pending)

    def transit_times(self) -> dict[tuple[str, str], TransitStat]:
        return dict(self._transit)

    def separation(self) -> Separation:
        return self.calibrator.separation(self.config.target_false_link, self.config.prior_same)

    # -- identity rows -----------------------------------------------------------------------------
    def _ensure_dim(self, dim: int) -> None:
        if self._protos is None:
            self._protos = np.zeros((self._capacity, dim), dtype=np.float32)
        elif self._protos.shape[1] != dim:
            raise ValueError(f"descriptor dimension {dim} != linker's {self._protos.shape[1]}")

    def _new_row(self) -> int:
        assert self._protos is not None
        if self._free:
            return self._free.pop()
        if self._rows == len(self._row_id):
            grow = len(self._row_id) // 2 + 1
            self._protos = np.concatenate(
                [self._protos, np.zeros((grow, self._protos.shape[1]), dtype=np.float32)])
            self._first, self._last = (np.concatenate([a, np.zeros(grow)])
                                       for a in (self._first, self._last))
            self._row_id = np.concatenate([self._row_id, np.full(grow, -1, dtype=np.int64)])
        self._rows += 1
        return self._rows - 1

    def _create(self, identity_id: int, prototype: np.ndarray, norm: float,
                members: Sequence[Member]) -> _Identity:
        if identity_id in self._identities:
            raise ValueError(f"identity {identity_id} is already in memory")
        self._counter = max(self._counter, identity_id)  # default ids never reuse a known one
        prototype = unit(prototype)
        self._ensure_dim(len(prototype))
        assert self._protos is not None
        row = self._new_row()
        self._protos[row] = prototype
        self._row_id[row] = identity_id
        self._first[row], self._last[row] = math.inf, -math.inf
        identity = _Identity(identity_id, row, norm, [])
        self._identities[identity_id] = identity
        for member in members:
            self._attach(identity, member)
        return identity

    def _attach(self, identity: _Identity, member: Member) -> None:
        """Member bookkeeping only (the prototype is updated by the caller)."""
        identity.members.append(member)
        self._member_of[member.key] = identity.id
        self._cameras.setdefault(member.camera_id, _Intervals()).add(
            member.key, member.first_time, member.last_time, identity.row)
        self._first[identity.row] = min(self._first[identity.row], member.first_time)
        self._last[identity.row] = max(self._last[identity.row], member.last_time)

    def _detach(self, identity: _Identity, key: int) -> Member:
        member = next(m for m in identity.members if m.key == key)
        identity.members.remove(member)
        del self._member_of[key]
        self._cameras[member.camera_id].remove(key)
        if identity.members:
            self._first[identity.row] = min(m.first_time for m in identity.members)
            self._last[identity.row] = max(m.last_time for m in identity.members)
        return member

    def _add_member(self, identity: _Identity, member: Member) -> None:
        assert self._protos is not None and member.descriptor is not None
        total = self._protos[identity.row] * identity.norm + unit(member.descriptor)
        identity.norm = float(np.linalg.norm(total))
        self._protos[identity.row] = total / identity.norm if identity.norm > 0 else total
        self._attach(identity, member)

    def _drop(self, identity: _Identity) -> None:
        for member in identity.members:
            self._cameras[member.camera_id].remove(member.key)
            self._member_of.pop(member.key, None)
        del self._identities[identity.id]
        self._row_id[identity.row] = -1
        self._free.append(identity.row)

    def _admit(self, identity_id: int, member: Member) -> None:
        """`member` joins `identity_id` (learning its transit), or founds it if not in memory."""
        identity = self._identities.get(identity_id)
        if identity is None:
            assert member.descriptor is not None
            self._create(identity_id, member.descriptor, 1.0, [member])
        else:
            self._learn_transit(identity.members, [member])
            self._add_member(identity, member)

    def _take_out(self, key: int, descriptor: np.ndarray | None = None) -> tuple[int, Member]:
        """Detach member `key` from its identity (and from its prototype when its descriptor is
        known); an identity left empty is dropped. Returns (old identity id, member)."""
        old = self._identities[self._member_of[key]]
        member = self._detach(old, key)
        descriptor = member.descriptor if member.descriptor is not None else descriptor
        if not old.members:
            self._drop(old)
        elif descriptor is not None:
            assert self._protos is not None
            total = self._protos[old.row] * old.norm - unit(descriptor)
            old.norm = float(np.linalg.norm(total))
            if old.norm > 1e-6:
                self._protos[old.row] = total / old.norm
        return old.id, replace(member, descriptor=descriptor)

    # -- loading, eviction, operator changes -------------------------------------------------------
    def add_identity(self, identity_id: int, prototype: np.ndarray, members: Sequence[Member],
                     weight: float | None = None) -> None:
        """Load an identity (e.g. from the database after a restart or when an evicted one is
        needed again). `weight` is the length of the sum of its members' unit descriptors
        (default: the member count), i.e. how much the prototype resists a new member."""
        if not members:
            raise ValueError(f"identity {identity_id} needs at least one member")
        self._create(identity_id, prototype,
                     max(float(len(members) if weight is None else weight), 1e-6), members)

    def remove_identity(self, identity_id: int) -> None:
        """Forget an identity (deleted by retention); a no-op when it is not in memory."""
        identity = self._identities.get(identity_id)
        if identity is not None:
            self._drop(identity)

    def evict(self, now: float) -> list[int]:
        """Drop identities that no pending or future tracklet can reach any more: last seen more
        than time_window + pending limit before `now`. Returns their ids (reload with
        `add_identity` if needed)."""
        if self.config.time_window is None:
            return []
        horizon = now - self.config.time_window - (self.config.pending_limit or 0.0)
        used = self._row_id[:self._rows] >= 0
        rows = np.flatnonzero(used & (self._last[:self._rows] < horizon))
        evicted = [int(self._row_id[row]) for row in rows]
        for identity_id in evicted:
            self._drop(self._identities[identity_id])
        if evicted and self._on_evict is not None:
            self._on_evict(evicted)
        return evicted

    def merge(self, keep_id: int, merged_id: int) -> None:
        """Operator merge (must-link of two identities): `merged_id`'s members count for
        `keep_id` from now on."""
        for forbidden in self._cannot.values():
            if merged_id in forbidden:
                forbidden.discard(merged_id)
                forbidden.add(keep_id)
        merged = self._identities.get(merged_id)
        if merged is None or keep_id == merged_id:
            return
        keep = self._identities.get(keep_id)
        if keep is None:  # only the merged one is loaded: it continues under the kept id
            del self._identities[merged_id]
            merged.id = keep_id
            self._identities[keep_id] = merged
            self._row_id[merged.row] = keep_id
            for member in merged.members:
                self._member_of[member.key] = keep_id
            return
        assert self._protos is not None
        self._learn_transit(keep.members, merged.members)
        total = self._protos[keep.row] * keep.norm + self._protos[merged.row] * merged.norm
        keep.norm = float(np.linalg.norm(total))
        self._protos[keep.row] = total / max(keep.norm, 1e-12)
        members = list(merged.members)
        self._drop(merged)
        for member in members:
            self._attach(keep, member)

    def split(self, key: int, new_id: int, descriptor: np.ndarray | None = None) -> None:
        """Operator split: tracklet `key` leaves its identity for `new_id` and never rejoins the old
        one (cannot-link). Pass `descriptor` when the member was loaded without one, so that it
        also leaves the old prototype and founds the new one."""
        if key not in self._member_of:
            return
        identity = self._identities[self._member_of[key]]
        if descriptor is None and next(m for m in identity.members if m.key == key).descriptor \
                is None:  # a reloaded member: the old prototype is the best guess of its look
            descriptor = self.prototype(identity.id)
        old_id, member = self._take_out(key, descriptor)
        self._cannot.setdefault(key, set()).add(old_id)
        self._cannot[key].discard(new_id)
        self._admit(new_id, member)

    def must_link(self, key: int, identity_id: int) -> None:
        """Operator confirmation: tracklet `key` (pending or a member elsewhere) belongs to
        `identity_id` (founded by the tracklet if not in memory)."""
        self._cannot.get(key, set()).discard(identity_id)
        pending = self._pending.pop(key, None)
        if pending is not None:
            s = pending.summary
            member = Member(s.key, s.camera_id, s.first_time, s.last_time, s.descriptor)
        elif key in self._member_of and self._member_of[key] != identity_id:
            _, member = self._take_out(key)
            if member.descriptor is None:
                raise ValueError(f"tracklet {key} has no descriptor in memory to move")
        else:
            return
        self._admit(identity_id, member)

    def cannot_link(self, key: int, identity_id: int) -> None:
        """Operator rejection: tracklet `key` must never join `identity_id` (for a member of that
        identity use `split`)."""
        if self._member_of.get(key) == identity_id:
            raise ValueError(f"tracklet {key} is in identity {identity_id}: use split()")
        self._cannot.setdefault(key, set()).add(identity_id)

    # -- transit prior -----------------------------------------------------------------------------
    def _learn_transit(self, members: Sequence[Member], joining: Sequence[Member]) -> None:
        fastest: dict[tuple[str, str], float] = {}
        for a in joining:
            for b in members:
                if a.camera_id != b.camera_id:
                    pair = tuple(sorted((a.camera_id, b.camera_id)))
                    gap = _gap(a.first_time, a.last_time, b.first_time, b.last_time)
                    fastest[pair] = min(gap, fastest.get(pair, math.inf))  # type: ignore[index]
        for pair, gap in fastest.items():
            old = self._transit.get(pair)
            self._transit[pair] = (TransitStat(gap, 1) if old is None else
                                   TransitStat(min(old.fastest, gap), old.links + 1))

    def _transit_limits(self, camera_id: str) -> list[tuple[str, float]]:
        """(other camera, smallest allowed gap) for pairs with a learned positive transit."""
        if not self.config.transit_prior:
            return []
        limits = []
        for (a, b), stat in self._transit.items():
            if camera_id in (a, b) and a != b and stat.links >= self.config.transit_min_links \
                    and stat.fastest > 0:
                limits.append((b if a == camera_id else a, self.config.transit_slack * stat.fastest))
        return limits

    # -- linking -----------------------------------------------------------------------------------
    def link(self, tracklets: Sequence[TrackletSummary], now: float | None = None) -> list[Decision]:
        """Submit finished tracklets (a key already pending is replaced: more clips = more
        evidence) and re-decide every pending one. Returns the "new"/"linked" decisions in the
        order recorded, then one "pending" decision per tracklet still unlinked. `now` (wall
        clock) defaults to the latest time seen."""
        for tracklet in tracklets:
            if tracklet.key in self._member_of:
                raise ValueError(f"tracklet {tracklet.key} is already in identity "
                                 f"{self._member_of[tracklet.key]}")
            self._ensure_dim(len(tracklet.descriptor))
            summary = replace(tracklet, descriptor=unit(tracklet.descriptor), clips=None,
                              clip_times=None)
            pending = self._pending.get(tracklet.key)
            if pending is None:
                self._arrivals += 1
                pending = self._pending[tracklet.key] = _Pending(summary, self._arrivals)
            pending.summary = summary
            clips = 0 if tracklet.clips is None else len(tracklet.clips)
            if clips > pending.clips and tracklet.clip_times is not None:
                gap = genuine_distance(tracklet.clips, tracklet.clip_times,
                                       self.config.min_genuine_gap)
                if gap is not None:
                    self.calibrator.add_genuine(gap)
                    pending.clips = clips
            self._clock = max(self._clock, tracklet.last_time)
        now = self._clock if now is None else now
        self._clock = max(self._clock, now)
        self.evict(now)
        decisions: list[Decision] = []
        last_look: dict[int, Decision] = {}
        while self._pending:
            placed = self._round(now, decisions, last_look)
            if not placed:
                break
        return decisions + [last_look[key] for key in self._pending]

    def flush(self) -> list[Decision]:
        """Every pending tracklet opens its own identity (e.g. at the end of a recording)."""
        decisions = []
        for key in list(self._pending):
            pending = self._pending[key]
            decisions.append(self._open(pending, Decision(
                key, "new", None, None, None, None, None, None, "flushed while unlinked")))
        return decisions

    def _round(self, now: float, decisions: list[Decision],
               last_look: dict[int, Decision]) -> bool:
        """One matrix product of all pending tracklets against the identities (and one among
        themselves), the rule for every one of them at once, then what it allows is recorded.
        True if anything was placed."""
        queue = sorted(self._pending.values(), key=lambda p: (p.summary.first_time, p.order))
        summaries = [p.summary for p in queue]
        assert self._protos is not None
        queries = np.stack([s.descriptor for s in summaries])
        n = self._rows
        to_identities = distances(queries, self._protos[:n])
        to_pending = distances(queries, queries)
        allowed_identities = np.stack([self._allowed_rows(s) for s in summaries])
        allowed_pending, clash = self._allowed_pending(summaries)
        self._harvest_impostors(queue, to_identities, to_pending, clash)

        ready = self.calibrator.ready
        near_identities = np.where(allowed_identities, to_identities, np.inf)
        near_pending = np.where(allowed_pending, to_pending, np.inf)
        cross_identities, cross_pending = self._cross_camera(summaries)
        identities = self._candidates(near_identities, to_identities, 0, ready, cross_identities)
        pending = self._candidates(near_pending, to_pending, n, ready, cross_pending)
        among_identities = self._stage(identities)
        among_all = self._stage(identities, pending)
        rows = np.arange(len(queue))
        mutual_identity = (np.argmin(near_identities, axis=0)[among_identities.best] == rows
                           if n else np.zeros(len(rows), dtype=bool))
        partner = np.where(among_all.best >= n, among_all.best - n, rows)
        mutual_pending = (among_all.best >= n) & (among_all.best[partner] == n + rows)

        eligible: list[tuple[int, str, int, float]] = []  # (query, kind, target, distance)
        openings: list[tuple[int, Decision]] = []
        looks: list[Decision] = []
        limit = self.config.pending_limit
        for i, s in enumerate(summaries):
            aged = limit is not None and s.last_time < now - limit
            look, opening = self._decide(i, s, queue, n, among_identities, among_all,
                                         bool(mutual_identity[i]), bool(mutual_pending[i]),
                                         aged, eligible)
            looks.append(look)
            last_look[s.key] = look
            if opening is not None:
                openings.append((i, opening))
        if self._place_links(self._assign(eligible), queue, looks, decisions):
            return True
        for i, opening in openings:
            decisions.append(self._open(queue[i], opening))
        return bool(openings)

    def _cross_camera(self, summaries: list[TrackletSummary]) -> tuple[np.ndarray | None, np.ndarray | None]:
        """Which candidates are in other cameras only: identity rows with no member in the
        query's camera ([Q, rows]) and pending tracklets of other cameras ([Q, Q]); None while
        the calibration has no cross-camera genuine labels (every pair judged alike)."""
        if not self.calibrator.cross_ready:
            return None, None
        cameras = np.array([s.camera_id for s in summaries])
        to_identities = np.ones((len(summaries), self._rows), dtype=bool)
        for camera in np.unique(cameras):
            intervals = self._cameras.get(str(camera))
            if intervals is not None:
                rows = intervals.rows_near(-math.inf, math.inf)
                to_identities[np.ix_(cameras == camera, rows[rows < self._rows])] = False
        return to_identities, cameras[:, None] != cameras[None, :]

    def _candidates(self, near: np.ndarray, distances_: np.ndarray, offset: int,
                    ready: bool, cross: np.ndarray | None = None) -> _Candidates:
        """Per row of `near` ([Q, C] distances, inf where not allowed): closest, second and the
        evidence sum. One pass each over the (possibly 100k-wide) rows. `cross` ([Q, C] bool):
        pairs judged with the cross-camera genuine distribution."""
        q, c = near.shape
        rows = np.arange(q)
        if c == 0:
            none = np.full(q, np.inf)
            return _Candidates(np.zeros(q, dtype=np.int64), none, none, np.zeros(q),
                               -none, -none)
        best = np.argmin(near, axis=1)
        nearest = near[rows, best]
        second = np.partition(near, 1, axis=1)[:, 1] if c > 1 else np.full(q, np.inf)
        count = np.isfinite(near).sum(axis=1)
        if not ready:
            nan = np.full(q, np.nan)
            return _Candidates(best + offset, nearest, second, count, nan, nan)
        llr = self.calibrator.log_likelihood_ratio(distances_)
        if cross is not None and cross.any():
            llr = np.where(cross, self.calibrator.log_likelihood_ratio(distances_, cross=True), llr)
        evidence = logsumexp(np.where(np.isfinite(near), llr, -np.inf), axis=1)
        return _Candidates(best + offset, nearest, second, count, evidence, llr[rows, best])

    def _stage(self, *sets: _Candidates) -> _Stage:
        """The rule's inputs for a candidate set made of `sets`: closest, margin, and the
        posterior (1 - P(closest is the person), P(none is)) under "at most one of the
        `count` allowed candidates is this person, with prior `prior_same`"."""
        nearest = np.stack([s.nearest for s in sets])
        pick = np.argmin(nearest, axis=0)
        rows = np.arange(nearest.shape[1])
        best = np.stack([s.best for s in sets])[pick, rows]
        ordered = np.sort(np.concatenate([nearest, np.stack([s.second for s in sets])]), axis=0)
        with np.errstate(invalid="ignore"):  # inf - inf: no candidate at all
            margin = np.where(np.isfinite(ordered[1]), ordered[1] - ordered[0], np.inf)
        if not self.calibrator.ready:
            nan = np.full(len(rows), np.nan)
            return _Stage(best, ordered[0], margin, nan, nan)
        prior = self.config.prior_same
        count = np.maximum(sum(s.count for s in sets), 1)
        log_prior = np.log(prior / count)
        log_none = math.log(1 - prior)
        evidence = np.logaddexp.reduce(np.stack([s.evidence for s in sets]), axis=0)
        log_total = np.logaddexp(log_none, evidence + log_prior)
        best_llr = np.stack([s.best_llr for s in sets])[pick, rows]
        false_link = -np.expm1(best_llr + log_prior - log_total)
        return _Stage(best, ordered[0], margin, false_link, np.exp(log_none - log_total))

    def _decide(self, i: int, s: TrackletSummary, queue: list[_Pending], n: int,
                among_identities: _Stage, among_all: _Stage, mutual_identity: bool,
                mutual_pending: bool, aged: bool,
                eligible: list[tuple[int, str, int, float]]) -> tuple[Decision, Decision | None]:
        """Query i's pending decision (the evidence about its best candidate) and, if it opens
        its own identity this round, that "new" decision. Appends the links the rule allows:
        to the best identity judged among identities only (pending fragments of that person
        must not make it look ambiguous), or to a pending tracklet judged among everything."""
        if not np.isfinite(among_all.distance[i]):
            look = Decision(s.key, "pending", None, None, None, None, None, None, "no candidates")
            return look, replace(look, kind="new")
        best = int(among_all.best[i])
        if not self.calibrator.ready:
            look = self._evidence(s.key, best, n, queue, among_all, i,
                                  self.calibrator.status() + "; not linking")
            return look, (replace(look, kind="new", reason="aged out unlinked: " + look.reason)
                          if aged else None)
        looks = []
        if np.isfinite(among_identities.distance[i]):
            ok, reason = self._rule(among_identities, i, mutual_identity)
            target = int(among_identities.best[i])
            looks.append(self._evidence(s.key, target, n, queue, among_identities, i, reason))
            if ok:
                eligible.append((i, "identity", target, float(among_identities.distance[i])))
        if best >= n:
            ok, reason = self._rule(among_all, i, mutual_pending)
            looks.append(self._evidence(s.key, best, n, queue, among_all, i, reason))
            if ok:
                eligible.append((i, "pending", best - n, float(among_all.distance[i])))
        look = min(looks, key=lambda d: d.false_link if d.false_link is not None else 1.0)
        if eligible and eligible[-1][0] == i:
            return look, None
        p_none = float(among_all.p_none[i])
        if p_none >= 1 - self.config.target_false_link:
            return look, replace(look, kind="new", reason=f"confidently nobody known "
                                 f"({p_none:.1%} sure)")
        if aged:
            return look, replace(look, kind="new", reason="aged out unlinked: " + look.reason)
        return look, None

    def _rule(self, stage: _Stage, i: int, mutual: bool) -> tuple[bool, str]:
        target, margin = self.config.target_false_link, self.config.margin
        false_link, gap = float(stage.false_link[i]), float(stage.margin[i])
        if false_link >= target:
            return False, f"false-link probability {false_link:.1%} >= target {target:.1%}"
        if gap < margin:
            return False, f"ambiguous: second candidate only {gap:.3f} farther (margin {margin})"
        if self.config.mutual and not mutual:
            return False, "not mutual: another pending tracklet is closer to that candidate"
        return True, "linked"

    def _evidence(self, key: int, column: int, n: int, queue: list[_Pending], stage: _Stage,
                  i: int, reason: str) -> Decision:
        """A "pending" decision about candidate `column` (an identity row below n, else the
        pending tracklet column - n) with the stage's numbers for query i."""
        candidate = int(self._row_id[column]) if column < n else None
        tracklet = queue[column - n].summary.key if column >= n else None
        margin, false_link = float(stage.margin[i]), float(stage.false_link[i])
        return Decision(key, "pending", None, float(stage.distance[i]), candidate, tracklet,
                        margin if np.isfinite(margin) else None,
                        false_link if np.isfinite(false_link) else None, reason)

    def _assign(self, eligible: list[tuple[int, str, int, float]]) -> list[tuple[int, str, int]]:
        """Cost-minimising one-to-one choice among pairs that each passed the rule (each query has
        at most one such pair per kind, its best, so nobody is traded to a second choice)."""
        if not eligible:
            return []
        rows = sorted({e[0] for e in eligible})
        targets = sorted({(e[1], e[2]) for e in eligible})
        cost = np.full((len(rows), len(targets)), np.inf)
        for i, kind, target, d in eligible:
            r, t = rows.index(i), targets.index((kind, target))
            cost[r, t] = min(cost[r, t], d)
        big = 4.0 * (1 + len(rows))  # above any sum of real distances (each <= 2)
        chosen = linear_sum_assignment(np.where(np.isfinite(cost), cost, big))
        pairs = [(cost[r, t], rows[r], targets[t]) for r, t in zip(*chosen) if np.isfinite(cost[r, t])]
        return [(i, kind, target) for _, i, (kind, target) in sorted(pairs)]

    def _place_links(self, links: list[tuple[int, str, int]], queue: list[_Pending],
                     looks: list[Decision], decisions: list[Decision]) -> int:
        """Record the chosen links, cheapest first. A pending pair seen from both ends is placed
        once; a link to a pending tracklet that itself links elsewhere waits for the next round.
        Returns how many links were placed."""
        wants = {i: (kind, target) for i, kind, target in links}
        touched: set[int] = set()
        placed = 0
        for i, kind, target in links:
            if i in touched:
                continue
            look = looks[i]
            if kind == "identity":
                identity_id = int(self._row_id[target])
                decisions.append(self._join(queue[i], replace(
                    look, kind="linked", identity_id=identity_id, candidate=identity_id,
                    candidate_tracklet=None, reason="linked")))
            else:
                if target in touched or wants.get(target, ("pending", i)) != ("pending", i):
                    continue
                key, partner = queue[i].summary.key, queue[target].summary.key
                opened = self._open(queue[target], Decision(
                    partner, "new", None, look.distance, None, key, look.margin, look.false_link,
                    f"opened with tracklet {key}"))
                decisions.append(opened)
                assert opened.identity_id is not None
                decisions.append(self._join(queue[i], replace(
                    look, kind="linked", identity_id=opened.identity_id,
                    candidate=opened.identity_id, reason=f"linked with tracklet {partner}")))
                touched.add(target)
            touched.add(i)
            placed += 1
        return placed

    def _open(self, pending: _Pending, proposed: Decision) -> Decision:
        """Record a "new" decision, then found the identity (or join the one `record` named)."""
        identity_id = self._record(replace(proposed, identity_id=None))
        self._admit(identity_id, self._as_member(pending))
        return replace(proposed, identity_id=identity_id)

    def _join(self, pending: _Pending, proposed: Decision) -> Decision:
        """Record a "linked" decision, then add the tracklet to the identity `record` returned."""
        identity_id = self._record(proposed)
        self._admit(identity_id, self._as_member(pending))
        return replace(proposed, identity_id=identity_id, candidate=identity_id)

    def _as_member(self, pending: _Pending) -> Member:
        s = pending.summary
        del self._pending[s.key]
        return Member(s.key, s.camera_id, s.first_time, s.last_time, s.descriptor)

    # -- constraints -------------------------------------------------------------------------------
    def _allowed_rows(self, s: TrackletSummary) -> np.ndarray:
        """Identity rows this tracklet may join: used, within the time window, no same-camera
        overlap, transit-possible, not rejected by an operator."""
        n = self._rows
        allowed = self._row_id[:n] >= 0
        window = self.config.time_window
        if window is not None:
            allowed &= (self._last[:n] >= s.first_time - window) & (self._first[:n] <= s.last_time
                                                                    + window)
        same = self._cameras.get(s.camera_id)
        if same is not None:
            allowed[same.rows_near(s.first_time, s.last_time)] = False
        for other, limit in self._transit_limits(s.camera_id):
            intervals = self._cameras.get(other)
            if intervals is not None:  # gap < limit <=> interval touches [first - limit, last + limit]
                allowed[intervals.rows_near(s.first_time - limit + 1e-9,
                                            s.last_time + limit - 1e-9)] = False
        for identity_id in self._cannot.get(s.key, ()):
            identity = self._identities.get(identity_id)
            if identity is not None:
                allowed[identity.row] = False
        return allowed

    def _allowed_pending(self, summaries: list[TrackletSummary]) -> tuple[np.ndarray, np.ndarray]:
        """Which pending tracklets may link to which ([Q, Q]), and which clash (same camera,
        overlapping in time: impostor pairs)."""
        first = np.array([s.first_time for s in summaries])
        last = np.array([s.last_time for s in summaries])
        names, codes = np.unique([s.camera_id for s in summaries], return_inverse=True)
        gap = np.maximum(first[:, None] - last[None, :], first[None, :] - last[:, None])
        clash = (codes[:, None] == codes[None, :]) & (gap <= 0)
        np.fill_diagonal(clash, False)
        allowed = ~clash
        np.fill_diagonal(allowed, False)
        if self.config.time_window is not None:
            allowed &= gap <= self.config.time_window
        present = {str(name): code for code, name in enumerate(names)}
        for camera, code in present.items():
            for other, limit in self._transit_limits(camera):
                if other in present:
                    block = np.ix_(codes == code, codes == present[other])
                    allowed[block] &= gap[block] >= limit
        return allowed, clash

    def _harvest_impostors(self, queue: list[_Pending], to_identities: np.ndarray,
                           to_pending: np.ndarray, clash: np.ndarray) -> None:
        """Impostor labels from tracklets seen for the first time: identities holding a
        same-camera member overlapping them, and clashing pending tracklets (each pair once)."""
        fresh = np.array([p.fresh for p in queue])
        labels = [to_pending[clash & fresh[:, None] & (~fresh[None, :]
                                                       | np.tri(len(queue), k=-1, dtype=bool))]]
        for i in np.flatnonzero(fresh):
            s = queue[i].summary
            same = self._cameras.get(s.camera_id)
            if same is not None:
                labels.append(to_identities[i, same.rows_near(s.first_time, s.last_time)])
            queue[i].fresh = False
        self.calibrator.add_impostor(np.concatenate(labels))
