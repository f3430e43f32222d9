"""Compressed FAISS indexes, dimension reduction, two-stage search, timing and memory accounting.

Precision -> FAISS (all inner-product indexes on L2-normalised vectors, so score = cosine):

    fp32    IndexFlatIP                      4*D bytes/vector (the exact baseline)
    fp16    IndexScalarQuantizer QT_fp16     2*D
    bf16    IndexScalarQuantizer QT_bf16     2*D
    int8    IndexScalarQuantizer QT_8bit     D     per-dimension [min, max] learnt on the fit set
    int4    IndexScalarQuantizer QT_4bit     D/2   per-dimension [min, max] learnt on the fit set
    binary  IndexBinaryFlat on sign bits     D/8   of a fixed random rotation (SimHash); score = D - 2*hamming
    pq      IndexPQ, M = D/pq_subdim sub-quantizers x 8 bits = D/pq_subdim bytes (D/8 by default)
    opq     IndexPreTransform(OPQMatrix, IndexPQ): pq after a learnt rotation, same M x 8 bits = D/pq_subdim bytes
    itq     IndexBinaryFlat on sign bits     D/8   of a learnt ITQ rotation (itq_rotation); score = D - 2*hamming
    rq      IndexResidualQuantizer, M = D/pq_subdim codebooks x 8 bits = D/pq_subdim bytes: each codebook codes
            what the ones before left (residual quantisation, beam search over the codes), over all D dims

Each but rq has a flat, an IVF and an HNSW form (make_index); rq is flat only (`unsupported` says so: FAISS's
factory has no HNSW form of it and gives its IVF form the L2 metric), and otherwise `unsupported` only rejects
dims the code size cannot divide. rq is not in DEFAULT_PRECISIONS: it trains one codebook after another with a
beam search (about 1.4 s a codebook at 128 dims on 6,000 fit vectors on 2 cores), so 64 codebooks of a 512-d
default sweep would cost minutes per index; ask for it (`--precisions ... rq`), at the budgets where it wins.
The IVF forms of fp32, fp16, bf16, int8, int4 and pq train the same coarse quantizer, so one (train_coarse)
can be given to all of them (build_index's `coarse`); decode_key says which indexes decode a gallery
identically.

`--sq_ranges uniform` swaps QT_8bit/QT_4bit for QT_8bit_uniform/QT_4bit_uniform (one range for all
dimensions). The query is never quantised for fp16/bf16/int8/int4/pq/opq (FAISS scores the float query
against the decoded code: asymmetric distance); for binary and itq the query is binarised too. rq is asymmetric
as well: the float query's inner products with every codeword (a lookup table) are summed over the codes.

"Compressed scores" below means exactly what the index ranks by: query . decode(code) for the
scalar quantizers, PQ, OPQ (decode includes OPQ's inverse rotation) and RQ, and sign(query R) . sign(item R)
(+-1 vectors) for binary (R = binary_rotation) and itq (R = the index's learnt rotation, see
code_rotation). decoded_gallery / compressed_queries return those two sides so the full ranking
under the compressed scores can be computed with metrics.exact_ranks.
"""
from __future__ import annotations

import dataclasses
import functools
import sys
import time
from typing import Callable, NamedTuple, Optional

import numpy as np

from retrieval.io import l2_normalize

PRECISIONS = ("fp32", "fp16", "bf16", "int8", "int4", "binary", "pq", "opq", "itq", "rq")
SLOW_TO_TRAIN = ("rq",)  # left out of a sweep's default precisions (see above)
DEFAULT_PRECISIONS = tuple(p for p in PRECISIONS if p not in SLOW_TO_TRAIN)
SIGN_CODES = ("binary", "itq")  # sign bits in an IndexBinary*, compared by Hamming distance
# Codes of M = D / pq_subdim codebooks of 8 bits (M bytes): pq / opq one per block of pq_subdim dims, rq over all.
PQ_CODES = ("pq", "opq", "rq")
FLAT_ONLY = ("rq",)
INDEX_TYPES = ("flat", "ivf", "hnsw")
DIM_METHODS = ("pca", "truncate", "random")


def _faiss():
    import faiss
    return faiss


# ----------------------------------------------------------------------------- dimension reduction

def fit_reduction(fit_vectors, dim, method, seed=0):
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


def reduce(vectors, projection):
    """Project and re-normalise (a projection shrinks norms unevenly; the indexes assume unit rows)."""
    if projection is None:
        return np.ascontiguousarray(vectors, dtype=np.float32)
    return l2_normalize(np.asarray(vectors, dtype=np.float32) @ projection)


# ----------------------------------------------------------------------------- index construction

BINARY_ROTATION_SEED = 0


@functools.lru_cache(maxsize=None)
def binary_rotation(dim):
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


