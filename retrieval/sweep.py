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
    dim_method: tuple  # one or more of indexes.DIM_METHODS, each its own configuration below the native dim
    precisions: tuple
    candidate_sizes: tuple
    recall_k: tuple
    directions: tuple
    index: tuple
    gallery_sizes: tuple
    distractors: tuple  # ("gaussian",) or hand-off files / "split:NAME" shorthands, padded in this order
    max_queries: int  # query images per file, with all their captions (0 = every image)
    max_code_bytes: int  # codes above this many bytes a vector are left out of the grid (0 = no cap)
    # index knobs; the IVF / HNSW ones take several values, each value its own configuration
    sq_ranges: str
    pq_subdim: tuple   # build-time, pq / opq / rq only (dims per codebook)
    nlist: tuple       # build-time (IVF lists; 0 = about 4 sqrt(N))
    nprobe: tuple      # search-time
    hnsw_m: tuple      # build-time
    ef_search: tuple   # search-time
    # timing
    batch_size: int
    min_time: float
    warmup: int
    min_passes: int
    max_time: float
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

    def index_settings(self, index_type="flat", precision=None):
        """The knobs retrieval.indexes reads to describe, build and search an index: one dict per
        (build-time, search-time) knob setting of `index_type`, build-time settings outermost; for pq / opq / rq
        once per --pq_subdim value (outermost of all: it is a build-time knob of the codec, not the index).

        A flat index has no such knobs (it gets the first values, which it ignores). The per-group
        "fit_size" (which caps IVF lists) is added by the caller where it is known.
        """
        values = {name: list(dict.fromkeys(getattr(self, name)))
                  for name in ("pq_subdim", "nlist", "nprobe", "hnsw_m", "ef_search")}
        base = {"sq_ranges": self.sq_ranges, **{name: v[0] for name, v in values.items()}}
        if index_type == "ivf":
            knobs = [dict(base, nlist=b, nprobe=s) for b in values["nlist"] for s in values["nprobe"]]
        elif index_type == "hnsw":
            knobs = [dict(base, hnsw_m=b, ef_search=s) for b in values["hnsw_m"] for s in values["ef_search"]]
        else:
            knobs = [base]
        subdims = values["pq_subdim"] if precision in indexes.PQ_CODES else values["pq_subdim"][:1]
        return [dict(k, pq_subdim=sub) for sub in subdims for k in knobs]


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
    if config.get("query_sample"):  # --max_queries: how many query images ('q200'); absent otherwise
        parts.append(f"q{config['query_sample']['images']}")
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
        query_sample = sample_queries(emb.text_to_image, settings.max_queries, settings.seed)
        for gallery_size in (settings.gallery_sizes or [real_gallery]):
            gallery_skip = gallery_skip_reason(settings, gallery_size, real_gallery, fit)
            for dim, method in dim_plan(settings, dims, emb.dim):
                common = common_config(settings, path, emb.dim, dim, method, gallery_size, real_gallery)
                if settings.max_queries:  # only then: the names of runs without --max_queries stay as they were
                    common["query_sample"] = query_sample.record(settings.max_queries, settings.seed)
                for config, skip in group_configs(settings, common, fit_size(fit)):
                    grid.append((config, gallery_skip or skip, file_index))
    return grid


def dim_plan(settings, dims, native):
    """(dim, dim method) pairs in grid order: the native dim once ("none"), every other dim once per method."""
    methods = list(dict.fromkeys(settings.dim_method))
    return [(dim, method) for dim in dims for method in (["none"] if dim == native else methods)]


