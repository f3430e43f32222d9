"""Benchmark the sweep as the gallery grows: recall and speed of every codec and index at 10k / 100k / 1M items.

The evaluated file gives the queries and the real gallery items; `--gallery_sizes` pads the gallery with
distractors (default: Gaussian, synthetic). The sweep itself (run_experiments.py) does the work, so the
numbers are the ones a user's sweep would give; this script adds the machine's read bandwidth (what a flat
fp32 search of one query must at least take: the gallery read once), a paired check of that latency against a
read of the same bytes (paired_latency), the summary table, the crossover
points where a compressed index overtakes fp32 in speed, and the plot.

Reads:  --data_path (hand-off file: queries + real items), --fit_path (fits quantizers / PCA; default the
        evaluated file itself), --distractors as run_experiments.py takes them.
Writes: <output_dir>/inputs/*-pca<dim>_<split>.h5 (the two files projected to --dim by PCA fitted on the fit
        file, so the sweep's grid is that one dim: it always adds a file's native dim, which at 1M items would
        double the work), <output_dir>/runs/*.json (the sweep's run files: skip-if-exists, so a stopped bench resumes),
        <output_dir>/bench_scale[-<tag>].json (table, crossovers, projections, bandwidth, wall time, peak RSS,
        load, environment),
        <output_dir>/scale_recall_qps_<direction>.png.

Example (docs/benchmarks.md's budgeted part: text->image, flat + IVF, up to 1M items, 1,000 query images):
    E=../shared/embeddings/flickr8k-efflite2-minilm-d512
    /usr/bin/time -v python bench/bench_scale.py --data_path $E/dual-flickr8k-efflite2-minilm-d512_test.h5 \
        --fit_path $E/dual-flickr8k-efflite2-minilm-d512_dev.h5 --directions t2i --index flat ivf
"""
import argparse
import glob
import os
import sys
import time

import faiss
import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import run_experiments  # noqa: E402  (the sweep under test)
from retrieval import precisions, reduction, timing  # noqa: E402
from retrieval.env import environment  # noqa: E402
from retrieval.io import atomic_path, read_json, write_json  # noqa: E402
from retrieval.handoff import Embeddings, read_embeddings, write_embeddings  # noqa: E402

DEFAULT_PRECISIONS = ["fp32", "fp16", "int8", "int4", "binary", "pq", "opq", "itq"]


def read_timings(num_bytes, repeats=7):
    """Seconds of one thread reading an array of at least 1 GB once, `repeats` times: the largest byte of it,
    which numpy computes with SIMD compares that never wait on arithmetic, the fastest one-thread read found
    here (float32 max is 10-20 % slower, a float32 matrix-vector product through numpy's BLAS half as fast).
    At least 1 GB, so the array is far larger than any cache; the latency it is compared with is one thread's.
    Returns (bytes read, the timings)."""
    array = np.ones(max(num_bytes, 1 << 30), dtype=np.uint8)
    seconds = []
    with timing.pinned_threads(1):
        for _ in range(repeats):
            start = time.perf_counter()
            array.max()
            seconds.append(time.perf_counter() - start)
    return array.nbytes, seconds


