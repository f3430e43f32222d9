"""Benchmark run_experiments.py: the timing harness's search speed against a bare FAISS loop in a clean process
(bench/bare_search.py), and the seed grid's wall time.

Reads:  --data_path (a hand-off file; default: the first of coco_data/flickr8k/*test*.h5,
        checkpoints/**/*test*.h5, else a synthetic stand-in of the Flickr8k test shape it writes).
Writes: coco_data/bench/synthetic_flickr8k_test_d512.h5 (only when no real file is found),
        result/bench/ (the seed grid's runs/, deleted and redone on every call).

Example:
    python bench/bench_sweep.py --threads 2
"""
import argparse
import concurrent.futures
import glob
import json
import os
import shutil
import subprocess
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import run_experiments  # noqa: E402  (the harness under test is the sweep's own)
from retrieval import precisions, sweep, timing  # noqa: E402
from retrieval.grid import build_grid  # noqa: E402
from retrieval.group import Group  # noqa: E402
from retrieval.inputs import load_inputs  # noqa: E402
from retrieval.env import environment, pick_device  # noqa: E402
from retrieval.io import write_json  # noqa: E402
from retrieval.handoff import Embeddings, l2_normalize, make_attrs, read_embeddings, write_embeddings  # noqa: E402

SEED_GRID = ["--embedding_dims", "256", "512", "1024", "--precisions", "fp16", "int8", "int4",
             "--candidate_sizes", "32", "100", "1000", "--recall_k", "1", "5", "10", "--batch_size", "128",
             "--num_workers", "4"]


def synthetic_handoff(path, num_images=1000, captions_per_image=5, dim=512, seed=0):
    """A hand-off file shaped like Flickr8k test CLIP embeddings (1000 x 5000, D=512).

    Anisotropic (decaying spectrum, like real embeddings, so PCA has something to find), a shared
    offset per modality (the "modality gap"), and caption noise tuned to CLIP-like recall (t2i R@1 ~40%, i2t ~70%).
    """
    rng = np.random.default_rng(seed)
    spectrum = (1.0 / np.sqrt(1.0 + np.arange(dim) / 16.0)).astype(np.float32)
    basis, _ = np.linalg.qr(rng.standard_normal((dim, dim)))
    latent = (rng.standard_normal((num_images, dim)) * spectrum) @ basis.T
    image_offset, text_offset = l2_normalize(rng.standard_normal((2, dim))) * 0.6
    text_to_image = np.repeat(np.arange(num_images), captions_per_image)
    noise = (rng.standard_normal((text_to_image.size, dim)) * spectrum) @ basis.T
    images = l2_normalize(l2_normalize(latent) + image_offset)
    texts = l2_normalize(l2_normalize(latent[text_to_image] + 4.5 * noise) + text_offset)
    emb = Embeddings(images, texts, text_to_image, [f"synthetic_{i:04d}.jpg" for i in range(num_images)],
                     [f"caption {i}" for i in range(text_to_image.size)],
                     make_attrs("synthetic-flickr8k-shape", "test", "synthetic-gaussian", dim, seed=seed,
                                note="benchmark stand-in, not real embeddings"))
    write_embeddings(path, emb)
    return path


def find_real_file():
    patterns = [os.path.join(ROOT, "coco_data", "flickr8k", "*test*.h5"),
                os.path.join(ROOT, "checkpoints", "**", "*test*.h5")]
    for pattern in patterns:
        found = sorted(glob.glob(pattern, recursive=True))
        if found:
            return found[0]
    return None


def harness_group(data_path, threads, precisions, gallery_size, fit_path):
    """The sweep's own Group on the file (both directions, native dim, flat) and its settings."""
    argv = ["--data_path", data_path, "--threads", str(threads), "--precisions", *precisions, "--candidate_sizes",
            "--recall_k", "1", "5", "10"] + (["--gallery_sizes", str(gallery_size)] if gallery_size else []) + (["--fit_path", fit_path] if fit_path else [])
    _, settings, _ = run_experiments.parse_args(argv)
    pool = concurrent.futures.ThreadPoolExecutor(4)  # as run_experiments.py: untimed work goes to a pool
    files, fits, distractors = load_inputs(settings, [data_path], [fit_path] if fit_path else [], pool)
    grid = build_grid(settings, files, fits)
    entry = next(e for e in grid if e.config["gallery_size"] == gallery_size or gallery_size == 0)
    group = Group(settings, files[0][1], fits[0], entry.config, distractors[0], pool, pick_device("cpu"))
    # Each precision's flat index knobs as the grid gives them (a product code's codebook count, ...).
    params = {e.config["precision"]: e.config["index_params"] for e in grid
              if e.config["index"] == "flat" and e.config["dim"] == entry.config["dim"]}
    return settings, group, params


def bare_process(index, codes, k, threads, blas_threshold, passes, scratch):
    """queries/s per pass of `index.search(batch, k)` over `codes` in a fresh Python process (bare_search.py)."""
    import faiss
    binary = isinstance(index, faiss.IndexBinary)
    index_path, queries_path = os.path.join(scratch, "index.bin"), os.path.join(scratch, "queries.npz")
    (faiss.write_index_binary if binary else faiss.write_index)(index, index_path)
    np.savez(queries_path, **{f"batch_{i}": c for i, c in enumerate(codes)})
    command = [sys.executable, os.path.join(ROOT, "bench", "bare_search.py"), "--index", index_path, "--queries",
               queries_path, "--k", str(k), "--threads", str(threads), "--blas_threshold", str(blas_threshold),
               "--passes", str(passes)] + (["--binary"] if binary else [])
    done = subprocess.run(command, check=True, capture_output=True, text=True)
    return json.loads(done.stdout.strip().splitlines()[-1])["qps"]


