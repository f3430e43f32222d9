"""The sweep engine behind run_experiments.py: the grid of configurations (embedding dim x precision
x index x candidate count x gallery size), the vectors and indexes a group of them shares, timing and
evaluating one configuration, and the run record written for it.

Everything a number depends on besides the input files is in one frozen SweepSettings, built once
by the script from its command line and passed explicitly; nothing here reads argparse or exits the
process: faults the user can fix raise retrieval.errors.UserError("<file>: <fault>").

The "config" dict of a configuration is what a run file is named after (slug + config_hash), so a
sweep that is restarted skips what is done. Changing any of its keys or values renames every run
file and silently recomputes old result folders: keep it stable.
"""
import dataclasses
import datetime
import functools
import glob
import hashlib
import json
import os
import time

import numpy as np

from retrieval import indexes, metrics
from retrieval.env import environment
from retrieval.errors import UserError
from retrieval.io import HandoffError, l2_normalize, read_embeddings, read_json


@dataclasses.dataclass(frozen=True)
class SweepSettings:
    """The grid, the index knobs and the timing knobs of one sweep (the script's flags of the same name).

    No defaults here: the command line is their one home.
    """
    # grid
    embedding_dims: tuple
    dim_method: str
    precisions: tuple
    candidate_sizes: tuple
    recall_k: tuple
    directions: tuple
    index: tuple
    gallery_sizes: tuple
    distractors: str  # "gaussian" or a hand-off file
    # index knobs
    sq_ranges: str
    pq_subdim: int
    nlist: int
    nprobe: int
    hnsw_m: int
    ef_search: int
    # timing
    batch_size: int
    min_time: float
    warmup: int
    latency_queries: int
    latency_threads: int
    threads: int
    seed: int

    def __post_init__(self):
        # Lists (as argparse gives them) become tuples, so a frozen settings object is really immutable.
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if isinstance(value, list):
                object.__setattr__(self, field.name, tuple(value))

    def index_settings(self):
        """The knobs retrieval.indexes reads to describe, build and search an index.

        The per-group "fit_size" (which caps IVF lists) is added by the caller where it is known.
        """
        return {"sq_ranges": self.sq_ranges, "pq_subdim": self.pq_subdim, "nlist": self.nlist,
                "nprobe": self.nprobe, "hnsw_m": self.hnsw_m, "ef_search": self.ef_search}


# ----------------------------------------------------------------------------- naming

def config_hash(config):
    return hashlib.sha1(json.dumps(config, sort_keys=True).encode()).hexdigest()[:8]


def slug(config, attrs):
    """A readable file name stem: dataset, model, split, then what varies across the grid."""
    candidates = "full" if config["candidate_size"] is None else \
        (f"c{config['candidate_size']}" if config["rerank"] else f"k{config['candidate_size']}-norerank")
    parts = [attrs.get("dataset"), attrs.get("model"), attrs.get("split"), f"d{config['dim']}", config["dim_method"],
             config["precision"], candidates, config["index"], f"g{config['gallery_size']}"]
    text = "-".join(str(p) for p in parts if p not in (None, ""))
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in text)[:150]


def run_name(config, attrs):
    """The run file's name without .json: readable slug plus a hash that tells configurations apart."""
    return f"{slug(config, attrs)}-{config_hash(config)}"


# ----------------------------------------------------------------------------- grid

def build_grid(settings, files, fits):
    """Every configuration as (config, skip reason or None, file index).

    Deterministic, so the shards of one sweep (separate processes) cut the same list. Skipped
    configurations stay in the grid: their run file records why, and they count as done.
    """
    grid = []
    for file_index, (path, emb) in enumerate(files):
        real_gallery = emb.image_embeddings.shape[0]
        fit = fits[file_index]
        # The native dim first: its fp32 flat run is the exact reference of the file.
        dims = [emb.dim] + [d for d in dict.fromkeys(settings.embedding_dims) if d != emb.dim]
        for gallery_size in (settings.gallery_sizes or [real_gallery]):
            gallery_skip = gallery_skip_reason(settings, gallery_size, real_gallery, fit)
            for dim in dims:
                common = common_config(settings, path, emb.dim, dim, gallery_size, real_gallery)
                for config, skip in group_configs(settings, common, fit_size(fit)):
                    grid.append((config, gallery_skip or skip, file_index))
    return grid


