"""Compact descriptors: a linear projection of the full KeyRe-ID descriptor to `COMPACT_DIM`.

The full descriptor is 4,800-d for ViT-Tiny and 19,200-d for ViT-B (9.6 KB / 38 KB per clip in
storage's float16): a million clips can be neither stored nor searched. Its dimensions are far
from independent (six part features of T x D each, from one backbone), so a PCA fitted on
training descriptors keeps nearly all of its geometry in 1,024 dimensions: 2,048 bytes per clip
in storage's default float16 (`storage.repository`), 2 KiB.

Two kinds, one plumbing (`Projection.apply`, applied by `reid.Encoder` after the per-camera
normalisation, `reid.normalisation`, because the statistics are per dimension of the full
descriptor):
- `fit` (stored in the checkpoint under `PAYLOAD_KEY` by `training.project`): the top right
  singular vectors of the *uncentred* clip descriptors. They maximise the energy kept,
  sum ||P^T x||^2, so the projection preserves norms and inner products as well as a rank-k
  map can: the Euclidean distances the project ranks by and the cosines of the unit tracklet
  descriptors storage searches move as little as possible (centring would change the latter;
  descriptors standardised per camera are centred already). `whiten=True` is the retrieval
  classic instead (Jegou & Chum, ECCV 2012): centred PCA, each component divided by its spread,
  then L2-normalised, since whitened components of tiny variance would otherwise dominate the
  Euclidean distance; it changes the distances' scale, so it is an option, not the default.
- `random`: a checkpoint without a fitted projection (and the untrained default) gets a fixed,
  seeded, orthonormal random projection (QR of a seeded Gaussian): by Johnson-Lindenstrauss it
  keeps distances to a few percent, and the descriptors have the same size and path as with a
  fitted one.
A descriptor at or below `COMPACT_DIM` is not projected (`needs_projection`).
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

PAYLOAD_KEY = "projection"
COMPACT_DIM = 1024  # x 2 bytes (storage's default float16) = 2,048 bytes per stored clip
RANDOM_SEED = 0
# Bump if the random projection's construction changes: it is named by seed, not by its values,
# in the encoder's model_id (a digest of the matrix would vary with the BLAS's rounding).
RANDOM_VERSION = 1
KINDS = ("pca", "random")
# Whitening divides by sqrt(eigenvalue + this fraction of the largest one): components with no
# variance in the fitting set would otherwise be scaled without bound.
WHITEN_REGULARISATION = 1e-3
# Eigenvalues of the Gram matrix below this fraction of the largest (singular values below 1e-6
# of it) span nothing in the fitting set: float rounding, not descriptors.
RANK_TOLERANCE = 1e-12
# An exact eigendecomposition of a Gram matrix up to this size (ViT-Tiny's 4,800: ~30 s at one
# thread); above it (ViT-B's 19,200-d from 20,000 clips: hours) a randomized SVD (Halko et al.
# 2011) with `LOWRANK_OVERSAMPLING` extra directions and `LOWRANK_ITERATIONS` power iterations.
EXACT_LIMIT = 6000
LOWRANK_OVERSAMPLING = 64
LOWRANK_ITERATIONS = 4
_DIGEST_LENGTH = 8


def needs_projection(full_dim: int, dim: int = COMPACT_DIM) -> bool:
    """Whether descriptors of `full_dim` are projected at all (only those above the target)."""
    return full_dim > dim


@dataclass(frozen=True, eq=False)
class Projection:
    """`y = (x - mean) @ components`, then (whitened only) `/ scale` and L2-normalised.

    components: float32 `[D, k]`, orthonormal columns; mean: float32 `[D]` (zeros: uncentred);
    scale: float32 `[k]` or None (not whitened); fitted_on: clips the fit saw (0: random).
    """

    kind: str
    components: np.ndarray
    mean: np.ndarray
    scale: np.ndarray | None = None
    fitted_on: int = 0
    seed: int | None = None

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"projection kind {self.kind!r}: choose {', '.join(KINDS)}")
        if self.components.ndim != 2 or self.components.shape[1] > self.components.shape[0]:
            raise ValueError(f"projection components must be [D, k] with k <= D, got {self.components.shape}")
        if self.mean.shape != (self.input_dim,):
            raise ValueError(f"projection mean {self.mean.shape} does not match its input dimension {self.input_dim}")
        if self.scale is not None and self.scale.shape != (self.dim,):
            raise ValueError(f"projection scale {self.scale.shape} does not match its dimension {self.dim}")

    @property
    def input_dim(self) -> int:
        return int(self.components.shape[0])

    @property
    def dim(self) -> int:
        return int(self.components.shape[1])

    @property
    def whitened(self) -> bool:
        return self.scale is not None

    @property
    def tag(self) -> str:
        """What the encoder's model_id appends: a store never mixes two projections."""
        if self.kind == "random":
            return f"rand{self.dim}s{self.seed}v{RANDOM_VERSION}"
        digest = hashlib.sha256(self.components.tobytes() + self.mean.tobytes())
        if self.scale is not None:
            digest.update(self.scale.tobytes())
        return f"pca{self.dim}{'w' if self.whitened else ''}.{digest.hexdigest()[:_DIGEST_LENGTH]}"

    def apply(self, descriptors: np.ndarray) -> np.ndarray:
        """float32 `[N, k]` of full descriptors `[N, D]`."""
        descriptors = np.asarray(descriptors, dtype=np.float32)
        if descriptors.ndim != 2 or descriptors.shape[1] != self.input_dim:
            raise ValueError(f"descriptors {descriptors.shape} do not match the projection's input "
                             f"[N, {self.input_dim}] (a projection fitted for another model?)")
        projected = (descriptors - self.mean) @ self.components
        if self.scale is None:
            return projected
        projected /= self.scale
        return projected / np.maximum(np.linalg.norm(projected, axis=1, keepdims=True), 1e-12)

    @classmethod
    def fit(cls, descriptors: np.ndarray, dim: int = COMPACT_DIM, whiten: bool = False) -> Projection:
        """PCA of clip descriptors `[N, D]` (see the module docstring). Fewer than `dim`
        independent clips (a small site) span fewer dimensions: the rest of the projection is
        the seeded random one, orthogonal to what they span, so the descriptor keeps its size
        and a random view of what those clips did not show. A whitened fit has no variance to
        whiten such directions by: it keeps only what the clips span."""
        data = np.asarray(descriptors, dtype=np.float64)
        if data.ndim != 2 or data.shape[0] < 2:
            raise ValueError(f"need descriptors [N >= 2, D] to fit a projection, got {data.shape}")
        if not 0 < dim < data.shape[1]:
            raise ValueError(f"projection dimension must be in [1, {data.shape[1] - 1}] for {data.shape[1]}-d "
                             f"descriptors, got {dim}")
        if not np.isfinite(data).all():
            raise ValueError("descriptors to fit a projection contain NaN or infinity")
        mean = data.mean(0) if whiten else np.zeros(data.shape[1])
        values, vectors = _top_eigen(data - mean if whiten else data, dim)
        if not values[0] > 0:
            raise ValueError("descriptors to fit a projection span nothing (all zero; whitened: all equal)")
        keep = values > RANK_TOLERANCE * values[0]
        values, vectors = values[keep], vectors[:, keep]
        scale = None
        if whiten:
            variance = values / len(data)
            scale = np.sqrt(variance + WHITEN_REGULARISATION * variance[0]).astype(np.float32)
        elif len(values) < dim:
            vectors = _complete(vectors, dim)
        return cls("pca", np.ascontiguousarray(vectors, dtype=np.float32), mean.astype(np.float32), scale,
                   fitted_on=len(data))

    @classmethod
    def random(cls, input_dim: int, dim: int = COMPACT_DIM, seed: int = RANDOM_SEED) -> Projection:
        """The fixed orthonormal random projection `[input_dim, dim]` of `seed`: a process, a
        restart or another machine with the same libraries gets the same matrix."""
        if not 0 < dim <= input_dim:
            raise ValueError(f"projection dimension must be in [1, {input_dim}], got {dim}")
        gaussian = np.random.Generator(np.random.PCG64(seed)).standard_normal((input_dim, dim), dtype=np.float32)
        return cls("random", _orthonormal(gaussian), np.zeros(input_dim, np.float32), seed=seed)

    def to_payload(self) -> dict[str, Any]:
        """Tensors and plain values, loadable by `torch.load(weights_only=True)`."""
        payload: dict[str, Any] = {"kind": self.kind, "components": torch.from_numpy(self.components),
                                   "mean": torch.from_numpy(self.mean), "fitted_on": self.fitted_on}
        if self.scale is not None:
            payload["scale"] = torch.from_numpy(self.scale)
        if self.seed is not None:
            payload["seed"] = self.seed
        return payload

    @classmethod
    def from_payload(cls, payload: dict[str, Any]) -> Projection:
        scale = payload.get("scale")
        return cls(str(payload["kind"]), np.asarray(payload["components"], dtype=np.float32),
                   np.asarray(payload["mean"], dtype=np.float32),
                   None if scale is None else np.asarray(scale, dtype=np.float32),
                   fitted_on=int(payload.get("fitted_on", 0)), seed=payload.get("seed"))


