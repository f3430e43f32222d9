"""Bootstrap intervals (retrieval/bootstrap.py through analyze_results.py) on hand-made rank files: exact
cases whose intervals are known, a brute-force loop over the same draws, and folders without rank files."""
import importlib.util
import json
import os
import re

import numpy as np
import pandas as pd
import pytest

import analyze_results
from ranked_runs import captions_of, synthetic_ranks, write_ranked_run
from retrieval import bootstrap, findings
from retrieval import metrics as protocol
from retrieval.handoff import Embeddings, l2_normalize, make_attrs, read_embeddings, write_embeddings
from test_analyze import hand_made

METRICS = ("t2i_R@1", "t2i_R@5", "t2i_MRR", "i2t_R@1", "i2t_R@5", "i2t_MRR", "RSUM")


def analyse(folder, *extra):
    out = os.path.join(folder, "experiment_summary.json")
    summary = analyze_results.main(["--results_dir", folder, "--output_path", out, "--no_plots", *extra])
    return summary, {row["run_id"]: row for row in summary["rows"]}


def strict_load(path):
    def refuse(name):
        raise ValueError(f"{path}: {name} is not strict JSON")
    with open(path) as f:
        return json.load(f, parse_constant=refuse)


def test_rank_files_reproduce_the_run_metrics_and_stale_ones_are_refused(tmp_path):
    folder, rng = str(tmp_path), np.random.default_rng(0)
    text_to_image = captions_of(40)
    write_ranked_run(folder, "A", "fp32", 8, synthetic_ranks(rng, text_to_image, 0.0), text_to_image, exact=True)
    run = write_ranked_run(folder, "B", "int8", 8, synthetic_ranks(rng, text_to_image, -0.3), text_to_image,
                           candidate_size=5, bytes_per_vector=8)
    with np.load(os.path.join(folder, "runs", "B.ranks.npz")) as ranks:
        for direction in ("t2i", "i2t"):
            for k in (1, 5):
                assert 100 * np.mean(ranks[direction] <= k) == pytest.approx(run["metrics"][f"{direction}_R@{k}"])
            assert np.mean(1 / ranks[direction]) == pytest.approx(run["metrics"][f"{direction}_MRR"])
    summary, rows = analyse(folder, "--bootstrap", "200")
    assert rows["B"]["t2i_R@1_ci_low"] is not None and rows["B"]["ci_note"] == ""

    # A rank file that no longer matches its JSON (a re-run wrote one but not the other) is not trusted.
    run["metrics"]["t2i_R@1"] += 2.0
    with open(os.path.join(folder, "runs", "B.json"), "w") as f:
        json.dump(run, f)
    summary, rows = analyse(folder, "--bootstrap", "200")
    assert rows["B"]["t2i_R@1_ci_low"] is None and rows["B"]["t2i_R@1_delta"] is None
    assert "does not reproduce the run's t2i_R@1" in rows["B"]["ci_note"]
    assert rows["A"]["t2i_R@1_ci_low"] is not None
    (group,) = summary["groups"]
    assert group["intervals"]["runs_with_intervals"] == 1


