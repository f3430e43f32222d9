"""Benchmark analyze_results.py end to end on a large sweep (bootstrap intervals included).

Reads:  --results_dir (a finished sweep), or builds a synthetic one shaped like a Flickr8k test sweep:
        1,000 images x 5,000 captions, about 1,000 runs (dims x precisions x candidate settings x flat /
        IVF nprobe / HNSW ef_search values), each a run JSON + rank file as run_experiments.py writes them.
Writes: the synthetic folder (default result/bench/analysis_sweep/, rebuilt with --rebuild) and the analysis
        outputs into it; prints the seconds analyze_results.main took.

Example:
    python bench/bench_analysis.py                       # synthetic sweep, bootstrap 1000, plots on
    python bench/bench_analysis.py --results_dir result  # a real sweep
"""
import argparse
import os
import shutil
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import analyze_results  # noqa: E402
from retrieval import io, metrics, precisions  # noqa: E402

DIMS = (128, 256, 512)
PRECISIONS = ("fp32", "fp16", "bf16", "int8", "int4", "binary", "pq", "opq", "itq")
CANDIDATES = (None, 32, 100, 1000)  # None: no re-ranking (C = max K)
KNOBS = (("flat", None), ("ivf", 1), ("ivf", 4), ("ivf", 16), ("ivf", 64), ("ivf", 128), ("hnsw", 16),
         ("hnsw", 32), ("hnsw", 64), ("hnsw", 256))
NOISE = {"fp32": 0.0, "fp16": 0.01, "bf16": 0.02, "int8": 0.05, "int4": 0.2, "binary": 0.6, "pq": 0.5, "opq": 0.4,
         "itq": 0.5}
K_VALUES = (1, 5, 10)


def base_ranks(rng, text_to_image):
    """Exact ranks with a per-image difficulty shared by its captions (t2i R@1 about 30%, i2t about 40%)."""
    n_images = int(text_to_image.max()) + 1
    difficulty = rng.normal(0, 1.0, n_images)
    t2i = np.floor(np.exp(rng.normal(1.3, 1.4, text_to_image.size) + difficulty[text_to_image]))
    i2t = np.floor(np.exp(rng.normal(0.9, 1.4, n_images) + difficulty))
    return {"t2i": 1.0 + t2i, "i2t": 1.0 + i2t}


def degraded(rng, exact, noise, candidates):
    """Ranks of a compressed configuration: exact ranks pushed down by multiplicative noise; with a candidate
    list a relevant item beyond C (or beyond max K without re-ranking) is a miss."""
    out = {}
    for direction, ranks in exact.items():
        ranks = np.maximum(1.0, np.floor(ranks * np.exp(np.abs(rng.normal(0, noise, ranks.size)))))
        limit = candidates or max(K_VALUES)
        out[direction] = np.where(ranks <= limit, ranks, np.inf)
    return out


def write_run(folder, name, config, ranks, text_to_image, speed, memory):
    run = {"config": config, "metrics": metrics.from_ranks(ranks, K_VALUES), "speed": speed, "memory": memory,
           "data": {"dataset": "flickr8k", "split": "test", "model": "synthetic-d512", "dim": 512},
           "env": {"cpu": "bench", "threads": 2, "hostname": "bench"}, "ranks_file": f"{name}.ranks.npz"}
    json_path = os.path.join(folder, "runs", f"{name}.json")
    io.write_ranks(io.ranks_path(json_path), ranks, text_to_image)   # the sweep's own writers
    io.write_json(json_path, run)


def configurations():
    """(precision, dim, candidate size, index, knob) of the synthetic grid, the fp32 exact baseline first."""
    yield "fp32", 512, None, "flat", None
    for dim in DIMS:
        for precision in PRECISIONS:
            for candidates in CANDIDATES:
                for index, knob in KNOBS:
                    # fp32 flat runs only without re-ranking (re-ranking an exact fp32 list changes nothing)
                    if precision != "fp32" or (index != "flat" or (candidates is None and dim < 512)):
                        yield precision, dim, candidates, index, knob


def build(folder, n_images=1000, captions_per_image=5, seed=0):
    """The synthetic sweep: one run JSON + rank file per configuration; returns the number of runs."""
    shutil.rmtree(folder, ignore_errors=True)
    os.makedirs(os.path.join(folder, "runs"))
    rng = np.random.default_rng(seed)
    text_to_image = np.repeat(np.arange(n_images), captions_per_image)
    exact = base_ranks(rng, text_to_image)
    count = 0
    for precision, dim, candidates, index, knob in configurations():
        is_exact = precision == "fp32" and index == "flat" and dim == 512
        noise = NOISE[precision] + 0.1 * np.log2(512 / dim) + (0.3 / knob if knob else 0.0)
        ranks = exact if is_exact else degraded(rng, exact, noise / (3 if candidates else 1), candidates)
        params = {"ivf": {"nlist": 128, "nprobe": knob}, "hnsw": {"hnsw_m": 32, "ef_search": knob}}.get(index, {})
        config = {"dim": dim, "native_dim": 512, "dim_method": "none" if dim == 512 else "pca",
                  "precision": precision, "candidate_size": None if is_exact else (candidates or max(K_VALUES)),
                  "rerank": bool(candidates), "exact": is_exact, "k_values": list(K_VALUES), "index": index,
                  "index_params": params, "gallery_size": n_images, "directions": ["t2i", "i2t"],
                  "data_path": "coco_data/flickr8k/synthetic_test.h5"}
        index_bytes = float(precisions.code_bytes(precision, dim, {}))  # pq / opq at the default 8 dims a code
        qps = 20000.0 / (index_bytes / 128) / (1 + (candidates or 0) / 300) * (knob and 64 / knob or 1)
        speed = {f"{d}_{key}": value for d in ("t2i", "i2t") for key, value in
                 (("qps", qps), ("latency_p50_ms", 1e3 / qps), ("latency_p99_ms", 3e3 / qps))}
        memory = {"bytes_per_vector": index_bytes,
                  "total_bytes_per_vector": index_bytes + (4 * dim if candidates else 0)}
        write_run(folder, f"run{count:05d}", config, ranks, text_to_image, speed, memory)
        count += 1
    return count


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results_dir", default=None, help="a finished sweep to analyse (default: synthetic)")
    parser.add_argument("--synthetic_dir", default=os.path.join(ROOT, "result", "bench", "analysis_sweep"))
    parser.add_argument("--rebuild", action="store_true", help="rebuild the synthetic sweep even if it exists")
    parser.add_argument("--bootstrap", type=int, default=1000)
    parser.add_argument("--no_plots", action="store_true")
    args = parser.parse_args(argv)
    folder = args.results_dir or args.synthetic_dir
    if args.results_dir is None and (args.rebuild or not os.path.isdir(os.path.join(folder, "runs"))):
        start = time.perf_counter()
        runs = build(folder)
        print(f"built {runs} synthetic runs in {folder} ({time.perf_counter() - start:.1f} s)")
    start = time.perf_counter()
    analyze_results.main(["--results_dir", folder, "--bootstrap", str(args.bootstrap), "--metric", "t2i_R@1"]
                         + (["--no_plots"] if args.no_plots else []))
    seconds = time.perf_counter() - start
    print(f"analyze_results.main: {seconds:.1f} s ({len(os.listdir(os.path.join(folder, 'runs'))) // 2} runs, "
          f"bootstrap {args.bootstrap}, plots {'off' if args.no_plots else 'on'})")
    return seconds


if __name__ == "__main__":
    main()
