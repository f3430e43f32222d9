"""How the sweep times a search: pinned thread pools, whole passes over the queries, the spread across
passes, single-query latency, and the process's memory.

Why pin threads: a timed stage alternates FAISS (OpenMP threads) with numpy work (binarising a query
batch, re-ranking: OpenBLAS threads). On a small machine the two pools fight for the same cores and
throughput collapses (measured on 2 cores: binarise + search of the Flickr8k test captions at
800-1,800 queries/s with default threads, 22k-63k with FAISS at 1 thread and one BLAS thread). So
while timing, BLAS runs on one thread (the harness's numpy work is per-batch and small) and FAISS on
`--threads`; both counts are recorded next to the numbers.
"""
import contextlib
import os
import resource
import sys
import time

import faiss
import numpy as np
from threadpoolctl import threadpool_info, threadpool_limits

BLAS_THREADS = 1   # numpy/BLAS threads while timing (see the module docstring)


def set_threads(threads):
    """Set FAISS's OpenMP threads (0 = leave the default); returns the count in force."""
    if threads:
        faiss.omp_set_num_threads(int(threads))
    return int(faiss.omp_get_max_threads())


@contextlib.contextmanager
def pinned_threads(faiss_threads):
    """FAISS on `faiss_threads` (0 = unchanged) and BLAS on BLAS_THREADS inside the block; restored after."""
    previous = set_threads(0)
    set_threads(faiss_threads)
    try:
        with threadpool_limits(limits=BLAS_THREADS, user_api="blas"):
            yield
    finally:
        set_threads(previous)


def blas_libraries():
    """The BLAS libraries numpy uses and their thread counts right now (for the environment record)."""
    return [{"library": info.get("internal_api"), "version": info.get("version"),
             "threads": info.get("num_threads")} for info in threadpool_info() if info.get("user_api") == "blas"]


def batches(queries, batch_size):
    """Contiguous query batches, cut once so the timed loop does nothing but its own work."""
    return [np.ascontiguousarray(queries[s:s + batch_size]) for s in range(0, queries.shape[0], batch_size)]


def time_batches(step, num_batches, num_queries, min_time=0.1, warmup=1, min_passes=1):
    """Call step(i) for every batch i = 0..num_batches-1, in whole passes, until at least `min_passes`
    passes and `min_time` seconds.

    The first `warmup` batches run once untimed (page faults, thread pool start-up, lazy tables).
    Whole passes only, so every query counts the same number of times; step can keep its last
    result, so the timed pass also yields the lists that are evaluated (no second search). Returns
    the overall queries/s and the spread of the passes' queries/s (a shared machine's noise shows
    there: the spread says how far one number can be trusted).
    """
    for i in range(min(warmup, num_batches)):
        step(i)
    clock, seconds = time.perf_counter, []
    while len(seconds) < max(1, min_passes) or sum(seconds) < min_time:
        start = clock()
        for i in range(num_batches):
            step(i)
        seconds.append(clock() - start)
    per_pass = num_queries / np.maximum(np.asarray(seconds), 1e-12)
    return {"qps": len(seconds) * num_queries / max(sum(seconds), 1e-12), "seconds": sum(seconds),
            "passes": len(seconds), "queries_per_pass": num_queries,
            "qps_min": float(per_pass.min()), "qps_max": float(per_pass.max()),
            "spread_pct": float(100.0 * (per_pass.max() - per_pass.min()) / np.median(per_pass))}


def latency_ms(step, queries, sample=100, seed=0, threads=1):
    """Single-query latency percentiles (ms) over a seeded sample of queries (one warm-up call).

    Runs with `threads` FAISS threads (0 = unchanged), then restores the previous count. One thread
    by default: a single query cannot use more, and OpenMP start-up/barriers on a busy machine
    otherwise dominate (measured here: 0.06 ms with 1 thread vs 11 ms with 2 for one SQ8 query).
    """
    with pinned_threads(threads):
        return _latency(step, queries, sample, seed)


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


def peak_rss_bytes():
    """Peak resident set size of this process so far (ru_maxrss is KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)


def cpu_threads_available():
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
