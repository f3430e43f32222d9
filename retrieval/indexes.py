"""Building the FAISS index of a configuration: the index of each precision and structure (make_index), the IVF
lists (how many, what an IVF index trains on, one coarse quantizer for every float IVF index), training and
filling it (build_index), and the one home for building an index of the sweep (build: the index, its memory,
its searcher and the encoded queries, as a BuiltIndex). precisions.py holds what each precision stores,
reduction.py the rotations of the sign codes, two_stage.py how a built index is searched.

Each but rq has a flat, an IVF and an HNSW form (make_index); rq is flat only (`unsupported` says so: FAISS's
factory has no HNSW form of it and gives its IVF form the L2 metric), and otherwise `unsupported` only rejects
dims the code size cannot divide. The IVF forms of fp32, fp16, bf16, int8, int4 and pq train the same coarse
quantizer, so one (train_coarse) can be given to all of them (build_index's `coarse`); two_stage.decode_key
says which indexes decode a gallery identically.

`--sq_ranges uniform` swaps QT_8bit/QT_4bit for QT_8bit_uniform/QT_4bit_uniform (one range for all
dimensions).
"""
from __future__ import annotations

import dataclasses
import functools
import sys
import time
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np

from retrieval.precisions import (FLAT_ONLY, PQ_CODES, SIGN_CODES, FaissIndex, bytes_per_vector, core_index, load_faiss,
                                  serialized_bytes, unsupported)
from retrieval.reduction import ITQ_ITERATIONS, code_rotation, itq_rotation, sign_bits
from retrieval.two_stage import Searcher, device_searcher

if TYPE_CHECKING:  # only named in a hint: building an index needs no torch
    import torch


def _sq_type(precision, sq_ranges):
    faiss = load_faiss()
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


def index_description(precision: str, dim: int, index_type: str, params: dict, gallery_size: int) -> dict:
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


def ivf_lists(gallery_size: int, params: dict) -> int:
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


def wanted_lists(gallery_size: int, params: dict) -> int:
    """The lists asked for: --nlist, else the rule of thumb ~4*sqrt(N) (before any cap by the fit set)."""
    return int(params["nlist"]) if params.get("nlist") else int(round(4 * np.sqrt(max(1, gallery_size))))


def ivf_sample_size(index_type: str, gallery_size: int, distractors: int, params: dict) -> int:
    """Distractor rows an index trains on besides the fit set: ivf_distractor_rows for IVF, none for the others
    (the grid and the group's builds both count with it, so a config's nlist is its build's)."""
    return ivf_distractor_rows(gallery_size, distractors, params) if index_type == "ivf" else 0


def ivf_distractor_rows(gallery_size: int, distractors: int, params: dict) -> int:
    """How many of a padded gallery's `distractors` rows an IVF index trains on besides the fit set: enough
    for MIN_POINTS_PER_LIST points in each of the lists asked for, at most every distractor.

    Why: the fit set is a held-out file (a Flickr8k dev split: 1,000 images), which caps a million-item
    gallery at 25 lists, and with 25 lists nprobe 16 scans 64% of it (slower than a flat scan). Distractors
    are what a deployment indexes besides the evaluated items and never a query's relevant item, so training
    the index on them, as FAISS users train on their database, leaks nothing about the queries."""
    return min(max(0, int(distractors)), MIN_POINTS_PER_LIST * wanted_lists(gallery_size, params))


def make_index(precision: str, dim: int, index_type: str = "flat", params: dict | None = None,
               gallery_size: int = 1) -> FaissIndex:
    """An empty (possibly untrained) FAISS index for the precision/index type."""
    faiss = load_faiss()
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


def flat_fp32(gallery: np.ndarray) -> FaissIndex:
    """fp32 exact search over `gallery` (inner product): the reference every configuration's speed is paired with."""
    index = make_index("fp32", gallery.shape[1])
    index.add(np.ascontiguousarray(gallery, dtype=np.float32))
    return index


def no_polysemous(index: FaissIndex) -> FaissIndex:
    """An IVF-PQ index from index_factory without its polysemous training. The factory turns it on: a simulated
    annealing that relabels each sub-space's centroids so that Hamming distances between codes track real
    ones, for FAISS's polysemous filter, which this sweep never uses (ADC scores do not depend on the labels).
    It ran over 10 minutes for one OPQ IVF index with 256 lists on 10,000 training vectors."""
    load_faiss().downcast_index(index).do_polysemous_training = False  # the same C++ object; `index` owns it
    return index


def _hnsw_pq(dim, pq_m, m, params):
    # Not index_factory("HNSW32_PQ64" or "HNSW32,PQ64x8"): in FAISS 1.15 the factory builds that
    # IndexHNSWPQ with METRIC_L2 whatever metric it is given (scores would be distances, smaller =
    # better). The constructor takes the metric.
    faiss = load_faiss()
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
    faiss = load_faiss()
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
    faiss = load_faiss()
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


