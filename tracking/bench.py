"""`python -m tracking.bench VIDEO`: CPU cost of a shared detector against one per camera.

The video is split into a left and a right half (two cameras, as the demo does). Per round, in
the same process: the shared detector (`PoseDetector`, torch, both halves in one batch) and a
detector per camera (`PoseTracker`, `--runtime`, one thread each), on the same frames; printed
as CPU milliseconds per pair of frames. On a GPU the shared detector is the point (one model,
one CUDA context, batches); on a CPU this says what it costs there.
"""
from __future__ import annotations

import argparse
import time

import numpy as np


def _halves(video: str, count: int, fps: float) -> list[tuple[np.ndarray, np.ndarray]]:
    from .sources import VideoSource

    pairs = []
    for frame in VideoSource(video, max_fps=fps):
        middle = frame.image.shape[1] // 2
        pairs.append((np.ascontiguousarray(frame.image[:, :middle]),
                      np.ascontiguousarray(frame.image[:, middle:])))
        if len(pairs) == count:
            break
    return pairs


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("video")
    parser.add_argument("--weights", help="YOLO-pose weights (default: find_pose_weights)")
    parser.add_argument("--imgsz", type=int, default=960)
    parser.add_argument("--frames", type=int, default=30)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--runtime", default="openvino", help="the per-camera detectors' runtime")
    args = parser.parse_args(argv)

    import torch

    from .detector import PoseDetector, PoseTracker, find_pose_weights

    weights = args.weights or find_pose_weights()
    pairs = _halves(args.video, args.frames, fps=5.0)
    torch.set_num_threads(1)
    shared = PoseDetector(weights, imgsz=args.imgsz, device="cpu")
    own = [PoseTracker(weights, imgsz=args.imgsz, runtime=args.runtime, threads=1)
           for _ in range(2)]
    for camera, detector in enumerate(own):  # first calls build predictors and compile
        detector.warm_up(*pairs[0][camera].shape[:2])
    shared.detect(list(pairs[0]))
    for round_ in range(1, args.rounds + 1):
        start = time.process_time()
        for pair in pairs:
            shared.detect(list(pair))
        together = (time.process_time() - start) / len(pairs)
        start = time.process_time()
        for pair in pairs:
            for camera, detector in enumerate(own):
                detector.update(pair[camera])
        apart = (time.process_time() - start) / len(pairs)
        print(f"round {round_}: CPU ms per pair of frames: shared detector (torch, batch of 2) "
              f"{1000 * together:.0f}, a detector per camera ({own[0].runtime}) {1000 * apart:.0f}")


if __name__ == "__main__":
    main()
