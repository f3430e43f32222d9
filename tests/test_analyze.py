"""analyze_results.py on hand-made results folders whose means and frontiers are computed by hand."""
import csv
import json
import os
import re

import pytest

import analyze_results
from retrieval import report

DATA = {"dataset": "toyset", "split": "test", "model": "toy-model", "dim": 8}


def write_run(folder, name, precision, dim, candidate_size=None, rerank=False, exact=False, t2i=None, i2t=None,
              bytes_per_vector=None, qps=None, p50=None, skipped=None, data=DATA, gallery_size=100):
    """One run JSON in run_experiments.py's schema (per-direction speed keys, attributes under 'data')."""
    run = {"config": {"dim": dim, "native_dim": 8, "dim_method": "none" if dim == 8 else "pca",
                      "precision": precision, "candidate_size": candidate_size, "rerank": rerank, "exact": exact,
                      "k_values": [1, 5], "index": "flat", "gallery_size": gallery_size,
                      "data_path": f"coco_data/{data['dataset']}/{data['model']}_test.h5"},
           "data": dict(data), "env": {"cpu": "test cpu", "threads": 1, "hostname": "here"}}
    if skipped:
        run["skipped"] = skipped
    else:
        metrics = {}
        for direction, (r1, r5) in (("t2i", t2i), ("i2t", i2t)):
            metrics.update({f"{direction}_R@1": r1, f"{direction}_R@5": r5, f"{direction}_MRR": r1 / 100,
                            f"{direction}_mean_rank": 3.0, f"{direction}_median_rank": 2.0})
        metrics["RSUM"] = sum(t2i) + sum(i2t)
        run.update(metrics=metrics,
                   speed={"t2i_qps": qps, "i2t_qps": qps / 2, "t2i_latency_p50_ms": p50, "i2t_latency_p50_ms": p50 * 2,
                          "t2i_latency_p95_ms": p50 * 1.5, "t2i_build_s": 0.01},
                   memory={"bytes_per_vector": bytes_per_vector, "t2i_index_bytes": bytes_per_vector * gallery_size,
                           "compression_ratio": 32 / bytes_per_vector, "peak_rss_bytes": 1e8})
    os.makedirs(os.path.join(folder, "runs"), exist_ok=True)
    with open(os.path.join(folder, "runs", f"{name}.json"), "w") as f:
        json.dump(run, f)


def hand_made(folder, data=DATA, with_skipped=True):
    """Five runs + one skipped config; the expected numbers in the tests below come from this table.

        run   precision dim  C        t2i R@1/R@5  i2t R@1/R@5  bytes/vec  t2i qps  t2i p50 ms
        A     fp32      8    exact    50 / 80      60 / 90      32         1000     1.0
        B     int8      8    no rr    45 / 78      55 / 88       8         2000     0.5
        C     int8      8    C=20     50 / 80      58 / 90       8         1500     0.8
        D     int4      4    no rr    30 / 60      40 / 70       2         3000     0.3
        E     fp16      8    no rr    48 / 79      59 / 89      16         1200     0.9
    """
    write_run(folder, "A", "fp32", 8, exact=True, t2i=(50, 80), i2t=(60, 90), bytes_per_vector=32, qps=1000, p50=1.0,
              data=data)
    write_run(folder, "B", "int8", 8, candidate_size=5, t2i=(45, 78), i2t=(55, 88), bytes_per_vector=8, qps=2000,
              p50=0.5, data=data)
    write_run(folder, "C", "int8", 8, candidate_size=20, rerank=True, t2i=(50, 80), i2t=(58, 90), bytes_per_vector=8,
              qps=1500, p50=0.8, data=data)
    write_run(folder, "D", "int4", 4, candidate_size=5, t2i=(30, 60), i2t=(40, 70), bytes_per_vector=2, qps=3000,
              p50=0.3, data=data)
    write_run(folder, "E", "fp16", 8, candidate_size=5, t2i=(48, 79), i2t=(59, 89), bytes_per_vector=16, qps=1200,
              p50=0.9, data=data)
    if with_skipped:
        write_run(folder, "F", "fp32", 16, skipped="dim 16 is above the native dim 8 (never padded)", data=data)
    return folder


