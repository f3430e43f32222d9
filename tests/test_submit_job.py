"""submit_job.sh: local runs, failures, prefetch, a real single-node Slurm (sbatch, job array + afterok),
a real Son of Grid Engine cell (qsub -sync y, -t array + -hold_jid), and PBS submissions against a
stand-in qsub (no PBS server here).

Each test works in a copy of the project's code (like a user's clone) with a tiny random CLIP and a small
synthetic dataset, so the whole pipeline runs in seconds per phase. The Slurm and SGE tests start their
own daemons on this machine (tests/slurm_cluster.py, tests/sge_cluster.py) and are skipped, with the
reason, only where the packages are not installed and cannot be (.ci/run installs them).
"""
import dataclasses
import glob
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile

import pytest

import sge_cluster
import slurm_cluster

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
JOB_TIMEOUT_S = 420
# Columns of summary rows that follow from the data and the grid alone (speed and memory use vary run to run).
QUALITY_MARKERS = ("R@", "MRR", "rank", "RSUM", "stage1_recall", "retention", "overlap")
IDENTITY_COLUMNS = ("status", "skipped_reason", "dim", "precision", "candidate_size", "rerank", "exact",
                    "bytes_per_vector", "dataset", "split", "model")


def make_clone(folder):
    """The project's code (scripts, package, requirements) without data or results, as in a fresh clone."""
    os.makedirs(folder, exist_ok=True)
    for name in os.listdir(ROOT):
        if name.endswith(".py") or name in ("submit_job.sh", "requirements.txt", "requirements-dev.txt"):
            shutil.copy2(os.path.join(ROOT, name), folder)
    shutil.copytree(os.path.join(ROOT, "retrieval"), os.path.join(folder, "retrieval"),
                    ignore=shutil.ignore_patterns("__pycache__"))
    return str(folder)


def pipeline_env(tiny_clip_dir, **overrides):
    """A tiny but complete configuration: 80 synthetic images, dims 8 + native 16, two precisions."""
    env = dict(os.environ)
    for name in ("SLURM_JOB_ID", "PBS_JOBID", "JOB_ID", "SGE_TASK_ID", "ARRAY", "PHASES", "DATA_PATH"):
        env.pop(name, None)
    env.update(PYTHON=sys.executable, DATASET="synthetic", SYNTHETIC_IMAGES="80", MODEL=tiny_clip_dir,
               NUM_WORKERS="0", EMBEDDING_DIMS="8", PRECISIONS="int8 binary", CANDIDATE_SIZES="20",
               RECALL_K="1 5", THREADS="1", PREPARE_ARGS="--quiet --batch_size 32",
               EXPERIMENT_ARGS="--min_time 0.01 --latency_queries 5 --num_workers 1",
               ANALYZE_ARGS="--no_plots", HF_HUB_OFFLINE="1",
               SELECT_SPLIT="")   # the test split alone (tests/test_submit_select.py covers SELECT_SPLIT=dev)
    env.update({k: str(v) for k, v in overrides.items()})
    return env


def run_script(clone, env, timeout=JOB_TIMEOUT_S):
    return subprocess.run(["bash", "submit_job.sh"], cwd=clone, env=env, capture_output=True, text=True,
                          timeout=timeout, stdin=subprocess.DEVNULL)


def grid_names(clone, env, data_path, fit=True):
    """Names of the configurations the sweep should write, in grid order, as run_experiments.py --dry_run
    lists them (the fit set is the train split's file, as FIT_SPLIT=train makes submit_job.sh pass it)."""
    fit_args = ["--fit_path", data_path.replace("_test.h5", "_train.h5")] if fit else []
    result = subprocess.run([sys.executable, "run_experiments.py", "--data_path", data_path, *fit_args,
                             "--output_dir", os.path.join(clone, "dry"),
                             "--embedding_dims", *env["EMBEDDING_DIMS"].split(), "--precisions", *env["PRECISIONS"].split(),
                             "--candidate_sizes", *env["CANDIDATE_SIZES"].split(), "--recall_k", *env["RECALL_K"].split(),
                             "--threads", env["THREADS"], "--dry_run"],
                            cwd=clone, capture_output=True, text=True, timeout=120, env=env)
    assert result.returncode == 0, result.stderr
    names = [m.group(1) for m in re.finditer(r"^\s*\d+ (?:todo|done) (\S+)", result.stdout, re.M)]
    assert names, result.stdout
    return names


