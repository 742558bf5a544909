"""The watcher's link stage on its own, over a real database (no cameras, no model): the site's
one linker decides every finished tracklet, stores its calibration, and a second writer of a
PostgreSQL site stores only until the linker stops. End to end with watchers: test_app_site.py,
test_app_linking.py."""
from __future__ import annotations

import time

import numpy as np

from app.watcher.config import LinkingConfig
from app.watcher.encoder_service import EncoderInfo
from app.watcher.linking import CLAIM_INTERVAL_S, SiteLinking
from storage import NewClip, open_repository

MODEL = "m1"


def _stage(repo, run_id, problems, settings: LinkingConfig | None = None) -> SiteLinking:
    info = EncoderInfo(MODEL, 8, "cpu", True, None, None)

    def direct(what, write):
        write()
        return True

    return SiteLinking(settings or LinkingConfig(), repo, info, run_id, start_over=False,
                       unavailable=problems.append, direct=direct)


def _finished_tracklet(repo, run_id, camera, track, started, descriptor) -> int:
    """A tracklet as a watcher leaves it for the linker: clips stored, then marked finished."""
    tracklet = repo.add_tracklet(run_id, camera, track, 0, 0.0, last_frame=3, last_time=1.0,
                                 first_wall_time=started, last_wall_time=started + 1.0)
    repo.add_clips([NewClip(tracklet, [0, 1, 2, 3], 0.0, 1.0, np.asarray(descriptor, np.float32), MODEL,
                            start_wall_time=started, end_wall_time=started + 1.0)])
    repo.update_tracklet(tracklet, finished=True)
    return tracklet


def test_the_linker_decides_every_finished_tracklet_and_stores_its_calibration(db_url):
    problems: list[str] = []
    with open_repository(db_url) as repo:
        repo.acquire_writer("test")
        run = repo.start_run({})
        for camera in ("a", "b"):
            repo.upsert_camera(camera)
        stage = _stage(repo, run, problems)
        stage.claim()
        assert stage.active and stage.status() == "linker: 0 pending, not calibrated yet"
        now = time.time() - 60
        rng = np.random.default_rng(0)
        tracklets = [_finished_tracklet(repo, run, camera, 1, now + i, rng.normal(size=8))
                     for i, camera in enumerate(("a", "b"))]
        stage.link_ready()
        # uncalibrated, each the other's candidate: both wait for evidence
        assert stage.identities_opened == 0 and stage.status() == "linker: 2 pending, not calibrated yet"
        stage.link_ready(final=True)  # the run's end: what still waits opens its own identity
        assert stage.identities_opened == 2 and stage.links_made == 0 and not problems
        identities = {repo.get_tracklet(t).identity_id for t in tracklets}
        assert None not in identities and len(identities) == 2
        (record,) = repo.list_runs()
        assert record.calibration["model_id"] == MODEL and "genuine_samples" in record.calibration
        assert stage.seconds > 0 and stage.separation()


def test_linking_off_never_claims():
    stage = _stage(None, 1, [], LinkingConfig(enabled=False))  # never touches the database
    stage.claim()
    assert not stage.active and stage.status() == "linking off" and stage.separation() == ""


def test_a_second_writer_stores_only_until_the_linker_stops(postgres):
    url = postgres.database()
    problems: list[str] = []
    first, second = open_repository(url), open_repository(url)
    try:
        stages = []
        for repo in (first, second):
            repo.acquire_writer("test")
            stages.append(_stage(repo, repo.start_run({}), problems))
        linking, storing = stages
        linking.claim()
        now = time.monotonic()
        storing.claim(now)
        assert linking.active and not storing.active
        assert storing.status() == "linker: another watcher links"
        first.close()  # the linking watcher stops: its lock session ends with it
        storing.claim(now + CLAIM_INTERVAL_S / 2)  # the main loop asks often; it tries every interval
        assert not storing.active
        storing.claim(now + CLAIM_INTERVAL_S)
        assert storing.active and not problems
    finally:
        first.close()
        second.close()
