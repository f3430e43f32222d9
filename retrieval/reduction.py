"""The linear maps a vector goes through before it is coded: dimension reduction to a sweep's dim (fit_reduction,
reduce: pca, truncate or random) and the rotations taken before sign bits (binary_rotation, the fixed SimHash
rotation of `binary`; itq_rotation, the learnt one of `itq`; code_rotation, the one an index uses) with the
codes they give (binary_signs, sign_bits). numpy only: quantize_aware.py trains through the same sign codes.
"""
from __future__ import annotations

import functools
from typing import Any

import numpy as np

from retrieval.handoff import l2_normalize

DIM_METHODS = ("pca", "truncate", "random")


def fit_reduction(fit_vectors: np.ndarray, dim: int, method: str, seed: int = 0) -> np.ndarray | None:
    """A [D, dim] projection matrix fitted on fit_vectors (rows of both modalities), or None at native D.

    pca:      top principal directions of the (centred) fit set. The projection itself is applied
              WITHOUT centring: subtracting a mean would add a per-item bias to inner products, while
              a pure projection keeps query.item scores a linear function of the originals (and at
              dim == D it is a rotation, so rankings are unchanged).
    truncate: the first `dim` coordinates (right for Matryoshka-style models).
    random:   a Gaussian random matrix with orthonormal columns (seeded).
    """
    fit_vectors = np.asarray(fit_vectors, dtype=np.float32)
    native = fit_vectors.shape[1]
    if dim > native:
        raise ValueError(f"target dim {dim} is above the native dim {native}")
    if dim == native:
        return None
    if method == "truncate":
        projection = np.zeros((native, dim), dtype=np.float32)
        projection[np.arange(dim), np.arange(dim)] = 1.0
        return projection
    if method == "random":
        rng = np.random.default_rng(seed)
        q, _ = np.linalg.qr(rng.standard_normal((native, dim)))
        return q.astype(np.float32)
    if method == "pca":
        centred = fit_vectors.astype(np.float64) - fit_vectors.mean(axis=0, dtype=np.float64)
        covariance = centred.T @ centred / max(1, centred.shape[0] - 1)
        eigenvalues, eigenvectors = np.linalg.eigh(covariance)
        order = np.argsort(eigenvalues)[::-1][:dim]
        return eigenvectors[:, order].astype(np.float32)
    raise ValueError(f"dim method must be one of {DIM_METHODS}, got {method!r}")


def reduce(vectors: np.ndarray, projection: np.ndarray | None) -> np.ndarray:
    """Project and re-normalise (a projection shrinks norms unevenly; the indexes assume unit rows)."""
    if projection is None:
        return np.ascontiguousarray(vectors, dtype=np.float32)
    return l2_normalize(np.asarray(vectors, dtype=np.float32) @ projection)


# ----------------------------------------------------------------------------- sign rotations

BINARY_ROTATION_SEED = 0


@functools.lru_cache(maxsize=None)
def binary_rotation(dim: int) -> np.ndarray:
    """The fixed random rotation (seeded, [dim, dim]) applied before taking signs for `binary`.

    Signs of raw coordinates weight every coordinate equally, whatever its variance. After PCA the
    variance sits in the first components and the tail bits are mostly noise: on Flickr8k test, sign
    bits of 256-d PCA vectors kept only 7% of fp32 R@1. Rotating first (SimHash) makes every bit an
    equally informative random hyperplane, and the Hamming distance then estimates the angle between
    the vectors (Charikar 2002), which is what cosine retrieval ranks by.
    """
    rng = np.random.default_rng(BINARY_ROTATION_SEED)
    rotation, _ = np.linalg.qr(rng.standard_normal((dim, dim)))
    return rotation.astype(np.float32)


def binary_signs(vectors: np.ndarray, rotation: np.ndarray | None = None) -> np.ndarray:
    """The +-1 vectors a sign-bit index compares: signs of the rotated vectors (float32 [N, D]).

    rotation: [D, D]; None = binary_rotation (the `binary` precision). For `itq` pass the index's
    learnt rotation (code_rotation).
    """
    vectors = np.asarray(vectors, dtype=np.float32)
    if rotation is None:
        rotation = binary_rotation(vectors.shape[1])
    return np.where(vectors @ rotation > 0, 1.0, -1.0).astype(np.float32)


