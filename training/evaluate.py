"""Test-time evaluation: descriptors per tracklet, Euclidean ranking, CMC and mAP.

Protocol (DESIGN.md §8): every tracklet is cut into ALL consecutive T-frame clips, clip
descriptors (`model.descriptor`) are averaged per tracklet, query x gallery Euclidean
distances are ranked by `training.metrics.evaluate_ranking` (same-identity same-camera gallery
entries removed, queries without a valid match skipped, ties broken by gallery index).

Protocols (`--protocol`, DESIGN.md §8): `community` (default; torchreid / the paper's code:
MARS gallery = the 9,330 test tracklets that are not queries, non-interpolated "step" AP) or
`official` (MARS's MATLAB evaluation: all 12,180 test tracklets as gallery, the query itself
removed as same-id same-camera junk, and its interpolated AP, `metrics` "trapezoid"). iLIDS-VID
has one protocol (cam1 queries vs cam2 gallery); `official` only changes its AP. Every report
names the protocol and the AP it used. Descriptors computed under autocast (bf16 / fp16) are
checked against fp32 on a sample of queries (`precision_check`: worst relative difference).

iLIDS-VID has ten official splits and a model trained on one split has seen half of the other
splits' test people, so the ten-split figure needs ten checkpoints: pass a path with a
`{split}` placeholder (e.g. `runs/ilids-split{split}/best.pt`); a single checkpoint is only
evaluated on the split it was trained on. Results are the mean ± std over splits.

    python -m training.evaluate --checkpoint runs/mars/best.pt --dataset mars --root data/MARS
    python -m training.evaluate --checkpoint 'runs/ilids{split}/best.pt' --dataset ilidsvid --root data/iLIDS-VID
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.utils.data
from tqdm import tqdm

from reid.checkpoints import load_model
from reid.model import KeyReID
from training.datasets import build_dataset
from training.metrics import AP_MODES, evaluate_ranking, mean_per_tracklet
from training.packed import frame_reader
from training.records import KEYPOINT_BACKENDS, Dataset, TrackletRecord
from training.transforms import ClipDataset, collate_clips, limit_worker_threads, worker_context

log = logging.getLogger(__name__)

CMC_RANKS: tuple[int, ...] = (1, 5, 10, 20)
ILIDSVID_NUM_SPLITS = 10
_REAL_KEYPOINT_PREFERENCE: tuple[str, ...] = ("pifpaf", "yolo-pose", "watcher")
# protocol -> (MARS gallery mode, AP definition of training.metrics)
PROTOCOLS: dict[str, tuple[str, str]] = {"community": ("community", "step"), "official": ("all", "trapezoid")}
AP_NAMES: dict[str, str] = {"step": "non-interpolated AP (torchreid)",
                            "trapezoid": "interpolated AP (MARS/Market MATLAB compute_AP.m)"}
assert set(AP_NAMES) == set(AP_MODES)
PRECISION_SAMPLE = 16  # query tracklets re-encoded in fp32 to check autocast descriptors


@dataclasses.dataclass(frozen=True)
class Scores:
    """mAP and CMC at `CMC_RANKS` (fractions in [0, 1]) with the query bookkeeping."""

    mAP: float
    cmc: dict[int, float]
    num_query: int
    num_gallery: int
    num_skipped_queries: int
    ap_mode: str = "step"
    precision_check: float | None = None  # worst relative |autocast - fp32| descriptor difference

    def as_dict(self, prefix: str = "") -> dict[str, float]:
        """Flat `{prefix}mAP`, `{prefix}R1`, ... in percent, for CSV rows and JSON."""
        out = {f"{prefix}mAP": 100.0 * self.mAP}
        out.update({f"{prefix}R{rank}": 100.0 * value for rank, value in self.cmc.items()})
        return out


def resolve_device(device: str) -> torch.device:
    """`auto` -> CUDA when available, else CPU; an explicit `cuda` without CUDA is an error."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    resolved = torch.device(device)
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"device {device!r} requested but CUDA is not available")
    return resolved


def default_keypoints(dataset: str, root: str | Path, requested: str | None = None) -> str | None:
    """The keypoint cache to read: `requested` if given; the exact `groundtruth` keypoints for the
    synthetic data; for real data the first of pifpaf / yolo-pose whose cache folder exists
    (None, with a warning, when there is none: the part prior is then flat)."""
    if requested is not None:
        if requested not in KEYPOINT_BACKENDS:
            raise ValueError(f"keypoint backend {requested!r} not in {KEYPOINT_BACKENDS}")
        return requested
    if dataset == "synthetic":
        return "groundtruth"
    for backend in _REAL_KEYPOINT_PREFERENCE:
        if (Path(root) / "keypoints" / backend).is_dir():
            return backend
    log.warning("no keypoint cache under %s/keypoints: every frame counts as 'no keypoints'. "
                "Run `python -m training.keypoints --dataset %s --root %s` first.", root, dataset, root)
    return None


