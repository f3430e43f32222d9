"""The report's "Check these" list: results a reader should not take at face value, each with its numbers.

- a compressed configuration ABOVE fp32 exact beyond its marginal interval in either direction (its joint one is
  quoted beside it): a lossy code cannot know more than the vectors it encodes, so this is sampling luck, a tie
  rule, or a bug in the baseline, and worth a look. The marginal level is the sensitive one on purpose: a check
  costs a look, a missed anomaly a wrong conclusion;
- the fp32 exact baseline slower than a configuration that does strictly more work (stage 1, then fp32
  re-ranking of candidates covering the whole gallery at the native dim): its speed number is suspect;
- a run whose batch speed's 95% interval is wider than SPREAD_LIMIT_PCT of it (older files: whose timed passes
  spread more than that in some stage): its speed is unstable (a loaded machine), so its speed ratios are shaky.

The spreads are read from each run file's speed section (<d>_<stage>_qps_spread_pct, which runs.run_row does
not flatten), taking the largest stage of each direction.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import pandas as pd

from retrieval.frame import clean
from retrieval.metrics import DIRECTIONS

SPREAD_LIMIT_PCT = 20.0
STAGES = ("transform", "search", "rerank")


def add_spreads(frame: pd.DataFrame, runs_by_id: Mapping[str, dict]) -> pd.DataFrame:
    """<d>_speed_spread_pct: how uncertain direction d's batch speed is, in % of it: the width of its 95% interval
    over timing rounds (run schema 3; one slow round among ten does not move it), or for older run files the
    largest spread (max - min over passes) of any timed stage."""
    for d in DIRECTIONS:
        values = []
        for rid in frame["run_id"]:
            speed = (runs_by_id.get(rid) or {}).get("speed") or {}
            qps, low, high = (speed.get(f"{d}_qps{part}") for part in ("", "_ci_low", "_ci_high"))
            if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (qps, low, high)) and qps > 0:
                values.append(100.0 * (high - low) / qps)
                continue
            spreads = [speed.get(f"{d}_{stage}_qps_spread_pct") for stage in STAGES]
            spreads = [float(v) for v in spreads if isinstance(v, (int, float)) and not isinstance(v, bool)]
            values.append(max(spreads) if spreads else None)
        frame[f"{d}_speed_spread_pct"] = pd.to_numeric(pd.Series(values, index=frame.index), errors="coerce")
    return frame


def above_fp32(main: pd.DataFrame, metrics: list[str]) -> list[dict[str, Any]]:
    out = []
    for _, row in main[~main["exact"]].iterrows():
        for metric in metrics:
            low, high = row.get(f"{metric}_delta_ci_low"), row.get(f"{metric}_delta_ci_high")
            if pd.notna(low) and low > 0:
                base = main[main["run_id"] == row["baseline_run"]]
                out.append({"check": "above_fp32", "run_id": row["run_id"], "label": row["label"], "metric": metric,
                            "value": clean(row[metric]), "baseline_value": clean(base[metric].iloc[0]) if len(base)
                            else None, "delta": clean(row[f"{metric}_delta"]), "ci_low": clean(low),
                            "ci_high": clean(high), "sim_low": clean(row.get(f"{metric}_delta_sim_low")),
                            "sim_high": clean(row.get(f"{metric}_delta_sim_high"))})
    return out


def slower_baseline(main: pd.DataFrame) -> list[dict[str, Any]]:
    """Re-ranked runs at the native dim whose C covers the gallery (their stage 2 alone is the baseline's exact
    search) that are faster than the baseline in text→image batch QPS."""
    out = []
    exact = main[main["exact"]].set_index("run_id")
    whole = main[main["rerank"] & (main["dim"] == main["native_dim"]) & main["candidate_size"].notna()
                 & (main["candidate_size"] >= main["gallery_size"])]
    for _, row in whole.iterrows():
        base = row.get("baseline_run")
        if base in exact.index and pd.notna(row.get("t2i_qps")) and pd.notna(exact.at[base, "t2i_qps"]) \
                and row["t2i_qps"] > exact.at[base, "t2i_qps"]:
            out.append({"check": "slower_baseline", "run_id": row["run_id"], "label": row["label"],
                        "qps": clean(row["t2i_qps"]), "baseline_qps": clean(exact.at[base, "t2i_qps"]),
                        "baseline_label": exact.at[base, "label"]})
    return out


def unstable_speed(main: pd.DataFrame) -> list[dict[str, Any]]:
    out = []
    for d in DIRECTIONS:
        column = f"{d}_speed_spread_pct"
        if column not in main.columns:
            continue
        for _, row in main[pd.to_numeric(main[column], errors="coerce") > SPREAD_LIMIT_PCT].iterrows():
            out.append({"check": "unstable_speed", "run_id": row["run_id"], "label": row["label"], "direction": d,
                        "spread_pct": clean(row[column]), "limit_pct": SPREAD_LIMIT_PCT})
    return out


def check_these(main: pd.DataFrame, metrics: list[str]) -> list[dict[str, Any]]:
    """Every check of the module, in the order the report lists them."""
    return above_fp32(main, metrics) + slower_baseline(main) + unstable_speed(main)
