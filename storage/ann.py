"""Approximate nearest-neighbour candidates from FAISS, kept on disk beside the database.

Why: exact search reads every stored descriptor per query (1M x 512-d float32 is 2 GB, about
100 ms here). Past `ANN_MIN_GALLERY` rows an inverted-file index with product-quantised codes
(FAISS `IVF{nlist},PQ{dim/8}`: an 8-bit code per 8-d sub-vector, dim / 8 bytes per vector)
proposes the `depth` most likely rows and `storage.search.nearest` re-ranks them exactly with
the stored descriptors, so callers still get exact distances of the one similarity. Below that
size the exact search is fast enough and always exact, so no index is built.

Why IVF-PQ and not HNSW: the gallery changes in place. A tracklet's descriptor moves when it
gains a clip and retention deletes old tracklets; an IVF index removes and re-adds ids
(`remove_ids`, `add_with_ids`), HNSW cannot remove. IVF builds in seconds where HNSW takes
minutes on two cores, and its codes are 64 bytes per 512-d descriptor instead of 2 KB plus a
graph, so persisting it is cheap. Not FAISS's SIMD "fast scan" variant (`...x4fs`), though it
scans fastest: in faiss 1.15.1 adding vectors to its block inverted lists after `remove_ids`
gives ids the wrong codes (`tests/test_storage_ann.py`, incremental update vs rebuild, caught
it). Not 4-bit PQ on 4-d sub-vectors (`PQ{dim/4}x4`, same bytes): it trains in half the time
but its generic decoder scans 4-5x slower (1M x 512-d, 16 lists: 15-23 ms against 3.4 ms).

On disk (`AnnIndex.save`, one folder per index): `index-<sha>.faiss` (`faiss.serialize_index`),
`entries-<sha>.npy` (the ids and a version per id, which say what was indexed) and
`manifest.json`, naming both files with their size and SHA-256, the model id, dimension and
format. Every file is written to a temporary name, fsynced and renamed into place, the manifest
last, so a reader sees the old index or the new one, never half of one. `open_index` rebuilds
whenever the manifest is missing or unreadable, a file is absent, truncated or fails its
checksum, or the model id, dimension or format differ (descriptors of another model are never
mixed in), and otherwise updates the loaded index incrementally: rows whose version changed
are removed and re-added, new rows added, vanished rows removed. A gallery grown to
`REBUILD_GROWTH` times the size the quantiser was trained on is rebuilt (its lists got long).
"""
from __future__ import annotations

import hashlib
import io
import json
import logging
import math
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import numpy as np

log = logging.getLogger(__name__)

ANN_MIN_GALLERY = 50_000  # rows; below this exact search is used (see README "Search at scale")
MIN_TRAIN_ROWS = 256  # fewer rows cannot train 256 PQ centroids per sub-space
FORMAT = 1
MANIFEST = "manifest.json"
REBUILD_GROWTH = 8  # rebuild when the index holds this many times its training size
TRAIN_POINTS_PER_LIST = 64  # k-means sample: 64 x nlist rows (FAISS warns below 39)
TRAIN_ITERATIONS = 10  # k-means iterations of the quantisers (FAISS default 25)
DEFAULT_NPROBE = 16  # inverted lists visited per query
DEFAULT_DEPTH = 300  # candidates re-ranked exactly per query


class AnnUnavailable(RuntimeError):
    """FAISS cannot be used here (not installed); the caller searches exactly."""


class AnnIndexDamaged(RuntimeError):
    """The index on disk is missing, damaged or stale; the message says which."""


def import_faiss() -> ModuleType:
    """The `faiss` module, or AnnUnavailable naming why (faiss-cpu is an optional extra)."""
    try:
        import faiss
    except ImportError as exc:
        raise AnnUnavailable(f"faiss is not importable ({exc}); install faiss-cpu") from None
    return faiss


