"""From a folder of sweep results (one JSON per configuration) to the numbers behind
analyze_results.py's summary, plots and REPORT.md: tables, Pareto frontiers, memory budgets and
the comparisons the findings quote. This module only computes; findings.py turns the stored tables
into sentences, report.py into the markdown document, plots.py into pictures.

Runs are grouped by (dataset, split, model) and content (runs.name_groups) of the file they were
measured on; every comparison happens inside one group: numbers from different datasets or encoders are never mixed.
Inside a group the headline analysis uses the real gallery (the smallest gallery size, see
main_runs); larger galleries (distractors added by `--gallery_sizes`) only feed the scaling tables.

Run files are read, upgraded and flattened into rows by retrieval/runs.py (the run record's one home);
this module starts from the frame of those rows (runs_frame).
"""
import math
import re
from collections import Counter

import numpy as np
import pandas as pd

from retrieval import bootstrap
from retrieval.metrics import DIRECTIONS
from retrieval.runs import CODEC_KEYS, KNOB_KEYS, OOD_KEYS, data_attrs, family_label, index_label, name_groups, \
    precision_rank, run_id, run_row

# Read from every run's "env" (environment_summary).
ENV_KEYS = ("hostname", "cpu", "cpu_count", "threads", "gpu", "git_commit", "python", "numpy", "faiss", "torch")
# Frontier costs, and whether less of that cost is better. total_bytes_per_vector adds the fp32 vectors that
# a re-ranked configuration reads in stage 2 to the index's bytes.
PARETO_COSTS = (("bytes_per_vector", True), ("total_bytes_per_vector", True), ("latency_p50_ms", True),
                ("qps", False))
MEMORY_COSTS = ("bytes_per_vector", "total_bytes_per_vector")
# What the report quotes about an fp32 exact baseline, besides its quality metrics.
BASELINE_COLUMNS = ["run_id", "label", "data_path", "bytes_per_vector", "total_bytes_per_vector", "qps",
                    "latency_p50_ms"]
BASELINE_EXTRA = ["dim"] + [f"{d}_{name}" for d in DIRECTIONS for name in ("qps", "latency_p50_ms")]
# Ratios of a run to its baseline (add_baseline_ratios) besides retention: ratio column -> measured column.
BASELINE_RATIOS = {"memory_fraction": "bytes_per_vector", "qps_ratio": "qps", "latency_ratio": "latency_p50_ms"}


def speed_column(frame, name, direction):
    """'t2i_latency_p50_ms' when the runs timed that direction, else the plain column."""
    column = f"{direction}_{name}"
    return column if column in frame.columns and frame[column].notna().any() else name


def runs_frame(runs):
    """DataFrame with one row per run, in a stable order (group, gallery, dim, precision, candidates, knobs)."""
    frame = pd.DataFrame(name_groups([run_row(run) for run in runs]))
    frame["_cand_order"] = frame.apply(
        lambda r: -1 if r["exact"] else (0 if not r["rerank"] else int(r["candidate_size"])), axis=1)
    frame["_precision_order"] = frame["precision"].map(precision_rank)
    order = ["group", "gallery_size", "dim", "_precision_order", "_cand_order", "index"] + list(KNOB_KEYS + CODEC_KEYS) + \
        ["run_id"]
    frame = frame.sort_values(order, na_position="first", kind="stable")
    return frame.drop(columns=["_cand_order", "_precision_order"]).reset_index(drop=True)


def completed(frame):
    """The runs that were measured (not skipped)."""
    return frame[frame["status"] == "ok"]


def main_runs(frame, gallery_size):
    """Completed runs at the group's main gallery size: the runs every headline table compares.

    gallery_size is the group's main_gallery_size; None (no run recorded one) keeps every completed run.
    """
    done = completed(frame)
    return done if gallery_size is None else done[done["gallery_size"] == gallery_size]


# ----------------------------------------------------------------------------- analysis helpers

def recall_columns(frame, directions=DIRECTIONS):
    """['t2i_R@1', 't2i_R@5', ...] present in the frame, K ascending."""
    cols = []
    for d in directions:
        ks = sorted(int(c.split("@")[1]) for c in frame.columns if re.fullmatch(fr"{d}_R@\d+", c))
        cols += [f"{d}_R@{k}" for k in ks]
    return cols


def metric_columns(frame):
    """The quality metrics averaged and compared: R@K, MRR per direction, then RSUM."""
    cols = recall_columns(frame)
    cols += [f"{d}_MRR" for d in DIRECTIONS if f"{d}_MRR" in frame.columns]
    if "RSUM" in frame.columns:
        cols.append("RSUM")
    return cols


