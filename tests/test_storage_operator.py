"""The operator's decisions in storage (confirm = must-link, reject = cannot-link), the unlinked
tracklets waiting for them, and what a restarted linker loads to continue identities."""
from __future__ import annotations

import numpy as np
import pytest

from storage import NewClip, StorageError, open_repository
from storage.similarity import tracklet_descriptor, unit

UNSURE = {"reason": "aged out unlinked: not calibrated"}
SURE = {"reason": "confidently nobody known (false link 0.001)"}


@pytest.fixture
def repo(db_url):
    with open_repository(db_url) as r:
        r.upsert_camera("a")
        r.upsert_camera("b")
        yield r


def _tracklet(repo, run, camera, track, first, last, *, finished=True):
    tracklet = repo.add_tracklet(run, camera, track, 0, first, last_time=last, finished=finished,
                                 first_wall_time=first, last_wall_time=last)
    return tracklet


def test_confirm_moves_a_lone_tracklet_and_merges_its_identity_away(repo):
    run = repo.start_run({})
    anchor, lone = _tracklet(repo, run, "a", 1, 0, 5), _tracklet(repo, run, "b", 1, 20, 25)
    target = repo.open_identity(anchor, evidence=UNSURE)
    own = repo.open_identity(lone, evidence=UNSURE)
    assert repo.confirm_link(lone, target, note="same coat") == target
    assert repo.get_tracklet(lone).identity_id == target
    assert repo.get_identity(own).merged_into == target
    decision = repo.link_decisions(tracklet_id=lone)[-1]
    assert (decision.kind, decision.identity_id, decision.candidate_identity_id, decision.note) \
        == ("confirmed", target, own, "same coat")
    assert repo.confirm_link(lone, own) == target  # merges are followed: already there


def test_confirm_moves_a_member_out_of_a_larger_identity_without_touching_the_rest(repo):
    run = repo.start_run({})
    a, b, c = (_tracklet(repo, run, cam, i, 10 * i, 10 * i + 5)
               for i, cam in enumerate("aba"))
    first = repo.open_identity(a)
    repo.assign_identity(b, first)
    other = repo.open_identity(c)
    repo.confirm_link(b, other)
    assert [t.id for t in repo.identity_members(first)] == [a]
    assert repo.get_identity(first).merged_into is None
    assert sorted(t.id for t in repo.identity_members(other)) == [b, c]


def test_reject_records_a_cannot_link_and_refuses_a_member(repo):
    run = repo.start_run({})
    a, b = _tracklet(repo, run, "a", 1, 0, 5), _tracklet(repo, run, "b", 1, 20, 25)
    identity = repo.open_identity(a)
    repo.reject_link(b, identity, note="different shoes")
    assert repo.get_tracklet(b).identity_id is None
    assert repo.rejected_identities(b) == {identity}
    (decision,) = repo.link_decisions(tracklet_id=b)
    assert (decision.kind, decision.identity_id) == ("rejected", identity)
    with pytest.raises(StorageError, match="split it out"):
        repo.reject_link(a, identity)
    keep = repo.open_identity(_tracklet(repo, run, "a", 2, 40, 45))
    repo.merge_identities(keep, identity)
    assert repo.rejected_identities(b) == {keep}  # the rejection follows the merge


def test_unlinked_lists_what_the_linker_left_alone_newest_first(repo):
    run = repo.start_run({})
    pending = _tracklet(repo, run, "a", 1, 0, 5)  # no identity yet: the linker holds it
    unsure = _tracklet(repo, run, "b", 1, 10, 15)
    repo.open_identity(unsure, evidence=UNSURE)
    sure = _tracklet(repo, run, "a", 2, 20, 25)
    repo.open_identity(sure, evidence=SURE)
    _tracklet(repo, run, "b", 2, 30, 35, finished=False)  # still being tracked
    linked = _tracklet(repo, run, "a", 3, 40, 45)
    grown = _tracklet(repo, run, "b", 3, 50, 55)
    repo.assign_identity(linked, repo.open_identity(grown, evidence=UNSURE))  # two members now
    assert [t.id for t in repo.unlinked_tracklets()] == [unsure, pending]
    assert repo.count_unlinked() == 2
    assert [t.id for t in repo.unlinked_tracklets(camera_ids=["a"])] == [pending]
    assert [t.id for t in repo.unlinked_tracklets(offset=1, limit=5)] == [pending]
    assert [t.id for t in repo.unlinked_tracklets(time_range=(12.0, 14.0))] == [unsure]
    assert repo.count_unlinked(time_range=(100.0, 200.0)) == 0
    repo.confirm_link(unsure, repo.get_tracklet(grown).identity_id)
    assert [t.id for t in repo.unlinked_tracklets()] == [pending]


def test_recent_identities_carry_unit_member_descriptors_of_one_model(repo):
    run = repo.start_run({})
    rng = np.random.default_rng(0)
    old = _tracklet(repo, run, "a", 1, 0, 5)
    a, b = _tracklet(repo, run, "a", 2, 100, 105), _tracklet(repo, run, "b", 1, 120, 125)
    other_model = _tracklet(repo, run, "b", 2, 130, 135)
    clips = {t: rng.normal(size=(3, 8)).astype(np.float32) for t in (old, a, b, other_model)}
    repo.add_clips([NewClip(t, [0, 1, 2, 3], 0.0, 1.0, d, "m1" if t != other_model else "m2")
                    for t, rows in clips.items() for d in rows])
    repo.open_identity(old)
    identity = repo.open_identity(a)
    repo.assign_identity(b, identity)
    repo.assign_identity(other_model, identity)
    (snapshot,) = repo.recent_identities(since=50.0, model_id="m1")
    assert snapshot.identity_id == identity
    assert [(m.tracklet_id, m.camera_id, m.first_time, m.last_time) for m in snapshot.members] \
        == [(a, "a", 100.0, 105.0), (b, "b", 120.0, 125.0)]
    for member in snapshot.members:
        np.testing.assert_allclose(member.descriptor, tracklet_descriptor(clips[member.tracklet_id]),
                                   atol=2e-3)  # float16 storage
        np.testing.assert_allclose(np.linalg.norm(member.descriptor), 1.0, atol=1e-5)
    assert len(repo.recent_identities(since=0.0, model_id="m1")) == 2
    assert repo.recent_identities(since=50.0, model_id="m3") == []
    assert unit(snapshot.members[0].descriptor).shape == (8,)


def test_a_rejected_candidate_leaves_the_tracklet_unlinked(repo):
    run = repo.start_run({})
    a, b = _tracklet(repo, run, "a", 1, 0, 5), _tracklet(repo, run, "b", 1, 20, 25)
    candidate = repo.open_identity(a, evidence=UNSURE)
    repo.open_identity(b, evidence=UNSURE)
    repo.reject_link(b, candidate)
    assert [t.id for t in repo.unlinked_tracklets()] == [b, a]
