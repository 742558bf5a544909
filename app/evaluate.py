"""Score a watcher database against ground truth: tracking, retrieval and identity links.

`python -m app.evaluate --db URL --truth DIR [--run ID] [--iou 0.5] [--frames all|sampled]
[--rerank] [--json OUT]`; in code `evaluate(db_url, truth_dir, ...) -> EvaluationReport`.

Truth: one MOTChallenge-style text file per camera, `DIR/<camera id>.txt`, one line per person
per frame: `frame,id,x,y,w,h,conf,x3d,y3d,z3d` with a 1-based frame (frame 1 is the watcher's
frame index 0), a global person id >= 1 (the same in every camera), the box in camera pixels
after the camera's crop (the watcher's coordinates) and conf 1 (lines with conf 0 are
ignored, as in MOTChallenge); the world coordinates are not read. `training.scene` writes
such files. Every camera in the database needs a file; a truth camera the watcher did not see
counts as missed.

Predictions: the watcher stores a few boxes per clip (4 per 16 observations by default), not
every frame. A tracklet's box on the frames between its stored boxes is linearly interpolated
(never extrapolated past its first and last stored box): the tracker followed the person
there, and scoring only the stored frames would count each person as missed on most frames.
`frames="all"` scores every frame that has a truth or a predicted box; `frames="sampled"` only
the frames on which the watcher stored at least one box in that camera (frames it processed),
still with every tracklet's interpolated box there.

- Multi-camera tracking (TrackEval): IDF1 and HOTA over all cameras at once (their frames
  concatenated), each tracklet's stored identity as its global id (a tracklet without one is
  its own id); per camera, the same with per-tracklet ids (the single-camera tracker alone).
- Cross-camera retrieval: each tracklet is matched to the truth person that most of its stored
  boxes overlap (IoU >= `iou`, at least half of its boxes); a matched tracklet queries the
  other cameras' tracklets (unmatched ones stay as distractors) by the project's one
  similarity (`storage.similarity`: unit mean of unit clip descriptors, Euclidean 0..2);
  mAP and rank-1 over queries with a true match, ties broken by gallery order. `--rerank`
  reports them a second time, beside the first, with each query's gallery re-ranked
  k-reciprocally (`storage.rerank`), as the dashboard's search does with `rerank` (it re-ranks
  its top `storage.search.RERANK_CANDIDATES`; here the whole gallery, the same up to that size).
- Links: pairs of tracklets in one stored identity vs pairs of the same truth person;
  precision and recall, cross-camera and within-camera separately.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import trackeval

from storage import open_repository
from storage.errors import StorageError
from storage.rerank import k_reciprocal
from storage.similarity import distances, tracklet_descriptor

Box = tuple[float, float, float, float]  # x1, y1, x2, y2
FRAME_MODES = ("all", "sampled")


class TruthError(ValueError):
    """A truth folder or file is missing or malformed (the message names file and line)."""


@dataclasses.dataclass(frozen=True)
class TrackScores:
    """TrackEval's figures for one set of frames (IDF1 etc. at the IoU threshold; HOTA averaged
    over its 19 thresholds)."""

    idf1: float
    idp: float
    idr: float
    hota: float
    deta: float
    assa: float
    mota: float
    recall: float
    precision: float
    id_switches: int
    truth_boxes: int
    predicted_boxes: int
    truth_ids: int
    predicted_ids: int


@dataclasses.dataclass(frozen=True)
class LinkScores:
    """Pairs of tracklets: `predicted` share a stored identity, `truth` a truth person."""

    predicted_pairs: int
    truth_pairs: int
    correct_pairs: int

    @property
    def precision(self) -> float | None:
        return self.correct_pairs / self.predicted_pairs if self.predicted_pairs else None

    @property
    def recall(self) -> float | None:
        return self.correct_pairs / self.truth_pairs if self.truth_pairs else None


@dataclasses.dataclass(frozen=True)
class EvaluationReport:
    """Everything `evaluate` measures; `to_dict` is what `--json` writes."""

    tracking: TrackScores
    per_camera: dict[str, TrackScores]
    retrieval_map: float | None
    rank1: float | None
    queries: int
    cross_camera_links: LinkScores
    within_camera_links: LinkScores
    tracklets: int
    matched_tracklets: int
    identities: int
    truth_people: int
    frames_evaluated: int
    frames: str
    iou: float
    run_id: int | None
    reranked_map: float | None = None  # retrieval with k-reciprocal re-ranking (`rerank`)
    reranked_rank1: float | None = None

    def to_dict(self) -> dict:
        result = dataclasses.asdict(self)
        for key in ("cross_camera_links", "within_camera_links"):
            links = getattr(self, key)
            result[key].update(precision=links.precision, recall=links.recall)
        return result

    def table(self) -> str:
        """A plain-text summary, one figure per line."""
        t = self.tracking

        def pct(value: float | None) -> str:
            return "n/a" if value is None else f"{100 * value:.1f}"

        def links(name: str, s: LinkScores) -> str:
            return (f"{name:<26}precision {pct(s.precision)}  recall {pct(s.recall)}  "
                    f"({s.correct_pairs} correct of {s.predicted_pairs} linked pairs, "
                    f"{s.truth_pairs} true pairs)")

        lines = [
            (f"frames: {self.frames} ({self.frames_evaluated} camera-frames), IoU {self.iou:g}, "
             f"run {self.run_id if self.run_id is not None else 'all'}"),
            (f"tracklets {self.tracklets} ({self.matched_tracklets} matched to a person), "
             f"identities {self.identities}, truth people {self.truth_people}"),
            (f"{'multi-camera':<26}IDF1 {pct(t.idf1)}  HOTA {pct(t.hota)}  (DetA {pct(t.deta)}, "
             f"AssA {pct(t.assa)})  MOTA {pct(t.mota)}  recall {pct(t.recall)}  precision "
             f"{pct(t.precision)}  IDsw {t.id_switches}"),
        ]
        for camera, s in self.per_camera.items():
            lines.append(f"{'  camera ' + camera:<26}IDF1 {pct(s.idf1)}  HOTA {pct(s.hota)}  "
                         f"recall {pct(s.recall)}  precision {pct(s.precision)}  "
                         f"tracklets {s.predicted_ids} / people {s.truth_ids}")
        retrieval = (f"{'cross-camera retrieval':<26}mAP {pct(self.retrieval_map)}  rank-1 "
                     f"{pct(self.rank1)}  ({self.queries} queries)")
        if self.reranked_map is not None:
            retrieval += (f"; re-ranked: mAP {pct(self.reranked_map)}  rank-1 "
                          f"{pct(self.reranked_rank1)}")
        lines += [
            retrieval,
            links("cross-camera links", self.cross_camera_links),
            links("within-camera links", self.within_camera_links),
        ]
        return "\n".join(lines)


# -- truth -----------------------------------------------------------------------------------
def read_truth_file(path: Path) -> dict[int, list[tuple[int, Box]]]:
    """frame index (0-based) -> [(person id, box)] from one MOTChallenge-style file."""
    frames: dict[int, list[tuple[int, Box]]] = {}
    seen: set[tuple[int, int]] = set()
    try:
        text = path.read_text()
    except OSError as exc:
        raise TruthError(f"{path}: cannot read the truth file: {exc.strerror or exc}") from None
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        fields = [f.strip() for f in line.split(",")]
        if len(fields) < 6:
            raise TruthError(f"{where}: expected frame,id,x,y,w,h[,conf,x,y,z], "
                             f"got {len(fields)} field(s): {line.strip()!r}")
        try:
            frame, person = int(fields[0]), int(fields[1])
            x, y, w, h = (float(v) for v in fields[2:6])
            conf = float(fields[6]) if len(fields) > 6 and fields[6] else 1.0
        except ValueError:
            raise TruthError(f"{where}: frame and id must be integers and x,y,w,h numbers: "
                             f"{line.strip()!r}") from None
        if frame < 1:
            raise TruthError(f"{where}: frames are 1-based, got frame {frame}")
        if person < 1:
            raise TruthError(f"{where}: person ids must be >= 1, got {person}")
        if not (np.isfinite([x, y, w, h]).all() and w > 0 and h > 0):
            raise TruthError(f"{where}: the box needs a finite position and w, h > 0, "
                             f"got {x},{y},{w},{h}")
        if (frame, person) in seen:
            raise TruthError(f"{where}: person {person} appears twice in frame {frame}")
        seen.add((frame, person))
        if conf == 0:
            continue
        frames.setdefault(frame - 1, []).append((person, (x, y, x + w, y + h)))
    return frames


def read_truth(truth_dir: str | Path) -> dict[str, dict[int, list[tuple[int, Box]]]]:
    """camera id -> its truth (see `read_truth_file`), one `<camera>.txt` per camera."""
    folder = Path(truth_dir)
    if not folder.is_dir():
        raise TruthError(f"{folder}: no such truth folder (expected one <camera>.txt per camera)")
    files = sorted(folder.glob("*.txt"))
    if not files:
        raise TruthError(f"{folder}: no truth files (expected one <camera>.txt per camera)")
    return {path.stem: read_truth_file(path) for path in files}


# -- predictions -----------------------------------------------------------------------------
@dataclasses.dataclass
class _Tracklet:
    id: int
    camera: str
    identity: int | None
    stored: dict[int, Box]  # frame index -> stored box
    descriptor: np.ndarray | None
    person: int | None = None


def _load_tracklets(repo, run_id: int | None, model_id: str | None) -> list[_Tracklet]:
    tracklets = []
    for record in repo.list_tracklets(run_id=run_id):
        clips = repo.tracklet_clips(record.id, model_id=model_id)
        stored: dict[int, Box] = {}
        for clip in clips:
            if clip.boxes is None:  # clips stored without boxes say nothing about position
                continue
            for frame, box in zip(clip.frame_indices, clip.boxes, strict=True):
                stored[int(frame)] = tuple(float(v) for v in box)
        descriptor = None
        if clips:
            descriptor = tracklet_descriptor(np.stack([c.descriptor for c in clips]))
        tracklets.append(_Tracklet(record.id, record.camera_id, record.identity_id,
                                   dict(sorted(stored.items())), descriptor))
    return tracklets


def _interpolated(stored: dict[int, Box]) -> dict[int, Box]:
    """A box on every frame from the first to the last stored one (linear in between)."""
    if not stored:
        return {}
    frames = np.fromiter(stored, dtype=np.int64)
    boxes = np.asarray(list(stored.values()), dtype=np.float64)
    every = np.arange(frames[0], frames[-1] + 1)
    columns = [np.interp(every, frames, boxes[:, k]) for k in range(4)]
    return {int(f): tuple(float(c[i]) for c in columns) for i, f in enumerate(every)}


def _ious(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU matrix [len(a), len(b)] of (x1, y1, x2, y2) boxes (TrackEval's own routine)."""
    if len(a) == 0 or len(b) == 0:
        return np.zeros((len(a), len(b)))
    return trackeval.datasets._base_dataset._BaseDataset._calculate_box_ious(
        a, b, box_format="x0y0x1y1")


