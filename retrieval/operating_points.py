"""Operating points: the configuration to pick under several constraints at once ("at least 99% of fp32
t2i R@1, p99 under 2 ms, smallest memory"), per dataset/model group, from the runs at its main gallery.

A requirement is COLUMN>=VALUE or COLUMN<=VALUE over a numeric column of summary.csv (bootstrap columns
included: t2i_R@1_delta_ci_low>=-1 reads "at most 1 point below fp32, with 95% confidence"); the objective is
min:COLUMN or max:COLUMN. When no run meets every requirement, the closest run is named with what it misses.
The default table (no --require needed) answers the usual question big-ann style: for 95 / 99 / 99.5% of
the fp32 exact value of the head metric, the smallest and the fastest configuration that reaches it.
"""
from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from retrieval import speed_claims
from retrieval.frame import main_runs, speed_column
from retrieval.runs import AnalysisError

# The memory a configuration needs to answer queries as measured: the index, plus the fp32 vectors a
# re-ranked configuration reads in stage 2 (the index bytes alone would flatter re-ranking).
DEFAULT_OBJECTIVE = "min:total_bytes_per_vector"
DEFAULT_THRESHOLDS = (95.0, 99.0, 99.5)
_NUMBER = r"[-+]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d+)?"
_REQUIREMENT = re.compile(fr"^\s*(\S+?)\s*(>=|<=)\s*({_NUMBER})\s*$")
_OBJECTIVE = re.compile(r"^\s*(min|max)\s*:\s*(\S+)\s*$")
# Columns of a run that are text, never a requirement.
_TEXT = ("run_id", "file", "dataset", "split", "model", "group", "status", "skipped_reason", "label", "candidate",
         "data_path", "dim_method", "precision", "index", "baseline_run", "ci_note", "ratio_note")


@dataclass(frozen=True)
class Requirement:
    """COLUMN>=VALUE or COLUMN<=VALUE, with the text the user gave."""
    text: str
    column: str
    op: str       # ">=" or "<="
    value: float

    def met(self, values: pd.Series) -> pd.Series:
        """Boolean Series: which values meet it (a missing value never does)."""
        return values >= self.value if self.op == ">=" else values <= self.value

    def shortfall(self, values: pd.Series) -> pd.Series:
        """How far each value is from meeting it (0 when met, NaN when missing)."""
        gap = self.value - values if self.op == ">=" else values - self.value
        return gap.clip(lower=0)


@dataclass(frozen=True)
class Objective:
    """min:COLUMN or max:COLUMN: what to minimise or maximise among the runs meeting the requirements."""
    sense: str    # "min" or "max"
    column: str

    def __str__(self) -> str:
        return f"{self.sense}:{self.column}"


def parse_requirement(text: str) -> Requirement:
    """'t2i_retention_R@1>=99' → Requirement; AnalysisError for another form or a value beyond the float range."""
    match = _REQUIREMENT.match(text)
    if not match:
        raise AnalysisError(f"--require {text!r}: expected COLUMN>=VALUE or COLUMN<=VALUE, e.g. "
                            "t2i_retention_R@1>=99")
    value = float(match.group(3))
    if not np.isfinite(value):  # 1e999 reads as infinity: no run could be short of it by a finite amount
        raise AnalysisError(f"--require {text!r}: {match.group(3)} is beyond the float range")
    return Requirement(text.strip(), match.group(1), match.group(2), value)


def parse_objective(text: str) -> Objective:
    """'min:bytes_per_vector' → Objective('min', 'bytes_per_vector')."""
    match = _OBJECTIVE.match(text)
    if not match:
        raise AnalysisError(f"--objective {text!r}: expected min:COLUMN or max:COLUMN, e.g. min:bytes_per_vector")
    return Objective(match.group(1), match.group(2))


def numeric_columns(frame: pd.DataFrame) -> list[str]:
    """The columns a requirement or objective may name: those holding numbers (summary.csv order)."""
    out = []
    for column in frame.columns:
        values = frame[column].dropna()
        if column in _TEXT or values.empty:
            continue
        if pd.api.types.is_numeric_dtype(values) or pd.to_numeric(values, errors="coerce").notna().all():
            out.append(column)
    return out


def check_columns(frame: pd.DataFrame, requirements: Sequence[Requirement], objective: Objective | None) -> None:
    """AnalysisError naming the valid columns when a requirement or the objective names another one."""
    valid = numeric_columns(frame)
    named = [(f"--require {r.text!r}", r.column) for r in requirements]
    named += [(f"--objective {objective}", objective.column)] if objective else []
    rows = frame.to_dict(orient="records")
    for flag, column in named:
        unestimable = speed_claims.unestimable_requirement(column, rows) if column not in valid else None
        if unestimable:
            raise AnalysisError(f"{flag}: {unestimable}")
        if column not in valid:
            raise AnalysisError(f"{flag}: unknown column {column!r} (valid: {', '.join(valid)})")


