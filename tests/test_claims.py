"""Family-wise claims (retrieval/family.py, bootstrap.simultaneous) and the "Check these" list (checks.py)."""
import json
import os

import numpy as np
import pytest

import analyze_results
from ranked_runs import captions_of, synthetic_ranks, write_ranked_run
from retrieval import bootstrap
from retrieval.bootstrap import Pairing, Resampler, RunRanks, Settings, simultaneous


def null_family(rng, n_images, members):
    """Per-image hits (x 100, image→text style: one query per image) of a baseline and of `members` runs that
    equal it in truth: each keeps the baseline's answer on 70% of images and redraws it on the rest."""
    base = rng.random(n_images) < 0.4
    runs = {"base": base}
    for j in range(members):
        redraw = rng.random(n_images) < 0.3
        runs[f"r{j}"] = np.where(redraw, rng.random(n_images) < 0.4, base)
    split = (n_images, np.arange(n_images, dtype=np.int64).tobytes())
    return {name: RunRanks(split=split, columns=["i2t_R@1"], numerators=100.0 * hits[:, None],
                           direction=np.array([1])) for name, hits in runs.items()}


def test_joint_intervals_cover_a_null_family_at_the_stated_level_and_marginal_ones_do_not():
    """200 seeded repetitions of 15 comparisons whose true difference is 0: the joint 95% intervals cover all
    15 at once in >= 92% of them (95% less two Monte Carlo standard errors); the marginal percentile intervals,
    each right 95% of the time, cover all 15 at once visibly less often."""
    rng, reps, members = np.random.default_rng(30), 200, 15
    joint_ok = marginal_ok = 0
    for rep in range(reps):
        ranked = null_family(rng, 300, members)
        paired = Pairing(ranked, Resampler(Settings(500, 0.95, rep)))
        names = [f"r{j}" for j in range(members)]
        samples = np.stack([paired.linear([(n, "i2t_R@1", 1.0), ("base", "i2t_R@1", -1.0)]) for n in names], axis=1)
        estimates = np.array([ranked[n].numerators.mean() - ranked["base"].numerators.mean() for n in names])
        low, high, critical = simultaneous(samples, estimates, 0.95)
        joint_ok += bool(np.all((low <= 0) & (high >= 0)))
        marginal = [paired("r%d" % j, "base", "i2t_R@1") for j in range(members)]
        marginal_ok += all(lo <= 0 <= hi for lo, hi in marginal)
        assert critical > 1.96   # one comparison's quantile would be ~1.96: the family's is wider
    assert joint_ok / reps >= 0.92
    assert marginal_ok / reps <= 0.75


def test_a_member_the_same_on_every_image_gets_a_zero_width_joint_interval():
    rng = np.random.default_rng(1)
    samples = np.column_stack([rng.normal(size=400), np.zeros(400)])
    low, high, critical = simultaneous(samples, np.array([0.0, 0.0]), 0.95)
    assert low[1] == high[1] == 0 and low[0] == pytest.approx(-critical * samples[:, 0].std(ddof=1))


def test_verdicts_use_joint_intervals_and_the_report_checks_a_run_above_fp32_and_an_unstable_speed(tmp_path):
    folder, rng = str(tmp_path), np.random.default_rng(7)
    text_to_image = captions_of(80)
    write_ranked_run(folder, "A", "fp32", 8, synthetic_ranks(rng, text_to_image, 0.0, image_effect=0.3),
                     text_to_image, exact=True)
    for j in range(6):
        write_ranked_run(folder, f"B{j}", "int8", 8, synthetic_ranks(rng, text_to_image, -0.1, image_effect=0.3),
                         text_to_image, candidate_size=5, bytes_per_vector=8 + j)
    # Far better than fp32 in both directions: a compressed run cannot truly be, so it is a check.
    write_ranked_run(folder, "Z", "pq", 8, synthetic_ranks(rng, text_to_image, 3.0, image_effect=0.3), text_to_image,
                     candidate_size=5, bytes_per_vector=2)
    path = os.path.join(folder, "runs", "B0.json")
    run = json.load(open(path))
    run["speed"].update(t2i_search_qps_spread_pct=35.0, t2i_rerank_qps_spread_pct=5.0)
    json.dump(run, open(path, "w"))
    # A run of schema 3: the width of its batch speed's interval over rounds counts (50% here), not the spread.
    for name, (low, high) in (("B2", (800.0, 1300.0)), ("B3", (980.0, 1020.0))):
        path = os.path.join(folder, "runs", f"{name}.json")
        run = json.load(open(path))
        run["speed"].update(t2i_qps_ci_low=low, t2i_qps_ci_high=high, t2i_search_qps_spread_pct=90.0)
        json.dump(run, open(path, "w"))
    out = os.path.join(folder, "experiment_summary.json")
    summary = analyze_results.main(["--results_dir", folder, "--output_path", out, "--no_plots",
                                    "--bootstrap", "500"])
    (group,) = summary["groups"]
    assert group["family"]["members"] == 2 * 7 and group["family"]["critical_value"] > 1.96
    rows = {r["run_id"]: r for r in summary["rows"]}
    for rid in ("B1", "Z"):   # the joint interval contains the marginal one
        assert rows[rid]["t2i_R@1_delta_sim_low"] <= rows[rid]["t2i_R@1_delta_ci_low"]
        assert rows[rid]["t2i_R@1_delta_sim_high"] >= rows[rid]["t2i_R@1_delta_ci_high"]
    assert rows["B0"]["t2i_speed_spread_pct"] == 35.0
    assert rows["B2"]["t2i_speed_spread_pct"] == pytest.approx(50.0) and rows["B3"]["t2i_speed_spread_pct"] == 4.0
    checks = {(c["check"], c["run_id"], c.get("metric")) for c in group["checks"]}
    assert {("above_fp32", "Z", "t2i_R@1"), ("above_fp32", "Z", "i2t_R@1"), ("unstable_speed", "B0", None),
            ("unstable_speed", "B2", None)} <= checks and ("unstable_speed", "B3", None) not in checks
    assert not any(c["run_id"].startswith("B") and c["check"] == "above_fp32" for c in group["checks"])
    report = open(os.path.join(folder, "REPORT.md")).read()
    check_section = report.split("### Check these")[1].split("### Source")[0]
    assert f"pq 8d no rerank scores above fp32 exact in t2i R@1: {rows['Z']['t2i_R@1']:.1f}" in check_section
    assert "2 batch speeds are uncertain by more than 20%" in check_section
    assert "int8 8d no rerank t2i 35.0%" in check_section
    assert "at 95% jointly" in report and "hold jointly at 95% over the group's 14 comparisons" in report
    assert "t2i_R@1_delta_sim_low" in open(os.path.join(folder, "summary.csv")).readline()


def test_pairing_without_runs_answers_none():
    empty = bootstrap.Pairing()
    assert empty("a", "b", "t2i_R@1") is None and empty.linear([("a", "t2i_R@1", 1.0)]) is None
    assert empty.confidence is None