# -- scoring ---------------------------------------------------------------------------------
Timestep = tuple[list[int], list[Box], list[object], list[Box]]  # truth ids/boxes, predicted


def _track_scores(timesteps: list[Timestep], iou: float) -> TrackScores:
    """IDF1 (Identity), HOTA and CLEAR from TrackEval over frames given as timesteps."""
    truth_ids = sorted({p for ids, _, _, _ in timesteps for p in ids})
    predicted_ids = sorted({p for _, _, ids, _ in timesteps for p in ids}, key=str)
    truth_index = {p: i for i, p in enumerate(truth_ids)}
    predicted_index = {p: i for i, p in enumerate(predicted_ids)}
    data = {"gt_ids": [], "tracker_ids": [], "similarity_scores": [],
            "num_timesteps": len(timesteps), "num_gt_ids": len(truth_ids),
            "num_tracker_ids": len(predicted_ids), "num_gt_dets": 0, "num_tracker_dets": 0}
    for gt_ids, gt_boxes, pr_ids, pr_boxes in timesteps:
        data["gt_ids"].append(np.array([truth_index[p] for p in gt_ids], dtype=int))
        data["tracker_ids"].append(np.array([predicted_index[p] for p in pr_ids], dtype=int))
        data["similarity_scores"].append(_ious(np.asarray(gt_boxes, float).reshape(-1, 4),
                                               np.asarray(pr_boxes, float).reshape(-1, 4)))
        data["num_gt_dets"] += len(gt_ids)
        data["num_tracker_dets"] += len(pr_ids)
    quiet = {"THRESHOLD": iou, "PRINT_CONFIG": False}
    hota = trackeval.metrics.HOTA({"PRINT_CONFIG": False}).eval_sequence(data)
    identity = trackeval.metrics.Identity(quiet).eval_sequence(data)
    clear = trackeval.metrics.CLEAR(quiet).eval_sequence(data)
    return TrackScores(
        idf1=float(identity["IDF1"]), idp=float(identity["IDP"]), idr=float(identity["IDR"]),
        hota=float(np.mean(hota["HOTA"])), deta=float(np.mean(hota["DetA"])),
        assa=float(np.mean(hota["AssA"])), mota=float(clear["MOTA"]),
        recall=float(clear["CLR_Re"]), precision=float(clear["CLR_Pr"]),
        id_switches=int(clear["IDSW"]), truth_boxes=data["num_gt_dets"],
        predicted_boxes=data["num_tracker_dets"], truth_ids=len(truth_ids),
        predicted_ids=len(predicted_ids))


