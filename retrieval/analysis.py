"""From a folder of sweep results (one JSON per configuration) to tables, Pareto frontiers, memory
budgets and findings — the numbers behind analyze_results.py's summary, plots and REPORT.md.

Runs are grouped by (dataset, split, model) of the embeddings file they were measured on, and every
comparison happens inside one group: numbers from different datasets or encoders are never mixed.
Inside a group the headline analysis uses the real gallery (the smallest gallery size); larger
galleries (distractors added by `--gallery_sizes`) only feed the scaling tables and curves.

Run files are read through FIELDS, the one place that knows where each value lives in a run JSON,
so a renamed key in run_experiments.py is a one-line fix here.
"""
import glob
import json
import math
import os
import re
from collections import Counter

import numpy as np
import pandas as pd

from retrieval.metrics import DIRECTIONS

# Where each value lives in a run JSON: a list of key paths, the first one present wins.
FIELDS = {
    "dim": [("config", "dim")],
    "native_dim": [("config", "native_dim")],
    "dim_method": [("config", "dim_method")],
    "precision": [("config", "precision")],
    "candidate_size": [("config", "candidate_size")],
    "rerank": [("config", "rerank")],
    "exact": [("config", "exact")],
    "k_values": [("config", "k_values")],
    "index": [("config", "index")],
    "gallery_size": [("config", "gallery_size")],
    "data_path": [("config", "data_path")],
    "bytes_per_vector": [("memory", "bytes_per_vector")],
    "index_bytes": [("memory", "index_bytes"), ("memory", "serialized_index_bytes")],
    "compression_ratio": [("memory", "compression_ratio")],
    "peak_rss_bytes": [("memory", "peak_rss_bytes"), ("memory", "peak_rss")],
    "qps": [("speed", "qps"), ("speed", "batch_qps")],
    "latency_p50_ms": [("speed", "latency_p50_ms"), ("speed", "latency_ms", "p50")],
    "latency_p95_ms": [("speed", "latency_p95_ms"), ("speed", "latency_ms", "p95")],
    "latency_p99_ms": [("speed", "latency_p99_ms"), ("speed", "latency_ms", "p99")],
    "build_s": [("speed", "build_s"), ("speed", "build_time_s")],
}
# Where the embeddings file's attributes (dataset, split, model, ...) live in a run JSON.
DATA_ATTR_PLACES = [("data",), ("dataset",), ("attrs",), ("input",), ("data_attrs",), ("env", "data")]
ENV_KEYS = ("hostname", "cpu", "cpu_count", "threads", "gpu", "git_commit", "python", "numpy", "faiss", "torch")
SPEED_KEYS = ("qps", "latency_p50_ms", "latency_p95_ms", "latency_p99_ms", "build_s")
MEMORY_KEYS = ("bytes_per_vector", "index_bytes", "compression_ratio", "peak_rss_bytes")
DIRECTIONAL_KEYS = ("qps", "latency_p50_ms", "latency_p95_ms", "latency_p99_ms", "build_s", "index_bytes")


class AnalysisError(ValueError):
    """The results folder cannot be analysed; str() names the folder or file and the fault."""


def lookup(run, name):
    """Value of FIELDS[name] in a run JSON, or None."""
    for path in FIELDS[name]:
        node = run
        for key in path:
            node = node.get(key) if isinstance(node, dict) else None
        if node is not None:
            return node
    return None


def data_attrs(run):
    for path in DATA_ATTR_PLACES:
        node = run
        for key in path:
            node = node.get(key) if isinstance(node, dict) else None
        if isinstance(node, dict) and ("dataset" in node or "model" in node):
            return node
    return {}


# ----------------------------------------------------------------------------- loading

def load_runs(results_dir):
    """All run JSONs under <results_dir>/runs/ (sorted by name). Raises AnalysisError when there are none."""
    if not os.path.isdir(results_dir):
        raise AnalysisError(f"{results_dir}: folder not found")
    runs_dir = os.path.join(results_dir, "runs")
    paths = sorted(glob.glob(os.path.join(runs_dir, "*.json")))
    if not paths:
        raise AnalysisError(f"{results_dir}: no run files ({os.path.join(results_dir, 'runs', '*.json')}); "
                            "run run_experiments.py --output_dir on this folder first")
    runs = []
    for path in paths:
        try:
            with open(path) as f:
                run = json.load(f)
        except (OSError, json.JSONDecodeError) as e:
            raise AnalysisError(f"{path}: not a readable JSON file ({e})") from None
        if not isinstance(run, dict) or not isinstance(run.get("config"), dict):
            raise AnalysisError(f"{path}: not a run file (no 'config' object)")
        run["_file"] = os.path.relpath(path, results_dir)
        runs.append(run)
    return runs