def _clean(value):
    """JSON-friendly scalar: numpy → python, NaN (pandas' missing value) → None. An infinity is left as it is:
    the inputs are finite (split_invalid) and every ratio is guarded, so one is a bug, which io.write_json
    reports instead of the summary silently saying null."""
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (np.floating, float)):
        return None if math.isnan(value) else float(value)
    if isinstance(value, np.bool_):
        return bool(value)
    return value


def records(frame, columns=None):
    frame = frame if columns is None else frame[[c for c in columns if c in frame.columns]]
    return [{k: _clean(v) for k, v in row.items()} for row in frame.to_dict(orient="records")]


def add_baseline_ratios(frame):
    """Add retention (% of the fp32 exact baseline) and memory/speed ratios to every completed run.

    The baseline of a run is the exact run of the same embeddings file and gallery size (falling back
    to the same native dim). Columns: retention_<metric>, memory_fraction, qps_ratio, latency_ratio, and
    ratio_note: which of them are null because the baseline's value is 0 (a ratio to 0 is undefined).
    """
    frame = frame.copy()
    metrics = metric_columns(frame)
    ratios = dict({f"retention_{m}": m for m in metrics}, **BASELINE_RATIOS)
    for col in list(ratios) + ["baseline_run"]:
        frame[col] = None
    frame["ratio_note"] = ""
    done = completed(frame)
    exact = done[done["exact"]]
    for i, row in done.iterrows():
        same = exact[(exact["group"] == row["group"]) & _same(exact["gallery_size"], row["gallery_size"])]
        base = same[_same(same["data_path"], row["data_path"])]
        if base.empty:
            base = same[_same(same["native_dim"], row["native_dim"])]
        if base.empty:
            continue
        base = base.iloc[0]
        frame.at[i, "baseline_run"] = base["run_id"]
        for name, column in ratios.items():
            frame.at[i, name] = _ratio(row[column], base[column], 100.0 if name.startswith("retention_") else 1.0)
        frame.at[i, "ratio_note"] = zero_base_note(ratios, row, base)
    for col in [c for c in frame.columns if c.startswith("retention_") or c.endswith(("_fraction", "_ratio"))]:
        if col != "compression_ratio":
            frame[col] = pd.to_numeric(frame[col], errors="coerce")
    for m in metrics:  # the same retention under the per-direction name the run JSONs use (t2i_retention_R@1)
        if m.startswith(tuple(f"{d}_" for d in DIRECTIONS)):
            direction, name = m.split("_", 1)
            frame[f"{direction}_retention_{name}"] = frame[f"retention_{m}"]
    return frame


def _same(series, value):
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return series.isna()
    return series == value


def _ratio(value, base, scale=1.0):
    """scale * value / base; None when either is missing, or base is 0 (zero_base_note says so)."""
    if value is None or base is None or pd.isna(value) or pd.isna(base) or base == 0:
        return None
    return scale * float(value) / float(base)


def zero_base_note(ratios, row, base):
    """Why ratios {ratio name: column} of a run to its baseline are null although both runs measured the column:
    'memory_fraction is undefined (baseline A has bytes_per_vector 0)'; '' when there is no such ratio."""
    zero = [f"{name} is undefined (baseline {base['run_id']} has {column} 0)" for name, column in ratios.items()
            if pd.notna(row.get(column)) and pd.notna(base.get(column)) and base[column] == 0]
    return "; ".join(zero)


# ----------------------------------------------------------------------------- intervals

def interval_columns(metric):
    """The bootstrap columns of one metric, in summary.csv order."""
    return [f"{metric}{kind}" for kind in ("_ci_low", "_ci_high", "_delta", "_delta_ci_low", "_delta_ci_high")]


