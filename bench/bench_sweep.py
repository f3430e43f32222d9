"""Benchmark run_experiments.py: harness overhead vs a bare FAISS loop, and the seed grid's wall time.

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


def bare_loop(search, batches, k, min_time):
    """queries/s of `for batch: search(batch, k)` (what FAISS alone does, with the codec's own encoding
    where it has one), whole passes."""
    search(batches[0], k)
    passes, elapsed = 0, 0.0
    while passes == 0 or elapsed < min_time:
        start = time.perf_counter()
        for batch in batches:
            search(batch, k)
        elapsed += time.perf_counter() - start
        passes += 1
    return passes * sum(len(b) for b in batches) / elapsed


def harness_group(data_path, threads, precisions, min_time):
    """The sweep's own Group on the file (t2i, native dim, flat) and its settings."""
    argv = ["--data_path", data_path, "--threads", str(threads), "--min_time", str(min_time), "--directions", "t2i",
            "--precisions", *precisions, "--candidate_sizes", "--recall_k", "1", "5", "10"]
    _, settings, _ = run_experiments.parse_args(argv)
    pool = concurrent.futures.ThreadPoolExecutor(1)
    files, fits, _ = load_inputs(settings, [data_path], [], pool)
    grid = build_grid(settings, files, fits)
    group = Group(settings, files[0][1], fits[0], grid[0].config, None, pool, pick_device("cpu"))
    return settings, group


def bench_overhead(data_path, threads, precisions, k=10, repeats=5, min_time=0.5):
    """Per precision (flat index, t2i, native dim): the harness's search_qps (the index alone; for codecs
    with a query-side stage, transform + search end to end) vs a bare FAISS loop on the same index and
    the same query batches, interleaved `repeats` times so a drifting machine load hits both alike."""
    settings, group = harness_group(data_path, threads, precisions, min_time)
    batches = group.directions["t2i"].query_batches
    results = {}
    for precision in precisions:
        entry = group.built(precision, "flat", {})["t2i"]
        searcher = entry.built.searcher
        # The bare loop encodes each batch itself (binary / itq: rotation + sign bits; opq: the OPQ rotation).
        bare_search = (lambda b, n: searcher.index.search(searcher.encode(b), n)) if searcher.encode \
            else searcher.index.search
        bare, harness, faiss_default = [], [], []
        dim = batches[0].shape[1]
        for _ in range(repeats):
            # The same settings as the harness: FAISS threads, numpy's BLAS on 1, FAISS's BLAS switch at 20 queries.
            with timing.pinned_threads(threads, dim):
                bare.append(bare_loop(bare_search, batches, k, min_time))
            # And with FAISS's own switch (what a plain FAISS user gets): only flat float search differs.
            with timing.pinned_threads(threads):
                faiss_default.append(bare_loop(bare_search, batches, k, min_time))
            speed, _, _ = sweep.timed_search(settings, group, "t2i", entry, k, rerank=False)
            # With a query-side stage, the bare loop encodes too: compare it with transform + search.
            harness.append(1 / (1 / speed["transform_qps"] + 1 / speed["search_qps"]) if searcher.encode
                           else speed["search_qps"])
        results[precision] = {"bare_qps": float(np.median(bare)), "harness_qps": float(np.median(harness)),
                              "ratio": float(np.median(harness) / np.median(bare)),
                              "compared": "transform + search" if searcher.encode else "search",
                              "bare_runs": bare, "harness_runs": harness,
                              "bare_faiss_default_switch_qps": float(np.median(faiss_default))}
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
    parser.add_argument("--threads", type=int, default=2, help="FAISS threads for both benchmarks")
    parser.add_argument("--precisions", nargs="+", default=list(precisions.DEFAULT_PRECISIONS),
                        choices=precisions.PRECISIONS,
                        help="precisions whose harness speed is compared with a bare FAISS loop")
    parser.add_argument("--repeats", type=int, default=5, help="interleaved repeats per precision (median quoted)")
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
          f"D={emb.dim}, model={emb.attrs.get('model')})")
    load_before = os.getloadavg()
    print(f"cpu: {timing.cpu_threads_available()} cores available, faiss threads {args.threads}, "
          f"blas threads while timing {timing.BLAS_THREADS}, load average {load_before[0]:.2f}")
    overhead = bench_overhead(data_path, args.threads, args.precisions, repeats=args.repeats)
    for precision, row in overhead.items():
        target = TARGETS.get(precision, 0.9)
        print(f"{precision:>6} ({row['compared']}): bare FAISS loop {row['bare_qps']:,.0f} qps, harness "
              f"{row['harness_qps']:,.0f} qps, ratio {row['ratio']:.3f} (target >= {target}); bare loop with "
              f"FAISS's own BLAS switch {row['bare_faiss_default_switch_qps']:,.0f} qps")
    record = {"data_path": data_path, "threads": args.threads, "blas_threads": timing.BLAS_THREADS,
              "overhead": overhead, "load_average_before": load_before, "environment": environment()}
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