def analyse(folder, *extra):
    out = os.path.join(folder, "experiment_summary.json")
    summary = analyze_results.main(["--results_dir", folder, "--output_path", out, "--metric", "t2i_R@1", *extra])
    with open(out) as f:
        assert json.load(f)["runs_total"] == summary["runs_total"]
    return summary


def test_means_frontier_budgets_match_hand_computation(tmp_path):
    summary = analyse(hand_made(str(tmp_path)), "--no_plots")
    assert summary["runs_total"] == 6 and summary["runs_skipped"] == 1
    (group,) = summary["groups"]
    means = group["means"]
    assert means["precision"]["int8"]["t2i_R@1"] == pytest.approx((45 + 50) / 2)
    assert means["precision"]["int8"]["runs"] == 2
    assert means["precision"]["fp16"]["i2t_R@5"] == pytest.approx(89)
    assert means["dim"]["8"]["t2i_R@1"] == pytest.approx((50 + 45 + 50 + 48) / 4)
    assert means["dim"]["4"]["RSUM"] == pytest.approx(30 + 60 + 40 + 70)
    assert means["candidate_size"]["no rerank"]["t2i_R@1"] == pytest.approx((45 + 30 + 48) / 3)
    assert means["candidate_size"]["C=20"]["i2t_R@1"] == pytest.approx(58)
    assert means["candidate_size"]["exact"]["bytes_per_vector"] == pytest.approx(32)
    assert means["direction"]["t2i"]["R@1"] == pytest.approx((50 + 45 + 50 + 30 + 48) / 5)
    assert means["direction"]["i2t"]["R@5"] == pytest.approx((90 + 88 + 90 + 70 + 89) / 5)

    # Memory frontier: D (2 B, 30) -> C (8 B, 50); B loses to C at the same size, E and A add no recall.
    memory_front = group["pareto"]["bytes_per_vector"]["t2i_R@1"]
    assert [p["run_id"] for p in memory_front] == ["D", "C"]
    # Latency frontier (t2i latency for t2i recall): D 0.3 -> B 0.5 -> C 0.8.
    latency_front = group["pareto"]["latency_p50_ms"]["t2i_R@1"]
    assert [p["run_id"] for p in latency_front] == ["D", "B", "C"]
    assert latency_front[0]["cost_column"] == "t2i_latency_p50_ms"
    # i2t recall against i2t latency (2x the t2i one): D 0.6 (40), B 1.0 (55), C 1.6 (58), E 1.8 (59), A 2.0 (60).
    assert [p["run_id"] for p in group["pareto"]["latency_p50_ms"]["i2t_R@1"]] == ["D", "B", "C", "E", "A"]
    # Throughput frontier (higher is better): D 3000 (30), B 2000 (45), C 1500 (50).
    assert [p["run_id"] for p in group["pareto"]["qps"]["t2i_R@1"]] == ["D", "B", "C"]

    budgets = {b["budget_bytes_per_vector"]: b["run_id"] for b in group["budgets"]}
    # A ties C on t2i R@1 at 32 bytes: the smaller C wins.
    assert budgets == {2: "D", 4: "D", 8: "C", 16: "C", 32: "C"}

    rows = {r["run_id"]: r for r in summary["rows"]}
    assert rows["B"]["retention_t2i_R@1"] == pytest.approx(90.0)
    assert rows["B"]["memory_fraction"] == pytest.approx(0.25)
    assert rows["B"]["qps_ratio"] == pytest.approx(2.0)
    assert rows["F"]["status"] == "skipped" and "native dim" in rows["F"]["skipped_reason"]
    assert group["skipped"][0]["run_id"] == "F"
    text = " ".join(report.findings(group))
    assert "int8 8d C=20 keeps 100.0% of fp32 t2i R@1 (50.0 vs 50.0) at 25.0% of the memory" in text
    assert "Re-ranking int8 8-d with fp32 vectors (best C=20) raises t2i R@1 from 45.0 to 50.0 (+5.0 points)" in text
    assert "1 configurations were skipped" in text


