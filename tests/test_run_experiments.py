"""run_experiments.py end to end: every metric against brute-force numpy, grid/shards, resume, SIGKILL."""
import dataclasses
import glob
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

import run_experiments
from retrieval import indexes, precisions, reduction, two_stage
from retrieval.io import ranks_path
from retrieval.handoff import Embeddings, l2_normalize, make_attrs, write_embeddings

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def write_split(path, images, texts, text_to_image, split="test"):
    emb = Embeddings(l2_normalize(images), l2_normalize(texts), np.asarray(text_to_image),
                     [f"img{i}.jpg" for i in range(len(images))], [f"cap {i}" for i in range(len(texts))],
                     make_attrs("toy", split, "random", images.shape[1]))
    return write_embeddings(str(path), emb)


def random_file(path, num_images=40, dim=16, seed=0, noise=0.8, split="test"):
    rng = np.random.default_rng(seed)
    images = l2_normalize(rng.normal(size=(num_images, dim)))
    text_to_image = np.repeat(np.arange(num_images), 5)
    texts = images[text_to_image] + noise * rng.normal(size=(5 * num_images, dim))
    return write_split(path, images, texts, text_to_image, split)


def load_runs(output_dir):
    runs = []
    for path in sorted(glob.glob(os.path.join(output_dir, "runs", "*.json"))):
        with open(path) as f:
            runs.append(json.load(f))
    return runs


# ----------------------------------------------------------------------------- brute-force reference

def stable_order(scores, items):
    """items sorted by (-score, item): stable argsort of -score over items listed in index order."""
    items = np.sort(np.asarray(items))
    return items[np.argsort(-scores[items], kind="stable")]


def relevant_sets(text_to_image, direction):
    if direction == "t2i":
        return [{int(i)} for i in text_to_image]
    return [set(np.flatnonzero(text_to_image == i).tolist()) for i in range(int(text_to_image.max()) + 1)]


def first_hit(ranked, relevant):
    for position, item in enumerate(ranked, start=1):
        if int(item) in relevant:
            return position
    return np.inf


def reference_direction(queries, gallery, stage1_queries, stage1_gallery, relevant, k_values, config):
    """All metrics of one direction by plain loops: stage 1 on compressed scores, stage 2 in fp32."""
    max_k, n = max(k_values), gallery.shape[0]
    exact_scores, compressed_scores = queries @ gallery.T, stage1_queries @ stage1_gallery.T
    listed, implied, stage1_hits, exact_top, tops = [], [], [], [], []
    for q in range(queries.shape[0]):
        exact_full = stable_order(exact_scores[q], np.arange(n))
        exact_top.append(exact_full[:max_k])
        if config["candidate_size"] is None:
            ranked = exact_full
            full = exact_full
        else:
            compressed_full = stable_order(compressed_scores[q], np.arange(n))
            k_search = min(config["candidate_size"], n)
            stage1 = compressed_full[:k_search]
            stage1_hits.append(any(int(i) in relevant[q] for i in stage1))
            ranked = stable_order(exact_scores[q], stage1) if config["rerank"] else stable_order(compressed_scores[q], stage1)
            full = np.concatenate([ranked, [i for i in compressed_full if i not in set(stage1.tolist())]])
        tops.append(ranked[:max_k])
        listed.append(first_hit(ranked, relevant[q]))
        implied.append(first_hit(full, relevant[q]))
    listed, implied = np.array(listed, float), np.array(implied, float)
    out = {f"R@{k}": 100 * np.mean(listed <= k) for k in k_values}
    out["MRR"] = np.mean(1 / listed)
    out["mean_rank"], out["median_rank"] = np.mean(implied), np.median(implied)
    out["stage1_recall"] = None if config["candidate_size"] is None else 100 * np.mean(stage1_hits)
    for k in k_values:
        out[f"overlap@{k}"] = 100 * np.mean([len(set(t[:k].tolist()) & set(e[:k].tolist())) / k
                                             for t, e in zip(tops, exact_top)])
    return out


