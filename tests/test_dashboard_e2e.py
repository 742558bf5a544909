"""End-to-end: the real `keyreid-dashboard` server in headless Chromium, and the dashboard
reading while a writer writes.

Browser tests need Debian's `chromium` (/usr/bin/chromium) and the `playwright` Python package
(its driver only: it launches the system Chromium, nothing is downloaded); they skip, saying
which is missing, where either is absent. Screenshots are saved under each test's tmp folder.
"""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import textwrap
import time
import urllib.request
from pathlib import Path

import pytest
from support import stored_clip_count
from test_dashboard_pages import DIM, MODEL_ID, app_for, build_gallery, texts

from storage import open_repository

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update",
                  "--disable-sync"]
DEMO_VIDEOS = [Path(os.environ.get("KEYREID_CACHE") or "~/.cache/keyreid").expanduser()
               / "vtest.avi", Path("/usr/share/doc/opencv-doc/examples/data/vtest.avi")]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def dashboard_command() -> list[str]:
    """The installed console script, else the same entry point through `python -m`."""
    script = Path(sys.executable).with_name("keyreid-dashboard")
    return [str(script)] if script.exists() else [sys.executable, "-m", "app.dashboard.cli"]


def start_dashboard(url: str, folder: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    log = open(folder / "dashboard.log", "w")
    process = subprocess.Popen([*dashboard_command(), "--db", url, "--port", str(port)],
                               cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"{base}/_stcore/health", timeout=2) as answer:
                if answer.status == 200:
                    return process, base
        except OSError:
            if process.poll() is not None:
                break
            time.sleep(0.3)
    process.terminate()
    pytest.fail(f"the dashboard did not start:\n{(folder / 'dashboard.log').read_text()}")


def stop(process: subprocess.Popen) -> None:
    process.terminate()
    try:
        process.wait(timeout=15)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


@pytest.fixture
def browser():
    if not CHROMIUM.exists():
        pytest.skip("Debian chromium is not installed (apt-get install -y chromium)")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.skip("the playwright package is not installed (pip install playwright; "
                    "no browser download needed: the system chromium is used)")
    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=str(CHROMIUM), headless=True,
                                              args=CHROMIUM_FLAGS)
        yield chromium
        chromium.close()


def open_page(browser, base: str, query: str):
    page = browser.new_page(viewport={"width": 1500, "height": 2000})
    page.goto(f"{base}/?{query}")
    page.get_by_role("heading", level=1).first.wait_for(timeout=60_000)
    return page


def test_browser_search_by_tracklet_shows_the_known_match(tmp_path, browser):
    gallery = build_gallery(tmp_path / "keyreid.db")
    server, base = start_dashboard(gallery.url, tmp_path)
    try:
        query = gallery.tracklets[1, "cam_a"]
        page = open_page(browser, base, f"page=tracklet&tracklet={query}")
        page.get_by_text("same identity", exact=True).first.wait_for(timeout=60_000)
        page.wait_for_timeout(1000)  # let the images finish drawing for the screenshot
        page.screenshot(path=tmp_path / "search_by_tracklet.png", full_page=True)
        body = page.inner_text("body")
        assert "6 matches" in body
        assert f"tracklet {gallery.tracklets[1, 'cam_b']} · identity" in body
        first = body.index("#1 · Camera B")
        assert body.index(f"tracklet {gallery.tracklets[1, 'cam_b']}") > first
        assert (tmp_path / "search_by_tracklet.png").stat().st_size > 10_000
    finally:
        stop(server)
    assert "locked" not in (tmp_path / "dashboard.log").read_text()


WRITER = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    import numpy as np
    from storage import NewClip, open_repository
    url, seconds, model_id, dim = sys.argv[1], float(sys.argv[2]), sys.argv[3], int(sys.argv[4])
    stop = Path(sys.argv[5])
    rng = np.random.default_rng(1)
    writes = 0
    with open_repository(url) as repo:
        repo.acquire_writer("test writer")
        run = repo.start_run({})
        deadline = time.monotonic() + seconds
        track = 1000
        while time.monotonic() < deadline and not stop.exists():
            track += 1
            tid = repo.add_tracklet(run, "cam_c", track, first_frame=track, first_time=200.0 + track)
            repo.add_clips([NewClip(tracklet_id=tid, frame_indices=[1, 2, 3, 4],
                                    start_time=200.0 + track, end_time=201.0 + track,
                                    descriptor=rng.normal(size=dim).astype(np.float32),
                                    model_id=model_id)])
            identity = repo.create_identity()
            repo.assign_identity(tid, identity, kind="new")
            repo.update_camera_status("cam_c", last_frame_time=201.0 + track, fps=9.0)
            writes += 4
        repo.finish_run(run)
    print("writes", writes)
