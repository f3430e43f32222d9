"""run_experiments.py end to end: every metric against brute-force numpy, grid/shards, resume, SIGKILL."""
import glob
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

import run_experiments
from retrieval import indexes
from retrieval.io import Embeddings, l2_normalize, make_attrs, write_embeddings

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
    from retrieval.io import read_embeddings
    emb = read_embeddings(path)
    fit = read_embeddings(fit_path) if fit_path else emb
    projection = indexes.fit_reduction(np.concatenate([fit.image_embeddings, fit.text_embeddings]), config["dim"],
                                       "pca") if config["dim"] < emb.dim else None
    images, texts = indexes.reduce(emb.image_embeddings, projection), indexes.reduce(emb.text_embeddings, projection)
    fit_images, fit_texts = indexes.reduce(fit.image_embeddings, projection), indexes.reduce(fit.text_embeddings, projection)
    k_values = config["k_values"]
    out = {}
    for direction, queries, gallery, fit_vectors in (("t2i", texts, images, fit_images), ("i2t", images, texts, fit_texts)):
        precision = config["precision"]
        if precision == "binary":
            stage1_queries, stage1_gallery = indexes.binary_signs(queries), indexes.binary_signs(gallery)
        elif precision == "fp32":
            stage1_queries, stage1_gallery = queries, gallery
        else:  # the FAISS codec decodes; the ranking itself is recomputed here
            index, _ = indexes.build_index(precision, gallery, fit_vectors)
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
                          "--recall_k", "1", "5", "10", "--min_time", "0", "--latency_queries", "3",
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
    for key in ("t2i_search_qps", "i2t_rerank_qps", "t2i_latency_p99_ms", "t2i_build_s"):
        assert int4["speed"][key] > 0
    assert int4["memory"]["t2i_index_bytes"] > 40 * 8 and int4["memory"]["peak_rss_bytes"] > 0
    assert int4["env"]["faiss"] and int4["data"]["dataset"] == "toy"
    assert int4["fit"]["source"].startswith("gallery")


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


def test_shards_partition_the_grid_and_runs_resume(tmp_path):
    data = random_file(tmp_path / "toy.npz", num_images=20, dim=16)
    out = str(tmp_path / "result")
    common = ["--data_path", data, "--output_dir", out, "--embedding_dims", "8", "64", "--precisions", "int8",
              "binary", "--candidate_sizes", "5", "30", "--recall_k", "1", "5", "--min_time", "0",
              "--latency_queries", "2", "--num_workers", "1"]
    full = run_experiments.main(common + ["--dry_run"])
    shards = [run_experiments.main(common + ["--dry_run", "--shard", f"{i}/3"]) for i in range(3)]
    assert sorted(sum(shards, [])) == sorted(full) and len(set(full)) == len(full)
    assert all(not set(a) & set(b) for i, a in enumerate(shards) for b in shards[i + 1:])
    assert not os.path.exists(os.path.join(out, "runs"))  # a dry run writes nothing
    written = run_experiments.main(common + ["--shard", "1/3"])
    assert sorted(written) == sorted(shards[1])
    rest = run_experiments.main(common)  # resumes: only what shard 1 did not do
    assert sorted(rest) == sorted(set(full) - set(shards[1]))
    assert run_experiments.main(common) == []
    os.remove(full[0])
    assert run_experiments.main(common) == [full[0]]
    before = os.path.getmtime(full[1])
    time.sleep(0.01)
    assert sorted(run_experiments.main(common + ["--overwrite"])) == sorted(full)
    assert os.path.getmtime(full[1]) > before
    with pytest.raises(SystemExit):
        run_experiments.main(common + ["--shard", "3/3"])


def test_sigkill_mid_sweep_then_rerun_completes(tmp_path):
    data = random_file(tmp_path / "toy.npz", num_images=60, dim=32)
    out = str(tmp_path / "result")
    args = ["--data_path", data, "--output_dir", out, "--embedding_dims", "32", "16", "8", "--precisions",
            "fp16", "int8", "int4", "binary", "--candidate_sizes", "10", "50", "--recall_k", "1", "5",
            "--min_time", "0.05", "--latency_queries", "20", "--num_workers", "1", "--threads", "1"]
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


def test_gallery_distractors_and_approximate_indexes(tmp_path):
    data = random_file(tmp_path / "toy.npz", num_images=30, dim=16, noise=1.2)
    other = random_file(tmp_path / "other.npz", num_images=80, dim=16, seed=9, split="val")
    out = str(tmp_path / "result")
    common = ["--data_path", data, "--output_dir", out, "--precisions", "fp32", "int8", "--candidate_sizes", "20",
              "--recall_k", "1", "5", "--min_time", "0", "--latency_queries", "2", "--index", "flat", "ivf", "hnsw",
              "--nlist", "4", "--nprobe", "4", "--num_workers", "1"]
    run_experiments.main(common + ["--gallery_sizes", "30", "300", "10"])
    run_experiments.main(common + ["--gallery_sizes", "100", "200", "--distractors", other])
    runs = load_runs(out)
    exact = {(r["config"]["gallery_size"], r["config"]["distractors"]["source"] if r["config"]["distractors"] else None): r
             for r in runs if r["config"]["exact"] and "skipped" not in r}
    small, large = exact[(30, None)], exact[(300, "gaussian")]
    assert large["config"]["distractors"]["count"] == 270
    assert large["metrics"]["t2i_R@5"] <= small["metrics"]["t2i_R@5"]
    assert large["metrics"]["t2i_mean_rank"] >= small["metrics"]["t2i_mean_rank"]
    assert large["memory"]["t2i_index_bytes"] > small["memory"]["t2i_index_bytes"]
    assert exact[(100, other)]["config"]["distractors"]["count"] == 70
    too_many = [r for r in runs if r["config"]["gallery_size"] == 200]
    assert too_many and all("has only 80 rows" in r["skipped"] for r in too_many)
    assert all("below the real gallery" in r["skipped"] for r in runs if r["config"]["gallery_size"] == 10)
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

