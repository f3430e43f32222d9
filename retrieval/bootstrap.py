"""Percentile bootstrap intervals for recall and MRR, from the per-query ranks a sweep stores next to
each run JSON (`runs/<run_id>.ranks.npz`: `t2i` / `i2t` ranks, 1-based, inf = miss, and `text_to_image`).

The resampling unit is the IMAGE. A resample draws the split's images with replacement; text→image
takes every caption of each drawn image, image→text the image itself. The captions of one image share
that image's difficulty (a hard photo loses all five), so resampling captions one by one would treat
five correlated queries as five independent ones and give intervals that are too narrow.

Paired differences: every run measured on the same split (the same text_to_image) is resampled with the
SAME draws, so "run minus its fp32 exact baseline" is computed on each resample and its interval only
holds the noise that does not cancel between the two runs.

Why it is fast: a resample is a row of per-image counts W [B, N_images] (a multinomial draw). Each run's
ranks are reduced once to per-image sums (text→image: captions with rank <= K and the sum of 1/rank per
image, and the captions per image; image→text: hit <= K and 1/rank), so every statistic of every
resample is W @ numerator / W @ denominator: one matrix product for a block of runs.
"""
from __future__ import annotations

import os
import re
import zipfile
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from retrieval.errors import UserError
from retrieval.io import ranks_path
from retrieval.io import read_ranks as read_ranks_file
from retrieval.metrics import DIRECTIONS, summarize

UNIT = "image"
UNIT_DETAIL = ("a resample draws the split's images with replacement and takes every caption of each drawn image "
               "for text→image, the image itself for image→text")
# A rank file must give the run JSON's R@K (in %) and MRR back to this precision, or it is not trusted.
TOLERANCE = 1e-6
RUNS_PER_BLOCK = 64  # runs per matrix product at most: bounds memory at B x (64 x 3 x metrics) floats
# Memory bounds, so that no resample count can ask for more than a few hundred MiB at once: the draws W are
# made and multiplied DRAW_BLOCK_BYTES of rows at a time (one block, cached, for the default counts, so
# their numbers are unchanged), and a product holds at most SAMPLE_BYTES of resampled statistics (fewer runs
# per block as B grows). The percentile interval needs every resample of a statistic at once (B x 8 bytes
# each), so B itself is capped: MAX_RESAMPLES keeps one run's ~20 statistics near 160 MB.
DRAW_BLOCK_BYTES = 128 << 20
SAMPLE_BYTES = 256 << 20
MAX_RESAMPLES = 1_000_000
NO_RANK_FILE = "no rank file (run written before run_experiments.py stored ranks)"


@dataclass(frozen=True)
class Settings:
    resamples: int
    confidence: float
    seed: int

    def record(self) -> dict[str, Any]:
        """What the summary JSON states about the method."""
        return {"method": "percentile bootstrap, paired on the same resamples", "resamples": self.resamples,
                "confidence": self.confidence, "seed": self.seed, "unit": UNIT, "unit_detail": UNIT_DETAIL}


@dataclass(frozen=True)
class RunRanks:
    """One run's ranks reduced to per-image sums: columns are metrics ('t2i_R@1', ..., 'i2t_MRR')."""
    split: tuple[int, bytes]  # (n_images, bytes of text_to_image): runs with the same split can be paired
    columns: list[str]
    numerators: np.ndarray  # [n_images, len(columns)]: R@K hits x 100, or the sum of 1/rank
    direction: np.ndarray   # [len(columns)] index into DIRECTIONS of each column


def rank_path(results_dir: str, run: Mapping[str, Any]) -> str:
    """The run's rank file: beside its JSON (io.ranks_path)."""
    return ranks_path(os.path.join(results_dir, run["_file"]))


def k_values(metrics: Mapping[str, Any], direction: str) -> list[int]:
    """The K of every R@K the metrics hold for `direction`, ascending."""
    return sorted(int(m.group(1)) for m in (re.fullmatch(fr"{direction}_R@(\d+)", key) for key in metrics) if m)