def select(main: pd.DataFrame, requirements: Sequence[Requirement], objective: Objective,
           head: str | None = None) -> dict[str, Any]:
    """The best run (by objective) meeting every requirement, or the closest run and what it misses.

    Ties on the objective go to the higher head metric, then the run id. Closest: fewest requirements missed,
    then the smallest sum of shortfalls, each divided by |threshold| (the column's spread when that is 0).
    """
    out = {"requirements": [r.text for r in requirements], "objective": str(objective),
           "objective_column": objective.column}
    if main.empty:
        return dict(out, meets=False, run_id=None, label=None, value=None, runs_meeting=0, missed=[])
    values = {r.column: pd.to_numeric(main[r.column], errors="coerce") for r in requirements}
    meets = pd.Series(True, index=main.index)
    for r in requirements:
        meets &= r.met(values[r.column]).fillna(False).astype(bool)
    goal = pd.to_numeric(main[objective.column], errors="coerce")
    ranked = _ranked(main.assign(_goal=goal), objective.sense, head)
    fitting = ranked[meets.loc[ranked.index] & ranked["_goal"].notna()]
    if len(fitting):
        return dict(out, meets=True, runs_meeting=int(len(fitting)), missed=[],
                    **_describe(fitting.iloc[0], requirements, objective.column))
    closest = _closest(ranked, requirements, values)
    missed = [{"requirement": r.text, "column": r.column, "value": _plain(values[r.column][closest]),
               "shortfall": _plain(r.shortfall(values[r.column])[closest])}
              for r in requirements if not bool(r.met(values[r.column])[closest])]
    if not missed:  # runs meet everything but none has a value of the objective column
        missed = [{"requirement": f"a value of {objective.column}", "column": objective.column, "value": None,
                   "shortfall": None}]
    return dict(out, meets=False, runs_meeting=0, missed=missed, **_describe(ranked.loc[closest], requirements,
                                                                          objective.column))


def _ranked(frame: pd.DataFrame, sense: str, head: str | None) -> pd.DataFrame:
    """Runs best-first by _goal, then the higher head metric, then run id."""
    keys, ascending = ["_goal"], [sense == "min"]
    if head and head in frame.columns:
        frame = frame.assign(_head=pd.to_numeric(frame[head], errors="coerce"))
        keys, ascending = keys + ["_head"], ascending + [False]
    return frame.sort_values(keys + ["run_id"], ascending=ascending + [True], na_position="last", kind="stable")


def _closest(ranked: pd.DataFrame, requirements: Sequence[Requirement], values: dict[str, pd.Series]) -> Any:
    """Index of the run missing the fewest requirements, then with the smallest normalised shortfall, then
    the best by the objective (ranked's order)."""
    missed = pd.Series(0, index=ranked.index)
    shortfall = pd.Series(0.0, index=ranked.index)
    for r in requirements:
        column = values[r.column]
        spread = float(column.max() - column.min()) if column.notna().any() else 0.0
        scale = abs(r.value) or spread or 1.0
        missed += (~r.met(column).fillna(False).astype(bool)).astype(int)
        shortfall += (r.shortfall(column) / scale).fillna(np.inf)
    order = pd.DataFrame({"missed": missed, "shortfall": shortfall, "rank": np.arange(len(ranked))},
                         index=ranked.index)
    return order.sort_values(["missed", "shortfall", "rank"], kind="stable").index[0]


def _describe(row: pd.Series, requirements: Sequence[Requirement], column: str) -> dict[str, Any]:
    """run_id, label, objective value and the required columns' values of one run."""
    return {"run_id": row["run_id"], "label": row["label"], "value": _plain(row[column]),
            "columns": {r.column: _plain(row[r.column]) for r in requirements}}


def _plain(value: Any) -> float | None:
    """A float, or None for a missing value (NaN). The runs' numbers are finite (runs.split_invalid) and so
    are the shortfalls from them, so an infinity here is a bug that io.write_json reports."""
    if value is None or isinstance(value, str):
        return None
    value = float(value)
    return None if np.isnan(value) else value


# ----------------------------------------------------------------------------- the default table