def common_config(settings, path, native, dim, gallery_size, real_gallery):
    """The config keys shared by every configuration of one (file, gallery size, dim)."""
    extra = gallery_size - real_gallery
    return {"dim": dim, "native_dim": native, "dim_method": "none" if dim == native else settings.dim_method,
            "k_values": sorted(set(settings.recall_k)), "gallery_size": gallery_size,
            "distractors": {"source": settings.distractors, "count": extra} if extra > 0 else None,
            "directions": list(settings.directions), "data_path": os.path.normpath(path),
            "seed": settings.seed, "batch_size": settings.batch_size, "threads": settings.threads}


def group_configs(settings, common, fit_count):
    """(config, skip reason) of the fp32 exact baseline, then of each index x precision x candidate count."""
    dim, native, gallery_size = common["dim"], common["native_dim"], common["gallery_size"]
    max_k = max(common["k_values"])
    dim_skip = f"dim {dim} is above the native dim {native} (never padded)" if dim > native else None
    knobs = settings.index_settings()
    yield dict(common, precision="fp32", candidate_size=None, rerank=False, exact=dim == native, index="flat",
               index_params=indexes.index_description("fp32", dim, "flat", knobs, gallery_size)), dim_skip
    params = dict(knobs, fit_size=fit_count)
    # Each precision runs once without re-ranking (C = max K), then once per candidate count re-ranked.
    runs = [(max_k, False)] + [(c, True) for c in dict.fromkeys(settings.candidate_sizes)]
    for index_type in settings.index:
        for precision in settings.precisions:
            if precision == "fp32" and index_type == "flat":
                continue  # identical to the baseline: fp32 re-ranking of an exact fp32 list
            unsupported = indexes.unsupported(precision, dim, index_type, params)
            reason = dim_skip or unsupported or pq_fit_reason(precision, fit_count)
            description = {} if unsupported else \
                indexes.index_description(precision, dim, index_type, params, gallery_size)
            for candidate_size, rerank in runs:
                skip = reason or (f"candidate size {candidate_size} is below the largest K ({max_k})"
                                  if candidate_size < max_k else None)
                yield dict(common, precision=precision, candidate_size=candidate_size, rerank=rerank, exact=False,
                           index=index_type, index_params=description), skip


def gallery_skip_reason(settings, gallery_size, real_gallery, fit):
    """Why a gallery size cannot be run (below the real gallery, too few distractor rows), or None."""
    extra = gallery_size - real_gallery
    if extra < 0:
        return f"gallery size {gallery_size} is below the real gallery ({real_gallery} images)"
    have = fit.get("distractor_rows")  # only set for a distractor file
    if extra > 0 and settings.distractors != "gaussian" and have is not None and have < extra:
        return f"distractor file {settings.distractors} has only {have} rows, {extra} needed"
    return None


def pq_fit_reason(precision, fit_count):
    # k-means of 256 centroids per sub-quantizer needs at least 256 training points.
    if precision == "pq" and fit_count < 256:
        return f"pq with 8-bit codes needs >= 256 fit vectors, fit set has {fit_count}"
    return None


def fit_size(fit):
    """Vectors per modality the quantizers train on (the smaller modality bounds both)."""
    return min(fit["images"].shape[0], fit["texts"].shape[0])