def read_ranks(path: str, metrics: Mapping[str, Any]
               ) -> tuple[dict[str, np.ndarray], np.ndarray, None] | tuple[None, None, str]:
    """The rank file as {direction: ranks} and text_to_image, or (None, None, reason it cannot be used).

    The ranks must reproduce the run JSON's R@K and MRR: a file that does not is stale or foreign.
    """
    if not os.path.exists(path):
        return None, None, NO_RANK_FILE
    try:
        arrays = read_ranks_file(path)
    except (OSError, ValueError, zipfile.BadZipFile) as e:
        return None, None, f"rank file {os.path.basename(path)} unreadable ({e})"
    text_to_image = arrays.get("text_to_image")
    ranks = {d: np.asarray(arrays[d], dtype=np.float64) for d in DIRECTIONS if d in arrays}
    if text_to_image is None or not ranks:
        return None, None, f"rank file {os.path.basename(path)} lacks text_to_image or ranks"
    text_to_image = np.asarray(text_to_image, dtype=np.int64)
    fault = _split_fault(text_to_image)
    if fault:
        return None, None, f"rank file {os.path.basename(path)}: {fault}"
    n_images = int(text_to_image.max()) + 1
    expected = {"t2i": text_to_image.size, "i2t": n_images}
    for direction, values in ranks.items():
        if values.shape != (expected[direction],):
            return None, None, f"rank file: {direction} has {values.size} ranks, expected {expected[direction]}"
        if np.isnan(values).any() or (values < 1).any():
            # A rank below 1 would give 1/rank > 1 or infinite, NaN a NaN statistic: neither is a measurement.
            return None, None, f"rank file: {direction} has ranks that are NaN or below 1 (1-based, inf = miss)"
        fault = _mismatch(values, metrics, direction)
        if fault:
            return None, None, f"rank file does not reproduce the run's {fault}"
    return ranks, text_to_image, None


def _split_fault(text_to_image: np.ndarray) -> str | None:
    """Why text_to_image cannot be resampled by image, or None. Every image needs a caption: a resample of
    only caption-less images would divide by 0 queries."""
    if not text_to_image.size:
        return "text_to_image is empty"
    if text_to_image.min() < 0:
        return "text_to_image has a negative image index"
    missing = np.flatnonzero(np.bincount(text_to_image) == 0)
    if missing.size:
        return f"{missing.size} images have no caption in text_to_image (first: {int(missing[0])})"
    return None


def _mismatch(ranks: np.ndarray, metrics: Mapping[str, Any], direction: str) -> str | None:
    """'t2i_R@1 (JSON 45.0, ranks 44.8)' for the first metric the ranks do not give back, else None."""
    summary = summarize(ranks, k_values(metrics, direction))   # the protocol's own formulas
    recomputed = {f"{direction}_{key}": value for key, value in summary.items() if key.startswith("R@") or key == "MRR"}
    for key, value in recomputed.items():
        stored = metrics.get(key)
        if isinstance(stored, (int, float)) and abs(stored - value) > TOLERANCE * max(1.0, abs(stored)):
            return f"{key} (JSON {stored:g}, ranks {value:g})"
    return None


def per_image(ranks: Mapping[str, np.ndarray], text_to_image: np.ndarray, metrics: Mapping[str, Any]) -> RunRanks:
    """RunRanks of one run: for each direction its R@K (K from the run's metrics) and MRR summed per image."""
    n_images = int(text_to_image.max()) + 1
    columns, blocks, direction_index = [], [], []
    for d_index, direction in enumerate(DIRECTIONS):
        if direction not in ranks:
            continue
        values = ranks[direction]
        per_query = [100.0 * (values <= k) for k in k_values(metrics, direction)] + [1.0 / values]
        if direction == "t2i":
            sums = [np.bincount(text_to_image, weights=v, minlength=n_images) for v in per_query]
        else:
            sums = per_query
        blocks.append(np.stack(sums, axis=1))
        names = [f"{direction}_R@{k}" for k in k_values(metrics, direction)] + [f"{direction}_MRR"]
        columns += names
        direction_index += [d_index] * len(names)
    return RunRanks(split=(n_images, text_to_image.tobytes()), columns=columns,
                    numerators=np.concatenate(blocks, axis=1), direction=np.asarray(direction_index))


