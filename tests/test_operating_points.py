"""Operating points (--require / --objective), the default 95 / 99 / 99.5% table, memory columns and knob
labels, each checked against a brute-force pandas computation over summary.csv."""
import json
import os

import numpy as np
import pandas as pd
import pytest

import analyze_results
from ranked_runs import captions_of, synthetic_ranks, write_ranked_run
from retrieval import operating_points
from test_analyze import hand_made


def analyse(folder, *extra):
    out = os.path.join(folder, "experiment_summary.json")
    summary = analyze_results.main(["--results_dir", folder, "--output_path", out, "--no_plots", *extra])
    frame = pd.read_csv(os.path.join(folder, "summary.csv"))
    return summary, frame[frame["status"] == "ok"]


def best(frame, column, ascending):
    """Brute force: the first run by column, ties to the higher t2i R@1, then the run id."""
    return frame.sort_values([column, "t2i_R@1", "run_id"], ascending=[ascending, False, True]).iloc[0]["run_id"]


def test_requirements_pick_what_a_pandas_filter_picks(tmp_path):
    folder = hand_made(str(tmp_path))
    summary, frame = analyse(folder, "--bootstrap", "0", "--require", "t2i_retention_R@1>=95",
                             "--require", "t2i_latency_p50_ms<=0.9", "--objective", "min:bytes_per_vector")
    fits = frame[(frame["t2i_retention_R@1"] >= 95) & (frame["t2i_latency_p50_ms"] <= 0.9)]
    (point,) = summary["operating_points"]
    assert point["meets"] and point["run_id"] == best(fits, "bytes_per_vector", True)
    assert point["runs_meeting"] == len(fits)
    assert point["value"] == fits.set_index("run_id").at[point["run_id"], "bytes_per_vector"]
    assert point["requirements"] == ["t2i_retention_R@1>=95", "t2i_latency_p50_ms<=0.9"]
    assert point["objective"] == "min:bytes_per_vector"
    # Without --objective the default is the total memory (index + re-rank vectors).
    summary, frame = analyse(folder, "--bootstrap", "0", "--require", "t2i_retention_R@1>=95")
    (point,) = summary["operating_points"]
    assert point["objective"] == operating_points.DEFAULT_OBJECTIVE == "min:total_bytes_per_vector"
    assert point["run_id"] == best(frame[frame["t2i_retention_R@1"] >= 95], "total_bytes_per_vector", True)
    report = open(os.path.join(folder, "REPORT.md")).read()
    assert f"Operating point (t2i_retention_R@1>=95; min:total_bytes_per_vector): {point['label']}" in report


def test_none_meets_names_the_closest_run_and_what_it_misses(tmp_path):
    folder = hand_made(str(tmp_path))
    summary, frame = analyse(folder, "--bootstrap", "0", "--require", "t2i_R@1>=99",
                             "--require", "t2i_latency_p50_ms<=0.4")
    missed = (frame["t2i_R@1"] < 99).astype(int) + (frame["t2i_latency_p50_ms"] > 0.4).astype(int)
    assert missed.min() == 1 and (missed == 1).sum() == 1  # one run misses only one requirement
    closest = frame[missed == 1].iloc[0]
    (point,) = summary["operating_points"]
    assert not point["meets"] and point["run_id"] == closest["run_id"]
    assert point["missed"] == [{"requirement": "t2i_R@1>=99", "column": "t2i_R@1", "value": closest["t2i_R@1"],
                                "shortfall": 99 - closest["t2i_R@1"]}]
    report = open(os.path.join(folder, "REPORT.md")).read()
    assert f"None meets t2i_R@1>=99 and t2i_latency_p50_ms<=0.4. Closest: {closest['label']}, which misses " \
           f"t2i_R@1>=99" in report


def closest_by_hand(frame, requirements, objective):
    """Brute force of 'closest': fewest misses, then the sum of shortfalls over |threshold|, then the objective."""
    scored = []
    for position, (_, row) in enumerate(frame.iterrows()):
        misses, shortfall = 0, 0.0
        for column, op, threshold in requirements:
            gap = threshold - row[column] if op == ">=" else row[column] - threshold
            if gap > 0:
                misses, shortfall = misses + 1, shortfall + gap / abs(threshold)
        scored.append((misses, shortfall, row[objective], -row["t2i_R@1"], row["run_id"]))
    return min(scored)[-1]


