"""The Summary that opens a group in REPORT.md, meant to be read in a minute: the baseline with its interval, on
which split the answers were chosen, at which level the verdicts hold, one table of the 95 / 99 / 99.5%
answers, then the one or two decisive findings and how many results to check. Like findings.py it only reads
the summary's stored numbers; report.py places the lines.
"""
from __future__ import annotations

from retrieval.decomposition import PART_WORDS
# The phrase helpers are findings.py's, so a number prints the same in the Summary and in the findings.
from retrieval.findings import Group, Row, Summary, _decimals, _level, fmt, fmt_bytes, fmt_cell, metric_words
from retrieval.metrics import DIRECTION_NAMES, DIRECTIONS

# The default table's columns: (role in default_operating_points, header).
ROLES = (("smallest", "smallest index"), ("smallest_total", "smallest total memory (index + any re-rank vectors)"),
         ("fastest", "fastest (ties: speeds not told apart)"))
SHOWN_NAMES = 6   # one-sided configurations named in the Summary; the summary JSON lists them all


def summary_lines(group: Group, summary: Summary) -> list[str]:
    """The Summary's markdown lines (bullets and one table)."""
    if not group["runs_completed"]:
        return ["No completed runs in this group."]
    lines = [f"- {s}" for s in _baseline(group) + _choice(group) + _joint(group, summary)]
    table = _table(group)
    lines += ([""] + table + [""]) if table else []
    lines += [f"- {s}" for s in _operating_points(group, summary) + decisive(group) + _check_count(group)]
    return lines


def summary_sentences(group: Group, summary: Summary) -> list[str]:
    """The Summary's sentences without its table (what analyze_results.py prints)."""
    return [line[2:] for line in summary_lines(group, summary) if line.startswith("- ")]


def _baseline(group: Group) -> list[str]:
    if not group["baseline"]:
        return ["No fp32 exact baseline in these runs, so retention, differences and speed ratios are not available."]
    out = []
    for base in group["baseline"]:
        gallery = f", {group['main_gallery_size']:,} images" if group["main_gallery_size"] else ""
        metrics = [m for m in _r1(group) if base.get(m) is not None]
        values = "; ".join(f"{metric_words(m)} {_value(base, m, group)}" for m in metrics)
        speeds = [f"{DIRECTION_NAMES[d]} {_with_interval(base, f'{d}_qps', 0)} queries/s batch, p50 "
                  f"{_with_interval(base, f'{d}_latency_p50_ms', 3)} ms per single query"
                  for d in DIRECTIONS if base.get(f"{d}_qps") is not None]
        protocol = f" ({group['protocol']})" if group.get("protocol") else ""
        out.append(f"Baseline: fp32 exact search at {int(base['dim'])}-d{gallery}{protocol}: {values}"
                   + "".join(f"; {x}" for x in speeds) + ".")
    if (group.get("speed") or {}).get("warning"):
        out.append(group["speed"]["warning"])
    return out


def _with_interval(row: Row, column: str, digits: int) -> str:
    """'55,694 [54,980, 56,410]': a stored speed with its 95% interval over timing rounds, when it has one."""
    low, high = row.get(f"{column}_ci_low"), row.get(f"{column}_ci_high")
    interval = f" [{fmt(low, digits)}, {fmt(high, digits)}]" if low is not None and high is not None else ""
    return fmt(row.get(column), digits) + interval


def _r1(group: Group) -> list[str]:
    """The head metric and the first recall of the other direction."""
    head = group["head_metric"]
    other = next((m for m in group["recall_metrics"] if m.split("_")[0] != (head or "").split("_")[0]), None)
    return [m for m in (head, other) if m]


def _value(row: Row, metric: str, group: Group) -> str:
    low, high, level = row.get(f"{metric}_ci_low"), row.get(f"{metric}_ci_high"), _level(group)
    if low is None or high is None or level is None:
        return fmt(row[metric])
    return f"{fmt(row[metric])} ({level} interval {fmt(low)} to {fmt(high)})"


def _choice(group: Group) -> list[str]:
    """On which split the answers were chosen; configurations measured on one side only are named."""
    selection = group.get("selection") or {}
    if selection.get("selects_for"):
        return [f"This split ({group['split']}) chooses the answers of {', '.join(selection['selects_for'])}: "
                "its own answers below are chosen on the numbers they report (optimistic)."]
    if not selection.get("selected_on"):
        return [f"Choices were made on the reported split ({group['split']}): the answers are optimistic (the "
                "best of many noisy estimates); analyze_results.py --select_on dev chooses on another split."]
    out = [f"Answers chosen on {selection['split']} ({selection['paired']} configurations paired), reported with "
           f"{group['split']}'s numbers; optimism = the {selection['split']} difference to fp32 minus the "
           f"{group['split']} one (points)."]
    sides = []
    for side, split in (("only_in_selection", selection["split"]), ("only_in_evaluation", group["split"])):
        names = selection.get(side) or []
        if names:
            more = f" and {len(names) - SHOWN_NAMES} more (selection.{side})" if len(names) > SHOWN_NAMES else ""
            sides.append(f"only on {split}: {', '.join(names[:SHOWN_NAMES])}{more}")
    if sides:
        out.append("Measured on one side only, so never chosen or reported: " + "; ".join(sides) + ".")
    return out