def load(results_dir: str, runs: Mapping[str, Mapping[str, Any]]) -> tuple[dict[str, RunRanks], dict[str, str]]:
    """({run_id: RunRanks} of the runs whose rank file is usable, {run_id: reason} of the others); runs is
    {run_id: run JSON as loaded, with '_file' relative to results_dir}."""
    ranked, notes = {}, {}
    for run_id, run in runs.items():
        metrics = run.get("metrics") or {}
        ranks, text_to_image, reason = read_ranks(rank_path(results_dir, run), metrics)
        if reason:
            notes[run_id] = reason
        else:
            ranked[run_id] = per_image(ranks, text_to_image, metrics)
    return ranked, notes


def check_resamples(resamples: int, flag: str = "--bootstrap") -> None:
    """UserError for a resample count outside [0, MAX_RESAMPLES], with the memory it would take."""
    if resamples < 0:
        raise UserError(f"{flag} {resamples}: must be >= 0 (0 = no intervals)")
    if resamples > MAX_RESAMPLES:
        per_statistic = resamples * 8 / 2 ** 30
        raise UserError(f"{flag} {resamples}: at most {MAX_RESAMPLES} resamples (a percentile interval keeps every "
                        f"resample of its statistic: {per_statistic:.2f} GiB per statistic, "
                        f"{20 * per_statistic:.1f} GiB for one run's ~20); 1000 to 10000 give stable intervals")


def draws(n_images: int, resamples: int, seed: int) -> np.ndarray:
    """[resamples, n_images] counts of each image in each resample (n_images images drawn with replacement).

    The same seed gives the same draws; more resamples append rows (numpy draws row after row).
    """
    blocks = list(draw_blocks(n_images, resamples, seed, max(1, resamples)))
    return np.concatenate(blocks) if blocks else np.zeros((0, n_images))


def draw_blocks(n_images: int, resamples: int, seed: int, rows: int) -> Iterator[np.ndarray]:
    """The rows of draws(n_images, resamples, seed), `rows` at a time: one generator drawing row after
    row gives the same counts whether they are asked for at once or in blocks."""
    rng = np.random.default_rng(seed)
    for start in range(0, resamples, rows):
        size = min(rows, resamples - start)
        yield rng.multinomial(n_images, np.full(n_images, 1.0 / n_images), size=size).astype(np.float64)


def denominators(text_to_image: np.ndarray, n_images: int) -> np.ndarray:
    """[n_images, len(DIRECTIONS)]: queries per image in each direction (its captions; the image itself)."""
    return np.stack([np.bincount(text_to_image, minlength=n_images).astype(np.float64), np.ones(n_images)], axis=1)