@pytest.mark.parametrize("seed", range(12))
def test_selection_on_random_tables_matches_brute_force(seed):
    rng = np.random.default_rng(seed)
    n = 30
    frame = pd.DataFrame({"run_id": [f"r{i:02d}" for i in range(n)], "label": [f"run {i}" for i in range(n)],
                          "t2i_R@1": rng.uniform(10, 50, n).round(1), "recall": rng.uniform(80, 100, n),
                          "p99": rng.uniform(0.1, 5, n), "bytes": rng.choice([8.0, 16.0, 32.0, 64.0], n)})
    requirements = [("recall", ">=", float(rng.uniform(85, 101))), ("p99", "<=", float(rng.uniform(0.1, 3)))]
    parsed = [operating_points.parse_requirement(f"{c}{op}{v}") for c, op, v in requirements]
    choice = operating_points.select(frame, parsed, operating_points.Objective("min", "bytes"), head="t2i_R@1")
    fits = frame[(frame["recall"] >= requirements[0][2]) & (frame["p99"] <= requirements[1][2])]
    if len(fits):
        assert choice["meets"] and choice["run_id"] == best(fits, "bytes", True)
    else:
        assert not choice["meets"] and choice["run_id"] == closest_by_hand(frame, requirements, "bytes")


def test_interval_columns_can_be_required(tmp_path):
    folder, rng = str(tmp_path), np.random.default_rng(3)
    text_to_image = captions_of(60)
    write_ranked_run(folder, "A", "fp32", 8, synthetic_ranks(rng, text_to_image, 0.0), text_to_image, exact=True)
    for i, quality in enumerate((-0.05, -0.3, -1.0)):
        write_ranked_run(folder, f"R{i}", "int8", 8, synthetic_ranks(rng, text_to_image, quality), text_to_image,
                         candidate_size=5, bytes_per_vector=8 - 2 * i)
    summary, frame = analyse(folder, "--bootstrap", "300", "--require", "t2i_R@1_delta_ci_low>=-5",
                             "--objective", "max:t2i_qps")
    fits = frame[frame["t2i_R@1_delta_ci_low"] >= -5]
    (point,) = summary["operating_points"]
    assert 1 <= len(fits) < len(frame) and point["meets"] and point["run_id"] == best(fits, "t2i_qps", False)


@pytest.mark.parametrize("flags, message", [
    (["--require", "nope>=1"], "--require 'nope>=1': unknown column 'nope' (valid: "),
    (["--require", "t2i_R@1 > 5"], "--require 't2i_R@1 > 5': expected COLUMN>=VALUE or COLUMN<=VALUE"),
    (["--require", "t2i_R@1>=high"], "expected COLUMN>=VALUE or COLUMN<=VALUE"),
    (["--require", "t2i_R@1>=1", "--objective", "fastest"], "--objective 'fastest': expected min:COLUMN"),
    (["--require", "t2i_R@1>=1", "--objective", "max:speed"], "unknown column 'speed'"),
    (["--require", "t2i_R@1_ci_low>=1", "--bootstrap", "0"], "unknown column 't2i_R@1_ci_low'"),
    (["--confidence", "1.5"], "--confidence 1.5: must be between 0 and 1"),
    (["--bootstrap", "-1"], "--bootstrap -1: must be >= 0"),
])
def test_bad_requirement_is_one_error_line(tmp_path, flags, message):
    folder = hand_made(str(tmp_path))
    with pytest.raises(SystemExit) as error:
        analyze_results.main(["--results_dir", folder, "--no_plots", *flags])
    text = str(error.value)
    assert text.startswith("error: ") and message in text and "\n" not in text
    if "valid:" in message:
        assert "t2i_R@1" in text and "total_bytes_per_vector" in text and "label" not in text.split("valid:")[1]
    assert not os.path.exists(os.path.join(folder, "experiment_summary.json"))


def test_default_table_matches_brute_force(tmp_path):
    folder = hand_made(str(tmp_path))
    summary, frame = analyse(folder, "--bootstrap", "0")
    (group,) = summary["groups"]
    table = group["default_operating_points"]
    assert [row["threshold"] for row in table] == [95.0, 99.0, 99.5]
    for row in table:
        reach = frame[frame["retention_t2i_R@1"] >= row["threshold"]]
        assert row["reaching"] == len(reach)
        assert row["smallest"]["run_id"] == best(reach, "bytes_per_vector", True)
        assert row["smallest_total"]["run_id"] == best(reach, "total_bytes_per_vector", True)
        assert row["fastest"]["run_id"] == best(reach, "t2i_qps", False)
    assert summary["operating_points"] == []
    report = open(os.path.join(folder, "REPORT.md")).read()
    summary_section = report.split("### Summary")[1].split("### Source")[0]
    assert "| >= 95%" in summary_section and "Baseline: fp32 exact" in summary_section
    # The table row names each role's pick (a label says what the configuration is, never a role's name).
    row95 = next(line for line in summary_section.splitlines() if line.startswith("| >= 95%"))
    assert all(table[0][role]["label"] in row95 for role in ("smallest", "smallest_total", "fastest"))


