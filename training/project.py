"""`python -m training.project`: fit a checkpoint's compact-descriptor projection (`reid.projection`).

    python -m training.project --checkpoint runs/tiny/best.pt --out runs/tiny/compact.pt \\
        --dataset synthetic --root data/synthetic [--dim 1024] [--whiten] [--compare]

Encodes the training tracklets' clips (all consecutive T-frame clips, as evaluation does, of a
seeded sample of whole tracklets holding about `--max-clips` clips: a fraction of MARS's
training set is enough for a PCA and costs a fraction of its encoding), standardised by the
checkpoint's camera statistics when it has them (pooled: dataset cameras are not a site's),
fits the PCA and writes the checkpoint with it under `reid.projection.PAYLOAD_KEY` (every other
key unchanged). `reid.Encoder` then projects with it (its `model_id` changes with it); without
one it uses a seeded random projection.
Training people only: the test people stay unseen, so `--compare`'s figures are honest.

`--compare` prints the test retrieval figures (the dataset's protocol, Euclidean distance,
tracklet = mean of its clip descriptors) of the full descriptor, the fitted projection and the
random one in one table, with the bytes each stores per clip in storage's default float16.
A site-adapted checkpoint gets its projection from `training.adapt`, fitted on the site's clips.
"""
from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from reid.checkpoints import load_model, write_checkpoint
from reid.model import KeyReID
from reid.normalisation import PAYLOAD_KEY as NORMALISATION_KEY
from reid.normalisation import CameraNormalisation
from reid.projection import COMPACT_DIM, PAYLOAD_KEY, Projection
from training.evaluate import (CMC_RANKS, autocast_dtype, default_keypoints, euclidean_distances,
                               extract_clip_descriptors, load_dataset, parse_key_values, protocol_options,
                               resolve_device)
from training.metrics import evaluate_ranking, mean_per_tracklet
from training.packed import frame_reader
from training.records import KEYPOINT_BACKENDS, TrackletRecord
from training.sampling import test_clip_indices

log = logging.getLogger(__name__)

MAX_FIT_CLIPS = 20_000  # a [D, D] Gram matrix over this many clips: seconds for ViT-Tiny's 4,800-d
STORED_ITEMSIZE = np.dtype(np.float16).itemsize  # storage's default descriptor dtype


@dataclasses.dataclass(frozen=True)
class Encoded:
    """Clip descriptors as the encoder sees them before projecting (camera-standardised)."""

    clips: np.ndarray  # float32 [C, D]
    owners: np.ndarray  # record index of each clip [C]
    records: Sequence[TrackletRecord]


class Describer:
    """A checkpoint's model and statistics: encodes records as `reid.Encoder` does up to the
    projection (dataset cameras are not the site's: pooled camera statistics)."""

    def __init__(self, checkpoint: str | Path, device: str = "auto", batch_size: int = 64, workers: int = 0,
                 progress: bool = True) -> None:
        self.model, self.payload = load_model(checkpoint)
        self.device = resolve_device(device)
        self.model: KeyReID = self.model.to(self.device).eval()
        self.amp = autocast_dtype(self.device, "auto")
        self.batch_size, self.workers, self.progress = batch_size, workers, progress
        statistics = self.payload.get(NORMALISATION_KEY)
        self.normalisation = None if statistics is None else CameraNormalisation.from_payload(statistics)

    def encode(self, records: Sequence[TrackletRecord], root: str | Path, desc: str) -> Encoded:
        clips, owners = extract_clip_descriptors(self.model, records, self.device, self.batch_size, self.workers,
                                                 self.amp, self.progress, desc=desc, frames=frame_reader(root))
        if self.normalisation is not None:
            clips = self.normalisation.apply(clips)
        return Encoded(clips, owners, records)


def sample_clips(clips: np.ndarray, limit: int, seed: int = 0) -> np.ndarray:
    """At most `limit` rows of `clips`, a seeded sample in their order (all when fewer)."""
    if limit < 2:
        raise ValueError(f"max clips must be >= 2, got {limit}")
    if len(clips) <= limit:
        return clips
    chosen = np.sort(np.random.default_rng(seed).choice(len(clips), size=limit, replace=False))
    return clips[chosen]


def fitting_records(records: Sequence[TrackletRecord], limit: int, num_frames: int,
                    seed: int = 0) -> list[TrackletRecord]:
    """A seeded sample of whole tracklets with about `limit` test-time clips in all (every
    tracklet when they have fewer), in their original order."""
    if limit < 2:
        raise ValueError(f"max clips must be >= 2, got {limit}")
    order = np.random.default_rng(seed).permutation(len(records))
    chosen, clips = [], 0
    for index in order:
        if clips >= limit:
            break
        chosen.append(int(index))
        clips += len(test_clip_indices(len(records[index].frames), num_frames))
    return [records[i] for i in sorted(chosen)]


def scores(query: Encoded, gallery: Encoded, projection: Projection | None, ap_mode: str) -> dict[str, float]:
    """mAP and CMC (percent) of tracklet descriptors = mean of (projected) clip descriptors."""
    def tracklets(encoded: Encoded) -> np.ndarray:
        clips = encoded.clips if projection is None else projection.apply(encoded.clips)
        return mean_per_tracklet(clips, encoded.owners, len(encoded.records))

    ranking = evaluate_ranking(
        euclidean_distances(tracklets(query), tracklets(gallery)),
        np.array([r.pid for r in query.records]), np.array([r.pid for r in gallery.records]),
        np.array([r.camid for r in query.records]), np.array([r.camid for r in gallery.records]),
        max_rank=max(CMC_RANKS), ap_mode=ap_mode)
    return {"mAP": 100.0 * ranking.mAP, **{f"R{rank}": 100.0 * float(ranking.cmc[rank - 1]) for rank in CMC_RANKS}}