def factory_string(rows: int, dim: int) -> str:
    """The FAISS index_factory description for `rows` descriptors of `dim`.

    nlist = sqrt(rows) rounded to a power of two (256 at 100k, 1024 at 1M): lists of about
    sqrt(rows) codes, so both the coarse step and the list scan stay small. 8-bit PQ on 8-d
    sub-vectors (dim / 8 bytes) where dim allows, else 8-bit scalar quantisation per dimension.
    """
    nlist = 2 ** max(4, min(16, round(math.log2(max(rows, 1)) / 2)))
    codes = f"PQ{dim // 8}" if dim % 8 == 0 else "SQ8"
    return f"IVF{nlist},{codes}"


def version_hash(clip_ids: np.ndarray, row_starts: np.ndarray) -> np.ndarray:
    """One uint64 per group of `clip_ids` (groups delimited by `row_starts` [G + 1]) that
    changes when the group's set of ids does: a wrapping sum of multiplicatively hashed ids,
    so a tracklet that gained a clip gets a new version and is re-indexed."""
    hashed = np.asarray(clip_ids, dtype=np.uint64) * np.uint64(0x9E3779B97F4A7C15)
    hashed ^= hashed >> np.uint64(29)
    starts = np.asarray(row_starts[:-1], dtype=np.int64)
    out = np.zeros(len(starts), dtype=np.uint64)
    filled = np.diff(row_starts) > 0
    if filled.any():
        with np.errstate(over="ignore"):
            out[filled] = np.add.reduceat(hashed, starts[filled])
    return out