def test_summary_csv_and_report_agree(tmp_path):
    folder = hand_made(str(tmp_path))
    analyse(folder, "--no_plots")
    with open(os.path.join(folder, "summary.csv")) as f:
        rows = {r["run_id"]: r for r in csv.DictReader(f)}
    assert set(rows) == {"A", "B", "C", "D", "E", "F"}
    assert float(rows["C"]["t2i_R@1"]) == 50 and rows["F"]["status"] == "skipped"
    report = open(os.path.join(folder, "REPORT.md")).read()
    # Every completed run's row in the report's run table carries the CSV's t2i R@1 and bytes/vector.
    for run_id in "ABCDE":
        line = next(line for line in report.splitlines() if line.startswith("| ") and line.endswith(f"| {run_id} |"))
        cells = [c.strip() for c in line.strip("|").split("|")]
        assert float(cells[2]) == pytest.approx(float(rows[run_id]["t2i_R@1"]), abs=0.01)
        assert float(cells[1]) == pytest.approx(float(rows[run_id]["bytes_per_vector"]))
    assert "dim 16 is above the native dim 8" in report


def test_partial_folder_without_baseline(tmp_path):
    folder = str(tmp_path)
    write_run(folder, "B", "int8", 8, candidate_size=5, t2i=(45, 78), i2t=(55, 88), bytes_per_vector=8, qps=2000,
              p50=0.5)
    write_run(folder, "X", "int4", 8, skipped="killed before it ran")
    summary = analyse(folder, "--no_plots")
    (group,) = summary["groups"]
    assert group["runs_completed"] == 1 and group["runs_skipped"] == 1
    assert summary["rows"][0]["retention_t2i_R@1"] is None
    assert any("No fp32 exact baseline" in s for s in report.findings(group))


def test_mixed_datasets_are_grouped_not_mixed(tmp_path):
    folder = str(tmp_path)
    hand_made(folder)
    other = {"dataset": "otherset", "split": "test", "model": "toy-model", "dim": 8}
    write_run(folder, "O1", "fp32", 8, exact=True, t2i=(10, 20), i2t=(12, 24), bytes_per_vector=32, qps=10, p50=9.0,
              data=other)
    write_run(folder, "O2", "int8", 8, candidate_size=5, t2i=(9, 18), i2t=(11, 22), bytes_per_vector=8, qps=20,
              p50=5.0, data=other)
    summary = analyse(folder, "--no_plots")
    groups = {g["dataset"]: g for g in summary["groups"]}
    assert set(groups) == {"toyset", "otherset"}
    assert groups["otherset"]["runs_total"] == 2
    assert groups["otherset"]["means"]["precision"]["int8"]["t2i_R@1"] == pytest.approx(9)
    assert groups["toyset"]["means"]["precision"]["int8"]["t2i_R@1"] == pytest.approx(47.5)
    rows = {r["run_id"]: r for r in summary["rows"]}
    # Retention is measured against the baseline of the same dataset.
    assert rows["O2"]["retention_t2i_R@1"] == pytest.approx(90.0)
    assert rows["O2"]["baseline_run"] == "O1" and rows["B"]["baseline_run"] == "A"


