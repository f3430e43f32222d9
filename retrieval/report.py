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


def _unit(metric):
    """R@K and RSUM are in percentage points; MRR (0..1) has no unit."""
    return "" if metric.endswith("MRR") else " points"


def _level(group):
    """'95%' when the group's runs have bootstrap intervals at that confidence, else None."""
    confidence = (group.get("intervals") or {}).get("confidence")
    return f"{100 * confidence:g}%" if confidence else None


def _decimals(value=None, base=None, *differences):
    """Decimals (1-4) at which the printed difference of two printed values equals the printed difference
    (never 'from 15.8 to 15.8 (-0.1)') and no non-zero difference or interval bound prints as 0."""
    for digits in range(1, 5):
        shown = None if value is None or base is None else round(value, digits) - round(base, digits)
        if shown is not None and abs(shown - round(value - base, digits)) > 0.5 * 10 ** -digits:
            continue
        if any(x is not None and x != 0 and round(x, digits) == 0 for x in differences):
            continue
        return digits
    return 4


def _inside(low, high):
    return low <= 0 <= high


def _verdict(delta, low, high, level, reference, metric, digits):
    """'indistinguishable from fp32 at 95%: -0.30 points, interval -0.90 to +0.40' (above / below when the
    interval of the paired difference excludes 0)."""
    if _inside(low, high):
        word = f"indistinguishable from {reference} at {level}"
    else:
        word = f"{'above' if low > 0 else 'below'} {reference} at {level}"
    if low == high == delta:  # the runs differ the same way on every image, or not at all
        return f"{word}: {delta:+.{digits}f}{_unit(metric)} on every resample"
    return f"{word}: {delta:+.{digits}f}{_unit(metric)}, interval {low:+.{digits}f} to {high:+.{digits}f}"


def _has_interval(row, prefix="delta"):
    return row.get(f"{prefix}_ci_low") is not None and row.get(f"{prefix}_ci_high") is not None


def _value_with_interval(value, low, high, level, digits=1):
    """'50.0 (95% interval 45.1 to 55.0)', or the value alone without an interval."""
    if low is None or high is None or level is None:
        return _fmt(value, digits)
    return f"{_fmt(value, digits)} ({level} interval {_fmt(low, digits)} to {_fmt(high, digits)})"


def _percent(retention, value, base):
    """Retention with the decimals that keep a real difference off '100.0%'."""
    digits = 1
    while digits < 4 and value != base and round(retention, digits) == 100:
        digits += 1
    return _fmt(retention, digits)


# ----------------------------------------------------------------------------- findings

def findings(group):
    """Sentences from one group of the summary; each states only what its stored numbers show."""
    if not group["runs_completed"]:
        return ["No completed runs in this group."]
    if group["head_metric"] is None:
        return []
    out = _baseline_sentences(group) + _frontier_sentences(group) + _reranking_sentences(group)
    out += _dim_reduction_sentences(group) + _dim_method_sentences(group)
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
        metrics = ", ".join(f"{_name(m)} {_with_interval(base, m, group)}"
                            for m in group["recall_metrics"] if base[m] is not None)
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


def _with_interval(row, metric, group):
    return _value_with_interval(row[metric], row.get(f"{metric}_ci_low"), row.get(f"{metric}_ci_high"), _level(group))


