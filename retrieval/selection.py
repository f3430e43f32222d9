"""Choose on one split, report on another (analyze_results.py --select_on SPLIT).

Picking the best of many noisy estimates and reporting that estimate is the winner's curse: the chosen
configuration's number is biased upward, more so the larger the grid. With --select_on dev, every answer of a
group of another split (test) of the same dataset and model is chosen on the dev group and reported with the
test group's values and intervals: the default operating points, --require / --objective, the best
configuration per budget and the frontiers' picks. Runs are paired across the two groups by their
configuration (config_key); a configuration measured on one side only is named, never silently dropped.

The optimism of a choice is its paired difference to fp32 on the selection split minus the same difference
on the evaluation split (points). The two splits hold different images, so its interval draws them
independently: the evaluation split's resamples are shuffled against the selection split's.
"""
from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np
import pandas as pd

from retrieval.bootstrap import Pairing
from retrieval.frame import clean, main_runs
from retrieval.operating_points import DEFAULT_OBJECTIVE, Objective, Requirement, parse_objective, select
from retrieval.runs import AnalysisError
from retrieval.tables import memory_frontier_table

# Columns that say which configuration a run is (the data file, split and speeds do not). The gallery size is
# not one: both sides are compared at their own main (real) gallery, and splits differ in size (dev 250 images,
# test 1,000 in the demo).
KEY_COLUMNS = ("dim", "native_dim", "dim_method", "precision", "pq_m", "index", "nlist", "nprobe", "hnsw_m",
               "ef_search", "rerank", "exact")


def config_key(row: Mapping[str, Any]) -> tuple:
    """The configuration of a run, comparable across splits (C only when re-ranked)."""
    def plain(value):
        return None if value is None or (isinstance(value, float) and math.isnan(value)) else value
    return tuple(plain(row.get(c)) for c in KEY_COLUMNS) + (plain(row["candidate_size"]) if row["rerank"] else None,)


def pairs(groups: list[dict[str, Any]], split: str) -> list[tuple[dict, dict]]:
    """(selection group, evaluation group) for every group of another split with the same dataset and model as
    a group of `split`; AnalysisError when no group has that split."""
    chosen = [g for g in groups if str(g["split"]) == split]
    if not chosen:
        have = ", ".join(sorted({str(g["split"]) for g in groups}))
        raise AnalysisError(f"--select_on {split}: no group of split {split!r} in these runs (splits: {have})")
    out = []
    for evaluation in groups:
        if str(evaluation["split"]) == split:
            continue
        same = [g for g in chosen if (g["dataset"], g["model"]) == (evaluation["dataset"], evaluation["model"])]
        if same:
            out.append((same[0], evaluation))
    return out


