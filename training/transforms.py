"""Clip augmentation and the torch Dataset that turns tracklet records into model inputs.

The model reads frames AND keypoints (its part heatmaps are drawn from them), so every
geometric change to the frames is applied to the keypoints too: resize scales them, the
horizontal flip (one decision per clip, so motion stays coherent) mirrors them and swaps
left/right labels via `reid.keypoints.flip_keypoints`, pad + random crop shifts them and marks
those pushed outside the image as missing (score 0; a missing keypoint is returned as all
zeros). Random erasing is decided per frame and
reported as an `erased` flag, which the attention regularisation loss needs; keypoints of an
erased frame are kept (the part is still there, only hidden), as in the released code.
Normalisation defaults to mean = std = 0.5 (TransReID / VID-Trans-ReID).
"""
from __future__ import annotations

import dataclasses
import math
import multiprocessing
from collections.abc import Callable, Sequence
from pathlib import Path

import cv2
import numpy as np
import torch
import torch.utils.data

from reid.keypoints import NUM_KEYPOINTS, flip_keypoints
from training.records import TrackletRecord
from training.sampling import test_clip_indices, train_clip_indices

ERASE_FILLS: tuple[str, ...] = ("random", "mean")


@dataclasses.dataclass(frozen=True)
class ClipTransform:
    """Resize (always) and, when `train`, flip, pad + crop and random erasing; then normalise."""

    size: tuple[int, int] = (256, 128)  # (H, W) of the model input
    train: bool = True
    flip_prob: float = 0.5
    pad: int = 10
    erase_prob: float = 0.5
    erase_area: tuple[float, float] = (0.02, 1 / 3)  # fraction of the frame (timm's defaults)
    erase_aspect: tuple[float, float] = (0.3, 1 / 0.3)
    erase_fill: str = "random"  # per-pixel N(0, 1) in normalised space (timm "pixel"), or "mean" (zeros)
    mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    std: tuple[float, float, float] = (0.5, 0.5, 0.5)

    def __post_init__(self) -> None:
        if self.erase_fill not in ERASE_FILLS:
            raise ValueError(f"erase_fill {self.erase_fill!r} not in {ERASE_FILLS}")

    def __call__(self, frames: Sequence[np.ndarray], keypoints: np.ndarray,
                 rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """uint8 RGB frames (any sizes) + keypoints `[T, 17, 3]` in each frame's pixels ->
        frames `[T, 3, H, W]` float, keypoints `[T, 17, 3]` in input pixels, erased `[T]` bool."""
        H, W = self.size
        kp = np.array(keypoints, dtype=np.float32, copy=True)
        resized = np.empty((len(frames), H, W, 3), np.uint8)
        for t, frame in enumerate(frames):
            h, w = frame.shape[:2]
            resized[t] = frame if (h, w) == (H, W) else cv2.resize(frame, (W, H), interpolation=cv2.INTER_LINEAR)
            kp[t, :, 0] = (kp[t, :, 0] + 0.5) * (W / w) - 0.5  # pixel-centre convention
            kp[t, :, 1] = (kp[t, :, 1] + 0.5) * (H / h) - 0.5
        if self.train and rng.random() < self.flip_prob:
            resized = resized[:, :, ::-1]
            kp = flip_keypoints(kp, W)
        if self.train and self.pad > 0:
            padded = np.pad(resized, ((0, 0), (self.pad, self.pad), (self.pad, self.pad), (0, 0)))
            oy, ox = int(rng.integers(0, 2 * self.pad + 1)), int(rng.integers(0, 2 * self.pad + 1))
            resized = padded[:, oy:oy + H, ox:ox + W]
            kp[..., 0] += self.pad - ox
            kp[..., 1] += self.pad - oy
        outside = (kp[..., 0] < 0) | (kp[..., 0] > W - 1) | (kp[..., 1] < 0) | (kp[..., 1] > H - 1)
        kp[..., 2] = np.where(outside, 0.0, kp[..., 2])
        kp[kp[..., 2] <= 0] = 0.0  # a missing keypoint is all zeros, wherever it came from
        # numpy (single-threaded) rather than torch ops: torch's intra-op threads stall badly when
        # loader workers and the training step compete for a few cores.
        scale = 1.0 / (255.0 * np.asarray(self.std, np.float32))
        offset = np.asarray(self.mean, np.float32) / np.asarray(self.std, np.float32)
        array = np.ascontiguousarray((resized.astype(np.float32) * scale - offset).transpose(0, 3, 1, 2))
        erased = np.zeros(len(frames), dtype=bool)
        if self.train:
            for t in range(len(frames)):
                if rng.random() < self.erase_prob:
                    erased[t] = self._erase(array[t], rng)
        return torch.from_numpy(array), torch.from_numpy(kp), torch.from_numpy(erased)

    def _erase(self, frame: np.ndarray, rng: np.random.Generator) -> bool:
        """Fill one random rectangle of `frame` in place (up to 10 tries to fit it, like timm)."""
        _, H, W = frame.shape
        log_aspect = (math.log(self.erase_aspect[0]), math.log(self.erase_aspect[1]))
        for _ in range(10):
            area = rng.uniform(*self.erase_area) * H * W
            aspect = math.exp(rng.uniform(*log_aspect))
            h, w = int(round(math.sqrt(area * aspect))), int(round(math.sqrt(area / aspect)))
            if 0 < h < H and 0 < w < W:
                y, x = int(rng.integers(0, H - h + 1)), int(rng.integers(0, W - w + 1))
                if self.erase_fill == "random":
                    frame[:, y:y + h, x:x + w] = rng.standard_normal((3, h, w), dtype=np.float32)
                else:
                    frame[:, y:y + h, x:x + w] = 0.0
                return True
        return False


def load_frame(path: str) -> np.ndarray:
    """An image file as uint8 RGB."""
    image = cv2.imread(path, cv2.IMREAD_COLOR)
    if image is None:
        raise FileNotFoundError(f"cannot read frame {path}")
    return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)


