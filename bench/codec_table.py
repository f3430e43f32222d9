"""Learned vs naive codecs at equal bytes: pq vs opq, pq vs rq and binary vs itq, per dim, from a sweep's results.

Reads:  <results_dir>/runs/*.json and their .ranks.npz (run_experiments.py with --precisions pq opq binary itq [rq])
Writes: stdout (a markdown table for docs/benchmarks.md: R@1 of both directions with 95% bootstrap intervals over images,
        and the paired difference learned - naive with its interval)

Example:
    python bench/codec_table.py --results_dir result/flickr8k
    python bench/codec_table.py --results_dir result/bench/bench_train_ens-frontier-d512-fittrain --data_path \
        coco_data/flickr8k-ens/dual-flickr8k-efflite2-minilm-d512_test.h5     # a folder that swept several files
"""
import argparse
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from retrieval import bootstrap  # noqa: E402
from retrieval.runs import load_runs  # noqa: E402

PAIRS = (("pq", "opq"), ("pq", "rq"), ("binary", "itq"))


def flat_runs(runs, data_path=None):
    """{(precision, dim, pq_m): run} of the flat, no-re-ranking runs at the real gallery (smallest gallery size)
    of data_path (None: the folder must hold one evaluated file); pq_m: a product or residual code's codebook
    count (--pq_subdim can give several per dim), None for sign codes."""
    done = [r for r in runs if not r.get("skipped")
            and (data_path is None or os.path.normpath(r["config"]["data_path"]) == os.path.normpath(data_path))]
    files = {r["config"]["data_path"] for r in done}
    if len(files) != 1:
        raise SystemExit(f"error: {len(files)} evaluated files in the runs ({sorted(files)}): "
                         "pick one with --data_path")
    smallest = min(r["config"]["gallery_size"] for r in done)
    return {(r["config"]["precision"], r["config"]["dim"], r["config"]["index_params"].get("pq_m")): r for r in done
            if r["config"]["index"] == "flat" and not r["config"]["rerank"] and r["config"]["candidate_size"]
            and r["config"]["gallery_size"] == smallest}


def cell(value, columns, metric):
    return f"{value:.1f} [{columns[metric + '_ci_low']:.1f}, {columns[metric + '_ci_high']:.1f}]"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results_dir", default=os.path.join(ROOT, "result", "flickr8k"))
    parser.add_argument("--bootstrap", type=int, default=1000, help="resamples")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--data_path", default=None, help="the evaluated file, when the folder swept several")
    args = parser.parse_args(argv)
    runs = load_runs(args.results_dir)
    chosen = flat_runs(runs, args.data_path)
    ids = {key: os.path.splitext(os.path.basename(run["_file"]))[0] for key, run in chosen.items()}
    ranked, notes = bootstrap.load(args.results_dir, {ids[key]: run for key, run in chosen.items()})
    resampler = bootstrap.Resampler(bootstrap.Settings(args.bootstrap, 0.95, args.seed))
    print("| dim | bytes/vector | naive / learned | t2i R@1 naive | t2i R@1 learned | paired difference | "
          "i2t R@1 naive | i2t R@1 learned | paired difference |")
    print("|---|---|---|---|---|---|---|---|---|")
    for dim, pq_m in sorted({(dim, pq_m) for _, dim, pq_m in chosen}, key=lambda k: (k[0], k[1] or 0), reverse=True):
        for naive, learned in PAIRS:
            pair = [(precision, dim, pq_m) for precision in (naive, learned)]
            if not all(key in chosen for key in pair):
                continue
            a, b = (chosen[key] for key in pair)
            n_id, l_id = (ids[key] for key in pair)
            # The learned run paired with the naive one, on the same draws: its delta is learned - naive.
            intervals = resampler.intervals({n_id: ranked[n_id], l_id: ranked[l_id]}, {l_id: n_id})
            cells = []
            for direction in ("t2i", "i2t"):
                metric = f"{direction}_R@1"
                diff = b["metrics"][metric] - a["metrics"][metric]
                cells += [cell(a["metrics"][metric], intervals[n_id], metric),
                          cell(b["metrics"][metric], intervals[l_id], metric),
                          f"{diff:+.1f} [{intervals[l_id][metric + '_delta_ci_low']:+.1f}, "
                          f"{intervals[l_id][metric + '_delta_ci_high']:+.1f}]"]
            print(f"| {dim} | {a['memory']['bytes_per_vector']} | {naive} / {learned} | " + " | ".join(cells) + " |")
    if notes:
        print(f"(no ranks for {len(notes)} runs: {sorted(set(notes.values()))})")


if __name__ == "__main__":
    main()