def clusterings(index: FaissIndex) -> list[tuple[Any, int]]:
    """The k-means parameter blocks (ClusteringParameters, and the centroids each trains) that training the
    index will run: IVF's coarse quantizer unless it was given one (set_coarse), and the 256 codewords per
    sub-space of a PQ (also inside HNSW / OPQ)."""
    faiss = load_faiss()
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


def quiet_clustering(index: FaissIndex, fit_count: int) -> None:
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


def shares_coarse(precision: str, index_type: str) -> bool:
    """Whether the index is IVF over the float vectors as they are (fp32, fp16, bf16, int8, int4, pq): those
    all train the same coarse quantizer on the fit vectors, so one (train_coarse) can serve them all. opq
    clusters the OPQ-rotated vectors, and the sign codes their bits (binary's fixed rotation, itq's learnt
    one): each trains its own (set_coarse). rq has no IVF form (FLAT_ONLY)."""
    return index_type == "ivf" and precision not in SIGN_CODES + ("opq",) + FLAT_ONLY


def train_coarse(fit_codes: np.ndarray, nlist: int) -> Coarse:
    """The coarse quantizer IndexIVF.train (float32 fit_codes) or IndexBinaryIVF.train (packed sign bits,
    uint8) would learn: FAISS's own k-means, run by an empty IVF index of the same family, so with the same
    parameters (the index's ClusteringParameters: spherical for inner product, 10 iterations, seed 1234).
    Every float IVF index (IVF,Flat / IVF,SQ* / IVF,PQ) trains exactly this, and training it first is
    deterministic, so a build given it equals a build that trains its own (tests/test_indexes.py)."""
    faiss = load_faiss()
    binary = fit_codes.dtype == np.uint8
    dim = fit_codes.shape[1] * (8 if binary else 1)
    template = faiss.index_binary_factory(dim, f"BIVF{nlist}") if binary else \
        faiss.index_factory(dim, f"IVF{nlist},Flat", faiss.METRIC_INNER_PRODUCT)
    quiet_clustering(template, fit_codes.shape[0])
    start = time.perf_counter()
    template.train(fit_codes)
    return Coarse(template.quantizer.reconstruct_n(0, nlist), time.perf_counter() - start)


def set_coarse(index: FaissIndex, fit_codes: np.ndarray, coarse: Coarse | None = None) -> tuple[Coarse, float]:
    """Give an empty IVF index its coarse quantizer, `coarse` or one trained here (train_coarse on fit_codes,
    what the index is trained on), so that its train() learns only the rest (IndexIVF and IndexBinaryIVF skip
    their k-means when the quantizer already holds nlist centroids). Returns (the coarse quantizer, seconds of
    the index's own training done here).

    opq: its lists live in the OPQ-rotated space, so the rotation is trained first, as IndexPreTransform.train
    would (the index's own training), and the k-means runs on the rotated fit vectors; a coarse quantizer of
    the unrotated vectors is refused (rotated, it would differ from that k-means by float rounding).
    """
    faiss = load_faiss()
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


def build_index(precision: str, gallery: np.ndarray, fit_vectors: np.ndarray, index_type: str = "flat",
                params: dict | None = None, coarse: Coarse | None = None) -> tuple[FaissIndex, dict]:
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


def set_search_params(index: FaissIndex, index_type: str, params: dict, k: int) -> None:
    """nprobe (ivf) / efSearch (hnsw) on the index, or on the index inside an opq IndexPreTransform
    (the wrapper has neither: FAISS 1.15's Python wrapper raises AttributeError, older versions
    silently add a Python attribute that FAISS never reads)."""
    index = core_index(index)
    if index_type == "ivf":
        index.nprobe = int(params.get("nprobe", 16))
    elif index_type == "hnsw":
        # HNSW cannot return more than efSearch good results: widen the beam to at least k.
        index.hnsw.efSearch = int(max(params.get("ef_search", 64), k))


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
    index: FaissIndex
    timing: dict  # build_index's timings, plus "coarse_shared" for IVF (its k-means ran for an earlier index)
    bytes: int  # serialized_bytes
    bytes_per_vector: int
    searcher: Searcher  # device_searcher: on a GPU when there is one
    codes: list  # the query batches as the index takes them (searcher.encode), encoded once, untimed


def build(precision: str, gallery: np.ndarray, fit_vectors: np.ndarray, index_type: str, params: dict,
          query_batches: list, device: torch.device, coarse: Coarse | None = None,
          coarse_shared: bool = False) -> BuiltIndex:
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
