"""Compressed FAISS indexes, dimension reduction, two-stage search, timing and memory accounting.

Precision -> FAISS (all inner-product indexes on L2-normalised vectors, so score = cosine):

    fp32    IndexFlatIP                      4*D bytes/vector (the exact baseline)
    fp16    IndexScalarQuantizer QT_fp16     2*D
    bf16    IndexScalarQuantizer QT_bf16     2*D
    int8    IndexScalarQuantizer QT_8bit     D     per-dimension [min, max] learnt on the fit set
    int4    IndexScalarQuantizer QT_4bit     D/2   per-dimension [min, max] learnt on the fit set
    binary  IndexBinaryFlat on sign bits     D/8   of a fixed random rotation (SimHash); score = D - 2*hamming
    pq      IndexPQ, M = D/pq_subdim sub-quantizers x 8 bits = D/pq_subdim bytes (D/8 by default)

`--sq_ranges uniform` swaps QT_8bit/QT_4bit for QT_8bit_uniform/QT_4bit_uniform (one range for all
dimensions). The query is never quantised for fp16/bf16/int8/int4/pq (FAISS scores the float query
against the decoded code: asymmetric distance); for binary the query is binarised too.

"Compressed scores" below means exactly what the index ranks by: query . decode(code) for the
scalar quantizers and PQ, and sign(R query) . sign(R item) (+-1 vectors, R = binary_rotation) for binary. decoded_gallery /
compressed_queries return those two sides so the full ranking under the compressed scores can be
computed with metrics.exact_ranks.
"""
import functools
import os
import resource
import sys
import time

import numpy as np

PRECISIONS = ("fp32", "fp16", "bf16", "int8", "int4", "binary", "pq")
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
    from retrieval.io import l2_normalize
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


def binary_signs(vectors):
    """The +-1 vectors the binary index compares: signs of the rotated vectors (float32 [N, D])."""
    vectors = np.asarray(vectors, dtype=np.float32)
    return np.where(vectors @ binary_rotation(vectors.shape[1]) > 0, 1.0, -1.0).astype(np.float32)


def sign_bits(vectors):
    """Pack the binary_signs into bits (uint8 [N, D/8]), the code IndexBinaryFlat stores."""
    return np.packbits(binary_signs(vectors) > 0, axis=1)


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
    if precision == "binary" and dim % 8:
        return f"binary needs dim divisible by 8, got {dim}"
    if precision == "pq" and dim % params.get("pq_subdim", 8):
        return f"pq needs dim divisible by pq_subdim={params.get('pq_subdim', 8)}, got {dim}"
    return None