def format_comparison(rows: Sequence[dict[str, Any]]) -> str:
    """One line per descriptor: dimension, stored bytes per clip, mAP and CMC."""
    figures = ["mAP"] + [f"R{rank}" for rank in CMC_RANKS]
    lines = [f"{'descriptor':<28s} {'dim':>6s} {'bytes':>7s} " + " ".join(f"{f:>7s}" for f in figures)]
    for row in rows:
        lines.append(f"{row['descriptor']:<28s} {row['dim']:>6d} {row['bytes']:>7,d} "
                     + " ".join(f"{row[f]:7.2f}" for f in figures))
    return "\n".join(lines)


def project(checkpoint: str | Path, dataset: str, root: str | Path, out: str | Path | None = None,
            dim: int = COMPACT_DIM, whiten: bool = False, max_clips: int = MAX_FIT_CLIPS,
            compare: bool = False, keypoints: str | None = None, split: int | None = None,
            dataset_options: dict[str, Any] | None = None, protocol: str = "community", device: str = "auto",
            batch_size: int = 64, workers: int = 0, seed: int = 0, progress: bool = True) -> dict[str, Any]:
    """Fit the projection on the training clips; write `out` (if given); with `compare`, the
    test figures of the full, fitted and random descriptors (`format_comparison` rows)."""
    describer = Describer(checkpoint, device, batch_size, workers, progress)
    trained = describer.payload.get("training") or {}
    options, ap_mode = protocol_options(dataset, protocol, dataset_options)
    backend = default_keypoints(dataset, root, keypoints if keypoints is not None else trained.get("keypoints"))
    data = load_dataset(dataset, root, backend, split, options)
    records = fitting_records(data.train, max_clips, describer.model.config.num_frames, seed)
    fitting = sample_clips(describer.encode(records, root, "training clips").clips, max_clips, seed)
    log.info("fitting a %d-d projection%s on %d clips x %d dims", dim, " (whitened)" if whiten else "",
             len(fitting), fitting.shape[1])
    projection = Projection.fit(fitting, dim, whiten=whiten)
    if projection.dim < dim:
        log.warning("the %d fitting clips span only %d dimensions: the projection has %d (use more clips)",
                    len(fitting), projection.dim, projection.dim)
    result: dict[str, Any] = {"projection": projection.tag, "dim": projection.dim, "fitted_on": projection.fitted_on,
                              "input_dim": projection.input_dim}
    if out is not None:
        payload = dict(describer.payload)
        payload[PAYLOAD_KEY] = projection.to_payload()
        result["checkpoint"] = str(write_checkpoint(payload, out))
    if compare:
        query = describer.encode(data.query, root, "query")
        gallery = describer.encode(data.gallery, root, "gallery")
        variants = {"full": None, f"PCA{' whitened' if whiten else ''} (fitted)": projection,
                    "random (no fit)": Projection.random(projection.input_dim, projection.dim)}
        result["comparison"] = [
            {"descriptor": name, "dim": projection.input_dim if p is None else p.dim,
             "bytes": STORED_ITEMSIZE * (projection.input_dim if p is None else p.dim),
             **scores(query, gallery, p, ap_mode)} for name, p in variants.items()]
        result["protocol"] = protocol
    return result


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m training.project", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="the checkpoint to fit a projection for")
    parser.add_argument("--out", default=None, help="checkpoint to write with the projection (may be --checkpoint); "
                                                    "without it nothing is written")
    parser.add_argument("--dataset", required=True, choices=["mars", "ilidsvid", "synthetic"])
    parser.add_argument("--root", required=True)
    parser.add_argument("--split", type=int, default=None, help="iLIDS-VID split: the one the model was trained on")
    parser.add_argument("--dataset-opt", nargs="*", default=[], metavar="KEY=VALUE",
                        help="dataset options, as for training (e.g. the synthetic generator's num_ids=128)")
    parser.add_argument("--keypoints", default=None, choices=KEYPOINT_BACKENDS)
    parser.add_argument("--dim", type=int, default=COMPACT_DIM, help="projected dimension")
    parser.add_argument("--whiten", action="store_true", help="centred, whitened, L2-normalised PCA")
    parser.add_argument("--max-clips", type=int, default=MAX_FIT_CLIPS,
                        help="clips the PCA is fitted on (whole training tracklets, a seeded sample)")
    parser.add_argument("--compare", action="store_true", help="print test figures: full vs projected")
    parser.add_argument("--protocol", default="community", choices=["community", "official"])
    parser.add_argument("--device", default="auto")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--workers", type=int, default=0)
    parser.add_argument("--seed", type=int, default=0,
                        help="which training tracklets are sampled when they have more clips")
    parser.add_argument("--no-progress", action="store_true")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    try:
        result = project(args.checkpoint, args.dataset, args.root, args.out, args.dim, args.whiten, args.max_clips,
                         args.compare, args.keypoints, args.split, parse_key_values(args.dataset_opt), args.protocol,
                         args.device, args.batch_size, args.workers, args.seed, not args.no_progress)
    except (ValueError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"projection {result['projection']}: {result['input_dim']} -> {result['dim']} dims, "
          f"fitted on {result['fitted_on']} training clips")
    if "checkpoint" in result:
        print(f"written: {result['checkpoint']}")
    if "comparison" in result:
        print(f"test retrieval, protocol {result['protocol']}, Euclidean distance, bytes per clip as float16:")
        print(format_comparison(result["comparison"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
