"""Query latency of `nearest`: exact for 10k / 100k / 1M descriptors (D = 768, 1024: the watcher's compact descriptor, 4800), or
through the FAISS index (`storage.ann`) for 100k / 1M / 10M, with its recall.

    python -m storage.bench [--max-gb 6] [--queries 5] [--k 20]
    python -m storage.bench --index faiss [--dims 512 1024] [--data clustered gaussian]
                            [--queries 300] [--max-gb 6] [--nprobe 16] [--depth 300]

Galleries are generated in memory (nothing is written to disk). Exact mode (the default):
random Gaussian data, each size timed twice: with the gallery as stored (float16, converted
chunk by chunk during the search) and as float32 (what `GalleryIndex` holds). The figure is the
median latency of single-descriptor queries, k results.

FAISS mode prints one line per gallery, `gallery N dim D index NAME p50 X ms p99 Y ms
recall@10 Z`: single-descriptor queries through `nearest(..., index=...)` (FAISS candidates
re-ranked exactly), recall@10 = the share of the exact top 10 (exact `nearest` on the same
data) that it returns. The line before it names the data, the build time (train + add) and
the 1-minute load average. Data: "clustered" (`clustered_gallery`: identities with several
noisy clips each, the structure re-id descriptors have) or "gaussian" (unit Gaussian vectors:
no neighbourhood structure, the worst case for any approximate index).
A size whose float32 gallery would exceed --max-gb is skipped and reported as such.
"""
from __future__ import annotations

import argparse
import os
import statistics
import time

import numpy as np

from .ann import AnnIndex
from .search import nearest, squared_norms

SIZES = (10_000, 100_000, 1_000_000)
DIMS = (768, 1024, 4800)
ANN_SIZES = (100_000, 1_000_000, 10_000_000)
CLIPS_PER_IDENTITY = (2, 14)  # uniform range: 8 clips per identity on average
IDENTITIES_PER_LOOK = 100  # identities sharing one "look" (similar clothes, same site light)
LOOK_SPREAD = 1.2  # identity centre around its look, noise norm relative to a unit vector
CLIP_SPREAD = 0.7  # clip around its identity centre: cos(clip, centre) ~ 0.82


def _gallery(n: int, dim: int, dtype, rng: np.random.Generator, rows: int = 65_536) -> np.ndarray:
    out = np.empty((n, dim), dtype=dtype)
    for start in range(0, n, rows):
        stop = min(start + rows, n)
        out[start:stop] = rng.standard_normal((stop - start, dim), dtype=np.float32)
    return out


def _unit_noise(centres: np.ndarray, spread: float, rng: np.random.Generator) -> np.ndarray:
    """Unit rows of centres + Gaussian noise of norm ~ spread."""
    dim = centres.shape[1]
    out = centres + rng.standard_normal(centres.shape, dtype=np.float32) * (spread / dim ** 0.5)
    out /= np.linalg.norm(out, axis=1, keepdims=True)
    return out


def clustered_gallery(n: int, dim: int, queries: int,
                      rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A synthetic re-id gallery (unit float32 [n, dim]) and queries ([queries, dim]).

    Like stored descriptors: n / 8 identities with 2-14 noisy clips each around an identity
    centre, and identities grouped by look (100 per look), so every query has look-alike
    distractors close to its true matches. Queries are fresh clips of gallery identities.
    """
    identities = max(1, n // int(np.mean(CLIPS_PER_IDENTITY)))
    looks = _unit_noise(np.zeros((max(1, identities // IDENTITIES_PER_LOOK), dim), np.float32),
                        1.0, rng)
    centres = _unit_noise(looks[rng.integers(0, len(looks), identities)], LOOK_SPREAD, rng)
    owners = rng.integers(0, identities, n)
    gallery = np.empty((n, dim), dtype=np.float32)
    for start in range(0, n, 65_536):
        stop = min(start + 65_536, n)
        gallery[start:stop] = _unit_noise(centres[owners[start:stop]], CLIP_SPREAD, rng)
    return gallery, _unit_noise(centres[rng.integers(0, identities, queries)], CLIP_SPREAD, rng)


def gaussian_gallery(n: int, dim: int, queries: int,
                     rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Unit Gaussian gallery [n, dim] and queries: the worst case for an approximate index."""
    gallery = np.empty((n, dim), dtype=np.float32)
    for start in range(0, n, 65_536):
        stop = min(start + 65_536, n)
        gallery[start:stop] = _unit_noise(np.zeros((stop - start, dim), np.float32), 1.0, rng)
    return gallery, _unit_noise(np.zeros((queries, dim), np.float32), 1.0, rng)


def _latency_ms(gallery: np.ndarray, queries: np.ndarray, k: int) -> float:
    norms = squared_norms(gallery)  # computed once per gallery
    nearest(queries[:1], gallery, k, gallery_sq_norms=norms)  # warm-up (page-in, BLAS threads)
    times = []
    for q in queries:
        start = time.perf_counter()
        nearest(q[None, :], gallery, k, gallery_sq_norms=norms)
        times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)