def run_files(clone, result_dir):
    return sorted(glob.glob(os.path.join(clone, result_dir, "runs", "*.json")))


def run_names(runs):
    return {os.path.basename(p)[:-len(".json")] for p in runs}


def quality_rows(path):
    """configuration name -> the deterministic columns of each summary row.

    The name is the run id without its hash (the hash covers the file path, which differs between clones).
    """
    with open(path) as f:
        summary = json.load(f)
    rows = {}
    for row in summary["rows"]:
        rows[row["run_id"].rsplit("-", 1)[0]] = {k: v for k, v in row.items()
                               if k in IDENTITY_COLUMNS or any(m in k for m in QUALITY_MARKERS)}
    return summary, rows


def assert_same_summary(path_a, path_b):
    summary_a, rows_a = quality_rows(path_a)
    summary_b, rows_b = quality_rows(path_b)
    assert summary_a["runs_total"] == summary_b["runs_total"] > 0
    assert summary_a["runs_skipped"] == summary_b["runs_skipped"]
    assert rows_a.keys() == rows_b.keys()
    compared = 0
    for run_id, row in rows_a.items():
        assert row.keys() == rows_b[run_id].keys(), run_id
        for key, value in row.items():
            other = rows_b[run_id][key]
            if isinstance(value, float) and isinstance(other, float):
                assert value == pytest.approx(other, rel=1e-9, abs=1e-9), (run_id, key)
            else:
                assert value == other, (run_id, key)
            compared += 1
    assert compared > 50  # the rows really carry metrics


def read(path):
    with open(path, errors="replace") as f:
        return f.read()


# ----------------------------------------------------------------------------- local runs (no scheduler)

@dataclasses.dataclass(frozen=True)
class LocalRun:
    """One local run of the whole pipeline (submit_job.sh, no scheduler) in a fresh clone."""
    clone: str
    env: dict                                 # its environment (pipeline_env)
    result: subprocess.CompletedProcess


@pytest.fixture(scope="module")
def local_run(tmp_path_factory, tiny_clip_dir):
    clone = make_clone(tmp_path_factory.mktemp("local") / "clone")
    env = pipeline_env(tiny_clip_dir)
    return LocalRun(clone, env, run_script(clone, env))


@pytest.mark.slow
def test_local_pipeline_runs_every_phase(local_run):
    result = local_run.result
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "local run" in result.stdout and "phases: prepare experiments analyze" in result.stdout


@pytest.mark.slow
def test_local_pipeline_writes_every_split_and_configuration(local_run, tiny_clip_dir):
    clone, env = local_run.clone, local_run.env
    for split in ("train", "dev", "test"):  # prepare_data.py's default splits, named by the model folder
        assert os.path.exists(os.path.join(clone, "coco_data", "synthetic",
                                           f"{os.path.basename(tiny_clip_dir)}_{split}.h5"))
    # every configuration of the grid was written once, and the summary covers them all
    data_path = os.path.join("coco_data", "synthetic", f"{os.path.basename(tiny_clip_dir)}_test.h5")
    runs = run_files(clone, "result")
    assert len(runs) > 5 and run_names(runs) == set(grid_names(clone, env, data_path))
    with open(os.path.join(clone, "result", "experiment_summary.json")) as f:
        summary = json.load(f)
    assert summary["runs_total"] == len(runs)
    with open(runs[0]) as f:  # the fit set is the train split's file (FIT_SPLIT=train)
        assert json.load(f)["fit"]["path"].endswith("_train.h5")


