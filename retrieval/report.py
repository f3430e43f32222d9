"""Words for the numbers analysis.py computed: the findings sentences and the REPORT.md text.

Nothing here computes a comparison: every number in a sentence or table is read from the summary
(analysis.analyse), so the report can never say something experiment_summary.json does not hold.
The one exception is the table of all completed runs, which lists the frame's rows as they are.
"""
import itertools
import math
import os
from collections import Counter

from retrieval.analysis import main_runs, records
from retrieval.metrics import DIRECTION_NAMES, DIRECTIONS


def _fmt(value, digits=1):
    return "n/a" if value is None else f"{value:,.{digits}f}"


def _bytes(value):
    return "n/a" if value is None else (f"{value:,.0f}" if float(value).is_integer() else f"{value:,.2f}")


def _name(metric):
    return metric.replace("_", " ")


# ----------------------------------------------------------------------------- findings

def findings(group):
    """Sentences from one group of the summary; each states only what its stored numbers show."""
    if not group["runs_completed"]:
        return ["No completed runs in this group."]
    if group["head_metric"] is None:
        return []
    out = _baseline_sentences(group) + _frontier_sentences(group) + _reranking_sentences(group)
    out += _dim_reduction_sentences(group)
    out += _budget_sentences(group, len(out))
    out += _scaling_sentences(group) + _caveats(group)
    return out


def _baseline_sentences(group):
    if not group["baseline"]:
        return ["No fp32 exact baseline in these runs, so retention and speed ratios are not available."]
    gallery = group["main_gallery_size"]
    at_gallery = f" (gallery of {gallery:,} items)" if gallery else ""
    out = []
    for base in group["baseline"]:
        metrics = ", ".join(f"{_name(m)} {_fmt(base[m])}" for m in group["recall_metrics"] if base[m] is not None)
        rsum = f", RSUM {_fmt(base['RSUM'])}" if base.get("RSUM") is not None else ""
        speeds = [f"{DIRECTION_NAMES[d]} {_fmt(base[f'{d}_qps'], 0)} queries/s batch, p50 "
                  f"{_fmt(base[f'{d}_latency_p50_ms'], 3)} ms per single query"
                  for d in DIRECTIONS if base[f"{d}_qps"] is not None]
        if not speeds and base["qps"] is not None:
            speeds.append(f"{_fmt(base['qps'], 0)} queries/s batch, p50 {_fmt(base['latency_p50_ms'], 3)} ms "
                          "per single query")
        out.append(f"Baseline fp32 exact search at {int(base['dim'])}-d{at_gallery}: {metrics}{rsum}; "
                   f"{_bytes(base['bytes_per_vector'])} bytes/vector" + "".join(f"; {x}" for x in speeds) + ".")
    return out


def _frontier_sentences(group):
    """What each step down the memory frontier costs in the head metric, and what it does to speed."""
    name, out = _name(group["head_metric"]), []
    for row in group["memory_frontier"]:
        memory = None if row["memory_fraction"] is None else 100 * row["memory_fraction"]
        sentence = (f"{row['label']} keeps {_fmt(row['retention'])}% of fp32 {name} "
                    f"({_fmt(row['value'])} vs {_fmt(row['baseline_value'])}) at {_fmt(memory)}% of the memory "
                    f"({_bytes(row['bytes_per_vector'])} vs {_bytes(row['baseline_bytes_per_vector'])} bytes/vector)")
        if row["rerank"] and row["dim"] is not None:
            # The index alone is not all a two-stage search needs: stage 2 reads the fp32 vectors.
            sentence += (f", plus the {int(row['dim'])}-d fp32 vectors that re-ranking reads "
                         f"({4 * int(row['dim']):,} bytes/vector, in RAM or on disk)")
            if row["covers_gallery"]:
                sentence += (f"; C={int(row['candidate_size'])} covers the whole gallery of "
                             f"{int(row['gallery_size']):,}, so stage 2 is exact fp32 search at {int(row['dim'])}-d")
        speed = _speed_phrase(row)
        out.append(sentence + (f"; {speed}." if speed else "."))
    return out


