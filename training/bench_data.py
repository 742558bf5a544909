"""How fast can the loader feed the model? Decoded training clips per second, per worker count.

    python -m training.bench_data --dataset mars --root data/MARS --workers 0 2 4 8
    python -m training.bench_data --dataset synthetic --root data/syn256 --dataset-opt height=256 width=128

For each data format (files: one image file per frame; packed: `training.packed` shards) and
worker count it runs the training loader (P x K identity batches, T-frame clips, the full
augmentation: resize, flip, pad + crop, random erasing, normalisation, collation) for
`--seconds` after one warm-up batch, and prints clips/s, clips/s per worker, decoded frames/s
and the projected time of one MARS epoch (8,298 training tracklets = clips per epoch) at that
rate. It also times bare decoding (bytes -> RGB) of a frame sample, to separate decoding from
augmentation. ViT-B training at the paper's batch on one H100-class GPU in bf16 consumes on
the order of 1,000 clips/s, so the per-worker figure says how many workers that needs.
"""
from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import cv2
import torch
import torch.utils.data

from training.evaluate import default_keypoints, load_dataset, parse_key_values
from training.packed import DATA_FORMATS, INDEX_NAME, PACKED_DIR, FileFrames, PackedFrames, frame_reader
from training.sampling import RandomIdentitySampler
from training.transforms import ClipDataset, collate_clips, limit_worker_threads, worker_context

MARS_TRAIN_TRACKLETS = 8298  # one clip per training tracklet and epoch (the sampler's epoch)


def loader_rate(dataset: ClipDataset, sampler: RandomIdentitySampler, workers: int, seconds: float) -> float:
    """Training clips per second delivered by a DataLoader with `workers` workers."""
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=sampler, num_workers=workers,
                                         collate_fn=collate_clips, persistent_workers=workers > 0,
                                         prefetch_factor=4 if workers else None,
                                         worker_init_fn=limit_worker_threads if workers else None,
                                         multiprocessing_context=worker_context(workers))
    clips, started = 0, None
    while started is None or time.perf_counter() - started < seconds:
        for batch in loader:
            if started is None:  # the first batch pays for worker start-up
                started = time.perf_counter()
                continue
            clips += len(batch["pid"])
            if time.perf_counter() - started >= seconds:
                break
    return clips / (time.perf_counter() - started)


def decode_rate(reader: FileFrames | PackedFrames, paths: Sequence[str]) -> float:
    """Frames per second of reading + decoding `paths` in this process (one OpenCV thread)."""
    started = time.perf_counter()
    for path in paths:
        reader(path)
    return len(paths) / (time.perf_counter() - started)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m training.bench_data", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", required=True, choices=["mars", "ilidsvid", "synthetic"])
    parser.add_argument("--root", required=True)
    parser.add_argument("--dataset-opt", nargs="*", default=[], metavar="KEY=VALUE")
    parser.add_argument("--formats", nargs="*", default=None, choices=[f for f in DATA_FORMATS if f != "auto"],
                        help="default: files, and packed when <root>/packed exists")
    parser.add_argument("--workers", type=int, nargs="*", default=[0, 1, 2])
    parser.add_argument("--seconds", type=float, default=10.0, help="measured time per configuration")
    parser.add_argument("--batch-p", type=int, default=4)
    parser.add_argument("--batch-k", type=int, default=4)
    parser.add_argument("--frames", type=int, default=4, help="T, frames per clip")
    parser.add_argument("--size", type=int, nargs=2, default=[256, 128], metavar=("H", "W"), help="model input")
    args = parser.parse_args(argv)
    cv2.setNumThreads(1)
    backend = default_keypoints(args.dataset, args.root)
    data = load_dataset(args.dataset, args.root, backend, options=parse_key_values(args.dataset_opt))
    packed = (Path(args.root) / PACKED_DIR / INDEX_NAME).is_file()
    formats = args.formats or (["files", "packed"] if packed else ["files"])
    sample = [f for record in data.train[:64] for f in record.frames][:512]
    first = cv2.imread(sample[0])
    print(f"{data.name}: {len(data.train)} training tracklets, frames {first.shape[0]}x{first.shape[1]} (HxW), "
          f"clips of {args.frames} frames -> {args.size[0]}x{args.size[1]}, batches {args.batch_p}x{args.batch_k}, "
          f"{torch.get_num_threads()} torch threads, {args.seconds:.0f} s per row")
    print(f"{'format':8s} {'workers':>7s} {'clips/s':>9s} {'per worker':>10s} {'frames/s':>9s} {'MARS epoch':>11s}")
    for data_format in formats:
        reader = frame_reader(args.root, data_format)
        print(f"{data_format:8s} {'decode':>7s} {'':>9s} {'':>10s} {decode_rate(reader, sample):9.0f}   "
              f"(read + decode only, {len(sample)} frames, 1 thread)")
        clips = ClipDataset(data.train, mode="train", T=args.frames, size=tuple(args.size), frames=reader)
        for workers in args.workers:
            sampler = RandomIdentitySampler(data.train, P=args.batch_p, K=args.batch_k, seed=0)
            rate = loader_rate(clips, sampler, workers, args.seconds)
            epoch_min = MARS_TRAIN_TRACKLETS / rate / 60
            print(f"{data_format:8s} {workers:7d} {rate:9.1f} {rate / max(1, workers):10.1f} "
                  f"{rate * args.frames:9.0f} {epoch_min:9.1f} min")
    return 0


if __name__ == "__main__":
    sys.exit(main())
