"""The summary of a folder of sweep results, behind analyze_results.py's experiment_summary.json, plots and
REPORT.md: per group, its source, environment, baselines and every table of tables.py (analyse_group); for
the folder, the baseline ratios and intervals of every run and the summary of each group (analyse). Like
frame.py (the frame of runs and its columns) and tables.py (each table), this module only computes;
findings.py turns the stored tables into sentences, report.py into the markdown document, plots.py into
pictures.

Runs are grouped by (dataset, split, model) and content (runs.name_groups) of the file they were
measured on; every comparison happens inside one group: numbers from different datasets or encoders are never mixed.
Inside a group the headline analysis uses the real gallery (the smallest gallery size, see
frame.main_runs); larger galleries (distractors added by `--gallery_sizes`) only feed the scaling tables.

Run files are read, upgraded and flattened into rows by retrieval/runs.py (the run record's one home);
frame.runs_frame makes the frame of those rows that this module starts from.
"""
from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

import pandas as pd

from retrieval import bootstrap, checks, family, speed_claims
from retrieval.protocol_names import describe_protocol
from retrieval.decomposition import decomposition_table, missing_references
from retrieval.frame import (Paired, add_baseline_ratios, add_intervals, completed, interval_columns, main_runs,
                             metric_columns, no_pairs, recall_columns, records)
from retrieval.metrics import DIRECTIONS
from retrieval.runs import data_attrs, run_id
from retrieval.tables import (budget_table, dim_methods_table, dim_reduction_table, factor_means,
                              memory_frontier_table, ood_gap_table, pareto_fronts, pareto_records, reranking_table,
                              scaling_table, whole_gallery_candidates)

# Read from every run's "env" (environment_summary).
ENV_KEYS = ("hostname", "cpu", "cpu_count", "threads", "gpu", "git_commit", "python", "numpy", "faiss", "torch")
# What the report quotes about an fp32 exact baseline, besides its quality metrics.
BASELINE_COLUMNS = ["run_id", "label", "data_path", "bytes_per_vector", "total_bytes_per_vector", "qps",
                    "latency_p50_ms"]
BASELINE_EXTRA = ["dim"] + [f"{d}_{name}{part}" for d in DIRECTIONS for name in ("qps", "latency_p50_ms")
                             for part in ("", "_ci_low", "_ci_high")]


def _distinct(values):
    out = []
    for v in values:
        if v not in out:
            out.append(v)
    return out


def environment_summary(runs: list[dict]) -> dict:
    """Each environment key → its value, or the list of distinct values when runs disagree."""
    env = {}
    for key in ENV_KEYS:
        values = _distinct([(run.get("env") or {}).get(key) for run in runs if not run.get("skipped")])
        values = [v for v in values if v is not None]
        if values:
            env[key] = values[0] if len(values) == 1 else values
    return env


def source_summary(runs: list[dict]) -> dict:
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


def analyse_group(frame: pd.DataFrame, runs: list[dict], primary_metric: str | None = None,
                  paired: Paired = no_pairs) -> dict:
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
    decomposed = decomposition_table(main, family.claim_metrics({"head_metric": head, "recall_metrics": recalls}),
                                     paired) if head and not exact.empty else []
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
        "decomposition": decomposed, "decomposition_missing": missing_references(decomposed),
        "protocol": describe_protocol(data_attrs(runs[0])) if runs and data_attrs(runs[0]) else None,
        "speed": speed_summary(main),
    }


def speed_summary(main: pd.DataFrame) -> dict:
    """The machine while the group's runs were timed (speed_claims.load_record), the one-line warning when it
    was loaded, and per direction the latency percentiles some run could not estimate."""
    rows = records(main)
    record = speed_claims.load_record(rows)
    return {"conditions": record, "warning": speed_claims.load_warning(record),
            "latency_gaps": {d: speed_claims.latency_gaps(rows, d) for d in DIRECTIONS}}


def interval_summary(done: pd.DataFrame) -> dict:
    """How many of the group's runs have bootstrap intervals, and why the others have none."""
    if "ci_note" not in done.columns:
        return {"computed": False, "runs_with_intervals": 0, "runs_paired": 0, "notes": []}
    lows = [c for c in done.columns if c.endswith("_ci_low")]
    paired = [c for c in lows if c.endswith("_delta_ci_low")]
    notes = Counter(note for note in done["ci_note"] if note)
    return {"computed": True, "runs_with_intervals": int(done[lows].notna().any(axis=1).sum()),
            "runs_paired": int(done[paired].notna().any(axis=1).sum()),
            "notes": [{"reason": reason, "runs": n} for reason, n in notes.most_common()]}


def analyse(frame: pd.DataFrame, runs: list[dict], primary_metric: str | None = None, results_dir: str | None = None,
            settings: bootstrap.Settings | None = None, invalid: Sequence[dict] = ()
            ) -> tuple[pd.DataFrame, dict, bootstrap.Pairing]:
    """Summary dict of the whole results folder: rows, groups (one per dataset/split/model).

    settings: bootstrap.Settings; with resamples > 0 (and results_dir, where the rank files are) every run
    gets intervals (add_intervals). invalid: split_invalid's list of the run files left out, listed as they are.
    Returns (frame, summary, paired): paired holds the resamples (selection.py's optimism reads them)."""
    by_id = {run_id(r): r for r in runs}
    frame = checks.add_spreads(add_baseline_ratios(frame), by_id)
    paired, on = no_pairs, settings is not None and settings.resamples > 0
    if on:
        frame, paired = add_intervals(frame, runs, results_dir, settings)
    groups = []
    for name, part in list(frame.groupby("group", sort=True)):
        group = analyse_group(part, [by_id[i] for i in part["run_id"]], primary_metric, paired)
        group["intervals"]["confidence"] = settings.confidence if on else None
        # The joint intervals need the group's tables (their comparisons are members of the family) and
        # the checks need the joint intervals: both come after the group's summary.
        frame = family.add_joint(group, frame, paired)
        group["checks"] = checks.check_these(main_runs(frame[frame["group"] == name], group["main_gallery_size"]),
                                             family.claim_metrics(group))
        groups.append(group)
    return frame, {
        "schema": "experiment_summary/2",
        "runs_total": int(len(frame)),
        "runs_skipped": int((frame["status"] == "skipped").sum()),
        "runs_invalid": len(invalid),
        "invalid_runs": list(invalid),
        "intervals": settings.record() if on else {"method": None, "resamples": 0},
        "groups": groups,
        "rows": records(frame),
    }, paired