class Confirmation:
    """One selection group and one evaluation group, their main runs paired by configuration."""

    def __init__(self, selection: dict, evaluation: dict, frame: pd.DataFrame, paired: Pairing) -> None:
        self.selection, self.evaluation, self.paired = selection, evaluation, paired
        self.sel = main_runs(frame[frame["group"] == selection["group"]], selection["main_gallery_size"])
        self.ev = main_runs(frame[frame["group"] == evaluation["group"]], evaluation["main_gallery_size"])
        self.by_key = {config_key(r): r for _, r in self.ev.iterrows()}
        self.sel_by_id = self.sel.set_index("run_id", drop=False)
        self.head = evaluation.get("head_metric")

    def record(self) -> dict[str, Any]:
        """What the report says about the pairing: the selection group, and what is on one side only."""
        sel_keys = {config_key(r): r["label"] for _, r in self.sel.iterrows()}
        ev_keys = {config_key(r): r["label"] for _, r in self.ev.iterrows()}
        return {"selected_on": self.selection["group"], "selected_on_title": self.selection["title"],
                "split": self.selection["split"], "paired": len(set(sel_keys) & set(ev_keys)),
                "only_in_selection": sorted(v for k, v in sel_keys.items() if k not in ev_keys),
                "only_in_evaluation": sorted(v for k, v in ev_keys.items() if k not in sel_keys)}

    def counterpart(self, run_id: str | None) -> pd.Series | None:
        """The evaluation run of the selection run's configuration, or None."""
        if run_id is None or run_id not in self.sel_by_id.index:
            return None
        return self.by_key.get(config_key(self.sel_by_id.loc[run_id]))

    def optimism(self, run_id: str, metric: str) -> dict[str, Any]:
        """selected_delta (selection split), optimism = it minus the evaluation split's delta, and its interval."""
        sel, ev = self.sel_by_id.loc[run_id], self.counterpart(run_id)
        chosen = clean(sel.get(f"{metric}_delta"))
        out = {"selected_run": run_id, "selected_delta": chosen, "optimism": None, "optimism_ci_low": None,
               "optimism_ci_high": None}
        if ev is None or chosen is None or pd.isna(ev.get(f"{metric}_delta")):
            return out
        out["optimism"] = chosen - float(ev[f"{metric}_delta"])
        a = self._delta_samples(sel, metric)
        b = self._delta_samples(ev, metric)
        if a is not None and b is not None:
            seed = self.paired.resampler.settings.seed
            b = b[np.random.default_rng([seed, 1]).permutation(len(b))]   # independent draws for another split
            out["optimism_ci_low"], out["optimism_ci_high"] = self.paired.interval(a - b)
        return out

    def _delta_samples(self, row: pd.Series, metric: str) -> np.ndarray | None:
        base = row.get("baseline_run")
        return self.paired.linear([(row["run_id"], metric, 1.0), (base, metric, -1.0)]) if isinstance(base, str) \
            else None

    def confirmed_pick(self, pick: dict | None, metric: str) -> dict | None:
        """A default-table cell: the evaluation run's numbers for the selection's choice, with its optimism;
        {'run_id': None, 'label': <chosen label>, 'missing': True} when the evaluation split lacks it."""
        if pick is None:
            return None
        ev = self.counterpart(pick["run_id"])
        if ev is None:
            return {"run_id": None, "label": pick["label"], "missing": True, **self.optimism(pick["run_id"], metric)}
        fields = {"value": metric, "retention": f"retention_{metric}", "delta": f"{metric}_delta",
                  "delta_ci_low": f"{metric}_delta_ci_low", "delta_ci_high": f"{metric}_delta_ci_high",
                  "delta_sim_low": f"{metric}_delta_sim_low", "delta_sim_high": f"{metric}_delta_sim_high",
                  "bytes_per_vector": "bytes_per_vector", "total_bytes_per_vector": "total_bytes_per_vector"}
        out = {"run_id": ev["run_id"], "label": ev["label"], "missing": False,
               **{name: clean(ev.get(column)) for name, column in fields.items()}}
        out["qps"] = clean(ev.get(pick.get("qps_column") or "qps"))
        direction = metric.split("_")[0]
        out.update({f"speedup{part}": clean(ev.get(f"{direction}_speedup{part}")) for part in ("", "_ci_low", "_ci_high")})
        return dict(out, **self.optimism(pick["run_id"], metric))

    def default_table(self) -> list[dict[str, Any]]:
        rows = []
        for row in self.selection.get("default_operating_points") or []:
            new = dict(row, selected_on=self.selection["split"])
            for role in ("smallest", "smallest_total", "fastest"):
                new[role] = self.confirmed_pick(row[role] and dict(row[role], qps_column=row["qps_column"]),
                                                row["metric"])
            new["fastest_ties"] = [self.confirmed_pick(dict(t, qps_column=row["qps_column"]), row["metric"])
                                   for t in row.get("fastest_ties") or []]
            rows.append(new)
        return rows

    def budgets(self, key: str) -> list[dict[str, Any]]:
        """The selection group's best configuration per budget, with the evaluation split's value."""
        out = []
        for row in self.selection.get(key) or []:
            ev = self.counterpart(row["run_id"])
            metric = row["metric"]
            new = dict(row, selected_value=row["value"], selected_run=row["run_id"])
            new.update(run_id=None if ev is None else ev["run_id"],
                       value=None if ev is None else clean(ev[metric]),
                       value_ci_low=None if ev is None else clean(ev.get(f"{metric}_ci_low")),
                       value_ci_high=None if ev is None else clean(ev.get(f"{metric}_ci_high")))
            new.update({k: v for k, v in self.optimism(row["run_id"], metric).items() if k != "selected_run"})
            out.append(new)
        return out

    def frontier(self, key: str, cost: str) -> list[dict[str, Any]]:
        """The selection group's memory frontier, each step measured on the evaluation split."""
        chosen = [self.counterpart(row["run_id"]) for row in self.selection.get(key) or []]
        front = pd.DataFrame([c for c in chosen if c is not None])
        if not len(front) or not self.head:
            return []
        rows = memory_frontier_table(self.ev, front, self.head, cost)
        by_id = self.ev.set_index("run_id")
        chosen_by_ev = {c["run_id"]: r["run_id"] for r, c in zip(self.selection.get(key) or [], chosen) if c is not None}
        for row in rows:   # the evaluation group's joint intervals (family.py), as its own tables have them
            row.update({k: v for k, v in self.optimism(chosen_by_ev[row["run_id"]], self.head).items()})
            for side in ("low", "high"):
                row[f"delta_sim_{side}"] = clean(by_id.at[row["run_id"], f"{self.head}_delta_sim_{side}"]) \
                    if f"{self.head}_delta_sim_{side}" in by_id.columns else None
        return rows

    def pareto(self) -> dict[str, Any]:
        out = {}
        for cost, by_metric in (self.selection.get("pareto") or {}).items():
            out[cost] = {}
            for metric, rows in by_metric.items():
                mapped = [(r, self.counterpart(r["run_id"])) for r in rows]
                out[cost][metric] = [dict(r, run_id=ev["run_id"], **{r["cost_column"]: clean(ev.get(r["cost_column"])),
                                                                      metric: clean(ev.get(metric))})
                                     for r, ev in mapped if ev is not None]
        return out

    def operating_point(self, requirements: list[Requirement], objective: Objective | None) -> dict[str, Any]:
        choice = select(self.sel, requirements, objective or parse_objective(DEFAULT_OBJECTIVE), self.head)
        ev = self.counterpart(choice.get("run_id"))
        chosen_on = dict(choice, selected_run=choice.get("run_id"), selected_on=self.selection["split"])
        if ev is None:
            return dict(chosen_on, run_id=None, missing_in_evaluation=choice.get("run_id") is not None)
        values = {c: clean(ev.get(c)) for c in choice.get("columns", {})}
        return dict(chosen_on, run_id=ev["run_id"], label=ev["label"], columns=values,
                    value=clean(ev.get(choice["objective_column"])), missing_in_evaluation=False,
                    **{k: v for k, v in self.optimism(choice["run_id"], self.head).items() if k != "selected_run"})


