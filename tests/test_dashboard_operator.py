"""The operator's view of identity linking (issue 9): an identity's journey across cameras, the
unlinked tracklets with candidates to confirm or reject, and the model-separation gauge.

The database: three cameras on the wall clock; person A seen at the gate, the hall and the yard
(the hall tracklet is stored first but seen later, the yard one confirmed by an operator);
people B and C on the gate and the hall; tracklet U (the yard, looks like B) left alone by an
unsure linker, and tracklet P (the yard, looks like C) still pending in a running watcher.
"""
from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from test_dashboard_pages import COLOURS, app_for, texts, thumbnail

from storage import NewClip, open_repository
from storage.similarity import similarity_percent

DAY = 1_798_000_000.0  # 2026-12-23 UTC
MODEL_ID = "operator-test@64"
DIM = 64
UNSURE = "aged out unlinked: false-link probability 12.0% >= target 1.0%"


@dataclass(frozen=True)
class Scene:
    url: str
    path: Path
    tracklets: dict[str, int]
    identities: dict[str, int]


def build_scene(path: Path, calibration: dict | None = None) -> Scene:
    url = f"sqlite:///{path}"
    rng = np.random.default_rng(2)
    people = {p: rng.normal(size=DIM).astype(np.float32) for p in "ABC"}
    ids: dict[str, int] = {}
    identities: dict[str, int] = {}
    with open_repository(url) as repo:
        repo.acquire_writer("test")
        run = repo.start_run({})
        for camera in ("gate", "hall", "yard"):
            repo.upsert_camera(camera, name=camera.title(), source=f"{camera}.mp4")
            repo.update_camera_status(camera, status="running", last_frame_wall_time=DAY + 900)

        def tracklet(name: str, camera: str, start: float, person: str,
                     colour: int) -> None:
            wall = DAY + start
            tid = repo.add_tracklet(run, camera, len(ids) + 1, 0, 0.0, last_frame=40,
                                    last_time=4.0, finished=True, first_wall_time=wall,
                                    last_wall_time=wall + 4.0, thumbnail=thumbnail(COLOURS[colour]))
            repo.add_clips([NewClip(tid, [1, 2, 3, 4], float(c), c + 1.0,
                                    people[person] + 0.05 * rng.normal(size=DIM).astype(np.float32),
                                    MODEL_ID, start_wall_time=wall + c, end_wall_time=wall + c + 1)
                            for c in range(2)])
            ids[name] = tid

        tracklet("a_hall", "hall", 120.0, "A", 0)  # stored before a_gate, seen after it
        tracklet("a_gate", "gate", 0.0, "A", 0)
        tracklet("a_yard", "yard", 300.0, "A", 0)
        tracklet("b_gate", "gate", 400.0, "B", 1)
        tracklet("b_hall", "hall", 500.0, "B", 1)
        tracklet("c_gate", "gate", 450.0, "C", 2)
        tracklet("c_hall", "hall", 550.0, "C", 2)
        tracklet("u", "yard", 700.0, "B", 1)
        tracklet("p", "yard", 800.0, "C", 2)
        identities["A"] = repo.open_identity(ids["a_gate"])
        repo.assign_identity(ids["a_hall"], identities["A"], "linked", 0.3, evidence={
            "margin": 0.4, "false_link": 0.004, "reason": "false-link 0.4% < 1%"})
        repo.open_identity(ids["a_yard"])
        repo.confirm_link(ids["a_yard"], identities["A"])
        for person in "BC":
            identities[person] = repo.open_identity(ids[f"{person.lower()}_gate"])
            repo.assign_identity(ids[f"{person.lower()}_hall"], identities[person], "linked", 0.2)
        identities["U"] = repo.open_identity(ids["u"], 0.9, evidence={"reason": UNSURE})
        if calibration is not None:
            repo.update_run_calibration(run, calibration)
    return Scene(url, path, ids, identities)


@pytest.fixture(scope="module")
def scene_template(tmp_path_factory) -> Scene:
    return build_scene(tmp_path_factory.mktemp("scene") / "keyreid.db")


@pytest.fixture
def scene(scene_template: Scene, tmp_path: Path) -> Scene:
    """A private copy (the confirm / reject tests write)."""
    path = tmp_path / "keyreid.db"
    shutil.copy(scene_template.path, path)
    return Scene(f"sqlite:///{path}", path, scene_template.tracklets, scene_template.identities)


def keys(at, prefix: str) -> set[str]:
    return {b.key for b in at.button if b.key and b.key.startswith(prefix)}


def test_journey_lists_sightings_in_time_order_with_plain_confidence(scene, monkeypatch):
    at = app_for(monkeypatch, scene.url, page="identity", identity=scene.identities["A"])
    assert not at.exception
    assert "Journey across cameras" in [s.value for s in at.subheader]
    stops = [m.value for m in at.markdown if "Link: " in m.value]
    assert [s[:len("**1. Gate (gate)**")] for s in stops] == [
        "**1. Gate (gate)**", "**2. Hall (hall)**", "**3. Yard (yard)**"]
    assert f"tracklet {scene.tracklets['a_gate']}" in stops[0]
    assert "2026-12-23 04:26:40 UTC – 2026-12-23 04:26:44 UTC (4.0 s)" in stops[0]
    assert "Link: opened this identity" in stops[0]
    hall_similarity = f"{float(similarity_percent(0.3)):.0f}% similar"
    assert f"Link: {hall_similarity}; 99.6% likely the same person" in stops[1]
    assert "Link: confirmed by an operator" in stops[2]
    captions = [c.value for c in at.caption]
    assert "↓ after 1 min 56 s, from Gate (gate) to Hall (hall)" in captions
    assert "↓ after 2 min 56 s, from Hall (hall) to Yard (yard)" in captions
    assert at.button(key="merge"), "the merge / split form is still there"