def _ann_bench(args: argparse.Namespace) -> None:
    """FAISS mode: build, time and score the index per data kind, dimension and size."""
    makers = {"clustered": clustered_gallery, "gaussian": gaussian_gallery}
    queries_n = args.queries or 300
    print(f"nearest(..., index=faiss): {queries_n} single queries per gallery, recall@10 "
          f"against exact nearest; memory limit per gallery {args.max_gb:g} GB")
    for kind in args.data:
        for dim in args.dims:
            for n in args.sizes:
                gb = n * dim * 4 / 1e9
                if gb > args.max_gb:
                    print(f"gallery {n} dim {dim} skipped: {gb:.1f} GB of float32 descriptors "
                          f"over --max-gb {args.max_gb:g}", flush=True)
                    continue
                rng = np.random.default_rng(0)
                gallery, queries = makers[kind](n, dim, queries_n, rng)
                ones = np.ones(n, np.float32)
                _, truth = nearest(queries, gallery, 10, gallery_sq_norms=ones)
                start = time.perf_counter()
                index = AnnIndex.build(gallery, np.arange(n), None, "bench")
                build_s = time.perf_counter() - start
                index.nprobe = args.nprobe or index.nprobe
                index.depth = args.depth or index.depth
                exact_ms = []
                for q in queries[:20]:
                    start = time.perf_counter()
                    nearest(q[None, :], gallery, 10, gallery_sq_norms=ones)
                    exact_ms.append((time.perf_counter() - start) * 1000)
                nearest(queries[:1], gallery, 10, gallery_sq_norms=ones, index=index)  # warm-up
                times, found = [], []
                for q in queries:
                    start = time.perf_counter()
                    _, rows = nearest(q[None, :], gallery, 10, gallery_sq_norms=ones,
                                      index=index)
                    times.append((time.perf_counter() - start) * 1000)
                    found.append(rows[0])
                recall = np.mean([len(np.intersect1d(a, b)) / 10 for a, b in zip(found, truth)])
                print(f"# data {kind}, build {build_s:.1f} s ({index.description}), exact p50 "
                      f"{statistics.median(exact_ms):.1f} ms, load average "
                      f"{os.getloadavg()[0]:.2f}", flush=True)
                print(f"gallery {n} dim {dim} index {index.factory} p50 "
                      f"{np.percentile(times, 50):.2f} ms p99 {np.percentile(times, 99):.2f} ms "
                      f"recall@10 {recall:.3f}", flush=True)
                del gallery, index


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--index", choices=("exact", "faiss"), default="exact",
                        help="exact nearest (default) or through the FAISS index")
    parser.add_argument("--max-gb", type=float, default=6.0,
                        help="skip a gallery whose array would need more memory (GB)")
    parser.add_argument("--queries", type=int, default=None,
                        help="single queries per gallery (default: 5 exact, 300 faiss)")
    parser.add_argument("--k", type=int, default=20, help="results per query (exact mode)")
    parser.add_argument("--dims", type=int, nargs="+", default=[512], help="faiss mode")
    parser.add_argument("--sizes", type=int, nargs="+", default=list(ANN_SIZES),
                        help="faiss mode")
    parser.add_argument("--data", nargs="+", choices=("clustered", "gaussian"),
                        default=["clustered"], help="faiss mode")
    parser.add_argument("--nprobe", type=int, default=None,
                        help="faiss mode: lists visited (default storage.ann.DEFAULT_NPROBE)")
    parser.add_argument("--depth", type=int, default=None,
                        help="faiss mode: candidates re-ranked exactly (default "
                             "storage.ann.DEFAULT_DEPTH)")
    args = parser.parse_args(argv)
    if args.index == "faiss":
        _ann_bench(args)
        return
    args.queries = args.queries or 5
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