def _frontier_sentences(group):
    """What each step down the memory frontier costs in the head metric, and what it does to speed."""
    out = []
    for row in group["memory_frontier"]:
        memory = None if row["memory_fraction"] is None else 100 * row["memory_fraction"]
        sentence = (f"{_quality_phrase(row, group)} at {_fmt(memory)}% of the memory "
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


def _quality_phrase(row, group):
    """'<label> keeps 99.1% of fp32 t2i R@1 (49.55 vs 50.00; below fp32 at 95%: ...)'; a difference inside
    the interval is 'no measurable loss' (also when retention is above 100%), never a gain."""
    name, label, metric = _name(group["head_metric"]), row["label"], group["head_metric"]
    value, base = row["value"], row["baseline_value"]
    if not _has_interval(row) or _level(group) is None or row["delta"] is None:
        return (f"{label} keeps {_fmt(row['retention'])}% of fp32 {name} "
                f"({_fmt(value)} vs {_fmt(base)})")
    digits = _decimals(value, base, row["delta"], row["delta_ci_low"], row["delta_ci_high"])
    verdict = _verdict(row["delta"], row["delta_ci_low"], row["delta_ci_high"], _level(group), "fp32", metric, digits)
    pair = f"{_fmt(value, digits)} vs {_fmt(base, digits)}"
    if _inside(row["delta_ci_low"], row["delta_ci_high"]):
        return f"{label} shows no measurable loss of fp32 {name} ({pair}; {verdict})"
    if row["delta_ci_low"] > 0:
        return f"{label} scores above fp32 {name} ({pair}; {verdict})"
    return f"{label} keeps {_percent(row['retention'], value, base)}% of fp32 {name} ({pair}; {verdict})"


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
        whole = f", which covers the whole gallery of {int(row['gallery_size']):,}" if row["covers_gallery"] else ""
        stage1 = (f"; the true item was among the {int(row['candidate_size'])} stage-1 candidates for "
                  f"{_fmt(row['stage1_recall'])}% of queries" if row["stage1_recall"] is not None else "")
        what = f"{row['precision']} {int(row['dim'])}-d{row.get('index_label') or ''}"
        out.append(f"Re-ranking {what} with fp32 vectors (best C={int(row['candidate_size'])}{whole}) "
                   f"{_gain_phrase(row, group, name)}{stage1}.")
    return out


def _gain_phrase(row, group, name):
    """'raises t2i R@1 from 45.0 to 50.0 (+5.0 points; above no re-ranking at 95%: ...)'."""
    gain, level = row["gain"], _level(group)
    interval = _has_interval(row, "gain") and level is not None
    digits = _decimals(row["best_value"], row["plain_value"], gain,
                       *((row["gain_ci_low"], row["gain_ci_high"]) if interval else ()))
    before, after = _fmt(row["plain_value"], digits), _fmt(row["best_value"], digits)
    if gain == 0:
        return f"leaves {name} at {before}" + (f" (interval of the change {row['gain_ci_low']:+.{digits}f} to "
                                                f"{row['gain_ci_high']:+.{digits}f})" if interval else "")
    if not interval:
        return f"{'raises' if gain > 0 else 'lowers'} {name} from {before} to {after} ({gain:+.{digits}f} points)"
    verdict = _verdict(gain, row["gain_ci_low"], row["gain_ci_high"], level, "no re-ranking", group["head_metric"],
                       digits)
    verb = "changes" if _inside(row["gain_ci_low"], row["gain_ci_high"]) else ("raises" if gain > 0 else "lowers")
    return f"{verb} {name} from {before} to {after} ({verdict})"


def _dim_method_sentences(group):
    """'At 64 dims (fp32, no re-ranking) pca gives t2i R@1 28.0 and truncate 18.0: pca is above truncate at
    95%: +10.0 points, interval ...' for every pair the summary's dim_methods table holds."""
    name, out, level = _name(group["head_metric"]), [], _level(group)
    for row in group.get("dim_methods", []):
        interval = _has_interval(row, "difference") and level is not None
        bounds = (row["difference_ci_low"], row["difference_ci_high"]) if interval else ()
        digits = _decimals(row["best_value"], row["other_value"], row["difference"], *bounds)
        start = (f"At {int(row['dim'])} dims (fp32, no re-ranking) {row['best_method']} gives {name} "
                 f"{_fmt(row['best_value'], digits)} and {row['other_method']} {_fmt(row['other_value'], digits)}")
        if not interval:
            out.append(f"{start} ({row['difference']:+.{digits}f}{_unit(group['head_metric'])}).")
            continue
        verdict = _verdict(row["difference"], *bounds, level, row["other_method"], group["head_metric"], digits)
        out.append(f"{start}: {row['best_method']} is {verdict}.")
    return out


def _dim_reduction_sentences(group):
    name, out, level = _name(group["head_metric"]), [], _level(group)
    for row in group["dim_reduction"]:
        start = (f"Reducing {int(row['native_dim'])} to {int(row['dim'])} dims ({row['dim_method']}, fp32, no "
                 f"re-ranking)")
        if not _has_interval(row) or level is None or row["delta"] is None:
            out.append(f"{start} keeps {_fmt(row['retention'])}% of {name} ({_fmt(row['value'])}).")
            continue
        digits = _decimals(None, None, row["delta"], row["delta_ci_low"], row["delta_ci_high"])
        verdict = _verdict(row["delta"], row["delta_ci_low"], row["delta_ci_high"], level, "fp32",
                           group["head_metric"], digits)
        kept = ("shows no measurable loss of" if _inside(row["delta_ci_low"], row["delta_ci_high"])
                else f"keeps {_percent(row['retention'], row['value'], row['value'] - row['delta'])}% of")
        out.append(f"{start} {kept} {name} ({_fmt(row['value'], digits)}; {verdict}).")
    return out


def _budget_sentences(group, said):
    """One sentence per budget that buys a better configuration; `said`: sentences before these."""
    out, previous = [], None
    for budget in group["budgets"]:
        if budget["run_id"] == previous:
            continue  # a larger budget that buys nothing better adds no information
        previous = budget["run_id"]
        value = _value_with_interval(budget["value"], budget.get("value_ci_low"), budget.get("value_ci_high"),
                                     _level(group))
        out.append(f"Within {_bytes(budget['budget_bytes_per_vector'])} bytes/vector of index the best "
                   f"{_name(group['primary_metric'])} is {value} ({budget['label']}, "
                   f"{_bytes(budget['bytes_per_vector'])} bytes/vector).")
        if said + len(out) > 60:
            break  # the budget table in the report lists the rest
    return out


def _scaling_sentences(group):
    """Per configuration in the scaling table: its smallest gallery against its largest."""
    head, out, level = group["head_metric"], [], _level(group)
    for label, rows in itertools.groupby(group["scaling"], key=lambda row: row["label"]):
        rows = list(rows)
        first, last = rows[0], rows[-1]
        interval = _has_interval(last, "change") and level is not None and last.get("change") is not None
        digits = _decimals(last[head], first[head],
                           *((last["change"], last["change_ci_low"], last["change_ci_high"]) if interval else ()))
        change = ""
        if interval:
            reference = f"the {int(first['gallery_size']):,}-item gallery"
            verdict = _verdict(last["change"], last["change_ci_low"], last["change_ci_high"], level, reference, head,
                               digits)
            change = f" ({verdict})"
        padded = f"; the extra items are {distractor_label(last)}" if distractor_label(last) else ""
        out.append(f"{label}: growing the gallery from {int(first['gallery_size']):,} to "
                   f"{int(last['gallery_size']):,} items moves {_name(head)} from {_fmt(first[head], digits)} to "
                   f"{_fmt(last[head], digits)}{change} and batch throughput from {_fmt(first['qps'], 0)} to "
                   f"{_fmt(last['qps'], 0)} queries/s{padded}.")
    return out


def distractor_label(row):
    """What padded a gallery, in words, or None (the real gallery, or a run file that did not record it):
    Gaussian ones are flagged synthetic (drawn from a Gaussian fitted to the fit set, not real photos or
    captions, so they say little about text→image at that size)."""
    if not row.get("distractors"):
        return None
    if row.get("distractors_synthetic"):
        return "Gaussian distractors (synthetic; not realistic for text→image)"
    return f"distractors from {row['distractors']}"


def _ood_lines(group):
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


def _caveats(group):
    """Skipped configurations, ratios left null because a baseline value is 0, and settings the runs disagree
    on (their speeds do not compare)."""
    out = []
    skipped = Counter(row["skipped_reason"] for row in group["skipped"])
    if skipped:
        reasons = "; ".join(f"{n} x {reason}" for reason, n in skipped.most_common())
        out.append(f"{sum(skipped.values())} configurations were skipped: {reasons}.")
    notes = Counter(row["ratio_note"] for row in group["retention"] if row.get("ratio_note"))
    out += [f"{n} run{'s' if n > 1 else ''}: {note}, so null in the tables." for note, n in notes.most_common()]
    for row in group.get("whole_gallery_candidates", []):
        out.append(f"C={row['candidate_size']:,} covers the whole gallery of {row['gallery_size']:,} images: its "
                   f"{row['runs']} re-ranked runs are exact fp32 search at their dim for text→image, not a real "
                   "choice at this gallery size.")
    for key in ("hostname", "cpu", "threads"):
        if isinstance(group["environment"].get(key), list):
            out.append(f"Runs disagree on {key} ({', '.join(map(str, group['environment'][key]))}): speed "
                       f"numbers from different settings are not directly comparable.")
    return out


# ----------------------------------------------------------------------------- the summary section

def summary_sentences(group, summary):
    """The short answer that opens a group: the baseline with its interval, what the intervals cover, the
    default operating points (95 / 99 / 99.5% of fp32) and the requested one."""
    if not group["runs_completed"]:
        return ["No completed runs in this group."]
    out = _baseline_sentences(group) + _interval_sentences(group, summary)
    out += _default_point_sentences(group) + _operating_point_sentences(group, summary)
    if group["head_metric"] is not None:
        out.append("Memory: 'index' is the compressed codes (bytes_per_vector); a re-ranked configuration also "
                   "reads the fp32 vectors at its dim in stage 2, counted in 'total' (total_bytes_per_vector). "
                   "The first budget table and memory frontier use the index bytes, the second ones the total.")
    return out


def _interval_sentences(group, summary):
    intervals, settings = group.get("intervals") or {}, summary.get("intervals") or {}
    if not intervals.get("computed"):
        return ["No intervals (--bootstrap 0): no difference in this report is tested against sampling error."]
    reasons = "; ".join(f"{note['reason']} ({note['runs']} run{'s' if note['runs'] > 1 else ''})"
                        for note in intervals["notes"])
    if not intervals["runs_with_intervals"]:
        return [f"No intervals for any run: {reasons}. Differences between runs in this report cannot be told "
                "apart from sampling error."]
    out = [f"Intervals: {_level(group)} percentile bootstrap over images ({settings['resamples']:,} resamples, "
           f"seed {settings['seed']}; {settings['unit_detail']}); differences to fp32 are paired on the same "
           f"resamples. {intervals['runs_with_intervals']:,} of {group['runs_completed']:,} runs have intervals, "
           f"{intervals['runs_paired']:,} a paired difference."]
    if reasons:
        out.append(f"Runs without intervals or without a paired difference: {reasons}.")
    return out


ROLES = (("smallest", "smallest index"), ("smallest_total", "smallest with re-rank vectors"), ("fastest", "fastest"))


def _default_point_sentences(group):
    """One sentence per retention target (targets with the same answer share one): the runs that answer it,
    each with its paired difference to fp32."""
    out, name = [], _name(group["head_metric"] or "")
    baseline_ids = {b["run_id"] for b in group["baseline"]}
    rows = group.get("default_operating_points") or []
    for same in _same_answers(rows):
        row, picks = same[0], {}
        for key, role in ROLES:
            if row[key] is not None:
                picks.setdefault(row[key]["run_id"], (row[key], []))[1].append(role)
        answers = [f"{' and '.join(roles)}: {pick['label']} ({_pick_facts(pick, roles, row, group, baseline_ids)})"
                   for pick, roles in picks.values()]
        targets = _and([f"{r['threshold']:g}%" for r in same])
        out.append(f"At least {targets} of fp32 {name} ({row['reaching']} configurations reach "
                   f"{'them' if len(same) > 1 else 'it'}): " + "; ".join(answers) + ".")
    return out


def _same_answers(rows):
    """Consecutive default-table rows with the same runs in every role and the same count, as lists."""
    out, previous = [], None
    for row in rows:
        key = (row["reaching"], *[(row[name] or {}).get("run_id") for name, _ in ROLES])
        if out and key == previous:
            out[-1].append(row)
        else:
            out.append([row])
        previous = key
    return out


def _and(items):
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def _pick_facts(pick, roles, row, group, baseline_ids):
    facts = [f"{_bytes(pick['bytes_per_vector'])} bytes/vector index"]
    if pick["total_bytes_per_vector"] != pick["bytes_per_vector"]:
        facts.append(f"{_bytes(pick['total_bytes_per_vector'])} in total")
    if "fastest" in roles:
        facts.append(f"{_fmt(pick['qps'], 0)} queries/s [{row['qps_column']}]")
    if pick["run_id"] in baseline_ids:
        return ", ".join(facts + ["the fp32 exact baseline itself"])
    facts.append(f"{_fmt(pick['retention'])}% of fp32")
    if _has_interval(pick) and pick["delta"] is not None and _level(group):
        digits = _decimals(None, None, pick["delta"], pick["delta_ci_low"], pick["delta_ci_high"])
        facts.append(_verdict(pick["delta"], pick["delta_ci_low"], pick["delta_ci_high"], _level(group), "fp32",
                              row["metric"], digits))
    return ", ".join(facts)


def _operating_point_sentences(group, summary):
    out = []
    for point in summary.get("operating_points") or []:
        if point["group"] != group["group"]:
            continue
        wanted = " and ".join(point["requirements"]) or "no requirement"
        if point["run_id"] is None:
            out.append(f"Operating point ({wanted}, {point['objective']}): no completed run to choose from.")
        elif point["meets"]:
            columns = "".join(f", {c} {_number(v)}" for c, v in point["columns"].items())
            out.append(f"Operating point ({wanted}; {point['objective']}): {point['label']} "
                       f"({point['objective_column']} {_number(point['value'])}{columns}); "
                       f"{point['runs_meeting']} configurations meet every requirement.")
        else:
            misses = "; ".join(f"{m['requirement']} ({m['column']} {_number(m['value'])}, short by "
                               f"{_number(m['shortfall'])})" for m in point["missed"])
            out.append(f"None meets {wanted}. Closest: {point['label']}, which misses {misses}.")
    return out


def _number(value):
    return "n/a" if value is None else _cell(float(value))


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
             ("t2i_R@1_delta", "t2i R@1 - fp32"), ("t2i_R@1_delta_ci_low", "interval low"),
             ("t2i_R@1_delta_ci_high", "interval high"), ("total_bytes_per_vector", "total bytes/vector"),
             ("qps", "batch QPS"), ("latency_p50_ms", "p50 ms"), ("run_id", "run")]


