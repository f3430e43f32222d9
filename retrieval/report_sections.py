"""Two sections of REPORT.md built from a group's stored tables: "Check these" (checks.py's results a reader
should not take at face value, each with its numbers) and "Where the loss comes from" (decomposition.py's
parts of every configuration's difference to fp32, both directions and their asymmetry).
"""
from __future__ import annotations

from retrieval.decomposition import PARTS, PART_WORDS
from retrieval.findings import Group, Row, fmt, metric_words

SHOWN_SPREADS = 8  # unstable-speed runs named one by one; the rest are counted


def check_lines(group: Group) -> list[str]:
    checks = group.get("checks") or []
    if not checks:
        return []
    lines = ["### Check these", ""]
    if any(c["check"] == "above_fp32" for c in checks):
        lines += ["Above fp32: a lossy code cannot know more than the vectors it encodes, so each of these is luck of "
                  "this split, ties, or a baseline to re-check.", ""]
    for c in (c for c in checks if c["check"] == "above_fp32"):
        joint = "" if c.get("sim_low") is None else \
            f"; joint {c['sim_low']:+.2f} to {c['sim_high']:+.2f}, {'above' if c['sim_low'] > 0 else 'not above'} jointly"
        lines.append(f"- {c['label']} scores above fp32 exact in {metric_words(c['metric'])}: {fmt(c['value'])} vs "
                     f"{fmt(c['baseline_value'])} ({c['delta']:+.2f} points, marginal 95% interval "
                     f"{c['ci_low']:+.2f} to {c['ci_high']:+.2f}{joint}).")
    for c in (c for c in checks if c["check"] == "slower_baseline"):
        lines.append(f"- {c['baseline_label']} answers {fmt(c['baseline_qps'], 0)} text→image queries/s, slower than "
                     f"{c['label']} ({fmt(c['qps'], 0)}), which does strictly more work (the same exact search over the "
                     "whole gallery after a stage 1): the baseline's speed number is suspect.")
    spreads = sorted((c for c in checks if c["check"] == "unstable_speed"), key=lambda c: -c["spread_pct"])
    if spreads:
        named = "; ".join(f"{c['label']} {c['direction']} {fmt(c['spread_pct'])}%" for c in spreads[:SHOWN_SPREADS])
        more = f"; and {len(spreads) - SHOWN_SPREADS} more" if len(spreads) > SHOWN_SPREADS else ""
        lines.append(f"- {len(spreads)} batch speeds are uncertain by more than {fmt(spreads[0]['limit_pct'], 0)}% of "
                     f"themselves (the width of their 95% interval over timing rounds; older run files: the spread "
                     f"of their passes), so their speed comparisons are shaky: {named}{more}.")
    return lines + [""]


def _cell(segment: Row | None) -> str:
    if segment is None:
        return "–"
    if segment["ci_low"] is None:
        return f"{segment['value']:+.2f}"
    return f"{segment['value']:+.2f} [{segment['ci_low']:+.2f}, {segment['ci_high']:+.2f}]"


def _parts(direction: Row) -> list[str]:
    """One cell per part: its segment, or where a merged segment went ('in quantization: no <run> run')."""
    cells = {}
    for segment in direction["segments"]:
        first, *rest = segment["parts"]
        cells[first] = _cell(segment) + (f" (+ {', '.join(PART_WORDS[p] for p in rest)})" if rest else "")
        for part in rest:
            cells[part] = f"in {PART_WORDS[first]}: no {'; no '.join(segment['missing'])} run"
    return [cells.get(part, "–") for part in PARTS]


def decomposition_lines(group: Group) -> list[str]:
    table = group.get("decomposition") or []
    if not table:
        return []
    metrics = [d["metric"] for d in table[0]["directions"]]
    header = ["config"]
    for m in metrics:
        header += [f"{metric_words(m)} - fp32"] + [PART_WORDS[p] for p in PARTS]
    header += ["t2i loss - i2t loss"] if len(metrics) == 2 else []
    lines = ["### Where the loss comes from", "",
             "Each configuration's paired difference to fp32 exact at the native dim (points), split into steps that "
             "add up to it exactly: dimension reduction (fp32 flat at the run's dim vs native), quantization (the "
             "run's precision, flat, vs fp32 flat at that dim), index approximation (IVF / HNSW vs flat), re-ranking "
             "recovery (C vs no re-ranking); '–' = the step does not apply. [marginal 95% intervals, the same "
             "resamples for every part.]", "",
             "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in table:
        cells = [row["label"]]
        for d in row["directions"]:
            cells += [_cell({"value": d["total"], "ci_low": d["total_ci_low"], "ci_high": d["total_ci_high"]})]
            cells += _parts(d)
        if len(metrics) == 2:
            cells.append(_cell({"value": row["asymmetry"], "ci_low": row["asymmetry_ci_low"],
                                "ci_high": row["asymmetry_ci_high"]}))
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    missing = group.get("decomposition_missing") or []
    if missing:
        lines += ["", f"Reference runs the sweep did not measure (their steps are merged, not guessed): "
                      f"{', '.join(missing)}."]
    return lines + [""]
