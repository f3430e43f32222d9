"""REPORT.md: the markdown document that places, per dataset/model group, the sentences findings.py builds
from the summary next to the summary's tables and links to the group's plots.

Nothing here computes a comparison: every number in a table is read from the summary
(analysis.analyse), so the report can never say something experiment_summary.json does not hold.
The one exception is the table of all completed runs, which lists the frame's rows as they are.
"""
from __future__ import annotations

import math
import os
from collections.abc import Iterable, Mapping, Sequence

import pandas as pd

from retrieval.frame import main_runs, records
from retrieval.metrics import DIRECTIONS
from retrieval.findings import Group, Row, Summary, distractor_label, findings, fmt_cell, metric_words
from retrieval.report_sections import check_lines, decomposition_lines
from retrieval.summary_text import summary_lines


def markdown_table(rows: Iterable[Mapping[str, object]], columns: Sequence[str],
                   headers: Sequence[str] | None = None) -> str:
    """A GitHub-markdown table; floats as findings.fmt_cell prints them, None or NaN → '–'."""
    headers = headers or columns
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    for row in rows:
        cells = []
        for col in columns:
            value = row.get(col)
            if value is None or (isinstance(value, float) and math.isnan(value)):
                cells.append("–")
            elif isinstance(value, float):
                cells.append(fmt_cell(value))
            else:
                cells.append(str(value).replace("|", "\\|"))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


RUN_TABLE = [("label", "config"), ("bytes_per_vector", "bytes/vector"), ("t2i_R@1", "t2i R@1"),
             ("t2i_R@5", "t2i R@5"), ("t2i_R@10", "t2i R@10"), ("i2t_R@1", "i2t R@1"), ("i2t_R@5", "i2t R@5"),
             ("i2t_R@10", "i2t R@10"), ("RSUM", "RSUM"), ("retention_t2i_R@1", "t2i R@1 kept %"),
             ("t2i_R@1_delta", "t2i R@1 - fp32"), ("t2i_R@1_delta_ci_low", "interval low"),
             ("t2i_R@1_delta_ci_high", "interval high"), ("total_bytes_per_vector", "total bytes/vector"),
             ("qps", "batch QPS"), ("latency_p50_ms", "p50 ms"), ("run_id", "run")]


def report_markdown(summary: Summary, frame: pd.DataFrame, plots: Mapping[str, Sequence[tuple[str, str]]],
                    report_dir: str) -> str:
    """REPORT.md text: per group the source, findings, tables and the embedded plots.

    plots: {group: [(title, path), ...]}; paths are written relative to report_dir.
    """
    invalid = summary.get("invalid_runs") or []
    left_out = f", {len(invalid)} invalid run files left out" if invalid else ""
    lines = ["# Retrieval under compression: experiment report", "",
             f"{summary['runs_total']} run files, {summary['runs_skipped']} skipped configurations{left_out}, "
             f"{len(summary['groups'])} dataset/model group(s). Every number below is read from "
             "`summary.csv` / `experiment_summary.json` next to this file; rows from different groups are "
             "never compared.", ""]
    lines += _invalid_runs(invalid)
    for group in summary["groups"]:
        main = main_runs(frame[frame["group"] == group["group"]], group["main_gallery_size"])
        title = group.get("title") or f"{group['dataset']} / {group['split']} / {group['model']}"
        lines += [f"## {title}", "", "### Summary", ""]
        lines += summary_lines(group, summary) + [""] + check_lines(group)
        lines += ["### Source", ""] + _source_table(group)
        lines += ["### Findings in detail", ""] + [f"- {s}" for s in findings(group)] + [""]
        lines += decomposition_lines(group)
        lines += _run_table(group, main) + _pareto_tables(group) + _budget_table(group) + _means_tables(group)
        if group["scaling"]:
            cols = [c for c in group["scaling"][0] if c != "distractors_synthetic"]
            scaling = [dict(row, distractors=distractor_label(row)) for row in group["scaling"]]
            lines += ["### Gallery-size scaling", "", markdown_table(scaling, cols), ""]
        lines += _ood_lines(group)
        if group["skipped"]:
            lines += ["### Skipped configurations", "",
                      markdown_table(group["skipped"], ["label", "skipped_reason", "run_id"],
                                     ["config", "reason", "run"]), ""]
        lines += _plot_links(plots.get(group["group"]), report_dir)
    return "\n".join(lines).rstrip() + "\n"


def _invalid_runs(invalid: Sequence[Row]) -> list[str]:
    """The run files left out because they hold a NaN or infinite number (runs.split_invalid)."""
    if not invalid:
        return []
    return ["## Invalid run files", "",
            "These run files hold a NaN or infinite number, so they are in no table, ranking, frontier or "
            "operating point of this report:", "", markdown_table(invalid, ["file", "reason"]), ""]


def _source_table(group: Group) -> list[str]:
    facts = [("dataset", group["dataset"]), ("split", group["split"]), ("model", group["model"]),
             ("embeddings file(s)", ", ".join(map(str, group["source"].get("data_paths", [])))),
             ("gallery sizes", ", ".join(f"{g:,}" for g in group["gallery_sizes"]) or "–"),
             ("queries", "; ".join(map(_query_sample, group["source"].get("query_samples") or [None]))),
             ("runs", f"{group['runs_completed']} completed, {group['runs_skipped']} skipped")]
    facts += [(key, ", ".join(map(str, value)) if isinstance(value, list) else str(value))
              for key, value in group["environment"].items()]
    return [markdown_table([{"what": k, "value": v} for k, v in facts], ["what", "value"]), ""]


