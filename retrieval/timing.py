"""How the sweep times a search: pinned thread pools, interleaved rounds of a configuration's stages and the
fp32 reference (time_rounds), single queries paired with the reference's (paired_latency), how many FAISS threads
the free cores allow (other_runnable, timing_threads), the machine's state while timing (conditions), and the
process's memory. The statistics of the timings are retrieval/speed_stats.py's.

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
import dataclasses
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


REFERENCE = "reference"  # the name of the reference's seconds in Rounds (fp32 exact at the native dim)


@dataclasses.dataclass(frozen=True)
class Rounds:
    """What time_rounds measured: per round the queries timed, each stage's seconds and the reference's.
    over: "passes" (every round a whole pass over the queries) or "blocks" (one pass cut into rounds: a gallery
    so large that whole passes would not fit --max_time)."""
    queries: tuple[int, ...]
    stage_seconds: dict[str, tuple[float, ...]]
    reference_seconds: tuple[float, ...]
    over: str

    def qps(self, stage: str) -> np.ndarray:
        return np.asarray(self.queries) / np.maximum(self.stage_seconds[stage], 1e-12)

    def end_to_end_qps(self) -> np.ndarray:
        """Per round: queries / the stages' seconds added (what a query pays going through all of them)."""
        return np.asarray(self.queries) / np.maximum(np.sum(list(self.stage_seconds.values()), axis=0), 1e-12)

    def reference_qps(self) -> np.ndarray:
        return np.asarray(self.queries) / np.maximum(self.reference_seconds, 1e-12)


def time_rounds(stages: dict[str, Callable[[int], Any]], reference: Callable[[int], Any], batch_sizes: Sequence[int],
                rounds: int = 10, min_time: float = 0.3, max_time: float | None = None, warmup: int = 1) -> Rounds:
    """Time the stages of one search (step(i) runs batch i; called in the dict's order, each after the one
    before) and the reference in interleaved rounds: every round times each stage and the reference once over
    the same batches, the reference first in even rounds and last in odd ones, so load that comes and goes hits
    both alike and the per-round ratio (speed_stats.paired_ratio) cancels it.

    At least `rounds` rounds and `min_time` seconds (all of them together), stopping at `max_time`; when whole
    passes would not fit `max_time` (estimated from one batch), one pass is cut into `rounds` blocks instead.
    The first `warmup` batches of each run once untimed first (page faults, thread start-up, lazy tables).
    Every batch runs at least once through every stage, so a step can keep its last result (the lists that
    are evaluated: no second search)."""
    sizes = np.asarray(batch_sizes, dtype=np.int64)
    steps = dict(stages, **{REFERENCE: reference})
    for step in steps.values():
        for i in range(min(warmup, sizes.size)):
            step(i)
    blocks, over = plan_blocks(steps, sizes.size, rounds, max_time)
    seconds, queries, total = {name: [] for name in steps}, [], 0.0
    while True:
        block = blocks[len(queries) % len(blocks)]
        names = list(stages)
        order = [REFERENCE] + names if len(queries) % 2 == 0 else names + [REFERENCE]
        for name in order:
            seconds[name].append(_time_block(steps[name], block))
        total += sum(seconds[name][-1] for name in order)
        queries.append(int(sizes[block].sum()))
        if over == "blocks":
            if len(queries) == len(blocks):
                break
        elif (len(queries) >= rounds and total >= min_time) or (max_time is not None and total >= max_time
                                                                and len(queries) >= 2):
            break
    reference_seconds = tuple(seconds.pop(REFERENCE))
    return Rounds(tuple(queries), {k: tuple(v) for k, v in seconds.items()}, reference_seconds, over)


def _time_block(step: Callable[[int], Any], block: np.ndarray) -> float:
    clock = time.perf_counter
    start = clock()
    for i in block:
        step(i)
    return clock() - start


def plan_blocks(steps: dict[str, Callable[[int], Any]], num_batches: int, rounds: int,
                max_time: float | None) -> tuple[list[np.ndarray], str]:
    """([every batch], "passes") when `rounds` whole passes of all steps fit `max_time` (estimated by timing
    batch 0 of each once), else (one pass cut into min(rounds, batches) blocks, "blocks")."""
    every = np.arange(num_batches)
    if max_time is None or num_batches < 2:
        return [every], "passes"
    estimate = sum(_time_block(step, every[:1]) for step in steps.values()) * num_batches
    if estimate * rounds <= max_time:
        return [every], "passes"
    return np.array_split(every, min(rounds, num_batches)), "blocks"


