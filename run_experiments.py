"""Sweep embedding dim x precision x candidate size over FAISS indexes; measure quality, speed, memory.

Reads:  hand-off files (--data_path, --fit_path, --distractors FILE), .h5 or .npz (retrieval/io.py).
Writes: <output_dir>/runs/<slug>-<hash8>.json, one per configuration (skipped ones included).

Example:
    python run_experiments.py --data_path ./coco_data/coco_embeddings.npz --output_dir ./result \
      --embedding_dims 256 512 1024 --precisions fp16 int8 int4 --candidate_sizes 32 100 1000 \
      --recall_k 1 5 10 --batch_size 128 --num_workers 4
"""
import argparse
import concurrent.futures
import datetime
import glob
import hashlib
import json
import os
import time

import numpy as np

from retrieval import indexes, metrics
from retrieval.env import environment, pick_device, seed_everything
from retrieval.io import HandoffError, l2_normalize, read_embeddings, read_json, write_json


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    data = parser.add_argument_group("data")
    data.add_argument("--data_path", nargs="+", required=True,
                      help="hand-off file(s) to evaluate (.h5/.npz); several files with different native dims are each used for their own grid")
    data.add_argument("--fit_path", nargs="*", default=[],
                      help="hand-off file(s) (normally the train split) to train quantizers/PCA on; the one with the data file's native dim is used. Default: the evaluated file itself")
    data.add_argument("--output_dir", default="./result", help="results go to OUTPUT_DIR/runs/")
    grid = parser.add_argument_group("grid")
    grid.add_argument("--embedding_dims", type=int, nargs="*", default=[],
                      help="target dims; the native dim is always run; dims above native are skipped (never padded)")
    grid.add_argument("--dim_method", default="pca", choices=indexes.DIM_METHODS,
                      help="how to reduce below the native dim (PCA is fitted on the fit set)")
    grid.add_argument("--precisions", nargs="+", default=list(indexes.PRECISIONS), choices=indexes.PRECISIONS,
                      help="stage-1 precisions (fp32 exact flat search always runs as the baseline)")
    grid.add_argument("--candidate_sizes", type=int, nargs="*", default=[32, 100, 1000],
                      help="stage-1 candidate counts C re-ranked with fp32; each precision also runs without re-ranking (C = max K)")
    grid.add_argument("--recall_k", type=int, nargs="+", default=[1, 5, 10], help="K values for R@K and overlap@K")
    grid.add_argument("--directions", nargs="+", default=list(metrics.DIRECTIONS), choices=metrics.DIRECTIONS,
                      help="t2i: captions query images; i2t: images query captions")
    grid.add_argument("--index", nargs="+", default=["flat"], choices=indexes.INDEX_TYPES,
                      help="stage-1 index structure(s)")
    grid.add_argument("--gallery_sizes", type=int, nargs="*", default=[],
                      help="pad the image gallery to these sizes with distractors (same number of extra captions for i2t); default: the real gallery")
    grid.add_argument("--distractors", default="gaussian",
                      help="'gaussian' (fitted to the fit set per modality) or a hand-off FILE whose first rows are used")
    knobs = parser.add_argument_group("index settings")
    knobs.add_argument("--sq_ranges", default="per_dim", choices=("per_dim", "uniform"),
                       help="int8/int4 scalar quantizer ranges: one [min,max] per dimension, or one for all")
    knobs.add_argument("--pq_subdim", type=int, default=8, help="PQ: dims per sub-quantizer (M = dim / pq_subdim, 8 bits each)")
    knobs.add_argument("--nlist", type=int, default=0, help="IVF lists (0 = about 4*sqrt(gallery size))")
    knobs.add_argument("--nprobe", type=int, default=16, help="IVF lists visited per query")
    knobs.add_argument("--hnsw_m", type=int, default=32, help="HNSW links per node")
    knobs.add_argument("--ef_search", type=int, default=64, help="HNSW search beam (raised to k when smaller)")
    speed = parser.add_argument_group("timing")
    speed.add_argument("--batch_size", type=int, default=128, help="queries per FAISS search call when timing throughput")
    speed.add_argument("--min_time", type=float, default=0.1, help="repeat whole timed passes until this many seconds")
    speed.add_argument("--warmup", type=int, default=1, help="untimed warm-up batches before each timed section")
    speed.add_argument("--latency_queries", type=int, default=100, help="sampled single queries for latency percentiles")
    speed.add_argument("--latency_threads", type=int, default=1,
                       help="FAISS threads for single-query latency (0 = same as --threads)")
    speed.add_argument("--threads", type=int, default=0, help="FAISS OpenMP threads (0 = FAISS default: all cores)")
    run = parser.add_argument_group("run")
    run.add_argument("--num_workers", type=int, default=4,
                     help="threads for loading files and untimed metric computation (never during timing)")
    run.add_argument("--shard", default="0/1", help="I/N: run block I (0-based) of N contiguous blocks of the grid")
    run.add_argument("--dry_run", action="store_true", help="list the grid (and what is done) and exit")
    run.add_argument("--overwrite", action="store_true", help="recompute configurations whose JSON exists")
    run.add_argument("--seed", type=int, default=0, help="seeds PCA/random projection, distractors, latency sample")
    run.add_argument("--device", default="", help="'' = auto (cuda -> mps -> cpu); FAISS GPU indexes need faiss-gpu, else CPU")
    args = parser.parse_args(argv)
    for name in ("recall_k", "candidate_sizes", "embedding_dims", "gallery_sizes"):
        if any(v <= 0 for v in getattr(args, name)):
            parser.error(f"--{name} values must be positive")
    if args.batch_size <= 0 or args.pq_subdim <= 0:
        parser.error("--batch_size and --pq_subdim must be positive")
    try:
        shard, shards = (int(v) for v in args.shard.split("/"))
        assert 0 <= shard < shards
    except (ValueError, AssertionError):
        parser.error(f"--shard must be I/N with 0 <= I < N, got {args.shard!r}")
    args.shard_index, args.shard_count = shard, shards
    return args


