"""AppTest tests of every dashboard page over a small database built with storage's writer API.

The gallery: 4 people, each seen by two or three of 3 cameras, with synthetic descriptors
(person vector + small noise per clip) of the untrained default encoder's model id and
dimension, so search by upload can run against it. Person 3's camera-b tracklet is left in an
identity of its own, for the merge test.
"""
from __future__ import annotations

import io
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import reid
from storage import SCHEMA_VERSION, NewClip, open_repository

SCRIPT = str(Path(__file__).resolve().parents[1] / "app" / "dashboard" / "ui.py")
# The untrained default encoder's id (it carries a digest of its configuration and weights).
_ENCODER = reid.Encoder(device="cpu")
MODEL_ID = _ENCODER.model_id
DIM = _ENCODER.dim  # keyreid_vit_tiny's compact descriptor (1024): uploads are encoded by that model
CAMERAS = ("cam_a", "cam_b", "cam_c")
PEOPLE = {0: ("cam_a", "cam_b", "cam_c"), 1: ("cam_a", "cam_b"), 2: ("cam_b", "cam_c"),
          3: ("cam_a", "cam_b")}
COLOURS = [(200, 40, 40), (40, 160, 40), (40, 40, 200), (200, 160, 40)]
TIMEOUT = 60


@dataclass(frozen=True)
class Gallery:
    url: str
    path: Path
    tracklets: dict[tuple[int, str], int]  # (person, camera) -> tracklet id
    identities: dict[int, int]  # person -> identity id
    stray_identity: int  # person 3's camera-b tracklet, not linked yet


def thumbnail(colour: tuple[int, int, int]) -> bytes:
    image = Image.new("RGB", (64, 128), colour)
    out = io.BytesIO()
    image.save(out, format="JPEG")
    return out.getvalue()


def build_gallery(path: Path) -> Gallery:
    """Write the test gallery with storage's writer API (and release the writer lock)."""
    url = f"sqlite:///{path}"
    rng = np.random.default_rng(0)
    people = {p: rng.normal(size=DIM).astype(np.float32) for p in PEOPLE}
    tracklets: dict[tuple[int, str], int] = {}
    identities: dict[int, int] = {}
    with open_repository(url) as repo:
        repo.acquire_writer("test")
        run = repo.start_run({"reid": {"checkpoint": None, "model": "keyreid_vit_tiny",
                                       "overrides": {}},
                              "clips": {"crop_margin": 0.1, "size": [256, 128]}})
        for index, camera in enumerate(CAMERAS):
            repo.upsert_camera(camera, name=f"Camera {camera[-1].upper()}", source=f"{camera}.mp4")
            repo.update_camera_status(camera, status="running", last_frame_time=120.0, fps=9.5,
                                      frames_processed=1100 + index)
        for person, cameras in PEOPLE.items():
            for order, camera in enumerate(cameras):
                start = 10.0 * person + 30.0 * order
                tid = repo.add_tracklet(run, camera, track_id=person + 1,
                                        first_frame=int(start * 10), first_time=start,
                                        last_frame=int(start * 10) + 40, last_time=start + 4.0,
                                        thumbnail=thumbnail(COLOURS[person]), finished=True)
                tracklets[person, camera] = tid
                repo.add_clips([NewClip(
                    tracklet_id=tid, frame_indices=[1, 2, 3, 4], start_time=start + c,
                    end_time=start + c + 1.0, model_id=MODEL_ID,
                    descriptor=people[person] + 0.05 * rng.normal(size=DIM).astype(np.float32))
                    for c in range(2)])
        for person, cameras in PEOPLE.items():
            identities[person] = repo.create_identity()
            for order, camera in enumerate(cameras):
                if person == 3 and camera == "cam_b":
                    continue
                repo.assign_identity(tracklets[person, camera], identities[person],
                                     kind="new" if order == 0 else "linked",
                                     distance=None if order == 0 else 0.5 + 0.1 * order)
        stray = repo.create_identity()
        repo.assign_identity(tracklets[3, "cam_b"], stray, kind="new")
        repo.finish_run(run)
    return Gallery(url, path, tracklets, identities, stray)


@pytest.fixture(scope="module")
def gallery_template(tmp_path_factory) -> Gallery:
    return build_gallery(tmp_path_factory.mktemp("gallery") / "keyreid.db")