def report_markdown(summary, frame, plots, report_dir):
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
        lines += [f"## {group['dataset']} / {group['split']} / {group['model']}", "", "### Summary", ""]
        lines += [f"- {s}" for s in summary_sentences(group, summary)] + [""] + _default_points_table(group)
        lines += ["### Source", ""] + _source_table(group)
        lines += ["### Findings in detail", ""] + [f"- {s}" for s in findings(group)] + [""]
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


def _invalid_runs(invalid):
    """The run files left out because they hold a NaN or infinite number (analysis.split_invalid)."""
    if not invalid:
        return []
    return ["## Invalid run files", "",
            "These run files hold a NaN or infinite number, so they are in no table, ranking, frontier or "
            "operating point of this report:", "", markdown_table(invalid, ["file", "reason"]), ""]


def _source_table(group):
    facts = [("dataset", group["dataset"]), ("split", group["split"]), ("model", group["model"]),
             ("embeddings file(s)", ", ".join(map(str, group["source"].get("data_paths", [])))),
             ("gallery sizes", ", ".join(f"{g:,}" for g in group["gallery_sizes"]) or "–"),
             ("queries", "; ".join(map(_query_sample, group["source"].get("query_samples") or [None]))),
             ("runs", f"{group['runs_completed']} completed, {group['runs_skipped']} skipped")]
    facts += [(key, ", ".join(map(str, value)) if isinstance(value, list) else str(value))
              for key, value in group["environment"].items()]
    return [markdown_table([{"what": k, "value": v} for k, v in facts], ["what", "value"]), ""]