def common_config(settings, path, native, dim, method, gallery_size, real_gallery):
    """The config keys shared by every configuration of one (file, gallery size, dim, dim method)."""
    extra = gallery_size - real_gallery
    return {"dim": dim, "native_dim": native, "dim_method": method,
            "k_values": sorted(set(settings.recall_k)), "gallery_size": gallery_size,
            "distractors": distractor_record(settings, path, extra) if extra > 0 else None,
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
            said_unsupported = False
            for knobs in settings.index_settings(index_type, precision):
                if settings.max_code_bytes and indexes.code_bytes(precision, dim, knobs) > settings.max_code_bytes:
                    # Left out, not recorded as skipped: a skipped record counts as done, and a later sweep
                    # without the cap must run the configuration.
                    continue
                extra = (common["distractors"] or {}).get("count", 0)
                params = dict(knobs, fit_size=fit_count + ivf_sample_size(index_type, gallery_size, extra, knobs))
                unsupported = indexes.unsupported(precision, dim, index_type, params)
                if unsupported and said_unsupported:
                    continue  # one skipped record says it (the configs of an unbuildable index would be equal)
                said_unsupported = said_unsupported or bool(unsupported)
                reason = dim_skip or unsupported or pq_fit_reason(precision, fit_count)
                description = {} if unsupported else \
                    indexes.index_description(precision, dim, index_type, params, gallery_size)
                for candidate_size, rerank in runs:
                    skip = reason or (f"candidate size {candidate_size} is below the largest K ({max_k})"
                                      if candidate_size < max_k else None)
                    yield dict(common, precision=precision, candidate_size=candidate_size, rerank=rerank,
                               exact=False, index=index_type, index_params=description), skip


def ivf_sample_size(index_type, gallery_size, distractors, params):
    """Distractor rows an index trains on besides the fit set: indexes.ivf_distractor_rows for IVF, none for
    the others (the grid and Group.fit_vectors both count with it, so a config's nlist is its build's)."""
    return indexes.ivf_distractor_rows(gallery_size, distractors, params) if index_type == "ivf" else 0


def gallery_skip_reason(settings, gallery_size, real_gallery, fit):
    """Why a gallery size cannot be run (below the real gallery, too few distractor rows), or None."""
    extra = gallery_size - real_gallery
    if extra < 0:
        return f"gallery size {gallery_size} is below the real gallery ({real_gallery} images)"
    have = fit.get("distractor_rows")  # only set for distractor files
    if extra > 0 and have is not None and have < extra:
        paths = fit["distractor_paths"]
        named = f"distractor file {paths[0]} has" if len(paths) == 1 else \
            f"distractor files {' + '.join(paths)} have"
        return f"{named} only {have} rows, {extra} needed"
    return None


def pq_fit_reason(precision, fit_count):
    # k-means of 256 centroids per sub-quantizer needs at least 256 training points.
    if precision in indexes.PQ_CODES and fit_count < 256:
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

GAUSSIAN = "gaussian"
SPLIT_PREFIX = "split:"
# The gallery a direction searches, as (modality in a fit set / distractor record, Embeddings field).
GALLERY_ROWS = {"t2i": ("images", "image_embeddings"), "i2t": ("texts", "text_embeddings")}


def load_inputs(settings, data_paths, fit_paths, pool):
    """(files, fits, distractors); files are (path, Embeddings); distractors: per file its distractor_rows
    (None = Gaussian distractors, or no gallery size above the real one). Raises UserError."""
    files = list(zip(data_paths, pool.map(read_embeddings, data_paths)))
    fit_files = list(zip(fit_paths, pool.map(read_embeddings, fit_paths)))
    paths = {path: distractor_paths(settings, path) for path in data_paths}  # checks the flag before any reading
    # Distractor files are read (once each) only when some gallery size could need them.
    wanted = list(dict.fromkeys(p for ps in paths.values() for p in ps)) if settings.gallery_sizes else []
    loaded = dict(zip(wanted, pool.map(read_embeddings, wanted)))
    fits = fit_sets(settings, files, fit_files, loaded)
    most = max(settings.gallery_sizes, default=0)
    distractors = [distractor_rows(settings, [loaded[p] for p in paths[path]], most - emb.image_embeddings.shape[0])
                   if loaded else None for path, emb in files]
    return files, fits, distractors


def fit_sets(settings, files, fit_files, loaded):
    """Per evaluated file: the vectors its quantizers/PCA/distractors are fitted on, and where they came from;
    loaded: the distractor files read ({path: Embeddings}), whose rows each file may use are counted."""
    fits = []
    for path, emb in files:
        match = [(p, e) for p, e in fit_files if e.dim == emb.dim]
        if fit_files and not match:
            raise UserError(f"{path}: no --fit_path file has its native dim {emb.dim} "
                            f"(have {sorted({e.dim for _, e in fit_files})})")
        fit_path, fit_emb = match[0] if match else (path, emb)
        fit = {"source": "--fit_path" if match else "gallery (no --fit_path)", "path": os.path.normpath(fit_path),
               "images": fit_emb.image_embeddings, "texts": fit_emb.text_embeddings}
        if loaded:
            fit["distractor_paths"] = distractor_paths(settings, path)
            fit["distractor_rows"] = available_rows(settings, path, emb, fit["distractor_paths"], loaded)
        fits.append(fit)
    return fits


def distractor_paths(settings, data_path):
    """The distractor files that pad `data_path`'s galleries, in order ([] = Gaussian distractors)."""
    values = list(settings.distractors)
    if GAUSSIAN in values:
        if len(values) > 1:
            raise UserError(f"--distractors: '{GAUSSIAN}' cannot be mixed with files (got {' '.join(values)})")
        return []
    paths = []
    for value in values:
        path = os.path.normpath(sibling_split(data_path, value[len(SPLIT_PREFIX):])
                                if value.startswith(SPLIT_PREFIX) else value)
        if path == os.path.normpath(data_path):
            raise UserError(f"{data_path}: --distractors {value} is the evaluated file itself "
                            "(its rows would duplicate the real items)")
        paths.append(path)
    return paths


def sibling_split(data_path, split):
    """'split:NAME': the evaluated file's path with its _<split>.h5/.npz suffix replaced by _NAME."""
    stem, ext = os.path.splitext(data_path)
    folder, name = os.path.split(stem)
    head, underscore, own = name.rpartition("_")
    if not split:
        raise UserError(f"--distractors {SPLIT_PREFIX}: names no split (e.g. {SPLIT_PREFIX}train)")
    if ext not in (".h5", ".hdf5", ".npz") or not underscore or not head or not own:
        raise UserError(f"{data_path}: --distractors {SPLIT_PREFIX}{split} needs a file named <name>_<split>.h5 "
                        "or .npz, as prepare_data.py writes them")
    return os.path.join(folder, f"{head}_{split}{ext}")


def distractor_record(settings, path, extra):
    """The config's distractors entry: their source (the files, in order, or "gaussian"), synthetic or not, and
    how many pad each gallery."""
    paths = distractor_paths(settings, path)
    return {"source": paths or GAUSSIAN, "synthetic": not paths, "count": extra}


def available_rows(settings, path, emb, paths, loaded):
    """Distractor rows the files hold for every gallery that runs (captions pad i2t, images t2i)."""
    for p in paths:
        if loaded[p].dim != emb.dim:
            raise UserError(f"{p}: dim {loaded[p].dim} != {path} dim {emb.dim}")
    return min(sum(getattr(loaded[p], GALLERY_ROWS[d][1]).shape[0] for p in paths) for d in settings.directions)


def distractor_rows(settings, files, need):
    """{"images": rows, "texts": rows}: the first `need` rows of the files concatenated in order, only for the
    modalities whose direction runs (None when no gallery needs any)."""
    if need <= 0:
        return None
    out = {}
    for direction in settings.directions:
        modality, field = GALLERY_ROWS[direction]
        parts, have = [], 0
        for emb in files:
            if have >= need:
                break
            part = getattr(emb, field)[:need - have]
            parts.append(part)
            have += part.shape[0]
        out[modality] = parts[0] if len(parts) == 1 else np.concatenate(parts)  # one file: a view, no copy
    return out


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


def padded_gallery(emb, fit, extra, distractors, seed, directions):
    """{direction: gallery} for the directions that run: the real rows first (images for t2i, captions for
    i2t), then `extra` distractors of that modality, rows of the distractor files (distractor_rows) or, when
    `distractors` is None, Gaussian ones; none are made for a direction that does not run."""
    galleries = {}
    for direction in directions:
        modality, field = GALLERY_ROWS[direction]
        real = getattr(emb, field)
        if not extra:
            galleries[direction] = real
        elif distractors is None:
            # One stream per modality: a direction's distractors do not depend on which other directions run.
            rng = np.random.default_rng([seed, list(GALLERY_ROWS).index(direction)])
            galleries[direction] = np.concatenate([real, gaussian_like(fit[modality], extra, rng)])
        else:
            galleries[direction] = np.concatenate([real, distractors[modality][:extra]])
    return galleries


def top1_cosines(queries, gallery, chunk, exclude_own=False):
    """Each query's largest cosine to the gallery (unit rows), `chunk` queries at a time so no full score matrix
    is held; exclude_own: query i is gallery row i, which does not count."""
    best = np.empty(queries.shape[0], dtype=np.float64)
    for start in range(0, queries.shape[0], chunk):
        scores = queries[start:start + chunk] @ gallery.T
        if exclude_own:
            rows = np.arange(scores.shape[0])
            scores[rows, start + rows] = -np.inf
        best[start:start + scores.shape[0]] = scores.max(axis=1)
    return best


# ----------------------------------------------------------------------------- query sample

@dataclasses.dataclass(frozen=True)
class QuerySample:
    """The queries of one evaluated file: whole images and every caption of each, so the bootstrap, which
    resamples images and takes all captions of a drawn image, stays valid for a sample.

    images / captions: the file's rows, ascending. They are also the gallery rows of the queries' relevant
    items, since a gallery keeps the file's rows first (distractors after). text_to_image: per sampled
    caption, its image's position in `images` (what the rank file stores, so the bootstrap sees a split
    of len(images) images). With every image a query, ranks are computed exactly as without a sample.
    """
    images: np.ndarray
    captions: np.ndarray
    file_text_to_image: np.ndarray
    relevant_images: np.ndarray  # per sampled caption, its image's gallery row (t2i relevance)
    text_to_image: np.ndarray

    @property
    def complete(self):
        return self.captions.size == self.file_text_to_image.size

    def pick(self, vectors, direction):
        """The query rows of a direction (captions for t2i, images for i2t); no copy when complete."""
        if self.complete:
            return vectors
        return vectors[self.captions if direction == "t2i" else self.images]

    def relevance(self, direction):
        """metrics' relevance arguments for the picked queries: t2i, each caption's image row; i2t, each
        caption's sampled image and its gallery row (the file's captions are the i2t gallery's first rows)."""
        if direction == "t2i":
            return self.relevant_images, {}
        return self.text_to_image, {"caption_rows": self.captions}

    def exact_ranks(self, queries, gallery, direction, chunk_size):
        """metrics.exact_ranks of the picked queries against the whole gallery (the protocol's ranks)."""
        text_to_image, rows = self.relevance(direction)
        return metrics.exact_ranks(queries, gallery, text_to_image, direction, chunk_size=chunk_size, **rows)

    def candidate_ranks(self, candidates, direction):
        """metrics.candidate_ranks of the picked queries' candidate lists (gallery rows)."""
        text_to_image, rows = self.relevance(direction)
        return metrics.candidate_ranks(candidates, text_to_image, direction, **rows)

    def record(self, max_queries, seed):
        """What a run's config states about its queries."""
        return {"max_queries": max_queries, "seed": seed, "images": int(self.images.size),
                "images_total": int(self.file_text_to_image.max()) + 1, "captions": int(self.captions.size),
                "captions_total": int(self.file_text_to_image.size)}


def sample_queries(text_to_image, max_queries, seed):
    """QuerySample of `max_queries` images drawn without replacement (numpy default_rng(seed)) and all
    their captions; every image when max_queries is 0 or the file has no more images than that."""
    text_to_image = np.asarray(text_to_image, dtype=np.int64)
    n_images = int(text_to_image.max()) + 1  # every image has a caption (io.validate_embeddings)
    if not max_queries or max_queries >= n_images:
        images, captions = np.arange(n_images), np.arange(text_to_image.size)
    else:
        images = np.sort(np.random.default_rng(seed).choice(n_images, size=max_queries, replace=False))
        captions = np.flatnonzero(np.isin(text_to_image, images))
    relevant = text_to_image[captions]
    return QuerySample(images, captions, text_to_image, relevant, np.searchsorted(images, relevant))


# ----------------------------------------------------------------------------- one group of configs

class Group:
    """What configurations of one (file, gallery size, dim, dim method) share: vectors, baseline, built indexes."""

    def __init__(self, settings, emb, fit, config, distractors, pool, device):
        self.settings, self.pool, self.device = settings, pool, device
        dim, extra = config["dim"], (config["distractors"] or {}).get("count", 0)
        self.dim = dim
        both = np.concatenate([fit["images"], fit["texts"]])
        self.projection = indexes.fit_reduction(both, dim, config["dim_method"], settings.seed)
        galleries = padded_gallery(emb, fit, extra, distractors, settings.seed, settings.directions)
        self.extra, self.real_images = extra, emb.image_embeddings.shape[0]
        self.reduce = reduce = functools.partial(indexes.reduce, projection=self.projection)
        # Queries are real items only (with --max_queries a sample of whole images, the same for every
        # configuration of the file); galleries keep every real row and may carry distractors after them.
        # The native queries are kept for timing the query-side transform (projection to the dim).
        self.query_sample = sample = sample_queries(emb.text_to_image, settings.max_queries, settings.seed)
        texts, images = sample.pick(emb.text_embeddings, "t2i"), sample.pick(emb.image_embeddings, "i2t")
        directions = {
            "t2i": {"native_queries": texts, "queries": reduce(texts), "fit": reduce(fit["images"])},
            "i2t": {"native_queries": images, "queries": reduce(images), "fit": reduce(fit["texts"])},
        }
        self.directions = {d: directions[d] for d in settings.directions}
        for direction, data in self.directions.items():  # cut once: the timed loops do nothing but their own work
            data["gallery"] = reduce(galleries[direction])  # only the galleries that run exist
            data["real_rows"] = galleries[direction].shape[0] - extra  # the file's rows; distractors follow
            data["native_batches"] = timing.batches(data["native_queries"], settings.batch_size)
            data["query_batches"] = timing.batches(data["queries"], settings.batch_size)
        self.k_values = config["k_values"]
        self.indexes = {}
        self.coarse = {}  # (direction, nlist) -> the indexes.Coarse every float IVF index of the group gets
        self.ivf_fit = {}  # (direction, distractor rows) -> fit set + that sample of distractors (fit_vectors)
        self.ranks = {}  # (direction,) + indexes.decode_key -> full ranks under that decode's compressed scores
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
        return self.query_sample.exact_ranks(queries, gallery, direction, self.chunk(gallery.shape[0]))

    def ood_gap(self):
        """How far the text queries sit from the padded image gallery next to the real images (exact fp32 at this
        dim, untimed): mean top-1 cosine of the text queries, of the real images to the gallery's other rows, and
        gap = image - text. None without distractors or without text→image (no padded image gallery)."""
        if not self.extra or "t2i" not in self.directions:
            return None
        data = self.directions["t2i"]
        gallery = data["gallery"]
        chunk = self.chunk(gallery.shape[0])
        text = float(np.mean(top1_cosines(data["queries"], gallery, chunk)))
        image = float(np.mean(top1_cosines(gallery[:self.real_images], gallery, chunk, exclude_own=True)))
        return {"text_top1_cosine": text, "image_top1_cosine": image, "gap": image - text}

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
        values (nprobe, efSearch) of the same index: index_params is the configuration's; only the latest
        built index is kept. Float IVF indexes get the group's coarse quantizer (coarse_quantizer), and
        indexes that decode the gallery alike share one full ranking (shared_full_ranks)."""
        build_knobs = {"nlist": index_params.get("nlist")} if index_type == "ivf" else \
            {"hnsw_m": index_params.get("hnsw_m")} if index_type == "hnsw" else {}
        if precision in indexes.PQ_CODES:  # the config records M, the sub-quantizer count: M = dim / pq_subdim
            build_knobs["pq_subdim"] = self.dim // index_params["pq_m"]
        key = (precision, index_type, tuple(sorted(build_knobs.items())))
        if key not in self.indexes:
            # The grid lists an index's configurations one after another: the indexes built before are done
            # with, and at a million items each holds up to a GB (rebuilt if a later configuration needs one).
            self.indexes.clear()
            params = dict(self.settings.index_settings("flat")[0], **build_knobs)
            entry = {}
            for direction, data in self.directions.items():
                fit = self.fit_vectors(direction, index_type, params)
                params["fit_size"] = fit.shape[0]
                coarse, reused = self.coarse_quantizer(direction, precision, index_type, params, fit)
                index, timing = indexes.build_index(precision, data["gallery"], fit, index_type, params, coarse)
                if index_type == "ivf":
                    timing["coarse_shared"] = reused  # its k-means ran for an earlier index of the group
                entry[direction] = {"index": index, "timing": timing,
                                    "bytes": indexes.serialized_bytes(index),
                                    "bytes_per_vector": indexes.bytes_per_vector(index, precision,
                                                                                 data["gallery"].shape[1])}
            # Full ranking under the compressed scores: untimed, in parallel, finished before any timing.
            decode = indexes.decode_key(precision, index_type, key[2])
            jobs = {d: self.pool.submit(self.shared_full_ranks, d, precision, entry[d]["index"], decode)
                    for d in self.directions}
            for direction, job in jobs.items():
                entry[direction]["full_ranks"] = job.result()
                searcher = indexes.device_searcher(entry[direction]["index"], precision, self.device)
                batches = self.directions[direction]["query_batches"]
                # The codes the index is searched with, encoded once (untimed) for every configuration it serves.
                entry[direction].update(searcher=searcher, codes=[searcher.encode(b) for b in batches]
                                        if searcher.encode else batches)
            self.indexes[key] = entry
        return self.indexes[key]

    def fit_vectors(self, direction, index_type, params):
        """What an index of a direction trains on: the fit set; for IVF on a padded gallery also a seeded sample
        of its distractor rows (indexes.ivf_distractor_rows says how many and why), the same for every IVF
        index of the direction with these lists."""
        data = self.directions[direction]
        extra = data["gallery"].shape[0] - data["real_rows"]
        count = ivf_sample_size(index_type, data["gallery"].shape[0], extra, params)
        if not count:
            return data["fit"]
        key = (direction, count)
        if key not in self.ivf_fit:
            rng = np.random.default_rng([self.settings.seed, list(GALLERY_ROWS).index(direction), count])
            rows = data["real_rows"] + np.sort(rng.choice(extra, size=count, replace=False))
            self.ivf_fit[key] = np.concatenate([data["fit"], data["gallery"][rows]])
        return self.ivf_fit[key]

    def coarse_quantizer(self, direction, precision, index_type, params, fit):
        """(the coarse quantizer a build gets, whether an earlier build of the group trained it): one k-means
        per direction and nlist (on `fit`, fit_vectors') serves every float IVF index (indexes.shares_coarse);
        (None, False) for the others (flat, HNSW, and IVF over sign bits, which trains its own in build_index)."""
        if not indexes.shares_coarse(precision, index_type):
            return None, False
        key = (direction, indexes.ivf_lists(self.directions[direction]["gallery"].shape[0], params))
        reused = key in self.coarse
        if not reused:
            self.coarse[key] = indexes.train_coarse(np.ascontiguousarray(fit, dtype=np.float32), key[1])
        return self.coarse[key], reused

    def shared_full_ranks(self, direction, precision, index, decode):
        """The full ranking of a direction under the compressed scores of `index`, computed once per decode
        (indexes.decode_key: fp32 IVF / HNSW reuse the exact baseline's ranks, an HNSW index its flat twin's).
        The decoded gallery exists only while its ranking is computed."""
        key = (direction,) + decode
        if key not in self.ranks:  # each direction is one job: no two threads fill the same key
            data = self.directions[direction]
            queries = indexes.compressed_queries(precision, data["queries"], index)
            self.ranks[key] = self.full_ranks(direction, queries,
                                              indexes.decoded_gallery(index, precision, data["gallery"]))
        return self.ranks[key]


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
    timed = functools.partial(timing.time_batches, batch_sizes=[len(b) for b in query_batches],
                              min_time=settings.min_time, warmup=settings.warmup, min_passes=settings.min_passes,
                              max_time=settings.max_time)
    dim = data["queries"].shape[1]
    transform = group.query_transform(searcher.encode)

    def transform_step(i):
        transform(native_batches[i])

    def search_step(i):
        stage1[i] = searcher.search(codes[i], k_search)

    def second_step(i):
        final[i] = indexes.rerank(query_batches[i], data["gallery"], stage1[i][1]) if rerank \
            else indexes.sort_candidates(*stage1[i])

    stages = {}
    with timing.pinned_threads(settings.threads, dim):
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
                                settings.latency_threads, dim)
    return stage_speed(stages, latency, k_search), np.concatenate([ids for _, ids in stage1]), np.concatenate(final)


def stage_speed(stages, latency, k_search):
    """The speed record of one direction: queries/s per stage and their spread, end-to-end qps, latency."""
    speed = {f"{name}_qps": stage["qps"] for name, stage in stages.items()}
    speed.update({f"{name}_qps_spread_pct": stage["spread_pct"] for name, stage in stages.items()})
    speed.update({f"{name}_spread_over": stage["spread_over"] for name, stage in stages.items()})
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
    baseline_run = config["precision"] == "fp32" and config["index"] == "flat" and config["candidate_size"] is None
    ood = group.ood_gap() if baseline_run else None  # once per group: on its fp32 exact run only
    if ood is not None:
        result_metrics["ood"] = ood
    speed.update({"threads": settings.threads or timing.set_threads(0), "batch_size": settings.batch_size,
                  "min_time_s": settings.min_time, "min_passes": settings.min_passes, "max_time_s": settings.max_time,
                  "faiss_blas_threshold": timing.blas_threshold(config["dim"]),
                  "faiss_default_blas_threshold": timing.FAISS_DEFAULT_BLAS_THRESHOLD,
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
        # IVF only (None otherwise): its coarse k-means' seconds, and whether it ran for an earlier index.
        dir_speed.update({k: entry["timing"].get(k) for k in ("coarse_train_s", "coarse_shared")})
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
        listed = group.query_sample.candidate_ranks(final, direction)
        summary = metrics.summarize(listed, k_values)
        # The full ranking this system implies: its list, then the rest by compressed score.
        implied = np.where(np.isfinite(listed), listed, np.maximum(entry["full_ranks"], k_search + 1))
        implied_summary = metrics.summarize(implied, k_values)
        summary["mean_rank"], summary["median_rank"] = implied_summary["mean_rank"], implied_summary["median_rank"]
        stage1_ranks = group.query_sample.candidate_ranks(stage1, direction)
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


def check_same_fit(path, record, fit):
    """A run file found where this sweep would write must have been fitted on the same vectors: the fit set
    is not part of a configuration's name (the data file is), so another --fit_path into the same folder would
    otherwise count the other fit's runs as done. Raises UserError; skipped records carry no fit."""
    done = record.get("fit") or {}
    if done.get("path") and os.path.normpath(done["path"]) != os.path.normpath(fit["path"]):
        raise UserError(f"{path}: fitted on {done['path']}, this sweep fits on {fit['path']}; "
                        "use another --output_dir, or --overwrite to redo it")


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