def paired_latency(size, dim, k=10, pairs=15, seed=0):
    """fp32 flat single-query latency and the time to read the same gallery once, measured in turns (read,
    query, read, query, ...) on one thread, as the sweep times a single query. In turns because this VM's
    memory bandwidth drifts by tens of percent within hours (medians of 10.2 to 22.4 GB/s on one day here), so a
    latency and a bandwidth measured minutes apart differ by the drift alone; measured in turns both see the
    same machine. The read is of the index's own storage (the bytes a query streams), as bytes: the fastest
    one-thread read (read_timings). The gallery is Gaussian: a flat search's time does not depend on values.
    Returns medians, the ratio of the medians and the spread of the per-pair ratios."""
    rng, index = np.random.default_rng(seed), faiss.IndexFlatIP(dim)
    for start in range(0, size, 100_000):   # in blocks: no second gallery-sized temporary
        index.add(rng.standard_normal((min(100_000, size - start), dim), dtype=np.float32))
    stored = faiss.rev_swig_ptr(index.get_xb(), size * dim).view(np.uint8)
    query = rng.standard_normal((1, dim), dtype=np.float32)
    reads, searches = np.empty(pairs), np.empty(pairs)
    with timing.pinned_threads(1, dim):
        stored.max()   # warm-up: page faults, thread pool
        index.search(query, k)
        for i in range(pairs):
            start = time.perf_counter()
            stored.max()
            reads[i] = time.perf_counter() - start
            start = time.perf_counter()
            index.search(query, k)
            searches[i] = time.perf_counter() - start
    ratios = searches / reads
    return {"gallery_size": size, "dim": dim, "k": k, "pairs": pairs, "bytes": stored.nbytes,
            "search_p50_ms": float(np.median(searches)) * 1e3, "read_p50_ms": float(np.median(reads)) * 1e3,
            "read_gbs": stored.nbytes / float(np.median(reads)) / 1e9,
            "search_gbs": stored.nbytes / float(np.median(searches)) / 1e9,
            "ratio": float(np.median(searches) / np.median(reads)),
            "pair_ratio_min": float(ratios.min()), "pair_ratio_median": float(np.median(ratios)),
            "pair_ratio_max": float(ratios.max())}


def bandwidth_record(before, after):
    """The read bandwidth measured before and after the sweep (read_timings): GB/s at the median of all the
    reads, which the fp32 latency (a median too) is compared with, and at the fastest read. The VM's rate
    drifts: the fastest of three reads gave 10.2 to 15.9 GB/s in runs an hour apart, medians 10-11."""
    size, seconds = before[0], before[1] + after[1]
    return {"median_gbs": size / float(np.median(seconds)) / 1e9, "best_gbs": size / min(seconds) / 1e9,
            "reads": len(seconds), "bytes": size}


def projected_inputs(data_path, fit_path, dim, folder, seed):
    """(data, fit) hand-off files at `dim`: PCA fitted on the fit file's images and captions, as the sweep's
    own --dim_method pca does (reduction.fit_reduction / reduce), written once under folder."""
    fit = read_embeddings(fit_path or data_path)
    if fit.dim == dim:
        return data_path, fit_path
    projection = reduction.fit_reduction(np.concatenate([fit.image_embeddings, fit.text_embeddings]), dim, "pca", seed)
    out = []
    for path in (data_path, fit_path or data_path):
        stem, split = os.path.basename(path).rsplit(".", 1)[0].rsplit("_", 1)
        target = os.path.join(folder, f"{stem}-pca{dim}_{split}.h5")
        if not os.path.exists(target):
            emb = read_embeddings(path)
            attrs = dict(emb.attrs, dim=dim, note=f"bench_scale: PCA to {dim} fitted on {fit_path or data_path}")
            write_embeddings(target, Embeddings(reduction.reduce(emb.image_embeddings, projection),
                                                reduction.reduce(emb.text_embeddings, projection), emb.text_to_image,
                                                emb.image_ids, emb.captions, attrs))
        out.append(target)
    return out[0], out[1]


def sweep_argv(args, data_path, fit_path):
    argv = ["--data_path", data_path, "--fit_path", fit_path, "--output_dir", args.output_dir,
            "--embedding_dims", str(args.dim), "--precisions", *args.precisions,
            "--candidate_sizes", *([str(args.candidate_size)] if args.candidate_size else []), "--recall_k", "1", "10",
            "--index", *args.index, "--nprobe", *map(str, args.nprobe), "--ef_search", *map(str, args.ef_search),
            "--gallery_sizes", *map(str, args.gallery_sizes), "--distractors", *args.distractors,
            "--directions", *args.directions, "--max_queries", str(args.max_queries),
            "--threads", str(args.threads), "--min_time", str(args.min_time), "--max_time", str(args.max_time),
            "--seed", str(args.seed)]
    return argv


