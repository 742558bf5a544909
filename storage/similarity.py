"""The one tracklet similarity of KeyRe-ID Watch: descriptor, distance and its plain meaning.

Storage, search, the linker and the dashboard all compare people with the functions here, so
every number an operator sees is on one scale.

- A clip descriptor is L2-normalised before anything else: KeyRe-ID descriptors are BN features
  whose norm varies with the clip (blur, occlusion, size), and re-id compares directions.
- A tracklet descriptor is the mean of its *unit* clip descriptors, normalised again. Averaging
  unit vectors gives every clip one vote; averaging raw features (what `storage` and
  `app/linking.py` did before) lets one high-norm clip dominate the tracklet.
- The distance is Euclidean between unit vectors, 0..2: 0 = same direction, sqrt(2) ~ 1.41 =
  unrelated (orthogonal), 2 = opposite, and d^2 = 2 - 2 cos. It is computed as one matrix
  product (cos = q . g), which is what makes 100k-identity galleries cheap.
- Operators see the cosine similarity as a percentage (`similarity_percent`): 100% = identical
  direction, 0% = unrelated or worse. Whether a given percentage means "same person" depends on
  the model; the linker's calibrated same-person probability says that (`describe`).
"""
from __future__ import annotations

import numpy as np

MAX_DISTANCE = 2.0


def unit(vectors: np.ndarray) -> np.ndarray:
    """L2-normalised float32 copy of a vector [D] or of each row of [N, D]; zero rows stay zero."""
    vectors = np.asarray(vectors, dtype=np.float32)
    if vectors.ndim not in (1, 2):
        raise ValueError(f"need a vector [D] or rows [N, D], got shape {vectors.shape}")
    norms = np.linalg.norm(vectors, axis=-1, keepdims=True)
    return np.divide(vectors, norms, out=np.zeros_like(vectors), where=norms > 0)


def tracklet_descriptor(clip_descriptors: np.ndarray) -> np.ndarray:
    """Unit tracklet descriptor [D]: the normalised mean of its normalised clip descriptors [N, D]."""
    clip_descriptors = np.asarray(clip_descriptors, dtype=np.float32)
    if clip_descriptors.ndim != 2 or len(clip_descriptors) == 0:
        raise ValueError(f"need clip descriptors [N>=1, D], got shape {clip_descriptors.shape}")
    return unit(unit(clip_descriptors).mean(axis=0))


def distances(queries: np.ndarray, gallery: np.ndarray) -> np.ndarray:
    """Euclidean distances [Q, G] (0..2, float32) between unit queries [Q, D] and unit gallery
    rows [G, D], as one float32 matrix product: d = sqrt(max(0, 2 - 2 q.g)).

    Inputs are assumed unit (use `unit`); a zero row gets distance sqrt(2) to everything."""
    queries = np.asarray(queries, dtype=np.float32)
    gallery = np.asarray(gallery, dtype=np.float32)
    if queries.ndim != 2 or gallery.ndim != 2 or queries.shape[1] != gallery.shape[1]:
        raise ValueError(f"need queries [Q, D] and gallery [G, D], got {queries.shape} and "
                         f"{gallery.shape}")
    squared = queries @ gallery.T
    squared *= -2.0
    squared += 2.0
    np.maximum(squared, 0.0, out=squared)
    return np.sqrt(squared, out=squared)


def cosine(distance: float | np.ndarray) -> float | np.ndarray:
    """Cosine similarity (-1..1) of unit vectors at `distance`: cos = 1 - d^2 / 2."""
    return 1.0 - np.square(distance) / 2.0


def similarity_percent(distance: float | np.ndarray) -> float | np.ndarray:
    """What operators see: cosine similarity as 0..100 % (negative cosines show as 0 %)."""
    return np.clip(100.0 * cosine(distance), 0.0, 100.0)


def describe(distance: float, same_person_probability: float | None = None) -> str:
    """One line for the dashboard, e.g. "87% similar; 99.2% likely the same person".

    Without a calibrated probability (too few labels for this model yet) it says so instead of
    suggesting that a high similarity means a match."""
    text = f"{float(similarity_percent(distance)):.0f}% similar"
    if same_person_probability is None:
        return text + " (model not calibrated yet: no judgement)"
    return f"{text}; {100.0 * same_person_probability:.1f}% likely the same person"
