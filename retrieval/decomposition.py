"""Where a configuration's loss comes from: its paired difference to fp32 exact at the native dim, split into
the steps that lead from that baseline to it, each measured against the run one step before it:

    dimension     fp32 flat at the run's dim and --dim_method      - fp32 exact at the native dim
    quantization  the run's precision, flat index, no re-ranking   - fp32 flat at the run's dim
    index         the run's IVF / HNSW index (same knobs), no re-ranking - the same precision on a flat index
    reranking     the run itself (C candidates re-ranked)          - the same index without re-ranking

The steps telescope: their values add up to the total exactly, and so do their resampled values, because
every run of a split is resampled with the same draws (bootstrap.Pairing). A step that does not apply (a flat
index, no re-ranking, the native dim, fp32) is absent. A step whose reference run the sweep did not measure is
never guessed: it is merged with the next one into one segment, and the missing run is named. The direction
asymmetry is the t2i loss minus the i2t loss (points, paired on the same resamples): positive when text→image
queries lose more than image→text ones.
"""
from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np
import pandas as pd

from retrieval.bootstrap import Pairing
from retrieval.frame import clean
from retrieval.runs import config_label

PARTS = ("dimension", "quantization", "index", "reranking")
PART_WORDS = {"dimension": "dimension reduction", "quantization": "quantization", "index": "index approximation",
              "reranking": "re-ranking recovery"}
_KNOBS = ("nlist", "nprobe", "hnsw_m", "ef_search")


def _plain(value: Any) -> Any:
    return None if value is None or (isinstance(value, float) and math.isnan(value)) else value


def _key(row: Mapping[str, Any], **changed: Any) -> tuple:
    """What identifies a configuration inside one group: dim, method, codec, index and its knobs, re-ranking
    (C only when re-ranked: a run without re-ranking searched max K, whatever that was)."""
    values = {"dim": row["dim"], "dim_method": row["dim_method"], "precision": row["precision"],
              "pq_m": row.get("pq_m"), "index": row.get("index") or "flat", "rerank": bool(row["rerank"]),
              "candidate_size": row["candidate_size"] if row["rerank"] else None,
              **{k: row.get(k) for k in _KNOBS}}
    values.update(changed)
    return tuple(_plain(values[k]) for k in sorted(values))


def references(row: Mapping[str, Any]) -> list[tuple[str, bool, tuple, dict]]:
    """Per step (part, applies, key of its reference run, the changes that describe it)."""
    fp32 = {"precision": "fp32", "pq_m": None, "index": "flat", "rerank": False, "candidate_size": None,
            **{k: None for k in _KNOBS}}
    flat = {"index": "flat", "rerank": False, "candidate_size": None, **{k: None for k in _KNOBS}}
    plain = {"rerank": False, "candidate_size": None}
    steps = [("dimension", row["dim"] < row["native_dim"], fp32), ("quantization", row["precision"] != "fp32", flat),
             ("index", (row.get("index") or "flat") != "flat", plain), ("reranking", bool(row["rerank"]), {})]
    return [(part, bool(applies), _key(row, **changes), changes) for part, applies, changes in steps]


def _describe(row: Mapping[str, Any], changes: dict) -> str:
    """The label the missing reference run would have."""
    shown = dict(row, **changes)
    shown["candidate"] = "no rerank" if not shown["rerank"] else f"C={int(shown['candidate_size'])}"
    shown["exact"] = False
    return config_label(shown)


def chain(row: Mapping[str, Any], lookup: Mapping[tuple, str], baseline: str) -> list[dict]:
    """The segments from the baseline to the run: each {parts, from_run, to_run, missing}; a step without its
    reference run is merged into the next segment, which names it under missing."""
    segments, start, pending, missing = [], baseline, [], []
    for part, applies, key, changes in references(row):
        if not applies:
            continue
        pending.append(part)
        found = row["run_id"] if part == "reranking" or key == _key(row) else lookup.get(key)
        if found is None:
            missing.append(_describe(row, changes))
            continue
        segments.append({"parts": pending, "from_run": start, "to_run": found, "missing": missing})
        start, pending, missing = found, [], []
    if pending:  # the last applicable steps had no reference: they end at the run itself
        segments.append({"parts": pending, "from_run": start, "to_run": row["run_id"], "missing": missing})
    return segments


