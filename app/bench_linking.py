"""`python -m app.bench_linking`: time and memory of one linking decision at scale.

For each descriptor size (the watcher's compact 1,024-d, ViT-Tiny's full 4,800-d, ViT-B-class 768-d) and number of active identities
(1k / 10k / 100k), a calibrated `tracking.linking.Linker` is filled with random unit prototypes
(one member each, spread over eight cameras inside the time window), then finished tracklets
that look like random known identities are linked one `link` call at a time. Reported: median
and worst milliseconds per decision, the transient memory one decision allocates (tracemalloc
peak), the prototype matrix itself and the process's peak RSS, beside the bare distance
product of the same shapes ("matmul ms": the memory-bound floor of an exact linker) and the
cost per decision when several finished tracklets are linked in one call ("batched ms": one
product for all of them, as the watcher does each tick). Target (issue 9): 100k active
identities in < 50 ms per decision.
"""
from __future__ import annotations

import argparse
import resource
import statistics
import time
import tracemalloc
from dataclasses import dataclass

import numpy as np

from storage.similarity import distances, unit
from tracking.linking import Calibrator, Linker, LinkerConfig, Member, TrackletSummary

_CHUNK = 2048


@dataclass(frozen=True)
class Row:
    dim: int
    identities: int
    median_ms: float
    floor_ms: float
    batch_ms: float  # per decision when `batch` finished tracklets are linked in one call
    worst_ms: float
    linked: int
    decisions: int
    transient_mb: float
    gallery_mb: float
    rss_mb: float


def _linker(dim: int, identities: int, rng: np.random.Generator) -> Linker:
    calibrator = Calibrator(genuine=rng.normal(0.5, 0.1, 2000),
                            impostor=rng.normal(1.3, 0.08, 2000))
    linker = Linker(LinkerConfig(time_window=3600.0), calibrator=calibrator, capacity=identities)
    for start in range(0, identities, _CHUNK):
        block = unit(rng.standard_normal((min(_CHUNK, identities - start), dim),
                                         dtype=np.float32))
        for offset, prototype in enumerate(block):
            i = start + offset
            t = 1000.0 * i / identities
            linker.add_identity(i + 1, prototype, [Member(-(i + 1), f"cam{i % 8}", t, t + 5)])
    return linker


def matmul_floor(dim: int, identities: int, repeats: int, rng: np.random.Generator) -> float:
    """Milliseconds of the bare distance product one decision cannot avoid (same shapes)."""
    gallery = np.empty((identities, dim), dtype=np.float32)
    for start in range(0, identities, _CHUNK):
        gallery[start:start + _CHUNK] = unit(rng.standard_normal(
            (min(_CHUNK, identities - start), dim), dtype=np.float32))
    query = gallery[:1].copy()
    timings = []
    for _ in range(repeats):
        start = time.perf_counter()
        distances(query, gallery)
        timings.append(time.perf_counter() - start)
    return 1e3 * statistics.median(timings)


def measure(dim: int, identities: int, decisions: int, batch: int, seed: int = 0) -> Row:
    rng = np.random.default_rng(seed)
    floor = matmul_floor(dim, identities, decisions, rng)
    linker = _linker(dim, identities, rng)
    targets = rng.choice(identities, size=decisions + batch + 1, replace=False) + 1
    noise = 0.2 / np.sqrt(dim)

    def tracklet(k: int) -> TrackletSummary:
        look = linker.prototype(int(targets[k])) + noise * rng.standard_normal(dim,
                                                                               dtype=np.float32)
        return TrackletSummary(k + 1, "query", 2000.0 + 20 * k, 2010.0 + 20 * k, unit(look))

    timings, linked = [], 0
    for k in range(decisions):
        query = tracklet(k)
        start = time.perf_counter()
        outcome = linker.link([query])
        timings.append(time.perf_counter() - start)
        linked += outcome[0].kind == "linked" and outcome[0].identity_id == int(targets[k])
    start = time.perf_counter()
    together = linker.link([tracklet(decisions + 1 + k) for k in range(batch)])
    batch_ms = 1e3 * (time.perf_counter() - start) / batch
    linked += sum(d.kind == "linked" for d in together)
    tracemalloc.start()
    linker.link([tracklet(decisions)])
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    gallery = linker.gallery_bytes
    rss_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return Row(dim, identities, 1e3 * statistics.median(timings), floor, batch_ms,
               1e3 * max(timings), linked, decisions + batch, peak / 1e6, gallery / 1e6,
               rss_kb / 1e3)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dims", type=int, nargs="+", default=[1024, 4800, 768])
    parser.add_argument("--identities", type=int, nargs="+", default=[1_000, 10_000, 100_000])
    parser.add_argument("--decisions", type=int, default=10, help="single-tracklet calls")
    parser.add_argument("--batch", type=int, default=8, help="tracklets in the batched call")
    args = parser.parse_args(argv)
    print(f"{'D':>5} {'identities':>10} {'ms/decision':>11} {'matmul ms':>9} "
          f"{'batched ms':>10} {'worst ms':>9} {'linked':>7} "
          f"{'transient MB':>12} {'gallery MB':>10} {'peak RSS MB':>11}")
    # smallest galleries first, so the process's peak RSS is the current row's
    for dim, identities in sorted(((d, n) for d in args.dims for n in args.identities),
                                  key=lambda c: c[0] * c[1]):
        row = measure(dim, identities, args.decisions, args.batch)
        print(f"{row.dim:>5} {row.identities:>10,} {row.median_ms:>11.1f} {row.floor_ms:>9.1f} "
              f"{row.batch_ms:>10.1f} {row.worst_ms:>9.1f} {row.linked:>3}/{row.decisions:<3} "
              f"{row.transient_mb:>12.1f} {row.gallery_mb:>10.0f} {row.rss_mb:>11.0f}", flush=True)


if __name__ == "__main__":
    main()
