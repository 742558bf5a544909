"""Packed frames: a dataset's original JPEG / PNG bytes in a few large shards plus one index.

MARS is ~1.19M small JPEG files; opening each one (a file-system lookup, an open, a read, a
close per frame) costs more than decoding it on network or overlay file systems, and it fills
the page cache with metadata. Packing keeps the bytes exactly as they are (no re-encoding, so
pixels are identical) in `<root>/packed/shard-NNNNN.bin` (about `shard_mb` each, tracklet by
tracklet so a clip's frames sit together) with `index.npz`: the frame paths relative to the
root (sorted, fixed-width bytes: looked up by binary search, shared copy-on-write by forked
loader workers without Python objects per frame) and each frame's shard, offset and length.

    python -m training.packed --dataset mars --root data/MARS        # writes data/MARS/packed/

The loaders still read the original layout's metadata (the .mat files, folder names), so the
tree stays; `--data-format packed` (or `auto`, the default, when `packed/index.npz` exists)
then reads the frames from the shards. `frame_reader` gives the callable ClipDataset uses.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import cv2
import numpy as np
from tqdm import tqdm

log = logging.getLogger(__name__)

DATA_FORMATS: tuple[str, ...] = ("auto", "files", "packed")
PACKED_DIR = "packed"
INDEX_NAME = "index.npz"


def _decode(data: np.ndarray, source: str) -> np.ndarray:
    image = cv2.imdecode(data, cv2.IMREAD_COLOR)
    if image is None:
        raise ValueError(f"cannot decode frame {source}")
    return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)


class FileFrames:
    """Frames from their image files (`cv2.imread`), as uint8 RGB."""

    def __call__(self, path: str) -> np.ndarray:
        image = cv2.imread(path, cv2.IMREAD_COLOR)
        if image is None:
            raise FileNotFoundError(f"cannot read frame {path}")
        return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)


class PackedFrames:
    """Frames from the shards under `<root>/packed`, as uint8 RGB; picklable (DataLoader
    workers re-open the shards lazily, as read-only memory maps)."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root).resolve()
        folder = self.root / PACKED_DIR
        index_path = folder / INDEX_NAME
        if not index_path.is_file():
            raise FileNotFoundError(f"no packed frames at {index_path}: run `python -m training.packed` first")
        with np.load(index_path) as index:
            self.paths, self.shard = index["paths"], index["shard"]
            self.offset, self.length = index["offset"], index["length"]
        self.shard_files = [folder / f"shard-{i:05d}.bin" for i in range(int(self.shard.max()) + 1 if len(self.shard) else 0)]
        self._maps: dict[int, np.memmap] = {}

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_maps": {}}

    def __len__(self) -> int:
        return len(self.paths)

    def raw(self, path: str) -> np.ndarray:
        """The stored bytes of the frame at `path` (absolute or relative to the root)."""
        key = os.path.relpath(os.path.abspath(path), self.root).encode()
        position = int(np.searchsorted(self.paths, key))
        if position >= len(self.paths) or self.paths[position] != key:
            raise KeyError(f"frame {path} is not in the pack at {self.root / PACKED_DIR} (re-run training.packed?)")
        shard = int(self.shard[position])
        if shard not in self._maps:
            self._maps[shard] = np.memmap(self.shard_files[shard], dtype=np.uint8, mode="r")
        start = int(self.offset[position])
        return self._maps[shard][start:start + int(self.length[position])]

    def __call__(self, path: str) -> np.ndarray:
        return _decode(self.raw(path), path)


def frame_reader(root: str | Path, data_format: str = "auto") -> FileFrames | PackedFrames:
    """The frame reader for `data_format` (auto: packed when `<root>/packed/index.npz` exists)."""
    if data_format not in DATA_FORMATS:
        raise ValueError(f"data format {data_format!r} not in {DATA_FORMATS}")
    packed = (Path(root) / PACKED_DIR / INDEX_NAME).is_file()
    if data_format == "packed" or (data_format == "auto" and packed):
        return PackedFrames(root)
    return FileFrames()


def pack_frames(root: str | Path, frames: Sequence[str], shard_mb: int = 1024, progress: bool = True) -> dict:
    """Write `frames` (paths under `root`, in reading order; duplicates are packed once) into
    `<root>/packed` atomically (a `.partial` folder renamed at the end). Returns a summary."""
    root = Path(root).resolve()
    target, staging = root / PACKED_DIR, root / f"{PACKED_DIR}.partial"
    if target.exists():
        raise FileExistsError(f"{target} exists; delete it to pack again")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    seen: set[str] = set()
    keys, shards, offsets, lengths = [], [], [], []
    shard, position, limit = 0, 0, shard_mb << 20
    handle = (staging / f"shard-{shard:05d}.bin").open("wb")
    started = time.perf_counter()
    try:
        for frame in tqdm(frames, desc="packing frames", disable=not progress, dynamic_ncols=True):
            key = os.path.relpath(os.path.abspath(frame), root)
            if key in seen:
                continue
            if key.startswith(".."):
                raise ValueError(f"frame {frame} is outside the dataset root {root}")
            seen.add(key)
            data = Path(frame).read_bytes()
            if position and position + len(data) > limit:
                handle.close()
                shard, position = shard + 1, 0
                handle = (staging / f"shard-{shard:05d}.bin").open("wb")
            handle.write(data)
            keys.append(key.encode())
            shards.append(shard)
            offsets.append(position)
            lengths.append(len(data))
            position += len(data)
    finally:
        handle.close()
    paths = np.array(keys, dtype=bytes)
    order = np.argsort(paths, kind="stable")
    np.savez(staging / INDEX_NAME, paths=paths[order], shard=np.array(shards, np.int32)[order],
             offset=np.array(offsets, np.int64)[order], length=np.array(lengths, np.int32)[order])
    summary = {"frames": len(keys), "shards": shard + 1, "bytes": int(sum(lengths)),
               "seconds": round(time.perf_counter() - started, 1)}
    (staging / "pack.json").write_text(json.dumps(summary, indent=2) + "\n")
    staging.rename(target)
    return summary


def main(argv: Sequence[str] | None = None) -> int:
    from training.keypoints import dataset_records

    parser = argparse.ArgumentParser(prog="python -m training.packed", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", required=True, choices=["mars", "ilidsvid", "synthetic"])
    parser.add_argument("--root", required=True)
    parser.add_argument("--dataset-opt", nargs="*", default=[], metavar="KEY=VALUE")
    parser.add_argument("--shard-mb", type=int, default=1024, help="approximate shard size")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    from training.evaluate import parse_key_values

    records = dataset_records(args.dataset, args.root, parse_key_values(args.dataset_opt))
    frames = [frame for record in records for frame in record.frames]
    summary = pack_frames(args.root, frames, args.shard_mb, progress=not args.no_progress)
    print(f"packed {summary['frames']} frames ({summary['bytes'] / 1e6:.1f} MB) into {summary['shards']} shard(s) "
          f"in {summary['seconds']} s -> {Path(args.root) / PACKED_DIR}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