@dataclass(eq=False)
class AnnIndex:
    """A FAISS IVF index over unit descriptors keyed by int64 ids, with what it holds.

    `ids` (ascending, unique) and `versions` (uint64, aligned) are the indexed rows and the
    version each was indexed at; `trained_rows` the gallery size its quantiser was trained on,
    `factory` its FAISS index_factory description.
    Not safe for concurrent `update` and `search`: the caller serialises updates.
    """

    index: object  # faiss.Index (an IVF index)
    model_id: str
    dim: int
    ids: np.ndarray
    versions: np.ndarray
    trained_rows: int
    factory: str
    nprobe: int = DEFAULT_NPROBE
    depth: int = DEFAULT_DEPTH

    def __len__(self) -> int:
        return int(self.index.ntotal)

    @property
    def description(self) -> str:
        """What it is, for logs and the benchmark, e.g. 'IVF1024,PQ64 nprobe 16 depth 300'."""
        return f"{self.factory} nprobe {self.nprobe} depth {self.depth}"

    @classmethod
    def build(cls, vectors: np.ndarray, ids: np.ndarray, versions: np.ndarray | None,
              model_id: str, *, seed: int = 0) -> AnnIndex:
        """Train a quantiser on a sample of `vectors` [N, D] (unit rows) and add them all."""
        faiss = import_faiss()
        vectors, ids, versions = _rows(vectors, ids, versions)
        n, dim = vectors.shape
        if n < MIN_TRAIN_ROWS:
            raise ValueError(f"an approximate index needs >= {MIN_TRAIN_ROWS} rows, got {n}")
        factory = factory_string(n, dim)
        index = faiss.index_factory(dim, factory)
        ivf = faiss.extract_index_ivf(index)
        ivf.cp.niter = TRAIN_ITERATIONS
        if isinstance(index, faiss.IndexIVFPQ):
            index.pq.cp.niter = TRAIN_ITERATIONS  # its sub-space k-means, likewise
            # index_factory turns on polysemous training (an annealing of code order for
            # Hamming pre-filtering, which this search does not use): most of the build time
            index.do_polysemous_training = False
        sample = min(n, TRAIN_POINTS_PER_LIST * ivf.nlist)
        rows = np.sort(np.random.default_rng(seed).choice(n, sample, replace=False))
        index.train(vectors[rows])
        index.add_with_ids(vectors, ids)
        return cls(index=index, model_id=model_id, dim=dim, ids=ids, versions=versions,
                   trained_rows=n, factory=factory)

    def update(self, vectors: np.ndarray, ids: np.ndarray,
               versions: np.ndarray | None) -> tuple[int, int]:
        """Make the index hold exactly `ids` at `versions` without retraining: rows that are
        gone or whose version changed are removed, new and changed rows added. Returns
        (rows added, rows removed)."""
        faiss = import_faiss()
        vectors, ids, versions = _rows(vectors, ids, versions)
        if vectors.shape[1] != self.dim:
            raise ValueError(f"descriptors have dimension {vectors.shape[1]}, index {self.dim}")
        kept = np.zeros(len(self.ids), dtype=bool)
        if len(ids):
            pos = np.minimum(np.searchsorted(ids, self.ids), len(ids) - 1)
            kept = (ids[pos] == self.ids) & (versions[pos] == self.versions)
        stale = self.ids[~kept]
        fresh = ~np.isin(ids, self.ids[kept], assume_unique=True)
        if stale.size:
            self.index.remove_ids(faiss.IDSelectorBatch(stale))
        if fresh.any():
            self.index.add_with_ids(vectors[fresh], ids[fresh])
        self.ids, self.versions = ids, versions
        return int(fresh.sum()), int(stale.size)

    def search(self, queries: np.ndarray, depth: int,
               allowed: np.ndarray | None = None) -> np.ndarray:
        """Candidate ids [Q, depth] per query (-1 pads where fewer were found), restricted to
        the ids in `allowed` when given (a FAISS IDSelector applied inside the list scan)."""
        faiss = import_faiss()
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        selector = None
        if allowed is not None:
            allowed = np.asarray(allowed, dtype=np.int64)
            size = int(allowed.max()) + 1 if allowed.size else 1
            mask = np.zeros(size, dtype=bool)
            mask[allowed] = True
            bitmap = np.packbits(mask, bitorder="little")  # id i: bit i & 7 of byte i >> 3
            # `bitmap` and `selector` stay referenced here until the search returns: FAISS
            # holds raw pointers to both
            selector = faiss.IDSelectorBitmap(len(bitmap), faiss.swig_ptr(bitmap))
        params = faiss.SearchParametersIVF(nprobe=self.nprobe, sel=selector)
        _, labels = self.index.search(queries, depth, params=params)
        return labels

    def save(self, directory: Path) -> None:
        """Write the index, its entries and the manifest atomically into `directory`."""
        faiss = import_faiss()
        directory.mkdir(parents=True, exist_ok=True)
        buffer = io.BytesIO()
        np.save(buffer, np.stack([self.ids, self.versions.view(np.int64)]))
        files = {}
        for role, suffix, data in (
                ("index", "faiss", faiss.serialize_index(self.index).tobytes()),
                ("entries", "npy", buffer.getvalue())):
            digest = hashlib.sha256(data).hexdigest()
            name = f"{role}-{digest[:16]}.{suffix}"
            _write_atomic(directory / name, data)
            files[role] = {"name": name, "bytes": len(data), "sha256": digest}
        manifest = {"format": FORMAT, "model_id": self.model_id, "dim": self.dim,
                    "factory": self.factory, "faiss": faiss.__version__, "rows": len(self),
                    "trained_rows": self.trained_rows, "files": files}
        _write_atomic(directory / MANIFEST, json.dumps(manifest, indent=1).encode())
        keep = {f["name"] for f in files.values()} | {MANIFEST}
        for old in directory.glob("*-*.*"):
            if old.name not in keep and old.name.startswith(("index-", "entries-")):
                old.unlink(missing_ok=True)

    @classmethod
    def load(cls, directory: Path, model_id: str, dim: int) -> AnnIndex:
        """The index saved in `directory`, or AnnIndexDamaged saying why it cannot be used."""
        faiss = import_faiss()
        try:
            manifest = json.loads((directory / MANIFEST).read_text())
            files = {role: manifest["files"][role] for role in ("index", "entries")}
            found = (manifest["format"], manifest["model_id"], manifest["dim"])
            trained, factory = int(manifest["trained_rows"]), str(manifest["factory"])
        except FileNotFoundError:
            raise AnnIndexDamaged(f"no index in {directory}") from None
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise AnnIndexDamaged(f"unreadable manifest in {directory}: {exc!r}") from None
        if found != (FORMAT, model_id, dim):
            raise AnnIndexDamaged(f"{directory} holds format {found[0]}, model {found[1]!r}, "
                                  f"dimension {found[2]}; the gallery needs format {FORMAT}, "
                                  f"model {model_id!r}, dimension {dim}")
        data = {}
        for role, entry in files.items():
            try:
                data[role] = (directory / entry["name"]).read_bytes()
            except OSError as exc:
                raise AnnIndexDamaged(f"{role} file of {directory} unreadable: {exc}") from None
            if (len(data[role]) != entry["bytes"]
                    or hashlib.sha256(data[role]).hexdigest() != entry["sha256"]):
                raise AnnIndexDamaged(f"{directory / entry['name']} is damaged: "
                                      f"{len(data[role])} bytes, manifest says "
                                      f"{entry['bytes']}, or its checksum differs")
        try:
            index = faiss.deserialize_index(np.frombuffer(data["index"], dtype=np.uint8))
            entries = np.load(io.BytesIO(data["entries"]))
        except (RuntimeError, ValueError) as exc:
            raise AnnIndexDamaged(f"{directory}: cannot decode the index: {exc}") from None
        if entries.shape != (2, index.ntotal) or index.d != dim:
            raise AnnIndexDamaged(f"{directory}: entries {entries.shape} do not match an index "
                                  f"of {index.ntotal} x {index.d}")
        return cls(index=index, model_id=model_id, dim=dim, ids=entries[0].copy(),
                   versions=entries[1].view(np.uint64).copy(),
                   trained_rows=trained, factory=factory)