@pytest.fixture
def gallery(gallery_template: Gallery, tmp_path: Path) -> Gallery:
    """A private copy of the template database (tests that write must not share it)."""
    path = tmp_path / "keyreid.db"
    shutil.copy(gallery_template.path, path)
    return Gallery(f"sqlite:///{path}", path, gallery_template.tracklets,
                   gallery_template.identities, gallery_template.stray_identity)


def app_for(monkeypatch, url: str, **params):
    from streamlit.testing.v1 import AppTest

    monkeypatch.setenv("KEYREID_DASHBOARD_DB", url)
    for name in ("CHECKPOINT", "MODEL", "DEVICE"):
        monkeypatch.delenv(f"KEYREID_DASHBOARD_{name}", raising=False)
    at = AppTest.from_file(SCRIPT, default_timeout=TIMEOUT)
    for key, value in params.items():
        at.query_params[key] = str(value)
    return at.run()


def texts(at) -> str:
    parts = [e.value for kind in ("markdown", "caption", "info", "warning", "error", "success")
             for e in getattr(at, kind)]
    return "\n".join(str(p) for p in parts)


def file_state(path: Path) -> tuple[int, int]:
    stat = path.stat()
    return stat.st_size, stat.st_mtime_ns


def test_overview_lists_cameras_counts_and_activity(gallery, monkeypatch):
    at = app_for(monkeypatch, gallery.url)
    assert not at.exception
    metrics = {m.label: m.value for m in at.metric}
    assert metrics["Cameras"] == "3"
    assert metrics["Tracklets"] == str(sum(len(c) for c in PEOPLE.values()))
    assert metrics["Identities"] == str(len(PEOPLE) + 1)
    table = at.dataframe[0].value
    assert list(table["camera"]) == list(CAMERAS)
    assert list(table["tracklets"]) == [sum(c in cams for cams in PEOPLE.values()) for c in CAMERAS]
    assert list(table["clips"]) == [2 * t for t in table["tracklets"]]
    assert list(table["fps"]) == [9.5, 9.5, 9.5]
    assert at.get("vega_lite_chart"), "the activity timeline is drawn"


def test_search_by_tracklet_ranks_the_known_match_first(gallery, monkeypatch):
    query = gallery.tracklets[1, "cam_a"]
    at = app_for(monkeypatch, gallery.url, page="tracklet", tracklet=query)
    assert not at.exception
    results = at.dataframe[0].value
    assert results["tracklet"].iloc[0] == gallery.tracklets[1, "cam_b"]
    assert bool(results["same identity"].iloc[0])
    assert "cam_a" not in set(results["camera"]), "matches come from the other cameras"
    assert list(results["rank"]) == list(range(1, len(results) + 1))
    assert "same identity" in texts(at)


def test_search_by_tracklet_picks_from_the_grid_and_obeys_the_sliders(gallery, monkeypatch):
    at = app_for(monkeypatch, gallery.url, page="tracklet")
    assert "Choose a tracklet" in texts(at)
    at.button(key=f"pick_{gallery.tracklets[0, 'cam_a']}").click().run()
    results = at.dataframe[0].value
    assert list(results["tracklet"][:2]) == sorted(
        [gallery.tracklets[0, "cam_b"], gallery.tracklets[0, "cam_c"]],
        key=list(results["tracklet"]).index)
    assert set(results["tracklet"][:2]) == {gallery.tracklets[0, "cam_b"],
                                            gallery.tracklets[0, "cam_c"]}
    at.slider(key="tracklet_k").set_value(1).run()
    assert len(at.dataframe[0].value) == 1
    at.slider(key="tracklet_cut").set_value(100).run()
    assert "No match" in texts(at)


def test_tracklet_grid_paginates_a_large_camera(gallery, monkeypatch):
    with open_repository(gallery.url) as repo:
        run = repo.list_runs()[-1].id
        for track in range(30):
            repo.add_tracklet(run, "cam_a", track_id=100 + track, first_frame=track,
                              first_time=70.0 + track, thumbnail=thumbnail((90, 90, 90)))
    at = app_for(monkeypatch, gallery.url, page="tracklet")
    pick_keys = lambda: [b.key for b in at.button if b.key and b.key.startswith("pick_")]
    assert len(pick_keys()) == 24
    first_page = set(pick_keys())
    at.number_input(key="grid_page_cam_a").set_value(2).run()
    assert len(pick_keys()) == 33 - 24 and not first_page & set(pick_keys())
    assert "showing 25–33" in texts(at)


