"""How the sweep times a search: pinned thread pools, whole passes over the queries, the spread across
passes, single-query latency, and the process's memory.

Why pin threads: a timed stage alternates FAISS (OpenMP threads) with numpy work (binarising a query
batch, re-ranking: OpenBLAS threads). On a small machine the two pools fight for the same cores and
throughput collapses (measured on 2 cores: binarise + search of the Flickr8k test captions at
800-1,800 queries/s with default threads, 22k-63k with FAISS at 1 thread and one BLAS thread). So
while timing, BLAS runs on one thread (the harness's numpy work is per-batch and small) and FAISS on
`--threads`; both counts are recorded next to the numbers. FAISS's own BLAS (the library its wheel
bundles, an OpenMP build that shares FAISS's thread pool) keeps `--threads`: a flat float search of a
batch is one matrix product, and one BLAS thread halves it (100k x 256, batch 128, 2 cores: 915 vs
1,485 queries/s).

Why set FAISS's BLAS switch: a flat float search (IndexFlat, the IVF coarse assignment) computes
scores with BLAS or with FAISS's own per-query kernel. Through FAISS 1.13 the switch was "20 queries
or more: BLAS"; later releases (faiss PR 5022) switched at queries x dim >= 128,000, tuned on machines
with many threads, so a batch of 128 queries at 256-d takes the per-query path. On 2 cores that path
is 3-13x slower for batches (1,000 to 100,000 items x 256-d: 30,848 vs 87,725 and 72 vs 948 queries/s;
faiss issue 5109 reports the same at low thread counts), which made fp32 flat search look slower than
SQ8 at 100k items. While timing, batches of BLAS_MIN_QUERIES queries or more go to BLAS at every dim
and single queries keep the per-query kernel (faster for one query: 17.8 vs 38.8 ms at 100k items).
"""
from __future__ import annotations

import contextlib
import os
import resource
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import faiss
import numpy as np
from threadpoolctl import threadpool_info, threadpool_limits

BLAS_THREADS = 1   # numpy/BLAS threads while timing (see the module docstring)
BLAS_MIN_QUERIES = 20   # a flat float search of this many queries or more uses BLAS while timing
# The switch as FAISS sets it, read before anything changes it: 20 means "queries", larger values
# "queries x dim" (FAISS after PR 5022, default 128,000).
FAISS_DEFAULT_BLAS_THRESHOLD = int(faiss.cvar.distance_compute_blas_threshold)


def set_threads(threads: int | None) -> int:
    """Set FAISS's OpenMP threads (0 = leave the default); returns the count in force."""
    if threads:
        faiss.omp_set_num_threads(int(threads))
    return int(faiss.omp_get_max_threads())


def blas_threshold(dim: int) -> int:
    """The value of faiss.cvar.distance_compute_blas_threshold that sends BLAS_MIN_QUERIES queries or
    more of `dim` dims to BLAS and fewer to the per-query kernel, in the unit this FAISS counts."""
    return BLAS_MIN_QUERIES if FAISS_DEFAULT_BLAS_THRESHOLD <= BLAS_MIN_QUERIES else BLAS_MIN_QUERIES * int(dim)


def faiss_owned(library: dict[str, Any]) -> bool:
    """Whether a threadpoolctl library record is one FAISS's wheel bundles (its path names faiss)."""
    return "faiss" in (library.get("filepath") or "").lower()


@contextlib.contextmanager
def pinned_threads(faiss_threads: int | None, dim: int | None = None) -> Iterator[None]:
    """Inside the block: FAISS (its OpenMP pool and its own BLAS) on `faiss_threads` (0 = unchanged), every
    other BLAS (numpy's) on BLAS_THREADS, and, when `dim` is given, FAISS's BLAS switch at BLAS_MIN_QUERIES
    queries of that dim. All restored after."""
    previous, threshold = set_threads(0), int(faiss.cvar.distance_compute_blas_threshold)
    threads = faiss_threads or previous
    limits = {lib["filepath"]: threads if faiss_owned(lib) else BLAS_THREADS
              for lib in threadpool_info() if lib.get("user_api") == "blas"}
    if dim:
        faiss.cvar.distance_compute_blas_threshold = blas_threshold(dim)
    try:
        with threadpool_limits(limits=limits):
            # After the BLAS limits: an OpenMP build of BLAS sets the OpenMP thread count with its own.
            set_threads(threads)
            yield
    finally:
        set_threads(previous)
        faiss.cvar.distance_compute_blas_threshold = threshold


