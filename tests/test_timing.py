"""How speeds are measured and what their intervals mean: retrieval/speed_stats.py (order-statistic intervals,
the estimability rule, paired ratios) and retrieval/timing.py (interleaved rounds, paired latency, conditions)."""
import math
import threading
import time

import numpy as np
import pytest

from retrieval import speed_stats, timing


def test_median_interval_is_the_order_statistics_the_binomial_gives():
    # 10 rounds: P(B <= 1) = 11/1024 <= 2.5% < P(B <= 2) = 56/1024, so the bounds are the 2nd and 9th smallest.
    rounds = [5.0, 1.0, 9.0, 3.0, 7.0, 2.0, 8.0, 4.0, 10.0, 6.0]
    estimate = speed_stats.median(rounds)
    assert (estimate.value, estimate.low, estimate.high) == (5.5, 2.0, 9.0)
    assert speed_stats.coverage(10) == pytest.approx((1013 - 11) / 1024)
    # Five rounds cannot reach 95%: the range, with the coverage five give (1 - 2/32).
    five = speed_stats.median([3.0, 1.0, 2.0, 5.0, 4.0])
    assert (five.low, five.high) == (1.0, 5.0) and speed_stats.coverage(5) == pytest.approx(30 / 32)


def test_median_interval_covers_at_its_level_in_simulation():
    rng = np.random.default_rng(0)
    covered = [speed_stats.median(rng.lognormal(0, 1, 12)) for _ in range(2000)]
    rate = np.mean([e.low <= 1.0 <= e.high for e in covered])  # the lognormal(0, 1) median is 1
    assert rate >= speed_stats.coverage(12) - 0.02 and speed_stats.coverage(12) >= 0.95


def test_paired_ratio_is_the_median_of_per_round_ratios():
    config = [200.0, 100.0, 210.0, 190.0, 205.0, 195.0]
    reference = [100.0, 50.0, 100.0, 100.0, 100.0, 100.0]  # round 2: both halved by a burst of load
    ratio = speed_stats.paired_ratio(config, reference)
    by_hand = np.sort(np.array(config) / np.array(reference))  # 1.9 1.95 2 2 2.05 2.1
    assert ratio.value == pytest.approx(np.median(by_hand)) and (ratio.low, ratio.high) == (by_hand[0], by_hand[-1])
    assert speed_stats.paired_ratio([1.0], [0.0]) is None and speed_stats.paired_ratio([1.0, 2.0], [1.0]) is None


def test_a_percentile_needs_ten_samples_beyond_it():
    assert speed_stats.min_samples(0.99) == 1000 and speed_stats.min_samples(0.95) == 200
    assert speed_stats.quantile(np.arange(100.0), 0.99) is None
    assert speed_stats.quantile(np.arange(999.0), 0.99) is None
    p99 = speed_stats.quantile(np.arange(1000.0), 0.99)
    low, high = speed_stats.order_statistic_bounds(1000, 0.99)
    assert p99.low == low and p99.high == high and low < 989.01 < high
    assert speed_stats.quantile(np.arange(200.0), 0.95) is not None


def test_rounds_interleave_the_reference_and_alternate_its_place():
    calls = []
    stages = {"search": lambda i: calls.append(("search", i)), "sort": lambda i: calls.append(("sort", i))}
    rounds = timing.time_rounds(stages, lambda i: calls.append(("reference", i)), [10, 10], rounds=3,
                                min_time=0.0, warmup=1)
    warm = [("search", 0), ("sort", 0), ("reference", 0)]
    one = lambda name: [(name, 0), (name, 1)]  # noqa: E731
    assert calls == warm + one("reference") + one("search") + one("sort") \
        + one("search") + one("sort") + one("reference") + one("reference") + one("search") + one("sort")
    assert rounds.queries == (20, 20, 20) and rounds.over == "passes"
    assert set(rounds.stage_seconds) == {"search", "sort"} and len(rounds.reference_seconds) == 3


def test_rounds_cut_one_pass_into_blocks_when_passes_would_not_fit_max_time():
    seen = []

    def slow(i):
        seen.append(i)
        time.sleep(0.003)

    rounds = timing.time_rounds({"search": slow}, lambda i: time.sleep(0.003), [5] * 8, rounds=4, min_time=100.0,
                                max_time=0.01, warmup=0)
    assert rounds.over == "blocks" and rounds.queries == (10, 10, 10, 10)
    assert sorted(seen[1:]) == list(range(8))  # the probe's batch 0, then every batch once


def busy(seconds):
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        pass


def test_load_during_part_of_the_run_does_not_flip_a_paired_speedup_but_flips_a_sequential_one():
    """A configuration twice as fast as the baseline, each step a fixed amount of CPU work, and a burst of
    load (time the steps lose) over the second half of the run. Timed sequentially (the baseline's passes,
    then the configuration's) the burst lands on the configuration alone and makes it look slower; timed
    in the same rounds it hits both, and the paired speed-up keeps its direction."""
    start, burst_after = [None], 0.3  # seconds into the run: after the sequential baseline (25 x 5 x 2 ms)

    def step(work):
        def run(i):
            loaded = time.perf_counter() - start[0] > burst_after
            busy(work * (4.0 if loaded else 1.0))  # under load the same work takes 4x as long
        return run

    baseline, config = step(0.002), step(0.001)
    batches = [1] * 25
    start[0] = time.perf_counter()
    base_seq = timing.time_rounds({"s": baseline}, lambda i: None, batches, rounds=5, min_time=0.0, warmup=0)
    conf_seq = timing.time_rounds({"s": config}, lambda i: None, batches, rounds=5, min_time=0.0, warmup=0)
    sequential = np.median(conf_seq.end_to_end_qps()) / np.median(base_seq.end_to_end_qps())
    start[0] = time.perf_counter()
    paired = timing.time_rounds({"s": config}, baseline, batches, rounds=10, min_time=0.0, warmup=0)
    ratio = speed_stats.paired_ratio(paired.end_to_end_qps(), paired.reference_qps())
    assert sequential < 1.0  # the sequential order calls the faster configuration slower
    assert ratio.low > 1.0 and 1.5 < ratio.value < 2.6


