"""The settings of one sweep: the grid, the index knobs and the timing knobs (run_experiments.py's flags of
the same name), built once by the script from its command line and passed explicitly to the sweep's modules.
"""
from __future__ import annotations

import dataclasses

from retrieval import precisions


@dataclasses.dataclass(frozen=True)
class SweepSettings:
    """The grid, the index knobs and the timing knobs of one sweep (the script's flags of the same name).

    No defaults here: the command line is their one home.
    """
    # grid
    embedding_dims: tuple[int, ...]
    dim_method: tuple[str, ...]  # one or more of reduction.DIM_METHODS, each its own configuration below the native dim
    precisions: tuple[str, ...]
    candidate_sizes: tuple[int, ...]
    recall_k: tuple[int, ...]
    directions: tuple[str, ...]
    index: tuple[str, ...]
    gallery_sizes: tuple[int, ...]
    distractors: tuple[str, ...]  # ("gaussian",) or hand-off files / "split:NAME" shorthands, padded in this order
    max_queries: int  # query images per file, with all their captions (0 = every image)
    max_code_bytes: int  # codes above this many bytes a vector are left out of the grid (0 = no cap)
    # index knobs; the IVF / HNSW ones take several values, each value its own configuration
    sq_ranges: str
    pq_subdim: tuple[int, ...]   # build-time, pq / opq / rq only (dims per codebook)
    nlist: tuple[int, ...]       # build-time (IVF lists; 0 = about 4 sqrt(N))
    nprobe: tuple[int, ...]      # search-time
    hnsw_m: tuple[int, ...]      # build-time
    ef_search: tuple[int, ...]   # search-time
    # timing
    batch_size: int
    min_time: float
    warmup: int
    rounds: int
    max_time: float
    latency_queries: int
    latency_threads: int
    threads: int
    seed: int

    def __post_init__(self) -> None:
        # Lists (as argparse gives them) become tuples, so a frozen settings object is really immutable.
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if isinstance(value, list):
                object.__setattr__(self, field.name, tuple(value))

    def index_settings(self, index_type: str = "flat", precision: str | None = None) -> list[dict]:
        """The knobs retrieval.indexes reads to describe, build and search an index: one dict per
        (build-time, search-time) knob setting of `index_type`, build-time settings outermost; for pq / opq / rq
        once per --pq_subdim value (outermost of all: it is a build-time knob of the codec, not the index).

        A flat index has no such knobs (it gets the first values, which it ignores). The per-group
        "fit_size" (which caps IVF lists) is added by the caller where it is known.
        """
        values = {name: list(dict.fromkeys(getattr(self, name)))
                  for name in ("pq_subdim", "nlist", "nprobe", "hnsw_m", "ef_search")}
        base = {"sq_ranges": self.sq_ranges, **{name: v[0] for name, v in values.items()}}
        if index_type == "ivf":
            knobs = [dict(base, nlist=b, nprobe=s) for b in values["nlist"] for s in values["nprobe"]]
        elif index_type == "hnsw":
            knobs = [dict(base, hnsw_m=b, ef_search=s) for b in values["hnsw_m"] for s in values["ef_search"]]
        else:
            knobs = [base]
        subdims = values["pq_subdim"] if precision in precisions.PQ_CODES else values["pq_subdim"][:1]
        return [dict(k, pq_subdim=sub) for sub in subdims for k in knobs]