class Resampler:
    """Draws per split (cached when they fit one block), shared by every run of that split, and the
    intervals computed on them."""

    def __init__(self, settings: Settings) -> None:
        check_resamples(settings.resamples)
        self.settings = settings
        self._splits: dict[tuple[int, bytes], list[tuple[np.ndarray, np.ndarray]]] = {}

    def blocks(self, key: tuple[int, bytes]) -> Iterable[tuple[np.ndarray, np.ndarray]]:
        """(W, W @ denominators) of a split's draws, block after block of rows; the same draws for every
        run of it. Draws that fit one block are kept; larger ones are drawn again for each use, so memory
        stays at one block whatever the resample count."""
        if key in self._splits:
            return self._splits[key]
        n_images, raw = key
        text_to_image = np.frombuffer(raw, dtype=np.int64)
        rows = max(1, DRAW_BLOCK_BYTES // (8 * n_images))
        made = ((weights, weights @ denominators(text_to_image, n_images)) for weights in
                draw_blocks(n_images, self.settings.resamples, self.settings.seed, rows))
        if self.settings.resamples <= rows:
            self._splits[key] = list(made)
            return self._splits[key]
        return made

    def resampled(self, key: tuple[int, bytes], numerators: np.ndarray, directions: np.ndarray | int) -> np.ndarray:
        """Every resample of the statistics numerators [n_images, C] (or [n_images]) of directions [C] (or
        one): W @ numerators / W @ denominators, [B, C] (or [B]), computed a block of draws at a time."""
        out = np.empty((self.settings.resamples,) + numerators.shape[1:])
        start = 0
        for weights, totals in self.blocks(key):
            out[start:start + len(weights)] = (weights @ numerators) / totals[:, directions]
            start += len(weights)
        return out

    def runs_per_block(self, runs: list[RunRanks]) -> int:
        """How many runs one product takes: RUNS_PER_BLOCK, fewer where their statistics (values and
        differences, 2 x columns each) would pass SAMPLE_BYTES."""
        widest = max(len(run.columns) for run in runs)
        return int(min(RUNS_PER_BLOCK, max(1, SAMPLE_BYTES // (16 * widest * max(1, self.settings.resamples)))))

    def bounds(self, samples: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Percentile interval of each column of samples [B, C] → (low [C], high [C])."""
        tail = 100.0 * (1.0 - self.settings.confidence) / 2.0
        low, high = np.percentile(samples, [tail, 100.0 - tail], axis=0)
        return low, high

    def difference(self, run: RunRanks, other: RunRanks, metric: str) -> tuple[float, float] | None:
        """Paired difference run - other of one metric: (its interval low, high), or None when the runs
        were not measured on the same split or lack the metric."""
        if run.split != other.split or metric not in run.columns or metric not in other.columns:
            return None
        i, j = run.columns.index(metric), other.columns.index(metric)
        samples = self.resampled(run.split, run.numerators[:, i] - other.numerators[:, j], run.direction[i])
        low, high = self.bounds(samples[:, None])
        return float(low[0]), float(high[0])

    def intervals(self, runs: Mapping[str, RunRanks], baselines: Mapping[str, str]
                  ) -> dict[str, dict[str, float]]:
        """{run_id: {column: value}} for runs {run_id: RunRanks}; baselines {run_id: baseline run_id}.

        Columns per metric m: m_ci_low, m_ci_high and, paired with the baseline, m_delta, m_delta_ci_low,
        m_delta_ci_high; RSUM the same way when a run has both directions.
        """
        by_split = {}
        for run_id, run in runs.items():
            by_split.setdefault(run.split, []).append(run_id)
        out = {}
        for key, ids in by_split.items():
            size = self.runs_per_block([runs[run_id] for run_id in ids])
            for start in range(0, len(ids), size):
                block = ids[start:start + size]
                out.update(self._block(key, block, runs, baselines))
        return out

    def _block(self, key: tuple[int, bytes], ids: list[str], runs: Mapping[str, RunRanks],
               baselines: Mapping[str, str]) -> dict[str, dict[str, float]]:
        """One matrix product for a block of runs of one split: values and paired differences."""
        numerators, directions, targets = [], [], []
        for run_id in ids:
            run, base = runs[run_id], runs.get(baselines.get(run_id))
            numerators.append(run.numerators)
            directions.append(run.direction)
            targets += [(run_id, m, "") for m in run.columns]
            if base is not None and base.split == run.split:
                shared = [m for m in run.columns if m in base.columns]
                numerators.append(run.numerators[:, [run.columns.index(m) for m in shared]]
                                  - base.numerators[:, [base.columns.index(m) for m in shared]])
                directions.append(run.direction[[run.columns.index(m) for m in shared]])
                targets += [(run_id, m, "_delta") for m in shared]
        samples = self.resampled(key, np.concatenate(numerators, axis=1), np.concatenate(directions))
        samples, targets = _with_rsum(samples, targets)
        low, high = self.bounds(samples)
        out = {run_id: {} for run_id in ids}
        for (run_id, metric, kind), lo, hi in zip(targets, low, high):
            out[run_id][f"{metric}{kind}_ci_low"], out[run_id][f"{metric}{kind}_ci_high"] = float(lo), float(hi)
        return out


def _with_rsum(samples: np.ndarray, targets: list[tuple[str, str, str]]
               ) -> tuple[np.ndarray, list[tuple[str, str, str]]]:
    """Append RSUM (sum of R@K over both directions) per run and kind where the run has both directions."""
    groups = {}
    for index, (run_id, metric, kind) in enumerate(targets):
        if "_R@" in metric:
            groups.setdefault((run_id, kind), []).append(index)
    extra, names = [], []
    for (run_id, kind), indexes in groups.items():
        if {targets[i][1].split("_")[0] for i in indexes} == set(DIRECTIONS):
            extra.append(samples[:, indexes].sum(axis=1))
            names.append((run_id, "RSUM", kind))
    if not extra:
        return samples, targets
    return np.concatenate([samples, np.stack(extra, axis=1)], axis=1), targets + names


# ----------------------------------------------------------------------------- resampled values, joint intervals

class Pairing:
    """The ranked runs of a results folder with the resampler that draws their splits: paired intervals
    (called as paired(a, b, metric), as tables.py does), and the resampled values themselves, for statistics
    that combine several runs (a decomposition's parts, an optimism across splits, a family's joint
    intervals). Every run of one split is resampled with the same draws, so any difference of their
    resampled values is paired. A Pairing without runs (no intervals) answers None everywhere."""

    def __init__(self, ranked: Mapping[str, RunRanks] | None = None, resampler: Resampler | None = None) -> None:
        self.ranked = dict(ranked or {})
        self.resampler = resampler
        self._cache: dict[tuple[str, str], np.ndarray] = {}   # (run, metric) -> [B], up to SAMPLE_BYTES in all

    def __call__(self, a: str, b: str, metric: str) -> tuple[float, float] | None:
        samples = self.linear([(a, metric, 1.0), (b, metric, -1.0)])
        return None if samples is None else self.interval(samples)

    @property
    def confidence(self) -> float | None:
        return self.resampler.settings.confidence if self.resampler else None

    def linear(self, terms: Iterable[tuple[str, str, float]]) -> np.ndarray | None:
        """[B] resampled values of sum(weight x metric(run)) over terms (run_id, metric, weight), or None when a
        run has no usable ranks, lacks the metric, or the runs were measured on different splits."""
        terms = list(terms)
        if self.resampler is None or not terms or any(run not in self.ranked for run, _, _ in terms):
            return None
        runs = [self.ranked[run] for run, _, _ in terms]
        if any(r.split != runs[0].split for r in runs) or any(m not in r.columns for r, (_, m, _) in zip(runs, terms)):
            return None
        total = np.zeros(self.resampler.settings.resamples)
        for run, metric, weight in terms:
            total += weight * self._values(run, metric)
        return total

    def _values(self, run: str, metric: str) -> np.ndarray:
        """[B] resampled values of one run's metric, kept while the kept ones stay under SAMPLE_BYTES: a
        decomposition and a family read each run many times (differences of kept values are paired, as every
        value of a split is drawn with the same W)."""
        key = (run, metric)
        if key in self._cache:
            return self._cache[key]
        ranks = self.ranked[run]
        i = ranks.columns.index(metric)
        values = self.resampler.resampled(ranks.split, ranks.numerators[:, i], int(ranks.direction[i]))
        if (len(self._cache) + 1) * values.nbytes <= SAMPLE_BYTES:
            self._cache[key] = values
        return values

    def interval(self, samples: np.ndarray) -> tuple[float, float]:
        """The percentile interval of one statistic's resampled values [B]."""
        low, high = self.resampler.bounds(np.asarray(samples)[:, None])
        return float(low[0]), float(high[0])

    def split_of(self, run: str) -> tuple[int, bytes] | None:
        return self.ranked[run].split if run in self.ranked else None


def simultaneous(samples: np.ndarray, estimates: np.ndarray, confidence: float) -> tuple[np.ndarray, np.ndarray, float]:
    """Joint intervals for a family of J statistics from their resampled values samples [B, J] (the same
    resamples for all) and their estimates [J]: the max-statistic method. Each resample's largest studentised
    deviation max_j |samples_bj - estimate_j| / se_j is the statistic whose `confidence` quantile c bounds
    every member at once, so estimate_j +- c se_j covers all J true values together with that probability
    (as far as the bootstrap imitates sampling). se_j is the spread of member j's resamples; a member with
    none (the same on every image) gets the interval [estimate, estimate] and takes no part in the maximum.
    Returns (low [J], high [J], c)."""
    samples, estimates = np.asarray(samples, dtype=np.float64), np.asarray(estimates, dtype=np.float64)
    se = samples.std(axis=0, ddof=1) if len(samples) > 1 else np.zeros(samples.shape[1])
    varies = se > 1e-12 * np.maximum(1.0, np.abs(estimates))
    if not varies.any():
        return estimates.copy(), estimates.copy(), 0.0
    deviation = np.abs(samples[:, varies] - estimates[varies]) / se[varies]
    critical = float(np.quantile(deviation.max(axis=1), confidence))
    half = np.where(varies, critical * se, 0.0)
    return estimates - half, estimates + half, critical