def add_intervals(frame, runs, results_dir, settings):
    """Bootstrap intervals for every completed run (see retrieval/bootstrap.py): per metric m (R@K, MRR, RSUM)
    m_ci_low / m_ci_high, and the paired difference to the run's baseline (baseline_run, from
    add_baseline_ratios) m_delta, m_delta_ci_low, m_delta_ci_high; ci_note says why a run has none.

    Returns (frame, paired): paired(run_a, run_b, metric) is the (low, high) interval of a - b, or None.
    """
    done = completed(frame)
    wanted = set(done["run_id"])
    ranked, notes = bootstrap.load(results_dir, {run_id(r): r for r in runs if run_id(r) in wanted})
    baselines = {r: b for r, b in zip(done["run_id"], done["baseline_run"]) if isinstance(b, str)}
    resampler = bootstrap.Resampler(settings)
    values = resampler.intervals(ranked, baselines)
    metrics, rows = metric_columns(frame), {}
    by_id = done.set_index("run_id", drop=False)
    for index, rid in zip(done.index, done["run_id"]):
        row = dict(values.get(rid, {}))
        base = baselines.get(rid)
        for m in metrics:
            if f"{m}_delta_ci_low" in row:
                row[f"{m}_delta"] = _difference(by_id.at[rid, m], by_id.at[base, m])
        note = notes.get(rid) or _pairing_note(rid, base, ranked)
        rows[index] = dict(row, ci_note=note or "")
    columns = [c for m in metrics for c in interval_columns(m)] + ["ci_note"]
    table = pd.DataFrame.from_dict(rows, orient="index").reindex(columns=columns)
    frame = frame.drop(columns=[c for c in columns if c in frame.columns]).join(table)

    def paired(a, b, metric):
        return resampler.difference(ranked[a], ranked[b], metric) if a in ranked and b in ranked else None
    return frame, paired


def _pairing_note(rid, base, ranked):
    """Why a run with ranks has no paired difference to its baseline (None when it has one)."""
    if rid not in ranked:
        return None
    if base is None:
        return "no fp32 exact baseline to pair with"
    if base not in ranked:
        return f"baseline {base} has no usable rank file"
    if ranked[base].split != ranked[rid].split:
        return f"queries differ from baseline {base}'s (text_to_image), so no paired difference"
    return None


def _difference(value, base):
    return None if value is None or base is None or pd.isna(value) or pd.isna(base) else float(value) - float(base)


def no_pairs(*_):
    """paired() when intervals are off: no interval for any difference."""
    return None


def pareto_frontier(frame, cost, value, lower_cost_is_better=True):
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


def factor_means(frame, metrics):
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
                entry[col] = _clean(pd.to_numeric(part[col], errors="coerce").mean())
            table[str(_clean(level))] = entry
        out[factor] = table
    directions = {}
    for d in DIRECTIONS:
        cols = [c for c in metrics if c.startswith(f"{d}_")]
        if cols:
            directions[d] = {c[len(d) + 1:]: _clean(pd.to_numeric(frame[c], errors="coerce").mean()) for c in cols}
    out["direction"] = directions
    return out


def budget_table(frame, metric, cost="bytes_per_vector"):
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
            rows.append({f"budget_{cost}": _clean(budget), "metric": metric, "value": _clean(best[metric]),
                         **_value_interval(best, metric), "run_id": best["run_id"], "label": best["label"],
                         **{c: _clean(best[c]) for c in MEMORY_COSTS}, "candidates": int(len(fits))})
        budget *= 2
    return rows


def _value_interval(row, metric):
    """value_ci_low / value_ci_high of a metric from its bootstrap columns (None when there are none)."""
    return {"value_ci_low": _clean(row.get(f"{metric}_ci_low")), "value_ci_high": _clean(row.get(f"{metric}_ci_high"))}


def _delta_interval(row, metric):
    """delta, delta_ci_low, delta_ci_high of a metric against the run's baseline (None when not measured)."""
    return {key: _clean(row.get(f"{metric}_{key}")) for key in ("delta", "delta_ci_low", "delta_ci_high")}


def _distinct(values):
    out = []
    for v in values:
        if v not in out:
            out.append(v)
    return out


def environment_summary(runs):
    """Each environment key → its value, or the list of distinct values when runs disagree."""
    env = {}
    for key in ENV_KEYS:
        values = _distinct([(run.get("env") or {}).get(key) for run in runs if not run.get("skipped")])
        values = [v for v in values if v is not None]
        if values:
            env[key] = values[0] if len(values) == 1 else values
    return env


def source_summary(runs):
    """Dataset/model attributes shared by the group's runs (keys whose values differ become lists)."""
    merged = {}
    for run in runs:
        for key, value in data_attrs(run).items():
            if isinstance(value, (dict, list)) and key not in ("skipped",):
                continue
            merged.setdefault(key, [])
            if value not in merged[key]:
                merged[key].append(value)
    out = {k: (v[0] if len(v) == 1 else v) for k, v in merged.items() if k != "skipped"}
    out["data_paths"] = _distinct([run["config"]["data_path"] for run in runs if run["config"].get("data_path")])
    # run_experiments.py --max_queries: each distinct query sample as its config records it; None = every
    # image and caption of the file was a query.
    out["query_samples"] = _distinct([run["config"].get("query_sample") for run in runs])
    return out


