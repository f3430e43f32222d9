"""The summary's tables, each computed from the frame of one group's runs (frame.py): Pareto frontiers, the mean
of every factor level, the best configuration per memory budget, gallery scaling, the out-of-distribution gap,
the memory frontier beside its baselines, re-ranking gains, and what dimension reduction and each --dim_method
keep. Every table is a list (or dict) of JSON-ready rows; analysis.py puts them in the summary.
"""
from __future__ import annotations

import math

import numpy as np
import pandas as pd

from retrieval.frame import Paired, clean, difference, no_pairs, ratio, records, speed_column, zero_base_note
from retrieval.metrics import DIRECTIONS
from retrieval.runs import OOD_KEYS, family_label, index_label

# Frontier costs, and whether less of that cost is better. total_bytes_per_vector adds the fp32 vectors that
# a re-ranked configuration reads in stage 2 to the index's bytes.
PARETO_COSTS = (("bytes_per_vector", True), ("total_bytes_per_vector", True), ("latency_p50_ms", True),
                ("qps", False))
MEMORY_COSTS = ("bytes_per_vector", "total_bytes_per_vector")


def pareto_frontier(frame: pd.DataFrame, cost: str, value: str, lower_cost_is_better: bool = True) -> pd.DataFrame:
    """Rows on the Pareto frontier of (cost, value): no other row is at least as cheap AND better.

    Returns the frontier rows sorted from cheapest to most expensive. Among rows with the same cost
    only the best value can be on the frontier; exact ties keep the first row in frame order.
    """
    data = frame.dropna(subset=[cost, value])
    if data.empty:
        return data
    data = data.assign(_order=np.arange(len(data)))
    ascending_cost = lower_cost_is_better
    data = data.sort_values([cost, value, "_order"], ascending=[ascending_cost, False, True], kind="stable")
    best, keep = -math.inf, []
    for index, row in data.iterrows():
        if row[value] > best:
            keep.append(index)
            best = row[value]
    return data.loc[keep].drop(columns="_order")


def factor_means(frame: pd.DataFrame, metrics: list[str]) -> dict:
    """Mean of each metric (and memory/speed) for every value of dim, precision and candidate set."""
    extra = [c for c in ("bytes_per_vector", "qps", "latency_p50_ms") if c in frame.columns]
    out = {}
    for factor, column in (("dim", "dim"), ("precision", "precision"), ("candidate_size", "candidate"),
                           ("index", "index"), ("dim_method", "dim_method")):
        values = frame[column].dropna().unique()
        if factor in ("index", "dim_method") and len(values) < 2:
            continue  # only a factor when it varies
        table = {}
        for level, part in frame.groupby(column, sort=True):
            entry = {"runs": int(len(part))}
            for col in metrics + extra:
                entry[col] = clean(pd.to_numeric(part[col], errors="coerce").mean())
            table[str(clean(level))] = entry
        out[factor] = table
    directions = {}
    for d in DIRECTIONS:
        cols = [c for c in metrics if c.startswith(f"{d}_")]
        if cols:
            directions[d] = {c[len(d) + 1:]: clean(pd.to_numeric(frame[c], errors="coerce").mean()) for c in cols}
    out["direction"] = directions
    return out


def budget_table(frame: pd.DataFrame, metric: str, cost: str = "bytes_per_vector") -> list[dict]:
    """Best configuration (by `metric`) within each power-of-two budget of `cost` (bytes_per_vector: the index;
    total_bytes_per_vector: the index plus the fp32 vectors re-ranking reads). Keys budget_<cost>, <cost>."""
    data = frame.dropna(subset=[cost, metric])
    if data.empty:
        return []
    # Powers of two from below the cheapest to above the dearest (a cost of 0 counts as 1e-9: log2 needs > 0).
    low = 2 ** math.floor(math.log2(max(data[cost].min(), 1e-9)))
    high = 2 ** math.ceil(math.log2(max(data[cost].max(), 1e-9)))
    rows, budget = [], low
    while budget <= high:
        fits = data[data[cost] <= budget]
        if not fits.empty:
            # Ties on the metric go to the smaller configuration.
            best = fits.sort_values([metric, cost], ascending=[False, True], kind="stable").iloc[0]
            rows.append({f"budget_{cost}": clean(budget), "metric": metric, "value": clean(best[metric]),
                         **_value_interval(best, metric), "run_id": best["run_id"], "label": best["label"],
                         **{c: clean(best[c]) for c in MEMORY_COSTS}, "candidates": int(len(fits))})
        budget *= 2
    return rows


