"""The sentences a report says about one dataset/model group, each built from the group's stored numbers:
the short answer that opens the group (summary_sentences) and the findings in detail (findings).

Nothing here computes a comparison: every number in a sentence is read from the summary
(analysis.analyse), so a sentence can never say something experiment_summary.json does not hold.
How a stored number prints (fmt, fmt_bytes, fmt_cell, metric_words, distractor_label) lives here too,
because report.py's tables print the same numbers and must print them the same way.
"""
from __future__ import annotations

import itertools
from collections import Counter
from collections.abc import Mapping
from typing import Any

from retrieval.metrics import DIRECTION_NAMES
from retrieval.speed_claims import speed_verdict

# The summary, one of its groups and one row of a group's tables: the JSON-ready dicts analysis.analyse
# stores, read as they are, so a sentence quotes only what experiment_summary.json holds.
Summary = Mapping[str, Any]
Group = Mapping[str, Any]
Row = Mapping[str, Any]


# ----------------------------------------------------------------------------- how a stored number prints

def fmt(value: float | None, digits: int = 1) -> str:
    """'1,234.5' at `digits` decimals, 'n/a' for a number the summary does not have."""
    return "n/a" if value is None else f"{value:,.{digits}f}"


def fmt_bytes(value: float | None) -> str:
    """Bytes per vector: whole bytes without decimals, a fraction (binary / PQ codes) with two."""
    return "n/a" if value is None else (f"{value:,.0f}" if float(value).is_integer() else f"{value:,.2f}")


def metric_words(metric: str) -> str:
    """A column name as a reader writes it: 't2i_R@1' -> 't2i R@1'."""
    return metric.replace("_", " ")


def fmt_cell(value: float) -> str:
    """A number in a table cell or an operating point: whole numbers without decimals, else 1 decimal from
    100, 2 from 1 and 3 significant digits below 1 (an MRR or a fraction keeps its digits)."""
    if float(value).is_integer():
        return f"{value:,.0f}"
    if abs(value) >= 100:
        return f"{value:,.1f}"
    if abs(value) >= 1:
        return f"{value:.2f}"
    return f"{value:.3g}"


def distractor_label(row: Row) -> str | None:
    """What padded a gallery, in words, or None (the real gallery, or a run file that did not record it):
    Gaussian ones are flagged synthetic (drawn from a Gaussian fitted to the fit set, not real photos or
    captions, so they say little about text→image at that size)."""
    if not row.get("distractors"):
        return None
    if row.get("distractors_synthetic"):
        return "Gaussian distractors (synthetic; not realistic for text→image)"
    return f"distractors from {row['distractors']}"


# ----------------------------------------------------------------------------- phrases

def _unit(metric: str) -> str:
    """R@K and RSUM are in percentage points; MRR (0..1) has no unit."""
    return "" if metric.endswith("MRR") else " points"


def _level(group: Group) -> str | None:
    """'95%' when the group's runs have bootstrap intervals at that confidence, else None."""
    confidence = (group.get("intervals") or {}).get("confidence")
    return f"{100 * confidence:g}%" if confidence else None


def _decimals(value: float | None = None, base: float | None = None, *differences: float | None) -> int:
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


def _inside(low: float, high: float) -> bool:
    return low <= 0 <= high


def _verdict(delta: float, low: float, high: float, level: str, reference: str, metric: str, digits: int) -> str:
    """'indistinguishable from fp32 at 95%: -0.30 points, interval -0.90 to +0.40' (above / below when the
    interval of the paired difference excludes 0)."""
    if _inside(low, high):
        word = f"indistinguishable from {reference} at {level}"
    else:
        word = f"{'above' if low > 0 else 'below'} {reference} at {level}"
    if low == high == delta:  # the runs differ the same way on every image, or not at all
        return f"{word}: {delta:+.{digits}f}{_unit(metric)} on every resample"
    return f"{word}: {delta:+.{digits}f}{_unit(metric)}, interval {low:+.{digits}f} to {high:+.{digits}f}"


