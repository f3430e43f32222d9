"""The sweep engine behind run_experiments.py: timing and scoring one configuration of a group.Group
(every stage of its search timed on its own, quality and its retention against the fp32 baseline, memory),
and resuming (which run files count as done).

The grid is retrieval/grid.py, the files read retrieval/inputs.py, the vectors and indexes a group of
configurations shares retrieval/group.py, the run record retrieval/runs.py. Everything a number depends on
besides the input files is in one frozen sweep_settings.SweepSettings, passed explicitly; nothing here reads
argparse or exits the process: faults the user can fix raise retrieval.errors.UserError("<file>: <fault>").
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import os

import numpy as np

from retrieval import indexes, io, metrics, speed_stats, timing, two_stage
from retrieval.errors import UserError
from retrieval.grid import GridEntry, group_key
from retrieval.group import Baseline, Group, IndexEntry
from retrieval.inputs import FitSet, Inputs
from retrieval.io import HandoffError, ranks_path, read_json
from retrieval.runs import Evaluation
from retrieval.sweep_settings import SweepSettings


@dataclasses.dataclass(frozen=True)
class SearchLists:
    """One direction's searched lists of a configuration: stage 1's candidates (ids), the final lists (ids, after
    re-ranking or sorting), and how many items a query asked for (k searched)."""
    stage1: np.ndarray
    final: np.ndarray
    k_search: int


class Groups:
    """The group of the configuration being run, built when the grid moves on to another (the grid keeps a
    group's configurations together, so each group's vectors and indexes are built once)."""

    def __init__(self, settings: SweepSettings, inputs: Inputs, pool: concurrent.futures.Executor, device) -> None:
        self.settings, self.inputs, self.pool, self.device = settings, inputs, pool, device
        self.key, self.group = None, None

    def of(self, entry: GridEntry) -> Group:
        key = group_key(entry)
        if key != self.key:
            self.key, self.group = key, None  # free the previous group's indexes first
            i = entry.file_index
            self.group = Group(self.settings, self.inputs.files[i][1], self.inputs.fits[i], entry.config,
                               self.inputs.distractors[i], self.pool, self.device)
        return self.group


# ----------------------------------------------------------------------------- one configuration

def timed_search(settings: SweepSettings, group: Group, direction: str, entry: IndexEntry, k_search: int,
                 rerank: bool, threads: int) -> tuple[dict, np.ndarray, np.ndarray]:
    """Time the stages of one direction's search in rounds paired with the reference, then single queries.

    Stages: `transform` (the query's side of the codec: PCA / random projection to the dim and, for
    binary codes, rotation + sign bits; timed from the native query, absent when there is nothing to
    do), `search` (the FAISS index alone, on the codes indexes.build encoded), and `rerank` (fp32
    re-scoring of the C candidates) or `sort` (ordering the list by the compressed scores). Every round
    times each stage and the group's Reference (fp32 exact at the native dim) over the same queries
    (timing.time_rounds); end-to-end queries/s adds a round's stage times per query. Latency times single
    queries through all stages, each next to the reference's (timing.paired_latency). Returns (speed,
    stage-1 lists, final lists).
    """
    data, searcher, codes = group.directions[direction], entry.built.searcher, entry.built.codes
    reference, query_batches, native_batches = group.references[direction], data.query_batches, data.native_batches
    stage1, final = [None] * len(codes), [None] * len(codes)
    transform = group.query_transform(searcher.encode)

    def search_step(i):
        stage1[i] = searcher.search(codes[i], k_search)

    def second_step(i):
        final[i] = two_stage.rerank(query_batches[i], data.gallery, stage1[i][1]) if rerank \
            else two_stage.sort_candidates(*stage1[i])

    stages = {} if transform is None else {"transform": lambda i: transform(native_batches[i])}
    stages.update({"search": search_step, "rerank" if rerank else "sort": second_step})
    dim = data.queries.shape[1]
    with timing.pinned_threads(threads, dim):
        rounds = timing.time_rounds(stages, reference.batch, [len(b) for b in query_batches], settings.rounds,
                                    settings.min_time, settings.max_time, settings.warmup)

    def single(native):
        """One native query through every stage (what a deployed system does per request)."""
        query = group.reduce(native)
        scores, ids = searcher(query, k_search)
        return two_stage.rerank(query, data.gallery, ids) if rerank else two_stage.sort_candidates(scores, ids)

    with timing.pinned_threads(settings.latency_threads, dim):
        seconds, reference_seconds = timing.paired_latency(
            single, reference.single, data.native_queries, data.native_queries, settings.latency_queries,
            settings.seed, settings.max_time)
    speed = dict(round_speed(rounds), **latency_speed(seconds, reference_seconds, settings.latency_queries))
    speed.update(k_searched=k_search)
    return speed, np.concatenate([ids for _, ids in stage1]), np.concatenate(final)


def estimate_fields(name: str, estimate: speed_stats.Estimate | None) -> dict:
    """{name: value, name_ci_low: ..., name_ci_high: ...} (all None when there is no estimate)."""
    value, low, high = (None, None, None) if estimate is None else (estimate.value, estimate.low, estimate.high)
    return {name: value, f"{name}_ci_low": low, f"{name}_ci_high": high}


def round_speed(rounds: timing.Rounds) -> dict:
    """One direction's batch speeds from its rounds: per stage the median queries/s and the rounds' spread;
    end to end and for the reference the median with its 95% interval; the speed-up over the reference
    (the median of per-round ratios, paired) with its interval; and the rounds' raw queries/s."""
    speed = {}
    for name in rounds.stage_seconds:
        qps = rounds.qps(name)
        speed[f"{name}_qps"] = float(np.median(qps))
        speed[f"{name}_qps_spread_pct"] = float(100.0 * (qps.max() - qps.min()) / np.median(qps))
    speed["transform_qps"] = speed.get("transform_qps")
    end_to_end, reference = rounds.end_to_end_qps(), rounds.reference_qps()
    speed.update(estimate_fields("qps", speed_stats.median(end_to_end)))
    speed.update(estimate_fields("reference_qps", speed_stats.median(reference)))
    speed.update(estimate_fields("speedup", speed_stats.paired_ratio(end_to_end, reference)))
    speed.update(rounds=len(rounds.queries), rounds_over=rounds.over,
                 rounds_interval_coverage=speed_stats.coverage(len(rounds.queries)),
                 timed_queries=int(sum(rounds.queries) if rounds.over == "blocks" else rounds.queries[0]), round_qps=[float(v) for v in end_to_end],
                 reference_round_qps=[float(v) for v in reference])
    return speed