def _timesteps(truth: dict[int, list[tuple[int, Box]]], tracklets: list[_Tracklet],
               frames: str, global_ids: bool) -> list[Timestep]:
    """One camera's scored frames: truth and (interpolated) predicted ids and boxes."""
    predicted: dict[int, list[tuple[object, Box]]] = {}
    for t in tracklets:
        key = (t.identity if global_ids and t.identity is not None else f"tracklet {t.id}")
        for frame, box in _interpolated(t.stored).items():
            predicted.setdefault(frame, []).append((key, box))
    if frames == "sampled":
        chosen = {f for t in tracklets for f in t.stored}
    else:
        chosen = set(truth) | set(predicted)
    steps = []
    for frame in sorted(chosen):
        gt = truth.get(frame, [])
        pr = predicted.get(frame, [])
        steps.append(([p for p, _ in gt], [b for _, b in gt], [k for k, _ in pr],
                      [b for _, b in pr]))
    return steps


def _match_people(tracklets: list[_Tracklet], truth: dict[str, dict[int, list]],
                  iou: float) -> None:
    """Set each tracklet's truth person: the one most of its stored boxes overlap."""
    for t in tracklets:
        votes: Counter[int] = Counter()
        for frame, box in t.stored.items():
            people = truth.get(t.camera, {}).get(frame, [])
            if not people:
                continue
            overlaps = _ious(np.asarray([box]), np.asarray([b for _, b in people]))[0]
            best = int(np.argmax(overlaps))
            if overlaps[best] >= iou:
                votes[people[best][0]] += 1
        if votes:
            person, count = min(votes.items(), key=lambda kv: (-kv[1], kv[0]))
            if count >= 0.5 * len(t.stored):
                t.person = person