def _complete(vectors: np.ndarray, dim: int, seed: int = RANDOM_SEED) -> np.ndarray:
    """Orthonormal `[D, r]` extended to `[D, dim]` by seeded random directions orthogonal to it
    (Gram-Schmidt twice: one pass leaves rounding-sized overlaps)."""
    extra = np.random.Generator(np.random.PCG64(seed)).standard_normal((vectors.shape[0], dim - vectors.shape[1]))
    for _ in range(2):
        extra -= vectors @ (vectors.T @ extra)
    return np.concatenate([vectors, _orthonormal(extra)], axis=1)


def _orthonormal(matrix: np.ndarray) -> np.ndarray:
    """float32 Q of the QR of `[D, k]`, column signs fixed (QR is unique up to them). torch's QR:
    0.5 s for ViT-Tiny's [4800, 1024] at one thread, 3x numpy's, paid at every encoder start.
    Thread counts may move its rounding (~1e-7), which is why the model_id names the seed."""
    q, r = torch.linalg.qr(torch.from_numpy(np.ascontiguousarray(matrix, dtype=np.float32)))
    q *= torch.sign(torch.diagonal(r))
    return q.numpy()


def _top_eigen(data: np.ndarray, dim: int, exact_limit: int = EXACT_LIMIT) -> tuple[np.ndarray, np.ndarray]:
    """The `dim` largest eigenvalues of `data^T data` and their eigenvectors `[D, dim]`, largest
    first, from whichever Gram matrix is smaller: `[D, D]`, or `[N, N]` mapped back when there
    are fewer clips than dimensions (a fit on a site's few hundred clips); randomized when both
    exceed `exact_limit`."""
    tensor = torch.from_numpy(data)
    count, width = data.shape
    if min(count, width) > exact_limit:
        # seeded, so that the fit is a function of its data alone
        rank = min(dim + LOWRANK_OVERSAMPLING, count, width)
        sketch = np.random.Generator(np.random.PCG64(RANDOM_SEED)).standard_normal((width, rank))
        basis = torch.linalg.qr(tensor @ torch.from_numpy(sketch))[0]  # [N, rank]: the range of the data
        for _ in range(LOWRANK_ITERATIONS):
            basis = torch.linalg.qr(tensor @ torch.linalg.qr(tensor.T @ basis)[0])[0]
        _, sigma, right = torch.linalg.svd(basis.T @ tensor, full_matrices=False)
        return (sigma[:dim] ** 2).numpy(), right[:dim].T.numpy()
    if count < width:
        values, vectors = torch.linalg.eigh(tensor @ tensor.T)
        values, vectors = values.flip(0)[:dim].clamp(min=0), vectors.flip(1)[:, :dim]
        # right singular vectors: v = X^T u / sigma; columns with sigma ~ 0 are dropped by the caller
        sigma = values.sqrt().clamp(min=torch.finfo(torch.float64).tiny)
        components = (tensor.T @ vectors) / sigma
    else:
        values, components = torch.linalg.eigh(tensor.T @ tensor)
        values, components = values.flip(0)[:dim].clamp(min=0), components.flip(1)[:, :dim]
    return values.numpy(), components.numpy()