@pytest.mark.slow
def test_local_pipeline_backs_up_every_run_and_rank_file(local_run):
    clone = local_run.clone
    runs = run_files(clone, "result")
    # a timestamped archive of result/ (without older backups) and the local log
    backups = glob.glob(os.path.join(clone, "result", "backups", "result-*.tar.gz"))
    assert len(backups) == 1
    with tarfile.open(backups[0]) as tar:
        names = tar.getnames()
    # every run file is in it, and every completed run's rank file next to it (the analysis reads both)
    completed = [p for p in runs if "ranks_file" in json.load(open(p))]
    assert "./experiment_summary.json" in names and len(completed) > 5
    assert sum(n.startswith("./runs/") and n.endswith(".json") for n in names) == len(runs)
    assert {n for n in names if n.startswith("./runs/") and n.endswith(".ranks.npz")} == \
        {"./runs/" + os.path.basename(p)[:-len(".json")] + ".ranks.npz" for p in completed}
    assert not any(n.startswith("./backups") for n in names)


@pytest.mark.slow
def test_local_pipeline_writes_its_log(local_run):
    clone = local_run.clone
    logs = glob.glob(os.path.join(clone, "result", "logs", "local-*.log"))
    assert len(logs) == 1 and "submit_job: finished" in read(logs[0])


@pytest.mark.slow
def test_a_second_local_run_recomputes_nothing_and_backs_up_again(local_run, tmp_path):
    clone, env = str(tmp_path / "clone"), local_run.env
    shutil.copytree(local_run.clone, clone)   # copy2: the run files keep their modification times
    runs = run_files(clone, "result")
    # a second run finds everything done: nothing recomputed, a second backup
    mtimes = {p: os.path.getmtime(p) for p in runs}
    again = run_script(clone, env)
    assert again.returncode == 0, again.stderr[-3000:]
    assert {p: os.path.getmtime(p) for p in runs} == mtimes
    assert len(glob.glob(os.path.join(clone, "result", "backups", "result-*.tar.gz"))) == 2


