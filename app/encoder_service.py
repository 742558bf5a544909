"""The encoder service: clips from every camera, batched, through one `reid.Encoder`.

It lives in the main process beside the database writer, so the (GPU) model is loaded once and
batches mix cameras. A batch is encoded when it reaches `batch_size` clips or its oldest clip
has waited `max_wait` seconds; `backlog` is what the watcher uses to stop reading worker queues
(back-pressure) when encoding falls behind.
"""
from __future__ import annotations

import logging
import time
from collections import deque
from dataclasses import dataclass

import numpy as np

from .config import ReidConfig

LOG = logging.getLogger(__name__)


@dataclass(frozen=True, eq=False)
class PendingClip:
    """A clip waiting for its descriptor; `tag` is whatever the caller needs to store it."""

    crops: np.ndarray  # uint8 [T, H, W, 3]
    keypoints: np.ndarray  # float32 [T, 17, 3]
    tag: object
    arrived: float


class EncoderService:
    """Batches clips and runs the encoder; `encoded_clips` / `encode_seconds` for the status line."""

    def __init__(self, config: ReidConfig) -> None:
        import torch

        from reid import Encoder

        self.config = config
        device = None if config.device == "auto" else config.device
        if config.threads:
            torch.set_num_threads(config.threads)
        self.encoder = Encoder(config.checkpoint, model=config.model, device=device,
                               batch_size=config.batch_size, precision=config.precision,
                               **(config.overrides if config.checkpoint is None else {}))
        self.queue: deque[PendingClip] = deque()
        self.encoded_clips = 0
        self.encode_seconds = 0.0
        LOG.info("encoder: %s on %s (dim %d, %s)", self.encoder.model_id, self.encoder.device,
                 self.encoder.dim, "trained" if self.encoder.trained else "UNTRAINED")

    @property
    def model_id(self) -> str:
        return self.encoder.model_id

    @property
    def dim(self) -> int:
        return self.encoder.dim

    @property
    def backlog(self) -> int:
        return len(self.queue)

    def submit(self, crops: np.ndarray, keypoints: np.ndarray, tag: object) -> None:
        self.queue.append(PendingClip(crops, keypoints, tag, time.monotonic()))

    def due(self, now: float | None = None) -> bool:
        """A batch is full, or the oldest clip has waited `max_wait`."""
        if not self.queue:
            return False
        now = time.monotonic() if now is None else now
        return (len(self.queue) >= self.config.batch_size
                or now - self.queue[0].arrived >= self.config.max_wait)

    def encode_batch(self) -> list[tuple[object, np.ndarray]]:
        """Encode up to one batch of the oldest clips: (tag, float32 descriptor [dim]) pairs."""
        batch = [self.queue.popleft() for _ in range(min(self.config.batch_size, len(self.queue)))]
        if not batch:
            return []
        start = time.monotonic()
        descriptors = self.encoder.encode(np.stack([c.crops for c in batch]),
                                          np.stack([c.keypoints for c in batch]),
                                          np.full(len(batch), -1, dtype=np.int64))
        self.encode_seconds += time.monotonic() - start
        self.encoded_clips += len(batch)
        return [(c.tag, d) for c, d in zip(batch, descriptors)]