def load_keypoints(record: TrackletRecord, indices: np.ndarray) -> np.ndarray:
    """Cached keypoints of the chosen frames `[len(indices), 17, 3]`; all-zero (= missing, score 0)
    when the tracklet has no cache."""
    if record.keypoints is None or not Path(record.keypoints).is_file():
        return np.zeros((len(indices), NUM_KEYPOINTS, 3), np.float32)
    cached = np.load(record.keypoints, mmap_mode="r")
    if cached.shape != (len(record.frames), NUM_KEYPOINTS, 3):
        raise ValueError(f"keypoint cache {record.keypoints} has shape {cached.shape}, expected "
                         f"({len(record.frames)}, {NUM_KEYPOINTS}, 3) for tracklet {record.key or record.frames[0]}")
    return np.asarray(cached[indices], dtype=np.float32)


class ClipDataset(torch.utils.data.Dataset):
    """Tracklet records -> clips of T frames with keypoints.

    mode="train": item i is one random clip (one frame per segment) of record i; use with
    `RandomIdentitySampler` as batch sampler. mode="test": items are ALL consecutive clips of all
    records, each carrying `tracklet` (its record index) so clip features can be averaged per
    tracklet (`training.metrics.mean_per_tracklet`); items stay small whatever the tracklet length.
    `frames` reads one frame path as uint8 RGB (default: the image file; packed shards read faster).
    Items are dicts: frames `[T, 3, H, W]`, keypoints `[T, 17, 3]` (input pixels), pid, camid,
    erased `[T]`, tracklet. Randomness comes from torch's generator, so `torch.manual_seed` and
    DataLoader worker seeding make it reproducible and different per worker."""

    def __init__(self, records: Sequence[TrackletRecord], mode: str = "train", T: int = 4,
                 size: tuple[int, int] = (256, 128), transform: ClipTransform | None = None,
                 frames: Callable[[str], np.ndarray] | None = None) -> None:
        if mode not in ("train", "test"):
            raise ValueError(f"ClipDataset mode {mode!r} not in ('train', 'test')")
        self.records = list(records)
        self.mode, self.T = mode, T
        self.read_frame = frames if frames is not None else load_frame  # e.g. training.packed.PackedFrames
        self.transform = transform if transform is not None else ClipTransform(size=size, train=mode == "train")
        self.clips: list[tuple[int, np.ndarray]] = []
        if mode == "test":
            for index, record in enumerate(self.records):
                self.clips.extend((index, row) for row in test_clip_indices(len(record.frames), T))

    def __len__(self) -> int:
        return len(self.records) if self.mode == "train" else len(self.clips)

    def __getitem__(self, item: int) -> dict[str, torch.Tensor | int]:
        rng = np.random.default_rng(int(torch.randint(0, 2**62, ()).item()))
        if self.mode == "train":
            index, frame_indices = item, train_clip_indices(len(self.records[item].frames), self.T, rng)
        else:
            index, frame_indices = self.clips[item]
        record = self.records[index]
        frames = [self.read_frame(record.frames[i]) for i in frame_indices]
        frames_t, keypoints, erased = self.transform(frames, load_keypoints(record, frame_indices), rng)
        return {"frames": frames_t, "keypoints": keypoints, "pid": record.pid, "camid": record.camid,
                "erased": erased, "tracklet": index}


def collate_clips(batch: Sequence[dict]) -> dict[str, torch.Tensor]:
    """Stack ClipDataset items: frames `[B, T, 3, H, W]`, keypoints `[B, T, 17, 3]`, erased `[B, T]`,
    pid / camid / tracklet as int64 `[B]`."""
    if not batch:
        raise ValueError("cannot collate an empty batch")
    # np.stack: a plain single-threaded copy, much steadier than torch.stack on busy shared cores.
    out: dict[str, torch.Tensor] = {key: torch.from_numpy(np.stack([np.asarray(item[key]) for item in batch]))
                                    for key in ("frames", "keypoints", "erased")}
    for key in ("pid", "camid", "tracklet"):
        out[key] = torch.tensor([int(item[key]) for item in batch], dtype=torch.int64)
    return out


def worker_context(workers: int):
    """The start method of DataLoader workers: "forkserver", never a plain fork.

    A worker forked from a process whose OpenCV or OpenMP thread pools are running inherits the
    pools' locks but not their threads, and its first `cv2.setNumThreads` (or a parallel cv2
    call) can wait forever: seen in the full test suite, where YOLO had run in the parent
    before `training.keypoints` started its loader. Workers forked from the clean fork server
    inherit no threads at all."""
    return multiprocessing.get_context("forkserver") if workers > 0 else None


def limit_worker_threads(_: int = 0) -> None:
    """DataLoader `worker_init_fn`: loader workers decode with OpenCV and copy with numpy, one
    thread each; left alone, N workers x all cores of OpenCV / torch threads oversubscribe the
    CPU that feeds the GPU."""
    cv2.setNumThreads(1)
    torch.set_num_threads(1)