def default_table(main: pd.DataFrame, head: str | None) -> list[dict[str, Any]]:
    """Per retention threshold of the head metric: the smallest (index bytes; index + re-rank vectors) and
    the fastest (batch QPS of the head metric's direction) run reaching it, with its paired difference to fp32;
    the fastest also with the runs indistinguishable from it in speed (fastest_with_ties)."""
    retention = f"retention_{head}" if head else None
    if retention not in main.columns or not main[retention].notna().any():
        return []
    direction = head.split("_")[0]
    qps = speed_column(main, "qps", direction)
    rows = []
    for threshold in DEFAULT_THRESHOLDS:
        reach = main[pd.to_numeric(main[retention], errors="coerce") >= threshold]
        row = {"threshold": threshold, "metric": head, "retention_column": retention, "qps_column": qps,
               "reaching": int(len(reach))}
        for name, column in (("smallest", "bytes_per_vector"), ("smallest_total", "total_bytes_per_vector")):
            ranked = _ranked(reach.assign(_goal=pd.to_numeric(reach[column], errors="coerce")), "min", head)
            ranked = ranked[ranked["_goal"].notna()]
            row[name] = _pick(ranked.iloc[0], head, qps) if len(ranked) else None
        fastest, ties = fastest_with_ties(reach, direction, head)
        row["fastest"] = None if fastest is None else _pick(fastest, head, qps)
        row["fastest_ties"] = [_pick(tie, head, qps) for _, tie in ties.iterrows()]
        rows.append(row)
    return rows


def fastest_with_ties(frame_rows: pd.DataFrame, direction: str, head: str | None = None
                      ) -> tuple[pd.Series | None, pd.DataFrame]:
    """The fastest row of frame_rows in `direction` and the rows indistinguishable from it in speed.

    Speed is {direction}_speedup (the ratio to fp32 exact, paired per timing round) where the frame has it,
    else the batch QPS of that direction. With the speedup interval columns ({direction}_speedup_ci_low /
    _ci_high), the ties are the other rows whose interval overlaps the fastest's; without them (runs that
    carry no speed interval) there is no telling speeds apart, and the fastest stands alone.
    Ties on the point value go to the higher head metric, then the run id (as every choice here)."""
    speedup = f"{direction}_speedup"
    column = speedup if speedup in frame_rows.columns and frame_rows[speedup].notna().any() \
        else speed_column(frame_rows, "qps", direction)
    ranked = _ranked(frame_rows.assign(_goal=pd.to_numeric(frame_rows[column], errors="coerce")), "max", head)
    ranked = ranked[ranked["_goal"].notna()]
    if ranked.empty:
        return None, ranked
    fastest, others = ranked.iloc[0], ranked.iloc[1:]
    low, high = f"{speedup}_ci_low", f"{speedup}_ci_high"
    if column != speedup or low not in ranked.columns or pd.isna(fastest.get(low)):
        return fastest, others.iloc[0:0]
    overlaps = (pd.to_numeric(others[high], errors="coerce") >= fastest[low]) & \
        (pd.to_numeric(others[low], errors="coerce") <= fastest[high])
    return fastest, others[overlaps.fillna(False).astype(bool)]


def _pick(row: pd.Series, head: str, qps: str) -> dict[str, Any]:
    """What the table says about one chosen run: its value, retention, paired difference (with its marginal and
    its joint interval, family.py), memory and speed."""
    fields = {"value": head, "retention": f"retention_{head}", "delta": f"{head}_delta",
              "delta_ci_low": f"{head}_delta_ci_low", "delta_ci_high": f"{head}_delta_ci_high",
              "delta_sim_low": f"{head}_delta_sim_low", "delta_sim_high": f"{head}_delta_sim_high",
              "bytes_per_vector": "bytes_per_vector", "total_bytes_per_vector": "total_bytes_per_vector", "qps": qps,
              **{f"speedup{part}": f"{head.split('_')[0]}_speedup{part}" for part in ("", "_ci_low", "_ci_high")}}
    return {"run_id": row["run_id"], "label": row["label"],
            **{name: _plain(row.get(column)) for name, column in fields.items()}}


# ----------------------------------------------------------------------------- into the summary

def add_to_summary(summary: dict[str, Any], frame: pd.DataFrame, requirements: Sequence[Requirement],
                   objective: Objective | None) -> dict[str, Any]:
    """Every group gets default_operating_points; with requirements or an objective, summary['operating_points']
    lists per group the chosen run (requirements, objective, run_id, value, ...)."""
    summary["operating_points"] = []
    for group in summary["groups"]:
        main = main_runs(frame[frame["group"] == group["group"]], group["main_gallery_size"])
        group["default_operating_points"] = default_table(main, group["head_metric"])
        if requirements or objective:
            choice = select(main, requirements, objective or parse_objective(DEFAULT_OBJECTIVE), group["head_metric"])
            summary["operating_points"].append(dict(group=group["group"], **choice))
    return summary