def _value_interval(row, metric):
    """value_ci_low / value_ci_high of a metric from its bootstrap columns (None when there are none)."""
    return {"value_ci_low": clean(row.get(f"{metric}_ci_low")), "value_ci_high": clean(row.get(f"{metric}_ci_high"))}


def _delta_interval(row, metric):
    """delta, delta_ci_low, delta_ci_high of a metric against the run's baseline (None when not measured)."""
    return {key: clean(row.get(f"{metric}_{key}")) for key in ("delta", "delta_ci_low", "delta_ci_high")}


def pareto_fronts(main: pd.DataFrame, metrics: list[str]) -> dict[str, dict[str, tuple[str, pd.DataFrame]]]:
    """{cost: {metric: (cost column, frontier rows)}} for every cost in PARETO_COSTS."""
    fronts = {}
    for cost, lower_is_better in PARETO_COSTS:
        fronts[cost] = {}
        for m in metrics:
            # Recall of one direction against the speed of that same direction.
            column = cost if cost in MEMORY_COSTS or m == "RSUM" else speed_column(main, cost, m.split("_")[0])
            fronts[cost][m] = (column, pareto_frontier(main, column, m, lower_cost_is_better=lower_is_better))
    return fronts


def pareto_records(fronts: dict[str, dict[str, tuple[str, pd.DataFrame]]]) -> dict:
    """pareto_fronts as JSON rows: run_id, label, the cost column (named in cost_column) and the metric."""
    out = {}
    for cost, by_metric in fronts.items():
        out[cost] = {m: [dict(r, cost_column=column) for r in records(front, ["run_id", "label", column, m])]
                     for m, (column, front) in by_metric.items()}
    return out


def scaling_table(done: pd.DataFrame, recalls: list[str], paired: Paired = no_pairs) -> list[dict]:
    """Configurations measured at more than one gallery size: metric/speed/memory per size, and the change of
    the first recall against the smallest gallery with its paired interval (the queries are the same)."""
    rows, head = [], recalls[0] if recalls else None
    for label, part in done.groupby("label", sort=True):
        if part["gallery_size"].nunique() < 2:
            continue
        part = part.sort_values("gallery_size")
        table = records(part, ["label", "gallery_size", "distractors", "distractors_synthetic", "run_id"] + recalls[:1]
                        + [r for r in recalls if r.startswith("i2t")][:1]
                        + ["qps", "latency_p50_ms", "index_bytes", "bytes_per_vector"])
        if head:
            first = table[0]
            for row in table:
                interval = paired(row["run_id"], first["run_id"], head) or (None, None)
                row.update(_cleaned([{"change": difference(row[head], first[head]),
                                      "change_ci_low": interval[0], "change_ci_high": interval[1]}])[0])
        rows += table
    return rows


def ood_gap_table(done: pd.DataFrame, main_gallery: int | None) -> list[dict]:
    """Per gallery size above the real one, from its fp32 exact run: the distractors and the sweep's
    out-of-distribution numbers (ood_text_top1_cosine, ood_image_top1_cosine, ood_gap)."""
    columns = [f"ood_{key}" for key in OOD_KEYS]
    if main_gallery is None or not set(columns) <= set(done.columns):
        return []
    rows = done[done["exact"] & (done["gallery_size"] > main_gallery) & done[columns[0]].notna()]
    return records(rows.sort_values(["gallery_size", "run_id"]),
                   ["gallery_size", "distractors", "distractors_synthetic", "dim", "run_id"] + columns)


