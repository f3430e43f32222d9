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
import hashlib
import json
import os

import numpy as np

from retrieval import indexes, io, metrics, timing
from retrieval.env import environment
from retrieval.errors import UserError
from retrieval.io import HandoffError, l2_normalize, ranks_path, read_embeddings, read_json, write_json, write_ranks


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
    # index knobs; the IVF / HNSW ones take several values, each value its own configuration
    sq_ranges: str
    pq_subdim: int
    nlist: tuple       # build-time (IVF lists; 0 = about 4 sqrt(N))
    nprobe: tuple      # search-time
    hnsw_m: tuple      # build-time
    ef_search: tuple   # search-time
    # timing
    batch_size: int
    min_time: float
    warmup: int
    min_passes: int
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

    def index_settings(self, index_type="flat"):
        """The knobs retrieval.indexes reads to describe, build and search an index: one dict per
        (build-time, search-time) knob setting of `index_type`, build-time settings outermost.

        A flat index has no such knobs (it gets the first values, which it ignores). The per-group
        "fit_size" (which caps IVF lists) is added by the caller where it is known.
        """
        base = {"sq_ranges": self.sq_ranges, "pq_subdim": self.pq_subdim, "nlist": self.nlist[0],
                "nprobe": self.nprobe[0], "hnsw_m": self.hnsw_m[0], "ef_search": self.ef_search[0]}
        values = {name: list(dict.fromkeys(getattr(self, name))) for name in ("nlist", "nprobe", "hnsw_m", "ef_search")}
        if index_type == "ivf":
            return [dict(base, nlist=b, nprobe=s) for b in values["nlist"] for s in values["nprobe"]]
        if index_type == "hnsw":
            return [dict(base, hnsw_m=b, ef_search=s) for b in values["hnsw_m"] for s in values["ef_search"]]
        return [base]


# ----------------------------------------------------------------------------- naming

def config_hash(config):
    return hashlib.sha1(json.dumps(config, sort_keys=True).encode()).hexdigest()[:8]


def knob_label(config):
    """'nl63-np16' / 'm32-ef64' for IVF / HNSW configurations (their knob values), '' for flat ones."""
    params = config.get("index_params") or {}
    if config["index"] == "ivf" and "nprobe" in params:
        return f"nl{params['nlist']}-np{params['nprobe']}"
    if config["index"] == "hnsw" and "ef_search" in params:
        return f"m{params['hnsw_m']}-ef{params['ef_search']}"
    return ""


