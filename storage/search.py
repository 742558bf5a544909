"""Nearest-neighbour search over stored descriptors (exact, or FAISS candidates re-ranked
exactly), and the tracklet gallery.

`nearest` is the exact search: chunked over the gallery so a million descriptors never
materialise a Q x N distance matrix, using ||q||^2 + ||g||^2 - 2 q.g with a float32 matmul
(BLAS), clamped at 0 before the square root. On unit rows with ||g||^2 = 1 (what
`GalleryIndex` passes) this is `storage.similarity.distances`, the project's one similarity.

Ties are broken by gallery index, reproducibly: each distance is packed with its index into
one uint64 key (the bits of a non-negative float32 sort like the float), so partial selection
and the final sort order by (distance, index) exactly, in every chunk and across chunks.

There is no exact FAISS path any more: the `IndexFlatL2` this module used to build per call
(gallery >= 200k rows, faiss importable) copied the whole gallery into FAISS on every query,
2.95 s per 1M x 512-d query against ~0.1 s here, and faiss-cpu is now installed by the `site`
extra. FAISS is optional and not a dependency.

Given an approximate index (`storage.ann.AnnIndex`, FAISS IVF-PQ), `nearest` asks it for the
`depth` most likely rows of each query (the `valid` mask travels into FAISS as an ID selector)
and computes their distances exactly as above from the stored rows, with the same tie-breaking:
the results have the same form and exact distances, only a true neighbour the index missed can
be absent. A query for which the index finds fewer than k valid rows (a narrow filter) is
answered by the exact search.

`GalleryIndex` ranks tracklets (not clips) by the distance between the unit query and the
tracklet descriptors (`storage.similarity`), so the dashboard's search and the linker agree
on what "close" means, optionally re-ranked k-reciprocally (`storage.rerank`).
"""
from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .ann import (
    ANN_MIN_GALLERY,
    MIN_TRAIN_ROWS,
    AnnIndex,
    AnnUnavailable,
    open_index,
    version_hash,
)
from .records import SearchHit
from .rerank import k_reciprocal
from .similarity import distances, unit

_BLOCK_ELEMENTS = 8 * 1024 * 1024  # distance block size (float32 elements) per chunk
_CONVERT_ELEMENTS = 16 * 1024 * 1024  # float32 elements of gallery converted per chunk
_INDEX_MASK = np.uint64(0xFFFFFFFF)
RERANK_CANDIDATES = 200  # re-ranking costs O(N^2): only the top N are re-ranked
log = logging.getLogger(__name__)


def _check_inputs(queries: np.ndarray, gallery: np.ndarray, k: int, valid) -> None:
    if queries.ndim != 2 or gallery.ndim != 2:
        raise ValueError(
            f"queries and gallery must be 2-D, got shapes {queries.shape} and {gallery.shape}"
        )
    if queries.shape[1] != gallery.shape[1]:
        raise ValueError(
            f"descriptor dimensions differ: queries {queries.shape[1]}, gallery {gallery.shape[1]}"
        )
    if k < 0:
        raise ValueError(f"k must be >= 0, got {k}")
    if gallery.shape[0] >= 2**32:
        raise ValueError("gallery larger than 2**32 rows is not supported")
    if valid is not None and valid.shape != (gallery.shape[0],):
        raise ValueError(f"valid mask shape {valid.shape} != ({gallery.shape[0]},)")
    if not np.all(np.isfinite(queries)):
        raise ValueError("queries contain NaN or infinite values")


