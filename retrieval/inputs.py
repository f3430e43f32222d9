"""What a sweep reads besides its settings: the evaluated hand-off files, the fit set each is fitted on,
the distractor rows that pad a gallery (from files, or Gaussian ones fitted to the fit set), the content
fingerprint of every file read (what a run file records as its "inputs"), and the query sample of a file
(--max_queries: whole images with every caption of each).

Faults the user can fix raise retrieval.errors.UserError("<file or flag>: <fault>").
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import hashlib
import os
from typing import NamedTuple

import numpy as np

from retrieval import metrics
from retrieval.errors import UserError
from retrieval.handoff import Embeddings, l2_normalize, read_embeddings
from retrieval.sweep_settings import SweepSettings

GAUSSIAN = "gaussian"
SPLIT_PREFIX = "split:"
# The gallery a direction searches, as (modality in a fit set / distractor record, Embeddings field).
GALLERY_ROWS = {"t2i": ("images", "image_embeddings"), "i2t": ("texts", "text_embeddings")}
# fingerprint()'s cache, in memory for this process: (absolute path, size, mtime_ns) -> sha256.
_FINGERPRINTS: dict[tuple, str] = {}


@dataclasses.dataclass(frozen=True)
class FitSet:
    """The vectors an evaluated file's quantizers / PCA / Gaussian distractors are fitted on, and where they
    came from. distractor_paths / distractor_rows: only with distractor files read (the files, in order, and
    the rows they hold for every gallery that runs); None otherwise. fingerprints: {normalised path: sha256}
    of each file the evaluated file's runs may depend on (itself, the fit file, the distractor files)."""
    source: str  # "--fit_path" or "gallery (no --fit_path)"
    path: str
    images: np.ndarray
    texts: np.ndarray
    distractor_paths: list[str] | None = None
    distractor_rows: int | None = None
    fingerprints: dict[str, str] | None = None

    @property
    def size(self) -> int:
        """Vectors per modality the quantizers train on (the smaller modality bounds both)."""
        return min(self.images.shape[0], self.texts.shape[0])

    def record(self) -> dict:
        """What a run file states about its fit set."""
        return {"source": self.source, "path": self.path, "images": int(self.images.shape[0]),
                "texts": int(self.texts.shape[0])}


class Inputs(NamedTuple):
    """load_inputs' result: per evaluated file (path, Embeddings), its FitSet, and its distractor rows
    ({"images": rows, "texts": rows}; None = Gaussian distractors, or no gallery size above the real one)."""
    files: list[tuple[str, Embeddings]]
    fits: list[FitSet]
    distractors: list[dict | None]


def load_inputs(settings: SweepSettings, data_paths: list[str], fit_paths: list[str],
                pool: concurrent.futures.Executor) -> Inputs:
    """Every file a sweep reads, each read and fingerprinted once (in parallel on `pool`). Raises UserError."""
    prints = {}
    files = read_all(data_paths, pool, prints)
    fit_files = read_all(fit_paths, pool, prints)
    paths = {path: distractor_paths(settings, path) for path in data_paths}  # checks the flag before any reading
    # Distractor files are read (once each) only when some gallery size could need them.
    wanted = list(dict.fromkeys(p for ps in paths.values() for p in ps)) if settings.gallery_sizes else []
    loaded = dict(read_all(wanted, pool, prints))
    fits = fit_sets(settings, files, fit_files, loaded, prints)
    most = max(settings.gallery_sizes, default=0)
    distractors = [distractor_rows(settings, [loaded[p] for p in paths[path]], most - emb.image_embeddings.shape[0])
                   if loaded else None for path, emb in files]
    return Inputs(files, fits, distractors)


def read_all(paths: list[str], pool: concurrent.futures.Executor, prints: dict[str, str]
             ) -> list[tuple[str, Embeddings]]:
    """[(path, Embeddings)] of `paths`, read in parallel; each file's fingerprint is added to `prints`."""
    read = list(zip(paths, pool.map(read_embeddings, paths)))
    prints.update(zip((os.path.normpath(p) for p in paths), pool.map(lambda pair: fingerprint(*pair), read)))
    return read


def fingerprint(path: str, emb: Embeddings) -> str:
    """sha256 of the arrays every number of a sweep depends on (both vector sets and the caption -> image map,
    each with its dtype and shape), as loaded. Cached by (path, size, mtime_ns), so a file read twice in one
    process (evaluated and fitted on, say) is hashed once; the arrays, not the file's bytes, so rewriting the
    same vectors with other attributes or HDF5 layout keeps the fingerprint."""
    stat = os.stat(path)
    key = (os.path.abspath(path), stat.st_size, stat.st_mtime_ns)
    if key not in _FINGERPRINTS:
        digest = hashlib.sha256()
        for array in (emb.image_embeddings, emb.text_embeddings, emb.text_to_image):
            array = np.ascontiguousarray(array)
            digest.update(f"{array.dtype.str}{array.shape};".encode())
            digest.update(array)
        _FINGERPRINTS[key] = digest.hexdigest()
    return _FINGERPRINTS[key]


