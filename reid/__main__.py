"""`python -m reid`: encode one clip and print its descriptor and timing.

Give four (or fewer; they repeat) person-crop images with `--images`; without them a
synthetic clip is used. Keypoints are unknown here (score 0), so KPS falls back to plain
attention for every part: this command checks an installation and a checkpoint, the
watcher is where keypoints come from.
"""
from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from torchvision.io import ImageReadMode, decode_image, read_file

from .encoder import Encoder
from .registry import list_models


def _load_clip(paths: list[str], num_frames: int) -> np.ndarray:
    images = []
    for path in paths:
        try:
            images.append(decode_image(read_file(path), mode=ImageReadMode.RGB))
        except RuntimeError as error:
            raise SystemExit(f"{path}: not a readable image ({error})") from error
    height, width = images[0].shape[1:]
    resized = [torch.nn.functional.interpolate(i[None].float(), size=(height, width), mode="bilinear")[0] for i in images]
    frames = [resized[i % len(resized)] for i in range(num_frames)]
    return torch.stack(frames).permute(0, 2, 3, 1).round().clamp(0, 255).to(torch.uint8).numpy()[None]


def _synthetic_clip(num_frames: int) -> np.ndarray:
    """Colour gradients that drift over time: a deterministic stand-in for a person clip."""
    rows, cols = np.mgrid[0:256, 0:128].astype(np.float32)
    frames = [np.stack([rows, cols * 2, (rows + cols + 40 * t) % 256], axis=-1) for t in range(num_frames)]
    return np.stack(frames).astype(np.uint8)[None]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", help="re-id checkpoint (default: untrained weights, said loudly)")
    parser.add_argument("--model", default="keyreid_vit_tiny", choices=list_models())
    parser.add_argument("--images", nargs="+", help="person crop images forming the clip")
    parser.add_argument("--device", default=None, help="cpu, cuda (default: cuda when present)")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)

    encoder = Encoder(args.checkpoint, model=args.model, device=args.device)
    clip = _load_clip(args.images, encoder.num_frames) if args.images else _synthetic_clip(encoder.num_frames)
    keypoints = np.zeros((1, encoder.num_frames, 17, 3), dtype=np.float32)
    descriptor = encoder.encode(clip, keypoints)  # warm-up
    start = time.perf_counter()
    for _ in range(args.repeats):
        descriptor = encoder.encode(clip, keypoints)
    seconds = (time.perf_counter() - start) / args.repeats
    values = ", ".join(f"{v:+.4f}" for v in descriptor[0, :8])
    print(f"model      {encoder.model_id} on {encoder.device}")
    print(f"clip       {clip.shape[1]} frames of {clip.shape[2]}x{clip.shape[3]} ({'images' if args.images else 'synthetic'})")
    print(f"descriptor {encoder.dim} float32, L2 norm {np.linalg.norm(descriptor[0]):.3f}: [{values}, ...]")
    print(f"time       {seconds * 1000:.1f} ms per clip ({1 / seconds:.1f} clips/s, batch 1)")


if __name__ == "__main__":
    main()