def _speed_phrase(row):
    """'<direction> batch search is 2.30x faster than fp32 exact (…); single-query p50 latency …'."""
    where = f"{DIRECTION_NAMES[row['speed_direction']]} " if row["speed_direction"] else ""
    parts = []
    if row["qps_ratio"] is not None:
        ratio = row["qps_ratio"]
        word = f"{ratio:.2f}x faster" if ratio >= 1 else f"{1 / ratio:.2f}x slower"
        parts.append(f"{where}batch search is {word} than fp32 exact ({_fmt(row['qps'], 0)} vs "
                     f"{_fmt(row['baseline_qps'], 0)} queries/s)")
    if row["latency_p50_ms"] is not None and row["baseline_latency_p50_ms"] is not None:
        parts.append(f"single-query p50 latency {_fmt(row['latency_p50_ms'], 3)} ms vs "
                     f"{_fmt(row['baseline_latency_p50_ms'], 3)} ms")
    return "; ".join(parts)


def _reranking_sentences(group):
    name, out = _name(group["head_metric"]), []
    for row in group["reranking"]:
        gain, before, after = row["gain"], _fmt(row["plain_value"]), _fmt(row["best_value"])
        # Below the printed precision a gain would read "+0.0 points"; say so instead.
        change = (f"{'raises' if gain > 0 else 'lowers'} {name} from {before} to {after} ({gain:+.1f} points)"
                  if abs(gain) >= 0.05 else f"changes {name} by less than 0.05 points ({before})")
        stage1 = (f"; the true item was among the {int(row['candidate_size'])} stage-1 candidates for "
                  f"{_fmt(row['stage1_recall'])}% of queries" if row["stage1_recall"] is not None else "")
        whole = f", which covers the whole gallery of {int(row['gallery_size']):,}" if row["covers_gallery"] else ""
        out.append(f"Re-ranking {row['precision']} {int(row['dim'])}-d with fp32 vectors "
                   f"(best C={int(row['candidate_size'])}{whole}) {change}{stage1}.")
    return out


def _dim_reduction_sentences(group):
    name = _name(group["head_metric"])
    return [f"Reducing {int(row['native_dim'])} to {int(row['dim'])} dims ({row['dim_method']}, fp32, no "
            f"re-ranking) keeps {_fmt(row['retention'])}% of {name} ({_fmt(row['value'])})."
            for row in group["dim_reduction"]]


def _budget_sentences(group, said):
    """One sentence per budget that buys a better configuration; `said`: sentences before these."""
    out, previous = [], None
    for budget in group["budgets"]:
        if budget["run_id"] == previous:
            continue  # a larger budget that buys nothing better adds no information
        previous = budget["run_id"]
        out.append(f"Within {_bytes(budget['budget_bytes_per_vector'])} bytes/vector the best "
                   f"{_name(group['primary_metric'])} is {_fmt(budget['value'])} ({budget['label']}, "
                   f"{_bytes(budget['bytes_per_vector'])} bytes/vector).")
        if said + len(out) > 60:
            break  # the budget table in the report lists the rest
    return out


def _scaling_sentences(group):
    """Per configuration in the scaling table: its smallest gallery against its largest."""
    head, out = group["head_metric"], []
    for label, rows in itertools.groupby(group["scaling"], key=lambda row: row["label"]):
        rows = list(rows)
        first, last = rows[0], rows[-1]
        out.append(f"{label}: growing the gallery from {int(first['gallery_size']):,} to "
                   f"{int(last['gallery_size']):,} items moves {_name(head)} from {_fmt(first[head])} to "
                   f"{_fmt(last[head])} and batch throughput from {_fmt(first['qps'], 0)} to "
                   f"{_fmt(last['qps'], 0)} queries/s.")
    return out