def test_identity_view_shows_every_camera_and_decisions(gallery, monkeypatch):
    identity = gallery.identities[0]
    at = app_for(monkeypatch, gallery.url, page="identity", identity=identity)
    assert not at.exception
    stops = [m.value for m in at.markdown if "Link: " in m.value]
    assert [s.split("**")[1] for s in stops] == [
        f"{n}. Camera {camera[-1].upper()} ({camera})" for n, camera in enumerate(PEOPLE[0], 1)]
    decisions = at.dataframe[0].value
    assert set(decisions["tracklet"]) == {gallery.tracklets[0, c] for c in PEOPLE[0]}
    assert set(decisions["kind"]) == {"new", "linked"}
    assert decisions["distance"].dropna().round(2).tolist() == [0.6, 0.7]


def test_merge_and_split_change_the_database(gallery, monkeypatch):
    keep = gallery.identities[3]
    at = app_for(monkeypatch, gallery.url, page="identity", identity=keep)
    at.number_input(key="merge_other").set_value(gallery.stray_identity).run()
    at.button(key="merge").click().run()
    assert not at.exception
    assert "Merged identity" in texts(at)
    with open_repository(gallery.url, readonly=True) as repo:
        members = {t.id for t in repo.identity_members(keep, thumbnails=False)}
        assert members == {gallery.tracklets[3, "cam_a"], gallery.tracklets[3, "cam_b"]}
        assert repo.get_identity(gallery.stray_identity).merged_into == keep
    moved = gallery.tracklets[3, "cam_b"]
    at.selectbox(key="split_tracklet").set_value(moved).run()
    at.button(key="split").click().run()
    assert "now forms identity" in texts(at)
    with open_repository(gallery.url, readonly=True) as repo:
        tracklet = repo.get_tracklet(moved)
        assert tracklet.identity_id not in (keep, gallery.stray_identity)
        assert [d.kind for d in repo.link_decisions(tracklet_id=moved)][-1] == "split"
        assert {t.id for t in repo.identity_members(keep)} == {gallery.tracklets[3, "cam_a"]}


def test_search_by_upload_finds_people_in_a_photo(gallery, monkeypatch):
    import ultralytics

    photo = Path(ultralytics.__file__).parent / "assets" / "bus.jpg"
    at = app_for(monkeypatch, gallery.url, page="upload")
    assert "keyreid_vit_tiny" in texts(at) and "run 1 configuration" in texts(at)
    at.file_uploader[0].set_value(("bus.jpg", photo.read_bytes(), "image/jpeg")).run()
    assert not at.exception
    assert not at.error, [e.value for e in at.error]
    results = at.dataframe[0].value
    # The untrained encoder ranks arbitrarily; what matters is that the whole path runs.
    assert len(results) == sum(len(c) for c in PEOPLE.values())
    assert len(at.image) >= 4, "the 4-frame query clip is shown"


@pytest.mark.parametrize("name, data, message", [
    ("notes.txt", b"this is not an image", "not an image"),
    ("empty.png", b"", "empty"),
])
def test_upload_refuses_non_images(gallery, monkeypatch, name, data, message):
    before = file_state(gallery.path)
    at = app_for(monkeypatch, gallery.url, page="upload")
    at.file_uploader[0].set_value((name, data, "application/octet-stream")).run()
    assert not at.exception
    assert any(message in e.value and name in e.value for e in at.error)
    assert file_state(gallery.path) == before


@pytest.mark.parametrize("side, message", [
    (7_000, "megapixel limit"),  # 49 Mpx: under PIL's own bomb limit, over the dashboard's
    (20_000, "decompression bomb"),  # 400 Mpx in ~50 kB: PIL refuses it too
])
def test_upload_refuses_huge_images(gallery, monkeypatch, side, message):
    bomb = io.BytesIO()
    Image.new("1", (side, side)).save(bomb, format="PNG")
    assert len(bomb.getvalue()) < 200_000
    before = file_state(gallery.path)
    at = app_for(monkeypatch, gallery.url, page="upload")
    at.file_uploader[0].set_value(("bomb.png", bomb.getvalue(), "image/png")).run()
    assert not at.exception
    assert any(message in e.value and "bomb.png" in e.value for e in at.error)
    assert file_state(gallery.path) == before


