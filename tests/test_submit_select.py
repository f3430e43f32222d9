"""submit_job.sh's SELECT_SPLIT knob: dev is swept beside test with the same fit split, and the analysis
chooses the report's answers on dev (analyze_results.py --select_on dev)."""
import json
import os

import pytest

from test_submit_job import make_clone, pipeline_env, run_files, run_script


@pytest.mark.slow
def test_select_split_sweeps_dev_and_test_and_chooses_on_dev(tmp_path, tiny_clip_dir):
    clone = make_clone(tmp_path / "clone")
    # 400 images: dev 40, test 160 (prepare_data.py's 10 / 40 %), enough for K = 5 and C = 20 on both.
    env = pipeline_env(tiny_clip_dir, SYNTHETIC_IMAGES=400, SELECT_SPLIT="dev")
    result = run_script(clone, env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    runs = [json.load(open(path)) for path in run_files(clone, "result")]
    splits = {run["data"]["split"] for run in runs}
    assert splits == {"dev", "test"}
    assert all(run["fit"]["path"].endswith("_train.h5") for run in runs if "fit" in run)
    summary = json.load(open(os.path.join(clone, "result", "experiment_summary.json")))
    assert summary["args"]["select_on"] == "dev"
    test = next(g for g in summary["groups"] if g["split"] == "test")
    assert test["selection"]["split"] == "dev" and test["selection"]["paired"] == len(runs) // 2
    report = open(os.path.join(clone, "result", "REPORT.md")).read()
    assert "Answers chosen on dev" in report
    # Without a dev file (SPLITS leaves it out) the sweep says so in one line and chooses on test.
    clone2 = make_clone(tmp_path / "clone2")
    env2 = pipeline_env(tiny_clip_dir, SYNTHETIC_IMAGES=400, SELECT_SPLIT="dev", SPLITS="train test")
    result = run_script(clone2, env2)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "SELECT_SPLIT=dev: no hand-off file of that split" in result.stdout
    assert "Choices were made on the reported split (test)" in open(os.path.join(clone2, "result", "REPORT.md")).read()