def bench_overhead(data_path, threads, precisions, repeats=5, k=10, gallery_size=0, fit_path="", passes=10):
    """Per precision and direction (flat index, native dim): the harness's search-stage queries/s (the median of
    its rounds, as run_experiments.py times it, after the group's untimed work in its thread pool) vs the same
    index bytes searched with the same query batches by a bare loop in a fresh process, the two interleaved
    `repeats` times (the order alternating) so a drifting machine load hits both alike."""
    import tempfile
    settings, group, params = harness_group(data_path, threads, precisions, gallery_size, fit_path)
    results = {}
    with tempfile.TemporaryDirectory() as scratch:
        for precision in precisions:
            built = group.built(precision, "flat", params[precision])
            for direction, entry in built.items():
                dim = group.directions[direction].queries.shape[1]
                bare, harness = [], []
                for r in range(repeats):
                    def run_bare():
                        bare.extend(bare_process(entry.built.searcher.index, entry.built.codes, k, threads,
                                                 timing.blas_threshold(dim), passes, scratch))

                    def run_harness():
                        speed, _, _ = sweep.timed_search(settings, group, direction, entry, k, False, threads)
                        harness.append(speed["search_qps"])
                    for run in ((run_bare, run_harness) if r % 2 == 0 else (run_harness, run_bare)):
                        run()
                ratio = float(np.median(harness) / np.median(bare))
                results[f"{precision} {direction}"] = {
                    "precision": precision, "direction": direction, "bare_qps": float(np.median(bare)),
                    "harness_qps": float(np.median(harness)), "ratio": ratio, "bare_runs": bare,
                    "harness_runs": harness, "gallery": int(group.directions[direction].gallery.shape[0])}
    return results


def bench_seed_grid(data_path, threads):
    out = os.path.join(ROOT, "result", "bench")
    shutil.rmtree(os.path.join(out, "runs"), ignore_errors=True)
    command = [sys.executable, os.path.join(ROOT, "run_experiments.py"), "--data_path", data_path,
               "--output_dir", out, "--threads", str(threads)] + SEED_GRID
    start = time.perf_counter()
    subprocess.run(command, check=True, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    elapsed = time.perf_counter() - start
    runs = glob.glob(os.path.join(out, "runs", "*.json"))
    return elapsed, len(runs), command


TARGETS = {"fp32": 0.97, "int8": 0.97}   # the rest: 0.9


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data_path", default="", help="hand-off file (default: real Flickr8k test export, else synthetic)")
    parser.add_argument("--fit_path", default="", help="fit file for the codecs (default: the data file)")
    parser.add_argument("--threads", type=int, default=2, help="FAISS threads for both benchmarks")
    parser.add_argument("--precisions", nargs="+", default=list(precisions.DEFAULT_PRECISIONS),
                        choices=precisions.PRECISIONS,
                        help="precisions whose harness speed is compared with a bare FAISS process")
    parser.add_argument("--repeats", type=int, default=5, help="interleaved repeats per precision (median quoted)")
    parser.add_argument("--gallery_size", type=int, default=0,
                        help="pad the gallery with Gaussian distractors to this many items (0 = the file's own)")
    parser.add_argument("--bare_passes", type=int, default=10, help="timed passes of each bare FAISS process")
    parser.add_argument("--skip_grid", action="store_true", help="only the overhead benchmark")
    parser.add_argument("--output", default=os.path.join(ROOT, "result", "bench", "bench_sweep.json"),
                        help="where the JSON record goes")
    args = parser.parse_args(argv)
    data_path = args.data_path or find_real_file()
    if not data_path:
        data_path = os.path.join(ROOT, "coco_data", "bench", "synthetic_flickr8k_test_d512.h5")
        if not os.path.exists(data_path):
            synthetic_handoff(data_path)
    emb = read_embeddings(data_path)
    print(f"data: {data_path} ({emb.image_embeddings.shape[0]} images x {emb.text_embeddings.shape[0]} captions, "
          f"D={emb.dim}, model={emb.attrs.get('model')}), gallery {args.gallery_size or 'as the file'}")
    load_before = os.getloadavg()
    print(f"cpu: {timing.cpu_threads_available()} cores available, faiss threads {args.threads}, "
          f"blas threads while timing {timing.BLAS_THREADS}, load average {load_before[0]:.2f}")
    overhead = bench_overhead(data_path, args.threads, args.precisions, repeats=args.repeats,
                              gallery_size=args.gallery_size, fit_path=args.fit_path, passes=args.bare_passes)
    print("| precision | direction | bare FAISS process, queries/s | harness search stage, queries/s | ratio | target |")
    print("|---|---|---|---|---|---|")
    for row in overhead.values():
        target = TARGETS.get(row["precision"], 0.9)
        print(f"| {row['precision']} | {row['direction']} | {row['bare_qps']:,.0f} | {row['harness_qps']:,.0f} | "
              f"{row['ratio']:.3f} | >= {target} |")
    record = {"data_path": data_path, "threads": args.threads, "blas_threads": timing.BLAS_THREADS,
              "gallery_size": args.gallery_size, "overhead": overhead, "load_average_before": load_before,
              "environment": environment()}
    if not args.skip_grid:
        elapsed, count, command = bench_seed_grid(data_path, args.threads)
        print(f"seed grid: {count} result files in {elapsed:.1f} s")
        print("command: " + " ".join(os.path.relpath(c, ROOT) if c.startswith(ROOT) else c for c in command[1:]))
        record["seed_grid"] = {"seconds": elapsed, "runs": count, "command": command[1:]}
    record["load_average_after"] = os.getloadavg()
    write_json(args.output, record)
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
