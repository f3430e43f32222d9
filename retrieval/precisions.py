"""The precisions the sweep compares and what each one stores: their names and families, which index structures
each has (unsupported), and the bytes of a code, known before building (code_bytes) or measured on a built index
(bytes_per_vector, serialized_bytes); with FAISS itself (load_faiss) and the index inside opq's wrapper that holds
the code (core_index).

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

rq is not in DEFAULT_PRECISIONS: it trains one codebook after another with a beam search (about 1.4 s a codebook
at 128 dims on 6,000 fit vectors on 2 cores), so 64 codebooks of a 512-d default sweep would cost minutes per
index; ask for it (`--precisions ... rq`), at the budgets where it wins.
"""
from __future__ import annotations

from types import ModuleType
from typing import Any

import numpy as np

PRECISIONS = ("fp32", "fp16", "bf16", "int8", "int4", "binary", "pq", "opq", "itq", "rq")
SLOW_TO_TRAIN = ("rq",)  # left out of a sweep's default precisions (see above)
DEFAULT_PRECISIONS = tuple(p for p in PRECISIONS if p not in SLOW_TO_TRAIN)
SIGN_CODES = ("binary", "itq")  # sign bits in an IndexBinary*, compared by Hamming distance
# Codes of M = D / pq_subdim codebooks of 8 bits (M bytes): pq / opq one per block of pq_subdim dims, rq over all.
PQ_CODES = ("pq", "opq", "rq")
FLAT_ONLY = ("rq",)
INDEX_TYPES = ("flat", "ivf", "hnsw")
# A FAISS index (faiss.Index or faiss.IndexBinary); faiss itself is imported on first use (load_faiss).
FaissIndex = Any


def load_faiss() -> ModuleType:
    """The faiss module, imported on first use: code that only names precisions (runs.py, sweep_settings.py)
    needs no FAISS."""
    import faiss
    return faiss


def unsupported(precision: str, dim: int, index_type: str, params: dict) -> str | None:
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


def code_bytes(precision: str, dim: int, params: dict) -> float:
    """Bytes of the code a vector gets, known before building (bytes_per_vector measures a built index)."""
    if precision in PQ_CODES:
        return dim // params.get("pq_subdim", 8)
    per_dim = {"fp32": 4, "fp16": 2, "bf16": 2, "int8": 1, "int4": 0.5, "binary": 0.125, "itq": 0.125}[precision]
    return per_dim * dim


def core_index(index: FaissIndex) -> FaissIndex:
    """The index inside an IndexPreTransform (opq), else the index itself: where nprobe, efSearch,
    the direct map and the code size live."""
    faiss = load_faiss()
    if isinstance(index, faiss.IndexPreTransform):
        return faiss.downcast_index(index.index)
    return index


# ----------------------------------------------------------------------------- memory

def serialized_bytes(index: FaissIndex) -> int:
    """Bytes of the serialised index. opq: faiss.serialize_index of the IndexPreTransform (the OPQ
    matrix is in it). itq: the binary index plus the float32 [D, D] learnt rotation, which the
    searcher needs and FAISS does not store; binary's fixed rotation is not counted (it is
    regenerated from its seed)."""
    faiss = load_faiss()
    if isinstance(index, faiss.IndexBinary):
        rotation = getattr(index, "sign_rotation", None)
        extra = 0 if rotation is None else int(np.asarray(rotation, dtype=np.float32).nbytes)
        return int(faiss.serialize_index_binary(index).size) + extra
    return int(faiss.serialize_index(index).size)


def bytes_per_vector(index: FaissIndex, precision: str, dim: int) -> int:
    """Bytes of the stored code per vector (excludes graph links / inverted-list ids)."""
    if precision in SIGN_CODES:
        return dim // 8
    if precision == "fp32":
        return 4 * dim
    faiss = load_faiss()
    index = core_index(index)  # opq: the PQ code behind the rotation (M bytes)
    if isinstance(index, faiss.IndexIVF):
        return int(index.code_size)  # sa_code_size would add the list number
    if isinstance(index, faiss.IndexHNSW):
        return int(faiss.downcast_index(index.storage).sa_code_size())
    return int(index.sa_code_size())