def paired_latency(step: Callable[[np.ndarray], Any], reference: Callable[[np.ndarray], Any], queries: np.ndarray,
                   reference_queries: np.ndarray, sample: int, seed: int, max_time: float | None = None
                   ) -> tuple[np.ndarray, np.ndarray]:
    """Single-query seconds of `step` and of `reference` over the same seeded sample of queries (row r of
    `queries` and of `reference_queries` are one query, as each side takes it), alternating which goes first,
    so both see the same moments of load; one warm-up call each. Stops early once `max_time` seconds are spent
    (a large gallery), so fewer queries than `sample` may come back. Run it inside pinned_threads."""
    rng = np.random.default_rng(seed)
    rows = rng.choice(queries.shape[0], size=min(sample, queries.shape[0]), replace=False)
    step(np.ascontiguousarray(queries[rows[0]:rows[0] + 1]))
    reference(np.ascontiguousarray(reference_queries[rows[0]:rows[0] + 1]))
    times, clock, spent = np.empty((rows.size, 2)), time.perf_counter, 0.0
    for n, r in enumerate(rows):
        pair = [(0, step, queries), (1, reference, reference_queries)]
        for column, call, source in (pair if n % 2 == 0 else pair[::-1]):
            query = np.ascontiguousarray(source[r:r + 1])
            start = clock()
            call(query)
            times[n, column] = clock() - start
        spent += times[n].sum()
        if max_time is not None and spent >= max_time:
            return times[:n + 1, 0], times[:n + 1, 1]
    return times[:, 0], times[:, 1]


@contextlib.contextmanager
def blas_switch(dim: int) -> Iterator[None]:
    """FAISS's BLAS switch at BLAS_MIN_QUERIES queries of `dim` dims inside the block (the reference searches
    at the native dim between a configuration's steps at its own), restored after."""
    threshold = int(faiss.cvar.distance_compute_blas_threshold)
    faiss.cvar.distance_compute_blas_threshold = blas_threshold(dim)
    try:
        yield
    finally:
        faiss.cvar.distance_compute_blas_threshold = threshold


def other_runnable(samples: int = 20, settle_s: float = 0.02, gap_s: float = 0.002) -> float | None:
    """How many tasks of other processes wait for or hold a CPU right now: the median over `samples` readings of
    the kernel's runnable count (/proc/loadavg's fourth field) less this process's own running threads
    (/proc/self/task/*/stat state R: the reading thread, BLAS threads still spinning after their last job),
    taken after `settle_s` idle. None where the OS has no /proc."""
    time.sleep(settle_s)
    counts = []
    for _ in range(samples):
        try:
            with open("/proc/loadavg") as f:
                runnable = int(f.read().split()[3].split("/")[0])
            counts.append(max(0, runnable - _own_running()))
        except (OSError, ValueError, IndexError):
            return None
        time.sleep(gap_s)
    return float(np.median(counts))


def _own_running() -> int:
    running = 0
    for task in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{task}/stat") as f:
                running += f.read().rsplit(")", 1)[1].split()[0] == "R"
        except (OSError, IndexError):
            continue  # a thread that ended between the listing and the read
    return running


def timing_threads(asked: int, others: float | None, cores: int | None) -> int:
    """FAISS threads to time with: `asked`, or as many as there are free cores (at least 1) when other tasks
    hold the rest. Why: a multi-threaded FAISS batch search whose threads wait for a core at every barrier
    collapses, and unevenly (measured on 2 cores with about two other tasks running, 2 threads: binary flat 0.29x
    and int8 2.25x the speed of fp32 exact; 1 thread: 3.83x and 0.72x, the directions an idle machine gives),
    so speeds taken with more threads than free cores rank configurations wrongly; one thread per free core
    keeps them in order. Unknown load (None) keeps `asked`."""
    if others is None or not cores:
        return asked
    return max(1, min(asked, int(cores - others + 0.5)))


@dataclasses.dataclass(frozen=True)
class MachineState:
    """A moment's clocks: wall and process CPU seconds, the 1-minute load average, and the kernel's total
    microseconds in which some task waited for a CPU (/proc/pressure/cpu; None where the OS has no PSI)."""
    wall: float
    cpu: float
    load: float | None
    pressure_us: int | None


def machine_state() -> MachineState:
    times = os.times()
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    return MachineState(time.perf_counter(), times.user + times.system, load, _cpu_pressure_us())


def _cpu_pressure_us() -> int | None:
    try:
        with open("/proc/pressure/cpu") as f:
            some = f.readline().split()
        return int(dict(part.split("=") for part in some[1:])["total"])
    except (OSError, ValueError, KeyError, IndexError):
        return None


def conditions(before: MachineState, after: MachineState) -> dict[str, float | int | None]:
    """The machine's state while a run was timed: load average before and after, the share of that time in
    which some task waited for a CPU (cpu_pressure_pct; None without PSI), the cores the process used on
    average (process CPU seconds per wall second) and the cores it may use."""
    wall = max(after.wall - before.wall, 1e-9)
    pressure = None if before.pressure_us is None or after.pressure_us is None else \
        100.0 * (after.pressure_us - before.pressure_us) / (wall * 1e6)
    return {"load_before": before.load, "load_after": after.load,
            "cpu_pressure_pct": None if pressure is None else min(100.0, max(0.0, pressure)),
            "process_cores_used": (after.cpu - before.cpu) / wall, "cores": cpu_threads_available(),
            "timed_s": wall}


def peak_rss_bytes() -> int:
    """Peak resident set size of this process so far (ru_maxrss is KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)


def cpu_threads_available() -> int | None:
    """The CPUs this process may run on (its affinity mask where the OS has one)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