def test_paired_latency_alternates_and_stops_at_max_time():
    order = []
    config, reference = lambda q: order.append("c"), lambda q: order.append("r")
    mine, theirs = timing.paired_latency(config, reference, np.ones((30, 2)), np.ones((30, 4)), sample=10, seed=0)
    assert mine.size == theirs.size == 10 and order[:2] == ["c", "r"]
    assert order[2:6] == ["c", "r", "r", "c"]
    slow = lambda q: time.sleep(0.005)  # noqa: E731
    cut, _ = timing.paired_latency(slow, slow, np.ones((50, 2)), np.ones((50, 2)), sample=50, seed=0, max_time=0.05)
    assert 1 <= cut.size < 50


def test_timing_threads_follow_the_free_cores():
    assert timing.timing_threads(2, 0.0, 2) == 2
    assert timing.timing_threads(2, 1.0, 2) == 1 and timing.timing_threads(2, 4.0, 2) == 1
    assert timing.timing_threads(8, 2.0, 16) == 8 and timing.timing_threads(2, None, 2) == 2


@pytest.mark.skipif(not __import__("os").path.exists("/proc/loadavg"), reason="needs /proc (Linux)")
def test_other_runnable_sees_a_busy_thread_of_another_process_not_this_ones():
    import subprocess
    import sys
    spinner = threading.Thread(target=busy, args=(0.6,))
    spinner.start()
    try:
        time.sleep(0.05)
        assert timing._own_running() >= 2  # the reader and the spinner: both subtracted from the kernel's count
    finally:
        spinner.join()
    hog = subprocess.Popen([sys.executable, "-c", "import time\nend = time.time() + 5\nwhile time.time() < end: pass"])
    try:
        time.sleep(0.3)
        assert timing.other_runnable(samples=9) >= 1.0
    finally:
        hog.kill()
        hog.wait()


def test_conditions_report_load_pressure_and_cores_used():
    before = timing.machine_state()
    busy(0.2)
    found = timing.conditions(before, timing.machine_state())
    assert 0.5 < found["process_cores_used"] < 1.5 and found["timed_s"] >= 0.2
    assert found["cores"] >= 1 and (found["cpu_pressure_pct"] is None or 0 <= found["cpu_pressure_pct"] <= 100)
    assert found["load_before"] is None or math.isfinite(found["load_before"])


# ----------------------------------------------------------------------------- what the analysis says (speed_claims)

from retrieval import speed_claims  # noqa: E402


def row(speedup, low, high, **extra):
    return {"t2i_speedup": speedup, "t2i_speedup_ci_low": low, "t2i_speedup_ci_high": high, **extra}


def test_speed_verdicts_follow_the_interval():
    assert speed_claims.speed_verdict(10.6, 9.8, 11.5) == "10.60x faster than fp32 exact (95% interval 9.80x-11.50x)"
    assert speed_claims.speed_verdict(0.5, 0.4, 0.625).startswith("2.00x slower than fp32 exact (95% interval 1.60x-2.50x")
    assert speed_claims.speed_verdict(1.02, 0.95, 1.06).startswith("indistinguishable in speed from fp32 exact")
    assert "no interval" in speed_claims.speed_verdict(2.0, None, None)
    # Clear of 1 but inside the margin two sweeps of one configuration differ by: not a claim either way.
    assert speed_claims.speed_verdict(1.05, 1.02, 1.08).endswith("within the 10% by which two runs of one "
                                                                  "configuration differ)")
    assert speed_claims.speed_verdict(0.93, 0.92, 0.94).startswith("indistinguishable")
    assert speed_claims.speed_verdict(1.2, 1.11, 1.3).startswith("1.20x faster")


def test_load_warning_counts_loaded_runs():
    quiet = {"threads_asked": 2, "threads_timed": 2, "cpu_pressure_pct": 1.0, "load_before": 0.4, "cores": 2}
    busy = {"threads_asked": 2, "threads_timed": 1, "cpu_pressure_pct": 80.0, "load_before": 3.6, "cores": 2}
    assert speed_claims.load_warning(speed_claims.load_record([quiet, quiet])) is None
    line = speed_claims.load_warning(speed_claims.load_record([quiet, busy]))
    assert line.startswith("Timings taken under load (load average up to 3.6 on 2 cores, CPU pressure up to 80%; "
                           "1 of 2 runs; some timed with 1 FAISS thread(s) instead of 2)")


def test_a_requirement_on_an_unestimable_percentile_names_latency_queries():
    rows = [{"t2i_latency_p50_ms": 0.1, "t2i_latency_p95_ms": 0.2, "t2i_latency_p99_ms": None,
             "t2i_latency_queries": 100}]
    fault = speed_claims.unestimable_requirement("t2i_latency_p99_ms", rows)
    assert fault == ("p99 is not estimable from 100 latency queries (it needs 1,000: 10 beyond "
                     "it); rerun run_experiments.py with --latency_queries 1000 or more")
    assert speed_claims.unestimable_requirement("t2i_latency_p50_ms", [{"t2i_latency_p50_ms": 0.1}]) is None
    assert speed_claims.latency_gaps(rows, "t2i") == ["p99 not estimable from 100 queries (needs 1,000) in 1 run(s)"]