# ----------------------------------------------------------------------------- per-group analysis

def whole_gallery_candidates(main):
    """Candidate sizes C that reach the whole image gallery (t2i re-ranks it all: exact fp32 at that dim).

    [{"candidate_size", "gallery_size", "runs"}]: a C that is not a real choice at this gallery size."""
    reranked = main[main["rerank"] & main["candidate_size"].notna() & main["gallery_size"].notna()]
    whole = reranked[reranked["candidate_size"] >= reranked["gallery_size"]]
    return [{"candidate_size": int(c), "gallery_size": int(g), "runs": int(len(part))}
            for (c, g), part in whole.groupby(["candidate_size", "gallery_size"], sort=True)]


def analyse_group(frame, runs, primary_metric=None, paired=no_pairs):
    """Everything the summary holds for one (dataset, split, model) group; paired(a, b, metric) gives the
    bootstrap interval of a paired difference between two runs (add_intervals), or None."""
    done = completed(frame)
    gallery_sizes = sorted(int(g) for g in done["gallery_size"].dropna().unique())
    main_gallery = gallery_sizes[0] if gallery_sizes else None
    main = main_runs(frame, main_gallery)
    metrics = [m for m in metric_columns(main) if main[m].notna().any()]
    recalls = [m for m in recall_columns(main) if main[m].notna().any()]
    primary = primary_metric if primary_metric in main.columns else ("RSUM" if "RSUM" in metrics else
                                                                     (recalls[0] if recalls else None))
    # The findings quote one metric throughout: the first recall (e.g. t2i R@1).
    head = recalls[0] if recalls else None
    fronts = pareto_fronts(main, recalls + (["RSUM"] if "RSUM" in metrics else []))
    exact = main[main["exact"]]
    intervals = [c for m in metrics for c in interval_columns(m)[:2]]
    return {
        "group": frame["group"].iloc[0], "title": frame["title"].iloc[0],
        "dataset": frame["dataset"].iloc[0], "split": frame["split"].iloc[0], "model": frame["model"].iloc[0],
        "source": source_summary(runs),
        "environment": environment_summary(runs),
        "runs_total": int(len(frame)), "runs_completed": int(len(done)),
        "runs_skipped": int((frame["status"] == "skipped").sum()),
        "skipped": records(frame[frame["status"] == "skipped"], ["run_id", "label", "skipped_reason"]),
        "gallery_sizes": gallery_sizes, "main_gallery_size": main_gallery,
        "primary_metric": primary,
        "intervals": interval_summary(done),
        "baseline": records(exact, BASELINE_COLUMNS + metrics + intervals + BASELINE_EXTRA),
        "means": factor_means(main, metrics) if not main.empty else {},
        "retention": records(main, ["run_id", "label"] + [f"retention_{m}" for m in metrics]
                             + ["memory_fraction", "qps_ratio", "latency_ratio", "ratio_note"]),
        "pareto": pareto_records(fronts),
        "budgets": budget_table(main, primary) if primary else [],
        "budgets_total": budget_table(main, primary, "total_bytes_per_vector") if primary else [],
        "scaling": scaling_table(done, recalls, paired) if len(gallery_sizes) > 1 else [],
        "ood_gap": ood_gap_table(done, main_gallery),
        "recall_metrics": recalls, "head_metric": head,
        "memory_frontier": memory_frontier_table(main, fronts["bytes_per_vector"][head][1], head) if head else [],
        "memory_frontier_total": memory_frontier_table(main, fronts["total_bytes_per_vector"][head][1], head,
                                                       "total_bytes_per_vector") if head else [],
        "reranking": reranking_table(main, head, paired) if head else [],
        "dim_reduction": dim_reduction_table(main, head) if head else [],
        "dim_methods": dim_methods_table(main, head, paired) if head else [],
        "whole_gallery_candidates": whole_gallery_candidates(main),
    }


def interval_summary(done):
    """How many of the group's runs have bootstrap intervals, and why the others have none."""
    if "ci_note" not in done.columns:
        return {"computed": False, "runs_with_intervals": 0, "runs_paired": 0, "notes": []}
    lows = [c for c in done.columns if c.endswith("_ci_low")]
    paired = [c for c in lows if c.endswith("_delta_ci_low")]
    notes = Counter(note for note in done["ci_note"] if note)
    return {"computed": True, "runs_with_intervals": int(done[lows].notna().any(axis=1).sum()),
            "runs_paired": int(done[paired].notna().any(axis=1).sum()),
            "notes": [{"reason": reason, "runs": n} for reason, n in notes.most_common()]}


