"""Family-wise claims: the joint (simultaneous) intervals behind every "indistinguishable / below / above"
verdict a group's report states, so that all of them hold together at the stated confidence, not one at a time.

A group of 300 configurations gets about 300 such verdicts; with per-run 95% intervals about 15 of them are
wrong by chance even when every interval is right. The family here is every comparison the Summary and the
findings word as a verdict: each configuration against fp32 exact in the head metric (t2i R@1) and in the
first recall of the other direction (i2t R@1, the "Check these" list reads it), every re-ranking gain and
every --dim_method comparison. Its joint intervals come from the max-statistic over the group's paired
bootstrap differences (bootstrap.simultaneous): the images are resampled once for the whole group, so the
resamples already carry how the comparisons depend on each other (they share the baseline and most images),
which Bonferroni or Holm would ignore and pay for with wider intervals.

Per-run marginal intervals stay where they were (<m>_delta_ci_low / _high in summary.csv); the joint ones are
<m>_delta_sim_low / _high beside them and gain_sim_* / difference_sim_* in the tables.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import pandas as pd

from retrieval.bootstrap import Pairing, simultaneous
from retrieval.frame import main_runs

METHOD = ("max-statistic simultaneous bootstrap intervals over the group's paired differences (studentised by "
          "each difference's bootstrap spread, the same image resamples for every member)")
# The joint critical value is a quantile of one maximum per resample: more resamples than this add nothing a
# reader would see, and bound the family's memory at J x 20,000 values.
FAMILY_RESAMPLES = 20_000


def claim_metrics(group: Mapping[str, Any]) -> list[str]:
    """The head metric and the first recall of the other direction ('t2i_R@1', 'i2t_R@1')."""
    head = group.get("head_metric")
    if not head:
        return []
    other = next((m for m in group["recall_metrics"] if m.split("_")[0] != head.split("_")[0]), None)
    return [head] + ([other] if other else [])


def members(group: Mapping[str, Any], main: pd.DataFrame) -> list[tuple[tuple, list[tuple[str, str, float]], float]]:
    """(key, terms, estimate) of every comparison in the family; terms as bootstrap.Pairing.linear takes them."""
    out, head = [], group.get("head_metric")
    for metric in claim_metrics(group):
        for _, row in main[~main["exact"]].iterrows():
            base = row.get("baseline_run")
            if isinstance(base, str) and pd.notna(row.get(f"{metric}_delta")):
                out.append((("delta", row["run_id"], metric), [(row["run_id"], metric, 1.0), (base, metric, -1.0)],
                            float(row[f"{metric}_delta"])))
    for table, a, b, value in (("reranking", "best_run", "plain_run", "gain"),
                               ("dim_methods", "best_run", "other_run", "difference")):
        for row in group.get(table) or []:
            out.append(((table, row[a], row[b]), [(row[a], head, 1.0), (row[b], head, -1.0)], float(row[value])))
    return out


def joint_intervals(group: Mapping[str, Any], main: pd.DataFrame, paired: Pairing
                    ) -> tuple[dict[tuple, tuple[float, float]], dict[str, Any]]:
    """({member key: (low, high)}, the record of the family) for one group; empty without resamples."""
    confidence = paired.confidence
    found = []
    for key, terms, estimate in members(group, main):
        samples = paired.linear(terms) if confidence else None
        if samples is not None:
            found.append((key, samples[:FAMILY_RESAMPLES], estimate))
    record = {"method": METHOD, "confidence": confidence, "members": len(found), "critical_value": None,
              "metrics": claim_metrics(group), "resamples_used": None}
    if not found:
        return {}, record
    low, high, critical = simultaneous(np.stack([s for _, s, _ in found], axis=1),
                                       np.array([e for _, _, e in found]), confidence)
    record.update(critical_value=critical, resamples_used=int(len(found[0][1])))
    return {key: (float(lo), float(hi)) for (key, _, _), lo, hi in zip(found, low, high)}, record


def add_joint(group: dict[str, Any], frame: pd.DataFrame, paired: Pairing) -> pd.DataFrame:
    """The group's joint intervals into the frame (<m>_delta_sim_low / _high) and into its tables (the memory
    frontiers' and dim reductions' delta_sim_*, the re-ranking gains' gain_sim_*, the dim methods'
    difference_sim_*); group['family'] records the method, the size of the family and its critical value."""
    main = main_runs(frame[frame["group"] == group["group"]], group["main_gallery_size"])
    joint, group["family"] = joint_intervals(group, main, paired)
    for metric in claim_metrics(group):
        for side in ("low", "high"):
            if f"{metric}_delta_sim_{side}" not in frame.columns:
                frame[f"{metric}_delta_sim_{side}"] = np.nan
    index = dict(zip(frame["run_id"], frame.index))
    for key, (low, high) in joint.items():
        if key[0] == "delta":
            frame.loc[index[key[1]], [f"{key[2]}_delta_sim_low", f"{key[2]}_delta_sim_high"]] = [low, high]
    head = group.get("head_metric")
    for table in ("memory_frontier", "memory_frontier_total", "dim_reduction"):
        for row in group.get(table) or []:
            row["delta_sim_low"], row["delta_sim_high"] = joint.get(("delta", row["run_id"], head), (None, None))
    for table, a, b, prefix in (("reranking", "best_run", "plain_run", "gain"),
                                ("dim_methods", "best_run", "other_run", "difference")):
        for row in group.get(table) or []:
            row[f"{prefix}_sim_low"], row[f"{prefix}_sim_high"] = joint.get((table, row[a], row[b]), (None, None))
    return frame
