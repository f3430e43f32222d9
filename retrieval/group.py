"""One group of a sweep's configurations, those of one (file, gallery size, dim, dim method): the vectors
they share (reduced queries, padded galleries, fit sets), the fp32 exact baseline, the out-of-distribution
diagnostic, and the caches of what the configurations reuse: the indexes built (indexes.build, the one
home for building one), the coarse quantizers, the IVF fit samples, and the full rankings per decode.
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
from typing import Callable

import numpy as np

from retrieval import indexes, metrics, reduction, timing, two_stage
from retrieval.handoff import Embeddings
from retrieval.inputs import GALLERY_ROWS, FitSet, padded_gallery, sample_queries, top1_cosines
from retrieval.precisions import FaissIndex
from retrieval.sweep_settings import SweepSettings


@dataclasses.dataclass(frozen=True)
class DirectionData:
    """One direction's vectors at the group's dim, cut once: the timed loops do nothing but their own work."""
    native_queries: np.ndarray  # the queries before reduction (the query-side transform is timed from them)
    queries: np.ndarray
    fit: np.ndarray  # the fit set's gallery modality, reduced
    gallery: np.ndarray  # the file's rows first, distractors after
    real_rows: int  # the file's rows of the gallery
    native_batches: list
    query_batches: list


@dataclasses.dataclass(frozen=True)
class Reference:
    """What every configuration's speed is paired with (timing.time_rounds): fp32 exact search at the native dim
    of one direction's native queries (the report's "fp32 exact"), on the group's device, its top max(K) sorted
    as the protocol orders them. Built once per group, so a configuration and the reference are timed in the
    same rounds whatever the configuration's dim."""
    searcher: two_stage.Searcher
    batches: list  # the native query batches (DirectionData.native_batches)
    k: int
    dim: int

    def batch(self, i: int) -> np.ndarray:
        with timing.blas_switch(self.dim):
            return two_stage.sort_candidates(*self.searcher(self.batches[i], self.k))

    def single(self, query: np.ndarray) -> np.ndarray:
        with timing.blas_switch(self.dim):
            return two_stage.sort_candidates(*self.searcher(query, self.k))


@dataclasses.dataclass(frozen=True)
class IndexEntry:
    """One direction's built index and the full ranking of its queries under its compressed scores."""
    built: indexes.BuiltIndex
    full_ranks: np.ndarray


@dataclasses.dataclass(frozen=True)
class Baseline:
    """fp32 exact search at the group's dim: its metrics ("t2i_R@1", ...) and per direction its top-max(K)
    lists with the protocol's tie order (the reference of overlap@K)."""
    metrics: dict
    top: dict


