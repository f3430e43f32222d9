"""analyze_results.py on hand-made results folders whose means and frontiers are computed by hand."""
import csv
import dataclasses
import json
import math
import os
import re

import numpy as np
import pytest

import analyze_results
from conftest import fill_up, mounted_tmpfs
from ranked_runs import captions_of, synthetic_ranks, write_ranked_run
from retrieval import findings, io, summary_text

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


@pytest.fixture(scope="module")
def hand_made_summary(tmp_path_factory):
    """analyse() of hand_made's folder without plots: the summary whose numbers the next tests compute by hand."""
    return analyse(hand_made(str(tmp_path_factory.mktemp("hand_made"))), "--no_plots")


def test_means_match_hand_computation(hand_made_summary):
    summary = hand_made_summary
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


def test_frontiers_match_hand_computation(hand_made_summary):
    (group,) = hand_made_summary["groups"]
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


def test_budgets_match_hand_computation(hand_made_summary):
    (group,) = hand_made_summary["groups"]
    budgets = {b["budget_bytes_per_vector"]: b["run_id"] for b in group["budgets"]}
    # A ties C on t2i R@1 at 32 bytes: the smaller C wins.
    assert budgets == {2: "D", 4: "D", 8: "C", 16: "C", 32: "C"}


def test_rows_match_hand_computation(hand_made_summary):
    summary = hand_made_summary
    (group,) = summary["groups"]
    rows = {r["run_id"]: r for r in summary["rows"]}
    assert rows["B"]["retention_t2i_R@1"] == pytest.approx(90.0)
    assert rows["B"]["memory_fraction"] == pytest.approx(0.25)
    assert rows["B"]["qps_ratio"] == pytest.approx(2.0)
    assert rows["F"]["status"] == "skipped" and "native dim" in rows["F"]["skipped_reason"]
    assert group["skipped"][0]["run_id"] == "F"


def test_findings_state_the_hand_computed_numbers(hand_made_summary):
    (group,) = hand_made_summary["groups"]
    text = " ".join(findings.findings(group))
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
    assert any("No fp32 exact baseline" in s for s in summary_text.summary_sentences(group, summary))


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


@dataclasses.dataclass(frozen=True)
class PlottedFolder:
    """hand_made's folder plus two runs on a 10,000-item gallery, analysed with its plots."""
    folder: str
    summary: dict   # what analyze_results.main returned


@pytest.fixture(scope="module")
def plotted(tmp_path_factory):
    folder = hand_made(str(tmp_path_factory.mktemp("plotted")))
    write_run(folder, "A10k", "fp32", 8, exact=True, t2i=(40, 70), i2t=(50, 80), bytes_per_vector=32, qps=100, p50=10,
              gallery_size=10000)
    write_run(folder, "C10k", "int8", 8, candidate_size=20, rerank=True, t2i=(39, 69), i2t=(49, 79), bytes_per_vector=8,
              qps=150, p50=8, gallery_size=10000)
    return PlottedFolder(folder, analyse(folder))