@pytest.mark.slow
def test_local_default_path_trains_a_dual_encoder(tmp_path, tiny_clip_dir):
    """Without MODEL (the quickstart): prepare only makes the data, train exports the hand-off files."""
    clone = make_clone(tmp_path / "clone")
    # the quickstart's text tower (pip MiniLM), a random MobileNet image tower to stay fast, one epoch
    env = pipeline_env(tiny_clip_dir, MODEL="", SYNTHETIC_IMAGES=40, IMAGE_ENCODER="mobilenet_v3_small",
                       IMAGE_WEIGHTS="none", EPOCHS=1, EMBEDDING_DIM=16, TRAIN_BATCH_SIZE=8, RUN_NAME="tiny",
                       TRAIN_ARGS="--head_hidden 32 --batch_size_eval 32 --device cpu")
    result = run_script(clone, env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "phases: prepare train experiments analyze" in result.stdout
    data_dir = os.path.join(clone, "coco_data", "synthetic")
    assert sorted(f for f in os.listdir(data_dir) if f.endswith(".h5")) == ["dual-tiny-d16_test.h5",
                                                                            "dual-tiny-d16_train.h5"]
    assert os.path.exists(os.path.join(clone, "checkpoints", "tiny", "d16", "best.pt"))
    runs = run_files(clone, "result")
    data_path = os.path.join("coco_data", "synthetic", "dual-tiny-d16_test.h5")
    assert run_names(runs) == set(grid_names(clone, env, data_path))
    assert os.path.exists(os.path.join(clone, "result", "experiment_summary.json"))
    # run again: the exported encoder is kept, not retrained
    again = run_script(clone, env)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "train: tiny d16 already exported" in again.stdout


@pytest.mark.slow
def test_local_failure_names_the_phase_and_stops(tmp_path, tiny_clip_dir):
    clone = make_clone(tmp_path / "clone")
    result = run_script(clone, pipeline_env(tiny_clip_dir, PHASES="experiments analyze",
                                            DATA_PATH="coco_data/missing.h5"))
    assert result.returncode != 0
    assert "FAILED in phase 'experiments'" in result.stderr
    assert "missing.h5" in result.stdout + result.stderr
    assert "phase analyze" not in result.stdout  # fails fast: later phases never start
    assert not os.path.exists(os.path.join(clone, "result", "backups"))


def test_an_unknown_phase_is_refused(tmp_path, tiny_clip_dir):
    clone = make_clone(tmp_path / "clone")
    bad = run_script(clone, pipeline_env(tiny_clip_dir, PHASES="prepare sweep"))
    assert bad.returncode == 2 and "unknown phase 'sweep'" in bad.stderr


@pytest.mark.slow
def test_paths_with_spaces_and_a_separate_export_folder(tmp_path, tiny_clip_dir):
    """A clone, a dataset copy and a result folder whose paths hold spaces; hand-off files go to EXPORT_DIR
    (default coco_data/<dataset>/ of the clone), never into DATA_DIR; DATA_PATH / FIT_PATH take such paths."""
    clone = make_clone(tmp_path / "my clone")
    data_dir = tmp_path / "shared data" / "synthetic"
    subprocess.run([sys.executable, "prepare_data.py", "--dataset", "synthetic", "--data_dir", str(data_dir),
                    "--synthetic_images", "80", "--fetch_only", "data"], cwd=clone, check=True, capture_output=True)
    before = sorted(os.listdir(data_dir))
    results = tmp_path / "my results"
    result = run_script(clone, pipeline_env(tiny_clip_dir, DATA_DIR=data_dir, RESULT_DIR=results))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert sorted(os.listdir(data_dir)) == before   # nothing written into the dataset copy
    tag = os.path.basename(tiny_clip_dir)
    exported = os.path.join(clone, "coco_data", "synthetic", f"{tag}_test.h5")
    assert os.path.exists(exported) and run_files(clone, results)   # run_files joins an absolute folder as is
    # the sweep alone on absolute paths with spaces (one file each: no splitting on the space)
    again = tmp_path / "second results"
    swept = run_script(clone, pipeline_env(tiny_clip_dir, PHASES="experiments analyze", DATA_PATH=exported,
                                           FIT_PATH=exported.replace("_test.h5", "_train.h5"), RESULT_DIR=again))
    assert swept.returncode == 0, swept.stdout[-3000:] + swept.stderr[-3000:]
    def configurations(folder):   # run names without their hash (it covers the path: relative vs absolute)
        return {name.rsplit("-", 1)[0] for name in run_names(run_files(clone, folder))}
    assert configurations(again) == configurations(results)


def test_an_unknown_dataset_fails_before_any_phase(tmp_path, tiny_clip_dir):
    clone = make_clone(tmp_path / "clone")
    unknown = run_script(clone, pipeline_env(tiny_clip_dir, DATASET="nosuch"))
    assert unknown.returncode == 2
    assert re.search(r"DATASET=nosuch: unknown dataset \(choose from [a-z0-9 ]*synthetic", unknown.stderr)
    assert "DOWNLOAD" not in unknown.stderr and "phase prepare" not in unknown.stdout


def test_an_export_folder_that_cannot_exist_fails_before_training(tmp_path, tiny_clip_dir):
    clone = make_clone(tmp_path / "clone")
    # an output folder that cannot exist (its parent is a file: fails for root too) stops before training
    (tmp_path / "a file").write_text("")
    blocked = run_script(clone, pipeline_env(tiny_clip_dir, MODEL="", EXPORT_DIR=tmp_path / "a file" / "out"))
    assert blocked.returncode == 2
    assert f"EXPORT_DIR={tmp_path / 'a file' / 'out'}: not writable" in blocked.stderr
    assert "phase prepare" not in blocked.stdout and not os.path.exists(os.path.join(clone, "checkpoints"))


@pytest.mark.slow
def test_prefetch_then_offline_compute(tmp_path, tiny_clip_dir):
    clone = make_clone(tmp_path / "clone")
    # the login node: data generated, model loaded once through the code the phases use
    env = pipeline_env(tiny_clip_dir, PHASES="prefetch")
    env.pop("HF_HUB_OFFLINE")
    result = run_script(clone, env)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert "prefetch: model" in result.stdout
    assert os.path.exists(os.path.join(clone, "coco_data", "synthetic", "splits.json"))
    # a hub model that cannot be fetched fails the prefetch phase within seconds, naming the alternatives
    env_hub = dict(env, MODEL="openai/clip-vit-base-patch32", HF_ENDPOINT="https://127.0.0.1:9")
    failed = run_script(clone, env_hub, timeout=180)
    assert failed.returncode != 0
    assert "FAILED in phase 'prefetch'" in failed.stderr and "--model PATH" in failed.stdout + failed.stderr
    # the compute side with OFFLINE=1 (the default inside a job) embeds from the local folder
    offline = run_script(clone, pipeline_env(tiny_clip_dir, PHASES="prepare", OFFLINE="1", SPLITS="test"))
    assert offline.returncode == 0, offline.stderr[-2000:]
    assert "offline=1" in offline.stdout


# ----------------------------------------------------------------------------- a real Slurm

def scheduler(name, ensure_packages, start):
    """Start a private scheduler for a test module (installing its packages in CI), stop it after."""
    reason = ensure_packages(install=os.environ.get("CI", "").lower() == "true")
    if reason:
        print(f"skipping the {name} tests: {reason}", file=sys.stderr)
        pytest.skip(reason)
    cluster = start()
    try:
        yield cluster
    finally:
        cluster.stop()
        shutil.rmtree(cluster.root, ignore_errors=True)


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    yield from scheduler("Slurm", slurm_cluster.ensure_packages, slurm_cluster.start_cluster)


def slurm_env(cluster, tiny_clip_dir, **overrides):
    env = pipeline_env(tiny_clip_dir, **overrides)
    env["SLURM_CONF"] = cluster.env["SLURM_CONF"]
    # HF_HUB_OFFLINE is left out on purpose: jobs must turn it on themselves (offline compute nodes)
    env.pop("HF_HUB_OFFLINE", None)
    env.pop("TRANSFORMERS_OFFLINE", None)
    return env


def job_ids_in(text, role):
    return [line.split()[-1] for line in text.splitlines() if line.startswith(f"submit_job: submitted retrieval-{role}")]


SMALL_JOB = "--cpus-per-task=1 --mem=1G --time=15"


@pytest.mark.slow
def test_slurm_single_job_and_array_match_local(tmp_path, tiny_clip_dir, slurm):
    clone = make_clone(tmp_path / "clone")
    os.makedirs(os.path.join(clone, "result", "logs"))  # sbatch needs the log folder of the directive

    # 1. the whole pipeline as one job: `sbatch submit_job.sh`
    env = slurm_env(slurm, tiny_clip_dir)
    submitted = subprocess.run(["sbatch", "--wait", *SMALL_JOB.split(), "submit_job.sh"], cwd=clone, env=env,
                               capture_output=True, text=True, timeout=JOB_TIMEOUT_S, stdin=subprocess.DEVNULL)
    job_id = submitted.stdout.split()[-1] if submitted.stdout.split() else "?"
    log_path = os.path.join(clone, "result", "logs", f"retrieval-{job_id}.out")
    log = read(log_path) if os.path.exists(log_path) else "(no log)"
    assert submitted.returncode == 0, submitted.stderr + log[-3000:] + slurm.log_tail()
    # sbatch --wait also returns 0 for a job cancelled before it ran: the job's own last line decides
    assert f"submit_job: finished: prepare experiments analyze [job {job_id}]" in log, log[-3000:]
    assert f"slurm job {job_id}" in log and "offline=1" in log
    assert os.path.exists(os.path.join(clone, "result", "experiment_summary.json"))
    assert glob.glob(os.path.join(clone, "result", "backups", f"result-*-job{job_id}.tar.gz"))

    # 2. array mode with the prepare job in front: setup -> 2-task sweep array -> analysis (afterok chain)
    # its own data and hand-off folders (hand-off files never go under DATA_ROOT unless EXPORT_DIR says so)
    array_env = slurm_env(slurm, tiny_clip_dir, ARRAY=2, WAIT=1, DATA_ROOT="coco_data_array",
                          EXPORT_DIR="coco_data_array/synthetic",
                          RESULT_DIR="result_array", SUBMIT_ARGS=SMALL_JOB)
    chain = run_script(clone, array_env)
    logs_dir = os.path.join(clone, "result_array", "logs")
    all_logs = "\n".join(f"--- {p}\n{read(p)[-1500:]}" for p in sorted(glob.glob(os.path.join(logs_dir, "*"))))
    assert chain.returncode == 0, chain.stdout[-2000:] + chain.stderr[-2000:] + all_logs + slurm.log_tail()
    setup_id, = job_ids_in(chain.stdout, "setup")
    sweep_id, = job_ids_in(chain.stdout, "sweep")
    analyze_id, = job_ids_in(chain.stdout, "analyze")
    assert len({setup_id, sweep_id, analyze_id}) == 3
    # each array task ran its own shard and logged to its own file
    task_logs = sorted(glob.glob(os.path.join(logs_dir, f"retrieval-sweep-{sweep_id}_*.out")))
    assert len(task_logs) == 2, all_logs
    for index, path in enumerate(task_logs):
        text = read(path)
        assert f"array task {index} (sweep)" in text and f"shard {index}/2" in text
        assert "finished: experiments [job" in text
    analysis_log = read(os.path.join(logs_dir, f"retrieval-analyze-{analyze_id}.out"))
    assert "finished: analyze" in analysis_log
    assert glob.glob(os.path.join(clone, "result_array", "backups", "result-*.tar.gz"))
    data_path = os.path.join("coco_data_array", "synthetic", f"{os.path.basename(tiny_clip_dir)}_test.h5")
    runs = run_files(clone, "result_array")
    # the two shards together wrote the whole grid, each configuration once
    assert len(runs) > 5 and run_names(runs) == set(grid_names(clone, array_env, data_path))

    # 3. the same grid on the same files, locally: the same summary
    local_env = pipeline_env(tiny_clip_dir, PHASES="experiments analyze", DATA_ROOT="coco_data_array",
                             EXPORT_DIR="coco_data_array/synthetic",
                             RESULT_DIR="result_local")
    local = run_script(clone, local_env)
    assert local.returncode == 0, local.stderr[-3000:]
    assert_same_summary(os.path.join(clone, "result_array", "experiment_summary.json"),
                        os.path.join(clone, "result_local", "experiment_summary.json"))
    # and the single job (its own prepare of the same data) agrees with both
    assert_same_summary(os.path.join(clone, "result", "experiment_summary.json"),
                        os.path.join(clone, "result_local", "experiment_summary.json"))


@pytest.mark.slow
def test_slurm_array_failure_cancels_the_analysis(tmp_path, tiny_clip_dir, slurm):
    clone = make_clone(tmp_path / "clone")
    env = slurm_env(slurm, tiny_clip_dir, ARRAY=2, WAIT=1, PHASES="experiments analyze",
                    DATA_PATH="coco_data/missing.h5", SUBMIT_ARGS=SMALL_JOB)
    chain = run_script(clone, env)
    assert chain.returncode != 0
    assert "did not finish" in chain.stderr
    analyze_id, = job_ids_in(chain.stdout, "analyze")
    sweep_id, = job_ids_in(chain.stdout, "sweep")
    logs_dir = os.path.join(clone, "result", "logs")
    task_logs = glob.glob(os.path.join(logs_dir, f"retrieval-sweep-{sweep_id}_*.out"))
    assert len(task_logs) == 2
    for path in task_logs:
        assert "FAILED in phase 'experiments'" in read(path)
    # the dependent analysis never ran (kill_invalid_depend cancelled it), so it wrote nothing
    analysis_log = os.path.join(logs_dir, f"retrieval-analyze-{analyze_id}.out")
    assert not os.path.exists(analysis_log) or "finished" not in read(analysis_log)
    assert not os.path.exists(os.path.join(clone, "result", "experiment_summary.json"))


# ----------------------------------------------------------------------------- PBS and SGE (no real scheduler)

STUB_QSUB = """#!/bin/bash
# records each submission (the knobs a job would receive and qsub's options) and answers like $STUB_KIND's qsub
echo "PHASES=$PHASES ROLE=$SUBMIT_JOB_ROLE ARGS $*" >> "$STUB_LOG"
n=$(wc -l < "$STUB_LOG")
if [[ $STUB_KIND == pbs ]]; then
    if [[ " $* " == *" -J "* ]]; then echo "${n}00[].server"; else echo "${n}00.server"; fi
else
    if [[ " $* " == *" -t "* ]]; then echo "${n}00.1-3:1"; else echo "${n}00"; fi
fi
"""


def random_handoff_file(path):
    import numpy as np
    from retrieval.handoff import Embeddings, l2_normalize, make_attrs, write_embeddings
    rng = np.random.default_rng(0)
    images = l2_normalize(rng.normal(size=(30, 16)))
    text_to_image = np.repeat(np.arange(30), 5)
    texts = l2_normalize(images[text_to_image] + 0.8 * rng.normal(size=(150, 16)))
    emb = Embeddings(images, texts, text_to_image, [f"img{i}.jpg" for i in range(30)],
                     [f"caption {i}" for i in range(150)], make_attrs("toy", "test", "random", 16))
    return write_embeddings(str(path), emb)


@pytest.mark.parametrize("kind", ["pbs", "sge"])
@pytest.mark.slow
def test_array_submission_and_tasks_on_pbs_and_sge(tmp_path, tiny_clip_dir, kind):
    clone = make_clone(tmp_path / "clone")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "qsub").write_text(STUB_QSUB)
    (bin_dir / "qsub").chmod(0o755)
    stub_log = tmp_path / "qsub.log"
    env = pipeline_env(tiny_clip_dir, ARRAY=3, WAIT=1, PHASES="prepare experiments analyze", SCHEDULER=kind,
                       STUB_KIND=kind, STUB_LOG=stub_log, PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    submitted = run_script(clone, env)
    assert submitted.returncode == 0, submitted.stdout[-2000:] + submitted.stderr[-2000:]
    calls = stub_log.read_text().splitlines()
    assert len(calls) == 3
    setup, sweep, analyze = calls
    assert setup.startswith("PHASES=prepare ROLE=setup ")
    assert sweep.startswith("PHASES=experiments ROLE=sweep ") and analyze.startswith("PHASES=analyze ROLE=analyze ")
    if kind == "pbs":
        assert "-W depend=afterok:100.server" in sweep and "-J 0-2" in sweep
        assert "-W depend=afterok:200[].server" in analyze and "-W block=true" in analyze
    else:
        assert "-hold_jid 100 " in sweep and "-t 1-3" in sweep
        assert "-hold_jid 200 " in analyze and "-sync y" in analyze
    assert all("-V" in call.split() and call.endswith("submit_job.sh") for call in calls)

    # the array tasks as the scheduler starts them: the shard comes from the scheduler's task index
    data_path = random_handoff_file(tmp_path / "toy_test.h5")
    task = {"pbs": {"PBS_JOBID": "200[1].server", "PBS_ARRAY_INDEX": "1", "PBS_O_WORKDIR": clone},
            "sge": {"JOB_ID": "200", "SGE_TASK_ID": "2", "SGE_O_WORKDIR": clone}}[kind]
    env_task = pipeline_env(tiny_clip_dir, ARRAY=3, PHASES="experiments", SUBMIT_JOB_ROLE="sweep",
                            DATA_PATH=data_path, FIT_SPLIT="", **task)
    ran = subprocess.run(["bash", os.path.join(clone, "submit_job.sh")], cwd=str(tmp_path), env=env_task,
                         capture_output=True, text=True, timeout=JOB_TIMEOUT_S, stdin=subprocess.DEVNULL)
    assert ran.returncode == 0, ran.stdout[-2000:] + ran.stderr[-2000:]
    assert f"{kind} job" in ran.stdout and "array task 1 (sweep)" in ran.stdout and "offline=1" in ran.stdout
    assert "shard 1/3" in ran.stdout
    # the task ran exactly its block of the grid (contiguous thirds), nothing else
    all_names = grid_names(clone, env_task, data_path, fit=False)
    written = run_names(run_files(clone, "result"))
    n = len(all_names)
    assert n >= 6 and written == set(all_names[n // 3:2 * n // 3])
    # a failing task: SGE needs exit status 100 to keep -hold_jid dependants from starting
    failed = subprocess.run(["bash", os.path.join(clone, "submit_job.sh")], cwd=str(tmp_path),
                            env=dict(env_task, DATA_PATH=str(tmp_path / "missing.h5")), capture_output=True,
                            text=True, timeout=JOB_TIMEOUT_S, stdin=subprocess.DEVNULL)
    assert failed.returncode == (100 if kind == "sge" else 1), failed.stderr[-2000:]
    assert "FAILED in phase 'experiments'" in failed.stderr


# ----------------------------------------------------------------------------- a real Son of Grid Engine

@pytest.fixture(scope="module")
def sge(tmp_path_factory):
    yield from scheduler("SGE", sge_cluster.ensure_packages, sge_cluster.start_cell)


@pytest.mark.slow
def test_sge_single_job_and_array_match(tmp_path, tiny_clip_dir, sge):
    clone = make_clone(tmp_path / "clone")
    os.makedirs(os.path.join(clone, "result", "logs"))
    env = pipeline_env(tiny_clip_dir, **{k: sge.env[k] for k in ("SGE_ROOT", "SGE_CELL", "SGE_QMASTER_PORT",
                                                                "SGE_EXECD_PORT")})
    env.pop("HF_HUB_OFFLINE")
    # 1. `qsub submit_job.sh` (the #$ directives; a one-slot parallel environment instead of four)
    submitted = subprocess.run(["qsub", "-sync", "y", "-pe", "smp", "1", "submit_job.sh"], cwd=clone, env=env,
                               capture_output=True, text=True, timeout=JOB_TIMEOUT_S, stdin=subprocess.DEVNULL)
    logs = glob.glob(os.path.join(clone, "result", "logs", "retrieval.o*"))
    log = read(logs[0]) if logs else "(no log)"
    assert submitted.returncode == 0, submitted.stdout + submitted.stderr + log[-3000:] + sge.log_tail()
    job_id = os.path.basename(logs[0]).split(".o")[-1]
    assert f"sge job {job_id}" in log and "offline=1" in log
    assert f"submit_job: finished: prepare experiments analyze [job {job_id}]" in log

    # 2. the sweep again as a 2-task array (-t) + analysis held on it (-hold_jid), waited for with -sync y
    array_env = dict(env, ARRAY="2", WAIT="1", SCHEDULER="sge", PHASES="experiments analyze",
                     RESULT_DIR="result_array", SUBMIT_ARGS="-pe smp 1")
    chain = run_script(clone, array_env)
    logs_dir = os.path.join(clone, "result_array", "logs")
    all_logs = "\n".join(f"--- {p}\n{read(p)[-1500:]}" for p in sorted(glob.glob(os.path.join(logs_dir, "*"))))
    assert chain.returncode == 0, chain.stdout[-2000:] + chain.stderr[-2000:] + all_logs + sge.log_tail()
    sweep_id, = job_ids_in(chain.stdout, "sweep")
    task_logs = sorted(glob.glob(os.path.join(logs_dir, f"retrieval-sweep.o{sweep_id}.*")))
    assert len(task_logs) == 2, all_logs
    for index, path in enumerate(task_logs):  # SGE task i (from 1) runs shard i - 1
        assert f"shard {index}/2" in read(path) and "finished: experiments" in read(path)
    assert_same_summary(os.path.join(clone, "result", "experiment_summary.json"),
                        os.path.join(clone, "result_array", "experiment_summary.json"))


def test_a_misspelt_knob_fails_before_any_phase(tmp_path, tiny_clip_dir):
    # EMBEDING_DIMS / PRECISION would otherwise be ignored and the default grid run without a word
    clone = make_clone(tmp_path / "clone")
    for name, meant in (("EMBEDING_DIMS", "EMBEDDING_DIMS"), ("PRECISION", "PRECISIONS"),
                        ("CANDIDATE_SIZES_LIST", "CANDIDATE_SIZES")):
        result = run_script(clone, pipeline_env(tiny_clip_dir, **{name: "32"}))
        assert result.returncode == 2, result.stderr
        assert f"submit_job: error: {name} is set but is not a knob (did you mean {meant}?)" in result.stderr
        assert "phase prepare" not in result.stdout
        assert not os.path.exists(os.path.join(clone, "coco_data"))