def _query_sample(sample):
    """'200 of 1,000 images, 1,000 of 5,000 captions, seeded 0 (--max_queries 200)' from a run's config."""
    if not sample:
        return "every image and caption of the file"
    return (f"{sample['images']:,} of {sample['images_total']:,} images, {sample['captions']:,} of "
            f"{sample['captions_total']:,} captions, seeded {sample['seed']} (--max_queries {sample['max_queries']:,})")


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


def _default_points_table(group):
    """The default operating points as a table (labels, not run ids: the run table lists those)."""
    rows = group.get("default_operating_points") or []
    if not rows:
        return []
    def cell(pick, column, show):
        return "–" if pick is None else f"{pick['label']} ({show(pick[column])})"
    table = [{"target": f">= {row['threshold']:g}% of fp32 {_name(row['metric'])}", "reach": row["reaching"],
              "small": cell(row["smallest"], "bytes_per_vector", _bytes),
              "total": cell(row["smallest_total"], "total_bytes_per_vector", _bytes),
              "fast": cell(row["fastest"], "qps", lambda v: _fmt(v, 0))} for row in rows]
    return [markdown_table(table, ["target", "reach", "small", "total", "fast"],
                           ["target", "configs reaching it", "smallest index (bytes/vector)",
                            "smallest index + re-rank vectors (bytes/vector)",
                            f"fastest ({rows[0]['qps_column']}, queries/s)"]), ""]


def _pareto_tables(group):
    lines = []
    for cost, title in (("bytes_per_vector", "memory (index bytes/vector)"),
                        ("total_bytes_per_vector", "memory (index + re-rank vectors, bytes/vector)"),
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
    lines = []
    for key, cost, what in (("budgets", "bytes_per_vector", "index memory"),
                            ("budgets_total", "total_bytes_per_vector", "index + re-rank vector memory")):
        if not group.get(key):
            continue
        metric = _name(group["primary_metric"])
        lines += [f"### Best configuration per {what} budget (by {metric})", "",
                  markdown_table(group[key], [f"budget_{cost}", "label", "value", "value_ci_low", "value_ci_high",
                                              cost, "candidates"],
                                 [f"budget ({cost})", "best config", metric, "interval low", "interval high",
                                  f"its {cost}", "configs within budget"]), ""]
    return lines


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
