"""--select_on: answers chosen on one split and reported with another's numbers, and the optimism that shows
the winner's curse (retrieval/selection.py)."""
import os
import re

import numpy as np
import pandas as pd
import pytest

import analyze_results
from ranked_runs import captions_of, synthetic_ranks, write_ranked_run
from retrieval import operating_points
from retrieval.frame import no_pairs
from retrieval.selection import Confirmation

HEAD = "t2i_R@1"
BASE = 50.0


def split_frame(split, deltas):
    """A group's main runs as the frame holds them: an fp32 exact baseline and one run per true-equal
    configuration, every one of the same size, so a choice among them is a choice by the observed value."""
    rows = [{"run_id": f"{split}-base", "label": "fp32 8d exact", "exact": True, "precision": "fp32", "dim": 8,
             "bytes_per_vector": 32.0, "total_bytes_per_vector": 32.0, "t2i_qps": 1000.0, HEAD: BASE,
             f"{HEAD}_delta": 0.0}]
    for j, delta in enumerate(deltas):
        rows.append({"run_id": f"{split}-{j}", "label": f"int8 8d C={j + 10}", "exact": False, "precision": "int8",
                     "dim": 8, "bytes_per_vector": 8.0, "total_bytes_per_vector": 8.0, "t2i_qps": 2000.0,
                     HEAD: BASE + delta, f"{HEAD}_delta": delta, "candidate_size": j + 10.0, "rerank": True})
    frame = pd.DataFrame(rows).assign(group=split, split=split, status="ok", gallery_size=100, native_dim=8,
                                      dim_method="none", index="flat", baseline_run=f"{split}-base")
    frame["rerank"] = frame["rerank"].fillna(False).astype(bool)
    frame[f"retention_{HEAD}"] = 100 * frame[HEAD] / BASE
    return frame


def group(split, frame):
    main = frame[frame["group"] == split]
    return {"group": split, "split": split, "title": split, "main_gallery_size": 100, "head_metric": HEAD,
            "default_operating_points": operating_points.default_table(main, HEAD)}


def test_choosing_on_dev_reports_an_unbiased_value_and_its_optimism_shows_the_bias():
    """20 configurations equal in truth (1 point below fp32), each measured with noise sd 0.5 on dev and on test,
    independently. The smallest one reaching 95% is, among equals in size, the one with the highest observed
    value: the maximum of 20 draws, E = 1.8675 sd above the truth. Chosen on test and reported on test, the
    answer is biased by that much; chosen on dev, the test value is unbiased and the optimism (dev minus test)
    measures the bias."""
    rng, truth, sd, reps, configs = np.random.default_rng(30), -1.0, 0.5, 200, 20
    on_test, on_dev, optimism = [], [], []
    for _ in range(reps):
        dev = split_frame("dev", truth + sd * rng.normal(size=configs))
        test = split_frame("test", truth + sd * rng.normal(size=configs))
        frame = pd.concat([dev, test], ignore_index=True)
        evaluation = group("test", frame)
        on_test.append(evaluation["default_operating_points"][0]["smallest"]["delta"] - truth)   # chosen on test
        confirmed = Confirmation(group("dev", frame), evaluation, frame, no_pairs).default_table()[0]
        assert confirmed["smallest"]["run_id"].startswith("test-") and confirmed["selected_on"] == "dev"
        on_dev.append(confirmed["smallest"]["delta"] - truth)
        optimism.append(confirmed["smallest"]["optimism"])
    expected_bias = 1.8675 * sd   # E[max of 20 standard normals] x sd
    assert np.mean(on_test) == pytest.approx(expected_bias, abs=0.08)
    assert abs(np.mean(on_dev)) < 0.12                      # 3 standard errors of the mean of 200 draws
    assert np.mean(optimism) == pytest.approx(expected_bias, abs=0.12)


def write_split(folder, split, names, rng, text_to_image):
    data = {"dataset": "toyset", "split": split, "model": "toy-model", "dim": 8}
    write_ranked_run(folder, f"{split}-A", "fp32", 8, synthetic_ranks(rng, text_to_image, 0.0), text_to_image,
                     exact=True, data=data, bytes_per_vector=32)
    for name, precision, quality, size in names:
        write_ranked_run(folder, f"{split}-{name}", precision, 8, synthetic_ranks(rng, text_to_image, quality),
                         text_to_image, candidate_size=5, bytes_per_vector=size, data=data)


