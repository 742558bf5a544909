"""Query latency of `nearest` for galleries of 10k / 100k / 1M descriptors (D = 768, 4800).

    python -m storage.bench [--max-gb 6] [--queries 5] [--k 20]

Galleries are random data generated in memory (nothing is written to disk). Each size is timed
twice: with the gallery as stored (float16, converted chunk by chunk during the search) and as
float32 (what `GalleryIndex` holds). A size whose arrays would exceed --max-gb is skipped and
reported as such. The figure is the median latency of single-descriptor queries, k results.
"""
from __future__ import annotations

import argparse
import statistics
import time

import numpy as np

from .search import nearest, squared_norms

SIZES = (10_000, 100_000, 1_000_000)
DIMS = (768, 4800)


def _gallery(n: int, dim: int, dtype, rng: np.random.Generator, rows: int = 65_536) -> np.ndarray:
    out = np.empty((n, dim), dtype=dtype)
    for start in range(0, n, rows):
        stop = min(start + rows, n)
        out[start:stop] = rng.standard_normal((stop - start, dim), dtype=np.float32)
    return out


def _latency_ms(gallery: np.ndarray, queries: np.ndarray, k: int) -> float:
    norms = squared_norms(gallery)  # computed once per gallery
    nearest(queries[:1], gallery, k, gallery_sq_norms=norms)  # warm-up (page-in, BLAS threads)
    times = []
    for q in queries:
        start = time.perf_counter()
        nearest(q[None, :], gallery, k, gallery_sq_norms=norms)
        times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-gb", type=float, default=6.0,
                        help="skip a gallery whose array would need more memory (GB)")
    parser.add_argument("--queries", type=int, default=5)
    parser.add_argument("--k", type=int, default=20)
    args = parser.parse_args(argv)
    rng = np.random.default_rng(0)
    print(f"nearest(): median latency of {args.queries} single queries, k={args.k}; "
          f"memory limit per gallery {args.max_gb:g} GB")
    print(f"{'gallery':>10} {'dim':>5} {'float16 ms':>11} {'float32 ms':>11}")
    for dim in DIMS:
        queries = rng.standard_normal((args.queries, dim), dtype=np.float32)
        for n in SIZES:
            cells = []
            for dtype in (np.float16, np.float32):
                gb = n * dim * np.dtype(dtype).itemsize / 1e9
                if gb > args.max_gb:
                    cells.append(f"skip {gb:.1f}GB")
                    continue
                gallery = _gallery(n, dim, dtype, rng)
                cells.append(f"{_latency_ms(gallery, queries, args.k):.1f}")
                del gallery
            print(f"{n:>10,} {dim:>5} {cells[0]:>11} {cells[1]:>11}", flush=True)


if __name__ == "__main__":
    main()