def latency_speed(seconds: np.ndarray, reference_seconds: np.ndarray, asked: int) -> dict:
    """Single-query latency percentiles (ms) with their 95% intervals, None where the sample cannot estimate
    one (speed_stats.estimable; a note says so), the reference's p50, and the latency speed-up: the median over
    queries of reference time / this configuration's time, each pair timed back to back."""
    ms, reference_ms = 1000.0 * seconds, 1000.0 * reference_seconds
    speed, missing = {}, []
    for q in (50, 95, 99):
        estimate = speed_stats.quantile(ms, q / 100.0)
        speed.update(estimate_fields(f"latency_p{q}_ms", estimate))
        if estimate is None:
            missing.append(f"p{q} (needs {speed_stats.min_samples(q / 100.0)})")
    reference_p50 = speed_stats.quantile(reference_ms, 0.5)
    speed["reference_latency_p50_ms"] = None if reference_p50 is None else reference_p50.value
    speed.update(estimate_fields("latency_speedup", speed_stats.paired_ratio(reference_ms, ms)))
    speed["latency_queries"] = int(ms.size)
    cut = f" (--max_time stopped the sample at {ms.size} of {asked})" if ms.size < asked else ""
    speed["latency_note"] = (f"not estimable from {ms.size} queries{cut}: " + ", ".join(missing)) if missing else None
    return speed


