"""Identity linking with synthetic descriptors of known people across two cameras."""
from __future__ import annotations

import numpy as np
import pytest

from app.linking import Linker, TrackletSummary, assign, normalise, tracklet_descriptor

DIM = 64


def _people(count: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(count, DIM)).astype(np.float32)


def _tracklet(key: int, camera: str, t0: float, t1: float, person: np.ndarray,
              noise: float = 0.1, seed: int = 0, clips: int = 3) -> TrackletSummary:
    rng = np.random.default_rng(seed + 1000 * key)
    # un-normalised clip descriptors of varying scale: linking must not care about the norm
    descriptors = person[None] * rng.uniform(0.5, 3.0, size=(clips, 1)) + noise * rng.normal(
        size=(clips, DIM)) * np.linalg.norm(person) / np.sqrt(DIM)
    return TrackletSummary(key, camera, t0, t1, tracklet_descriptor(descriptors))


def test_tracklet_descriptor_is_the_normalised_mean():
    clips = np.array([[3.0, 0.0], [1.0, 0.0], [0.0, 2.0]], dtype=np.float32)
    np.testing.assert_allclose(tracklet_descriptor(clips), normalise(np.array([4.0, 2.0])), atol=1e-6)
    with pytest.raises(ValueError):
        tracklet_descriptor(np.zeros((0, 4)))


def test_known_people_are_linked_across_two_cameras():
    people = _people(5)
    linker = Linker(threshold=0.8, time_window=None)
    # camera A sees everyone first, camera B later in another order, one tracklet at a time
    decisions = []
    for key, p in enumerate(range(5)):
        decisions += linker.link([_tracklet(key, "A", 10 * p, 10 * p + 5, people[p])])
    order = [3, 0, 4, 1, 2]
    for key, p in enumerate(order, start=10):
        decisions += linker.link([_tracklet(key, "B", 100 + key, 105 + key, people[p])])
    by_key = {d.key: d for d in decisions}
    assert all(by_key[k].kind == "new" for k in range(5))
    for key, p in enumerate(order, start=10):
        assert by_key[key].kind == "linked"
        assert by_key[key].identity_id == by_key[p].identity_id
        assert 0 <= by_key[key].distance < 0.8
    assert len(linker.identities) == 5


def test_a_batch_is_assigned_jointly_and_one_to_one():
    people = _people(4, seed=3)
    linker = Linker(threshold=0.9)
    first = linker.link([_tracklet(k, "A", 0, 10, people[k]) for k in range(4)])
    assert [d.kind for d in first] == ["new"] * 4
    # the whole of camera B arrives at once (e.g. the end-of-source flush)
    second = linker.link([_tracklet(10 + k, "B", 0, 10, people[k]) for k in (2, 0, 3, 1)])
    ids = {d.key: d.identity_id for d in first + second}
    for k in range(4):
        assert ids[10 + k] == ids[k]
    assert len({d.identity_id for d in second}) == 4


def test_people_seen_in_both_cameras_in_one_batch_are_linked_to_each_other():
    people = _people(2, seed=5)
    linker = Linker(threshold=0.9)
    batch = [_tracklet(1, "A", 0, 10, people[0]), _tracklet(2, "B", 1, 9, people[0]),
             _tracklet(3, "A", 0, 10, people[1]), _tracklet(4, "B", 2, 8, people[1])]
    ids = {d.key: d.identity_id for d in linker.link(batch)}
    assert ids[1] == ids[2] and ids[3] == ids[4] and ids[1] != ids[3]


def test_same_camera_overlapping_tracklets_are_never_merged():
    person = _people(1, seed=7)[0]
    linker = Linker(threshold=1.9)  # a threshold that would accept anything
    decisions = linker.link([_tracklet(1, "A", 0, 10, person)])
    decisions += linker.link([_tracklet(2, "B", 0, 10, person)])  # joins 1's identity
    # the same look again in camera A while tracklet 1 is there: cannot be the same identity
    decisions += linker.link([_tracklet(3, "A", 5, 15, person, seed=1)])
    ids = {d.key: d.identity_id for d in decisions}
    assert ids[2] == ids[1]
    assert ids[3] != ids[1]
    # two overlapping tracklets of camera B in one batch cannot both join identity 1
    more = linker.link([_tracklet(4, "B", 20, 30, person, seed=2),
                        _tracklet(5, "B", 25, 35, person, seed=3)])
    chosen = [d.identity_id for d in more]
    assert len(set(chosen)) == 2
    for identity in linker.identities.values():
        members = identity.members
        for i, a in enumerate(members):
            for b in members[i + 1:]:
                assert not (a.camera_id == b.camera_id and a.first_time <= b.last_time
                            and b.first_time <= a.last_time)


def test_far_descriptors_and_old_identities_open_new_identities():
    people = _people(2, seed=9)
    linker = Linker(threshold=0.5, time_window=60.0)
    linker.link([_tracklet(1, "A", 0, 10, people[0])])
    stranger = linker.link([_tracklet(2, "B", 0, 10, people[1])])[0]
    assert stranger.kind == "new" and stranger.candidate == 1 and stranger.distance > 0.5
    late = linker.link([_tracklet(3, "B", 500, 510, people[0])])[0]
    assert late.kind == "new" and late.candidate is None  # identity 1 is outside the window


def test_assign_respects_the_threshold():
    distances = np.array([[0.1, 0.9], [0.2, 0.3]])
    assert assign(distances, threshold=0.5) == [(0, 0), (1, 1)]
    assert assign(distances, threshold=0.15) == [(0, 0)]
    assert assign(np.zeros((0, 3)), threshold=1.0) == []


def test_a_failing_record_leaves_memory_as_recorded_and_the_rest_unplaced():
    people = _people(3)
    recorded = []

    def record(decision):
        if len(recorded) == 2:
            raise RuntimeError("database or disk is full")
        recorded.append(decision)
        return decision.identity_id or 100 + len(recorded)

    linker = Linker(threshold=0.8, record=record)
    tracklets = [_tracklet(k, "a", k, k + 0.5, people[k]) for k in range(3)]
    with pytest.raises(RuntimeError, match="disk is full"):
        linker.link(tracklets)
    assert [d.key for d in recorded] == [0, 1]
    assert sorted(linker.identities) == [101, 102]
    assert [m.key for i in linker.identities.values() for m in i.members] == [0, 1]
    (decision,) = Linker(threshold=0.8, record=lambda d: 7).link([tracklets[2]])
    assert (decision.kind, decision.identity_id) == ("new", 7)


def test_operator_merges_and_splits_are_respected_by_later_links():
    people = _people(2)
    linker = Linker(threshold=0.8)
    a0, a1 = _tracklet(1, "a", 0, 5, people[0]), _tracklet(2, "a", 10, 15, people[1])
    first = {d.key: d.identity_id for d in linker.link([a0, a1])}
    linker.merge(first[1], first[2])  # the operator says: one person after all
    assert list(linker.identities) == [first[1]]
    assert {m.key for m in linker.identities[first[1]].members} == {1, 2}
    linker.split(2, new_id=50)  # ... and then changes their mind
    assert {m.key for m in linker.identities[first[1]].members} == {1}
    assert [m.key for m in linker.identities[50].members] == [2]
    (later,) = linker.link([_tracklet(3, "b", 20, 25, people[1])])
    assert (later.kind, later.identity_id) == ("linked", 50)