def candidate_label(row):
    """'exact', 'no rerank' or 'C=<size>': how the final ranking was produced."""
    if row["exact"]:
        return "exact"
    if not row["rerank"]:
        return "no rerank"
    return f"C={int(row['candidate_size'])}"


def config_label(row):
    """Short human name of a configuration, e.g. 'int8 256d C=100' (index shown when not flat)."""
    label = f"{row['precision']} {int(row['dim'])}d" if row.get("dim") is not None else str(row["precision"])
    if row.get("dim_method") and row.get("native_dim") is not None and row.get("dim") is not None \
            and int(row["dim"]) < int(row["native_dim"]):
        label += f" ({row['dim_method']})"
    label += f" {row['candidate']}"
    if row.get("index") and str(row["index"]).lower() not in ("flat", "none"):
        label += f" [{row['index']}]"
    return label


def _number(value):
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def speed_column(frame, name, direction):
    """'t2i_latency_p50_ms' when the runs timed that direction, else the plain column."""
    column = f"{direction}_{name}"
    return column if column in frame.columns and frame[column].notna().any() else name


def _slug(text):
    return re.sub(r"[^A-Za-z0-9._-]+", "-", str(text)).strip("-") or "unknown"


def run_row(run):
    """One flat row (a dict) for one run JSON: config, metrics, speed, memory, source."""
    attrs = data_attrs(run)
    row = {"run_id": os.path.splitext(os.path.basename(run["_file"]))[0], "file": run["_file"]}
    row["dataset"] = str(attrs.get("dataset", "unknown"))
    row["split"] = str(attrs.get("split", "unknown"))
    row["model"] = str(attrs.get("model", "unknown"))
    row["group"] = _slug(f"{row['dataset']}_{row['split']}_{row['model']}")
    skipped = run.get("skipped")
    row["status"] = "skipped" if skipped else "ok"
    row["skipped_reason"] = str(skipped) if skipped else ""
    for name in ("dim", "native_dim", "dim_method", "precision", "candidate_size", "index", "gallery_size",
                 "data_path"):
        row[name] = lookup(run, name)
    row["exact"] = bool(lookup(run, "exact"))
    rerank = lookup(run, "rerank")
    # Without an explicit flag, a candidate list means stage 2 re-scored it with fp32 vectors.
    row["rerank"] = bool(rerank) if rerank is not None else row["candidate_size"] is not None and not row["exact"]
    row["candidate"] = candidate_label(row)
    row["label"] = config_label(row)
    for name in MEMORY_KEYS + SPEED_KEYS:
        row[name] = _number(lookup(run, name))
    # run_experiments.py times each direction separately (t2i_qps, i2t_latency_p50_ms, t2i_index_bytes, ...).
    # Keep those, and let the plain column fall back to the first direction timed (text→image).
    for name in DIRECTIONAL_KEYS:
        section = run.get("memory" if name == "index_bytes" else "speed") or {}
        for d in DIRECTIONS:
            row[f"{d}_{name}"] = _number(section.get(f"{d}_{name}"))
        if row[name] is None:
            row[name] = next((row[f"{d}_{name}"] for d in DIRECTIONS if row[f"{d}_{name}"] is not None), None)
    for key, value in (run.get("metrics") or {}).items():
        if isinstance(value, (int, float)) and not isinstance(value, bool) or value is None:
            row[key] = value
    return row