def open_index(directory: Path | None, vectors: np.ndarray, ids: np.ndarray,
               versions: np.ndarray | None, model_id: str) -> AnnIndex:
    """The persisted index of `directory` brought up to date with the gallery, or a new one.

    vectors [N, D] unit float32, ids [N] ascending int64, versions [N] uint64 (None: all 0).
    Loads, checks and updates incrementally; rebuilds (logging why) when the saved index is
    missing, damaged, of another model or dimension, or outgrown; saves when anything changed.
    `directory` None keeps the index in memory only. Raises AnnUnavailable without faiss.
    """
    import_faiss()
    vectors, ids, versions = _rows(vectors, ids, versions)
    index: AnnIndex | None = None
    changed = True
    if directory is not None:
        try:
            index = AnnIndex.load(directory, model_id, vectors.shape[1])
        except AnnIndexDamaged as exc:
            log.warning("building the search index: %s", exc)
    if index is not None and len(ids) > REBUILD_GROWTH * index.trained_rows:
        log.info("rebuilding the search index of %s: %d rows, trained on %d", directory,
                 len(ids), index.trained_rows)
        index = None
    if index is None:
        index = AnnIndex.build(vectors, ids, versions, model_id)
    else:
        added, removed = index.update(vectors, ids, versions)
        changed = bool(added or removed)
        log.info("search index %s: %d rows added, %d removed", directory, added, removed)
    if directory is not None and changed:
        try:
            index.save(directory)
        except OSError as exc:
            log.warning("could not save the search index to %s (%s); kept in memory",
                        directory, exc)
    return index


def _rows(vectors: np.ndarray, ids: np.ndarray,
          versions: np.ndarray | None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Validated contiguous float32 vectors, and copies (the index keeps them) of the ids,
    ascending and unique int64, and of the uint64 versions."""
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    ids = np.array(ids, dtype=np.int64)
    versions = (np.zeros(len(ids), np.uint64) if versions is None
                else np.array(versions, dtype=np.uint64))
    if vectors.ndim != 2 or ids.shape != (len(vectors),) or versions.shape != ids.shape:
        raise ValueError(f"need vectors [N, D], ids [N] and versions [N], got {vectors.shape}, "
                         f"{ids.shape}, {versions.shape}")
    if len(ids) > 1 and not np.all(np.diff(ids) > 0):
        raise ValueError("ids must be ascending and unique")
    if len(ids) and ids[0] < 0:
        raise ValueError("ids must be >= 0")
    return vectors, ids, versions


def _write_atomic(path: Path, data: bytes) -> None:
    """Write `data` to `path` through a fsynced temporary file renamed over it."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