def binary_signs(vectors, rotation=None):
    """The +-1 vectors a sign-bit index compares: signs of the rotated vectors (float32 [N, D]).

    rotation: [D, D]; None = binary_rotation (the `binary` precision). For `itq` pass the index's
    learnt rotation (code_rotation).
    """
    vectors = np.asarray(vectors, dtype=np.float32)
    if rotation is None:
        rotation = binary_rotation(vectors.shape[1])
    return np.where(vectors @ rotation > 0, 1.0, -1.0).astype(np.float32)


def sign_bits(vectors, rotation=None):
    """The binary_signs packed into bits (uint8 [N, D/8]), the code IndexBinaryFlat stores. On the timed
    query path, so the signs go straight to bits without the +-1 float array."""
    vectors = np.asarray(vectors, dtype=np.float32)
    if rotation is None:
        rotation = binary_rotation(vectors.shape[1])
    return np.packbits(vectors @ rotation > 0, axis=1)


ITQ_ITERATIONS = 50
ITQ_MAX_TRAIN_PER_DIM = 10  # as faiss.ITQTransform.max_train_per_dim: at most 10*D fit vectors


def itq_rotation(fit_vectors, iterations=ITQ_ITERATIONS, seed=BINARY_ROTATION_SEED):
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


def code_rotation(index, precision):
    """The rotation applied before taking signs: binary_rotation for `binary`, the learnt one that
    build_index stored on the index (attribute `sign_rotation`) for `itq`."""
    rotation = getattr(index, "sign_rotation", None) if index is not None else None
    if rotation is not None:
        return rotation
    if precision == "itq":
        raise ValueError("itq codes need the index they were built with (its learnt rotation, "
                         "index.sign_rotation, set by build_index)")
    return binary_rotation(index.d) if index is not None else None


def _sq_type(precision, sq_ranges):
    faiss = _faiss()
    sq = faiss.ScalarQuantizer
    if precision == "fp16":
        return sq.QT_fp16
    if precision == "bf16":
        return sq.QT_bf16
    if precision == "int8":
        return sq.QT_8bit_uniform if sq_ranges == "uniform" else sq.QT_8bit
    if precision == "int4":
        return sq.QT_4bit_uniform if sq_ranges == "uniform" else sq.QT_4bit
    raise ValueError(precision)


def unsupported(precision, dim, index_type, params):
    """Reason this (precision, dim, index) cannot be built, or None."""
    if precision not in PRECISIONS:
        return f"unknown precision {precision!r}"
    if index_type not in INDEX_TYPES:
        return f"unknown index {index_type!r}"
    if precision in SIGN_CODES and dim % 8:
        return f"{precision} needs dim divisible by 8, got {dim}"
    if precision in PQ_CODES and dim % params.get("pq_subdim", 8):
        return f"{precision} needs dim divisible by pq_subdim={params.get('pq_subdim', 8)}, got {dim}"
    if precision in FLAT_ONLY and index_type != "flat":
        return f"{precision} is flat only here (FAISS has no {index_type} form of it that scores by inner product)"
    return None


def code_bytes(precision, dim, params):
    """Bytes of the code a vector gets, known before building (bytes_per_vector measures a built index)."""
    if precision in PQ_CODES:
        return dim // params.get("pq_subdim", 8)
    per_dim = {"fp32": 4, "fp16": 2, "bf16": 2, "int8": 1, "int4": 0.5, "binary": 0.125, "itq": 0.125}[precision]
    return per_dim * dim


def index_description(precision, dim, index_type, params, gallery_size):
    """The concrete index (FAISS class / factory string and knobs) for the config record."""
    nlist = ivf_lists(gallery_size, params)
    m = params.get("hnsw_m", 32)
    pq_m = dim // params.get("pq_subdim", 8)
    base = {"fp32": "Flat", "fp16": "SQfp16", "bf16": "SQbf16",
            "int8": "SQ8" + ("_uniform" if params.get("sq_ranges") == "uniform" else ""),
            "int4": "SQ4" + ("_uniform" if params.get("sq_ranges") == "uniform" else ""),
            "pq": f"PQ{pq_m}x8", "opq": f"PQ{pq_m}x8", "binary": "BFlat", "itq": "BFlat",
            "rq": f"RQ{pq_m}x8"}[precision]
    if precision in SIGN_CODES:
        name = {"flat": "BFlat", "ivf": f"BIVF{nlist}", "hnsw": f"BHNSW{m}"}[index_type]
    else:
        name = {"flat": base, "ivf": f"IVF{nlist},{base}", "hnsw": f"HNSW{m},{base}"}[index_type]
    if precision == "opq":
        name = f"OPQ{pq_m}," + name  # a valid index_factory string (HNSW: built directly, see make_index)
    if precision == "itq":
        name = "ITQ," + name  # not a factory string: the rotation is applied in numpy (itq_rotation)
    out = {"faiss": name, "metric": "hamming" if precision in SIGN_CODES else "inner_product"}
    if index_type == "ivf":
        out.update(nlist=nlist, nprobe=params.get("nprobe", 16))
    if index_type == "hnsw":
        out.update(hnsw_m=m, ef_search=params.get("ef_search", 64), ef_construction=params.get("ef_construction", 40))
    if precision in ("int8", "int4"):
        out["sq_ranges"] = params.get("sq_ranges", "per_dim")
    if precision in PQ_CODES:
        out.update(pq_m=pq_m, pq_nbits=8)
    if precision == "itq":
        out.update(itq_iterations=ITQ_ITERATIONS, itq_centred=False)
    if precision == "rq":
        out.update(rq_beam=RQ_BEAM, rq_search="lut")
    return out