def runs_frame(runs):
    """DataFrame with one row per run, in a stable order (group, gallery, dim, precision, candidates)."""
    frame = pd.DataFrame([run_row(run) for run in runs])
    frame["_cand_order"] = frame.apply(
        lambda r: -1 if r["exact"] else (0 if not r["rerank"] else int(r["candidate_size"])), axis=1)
    order = ["group", "gallery_size", "dim", "precision", "_cand_order", "run_id"]
    frame = frame.sort_values(order, na_position="first", kind="stable").drop(columns="_cand_order")
    return frame.reset_index(drop=True)


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
    """JSON-friendly scalar: numpy → python, NaN → None."""
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
    to the same native dim). Columns: retention_<metric>, memory_fraction, qps_ratio, latency_ratio.
    """
    frame = frame.copy()
    metrics = metric_columns(frame)
    for col in [f"retention_{m}" for m in metrics] + ["memory_fraction", "qps_ratio", "latency_ratio",
                                                       "baseline_run"]:
        frame[col] = None
    done = frame[frame["status"] == "ok"]
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
        for m in metrics:
            frame.at[i, f"retention_{m}"] = _ratio(row[m], base[m], 100.0)
        frame.at[i, "memory_fraction"] = _ratio(row["bytes_per_vector"], base["bytes_per_vector"])
        frame.at[i, "qps_ratio"] = _ratio(row["qps"], base["qps"])
        frame.at[i, "latency_ratio"] = _ratio(row["latency_p50_ms"], base["latency_p50_ms"])
    for col in [c for c in frame.columns if c.startswith("retention_") or c.endswith(("_fraction", "_ratio"))]:
        if col != "compression_ratio":
            frame[col] = pd.to_numeric(frame[col], errors="coerce")
    return frame


def _same(series, value):
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return series.isna()
    return series == value


def _ratio(value, base, scale=1.0):
    if value is None or base is None or pd.isna(value) or pd.isna(base) or base == 0:
        return None
    return scale * float(value) / float(base)


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


def budget_table(frame, metric):
    """Best configuration (by `metric`) within each power-of-two bytes/vector budget."""
    data = frame.dropna(subset=["bytes_per_vector", metric])
    if data.empty:
        return []
    low = 2 ** math.floor(math.log2(max(data["bytes_per_vector"].min(), 1e-9)))
    high = 2 ** math.ceil(math.log2(data["bytes_per_vector"].max()))
    rows, budget = [], low
    while budget <= high:
        fits = data[data["bytes_per_vector"] <= budget]
        if not fits.empty:
            # Ties on the metric go to the smaller configuration.
            best = fits.sort_values([metric, "bytes_per_vector"], ascending=[False, True], kind="stable").iloc[0]
            rows.append({"budget_bytes_per_vector": _clean(budget), "metric": metric,
                         "value": _clean(best[metric]), "run_id": best["run_id"], "label": best["label"],
                         "bytes_per_vector": _clean(best["bytes_per_vector"]), "candidates": int(len(fits))})
        budget *= 2
    return rows


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
    out["data_paths"] = _distinct([lookup(run, "data_path") for run in runs if lookup(run, "data_path")])
    return out


# ----------------------------------------------------------------------------- per-group analysis

def analyse_group(frame, runs, primary_metric=None):
    """Everything the summary holds for one (dataset, split, model) group."""
    done = frame[frame["status"] == "ok"]
    gallery_sizes = sorted(int(g) for g in done["gallery_size"].dropna().unique())
    base_gallery = gallery_sizes[0] if gallery_sizes else None
    main = done if base_gallery is None else done[done["gallery_size"] == base_gallery]
    metrics = [m for m in metric_columns(main) if main[m].notna().any()]
    recalls = [m for m in recall_columns(main) if main[m].notna().any()]
    primary = primary_metric if primary_metric in main.columns else ("RSUM" if "RSUM" in metrics else
                                                                      (recalls[0] if recalls else None))
    exact = main[main["exact"]]
    group = {
        "group": frame["group"].iloc[0],
        "dataset": frame["dataset"].iloc[0], "split": frame["split"].iloc[0], "model": frame["model"].iloc[0],
        "source": source_summary(runs),
        "environment": environment_summary(runs),
        "runs_total": int(len(frame)), "runs_completed": int(len(done)),
        "runs_skipped": int((frame["status"] == "skipped").sum()),
        "skipped": records(frame[frame["status"] == "skipped"], ["run_id", "label", "skipped_reason"]),
        "gallery_sizes": gallery_sizes, "main_gallery_size": base_gallery,
        "primary_metric": primary,
        "baseline": records(exact, ["run_id", "label", "data_path", "bytes_per_vector", "qps",
                                    "latency_p50_ms"] + metrics),
        "means": factor_means(main, metrics) if not main.empty else {},
        "retention": records(main, ["run_id", "label"] + [f"retention_{m}" for m in metrics]
                             + ["memory_fraction", "qps_ratio", "latency_ratio"]),
        "pareto": {},
        "budgets": budget_table(main, primary) if primary else [],
        "scaling": scaling_table(done, recalls) if len(gallery_sizes) > 1 else [],
    }
    for cost, better in (("bytes_per_vector", "lower"), ("latency_p50_ms", "lower"), ("qps", "higher")):
        group["pareto"][cost] = {}
        for m in recalls + (["RSUM"] if "RSUM" in metrics else []):
            # Recall of one direction against the speed of that same direction.
            column = cost if cost == "bytes_per_vector" or m == "RSUM" else speed_column(main, cost, m.split("_")[0])
            front = pareto_frontier(main, column, m, lower_cost_is_better=(better == "lower"))
            group["pareto"][cost][m] = [dict(r, cost_column=column) for r in records(front, ["run_id", "label",
                                                                                             column, m])]
    group["findings"] = findings(main, done, group)
    return group


def scaling_table(done, recalls):
    """Configurations measured at more than one gallery size: metric/speed/memory per size."""
    rows = []
    for label, part in done.groupby("label", sort=True):
        if part["gallery_size"].nunique() < 2:
            continue
        part = part.sort_values("gallery_size")
        rows += records(part, ["label", "gallery_size", "run_id"] + recalls[:1]
                        + [r for r in recalls if r.startswith("i2t")][:1]
                        + ["qps", "latency_p50_ms", "index_bytes", "bytes_per_vector"])
    return rows


def analyse(frame, runs, primary_metric=None):
    """Summary dict of the whole results folder: rows, groups (one per dataset/split/model)."""
    frame = add_baseline_ratios(frame)
    by_id = {os.path.splitext(os.path.basename(r["_file"]))[0]: r for r in runs}
    groups = []
    for name, part in frame.groupby("group", sort=True):
        groups.append(analyse_group(part, [by_id[i] for i in part["run_id"]], primary_metric))
    return frame, {
        "schema": "experiment_summary/1",
        "runs_total": int(len(frame)),
        "runs_skipped": int((frame["status"] == "skipped").sum()),
        "groups": groups,
        "rows": records(frame),
    }


# ----------------------------------------------------------------------------- findings (sentences)

def _fmt(value, digits=1):
    return "n/a" if value is None or pd.isna(value) else f"{value:,.{digits}f}"


def _bytes(value):
    return "n/a" if value is None or pd.isna(value) else (f"{value:,.0f}" if float(value).is_integer()
                                                             else f"{value:,.2f}")


def _speed_phrase(row, base, direction):
    """'<direction> batch search is 2.3x faster than fp32 exact (…); single-query p50 …' from the numbers."""
    def pick(name):
        column = f"{direction}_{name}"
        return column if pd.notna(row.get(column)) and pd.notna(base.get(column)) else name
    qps, p50 = pick("qps"), pick("latency_p50_ms")
    where = f"{DIRECTION_WORDS.get(direction, direction)} " if qps.startswith(direction) else ""
    parts = []
    if pd.notna(row.get(qps)) and pd.notna(base.get(qps)) and base[qps] and row[qps]:
        ratio = row[qps] / base[qps]
        word = f"{ratio:.2f}x faster" if ratio >= 1 else f"{1 / ratio:.2f}x slower"
        parts.append(f"{where}batch search is {word} than fp32 exact ({_fmt(row[qps], 0)} vs {_fmt(base[qps], 0)} "
                     f"queries/s)")
    if pd.notna(row.get(p50)) and pd.notna(base.get(p50)):
        parts.append(f"single-query p50 latency {_fmt(row[p50], 3)} ms vs {_fmt(base[p50], 3)} ms")
    return "; ".join(parts)


DIRECTION_WORDS = {"t2i": "text→image", "i2t": "image→text"}


def findings(main, done, group):
    """Sentences computed from the group's numbers; each states only what the numbers show."""
    out = []
    recalls = [m for m in recall_columns(main) if main[m].notna().any()]
    if main.empty or not recalls:
        return ["No completed runs in this group."] if main.empty else out
    head = recalls[0]                      # e.g. t2i_R@1
    name = head.replace("_", " ")
    exact = main[main["exact"]]
    gallery = group["main_gallery_size"]
    at_gallery = f" (gallery of {gallery:,} items)" if gallery else ""
    if exact.empty:
        out.append("No fp32 exact baseline in these runs, so retention and speed ratios are not available.")
    for _, base in exact.iterrows():
        metrics = ", ".join(f"{m.replace('_', ' ')} {_fmt(base[m])}" for m in recalls if pd.notna(base[m]))
        rsum = f", RSUM {_fmt(base['RSUM'])}" if "RSUM" in base and pd.notna(base["RSUM"]) else ""
        speeds = []
        for d in DIRECTIONS:
            if pd.notna(base.get(f"{d}_qps")):
                speeds.append(f"{DIRECTION_WORDS[d]} {_fmt(base[f'{d}_qps'], 0)} queries/s batch, p50 "
                              f"{_fmt(base.get(f'{d}_latency_p50_ms'), 3)} ms per single query")
        if not speeds and pd.notna(base.get("qps")):
            speeds.append(f"{_fmt(base['qps'], 0)} queries/s batch, p50 {_fmt(base['latency_p50_ms'], 3)} ms "
                          "per single query")
        out.append(f"Baseline fp32 exact search at {int(base['dim'])}-d{at_gallery}: {metrics}{rsum}; "
                   f"{_bytes(base['bytes_per_vector'])} bytes/vector" + "".join(f"; {x}" for x in speeds) + ".")
    base_by_id = {r["run_id"]: r for _, r in exact.iterrows()}

    # Memory frontier: what each step down in bytes costs in recall, and what it does to speed.
    front = pareto_frontier(main, "bytes_per_vector", head)
    for _, row in front.iterrows():
        base = base_by_id.get(row.get("baseline_run"))
        if base is None or row["exact"]:
            continue
        sentence = (f"{row['label']} keeps {_fmt(row[f'retention_{head}'])}% of fp32 {name} "
                    f"({_fmt(row[head])} vs {_fmt(base[head])}) at {_fmt(100 * row['memory_fraction'])}% of the "
                    f"memory ({_bytes(row['bytes_per_vector'])} vs {_bytes(base['bytes_per_vector'])} bytes/vector)")
        if row["rerank"] and pd.notna(row.get("dim")):
            # The index alone is not all a two-stage search needs: stage 2 reads the fp32 vectors.
            sentence += (f", plus the {int(row['dim'])}-d fp32 vectors that re-ranking reads "
                         f"({4 * int(row['dim']):,} bytes/vector, in RAM or on disk)")
            if pd.notna(row.get("gallery_size")) and row["candidate_size"] >= row["gallery_size"]:
                sentence += (f"; C={int(row['candidate_size'])} covers the whole gallery of "
                             f"{int(row['gallery_size']):,}, so stage 2 is exact fp32 search at {int(row['dim'])}-d")
        speed = _speed_phrase(row, base, head.split("_")[0])
        out.append(sentence + (f"; {speed}." if speed else "."))

    # Re-ranking: best re-ranked run vs the same precision and dim without re-ranking.
    for (precision, dim), part in main[~main["exact"]].groupby(["precision", "dim"], sort=True):
        plain = part[~part["rerank"]]
        reranked = part[part["rerank"]].dropna(subset=[head])
        if plain.empty or reranked.empty or pd.isna(plain.iloc[0][head]):
            continue
        plain = plain.iloc[0]
        best = reranked.loc[reranked[head].idxmax()]
        gain = best[head] - plain[head]
        stage1_col = _stage1_column(main, head)
        stage1 = (f"; the true item was among the {int(best['candidate_size'])} stage-1 candidates for "
                  f"{_fmt(best[stage1_col])}% of queries" if stage1_col and pd.notna(best.get(stage1_col)) else "")
        verb = "raises" if gain > 0 else "lowers"
        change = (f"{verb} {name} from {_fmt(plain[head])} to {_fmt(best[head])} ({gain:+.1f} points)"
                  if abs(gain) >= 0.05 else f"changes {name} by less than 0.05 points ({_fmt(plain[head])})")
        whole = (f", which covers the whole gallery of {int(best['gallery_size']):,}"
                 if pd.notna(best.get("gallery_size")) and best["candidate_size"] >= best["gallery_size"] else "")
        out.append(f"Re-ranking {precision} {int(dim)}-d with fp32 vectors (best C={int(best['candidate_size'])}"
                   f"{whole}) {change}{stage1}.")

    # Dimension reduction alone: fp32, no re-ranking, at each reduced dim.
    reduced = main[(main["precision"] == "fp32") & ~main["exact"] & ~main["rerank"]
                   & (main["dim"] < main["native_dim"])]
    for _, row in reduced.sort_values("dim", ascending=False).iterrows():
        if pd.isna(row.get(f"retention_{head}")):
            continue
        out.append(f"Reducing {int(row['native_dim'])} to {int(row['dim'])} dims ({row['dim_method']}, fp32, no "
                   f"re-ranking) keeps {_fmt(row[f'retention_{head}'])}% of {name} ({_fmt(row[head])}).")

    # Memory budgets.
    primary = group["primary_metric"]
    previous = None
    for b in group["budgets"]:
        if b["run_id"] == previous:
            continue  # a larger budget that buys nothing better adds no information
        previous = b["run_id"]
        out.append(f"Within {_bytes(b['budget_bytes_per_vector'])} bytes/vector the best {primary.replace('_', ' ')} "
                   f"is {_fmt(b['value'])} ({b['label']}, {_bytes(b['bytes_per_vector'])} bytes/vector).")
        if len(out) > 60:
            break

    # Gallery-size scaling.
    if len(group["gallery_sizes"]) > 1:
        for label, part in done.groupby("label", sort=True):
            part = part.dropna(subset=["gallery_size"]).sort_values("gallery_size")
            if part["gallery_size"].nunique() < 2:
                continue
            first, last = part.iloc[0], part.iloc[-1]
            out.append(f"{label}: growing the gallery from {int(first['gallery_size']):,} to "
                       f"{int(last['gallery_size']):,} items moves {name} from {_fmt(first[head])} to "
                       f"{_fmt(last[head])} and batch throughput from {_fmt(first['qps'], 0)} to "
                       f"{_fmt(last['qps'], 0)} queries/s.")

    # Provenance caveats.
    skipped = Counter(r["skipped_reason"] for r in group["skipped"])
    if skipped:
        reasons = "; ".join(f"{n} x {reason}" for reason, n in skipped.most_common())
        out.append(f"{sum(skipped.values())} configurations were skipped: {reasons}.")
    for key in ("hostname", "cpu", "threads"):
        if isinstance(group["environment"].get(key), list):
            out.append(f"Runs disagree on {key} ({', '.join(map(str, group['environment'][key]))}): speed "
                       f"numbers from different settings are not directly comparable.")
    return out