def _joint(group: Group, summary: Summary) -> list[str]:
    """At which level the verdicts hold, or why there are no intervals."""
    intervals, settings = group.get("intervals") or {}, summary.get("intervals") or {}
    if not intervals.get("computed"):
        return ["No intervals (--bootstrap 0): no difference in this report is tested against sampling error."]
    if not intervals["runs_with_intervals"]:
        reasons = "; ".join(f"{n['reason']} ({n['runs']} runs)" for n in intervals["notes"])
        return [f"No intervals for any run: {reasons}. Differences between runs in this report cannot be told "
                "apart from sampling error."]
    family = group.get("family") or {}
    if not family.get("members"):
        return [f"Intervals: {_level(group)} bootstrap over images ({settings['resamples']:,} resamples), one "
                "comparison at a time."]
    return [f"Verdicts (indistinguishable / below / above fp32) and 'joint' intervals hold jointly at {_level(group)} "
            f"over the group's {family['members']} comparisons (max-statistic bootstrap over images, "
            f"{settings['resamples']:,} resamples: ±{family['critical_value']:.2f} standard errors, not 1.96 each); "
            "per-run marginal intervals are in summary.csv."]


def _table(group: Group) -> list[str]:
    rows = group.get("default_operating_points") or []
    if not rows:
        return []
    name = metric_words(rows[0]["metric"])
    qps = rows[0]["qps_column"]
    paired = any((row.get("fastest") or {}).get("speedup") is not None for row in rows)
    fastest = "fastest: speed-up over fp32 exact, paired [95%] (ties: intervals overlap)" if paired \
        else f"fastest [{qps}] (ties)"
    header = [f"{name} kept vs fp32"] + [h if role != "fastest" else fastest for role, h in ROLES]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for same in _same_answers(rows):
        row = same[0]
        targets = " and ".join(f"{r['threshold']:g}%" for r in same)
        cells = [f">= {targets} ({row['reaching']} reach)"]
        cells += [_cell(row[role], role, row, group) for role, _ in ROLES]
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    return lines


def _same_answers(rows: list[Row]) -> list[list[Row]]:
    """Consecutive rows with the same runs in every role and the same count share one table row."""
    out, previous = [], None
    for row in rows:
        key = (row["reaching"], *[(row[role] or {}).get("run_id") for role, _ in ROLES],
               *[t.get("run_id") for t in row.get("fastest_ties") or []])
        if out and key == previous:
            out[-1].append(row)
        else:
            out.append([row])
        previous = key
    return out


def _cell(pick: Row | None, role: str, row: Row, group: Group) -> str:
    """'int8 64d (pca) no rerank, 64 B: -1.5 (joint -2.5 to -0.4); optimism +0.8 (-0.1 to +1.6)'."""
    if pick is None:
        return "none reaches it"
    if pick.get("missing"):
        return f"{pick['label']} (chosen on {row.get('selected_on')}) was not measured on {group['split']}"
    size = {"smallest": fmt_bytes(pick["bytes_per_vector"]) + " B",
            "smallest_total": fmt_bytes(pick["total_bytes_per_vector"]) + " B",
            "fastest": _speed_cell(pick)}[role]
    text = f"{pick['label']}, {size}: {_difference(pick, group)}"
    if pick.get("optimism") is not None:
        text += f"; optimism {_signed(pick['optimism'], pick.get('optimism_ci_low'), pick.get('optimism_ci_high'))}"
    if role == "fastest" and row.get("fastest_ties"):
        text += "; ties: " + ", ".join(t["label"] for t in row["fastest_ties"])
    return text


def _speed_cell(pick: Row) -> str:
    """'2.60x fp32 exact [2.54, 2.64]' (the paired speed-up and its 95% interval), or queries/s for runs without."""
    if pick.get("speedup") is None:
        return fmt(pick["qps"], 0) + " queries/s"
    low, high = pick.get("speedup_ci_low"), pick.get("speedup_ci_high")
    interval = f" [{low:.2f}, {high:.2f}]" if low is not None and high is not None else ""
    return f"{pick['speedup']:.2f}x fp32 exact{interval}"


def _difference(pick: Row, group: Group) -> str:
    if pick["delta"] is None:
        return "no paired difference"
    if pick["delta"] == 0 and pick.get("delta_ci_low") == 0 and pick.get("delta_ci_high") == 0:
        return "fp32's exactly" if pick["retention"] == 100 else "+0 on every resample"
    low, high, kind = pick.get("delta_sim_low"), pick.get("delta_sim_high"), "joint"
    if low is None or high is None:
        low, high, kind = pick.get("delta_ci_low"), pick.get("delta_ci_high"), "marginal"
    if low is None or high is None:
        return f"{pick['delta']:+.2f}"
    digits = _decimals(None, None, pick["delta"], low, high)
    return f"{pick['delta']:+.{digits}f} ({kind} {low:+.{digits}f} to {high:+.{digits}f})"


