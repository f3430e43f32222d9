"""Where the loss comes from (retrieval/decomposition.py) on a hand-made sweep: the parts chain the runs the
module docstring names, add up to the total exactly on the same resamples, and a missing reference is named."""
import os

import numpy as np
import pytest

import analyze_results
from ranked_runs import captions_of, synthetic_ranks, write_ranked_run
from retrieval import analysis, bootstrap
from retrieval.decomposition import decomposition_table
from retrieval.frame import main_runs, runs_frame
from retrieval.runs import load_runs

HNSW = {"hnsw_m": 16, "ef_search": 64}


def hand_made_sweep(folder):
    """A fp32 8d exact; R fp32 4d; Q int8 4d flat; H int8 4d HNSW; HC the same re-ranked (C=20); P pq 4d HNSW
    whose flat pq reference was never run."""
    rng, text_to_image = np.random.default_rng(11), captions_of(60)
    runs = [("A", "fp32", 8, 0.0, {"exact": True}), ("R", "fp32", 4, -0.2, {}), ("Q", "int8", 4, -0.5, {}),
            ("H", "int8", 4, -0.8, {"index": "hnsw", "index_params": HNSW}),
            ("HC", "int8", 4, -0.3, {"index": "hnsw", "index_params": HNSW, "rerank": True, "candidate_size": 20}),
            ("P", "pq", 4, -1.5, {"index": "hnsw", "index_params": HNSW})]
    for name, precision, dim, quality, extra in runs:
        extra.setdefault("candidate_size", None if precision == "fp32" else 5)
        write_ranked_run(folder, name, precision, dim, synthetic_ranks(rng, text_to_image, quality), text_to_image,
                         bytes_per_vector=dim, **extra)
    return folder


def test_parts_chain_the_reference_runs_and_add_up_to_the_total_exactly(tmp_path):
    folder = hand_made_sweep(str(tmp_path))
    runs = load_runs(folder)
    frame, summary, paired = analysis.analyse(runs_frame(runs), runs, "t2i_R@1", folder,
                                              bootstrap.Settings(300, 0.95, 0))
    main = main_runs(frame, summary["groups"][0]["main_gallery_size"])
    table = {row["run_id"]: row for row in decomposition_table(main, ["t2i_R@1", "i2t_R@1"], paired,
                                                               keep_samples=True)}
    values = main.set_index("run_id")
    t2i = table["HC"]["directions"][0]
    assert [(s["parts"], s["from_run"], s["to_run"]) for s in t2i["segments"]] == [
        (["dimension"], "A", "R"), (["quantization"], "R", "Q"), (["index"], "Q", "H"), (["reranking"], "H", "HC")]
    for s in t2i["segments"]:
        assert s["value"] == pytest.approx(values.at[s["to_run"], "t2i_R@1"] - values.at[s["from_run"], "t2i_R@1"])
    for run_id, row in table.items():
        for direction in row["directions"]:
            assert sum(s["value"] for s in direction["segments"]) == pytest.approx(direction["total"], abs=1e-9)
            # The same resamples: the parts' resampled values add up to the total's on every resample.
            np.testing.assert_allclose(sum(s["samples"] for s in direction["segments"]), direction["samples"],
                                       atol=1e-9)
        t2i_total, i2t_total = (d["total"] for d in row["directions"])
        assert row["asymmetry"] == pytest.approx(i2t_total - t2i_total)   # t2i loss - i2t loss
    # A reduced fp32 run has one part; an int8 flat run two; neither has an index or a re-ranking part.
    assert [s["parts"] for s in table["R"]["directions"][0]["segments"]] == [["dimension"]]
    assert [s["parts"] for s in table["Q"]["directions"][0]["segments"]] == [["dimension"], ["quantization"]]


def test_a_missing_reference_run_is_named_and_its_steps_merged(tmp_path):
    folder = hand_made_sweep(str(tmp_path))
    out = os.path.join(folder, "experiment_summary.json")
    summary = analyze_results.main(["--results_dir", folder, "--output_path", out, "--no_plots",
                                    "--bootstrap", "200"])
    (group,) = summary["groups"]
    p = next(row for row in group["decomposition"] if row["run_id"] == "P")
    segments = p["directions"][0]["segments"]
    assert [s["parts"] for s in segments] == [["dimension"], ["quantization", "index"]]
    assert segments[1]["missing"] == ["pq 4d (pca) no rerank"] and segments[1]["from_run"] == "R"
    assert group["decomposition_missing"] == ["pq 4d (pca) no rerank"]
    report = open(os.path.join(folder, "REPORT.md")).read()
    section = report.split("### Where the loss comes from")[1]
    assert "Reference runs the sweep did not measure (their steps are merged, not guessed): pq 4d (pca) no rerank." \
        in section
    line = next(line for line in section.splitlines() if line.startswith("| pq 4d (pca) no rerank [hnsw"))
    assert "(+ index approximation)" in line and "in quantization: no pq 4d (pca) no rerank run" in line