def pareto_fronts(main, metrics):
    """{cost: {metric: (cost column, frontier rows)}} for every cost in PARETO_COSTS."""
    fronts = {}
    for cost, lower_is_better in PARETO_COSTS:
        fronts[cost] = {}
        for m in metrics:
            # Recall of one direction against the speed of that same direction.
            column = cost if cost in MEMORY_COSTS or m == "RSUM" else speed_column(main, cost, m.split("_")[0])
            fronts[cost][m] = (column, pareto_frontier(main, column, m, lower_cost_is_better=lower_is_better))
    return fronts


def pareto_records(fronts):
    """pareto_fronts as JSON rows: run_id, label, the cost column (named in cost_column) and the metric."""
    out = {}
    for cost, by_metric in fronts.items():
        out[cost] = {m: [dict(r, cost_column=column) for r in records(front, ["run_id", "label", column, m])]
                     for m, (column, front) in by_metric.items()}
    return out


def scaling_table(done, recalls, paired=no_pairs):
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
                row.update(_cleaned([{"change": _difference(row[head], first[head]),
                                      "change_ci_low": interval[0], "change_ci_high": interval[1]}])[0])
        rows += table
    return rows


def ood_gap_table(done, main_gallery):
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
    return [{k: _clean(v) for k, v in row.items()} for row in rows]


def memory_frontier_table(main, front, metric, cost="bytes_per_vector"):
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
                 "memory_fraction": _ratio(row[cost], base[cost]), "dim": row["dim"], "rerank": row["rerank"],
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
    return {"speed_direction": direction if qps != "qps" else None,
            "qps": row.get(qps), "baseline_qps": base.get(qps), "qps_ratio": row[qps] / base[qps] if measured else None,
            "latency_p50_ms": row.get(p50), "baseline_latency_p50_ms": base.get(p50)}


def reranking_table(main, metric, paired=no_pairs):
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


def reduced_fp32(main):
    """fp32 flat runs at a reduced dim without re-ranking: what a dim reduction alone does."""
    return main[(main["precision"] == "fp32") & ~main["exact"] & ~main["rerank"]
                & (main["dim"] < main["native_dim"]) & (main["index"].fillna("flat") == "flat")]


def dim_reduction_table(main, metric):
    """fp32 flat runs at a reduced dim without re-ranking, largest dim first: what the reduction alone keeps."""
    reduced = reduced_fp32(main).sort_values(["dim", "dim_method"], ascending=[False, True])
    reduced = reduced.dropna(subset=[f"retention_{metric}"])
    return _cleaned({"run_id": r["run_id"], "native_dim": r["native_dim"], "dim": r["dim"],
                     "dim_method": r["dim_method"], "value": r[metric], "retention": r[f"retention_{metric}"],
                     **_delta_interval(r, metric)}
                    for _, r in reduced.iterrows())


def dim_methods_table(main, metric, paired):
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


def analyse(frame, runs, primary_metric=None, results_dir=None, settings=None, invalid=()):
    """Summary dict of the whole results folder: rows, groups (one per dataset/split/model).

    settings: bootstrap.Settings; with resamples > 0 (and results_dir, where the rank files are) every run
    gets intervals (add_intervals). invalid: split_invalid's list of the run files left out, listed as they are."""
    frame = add_baseline_ratios(frame)
    paired, on = no_pairs, settings is not None and settings.resamples > 0
    if on:
        frame, paired = add_intervals(frame, runs, results_dir, settings)
    by_id = {run_id(r): r for r in runs}
    groups = []
    for name, part in frame.groupby("group", sort=True):
        groups.append(analyse_group(part, [by_id[i] for i in part["run_id"]], primary_metric, paired))
        groups[-1]["intervals"]["confidence"] = settings.confidence if on else None
    return frame, {
        "schema": "experiment_summary/2",
        "runs_total": int(len(frame)),
        "runs_skipped": int((frame["status"] == "skipped").sum()),
        "runs_invalid": len(invalid),
        "invalid_runs": list(invalid),
        "intervals": settings.record() if on else {"method": None, "resamples": 0},
        "groups": groups,
        "rows": records(frame),
    }