def test_select_on_dev_reports_test_runs_names_one_sided_configurations_and_refuses_an_absent_split(tmp_path):
    folder, rng = str(tmp_path), np.random.default_rng(3)
    text_to_image = captions_of(100)
    # B and C as good as fp32 or better in truth (so that they reach 95% and are chosen), P far worse.
    write_split(folder, "dev", [("B", "int8", 0.2, 8), ("C", "int4", 0.1, 4), ("P", "pq", -2.0, 1)], rng,
                text_to_image)
    write_split(folder, "test", [("B", "int8", 0.2, 8), ("C", "int4", 0.1, 4), ("H", "fp16", 0.0, 16)], rng,
                text_to_image)
    out = os.path.join(folder, "experiment_summary.json")
    summary = analyze_results.main(["--results_dir", folder, "--output_path", out, "--no_plots", "--bootstrap",
                                    "300", "--select_on", "dev", "--require", "t2i_retention_R@1>=90"])
    dev, test = summary["groups"]
    assert (dev["split"], test["split"]) == ("dev", "test")
    record = test["selection"]
    assert record["split"] == "dev" and record["paired"] == 3   # A, B, C
    assert record["only_in_selection"] == ["pq 8d no rerank"] and record["only_in_evaluation"] == ["fp16 8d no rerank"]
    frame = pd.read_csv(os.path.join(folder, "summary.csv")).set_index("run_id")
    for row in test["default_operating_points"]:
        for role in ("smallest", "smallest_total", "fastest"):
            pick = row[role]
            assert pick["run_id"].startswith("test-") and pick["selected_run"].startswith("dev-")
            assert pick["label"] == frame.at[pick["selected_run"], "label"]
            assert pick["delta"] == pytest.approx(frame.at[pick["run_id"], f"{HEAD}_delta"])
            if pick["selected_delta"] is not None and pick["delta"] is not None:
                assert pick["optimism"] == pytest.approx(pick["selected_delta"] - pick["delta"])
    # The --require answer is chosen on dev too and carries test's numbers.
    point = next(p for p in summary["operating_points"] if p["group"] == test["group"])
    assert point["selected_on"] == "dev" and point["run_id"].startswith("test-")
    assert all(b["run_id"] is None or b["run_id"].startswith("test-") for b in test["budgets"])
    assert all(b["optimism"] == pytest.approx(b["selected_delta"] - frame.at[b["run_id"], "RSUM_delta"])
               for b in test["budgets"] if b["run_id"])
    smallest = test["default_operating_points"][0]["smallest"]   # dev and test resampled independently
    assert smallest["label"] == "int4 8d no rerank"   # C: the smallest reaching 95% on dev
    assert smallest["optimism_ci_low"] < smallest["optimism"] < smallest["optimism_ci_high"]
    report = open(os.path.join(folder, "REPORT.md")).read()
    assert "Answers chosen on dev (3 configurations paired)" in report
    assert ("Measured on one side only, so never chosen or reported: only on dev: pq 8d no rerank; only on test: "
            "fp16 8d no rerank.") in report
    assert "This split (dev) chooses the answers of" in report
    for section in report.split("\n## ")[1:]:   # no sentence of a group's section says the same twice
        sentences = [x.strip() for line in section.splitlines() if line.startswith("- ")
                     for x in re.split(r"(?<=[.;])\s+(?=[A-Z])", line[2:])]
        assert len(sentences) == len(set(sentences))
        summary_lines = section.split("### Summary")[1].split("###")[0].strip().splitlines()
        assert len([line for line in summary_lines if line.strip()]) <= 10
    with pytest.raises(SystemExit) as error:
        analyze_results.main(["--results_dir", folder, "--output_path", out, "--no_plots", "--select_on", "val"])
    assert "--select_on val: no group of split 'val' in these runs (splits: dev, test)" in str(error.value)


def test_without_select_on_the_summary_says_choices_were_made_on_the_reported_split(tmp_path):
    folder, rng = str(tmp_path), np.random.default_rng(4)
    text_to_image = captions_of(30)
    write_split(folder, "test", [("B", "int8", -0.1, 8)], rng, text_to_image)
    out = os.path.join(folder, "experiment_summary.json")
    summary = analyze_results.main(["--results_dir", folder, "--output_path", out, "--no_plots", "--bootstrap", "0"])
    assert summary["groups"][0]["selection"] == {"selected_on": None, "split": "test"}
    summary_section = open(os.path.join(folder, "REPORT.md")).read().split("### Summary")[1].split("### Source")[0]
    assert "Choices were made on the reported split (test)" in summary_section
    assert len([line for line in summary_section.splitlines() if line.strip()]) <= 10