""")


def test_dashboard_reads_and_edits_while_a_writer_writes(tmp_path, monkeypatch):
    """A writer holding the lock writes as fast as it can; the dashboard's pages, searches and
    a merge run meanwhile: neither side sees "database is locked"."""
    gallery = build_gallery(tmp_path / "keyreid.db")
    stop_file = tmp_path / "stop"
    writer = subprocess.Popen([sys.executable, "-c", WRITER, gallery.url, "120", MODEL_ID,
                               str(DIM), str(stop_file)],
                              cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True)
    try:
        time.sleep(0.5)
        rounds = 0
        clip_counts = set()
        while writer.poll() is None:
            for page, extra in (("overview", {}),
                                ("tracklet", {"tracklet": gallery.tracklets[0, "cam_a"]}),
                                ("identity", {"identity": gallery.identities[0]}),
                                ("unlinked", {})):
                at = app_for(monkeypatch, gallery.url, page=page, **extra)
                assert not at.exception, (page, at.exception)
                assert not at.error, (page, [e.value for e in at.error])
                if page == "overview":
                    clip_counts.add({m.label: m.value for m in at.metric}["Clips"])
            if rounds == 0:
                at = app_for(monkeypatch, gallery.url, page="identity",
                             identity=gallery.identities[3])
                at.number_input(key="merge_other").set_value(gallery.stray_identity).run()
                at.button(key="merge").click().run()
                assert "Merged identity" in texts(at), texts(at)
            rounds += 1
            if rounds >= 3:  # enough rounds beside the writer, however loaded the machine is
                stop_file.touch()
        output = writer.stdout.read()
    finally:
        if writer.poll() is None:
            writer.kill()
    assert writer.returncode == 0, output
    assert "locked" not in output
    assert rounds >= 3 and len(clip_counts) >= 2, "the dashboard saw the gallery grow"
    with open_repository(gallery.url, readonly=True) as repo:
        assert repo.get_identity(gallery.stray_identity).merged_into == gallery.identities[3]
        assert repo.integrity_check() == ["ok"]


@pytest.mark.slow
def test_browser_over_the_watcher_running_on_the_demo_video(tmp_path, browser):
    """keyreid-watch on the two halves of vtest.avi while the dashboard serves its database."""
    video = next((v for v in DEMO_VIDEOS if v.exists()), None)
    if video is None:
        pytest.skip(f"demo video missing (looked at {', '.join(map(str, DEMO_VIDEOS))}); "
                    "fetch it with `keyreid-fetch-demo`")
    from tracking.detector import WeightsNotFoundError, find_pose_weights

    try:
        weights = find_pose_weights()
    except WeightsNotFoundError as exc:
        pytest.skip(f"no pose weights offline: {exc}")
    db = tmp_path / "watch.db"
    config = tmp_path / "cams.yaml"
    config.write_text(textwrap.dedent(f"""
        database: sqlite:///{db}
        detector: {{weights: {weights}, imgsz: 960}}
        keypoints: {{backend: yolo-pose}}
        reid: {{overrides: {{depth: 2}}, batch_size: 8, max_wait: 0.2}}
        clips: {{window: 8, overlap: 4, lost_after: 10}}
        cameras:
          - {{id: left, source: {video}, crop: [0, 0, 384, 576], max_fps: null}}
          - {{id: right, source: {video}, crop: [384, 0, 384, 576], max_fps: null}}
    """))
    watcher = subprocess.Popen([sys.executable, "-m", "app.watcher.watch", "--cameras", str(config),
                                "--max-frames", "80"], cwd=ROOT, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True)
    server = None
    try:
        deadline = time.monotonic() + 240
        while not stored_clip_count(db) and watcher.poll() is None and time.monotonic() < deadline:
            time.sleep(0.5)
        assert stored_clip_count(db), "the watcher stored no clip in time"
        server, base = start_dashboard(f"sqlite:///{db}", tmp_path)
        page = open_page(browser, base, "page=overview")  # while the watcher writes
        page.get_by_text("Cameras", exact=True).first.wait_for(timeout=60_000)
        page.screenshot(path=tmp_path / "overview_live.png", full_page=True)
        output, _ = watcher.communicate(timeout=300)
        assert watcher.returncode == 0, output
        assert "locked" not in output
        with open_repository(f"sqlite:///{db}", readonly=True) as repo:
            query = next(t for t in repo.list_tracklets(camera_ids=["left"])
                         if repo.tracklet_descriptor(t.id) is not None)
        page = open_page(browser, base, f"page=tracklet&tracklet={query.id}")
        page.get_by_text("% similar", exact=False).first.wait_for(timeout=60_000)
        page.wait_for_timeout(1000)
        page.screenshot(path=tmp_path / "search_demo.png", full_page=True)
        body = page.inner_text("body")
        assert "match" in body
        assert "#1 · vtest right half" in body or "#1 · right" in body
    finally:
        if watcher.poll() is None:
            watcher.kill()
        if server is not None:
            stop(server)
    assert "locked" not in (tmp_path / "dashboard.log").read_text()