def _stage1_column(frame, head):
    """'t2i_stage1_recall' (or a K-specific variant) when the runs recorded stage-1 recall."""
    direction = head.split("_")[0]
    for col in (f"{direction}_stage1_recall", f"{direction}_stage1_recall@C"):
        if col in frame.columns:
            return col
    cols = sorted(c for c in frame.columns if c.startswith(f"{direction}_stage1_recall"))
    return cols[0] if cols else None


# ----------------------------------------------------------------------------- REPORT.md

def markdown_table(rows, columns, headers=None):
    """A GitHub-markdown table; floats get 2 decimals (1 for percentages ≥ 10), None → '–'."""
    headers = headers or columns
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    for row in rows:
        cells = []
        for col in columns:
            value = row.get(col)
            if value is None or (isinstance(value, float) and math.isnan(value)):
                cells.append("–")
            elif isinstance(value, float):
                cells.append(_cell(value))
            else:
                cells.append(str(value).replace("|", "\\|"))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _cell(value):
    if float(value).is_integer():
        return f"{value:,.0f}"
    if abs(value) >= 100:
        return f"{value:,.1f}"
    if abs(value) >= 1:
        return f"{value:.2f}"
    return f"{value:.3g}"


RUN_TABLE = [("label", "config"), ("bytes_per_vector", "bytes/vector"), ("t2i_R@1", "t2i R@1"),
             ("t2i_R@5", "t2i R@5"), ("t2i_R@10", "t2i R@10"), ("i2t_R@1", "i2t R@1"), ("i2t_R@5", "i2t R@5"),
             ("i2t_R@10", "i2t R@10"), ("RSUM", "RSUM"), ("retention_t2i_R@1", "t2i R@1 kept %"),
             ("qps", "batch QPS"), ("latency_p50_ms", "p50 ms"), ("run_id", "run")]


