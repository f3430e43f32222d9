"""The evaluation protocol: the one place that decides what counts as a hit.

    t2i (text -> image): every caption queries the split's images; exactly one image is relevant,
        the one the caption describes.
    i2t (image -> text): every image queries the split's captions; ALL of the image's captions are
        relevant, and the query's rank is the rank of its BEST-ranked relevant caption. So i2t R@K
        is a hit if ANY of the image's captions is in the top K (the CLIP_benchmark /
        Karpathy convention).

    Ties: an exact tie in score is broken by the lower gallery index first (what a stable sort of
    -score gives). exact_ranks implements this by counting, so it never depends on a sort order.
    Candidate lists: when only C candidates are returned (two-stage search), a relevant item that
    is not in the list is a miss: rank = inf, it scores 0 in R@K and MRR, and mean/median rank are
    reported as None because they are not defined without the full ranking.

Metrics (summarize): R@K in percent, MRR (mean of 1/rank, misses 0), mean and median rank
(1-based), and RSUM = sum of R@K over the given K values and both directions (with K = 1, 5, 10
this is the usual RSUM out of 600).
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

DIRECTIONS = ("t2i", "i2t")
DIRECTION_NAMES = {"t2i": "text→image", "i2t": "image→text"}  # how reports and plots name them


def relevant_pairs(text_to_image: np.ndarray, direction: str, caption_rows: np.ndarray | None = None
                   ) -> tuple[np.ndarray, np.ndarray, int]:
    """(query index, relevant gallery index) pairs and the number of queries for a direction.
    caption_rows: i2t, the gallery row of each caption (default: caption j is row j; a query sample passes
    the rows of its captions, which sit among all the file's captions)."""
    text_to_image = np.asarray(text_to_image, dtype=np.int64)
    captions = np.arange(text_to_image.size, dtype=np.int64) if caption_rows is None \
        else np.asarray(caption_rows, dtype=np.int64)
    if direction == "t2i":
        return captions, text_to_image, text_to_image.size
    if direction == "i2t":
        return text_to_image, captions, int(text_to_image.max()) + 1 if text_to_image.size else 0
    raise ValueError(f"direction must be 't2i' or 'i2t', got {direction!r}")


def _best_per_query(pair_query: np.ndarray, pair_rank: np.ndarray, num_queries: int) -> np.ndarray:
    best = np.full(num_queries, np.inf)
    np.minimum.at(best, pair_query, pair_rank)
    return best


def exact_ranks(queries: np.ndarray, gallery: np.ndarray, text_to_image: np.ndarray, direction: str,
                chunk_size: int = 1024, caption_rows: np.ndarray | None = None) -> np.ndarray:
    """Exact 1-based rank of each query's best relevant item under dot-product scores.

    queries: [Q, D] (captions for t2i, images for i2t); gallery: [N, D]. Scores are computed in
    chunks of chunk_size queries, and counted in blocks of at most chunk_size (query, relevant item)
    pairs, so memory stays bounded for large galleries whatever the number of relevant items per query:
    about 12 x chunk_size x N bytes at a time, never a [Q, N] matrix (extra distractor rows may follow
    the real gallery: they are never relevant). Ties go to the lower gallery index; the ranks do not
    depend on chunk_size.
    """
    pair_query, pair_item, num_queries = relevant_pairs(text_to_image, direction, caption_rows)
    queries = np.asarray(queries, dtype=np.float32)
    gallery = np.asarray(gallery, dtype=np.float32)
    if queries.shape[0] != num_queries:
        raise ValueError(f"{direction}: expected {num_queries} queries, got {queries.shape[0]}")
    order = np.argsort(pair_query, kind="stable")
    pair_query, pair_item = pair_query[order], pair_item[order]
    bounds = np.searchsorted(pair_query, np.arange(0, num_queries + chunk_size, chunk_size))
    pair_rank = np.empty(pair_query.size, dtype=np.float64)
    for start_q, (lo, hi) in zip(range(0, num_queries, chunk_size), zip(bounds[:-1], bounds[1:])):
        scores = queries[start_q:start_q + chunk_size] @ gallery.T
        # i2t has several relevant captions per query: a row of scores per pair for all of them at once
        # would multiply the chunk's memory by that number.
        for a in range(lo, hi, chunk_size):
            b = min(a + chunk_size, hi)
            pair_rank[a:b] = _pair_ranks(scores, pair_query[a:b] - start_q, pair_item[a:b])
    return _best_per_query(pair_query, pair_rank, num_queries)


def _pair_ranks(scores: np.ndarray, rows: np.ndarray, items: np.ndarray) -> np.ndarray:
    """1 + the items scored higher + the items tied before, per (row of scores, relevant item) pair.

    Two counting passes over the scores, and the items before the relevant one are scanned only in rows
    where another item ties with it (coarse codes: binary, int4): at a million items the counting, not
    the matrix product, was a third of the time."""
    row_scores = scores if np.array_equal(rows, np.arange(scores.shape[0])) else scores[rows]  # t2i: no copy
    relevant_score = row_scores[np.arange(rows.size), items][:, None]
    higher = np.count_nonzero(row_scores > relevant_score, axis=1)
    tied_before = np.zeros_like(higher)
    for i in np.flatnonzero(np.count_nonzero(row_scores == relevant_score, axis=1) > 1):
        tied_before[i] = np.count_nonzero(row_scores[i, :items[i]] == relevant_score[i, 0])
    return 1 + higher + tied_before


def candidate_ranks(candidates: np.ndarray, text_to_image: np.ndarray, direction: str,
                    caption_rows: np.ndarray | None = None) -> np.ndarray:
    """1-based rank of each query's best relevant item inside a returned candidate list.

    candidates: [Q, C] gallery indices in ranked order (-1 = empty slot, as FAISS pads). A relevant
    item that is not in the list gives inf (a miss).
    """
    candidates = np.asarray(candidates)
    pair_query, pair_item, num_queries = relevant_pairs(text_to_image, direction, caption_rows)
    if candidates.shape[0] != num_queries:
        raise ValueError(f"{direction}: expected {num_queries} candidate rows, got {candidates.shape[0]}")
    match = candidates[pair_query] == pair_item[:, None]
    found = match.any(axis=1)
    pair_rank = np.where(found, match.argmax(axis=1) + 1, np.inf).astype(np.float64)
    return _best_per_query(pair_query, pair_rank, num_queries)


def summarize(ranks: np.ndarray, k_values: Sequence[int] = (1, 5, 10)) -> dict[str, float | None]:
    """R@K (%), MRR, mean and median rank from 1-based ranks (inf = miss)."""
    ranks = np.asarray(ranks, dtype=np.float64)
    out = {f"R@{k}": float(100.0 * np.mean(ranks <= k)) for k in k_values}
    out["MRR"] = float(np.mean(1.0 / ranks))  # 1/inf = 0: a miss adds nothing
    complete = bool(np.isfinite(ranks).all())
    out["mean_rank"] = float(np.mean(ranks)) if complete else None
    out["median_rank"] = float(np.median(ranks)) if complete else None
    return out


def rsum(metrics: Mapping[str, float], k_values: Sequence[int] = (1, 5, 10),
         directions: Sequence[str] = DIRECTIONS) -> float:
    """Sum of R@K over k_values and directions from a flat metrics dict ('t2i_R@1', ...)."""
    return float(sum(metrics[f"{d}_R@{k}"] for d in directions for k in k_values))


def split_ranks(image_embeddings: np.ndarray, text_embeddings: np.ndarray, text_to_image: np.ndarray,
                directions: Sequence[str] = DIRECTIONS) -> dict[str, np.ndarray]:
    """{direction: 1-based ranks} of the exact full ranking of one split (the queries of each direction)."""
    return {direction: exact_ranks(text_embeddings, image_embeddings, text_to_image, "t2i") if direction == "t2i"
            else exact_ranks(image_embeddings, text_embeddings, text_to_image, "i2t") for direction in directions}


def from_ranks(ranks: Mapping[str, np.ndarray], k_values: Sequence[int] = (1, 5, 10)) -> dict[str, float | None]:
    """{direction: ranks} -> flat dict: t2i_R@1 ... i2t_median_rank, and RSUM over those directions."""
    metrics = {f"{direction}_{k}": v for direction, values in ranks.items()
               for k, v in summarize(values, k_values).items()}
    metrics["RSUM"] = rsum(metrics, k_values, list(ranks))
    return metrics


def evaluate(image_embeddings: np.ndarray, text_embeddings: np.ndarray, text_to_image: np.ndarray,
             k_values: Sequence[int] = (1, 5, 10), directions: Sequence[str] = DIRECTIONS) -> dict[str, float | None]:
    """Exact full-ranking evaluation of one split → flat dict: t2i_R@1 ... i2t_median_rank, RSUM."""
    return from_ranks(split_ranks(image_embeddings, text_embeddings, text_to_image, directions), k_values)


def format_metrics(metrics: Mapping[str, float | None], k_values: Sequence[int] = (1, 5, 10),
                   directions: Sequence[str] = DIRECTIONS) -> str:
    """One human line: 't2i R@1 30.1 R@5 ... | i2t ... | RSUM ...'."""
    parts = []
    for d in directions:
        items = " ".join(f"R@{k} {metrics[f'{d}_R@{k}']:.1f}" for k in k_values)
        mean_rank = metrics.get(f"{d}_mean_rank")
        tail = f" MRR {metrics[f'{d}_MRR']:.3f}"
        if mean_rank is not None:
            tail += f" medR {metrics[f'{d}_median_rank']:.0f} meanR {mean_rank:.1f}"
        parts.append(f"{d} {items}{tail}")
    return " | ".join(parts) + (f" | RSUM {metrics['RSUM']:.1f}" if "RSUM" in metrics else "")