def test_identical_runs_have_zero_difference_and_a_constant_loss_has_a_point_interval(tmp_path):
    folder, n_images = str(tmp_path), 30
    text_to_image = captions_of(n_images)
    i2t = np.random.default_rng(1).integers(1, 20, n_images).astype(float)
    base = {"t2i": np.tile([1.0, 1.0, 3.0, 7.0, 20.0], n_images), "i2t": i2t}
    # Every image loses exactly one of its two R@1 captions (rank 1 -> 2) and keeps its R@5 hits.
    shifted = {"t2i": np.tile([2.0, 1.0, 3.0, 7.0, 20.0], n_images), "i2t": i2t.copy()}
    write_ranked_run(folder, "A", "fp32", 8, base, text_to_image, exact=True)
    write_ranked_run(folder, "B", "int8", 8, {d: v.copy() for d, v in base.items()}, text_to_image, candidate_size=5,
                     bytes_per_vector=8)
    write_ranked_run(folder, "C", "int4", 8, shifted, text_to_image, candidate_size=5, bytes_per_vector=4)
    summary, rows = analyse(folder, "--bootstrap", "300")
    for run_id in ("A", "B"):  # the baseline against itself, and an identical run
        for m in METRICS:
            assert (rows[run_id][f"{m}_delta"], rows[run_id][f"{m}_delta_ci_low"],
                    rows[run_id][f"{m}_delta_ci_high"]) == (0.0, 0.0, 0.0), (run_id, m)
    # R@1: 2 of 5 captions per image -> 1 of 5: -20 points on every resample, whatever images it draws.
    c = rows["C"]
    assert (c["t2i_R@1_delta"], c["t2i_R@1_delta_ci_low"], c["t2i_R@1_delta_ci_high"]) == (-20.0, -20.0, -20.0)
    assert (c["t2i_R@5_delta_ci_low"], c["t2i_R@5_delta_ci_high"]) == (0.0, 0.0)
    # MRR: 1/2 instead of 1 for one caption of five in every image: -0.1 on every resample.
    assert c["t2i_MRR_delta"] == pytest.approx(-0.1)
    assert c["t2i_MRR_delta_ci_low"] == pytest.approx(-0.1, abs=1e-12)
    assert c["t2i_MRR_delta_ci_high"] == pytest.approx(-0.1, abs=1e-12)
    # The values themselves vary with the draw (images differ in i2t), so their intervals do not collapse.
    assert c["i2t_R@1_ci_low"] < c["i2t_R@1_ci_high"]


def random_folder(folder, n_images=60, runs=4, seed=0):
    rng = np.random.default_rng(seed)
    text_to_image = captions_of(n_images)
    write_ranked_run(folder, "A", "fp32", 8, synthetic_ranks(rng, text_to_image, 0.0), text_to_image, exact=True)
    for i in range(runs):
        write_ranked_run(folder, f"R{i}", "int8", 8, synthetic_ranks(rng, text_to_image, -0.2 * i), text_to_image,
                         candidate_size=5, bytes_per_vector=8 - i)
    return folder


def interval_values(rows):
    return {(run_id, column): value for run_id, row in rows.items() for column, value in row.items()
            if "_ci_" in column or column.endswith("_delta")}


def test_intervals_contain_the_estimate_and_the_seed_reproduces_them(tmp_path):
    folder = random_folder(str(tmp_path))
    summary, rows = analyse(folder, "--bootstrap", "400", "--seed", "3")
    for run_id, row in rows.items():
        for m in METRICS:
            assert row[f"{m}_ci_low"] <= row[m] <= row[f"{m}_ci_high"], (run_id, m)
            assert row[f"{m}_delta_ci_low"] <= row[f"{m}_delta"] <= row[f"{m}_delta_ci_high"], (run_id, m)
    assert summary["intervals"]["resamples"] == 400 and summary["intervals"]["seed"] == 3
    assert summary["intervals"]["confidence"] == 0.95 and summary["intervals"]["unit"] == "image"
    again = interval_values(analyse(folder, "--bootstrap", "400", "--seed", "3")[1])
    assert again == interval_values(rows)
    other = interval_values(analyse(folder, "--bootstrap", "400", "--seed", "4")[1])
    assert other != interval_values(rows)
    # A larger B with the same seed only adds resamples: the first 400 draws are the ones used above.
    larger = bootstrap.draws(60, 1600, 3)
    assert np.array_equal(larger[:400], bootstrap.draws(60, 400, 3))
    assert interval_values(analyse(folder, "--bootstrap", "1600", "--seed", "3")[1]) == \
        interval_values(analyse(folder, "--bootstrap", "1600", "--seed", "3")[1])


def brute_force(ranks, text_to_image, weights):
    """Each resample materialised: the drawn images (with repeats), all captions of each for t2i."""
    out = []
    for counts in weights.astype(int):
        images = np.repeat(np.arange(counts.size), counts)
        captions = np.concatenate([np.flatnonzero(text_to_image == i) for i in images])
        t2i = protocol.summarize(ranks["t2i"][captions], (1, 5))
        i2t = protocol.summarize(ranks["i2t"][images], (1, 5))
        values = {f"t2i_{k}": v for k, v in t2i.items()} | {f"i2t_{k}": v for k, v in i2t.items()}
        values["RSUM"] = protocol.rsum(values, (1, 5))
        out.append(values)
    return pd.DataFrame(out)