def _has_interval(row: Row, prefix: str = "delta") -> bool:
    return row.get(f"{prefix}_ci_low") is not None and row.get(f"{prefix}_ci_high") is not None


def _claim(row: Row, prefix: str, group: Group) -> tuple[float, float, str]:
    """(low, high, level) of the interval a verdict uses: the joint one (family.py) where the row has it,
    'at 95% jointly', else the marginal one, 'at 95%'. Every verdict says which it is."""
    low, high = row.get(f"{prefix}_sim_low"), row.get(f"{prefix}_sim_high")
    if low is not None and high is not None:
        return low, high, f"{_level(group)} jointly"
    return row[f"{prefix}_ci_low"], row[f"{prefix}_ci_high"], _level(group)


def _value_with_interval(value: float | None, low: float | None, high: float | None, level: str | None,
                         digits: int = 1) -> str:
    """'50.0 (95% interval 45.1 to 55.0)', or the value alone without an interval."""
    if low is None or high is None or level is None:
        return fmt(value, digits)
    return f"{fmt(value, digits)} ({level} interval {fmt(low, digits)} to {fmt(high, digits)})"


def _percent(retention: float, value: float, base: float) -> str:
    """Retention with the decimals that keep a real difference off '100.0%'."""
    digits = 1
    while digits < 4 and value != base and round(retention, digits) == 100:
        digits += 1
    return fmt(retention, digits)


# ----------------------------------------------------------------------------- findings

def findings(group: Group) -> list[str]:
    """Sentences from one group of the summary; each states only what its stored numbers show."""
    if not group["runs_completed"]:
        return ["No completed runs in this group."]
    if group["head_metric"] is None:
        return []
    # The baseline is the Summary's first line (summary_text.py), not repeated here.
    out = _frontier_sentences(group) + _reranking_sentences(group)
    out += _dim_reduction_sentences(group) + _dim_method_sentences(group)
    out += _budget_sentences(group, len(out))
    out += _scaling_sentences(group) + _latency_tail_sentences(group) + _caveats(group)
    return out


def _latency_tail_sentences(group: Group) -> list[str]:
    """'text→image latency: p99 not estimable from 100 queries (needs 1,000) in 5 run(s) ...' (the estimability
    rule: at least 10 timed queries beyond a percentile), once per direction with gaps."""
    gaps = (group.get("speed") or {}).get("latency_gaps") or {}
    return [f"{DIRECTION_NAMES[d]} latency: {'; '.join(found)}; such percentiles are null in summary.csv "
            "(run_experiments.py --latency_queries 1000 makes p99 estimable where the queries allow)."
            for d, found in gaps.items() if found]


def _with_interval(row: Row, metric: str, group: Group) -> str:
    return _value_with_interval(row[metric], row.get(f"{metric}_ci_low"), row.get(f"{metric}_ci_high"), _level(group))


def _frontier_sentences(group: Group) -> list[str]:
    """What each step down the memory frontier costs in the head metric, and what it does to speed."""
    out = []
    for row in group["memory_frontier"]:
        memory = None if row["memory_fraction"] is None else 100 * row["memory_fraction"]
        sentence = (f"{_quality_phrase(row, group)} at {fmt(memory)}% of the memory "
                    f"({fmt_bytes(row['bytes_per_vector'])} vs {fmt_bytes(row['baseline_bytes_per_vector'])} "
                    "bytes/vector)")
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