def label(config):
    knobs = config.get("index_params") or {}
    knob = f" nprobe={knobs['nprobe']}" if "nprobe" in knobs else f" ef={knobs['ef_search']}" \
        if "ef_search" in knobs else ""
    rerank = f" C={config['candidate_size']}" if config.get("rerank") else ""
    return f"{config['precision']} {config['index']}{knob}{rerank}"


def table_rows(run_files, dim, directions):
    """One row per completed run at the benchmark's dim: what the docs/benchmarks.md table shows."""
    rows = []
    for path in run_files:
        run = read_json(path)
        config = run["config"]
        if "metrics" not in run or config["dim"] != dim:
            continue
        # the reference is fp32 exact flat search at this dim (config "exact" means exact at the native dim)
        reference = config["precision"] == "fp32" and config["index"] == "flat" and not config.get("rerank")
        row = {"gallery_size": config["gallery_size"], "label": label(config), "precision": config["precision"],
               "index": config["index"], "rerank": bool(config.get("rerank")), "reference": reference,
               "bytes_per_vector": run["memory"]["bytes_per_vector"]}
        for d in directions:
            row.update({f"{d}_R@1": run["metrics"].get(f"{d}_R@1"), f"{d}_R@10": run["metrics"].get(f"{d}_R@10"),
                        f"{d}_qps": run["speed"].get(f"{d}_qps"),
                        f"{d}_latency_p50_ms": run["speed"].get(f"{d}_latency_p50_ms"),
                        f"{d}_build_s": run["speed"].get(f"{d}_build_s")})
        rows.append(row)
    return sorted(rows, key=lambda r: (r["gallery_size"], r["label"]))


def crossovers(rows, direction):
    """Per configuration label: the smallest gallery size at which it searches faster than fp32 exact flat."""
    exact = {r["gallery_size"]: r[f"{direction}_qps"] for r in rows if r["reference"] and r[f"{direction}_qps"]}
    found = {}
    for row in rows:
        if row["reference"] or row["gallery_size"] not in exact or row[f"{direction}_qps"] is None:
            continue
        if row[f"{direction}_qps"] > exact[row["gallery_size"]]:
            size = found.get(row["label"])
            found[row["label"]] = row["gallery_size"] if size is None else min(size, row["gallery_size"])
    return dict(sorted(found.items()))


def projections(rows, direction, sizes=(10_000_000, 100_000_000)):
    """Per configuration measured at two or more gallery sizes: its per-item costs taken to `sizes` items.

    Memory is bytes/vector x items (index codes only). Build seconds scale linearly from the largest measured
    size (k-means and training are fitted on the fit set, so only adding grows with the gallery). Queries/s
    follow the power law through the two largest measured sizes (exponent -1: a scan of every item; near 0:
    IVF at fixed lists visited still scans a fixed share, HNSW grows slowly): an extrapolation, not a
    measurement, and it assumes the index still fits in RAM."""
    out = {}
    for name in sorted({r["label"] for r in rows}):
        line = sorted((r for r in rows if r["label"] == name and r[f"{direction}_qps"]), key=lambda r: r["gallery_size"])
        if len(line) < 2:
            continue
        (n0, q0), (n1, q1) = [(r["gallery_size"], r[f"{direction}_qps"]) for r in line[-2:]]
        exponent = float(np.log(q1 / q0) / np.log(n1 / n0))
        build = line[-1][f"{direction}_build_s"]
        out[name] = {"measured_up_to": n1, "qps_exponent": exponent,
                     "build_s_per_1k_items": None if build is None else build / n1 * 1000,
                     "bytes_per_vector": line[-1]["bytes_per_vector"],
                     "at": {str(n): {"index_gb": line[-1]["bytes_per_vector"] * n / 1e9,
                                     "qps": q1 * (n / n1) ** exponent,
                                     "build_s": None if build is None else build * n / n1} for n in sizes}}
    return out