# FAISS's k-means wants at least this many training points per centroid (it warns below).
MIN_POINTS_PER_LIST = 39


def ivf_lists(gallery_size, params):
    """nlist = --nlist (never more than the fit vectors), else ~4*sqrt(N), the usual rule of thumb, but at most
    fit vectors / 39 (params["fit_size"]: what the index trains on, for IVF on a padded gallery the fit set plus
    the distractor sample of ivf_distractor_rows). Why the second cap: with about as many lists as fit vectors every fit vector becomes its
    own centroid, the residuals an IVF SQ / PQ index trains its codec on are all zero, every item then
    scores as its list's centroid, and the lists come out in id order whatever nprobe (measured: a 100k
    gallery with 1,000 fit vectors gave int8 / int4 / pq / opq IVF the same R@1 at nprobe 1, 4 and 16)."""
    fit = int(params.get("fit_size") or 0)
    nlist = wanted_lists(gallery_size, params)
    if params.get("nlist"):
        return max(1, min(nlist, fit or nlist))
    return max(1, min(nlist, fit // MIN_POINTS_PER_LIST if fit else nlist))


def wanted_lists(gallery_size, params):
    """The lists asked for: --nlist, else the rule of thumb ~4*sqrt(N) (before any cap by the fit set)."""
    return int(params["nlist"]) if params.get("nlist") else int(round(4 * np.sqrt(max(1, gallery_size))))


def ivf_sample_size(index_type: str, gallery_size: int, distractors: int, params: dict) -> int:
    """Distractor rows an index trains on besides the fit set: ivf_distractor_rows for IVF, none for the others
    (the grid and the group's builds both count with it, so a config's nlist is its build's)."""
    return ivf_distractor_rows(gallery_size, distractors, params) if index_type == "ivf" else 0


def ivf_distractor_rows(gallery_size, distractors, params):
    """How many of a padded gallery's `distractors` rows an IVF index trains on besides the fit set: enough
    for MIN_POINTS_PER_LIST points in each of the lists asked for, at most every distractor.

    Why: the fit set is a held-out file (a Flickr8k dev split: 1,000 images), which caps a million-item
    gallery at 25 lists, and with 25 lists nprobe 16 scans 64% of it (slower than a flat scan). Distractors
    are what a deployment indexes besides the evaluated items and never a query's relevant item, so training
    the index on them, as FAISS users train on their database, leaks nothing about the queries."""
    return min(max(0, int(distractors)), MIN_POINTS_PER_LIST * wanted_lists(gallery_size, params))


def make_index(precision, dim, index_type="flat", params=None, gallery_size=1):
    """An empty (possibly untrained) FAISS index for the precision/index type."""
    faiss = _faiss()
    params = params or {}
    reason = unsupported(precision, dim, index_type, params)
    if reason:
        raise ValueError(reason)
    nlist = ivf_lists(gallery_size, params)
    m = params.get("hnsw_m", 32)
    metric = faiss.METRIC_INNER_PRODUCT
    if precision == "opq":
        return _opq_index(dim, index_type, params, nlist, m)
    if precision in SIGN_CODES:  # itq: build_index learns the rotation and stores it on the index
        if index_type == "flat":
            return faiss.IndexBinaryFlat(dim)
        if index_type == "ivf":
            return faiss.index_binary_factory(dim, f"BIVF{nlist}")  # the factory owns its quantizer
        index = faiss.IndexBinaryHNSW(dim, m)
        index.hnsw.efConstruction = params.get("ef_construction", 40)
        return index
    if index_type == "flat":
        if precision == "fp32":
            return faiss.IndexFlatIP(dim)
        if precision == "pq":
            return faiss.IndexPQ(dim, dim // params.get("pq_subdim", 8), 8, metric)
        if precision == "rq":
            return _rq_index(dim, dim // params.get("pq_subdim", 8))
        return faiss.IndexScalarQuantizer(dim, _sq_type(precision, params.get("sq_ranges")), metric)
    if index_type == "hnsw" and precision == "pq":
        return _hnsw_pq(dim, dim // params.get("pq_subdim", 8), m, params)
    name = index_description(precision, dim, index_type, params, gallery_size)["faiss"]
    name = name.replace("_uniform", "")  # the factory has no uniform SQ names: set the type below
    index = faiss.index_factory(dim, name, metric)
    if precision in ("int8", "int4"):
        holder = faiss.downcast_index(index.storage) if index_type == "hnsw" else index
        holder.sq.qtype = _sq_type(precision, params.get("sq_ranges"))
    if precision == "pq" and index_type == "ivf":
        index = no_polysemous(index)
    if index_type == "hnsw":
        index.hnsw.efConstruction = params.get("ef_construction", 40)
    return index


def no_polysemous(index):
    """An IVF-PQ index from index_factory without its polysemous training. The factory turns it on: a simulated
    annealing that relabels each sub-space's centroids so that Hamming distances between codes track real
    ones, for FAISS's polysemous filter, which this sweep never uses (ADC scores do not depend on the labels).
    It ran over 10 minutes for one OPQ IVF index with 256 lists on 10,000 training vectors."""
    _faiss().downcast_index(index).do_polysemous_training = False  # the same C++ object; `index` owns it
    return index


def _hnsw_pq(dim, pq_m, m, params):
    # Not index_factory("HNSW32_PQ64" or "HNSW32,PQ64x8"): in FAISS 1.15 the factory builds that
    # IndexHNSWPQ with METRIC_L2 whatever metric it is given (scores would be distances, smaller =
    # better). The constructor takes the metric.
    faiss = _faiss()
    index = faiss.IndexHNSWPQ(dim, pq_m, m, 8, faiss.METRIC_INNER_PRODUCT)
    index.hnsw.efConstruction = params.get("ef_construction", 40)
    return index


# FAISS's default beam: on Flickr8k test (d512 model, PCA to 64 / 128 dims, 8 / 16 codebooks) a beam of 16
# changed t2i R@1 by -0.2 / -0.1 and took 1.3-2.2x the training time.
RQ_BEAM = 5


def _rq_index(dim, codebooks):
    """Residual quantisation (IndexResidualQuantizer, Chen et al. 2010; FAISS's additive quantizers).

    Why: PQ splits the dims into blocks, one codebook each, so a short code on a short vector gets few dims per
    codebook and nothing shared across blocks; RQ's codebooks each span all D dims, the k-th coding what the
    first k-1 left. At 8 B on a 64-d PCA of the bench model (Flickr8k test t2i R@1) rq 8x8 kept 22.4 where
    pq 8x8 kept 17.2. Search: for inner product a code's score is the sum of the query's inner products with
    its codewords, so the look-up-table search (ST_LUT_nonorm: no norm is stored or needed) scores exactly
    query . decode(code), as the decompressing search does, without decoding."""
    faiss = _faiss()
    index = faiss.IndexResidualQuantizer(dim, codebooks, 8, faiss.METRIC_INNER_PRODUCT,
                                         faiss.AdditiveQuantizer.ST_LUT_nonorm)
    index.rq.max_beam_size = RQ_BEAM
    return index


def _opq_index(dim, index_type, params, nlist, m):
    """OPQ{M} in front of the pq index of the same type (IndexPreTransform).

    Why: PQ quantises each block of pq_subdim coordinates with its own 256 centroids, so its error
    depends on how the variance is spread over the blocks: with the variance concentrated in a few
    coordinates (PCA output, or a decaying spectrum) one block gets nearly all of it and the other
    codebooks are wasted. OPQ (Ge et al., CVPR 2013) learns an orthogonal rotation, alternating with
    PQ training, that minimises the PQ reconstruction error (it balances variance across the
    sub-spaces and decorrelates them). Inner products are unchanged by the rotation, so the index
    scores query . R^T decode(code) and reconstruct returns R^T decode(code).
    """
    faiss = _faiss()
    pq_m = dim // params.get("pq_subdim", 8)
    opq = faiss.OPQMatrix(dim, pq_m)  # FAISS defaults: 50 iterations, <= 65536 training vectors
    # The product quantizer OPQ re-trains at each of its iterations: the default one warns for every
    # sub-space and iteration when there are < 39*256 fit vectors (thousands of lines). The warning
    # threshold (min_points_per_centroid) changes nothing else; the final PQ still warns once per
    # sub-space, as `pq` does.
    inner_pq = faiss.ProductQuantizer(dim, pq_m, 8)
    inner_pq.cp.min_points_per_centroid = 1
    opq.pq = inner_pq
    opq.referenced_objects = [inner_pq]  # opq.pq is a raw pointer: keep the quantizer alive
    metric = faiss.METRIC_INNER_PRODUCT
    if index_type == "flat":
        inner = faiss.IndexPQ(dim, pq_m, 8, metric)
    elif index_type == "ivf":
        inner = no_polysemous(faiss.index_factory(dim, f"IVF{nlist},PQ{pq_m}x8", metric))
    else:
        inner = _hnsw_pq(dim, pq_m, m, params)
    return faiss.IndexPreTransform(opq, inner)  # the wrapper keeps references to both


def core_index(index):
    """The index inside an IndexPreTransform (opq), else the index itself: where nprobe, efSearch,
    the direct map and the code size live."""
    faiss = _faiss()
    if isinstance(index, faiss.IndexPreTransform):
        return faiss.downcast_index(index.index)
    return index


def clusterings(index):
    """The k-means parameter blocks (ClusteringParameters, and the centroids each trains) that training the
    index will run: IVF's coarse quantizer unless it was given one (set_coarse), and the 256 codewords per
    sub-space of a PQ (also inside HNSW / OPQ)."""
    faiss = _faiss()
    core = core_index(index)
    found = []
    if hasattr(core, "cp") and hasattr(core, "nlist") and core.quantizer.ntotal != core.nlist:
        found.append((core.cp, int(core.nlist)))
    storage = faiss.downcast_index(core.storage) if isinstance(core, faiss.IndexHNSW) else core
    pq = getattr(storage, "pq", None)
    if pq is not None:
        found.append((pq.cp, 1 << int(pq.nbits)))
    rq = getattr(storage, "rq", None)
    if rq is not None:  # every codebook of 8 bits (make_index), one k-means of 256 per stage
        found.append((rq.cp, 256))
    return found


def quiet_clustering(index, fit_count):
    """FAISS's k-means prints a WARNING per sub-space (and per OPQ iteration) when it has fewer than 39
    training points per centroid: over a hundred lines a run on Flickr8k-sized fit sets. Its threshold
    (min_points_per_centroid) decides only that warning, so it is lowered and one note per index says
    the same thing; the fit size is also recorded with the timings (fit_vectors)."""
    short = [k for cp, k in clusterings(index) if fit_count < k * cp.min_points_per_centroid]
    for cp, _ in clusterings(index):
        cp.min_points_per_centroid = 1
    if short:
        print(f"note: {type(core_index(index)).__name__} trains {max(short)} centroids on {fit_count} fit vectors "
              f"(FAISS recommends at least {39 * max(short)}); recorded as fit_vectors", file=sys.stderr)


class Coarse(NamedTuple):
    """An IVF coarse quantizer trained once (train_coarse), for every IVF index of one fit set and nlist."""
    centroids: np.ndarray  # [nlist, D] float32, or [nlist, D/8] uint8 for the sign codes' IndexBinaryIVF
    train_s: float  # seconds its k-means took


def shares_coarse(precision, index_type):
    """Whether the index is IVF over the float vectors as they are (fp32, fp16, bf16, int8, int4, pq): those
    all train the same coarse quantizer on the fit vectors, so one (train_coarse) can serve them all. opq
    clusters the OPQ-rotated vectors, and the sign codes their bits (binary's fixed rotation, itq's learnt
    one): each trains its own (set_coarse). rq has no IVF form (FLAT_ONLY)."""
    return index_type == "ivf" and precision not in SIGN_CODES + ("opq",) + FLAT_ONLY


def train_coarse(fit_codes, nlist):
    """The coarse quantizer IndexIVF.train (float32 fit_codes) or IndexBinaryIVF.train (packed sign bits,
    uint8) would learn: FAISS's own k-means, run by an empty IVF index of the same family, so with the same
    parameters (the index's ClusteringParameters: spherical for inner product, 10 iterations, seed 1234).
    Every float IVF index (IVF,Flat / IVF,SQ* / IVF,PQ) trains exactly this, and training it first is
    deterministic, so a build given it equals a build that trains its own (tests/test_indexes.py)."""
    faiss = _faiss()
    binary = fit_codes.dtype == np.uint8
    dim = fit_codes.shape[1] * (8 if binary else 1)
    template = faiss.index_binary_factory(dim, f"BIVF{nlist}") if binary else \
        faiss.index_factory(dim, f"IVF{nlist},Flat", faiss.METRIC_INNER_PRODUCT)
    quiet_clustering(template, fit_codes.shape[0])
    start = time.perf_counter()
    template.train(fit_codes)
    return Coarse(template.quantizer.reconstruct_n(0, nlist), time.perf_counter() - start)


def set_coarse(index, fit_codes, coarse=None):
    """Give an empty IVF index its coarse quantizer, `coarse` or one trained here (train_coarse on fit_codes,
    what the index is trained on), so that its train() learns only the rest (IndexIVF and IndexBinaryIVF skip
    their k-means when the quantizer already holds nlist centroids). Returns (the coarse quantizer, seconds of
    the index's own training done here).

    opq: its lists live in the OPQ-rotated space, so the rotation is trained first, as IndexPreTransform.train
    would (the index's own training), and the k-means runs on the rotated fit vectors; a coarse quantizer of
    the unrotated vectors is refused (rotated, it would differ from that k-means by float rounding).
    """
    faiss = _faiss()
    core, seconds = core_index(index), 0.0
    if isinstance(index, faiss.IndexPreTransform):
        if coarse is not None:
            raise ValueError("opq trains its coarse quantizer on the OPQ-rotated vectors: none can be given")
        start = time.perf_counter()
        rotation = faiss.downcast_VectorTransform(index.chain.at(0))
        rotation.train(fit_codes)
        fit_codes = rotation.apply(fit_codes)
        seconds = time.perf_counter() - start
    if coarse is None:
        coarse = train_coarse(fit_codes, core.nlist)
    binary = isinstance(core, faiss.IndexBinaryIVF)
    centroids, width = coarse.centroids, core.d // 8 if binary else core.d
    if (centroids.dtype == np.uint8) != binary or centroids.shape != (core.nlist, width) or core.quantizer.ntotal:
        raise ValueError(f"a coarse quantizer {centroids.shape} {centroids.dtype} cannot serve "
                         f"{type(core).__name__} (nlist {core.nlist}, d {core.d}, {core.quantizer.ntotal} centroids)")
    core.quantizer.add(centroids)
    return coarse, seconds


def build_index(precision, gallery, fit_vectors, index_type="flat", params=None, coarse=None):
    """Train (on fit_vectors) and fill an index with `gallery`. Returns (index, timings dict).

    IVF: the coarse quantizer is `coarse` (train_coarse of the same fit vectors and nlist: one serves every
    precision that shares_coarse) or trained here (set_coarse). Timings: train_s = what this index
    learns for itself (SQ ranges, PQ codebooks, OPQ / ITQ rotation), never the coarse k-means, which is
    coarse_train_s (its seconds, given or run here; None without IVF); build_s = coarse_train_s + train_s +
    add_s, what building this index alone costs, whether its coarse quantizer was shared or not.
    """
    params = params or {}
    index = make_index(precision, gallery.shape[1], index_type, params, gallery.shape[0])
    trained = not index.is_trained or precision == "itq"  # learnt something from the fit set
    start = time.perf_counter()
    if precision == "itq":
        # The learnt rotation lives on the index object (FAISS has no field for it): the searcher
        # binarises queries with it, decoded_gallery / compressed_queries / serialized_bytes read it
        # (code_rotation). object.__setattr__: FAISS's Python wrapper refuses unknown attributes on
        # float indexes (a guard against typos such as nprobe on a wrapper) and may on binary ones.
        object.__setattr__(index, "sign_rotation", itq_rotation(fit_vectors))
    if precision in SIGN_CODES:
        rotation = code_rotation(index, precision)
        to_codes = functools.partial(sign_bits, rotation=rotation)
    else:
        to_codes = functools.partial(np.ascontiguousarray, dtype=np.float32)
    fit_codes = to_codes(fit_vectors) if trained else None
    train_s = time.perf_counter() - start
    coarse_s = None
    if index_type == "ivf":
        coarse, own_s = set_coarse(index, fit_codes, coarse)
        train_s, coarse_s = train_s + own_s, coarse.train_s
    start = time.perf_counter()
    if not index.is_trained:
        quiet_clustering(index, fit_vectors.shape[0])
        index.train(fit_codes)
    train_s += time.perf_counter() - start
    start = time.perf_counter()
    index.add(to_codes(gallery))
    add_s = time.perf_counter() - start
    set_search_params(index, index_type, params, k=1)
    return index, {"train_s": train_s if trained else 0.0, "add_s": add_s,
                   "build_s": (coarse_s or 0.0) + (train_s if trained else 0.0) + add_s, "coarse_train_s": coarse_s,
                   "trained": trained, "fit_vectors": int(fit_vectors.shape[0]) if trained else 0}


def set_search_params(index, index_type, params, k):
    """nprobe (ivf) / efSearch (hnsw) on the index, or on the index inside an opq IndexPreTransform
    (the wrapper has neither: FAISS 1.15's Python wrapper raises AttributeError, older versions
    silently add a Python attribute that FAISS never reads)."""
    index = core_index(index)
    if index_type == "ivf":
        index.nprobe = int(params.get("nprobe", 16))
    elif index_type == "hnsw":
        # HNSW cannot return more than efSearch good results: widen the beam to at least k.
        index.hnsw.efSearch = int(max(params.get("ef_search", 64), k))


class Searcher(NamedTuple):
    """How a configuration answers queries, in two stages that the sweep times separately.

    encode(queries) -> what the index takes: sign bits (binary / itq: rotation then signs), the OPQ
    rotation (opq), or None when the float query goes in as it is. search(codes, k) -> (scores, ids),
    scores larger = better for every precision. index: the object searched (the GPU copy on a GPU),
    where search-time knobs must be set."""
    encode: Optional[Callable]
    search: Callable
    index: object

    def __call__(self, queries, k):
        """Both stages: float queries -> (scores, ids)."""
        return self.search(self.encode(queries) if self.encode else queries, k)


def make_searcher(index, precision, rotation=None):
    """The Searcher of a built index. rotation: binary/itq only, the rotation applied before taking
    signs; None = code_rotation(index)."""
    if precision in SIGN_CODES:
        dim = index.d
        rotation = code_rotation(index, precision) if rotation is None else rotation

        def search(codes, k):
            distances, ids = index.search(codes, k)
            return dim - 2 * distances.astype(np.float32), ids
        return Searcher(functools.partial(sign_bits, rotation=rotation), search, index)
    faiss = _faiss()
    if isinstance(index, faiss.IndexPreTransform):
        # OPQ: the rotation is the query's side of the codec, so it is its own (timed) stage.
        core = core_index(index)
        transforms = [faiss.downcast_VectorTransform(index.chain.at(i)) for i in range(index.chain.size())]

        def encode(queries):
            for transform in transforms:
                queries = transform.apply(queries)
            return queries
        return Searcher(encode, core.search, core)
    return Searcher(None, index.search, index)


def device_searcher(index, precision, device):
    """make_searcher on the device: a FAISS GPU copy of the index when `device` (a torch.device) is
    CUDA and faiss-gpu is installed, else the CPU index itself."""
    if device.type == "cuda":
        faiss = _faiss()
        if hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0:  # faiss-cpu has neither
            try:
                resources = faiss.StandardGpuResources()
                if precision in SIGN_CODES:
                    return make_searcher(faiss.index_binary_cpu_to_gpu(resources, 0, index), precision,
                                         rotation=code_rotation(index, precision))  # itq: the learnt one
                gpu = faiss.index_cpu_to_gpu(resources, 0, index)
                # The whole (pre-transformed) index on the GPU: one stage, searched as it is.
                return Searcher(None, gpu.search, gpu)
            except (RuntimeError, AttributeError) as e:  # e.g. an index type without a GPU version
                print(f"note: {type(index).__name__} stays on the CPU ({e})")
    return make_searcher(index, precision)


def decoded_gallery(index, precision, gallery):
    """The gallery as the index scores it (see module docstring); float32 [N, D]."""
    if precision in SIGN_CODES:
        return binary_signs(gallery, code_rotation(index, precision))
    if precision == "fp32":
        return np.ascontiguousarray(gallery, dtype=np.float32)
    faiss = _faiss()
    core = core_index(index)
    if isinstance(core, faiss.IndexIVF):
        core.make_direct_map()
    return index.reconstruct_n(0, index.ntotal)  # opq: IndexPreTransform applies R^T after decoding


def decode_key(precision, index_type, build_knobs=()):
    """What decoded_gallery (and so the full ranking under the compressed scores) depends on besides the
    gallery, the dim and the fit set: indexes with equal keys decode a gallery identically, so one decode and
    one full ranking serve them all.

    fp32 stores the vectors and the sign codes their bits in every structure (binary's rotation is fixed,
    itq's learnt from the fit set alone); the other codecs in a flat or an HNSW index: HNSW's storage is the
    flat index of the precision, trained the same way on the same fit set (tests/test_indexes.py checks the
    decodes are equal). IVF on those codecs encodes each item's residual from its list's centroid, so its
    decode also depends on the coarse quantizer: build_knobs (nlist) are part of its key. A product code's
    decode depends on its sub-quantizer count in every structure (its pq_subdim build knob)."""
    if precision == "fp32" or precision in SIGN_CODES:
        return (precision,)
    if index_type != "ivf":
        return (precision,) + tuple(knob for knob in build_knobs if knob[0] == "pq_subdim")
    return (precision, index_type) + tuple(build_knobs)


def compressed_queries(precision, queries, index=None):
    """The query side of the compressed score: binarised for binary/itq, unchanged otherwise.

    itq needs `index` (the rotation is learnt per index); binary uses it when given.
    """
    if precision in SIGN_CODES:
        return binary_signs(queries, code_rotation(index, precision))
    return queries


# ----------------------------------------------------------------------------- lists and re-ranking

def sort_candidates(scores, ids):
    """Order each row by (-score, id): ties go to the lower gallery index, as in the protocol.

    Empty slots (id -1, which FAISS pads with) go last.
    """
    scores = np.where(ids < 0, -np.inf, scores)
    big = np.iinfo(np.int64).max
    order = np.lexsort((np.where(ids < 0, big, ids), -scores), axis=1)
    return np.take_along_axis(ids, order, axis=1)


def rerank(queries, gallery, candidates):
    """Stage 2: re-score candidates [Q, C] with the fp32 gallery (same dim); sorted by (-score, id)."""
    candidates = np.asarray(candidates)
    safe = np.where(candidates < 0, 0, candidates)
    if candidates.shape[1] * 10 >= gallery.shape[0]:
        # A large share of the gallery is a candidate: one BLAS matmul over the whole gallery beats
        # gathering C vectors per query (gathering is memory-bound, ~10x slower per value).
        scores = np.take_along_axis(queries @ gallery.T, safe, axis=1)
    else:
        scores = np.einsum("qd,qcd->qc", queries, gallery[safe])
    return sort_candidates(scores, candidates)


def exact_top_k(index, queries, gallery, k):
    """Protocol top-k of exact fp32 search: ties at the k-th place go to the lower gallery index.

    FAISS's flat search does not promise which tied item it keeps, so it searches k+1: rows where
    the (k+1)-th score equals the k-th (a tie across the cut) are redone with a stable numpy sort.
    """
    n = gallery.shape[0]
    scores, ids = index.search(queries, min(k + 1, n))
    order = np.lexsort((ids, -scores), axis=1)
    scores, ids = np.take_along_axis(scores, order, axis=1), np.take_along_axis(ids, order, axis=1)
    top = ids[:, :k].copy()
    if ids.shape[1] > k:
        for row in np.flatnonzero(scores[:, k - 1] == scores[:, k]):
            top[row] = np.argsort(-(gallery @ queries[row]), kind="stable")[:k]
    return top


def overlap_at_k(found, reference, k):
    """Mean fraction (%) of the reference top-k found among the first k of `found`; a gallery smaller than k
    lists fewer (reference has min(k, gallery) columns), and all of them found is 100."""
    found, reference = found[:, :k], reference[:, :k]
    hits = (found[:, :, None] == reference[:, None, :]) & (reference[:, None, :] >= 0)
    return float(100.0 * hits.any(axis=1).sum(axis=1).mean() / reference.shape[1])


# ----------------------------------------------------------------------------- memory

def serialized_bytes(index):
    """Bytes of the serialised index. opq: faiss.serialize_index of the IndexPreTransform (the OPQ
    matrix is in it). itq: the binary index plus the float32 [D, D] learnt rotation, which the
    searcher needs and FAISS does not store; binary's fixed rotation is not counted (it is
    regenerated from its seed)."""
    faiss = _faiss()
    if isinstance(index, faiss.IndexBinary):
        rotation = getattr(index, "sign_rotation", None)
        extra = 0 if rotation is None else int(np.asarray(rotation, dtype=np.float32).nbytes)
        return int(faiss.serialize_index_binary(index).size) + extra
    return int(faiss.serialize_index(index).size)


def bytes_per_vector(index, precision, dim):
    """Bytes of the stored code per vector (excludes graph links / inverted-list ids)."""
    if precision in SIGN_CODES:
        return dim // 8
    if precision == "fp32":
        return 4 * dim
    faiss = _faiss()
    index = core_index(index)  # opq: the PQ code behind the rotation (M bytes)
    if isinstance(index, faiss.IndexIVF):
        return int(index.code_size)  # sa_code_size would add the list number
    if isinstance(index, faiss.IndexHNSW):
        return int(faiss.downcast_index(index.storage).sa_code_size())
    return int(index.sa_code_size())


# ----------------------------------------------------------------------------- one built index

def build_knobs(precision: str, index_type: str, index_params: dict, dim: int) -> tuple:
    """The build-time knobs of a configuration's index_params, as sorted (name, value) pairs: IVF lists, HNSW
    links, and a pq / opq / rq code's dims per codebook; the search-time knobs (nprobe, efSearch) are not
    among them, so one built index serves every value of those."""
    knobs = {"nlist": index_params.get("nlist")} if index_type == "ivf" else \
        {"hnsw_m": index_params.get("hnsw_m")} if index_type == "hnsw" else {}
    if precision in PQ_CODES:  # the config records M, the sub-quantizer count: M = dim / pq_subdim
        knobs["pq_subdim"] = dim // index_params["pq_m"]
    return tuple(sorted(knobs.items()))


def ivf_fit_set(fit_vectors: np.ndarray, gallery: np.ndarray, real_rows: int, count: int,
                rng: np.random.Generator) -> np.ndarray:
    """What an IVF index of a padded gallery trains on: the fit vectors, then `count` of the gallery's
    distractor rows (those after its `real_rows`), drawn by `rng` without replacement, in gallery order
    (ivf_distractor_rows says how many and why); never a real gallery item."""
    rows = real_rows + np.sort(rng.choice(gallery.shape[0] - real_rows, size=count, replace=False))
    return np.concatenate([fit_vectors, gallery[rows]])


@dataclasses.dataclass(frozen=True)
class BuiltIndex:
    """An index built over one gallery, with what the sweep records of it and how it is searched."""
    index: object
    timing: dict  # build_index's timings, plus "coarse_shared" for IVF (its k-means ran for an earlier index)
    bytes: int  # serialized_bytes
    bytes_per_vector: int
    searcher: Searcher  # device_searcher: on a GPU when there is one
    codes: list  # the query batches as the index takes them (searcher.encode), encoded once, untimed


def build(precision: str, gallery: np.ndarray, fit_vectors: np.ndarray, index_type: str, params: dict,
          query_batches: list, device, coarse: Coarse | None = None, coarse_shared: bool = False) -> BuiltIndex:
    """The one way the sweep builds an index: build_index, its memory, and its searcher on `device` with the
    query batches encoded for it. coarse / coarse_shared: the coarse quantizer a float IVF index gets and
    whether an earlier build trained it."""
    index, timings = build_index(precision, gallery, fit_vectors, index_type, params, coarse)
    if index_type == "ivf":
        timings["coarse_shared"] = coarse_shared
    searcher = device_searcher(index, precision, device)
    codes = [searcher.encode(b) for b in query_batches] if searcher.encode else query_batches
    return BuiltIndex(index, timings, serialized_bytes(index), bytes_per_vector(index, precision, gallery.shape[1]),
                      searcher, codes)
