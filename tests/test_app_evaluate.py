"""app.evaluate: metric plumbing on hand-made databases and truth with known answers, clear
errors for bad truth, and one end-to-end run of keyreid-watch on a training.scene scene."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from app.evaluate import TruthError, evaluate, main, read_truth_file
from storage import open_repository
from storage.records import NewClip
from training.scene import write_truth

DIM = 8


def walk(person: int, frames: range, x0: float, dx: float) -> list[tuple]:
    """Truth rows (0-based frame, person, x, y, w, h) of a person walking at dx px/frame."""
    return [(f, person, x0 + dx * (f - frames.start), 100.0, 40.0, 120.0) for f in frames]


def xyxy(row: tuple) -> tuple[float, float, float, float]:
    _, _, x, y, w, h = row
    return (x, y, x + w, y + h)


def descriptor(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=DIM).astype(np.float32)


def build_db(path: Path, tracklets: list[dict]) -> str:
    """A database with one run; each tracklet dict: camera, rows (truth rows to store as boxes,
    one clip per 4 rows), identity (a key: same key = same identity; None = no identity),
    descriptor (its clips' descriptor)."""
    url = f"sqlite:///{path}"
    with open_repository(url, descriptor_dtype="float32") as repo:
        run = repo.start_run({})
        identities: dict[object, int] = {}
        for camera in sorted({t["camera"] for t in tracklets}):
            repo.upsert_camera(camera, source=f"{camera}.mp4")
        for track_id, t in enumerate(tracklets, start=1):
            rows = t["rows"]
            tid = repo.add_tracklet(run, t["camera"], track_id, rows[0][0], rows[0][0] / 10,
                                    last_frame=rows[-1][0], last_time=rows[-1][0] / 10,
                                    finished=True)
            repo.add_clips([NewClip(tracklet_id=tid, frame_indices=[r[0] for r in chunk],
                                    start_time=chunk[0][0] / 10, end_time=chunk[-1][0] / 10,
                                    descriptor=t["descriptor"], model_id="m",
                                    boxes=[xyxy(r) for r in chunk])
                            for chunk in (rows[i:i + 4] for i in range(0, len(rows), 4))])
            key = t.get("identity")
            if key is None:
                continue
            if key in identities:
                repo.assign_identity(tid, identities[key])
            else:
                identities[key] = repo.open_identity(tid)
        repo.finish_run(run)
    return url


@pytest.fixture
def two_cameras(tmp_path):
    """Person 1 and 2 cross camera a (frames 0-39) then b (60-79): truth on every frame."""
    truth = {
        "a": walk(1, range(40), 0, 5) + walk(2, range(40), 500, -5),
        "b": walk(1, range(60, 80), 0, 8) + walk(2, range(60, 80), 500, -8),
    }
    folder = tmp_path / "truth"
    folder.mkdir()
    for camera, rows in truth.items():
        write_truth(folder / f"{camera}.txt", sorted(rows))
    return folder, truth


def every(rows: list[tuple], step: int) -> list[tuple]:
    """The rows the watcher stored (every `step`-th, always the last: a track's span)."""
    kept = rows[::step]
    return kept if kept[-1] == rows[-1] else kept + [rows[-1]]


def person_rows(truth: dict, camera: str, person: int) -> list[tuple]:
    return [r for r in truth[camera] if r[1] == person]


def test_perfect_prediction_scores_one(tmp_path, two_cameras):
    folder, truth = two_cameras
    url = build_db(tmp_path / "w.db", [
        {"camera": c, "rows": every(person_rows(truth, c, p), 3), "identity": p,
         "descriptor": descriptor(p)}
        for c in ("a", "b") for p in (1, 2)])
    report = evaluate(url, folder)
    assert report.tracking.idf1 == pytest.approx(1.0)
    assert report.tracking.hota == pytest.approx(1.0)
    assert report.tracking.recall == pytest.approx(1.0)
    assert report.tracking.truth_boxes == 120 == report.tracking.predicted_boxes
    assert all(s.idf1 == pytest.approx(1.0) for s in report.per_camera.values())
    assert (report.tracklets, report.matched_tracklets, report.identities) == (4, 4, 2)
    assert report.retrieval_map == pytest.approx(1.0) and report.rank1 == 1.0
    assert report.queries == 4
    links = report.cross_camera_links
    assert (links.predicted_pairs, links.truth_pairs, links.correct_pairs) == (2, 2, 2)
    assert links.precision == 1.0 and links.recall == 1.0
    assert report.within_camera_links.precision is None
    assert report.within_camera_links.recall is None


def test_one_identity_swap_halves_the_cross_camera_part(tmp_path, two_cameras):
    """Camera b's tracklets join the other person's identity: the single-camera tracks stay
    perfect, IDF1 keeps only the best consistent mapping (camera a's 80 of 120 boxes), every
    cross-camera link is wrong, and descriptors that agree with the swap make rank-1 zero."""
    folder, truth = two_cameras
    url = build_db(tmp_path / "w.db", [
        {"camera": c, "rows": every(person_rows(truth, c, p), 2),
         "identity": p if c == "a" else 3 - p,
         "descriptor": descriptor(p if c == "a" else 3 - p)}
        for c in ("a", "b") for p in (1, 2)])
    report = evaluate(url, folder)
    assert report.tracking.idf1 == pytest.approx(80 / 120)
    assert report.tracking.hota < 0.9
    assert report.tracking.recall == pytest.approx(1.0)
    assert all(s.idf1 == pytest.approx(1.0) for s in report.per_camera.values())
    links = report.cross_camera_links
    assert (links.predicted_pairs, links.truth_pairs, links.correct_pairs) == (2, 2, 0)
    assert links.precision == 0.0 and links.recall == 0.0
    assert report.rank1 == 0.0 and report.retrieval_map == pytest.approx(0.5)


def test_fragments_unlinked_identities_and_stray_tracklets(tmp_path, two_cameras):
    """Person 1 in camera a is two tracklets; linked or not decides within-camera links; a
    tracklet on no one is a false positive, not a query, and its links are wrong."""
    folder, truth = two_cameras
    rows = person_rows(truth, "a", 1)
    stray = [(f, 0, 300.0, 0.0, 20.0, 20.0) for f in range(12)]

    def tracklets(second_identity):
        return [
            {"camera": "a", "rows": rows[:20], "identity": 1, "descriptor": descriptor(1)},
            {"camera": "a", "rows": rows[20:], "identity": second_identity,
             "descriptor": descriptor(1)},
            {"camera": "b", "rows": person_rows(truth, "b", 1), "identity": None,
             "descriptor": descriptor(1)},
            {"camera": "b", "rows": stray, "identity": 1, "descriptor": descriptor(7)},
        ]

    joined = evaluate(build_db(tmp_path / "joined.db", tracklets(1)), folder)
    assert (joined.tracklets, joined.matched_tracklets) == (4, 3)
    within = joined.within_camera_links
    assert (within.predicted_pairs, within.truth_pairs, within.correct_pairs) == (1, 1, 1)
    cross = joined.cross_camera_links  # the stray b tracklet is linked to both a fragments
    assert (cross.predicted_pairs, cross.truth_pairs, cross.correct_pairs) == (2, 2, 0)
    assert joined.queries == 3  # the stray one has no person; nobody sees person 2
    assert joined.per_camera["a"].recall == pytest.approx(0.5)  # person 2 never tracked
    assert joined.tracking.precision < 1.0  # the stray boxes

    apart = evaluate(build_db(tmp_path / "apart.db", tracklets(2)), folder)
    within = apart.within_camera_links
    assert (within.predicted_pairs, within.truth_pairs, within.correct_pairs) == (0, 1, 0)
    assert within.precision is None and within.recall == 0.0


def test_sampled_frames_score_only_frames_the_watcher_stored(tmp_path, two_cameras):
    """Only person 1 is tracked (stored every 4th frame): "all" counts person 2 missed on every
    frame, "sampled" only on the 10 + 5 (+ last) frames stored."""
    folder, truth = two_cameras
    url = build_db(tmp_path / "w.db", [
        {"camera": c, "rows": every(person_rows(truth, c, 1), 4), "identity": 1,
         "descriptor": descriptor(1)} for c in ("a", "b")])
    everything = evaluate(url, folder, frames="all")
    sampled = evaluate(url, folder, frames="sampled")
    assert everything.frames_evaluated == 60 and everything.tracking.recall == pytest.approx(0.5)
    assert sampled.frames_evaluated == 10 + 1 + 5 + 1
    assert sampled.tracking.truth_boxes == 2 * 17 and sampled.tracking.recall == pytest.approx(0.5)


def test_a_camera_the_watcher_never_saw_counts_as_missed(tmp_path, two_cameras):
    folder, truth = two_cameras
    url = build_db(tmp_path / "w.db", [
        {"camera": "a", "rows": person_rows(truth, "a", p), "identity": p,
         "descriptor": descriptor(p)} for p in (1, 2)])
    report = evaluate(url, folder)
    assert set(report.per_camera) == {"a", "b"}
    assert report.per_camera["b"].recall == 0.0 and report.per_camera["a"].recall == 1.0
    assert report.tracking.recall == pytest.approx(80 / 120)
    assert report.queries == 0 and report.retrieval_map is None


@pytest.mark.parametrize("line, message", [
    ("1,2,3", "cam.txt:2: expected frame,id,x,y,w,h"),
    ("x,2,3,4,5,6,1,-1,-1,-1", "cam.txt:2: frame and id must be integers"),
    ("0,2,3,4,5,6,1,-1,-1,-1", "cam.txt:2: frames are 1-based"),
    ("2,0,3,4,5,6,1,-1,-1,-1", "cam.txt:2: person ids must be >= 1"),
    ("2,2,3,4,0,6,1,-1,-1,-1", "cam.txt:2: the box needs"),
    ("1,1,3,4,5,6,1,-1,-1,-1", "cam.txt:2: person 1 appears twice in frame 1"),
])
def test_bad_truth_lines_name_file_and_line(tmp_path, line, message):
    path = tmp_path / "cam.txt"
    path.write_text(f"1,1,0,0,10,20,1,-1,-1,-1\n{line}\n")
    with pytest.raises(TruthError, match=message):
        read_truth_file(path)


def test_truth_reader_keeps_conf_one_lines_and_converts_frames(tmp_path):
    path = tmp_path / "cam.txt"
    path.write_text("3,7,10,20,30,40,1,-1,-1,-1\n\n4,7,11,20,30,40,0,-1,-1,-1\n5,8,1,2,3,4\n")
    assert read_truth_file(path) == {2: [(7, (10.0, 20.0, 40.0, 60.0))],
                                     4: [(8, (1.0, 2.0, 4.0, 6.0))]}


def test_missing_truth_is_a_clear_error_and_cli_exit_code(tmp_path, two_cameras, capsys):
    folder, truth = two_cameras
    url = build_db(tmp_path / "w.db", [
        {"camera": "c", "rows": person_rows(truth, "a", 1), "identity": 1,
         "descriptor": descriptor(1)}])
    with pytest.raises(TruthError, match=r"no truth for camera\(s\) \['c'\].*c\.txt"):
        evaluate(url, folder)
    with pytest.raises(TruthError, match="no such truth folder"):
        evaluate(url, tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(TruthError, match="no truth files"):
        evaluate(url, tmp_path / "empty")
    assert main(["--db", url, "--truth", str(tmp_path / "nowhere")]) == 2
    assert "no such truth folder" in capsys.readouterr().err


def test_cli_prints_the_table_and_writes_json(tmp_path, two_cameras, capsys):
    folder, truth = two_cameras
    url = build_db(tmp_path / "w.db", [
        {"camera": c, "rows": person_rows(truth, c, p), "identity": p,
         "descriptor": descriptor(p)} for c in ("a", "b") for p in (1, 2)])
    out = tmp_path / "report.json"
    assert main(["--db", url, "--truth", str(folder), "--json", str(out), "--run", "1"]) == 0
    printed = capsys.readouterr().out
    assert "IDF1 100.0" in printed and "mAP 100.0" in printed
    data = json.loads(out.read_text())
    assert data["tracking"]["idf1"] == pytest.approx(1.0) and data["run_id"] == 1
    assert data["cross_camera_links"]["precision"] == 1.0
    assert main(["--db", url, "--truth", str(folder), "--run", "9"]) == 2
    assert "no run 9" in capsys.readouterr().err


def test_rerank_is_reported_beside_the_plain_retrieval(tmp_path, two_cameras, capsys):
    """`rerank` scores the same queries a second time (here both rankings are perfect) and
    the CLI prints both figures on one line; without it the report has no re-ranked figure."""
    folder, truth = two_cameras
    url = build_db(tmp_path / "w.db", [
        {"camera": c, "rows": every(person_rows(truth, c, p), 2), "identity": p,
         "descriptor": descriptor(p)} for c in ("a", "b") for p in (1, 2)])
    plain = evaluate(url, folder)
    assert plain.reranked_map is None and plain.reranked_rank1 is None
    assert "re-ranked" not in plain.table()
    both = evaluate(url, folder, rerank=True)
    assert (both.retrieval_map, both.rank1, both.queries) == (plain.retrieval_map, plain.rank1, 4)
    assert both.reranked_map == pytest.approx(1.0) and both.reranked_rank1 == 1.0
    assert main(["--db", url, "--truth", str(folder), "--rerank"]) == 0
    assert "mAP 100.0  rank-1 100.0  (4 queries); re-ranked: mAP 100.0  rank-1 100.0" in \
        capsys.readouterr().out


@pytest.mark.slow
def test_watcher_on_a_synthetic_scene_scores_sanely(tmp_path, weights):
    """training.scene -> keyreid-watch (its cams.yaml) -> app.evaluate: the detector and tracker
    find the scene's people; the cross-camera figures exist (their values are the linker's)."""
    import subprocess
    import sys

    from support import ROOT, run_watcher

    folder = tmp_path / "scene"
    made = subprocess.run([sys.executable, "-m", "training.scene", "--out", str(folder),
                           "--people", "4", "--seconds", "24", "--seed", "3"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120, check=False)
    assert made.returncode == 0, made.stderr
    scene = json.loads((folder / "scene.json").read_text())
    truth_ids = {int(line.split(",")[1]) for camera in ("cam0", "cam1")
                 for line in (folder / f"{camera}.txt").read_text().splitlines()}
    assert truth_ids == {p["id"] for p in scene["people"]} == {1, 2, 3, 4}
    low, high = scene["config"]["transit"]
    travellers = [p["visits"] for p in scene["people"] if len(p["visits"]) == 2]
    assert travellers, "nobody walks through both cameras"
    for first, second in travellers:  # entering the next camera after the pair's transit time
        assert low / 1.15 <= second["enter_time"] - first["exit_time"] <= high / 0.85

    result = run_watcher(folder / "cams.yaml", timeout=180)
    assert result.returncode == 0, result.stdout + result.stderr[-3000:]

    report = evaluate(f"sqlite:///{folder / 'scene.db'}", folder)
    assert report.tracking.recall > 0.5 and report.tracking.precision > 0.8, report.table()
    for camera, scores in report.per_camera.items():
        assert scores.recall > 0.5 and scores.idf1 > 0.5, (camera, report.table())
    assert report.matched_tracklets >= 0.5 * report.tracklets >= 1, report.table()
    assert 0 < report.tracking.idf1 <= 1 and 0 < report.tracking.hota <= 1
    assert report.queries >= 1 and 0 < report.retrieval_map <= 1, report.table()
    assert report.cross_camera_links.truth_pairs >= 1, report.table()
    sampled = evaluate(f"sqlite:///{folder / 'scene.db'}", folder, frames="sampled")
    assert 0 < sampled.frames_evaluated < report.frames_evaluated