def decompose(row: Mapping[str, Any], values: Mapping[str, Mapping[str, float]], lookup: Mapping[tuple, str],
              metric: str, paired: Pairing) -> dict[str, Any]:
    """One direction of one run: total (run - baseline) and its segments, each with value, interval and its
    resampled values under 'samples' (dropped before the summary; tests check that they add up)."""
    base = row["baseline_run"]
    total = values[row["run_id"]][metric] - values[base][metric]
    out = {"metric": metric, "total": total, "samples": paired.linear([(row["run_id"], metric, 1.0),
                                                                        (base, metric, -1.0)])}
    out["total_ci_low"], out["total_ci_high"] = _bounds(out["samples"], paired)
    out["segments"] = []
    for segment in chain(row, lookup, base):
        samples = paired.linear([(segment["to_run"], metric, 1.0), (segment["from_run"], metric, -1.0)])
        low, high = _bounds(samples, paired)
        out["segments"].append(dict(segment, value=values[segment["to_run"]][metric] -
                                    values[segment["from_run"]][metric], ci_low=low, ci_high=high, samples=samples))
    return out


def _bounds(samples: np.ndarray | None, paired: Pairing) -> tuple[float | None, float | None]:
    return (None, None) if samples is None else paired.interval(samples)


def decomposition_table(main: pd.DataFrame, metrics: list[str], paired: Pairing, keep_samples: bool = False
                        ) -> list[dict[str, Any]]:
    """Per compressed run with a baseline: both directions decomposed, and the asymmetry t2i loss - i2t loss."""
    done = main.dropna(subset=[m for m in metrics])
    lookup = {_key(r): r["run_id"] for _, r in done.sort_values("run_id").iterrows()}
    values = {r["run_id"]: {m: float(r[m]) for m in metrics} for _, r in done.iterrows()}
    rows = []
    for _, row in done[~done["exact"] & done["baseline_run"].isin(list(values))].iterrows():
        entry = {"run_id": row["run_id"], "label": row["label"],
                 "directions": [decompose(row, values, lookup, m, paired) for m in metrics]}
        if len(metrics) == 2:
            entry.update(_asymmetry(row, entry["directions"], paired))
        rows.append(entry if keep_samples else _without_samples(entry))
    return rows


def _asymmetry(row: Mapping[str, Any], directions: list[dict], paired: Pairing) -> dict[str, Any]:
    """t2i loss - i2t loss = i2t difference - t2i difference, paired on the same resamples."""
    t2i, i2t = directions
    base = row["baseline_run"]
    samples = paired.linear([(row["run_id"], i2t["metric"], 1.0), (base, i2t["metric"], -1.0),
                             (row["run_id"], t2i["metric"], -1.0), (base, t2i["metric"], 1.0)])
    low, high = _bounds(samples, paired)
    return {"asymmetry": i2t["total"] - t2i["total"], "asymmetry_ci_low": low, "asymmetry_ci_high": high}


def _without_samples(entry: dict[str, Any]) -> dict[str, Any]:
    def clean_part(d):
        return {k: (clean(v) if not isinstance(v, list) else v) for k, v in d.items() if k != "samples"}
    return dict({k: clean(v) for k, v in entry.items() if k != "directions"},
                directions=[dict(clean_part(d), segments=[clean_part(s) for s in d["segments"]])
                            for d in entry["directions"]])


def missing_references(table: list[dict[str, Any]]) -> list[str]:
    """Every reference run some decomposition lacks, once each, in order."""
    names = [m for row in table for d in row["directions"] for s in d["segments"] for m in s["missing"]]
    return list(dict.fromkeys(names))