def plot(rows, direction, path, found):
    """Recall and queries/s vs gallery size of the flat indexes without re-ranking; a star where a compressed
    index first searches faster than fp32 exact flat (`found`: crossovers())."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (recall_ax, speed_ax) = plt.subplots(1, 2, figsize=(13, 5), layout="constrained")
    for name in sorted({r["label"] for r in rows if r["index"] == "flat" and not r["rerank"]}):
        line = sorted((r for r in rows if r["label"] == name and r[f"{direction}_qps"]), key=lambda r: r["gallery_size"])
        sizes = [r["gallery_size"] for r in line]
        recall_ax.plot(sizes, [r[f"{direction}_R@10"] for r in line], marker="o", label=name)
        drawn = speed_ax.plot(sizes, [r[f"{direction}_qps"] for r in line], marker="o", label=name)
        if name in found:
            cross = next(r for r in line if r["gallery_size"] == found[name])
            speed_ax.plot([cross["gallery_size"]], [cross[f"{direction}_qps"]], marker="*", markersize=16,
                          color=drawn[0].get_color(), markeredgecolor="black")
    for ax, what in ((recall_ax, f"{direction} R@10 (%)"), (speed_ax, f"{direction} queries/s (batch)")):
        ax.set_xscale("log")
        ax.set_xlabel("gallery size (items)")
        ax.set_ylabel(what)
        ax.grid(alpha=0.3)
    speed_ax.set_yscale("log")
    speed_ax.legend(fontsize=8)
    fig.suptitle(f"flat indexes, no re-ranking: {direction} recall and speed vs gallery size "
                 "(star: first size where it beats fp32 exact flat)")
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, bbox_inches="tight")
    plt.close(fig)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data_path", required=True, help="hand-off file: the queries and the real gallery items")
    p.add_argument("--fit_path", default="", help="hand-off file the quantizers / PCA are fitted on")
    p.add_argument("--gallery_sizes", type=int, nargs="+", default=[10000, 100000, 1000000])
    p.add_argument("--distractors", nargs="+", default=["gaussian"], help="as run_experiments.py --distractors")
    p.add_argument("--dim", type=int, default=256, help="embedding dim of every configuration (PCA from the file)")
    p.add_argument("--precisions", nargs="+", default=DEFAULT_PRECISIONS, choices=precisions.PRECISIONS)
    p.add_argument("--index", nargs="+", default=["flat", "ivf", "hnsw"], choices=("flat", "ivf", "hnsw"))
    p.add_argument("--nprobe", type=int, nargs="+", default=[1, 4, 16])
    p.add_argument("--ef_search", type=int, nargs="+", default=[16, 64, 256])
    p.add_argument("--directions", nargs="+", default=["t2i", "i2t"], choices=("t2i", "i2t"))
    p.add_argument("--candidate_size", type=int, default=100,
                   help="re-ranked candidates (0 = none; the runs without re-ranking always run)")
    p.add_argument("--max_queries", type=int, default=1000, help="query images (and all their captions)")
    p.add_argument("--threads", type=int, default=2, help="FAISS threads")
    p.add_argument("--min_time", type=float, default=0.3, help="as run_experiments.py --min_time")
    p.add_argument("--max_time", type=float, default=10.0, help="as run_experiments.py --max_time")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--latency_pairs", type=int, default=15,
                   help="turns of (read the largest gallery once, one fp32 flat query) for the paired latency check")
    p.add_argument("--output_dir", default=os.path.join("result", "bench", "scale"))
    p.add_argument("--tag", default="", help="names this invocation's record: bench_scale-<tag>.json (the table "
                   "and plots always cover every run in the folder, so invocations with other sizes add up)")
    args = p.parse_args(argv)
    load_before, start = os.getloadavg(), time.time()
    reads_before = read_timings(max(args.gallery_sizes) * args.dim * 4)
    data_path, fit_path = projected_inputs(args.data_path, args.fit_path, args.dim,
                                           os.path.join(args.output_dir, "inputs"), args.seed)
    command = sweep_argv(args, data_path, fit_path)
    run_experiments.main(command)
    read = bandwidth_record(reads_before, read_timings(max(args.gallery_sizes) * args.dim * 4))
    bandwidth = read["median_gbs"]
    print(f"read bandwidth: {bandwidth:.1f} GB/s at the median of {read['reads']} one-thread reads of "
          f"{read['bytes'] / 1e9:.1f} GB before and after the sweep (fastest {read['best_gbs']:.1f}); "
          f"load average {load_before[0]:.2f} before")
    rows = table_rows(sorted(glob.glob(os.path.join(args.output_dir, "runs", "*.json"))), args.dim, args.directions)
    direction = args.directions[0]
    floor = {n: n * args.dim * 4 / (bandwidth * 1e9) * 1e3 for n in args.gallery_sizes}   # ms to read it once
    exact = {r["gallery_size"]: r for r in rows if r["reference"] and r[f"{direction}_latency_p50_ms"]}
    latency = {n: {"fp32_flat_p50_ms": exact[n][f"{direction}_latency_p50_ms"], "read_once_ms": floor[n],
                   "ratio": exact[n][f"{direction}_latency_p50_ms"] / floor[n],
                   "ratio_at_best_read": exact[n][f"{direction}_latency_p50_ms"] * read["best_gbs"] * 1e6
                   / (n * args.dim * 4)} for n in args.gallery_sizes if n in exact}
    # The budget's latency check: the same kernel and a read of the same bytes, in turns (paired_latency).
    paired = paired_latency(max(args.gallery_sizes), args.dim, pairs=args.latency_pairs, seed=args.seed)
    record = {"command": command, "rows": rows, "crossovers": {d: crossovers(rows, d) for d in args.directions},
              "projections": {d: projections(rows, d) for d in args.directions},
              "read_bandwidth_gbs": bandwidth, "read_bandwidth": read, "fp32_flat_latency_vs_read": latency,
              "paired_latency": paired,
              "wall_s": time.time() - start, "peak_rss_bytes": timing.peak_rss_bytes(),
              "load_average_before": load_before, "load_average_after": os.getloadavg(), "environment": environment()}
    record_path = os.path.join(args.output_dir, f"bench_scale{'-' + args.tag if args.tag else ''}.json")
    write_json(record_path, record)
    for d in args.directions:
        plot(rows, d, os.path.join(args.output_dir, f"scale_recall_qps_{d}.png"), record["crossovers"][d])
    for n, item in latency.items():
        print(f"{n:>9,} items: fp32 flat single-query p50 {item['fp32_flat_p50_ms']:.2f} ms, reading the gallery "
              f"once {item['read_once_ms']:.2f} ms (ratio {item['ratio']:.2f}; {item['ratio_at_best_read']:.2f} "
              "at the fastest read)")
    print(f"{paired['gallery_size']:>9,} items, in {paired['pairs']} turns: fp32 flat single query "
          f"{paired['search_p50_ms']:.2f} ms, reading the gallery once {paired['read_p50_ms']:.2f} ms "
          f"({paired['read_gbs']:.1f} GB/s): ratio {paired['ratio']:.2f} (per turn {paired['pair_ratio_min']:.2f}"
          f"-{paired['pair_ratio_max']:.2f})")
    for d, found in record["crossovers"].items():
        for name, size in found.items():
            print(f"{d}: {name} is faster than fp32 exact flat from {size:,} items")
    print(f"wall {record['wall_s']:.0f} s, peak RSS {record['peak_rss_bytes'] / 1e9:.2f} GB; "
          f"wrote {record_path}")
    return record


if __name__ == "__main__":
    main()
