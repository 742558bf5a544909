"""keyreid-watch under ordinary faults, each on real processes: a worker killed half-way through a
message, SIGTERM to the whole process group, operator merges, splits, confirmations and rejections while linking, encoder
out-of-memory and a non-finite descriptor, a full disk, a live camera that is down at start and
one with an outage, a restart after kill -9, and a password in a camera URL."""
from __future__ import annotations

import json
import os
import re
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest

from storage import open_repository
from support import (HALVES, ROOT, bus_video, run_watcher, stored_clip_count, wait_for,
                     watcher_config)

pytestmark = pytest.mark.slow


def _open(db: Path, readonly: bool = True):
    return open_repository(f"sqlite:///{db}", readonly=readonly)


def _clips_produced(log: str) -> int:
    """Clips the cameras sent, from the watcher's summary lines ("..., 18 clips)")."""
    return sum(int(n) for n in re.findall(r"^  camera .*?, (\d+) clips", log, re.MULTILINE))


def _assert_sound(db: Path) -> None:
    """Integrity ok, no open tracklet, every stored descriptor finite."""
    with _open(db) as repo:
        assert repo.integrity_check() == ["ok"]
        tracklets = repo.list_tracklets()
        assert all(t.finished for t in tracklets)
        for t in tracklets:
            for clip in repo.tracklet_clips(t.id):
                assert np.isfinite(clip.descriptor).all()


def test_worker_killed_half_way_through_a_message_fails_its_camera_alone(tmp_path, weights):
    bus_video(tmp_path / "bus.mkv", 40)
    config = watcher_config(tmp_path, weights, HALVES)
    env = {**os.environ, "KEYREID_FAULT_HALF_SEND": "left"}
    started = time.monotonic()
    result = subprocess.run([sys.executable, "-m", "app.watcher.watch", "--cameras", str(config)],
                            cwd=ROOT, capture_output=True, text=True, timeout=240, env=env)
    assert result.returncode == 1, result.stderr[-3000:]
    assert time.monotonic() - started < 200
    assert "camera left FAILED: worker process killed by signal 9" in result.stderr
    assert "camera right: finished" in result.stderr
    _assert_sound(tmp_path / "watch.db")
    with _open(tmp_path / "watch.db") as repo:
        cameras = {c.id: c for c in repo.list_cameras()}
        assert cameras["left"].status == "failed" and "signal 9" in cameras["left"].status_reason
        assert cameras["right"].status == "finished"
        assert repo.count_tracklets(camera_ids=["right"]) >= 1
        assert repo.list_runs()[-1].status == "failed cameras: left"


def test_sigterm_to_the_process_group_stops_cleanly(tmp_path, weights):
    bus_video(tmp_path / "bus.mkv", 300)
    config = watcher_config(tmp_path, weights, HALVES)
    db = tmp_path / "watch.db"
    log = tmp_path / "watch.log"
    with open(log, "w") as out:
        process = subprocess.Popen([sys.executable, "-m", "app.watcher.watch", "--cameras", str(config),
                                    "--realtime"], cwd=ROOT, stdout=out, stderr=subprocess.STDOUT,
                                   start_new_session=True)
    try:
        wait_for(lambda: stored_clip_count(db) >= 2, 180, "the first clips")
        stop = time.monotonic()
        os.killpg(process.pid, signal.SIGTERM)  # what systemd does: the whole group
        process.wait(timeout=40)
        took = time.monotonic() - stop
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
    text = log.read_text()
    assert process.returncode == 0, text[-3000:]
    assert took < 10 + 10  # the drain time (supervision.drain_timeout) and start-up slack
    assert "FAILED" not in text
    _assert_sound(db)
    with _open(db) as repo:
        assert {c.status for c in repo.list_cameras()} == {"stopped"}
        assert repo.list_runs()[-1].status == "stopped"