def evaluate_config(settings: SweepSettings, group: Group, config: dict) -> Evaluation:
    """What one configuration of `group` measures: its metrics, speed and memory, and the ranks the metrics
    were computed from."""
    baseline = group.baseline()  # first: the metric threads below only read it
    built = group.built(config["precision"], config["index"], config["index_params"])
    speed, memory, lists = time_directions(settings, group, config, built)

    def one_direction(direction):
        return direction_metrics(group, config, baseline, built[direction], lists[direction], direction)

    # Untimed, so the directions may run in parallel.
    result_metrics, ranks = {}, {}
    parts = group.pool.map(one_direction, list(group.directions))
    for direction, (part, direction_ranks) in zip(group.directions, parts):
        result_metrics.update(part)
        ranks[direction] = direction_ranks
    result_metrics["RSUM"] = metrics.rsum(result_metrics, config["k_values"], list(group.directions))
    memory.update(memory_summary(config, built))
    baseline_run = config["precision"] == "fp32" and config["index"] == "flat" and config["candidate_size"] is None
    ood = group.ood_gap() if baseline_run else None  # once per group: on its fp32 exact run only
    if ood is not None:
        result_metrics["ood"] = ood
    speed.update({"batch_size": settings.batch_size,
                  "min_time_s": settings.min_time, "rounds_asked": settings.rounds, "max_time_s": settings.max_time,
                  "speed_interval_level": speed_stats.LEVEL,
                  "reference": f"fp32 exact flat at the native dim ({config['native_dim']}-d)",
                  "faiss_blas_threshold": timing.blas_threshold(config["dim"]),
                  "faiss_default_blas_threshold": timing.FAISS_DEFAULT_BLAS_THRESHOLD,
                  "blas_threads": timing.BLAS_THREADS, "warmup_batches": settings.warmup,
                  "latency_threads": settings.latency_threads or timing.set_threads(0),
                  "device": str(group.device)})
    return Evaluation(result_metrics, speed, memory, ranks)


def time_directions(settings: SweepSettings, group: Group, config: dict,
                    built: dict[str, IndexEntry]) -> tuple[dict, dict, dict[str, SearchLists]]:
    """Time each direction's search, one at a time with nothing else running (so timings stay clean).

    Returns per-direction speed and index bytes, and per direction its SearchLists.
    """
    max_k, exact_full = max(config["k_values"]), config["candidate_size"] is None
    speed, memory, lists = {}, {}, {}
    asked, others = settings.threads or timing.set_threads(0), timing.other_runnable()
    threads = timing.timing_threads(asked, others, timing.cpu_threads_available())
    before = timing.machine_state()
    for direction, data in group.directions.items():
        entry = built[direction]
        k_search = min(max_k if exact_full else config["candidate_size"], data.gallery.shape[0])
        # Search-time knobs (nprobe, efSearch) are the configuration's, set on the object searched (a GPU copy
        # on a GPU); one built index serves every value.
        indexes.set_search_params(entry.built.searcher.index, config["index"], config["index_params"], k_search)
        dir_speed, stage1, final = timed_search(settings, group, direction, entry, k_search, config["rerank"], threads)
        dir_speed.update({k: entry.built.timing[k] for k in ("train_s", "add_s", "build_s")})
        # IVF only (None otherwise): its coarse k-means' seconds, and whether it ran for an earlier index.
        dir_speed.update({k: entry.built.timing.get(k) for k in ("coarse_train_s", "coarse_shared")})
        speed.update({f"{direction}_{k}": v for k, v in dir_speed.items()})
        memory[f"{direction}_index_bytes"] = entry.built.bytes
        lists[direction] = SearchLists(stage1, final, k_search)
    speed["conditions"] = dict(timing.conditions(before, timing.machine_state()), other_runnable_before=others,
                               threads_asked=asked, threads_timed=threads)
    speed["threads"] = threads
    return speed, memory, lists


def direction_metrics(group: Group, config: dict, baseline: Baseline, entry: IndexEntry, lists: SearchLists,
                      direction: str) -> tuple[dict, np.ndarray]:
    """Quality of one direction's final lists, and their retention/overlap against the fp32 baseline;
    returns (metrics, the ranks R@K and MRR were computed from)."""
    k_values = config["k_values"]
    stage1, final, k_search = lists.stage1, lists.final, lists.k_search
    out = {}
    if config["candidate_size"] is None:
        listed = entry.full_ranks  # fp32 flat: the exact protocol ranking
        final = baseline.top[direction]  # its top K with protocol tie order (FAISS's may differ)
        summary = metrics.summarize(listed, k_values)
        out["stage1_recall"] = None
    else:
        listed = group.query_sample.candidate_ranks(final, direction)
        summary = metrics.summarize(listed, k_values)
        # The full ranking this system implies: its list, then the rest by compressed score.
        implied = np.where(np.isfinite(listed), listed, np.maximum(entry.full_ranks, k_search + 1))
        implied_summary = metrics.summarize(implied, k_values)
        summary["mean_rank"], summary["median_rank"] = implied_summary["mean_rank"], implied_summary["median_rank"]
        stage1_ranks = group.query_sample.candidate_ranks(stage1, direction)
        out["stage1_recall"] = float(100.0 * np.mean(np.isfinite(stage1_ranks)))
    out.update(summary)
    for key in [f"R@{k}" for k in k_values] + ["MRR"]:
        reference = baseline.metrics[f"{direction}_{key}"]
        out[f"retention_{key}"] = 100.0 * summary[key] / reference if reference else None
    for k in k_values:
        out[f"overlap@{k}"] = two_stage.overlap_at_k(final, baseline.top[direction], k)
    return {f"{direction}_{k}": v for k, v in out.items()}, listed