def slug(config, attrs):
    """A readable file name stem: dataset, model, split, then what varies across the grid."""
    candidates = "full" if config["candidate_size"] is None else \
        (f"c{config['candidate_size']}" if config["rerank"] else f"k{config['candidate_size']}-norerank")
    parts = [attrs.get("dataset"), attrs.get("model"), attrs.get("split"), f"d{config['dim']}", config["dim_method"],
             config["precision"], candidates, config["index"], knob_label(config), f"g{config['gallery_size']}"]
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
    flat = settings.index_settings("flat")[0]
    yield dict(common, precision="fp32", candidate_size=None, rerank=False, exact=dim == native, index="flat",
               index_params=indexes.index_description("fp32", dim, "flat", flat, gallery_size)), dim_skip
    # Each precision runs once without re-ranking (C = max K), then once per candidate count re-ranked.
    runs = [(max_k, False)] + [(c, True) for c in dict.fromkeys(settings.candidate_sizes)]
    for index_type in settings.index:
        for precision in settings.precisions:
            if precision == "fp32" and index_type == "flat":
                continue  # identical to the baseline: fp32 re-ranking of an exact fp32 list
            for knobs in settings.index_settings(index_type):
                params = dict(knobs, fit_size=fit_count)
                unsupported = indexes.unsupported(precision, dim, index_type, params)
                reason = dim_skip or unsupported or pq_fit_reason(precision, fit_count)
                description = {} if unsupported else \
                    indexes.index_description(precision, dim, index_type, params, gallery_size)
                for candidate_size, rerank in runs:
                    skip = reason or (f"candidate size {candidate_size} is below the largest K ({max_k})"
                                      if candidate_size < max_k else None)
                    yield dict(common, precision=precision, candidate_size=candidate_size, rerank=rerank,
                               exact=False, index=index_type, index_params=description), skip
                if unsupported:
                    break  # one skipped record says it for every knob value (their configs would be equal)


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
    if precision in ("pq", "opq") and fit_count < 256:
        return f"{precision} with 8-bit codes needs >= 256 fit vectors, fit set has {fit_count}"
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
        self.reduce = reduce = functools.partial(indexes.reduce, projection=self.projection)
        # Queries are the real items only; galleries may carry distractors after the real rows. The
        # native queries are kept for timing the query-side transform (projection to the dim).
        directions = {
            "t2i": {"native_queries": emb.text_embeddings, "queries": reduce(emb.text_embeddings),
                    "gallery": reduce(gallery_images), "fit": reduce(fit["images"])},
            "i2t": {"native_queries": emb.image_embeddings, "queries": reduce(emb.image_embeddings),
                    "gallery": reduce(gallery_texts), "fit": reduce(fit["texts"])},
        }
        self.directions = {d: directions[d] for d in settings.directions}
        for data in self.directions.values():  # cut once: the timed loops do nothing but their own work
            data["native_batches"] = timing.batches(data["native_queries"], settings.batch_size)
            data["query_batches"] = timing.batches(data["queries"], settings.batch_size)
        self.text_to_image = emb.text_to_image
        self.k_values = config["k_values"]
        self.indexes = {}
        self._baseline = None

    def query_transform(self, encode):
        """What a native query goes through before the index sees it (projection, then the codec's
        encoding), or None when that is nothing (native dim and a float codec)."""
        if self.projection is None and encode is None:
            return None
        return (lambda native: encode(self.reduce(native))) if encode else self.reduce

    def chunk(self, gallery_rows):
        return max(1, min(1024, (1 << 26) // max(1, gallery_rows)))  # <= 256 MB of scores per chunk

    def full_ranks(self, direction, queries, gallery):
        return metrics.exact_ranks(queries, gallery, self.text_to_image, direction,
                                   chunk_size=self.chunk(gallery.shape[0]))

    def baseline(self):
        """fp32 exact search at this dim: ranks, metrics and top-max(K) lists (reference for overlap)."""
        if self._baseline is None:
            max_k = max(self.k_values)
            out = {"metrics": {}, "top": {}}
            exact = self.built("fp32", "flat", {})  # its full_ranks are the exact protocol ranks
            for direction, data in self.directions.items():
                out["top"][direction] = indexes.exact_top_k(exact[direction]["index"], data["queries"], data["gallery"],
                                                            min(max_k, data["gallery"].shape[0]))
                summary = metrics.summarize(exact[direction]["full_ranks"], self.k_values)
                out["metrics"].update({f"{direction}_{k}": v for k, v in summary.items()})
            self._baseline = out
        return self._baseline

    def built(self, precision, index_type, index_params):
        """Indexes (one per direction) with build timings, memory and compressed full ranks.

        Built once per build-time knob (IVF lists, HNSW links) and shared by the search-time knob
        values (nprobe, efSearch) of the same index: index_params is the configuration's."""
        build_knobs = {"nlist": index_params.get("nlist")} if index_type == "ivf" else \
            {"hnsw_m": index_params.get("hnsw_m")} if index_type == "hnsw" else {}
        key = (precision, index_type, tuple(sorted(build_knobs.items())))
        if key not in self.indexes:
            params = dict(self.settings.index_settings("flat")[0], **build_knobs)
            entry = {}
            for direction, data in self.directions.items():
                params["fit_size"] = data["fit"].shape[0]
                index, timing = indexes.build_index(precision, data["gallery"], data["fit"], index_type, params)
                entry[direction] = {"index": index, "timing": timing,
                                    "bytes": indexes.serialized_bytes(index),
                                    "bytes_per_vector": indexes.bytes_per_vector(index, precision,
                                                                                 data["gallery"].shape[1]),
                                    "decoded": indexes.decoded_gallery(index, precision, data["gallery"])}
            # Full ranking under the compressed scores: untimed, in parallel, finished before any timing.
            jobs = {d: self.pool.submit(self.full_ranks, d,
                                        indexes.compressed_queries(precision, v["queries"], entry[d]["index"]),
                                        entry[d].pop("decoded")) for d, v in self.directions.items()}
            for direction, job in jobs.items():
                entry[direction]["full_ranks"] = job.result()
                searcher = indexes.device_searcher(entry[direction]["index"], precision, self.device)
                batches = self.directions[direction]["query_batches"]
                # The codes the index is searched with, encoded once (untimed) for every configuration it serves.
                entry[direction].update(searcher=searcher, codes=[searcher.encode(b) for b in batches]
                                        if searcher.encode else batches)
            self.indexes[key] = entry
        return self.indexes[key]


# ----------------------------------------------------------------------------- one configuration

def timed_search(settings, group, direction, entry, k_search, rerank):
    """Time the stages of one direction's search separately, then one query end to end.

    Stages: `transform` (the query's side of the codec: PCA / random projection to the dim and, for
    binary codes, rotation + sign bits; timed from the native query, absent when there is nothing to
    do), `search` (the FAISS index alone, on the codes Group.built encoded), and `rerank` (fp32
    re-scoring of the C candidates) or `sort` (ordering the list by the compressed scores). End-to-end
    `qps` adds the stages' times per query; latency times single queries through all of them. Returns
    (speed, stage-1 lists, final lists).
    """
    data, searcher, codes = group.directions[direction], entry["searcher"], entry["codes"]
    query_batches, native_batches = data["query_batches"], data["native_batches"]
    stage1, final = [None] * len(codes), [None] * len(codes)
    timed = functools.partial(timing.time_batches, num_batches=len(codes), num_queries=data["queries"].shape[0],
                              min_time=settings.min_time, warmup=settings.warmup, min_passes=settings.min_passes)
    transform = group.query_transform(searcher.encode)

    def transform_step(i):
        transform(native_batches[i])

    def search_step(i):
        stage1[i] = searcher.search(codes[i], k_search)

    def second_step(i):
        final[i] = indexes.rerank(query_batches[i], data["gallery"], stage1[i][1]) if rerank \
            else indexes.sort_candidates(*stage1[i])

    stages = {}
    with timing.pinned_threads(settings.threads):
        if transform is not None:
            stages["transform"] = timed(transform_step)
        stages["search"] = timed(search_step)
        stages["rerank" if rerank else "sort"] = timed(second_step)

    def single(native):
        """One native query through every stage (what a deployed system does per request)."""
        query = group.reduce(native)
        scores, ids = searcher(query, k_search)
        return indexes.rerank(query, data["gallery"], ids) if rerank else indexes.sort_candidates(scores, ids)

    latency = timing.latency_ms(single, data["native_queries"], settings.latency_queries, settings.seed,
                                settings.latency_threads)
    return stage_speed(stages, latency, k_search), np.concatenate([ids for _, ids in stage1]), np.concatenate(final)


def stage_speed(stages, latency, k_search):
    """The speed record of one direction: queries/s per stage and their spread, end-to-end qps, latency."""
    speed = {f"{name}_qps": stage["qps"] for name, stage in stages.items()}
    speed.update({f"{name}_qps_spread_pct": stage["spread_pct"] for name, stage in stages.items()})
    speed["transform_qps"] = speed.get("transform_qps")
    speed["qps"] = 1.0 / sum(1.0 / stage["qps"] for stage in stages.values())
    speed.update(timed_passes=stages["search"]["passes"], timed_queries=stages["search"]["queries_per_pass"],
                 k_searched=k_search)
    speed.update(latency)
    return speed


def evaluate_config(settings, group, config):
    """(metrics, speed, memory, ranks) of one configuration of `group`; ranks: per direction the
    1-based rank of each query's first relevant item that the metrics were computed from (inf = miss)."""
    baseline = group.baseline()  # first: the metric threads below only read it
    built = group.built(config["precision"], config["index"], config["index_params"])
    speed, memory, lists = time_directions(settings, group, config, built)

    def one_direction(direction):
        return direction_metrics(group, config, baseline, built[direction], lists[direction], direction)

    # Untimed, so the directions may run in parallel.
    result_metrics, ranks = {}, {}
    parts = group.pool.map(one_direction, list(group.directions))
    for direction, (part, direction_ranks) in zip(group.directions, parts):
        result_metrics.update(part)
        ranks[direction] = direction_ranks
    result_metrics["RSUM"] = metrics.rsum(result_metrics, config["k_values"], list(group.directions))
    memory.update(memory_summary(config, built))
    speed.update({"threads": settings.threads or timing.set_threads(0), "batch_size": settings.batch_size,
                  "min_time_s": settings.min_time, "min_passes": settings.min_passes,
                  "blas_threads": timing.BLAS_THREADS, "warmup_batches": settings.warmup,
                  "latency_threads": settings.latency_threads or timing.set_threads(0),
                  "device": str(group.device)})
    return result_metrics, speed, memory, ranks


def time_directions(settings, group, config, built):
    """Time each direction's search, one at a time with nothing else running (so timings stay clean).

    Returns per-direction speed and index bytes, and per direction (stage-1 lists, final lists, k searched).
    """
    max_k, exact_full = max(config["k_values"]), config["candidate_size"] is None
    speed, memory, lists = {}, {}, {}
    for direction, data in group.directions.items():
        entry = built[direction]
        k_search = min(max_k if exact_full else config["candidate_size"], data["gallery"].shape[0])
        # Search-time knobs (nprobe, efSearch) are the configuration's, set on the object searched (a GPU copy
        # on a GPU); one built index serves every value.
        indexes.set_search_params(entry["searcher"].index, config["index"], config["index_params"], k_search)
        dir_speed, stage1, final = timed_search(settings, group, direction, entry, k_search, config["rerank"])
        dir_speed.update({k: entry["timing"][k] for k in ("train_s", "add_s", "build_s")})
        speed.update({f"{direction}_{k}": v for k, v in dir_speed.items()})
        memory[f"{direction}_index_bytes"] = entry["bytes"]
        lists[direction] = (stage1, final, k_search)
    return speed, memory, lists


def direction_metrics(group, config, baseline, entry, lists, direction):
    """Quality of one direction's final lists, and their retention/overlap against the fp32 baseline;
    returns (metrics, the ranks R@K and MRR were computed from)."""
    k_values = config["k_values"]
    stage1, final, k_search = lists
    out = {}
    if config["candidate_size"] is None:
        listed = entry["full_ranks"]  # fp32 flat: the exact protocol ranking
        final = baseline["top"][direction]  # its top K with protocol tie order (FAISS's may differ)
        summary = metrics.summarize(listed, k_values)
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
    return {f"{direction}_{k}": v for k, v in out.items()}, listed


def memory_summary(config, built):
    """Code size per vector and compression against fp32 (the directions share precision and dim)."""
    first = next(iter(built.values()))
    # A re-ranked configuration also keeps the fp32 vectors at its dim for stage 2 (in RAM or on disk).
    rerank_bytes = 4 * config["dim"] if config["rerank"] else 0
    return {"bytes_per_vector": first["bytes_per_vector"],
            "total_bytes_per_vector": first["bytes_per_vector"] + rerank_bytes,
            "fp32_native_bytes_per_vector": 4 * config["native_dim"],
            "compression_ratio": 4 * config["native_dim"] / first["bytes_per_vector"],
            "compression_ratio_same_dim": 4 * config["dim"] / first["bytes_per_vector"],
            "peak_rss_bytes": timing.peak_rss_bytes()}


# ----------------------------------------------------------------------------- run records

def environment_record(threads):
    """environment() plus the FAISS thread count in force and the cores this process may use."""
    env = environment(threads)
    env["faiss_threads"] = threads
    env["blas_threads_while_timing"] = timing.BLAS_THREADS
    env["blas"] = timing.blas_libraries()
    env["cpu_affinity"] = timing.cpu_threads_available()
    return env


def data_attrs(attrs):
    """The hand-off file's attributes, with a long list of skipped items shortened to a count."""
    out = dict(attrs)
    if isinstance(out.get("skipped"), list) and len(out["skipped"]) > 20:
        out["skipped"] = f"{len(out['skipped'])} items (see the hand-off file)"
    return out


def skipped_record(config, reason, emb, env):
    return {"config": config, "skipped": reason, "data": data_attrs(emb.attrs), "env": env}


def result_record(config, evaluated, emb, fit, env, arguments, elapsed_s, ranks_file):
    """The run file of an evaluated configuration; `evaluated` is evaluate_config's (metrics, speed, memory,
    ranks); ranks_file: the name of its rank file (written next to it by write_run)."""
    result_metrics, speed, memory, _ = evaluated
    return {"config": config, "metrics": result_metrics, "speed": speed, "memory": memory, "env": env,
            "data": data_attrs(emb.attrs),
            "fit": {"source": fit["source"], "path": fit["path"], "images": int(fit["images"].shape[0]),
                    "texts": int(fit["texts"].shape[0])},
            "args": arguments, "ranks_file": ranks_file,
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "elapsed_s": elapsed_s}


# ----------------------------------------------------------------------------- run files

def write_run(json_path, record, ranks=None, text_to_image=None):
    """Write a run: first its rank file (io.write_ranks), then the JSON, each atomically. The JSON is
    written last because its presence is what marks the run done."""
    if ranks is not None:
        write_ranks(ranks_path(json_path), ranks, text_to_image)
    write_json(json_path, record)


# ----------------------------------------------------------------------------- resuming

def remove_stale_temp_files(runs_dir, older_than_s=60):
    """Temp files a killed run left behind (atomic writes rename within milliseconds, so old = dead)."""
    io.remove_stale_temps(runs_dir, [".*.tmp.json", ".*.tmp.npz"], older_than_s)


def existing_result(path):
    """The run file's record, or None when it is missing, unreadable, or names a rank file that is gone
    (then it is recomputed). Runs from before rank files existed count as done."""
    if not os.path.exists(path):
        return None
    try:
        record = read_json(path)
    except (HandoffError, OSError):
        return None  # unreadable: recompute (atomic writes make this unlikely)
    if record.get("ranks_file") and not os.path.exists(ranks_path(path)):
        return None
    return record