def _query_sample(sample: Row | None) -> str:
    """'200 of 1,000 images, 1,000 of 5,000 captions, seeded 0 (--max_queries 200)' from a run's config."""
    if not sample:
        return "every image and caption of the file"
    return (f"{sample['images']:,} of {sample['images_total']:,} images, {sample['captions']:,} of "
            f"{sample['captions_total']:,} captions, seeded {sample['seed']} (--max_queries {sample['max_queries']:,})")


def _run_table(group: Group, main: pd.DataFrame) -> list[str]:
    """Every completed run at the main gallery, cheapest first (the columns some run has a value in)."""
    table = list(RUN_TABLE)
    if any(f"{d}_qps" in main.columns and main[f"{d}_qps"].notna().any() for d in DIRECTIONS):
        at = [c for c, _ in table].index("qps")
        table[at:at + 2] = [(f"{d}_{name}", f"{d} {title}") for name, title in
                            (("qps", "batch QPS"), ("latency_p50_ms", "p50 ms")) for d in DIRECTIONS]
    columns = [(c, h) for c, h in table if c in main.columns and main[c].notna().any()]
    ordered = main.sort_values(["bytes_per_vector", "RSUM" if "RSUM" in main else "run_id"],
                               ascending=[True, False], na_position="last", kind="stable")
    gallery = f" (gallery {group['main_gallery_size']:,})" if group["main_gallery_size"] else ""
    return [f"### All completed runs{gallery}", "",
            markdown_table(records(ordered), [c for c, _ in columns], [h for _, h in columns]), ""]


def _pareto_tables(group: Group) -> list[str]:
    lines = []
    for cost, title in (("bytes_per_vector", "memory (index bytes/vector)"),
                        ("total_bytes_per_vector", "memory (index + re-rank vectors, bytes/vector)"),
                        ("latency_p50_ms", "single-query p50 latency (ms)")):
        head = next(iter(group["pareto"].get(cost, {})), None)
        if head and group["pareto"][cost][head]:
            front = group["pareto"][cost][head]
            column = front[0]["cost_column"]
            chosen = (group.get("selection") or {}).get("selected_on") and group["selection"]["split"]
            lines += [f"### Pareto frontier: {metric_words(head)} vs {title}"
                      + (f" (chosen on {chosen}, {group['split']}'s values)" if chosen else ""), "",
                      markdown_table(front, ["label", column, head, "run_id"],
                                     ["config", f"{title} [{column}]", metric_words(head), "run"]), ""]
    return lines


def _budget_table(group: Group) -> list[str]:
    lines = []
    for key, cost, what in (("budgets", "bytes_per_vector", "index memory"),
                            ("budgets_total", "total_bytes_per_vector", "index + re-rank vector memory")):
        if not group.get(key):
            continue
        metric = metric_words(group["primary_metric"])
        chosen = (group.get("selection") or {}).get("selected_on")
        split = (group.get("selection") or {}).get("split")
        extra = (["selected_value", "optimism"], [f"{metric} on {split} (chosen there)", "optimism (points)"]) \
            if chosen else ([], [])
        lines += [f"### Best configuration per {what} budget (by {metric}{f', chosen on {split}' if chosen else ''})",
                  "", markdown_table(group[key], [f"budget_{cost}", "label", "value", "value_ci_low", "value_ci_high"]
                                     + extra[0] + [cost, "candidates"],
                                     [f"budget ({cost})", "best config", metric, "interval low", "interval high"]
                                     + extra[1] + [f"its {cost}", "configs within budget"]), ""]
    return lines


def _means_tables(group: Group) -> list[str]:
    lines = []
    for factor, table in group["means"].items():
        if not table:
            continue
        rows = [dict(level=level, **values) for level, values in table.items()]
        cols = [c for c in rows[0] if c != "level"]
        lines += [f"### Mean per {metric_words(factor)}", "",
                  markdown_table(rows, ["level"] + cols, [factor] + [metric_words(c) for c in cols]), ""]
    return lines


def _ood_lines(group: Group) -> list[str]:
    """The out-of-distribution table: per padded gallery size, how near the text queries get to the image
    gallery next to how near the real images get to its other rows."""
    rows = group.get("ood_gap") or []
    if not rows:
        return []
    table = [dict(row, distractors=distractor_label(row)) for row in rows]
    return ["### Distractors: out-of-distribution gap", "",
            "Mean top-1 cosine against the padded image gallery (exact fp32 at the run's dim): of the text queries, "
            "and of the real images against the gallery's other rows; gap = image - text.", "",
            markdown_table(table, ["gallery_size", "distractors", "dim", "ood_text_top1_cosine",
                                   "ood_image_top1_cosine", "ood_gap", "run_id"],
                           ["gallery size", "distractors", "dim", "text top-1 cosine", "image top-1 cosine", "gap",
                            "run"]), ""]


def _plot_links(plots: Sequence[tuple[str, str]] | None, report_dir: str) -> list[str]:
    if not plots:
        return []
    lines = ["### Plots", ""]
    for title, path in plots:
        rel = os.path.relpath(path, report_dir).replace(os.sep, "/")
        lines += [f"![{title}]({rel})", ""]
    return lines