def protocol_options(dataset: str, protocol: str, options: dict[str, Any] | None = None) -> tuple[dict[str, Any], str]:
    """(dataset options with the protocol's MARS gallery, AP mode) for `protocol`; an explicit
    `gallery=` option that contradicts the protocol is an error (one source of truth)."""
    if protocol not in PROTOCOLS:
        raise ValueError(f"protocol {protocol!r} not in {sorted(PROTOCOLS)}")
    gallery, ap_mode = PROTOCOLS[protocol]
    options = dict(options or {})
    mars_layout = dataset == "mars" or (dataset == "synthetic" and options.get("layout", "mars") == "mars")
    if mars_layout:
        if options.setdefault("gallery", gallery) != gallery:
            raise ValueError(f"--protocol {protocol} uses gallery={gallery}, but the dataset options ask for "
                             f"gallery={options['gallery']}: drop gallery= and choose with --protocol")
    return options, ap_mode


def load_dataset(dataset: str, root: str | Path, keypoints: str | None, split: int | None = None,
                 options: dict[str, Any] | None = None) -> Dataset:
    """`training.datasets.build_dataset` with the split and keypoint backend wired in."""
    options = dict(options or {})
    if keypoints is not None:
        options["keypoints"] = keypoints
    if split is not None:
        if dataset == "mars":
            raise ValueError("MARS has a single train/test split; --split applies to ilidsvid (0..9)")
        options["split"] = split
    return build_dataset(dataset, root, **options)


def autocast_dtype(device: torch.device, amp: str) -> torch.dtype | None:
    """Mixed precision for `amp` in auto/off/bf16/fp16: auto = bf16 on CUDA when supported,
    else fp16; off on the CPU (fp32 keeps CPU runs exactly reproducible)."""
    if amp == "off":
        return None
    if amp == "auto":
        if device.type != "cuda":
            return None
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if amp not in ("bf16", "fp16"):
        raise ValueError(f"amp={amp!r}: choose auto, off, bf16 or fp16")
    return torch.bfloat16 if amp == "bf16" else torch.float16