def test_resampling_unit_is_the_image_checked_against_a_brute_force_loop(tmp_path):
    folder, rng = str(tmp_path), np.random.default_rng(7)
    counts = np.array([1, 4, 2, 3, 5, 1, 2, 4, 3, 2, 1, 5])  # unequal captions per image: the denominator matters
    text_to_image = np.repeat(np.arange(counts.size), counts)
    ranks = {name: synthetic_ranks(rng, text_to_image, quality) for name, quality in (("A", 0.0), ("B", -0.5))}
    ranks["B"]["t2i"][::4] = np.inf  # misses, as a candidate list gives
    write_ranked_run(folder, "A", "fp32", 8, ranks["A"], text_to_image, exact=True)
    write_ranked_run(folder, "B", "int8", 8, ranks["B"], text_to_image, candidate_size=5, bytes_per_vector=8)
    summary, rows = analyse(folder, "--bootstrap", "250", "--seed", "5", "--confidence", "0.9")
    weights = bootstrap.draws(counts.size, 250, 5)
    a, b = brute_force(ranks["A"], text_to_image, weights), brute_force(ranks["B"], text_to_image, weights)
    for m in METRICS:
        low, high = np.percentile(b[m], [5, 95])
        assert rows["B"][f"{m}_ci_low"] == pytest.approx(low) and rows["B"][f"{m}_ci_high"] == pytest.approx(high), m
        low, high = np.percentile(b[m] - a[m], [5, 95])
        assert rows["B"][f"{m}_delta_ci_low"] == pytest.approx(low, abs=1e-9), m
        assert rows["B"][f"{m}_delta_ci_high"] == pytest.approx(high, abs=1e-9), m
    # One image holding every t2i hit: a resample's R@1 is exactly that image's share of the drawn captions.
    share = 100 * weights[:, 4] * counts[4] / (weights @ counts)
    only = np.where(text_to_image == 4, 1.0, 50.0)
    assert np.allclose(brute_force({"t2i": only, "i2t": ranks["A"]["i2t"]}, text_to_image, weights)["t2i_R@1"],
                       share)


def test_runs_on_other_queries_are_not_paired(tmp_path):
    folder, rng = str(tmp_path), np.random.default_rng(2)
    text_to_image = captions_of(20)
    write_ranked_run(folder, "A", "fp32", 8, synthetic_ranks(rng, text_to_image, 0.0), text_to_image, exact=True)
    other = np.tile(np.arange(20), 5)  # the same images and caption count, assigned differently
    write_ranked_run(folder, "B", "int8", 8, synthetic_ranks(rng, other, 0.0), other, candidate_size=5,
                     bytes_per_vector=8)
    summary, rows = analyse(folder, "--bootstrap", "100")
    assert rows["B"]["t2i_R@1_ci_low"] is not None and rows["B"]["t2i_R@1_delta"] is None
    assert "queries differ from baseline A" in rows["B"]["ci_note"]
    assert summary["groups"][0]["intervals"]["runs_paired"] == 1


def test_old_folder_without_rank_files_analyses_with_empty_intervals(tmp_path):
    folder = hand_made(str(tmp_path))
    summary, rows = analyse(folder)
    (group,) = summary["groups"]
    assert group["intervals"]["computed"] and group["intervals"]["runs_with_intervals"] == 0
    assert all(row.get("t2i_R@1_ci_low") is None and row.get("t2i_R@1_delta") is None for row in rows.values())
    assert rows["B"]["ci_note"].startswith("no rank file")
    frame = pd.read_csv(os.path.join(folder, "summary.csv"))
    assert {"t2i_R@1_ci_low", "t2i_R@1_delta_ci_high", "RSUM_ci_low"} <= set(frame.columns)
    assert frame["t2i_R@1_ci_low"].isna().all()
    text = open(os.path.join(folder, "REPORT.md")).read()
    assert "No intervals for any run: no rank file" in text
    strict_load(os.path.join(folder, "experiment_summary.json"))
    # --bootstrap 0: no interval columns at all, and the report says intervals are off.
    summary, rows = analyse(folder, "--bootstrap", "0")
    assert "t2i_R@1_ci_low" not in rows["B"] and summary["intervals"]["resamples"] == 0
    assert "No intervals (--bootstrap 0)" in open(os.path.join(folder, "REPORT.md")).read()


