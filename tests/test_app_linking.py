"""Linking across watcher runs, on real processes: a restarted watcher continues the identities
of earlier runs seen within the time window and the labels its linker had learnt."""
from __future__ import annotations

import json
import re

import pytest

from storage import open_repository
from support import bus_video, run_watcher, watcher_config

pytestmark = pytest.mark.slow


def test_a_second_run_continues_identities_and_calibration_of_the_first(tmp_path, weights):
    bus_video(tmp_path / "first.mkv", 60)
    bus_video(tmp_path / "second.mkv", 30)
    first = watcher_config(tmp_path, weights,
                           "- {id: gate, source: first.mkv, max_fps: null}\n")
    result = run_watcher(first)
    assert result.returncode == 0, result.stderr[-3000:]
    db = f"sqlite:///{tmp_path / 'watch.db'}"
    with open_repository(db, readonly=True) as repo:
        identities = repo.count_identities()
        (run,) = repo.list_runs()
        stored = run.calibration
    assert identities >= 1
    assert stored["model_id"] and len(stored["genuine_samples"]) == stored["genuine_count"]
    assert len(stored["impostor_samples"]) == stored["impostor_count"]
    json.dumps(stored)  # plain JSON in runs.calibration

    second = watcher_config(tmp_path, weights,
                            "- {id: hall, source: second.mkv, max_fps: null}\n")
    result = run_watcher(second)
    assert result.returncode == 0, result.stderr[-3000:]
    log = result.stderr
    assert f"linking continues {identities} identities of earlier runs" in log
    labels = re.search(r"linker calibration continues from run 1: (.*)", log)
    assert labels, log[-3000:]
    if stored["genuine_count"] < 50 or stored["impostor_count"] < 50:
        assert (f"{stored['genuine_count']} of 50 genuine and {stored['impostor_count']} of 50 "
                "impostor labels") in labels[1]
    with open_repository(db, readonly=True) as repo:
        latest = repo.list_runs()[-1].calibration
    assert latest["genuine_count"] >= stored["genuine_count"]
    assert latest["impostor_count"] >= stored["impostor_count"]

    result = run_watcher(second, "--start-over")  # a fresh start forgets both
    assert result.returncode == 0, result.stderr[-3000:]
    assert "linking continues" not in result.stderr
    assert "calibration continues" not in result.stderr