def inputs_record(fit: FitSet, config: dict) -> dict:
    """A run file's "inputs": the path and fingerprint of every file its numbers depend on: the evaluated file
    (config's data_path), its fit set's file, and the distractor files padding its gallery ([] for Gaussian
    ones or none)."""
    distractors = config.get("distractors") or {}
    files = [] if distractors.get("synthetic", True) else distractors["source"]

    def named(path):
        path = os.path.normpath(path)
        return {"path": path, "sha256": fit.fingerprints[path]}

    return {"data": named(config["data_path"]), "fit": named(fit.path), "distractors": [named(p) for p in files]}


def fit_sets(settings: SweepSettings, files: list[tuple[str, Embeddings]], fit_files: list[tuple[str, Embeddings]],
             loaded: dict[str, Embeddings], prints: dict[str, str]) -> list[FitSet]:
    """Per evaluated file: the FitSet of the --fit_path file with its native dim (else the file itself);
    loaded: the distractor files read ({path: Embeddings}), whose rows each file may use are counted; prints:
    every file's fingerprint (read_all)."""
    fits = []
    for path, emb in files:
        match = [(p, e) for p, e in fit_files if e.dim == emb.dim]
        if fit_files and not match:
            raise UserError(f"{path}: no --fit_path file has its native dim {emb.dim} "
                            f"(have {sorted({e.dim for _, e in fit_files})})")
        fit_path, fit_emb = match[0] if match else (path, emb)
        found, rows = None, None
        if loaded:
            found = distractor_paths(settings, path)
            rows = available_rows(settings, path, emb, found, loaded)
        used = [os.path.normpath(p) for p in [path, fit_path] + (found or [])]
        fits.append(FitSet("--fit_path" if match else "gallery (no --fit_path)", os.path.normpath(fit_path),
                           fit_emb.image_embeddings, fit_emb.text_embeddings, found, rows,
                           {p: prints[p] for p in used}))
    return fits


# ----------------------------------------------------------------------------- distractors

def distractor_paths(settings: SweepSettings, data_path: str) -> list[str]:
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


def sibling_split(data_path: str, split: str) -> str:
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


def distractor_record(settings: SweepSettings, path: str, extra: int) -> dict:
    """The config's distractors entry: their source (the files, in order, or "gaussian"), synthetic or not, and
    how many pad each gallery."""
    paths = distractor_paths(settings, path)
    return {"source": paths or GAUSSIAN, "synthetic": not paths, "count": extra}


def available_rows(settings: SweepSettings, path: str, emb: Embeddings, paths: list[str],
                   loaded: dict[str, Embeddings]) -> int:
    """Distractor rows the files hold for every gallery that runs (captions pad i2t, images t2i)."""
    for p in paths:
        if loaded[p].dim != emb.dim:
            raise UserError(f"{p}: dim {loaded[p].dim} != {path} dim {emb.dim}")
    return min(sum(getattr(loaded[p], GALLERY_ROWS[d][1]).shape[0] for p in paths) for d in settings.directions)


def distractor_rows(settings: SweepSettings, files: list[Embeddings], need: int) -> dict | None:
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


def gaussian_like(vectors: np.ndarray, count: int, rng: np.random.Generator) -> np.ndarray:
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


def padded_gallery(emb: Embeddings, fit: FitSet, extra: int, distractors: dict | None, seed: int,
                   directions: list[str]) -> dict[str, np.ndarray]:
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
            galleries[direction] = np.concatenate([real, gaussian_like(getattr(fit, modality), extra, rng)])
        else:
            galleries[direction] = np.concatenate([real, distractors[modality][:extra]])
    return galleries


def top1_cosines(queries: np.ndarray, gallery: np.ndarray, chunk: int, exclude_own: bool = False) -> np.ndarray:
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
    def complete(self) -> bool:
        return self.captions.size == self.file_text_to_image.size

    def pick(self, vectors: np.ndarray, direction: str) -> np.ndarray:
        """The query rows of a direction (captions for t2i, images for i2t); no copy when complete."""
        if self.complete:
            return vectors
        return vectors[self.captions if direction == "t2i" else self.images]

    def relevance(self, direction: str) -> tuple[np.ndarray, dict]:
        """metrics' relevance arguments for the picked queries: t2i, each caption's image row; i2t, each
        caption's sampled image and its gallery row (the file's captions are the i2t gallery's first rows)."""
        if direction == "t2i":
            return self.relevant_images, {}
        return self.text_to_image, {"caption_rows": self.captions}

    def exact_ranks(self, queries: np.ndarray, gallery: np.ndarray, direction: str, chunk_size: int) -> np.ndarray:
        """metrics.exact_ranks of the picked queries against the whole gallery (the protocol's ranks)."""
        text_to_image, rows = self.relevance(direction)
        return metrics.exact_ranks(queries, gallery, text_to_image, direction, chunk_size=chunk_size, **rows)

    def candidate_ranks(self, candidates: np.ndarray, direction: str) -> np.ndarray:
        """metrics.candidate_ranks of the picked queries' candidate lists (gallery rows)."""
        text_to_image, rows = self.relevance(direction)
        return metrics.candidate_ranks(candidates, text_to_image, direction, **rows)

    def record(self, max_queries: int, seed: int) -> dict:
        """What a run's config states about its queries."""
        return {"max_queries": max_queries, "seed": seed, "images": int(self.images.size),
                "images_total": int(self.file_text_to_image.max()) + 1, "captions": int(self.captions.size),
                "captions_total": int(self.file_text_to_image.size)}


def sample_queries(text_to_image: np.ndarray, max_queries: int, seed: int) -> QuerySample:
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