def frontier_folder(folder, n_images=50):
    """A baseline; E: one caption moved from rank 2 to 1 (retention above 100, inside the noise); F: much worse
    and smaller, so both are on the memory frontier."""
    rng = np.random.default_rng(4)
    text_to_image = captions_of(n_images)
    base = synthetic_ranks(rng, text_to_image, 0.0)
    base["t2i"][0] = 2.0
    better = {d: v.copy() for d, v in base.items()}
    better["t2i"][0] = 1.0
    write_ranked_run(folder, "A", "fp32", 8, base, text_to_image, exact=True, bytes_per_vector=32)
    write_ranked_run(folder, "E", "int8", 8, better, text_to_image, candidate_size=5, bytes_per_vector=8)
    write_ranked_run(folder, "F", "binary", 8, synthetic_ranks(rng, text_to_image, -1.5), text_to_image,
                     candidate_size=5, bytes_per_vector=1)
    return folder


def test_report_calls_noise_noise_and_rounds_without_contradiction(tmp_path):
    folder = frontier_folder(str(tmp_path))
    summary, rows = analyse(folder, "--bootstrap", "500")
    (group,) = summary["groups"]
    assert rows["E"]["retention_t2i_R@1"] > 100 and rows["E"]["t2i_R@1_delta_ci_low"] <= 0
    assert rows["F"]["t2i_R@1_delta_ci_high"] < 0
    sentences = findings.findings(group)
    e = next(s for s in sentences if s.startswith("int8 8d no rerank"))
    assert "no measurable loss" in e and "indistinguishable from fp32 at 95%" in e and "keeps" not in e
    f = next(s for s in sentences if s.startswith("binary 8d no rerank"))
    assert "below fp32 at 95%" in f
    # Wherever a sentence shows two values and their difference, the shown difference is theirs.
    text = open(os.path.join(folder, "REPORT.md")).read()
    pairs = re.findall(r"\((\d+\.\d+) vs (\d+\.\d+); [a-z0-9 %]+: ([+-]\d+\.\d+) points", text)
    assert len(pairs) >= 2
    for value, base, difference in pairs:
        assert float(value) - float(base) == pytest.approx(float(difference), abs=1e-9)
    strict_load(os.path.join(folder, "experiment_summary.json"))


@pytest.mark.parametrize("value, base, expected", [(15.76, 15.84, 2), (50.0, 45.0, 1), (15.8, 15.8, 1)])
def test_decimals_keep_the_shown_difference_equal_to_the_difference_of_the_shown_values(value, base, expected):
    digits = findings._decimals(value, base, value - base)
    assert digits == expected
    assert round(value, digits) - round(base, digits) == pytest.approx(round(value - base, digits))


def test_gallery_growth_is_paired_across_gallery_sizes(tmp_path):
    folder, rng = str(tmp_path), np.random.default_rng(8)
    text_to_image = captions_of(40)
    small = synthetic_ranks(rng, text_to_image, 0.0)
    large = {d: v + np.floor(v / 2) for d, v in small.items()}  # distractors push every rank down
    write_ranked_run(folder, "A", "fp32", 8, small, text_to_image, exact=True, gallery_size=40)
    write_ranked_run(folder, "A10k", "fp32", 8, large, text_to_image, exact=True, gallery_size=10000)
    summary, rows = analyse(folder, "--bootstrap", "300")
    (group,) = summary["groups"]
    last = [row for row in group["scaling"] if row["run_id"] == "A10k"][0]
    assert last["change"] == pytest.approx(rows["A10k"]["t2i_R@1"] - rows["A"]["t2i_R@1"])
    assert last["change_ci_low"] <= last["change"] <= last["change_ci_high"] <= 0
    sentence = next(s for s in findings.findings(group) if "growing the gallery" in s)
    assert "the 40-item gallery at 95%" in sentence