def test_rank_files_reproduce_every_run_and_resume_with_their_json(tmp_path):
    from retrieval import io, metrics
    from retrieval.io import read_embeddings
    data = random_file(tmp_path / "toy.npz", num_images=30, dim=16)
    out = str(tmp_path / "result")
    common = ["--data_path", data, "--output_dir", out, "--embedding_dims", "8", "--precisions", "int8", "binary",
              "--candidate_sizes", "5", "--recall_k", "1", "5", "--min_time", "0", "--latency_queries", "2",
              "--num_workers", "1"]
    written = run_experiments.main(common)
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
    # A run whose rank file is gone is redone (JSON and rank file), and nothing else is.
    victim = next(p for p in written if "ranks_file" in json.load(open(p)))
    os.remove(io.ranks_path(victim))
    assert run_experiments.main(common) == [victim]
    assert os.path.exists(io.ranks_path(victim))
    # A temp rank file a killed run left behind is removed on the next start.
    stale = os.path.join(out, "runs", ".dead.ranks.abc.tmp.npz")
    open(stale, "wb").close()
    os.utime(stale, (time.time() - 3600, time.time() - 3600))
    run_experiments.main(common)
    assert not os.path.exists(stale)


def test_knob_lists_give_one_config_each_and_build_each_index_once(tmp_path, monkeypatch):
    from retrieval import sweep
    data = random_file(tmp_path / "toy.npz", num_images=60, dim=16)
    builds = []
    real_build = indexes.build_index

    def counting_build(precision, gallery, fit_vectors, index_type="flat", params=None):
        knob = {"ivf": params.get("nlist"), "hnsw": params.get("hnsw_m")}.get(index_type)
        builds.append((precision, index_type, knob))
        return real_build(precision, gallery, fit_vectors, index_type, params)

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
    assert sweep.knob_label(ivf[0]).startswith("nl")


def test_query_transform_is_its_own_timed_stage_and_search_excludes_binarising(tmp_path, monkeypatch):
    from retrieval import timing
    data = random_file(tmp_path / "toy.npz", num_images=40, dim=16)
    calls = {"sign_bits": 0}
    real_sign_bits, real_time_batches = indexes.sign_bits, timing.time_batches
    stages = []

    def counting_sign_bits(*args, **kwargs):
        calls["sign_bits"] += 1
        return real_sign_bits(*args, **kwargs)

    def recording_time_batches(step, *args, **kwargs):
        before = calls["sign_bits"]
        result = real_time_batches(step, *args, **kwargs)
        stages.append((step.__name__, calls["sign_bits"] - before))
        return result

    monkeypatch.setattr(indexes, "sign_bits", counting_sign_bits)
    monkeypatch.setattr(timing, "time_batches", recording_time_batches)
    out = str(tmp_path / "result")
    written = run_experiments.main(["--data_path", data, "--output_dir", out, "--embedding_dims", "8",
                                    "--precisions", "fp16", "binary", "--candidate_sizes", "10", "--recall_k", "1",
                                    "--min_time", "0", "--min_passes", "2", "--latency_queries", "2",
                                    "--num_workers", "1", "--directions", "t2i"])
    speeds = {(r["config"]["precision"], r["config"]["dim"], r["config"]["candidate_size"]): r["speed"]
              for r in map(lambda p: json.load(open(p)), written) if "speed" in r}
    # fp16 at the native dim: nothing to do to a query; binary, or any reduced dim: a transform stage.
    assert speeds[("fp16", 16, 1)]["t2i_transform_qps"] is None
    for key in (("binary", 16, 1), ("binary", 8, 10), ("fp16", 8, 10)):
        speed = speeds[key]
        assert speed["t2i_transform_qps"] > 0 and speed["t2i_search_qps"] > 0
        stage_seconds = 1 / speed["t2i_transform_qps"] + 1 / speed["t2i_search_qps"] + \
            1 / speed[f"t2i_{'rerank' if key[2] == 10 else 'sort'}_qps"]
        assert speed["t2i_qps"] == pytest.approx(1 / stage_seconds)
        assert speed["t2i_timed_passes"] >= 2 and speed["t2i_search_qps_spread_pct"] >= 0
    # Binarising the queries happens in the transform stage of the 4 binary configurations (2 dims x 2
    # candidate settings), never while the index searches nor in the second stage.
    assert {name for name, _ in stages} == {"transform_step", "search_step", "second_step"}
    assert sum(1 for name, n in stages if name == "transform_step" and n > 0) == 4
    assert all(n == 0 for name, n in stages if name != "transform_step")
    assert speeds[("binary", 16, 1)]["blas_threads"] == timing.BLAS_THREADS