def reference_metrics(path, config, fit_path=None):
    """Recompute a result file's metrics from the hand-off file with numpy only (plus FAISS decoding)."""
    from retrieval.handoff import read_embeddings
    emb = read_embeddings(path)
    fit = read_embeddings(fit_path) if fit_path else emb
    projection = reduction.fit_reduction(np.concatenate([fit.image_embeddings, fit.text_embeddings]), config["dim"],
                                       config["dim_method"]) if config["dim"] < emb.dim else None
    images = reduction.reduce(emb.image_embeddings, projection)
    texts = reduction.reduce(emb.text_embeddings, projection)
    fit_images = reduction.reduce(fit.image_embeddings, projection)
    fit_texts = reduction.reduce(fit.text_embeddings, projection)
    k_values = config["k_values"]
    out = {}
    for direction, queries, gallery, fit_vectors in (("t2i", texts, images, fit_images), ("i2t", images, texts, fit_texts)):
        precision = config["precision"]
        if precision == "binary":
            stage1_queries, stage1_gallery = reduction.binary_signs(queries), reduction.binary_signs(gallery)
        elif precision == "fp32":
            stage1_queries, stage1_gallery = queries, gallery
        else:  # the FAISS codec decodes; the ranking itself is recomputed here
            pq_m = config["index_params"].get("pq_m")
            index, _ = indexes.build_index(precision, gallery, fit_vectors,
                                           params={"pq_subdim": config["dim"] // pq_m} if pq_m else None)
            stage1_queries, stage1_gallery = queries, index.reconstruct_n(0, index.ntotal)
        relevant = relevant_sets(emb.text_to_image, direction)
        got = reference_direction(queries, gallery, stage1_queries, stage1_gallery, relevant, k_values, config)
        base = reference_direction(queries, gallery, queries, gallery, relevant, k_values,
                                   {"candidate_size": None, "rerank": False})
        for key in [f"R@{k}" for k in k_values] + ["MRR"]:
            got[f"retention_{key}"] = 100 * got[key] / base[key] if base[key] else None
        out.update({f"{direction}_{k}": v for k, v in got.items()})
    out["RSUM"] = sum(out[f"{d}_R@{k}"] for d in ("t2i", "i2t") for k in k_values)
    return out


def assert_metrics_match(result, want):
    got = result["metrics"]
    assert set(want) <= set(got), set(want) - set(got)
    for key, value in want.items():
        if value is None:
            assert got[key] is None, key
        else:
            assert got[key] == pytest.approx(value, rel=1e-6, abs=1e-9), (key, result["config"])


# ----------------------------------------------------------------------------- tests

def test_every_metric_equals_brute_force(tmp_path):
    data = random_file(tmp_path / "toy.npz", num_images=40, dim=16)
    out = str(tmp_path / "result")
    run_experiments.main(["--data_path", data, "--output_dir", out, "--embedding_dims", "16", "8", "32",
                          "--precisions", "fp16", "int8", "int4", "binary", "--candidate_sizes", "4", "20", "300",
                          "--recall_k", "1", "5", "10", "--min_time", "0", "--latency_queries", "200",
                          "--num_workers", "2"])
    runs = load_runs(out)
    done = [r for r in runs if "skipped" not in r]
    skipped = [r for r in runs if "skipped" in r]
    # 2 usable dims x (baseline + 4 precisions x (no-rerank + 3 C)), and dim 32 all skipped.
    assert len(done) == 2 * (1 + 4 * 3) and len(runs) == 3 * (1 + 4 * 4)
    assert all("above the native" in r["skipped"] for r in skipped if r["config"]["dim"] == 32)
    assert any("below the largest K" in r["skipped"] for r in skipped if r["config"]["candidate_size"] == 4)
    for result in done:
        assert_metrics_match(result, reference_metrics(data, result["config"]))
    exact = [r for r in done if r["config"]["exact"]]
    assert len(exact) == 1 and exact[0]["config"]["dim"] == 16 and exact[0]["config"]["candidate_size"] is None
    int4 = next(r for r in done if r["config"]["precision"] == "int4" and r["config"]["dim"] == 16
                and r["config"]["candidate_size"] == 300)
    assert int4["memory"]["bytes_per_vector"] == 8 and int4["memory"]["compression_ratio"] == 8
    assert int4["speed"]["t2i_k_searched"] == 40 and int4["speed"]["i2t_k_searched"] == 200
    for key in ("t2i_search_qps", "i2t_rerank_qps", "t2i_latency_p95_ms", "t2i_build_s"):
        assert int4["speed"][key] > 0
    # 200 captions make p95 estimable (10 beyond it) but not p99 (it would need 1,000): null, and said.
    assert int4["speed"]["t2i_latency_queries"] == 200 and int4["speed"]["t2i_latency_p99_ms"] is None
    assert "p99 (needs 1000)" in int4["speed"]["t2i_latency_note"] and int4["speed"]["i2t_latency_p50_ms"] > 0
    assert int4["memory"]["t2i_index_bytes"] > 40 * 8 and int4["memory"]["peak_rss_bytes"] > 0
    assert int4["env"]["faiss"] and int4["data"]["dataset"] == "toy"
    assert int4["fit"]["source"].startswith("gallery")


@pytest.mark.slow
def test_pq_subdim_values_are_codes_of_their_own_and_match_brute_force(tmp_path):
    from retrieval.frame import completed, runs_frame
    from retrieval.runs import load_runs as load_run_files
    data = random_file(tmp_path / "toy.npz", num_images=300, dim=16, noise=0.5)
    out = str(tmp_path / "result")
    run_experiments.main(["--data_path", data, "--output_dir", out, "--precisions", "pq", "--index", "flat", "hnsw",
                          "--pq_subdim", "2", "8", "5", "4", "--hnsw_m", "8", "--candidate_sizes", "20",
                          "--recall_k", "1", "5", "--min_time", "0", "--latency_queries", "2", "--num_workers", "2"])
    runs = load_runs(out)
    pq = [r for r in runs if r["config"]["precision"] == "pq"]
    done, skipped = [r for r in pq if "skipped" not in r], [r for r in pq if "skipped" in r]
    # 3 usable sub-dims x 2 indexes x (no re-ranking, C = 20); 5 does not divide 16: one skipped record per index
    # for each candidate count, not one per value.
    assert len(done) == 3 * 2 * 2 and len(skipped) == 2 * 2
    assert all("pq_subdim=5" in r["skipped"] for r in skipped)
    assert sorted({r["config"]["index_params"]["pq_m"] for r in done}) == [2, 4, 8]
    for result in done:
        assert result["memory"]["bytes_per_vector"] == result["config"]["index_params"]["pq_m"]
        if result["config"]["index"] == "flat":  # HNSW ranks approximately; its full ranking is the flat twin's
            assert_metrics_match(result, reference_metrics(data, result["config"]))
    r1 = {r["config"]["index_params"]["pq_m"]: r["metrics"]["t2i_R@1"] for r in done
          if r["config"]["index"] == "flat" and not r["config"]["rerank"]}
    assert r1[8] > r1[2]  # 2 dims per 8-bit code keep far more than 8 dims per code
    frame = completed(runs_frame(load_run_files(out)))
    labels = frame[frame["precision"] == "pq"]["label"]
    assert labels.is_unique and "pq8x8 16d C=20 [hnsw M=8 ef_search=64]" in set(labels), sorted(labels)
    # The report and its plots take the codes apart too (the re-ranking plot draws a line per code).
    import analyze_results
    analyze_results.main(["--results_dir", out])
    assert glob.glob(os.path.join(out, "**", "candidates.png"), recursive=True)
    assert "pq2x8 16d" in open(os.path.join(out, "REPORT.md")).read()


def rq_args(data, out):
    """A sweep of `data` into `out`: int8, pq and rq codes of 2 and 4 sub-dims, flat and HNSW (no --max_code_bytes)."""
    return ["--data_path", data, "--output_dir", out, "--embedding_dims", "8", "--dim_method", "truncate",
            "--precisions", "int8", "pq", "rq", "--index", "flat", "hnsw", "--pq_subdim", "2", "4",
            "--hnsw_m", "8", "--candidate_sizes", "20", "--recall_k", "1", "5", "--min_time", "0",
            "--latency_queries", "2", "--num_workers", "2"]


@dataclasses.dataclass(frozen=True)
class CappedSweep:
    """rq_args' sweep of a 300-image file run with --max_code_bytes 4 into `out`."""
    data: str
    out: str
    runs: list[dict]   # every run record of the folder (load_runs)


@pytest.fixture(scope="module")
def capped_sweep(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("capped")
    data = random_file(tmp_path / "toy.npz", num_images=300, dim=16, noise=0.5)
    out = str(tmp_path / "result")
    run_experiments.main(rq_args(data, out) + ["--max_code_bytes", "4"])
    return CappedSweep(data, out, load_runs(out))


@pytest.mark.slow
def test_rq_codes_match_brute_force(capped_sweep):
    from retrieval.frame import completed, runs_frame
    from retrieval.runs import load_runs as load_run_files
    data, out, runs = capped_sweep.data, capped_sweep.out, capped_sweep.runs
    done = [r for r in runs if "skipped" not in r and r["config"]["precision"] != "fp32"]
    for result in done:
        if result["config"]["index"] == "flat":
            assert_metrics_match(result, reference_metrics(data, result["config"]))
    frame = completed(runs_frame(load_run_files(out)))
    assert "rq4x8 16d no rerank" in set(frame["label"]), sorted(frame["label"])


@pytest.mark.slow
def test_max_code_bytes_runs_only_the_codes_within_it(capped_sweep):
    runs = capped_sweep.runs
    done = [r for r in runs if "skipped" not in r and r["config"]["precision"] != "fp32"]
    skipped = [r for r in runs if "skipped" in r]
    # Codes of at most 4 B: 16 dims in 4 codes, 8 dims in 4 and in 2; int8 (8-16 B) and 16 dims in 8 codes are
    # left out. rq is flat only: its HNSW form is one skipped record per dim and candidate count.
    codes = sorted((r["config"]["precision"], r["config"]["index"], r["config"]["dim"],
                    r["config"]["index_params"]["pq_m"]) for r in done if not r["config"]["rerank"])
    assert codes == sorted([(p, i, d, m) for p in ("pq", "rq") for i in ("flat", "hnsw") for d, m in
                            ((16, 4), (8, 4), (8, 2)) if (p, i) != ("rq", "hnsw")]), codes
    assert len(skipped) == 2 * 2 and all("flat only" in r["skipped"] for r in skipped)
    for result in done:
        assert result["memory"]["bytes_per_vector"] == result["config"]["index_params"]["pq_m"] <= 4


@pytest.mark.slow
def test_a_sweep_without_max_code_bytes_runs_what_it_left_out_and_keeps_the_rest(capped_sweep, tmp_path):
    out = str(tmp_path / "result")
    shutil.copytree(capped_sweep.out, out)   # copy2: the run files keep their modification times
    common = rq_args(capped_sweep.data, out)
    # Without the cap the same folder runs what the cap left out (nothing was recorded for it) and keeps the rest.
    before = {os.path.basename(p): os.path.getmtime(p) for p in glob.glob(os.path.join(out, "runs", "*.json"))}
    run_experiments.main(common)
    after = load_runs(out)
    assert {r["config"]["index_params"].get("pq_m") for r in after if r["config"]["precision"] == "rq"
            and "skipped" not in r} == {2, 4, 8}
    assert any(r["config"]["precision"] == "int8" and "skipped" not in r for r in after)
    assert all(os.path.getmtime(os.path.join(out, "runs", name)) == mtime for name, mtime in before.items())


def test_several_dim_methods_are_configurations_of_their_own_and_match_brute_force(tmp_path):
    data = random_file(tmp_path / "toy.npz", num_images=40, dim=16)
    out = str(tmp_path / "result")
    run_experiments.main(["--data_path", data, "--output_dir", out, "--embedding_dims", "16", "8",
                          "--dim_method", "truncate", "pca", "random", "truncate", "--precisions", "int8", "binary",
                          "--candidate_sizes", "20", "--recall_k", "1", "5", "--min_time", "0",
                          "--latency_queries", "2", "--num_workers", "1"])
    runs = [r for r in load_runs(out) if "skipped" not in r]
    methods = {(r["config"]["dim"], r["config"]["dim_method"]) for r in runs}
    # The native dim once (nothing to reduce), the reduced dim once per method (a repeated method once).
    assert methods == {(16, "none"), (8, "truncate"), (8, "pca"), (8, "random")}
    assert len(runs) == 4 * (1 + 2 * 2)
    for result in runs:
        assert_metrics_match(result, reference_metrics(data, result["config"]))
    reduced = [r for r in runs if r["config"]["dim"] == 8 and r["config"]["precision"] == "fp32"]
    assert len({r["metrics"]["t2i_MRR"] for r in reduced}) == 3  # three projections, three different rankings
    by_method = {r["config"]["dim_method"]: r["metrics"]["t2i_R@1"] for r in reduced}
    # The report compares the methods at the dim: the best one against each other, paired over the same queries.
    import analyze_results
    summary = analyze_results.main(["--results_dir", out, "--bootstrap", "200", "--no_plots"])
    (group,) = summary["groups"]
    rows = group["dim_methods"]
    order = sorted(by_method, key=lambda m: (-by_method[m], m))  # best first, ties by name
    best = order[0]
    assert [(r["best_method"], r["other_method"]) for r in rows] == [(best, m) for m in order[1:]]
    for row in rows:
        assert row["difference"] == pytest.approx(by_method[best] - by_method[row["other_method"]])
        assert row["difference_ci_low"] <= row["difference_ci_high"]
    report_text = open(os.path.join(out, "REPORT.md")).read()
    assert f"At 8 dims (fp32, no re-ranking) {best} gives t2i R@1" in report_text


def test_ties_and_fit_path_match_brute_force(tmp_path):
    # Few distinct unit vectors, many exact duplicates: ties everywhere, in every direction. Entries
    # are 0 or +-0.5 (four non-zeros), so every dot product is exact whatever the summation order
    # of the BLAS kernel: the ties are real ties, not float noise.
    rng = np.random.default_rng(3)
    patterns = np.zeros((6, 8), dtype=np.float32)
    for row in patterns:
        row[rng.choice(8, 4, replace=False)] = rng.choice([-0.5, 0.5], 4)
    images = patterns[rng.integers(0, 6, size=12)]
    text_to_image = np.repeat(np.arange(12), 5)
    texts = patterns[rng.integers(0, 6, size=60)]
    data = write_split(tmp_path / "ties.h5", images, texts, text_to_image)
    fit = random_file(tmp_path / "train.h5", num_images=60, dim=8, seed=5, split="train")
    out = str(tmp_path / "result")
    # C >= gallery: stage 1 returns everything, so the order is fully decided by the protocol;
    # binary (IndexBinaryFlat keeps the lower index on ties) is also checked without re-ranking.
    run_experiments.main(["--data_path", data, "--fit_path", fit, "--output_dir", out, "--precisions", "fp16",
                          "int8", "binary", "--candidate_sizes", "64", "--recall_k", "1", "3", "10",
                          "--min_time", "0", "--latency_queries", "2", "--num_workers", "1"])
    checked = 0
    for result in load_runs(out):
        config = result["config"]
        if config["precision"] in ("fp16", "int8") and not config["rerank"] and config["candidate_size"]:
            continue
        assert_metrics_match(result, reference_metrics(data, config, fit_path=fit))
        assert result["fit"]["source"] == "--fit_path"
        checked += 1
    assert checked == 1 + 2 + 2


def shard_args(data, out):
    """A small sweep of `data` into `out`: dims 8 and 64 (64 is above the native 16: skipped records), two
    codecs, two candidate counts."""
    return ["--data_path", data, "--output_dir", out, "--embedding_dims", "8", "64", "--precisions", "int8",
            "binary", "--candidate_sizes", "5", "30", "--recall_k", "1", "5", "--min_time", "0",
            "--latency_queries", "2", "--num_workers", "1"]


@dataclasses.dataclass(frozen=True)
class ShardedSweep:
    """shard_args' sweep run as shard 1 of 3, then resumed whole, into one folder (`out`, finished)."""
    data: str                  # the hand-off file: 20 images, dim 16
    out: str
    full: list[str]            # the run files of the whole grid, as its dry run lists them
    shards: list[list[str]]    # the run files of each of the 3 shards, as their dry runs list them
    written: list[str]         # what shard 1 wrote
    rest: list[str]            # what the whole sweep then wrote into the same folder


@pytest.fixture(scope="module")
def sharded_sweep(tmp_path_factory):
    """One sharded-then-resumed sweep for the module's resume tests (tests that change it use finished_sweep)."""
    tmp_path = tmp_path_factory.mktemp("shards")
    data = random_file(tmp_path / "toy.npz", num_images=20, dim=16)
    out = str(tmp_path / "result")
    common = shard_args(data, out)
    full = run_experiments.main(common + ["--dry_run"])
    shards = [run_experiments.main(common + ["--dry_run", "--shard", f"{i}/3"]) for i in range(3)]
    written = run_experiments.main(common + ["--shard", "1/3"])
    rest = run_experiments.main(common)  # resumes: only what shard 1 did not do
    return ShardedSweep(data, out, full, shards, written, rest)


@pytest.fixture
def finished_sweep(sharded_sweep, tmp_path):
    """A copy of sharded_sweep's finished folder for a test to change: (its sweep arguments, its run files)."""
    out = str(tmp_path / "result")
    shutil.copytree(sharded_sweep.out, out)  # copy2: the run files keep their modification times
    common = shard_args(sharded_sweep.data, out)
    return common, run_experiments.main(common + ["--dry_run"])


def test_shards_of_a_dry_run_partition_the_grid(sharded_sweep):
    full, shards = sharded_sweep.full, sharded_sweep.shards
    assert sorted(sum(shards, [])) == sorted(full) and len(set(full)) == len(full)
    assert all(not set(a) & set(b) for i, a in enumerate(shards) for b in shards[i + 1:])


def test_a_dry_run_writes_nothing(tmp_path):
    data = random_file(tmp_path / "toy.npz", num_images=20, dim=16)
    out = str(tmp_path / "result")
    common = shard_args(data, out)
    run_experiments.main(common + ["--dry_run"])
    run_experiments.main(common + ["--dry_run", "--shard", "1/3"])
    assert not os.path.exists(os.path.join(out, "runs"))  # a dry run writes nothing


def test_a_shard_writes_only_its_block(sharded_sweep):
    written, shards = sharded_sweep.written, sharded_sweep.shards
    assert sorted(written) == sorted(shards[1])


def test_the_whole_sweep_after_a_shard_runs_only_the_rest(sharded_sweep):
    rest, full, shards = sharded_sweep.rest, sharded_sweep.full, sharded_sweep.shards
    assert sorted(rest) == sorted(set(full) - set(shards[1]))


def test_a_finished_sweep_reruns_nothing(finished_sweep):
    common, _ = finished_sweep
    assert run_experiments.main(common) == []


def test_a_deleted_run_file_is_the_only_one_redone(finished_sweep):
    common, full = finished_sweep
    os.remove(full[0])
    assert run_experiments.main(common) == [full[0]]


def test_overwrite_redoes_every_run(finished_sweep):
    common, full = finished_sweep
    before = os.path.getmtime(full[1])
    time.sleep(0.01)
    assert sorted(run_experiments.main(common + ["--overwrite"])) == sorted(full)
    assert os.path.getmtime(full[1]) > before


def test_a_shard_index_past_the_count_is_refused(tmp_path):
    common = shard_args(random_file(tmp_path / "toy.npz", num_images=20, dim=16), str(tmp_path / "result"))
    with pytest.raises(SystemExit):
        run_experiments.main(common + ["--shard", "3/3"])


def test_another_fit_set_into_the_same_folder_is_refused_before_anything_is_written(finished_sweep, tmp_path):
    common, full = finished_sweep
    # Another fit set into the same folder: one error line naming a run file, before anything is written.
    other_fit = random_file(tmp_path / "other_fit.npz", num_images=20, dim=16, seed=1)
    os.remove(full[0])
    stamps = {p: os.path.getmtime(p) for p in full[1:]}
    with pytest.raises(SystemExit, match=r"\.json: fitted on .*toy\.npz, this sweep fits on .*other_fit\.npz"):
        run_experiments.main(common + ["--fit_path", other_fit])
    assert not os.path.exists(full[0]) and stamps == {p: os.path.getmtime(p) for p in full[1:]}


def interrupted_sweep(tmp_path):
    """(data file, output folder, arguments) of a sweep long enough to be stopped part way (60 images, 24
    configurations of a few hundred ms each)."""
    data = random_file(tmp_path / "toy.npz", num_images=60, dim=32)
    out = str(tmp_path / "result")
    return data, out, ["--data_path", data, "--output_dir", out, "--embedding_dims", "32", "16", "8", "--precisions",
                       "fp16", "int8", "int4", "binary", "--candidate_sizes", "10", "50", "--recall_k", "1", "5",
                       "--min_time", "0.05", "--latency_queries", "20", "--num_workers", "1", "--threads", "1"]


@pytest.mark.slow
def test_sigkill_mid_sweep_then_rerun_completes(tmp_path):
    data, out, args = interrupted_sweep(tmp_path)
    expected = run_experiments.main(args + ["--dry_run"])
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (ROOT, os.environ.get("PYTHONPATH")) if p))
    process = subprocess.Popen([sys.executable, os.path.join(ROOT, "run_experiments.py")] + args, cwd=ROOT, env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    runs_dir = os.path.join(out, "runs")
    deadline = time.time() + 120
    while time.time() < deadline and len(glob.glob(os.path.join(runs_dir, "*.json"))) < 3:
        time.sleep(0.02)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    partial = glob.glob(os.path.join(runs_dir, "*.json"))
    assert 3 <= len(partial) < len(expected), "the kill should land mid-sweep"
    subprocess.run([sys.executable, os.path.join(ROOT, "run_experiments.py")] + args, cwd=ROOT, env=env, check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=300)
    final = sorted(glob.glob(os.path.join(runs_dir, "*.json")))
    assert final == sorted(expected)
    configs = set()
    for path in final:
        with open(path) as f:
            result = json.load(f)  # every file is complete JSON
        configs.add(json.dumps(result["config"], sort_keys=True))
    assert len(configs) == len(final)  # no configuration twice


@dataclasses.dataclass(frozen=True)
class PaddedSweeps:
    """Two sweeps of a 30-image file into one folder over flat, IVF and HNSW indexes: gallery sizes 30, 300 and
    10 padded with Gaussian distractors, then 100 and 200 padded from an 80-image file (`other`)."""
    other: str
    runs: list[dict]   # every run record of the folder (load_runs)


@pytest.fixture(scope="module")
def padded_sweeps(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("padded")
    data = random_file(tmp_path / "toy.npz", num_images=30, dim=16, noise=1.2)
    other = random_file(tmp_path / "other.npz", num_images=80, dim=16, seed=9, split="val")
    out = str(tmp_path / "result")
    common = ["--data_path", data, "--output_dir", out, "--precisions", "fp32", "int8", "--candidate_sizes", "20",
              "--recall_k", "1", "5", "--min_time", "0", "--latency_queries", "2", "--index", "flat", "ivf", "hnsw",
              "--nlist", "4", "--nprobe", "4", "--num_workers", "1"]
    run_experiments.main(common + ["--gallery_sizes", "30", "300", "10"])
    run_experiments.main(common + ["--gallery_sizes", "100", "200", "--distractors", other])
    return PaddedSweeps(other, load_runs(out))


def exact_runs_by_gallery(runs):
    """{(gallery size, distractor source or None): the completed fp32 exact run}."""
    return {(r["config"]["gallery_size"],
             str(r["config"]["distractors"]["source"]) if r["config"]["distractors"] else None): r
            for r in runs if r["config"]["exact"] and "skipped" not in r}


def test_gaussian_distractors_pad_the_gallery_and_make_retrieval_harder(padded_sweeps):
    exact = exact_runs_by_gallery(padded_sweeps.runs)
    small, large = exact[(30, None)], exact[(300, "gaussian")]
    assert large["config"]["distractors"]["count"] == 270
    assert large["metrics"]["t2i_R@5"] <= small["metrics"]["t2i_R@5"]
    assert large["metrics"]["t2i_mean_rank"] >= small["metrics"]["t2i_mean_rank"]
    assert large["memory"]["t2i_index_bytes"] > small["memory"]["t2i_index_bytes"]


def test_distractors_from_a_file_pad_the_gallery_up_to_its_rows(padded_sweeps):
    runs, other = padded_sweeps.runs, padded_sweeps.other
    exact = exact_runs_by_gallery(runs)
    large = exact[(300, "gaussian")]
    from_file = exact[(100, str([os.path.normpath(other)]))]
    assert from_file["config"]["distractors"]["count"] == 70
    assert large["config"]["distractors"]["synthetic"] and not from_file["config"]["distractors"]["synthetic"]
    too_many = [r for r in runs if r["config"]["gallery_size"] == 200]
    assert too_many and all("has only 80 rows" in r["skipped"] for r in too_many)


def test_a_gallery_size_below_the_real_gallery_is_skipped(padded_sweeps):
    runs = padded_sweeps.runs
    assert all("below the real gallery" in r["skipped"] for r in runs if r["config"]["gallery_size"] == 10)


def test_approximate_indexes_find_no_more_than_their_stage1_recall(padded_sweeps):
    runs = padded_sweeps.runs
    approximate = [r for r in runs if r["config"]["index"] in ("ivf", "hnsw") and "skipped" not in r]
    assert {r["config"]["index"] for r in approximate} == {"ivf", "hnsw"}
    assert {r["config"]["precision"] for r in approximate} == {"fp32", "int8"}
    for r in approximate:
        assert 0 < r["metrics"]["t2i_stage1_recall"] <= 100
        assert r["metrics"]["t2i_R@5"] <= r["metrics"]["t2i_stage1_recall"] + 1e-9


def test_bad_input_names_the_file(tmp_path, capsys):
    missing = str(tmp_path / "missing.h5")
    with pytest.raises(SystemExit, match="missing.h5: file not found"):
        run_experiments.main(["--data_path", missing, "--output_dir", str(tmp_path / "r")])
    with pytest.raises(SystemExit):
        run_experiments.main(["--data_path", missing, "--recall_k", "0"])
    assert not os.path.exists(tmp_path / "r")


# ----------------------------------------------------------------------------- rank files, knob curves

def rank_sweep_args(data, out):
    """A small sweep of `data` into `out`: the native dim and 8, two codecs, C = 5."""
    return ["--data_path", data, "--output_dir", out, "--embedding_dims", "8", "--precisions", "int8", "binary",
            "--candidate_sizes", "5", "--recall_k", "1", "5", "--min_time", "0", "--latency_queries", "2",
            "--num_workers", "1"]


@dataclasses.dataclass(frozen=True)
class RankedSweep:
    """rank_sweep_args' sweep of a 30-image file, finished in `out`."""
    data: str
    out: str
    written: list[str]   # the run files it wrote, in grid order


@pytest.fixture(scope="module")
def ranked_sweep(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("ranks")
    data = random_file(tmp_path / "toy.npz", num_images=30, dim=16)
    out = str(tmp_path / "result")
    return RankedSweep(data, out, run_experiments.main(rank_sweep_args(data, out)))


def copy_of_ranked_sweep(ranked_sweep, tmp_path):
    """A copy of the ranked sweep's folder for a test to change: (its sweep arguments, its folder, its run files)."""
    out = str(tmp_path / "result")
    shutil.copytree(ranked_sweep.out, out)
    return (rank_sweep_args(ranked_sweep.data, out), out,
            [os.path.join(out, "runs", os.path.basename(p)) for p in ranked_sweep.written])


def test_rank_files_reproduce_every_run(ranked_sweep):
    from retrieval import io, metrics
    from retrieval.handoff import read_embeddings
    data, written = ranked_sweep.data, ranked_sweep.written
    text_to_image = read_embeddings(data).text_to_image
    completed = 0
    for path in written:
        record = json.load(open(path))
        if "skipped" in record:
            assert not os.path.exists(io.ranks_path(path))
            continue
        completed += 1
        assert record["ranks_file"] == os.path.basename(io.ranks_path(path))
        ranks = io.read_ranks(io.ranks_path(path))
        np.testing.assert_array_equal(ranks["text_to_image"], text_to_image)
        assert ranks["t2i"].shape == (150,) and ranks["i2t"].shape == (30,)
        for direction in ("t2i", "i2t"):
            again = metrics.summarize(ranks[direction], [1, 5])
            for key in ("R@1", "R@5", "MRR"):
                assert again[key] == record["metrics"][f"{direction}_{key}"], (path, direction, key)
        expected_total = record["memory"]["bytes_per_vector"] + (4 * record["config"]["dim"]
                                                                 if record["config"]["rerank"] else 0)
        assert record["memory"]["total_bytes_per_vector"] == expected_total
    assert completed >= 6


def test_a_run_whose_rank_file_is_gone_is_the_only_one_redone(ranked_sweep, tmp_path):
    from retrieval import io
    common, _, written = copy_of_ranked_sweep(ranked_sweep, tmp_path)
    # A run whose rank file is gone is redone (JSON and rank file), and nothing else is.
    victim = next(p for p in written if "ranks_file" in json.load(open(p)))
    os.remove(io.ranks_path(victim))
    assert run_experiments.main(common) == [victim]
    assert os.path.exists(io.ranks_path(victim))


def test_a_temp_rank_file_left_by_a_killed_run_is_removed_on_the_next_start(ranked_sweep, tmp_path):
    common, out, _ = copy_of_ranked_sweep(ranked_sweep, tmp_path)
    # A temp rank file a killed run left behind is removed on the next start.
    stale = os.path.join(out, "runs", ".dead.ranks.abc.tmp.npz")
    open(stale, "wb").close()
    os.utime(stale, (time.time() - 3600, time.time() - 3600))
    run_experiments.main(common)
    assert not os.path.exists(stale)


def test_knob_lists_give_one_config_each_and_build_each_index_once(tmp_path, monkeypatch):
    from retrieval import grid
    data = random_file(tmp_path / "toy.npz", num_images=60, dim=16)
    builds = []
    real_build = indexes.build_index

    def counting_build(precision, gallery, fit_vectors, index_type="flat", params=None, coarse=None):
        knob = {"ivf": params.get("nlist"), "hnsw": params.get("hnsw_m")}.get(index_type)
        builds.append((precision, index_type, knob))
        return real_build(precision, gallery, fit_vectors, index_type, params, coarse)

    monkeypatch.setattr(indexes, "build_index", counting_build)
    out = str(tmp_path / "result")
    args = ["--data_path", data, "--output_dir", out, "--precisions", "int8", "--index", "ivf", "hnsw",
            "--nlist", "4", "8", "--nprobe", "1", "2", "4", "--hnsw_m", "8", "--ef_search", "16", "32",
            "--candidate_sizes", "10", "--recall_k", "1", "5", "--min_time", "0", "--latency_queries", "2",
            "--num_workers", "1", "--directions", "t2i"]
    written = run_experiments.main(args)
    records = [json.load(open(p)) for p in written]
    ivf = [r["config"] for r in records if r["config"]["index"] == "ivf"]
    hnsw = [r["config"] for r in records if r["config"]["index"] == "hnsw"]
    # 2 nlist x 3 nprobe (x no-rerank + C=10) and 1 M x 2 efSearch (x 2): one configuration each.
    assert sorted({(c["index_params"]["nlist"], c["index_params"]["nprobe"]) for c in ivf}) == \
        [(n, p) for n in (4, 8) for p in (1, 2, 4)]
    assert len(ivf) == 12 and len(hnsw) == 4 and len(set(written)) == len(written)
    assert all(f"-np{c['index_params']['nprobe']}-" in os.path.basename(p) for p, c in
               zip([p for p, r in zip(written, records) if r["config"]["index"] == "ivf"], ivf))
    # Built once per build-time knob and direction: 2 IVF (nlist 4, 8), 1 HNSW (M 8), and the fp32 baseline.
    assert sorted(builds) == sorted([("fp32", "flat", None), ("int8", "ivf", 4), ("int8", "ivf", 8),
                                     ("int8", "hnsw", 8)])
    # More probes can only find more: stage-1 recall does not fall as nprobe grows (one index per nlist).
    for nlist in (4, 8):
        reranked = sorted((r["config"]["index_params"]["nprobe"], r["metrics"]["t2i_stage1_recall"]) for r in records
                          if r["config"]["index"] == "ivf" and r["config"]["rerank"]
                          and r["config"]["index_params"]["nlist"] == nlist)
        assert [p for p, _ in reranked] == [1, 2, 4]
        assert [v for _, v in reranked] == sorted(v for _, v in reranked)
    assert grid.knob_label(ivf[0]).startswith("nl")


def test_query_transform_is_its_own_timed_stage_and_search_excludes_binarising(tmp_path, monkeypatch):
    from retrieval import timing
    data = random_file(tmp_path / "toy.npz", num_images=40, dim=16)
    calls = {"sign_bits": 0}
    real_sign_bits, real_time_rounds = reduction.sign_bits, timing.time_rounds
    stages = []

    def counting_sign_bits(*args, **kwargs):
        calls["sign_bits"] += 1
        return real_sign_bits(*args, **kwargs)

    def counted(name, step):
        def run(i):
            before = calls["sign_bits"]
            step(i)
            stages.append((name, calls["sign_bits"] - before))
        return run

    def recording_time_rounds(steps, reference, *args, **kwargs):
        return real_time_rounds({name: counted(name, step) for name, step in steps.items()},
                                counted("reference", reference), *args, **kwargs)

    monkeypatch.setattr(two_stage, "sign_bits", counting_sign_bits)
    monkeypatch.setattr(timing, "time_rounds", recording_time_rounds)
    out = str(tmp_path / "result")
    written = run_experiments.main(["--data_path", data, "--output_dir", out, "--embedding_dims", "8",
                                    "--precisions", "fp16", "binary", "--candidate_sizes", "10", "--recall_k", "1",
                                    "--min_time", "0", "--rounds", "2", "--latency_queries", "2",
                                    "--num_workers", "1", "--directions", "t2i"])
    speeds = {(r["config"]["precision"], r["config"]["dim"], r["config"]["candidate_size"]): r["speed"]
              for r in map(lambda p: json.load(open(p)), written) if "speed" in r}
    # fp16 at the native dim: nothing to do to a query; binary, or any reduced dim: a transform stage.
    assert speeds[("fp16", 16, 1)]["t2i_transform_qps"] is None
    for key in (("binary", 16, 1), ("binary", 8, 10), ("fp16", 8, 10)):
        speed = speeds[key]
        assert speed["t2i_transform_qps"] > 0 and speed["t2i_search_qps"] > 0
        # End to end per round is the stages' seconds added; the speed is the median over rounds.
        rounds = np.array(speed["t2i_round_qps"])
        assert speed["t2i_rounds"] == rounds.size >= 2 and speed["t2i_qps"] == pytest.approx(np.median(rounds))
        assert speed["t2i_qps_ci_low"] <= speed["t2i_qps"] <= speed["t2i_qps_ci_high"]
        # A round's end to end is slower than its slowest stage alone.
        assert speed["t2i_qps"] <= max(speed[f"t2i_{s}_qps"] for s in ("transform", "search", "rerank", "sort")
                                       if speed.get(f"t2i_{s}_qps"))
        assert speed["t2i_search_qps_spread_pct"] >= 0
    # Binarising the queries happens in the transform stage of the 4 binary configurations (2 dims x 2
    # candidate settings), never while the index searches, in the second stage, nor in the fp32 reference.
    assert {name for name, _ in stages} == {"transform", "search", "sort", "rerank", "reference"}
    assert sum(1 for name, n in stages if name == "transform" and n > 0) >= 4
    assert all(n == 0 for name, n in stages if name != "transform")
    assert speeds[("binary", 16, 1)]["blas_threads"] == timing.BLAS_THREADS


# ----------------------------------------------------------------------------- distractors

def sweep_inputs(argv, pool):
    """(settings, files, fits, distractors) as run_experiments.main loads them."""
    from retrieval import inputs
    args, settings, _ = run_experiments.parse_args(argv)
    return (settings, *inputs.load_inputs(settings, args.data_path, args.fit_path, pool))


def first_group(settings, files, fits, distractors, pool):
    """The Group of the grid's first configuration (the fp32 exact run of the first gallery size)."""
    from retrieval.grid import build_grid
    from retrieval.group import Group
    from retrieval.env import pick_device
    config, skip, _ = build_grid(settings, files, fits)[0]
    return config, skip, Group(settings, files[0][1], fits[0], config, distractors[0], pool, pick_device("cpu"))


def test_distractor_files_pad_in_the_order_given_and_split_names_the_sibling(tmp_path):
    import concurrent.futures
    from retrieval import inputs
    from retrieval.errors import UserError
    from retrieval.handoff import read_embeddings
    data = random_file(tmp_path / "toy_test.npz", num_images=20, dim=16)
    train = random_file(tmp_path / "toy_train.npz", num_images=7, dim=16, seed=3, split="train")
    extra = random_file(tmp_path / "extra.npz", num_images=6, dim=16, seed=4)
    paths = [os.path.normpath(train), os.path.normpath(extra)]
    argv = ["--data_path", data, "--gallery_sizes", "30", "--distractors", "split:train", extra]
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        settings, files, fits, distractors = sweep_inputs(argv, pool)
        config, skip, group = first_group(settings, files, fits, distractors, pool)
    assert config["distractors"] == {"source": paths, "synthetic": False, "count": 10} and skip is None
    assert fits[0].distractor_paths == paths and fits[0].distractor_rows == 13  # 7 + 6 images bound both
    real, first, second = (read_embeddings(p) for p in (data, train, extra))
    # 10 image rows: the sibling train file's 7, then 3 of the next file; 10 caption rows: the train file's.
    want_images = np.concatenate([real.image_embeddings, first.image_embeddings, second.image_embeddings])[:30]
    want_texts = np.concatenate([real.text_embeddings, first.text_embeddings, second.text_embeddings])[:110]
    np.testing.assert_array_equal(group.directions["t2i"].gallery, want_images)
    np.testing.assert_array_equal(group.directions["i2t"].gallery, want_texts)
    assert inputs.sibling_split(os.path.join("coco_data", "flickr8k", "dual-x-d512_test.h5"), "train") == \
        os.path.join("coco_data", "flickr8k", "dual-x-d512_train.h5")
    with pytest.raises(UserError, match="needs a file named <name>_<split>"):
        inputs.sibling_split(os.path.join("coco_data", "embeddings.npz"), "train")
    # A gallery the files cannot fill is skipped with its reason; the one they can is run from them.
    out = str(tmp_path / "result")
    written = run_experiments.main(["--data_path", data, "--output_dir", out, "--gallery_sizes", "30", "40",
                                    "--distractors", "split:train", extra, "--precisions", "fp32", "--candidate_sizes",
                                    "--recall_k", "1", "--min_time", "0", "--latency_queries", "2",
                                    "--num_workers", "1"])
    runs = {r["config"]["gallery_size"]: r for r in (json.load(open(p)) for p in written)}
    assert sorted(runs) == [30, 40] and "skipped" not in runs[30]
    assert runs[40]["skipped"] == f"distractor files {paths[0]} + {paths[1]} have only 13 rows, 20 needed"


@pytest.mark.parametrize("distractors, message", [
    (["split:test"], "{data}: --distractors split:test is the evaluated file itself"),
    (["split:val"], "{val}: file not found"),
    (["gaussian", "{other}"], "--distractors: 'gaussian' cannot be mixed with files"),
    (["{other}", "{narrow}"], "{narrow}: dim 8 != {data} dim 16"),
])
def test_bad_distractors_are_one_error_line_naming_the_file(tmp_path, distractors, message):
    names = {"data": random_file(tmp_path / "toy_test.npz", num_images=20, dim=16),
             "val": os.path.normpath(str(tmp_path / "toy_val.npz")),
             "other": random_file(tmp_path / "other.npz", num_images=20, dim=16, seed=1),
             "narrow": os.path.normpath(random_file(tmp_path / "narrow.npz", num_images=20, dim=8, seed=2))}
    out = tmp_path / "result"
    with pytest.raises(SystemExit) as raised:
        run_experiments.main(["--data_path", names["data"], "--output_dir", str(out), "--gallery_sizes", "30",
                              "--distractors", *[d.format(**names) for d in distractors]])
    shown = str(raised.value)
    assert shown.startswith("error: " + message.format(**names)) and "\n" not in shown
    assert not out.exists()


def test_ood_gap_equals_numpy_on_the_padded_image_gallery(tmp_path):
    from retrieval import inputs
    from retrieval.handoff import read_embeddings
    data = random_file(tmp_path / "toy_test.npz", num_images=20, dim=16)
    extra = random_file(tmp_path / "extra.npz", num_images=30, dim=16, seed=5)
    out = str(tmp_path / "result")
    written = run_experiments.main(["--data_path", data, "--output_dir", out, "--gallery_sizes", "20", "45",
                                    "--distractors", extra, "--embedding_dims", "8", "--precisions", "fp32", "int8",
                                    "--candidate_sizes", "--recall_k", "1", "--min_time", "0",
                                    "--latency_queries", "2", "--num_workers", "1"])
    runs = [json.load(open(p)) for p in written]
    with_ood = [r for r in runs if "ood" in r.get("metrics", {})]
    # Once per padded group (dims 16 and 8), on its fp32 exact run; never on the real gallery nor on int8.
    assert sorted((r["config"]["dim"], r["config"]["gallery_size"]) for r in with_ood) == [(8, 45), (16, 45)]
    assert all(r["config"]["precision"] == "fp32" and r["config"]["candidate_size"] is None for r in with_ood)
    assert any(r["config"]["precision"] == "int8" and r["config"]["gallery_size"] == 45 for r in runs)
    real, pad = read_embeddings(data), read_embeddings(extra)
    gallery = np.concatenate([real.image_embeddings, pad.image_embeddings[:25]]).astype(np.float64)
    text = (real.text_embeddings.astype(np.float64) @ gallery.T).max(axis=1).mean()
    image_scores = real.image_embeddings.astype(np.float64) @ gallery.T
    np.fill_diagonal(image_scores[:, :20], -np.inf)  # an image is not its own neighbour
    image = image_scores.max(axis=1).mean()
    (native,) = [r for r in with_ood if r["config"]["dim"] == 16]
    assert native["metrics"]["ood"] == pytest.approx(
        {"text_top1_cosine": text, "image_top1_cosine": image, "gap": image - text}, abs=1e-5)
    assert image > text  # the modality gap: texts sit farther from the images than the images from each other
    # Chunks that cut through the excluded diagonal give the same numbers as one block.
    rng = np.random.default_rng(0)
    queries, rows = l2_normalize(rng.normal(size=(7, 5))), l2_normalize(rng.normal(size=(11, 5)))
    rows[:7] = queries
    direct = queries @ rows.T
    np.fill_diagonal(direct, -np.inf)
    np.testing.assert_allclose(inputs.top1_cosines(queries, rows, 3, exclude_own=True), direct.max(axis=1), rtol=1e-6)
    np.testing.assert_allclose(inputs.top1_cosines(queries, rows, 2), (queries @ rows.T).max(axis=1), rtol=1e-6)


def test_only_the_directions_that_run_get_distractors(tmp_path, monkeypatch):
    import concurrent.futures
    from retrieval import inputs
    data = random_file(tmp_path / "toy_test.npz", num_images=20, dim=16)
    extra = random_file(tmp_path / "extra.npz", num_images=6, dim=16, seed=4)  # 6 images, 30 captions
    made = []
    real_gaussian_like = inputs.gaussian_like

    def recording_gaussian_like(vectors, count, rng):
        made.append((vectors.shape[0], count))
        return real_gaussian_like(vectors, count, rng)

    monkeypatch.setattr(inputs, "gaussian_like", recording_gaussian_like)
    run_experiments.main(["--data_path", data, "--output_dir", str(tmp_path / "result"), "--gallery_sizes", "45",
                          "--embedding_dims", "8", "--precisions", "fp32", "--candidate_sizes", "--recall_k", "1",
                          "--min_time", "0", "--latency_queries", "2", "--num_workers", "1", "--directions", "t2i"])
    # One group per dim (16, 8), each padding its image gallery from the fit images (20 rows): no caption
    # distractors (the fit set's 100 captions) were made.
    assert made == [(20, 25), (20, 25)]
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        galleries = {}
        for directions in (["t2i"], ["i2t"], ["t2i", "i2t"]):
            argv = ["--data_path", data, "--gallery_sizes", "30", "--directions", *directions]
            settings, files, fits, distractors = sweep_inputs(argv + ["--distractors", extra], pool)
            # File rows: only the modalities of the directions that run are gathered, and only they bound the count.
            assert set(distractors[0]) == {inputs.GALLERY_ROWS[d][0] for d in directions}
            assert fits[0].distractor_rows == min({"t2i": 6, "i2t": 30}[d] for d in directions)
            settings, files, fits, distractors = sweep_inputs(argv, pool)
            _, _, group = first_group(settings, files, fits, distractors, pool)
            assert list(group.directions) == directions
            galleries[tuple(directions)] = {d: group.directions[d].gallery for d in directions}
    # Gaussian distractors of a direction do not depend on which other directions run.
    for direction in ("t2i", "i2t"):
        np.testing.assert_array_equal(galleries[(direction,)][direction], galleries[("t2i", "i2t")][direction])


# ----------------------------------------------------------------------------- --max_queries (query sample)

def sample_of(text_to_image, n, seed):
    """The documented rule, written out: n images drawn by numpy default_rng(seed) without replacement,
    ascending, and every caption of each."""
    images = np.sort(np.random.default_rng(seed).choice(int(text_to_image.max()) + 1, size=n, replace=False))
    return images, np.flatnonzero(np.isin(text_to_image, images))


def stage1_vectors(precision, queries, gallery):
    """The vectors stage 1 scores with (as reference_metrics: FAISS decodes, numpy ranks)."""
    if precision == "binary":
        return reduction.binary_signs(queries), reduction.binary_signs(gallery)
    if precision == "fp32":
        return queries, gallery
    index, _ = indexes.build_index(precision, gallery, gallery)
    return queries, index.reconstruct_n(0, index.ntotal)


def sampled_reference(emb, config, images, captions):
    """reference_metrics of the sampled queries against the whole gallery (native dim, no distractors)."""
    t2i, out = emb.text_to_image, {}
    for direction, queries, gallery, relevant in (
            ("t2i", emb.text_embeddings[captions], emb.image_embeddings, [{int(t2i[c])} for c in captions]),
            ("i2t", emb.image_embeddings[images], emb.text_embeddings,
             [set(np.flatnonzero(t2i == i).tolist()) for i in images])):
        got = reference_direction(queries, gallery, *stage1_vectors(config["precision"], queries, gallery), relevant,
                                  config["k_values"], config)
        out.update({f"{direction}_{k}": v for k, v in got.items()})
    return out


def test_query_sample_keeps_whole_images_and_follows_the_seed():
    from retrieval import inputs
    rng = np.random.default_rng(0)
    # 1 to 6 captions per image, captions in shuffled order: nothing relies on 5 captions in image order.
    text_to_image = rng.permutation(np.repeat(np.arange(50), rng.integers(1, 7, size=50)))
    sample = inputs.sample_queries(text_to_image, 20, seed=3)
    images, captions = sample_of(text_to_image, 20, 3)
    np.testing.assert_array_equal(sample.images, images)
    np.testing.assert_array_equal(sample.captions, captions)
    assert set(text_to_image[sample.captions].tolist()) == set(sample.images.tolist())  # whole images, both ways
    assert sample.captions.size == np.isin(text_to_image, sample.images).sum()
    # The rank file's map numbers the sampled images 0..19, each with all its captions.
    np.testing.assert_array_equal(sample.images[sample.text_to_image], text_to_image[sample.captions])
    np.testing.assert_array_equal(np.bincount(sample.text_to_image), np.bincount(text_to_image)[sample.images])
    np.testing.assert_array_equal(inputs.sample_queries(text_to_image, 20, seed=3).captions, sample.captions)
    assert not np.array_equal(inputs.sample_queries(text_to_image, 20, seed=4).images, sample.images)
    vectors = rng.normal(size=(text_to_image.size, 4))
    np.testing.assert_array_equal(sample.pick(vectors, "t2i"), vectors[captions])
    # 0, or no fewer than the file's images: every image and caption, in the file's order, no copy.
    for n in (0, 50, 500):
        every = inputs.sample_queries(text_to_image, n, seed=3)
        assert every.complete and every.pick(vectors, "t2i") is vectors
        np.testing.assert_array_equal(every.images, np.arange(50))
        np.testing.assert_array_equal(every.text_to_image, text_to_image)


def test_sampled_run_metrics_equal_the_sampled_queries_against_the_whole_gallery(tmp_path):
    from retrieval import handoff, io, metrics
    data = random_file(tmp_path / "toy.npz", num_images=40, dim=16)
    emb = handoff.read_embeddings(data)
    out = str(tmp_path / "result")
    written = run_experiments.main(["--data_path", data, "--output_dir", out, "--precisions", "fp16", "binary",
                                    "--candidate_sizes", "10", "--recall_k", "1", "5", "--min_time", "0",
                                    "--latency_queries", "2", "--num_workers", "1", "--max_queries", "12"])
    images, captions = sample_of(emb.text_to_image, 12, 0)
    checked = 0
    for path in written:
        record = json.load(open(path))
        if "skipped" in record:
            continue
        config = record["config"]
        assert config["query_sample"] == {"max_queries": 12, "seed": 0, "images": 12, "images_total": 40,
                                          "captions": 60, "captions_total": 200}
        assert record["speed"]["t2i_timed_queries"] == 60 and record["speed"]["i2t_timed_queries"] == 12
        assert_metrics_match(record, sampled_reference(emb, config, images, captions))
        ranks = io.read_ranks(io.ranks_path(path))
        np.testing.assert_array_equal(ranks["text_to_image"], np.repeat(np.arange(12), 5))
        if config["exact"]:  # retrieval.metrics itself on the sampled captions against every image
            np.testing.assert_array_equal(ranks["t2i"], metrics.exact_ranks(
                emb.text_embeddings[captions], emb.image_embeddings, emb.text_to_image[captions], "t2i"))
        checked += 1
    assert checked == 1 + 2 * 2  # the baseline; fp16 and binary each without re-ranking and with C = 10


def runs_by_config(output_dir):
    """{config without its query sample (JSON text): run file path} of the completed runs of a folder."""
    out = {}
    for path in glob.glob(os.path.join(output_dir, "runs", "*.json")):
        record = json.load(open(path))
        if "skipped" not in record:
            config = {k: v for k, v in record["config"].items() if k != "query_sample"}
            out[json.dumps(config, sort_keys=True)] = path
    return out


def test_sampled_sweep_has_the_full_sweeps_ranks_of_its_queries_on_the_same_gallery(tmp_path):
    # PCA, two codecs, re-ranking and Gaussian distractors: the gallery (and every index over it) is the
    # full sweep's, so every query's rank is the one it has in the full sweep.
    from retrieval import handoff, io, metrics
    data = random_file(tmp_path / "toy.npz", num_images=40, dim=16)
    common = ["--data_path", data, "--embedding_dims", "8", "--precisions", "int8", "binary", "--candidate_sizes",
              "10", "--gallery_sizes", "60", "--recall_k", "1", "5", "--min_time", "0", "--latency_queries", "2",
              "--num_workers", "1"]
    run_experiments.main(common + ["--output_dir", str(tmp_path / "full")])
    run_experiments.main(common + ["--output_dir", str(tmp_path / "sampled"), "--max_queries", "12"])
    full, sampled = runs_by_config(str(tmp_path / "full")), runs_by_config(str(tmp_path / "sampled"))
    assert set(sampled) == set(full) and len(sampled) == 2 * (1 + 2 * 2)
    images, captions = sample_of(handoff.read_embeddings(data).text_to_image, 12, 0)
    for config, path in sampled.items():
        ranks, reference = io.read_ranks(io.ranks_path(path)), io.read_ranks(io.ranks_path(full[config]))
        np.testing.assert_array_equal(ranks["t2i"], reference["t2i"][captions])
        np.testing.assert_array_equal(ranks["i2t"], reference["i2t"][images])
        record = json.load(open(path))
        assert record["config"]["gallery_size"] == 60 and record["config"]["distractors"]["count"] == 20
        for direction in ("t2i", "i2t"):
            summary = metrics.summarize(ranks[direction], [1, 5])
            for key in ("R@1", "R@5", "MRR"):
                assert record["metrics"][f"{direction}_{key}"] == summary[key], (path, direction, key)


def small_sweep_args(tmp_path, monkeypatch):
    """A one-codec sweep of a 40-image file, the arguments without --output_dir, run from tmp_path."""
    monkeypatch.chdir(tmp_path)  # a relative --data_path: the path is part of every config
    random_file("toy.npz", num_images=40, dim=16)
    return ["--data_path", "toy.npz", "--embedding_dims", "8", "--precisions", "int8", "--candidate_sizes", "10",
            "--min_time", "0", "--latency_queries", "2", "--num_workers", "1"]


def test_run_names_without_max_queries_are_unchanged(tmp_path, monkeypatch):
    common = small_sweep_args(tmp_path, monkeypatch)
    # Written by run_experiments.py before --max_queries existed.
    before = ["toy-random-test-" + name for name in (
        "d16-none-fp32-full-flat-g40-7762dabe", "d16-none-int8-k10-norerank-flat-g40-3464b27c",
        "d16-none-int8-c10-flat-g40-7905321f", "d8-pca-fp32-full-flat-g40-c37eff4b",
        "d8-pca-int8-k10-norerank-flat-g40-63f73d63", "d8-pca-int8-c10-flat-g40-d27e85df")]
    for extra in ([], ["--max_queries", "0"]):
        planned = run_experiments.main(common + ["--output_dir", "out", "--dry_run"] + extra)
        assert [os.path.basename(p)[:-len(".json")] for p in planned] == before
    sampled = run_experiments.main(common + ["--output_dir", "out", "--dry_run", "--max_queries", "12"])
    assert all("-g40-q12-" in p for p in sampled) and not {os.path.basename(p) for p in sampled} & set(before)


def test_max_queries_above_the_files_images_runs_every_query_with_the_full_sweeps_numbers(tmp_path, monkeypatch):
    common = small_sweep_args(tmp_path, monkeypatch)
    # No more images than --max_queries: every image and caption, no error, the full sweep's numbers.
    run_experiments.main(common + ["--output_dir", "full"])
    run_experiments.main(common + ["--output_dir", "all", "--max_queries", "500"])
    full, every = runs_by_config("full"), runs_by_config("all")
    assert set(full) == set(every) and len(full) == 6
    for config, path in every.items():
        record, reference = json.load(open(path)), json.load(open(full[config]))
        assert record["config"]["query_sample"] == {"max_queries": 500, "seed": 0, "images": 40, "images_total": 40,
                                                    "captions": 200, "captions_total": 200}
        for key in ("t2i_R@1", "t2i_MRR", "i2t_R@5", "i2t_MRR", "i2t_overlap@5"):
            assert record["metrics"][key] == reference["metrics"][key], (path, key)


def test_bootstrap_and_report_on_a_sampled_sweep(tmp_path):
    import analyze_results
    from retrieval import bootstrap, io
    data = random_file(tmp_path / "toy.npz", num_images=40, dim=16)
    out = str(tmp_path / "result")
    written = run_experiments.main(["--data_path", data, "--output_dir", out, "--precisions", "int8",
                                    "--candidate_sizes", "10", "--recall_k", "1", "5", "--min_time", "0",
                                    "--latency_queries", "2", "--num_workers", "1", "--max_queries", "12",
                                    "--seed", "7"])
    for path in written:  # the bootstrap trusts each rank file: it gives the JSON's numbers back, over 12 images
        ranks, text_to_image, reason = bootstrap.read_ranks(io.ranks_path(path), json.load(open(path))["metrics"])
        assert reason is None and int(text_to_image.max()) + 1 == 12 and ranks["t2i"].size == 60
    summary = analyze_results.main(["--results_dir", out, "--bootstrap", "200", "--no_plots"])
    (group,) = summary["groups"]
    assert group["runs_completed"] == 3
    assert group["intervals"]["runs_with_intervals"] == group["intervals"]["runs_paired"] == 3
    assert group["source"]["query_samples"] == [{"max_queries": 12, "seed": 7, "images": 12, "images_total": 40,
                                                 "captions": 60, "captions_total": 200}]
    report = open(os.path.join(out, "REPORT.md")).read()
    assert "| queries | 12 of 40 images, 60 of 200 captions, seeded 7 (--max_queries 12) |" in report


# ----------------------------------------------------------------------------- shared quantizers, decodes, chunks

def count_calls(monkeypatch, module, name, calls, key):
    """Wrap <module>.<name> so that every call appends key(*args) to calls."""
    real = getattr(module, name)

    def counted(*args, **kwargs):
        calls.append(key(*args, **kwargs))
        return real(*args, **kwargs)
    monkeypatch.setattr(module, name, counted)


def structure(index):
    name = type(precisions.core_index(index)).__name__
    return "ivf" if "IVF" in name else "hnsw" if "HNSW" in name else "flat"


def test_shared_coarse_quantizers_and_decodes_give_the_metrics_of_unshared_builds(tmp_path, monkeypatch):
    from retrieval import io
    data = random_file(tmp_path / "toy.npz", num_images=40, dim=16)
    common = ["--data_path", data, "--precisions", "fp32", "fp16", "int8", "binary", "--index", "flat", "ivf", "hnsw",
              "--nlist", "4", "8", "--nprobe", "2", "--hnsw_m", "8", "--candidate_sizes", "10", "--recall_k", "1", "5",
              "--min_time", "0", "--latency_queries", "2", "--num_workers", "2"]
    coarse, decodes = [], []
    count_calls(monkeypatch, indexes, "train_coarse", coarse, lambda fit_codes, nlist: (fit_codes.dtype.name, nlist))
    count_calls(monkeypatch, two_stage, "decoded_gallery", decodes,
                lambda index, precision, gallery: (precision, structure(index)))
    shared = run_experiments.main(common + ["--output_dir", str(tmp_path / "shared")])
    # Per direction and nlist: one k-means for fp32, fp16 and int8, and binary's own on its bits.
    assert sorted(coarse) == sorted([("float32", n) for n in (4, 8)] * 2 + [("uint8", n) for n in (4, 8)] * 2)
    # Per direction: fp32 once (the baseline; IVF and HNSW reuse it), fp16 and int8 once for flat + HNSW and
    # once per nlist, binary once for all structures.
    assert sorted(decodes) == sorted([("fp32", "flat"), ("fp16", "flat"), ("fp16", "ivf"), ("fp16", "ivf"),
                                      ("int8", "flat"), ("int8", "ivf"), ("int8", "ivf"), ("binary", "flat")] * 2)
    # The same sweep with every build training its own coarse quantizer and decoding its own gallery.
    unshared_coarse, unshared_decodes = [], []
    monkeypatch.setattr(indexes, "shares_coarse", lambda precision, index_type: False)
    monkeypatch.setattr(two_stage, "decode_key", lambda precision, index_type, knobs=(): (precision, index_type) + knobs)
    count_calls(monkeypatch, indexes, "train_coarse", unshared_coarse, lambda fit_codes, nlist: nlist)
    count_calls(monkeypatch, two_stage, "decoded_gallery", unshared_decodes, lambda index, precision, gallery: precision)
    unshared = run_experiments.main(common + ["--output_dir", str(tmp_path / "unshared")])
    assert len(unshared_coarse) == 2 * 2 * 4 and len(unshared_decodes) == 2 * 16
    assert [os.path.basename(p) for p in shared] == [os.path.basename(p) for p in unshared]
    ivf = 0
    for a, b in zip(shared, unshared):
        with_sharing, without = json.load(open(a)), json.load(open(b))
        if "skipped" in with_sharing:
            continue
        assert with_sharing["metrics"] == without["metrics"], a
        ranks_a, ranks_b = io.read_ranks(io.ranks_path(a)), io.read_ranks(io.ranks_path(b))
        for direction in ("t2i", "i2t"):
            np.testing.assert_array_equal(ranks_a[direction], ranks_b[direction])
        config, speed = with_sharing["config"], with_sharing["speed"]
        for direction in ("t2i", "i2t"):
            if config["index"] != "ivf":
                assert speed[f"{direction}_coarse_train_s"] is None and speed[f"{direction}_coarse_shared"] is None
                continue
            ivf += 1
            # fp32 (first in the grid) trains the quantizer that fp16 and int8 reuse; binary trains its own.
            assert speed[f"{direction}_coarse_shared"] == (config["precision"] in ("fp16", "int8"))
            assert speed[f"{direction}_coarse_train_s"] > 0 and without["speed"][f"{direction}_coarse_shared"] is False
            assert speed[f"{direction}_build_s"] == pytest.approx(
                speed[f"{direction}_coarse_train_s"] + speed[f"{direction}_train_s"] + speed[f"{direction}_add_s"])
    assert ivf == 2 * 4 * 2 * 2  # directions x precisions x nlist x (no re-ranking, C = 10)


def test_ivf_on_a_padded_gallery_trains_on_the_fit_set_and_a_seeded_sample_of_distractors(tmp_path, monkeypatch):
    from retrieval import handoff, inputs, io
    data = random_file(tmp_path / "toy.npz", num_images=20, dim=16)
    fits = []
    count_calls(monkeypatch, indexes, "train_coarse", fits, lambda fit_codes, nlist: (fit_codes.copy(), nlist))
    common = ["--data_path", data, "--precisions", "fp32", "int8", "--index", "ivf", "--nprobe", "4",
              "--candidate_sizes", "--recall_k", "1", "5", "--min_time", "0", "--latency_queries", "2",
              "--directions", "t2i", "--gallery_sizes", "2000"]
    paths = run_experiments.main(common + ["--output_dir", str(tmp_path / "a")])
    runs = [json.load(open(p)) for p in paths if "skipped" not in json.load(open(p))]
    # 4 sqrt(2000) = 179 lists wanted; the 20 fit images alone would allow 20 // 39 -> 1 list; with the
    # 1,980 distractors (fewer than 39 x 179) the training set is 2,000 vectors: 2000 // 39 = 51 lists.
    assert {r["config"]["index_params"]["nlist"] for r in runs if r["config"]["index"] == "ivf"} == {51}
    (fit_codes, nlist), = fits  # one k-means serves fp32 and int8
    emb = handoff.read_embeddings(data)
    fit = inputs.FitSet("test", data, emb.image_embeddings, emb.text_embeddings)
    gallery = inputs.padded_gallery(emb, fit, 1980, None, 0, ["t2i"])["t2i"]
    assert nlist == 51 and fit_codes.shape == (2000, 16)
    np.testing.assert_array_equal(fit_codes[:20], emb.image_embeddings)
    # the rest: every distractor row (the sample is all of them here), never a real gallery item
    np.testing.assert_array_equal(fit_codes[20:], gallery[20:])
    # A gallery with more distractors than 39 per wanted list samples them: 4 sqrt(40000) = 800 lists from
    # 20 + 39 x 800 vectors. Seeded, so a second sweep trains on the same rows and gives the same ranks.
    fits.clear()
    bigger = [a if a != "2000" else "40000" for a in common] + ["--precisions", "fp32"]
    first = run_experiments.main(bigger + ["--output_dir", str(tmp_path / "b")])
    second = run_experiments.main(bigger + ["--output_dir", str(tmp_path / "c")])
    (one, lists), (two, _) = fits
    assert lists == 800 and one.shape[0] == 20 + 39 * 800
    np.testing.assert_array_equal(one, two)
    big = inputs.padded_gallery(emb, fit, 39980, None, 0, ["t2i"])["t2i"]
    assert not (one[20:, None, :] == big[None, :20, :]).all(axis=2).any()  # no real image among the sample
    for a, b in zip(first, second):
        np.testing.assert_array_equal(io.read_ranks(io.ranks_path(a))["t2i"], io.read_ranks(io.ranks_path(b))["t2i"])


@pytest.mark.parametrize("direction", ["t2i", "i2t"])
def test_chunked_full_ranking_equals_one_chunk_and_brute_force_with_ties(direction):
    from retrieval import metrics
    # Entries 0 or +-0.5 (four non-zeros): every dot product is exact, so the many ties are real ties. Images
    # have 1 to several captions; 7 distractor rows follow each real gallery (never relevant).
    rng = np.random.default_rng(11)
    patterns = np.zeros((6, 8), dtype=np.float32)
    for row in patterns:
        row[rng.choice(8, 4, replace=False)] = rng.choice([-0.5, 0.5], 4)
    text_to_image = np.sort(np.r_[np.arange(13), rng.integers(0, 13, size=40)])
    images, texts = patterns[rng.integers(0, 6, size=13)], patterns[rng.integers(0, 6, size=53)]
    extra = patterns[rng.integers(0, 6, size=7)]
    queries, gallery = (texts, np.r_[images, extra]) if direction == "t2i" else (images, np.r_[texts, extra])
    relevant = relevant_sets(text_to_image, direction)
    scores = queries @ gallery.T
    want = [first_hit(stable_order(scores[q], np.arange(gallery.shape[0])), relevant[q]) for q in range(len(queries))]
    assert sum((scores[q] == scores[q, r]).sum() > 1 for q in range(len(queries)) for r in relevant[q]) > 10
    count = queries.shape[0]
    whole = metrics.exact_ranks(queries, gallery, text_to_image, direction, chunk_size=count)
    np.testing.assert_array_equal(whole, want)
    for chunk in (1, 2, 4, count - 1, count + 3):  # 4 divides neither 53 nor 13
        np.testing.assert_array_equal(metrics.exact_ranks(queries, gallery, text_to_image, direction, chunk), whole)


def test_full_ranking_memory_is_bounded_by_the_chunk_not_the_gallery():
    import tracemalloc
    from retrieval import metrics
    from retrieval.group import score_chunk
    rng = np.random.default_rng(0)
    text_to_image = np.repeat(np.arange(2000), 5)
    images = l2_normalize(rng.normal(size=(20000, 8))).astype(np.float32)  # 2000 real images + distractors
    texts = l2_normalize(rng.normal(size=(20000, 8))).astype(np.float32)  # 10000 real captions + distractors
    for direction, queries, gallery in (("t2i", texts[:10000], images), ("i2t", images[:2000], texts)):
        full_matrix = queries.shape[0] * gallery.shape[0] * 4
        tracemalloc.start()
        ranks = metrics.exact_ranks(queries, gallery, text_to_image, direction, chunk_size=50)
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        assert peak < 16 * 50 * gallery.shape[0] < full_matrix / 2, (direction, peak)
        np.testing.assert_array_equal(ranks, metrics.exact_ranks(queries, gallery, text_to_image, direction, 400))
    # The sweep's chunk keeps a chunk's scores at 2^26 floats (256 MB) whatever the gallery.
    for rows in (1, 5000, 10 ** 6, 10 ** 8):
        chunk = score_chunk(rows)
        assert chunk >= 1 and (chunk == 1 or chunk * rows <= 1 << 26)


# ----------------------------------------------------------------------------- issue 28: content identity, checks

def folder_bytes(folder):
    """{relative path: bytes} of every file under `folder` (what a refused sweep must leave as it was)."""
    out = {}
    for root, _, names in os.walk(folder):
        for name in names:
            path = os.path.join(root, name)
            with open(path, "rb") as f:
                out[os.path.relpath(path, folder)] = f.read()
    return out


SMALL_SWEEP = ["--precisions", "int8", "--candidate_sizes", "10", "--recall_k", "1", "5", "--min_time", "0",
               "--latency_queries", "2", "--num_workers", "1"]


def test_changed_data_file_is_refused_before_writing_and_overwrite_recomputes(tmp_path, capsys):
    data = random_file(tmp_path / "P.h5", num_images=20, dim=16)
    out = str(tmp_path / "result")
    common = ["--data_path", data, "--output_dir", out] + SMALL_SWEEP
    first = run_experiments.main(common + ["--embedding_dims", "8"])
    before = folder_bytes(out)
    old = json.load(open(first[0]))["inputs"]["data"]["sha256"]
    random_file(tmp_path / "P.h5", num_images=20, dim=16, seed=5)  # other vectors, the same attributes
    capsys.readouterr()
    with pytest.raises(SystemExit) as refused:
        run_experiments.main(common + ["--embedding_dims", "8", "4"])
    message = str(refused.value)
    match = re.fullmatch(rf"error: {re.escape(out)}/runs/\S+\.json: was computed from data file {re.escape(data)} "
                         r"sha256 ([0-9a-f]{12})\.\.\., now ([0-9a-f]{12})\.\.\.; pass --overwrite to recompute or "
                         r"use another --output_dir", message)
    assert match and match.group(1) == old[:12], message
    assert folder_bytes(out) == before  # nothing written, nothing replaced
    redone = run_experiments.main(common + ["--embedding_dims", "8", "4", "--overwrite"])
    assert len(redone) == 9 and set(first) < set(redone)  # the run names did not change
    shas = {json.load(open(p))["inputs"]["data"]["sha256"] for p in redone}
    assert len(shas) == 1 and shas.pop()[:12] == match.group(2) != old[:12]


@pytest.mark.parametrize("role", ["fit file", "distractor file"])
def test_changed_fit_or_distractor_file_is_refused_naming_it(tmp_path, role):
    data = random_file(tmp_path / "toy_test.npz", num_images=20, dim=16)
    other = random_file(tmp_path / "other.npz", num_images=30, dim=16, seed=1)
    out = str(tmp_path / "result")
    flags = ["--fit_path", other] if role == "fit file" else ["--gallery_sizes", "30", "--distractors", other]
    common = ["--data_path", data, "--output_dir", out] + SMALL_SWEEP + flags
    run_experiments.main(common)
    before = folder_bytes(out)
    random_file(tmp_path / "other.npz", num_images=30, dim=16, seed=2)
    with pytest.raises(SystemExit, match=rf"^error: .*\.json: was computed from {role} {re.escape(other)} sha256 "
                                         r"[0-9a-f]{12}\.\.\., now [0-9a-f]{12}\.\.\.; pass --overwrite"):
        run_experiments.main(common)
    assert folder_bytes(out) == before


def test_run_files_before_fingerprints_count_as_done_with_one_note(tmp_path, capsys):
    data = random_file(tmp_path / "toy.npz", num_images=20, dim=16)
    out = str(tmp_path / "result")
    common = ["--data_path", data, "--output_dir", out] + SMALL_SWEEP
    written = run_experiments.main(common)
    for path in written:  # as schema 1 wrote them: no "inputs"
        record = json.load(open(path))
        del record["inputs"]
        record["schema_version"] = 1
        with open(path, "w") as f:
            json.dump(record, f)
    before = folder_bytes(out)
    capsys.readouterr()
    assert run_experiments.main(common) == []
    notes = [line for line in capsys.readouterr().out.splitlines() if line.startswith("note:")]
    assert notes == [f"note: 3 run files under {out}/runs predate content fingerprints: counted as done without "
                     "checking the content of their input files (pass --overwrite to recompute them)"]
    assert folder_bytes(out) == before


def test_repeated_grid_values_and_data_path_are_collapsed_with_one_note(tmp_path, capsys):
    data = random_file(tmp_path / "P.h5", num_images=20, dim=16)
    out = str(tmp_path / "result")
    again = os.path.join(str(tmp_path), ".", "P.h5")
    written = run_experiments.main(["--data_path", data, again, "--output_dir", out,
                                    "--embedding_dims", "8", "8", "--precisions", "int8", "int8",
                                    "--candidate_sizes", "10", "10"] + SMALL_SWEEP[4:])
    lines = capsys.readouterr().out.splitlines()
    assert [line for line in lines if line.startswith("note:")] == [
        f"note: repeated values collapsed, each configuration runs once: --data_path {data} {again} -> {data}; "
        "--embedding_dims 8 8 -> 8; --precisions int8 int8 -> int8; --candidate_sizes 10 10 -> 10"]
    assert lines[-1] == f"6 written, 0 already done, under {os.path.join(out, 'runs')}"
    assert len(written) == len(set(written)) == len(glob.glob(os.path.join(out, "runs", "*.json"))) == 6


def test_overlap_of_the_baseline_with_itself_is_100_when_k_exceeds_the_gallery(tmp_path):
    data = random_file(tmp_path / "two.npz", num_images=2, dim=8)  # 2 images, 10 captions
    out = str(tmp_path / "result")
    run_experiments.main(["--data_path", data, "--output_dir", out, "--precisions", "fp16", "--candidate_sizes",
                          "--recall_k", "1", "5", "--min_time", "0", "--latency_queries", "2", "--num_workers", "1"])
    (exact,) = [r for r in load_runs(out) if r["config"]["exact"]]
    assert exact["metrics"]["t2i_overlap@5"] == 100.0 and exact["metrics"]["i2t_overlap@5"] == 100.0
    assert exact["metrics"]["t2i_overlap@1"] == 100.0
    reference = np.array([[1, 0], [0, 1]])
    assert two_stage.overlap_at_k(reference, reference, 5) == 100.0
    assert two_stage.overlap_at_k(np.array([[1, 0], [0, 0]]), reference, 5) == 75.0


def test_output_dir_that_is_a_file_fails_before_any_vector_is_loaded(tmp_path, monkeypatch):
    from retrieval import inputs

    def never(*args, **kwargs):
        pytest.fail("vectors loaded although --output_dir cannot take results")
    monkeypatch.setattr(inputs, "load_inputs", never)
    data = random_file(tmp_path / "toy.npz", num_images=20, dim=16)
    (tmp_path / "file").write_text("a regular file, so this fails even for root")
    before = folder_bytes(tmp_path)
    for out in (tmp_path / "file", tmp_path / "file" / "out"):
        with pytest.raises(SystemExit) as refused:
            run_experiments.main(["--data_path", data, "--output_dir", str(out)] + SMALL_SWEEP)
        assert str(refused.value) == (f"error: {out}: not writable ({tmp_path / 'file'} is not a folder); "
                                      "choose another output folder with --output_dir")
    assert folder_bytes(tmp_path) == before


def test_read_only_output_dir_fails_before_any_vector_is_loaded(tmp_path, monkeypatch, read_only_folder):
    from retrieval import inputs
    monkeypatch.setattr(inputs, "load_inputs", lambda *a, **k: pytest.fail("vectors loaded"))
    data = random_file(tmp_path / "toy.npz", num_images=20, dim=16)
    with pytest.raises(SystemExit, match=rf"^error: {read_only_folder}: not writable \((Permission denied|Read-only "
                                         r"file system)\); choose another output folder with --output_dir$"):
        run_experiments.main(["--data_path", data, "--output_dir", read_only_folder] + SMALL_SWEEP)
    assert os.listdir(read_only_folder) == []


@pytest.mark.parametrize("flag, value, least", [("--latency_queries", "0", 1), ("--rounds", "0", 1),
                                               ("--warmup", "-1", 0), ("--threads", "-1", 0),
                                               ("--num_workers", "-3", 0)])
def test_numeric_timing_flags_are_refused_at_parse_time(tmp_path, capsys, flag, value, least):
    with pytest.raises(SystemExit) as refused:
        run_experiments.main(["--data_path", str(tmp_path / "never_read.h5"), "--output_dir", str(tmp_path / "r"),
                              flag, value])
    assert refused.value.code == 2
    assert capsys.readouterr().err == f"error: {flag}: {value} must be >= {least} (see --help)\n"
    assert os.listdir(tmp_path) == []


def test_sigint_mid_sweep_exits_130_keeps_complete_runs_and_the_rerun_resumes(tmp_path):
    # Needs the KeyboardInterrupt handling of retrieval/errors.py cli (exit 130 and the one line), which another
    # branch of issue 28 adds: without it this test fails (a traceback, and the status of a death by SIGINT).
    data, out, args = interrupted_sweep(tmp_path)
    expected = run_experiments.main(args + ["--dry_run"])
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (ROOT, os.environ.get("PYTHONPATH")) if p))
    command = [sys.executable, os.path.join(ROOT, "run_experiments.py")] + args
    # SIGINT as a terminal's Ctrl-C delivers it (a background job of a shell may inherit it ignored).
    process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    runs_dir = os.path.join(out, "runs")
    deadline = time.time() + 120
    while time.time() < deadline and len(glob.glob(os.path.join(runs_dir, "*.json"))) < 3:
        time.sleep(0.02)
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=120)
    kept = sorted(glob.glob(os.path.join(runs_dir, "*.json")))
    assert 3 <= len(kept) < len(expected), "the interrupt should land mid-sweep"
    assert process.returncode == 130
    assert stderr.replace("\r", "\n").strip().splitlines()[-1].endswith(
        "interrupted; completed runs kept; run the same command to resume"), stderr
    assert "Traceback" not in stderr
    assert not [n for n in os.listdir(runs_dir) if n.startswith(".")], "temp files left behind"
    complete = {p: open(p, "rb").read() for p in kept}
    for path in kept:  # every run file kept is whole, with its rank file
        assert "skipped" in json.load(open(path)) or os.path.exists(ranks_path(path)), path
    rerun = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300, check=True)
    assert rerun.stdout.splitlines()[-1] == \
        f"{len(expected) - len(kept)} written, {len(kept)} already done, under {runs_dir}"
    assert sorted(glob.glob(os.path.join(runs_dir, "*.json"))) == sorted(expected)
    assert {p: open(p, "rb").read() for p in kept} == complete
    # Resumed runs keep their speed intervals: the analysis reads them as the first sweep stored them.
    import analyze_results
    import pandas as pd
    analyze_results.main(["--results_dir", out, "--no_plots", "--bootstrap", "0"])
    table = pd.read_csv(os.path.join(out, "summary.csv")).set_index("run_id")
    for path in kept:
        speed = json.load(open(path)).get("speed")
        if speed:
            row = table.loc[os.path.basename(path)[:-len(".json")]]
            for key in ("t2i_qps_ci_low", "t2i_qps_ci_high", "t2i_speedup", "t2i_speedup_ci_low"):
                assert row[key] == pytest.approx(speed[key]), key