def test_memory_columns_and_retention_names(tmp_path):
    folder, rng = str(tmp_path), np.random.default_rng(5)
    text_to_image = captions_of(30)
    write_ranked_run(folder, "A", "fp32", 8, synthetic_ranks(rng, text_to_image, 0.0), text_to_image, exact=True)
    # A reduced-dim run: the sweep's own retention is against fp32 at 4-d (99.0 here, whatever it was).
    write_ranked_run(folder, "B", "int8", 4, synthetic_ranks(rng, text_to_image, -0.5), text_to_image,
                     candidate_size=20, rerank=True, bytes_per_vector=4, extra_metrics={"t2i_retention_R@1": 99.0},
                     memory_extra={"total_bytes_per_vector": 20.0})
    write_ranked_run(folder, "C", "int4", 4, synthetic_ranks(rng, text_to_image, -0.7), text_to_image,
                     candidate_size=20, rerank=True, bytes_per_vector=2)
    summary, frame = analyse(folder, "--bootstrap", "0")
    rows = frame.set_index("run_id")
    assert rows.at["B", "t2i_retention_same_dim_R@1"] == 99.0
    assert rows.at["B", "t2i_retention_R@1"] == pytest.approx(100 * rows.at["B", "t2i_R@1"] / rows.at["A", "t2i_R@1"])
    assert (frame["t2i_retention_R@1"] == frame["retention_t2i_R@1"]).all()
    assert rows.at["B", "total_bytes_per_vector"] == 20.0  # as the run JSON says
    assert rows.at["C", "total_bytes_per_vector"] == 2 + 4 * 4  # older run: index + 4-d fp32 vectors
    assert rows.at["A", "total_bytes_per_vector"] == rows.at["A", "bytes_per_vector"]


def test_knob_values_get_their_own_labels_and_curves(tmp_path):
    folder, rng = str(tmp_path), np.random.default_rng(6)
    text_to_image = captions_of(30)
    write_ranked_run(folder, "A", "fp32", 8, synthetic_ranks(rng, text_to_image, 0.0), text_to_image, exact=True)
    for nprobe, quality in ((4, -0.8), (16, -0.2)):
        write_ranked_run(folder, f"I{nprobe}", "int8", 8, synthetic_ranks(rng, text_to_image, quality), text_to_image,
                         candidate_size=5, bytes_per_vector=8, qps=4000 / nprobe, index="ivf",
                         index_params={"nlist": 32, "nprobe": nprobe})
    write_ranked_run(folder, "H", "itq", 8, synthetic_ranks(rng, text_to_image, -0.4), text_to_image,
                     candidate_size=5, bytes_per_vector=1, index="hnsw", index_params={"hnsw_m": 16, "ef_search": 64})
    out = os.path.join(folder, "experiment_summary.json")
    summary = analyze_results.main(["--results_dir", folder, "--output_path", out, "--bootstrap", "100"])
    labels = {row["run_id"]: row["label"] for row in summary["rows"]}
    assert labels["I4"] == "int8 8d no rerank [ivf nlist=32 nprobe=4]" and labels["I16"].endswith("nprobe=16]")
    assert labels["H"] == "itq 8d no rerank [hnsw M=16 ef_search=64]"  # a precision the code does not know
    names = {os.path.basename(p) for p in summary["groups"][0]["plots"]}
    assert {"knobs_recall_vs_qps.png", "knobs_recall_vs_latency.png"} <= names
    os.remove(os.path.join(folder, "runs", "I16.json"))  # one nprobe value left: no curve to draw
    summary = analyze_results.main(["--results_dir", folder, "--output_path", out, "--bootstrap", "100"])
    names = {os.path.basename(p) for p in summary["groups"][0]["plots"]}
    assert not {"knobs_recall_vs_qps.png", "knobs_recall_vs_latency.png"} & names
    assert not os.path.exists(os.path.join(folder, "plots", summary["groups"][0]["group"], "knobs_recall_vs_qps.png"))