def shard_block(items, shard, shards):
    """Contiguous block `shard` of `shards`: blocks are disjoint and their union is the grid.

    Contiguous (not round-robin) so configurations sharing a dim/precision stay together and each
    index is built once per shard.
    """
    n = len(items)
    return items[shard * n // shards:(shard + 1) * n // shards]


# ----------------------------------------------------------------------------- inputs

def load_inputs(settings, data_paths, fit_paths, pool):
    """(files, fits, distractor file or None); files are (path, Embeddings). Raises UserError."""
    files = list(zip(data_paths, pool.map(read_embeddings, data_paths)))
    fit_files = list(zip(fit_paths, pool.map(read_embeddings, fit_paths)))
    # The distractor file is read only when some gallery size could need it.
    distractor_file = None if settings.distractors == "gaussian" or not settings.gallery_sizes \
        else read_embeddings(settings.distractors)
    return files, fit_sets(settings, files, fit_files, distractor_file), distractor_file


def fit_sets(settings, files, fit_files, distractor_file):
    """Per evaluated file: the vectors its quantizers/PCA/distractors are fitted on, and where they came from."""
    fits = []
    for path, emb in files:
        match = [(p, e) for p, e in fit_files if e.dim == emb.dim]
        if fit_files and not match:
            raise UserError(f"{path}: no --fit_path file has its native dim {emb.dim} "
                            f"(have {sorted({e.dim for _, e in fit_files})})")
        fit_path, fit_emb = match[0] if match else (path, emb)
        fit = {"source": "--fit_path" if match else "gallery (no --fit_path)", "path": os.path.normpath(fit_path),
               "images": fit_emb.image_embeddings, "texts": fit_emb.text_embeddings}
        if distractor_file is not None:
            if distractor_file.dim != emb.dim:
                raise UserError(f"{settings.distractors}: dim {distractor_file.dim} != {path} dim {emb.dim}")
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
    for start in range(0, count, 65536):  # bounded float32 temporaries for large galleries
        n = min(65536, count - start)
        out[start:start + n] = rng.standard_normal((n, vectors.shape[1]), dtype=np.float32) @ root.T + mean
    return l2_normalize(out)


def padded_gallery(emb, fit, extra, distractor_file, seed):
    """(images, texts) galleries: the real rows first, then `extra` distractors of each modality."""
    images, texts = emb.image_embeddings, emb.text_embeddings
    if not extra:
        return images, texts
    if distractor_file is None:
        rng = np.random.default_rng(seed)  # images then texts from one stream: fixed by the seed
        extra_images, extra_texts = gaussian_like(fit["images"], extra, rng), gaussian_like(fit["texts"], extra, rng)
    else:
        extra_images = distractor_file.image_embeddings[:extra]
        extra_texts = distractor_file.text_embeddings[:extra]
    return np.concatenate([images, extra_images]), np.concatenate([texts, extra_texts])


# ----------------------------------------------------------------------------- one group of configs

class Group:
    """What configurations of one (file, gallery size, dim) share: vectors, baseline, built indexes."""

    def __init__(self, settings, emb, fit, config, distractor_file, pool, device):
        self.settings, self.pool, self.device = settings, pool, device
        dim, extra = config["dim"], (config["distractors"] or {}).get("count", 0)
        both = np.concatenate([fit["images"], fit["texts"]])
        self.projection = indexes.fit_reduction(both, dim, settings.dim_method, settings.seed)
        gallery_images, gallery_texts = padded_gallery(emb, fit, extra, distractor_file, settings.seed)
        reduce = functools.partial(indexes.reduce, projection=self.projection)
        # Queries are the real items only; galleries may carry distractors after the real rows.
        directions = {
            "t2i": {"queries": reduce(emb.text_embeddings), "gallery": reduce(gallery_images),
                    "fit": reduce(fit["images"])},
            "i2t": {"queries": reduce(emb.image_embeddings), "gallery": reduce(gallery_texts),
                    "fit": reduce(fit["texts"])},
        }
        self.directions = {d: directions[d] for d in settings.directions}
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
            params = self.settings.index_settings()
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
                entry[direction]["searcher"] = indexes.device_searcher(entry[direction]["index"], precision, self.device)
            self.indexes[key] = entry
        return self.indexes[key]


# ----------------------------------------------------------------------------- one configuration

def timed_search(settings, searcher, queries, gallery, k_search, rerank):
    """Throughput of stage 1 and stage 2 (separately), single-query latency, and the lists."""
    query_batches = indexes.batches(queries, settings.batch_size)
    stage1 = [None] * len(query_batches)

    def search_step(i):
        stage1[i] = searcher(query_batches[i], k_search)

    search = indexes.time_batches(search_step, len(query_batches), queries.shape[0], settings.min_time, settings.warmup)
    final = [None] * len(query_batches)
    if rerank:
        def second_stage(i):
            final[i] = indexes.rerank(query_batches[i], gallery, stage1[i][1])
    else:
        def second_stage(i):
            final[i] = indexes.sort_candidates(*stage1[i])
    second = indexes.time_batches(second_stage, len(query_batches), queries.shape[0], settings.min_time, settings.warmup)

    def single(query):
        scores, ids = searcher(query, k_search)
        return indexes.rerank(query, gallery, ids) if rerank else indexes.sort_candidates(scores, ids)

    latency = indexes.latency_ms(single, queries, settings.latency_queries, settings.seed, settings.latency_threads)
    speed = {"search_qps": search["qps"], "rerank_qps" if rerank else "sort_qps": second["qps"],
             "qps": 1.0 / (1.0 / search["qps"] + 1.0 / second["qps"]), "timed_passes": search["passes"],
             "timed_queries": search["queries_per_pass"], "k_searched": k_search}
    speed.update(latency)
    return speed, np.concatenate([ids for _, ids in stage1]), np.concatenate(final)


def evaluate_config(settings, group, config):
    """(metrics, speed, memory) of one configuration of `group`."""
    baseline = group.baseline()  # first: the metric threads below only read it
    built = group.built(config["precision"], config["index"])
    speed, memory, lists = time_directions(settings, group, config, built)

    def one_direction(direction):
        return direction_metrics(group, config, baseline, built[direction], lists[direction], direction)

    # Untimed, so the directions may run in parallel.
    result_metrics = {}
    for part in group.pool.map(one_direction, list(group.directions)):
        result_metrics.update(part)
    result_metrics["RSUM"] = metrics.rsum(result_metrics, config["k_values"], list(group.directions))
    memory.update(memory_summary(config, built))
    speed.update({"threads": indexes.set_threads(0), "batch_size": settings.batch_size,
                  "min_time_s": settings.min_time, "warmup_batches": settings.warmup,
                  "latency_threads": settings.latency_threads or indexes.set_threads(0), "device": str(group.device)})
    return result_metrics, speed, memory


def time_directions(settings, group, config, built):
    """Time each direction's search, one at a time with nothing else running (so timings stay clean).

    Returns per-direction speed and index bytes, and per direction (stage-1 lists, final lists, k searched).
    """
    max_k, exact_full = max(config["k_values"]), config["candidate_size"] is None
    speed, memory, lists = {}, {}, {}
    for direction, data in group.directions.items():
        entry = built[direction]
        k_search = min(max_k if exact_full else config["candidate_size"], data["gallery"].shape[0])
        indexes.set_search_params(entry["index"], config["index"], entry["params"], k_search)
        dir_speed, stage1, final = timed_search(settings, entry["searcher"], data["queries"], data["gallery"],
                                                k_search, config["rerank"])
        dir_speed.update({k: entry["timing"][k] for k in ("train_s", "add_s", "build_s")})
        speed.update({f"{direction}_{k}": v for k, v in dir_speed.items()})
        memory[f"{direction}_index_bytes"] = entry["bytes"]
        lists[direction] = (stage1, final, k_search)
    return speed, memory, lists


def direction_metrics(group, config, baseline, entry, lists, direction):
    """Quality of one direction's final lists, and their retention/overlap against the fp32 baseline."""
    k_values = config["k_values"]
    stage1, final, k_search = lists
    out = {}
    if config["candidate_size"] is None:
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


def memory_summary(config, built):
    """Code size per vector and compression against fp32 (the directions share precision and dim)."""
    first = next(iter(built.values()))
    return {"bytes_per_vector": first["bytes_per_vector"],
            "fp32_native_bytes_per_vector": 4 * config["native_dim"],
            "compression_ratio": 4 * config["native_dim"] / first["bytes_per_vector"],
            "compression_ratio_same_dim": 4 * config["dim"] / first["bytes_per_vector"],
            "peak_rss_bytes": indexes.peak_rss_bytes()}


# ----------------------------------------------------------------------------- run records

def environment_record(threads):
    """environment() plus the FAISS thread count in force and the cores this process may use."""
    env = environment(threads)
    env["faiss_threads"] = threads
    env["cpu_affinity"] = indexes.cpu_threads_available()
    return env


def data_attrs(attrs):
    """The hand-off file's attributes, with a long list of skipped items shortened to a count."""
    out = dict(attrs)
    if isinstance(out.get("skipped"), list) and len(out["skipped"]) > 20:
        out["skipped"] = f"{len(out['skipped'])} items (see the hand-off file)"
    return out


def skipped_record(config, reason, emb, env):
    return {"config": config, "skipped": reason, "data": data_attrs(emb.attrs), "env": env}


def result_record(config, evaluated, emb, fit, env, arguments, elapsed_s):
    """The run file of an evaluated configuration; `evaluated` is evaluate_config's (metrics, speed, memory)."""
    result_metrics, speed, memory = evaluated
    return {"config": config, "metrics": result_metrics, "speed": speed, "memory": memory, "env": env,
            "data": data_attrs(emb.attrs),
            "fit": {"source": fit["source"], "path": fit["path"], "images": int(fit["images"].shape[0]),
                    "texts": int(fit["texts"].shape[0])},
            "args": arguments,
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "elapsed_s": elapsed_s}


# ----------------------------------------------------------------------------- resuming

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
    """The run file's record, or None when it is missing or unreadable (then it is recomputed)."""
    if not os.path.exists(path):
        return None
    try:
        return read_json(path)
    except (HandoffError, OSError):
        return None  # unreadable: recompute (atomic writes make this unlikely)
