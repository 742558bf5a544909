"""The encoder service: clips from every camera, batched, through one `reid.Encoder`.

The batching lives in the main process beside the database writer, so batches mix cameras; the
model runs where the backend put it (`LocalEncoder`: in this process; on Ray, an actor that
asks for a GPU where the cluster has one), loaded once. A batch is encoded when it reaches `batch_size` clips or its oldest clip
has waited `max_wait` seconds; `backlog` is what the watcher uses to stop reading worker queues
(back-pressure) when encoding falls behind.

A batch that fails goes back to the front of the queue, nothing is lost: out of memory halves
the batch size (down to one clip) and the batch is retried at once; any other error is raised
for the watcher to log and retry later.
"""
from __future__ import annotations

import logging
import os
import time
from collections import deque
from dataclasses import dataclass

import numpy as np

from .config import ReidConfig

LOG = logging.getLogger(__name__)
FAULT_ENV = "KEYREID_FAULT_ENCODER"  # test hook: "oom=N,nan=M" (N batches of 2+ clips, M clips)


@dataclass(frozen=True, eq=False)
class PendingClip:
    """A clip waiting for its descriptor; `tag` is whatever the caller needs to store it."""

    crops: object  # uint8 [T, H, W, 3], or where the backend keeps it (Ray: `RemoteCrops`)
    keypoints: np.ndarray  # float32 [T, 17, 3]
    tag: object
    arrived: float
    camera: str | None = None  # the site's camera id (a site-adapted encoder normalises per camera)


@dataclass(frozen=True)
class EncoderInfo:
    """What the watcher needs to know about the model, wherever it runs."""

    model_id: str
    dim: int
    device: str
    trained: bool
    camera_normalisation: object | None  # reid.normalisation.CameraNormalisation
    cross_camera_genuine: np.ndarray | None

    @classmethod
    def of(cls, encoder) -> EncoderInfo:
        return cls(encoder.model_id, encoder.dim, str(encoder.device), encoder.trained,
                   encoder.camera_normalisation, encoder.cross_camera_genuine)


class LocalEncoder:
    """The configured `reid.Encoder` in this process: `encode_clips` is what a backend's
    encoder offers (a Ray actor wraps one of these)."""

    def __init__(self, config: ReidConfig) -> None:
        import torch

        from reid import Encoder

        device = None if config.device == "auto" else config.device
        if config.threads:
            torch.set_num_threads(config.threads)
        self.encoder = Encoder(config.checkpoint, model=config.model, device=device,
                               batch_size=config.batch_size, precision=config.precision,
                               runtime=config.runtime, threads=config.threads,
                               **(config.overrides if config.checkpoint is None else {}))
        self.info = EncoderInfo.of(self.encoder)

    def encode_clips(self, crops: list[np.ndarray], keypoints: np.ndarray,
                     cameras: list[str | None]) -> np.ndarray:
        """uint8 crops [T, H, W, 3] per clip, keypoints [N, T, 17, 3] -> float32 [N, dim]."""
        return self.encoder.encode(np.stack(crops), keypoints, np.full(len(crops), -1, dtype=np.int64),
                                   cameras=cameras)


class EncoderService:
    """Batches clips and runs the encoder; `encoded_clips` / `encode_seconds` for the status line.

    `encoder`: anything with `info` and `encode_clips` (default: a `LocalEncoder` of `config`).
    """

    def __init__(self, config: ReidConfig, encoder=None) -> None:
        self.config = config
        self.encoder = encoder if encoder is not None else LocalEncoder(config)
        self.info: EncoderInfo = self.encoder.info
        self.queue: deque[PendingClip] = deque()
        self.batch_size = config.batch_size
        self.encoded_clips = 0
        self.encode_seconds = 0.0
        self._faults = _InjectedFaults.from_env()
        LOG.info("encoder: %s on %s (dim %d, %s)", self.info.model_id, self.info.device,
                 self.info.dim, "trained" if self.info.trained else "UNTRAINED")

    @property
    def model_id(self) -> str:
        return self.info.model_id

    @property
    def dim(self) -> int:
        return self.info.dim

    @property
    def backlog(self) -> int:
        return len(self.queue)

    def submit(self, crops, keypoints: np.ndarray, tag: object, camera: str | None = None) -> None:
        self.queue.append(PendingClip(crops, keypoints, tag, time.monotonic(), camera))

    def due(self, now: float | None = None) -> bool:
        """A batch is full, or the oldest clip has waited `max_wait`."""
        if not self.queue:
            return False
        now = time.monotonic() if now is None else now
        return (len(self.queue) >= self.batch_size
                or now - self.queue[0].arrived >= self.config.max_wait)

    def encode_batch(self) -> list[tuple[object, np.ndarray]]:
        """Encode up to one batch of the oldest clips: (tag, float32 descriptor [dim]) pairs.

        Descriptors are returned as computed; the caller sets aside any that are not finite.
        """
        while True:
            batch = [self.queue.popleft() for _ in range(min(self.batch_size, len(self.queue)))]
            if not batch:
                return []
            start = time.monotonic()
            try:
                descriptors = self._encode(batch)
            except Exception as exc:
                self.queue.extendleft(reversed(batch))
                if not _out_of_memory(exc) or len(batch) == 1:
                    raise
                self.batch_size = max(1, len(batch) // 2)
                LOG.warning("encoder out of memory on %d clips; batch size now %d (%s)",
                            len(batch), self.batch_size, exc)
                continue
            self.encode_seconds += time.monotonic() - start
            self.encoded_clips += len(batch)
            return [(c.tag, d) for c, d in zip(batch, descriptors)]

    def _encode(self, batch: list[PendingClip]) -> np.ndarray:
        self._faults.before_batch(len(batch))
        descriptors = self.encoder.encode_clips([c.crops for c in batch],
                                                np.stack([c.keypoints for c in batch]),
                                                [c.camera for c in batch])
        return self._faults.after_batch(descriptors)


def _out_of_memory(exc: BaseException) -> bool:
    import torch

    return isinstance(exc, torch.OutOfMemoryError) or "out of memory" in str(exc).lower()


@dataclass
class _InjectedFaults:
    """Faults a test asks for through `KEYREID_FAULT_ENCODER`, to exercise the recovery paths
    on the real encoder in a real watcher process. Empty (and free) otherwise."""

    out_of_memory: int = 0
    not_finite: int = 0

    @classmethod
    def from_env(cls) -> _InjectedFaults:
        spec = dict(part.split("=", 1) for part in os.environ.get(FAULT_ENV, "").split(",")
                    if "=" in part)
        return cls(int(spec.get("oom", 0)), int(spec.get("nan", 0)))

    def before_batch(self, size: int) -> None:
        if self.out_of_memory and size > 1:  # a batch that can be halved
            self.out_of_memory -= 1
            import torch
            raise torch.OutOfMemoryError("injected by KEYREID_FAULT_ENCODER")

    def after_batch(self, descriptors: np.ndarray) -> np.ndarray:
        count = min(self.not_finite, len(descriptors))
        if count:
            self.not_finite -= count
            descriptors = descriptors.copy()
            descriptors[:count, 0] = np.nan
        return descriptors