def test_fastest_with_ties_uses_speedup_intervals_when_the_runs_carry_them():
    rows = pd.DataFrame({"run_id": ["a", "b", "c", "d"], "label": list("abcd"), "t2i_R@1": [10.0, 11.0, 12.0, 9.0],
                         "t2i_qps": [900.0, 1000.0, 400.0, 950.0]})
    fastest, ties = operating_points.fastest_with_ties(rows, "t2i", "t2i_R@1")
    assert fastest["run_id"] == "b" and ties.empty        # no speed intervals: speeds cannot be told apart
    rows = rows.assign(t2i_speedup=[2.1, 2.0, 0.9, 1.5], t2i_speedup_ci_low=[1.9, 1.7, 0.8, 1.2],
                       t2i_speedup_ci_high=[2.3, 2.2, 1.0, 1.75])
    fastest, ties = operating_points.fastest_with_ties(rows, "t2i", "t2i_R@1")
    # The speedup ranks (a first, although b has the higher QPS); b's interval overlaps a's, d's and c's do not.
    assert fastest["run_id"] == "a" and list(ties["run_id"]) == ["b"]


def edit_speed(folder, name, **speed):
    path = os.path.join(folder, "runs", f"{name}.json")
    run = json.load(open(path))
    run["speed"].update(speed)
    json.dump(run, open(path, "w"))


def test_a_requirement_on_a_percentile_no_run_could_estimate_is_one_error_naming_latency_queries(tmp_path):
    folder = hand_made(str(tmp_path))
    for name in "ABCDE":  # what run_experiments.py writes for p99 from 100 queries
        edit_speed(folder, name, t2i_latency_p99_ms=None, t2i_latency_queries=100,
                   t2i_latency_note="not estimable from 100 queries: p99 (needs 1000)")
    with pytest.raises(SystemExit) as error:
        analyze_results.main(["--results_dir", folder, "--no_plots", "--require", "t2i_latency_p99_ms<=2"])
    assert str(error.value) == ("error: --require 't2i_latency_p99_ms<=2': p99 is not estimable from 100 latency "
                                "queries (it needs 1,000: 10 beyond it); rerun run_experiments.py with "
                                "--latency_queries 1000 or more")
    assert not os.path.exists(os.path.join(folder, "experiment_summary.json"))
    analyze_results.main(["--results_dir", folder, "--no_plots", "--bootstrap", "0"])
    report = open(os.path.join(folder, "REPORT.md")).read()
    assert "text→image latency: p99 not estimable from 100 queries (needs 1,000) in 5 run(s)" in report


def test_the_report_words_paired_speedups_with_intervals_and_warns_of_load(tmp_path):
    folder = hand_made(str(tmp_path))
    busy = {"load_before": 3.6, "load_after": 3.9, "cpu_pressure_pct": 80.0, "cores": 2, "threads_asked": 2,
            "threads_timed": 1, "other_runnable_before": 2.0}
    speedups = {"A": (1.0, 0.97, 1.04), "B": (2.1, 1.9, 2.3), "C": (1.02, 0.9, 1.1), "D": (3.0, 2.0, 3.5),
                "E": (0.8, 0.7, 0.9)}
    for name, (value, low, high) in speedups.items():
        edit_speed(folder, name, t2i_speedup=value, t2i_speedup_ci_low=low, t2i_speedup_ci_high=high,
                   t2i_qps_ci_low=900.0, t2i_qps_ci_high=3100.0, conditions=busy)
    summary = analyze_results.main(["--results_dir", folder, "--no_plots", "--bootstrap", "0"])
    report = open(os.path.join(folder, "REPORT.md")).read()
    assert report.count("Timings taken under load (load average up to 3.9 on 2 cores, CPU pressure up to 80%") == 1
    group = summary["groups"][0]
    assert group["speed"]["conditions"]["runs_loaded"] == 5
    # The fastest cell quotes the paired speed-up and names the runs whose interval overlaps it: at 95%, C (1.02,
    # 0.90-1.10) with A (0.97-1.04) and E (0.70-0.90) tied; B and D do not reach 95%.
    at95 = next(row for row in group["default_operating_points"] if row["threshold"] == 95)
    assert at95["fastest"]["run_id"] == "C" and {t["run_id"] for t in at95["fastest_ties"]} == {"A", "E"}
    assert "int8 8d C=20, 1.02x fp32 exact [0.90, 1.10]" in report
    assert "batch search 3.00x faster than fp32 exact (95% interval 2.00x-3.50x)" in report
    assert "batch search indistinguishable in speed from fp32 exact (1.02x, 95% interval 0.90x-1.10x)" in report
    assert "text→image 1,000 [900, 3,100] queries/s batch" in report