def bench_script(name):
    """A bench/ script as a module (bench/ is not a package)."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    spec = importlib.util.spec_from_file_location(name, os.path.join(root, "bench", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_compare_exports_matches_the_protocol_pairs_files_and_refuses_another_split(tmp_path, capsys):
    compare_exports = bench_script("compare_exports")

    def export(name, noise, images=60, seed=0):
        rng = np.random.default_rng(seed)
        vectors = l2_normalize(rng.normal(size=(images, 16)))
        text_to_image = np.repeat(np.arange(images), 5)
        texts = l2_normalize(vectors[text_to_image] + noise * rng.normal(size=(5 * images, 16)))
        emb = Embeddings(vectors, texts, text_to_image, [f"{i}.jpg" for i in range(images)],
                         [f"c{i}" for i in range(5 * images)], make_attrs("toy", "test", name, 16))
        return write_embeddings(str(tmp_path / f"{name}.h5"), emb)

    worse, better = export("worse", 1.2), export("better", 0.6)
    rows = compare_exports.main([worse, better, worse, "--bootstrap", "200"])
    out = capsys.readouterr().out
    assert out.count("minus the first (paired)") == 2
    for path, values, ci in rows:  # the numbers are the protocol's exact full ranking of each file
        emb = read_embeddings(path)
        want = protocol.evaluate(emb.image_embeddings, emb.text_embeddings, emb.text_to_image)
        for metric in ("t2i_R@1", "t2i_R@10", "i2t_R@5", "RSUM"):
            assert values[metric] == pytest.approx(want[metric])
            assert ci[metric + "_ci_low"] <= values[metric] <= ci[metric + "_ci_high"]
    # The file against itself: every paired difference is exactly 0 on every resample.
    assert rows[2][2]["t2i_R@1_delta_ci_low"] == rows[2][2]["t2i_R@1_delta_ci_high"] == 0
    assert rows[1][1]["t2i_R@1"] > rows[0][1]["t2i_R@1"] and rows[1][2]["t2i_R@1_delta_ci_low"] > 0
    other = export("other", 0.6, images=50)
    with pytest.raises(SystemExit, match=r"^error: .*other\.h5: not the same split"):
        compare_exports.main([worse, better, other])


# ----------------------------------------------------------------------------- issue 28: bounded memory

def test_a_bootstrap_whose_memory_is_unbounded_is_refused_with_its_size_before_reading(tmp_path):
    folder = hand_made(str(tmp_path))
    analyse(folder, "--bootstrap", "100")
    names = ("experiment_summary.json", "summary.csv", "REPORT.md")
    before = [open(os.path.join(folder, name), "rb").read() for name in names]
    with pytest.raises(SystemExit) as err:
        analyse(folder, "--bootstrap", "100000000")
    assert str(err.value) == ("error: --bootstrap 100000000: at most 1000000 resamples (a percentile interval keeps "
                              "every resample of its statistic: 0.75 GiB per statistic, 14.9 GiB for one run's ~20); "
                              "1000 to 10000 give stable intervals")
    assert [open(os.path.join(folder, name), "rb").read() for name in names] == before


def test_draws_and_products_in_blocks_give_the_intervals_of_one_block(tmp_path, monkeypatch):
    folder, rng = str(tmp_path), np.random.default_rng(11)
    text_to_image = captions_of(12, 3)
    write_ranked_run(folder, "A", "fp32", 8, synthetic_ranks(rng, text_to_image, 0.0), text_to_image, exact=True)
    for name, quality in (("B", -0.3), ("C", 0.2), ("D", -0.6)):
        write_ranked_run(folder, name, "int8", 8, synthetic_ranks(rng, text_to_image, quality), text_to_image,
                         candidate_size=5, bytes_per_vector=8)
    whole = analyse(folder, "--bootstrap", "500", "--seed", "2")[1]
    # 7 resamples of 12 images per block of draws, one run per product: 72 blocks of draws for 500 resamples
    monkeypatch.setattr(bootstrap, "DRAW_BLOCK_BYTES", 8 * 12 * 7)
    monkeypatch.setattr(bootstrap, "SAMPLE_BYTES", 1)
    assert np.array_equal(np.concatenate(list(bootstrap.draw_blocks(12, 500, 2, 7))), bootstrap.draws(12, 500, 2))
    blocked = analyse(folder, "--bootstrap", "500", "--seed", "2")[1]
    for run_id, row in whole.items():
        for column, value in row.items():
            if column.endswith(("_ci_low", "_ci_high")) and value is not None:
                assert blocked[run_id][column] == pytest.approx(value, rel=1e-12, abs=1e-12), (run_id, column)
    assert sum(column.endswith("_ci_low") and value is not None for column, value in blocked["B"].items()) > 10
