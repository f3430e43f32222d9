"""The frame of a results folder: one row per run (runs_frame, from retrieval/runs.py's flat rows) and the
columns every table reads from it: which runs count (completed, main_runs), the metric columns, each run's
ratios to its fp32 exact baseline (add_baseline_ratios) and its bootstrap intervals (add_intervals), and the
JSON-ready rows of a slice of it (records). tables.py computes the summary tables from this frame;
analysis.py puts them together per group.
"""
from __future__ import annotations

import math
import re
from typing import Callable, Iterable, Optional

import numpy as np
import pandas as pd

from retrieval import bootstrap
from retrieval.metrics import DIRECTIONS
from retrieval.runs import CODEC_KEYS, KNOB_KEYS, name_groups, precision_rank, run_id, run_row

# paired(run_a, run_b, metric): the bootstrap interval (low, high) of metric(a) - metric(b), or None; the one
# add_intervals returns is a bootstrap.Pairing, which also gives the resampled values themselves.
Paired = Callable[[str, str, str], Optional[tuple]]
# Ratios of a run to its baseline (add_baseline_ratios) besides retention: ratio column -> measured column.
BASELINE_RATIOS = {"memory_fraction": "bytes_per_vector", "qps_ratio": "qps", "latency_ratio": "latency_p50_ms"}


def speed_column(frame: pd.DataFrame, name: str, direction: str) -> str:
    """'t2i_latency_p50_ms' when the runs timed that direction, else the plain column."""
    column = f"{direction}_{name}"
    return column if column in frame.columns and frame[column].notna().any() else name


def runs_frame(runs: list[dict]) -> pd.DataFrame:
    """DataFrame with one row per run, in a stable order (group, gallery, dim, precision, candidates, knobs)."""
    frame = pd.DataFrame(name_groups([run_row(run) for run in runs]))
    frame["_cand_order"] = frame.apply(
        lambda r: -1 if r["exact"] else (0 if not r["rerank"] else int(r["candidate_size"])), axis=1)
    frame["_precision_order"] = frame["precision"].map(precision_rank)
    order = ["group", "gallery_size", "dim", "_precision_order", "_cand_order", "index"] + list(KNOB_KEYS + CODEC_KEYS) + \
        ["run_id"]
    frame = frame.sort_values(order, na_position="first", kind="stable")
    return frame.drop(columns=["_cand_order", "_precision_order"]).reset_index(drop=True)


def completed(frame: pd.DataFrame) -> pd.DataFrame:
    """The runs that were measured (not skipped)."""
    return frame[frame["status"] == "ok"]


def main_runs(frame: pd.DataFrame, gallery_size: int | None) -> pd.DataFrame:
    """Completed runs at the group's main gallery size: the runs every headline table compares.

    gallery_size is the group's main_gallery_size; None (no run recorded one) keeps every completed run.
    """
    done = completed(frame)
    return done if gallery_size is None else done[done["gallery_size"] == gallery_size]


def recall_columns(frame: pd.DataFrame, directions: Iterable[str] = DIRECTIONS) -> list[str]:
    """['t2i_R@1', 't2i_R@5', ...] present in the frame, K ascending."""
    cols = []
    for d in directions:
        ks = sorted(int(c.split("@")[1]) for c in frame.columns if re.fullmatch(fr"{d}_R@\d+", c))
        cols += [f"{d}_R@{k}" for k in ks]
    return cols


def metric_columns(frame: pd.DataFrame) -> list[str]:
    """The quality metrics averaged and compared: R@K, MRR per direction, then RSUM."""
    cols = recall_columns(frame)
    cols += [f"{d}_MRR" for d in DIRECTIONS if f"{d}_MRR" in frame.columns]
    if "RSUM" in frame.columns:
        cols.append("RSUM")
    return cols


def clean(value: object) -> object:
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


def records(frame: pd.DataFrame, columns: Iterable[str] | None = None) -> list[dict]:
    """JSON-ready rows (clean values) of the frame, with only `columns` (those present, in that order) when given."""
    frame = frame if columns is None else frame[[c for c in columns if c in frame.columns]]
    return [{k: clean(v) for k, v in row.items()} for row in frame.to_dict(orient="records")]


def add_baseline_ratios(frame: pd.DataFrame) -> pd.DataFrame:
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
            frame.at[i, name] = ratio(row[column], base[column], 100.0 if name.startswith("retention_") else 1.0)
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


def ratio(value: object, base: object, scale: float = 1.0) -> float | None:
    """scale * value / base; None when either is missing, or base is 0 (zero_base_note says so)."""
    if value is None or base is None or pd.isna(value) or pd.isna(base) or base == 0:
        return None
    return scale * float(value) / float(base)


def zero_base_note(ratios: dict[str, str], row: pd.Series, base: pd.Series) -> str:
    """Why ratios {ratio name: column} of a run to its baseline are null although both runs measured the column:
    'memory_fraction is undefined (baseline A has bytes_per_vector 0)'; '' when there is no such ratio."""
    zero = [f"{name} is undefined (baseline {base['run_id']} has {column} 0)" for name, column in ratios.items()
            if pd.notna(row.get(column)) and pd.notna(base.get(column)) and base[column] == 0]
    return "; ".join(zero)


# ----------------------------------------------------------------------------- intervals

def interval_columns(metric: str) -> list[str]:
    """The bootstrap columns of one metric, in summary.csv order."""
    return [f"{metric}{kind}" for kind in ("_ci_low", "_ci_high", "_delta", "_delta_ci_low", "_delta_ci_high")]


def add_intervals(frame: pd.DataFrame, runs: list[dict], results_dir: str,
                  settings: bootstrap.Settings) -> tuple[pd.DataFrame, bootstrap.Pairing]:
    """Bootstrap intervals for every completed run (see retrieval/bootstrap.py): per metric m (R@K, MRR, RSUM)
    m_ci_low / m_ci_high, and the paired difference to the run's baseline (baseline_run, from
    add_baseline_ratios) m_delta, m_delta_ci_low, m_delta_ci_high; ci_note says why a run has none.

    Returns (frame, paired): paired(run_a, run_b, metric) is the (low, high) interval of a - b, or None, and
    paired.linear(...) the resampled values of any sum of runs' metrics (bootstrap.Pairing).
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
                row[f"{m}_delta"] = difference(by_id.at[rid, m], by_id.at[base, m])
        note = notes.get(rid) or _pairing_note(rid, base, ranked)
        rows[index] = dict(row, ci_note=note or "")
    columns = [c for m in metrics for c in interval_columns(m)] + ["ci_note"]
    table = pd.DataFrame.from_dict(rows, orient="index").reindex(columns=columns)
    frame = frame.drop(columns=[c for c in columns if c in frame.columns]).join(table)
    return frame, bootstrap.Pairing(ranked, resampler)


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


def difference(value: object, base: object) -> float | None:
    return None if value is None or base is None or pd.isna(value) or pd.isna(base) else float(value) - float(base)


# paired() when intervals are off: no interval for any difference, no resampled values.
no_pairs = bootstrap.Pairing()