def _caveats(group):
    """Skipped configurations, and settings the runs disagree on (their speeds do not compare)."""
    out = []
    skipped = Counter(row["skipped_reason"] for row in group["skipped"])
    if skipped:
        reasons = "; ".join(f"{n} x {reason}" for reason, n in skipped.most_common())
        out.append(f"{sum(skipped.values())} configurations were skipped: {reasons}.")
    for key in ("hostname", "cpu", "threads"):
        if isinstance(group["environment"].get(key), list):
            out.append(f"Runs disagree on {key} ({', '.join(map(str, group['environment'][key]))}): speed "
                       f"numbers from different settings are not directly comparable.")
    return out


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
        main = main_runs(frame[frame["group"] == group["group"]], group["main_gallery_size"])
        lines += [f"## {group['dataset']} / {group['split']} / {group['model']}", ""]
        lines += _source_table(group)
        lines += ["### Findings", ""] + [f"- {s}" for s in findings(group)] + [""]
        lines += _run_table(group, main) + _pareto_tables(group) + _budget_table(group) + _means_tables(group)
        if group["scaling"]:
            cols = list(group["scaling"][0])
            lines += ["### Gallery-size scaling", "", markdown_table(group["scaling"], cols), ""]
        if group["skipped"]:
            lines += ["### Skipped configurations", "",
                      markdown_table(group["skipped"], ["label", "skipped_reason", "run_id"],
                                     ["config", "reason", "run"]), ""]
        lines += _plot_links(plots.get(group["group"]), report_dir)
    return "\n".join(lines).rstrip() + "\n"


def _source_table(group):
    facts = [("dataset", group["dataset"]), ("split", group["split"]), ("model", group["model"]),
             ("embeddings file(s)", ", ".join(map(str, group["source"].get("data_paths", [])))),
             ("gallery sizes", ", ".join(f"{g:,}" for g in group["gallery_sizes"]) or "–"),
             ("runs", f"{group['runs_completed']} completed, {group['runs_skipped']} skipped")]
    facts += [(key, ", ".join(map(str, value)) if isinstance(value, list) else str(value))
              for key, value in group["environment"].items()]
    return [markdown_table([{"what": k, "value": v} for k, v in facts], ["what", "value"]), ""]


def _run_table(group, main):
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


def _pareto_tables(group):
    lines = []
    for cost, title in (("bytes_per_vector", "memory (bytes/vector)"),
                        ("latency_p50_ms", "single-query p50 latency (ms)")):
        head = next(iter(group["pareto"].get(cost, {})), None)
        if head and group["pareto"][cost][head]:
            front = group["pareto"][cost][head]
            column = front[0]["cost_column"]
            lines += [f"### Pareto frontier: {_name(head)} vs {title}", "",
                      markdown_table(front, ["label", column, head, "run_id"],
                                     ["config", f"{title} [{column}]", _name(head), "run"]), ""]
    return lines


def _budget_table(group):
    if not group["budgets"]:
        return []
    metric = _name(group["primary_metric"])
    return [f"### Best configuration per memory budget (by {metric})", "",
            markdown_table(group["budgets"], ["budget_bytes_per_vector", "label", "value", "bytes_per_vector",
                                              "candidates"],
                           ["budget (bytes/vector)", "best config", metric, "its bytes/vector",
                            "configs within budget"]), ""]


def _means_tables(group):
    lines = []
    for factor, table in group["means"].items():
        if not table:
            continue
        rows = [dict(level=level, **values) for level, values in table.items()]
        cols = [c for c in rows[0] if c != "level"]
        lines += [f"### Mean per {_name(factor)}", "",
                  markdown_table(rows, ["level"] + cols, [factor] + [_name(c) for c in cols]), ""]
    return lines


def _plot_links(plots, report_dir):
    if not plots:
        return []
    lines = ["### Plots", ""]
    for title, path in plots:
        rel = os.path.relpath(path, report_dir).replace(os.sep, "/")
        lines += [f"![{title}]({rel})", ""]
    return lines