def _covers_gallery(row):
    """A re-ranked run whose C is the whole gallery: its stage 2 is exact fp32 search."""
    return bool(row["rerank"] and pd.notna(row["gallery_size"]) and row["candidate_size"] >= row["gallery_size"])


def _cleaned(rows):
    return [{k: clean(v) for k, v in row.items()} for row in rows]


def memory_frontier_table(main: pd.DataFrame, front: pd.DataFrame, metric: str,
                          cost: str = "bytes_per_vector") -> list[dict]:
    """The compressed runs on the memory frontier of `metric` (memory = `cost`), each beside its fp32 exact
    baseline: what that step down in bytes keeps of the metric, with the paired interval of the difference,
    and what it does to the speed of the metric's direction.
    """
    baselines = {r["run_id"]: r for _, r in main[main["exact"]].iterrows()}
    direction = metric.split("_")[0]
    rows = []
    for _, row in front.iterrows():
        base = baselines.get(row.get("baseline_run"))
        if base is None or row["exact"]:
            continue
        entry = {"run_id": row["run_id"], "label": row["label"], "baseline_run": base["run_id"],
                 "value": row[metric], "baseline_value": base[metric], "retention": row[f"retention_{metric}"],
                 **_value_interval(row, metric), **_delta_interval(row, metric), "memory": cost,
                 "bytes_per_vector": row["bytes_per_vector"], "baseline_bytes_per_vector": base["bytes_per_vector"],
                 "total_bytes_per_vector": row["total_bytes_per_vector"],
                 "memory_fraction": ratio(row[cost], base[cost]), "dim": row["dim"], "rerank": row["rerank"],
                 "candidate_size": row["candidate_size"], "gallery_size": row["gallery_size"],
                 "covers_gallery": _covers_gallery(row)}
        speed = _speed_comparison(row, base, direction)
        qps = f"{direction}_qps" if speed["speed_direction"] else "qps"
        note = zero_base_note({"retention": metric, "memory_fraction": cost, "qps_ratio": qps}, row, base)
        rows.append(dict(entry, **speed, ratio_note=note))
    return _cleaned(rows)


def _speed_comparison(row, base, direction):
    """Batch QPS and single-query p50 of a run and its baseline, in the direction's own columns when both
    runs timed it (else the plain ones); speed_direction is None when the plain QPS is compared."""
    def pick(name):
        column = f"{direction}_{name}"
        return column if pd.notna(row.get(column)) and pd.notna(base.get(column)) else name
    qps, p50 = pick("qps"), pick("latency_p50_ms")
    measured = pd.notna(row.get(qps)) and pd.notna(base.get(qps)) and base[qps] and row[qps]
    paired = {f"{kind}speedup{part}": clean(row.get(f"{direction}_{kind}speedup{part}"))
              for kind in ("", "latency_") for part in ("", "_ci_low", "_ci_high")}
    return {"speed_direction": direction if qps != "qps" else None,
            "qps": row.get(qps), "baseline_qps": base.get(qps), "qps_ratio": row[qps] / base[qps] if measured else None,
            "latency_p50_ms": row.get(p50), "baseline_latency_p50_ms": base.get(p50), **paired}