# ----------------------------------------------------------------------------- grid

def config_hash(config):
    return hashlib.sha1(json.dumps(config, sort_keys=True).encode()).hexdigest()[:8]


def slug(config, attrs):
    candidates = "full" if config["candidate_size"] is None else \
        (f"c{config['candidate_size']}" if config["rerank"] else f"k{config['candidate_size']}-norerank")
    parts = [attrs.get("dataset"), attrs.get("model"), attrs.get("split"), f"d{config['dim']}", config["dim_method"],
             config["precision"], candidates, config["index"], f"g{config['gallery_size']}"]
    text = "-".join(str(p) for p in parts if p not in (None, ""))
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in text)[:150]


def build_grid(args, files, fits):
    """Every configuration as (config, skip_reason, file index). Deterministic, so shards agree."""
    k_values = sorted(set(args.recall_k))
    max_k = max(k_values)
    params_base = {"sq_ranges": args.sq_ranges, "pq_subdim": args.pq_subdim, "nlist": args.nlist,
                   "nprobe": args.nprobe, "hnsw_m": args.hnsw_m, "ef_search": args.ef_search}
    grid = []
    for file_index, (path, emb) in enumerate(files):
        native = emb.dim
        fit = fits[file_index]
        real_gallery = emb.image_embeddings.shape[0]
        fit_size = min(fit["images"].shape[0], fit["texts"].shape[0])
        dims = [native] + [d for d in dict.fromkeys(args.embedding_dims) if d != native]
        for gallery_size in (args.gallery_sizes or [real_gallery]):
            extra = gallery_size - real_gallery
            distractors = None if extra <= 0 else {"source": args.distractors, "count": extra}
            gallery_skip = f"gallery size {gallery_size} is below the real gallery ({real_gallery} images)" \
                if extra < 0 else None
            if extra > 0 and args.distractors != "gaussian" and "distractor_rows" in fit:
                have = fit["distractor_rows"]
                if have < extra:
                    gallery_skip = f"distractor file {args.distractors} has only {have} rows, {extra} needed"
            for dim in dims:
                dim_skip = f"dim {dim} is above the native dim {native} (never padded)" if dim > native else None
                common = {"dim": dim, "native_dim": native, "dim_method": "none" if dim == native else args.dim_method,
                          "k_values": k_values, "gallery_size": gallery_size, "distractors": distractors,
                          "directions": list(args.directions), "data_path": os.path.normpath(path),
                          "seed": args.seed, "batch_size": args.batch_size, "threads": args.threads}
                baseline = dict(common, precision="fp32", candidate_size=None, rerank=False, exact=dim == native,
                                index="flat", index_params=indexes.index_description("fp32", dim, "flat", params_base, gallery_size))
                grid.append((baseline, gallery_skip or dim_skip, file_index))
                for index_type in args.index:
                    params = dict(params_base, fit_size=fit_size)
                    for precision in args.precisions:
                        if precision == "fp32" and index_type == "flat":
                            continue  # identical to the baseline: fp32 re-ranking of an exact fp32 list
                        reason = gallery_skip or dim_skip or indexes.unsupported(precision, dim, index_type, params)
                        if not reason and precision == "pq" and fit_size < 256:
                            reason = f"pq with 8-bit codes needs >= 256 fit vectors, fit set has {fit_size}"
                        description = indexes.index_description(precision, dim, index_type, params, gallery_size) \
                            if not indexes.unsupported(precision, dim, index_type, params) else {}
                        runs = [(max_k, False)] + [(c, True) for c in dict.fromkeys(args.candidate_sizes)]
                        for candidate_size, rerank in runs:
                            skip = reason or (f"candidate size {candidate_size} is below the largest K ({max_k})"
                                              if candidate_size < max_k else None)
                            config = dict(common, precision=precision, candidate_size=candidate_size, rerank=rerank,
                                          exact=False, index=index_type, index_params=description)
                            grid.append((config, skip, file_index))
    return grid