def _average_precision(relevant: np.ndarray) -> float:
    """AP of one ranked list (`relevant` booleans in rank order, at least one True)."""
    hits = np.cumsum(relevant)
    return float(np.sum(hits[relevant] / (np.flatnonzero(relevant) + 1)) / hits[-1])


def _retrieval(tracklets: list[_Tracklet],
               rerank: bool = False) -> tuple[float | None, float | None, int]:
    """Cross-camera mAP and rank-1 of matched tracklets (ties broken by gallery order); with
    `rerank`, each query alone with its gallery is re-ranked (`storage.rerank.k_reciprocal`)."""
    usable = [t for t in tracklets if t.descriptor is not None]
    if not usable:
        return None, None, 0
    vectors = np.stack([t.descriptor for t in usable])
    aps, firsts = [], []
    for q, query in enumerate(usable):
        if query.person is None:
            continue
        gallery = [g for g, t in enumerate(usable) if t.camera != query.camera]
        relevant = np.array([usable[g].person == query.person for g in gallery], dtype=bool)
        if not relevant.any():
            continue
        d = distances(vectors[q:q + 1], vectors[gallery])
        if rerank:
            d = k_reciprocal(d, distances(vectors[gallery], vectors[gallery]))
        order = np.argsort(d[0], kind="stable")
        aps.append(_average_precision(relevant[order]))
        firsts.append(bool(relevant[order][0]))
    if not aps:
        return None, None, 0
    return float(np.mean(aps)), float(np.mean(firsts)), len(aps)


def _links(tracklets: list[_Tracklet], cross_camera: bool) -> LinkScores:
    predicted = truth = correct = 0
    for i, a in enumerate(tracklets):
        for b in tracklets[i + 1:]:
            if (a.camera != b.camera) != cross_camera:
                continue
            linked = a.identity is not None and a.identity == b.identity
            same = a.person is not None and a.person == b.person
            predicted += linked
            truth += same
            correct += linked and same
    return LinkScores(predicted, truth, correct)