def blas_libraries() -> list[dict[str, Any]]:
    """The BLAS libraries loaded (numpy's, FAISS's own) and their thread counts right now (for the environment
    record)."""
    return [{"library": info.get("internal_api"), "version": info.get("version"), "threads": info.get("num_threads"),
             "file": os.path.basename(info.get("filepath") or ""), "faiss_owned": faiss_owned(info)}
            for info in threadpool_info() if info.get("user_api") == "blas"]


def batches(queries: np.ndarray, batch_size: int) -> list[np.ndarray]:
    """Contiguous query batches, cut once so the timed loop does nothing but its own work."""
    return [np.ascontiguousarray(queries[s:s + batch_size]) for s in range(0, queries.shape[0], batch_size)]


def time_batches(step: Callable[[int], Any], batch_sizes: Sequence[int], min_time: float = 0.1, warmup: int = 1,
                 min_passes: int = 1, max_time: float | None = None) -> dict[str, Any]:
    """Call step(i) for every batch i (batch_sizes: the queries of each), in whole passes, until at least
    `min_passes` passes and `min_time` seconds, or, once `max_time` seconds are spent, after the pass that
    crossed it.

    The first `warmup` batches run once untimed (page faults, thread pool start-up, lazy tables).
    Whole passes only, so every query counts the same number of times; step can keep its last
    result, so the timed pass also yields the lists that are evaluated (no second search). Returns
    the overall queries/s and the spread of the passes' queries/s (a shared machine's noise shows
    there: the spread says how far one number can be trusted). When `max_time` stopped the timing after
    one pass (a large gallery), the spread is that of `min_passes` contiguous blocks of its batches.
    """
    sizes = np.asarray(batch_sizes, dtype=np.float64)
    num_batches, num_queries = sizes.size, int(sizes.sum())
    for i in range(min(warmup, num_batches)):
        step(i)
    clock, passes, total = time.perf_counter, [], 0.0
    while len(passes) < max(1, min_passes) or total < min_time:
        if max_time is not None and passes and total >= max_time:
            break
        seconds = np.empty(num_batches)
        for i in range(num_batches):
            start = clock()
            step(i)
            seconds[i] = clock() - start
        passes.append(seconds)
        total += float(seconds.sum())
    if len(passes) > 1 or num_batches < 2:
        spread_over, rates = "passes", np.array([num_queries / max(p.sum(), 1e-12) for p in passes])
    else:
        spread_over, blocks = "blocks", np.array_split(np.arange(num_batches), min(max(2, min_passes), num_batches))
        rates = np.array([sizes[b].sum() / max(passes[0][b].sum(), 1e-12) for b in blocks])
    return {"qps": len(passes) * num_queries / max(total, 1e-12), "seconds": total,
            "passes": len(passes), "queries_per_pass": num_queries, "spread_over": spread_over,
            "qps_min": float(rates.min()), "qps_max": float(rates.max()),
            "spread_pct": float(100.0 * (rates.max() - rates.min()) / np.median(rates))}


def latency_ms(step: Callable[[np.ndarray], Any], queries: np.ndarray, sample: int = 100, seed: int = 0,
               threads: int = 1, dim: int | None = None) -> dict[str, float | int]:
    """Single-query latency percentiles (ms) over a seeded sample of queries (one warm-up call).

    Runs with `threads` FAISS threads (0 = unchanged), then restores the previous count. One thread
    by default: a single query cannot use more, and OpenMP start-up/barriers on a busy machine
    otherwise dominate (measured here: 0.06 ms with 1 thread vs 11 ms with 2 for one SQ8 query).
    """
    with pinned_threads(threads, dim):
        return _latency(step, queries, sample, seed)


def _latency(step: Callable[[np.ndarray], Any], queries: np.ndarray, sample: int, seed: int
             ) -> dict[str, float | int]:
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


def peak_rss_bytes() -> int:
    """Peak resident set size of this process so far (ru_maxrss is KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)


def cpu_threads_available() -> int | None:
    """The CPUs this process may run on (its affinity mask where the OS has one)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