def test_upload_of_a_photo_without_people(gallery, monkeypatch):
    blank = io.BytesIO()
    Image.new("RGB", (320, 240), (128, 128, 128)).save(blank, format="PNG")
    at = app_for(monkeypatch, gallery.url, page="upload")
    at.file_uploader[0].set_value(("wall.png", blank.getvalue(), "image/png")).run()
    assert not at.exception
    assert any("nobody was found" in e.value for e in at.error)


def test_empty_database_shows_messages_on_every_page(tmp_path, monkeypatch):
    path = tmp_path / "empty.db"
    open_repository(f"sqlite:///{path}").close()
    before = file_state(path)
    for page in ("overview", "tracklet", "upload", "identity", "unlinked"):
        at = app_for(monkeypatch, f"sqlite:///{path}", page=page)
        assert not at.exception, page
        assert at.info, f"{page}: an explanation is shown"
    assert file_state(path) == before


def test_missing_database_is_reported_and_not_created(tmp_path, monkeypatch):
    path = tmp_path / "nowhere.db"
    at = app_for(monkeypatch, f"sqlite:///{path}")
    assert not at.exception
    assert "does not exist" in at.error[0].value
    assert not path.exists()


def test_newer_schema_is_refused_untouched(gallery, monkeypatch):
    import sqlite3

    conn = sqlite3.connect(gallery.path)
    with conn:
        conn.execute("UPDATE schema_meta SET value = ? WHERE key = 'schema_version'",
                     (str(SCHEMA_VERSION + 1),))
    conn.close()
    before = file_state(gallery.path)
    at = app_for(monkeypatch, gallery.url)
    assert not at.exception
    assert "schema version" in at.error[0].value and "did not open it" in at.error[0].value
    assert file_state(gallery.path) == before


def test_wall_clock_times_are_the_time_axis(tmp_path, monkeypatch):
    """Rows written with capture wall-clock times are shown, filtered and charted in UTC."""
    url = f"sqlite:///{tmp_path / 'wall.db'}"
    day = 1_798_000_000.0  # 2026-12-23 UTC
    rng = np.random.default_rng(1)
    with open_repository(url) as repo:
        run = repo.start_run({})
        for camera in ("gate", "hall"):
            repo.upsert_camera(camera)
            repo.update_camera_status(camera, status="running", last_frame_time=8.0,
                                      last_frame_wall_time=day + 300.0)
        identity = None
        for order, camera in enumerate(("gate", "hall")):
            start = day + 120.0 * order
            tid = repo.add_tracklet(run, camera, 1, 0, 2.0, last_frame=40, last_time=6.0,
                                    finished=True, first_wall_time=start,
                                    last_wall_time=start + 4.0, thumbnail=thumbnail(COLOURS[0]))
            repo.add_clips([NewClip(tid, [1, 2, 3, 4], 2.0, 3.0,
                                    rng.normal(size=DIM).astype(np.float32), MODEL_ID,
                                    start_wall_time=start, end_wall_time=start + 1.0)])
            identity = repo.open_identity(tid) if identity is None else \
                repo.assign_identity(tid, identity, "linked", 0.4, evidence={
                    "margin": 0.3, "false_link": 0.004, "reason": "false-link 0.4% < 1%"})
        repo.update_run_calibration(run, {"ready": True, "reason": "calibrated", "auc": 0.95,
                                          "genuine_count": 80, "impostor_count": 120})
        assert [t.camera_id for t in repo.list_tracklets(time_range=(day + 100, day + 200))] == \
            ["hall"]
        assert repo.gallery_index(time_range=(day - 1, day + 50)).size == 1
        (summary,) = repo.list_identities()
        assert (summary.first_time, summary.last_time) == (day, day + 124.0)
    at = app_for(monkeypatch, url)
    assert not at.exception
    assert at.sidebar.slider[0].label == "Time (UTC)"
    table = at.dataframe[0].value
    assert list(table["last frame at"]) == ["2026-12-23 04:31:40 UTC"] * 2
    assert "This model separates people within a camera well (ROC AUC 0.95" in at.success[0].value
    at = app_for(monkeypatch, url, page="identity", identity=identity)
    assert not at.exception
    assert "2026-12-23 04:26:40 UTC – 2026-12-23 04:28:44 UTC" in texts(at)
    decisions = at.dataframe[-1].value
    assert list(decisions["chance it is wrong"]) == ["", "0.4%"]
    assert list(decisions["similarity"]) == ["", "92%"]
