"""A bare FAISS search loop in a process of its own: the clean reference bench_sweep.py compares the sweep's
timing harness with (same index bytes, same query batches, same threads and BLAS switch, nothing else ever run
in the process).

Reads:  --index (faiss.write_index / write_index_binary bytes), --queries (.npz: batch_0, batch_1, ... as the
        harness searches them: float queries, sign-bit codes or OPQ-rotated vectors).
Writes: one JSON line on stdout: {"qps": [...one per pass...], "threads": T}.

Example:
    python bench/bare_search.py --index /tmp/int8.index --queries /tmp/int8_queries.npz --k 10 --threads 2
"""
import argparse
import json
import time

import faiss
import numpy as np


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--index", required=True, help="index file")
    parser.add_argument("--binary", action="store_true", help="the index is a binary one (read_index_binary)")
    parser.add_argument("--queries", required=True, help=".npz of query batches batch_0, batch_1, ...")
    parser.add_argument("--k", type=int, default=10, help="items searched per query")
    parser.add_argument("--threads", type=int, default=2, help="FAISS OpenMP threads")
    parser.add_argument("--blas_threshold", type=int, default=20, help="faiss.cvar.distance_compute_blas_threshold")
    parser.add_argument("--passes", type=int, default=10, help="timed passes over the batches (one warm-up batch first)")
    args = parser.parse_args(argv)
    index = faiss.read_index_binary(args.index) if args.binary else faiss.read_index(args.index)
    with np.load(args.queries) as stored:
        batches = [np.ascontiguousarray(stored[f"batch_{i}"]) for i in range(len(stored.files))]
    faiss.omp_set_num_threads(args.threads)
    faiss.cvar.distance_compute_blas_threshold = args.blas_threshold
    index.search(batches[0], args.k)
    queries, rates = sum(len(b) for b in batches), []
    for _ in range(args.passes):
        start = time.perf_counter()
        for batch in batches:
            index.search(batch, args.k)
        rates.append(queries / (time.perf_counter() - start))
    print(json.dumps({"qps": rates, "threads": faiss.omp_get_max_threads()}))


if __name__ == "__main__":
    main()