def index_description(precision, dim, index_type, params, gallery_size):
    """The concrete index (FAISS class / factory string and knobs) for the config record."""
    nlist = ivf_lists(gallery_size, params)
    m = params.get("hnsw_m", 32)
    base = {"fp32": "Flat", "fp16": "SQfp16", "bf16": "SQbf16",
            "int8": "SQ8" + ("_uniform" if params.get("sq_ranges") == "uniform" else ""),
            "int4": "SQ4" + ("_uniform" if params.get("sq_ranges") == "uniform" else ""),
            "pq": f"PQ{dim // params.get('pq_subdim', 8)}x8", "binary": "BFlat"}[precision]
    if precision == "binary":
        name = {"flat": "BFlat", "ivf": f"BIVF{nlist}", "hnsw": f"BHNSW{m}"}[index_type]
    else:
        name = {"flat": base, "ivf": f"IVF{nlist},{base}", "hnsw": f"HNSW{m},{base}"}[index_type]
    out = {"faiss": name, "metric": "hamming" if precision == "binary" else "inner_product"}
    if index_type == "ivf":
        out.update(nlist=nlist, nprobe=params.get("nprobe", 16))
    if index_type == "hnsw":
        out.update(hnsw_m=m, ef_search=params.get("ef_search", 64), ef_construction=params.get("ef_construction", 40))
    if precision in ("int8", "int4"):
        out["sq_ranges"] = params.get("sq_ranges", "per_dim")
    if precision == "pq":
        out.update(pq_m=dim // params.get("pq_subdim", 8), pq_nbits=8)
    return out


def ivf_lists(gallery_size, params):
    """nlist = --nlist, else ~4*sqrt(N) (the usual rule of thumb); never more than the fit vectors."""
    nlist = int(params["nlist"]) if params.get("nlist") else int(round(4 * np.sqrt(max(1, gallery_size))))
    return max(1, min(nlist, int(params.get("fit_size") or nlist)))


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
    if precision == "binary":
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
        return faiss.IndexScalarQuantizer(dim, _sq_type(precision, params.get("sq_ranges")), metric)
    name = index_description(precision, dim, index_type, params, gallery_size)["faiss"]
    name = name.replace("_uniform", "")  # the factory has no uniform SQ names: set the type below
    if index_type == "hnsw" and precision == "pq":
        name = name.replace(",", "_")  # HNSW32_PQ64: PQ storage, PQ codes
    index = faiss.index_factory(dim, name, metric)
    if precision in ("int8", "int4"):
        holder = faiss.downcast_index(index.storage) if index_type == "hnsw" else index
        holder.sq.qtype = _sq_type(precision, params.get("sq_ranges"))
    if index_type == "hnsw":
        index.hnsw.efConstruction = params.get("ef_construction", 40)
    return index


def build_index(precision, gallery, fit_vectors, index_type="flat", params=None):
    """Train (on fit_vectors) and fill an index with `gallery`. Returns (index, timings dict)."""
    params = params or {}
    index = make_index(precision, gallery.shape[1], index_type, params, gallery.shape[0])
    to_codes = sign_bits if precision == "binary" else (lambda x: np.ascontiguousarray(x, dtype=np.float32))
    start = time.perf_counter()
    trained = not index.is_trained
    if trained:
        index.train(to_codes(fit_vectors))
    train_s = time.perf_counter() - start
    start = time.perf_counter()
    index.add(to_codes(gallery))
    add_s = time.perf_counter() - start
    set_search_params(index, index_type, params, k=1)
    return index, {"train_s": train_s if trained else 0.0, "add_s": add_s, "build_s": train_s + add_s,
                   "trained": trained, "fit_vectors": int(fit_vectors.shape[0]) if trained else 0}


def set_search_params(index, index_type, params, k):
    if index_type == "ivf":
        index.nprobe = int(params.get("nprobe", 16))
    elif index_type == "hnsw":
        # HNSW cannot return more than efSearch good results: widen the beam to at least k.
        index.hnsw.efSearch = int(max(params.get("ef_search", 64), k))


def make_searcher(index, precision):
    """search(queries, k) -> (scores, ids), scores larger = better for every precision."""
    if precision == "binary":
        dim = index.d

        def search(queries, k):
            distances, ids = index.search(sign_bits(queries), k)
            return dim - 2 * distances.astype(np.float32), ids
        return search
    return index.search


def device_searcher(index, precision, device):
    """make_searcher on the device: a FAISS GPU copy of the index when `device` (a torch.device) is
    CUDA and faiss-gpu is installed, else the CPU index itself."""
    if device.type == "cuda":
        faiss = _faiss()
        if hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0:  # faiss-cpu has neither
            try:
                resources = faiss.StandardGpuResources()
                if precision == "binary":
                    return make_searcher(faiss.index_binary_cpu_to_gpu(resources, 0, index), precision)
                return make_searcher(faiss.index_cpu_to_gpu(resources, 0, index), precision)
            except (RuntimeError, AttributeError) as e:  # e.g. an index type without a GPU version
                print(f"note: {type(index).__name__} stays on the CPU ({e})")
    return make_searcher(index, precision)


def decoded_gallery(index, precision, gallery):
    """The gallery as the index scores it (see module docstring); float32 [N, D]."""
    if precision == "binary":
        return binary_signs(gallery)
    if precision == "fp32":
        return np.ascontiguousarray(gallery, dtype=np.float32)
    faiss = _faiss()
    if isinstance(index, faiss.IndexIVF):
        index.make_direct_map()
    return index.reconstruct_n(0, index.ntotal)


def compressed_queries(precision, queries):
    """The query side of the compressed score: binarised for binary, unchanged otherwise."""
    if precision == "binary":
        return binary_signs(queries)
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
    """Mean fraction (%) of the reference top-k found among the first k of `found`."""
    found, reference = found[:, :k], reference[:, :k]
    hits = (found[:, :, None] == reference[:, None, :]) & (reference[:, None, :] >= 0)
    return float(100.0 * hits.any(axis=1).sum(axis=1).mean() / k)


# ----------------------------------------------------------------------------- timing

def batches(queries, batch_size):
    """Contiguous query batches, cut once so the timed loop does nothing but search."""
    return [np.ascontiguousarray(queries[s:s + batch_size]) for s in range(0, queries.shape[0], batch_size)]


def time_batches(step, num_batches, num_queries, min_time=0.1, warmup=1):
    """Call step(i) for every batch i = 0..num_batches-1, in whole passes, until min_time seconds.

    The first `warmup` batches run once untimed (page faults, thread pool start-up, lazy tables).
    Whole passes only, so every query counts the same number of times; step can keep its last
    result, so the timed pass also yields the lists that are evaluated (no second search).
    """
    for i in range(min(warmup, num_batches)):
        step(i)
    passes, elapsed = 0, 0.0
    clock = time.perf_counter
    while passes == 0 or elapsed < min_time:
        start = clock()
        for i in range(num_batches):
            step(i)
        elapsed += clock() - start
        passes += 1
    return {"qps": passes * num_queries / elapsed, "seconds": elapsed, "passes": passes,
            "queries_per_pass": num_queries}


def latency_ms(step, queries, sample=100, seed=0, threads=1):
    """Single-query latency percentiles (ms) over a seeded sample of queries (one warm-up call).

    Runs with `threads` FAISS threads (0 = unchanged), then restores the previous count. One thread
    by default: a single query cannot use more, and OpenMP start-up/barriers on a busy machine
    otherwise dominate (measured here: 0.06 ms with 1 thread vs 11 ms with 2 for one SQ8 query).
    """
    previous = set_threads(0)
    if threads:
        set_threads(threads)
    try:
        return _latency(step, queries, sample, seed)
    finally:
        set_threads(previous)


def _latency(step, queries, sample, seed):
    rng = np.random.default_rng(seed)
    rows = rng.choice(queries.shape[0], size=min(sample, queries.shape[0]), replace=False)
    singles = [np.ascontiguousarray(queries[r:r + 1]) for r in rows]
    step(singles[0])
    times = np.empty(len(singles))
    clock = time.perf_counter
    for i, query in enumerate(singles):
        start = clock()
        step(query)
        times[i] = clock() - start
    p50, p95, p99 = np.percentile(times * 1000.0, [50, 95, 99])
    return {"latency_p50_ms": float(p50), "latency_p95_ms": float(p95), "latency_p99_ms": float(p99),
            "latency_queries": len(singles)}


# ----------------------------------------------------------------------------- memory

def serialized_bytes(index):
    faiss = _faiss()
    if isinstance(index, faiss.IndexBinary):
        return int(faiss.serialize_index_binary(index).size)
    return int(faiss.serialize_index(index).size)


def bytes_per_vector(index, precision, dim):
    """Bytes of the stored code per vector (excludes graph links / inverted-list ids)."""
    if precision == "binary":
        return dim // 8
    if precision == "fp32":
        return 4 * dim
    faiss = _faiss()
    if isinstance(index, faiss.IndexIVF):
        return int(index.code_size)  # sa_code_size would add the list number
    if isinstance(index, faiss.IndexHNSW):
        return int(faiss.downcast_index(index.storage).sa_code_size())
    return int(index.sa_code_size())


def peak_rss_bytes():
    """Peak resident set size of this process so far (ru_maxrss is KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)


def set_threads(threads):
    """Set FAISS's OpenMP threads (0 = leave the default); returns the count in force."""
    faiss = _faiss()
    if threads:
        faiss.omp_set_num_threads(int(threads))
    return int(faiss.omp_get_max_threads())


def cpu_threads_available():
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