def test_unlinked_page_lists_left_alone_and_pending_tracklets_with_candidates(scene, monkeypatch):
    at = app_for(monkeypatch, scene.url, page="unlinked")
    assert not at.exception
    shown = texts(at)
    u, p = scene.tracklets["u"], scene.tracklets["p"]
    assert shown.index(f"**Tracklet {p}**") < shown.index(f"**Tracklet {u}**"), "newest first"
    assert f"left alone by the linker: {UNSURE}" in shown
    assert "pending: the running watcher has not decided on it yet" in shown
    assert "2 unlinked tracklets" in shown
    best = {f"confirm_{u}_{scene.identities['B']}", f"confirm_{p}_{scene.identities['C']}"}
    assert best <= keys(at, "confirm_"), "each one's look-alike is offered"
    assert len([k for k in keys(at, "confirm_") if k.startswith(f"confirm_{u}_")]) == 3
    assert f"confirm_{u}_{scene.identities['U']}" not in keys(at, "confirm_"), "not its own"
    assert f"**Identity {scene.identities['B']}**" in shown and "% similar" in shown


def test_confirm_moves_the_tracklet_into_the_candidate(scene, monkeypatch):
    u, b = scene.tracklets["u"], scene.identities["B"]
    at = app_for(monkeypatch, scene.url, page="unlinked")
    at.button(key=f"confirm_{u}_{b}").click().run()
    assert not at.exception
    assert f"Tracklet {u} confirmed as identity {b}." in texts(at)
    assert f"**Tracklet {u}**" not in texts(at)
    with open_repository(scene.url, readonly=True) as repo:
        assert repo.get_tracklet(u).identity_id == b
        assert repo.link_decisions(tracklet_id=u)[-1].kind == "confirmed"
        assert repo.get_identity(scene.identities["U"]).merged_into == b
        assert repo.count_unlinked() == 1


def test_reject_records_a_cannot_link_and_drops_the_candidate(scene, monkeypatch):
    u, b = scene.tracklets["u"], scene.identities["B"]
    at = app_for(monkeypatch, scene.url, page="unlinked")
    at.button(key=f"reject_{u}_{b}").click().run()
    assert not at.exception
    assert f"Tracklet {u} is not identity {b}: recorded." in texts(at)
    assert f"reject_{u}_{b}" not in keys(at, "reject_")
    assert f"reject_{u}_{scene.identities['C']}" in keys(at, "reject_"), "the others remain"
    with open_repository(scene.url, readonly=True) as repo:
        assert repo.rejected_identities(u) == {b}
        decision = repo.link_decisions(tracklet_id=u)[-1]
        assert (decision.kind, decision.identity_id) == ("rejected", b)
        assert repo.get_tracklet(u).identity_id == scene.identities["U"]


def test_gauge_says_not_calibrated_without_a_calibration(scene, monkeypatch):
    at = app_for(monkeypatch, scene.url)
    assert not at.exception
    assert "Model separation" in [s.value for s in at.subheader]
    assert any(i.value.startswith("Not calibrated yet") for i in at.info)
    metrics = {m.label: m.value for m in at.metric}
    assert metrics["ROC AUC (provisional)"] == "–" and metrics["Links above"] == "–"


def test_gauge_counts_labels_while_calibrating(tmp_path, monkeypatch):
    scene = build_scene(tmp_path / "keyreid.db", {
        "ready": False, "auc": 0.8, "genuine_count": 12, "impostor_count": 60, "threshold": None,
        "reason": "uncalibrated: 12 of 50 genuine and 60 of 50 impostor labels",
        "target_false_link": 0.01})
    at = app_for(monkeypatch, scene.url)
    assert not at.exception
    assert "Not calibrated yet: 12 of 50 genuine and 60 of 50 impostor labels" in at.info[0].value
    metrics = {m.label: m.value for m in at.metric}
    assert metrics["ROC AUC (provisional)"] == "0.80"
    assert metrics["Labels: same / different"] == "12 / 60"
    assert not at.success


def test_gauge_shows_auc_verdict_and_threshold_once_calibrated(tmp_path, monkeypatch):
    scene = build_scene(tmp_path / "keyreid.db", {
        "ready": True, "auc": 0.95, "genuine_count": 80, "impostor_count": 120, "threshold": 0.5,
        "reason": "calibrated", "target_false_link": 0.01})
    at = app_for(monkeypatch, scene.url)
    assert not at.exception
    metrics = {m.label: m.value for m in at.metric}
    assert metrics["ROC AUC"] == "0.95"
    assert metrics["Links above"] == f"{float(similarity_percent(0.5)):.0f}% similar"
    assert "This model separates people within a camera well (ROC AUC 0.95" in at.success[0].value
    assert len(at.get("vega_lite_chart")) >= 2, "the gauge bar and the activity chart"