def sign_bits(vectors: np.ndarray, rotation: np.ndarray | None = None) -> np.ndarray:
    """The binary_signs packed into bits (uint8 [N, D/8]), the code IndexBinaryFlat stores. On the timed
    query path, so the signs go straight to bits without the +-1 float array."""
    vectors = np.asarray(vectors, dtype=np.float32)
    if rotation is None:
        rotation = binary_rotation(vectors.shape[1])
    return np.packbits(vectors @ rotation > 0, axis=1)


ITQ_ITERATIONS = 50
ITQ_MAX_TRAIN_PER_DIM = 10  # as faiss.ITQTransform.max_train_per_dim: at most 10*D fit vectors


def itq_rotation(fit_vectors: np.ndarray, iterations: int = ITQ_ITERATIONS,
                 seed: int = BINARY_ROTATION_SEED) -> np.ndarray:
    """The ITQ rotation R [D, D] (float32, orthogonal) learnt on fit_vectors, for the `itq` precision.

    Why: sign bits keep only which side of each axis a vector lies on, so everything between the
    axes is quantisation error. ITQ (Gong & Lazebnik, CVPR 2011 / PAMI 2013) rotates the data so
    that the rotated vectors sit as close as possible to the corners of the hypercube: it minimises
    ||B - V R||_F over B in {-1, +1}^(N x D) and orthogonal R, alternating B = sign(V R) and
    R = orthogonal Procrustes(V, B) (R = U W^T for V^T B = U S W^T). Both steps are exact
    minimisers, so the objective never gets worse; it starts from binary_rotation, so the learnt
    codes start from the SimHash codes of `binary`. No PCA: D -> D bits, the bits of `binary`.

    Not centred, like `binary`, and the query and the gallery get the same rotation: with a mean mu
    subtracted, Hamming distance would estimate the angle between q - mu and x - mu, i.e. rank by
    q.x - mu.x, a per-item bias (the reason fit_reduction does not centre either); and mu would come
    from the gallery modality only (the fit set of an index is its gallery's modality) while the
    queries are the other one. Measured on the Flickr8k dual-encoder embeddings (fit = dev, 512-d and
    128-d PCA): centring balanced the bits but gave no better R@1/R@10 than uncentred ITQ.

    Trained in numpy rather than with faiss.ITQMatrix (same algorithm, same init_rotation): on the
    Flickr8k dev captions at 512-d (5120 vectors, 2 cores) ITQMatrix took 55 s and raised the
    objective sum |V R| from 90331 (the random start) to only 90334, this takes 5 s and reaches
    98834 (tests/test_codecs.py compares the two). Fit sets above ITQ_MAX_TRAIN_PER_DIM * D rows
    are subsampled (seeded), as faiss.ITQTransform does.
    """
    v = np.ascontiguousarray(fit_vectors, dtype=np.float32)
    n, dim = v.shape
    cap = ITQ_MAX_TRAIN_PER_DIM * dim
    if n > cap:
        v = v[np.sort(np.random.default_rng(seed).choice(n, cap, replace=False))]
    rotation = binary_rotation(dim).astype(np.float64)
    for _ in range(iterations):
        signs = np.where(v @ rotation.astype(np.float32) > 0, 1.0, -1.0).astype(np.float32)
        u, _, wt = np.linalg.svd((v.T @ signs).astype(np.float64))
        rotation = u @ wt
    return rotation.astype(np.float32)


def code_rotation(index: Any, precision: str) -> np.ndarray | None:
    """The rotation applied before taking signs: binary_rotation for `binary`, the learnt one that
    build_index stored on the index (attribute `sign_rotation`) for `itq`."""
    rotation = getattr(index, "sign_rotation", None) if index is not None else None
    if rotation is not None:
        return rotation
    if precision == "itq":
        raise ValueError("itq codes need the index they were built with (its learnt rotation, "
                         "index.sign_rotation, set by build_index)")
    return binary_rotation(index.d) if index is not None else None