def test_operator_merge_split_confirm_and_reject_while_the_watcher_links(tmp_path, weights):
    bus_video(tmp_path / "bus.mkv", 200)
    config = watcher_config(tmp_path, weights, HALVES)
    text = config.read_text().replace("clips: {window: 8, overlap: 4, lost_after: 10}",
                                      "clips: {window: 8, overlap: 4, lost_after: 3}")
    # a short window: unlinked tracklets open identities of their own 3 s after they end, so
    # identities appear while the video plays (the untrained model never calibrates)
    config.write_text(text + "linking: {time_window: 3}\n")
    db = tmp_path / "watch.db"
    process = run_watcher(config, "--realtime", wait=False)
    try:
        def identities() -> int:
            try:
                with _open(db) as repo:
                    return repo.count_identities()
            except Exception:  # noqa: BLE001 - not created yet
                return 0
        wait_for(lambda: identities() >= 4, 180, "four identities", process)
        with _open(db, readonly=False) as operator:  # the dashboard's write path
            keep, merged, confirmed_from, rejecting, *_ = [i.id for i in
                                                           operator.list_identities()]
            operator.merge_identities(keep, merged, note="operator")
            member = operator.identity_members(keep, thumbnails=False)[0]
            split_into = operator.split_tracklet(member.id, note="operator")
            confirmed = operator.identity_members(confirmed_from, thumbnails=False)[0]
            operator.confirm_link(confirmed.id, keep, note="operator")
            rejected = operator.identity_members(rejecting, thumbnails=False)[0]
            operator.reject_link(rejected.id, keep, note="operator")
            after = operator.last_decision_id()
        process.wait(timeout=240)
    finally:
        if process.poll() is None:
            process.kill()
    log = process.log.read_text()
    assert process.returncode == 0, log[-3000:]
    _assert_sound(db)
    with _open(db) as repo:
        later = [d for d in repo.link_decisions() if d.id > after]
        assert later, "the watcher made no decision after the operator's changes"
        assert all(d.identity_id != merged for d in later)  # merged away: never linked again
        assert repo.get_tracklet(member.id).identity_id == split_into
        assert repo.get_identity(merged).merged_into == keep
        assert repo.get_tracklet(confirmed.id).identity_id == keep
        assert repo.get_tracklet(rejected.id).identity_id != keep
        assert repo.rejected_identities(rejected.id) == {keep}