def confirm(summary: dict[str, Any], frame: pd.DataFrame, split: str | None, paired: Pairing,
            requirements: list[Requirement], objective: Objective | None) -> None:
    """Every evaluation group's answers chosen on its selection group (split); without split, each group
    records that its choices were made on the split it reports."""
    for group in summary["groups"]:
        group["selection"] = {"selected_on": None, "split": group["split"]}
    if split is None:
        return
    for selection, evaluation in pairs(summary["groups"], split):
        c = Confirmation(selection, evaluation, frame, paired)
        evaluation["selection"] = c.record()
        selection["selection"] = dict(selection["selection"], selects_for=selection["selection"].get(
            "selects_for", []) + [evaluation["title"]])
        evaluation["default_operating_points"] = c.default_table()
        evaluation["budgets"], evaluation["budgets_total"] = c.budgets("budgets"), c.budgets("budgets_total")
        evaluation["memory_frontier"] = c.frontier("memory_frontier", "bytes_per_vector")
        evaluation["memory_frontier_total"] = c.frontier("memory_frontier_total", "total_bytes_per_vector")
        evaluation["pareto"] = c.pareto()
        if requirements or objective:
            points = summary["operating_points"]
            at = next(i for i, p in enumerate(points) if p["group"] == evaluation["group"])
            points[at] = dict(group=evaluation["group"], **c.operating_point(requirements, objective))
