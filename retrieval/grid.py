"""The grid of a sweep: every configuration (embedding dim x precision x index x candidate count x gallery
size) with the reason it is skipped, if any, the names of their run files, and the shards that cut it.

The "config" dict of a configuration is what a run file is named after (slug + config_hash), so a
sweep that is restarted skips what is done. Changing any of its keys or values renames every run
file and silently recomputes old result folders: keep it stable.
"""
from __future__ import annotations

import hashlib
import json
import os
from typing import Iterator, NamedTuple

from retrieval import indexes, precisions
from retrieval.inputs import FitSet, distractor_record, sample_queries
from retrieval.handoff import Embeddings
from retrieval.sweep_settings import SweepSettings


class GridEntry(NamedTuple):
    """One configuration of the grid: its config, why it is skipped (None = it runs), and which file it
    evaluates (a position in load_inputs' files)."""
    config: dict
    skip: str | None
    file_index: int


# ----------------------------------------------------------------------------- naming

def config_hash(config: dict) -> str:
    return hashlib.sha1(json.dumps(config, sort_keys=True).encode()).hexdigest()[:8]


def knob_label(config: dict) -> str:
    """'nl63-np16' / 'm32-ef64' for IVF / HNSW configurations (their knob values), '' for flat ones."""
    params = config.get("index_params") or {}
    if config["index"] == "ivf" and "nprobe" in params:
        return f"nl{params['nlist']}-np{params['nprobe']}"
    if config["index"] == "hnsw" and "ef_search" in params:
        return f"m{params['hnsw_m']}-ef{params['ef_search']}"
    return ""


def slug(config: dict, attrs: dict) -> str:
    """A readable file name stem: dataset, model, split, then what varies across the grid."""
    candidates = "full" if config["candidate_size"] is None else \
        (f"c{config['candidate_size']}" if config["rerank"] else f"k{config['candidate_size']}-norerank")
    parts = [attrs.get("dataset"), attrs.get("model"), attrs.get("split"), f"d{config['dim']}", config["dim_method"],
             config["precision"], candidates, config["index"], knob_label(config), f"g{config['gallery_size']}"]
    if config.get("query_sample"):  # --max_queries: how many query images ('q200'); absent otherwise
        parts.append(f"q{config['query_sample']['images']}")
    text = "-".join(str(p) for p in parts if p not in (None, ""))
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in text)[:150]


def run_name(config: dict, attrs: dict) -> str:
    """The run file's name without .json: readable slug plus a hash that tells configurations apart."""
    return f"{slug(config, attrs)}-{config_hash(config)}"


def group_key(entry: GridEntry) -> tuple:
    """What the configurations sharing one group.Group have in common: (file, gallery size, dim, dim method)."""
    config = entry.config
    return entry.file_index, config["gallery_size"], config["dim"], config["dim_method"]


# ----------------------------------------------------------------------------- grid

def build_grid(settings: SweepSettings, files: list[tuple[str, Embeddings]], fits: list[FitSet]) -> list[GridEntry]:
    """Every configuration as a GridEntry.

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
            gallery_skip = gallery_skip_reason(gallery_size, real_gallery, fit)
            for dim, method in dim_plan(settings, dims, emb.dim):
                common = common_config(settings, path, emb.dim, dim, method, gallery_size, real_gallery)
                if settings.max_queries:  # only then: the names of runs without --max_queries stay as they were
                    common["query_sample"] = query_sample.record(settings.max_queries, settings.seed)
                for config, skip in group_configs(settings, common, fit.size):
                    grid.append(GridEntry(config, gallery_skip or skip, file_index))
    return grid


def dim_plan(settings: SweepSettings, dims: list[int], native: int) -> list[tuple[int, str]]:
    """(dim, dim method) pairs in grid order: the native dim once ("none"), every other dim once per method."""
    methods = list(dict.fromkeys(settings.dim_method))
    return [(dim, method) for dim in dims for method in (["none"] if dim == native else methods)]


def common_config(settings: SweepSettings, path: str, native: int, dim: int, method: str, gallery_size: int,
                  real_gallery: int) -> dict:
    """The config keys shared by every configuration of one (file, gallery size, dim, dim method)."""
    extra = gallery_size - real_gallery
    return {"dim": dim, "native_dim": native, "dim_method": method,
            "k_values": sorted(set(settings.recall_k)), "gallery_size": gallery_size,
            "distractors": distractor_record(settings, path, extra) if extra > 0 else None,
            "directions": list(settings.directions), "data_path": os.path.normpath(path),
            "seed": settings.seed, "batch_size": settings.batch_size, "threads": settings.threads}


def group_configs(settings: SweepSettings, common: dict, fit_count: int) -> Iterator[tuple[dict, str | None]]:
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
                if settings.max_code_bytes and precisions.code_bytes(precision, dim, knobs) > settings.max_code_bytes:
                    # Left out, not recorded as skipped: a skipped record counts as done, and a later sweep
                    # without the cap must run the configuration.
                    continue
                extra = (common["distractors"] or {}).get("count", 0)
                params = dict(knobs, fit_size=fit_count + indexes.ivf_sample_size(index_type, gallery_size, extra,
                                                                                   knobs))
                unsupported = precisions.unsupported(precision, dim, index_type, params)
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


def gallery_skip_reason(gallery_size: int, real_gallery: int, fit: FitSet) -> str | None:
    """Why a gallery size cannot be run (below the real gallery, too few distractor rows), or None."""
    extra = gallery_size - real_gallery
    if extra < 0:
        return f"gallery size {gallery_size} is below the real gallery ({real_gallery} images)"
    have = fit.distractor_rows  # only set for distractor files
    if extra > 0 and have is not None and have < extra:
        paths = fit.distractor_paths
        named = f"distractor file {paths[0]} has" if len(paths) == 1 else \
            f"distractor files {' + '.join(paths)} have"
        return f"{named} only {have} rows, {extra} needed"
    return None


def pq_fit_reason(precision: str, fit_count: int) -> str | None:
    # k-means of 256 centroids per sub-quantizer needs at least 256 training points.
    if precision in precisions.PQ_CODES and fit_count < 256:
        return f"{precision} with 8-bit codes needs >= 256 fit vectors, fit set has {fit_count}"
    return None


def shard_block(items: list, shard: int, shards: int) -> list:
    """Contiguous block `shard` of `shards`: blocks are disjoint and their union is the grid.

    Contiguous (not round-robin) so configurations sharing a dim/precision stay together and each
    index is built once per shard.
    """
    n = len(items)
    return items[shard * n // shards:(shard + 1) * n // shards]