def test_encoder_out_of_memory_and_a_non_finite_descriptor(tmp_path, weights):
    bus_video(tmp_path / "bus.mkv", 40)
    config = watcher_config(tmp_path, weights, HALVES)
    env = {**os.environ, "KEYREID_FAULT_ENCODER": "oom=1,nan=1"}
    result = subprocess.run([sys.executable, "-m", "app.watcher.watch", "--cameras", str(config)],
                            cwd=ROOT, capture_output=True, text=True, timeout=240, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert re.search(r"encoder out of memory on (\d+) clips; batch size now (\d+)",
                     result.stderr), result.stderr[-3000:]
    assert "1 clips set aside: their descriptors were not finite" in result.stderr
    produced = _clips_produced(result.stderr)
    _assert_sound(tmp_path / "watch.db")
    with _open(tmp_path / "watch.db") as repo:
        assert repo.stats().clips == produced - 1  # everything but the set-aside clip


@pytest.fixture
def small_disk(tmp_path):
    """A 24 MiB tmpfs (root only): a disk that really fills up."""
    mount = tmp_path / "disk"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=24m", "tmpfs", str(mount)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


def test_full_disk_is_reported_and_everything_is_stored_once_there_is_room(tmp_path, weights,
                                                                           small_disk):
    bus_video(tmp_path / "bus.mkv", 160)
    db = small_disk / "watch.db"
    config = watcher_config(tmp_path, weights, HALVES, db=str(db))
    process = run_watcher(config, "--realtime", wait=False)
    filler = small_disk / "filler"
    try:
        wait_for(lambda: stored_clip_count(db) >= 2, 180, "the first clips", process)
        with open(filler, "wb") as out:  # fill the disk to the last byte
            try:
                while True:
                    out.write(b"\0" * 65536)
                    out.flush()
            except OSError:
                pass
        wait_for(lambda: "DATABASE UNAVAILABLE" in process.log.read_text(), 60,
                 "the watcher to report the full disk", process)
        time.sleep(3)
        filler.unlink()
        wait_for(lambda: "database writable again" in process.log.read_text(), 60,
                 "writing to work again", process)
        process.wait(timeout=240)
    finally:
        if process.poll() is None:
            process.kill()
    log = process.log.read_text()
    assert process.returncode == 0, log[-3000:]
    assert "disk is full" in log
    produced = _clips_produced(log)
    _assert_sound(db)
    with _open(db) as repo:
        assert repo.stats().clips == produced
        assert all(t.identity_id is not None for t in repo.list_tracklets())


class _SwitchableVideoServer:
    """Serves one video over HTTP on a fixed port that can be switched off and on again."""

    def __init__(self, data: bytes) -> None:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port = probe.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}/live.ts"
        self.data = data
        self.server = None
        self.served = 0

    def start(self) -> None:
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802 (http.server's name)
                outer.served += 1
                self.send_response(200)
                self.send_header("Content-Type", "video/mp2t")
                self.send_header("Content-Length", str(len(outer.data)))
                self.end_headers()
                self.wfile.write(outer.data)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def stop(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()
            self.server = None


def test_live_camera_down_at_start_then_up_then_an_outage(tmp_path, weights):
    """`reconnecting` while down, `running` once up; after an outage no tracklet spans it."""
    server = _SwitchableVideoServer(bus_video(tmp_path / "live.ts", 50).read_bytes())
    config = watcher_config(tmp_path, weights, f"""
        - {{id: live, source: '{server.url}', live: true, max_fps: null}}
    """)
    db = tmp_path / "watch.db"
    process = run_watcher(config, "--realtime", wait=False)
    seen = []

    def status() -> str | None:
        try:
            with _open(db) as repo:
                cameras = repo.list_cameras()
        except Exception:  # noqa: BLE001 - not created yet
            return None
        if cameras:
            seen.append((cameras[0].status, cameras[0].status_reason))
            return cameras[0].status
        return None

    try:
        wait_for(lambda: status() == "reconnecting", 120, "status reconnecting", process)
        server.start()
        wait_for(lambda: status() == "running", 60, "status running", process)
        wait_for(lambda: server.served >= 1 and stored_clip_count(db) >= 2, 120,
                 "clips from the live camera", process)
        server.stop()  # the pass being streamed still ends; the next connection is refused
        wait_for(lambda: "Connection refused" in process.log.read_text(), 90,
                 "a refused reconnect", process)
        time.sleep(2)  # an outage longer than lost_after (10 frames at 10 fps)
        server.start()
        wait_for(lambda: "was down for" in process.log.read_text(), 90,
                 "the reconnect after the outage", process)
        time.sleep(4)
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=40)
    finally:
        server.stop()
        if process.poll() is None:
            process.kill()
    log = process.log.read_text()
    assert process.returncode == 0, log[-3000:]
    reasons = [r for s, r in seen if s == "reconnecting"]
    assert reasons and "attempt" in reasons[0]
    back_at = int(re.search(r"was down for [\d.]+ s \(back at frame (\d+)\)", log)[1])
    with _open(db) as repo:
        tracklets = repo.list_tracklets()
        assert tracklets and all(t.first_wall_time and t.last_wall_time for t in tracklets)
        spanning = [t for t in tracklets if t.first_frame < back_at <= t.last_frame]
        assert not spanning, "a track continued across the outage"
        assert any(t.first_frame >= back_at for t in tracklets), "no tracklet after the outage"
        assert any(t.last_frame < back_at for t in tracklets), "no tracklet before the outage"


def test_restart_after_kill_9_repairs_and_resumes_without_storing_twice(tmp_path, weights):
    bus_video(tmp_path / "bus.mkv", 120)
    config = watcher_config(tmp_path, weights, HALVES)
    db = tmp_path / "watch.db"
    first = run_watcher(config, "--realtime", wait=False)
    try:
        wait_for(lambda: stored_clip_count(db) >= 4, 180, "the first clips", first)
        os.kill(first.pid, signal.SIGKILL)
        first.wait(timeout=10)
    finally:
        if first.poll() is None:
            first.kill()
    with _open(db) as repo:
        first_run = repo.list_runs()[0].id
        stored_before = {c: max((t.last_frame for t in repo.list_tracklets(camera_ids=[c])),
                                default=-1) for c in ("left", "right")}
    second = run_watcher(config)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "repair: 1 unfinished run(s) marked aborted" in second.stderr
    assert "resumes after frame" in second.stderr
    _assert_sound(db)
    with _open(db) as repo:
        runs = repo.list_runs()
        assert runs[0].status.startswith("aborted") and runs[1].status == "finished"
        assert all(t.finished for t in repo.list_tracklets(run_id=first_run))
        assert all(i.member_count > 0 for i in repo.list_identities())
        for camera, last in stored_before.items():
            resumed = repo.list_tracklets(camera_ids=[camera], run_id=runs[1].id)
            assert all(t.first_frame > last for t in resumed), (camera, last)


def test_a_password_in_a_camera_url_appears_nowhere(tmp_path, weights):
    secret = "Pa55w0rdXYZ"
    with socket.socket() as probe:  # a port nobody listens on: the camera stays down
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    bus_video(tmp_path / "bus.mkv", 30)
    os.environ["KEYREID_TEST_SECRET"] = secret  # the watcher subprocess expands ${...}
    config = watcher_config(tmp_path, weights, f"""
        - {{id: good, source: bus.mkv, max_fps: null}}
        - {{id: door, source: 'rtsp://admin:{secret}@127.0.0.1:{port}/stream1?token={secret}'}}
        - {{id: gate, source: 'http://viewer:${{KEYREID_TEST_SECRET}}@127.0.0.1:{port}/v.ts',
            live: true}}
    """)
    result = run_watcher(config, "--duration", "25")
    assert result.returncode == 0, result.stderr[-3000:]
    log = result.stdout + result.stderr
    assert "reconnecting in" in log and "admin:***@" in log
    assert secret not in log
    assert "did not stop within" not in log  # the stop reached the cameras' reconnect backoff
    con = sqlite3.connect(tmp_path / "watch.db")
    for (table,) in con.execute("SELECT name FROM sqlite_master WHERE type = 'table'"):
        for row in con.execute(f"SELECT * FROM {table}"):
            for value in row:
                if isinstance(value, (str, bytes)):
                    assert secret not in (value if isinstance(value, str)
                                          else value.decode("latin-1")), (table, row)
    sources = dict(con.execute("SELECT id, source FROM cameras"))
    assert "${KEYREID_TEST_SECRET}" in sources["gate"]  # stored as written, not expanded
    stored = json.loads(con.execute("SELECT config FROM runs").fetchone()[0])
    assert stored["cameras"][1]["source"].startswith("rtsp://admin:***@")
    con.close()

    from streamlit.testing.v1 import AppTest

    os.environ["KEYREID_DASHBOARD_DB"] = f"sqlite:///{tmp_path / 'watch.db'}"
    try:
        for page in ("overview", "identities"):
            at = AppTest.from_file(str(ROOT / "app" / "dashboard" / "ui.py"), default_timeout=60)
            at.query_params["page"] = page
            at.run()
            assert not at.exception
            shown = json.dumps([str(e.value) for kind in ("markdown", "caption", "info",
                                                          "warning", "error", "metric")
                                for e in getattr(at, kind)])
            shown += "".join(frame.value.to_json() for frame in at.dataframe)
            assert secret not in shown
            if page == "overview":
                assert "admin:***@127.0.0.1" in shown  # the source is shown, redacted
    finally:
        del os.environ["KEYREID_DASHBOARD_DB"], os.environ["KEYREID_TEST_SECRET"]


def test_retention_shrinks_an_over_budget_database_while_the_watcher_writes(tmp_path, weights):
    from storage import NewClip

    db = tmp_path / "watch.db"
    rng = np.random.default_rng(0)
    with _open(db, readonly=False) as repo:  # ~29 MB of an earlier day's clips
        run = repo.start_run({})
        repo.upsert_camera("old")
        for batch in range(30):
            ids = [repo.add_tracklet(run, "old", batch * 100 + i, 0, 0.0, finished=True)
                   for i in range(100)]
            repo.add_clips([NewClip(t, [0, 1, 2, 3], 0.0, 1.0,
                                    rng.standard_normal(4800).astype(np.float32), "old-model")
                            for t in ids])
        repo.finish_run(run)
    size_before = db.stat().st_size
    bus_video(tmp_path / "bus.mkv", 60)
    config = watcher_config(tmp_path, weights, HALVES)
    config.write_text(config.read_text() + "retention: {max_gb: 0.01, interval: 1}\n")
    os.environ["KEYREID_DASHBOARD_DB"] = f"sqlite:///{db}"
    try:
        process = run_watcher(config, "--realtime", wait=False)
        from streamlit.testing.v1 import AppTest
        pages = 0
        while process.poll() is None:  # the dashboard keeps working beside both writers
            at = AppTest.from_file(str(ROOT / "app" / "dashboard" / "ui.py"), default_timeout=60)
            at.run()
            assert not at.exception, at.exception
            pages += 1
        process.wait(timeout=240)
    finally:
        del os.environ["KEYREID_DASHBOARD_DB"]
        if process.poll() is None:
            process.kill()
    log = process.log.read_text()
    assert process.returncode == 0, log[-3000:]
    assert "retention: deleted" in log and pages >= 2
    con = sqlite3.connect(db)
    con.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    used = (con.execute("PRAGMA page_count").fetchone()[0]
            - con.execute("PRAGMA freelist_count").fetchone()[0]) * \
        con.execute("PRAGMA page_size").fetchone()[0]
    con.close()
    assert used <= 0.01e9 * 1.1 and db.stat().st_size < size_before / 2
    _assert_sound(db)
    with _open(db) as repo:
        assert repo.count_tracklets(camera_ids=["left", "right"]) >= 2  # the newest are kept
        assert repo.count_tracklets(camera_ids=["old"]) < 3000