def reranking_table(main: pd.DataFrame, metric: str, paired: Paired = no_pairs) -> list[dict]:
    """Per precision x dim x index (and its knobs): the run without re-ranking beside the best re-ranked one
    (by `metric`), with the paired interval of the gain.

    stage1_recall: % of queries whose true item was among the best run's C stage-1 candidates.
    """
    stage1 = f"{metric.split('_')[0]}_stage1_recall"
    candidates = main[~main["exact"]]
    rows = []
    families = candidates.apply(lambda r: family_label(r) + index_label(r), axis=1) if len(candidates) else []
    for family, part in candidates.groupby(families, sort=False):
        plain = part[~part["rerank"]]
        reranked = part[part["rerank"]].dropna(subset=[metric])
        if plain.empty or reranked.empty or pd.isna(plain.iloc[0][metric]):
            continue
        plain, best = plain.iloc[0], reranked.loc[reranked[metric].idxmax()]
        interval = paired(best["run_id"], plain["run_id"], metric) or (None, None)
        rows.append({"precision": best["precision"], "dim": best["dim"], "index": best["index"],
                     "index_label": index_label(best), "family": family,
                     "plain_run": plain["run_id"], "plain_value": plain[metric],
                     "best_run": best["run_id"], "candidate_size": best["candidate_size"],
                     "best_value": best[metric], "gain": best[metric] - plain[metric],
                     "gain_ci_low": interval[0], "gain_ci_high": interval[1],
                     "stage1_recall": best.get(stage1), "gallery_size": best["gallery_size"],
                     "covers_gallery": _covers_gallery(best)})
    return _cleaned(rows)


def reduced_fp32(main: pd.DataFrame) -> pd.DataFrame:
    """fp32 flat runs at a reduced dim without re-ranking: what a dim reduction alone does."""
    return main[(main["precision"] == "fp32") & ~main["exact"] & ~main["rerank"]
                & (main["dim"] < main["native_dim"]) & (main["index"].fillna("flat") == "flat")]


def dim_reduction_table(main: pd.DataFrame, metric: str) -> list[dict]:
    """fp32 flat runs at a reduced dim without re-ranking, largest dim first: what the reduction alone keeps."""
    reduced = reduced_fp32(main).sort_values(["dim", "dim_method"], ascending=[False, True])
    reduced = reduced.dropna(subset=[f"retention_{metric}"])
    return _cleaned({"run_id": r["run_id"], "native_dim": r["native_dim"], "dim": r["dim"],
                     "dim_method": r["dim_method"], "value": r[metric], "retention": r[f"retention_{metric}"],
                     **_delta_interval(r, metric)}
                    for _, r in reduced.iterrows())


def dim_methods_table(main: pd.DataFrame, metric: str, paired: Paired) -> list[dict]:
    """Per reduced dim run with two or more --dim_method values (fp32 flat, no re-ranking): the best method by
    `metric` against each other one, with the paired interval of best - other (same queries, same gallery)."""
    rows = []
    reduced = reduced_fp32(main).dropna(subset=[metric])
    for dim, part in sorted(reduced.groupby("dim"), key=lambda item: -item[0]):
        if part["dim_method"].nunique() < 2:
            continue
        ordered = part.sort_values([metric, "dim_method"], ascending=[False, True])
        best = ordered.iloc[0]
        for _, other in ordered.iloc[1:].iterrows():
            interval = paired(best["run_id"], other["run_id"], metric) or (None, None)
            rows.append({"dim": dim, "native_dim": best["native_dim"], "best_method": best["dim_method"],
                         "best_run": best["run_id"], "best_value": best[metric], "other_method": other["dim_method"],
                         "other_run": other["run_id"], "other_value": other[metric],
                         "difference": best[metric] - other[metric],
                         "difference_ci_low": interval[0], "difference_ci_high": interval[1]})
    return _cleaned(rows)


def whole_gallery_candidates(main: pd.DataFrame) -> list[dict]:
    """Candidate sizes C that reach the whole image gallery (t2i re-ranks it all: exact fp32 at that dim).

    [{"candidate_size", "gallery_size", "runs"}]: a C that is not a real choice at this gallery size."""
    reranked = main[main["rerank"] & main["candidate_size"].notna() & main["gallery_size"].notna()]
    whole = reranked[reranked["candidate_size"] >= reranked["gallery_size"]]
    return [{"candidate_size": int(c), "gallery_size": int(g), "runs": int(len(part))}
            for (c, g), part in whole.groupby(["candidate_size", "gallery_size"], sort=True)]