def score_chunk(gallery_rows: int) -> int:
    """Queries scored at a time against a gallery: <= 2^26 scores (256 MB) per chunk, whatever the gallery."""
    return max(1, min(1024, (1 << 26) // max(1, gallery_rows)))


class Group:
    """What configurations of one (file, gallery size, dim, dim method) share: vectors, baseline, built indexes."""

    def __init__(self, settings: SweepSettings, emb: Embeddings, fit: FitSet, config: dict,
                 distractors: dict | None, pool: concurrent.futures.Executor, device) -> None:
        self.settings, self.pool, self.device = settings, pool, device
        self.dim, self.k_values = config["dim"], config["k_values"]
        self.extra = (config["distractors"] or {}).get("count", 0)
        self.real_images = emb.image_embeddings.shape[0]
        self.projection = reduction.fit_reduction(np.concatenate([fit.images, fit.texts]), self.dim,
                                                config["dim_method"], settings.seed)
        self.reduce = functools.partial(reduction.reduce, projection=self.projection)
        # Queries are real items only (with --max_queries a sample of whole images, the same for every
        # configuration of the file); galleries keep every real row and may carry distractors after them.
        self.query_sample = sample_queries(emb.text_to_image, settings.max_queries, settings.seed)
        galleries = padded_gallery(emb, fit, self.extra, distractors, settings.seed, settings.directions)
        self.directions = {d: self._direction(d, emb, fit, galleries[d]) for d in settings.directions}
        self.references = {d: self._reference(galleries[d], self.directions[d]) for d in settings.directions}
        self.indexes = {}  # (precision, index type, build knobs) -> {direction: IndexEntry}; the latest only
        self.coarse = {}  # (direction, nlist) -> the indexes.Coarse every float IVF index of the group gets
        self.ivf_fit = {}  # (direction, distractor rows) -> fit set + that sample of distractors (fit_vectors)
        self.ranks = {}  # (direction,) + two_stage.decode_key -> full ranks under that decode's compressed scores
        self._baseline = None

    def _direction(self, direction: str, emb: Embeddings, fit: FitSet, gallery: np.ndarray) -> DirectionData:
        field = "text_embeddings" if direction == "t2i" else "image_embeddings"
        native = self.query_sample.pick(getattr(emb, field), direction)
        queries = self.reduce(native)
        return DirectionData(native, queries, self.reduce(getattr(fit, GALLERY_ROWS[direction][0])),
                             self.reduce(gallery), gallery.shape[0] - self.extra,
                             timing.batches(native, self.settings.batch_size),
                             timing.batches(queries, self.settings.batch_size))

    def _reference(self, native_gallery: np.ndarray, data: DirectionData) -> Reference:
        index = indexes.flat_fp32(native_gallery)
        k = min(max(self.k_values), native_gallery.shape[0])
        return Reference(two_stage.device_searcher(index, "fp32", self.device), data.native_batches, k,
                         native_gallery.shape[1])

    def query_transform(self, encode: Callable | None) -> Callable | None:
        """What a native query goes through before the index sees it (projection, then the codec's
        encoding), or None when that is nothing (native dim and a float codec)."""
        if self.projection is None and encode is None:
            return None
        return (lambda native: encode(self.reduce(native))) if encode else self.reduce

    def full_ranks(self, direction: str, queries: np.ndarray, gallery: np.ndarray) -> np.ndarray:
        return self.query_sample.exact_ranks(queries, gallery, direction, score_chunk(gallery.shape[0]))

    def ood_gap(self) -> dict | None:
        """How far the text queries sit from the padded image gallery next to the real images (exact fp32 at this
        dim, untimed): mean top-1 cosine of the text queries, of the real images to the gallery's other rows, and
        gap = image - text. None without distractors or without text→image (no padded image gallery)."""
        if not self.extra or "t2i" not in self.directions:
            return None
        data = self.directions["t2i"]
        gallery = data.gallery
        chunk = score_chunk(gallery.shape[0])
        text = float(np.mean(top1_cosines(data.queries, gallery, chunk)))
        image = float(np.mean(top1_cosines(gallery[:self.real_images], gallery, chunk, exclude_own=True)))
        return {"text_top1_cosine": text, "image_top1_cosine": image, "gap": image - text}

    def baseline(self) -> Baseline:
        """fp32 exact search at this dim: ranks, metrics and top-max(K) lists (reference for overlap)."""
        if self._baseline is None:
            max_k = max(self.k_values)
            out = Baseline({}, {})
            exact = self.built("fp32", "flat", {})  # its full_ranks are the exact protocol ranks
            for direction, data in self.directions.items():
                out.top[direction] = two_stage.exact_top_k(exact[direction].built.index, data.queries, data.gallery,
                                                         min(max_k, data.gallery.shape[0]))
                summary = metrics.summarize(exact[direction].full_ranks, self.k_values)
                out.metrics.update({f"{direction}_{k}": v for k, v in summary.items()})
            self._baseline = out
        return self._baseline

    def built(self, precision: str, index_type: str, index_params: dict) -> dict[str, IndexEntry]:
        """Indexes (one per direction, indexes.build) with their compressed full ranks.

        Built once per build-time knob (IVF lists, HNSW links) and shared by the search-time knob
        values (nprobe, efSearch) of the same index: index_params is the configuration's; only the latest
        built index is kept. Float IVF indexes get the group's coarse quantizer (coarse_quantizer), and
        indexes that decode the gallery alike share one full ranking (shared_full_ranks)."""
        knobs = indexes.build_knobs(precision, index_type, index_params, self.dim)
        key = (precision, index_type, knobs)
        if key not in self.indexes:
            # The grid lists an index's configurations one after another: the indexes built before are done
            # with, and at a million items each holds up to a GB (rebuilt if a later configuration needs one).
            self.indexes.clear()
            params = dict(self.settings.index_settings("flat")[0], **dict(knobs))
            built = {d: self._build(d, precision, index_type, params) for d in self.directions}
            # Full ranking under the compressed scores: untimed, finished before any timing.
            decode = two_stage.decode_key(precision, index_type, knobs)
            ranks = self.shared_full_ranks(precision, {d: built[d].index for d in self.directions}, decode)
            self.indexes[key] = {d: IndexEntry(built[d], ranks[d]) for d in self.directions}
        return self.indexes[key]

    def _build(self, direction: str, precision: str, index_type: str, params: dict) -> indexes.BuiltIndex:
        data = self.directions[direction]
        fit = self.fit_vectors(direction, index_type, params)
        params = dict(params, fit_size=fit.shape[0])
        coarse, reused = self.coarse_quantizer(direction, precision, index_type, params, fit)
        return indexes.build(precision, data.gallery, fit, index_type, params, data.query_batches, self.device,
                             coarse, reused)

    def fit_vectors(self, direction: str, index_type: str, params: dict) -> np.ndarray:
        """What an index of a direction trains on: the fit set; for IVF on a padded gallery also a seeded sample
        of its distractor rows (indexes.ivf_fit_set), the same for every IVF index of the direction with these
        lists."""
        data = self.directions[direction]
        extra = data.gallery.shape[0] - data.real_rows
        count = indexes.ivf_sample_size(index_type, data.gallery.shape[0], extra, params)
        if not count:
            return data.fit
        key = (direction, count)
        if key not in self.ivf_fit:
            rng = np.random.default_rng([self.settings.seed, list(GALLERY_ROWS).index(direction), count])
            self.ivf_fit[key] = indexes.ivf_fit_set(data.fit, data.gallery, data.real_rows, count, rng)
        return self.ivf_fit[key]

    def coarse_quantizer(self, direction: str, precision: str, index_type: str, params: dict,
                         fit: np.ndarray) -> tuple[indexes.Coarse | None, bool]:
        """(the coarse quantizer a build gets, whether an earlier build of the group trained it): one k-means
        per direction and nlist (on `fit`, fit_vectors') serves every float IVF index (indexes.shares_coarse);
        (None, False) for the others (flat, HNSW, and IVF over sign bits, which trains its own in build_index)."""
        if not indexes.shares_coarse(precision, index_type):
            return None, False
        key = (direction, indexes.ivf_lists(self.directions[direction].gallery.shape[0], params))
        reused = key in self.coarse
        if not reused:
            self.coarse[key] = indexes.train_coarse(np.ascontiguousarray(fit, dtype=np.float32), key[1])
        return self.coarse[key], reused

    def shared_full_ranks(self, precision: str, built: dict[str, FaissIndex], decode: tuple) -> dict[str, np.ndarray]:
        """The full ranking of each direction under the compressed scores of its index (`built`: direction ->
        index), computed once per decode (two_stage.decode_key: fp32 IVF / HNSW reuse the exact baseline's ranks,
        an HNSW index its flat twin's). The decoded gallery exists only while its ranking is computed.

        FAISS work (decoding, encoding the queries) runs here, on the calling (main) thread; only the numpy
        ranking goes to the pool. Why: an OpenMP region entered from a pool thread leaves that thread an OpenMP
        team of its own for as long as the pool lives, and once the process holds more OpenMP threads than
        cores, libgomp stops spin-waiting between parallel regions: every later FAISS search pays a wake-up
        per call (measured on 2 cores: binary flat search of the Flickr8k test captions 455k -> 149k
        queries/s after one reconstruct_n in a pool thread; tests/test_run_experiments.py checks the rule)."""
        jobs = {}
        for direction, index in built.items():
            key = (direction,) + decode
            if key in self.ranks:
                continue
            data = self.directions[direction]
            queries = two_stage.compressed_queries(precision, data.queries, index)
            gallery = two_stage.decoded_gallery(index, precision, data.gallery)
            jobs[key] = self.pool.submit(self.full_ranks, direction, queries, gallery)
        for key, job in jobs.items():  # each key is one job: no two threads fill the same one
            self.ranks[key] = job.result()
        return {direction: self.ranks[(direction,) + decode] for direction in built}