def test_plots_are_valid_pngs_and_reruns_are_idempotent(tmp_path):
    from PIL import Image
    folder = hand_made(str(tmp_path))
    write_run(folder, "A10k", "fp32", 8, exact=True, t2i=(40, 70), i2t=(50, 80), bytes_per_vector=32, qps=100, p50=10,
              gallery_size=10000)
    write_run(folder, "C10k", "int8", 8, candidate_size=20, rerank=True, t2i=(39, 69), i2t=(49, 79), bytes_per_vector=8,
              qps=150, p50=8, gallery_size=10000)
    summary = analyse(folder)
    (group,) = summary["groups"]
    names = {os.path.basename(p) for p in group["plots"]}
    assert names == {"recall_vs_memory.png", "recall_vs_qps.png", "recall_vs_latency.png",
                     "heatmap_dim_precision.png", "candidates.png", "retention.png", "scaling.png"}
    for rel in group["plots"]:
        path = os.path.join(folder, rel)
        with open(path, "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"
        with Image.open(path) as image:
            image.verify()
    # The main tables use the real gallery only; the 10k runs appear in the scaling table.
    assert group["main_gallery_size"] == 100 and group["gallery_sizes"] == [100, 10000]
    assert {r["gallery_size"] for r in group["scaling"]} == {100, 10000}
    report = open(os.path.join(folder, "REPORT.md")).read()
    assert all(f"]({rel})" in report for rel in group["plots"])
    assert re.search(r"growing the gallery from 100 to 10,000 items moves t2i R@1 from 50\.0 to 40\.0", report)

    before = {name: open(os.path.join(folder, name), "rb").read()
              for name in ("experiment_summary.json", "summary.csv", "REPORT.md")}
    analyse(folder)
    after = {name: open(os.path.join(folder, name), "rb").read() for name in before}
    assert before == after
    assert not [n for n in os.listdir(folder) if n.startswith(".")], "temp files left behind"


@pytest.mark.parametrize("setup, message", [
    (lambda d: None, "no run files"),
    (lambda d: os.makedirs(os.path.join(d, "runs")), "no run files"),
    (lambda d: (os.makedirs(os.path.join(d, "runs")),
                open(os.path.join(d, "runs", "x.json"), "w").write('{"not": "a run"}')), "not a run file"),
    (lambda d: (os.makedirs(os.path.join(d, "runs")),
                open(os.path.join(d, "runs", "x.json"), "w").write('{"config": ')), "not a readable JSON"),
])
def test_empty_or_wrong_folder_is_a_clear_error(tmp_path, setup, message):
    folder = str(tmp_path / "res")
    os.makedirs(folder)
    setup(folder)
    with pytest.raises(SystemExit) as error:
        analyze_results.main(["--results_dir", folder])
    assert str(error.value).startswith("error: ") and message in str(error.value)
    assert "\n" not in str(error.value)
    assert not os.path.exists(os.path.join(folder, "experiment_summary.json"))


def test_missing_folder_is_a_clear_error(tmp_path):
    with pytest.raises(SystemExit, match="folder not found"):
        analyze_results.main(["--results_dir", str(tmp_path / "nope")])


def test_unknown_metric_is_a_clear_error(tmp_path):
    folder = hand_made(str(tmp_path))
    with pytest.raises(SystemExit, match=r"--metric t2i_R@50: not a metric of these runs \(have: t2i_R@1"):
        analyze_results.main(["--results_dir", folder, "--metric", "t2i_R@50", "--no_plots"])


def test_a_candidate_size_covering_the_gallery_is_called_out(tmp_path):
    folder = hand_made(str(tmp_path / "r"))
    # C = 100 on a 100-image gallery re-ranks every image: exact fp32 search, not a real choice.
    write_run(folder, "G", "int8", 8, candidate_size=100, rerank=True, t2i=(50, 80), i2t=(60, 90),
              bytes_per_vector=8, qps=900, p50=1.1)
    group = analyse(folder)["groups"][0]
    assert group["whole_gallery_candidates"] == [{"candidate_size": 100, "gallery_size": 100, "runs": 1}]
    assert any("C=100 covers the whole gallery of 100 images" in s for s in report.findings(group))
    small = analyse(hand_made(str(tmp_path / "s")))["groups"][0]
    assert small["whole_gallery_candidates"] == [] and not any("whole gallery" in s for s in report.findings(small))