def test_faiss_work_outside_timing_runs_on_the_main_thread(tmp_path, monkeypatch):
    """Decoding a gallery and encoding queries call FAISS (OpenMP). Done from a pool thread, that thread keeps an
    OpenMP team for the pool's life and libgomp stops spin-waiting, which slowed every later binary search of the
    process about 3x (retrieval/group.py, shared_full_ranks); the sweep keeps them on the main thread."""
    import threading
    seen = []
    for name in ("decoded_gallery", "compressed_queries"):
        real = getattr(two_stage, name)

        def spy(*args, _real=real, _name=name, **kwargs):
            seen.append((_name, threading.current_thread() is threading.main_thread()))
            return _real(*args, **kwargs)
        monkeypatch.setattr(two_stage, name, spy)
    data = random_file(tmp_path / "toy.npz", num_images=40, dim=16)
    run_experiments.main(["--data_path", data, "--output_dir", str(tmp_path / "result"), "--embedding_dims", "16",
                          "--precisions", "int8", "binary", "pq", "--candidate_sizes", "10", "--recall_k", "1",
                          "--min_time", "0", "--rounds", "2", "--latency_queries", "2", "--num_workers", "2"])
    assert {name for name, _ in seen} == {"decoded_gallery", "compressed_queries"}
    assert all(on_main for _, on_main in seen)