def evaluate(db_url: str, truth_dir: str | Path, *, run_id: int | None = None,
             iou: float = 0.5, frames: str = "all", model_id: str | None = None,
             rerank: bool = False) -> EvaluationReport:
    """Score the database at `db_url` (opened read-only) against the truth folder; `rerank`
    also scores retrieval with k-reciprocal re-ranking."""
    if frames not in FRAME_MODES:
        raise ValueError(f"frames must be one of {FRAME_MODES}, got {frames!r}")
    if not 0 < iou <= 1:
        raise ValueError(f"iou must be in (0, 1], got {iou}")
    truth = read_truth(truth_dir)
    with open_repository(db_url, readonly=True) as repo:
        if run_id is not None and run_id not in {r.id for r in repo.list_runs()}:
            raise StorageError(f"{repo.url} has no run {run_id}")
        if model_id is None:
            models = repo.model_ids()
            if len(models) > 1:
                raise StorageError(f"{repo.url} holds clips of several models {models}; "
                                   "choose one with model_id")
        watched = {c.id for c in repo.list_cameras()}
        tracklets = _load_tracklets(repo, run_id, model_id)
    missing = sorted(watched - set(truth))
    if missing:
        raise TruthError(f"{Path(truth_dir)}: no truth for camera(s) {missing} "
                         f"(expected {', '.join(f'{c}.txt' for c in missing)})")
    _match_people(tracklets, truth, iou)
    combined: list[Timestep] = []
    per_camera = {}
    for camera in sorted(watched | set(truth)):
        mine = [t for t in tracklets if t.camera == camera]
        combined += _timesteps(truth.get(camera, {}), mine, frames, global_ids=True)
        per_camera[camera] = _track_scores(
            _timesteps(truth.get(camera, {}), mine, frames, global_ids=False), iou)
    retrieval_map, rank1, queries = _retrieval(tracklets)
    reranked_map, reranked_rank1, _ = _retrieval(tracklets, rerank=True) if rerank else (
        None, None, 0)
    people = {p for camera in truth.values() for rows in camera.values() for p, _ in rows}
    return EvaluationReport(
        tracking=_track_scores(combined, iou), per_camera=per_camera,
        retrieval_map=retrieval_map, rank1=rank1, queries=queries,
        cross_camera_links=_links(tracklets, cross_camera=True),
        within_camera_links=_links(tracklets, cross_camera=False),
        tracklets=len(tracklets), matched_tracklets=sum(t.person is not None for t in tracklets),
        identities=len({t.identity for t in tracklets if t.identity is not None}),
        truth_people=len(people), frames_evaluated=len(combined), frames=frames, iou=iou,
        run_id=run_id, reranked_map=reranked_map, reranked_rank1=reranked_rank1)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m app.evaluate",
                                     description="Score a keyreid-watch database against "
                                                 "MOTChallenge-style truth (one file per camera).")
    parser.add_argument("--db", required=True, help="database URL, e.g. sqlite:///scene.db")
    parser.add_argument("--truth", required=True, type=Path,
                        help="folder with one <camera>.txt per camera")
    parser.add_argument("--run", type=int, default=None, help="only this run's tracklets")
    parser.add_argument("--iou", type=float, default=0.5,
                        help="IoU for a box to match (IDF1, MOTA, tracklet to person)")
    parser.add_argument("--frames", choices=FRAME_MODES, default="all",
                        help="all: every frame with a box; sampled: frames the watcher stored")
    parser.add_argument("--model", default=None, help="descriptor model id (when several)")
    parser.add_argument("--rerank", action="store_true",
                        help="also score retrieval with k-reciprocal re-ranking, side by side")
    parser.add_argument("--json", type=Path, default=None, help="also write the report here")
    args = parser.parse_args(argv)
    try:
        report = evaluate(args.db, args.truth, run_id=args.run, iou=args.iou,
                          frames=args.frames, model_id=args.model, rerank=args.rerank)
    except (TruthError, StorageError, ValueError) as exc:
        print(f"app.evaluate: error: {exc}", file=sys.stderr)
        return 2
    print(report.table())
    if args.json is not None:
        args.json.write_text(json.dumps(report.to_dict(), indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
