"""Two-stage search over a built index. Stage 1: the Searcher of the index (the queries encoded as the index
takes them, then searched; on a GPU when there is one) and the compressed scores it ranks by (decoded_gallery,
compressed_queries, and decode_key: which indexes decode a gallery alike). Stage 2: the candidates re-scored with
the fp32 vectors (rerank), in the protocol's order (sort_candidates); and the exact top-k and list overlap the
sweep compares against.

The query is never quantised for fp16/bf16/int8/int4/pq/opq (FAISS scores the float query against the decoded
code: asymmetric distance); for binary and itq the query is binarised too. rq is asymmetric as well: the float
query's inner products with every codeword (a lookup table) are summed over the codes.

"Compressed scores" below means exactly what the index ranks by: query . decode(code) for the
scalar quantizers, PQ, OPQ (decode includes OPQ's inverse rotation) and RQ, and sign(query R) . sign(item R)
(+-1 vectors) for binary (R = binary_rotation) and itq (R = the index's learnt rotation, see
code_rotation). decoded_gallery / compressed_queries return those two sides so the full ranking
under the compressed scores can be computed with metrics.exact_ranks.
"""
from __future__ import annotations

import functools
from typing import TYPE_CHECKING, Callable, NamedTuple, Optional

import numpy as np

from retrieval.precisions import SIGN_CODES, FaissIndex, core_index, load_faiss
from retrieval.reduction import binary_signs, code_rotation, sign_bits

if TYPE_CHECKING:  # only named in a hint: the search itself needs no torch
    import torch


class Searcher(NamedTuple):
    """How a configuration answers queries, in two stages that the sweep times separately.

    encode(queries) -> what the index takes: sign bits (binary / itq: rotation then signs), the OPQ
    rotation (opq), or None when the float query goes in as it is. search(codes, k) -> (scores, ids),
    scores larger = better for every precision. index: the object searched (the GPU copy on a GPU),
    where search-time knobs must be set."""
    encode: Optional[Callable[[np.ndarray], np.ndarray]]
    search: Callable[[np.ndarray, int], tuple[np.ndarray, np.ndarray]]
    index: FaissIndex

    def __call__(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Both stages: float queries -> (scores, ids)."""
        return self.search(self.encode(queries) if self.encode else queries, k)


def make_searcher(index: FaissIndex, precision: str, rotation: np.ndarray | None = None) -> Searcher:
    """The Searcher of a built index. rotation: binary/itq only, the rotation applied before taking
    signs; None = code_rotation(index)."""
    if precision in SIGN_CODES:
        dim = index.d
        rotation = code_rotation(index, precision) if rotation is None else rotation

        def search(codes, k):
            distances, ids = index.search(codes, k)
            return dim - 2 * distances.astype(np.float32), ids
        return Searcher(functools.partial(sign_bits, rotation=rotation), search, index)
    faiss = load_faiss()
    if isinstance(index, faiss.IndexPreTransform):
        # OPQ: the rotation is the query's side of the codec, so it is its own (timed) stage.
        core = core_index(index)
        transforms = [faiss.downcast_VectorTransform(index.chain.at(i)) for i in range(index.chain.size())]

        def encode(queries):
            for transform in transforms:
                queries = transform.apply(queries)
            return queries
        return Searcher(encode, core.search, core)
    if precision == "rq":
        return Searcher(None, functools.partial(protocol_ties_search, index), index)
    return Searcher(None, index.search, index)


# Items tied with the k-th candidate that a search may leave out in favour of a higher gallery index.
TIE_MARGIN = 16


def protocol_ties_search(index: FaissIndex, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """index.search(queries, k) whose k candidates break ties by the lower gallery index, as the protocol does.

    Why: FAISS's residual-quantizer search keeps the higher id of two equal scores at the k-th place (two items
    with the same code score exactly alike; measured with faiss 1.15), so its C candidates could differ from
    the protocol's at the boundary. It searches TIE_MARGIN more, orders by (-score, id) and keeps k: exact
    unless more than TIE_MARGIN items tie across the boundary."""
    wider = min(k + TIE_MARGIN, index.ntotal)
    scores, ids = index.search(queries, wider)
    order = protocol_order(scores, ids)[:, :k]
    return np.take_along_axis(scores, order, axis=1), np.take_along_axis(ids, order, axis=1)


def device_searcher(index: FaissIndex, precision: str, device: torch.device) -> Searcher:
    """make_searcher on the device: a FAISS GPU copy of the index when `device` (a torch.device) is
    CUDA and faiss-gpu is installed, else the CPU index itself."""
    if device.type == "cuda":
        faiss = load_faiss()
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


def decoded_gallery(index: FaissIndex, precision: str, gallery: np.ndarray) -> np.ndarray:
    """The gallery as the index scores it (see module docstring); float32 [N, D]."""
    if precision in SIGN_CODES:
        return binary_signs(gallery, code_rotation(index, precision))
    if precision == "fp32":
        return np.ascontiguousarray(gallery, dtype=np.float32)
    faiss = load_faiss()
    core = core_index(index)
    if isinstance(core, faiss.IndexIVF):
        core.make_direct_map()
    return index.reconstruct_n(0, index.ntotal)  # opq: IndexPreTransform applies R^T after decoding


def decode_key(precision: str, index_type: str, build_knobs: tuple = ()) -> tuple:
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


def compressed_queries(precision: str, queries: np.ndarray, index: FaissIndex | None = None) -> np.ndarray:
    """The query side of the compressed score: binarised for binary/itq, unchanged otherwise.

    itq needs `index` (the rotation is learnt per index); binary uses it when given.
    """
    if precision in SIGN_CODES:
        return binary_signs(queries, code_rotation(index, precision))
    return queries


# ----------------------------------------------------------------------------- lists and re-ranking

def sort_candidates(scores: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """Order each row by (-score, id): ties go to the lower gallery index, as in the protocol.

    Empty slots (id -1, which FAISS pads with) go last.
    """
    return np.take_along_axis(ids, protocol_order(scores, ids), axis=1)


def protocol_order(scores: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """Per row, the positions of (scores, ids) in (-score, id) order, empty slots (id -1) last."""
    scores = np.where(ids < 0, -np.inf, scores)
    return np.lexsort((np.where(ids < 0, np.iinfo(np.int64).max, ids), -scores), axis=1)


def rerank(queries: np.ndarray, gallery: np.ndarray, candidates: np.ndarray) -> np.ndarray:
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


def exact_top_k(index: FaissIndex, queries: np.ndarray, gallery: np.ndarray, k: int) -> np.ndarray:
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


def overlap_at_k(found: np.ndarray, reference: np.ndarray, k: int) -> float:
    """Mean fraction (%) of the reference top-k found among the first k of `found`; a gallery smaller than k
    lists fewer (reference has min(k, gallery) columns), and all of them found is 100."""
    found, reference = found[:, :k], reference[:, :k]
    hits = (found[:, :, None] == reference[:, None, :]) & (reference[:, None, :] >= 0)
    return float(100.0 * hits.any(axis=1).sum(axis=1).mean() / reference.shape[1])