def memory_summary(config: dict, built: dict[str, IndexEntry]) -> dict:
    """Code size per vector and compression against fp32 (the directions share precision and dim)."""
    first = next(iter(built.values())).built
    # A re-ranked configuration also keeps the fp32 vectors at its dim for stage 2 (in RAM or on disk).
    rerank_bytes = 4 * config["dim"] if config["rerank"] else 0
    return {"bytes_per_vector": first.bytes_per_vector,
            "total_bytes_per_vector": first.bytes_per_vector + rerank_bytes,
            "fp32_native_bytes_per_vector": 4 * config["native_dim"],
            "compression_ratio": 4 * config["native_dim"] / first.bytes_per_vector,
            "compression_ratio_same_dim": 4 * config["dim"] / first.bytes_per_vector,
            "peak_rss_bytes": timing.peak_rss_bytes()}


# ----------------------------------------------------------------------------- resuming

def remove_stale_temp_files(runs_dir: str, older_than_s: float = 60) -> None:
    """Temp files a killed run left behind (atomic writes rename within milliseconds, so old = dead)."""
    io.remove_stale_temps(runs_dir, [".*.tmp.json", ".*.tmp.npz"], older_than_s)


def check_same_inputs(path: str, record: dict, fit: FitSet, inputs: dict) -> None:
    """A run file found where this sweep would write counts as done only when it was computed from the same
    inputs: a configuration's name hashes the data file's path, not its content, and names neither the fit set
    nor the distractor files' content, so a changed file (or another --fit_path) into the same folder would
    otherwise count the other inputs' runs as done. inputs: inputs.inputs_record's for this sweep. Raises
    UserError. Files before schema 2 carry no fingerprints: only their fit path is compared."""
    done = record.get("fit") or {}
    if done.get("path") and os.path.normpath(done["path"]) != os.path.normpath(fit.path):
        raise UserError(f"{path}: fitted on {done['path']}, this sweep fits on {fit.path}; "
                        "use another --output_dir, or --overwrite to redo it")
    recorded = record.get("inputs")
    if not isinstance(recorded, dict):
        return
    roles = [("data file", "data"), ("fit file", "fit")]
    pairs = [(role, recorded.get(key) or {}, inputs[key]) for role, key in roles]
    then = recorded.get("distractors") or []
    pairs += [("distractor file", then[i] if i < len(then) else {}, now) for i, now in enumerate(inputs["distractors"])]
    for role, old, new in pairs:
        if (old.get("path"), old.get("sha256")) != (new["path"], new["sha256"]):
            raise UserError(f"{path}: {changed(role, old, new)}; pass --overwrite to recompute or use another "
                            "--output_dir")


def changed(role: str, old: dict, new: dict) -> str:
    """'was computed from data file P.h5 sha256 1a2b3c4d5e6f..., now 9f8e...' (the path too when it differs)."""
    now = f"{new['sha256'][:12]}..."
    if old.get("path") != new["path"]:
        now = f"{new['path']} sha256 {now}"
    return f"was computed from {role} {old.get('path')} sha256 {str(old.get('sha256'))[:12]}..., now {now}"


def existing_result(path: str) -> dict | None:
    """The run file's record, or None when it is missing, unreadable, or names a rank file that is gone
    (then it is recomputed). Runs from before rank files existed count as done."""
    if not os.path.exists(path):
        return None
    try:
        record = read_json(path)
    except (HandoffError, OSError):
        return None  # unreadable: recompute (atomic writes make this unlikely)
    if record.get("ranks_file") and not os.path.exists(ranks_path(path)):
        return None
    return record