def _quality_phrase(row: Row, group: Group) -> str:
    """'<label> keeps 99.1% of fp32 t2i R@1 (49.55 vs 50.00; below fp32 at 95%: ...)'; a difference inside
    the interval is 'no measurable loss' (also when retention is above 100%), never a gain."""
    name, label, metric = metric_words(group["head_metric"]), row["label"], group["head_metric"]
    value, base = row["value"], row["baseline_value"]
    if not _has_interval(row) or _level(group) is None or row["delta"] is None:
        return (f"{label} keeps {fmt(row['retention'])}% of fp32 {name} "
                f"({fmt(value)} vs {fmt(base)})")
    low, high, level = _claim(row, "delta", group)
    digits = _decimals(value, base, row["delta"], low, high)
    verdict = _verdict(row["delta"], low, high, level, "fp32", metric, digits)
    pair = f"{fmt(value, digits)} vs {fmt(base, digits)}"
    if _inside(low, high):
        return f"{label} shows no measurable loss of fp32 {name} ({pair}; {verdict})"
    if low > 0:
        return f"{label} scores above fp32 {name} ({pair}; {verdict})"
    return f"{label} keeps {_percent(row['retention'], value, base)}% of fp32 {name} ({pair}; {verdict})"


def _speed_phrase(row: Row) -> str:
    """'<direction> batch search: 2.30x faster than fp32 exact (95% interval ...; 12,000 vs 5,200 queries/s);
    single-query p50 latency 0.050 vs 0.090 ms: ...'. The speed-ups are the run's own, paired per timing round
    (per query for latency) with fp32 exact; runs from before speed intervals fall back to the plain ratio."""
    where = f"{DIRECTION_NAMES[row['speed_direction']]} " if row["speed_direction"] else ""
    parts = []
    pair = f"{fmt(row['qps'], 0)} vs {fmt(row['baseline_qps'], 0)} queries/s"
    verdict = speed_verdict(row.get("speedup"), row.get("speedup_ci_low"), row.get("speedup_ci_high"))
    if verdict:
        parts.append(f"{where}batch search {verdict}; {pair}")
    elif row["qps_ratio"] is not None:
        ratio = row["qps_ratio"]
        word = f"{ratio:.2f}x faster" if ratio >= 1 else f"{1 / ratio:.2f}x slower"
        parts.append(f"{where}batch search is {word} than fp32 exact ({pair}, no interval)")
    if row["latency_p50_ms"] is not None and row["baseline_latency_p50_ms"] is not None:
        latency = speed_verdict(row.get("latency_speedup"), row.get("latency_speedup_ci_low"),
                                row.get("latency_speedup_ci_high"))
        parts.append(f"single-query p50 latency {fmt(row['latency_p50_ms'], 3)} ms vs "
                     f"{fmt(row['baseline_latency_p50_ms'], 3)} ms" + (f" ({latency})" if latency else ""))
    return "; ".join(parts)


def _reranking_sentences(group: Group) -> list[str]:
    name, out = metric_words(group["head_metric"]), []
    for row in group["reranking"]:
        whole = f", which covers the whole gallery of {int(row['gallery_size']):,}" if row["covers_gallery"] else ""
        stage1 = (f"; the true item was among the {int(row['candidate_size'])} stage-1 candidates for "
                  f"{fmt(row['stage1_recall'])}% of queries" if row["stage1_recall"] is not None else "")
        what = f"{row['precision']} {int(row['dim'])}-d{row.get('index_label') or ''}"
        out.append(f"Re-ranking {what} with fp32 vectors (best C={int(row['candidate_size'])}{whole}) "
                   f"{_gain_phrase(row, group, name)}{stage1}.")
    return out


def _gain_phrase(row: Row, group: Group, name: str) -> str:
    """'raises t2i R@1 from 45.0 to 50.0 (+5.0 points; above no re-ranking at 95%: ...)'."""
    gain = row["gain"]
    interval = _has_interval(row, "gain") and _level(group) is not None
    low, high, level = _claim(row, "gain", group) if interval else (None, None, None)
    digits = _decimals(row["best_value"], row["plain_value"], gain, *((low, high) if interval else ()))
    before, after = fmt(row["plain_value"], digits), fmt(row["best_value"], digits)
    if gain == 0:
        return f"leaves {name} at {before}" + (f" (interval of the change {low:+.{digits}f} to "
                                                f"{high:+.{digits}f}, {level})" if interval else "")
    if not interval:
        return f"{'raises' if gain > 0 else 'lowers'} {name} from {before} to {after} ({gain:+.{digits}f} points)"
    verdict = _verdict(gain, low, high, level, "no re-ranking", group["head_metric"], digits)
    verb = "changes" if _inside(low, high) else ("raises" if gain > 0 else "lowers")
    return f"{verb} {name} from {before} to {after} ({verdict})"