def _keys(dist: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """Pack non-negative float32 distances [Q, C] and their gallery indices [C] into sortable
    uint64 keys."""
    keys = dist.view(np.uint32).astype(np.uint64) << np.uint64(32)
    keys |= rows.astype(np.uint64)
    return keys


def _unpack(keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Sorted (distances float32, indices int64) from packed keys."""
    keys = np.sort(keys, axis=1)
    indices = (keys & _INDEX_MASK).astype(np.int64)
    return (keys >> np.uint64(32)).astype(np.uint32).view(np.float32), indices


def _distance_block(queries: np.ndarray, q_norms: np.ndarray, block: np.ndarray,
                    g_norms: np.ndarray) -> np.ndarray:
    """Euclidean distances [Q, C] from ||q||^2 + ||g||^2 - 2 q.g (float32), never -0.0."""
    d = queries @ block.T
    d *= -2.0
    d += q_norms
    d += g_norms[None, :]
    np.maximum(d, 0.0, out=d)
    np.sqrt(d, out=d)
    d += 0.0  # turns -0.0 into +0.0 so the packed keys order correctly
    return d


def _smallest(keys: np.ndarray, k: int) -> np.ndarray:
    """The k smallest keys of each row, unsorted."""
    if keys.shape[1] <= k:
        return keys
    return np.partition(keys, k - 1, axis=1)[:, :k]


def squared_norms(gallery: np.ndarray, rows: int = 65_536) -> np.ndarray:
    """float32 ||g||^2 per gallery row, computed in float32 blocks (for `gallery_sq_norms`)."""
    out = np.empty(gallery.shape[0], dtype=np.float32)
    for start in range(0, gallery.shape[0], rows):
        block = np.asarray(gallery[start:start + rows], dtype=np.float32)
        out[start:start + rows] = np.einsum("ij,ij->i", block, block)
    return out


def nearest(
    queries: np.ndarray,
    gallery: np.ndarray,
    k: int,
    *,
    valid: np.ndarray | None = None,
    gallery_sq_norms: np.ndarray | None = None,
    index: AnnIndex | None = None,
    ids: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """The k nearest gallery rows of each query by Euclidean distance.

    queries: [Q, D] float; gallery: [N, D] float16 or float32; valid: optional bool [N], False
    rows are never returned; gallery_sq_norms: optional precomputed float32 ||g||^2 [N].
    index: an approximate index holding every gallery row (`storage.ann`): its candidates are
    re-ranked exactly (module docstring); ids: the index's id of each row, ascending [N]
    (None: the row numbers).
    Returns (distances [Q, k'] float32 ascending, indices [Q, k'] int64) with
    k' = min(k, number of valid rows): fewer rows than k are returned, never padded.
    """
    queries = np.asarray(queries, dtype=np.float32)
    gallery = np.asarray(gallery)
    if valid is not None:
        valid = np.asarray(valid, dtype=bool)
    _check_inputs(queries, gallery, k, valid)
    n = gallery.shape[0]
    k = min(k, n if valid is None else int(valid.sum()))
    q = queries.shape[0]
    if k == 0 or q == 0:
        return np.zeros((q, k), np.float32), np.zeros((q, k), np.int64)
    if index is not None:
        if len(index) != n or (ids is not None and np.shape(ids) != (n,)):
            raise ValueError(f"the approximate index holds {len(index)} rows, the gallery {n}: "
                             "update it first (storage.ann.open_index)")
        return _nearest_approximate(queries, gallery, k, valid, gallery_sq_norms, index, ids)
    dim = gallery.shape[1]
    q_norms = np.einsum("ij,ij->i", queries, queries)[:, None]
    # Bound the Q x chunk distance block; a non-float32 gallery is also converted per chunk.
    chunk = max(256, _BLOCK_ELEMENTS // q)
    if gallery.dtype != np.float32:
        chunk = max(256, min(chunk, _CONVERT_ELEMENTS // max(dim, 1)))
    best: np.ndarray | None = None
    for start in range(0, n, chunk):
        stop = min(start + chunk, n)
        block = gallery[start:stop]
        if block.dtype != np.float32:
            block = block.astype(np.float32)
        if gallery_sq_norms is None:
            g_norms = np.einsum("ij,ij->i", block, block)
        else:
            g_norms = np.asarray(gallery_sq_norms[start:stop], dtype=np.float32)
        d = _distance_block(queries, q_norms, block, g_norms)
        if valid is not None:
            d[:, ~valid[start:stop]] = np.inf
        keys = _smallest(_keys(d, np.arange(start, stop)), k)
        best = keys if best is None else _smallest(np.concatenate([best, keys], axis=1), k)
    return _unpack(best)


def _nearest_approximate(queries: np.ndarray, gallery: np.ndarray, k: int,
                         valid: np.ndarray | None, gallery_sq_norms: np.ndarray | None,
                         index: AnnIndex, ids: np.ndarray | None):
    """`nearest` through the index's candidates, re-ranked exactly (see the module docstring)."""
    allowed = None
    if valid is not None:
        allowed = np.flatnonzero(valid) if ids is None else np.asarray(ids)[valid]
    labels = index.search(queries, max(k, index.depth), allowed)
    out_d = np.empty((len(queries), k), np.float32)
    out_i = np.empty((len(queries), k), np.int64)
    q_norms = np.einsum("ij,ij->i", queries, queries)[:, None]
    exact = []
    for j, found in enumerate(labels):
        found = found[found >= 0]
        rows = found if ids is None else np.searchsorted(ids, found)
        if len(rows) < k:
            exact.append(j)
            continue
        block = np.asarray(gallery[rows], dtype=np.float32)
        g_norms = (np.einsum("ij,ij->i", block, block) if gallery_sq_norms is None
                   else np.asarray(gallery_sq_norms[rows], dtype=np.float32))
        d = _distance_block(queries[j:j + 1], q_norms[j:j + 1], block, g_norms)
        out_d[j], out_i[j] = (a[0] for a in _unpack(_smallest(_keys(d, rows), k)))
    if exact:
        out_d[exact], out_i[exact] = nearest(queries[exact], gallery, k, valid=valid,
                                             gallery_sq_norms=gallery_sq_norms)
    return out_d, out_i


@dataclass(frozen=True, eq=False)
class GalleryIndex:
    """What tracklet search needs, in memory, on the one similarity's scale.

    Built by `Repository.gallery_index`. The clip arrays are aligned per clip; `descriptors`
    are made unit in place (a float32 input is not copied). From them, per tracklet (ascending
    id, `tracklet_rows`), `tracklet_descriptors` [T, D] is `storage.similarity.
    tracklet_descriptor` of that tracklet's clips. `tracklets` maps a tracklet id to
    (camera_id, track_id, first_time, last_time, identity_id) at build time.

    Memory: float32 throughout, (N + T) x D x 4 bytes (100k clips of 30k tracklets at the
    default model's D = 4,800: 2.5 GB); float16 would halve it, but BLAS has no float16
    matmul, so every search would convert the whole gallery.

    Large galleries: `ann_index` opens (once per GalleryIndex) a FAISS index over the
    tracklet descriptors, keyed by tracklet id, persisted in a folder and brought up to date
    incrementally; `search(..., index=...)` then ranks through it with exact distances.
    """

    descriptors: np.ndarray  # [N, D] float32, unit rows
    clip_ids: np.ndarray  # [N] int64
    tracklet_ids: np.ndarray  # [N] int64
    camera_ids: np.ndarray  # [N] object (str)
    start_times: np.ndarray  # [N] float64, clip start (video seconds)
    end_times: np.ndarray  # [N] float64, clip end
    tracklets: dict[int, tuple[str, int, float, float, int | None]]
    model_id: str | None
    tracklet_rows: np.ndarray = field(init=False)  # [T] int64 tracklet ids, ascending
    tracklet_descriptors: np.ndarray = field(init=False)  # [T, D] float32, unit
    tracklet_cameras: np.ndarray = field(init=False)  # [T] object (str)
    clip_rows: np.ndarray = field(init=False)  # [N] int64: each clip's row in tracklet_rows
    _clips_by_row: np.ndarray = field(init=False, repr=False)  # clip indices grouped by row
    _row_starts: np.ndarray = field(init=False, repr=False)  # [T + 1] offsets into the above
    _indexes: dict = field(init=False, repr=False)  # ann_index's memo: folder -> AnnIndex | None
    _indexes_lock: threading.Lock = field(init=False, repr=False)

    def __post_init__(self) -> None:
        clips = np.asarray(self.descriptors, dtype=np.float32)
        if clips.ndim != 2:
            raise ValueError(f"descriptors must be [N, D], got shape {clips.shape}")
        if not clips.flags.writeable:
            clips = clips.copy()
        norms = np.sqrt(squared_norms(clips))[:, None]
        np.divide(clips, norms, out=clips, where=norms > 0)
        rows, first, clip_rows = np.unique(self.tracklet_ids, return_index=True,
                                           return_inverse=True)
        grouped = np.argsort(clip_rows, kind="stable")
        starts = np.searchsorted(clip_rows[grouped], np.arange(len(rows) + 1))
        # The mean direction of unit clips, i.e. similarity.tracklet_descriptor per tracklet.
        sums = np.empty((len(rows), clips.shape[1]), dtype=np.float32)
        for r in range(len(rows)):
            sums[r] = clips[grouped[starts[r]:starts[r + 1]]].sum(axis=0)
        for name, value in (("descriptors", clips), ("tracklet_rows", rows.astype(np.int64)),
                            ("tracklet_descriptors", unit(sums)),
                            ("tracklet_cameras", np.asarray(self.camera_ids, object)[first]),
                            ("clip_rows", clip_rows.astype(np.int64)),
                            ("_clips_by_row", grouped), ("_row_starts", starts),
                            ("_indexes", {}), ("_indexes_lock", threading.Lock())):
            object.__setattr__(self, name, value)

    @property
    def size(self) -> int:
        """Number of clips."""
        return int(self.descriptors.shape[0])

    @property
    def dim(self) -> int:
        return int(self.descriptors.shape[1])

    def ann_index(self, directory: Path | None = None, *,
                  min_rows: int = ANN_MIN_GALLERY) -> AnnIndex | None:
        """The approximate index of this gallery's tracklets for `search(..., index=...)`,
        or None when exact search is the one to use: fewer than `min_rows` tracklets (and
        never fewer than `storage.ann.MIN_TRAIN_ROWS`), or faiss missing (logged once per
        gallery).

        Opened once per GalleryIndex and directory (`storage.ann.open_index`): the index saved
        in `directory` is checked, updated with the tracklets added, grown or deleted since it
        was saved (a tracklet's version is a hash of its clip ids) and saved again; a damaged
        or stale one, or one of another model, is rebuilt. None keeps it in memory only.
        """
        if len(self.tracklet_rows) < max(min_rows, MIN_TRAIN_ROWS):
            return None
        key = None if directory is None else str(directory)
        with self._indexes_lock:
            if key not in self._indexes:
                versions = version_hash(self.clip_ids[self._clips_by_row], self._row_starts)
                try:
                    self._indexes[key] = open_index(directory, self.tracklet_descriptors,
                                                    self.tracklet_rows, versions,
                                                    str(self.model_id))
                except AnnUnavailable as exc:
                    log.warning("exact search over %d tracklets: %s", len(self.tracklet_rows),
                                exc)
                    self._indexes[key] = None
            return self._indexes[key]

    def _mask(
        self,
        camera_ids,
        exclude_camera_id: str | None,
        exclude_tracklet_id: int | None,
        time_range: tuple[float, float] | None,
    ) -> np.ndarray | None:
        """Per tracklet row: does it pass the filters (None = all do)."""
        mask = np.ones(len(self.tracklet_rows), dtype=bool)
        if camera_ids is not None:
            mask &= np.isin(self.tracklet_cameras, list(camera_ids))
        if exclude_camera_id is not None:
            mask &= self.tracklet_cameras != exclude_camera_id
        if exclude_tracklet_id is not None:
            mask &= self.tracklet_rows != exclude_tracklet_id
        if time_range is not None:
            # A tracklet matches a time range when one of its clips overlaps it.
            overlaps = (self.start_times <= time_range[1]) & (self.end_times >= time_range[0])
            mask &= np.bincount(self.clip_rows[overlaps], minlength=len(mask)) > 0
        return None if mask.all() else mask

    def _hit(self, rank: int, row: int, distance: float, query: np.ndarray) -> SearchHit:
        clips = self._clips_by_row[self._row_starts[row]:self._row_starts[row + 1]]
        best = clips[int(np.argmin(distances(query, self.descriptors[clips])[0]))]
        tid = int(self.tracklet_rows[row])
        camera_id, track_id, first_time, last_time, identity_id = self.tracklets[tid]
        return SearchHit(rank=rank, distance=distance, tracklet_id=tid,
                         clip_id=int(self.clip_ids[best]), camera_id=camera_id,
                         track_id=track_id, first_time=first_time, last_time=last_time,
                         identity_id=identity_id)

    def search(
        self,
        query: np.ndarray,
        k: int,
        *,
        camera_ids=None,
        exclude_camera_id: str | None = None,
        exclude_tracklet_id: int | None = None,
        time_range: tuple[float, float] | None = None,
        max_distance: float | None = None,
        rerank: bool = False,
        index: AnnIndex | None = None,
    ) -> list[SearchHit]:
        """The k tracklets nearest to one query descriptor [D] (made unit), among those that
        pass the filters and lie within `max_distance` (0..2).

        `index`: this gallery's `ann_index` (None: exact search). Either way the hits and
        their distances are the same kind; the index can only miss a true neighbour.

        Each hit's `distance` is the one similarity's distance to the tracklet descriptor and
        its `clip_id` the tracklet's clip nearest to the query. With `rerank`, the
        `RERANK_CANDIDATES` nearest are re-ordered by k-reciprocal re-ranking
        (`storage.rerank`); the hits keep their plain distance, so it need not increase with
        rank. Ties are broken by tracklet id.
        """
        query = unit(np.asarray(query, dtype=np.float32).reshape(1, -1))
        if not self.size:
            return []
        if query.shape[1] != self.dim:
            raise ValueError(f"query has dimension {query.shape[1]}, gallery {self.dim}")
        valid = self._mask(camera_ids, exclude_camera_id, exclude_tracklet_id, time_range)
        depth = max(k, RERANK_CANDIDATES) if rerank else k
        dist, rows = nearest(query, self.tracklet_descriptors, depth, valid=valid,
                             gallery_sq_norms=np.ones(len(self.tracklet_rows), np.float32),
                             index=index, ids=self.tracklet_rows)
        dist, rows = dist[0], rows[0]
        if max_distance is not None:
            keep = int(np.searchsorted(dist, max_distance, side="right"))
            dist, rows = dist[:keep], rows[:keep]
        if rerank and len(rows) > 1:
            candidates = self.tracklet_descriptors[rows]
            reranked = k_reciprocal(dist[None, :], distances(candidates, candidates))[0]
            order = np.argsort(reranked, kind="stable")
            dist, rows = dist[order], rows[order]
        return [self._hit(rank, int(row), float(d), query)
                for rank, (d, row) in enumerate(zip(dist[:k], rows[:k]), start=1)]