@torch.inference_mode()
def extract_clip_descriptors(model: KeyReID, records: Sequence[TrackletRecord], device: torch.device,
                             batch_size: int = 64, workers: int = 0, amp_dtype: torch.dtype | None = None,
                             progress: bool = True, desc: str = "features",
                             frames: Callable[[str], np.ndarray] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """float32 descriptors `[C, dim]` of all consecutive T-frame clips of the records and the
    index of each clip's record `[C]` (`frames` reads a frame, see ClipDataset)."""
    config = model.config
    clips = ClipDataset(records, mode="test", T=config.num_frames, size=config.img_size, frames=frames)
    loader = torch.utils.data.DataLoader(clips, batch_size=batch_size, shuffle=False, num_workers=workers,
                                         collate_fn=collate_clips, pin_memory=device.type == "cuda",
                                         worker_init_fn=limit_worker_threads if workers > 0 else None,
                                         multiprocessing_context=worker_context(workers))
    was_training = model.training
    model.eval()
    features, owners = [], []
    try:
        for batch in tqdm(loader, desc=desc, leave=False, disable=not progress, dynamic_ncols=True):
            with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                out = model(batch["frames"].to(device, non_blocking=True),
                            batch["keypoints"].to(device, non_blocking=True),
                            batch["camid"].to(device))
                descriptors = model.descriptor(out)
            features.append(descriptors.float().cpu().numpy())
            owners.append(batch["tracklet"].numpy())
    finally:
        model.train(was_training)
    if not features:
        return np.zeros((0, model.descriptor_dim), np.float32), np.zeros(0, np.int64)
    return np.concatenate(features), np.concatenate(owners)


def extract_descriptors(model: KeyReID, records: Sequence[TrackletRecord], device: torch.device,
                        batch_size: int = 64, workers: int = 0, amp_dtype: torch.dtype | None = None,
                        progress: bool = True, desc: str = "features",
                        frames: Callable[[str], np.ndarray] | None = None) -> np.ndarray:
    """One float32 descriptor per tracklet `[len(records), dim]`: the mean over all its
    consecutive T-frame clips (`frames` reads a frame, see ClipDataset)."""
    features, owners = extract_clip_descriptors(model, records, device, batch_size, workers, amp_dtype,
                                                progress, desc, frames)
    return mean_per_tracklet(features, owners, len(records))


def euclidean_distances(query: np.ndarray, gallery: np.ndarray) -> np.ndarray:
    """`[Q, G]` Euclidean distances in float64 (expanded form, clamped at 0 before the root)."""
    q, g = np.asarray(query, np.float64), np.asarray(gallery, np.float64)
    squared = (q * q).sum(1)[:, None] + (g * g).sum(1)[None, :] - 2.0 * q @ g.T
    return np.sqrt(np.maximum(squared, 0.0))


def evaluate_model(model: KeyReID, dataset: Dataset, device: torch.device, batch_size: int = 64,
                   workers: int = 0, amp_dtype: torch.dtype | None = None, progress: bool = True,
                   label: str = "", ap_mode: str = "step",
                   frames: Callable[[str], np.ndarray] | None = None) -> Scores:
    """Scores of `model` on `dataset.query` vs `dataset.gallery` (AP per `ap_mode`)."""
    query = extract_descriptors(model, dataset.query, device, batch_size, workers, amp_dtype, progress,
                                desc=f"{label} query".strip(), frames=frames)
    precision_check = None
    if amp_dtype is not None:
        sample = dataset.query[:PRECISION_SAMPLE]
        exact = extract_descriptors(model, sample, device, batch_size, workers, None, False, frames=frames)
        difference = np.linalg.norm(query[:len(sample)] - exact, axis=1) / np.maximum(np.linalg.norm(exact, axis=1), 1e-12)
        precision_check = float(difference.max())
        if precision_check > 1e-2:
            log.warning("%s descriptors differ from fp32 by up to %.2g (relative) on %d queries: consider --amp off",
                        amp_dtype, precision_check, len(sample))
    gallery = extract_descriptors(model, dataset.gallery, device, batch_size, workers, amp_dtype, progress,
                                  desc=f"{label} gallery".strip(), frames=frames)
    ranking = evaluate_ranking(
        euclidean_distances(query, gallery),
        np.array([r.pid for r in dataset.query]), np.array([r.pid for r in dataset.gallery]),
        np.array([r.camid for r in dataset.query]), np.array([r.camid for r in dataset.gallery]),
        max_rank=max(CMC_RANKS), ap_mode=ap_mode)
    return Scores(mAP=ranking.mAP, cmc={rank: float(ranking.cmc[rank - 1]) for rank in CMC_RANKS},
                  num_query=len(dataset.query), num_gallery=len(dataset.gallery),
                  num_skipped_queries=ranking.num_skipped_queries, ap_mode=ap_mode,
                  precision_check=precision_check)


def _checkpoint_splits(checkpoint: str, dataset: str, split: int | None) -> list[tuple[int | None, Path]]:
    """(split, checkpoint file) pairs to evaluate; see the module docstring for iLIDS-VID."""
    templated = "{split}" in checkpoint
    if dataset not in ("ilidsvid", "ilids-vid") and not (dataset == "synthetic" and templated):
        if templated:
            raise ValueError(f"--checkpoint has a {{split}} placeholder but {dataset} has no splits")
        return [(split, Path(checkpoint))]
    if split is not None:
        return [(split, Path(checkpoint.format(split=split)))]
    if templated:
        return [(s, Path(checkpoint.format(split=s))) for s in range(ILIDSVID_NUM_SPLITS)]
    trained_on = _training_info(Path(checkpoint)).get("split")
    if trained_on is None:
        raise ValueError(f"{checkpoint}: iLIDS-VID needs one model per split (a model trained on one "
                         f"split has seen the other splits' test people). Pass --checkpoint with a "
                         f"{{split}} placeholder for all 10 splits, or --split N.")
    log.warning("%s was trained on split %d only: evaluating that split (pass a {split} path for all 10)",
                checkpoint, trained_on)
    return [(int(trained_on), Path(checkpoint))]


def _training_info(path: Path) -> dict[str, Any]:
    from reid.checkpoints import read_checkpoint

    return dict(read_checkpoint(path).get("training") or {})


def evaluate_checkpoints(checkpoint: str, dataset: str, root: str | Path, split: int | None = None,
                         keypoints: str | None = None, device: str = "auto", batch_size: int = 64,
                         workers: int = 0, amp: str = "auto", progress: bool = True,
                         dataset_options: dict[str, Any] | None = None, protocol: str = "community") -> dict[str, Any]:
    """Evaluate one checkpoint (or one per iLIDS-VID split) and summarise: per split scores and,
    over several splits, mean and std of every figure (percent), with the protocol and AP used."""
    torch_device = resolve_device(device)
    amp_dtype = autocast_dtype(torch_device, amp)
    dataset_options, ap_mode = protocol_options(dataset, protocol, dataset_options)
    per_split: list[dict[str, Any]] = []
    for split_index, path in _checkpoint_splits(checkpoint, dataset, split):
        model, payload = load_model(path)
        trained = (payload.get("training") or {})
        if split_index is not None and trained.get("split") not in (None, split_index):
            raise ValueError(f"{path} was trained on split {trained['split']} but is evaluated on split "
                             f"{split_index}: its test people were training people")
        backend = default_keypoints(dataset, root, keypoints if keypoints is not None else trained.get("keypoints"))
        data = load_dataset(dataset, root, backend, split_index, dataset_options)
        model.to(torch_device)
        scores = evaluate_model(model, data, torch_device, batch_size, workers, amp_dtype, progress,
                                label=f"split {split_index}" if split_index is not None else "test", ap_mode=ap_mode,
                                frames=frame_reader(root))  # packed shards when <root>/packed exists
        per_split.append({"split": split_index, "checkpoint": str(path), **scores.as_dict(),
                          "num_query": scores.num_query, "num_gallery": scores.num_gallery,
                          "skipped_queries": scores.num_skipped_queries, "precision_check": scores.precision_check})
    figures = ["mAP"] + [f"R{rank}" for rank in CMC_RANKS]
    summary = {name: {"mean": float(np.mean([s[name] for s in per_split])),
                      "std": float(np.std([s[name] for s in per_split]))} for name in figures}
    return {"dataset": dataset, "protocol": protocol, "ap": f"{ap_mode}: {AP_NAMES[ap_mode]}",
            "precision": "fp32" if amp_dtype is None else str(amp_dtype).removeprefix("torch."),
            "splits": per_split, "summary": summary}


def format_report(result: dict[str, Any]) -> str:
    """A small plain-text table: one row per split, plus mean ± std when there are several."""
    figures = ["mAP"] + [f"R{rank}" for rank in CMC_RANKS]
    lines = [f"protocol {result['protocol']}, {result['ap']}, {result['precision']} descriptors",
             f"{'split':>6s} " + " ".join(f"{f:>8s}" for f in figures) + "  queries (skipped) / gallery"]
    for row in result["splits"]:
        name = "-" if row["split"] is None else str(row["split"])
        lines.append(f"{name:>6s} " + " ".join(f"{row[f]:8.2f}" for f in figures)
                     + f"  {row['num_query']} ({row['skipped_queries']}) / {row['num_gallery']}")
    if len(result["splits"]) > 1:
        lines.append(f"{'mean':>6s} " + " ".join(f"{result['summary'][f]['mean']:8.2f}" for f in figures))
        lines.append(f"{'± std':>6s} " + " ".join(f"{result['summary'][f]['std']:8.2f}" for f in figures))
    return "\n".join(lines)


def parse_key_values(pairs: Sequence[str]) -> dict[str, Any]:
    """`key=value` strings -> dict, values parsed as JSON when possible (`depth=4`,
    `img_size=[128,64]`, `tcss=false`), else kept as strings (`local=whole`)."""
    out: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ValueError(f"expected key=value, got {pair!r}")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m training.evaluate", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="checkpoint file; iLIDS-VID: may contain {split}")
    parser.add_argument("--dataset", required=True, choices=["mars", "ilidsvid", "synthetic"])
    parser.add_argument("--root", required=True)
    parser.add_argument("--split", type=int, default=None, help="iLIDS-VID split 0..9 (default: all 10)")
    parser.add_argument("--keypoints", default=None, choices=KEYPOINT_BACKENDS,
                        help="keypoint cache (default: the one used in training, else auto)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--amp", default="auto", choices=["auto", "off", "bf16", "fp16"])
    parser.add_argument("--protocol", default="community", choices=sorted(PROTOCOLS),
                        help="community (torchreid gallery, step AP) or official (MARS: all 12,180 test "
                             "tracklets as gallery, interpolated AP); see the module docstring")
    parser.add_argument("--dataset-opt", nargs="*", default=[], metavar="KEY=VALUE",
                        help="dataset options, e.g. the synthetic generator's num_ids=16")
    parser.add_argument("--json", default=None, help="also write the results to this JSON file")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    result = evaluate_checkpoints(args.checkpoint, args.dataset, args.root, args.split, args.keypoints,
                                  args.device, args.batch_size, args.workers, args.amp, protocol=args.protocol,
                                  dataset_options=parse_key_values(args.dataset_opt))
    print(format_report(result))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