def _signed(value: float, low: float | None, high: float | None) -> str:
    digits = _decimals(None, None, value, *(x for x in (low, high) if x is not None))
    if low is None or high is None:
        return f"{value:+.{digits}f}"
    return f"{value:+.{digits}f} ({low:+.{digits}f} to {high:+.{digits}f})"


def decisive(group: Group) -> list[str]:
    """Where the loss of the smallest 95% answer comes from, and the largest direction asymmetry."""
    out = []
    rows = group.get("default_operating_points") or []
    pick = rows[0]["smallest"] if rows else None
    entry = next((e for e in group.get("decomposition") or [] if pick and e["run_id"] == pick.get("run_id")), None)
    if entry:
        head = entry["directions"][0]
        parts = "; ".join(f"{_segment_words(s)} {_signed(s['value'], s['ci_low'], s['ci_high'])}"
                          for s in head["segments"])
        marginal = "marginal intervals; " if head["total_ci_low"] is not None else ""
        out.append(f"Where the loss of {entry['label']} comes from ({metric_words(head['metric'])}, total "
                   f"{_signed(head['total'], head['total_ci_low'], head['total_ci_high'])}): {parts} "
                   f"({marginal}the full table is under \"Where the loss comes from\").")
    out += _asymmetry(group)
    return out


def _segment_words(segment: Row) -> str:
    words = " + ".join(PART_WORDS[p] for p in segment["parts"])
    return words + (f" (no {'; no '.join(segment['missing'])} run)" if segment["missing"] else "")


def _asymmetry(group: Group) -> list[str]:
    """The configuration whose t2i loss exceeds its i2t loss (or the reverse) by the most, outside its interval."""
    table = [e for e in group.get("decomposition") or [] if e.get("asymmetry_ci_low") is not None]
    clear = [e for e in table if e["asymmetry_ci_low"] > 0 or e["asymmetry_ci_high"] < 0]
    if not table:
        return []
    if not clear:
        return [f"No configuration loses measurably more in one direction than in the other ({len(table)} "
                "compared, marginal 95% intervals of t2i loss - i2t loss)."]
    worst = max(clear, key=lambda e: abs(e["asymmetry"]))
    t2i, i2t = worst["directions"]
    more = "text→image" if worst["asymmetry"] > 0 else "image→text"
    return [f"Direction asymmetry: {len(clear)} of {len(table)} configurations lose measurably more in one direction; "
            f"the largest, {worst['label']}, loses more {more} ({metric_words(t2i['metric'])} "
            f"{t2i['total']:+.1f}, {metric_words(i2t['metric'])} {i2t['total']:+.1f}; t2i loss - i2t loss "
            f"{_signed(worst['asymmetry'], worst['asymmetry_ci_low'], worst['asymmetry_ci_high'])})."]


def _check_count(group: Group) -> list[str]:
    checks = group.get("checks") or []
    if not checks:
        return []
    kinds = {"above_fp32": "above fp32", "slower_baseline": "a baseline slower than more work",
             "unstable_speed": "unstable speed"}
    counts = {}
    for check in checks:
        counts[kinds[check["check"]]] = counts.get(kinds[check["check"]], 0) + 1
    return ["Check these (listed below the Summary): " + ", ".join(f"{n} x {k}" for k, n in counts.items()) + "."]


def _operating_points(group: Group, summary: Summary) -> list[str]:
    """The --require / --objective answer of this group, when asked for."""
    out = []
    for point in summary.get("operating_points") or []:
        if point["group"] != group["group"]:
            continue
        wanted = " and ".join(point["requirements"]) or "no requirement"
        chosen = f" chosen on {point['selected_on']}" if point.get("selected_on") else ""
        if point.get("missing_in_evaluation"):
            out.append(f"Operating point ({wanted}; {point['objective']}){chosen}: {point['label']}, not measured on "
                       f"{group['split']}.")
        elif point["run_id"] is None:
            out.append(f"Operating point ({wanted}, {point['objective']}): no completed run to choose from.")
        elif point["meets"]:
            columns = "".join(f", {c} {_number(v)}" for c, v in point["columns"].items())
            optimism = f"; optimism {point['optimism']:+.2f}" if point.get("optimism") is not None else ""
            out.append(f"Operating point ({wanted}; {point['objective']}){chosen}: {point['label']} "
                       f"({point['objective_column']} {_number(point['value'])}{columns}{optimism}); "
                       f"{point['runs_meeting']} configurations meet every requirement.")
        else:
            misses = "; ".join(f"{m['requirement']} ({m['column']} {_number(m['value'])}, short by "
                               f"{_number(m['shortfall'])})" for m in point["missed"])
            out.append(f"None meets {wanted}. Closest: {point['label']}, which misses {misses}.")
    return out


def _number(value: float | None) -> str:
    return "n/a" if value is None else fmt_cell(float(value))