def shard_block(items, shard, shards):
    """Contiguous block `shard` of `shards`: blocks are disjoint and their union is the grid.

    Contiguous (not round-robin) so configurations sharing a dim/precision stay together and each
    index is built once per shard.
    """
    n = len(items)
    return items[shard * n // shards:(shard + 1) * n // shards]


# ----------------------------------------------------------------------------- data

def load(path):
    try:
        return read_embeddings(path)
    except HandoffError as e:
        raise SystemExit(f"error: {e}") from None


def fit_sets(args, files, fit_files, distractor_file):
    fits = []
    for path, emb in files:
        match = [(p, e) for p, e in fit_files if e.dim == emb.dim]
        if fit_files and not match:
            raise SystemExit(f"error: {path}: no --fit_path file has its native dim {emb.dim} "
                             f"(have {sorted({e.dim for _, e in fit_files})})")
        fit_path, fit_emb = match[0] if match else (path, emb)
        fit = {"source": "--fit_path" if match else "gallery (no --fit_path)", "path": os.path.normpath(fit_path),
               "images": fit_emb.image_embeddings, "texts": fit_emb.text_embeddings}
        if distractor_file is not None:
            if distractor_file.dim != emb.dim:
                raise SystemExit(f"error: {args.distractors}: dim {distractor_file.dim} != {path} dim {emb.dim}")
            fit["distractor_rows"] = min(distractor_file.image_embeddings.shape[0],
                                         distractor_file.text_embeddings.shape[0])
        fits.append(fit)
    return fits


def gaussian_like(vectors, count, rng):
    """`count` unit vectors from a Gaussian with the mean and full covariance of `vectors`."""
    vectors = np.asarray(vectors, dtype=np.float64)
    mean = vectors.mean(axis=0)
    eigenvalues, eigenvectors = np.linalg.eigh(np.cov(vectors, rowvar=False))
    root = (eigenvectors * np.sqrt(np.clip(eigenvalues, 0, None))).astype(np.float32)
    out = np.empty((count, vectors.shape[1]), dtype=np.float32)
    for start in range(0, count, 65536):
        n = min(65536, count - start)
        out[start:start + n] = rng.standard_normal((n, vectors.shape[1]), dtype=np.float32) @ root.T + mean
    return l2_normalize(out)


# ----------------------------------------------------------------------------- one group of configs

class Group:
    """What configurations of one (file, gallery size, dim) share: vectors, baseline, built indexes."""

    def __init__(self, args, emb, fit, config, distractor_file, pool, device):
        self.args, self.pool, self.device = args, pool, device
        dim, extra = config["dim"], (config["distractors"] or {}).get("count", 0)
        both = np.concatenate([fit["images"], fit["texts"]])
        self.projection = indexes.fit_reduction(both, dim, args.dim_method, args.seed)
        images, texts = emb.image_embeddings, emb.text_embeddings
        if extra:
            if distractor_file is None:
                rng = np.random.default_rng(args.seed)
                extra_images, extra_texts = gaussian_like(fit["images"], extra, rng), gaussian_like(fit["texts"], extra, rng)
            else:
                extra_images = distractor_file.image_embeddings[:extra]
                extra_texts = distractor_file.text_embeddings[:extra]
            gallery_images, gallery_texts = np.concatenate([images, extra_images]), np.concatenate([texts, extra_texts])
        else:
            gallery_images, gallery_texts = images, texts
        reduce = lambda x: indexes.reduce(x, self.projection)  # noqa: E731
        # Queries are the real items only; galleries may carry distractors after the real rows.
        self.directions = {
            "t2i": {"queries": reduce(texts), "gallery": reduce(gallery_images), "fit": reduce(fit["images"])},
            "i2t": {"queries": reduce(images), "gallery": reduce(gallery_texts), "fit": reduce(fit["texts"])},
        }
        self.directions = {d: self.directions[d] for d in args.directions}
        self.text_to_image = emb.text_to_image
        self.k_values = config["k_values"]
        self.indexes = {}
        self._baseline = None

    def chunk(self, gallery_rows):
        return max(1, min(1024, (1 << 26) // max(1, gallery_rows)))  # <= 256 MB of scores per chunk

    def full_ranks(self, direction, queries, gallery):
        return metrics.exact_ranks(queries, gallery, self.text_to_image, direction, chunk_size=self.chunk(gallery.shape[0]))

    def baseline(self):
        """fp32 exact search at this dim: ranks, metrics and top-max(K) lists (reference for overlap)."""
        if self._baseline is None:
            max_k = max(self.k_values)
            out = {"metrics": {}, "top": {}}
            exact = self.built("fp32", "flat")  # its full_ranks are the exact protocol ranks
            for direction, data in self.directions.items():
                out["top"][direction] = indexes.exact_top_k(exact[direction]["index"], data["queries"], data["gallery"],
                                                            min(max_k, data["gallery"].shape[0]))
                summary = metrics.summarize(exact[direction]["full_ranks"], self.k_values)
                out["metrics"].update({f"{direction}_{k}": v for k, v in summary.items()})
            self._baseline = out
        return self._baseline

    def built(self, precision, index_type):
        """Indexes (one per direction) with build timings, memory and compressed full ranks."""
        key = (precision, index_type)
        if key not in self.indexes:
            params = {"sq_ranges": self.args.sq_ranges, "pq_subdim": self.args.pq_subdim, "nlist": self.args.nlist,
                      "nprobe": self.args.nprobe, "hnsw_m": self.args.hnsw_m, "ef_search": self.args.ef_search}
            entry = {}
            for direction, data in self.directions.items():
                params["fit_size"] = data["fit"].shape[0]
                index, timing = indexes.build_index(precision, data["gallery"], data["fit"], index_type, params)
                entry[direction] = {"index": index, "timing": timing, "params": dict(params),
                                    "bytes": indexes.serialized_bytes(index),
                                    "bytes_per_vector": indexes.bytes_per_vector(index, precision, data["gallery"].shape[1]),
                                    "decoded": indexes.decoded_gallery(index, precision, data["gallery"])}
            # Full ranking under the compressed scores: untimed, in parallel, finished before any timing.
            jobs = {d: self.pool.submit(self.full_ranks, d, indexes.compressed_queries(precision, v["queries"]),
                                        entry[d].pop("decoded")) for d, v in self.directions.items()}
            for direction, job in jobs.items():
                entry[direction]["full_ranks"] = job.result()
                entry[direction]["searcher"] = to_device(entry[direction]["index"], precision, self.device)
            self.indexes[key] = entry
        return self.indexes[key]


def to_device(index, precision, device):
    """A search function on the device: FAISS GPU when faiss-gpu is installed, else the CPU index."""
    if device.type == "cuda":
        import faiss
        if hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0:
            try:
                resources = faiss.StandardGpuResources()
                if precision == "binary":
                    return indexes.make_searcher(faiss.index_binary_cpu_to_gpu(resources, 0, index), precision)
                return indexes.make_searcher(faiss.index_cpu_to_gpu(resources, 0, index), precision)
            except (RuntimeError, AttributeError) as e:  # e.g. an index type without a GPU version
                print(f"note: {type(index).__name__} stays on the CPU ({e})")
    return indexes.make_searcher(index, precision)


# ----------------------------------------------------------------------------- one configuration

def timed_search(args, searcher, queries, gallery, k_search, rerank):
    """Throughput of stage 1 and stage 2 (separately), single-query latency, and the lists."""
    query_batches = indexes.batches(queries, args.batch_size)
    stage1 = [None] * len(query_batches)

    def search_step(i):
        stage1[i] = searcher(query_batches[i], k_search)

    search = indexes.time_batches(search_step, len(query_batches), queries.shape[0], args.min_time, args.warmup)
    final = [None] * len(query_batches)
    if rerank:
        def second_stage(i):
            final[i] = indexes.rerank(query_batches[i], gallery, stage1[i][1])
    else:
        def second_stage(i):
            final[i] = indexes.sort_candidates(*stage1[i])
    second = indexes.time_batches(second_stage, len(query_batches), queries.shape[0], args.min_time, args.warmup)

    def single(query):
        scores, ids = searcher(query, k_search)
        return indexes.rerank(query, gallery, ids) if rerank else indexes.sort_candidates(scores, ids)

    latency = indexes.latency_ms(single, queries, args.latency_queries, args.seed, args.latency_threads)
    speed = {"search_qps": search["qps"], "rerank_qps" if rerank else "sort_qps": second["qps"],
             "qps": 1.0 / (1.0 / search["qps"] + 1.0 / second["qps"]), "timed_passes": search["passes"],
             "timed_queries": search["queries_per_pass"], "k_searched": k_search}
    speed.update(latency)
    return speed, np.concatenate([ids for _, ids in stage1]), np.concatenate(final)


def evaluate_config(args, group, config):
    k_values, max_k = config["k_values"], max(config["k_values"])
    baseline = group.baseline()
    result_metrics, speed, memory = {}, {}, {}
    precision, exact_full = config["precision"], config["candidate_size"] is None
    built = group.built(precision, config["index"])
    raw = {}
    for direction, data in group.directions.items():  # timed sections: one at a time, nothing else running
        entry = built[direction]
        n = data["gallery"].shape[0]
        k_search = min(max_k if exact_full else config["candidate_size"], n)
        indexes.set_search_params(entry["index"], config["index"], entry["params"], k_search)
        dir_speed, stage1, final = timed_search(args, entry["searcher"], data["queries"], data["gallery"], k_search,
                                                config["rerank"])
        dir_speed.update({k: entry["timing"][k] for k in ("train_s", "add_s", "build_s")})
        speed.update({f"{direction}_{k}": v for k, v in dir_speed.items()})
        memory[f"{direction}_index_bytes"] = entry["bytes"]
        raw[direction] = (stage1, final, k_search)

    def direction_metrics(direction):
        stage1, final, k_search = raw[direction]
        entry = built[direction]
        out = {}
        if exact_full:
            ranks = entry["full_ranks"]  # fp32 flat: the exact protocol ranking
            final = baseline["top"][direction]  # its top K with protocol tie order (FAISS's may differ)
            summary = metrics.summarize(ranks, k_values)
            out["stage1_recall"] = None
        else:
            listed = metrics.candidate_ranks(final, group.text_to_image, direction)
            summary = metrics.summarize(listed, k_values)
            # The full ranking this system implies: its list, then the rest by compressed score.
            implied = np.where(np.isfinite(listed), listed, np.maximum(entry["full_ranks"], k_search + 1))
            implied_summary = metrics.summarize(implied, k_values)
            summary["mean_rank"], summary["median_rank"] = implied_summary["mean_rank"], implied_summary["median_rank"]
            stage1_ranks = metrics.candidate_ranks(stage1, group.text_to_image, direction)
            out["stage1_recall"] = float(100.0 * np.mean(np.isfinite(stage1_ranks)))
        out.update(summary)
        for key in [f"R@{k}" for k in k_values] + ["MRR"]:
            reference = baseline["metrics"][f"{direction}_{key}"]
            out[f"retention_{key}"] = 100.0 * summary[key] / reference if reference else None
        for k in k_values:
            out[f"overlap@{k}"] = indexes.overlap_at_k(final, baseline["top"][direction], k)
        return {f"{direction}_{k}": v for k, v in out.items()}

    for part in group.pool.map(direction_metrics, list(group.directions)):
        result_metrics.update(part)
    result_metrics["RSUM"] = metrics.rsum(result_metrics, k_values, list(group.directions))
    first = next(iter(built.values()))
    memory.update({"bytes_per_vector": first["bytes_per_vector"],
                   "fp32_native_bytes_per_vector": 4 * config["native_dim"],
                   "compression_ratio": 4 * config["native_dim"] / first["bytes_per_vector"],
                   "compression_ratio_same_dim": 4 * config["dim"] / first["bytes_per_vector"],
                   "peak_rss_bytes": indexes.peak_rss_bytes()})
    speed.update({"threads": indexes.set_threads(0), "batch_size": args.batch_size, "min_time_s": args.min_time,
                  "warmup_batches": args.warmup, "latency_threads": args.latency_threads or indexes.set_threads(0),
                  "device": str(group.device)})
    return result_metrics, speed, memory


def data_attrs(attrs):
    out = dict(attrs)
    if isinstance(out.get("skipped"), list) and len(out["skipped"]) > 20:
        out["skipped"] = f"{len(out['skipped'])} items (see the hand-off file)"
    return out


def summary_line(name, config, result):
    if "skipped" in result:
        return f"{name}: skipped ({result['skipped']})"
    m, s, mem = result["metrics"], result["speed"], result["memory"]
    directions = config["directions"]
    qps = " ".join(f"{d} {s[f'{d}_qps']:.0f}" for d in directions)
    return (f"{name}: {metrics.format_metrics(m, config['k_values'], directions)} | qps {qps} | "
            f"{mem['bytes_per_vector']} B/vec x{mem['compression_ratio']:.1f}")


# ----------------------------------------------------------------------------- main

def remove_stale_temp_files(runs_dir, older_than_s=60):
    """Temp files a killed run left behind (write_json renames within milliseconds, so old = dead)."""
    now = time.time()
    for path in glob.glob(os.path.join(runs_dir, ".*.tmp.json")):
        try:
            if now - os.path.getmtime(path) > older_than_s:
                os.remove(path)
        except OSError:
            pass


def existing_result(path):
    if not os.path.exists(path):
        return None
    try:
        return read_json(path)
    except (HandoffError, OSError):
        return None  # unreadable: recompute (atomic writes make this unlikely)


def main(argv=None):
    args = parse_args(argv)
    from tqdm import tqdm
    seed_everything(args.seed)
    device = pick_device(args.device)
    threads = indexes.set_threads(args.threads)
    workers = max(1, args.num_workers)
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
        files = list(zip(args.data_path, pool.map(load, args.data_path)))
        fit_files = list(zip(args.fit_path, pool.map(load, args.fit_path)))
        distractor_file = None if args.distractors == "gaussian" or not args.gallery_sizes else load(args.distractors)
        fits = fit_sets(args, files, fit_files, distractor_file)
        grid = build_grid(args, files, fits)
        todo = shard_block(list(enumerate(grid)), args.shard_index, args.shard_count)
        runs_dir = os.path.join(args.output_dir, "runs")
        names = {i: f"{slug(config, files[f][1].attrs)}-{config_hash(config)}" for i, (config, _, f) in todo}
        if args.dry_run:
            print(f"grid: {len(grid)} configurations, shard {args.shard_index}/{args.shard_count}: {len(todo)}")
            for i, (config, skip, _) in todo:
                done = os.path.exists(os.path.join(runs_dir, names[i] + ".json"))
                print(f"{i:5d} {'done' if done else 'todo'} {names[i]}" + (f"  [skip: {skip}]" if skip else ""))
            return [os.path.join(runs_dir, names[i] + ".json") for i, _ in todo]
        os.makedirs(runs_dir, exist_ok=True)
        remove_stale_temp_files(runs_dir)
        env = environment(threads)
        env["faiss_threads"] = threads
        env["cpu_affinity"] = indexes.cpu_threads_available()
        written, group, group_key = [], None, None
        progress = tqdm(todo, desc="configs", unit="cfg")
        for i, (config, skip, file_index) in progress:
            path = os.path.join(runs_dir, names[i] + ".json")
            if not args.overwrite and existing_result(path) is not None:
                continue
            path_in, emb = files[file_index]
            record = {"config": config}
            if skip:
                record.update(skipped=skip, data=data_attrs(emb.attrs), env=env)
            else:
                start = time.perf_counter()
                key = (file_index, config["gallery_size"], config["dim"])
                if key != group_key:
                    group, group_key = None, key  # free the previous group's indexes first
                    group = Group(args, emb, fits[file_index], config, distractor_file, pool, device)
                result_metrics, speed, memory = evaluate_config(args, group, config)
                fit = fits[file_index]
                record.update(metrics=result_metrics, speed=speed, memory=memory, env=env, data=data_attrs(emb.attrs),
                              fit={"source": fit["source"], "path": fit["path"], "images": int(fit["images"].shape[0]),
                                   "texts": int(fit["texts"].shape[0])},
                              args=vars(args),
                              created=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                              elapsed_s=time.perf_counter() - start)
            write_json(path, record)
            written.append(path)
            progress.write(summary_line(names[i], config, record))
        progress.close()
    print(f"{len(written)} written, {len(todo) - len(written)} already done, under {runs_dir}")
    return written


if __name__ == "__main__":
    main()