def _dim_method_sentences(group: Group) -> list[str]:
    """'At 64 dims (fp32, no re-ranking) pca gives t2i R@1 28.0 and truncate 18.0: pca is above truncate at
    95%: +10.0 points, interval ...' for every pair the summary's dim_methods table holds."""
    name, out, level = metric_words(group["head_metric"]), [], _level(group)
    for row in group.get("dim_methods", []):
        interval = _has_interval(row, "difference") and level is not None
        low, high, joint = _claim(row, "difference", group) if interval else (None, None, None)
        bounds = (low, high) if interval else ()
        digits = _decimals(row["best_value"], row["other_value"], row["difference"], *bounds)
        start = (f"At {int(row['dim'])} dims (fp32, no re-ranking) {row['best_method']} gives {name} "
                 f"{fmt(row['best_value'], digits)} and {row['other_method']} {fmt(row['other_value'], digits)}")
        if not interval:
            out.append(f"{start} ({row['difference']:+.{digits}f}{_unit(group['head_metric'])}).")
            continue
        verdict = _verdict(row["difference"], *bounds, joint, row["other_method"], group["head_metric"], digits)
        out.append(f"{start}: {row['best_method']} is {verdict}.")
    return out


def _dim_reduction_sentences(group: Group) -> list[str]:
    name, out, level = metric_words(group["head_metric"]), [], _level(group)
    for row in group["dim_reduction"]:
        start = (f"Reducing {int(row['native_dim'])} to {int(row['dim'])} dims ({row['dim_method']}, fp32, no "
                 f"re-ranking)")
        if not _has_interval(row) or level is None or row["delta"] is None:
            out.append(f"{start} keeps {fmt(row['retention'])}% of {name} ({fmt(row['value'])}).")
            continue
        low, high, joint = _claim(row, "delta", group)
        digits = _decimals(None, None, row["delta"], low, high)
        verdict = _verdict(row["delta"], low, high, joint, "fp32", group["head_metric"], digits)
        kept = ("shows no measurable loss of" if _inside(low, high)
                else f"keeps {_percent(row['retention'], row['value'], row['value'] - row['delta'])}% of")
        out.append(f"{start} {kept} {name} ({fmt(row['value'], digits)}; {verdict}).")
    return out


def _budget_sentences(group: Group, said: int) -> list[str]:
    """One sentence per budget that buys a better configuration; `said`: sentences before these."""
    out, previous = [], None
    for budget in group["budgets"]:
        if budget["run_id"] == previous:
            continue  # a larger budget that buys nothing better adds no information
        previous = budget["run_id"]
        value = _value_with_interval(budget["value"], budget.get("value_ci_low"), budget.get("value_ci_high"),
                                     _level(group))
        chosen = f", chosen on {group['selection']['split']}" if "selected_value" in budget else ""
        out.append(f"Within {fmt_bytes(budget['budget_bytes_per_vector'])} bytes/vector of index the best "
                   f"{metric_words(group['primary_metric'])} is {value} ({budget['label']}, "
                   f"{fmt_bytes(budget['bytes_per_vector'])} bytes/vector{chosen}).")
        if said + len(out) > 60:
            break  # the budget table in the report lists the rest
    return out


def _scaling_sentences(group: Group) -> list[str]:
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
                   f"{int(last['gallery_size']):,} items moves {metric_words(head)} from {fmt(first[head], digits)} to "
                   f"{fmt(last[head], digits)}{change} and batch throughput from {fmt(first['qps'], 0)} to "
                   f"{fmt(last['qps'], 0)} queries/s{padded}.")
    return out


def _caveats(group: Group) -> list[str]:
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
