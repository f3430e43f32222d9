"""What the analysis may say about speed, from the intervals the sweep stored (retrieval/speed_stats.py): the
verdict of a speed-up against fp32 exact, whether the machine was loaded while timing, and why a latency
percentile is missing (the fastest configuration and its ties: operating_points.fastest_with_ties).

Every run's speed-up is paired with fp32 exact at the native dim timed in the same rounds (timing.time_rounds),
so speed-ups of different runs compare without the load each met.
"""
from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any

from retrieval.speed_stats import MIN_TAIL, min_samples

Row = Mapping[str, Any]
# A run counts as timed under load when its timing took fewer FAISS threads than asked (other tasks held
# cores: timing.timing_threads) or some task waited for a CPU during more than this share of it.
LOADED_PRESSURE_PCT = 25.0
# Latency percentiles the sweep stores, and the samples each needs (speed_stats.estimable).
NEEDED = {name: min_samples(int(name[1:]) / 100) for name in ("p50", "p95", "p99")}
# A speed-up counts as faster (slower) only when its whole interval lies beyond 1 + SPEED_MARGIN (below
# 1 / (1 + SPEED_MARGIN)). Why: the intervals hold the noise inside one sweep, and a second process lands a few
# percent away for the same work (two idle runs of the Flickr8k default grid: 3-12%), so a 1.05x whose interval
# excludes 1 can come out 0.97x in the next sweep (measured: the demo idle and with both cores busy, 6 of 192
# latency speed-ups flipped with no margin, none with 10%).
SPEED_MARGIN = 0.10


def number(value: Any) -> float | None:
    """A finite float, or None (missing, NaN, not a number)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) else None


def speed_verdict(value: float | None, low: float | None, high: float | None, what: str = "fp32 exact") -> str | None:
    """'10.6x faster than fp32 exact (95% interval 9.8x-11.5x)', '2.1x slower than ...', or 'indistinguishable
    in speed from fp32 exact (0.95x-1.06x)' when the interval holds 1; None without a speed-up."""
    if value is None:
        return None
    if low is None or high is None:
        word = f"{value:.2f}x faster" if value >= 1 else f"{1 / value:.2f}x slower"
        return f"{word} than {what} (no interval: a run file from before speed intervals)"
    if low <= 1.0 <= high:
        return f"indistinguishable in speed from {what} ({value:.2f}x, 95% interval {low:.2f}x-{high:.2f}x)"
    if low <= 1.0 + SPEED_MARGIN and high >= 1.0 / (1.0 + SPEED_MARGIN):
        return (f"indistinguishable in speed from {what} ({value:.2f}x, 95% interval {low:.2f}x-{high:.2f}x, within "
                f"the {100 * SPEED_MARGIN:.0f}% by which two runs of one configuration differ)")
    if low > 1.0:
        return f"{value:.2f}x faster than {what} (95% interval {low:.2f}x-{high:.2f}x)"
    return f"{1 / value:.2f}x slower than {what} (95% interval {1 / high:.2f}x-{1 / low:.2f}x slower)"


def loaded(row: Row) -> bool:
    """Whether a run was timed under load (LOADED_PRESSURE_PCT, or fewer FAISS threads than asked)."""
    asked, timed, pressure = (number(row.get(k)) for k in ("threads_asked", "threads_timed", "cpu_pressure_pct"))
    return (asked is not None and timed is not None and timed < asked) or \
        (pressure is not None and pressure > LOADED_PRESSURE_PCT)


def load_record(rows: Iterable[Row]) -> dict[str, Any]:
    """What the runs' conditions say, for the summary: how many runs were timed under load, the highest load
    average, CPU pressure and the cores, and the fewest threads a run was timed with."""
    rows = list(rows)
    def most(key, pick=max):
        values = [v for v in (number(row.get(key)) for row in rows) if v is not None]
        return pick(values) if values else None
    loads = [v for row in rows for v in (number(row.get("load_before")), number(row.get("load_after")))
             if v is not None]
    return {"runs": len(rows), "runs_loaded": sum(loaded(row) for row in rows),
            "runs_with_conditions": sum(number(row.get("threads_timed")) is not None for row in rows),
            "max_load": max(loads) if loads else None, "max_cpu_pressure_pct": most("cpu_pressure_pct"),
            "cores": most("cores"), "threads_asked": most("threads_asked"), "min_threads_timed": most("threads_timed", min)}


def load_warning(record: Mapping[str, Any]) -> str | None:
    """One line when some runs were timed under load, e.g. 'Timings taken under load (load average up to 3.6
    on 2 cores, CPU pressure up to 87%; 18 of 18 runs timed with 1 FAISS thread instead of 2): compare speeds
    only inside this sweep, through the paired speed-ups.'; None on a quiet machine."""
    if not record.get("runs_loaded"):
        return None
    parts = []
    if record.get("max_load") is not None:
        cores = f" on {int(record['cores'])} cores" if record.get("cores") else ""
        parts.append(f"load average up to {record['max_load']:.1f}{cores}")
    if record.get("max_cpu_pressure_pct") is not None:
        parts.append(f"CPU pressure up to {record['max_cpu_pressure_pct']:.0f}%")
    threads = ""
    if record.get("min_threads_timed") is not None and record.get("threads_asked") is not None \
            and record["min_threads_timed"] < record["threads_asked"]:
        threads = (f"; some timed with {int(record['min_threads_timed'])} FAISS thread(s) instead of "
                   f"{int(record['threads_asked'])}")
    return (f"Timings taken under load ({', '.join(parts)}; {record['runs_loaded']} of {record['runs']} runs"
            f"{threads}): compare speeds only inside this sweep, through the paired speed-ups.")


def latency_gaps(rows: Iterable[Row], direction: str) -> list[str]:
    """'p99 not estimable from 100 queries (needs 1000)' for each percentile some run has none of, once, naming the
    fewest queries timed."""
    rows, out = list(rows), []
    for name, need in NEEDED.items():
        missing = [row for row in rows if number(row.get(f"{direction}_latency_{name}_ms")) is None
                   and number(row.get(f"{direction}_latency_queries")) is not None]
        if missing:
            fewest = int(min(number(row.get(f"{direction}_latency_queries")) for row in missing))
            out.append(f"{name} not estimable from {fewest:,} queries (needs {need:,}) in {len(missing)} run(s)")
    return out


def unestimable_requirement(column: str, rows: Iterable[Row]) -> str | None:
    """The one-line fault of a --require on a latency percentile that no run could estimate (all null while
    queries were timed), naming --latency_queries; None when the column has values or is not one of those."""
    name = next((n for n in NEEDED if column.endswith((f"latency_{n}_ms", f"latency_{n}_ms_ci_low",
                                                          f"latency_{n}_ms_ci_high"))), None)
    rows = list(rows)
    if name is None or any(number(row.get(column)) is not None for row in rows):
        return None
    direction = column.split("_")[0] if column.startswith(("t2i_", "i2t_")) else None
    counts = [number(row.get(f"{direction}_latency_queries" if direction else "latency_queries")) for row in rows]
    counts = [int(c) for c in counts if c is not None]
    if not counts:
        return None
    return (f"{name} is not estimable from {max(counts):,} latency queries (it needs {NEEDED[name]:,}: "
            f"{MIN_TAIL} beyond it); rerun run_experiments.py with --latency_queries {NEEDED[name]} or more")