def report_markdown(summary, frame, plots, report_dir):
    """REPORT.md text: per group the source, findings, tables and the embedded plots.

    plots: {group: [(title, path), ...]}; paths are written relative to report_dir.
    """
    lines = ["# Retrieval under compression: experiment report", "",
             f"{summary['runs_total']} run files, {summary['runs_skipped']} skipped configurations, "
             f"{len(summary['groups'])} dataset/model group(s). Every number below is read from "
             "`summary.csv` / `experiment_summary.json` next to this file; rows from different groups are "
             "never compared.", ""]
    for group in summary["groups"]:
        part = frame[frame["group"] == group["group"]]
        main = part[part["status"] == "ok"]
        if group["main_gallery_size"] is not None:
            main = main[main["gallery_size"] == group["main_gallery_size"]]
        lines += [f"## {group['dataset']} / {group['split']} / {group['model']}", ""]
        source = group["source"]
        env = group["environment"]
        facts = [("dataset", group["dataset"]), ("split", group["split"]), ("model", group["model"]),
                 ("embeddings file(s)", ", ".join(map(str, source.get("data_paths", [])))),
                 ("gallery sizes", ", ".join(f"{g:,}" for g in group["gallery_sizes"]) or "–"),
                 ("runs", f"{group['runs_completed']} completed, {group['runs_skipped']} skipped")]
        facts += [(key, ", ".join(map(str, value)) if isinstance(value, list) else str(value))
                  for key, value in env.items()]
        lines += [markdown_table([{"what": k, "value": v} for k, v in facts], ["what", "value"]), ""]
        lines += ["### Findings", ""] + [f"- {s}" for s in group["findings"]] + [""]
        table = list(RUN_TABLE)
        if any(f"{d}_qps" in main.columns and main[f"{d}_qps"].notna().any() for d in DIRECTIONS):
            at = [c for c, _ in table].index("qps")
            table[at:at + 2] = [(f"{d}_{name}", f"{d} {title}") for name, title in
                                (("qps", "batch QPS"), ("latency_p50_ms", "p50 ms")) for d in DIRECTIONS]
        columns = [(c, h) for c, h in table if c in main.columns and main[c].notna().any()]
        ordered = main.sort_values(["bytes_per_vector", "RSUM" if "RSUM" in main else "run_id"],
                                   ascending=[True, False], na_position="last", kind="stable")
        lines += ["### All completed runs" + (f" (gallery {group['main_gallery_size']:,})"
                                               if group["main_gallery_size"] else ""), "",
                  markdown_table(records(ordered), [c for c, _ in columns], [h for _, h in columns]), ""]
        for cost, title in (("bytes_per_vector", "memory (bytes/vector)"),
                            ("latency_p50_ms", "single-query p50 latency (ms)")):
            head = next(iter(group["pareto"].get(cost, {})), None)
            if head and group["pareto"][cost][head]:
                front = group["pareto"][cost][head]
                column = front[0]["cost_column"]
                lines += [f"### Pareto frontier: {head.replace('_', ' ')} vs {title}", "",
                          markdown_table(front, ["label", column, head, "run_id"],
                                         ["config", f"{title} [{column}]", head.replace("_", " "), "run"]), ""]
        if group["budgets"]:
            metric = group["primary_metric"]
            lines += [f"### Best configuration per memory budget (by {metric.replace('_', ' ')})", "",
                      markdown_table(group["budgets"], ["budget_bytes_per_vector", "label", "value",
                                                        "bytes_per_vector", "candidates"],
                                     ["budget (bytes/vector)", "best config", metric.replace("_", " "),
                                      "its bytes/vector", "configs within budget"]), ""]
        for factor, table in group["means"].items():
            if not table:
                continue
            rows = [dict(level=level, **values) for level, values in table.items()]
            cols = [c for c in rows[0] if c != "level"]
            lines += [f"### Mean per {factor.replace('_', ' ')}", "",
                      markdown_table(rows, ["level"] + cols, [factor] + [c.replace("_", " ") for c in cols]), ""]
        if group["scaling"]:
            cols = list(group["scaling"][0])
            lines += ["### Gallery-size scaling", "", markdown_table(group["scaling"], cols), ""]
        if group["skipped"]:
            lines += ["### Skipped configurations", "",
                      markdown_table(group["skipped"], ["label", "skipped_reason", "run_id"],
                                     ["config", "reason", "run"]), ""]
        if plots.get(group["group"]):
            lines += ["### Plots", ""]
            for title, path in plots[group["group"]]:
                rel = os.path.relpath(path, report_dir).replace(os.sep, "/")
                lines += [f"![{title}]({rel})", ""]
    return "\n".join(lines).rstrip() + "\n"
