"""Benchmark run_experiments.py: harness overhead vs a bare FAISS loop, and the seed grid's wall time.

Reads:  --data_path (a hand-off file; default: the first of coco_data/flickr8k/*test*.h5,
        checkpoints/**/*test*.h5, else a synthetic stand-in of the Flickr8k test shape it writes).
Writes: coco_data/bench/synthetic_flickr8k_test_d512.h5 (only when no real file is found),
        result/bench/ (the seed grid's runs/, deleted and redone on every call).

Example:
    python bench/bench_sweep.py --threads 2
"""
import argparse
import glob
import os
import shutil
import subprocess
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from retrieval import indexes  # noqa: E402
from retrieval.io import Embeddings, l2_normalize, make_attrs, read_embeddings, write_embeddings  # noqa: E402

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


def bench_overhead(emb, threads, batch_size=128, k=10, repeats=7, min_time=0.5):
    """Harness time_batches vs a bare `for batch: index.search(batch, k)` loop, same index, interleaved."""
    indexes.set_threads(threads)
    queries = emb.text_embeddings
    results = {}
    for precision in ("fp32", "int8"):
        index, _ = indexes.build_index(precision, emb.image_embeddings, emb.image_embeddings)
        searcher = indexes.make_searcher(index, precision)
        query_batches = indexes.batches(queries, batch_size)
        kept = [None] * len(query_batches)

        def step(i):
            kept[i] = searcher(query_batches[i], k)

        def bare():
            passes, elapsed = 0, 0.0
            index.search(query_batches[0], k)
            while passes == 0 or elapsed < min_time:
                start = time.perf_counter()
                for start_row in range(0, queries.shape[0], batch_size):
                    index.search(queries[start_row:start_row + batch_size], k)
                elapsed += time.perf_counter() - start
                passes += 1
            return passes * queries.shape[0] / elapsed

        bare_qps, harness_qps = [], []
        for _ in range(repeats):  # interleaved so machine load drifts hit both equally
            bare_qps.append(bare())
            harness_qps.append(indexes.time_batches(step, len(query_batches), queries.shape[0], min_time)["qps"])
        results[precision] = (float(np.median(bare_qps)), float(np.median(harness_qps)))
    return results


def bench_seed_grid(data_path, threads):
    out = os.path.join(ROOT, "result", "bench")
    shutil.rmtree(os.path.join(out, "runs"), ignore_errors=True)
    command = [sys.executable, os.path.join(ROOT, "run_experiments.py"), "--data_path", data_path,
               "--output_dir", out, "--threads", str(threads)] + SEED_GRID
    start = time.perf_counter()
    subprocess.run(command, check=True, cwd=ROOT, stdout=subprocess.DEVNULL)
    elapsed = time.perf_counter() - start
    runs = glob.glob(os.path.join(out, "runs", "*.json"))
    return elapsed, len(runs), command


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data_path", default="", help="hand-off file (default: real Flickr8k test export, else synthetic)")
    parser.add_argument("--threads", type=int, default=2, help="FAISS threads for both benchmarks")
    parser.add_argument("--skip_grid", action="store_true", help="only the overhead benchmark")
    args = parser.parse_args(argv)
    data_path = args.data_path or find_real_file()
    if not data_path:
        data_path = os.path.join(ROOT, "coco_data", "bench", "synthetic_flickr8k_test_d512.h5")
        if not os.path.exists(data_path):
            synthetic_handoff(data_path)
    emb = read_embeddings(data_path)
    print(f"data: {os.path.relpath(data_path, ROOT)} ({emb.image_embeddings.shape[0]} images x "
          f"{emb.text_embeddings.shape[0]} captions, D={emb.dim}, model={emb.attrs.get('model')})")
    print(f"cpu: {indexes.cpu_threads_available()} cores available, faiss threads {args.threads}")
    for precision, (bare, harness) in bench_overhead(emb, args.threads).items():
        print(f"overhead {precision}: bare FAISS loop {bare:,.0f} qps, harness {harness:,.0f} qps, "
              f"ratio {harness / bare:.3f} (target >= 0.97)")
    if not args.skip_grid:
        elapsed, count, command = bench_seed_grid(data_path, args.threads)
        print(f"seed grid: {count} result files in {elapsed:.1f} s (target <= 60 s)")
        print("command: " + " ".join(os.path.relpath(c, ROOT) if c.startswith(ROOT) else c for c in command[1:]))


if __name__ == "__main__":
    main()