def test_plots_are_valid_pngs_linked_from_the_report(plotted):
    from PIL import Image
    folder = plotted.folder
    (group,) = plotted.summary["groups"]
    names = {os.path.basename(p) for p in group["plots"]}
    assert names == {"recall_vs_memory.png", "recall_vs_qps.png", "recall_vs_latency.png",
                     "heatmap_dim_precision.png", "candidates.png", "retention.png", "scaling.png",
                     "loss_decomposition.png"}
    for rel in group["plots"]:
        path = os.path.join(folder, rel)
        with open(path, "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"
        with Image.open(path) as image:
            image.verify()
    report = open(os.path.join(folder, "REPORT.md")).read()
    assert all(f"]({rel})" in report for rel in group["plots"])


def test_the_main_tables_use_the_real_gallery_and_the_scaling_table_every_size(plotted):
    (group,) = plotted.summary["groups"]
    # The main tables use the real gallery only; the 10k runs appear in the scaling table.
    assert group["main_gallery_size"] == 100 and group["gallery_sizes"] == [100, 10000]
    assert {r["gallery_size"] for r in group["scaling"]} == {100, 10000}
    report = open(os.path.join(plotted.folder, "REPORT.md")).read()
    assert re.search(r"growing the gallery from 100 to 10,000 items moves t2i R@1 from 50\.0 to 40\.0", report)


def test_a_rerun_writes_the_same_files_and_leaves_no_temp_files(plotted):
    folder = plotted.folder
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
    assert any("C=100 covers the whole gallery of 100 images" in s for s in findings.findings(group))
    small = analyse(hand_made(str(tmp_path / "s")))["groups"][0]
    assert small["whole_gallery_candidates"] == [] and not any("whole gallery" in s for s in findings.findings(small))


# ----------------------------------------------------------------------------- non-finite numbers in run files

def poison(folder, name, **fields):
    """Put NaN / infinity into run `name` (fields 'section.key' = value) the way a faulty writer would:
    json.dump writes them as NaN / Infinity tokens, which json.load reads back."""
    path = os.path.join(folder, "runs", f"{name}.json")
    with open(path) as f:
        run = json.load(f)
    for where, value in fields.items():
        section, key = where.split(".")
        run[section][key] = value
    with open(path, "w") as f:
        json.dump(run, f)
    return path


def strict_summary(path):
    """The summary JSON parsed as strict JSON: a NaN / Infinity token fails the test."""
    with open(path) as f:
        return json.loads(f.read(), parse_constant=lambda token: pytest.fail(f"{path} holds {token}: not strict JSON"))


def run_ids_in(value):
    """Every run_id anywhere in a summary part (tables, frontiers, operating points)."""
    if isinstance(value, dict):
        return {i for v in value.values() for i in run_ids_in(v)} | ({value["run_id"]} if "run_id" in value else set())
    if isinstance(value, list):
        return {i for v in value for i in run_ids_in(v)}
    return set()


def test_infinite_bytes_per_vector_is_an_invalid_run_not_a_crash(tmp_path, capsys):
    folder = hand_made(str(tmp_path))
    path = poison(folder, "D", **{"memory.bytes_per_vector": math.inf})
    assert '"bytes_per_vector": Infinity' in open(path).read()
    summary = analyse(folder, "--no_plots")
    assert summary["invalid_runs"] == [{
        "file": os.path.join("runs", "D.json"), "run_id": "D", "fields": ["memory.bytes_per_vector"],
        "reason": "non-finite number (memory.bytes_per_vector is Infinity)"}]
    assert summary["runs_invalid"] == 1 and summary["runs_total"] == 5
    err = capsys.readouterr().err.splitlines()
    assert err == [f"warning: {path}: non-finite number (memory.bytes_per_vector is Infinity); "
                   "left out of the analysis"]
    (group,) = summary["groups"]
    assert "D" not in run_ids_in(group) and "D" not in {r["run_id"] for r in summary["rows"]}
    # Without D the cheapest runs are B and C at 8 bytes; C (t2i R@1 50) wins every budget.
    assert {b["budget_bytes_per_vector"]: b["run_id"] for b in group["budgets"]} == {8: "C", 16: "C", 32: "C"}
    assert [p["run_id"] for p in group["pareto"]["bytes_per_vector"]["t2i_R@1"]] == ["C"]
    assert strict_summary(os.path.join(folder, "experiment_summary.json"))["invalid_runs"][0]["run_id"] == "D"
    with open(os.path.join(folder, "summary.csv")) as f:
        assert "D" not in {r["run_id"] for r in csv.DictReader(f)}
    text = open(os.path.join(folder, "REPORT.md")).read()
    assert "1 invalid run files left out" in text and "## Invalid run files" in text
    assert f"| {os.path.join('runs', 'D.json')} | non-finite number (memory.bytes_per_vector is Infinity) |" in text
    assert not any(line.endswith("| D |") for line in text.splitlines())


def test_infinite_rsum_is_never_best_and_the_summary_is_strict_json(tmp_path, capsys):
    folder = hand_made(str(tmp_path))
    poison(folder, "D", **{"metrics.RSUM": math.inf})
    out = os.path.join(folder, "experiment_summary.json")
    # RSUM picks the best per budget; the operating point asks for RSUM >= 0, which an infinite RSUM would meet
    # at the smallest memory (D, 2 bytes).
    summary = analyze_results.main(["--results_dir", folder, "--output_path", out, "--no_plots",
                                    "--require", "RSUM>=0"])
    written = strict_summary(out)
    assert written["invalid_runs"][0]["fields"] == ["metrics.RSUM"]
    (group,) = written["groups"]
    assert group["primary_metric"] == "RSUM"
    # RSUM: A 280 (32 B), C 278 (8 B), E 275 (16 B), B 266 (8 B).
    assert {b["budget_bytes_per_vector"]: b["run_id"] for b in group["budgets"]} == {8: "C", 16: "C", 32: "A"}
    assert "D" not in run_ids_in(group) and "D" not in run_ids_in(written["operating_points"])
    # Smallest total memory meeting RSUM >= 0: B (8 bytes; C re-ranks, 8 + 32).
    assert [(p["run_id"], p["meets"]) for p in written["operating_points"]] == [("B", True)]
    assert written == json.loads(json.dumps(summary))
    assert capsys.readouterr().err.count("\n") == 1


def test_nan_recall_and_infinite_speed_give_one_warning_naming_both(tmp_path, capsys):
    folder = hand_made(str(tmp_path))
    path = poison(folder, "C", **{"metrics.t2i_R@1": math.nan, "speed.t2i_qps": -math.inf})
    summary = analyse(folder, "--no_plots")
    (bad,) = summary["invalid_runs"]
    assert bad["fields"] == ["metrics.t2i_R@1", "speed.t2i_qps"]
    assert bad["reason"] == "non-finite number (metrics.t2i_R@1 is NaN; speed.t2i_qps is -Infinity)"
    assert capsys.readouterr().err == (f"warning: {path}: {bad['reason']}; left out of the analysis\n")
    (group,) = summary["groups"]
    assert "C" not in run_ids_in(group)
    # Without C (8 B, 50) the memory frontier is D (2 B, 30), B (8 B, 45), E (16 B, 48), A (32 B, 50).
    assert [p["run_id"] for p in group["pareto"]["bytes_per_vector"]["t2i_R@1"]] == ["D", "B", "E", "A"]
    assert {b["budget_bytes_per_vector"]: b["run_id"] for b in group["budgets"]} == {2: "D", 4: "D", 8: "B",
                                                                                   16: "E", 32: "A"}
    strict_summary(os.path.join(folder, "experiment_summary.json"))


def test_a_folder_of_only_invalid_runs_is_a_clear_error(tmp_path):
    folder = str(tmp_path)
    write_run(folder, "A", "fp32", 8, exact=True, t2i=(50, 80), i2t=(60, 90), bytes_per_vector=32, qps=1000, p50=1.0)
    path = poison(folder, "A", **{"metrics.RSUM": math.nan})
    with pytest.raises(SystemExit) as error:
        analyze_results.main(["--results_dir", folder, "--no_plots"])
    assert str(error.value) == (f"error: {folder}: all 1 run files are invalid, e.g. {path}: "
                                "non-finite number (metrics.RSUM is NaN)")
    assert os.listdir(folder) == ["runs"]


def test_a_ratio_to_a_zero_baseline_is_null_with_its_reason(tmp_path):
    folder = str(tmp_path)
    # The baseline finds nothing at R@1 (a hard toy split): retention of t2i R@1 has no value.
    write_run(folder, "A", "fp32", 8, exact=True, t2i=(0, 80), i2t=(60, 90), bytes_per_vector=32, qps=1000, p50=1.0)
    write_run(folder, "B", "int8", 8, candidate_size=5, t2i=(5, 78), i2t=(55, 88), bytes_per_vector=8, qps=2000,
              p50=0.5)
    summary = analyse(folder, "--no_plots")
    strict_summary(os.path.join(folder, "experiment_summary.json"))
    rows = {r["run_id"]: r for r in summary["rows"]}
    assert rows["B"]["retention_t2i_R@1"] is None and rows["B"]["retention_i2t_R@1"] == pytest.approx(55 / 60 * 100)
    note = "retention_t2i_R@1 is undefined (baseline A has t2i_R@1 0); retention_t2i_MRR is undefined (baseline A " \
           "has t2i_MRR 0)"
    assert rows["B"]["ratio_note"] == note
    (group,) = summary["groups"]
    (frontier,) = [r for r in group["memory_frontier"] if r["run_id"] == "B"]
    assert frontier["retention"] is None
    assert frontier["ratio_note"] == "retention is undefined (baseline A has t2i_R@1 0)"
    assert rows["A"]["ratio_note"] == note  # the baseline against itself
    assert f"2 runs: {note}, so null in the tables." in findings.findings(group)


def test_an_infinite_requirement_is_a_clear_error(tmp_path):
    folder = hand_made(str(tmp_path))
    with pytest.raises(SystemExit, match=r"--require 't2i_R@1>=1e999': 1e999 is beyond the float range"):
        analyze_results.main(["--results_dir", folder, "--no_plots", "--require", "t2i_R@1>=1e999"])
    assert not os.path.exists(os.path.join(folder, "experiment_summary.json"))


def test_a_rank_file_with_nan_ranks_gives_a_note_not_nan_intervals(tmp_path):
    folder, rng = str(tmp_path), np.random.default_rng(0)
    text_to_image = captions_of(30)
    write_ranked_run(folder, "A", "fp32", 8, synthetic_ranks(rng, text_to_image, 0.0), text_to_image, exact=True)
    ranks = synthetic_ranks(rng, text_to_image, -0.3)
    write_ranked_run(folder, "B", "int8", 8, ranks, text_to_image, candidate_size=5, bytes_per_vector=8)
    # A NaN among ranks above 5 leaves R@1 / R@5 as the JSON has them; only MRR would become NaN.
    ranks["t2i"][np.flatnonzero(ranks["t2i"] > 5)[0]] = np.nan
    io.write_ranks(os.path.join(folder, "runs", "B.ranks.npz"), ranks, text_to_image)
    summary = analyse(folder, "--no_plots", "--bootstrap", "50")
    strict_summary(os.path.join(folder, "experiment_summary.json"))
    rows = {r["run_id"]: r for r in summary["rows"]}
    assert rows["B"]["ci_note"] == "rank file: t2i has ranks that are NaN or below 1 (1-based, inf = miss)"
    assert rows["B"]["t2i_MRR_ci_low"] is None and rows["A"]["t2i_MRR_ci_low"] is not None


def test_distractors_are_labelled_and_the_ood_gap_is_reported_per_gallery_size(tmp_path):
    folder = hand_made(str(tmp_path))  # the real gallery: 100 items
    padded = {"G": (1000, {"source": "gaussian", "synthetic": True, "count": 900},
                    {"text_top1_cosine": 0.31, "image_top1_cosine": 0.83, "gap": 0.52}),
              "H": (400, {"source": ["coco_data/toyset/m_train.h5", "extra.h5"], "synthetic": False, "count": 300},
                    {"text_top1_cosine": 0.42, "image_top1_cosine": 0.71, "gap": 0.29})}
    for name, (size, distractors, ood) in padded.items():
        write_run(folder, name, "fp32", 8, exact=True, t2i=(40, 70), i2t=(50, 80), bytes_per_vector=32, qps=500,
                  p50=2.0, gallery_size=size)
        path = os.path.join(folder, "runs", f"{name}.json")
        with open(path) as f:
            run = json.load(f)
        run["config"]["distractors"] = distractors
        run["metrics"]["ood"] = ood
        with open(path, "w") as f:
            json.dump(run, f)
    (group,) = analyse(folder, "--no_plots")["groups"]
    files = "coco_data/toyset/m_train.h5 + extra.h5"
    assert group["ood_gap"] == [
        {"gallery_size": 400, "distractors": files, "distractors_synthetic": False, "dim": 8, "run_id": "H",
         "ood_text_top1_cosine": 0.42, "ood_image_top1_cosine": 0.71, "ood_gap": 0.29},
        {"gallery_size": 1000, "distractors": "gaussian", "distractors_synthetic": True, "dim": 8, "run_id": "G",
         "ood_text_top1_cosine": 0.31, "ood_image_top1_cosine": 0.83, "ood_gap": 0.52}]
    assert [(r["gallery_size"], r["distractors"], r["distractors_synthetic"]) for r in group["scaling"]] == \
        [(100, None, None), (400, files, False), (1000, "gaussian", True)]
    report_text = open(os.path.join(folder, "REPORT.md")).read()
    synthetic = "Gaussian distractors (synthetic; not realistic for text→image)"
    assert f"queries/s; the extra items are {synthetic}." in report_text  # the scaling sentence (largest gallery)
    assert f"| 1000 | {synthetic} | 8 | 0.31 | 0.83 | 0.52 | G |" in report_text  # the out-of-distribution table
    assert f"| 400 | distractors from {files} | 8 | 0.42 | 0.71 | 0.29 | H |" in report_text
    scaling = report_text.split("### Gallery-size scaling")[1].split("###")[0]
    assert f"| fp32 8d exact | 1000 | {synthetic} |" in scaling and f"| 400 | distractors from {files} |" in scaling


# ----------------------------------------------------------------------------- issue 28: outputs, disk full

def earlier_outputs(folder):
    """An earlier analysis of `folder` (the files a refused one must leave byte-identical)."""
    analyse(folder, "--no_plots")
    names = ("experiment_summary.json", "summary.csv", "REPORT.md")
    return {name: open(os.path.join(folder, name), "rb").read() for name in names}


def unreadable_runs(monkeypatch):
    """Fail the test if the analysis starts reading runs: the output checks must come first."""
    def refuse(*_args, **_kwargs):
        raise AssertionError("runs were read before the outputs were checked")
    monkeypatch.setattr(analyze_results, "load_runs", refuse)


@pytest.mark.parametrize("flag, make, fault", [
    ("--output_path", lambda t: os.makedirs(t / "out.json"), "{p}: cannot be written ({p} is a folder); "
                                                             "choose another file with --output_path"),
    ("--output_path", lambda t: (t / "file").write_text("x"), "{p}: cannot be written ({t}/file is not a folder); "
                                                              "choose another file with --output_path"),
    ("--plots_dir", lambda t: (t / "file").write_text("x"), "{p}: not writable ({p} is not a folder); "
                                                            "choose another output folder with --plots_dir"),
])
def test_an_output_that_is_a_file_or_folder_is_one_line_before_reading(tmp_path, monkeypatch, flag, make, fault):
    folder = hand_made(str(tmp_path / "result"))
    before = earlier_outputs(folder)
    make(tmp_path)
    target = {"--output_path": str(tmp_path / ("out.json" if (tmp_path / "out.json").exists() else "file/out.json")),
              "--plots_dir": str(tmp_path / "file")}[flag]
    unreadable_runs(monkeypatch)
    with pytest.raises(SystemExit) as err:
        analyze_results.main(["--results_dir", folder, flag, target])
    assert str(err.value) == "error: " + fault.format(p=target, t=tmp_path)
    assert {name: open(os.path.join(folder, name), "rb").read() for name in before} == before


def test_a_read_only_output_folder_is_one_line_before_reading(tmp_path, monkeypatch, read_only_folder):
    folder = hand_made(str(tmp_path / "result"))
    before = earlier_outputs(folder)
    unreadable_runs(monkeypatch)
    target = os.path.join(read_only_folder, "summary.json")
    with pytest.raises(SystemExit) as err:
        analyze_results.main(["--results_dir", folder, "--output_path", target, "--no_plots"])
    assert re.fullmatch(rf"error: {re.escape(target)}: cannot be written \((Read-only file system|Permission "
                        r"denied)\); choose another file with --output_path", str(err.value))
    with pytest.raises(SystemExit) as err:
        analyze_results.main(["--results_dir", folder, "--plots_dir", read_only_folder])
    assert re.fullmatch(rf"error: {re.escape(read_only_folder)}: not writable \((Read-only file system|Permission "
                        r"denied)\); choose another output folder with --plots_dir", str(err.value))
    assert {name: open(os.path.join(folder, name), "rb").read() for name in before} == before


def test_a_full_disk_under_the_summary_is_one_line_and_keeps_the_earlier_report(tmp_path):
    folder = hand_made(str(tmp_path / "result"))
    with mounted_tmpfs(tmp_path / "small", "1m") as out_dir:
        out = os.path.join(out_dir, "experiment_summary.json")
        analyze_results.main(["--results_dir", folder, "--output_path", out, "--no_plots"])
        before = {name: open(os.path.join(out_dir, name), "rb").read() for name in sorted(os.listdir(out_dir))}
        fill_up(out_dir)
        with pytest.raises(SystemExit) as err:
            analyze_results.main(["--results_dir", folder, "--output_path", out, "--no_plots", "--metric", "RSUM"])
        assert str(err.value) == (f"error: {out}: cannot write (No space left on device); an earlier file there "
                                  "is left unchanged")
        assert sorted(os.listdir(out_dir)) == sorted([*before, "filler"])   # no temp file left
        assert {name: open(os.path.join(out_dir, name), "rb").read() for name in before} == before


# ----------------------------------------------------------------------------- issue 28: groups by content

def test_two_files_with_equal_attributes_are_two_groups_each_with_its_own_baseline(tmp_path, capsys):
    import run_experiments
    from retrieval.handoff import Embeddings, l2_normalize, make_attrs, write_embeddings
    folder = str(tmp_path / "result")
    paths = []
    for name, noise in (("A.h5", 0.3), ("B.h5", 1.5)):  # the same dataset / split / model attributes
        rng = np.random.default_rng(len(paths))
        images = l2_normalize(rng.normal(size=(30, 8)))
        text_to_image = np.repeat(np.arange(30), 5)
        texts = l2_normalize(images[text_to_image] + noise * rng.normal(size=(150, 8)))
        emb = Embeddings(images, texts, text_to_image, [f"{i}.jpg" for i in range(30)],
                         [f"c{i}" for i in range(150)], make_attrs("toy", "test", "random", 8))
        paths.append(write_embeddings(str(tmp_path / name), emb))
    run_experiments.main(["--data_path", *paths, "--output_dir", folder, "--precisions", "int8",
                          "--candidate_sizes", "10", "--recall_k", "1", "5", "--min_time", "0",
                          "--latency_queries", "2", "--num_workers", "1"])
    capsys.readouterr()
    summary = analyse(folder, "--no_plots", "--bootstrap", "0")
    groups = summary["groups"]
    assert len(groups) == 2 and len({g["group"] for g in groups}) == 2 and len({g["title"] for g in groups}) == 2
    for group, path in zip(sorted(groups, key=lambda g: g["title"]), paths):
        assert group["title"].startswith(f"toy / test / random ({os.path.basename(path)}, sha256 ")
        assert group["source"]["data_paths"] == [os.path.normpath(path)]
        (baseline,) = group["baseline"]
        assert baseline["data_path"] == os.path.normpath(path)
        labels = [r["label"] for r in group["retention"]]
        assert len(labels) == len(set(labels)) == 3
    rows = {r["run_id"]: r for r in summary["rows"]}
    for row in rows.values():  # retention against the baseline of the same file, never the other's
        assert rows[row["baseline_run"]]["data_path"] == row["data_path"]
    report_text = open(os.path.join(folder, "REPORT.md")).read()
    headings = [line for line in report_text.splitlines() if line.startswith("## toy / test / random")]
    assert sorted(headings) == sorted(f"## {g['title']}" for g in groups)
    assert "predate content fingerprints" not in capsys.readouterr().out


def test_run_files_without_fingerprints_group_as_before_with_one_note(tmp_path, capsys):
    folder = hand_made(str(tmp_path))  # version 0 files: no "inputs"
    write_run(folder, "A2", "fp32", 8, exact=True, t2i=(40, 70), i2t=(50, 80), bytes_per_vector=32, qps=900, p50=1.1,
              gallery_size=1000)
    summary = analyse(folder, "--no_plots")
    (group,) = summary["groups"]
    assert group["group"] == "toyset_test_toy-model" and group["title"] == "toyset / test / toy-model"
    assert group["runs_total"] == 7
    notes = [line for line in capsys.readouterr().out.splitlines() if line.startswith("note:")]
    assert notes == ["note: 7 of 7 run files predate content fingerprints (written before run schema 2): grouped "
                     "by dataset/split/model alone, as before"]
