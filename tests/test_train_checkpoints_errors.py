"""Issue #28, training / checkpoints / the scripts' common error handling: checkpoint exports named by their
run, refused training runs that write nothing, --resume with changed model-shaping flags, Ctrl-C as one
line and exit 130, numeric flags refused at parse time, missing or too small synthetic data said early."""
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

import prepare_data
import search
import train_dual_encoder
from retrieval import checkpoint as ckpt
from retrieval import handoff
from retrieval.errors import INTERRUPTED_STATUS
from retrieval.synthetic import make_synthetic
from test_train import base_args, make_tiny_bert

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def tiny_bert_dir(tmp_path_factory):
    return make_tiny_bert(str(tmp_path_factory.mktemp("tiny_bert")))


@pytest.fixture(scope="module")
def trained(synthetic_dir, tiny_bert_dir, tmp_path_factory):
    """Two one-step runs r1 and r2 (seeds 0 and 1) of the same dim 16 in one model folder."""
    model_dir = tmp_path_factory.mktemp("ck")
    for name, seed in (("r1", "0"), ("r2", "1")):
        train_dual_encoder.main(base_args(synthetic_dir, tiny_bert_dir, model_dir, "--max_steps", "1",
                                          "--run_name", name, "--seed", seed))
    return model_dir


@pytest.fixture
def model_dir(trained, tmp_path):
    """A copy of the trained runs this test may change."""
    return shutil.copytree(trained, tmp_path / "ck")


def files_of(folder):
    """{relative path: bytes} of every file under folder."""
    found = {}
    for root, _, names in os.walk(folder):
        for name in names:
            path = os.path.join(root, name)
            found[os.path.relpath(path, folder)] = open(path, "rb").read()
    return found


def never_called(what):
    def fail(*args, **kwargs):
        raise AssertionError(f"{what} must not run")
    return fail


# ----------------------------------------------------------------------------- 1. export names

def test_two_runs_with_one_dim_give_two_exports_with_their_own_vectors(model_dir, synthetic_dir, tmp_path, capsys):
    out = tmp_path / "out"
    written = {}
    for name in ("r1", "r2"):
        written[name] = prepare_data.main(["--quiet", "--device", "cpu", "--dataset", "synthetic", "--data_dir",
                                           synthetic_dir, "--checkpoint", str(model_dir / name / "d16" / "best.pt"),
                                           "--splits", "test", "--output_dir", str(out), "--num_workers", "0",
                                           "--no_eval"])["test"]
    assert "skip test" not in capsys.readouterr().out
    assert written == {name: str(out / f"{name}-d16-best_test.h5") for name in ("r1", "r2")}
    r1, r2 = (handoff.read_embeddings(written[name]) for name in ("r1", "r2"))
    assert r1.attrs["model_tag"] == "dual-r1-d16" and r2.attrs["model_tag"] == "dual-r2-d16"
    assert not np.allclose(r1.image_embeddings, r2.image_embeddings)


# ----------------------------------------------------------------------------- 2. a refused run writes nothing

def test_refused_run_leaves_args_json_and_the_log_byte_identical(model_dir, synthetic_dir, tiny_bert_dir):
    before = files_of(model_dir)
    with pytest.raises(SystemExit) as e:
        train_dual_encoder.main(base_args(synthetic_dir, tiny_bert_dir, model_dir, "--run_name", "r1",
                                          "--epochs", "99", "--lr", "0.123"))
    last = model_dir / "r1" / "d16" / "last.pt"
    assert str(e.value) == f"error: {last}: run exists; pass --resume to continue or --overwrite to start over"
    assert files_of(model_dir) == before and {"r1/args.json", "r1/log.jsonl"} <= set(before)


# ----------------------------------------------------------------------------- 3. --resume with other flags

@pytest.mark.parametrize("flags, changed", [
    (["--head", "linear"], "--head mlp, not linear; give the same value"),
    (["--head_hidden", "64"], "--head_hidden 32, not 64; give the same value"),
    (["--head", "linear", "--head_hidden", "64", "--image_pool", "multi"],
     "--image_pool last, not multi; --head mlp, not linear; --head_hidden 32, not 64; give the same values")])
def test_resume_with_a_changed_model_flag_is_one_line_naming_the_flags(flags, changed, model_dir, synthetic_dir,
                                                                         tiny_bert_dir):
    before = files_of(model_dir)
    with pytest.raises(SystemExit) as e:
        train_dual_encoder.main(base_args(synthetic_dir, tiny_bert_dir, model_dir, "--run_name", "r1",
                                          "--max_steps", "2", "--resume", *flags))
    last = model_dir / "r1" / "d16" / "last.pt"
    assert str(e.value) == f"error: --resume: {last} was trained with {changed} or --overwrite"
    assert files_of(model_dir) == before


def test_resume_with_a_new_dim_says_it_starts_that_dim_fresh(model_dir, synthetic_dir, tiny_bert_dir, capsys):
    results = train_dual_encoder.main(base_args(synthetic_dir, tiny_bert_dir, model_dir, "--run_name", "r1",
                                                "--max_steps", "2", "--resume", "--embedding_dim", "16", "8"))
    out = capsys.readouterr().out.splitlines()
    assert f"note: --resume: {model_dir / 'r1' / 'd8' / 'last.pt'} does not exist; d8 starts fresh" in out
    assert f"resumed {model_dir / 'r1' / 'd16' / 'last.pt'}: epoch 0 batch 1 step 1" in out
    assert len(results[16]["losses"]) == 1 and len(results[8]["losses"]) == 2


# ----------------------------------------------------------------------------- 4. Ctrl-C

def interrupt(command, ready, cwd=ROOT, timeout=120):
    """Start `command`, send it SIGINT once ready() is true, return (exit status, stderr)."""
    # SIGINT as a terminal's Ctrl-C delivers it: a background job of a shell may inherit it ignored.
    process = subprocess.Popen(command, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                               env={**os.environ, "TQDM_DISABLE": "1"},
                               preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.time() + timeout
    while not ready():
        assert process.poll() is None and time.time() < deadline, "finished or stuck before the interrupt"
        time.sleep(0.02)
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=timeout)
    return process.returncode, stderr


def test_ctrl_c_during_training_is_one_line_exit_130_and_resume_continues(synthetic_dir, tiny_bert_dir, tmp_path,
                                                                          capsys):
    # Frozen towers (cached features): an epoch takes a fraction of a second, so the run is mid-training.
    args = base_args(synthetic_dir, tiny_bert_dir, tmp_path, "--epochs", "1000", "--save_every", "1",
                     "--freeze_image", "--freeze_text")
    log = tmp_path / "tiny" / "log.jsonl"
    # last.pt is written before the epoch's log line: once the log has a line, there is a checkpoint.
    status, stderr = interrupt([sys.executable, "train_dual_encoder.py", *args],
                               lambda: log.exists() and log.stat().st_size > 0)
    assert status == INTERRUPTED_STATUS and "Traceback" not in stderr, stderr
    assert stderr.strip().splitlines()[-1] == ("interrupted; the last checkpoint is kept; run the same command "
                                               "with --resume to continue")
    last = tmp_path / "tiny" / "d16" / "last.pt"
    step = ckpt.load_checkpoint(str(last))["step"]
    results = train_dual_encoder.main(args + ["--resume", "--max_steps", str(step + 1)])
    assert f"resumed {last}: " in capsys.readouterr().out and len(results[16]["losses"]) == 1
    assert ckpt.load_checkpoint(str(last))["step"] == step + 1


def test_ctrl_c_during_prepare_keeps_the_finished_split_and_the_same_command_writes_the_rest(tiny_clip_dir, tmp_path,
                                                                                               capsys):
    data_dir = make_synthetic(str(tmp_path / "syn"), num_images=600, seed=0)
    out = tmp_path / "out"
    args = ["--dataset", "synthetic", "--data_dir", data_dir, "--model", tiny_clip_dir, "--device", "cpu",
            "--splits", "dev", "test", "--output_dir", str(out), "--batch_size", "1", "--text_batch_size", "1",
            "--num_workers", "0", "--quiet", "--no_eval"]
    dev = out / f"{os.path.basename(tiny_clip_dir)}_dev.h5"
    status, stderr = interrupt([sys.executable, "prepare_data.py", *args], dev.exists)
    assert status == INTERRUPTED_STATUS and "Traceback" not in stderr, stderr
    assert stderr.strip().splitlines()[-1] == ("interrupted; finished splits kept; run the same command to write "
                                               "the rest")
    assert sorted(os.listdir(out)) == [dev.name]   # no half-written test file, no temp left
    kept = dev.read_bytes()
    written = prepare_data.main(args)
    assert f"skip dev: {dev} exists (use --overwrite to redo)" in capsys.readouterr().out
    assert dev.read_bytes() == kept and set(written) == {"test"} and os.path.exists(written["test"])


# ----------------------------------------------------------------------------- 5. numeric flags

@pytest.mark.parametrize("script, flags, line", [
    (train_dual_encoder, ["--warmup", "-1"], "error: --warmup: -1 must be a fraction between 0 and 1 (see --help)"),
    (train_dual_encoder, ["--num_workers", "-3"], "error: --num_workers: -3 must be >= 0 (see --help)"),
    (train_dual_encoder, ["--epochs", "0"], "error: --epochs: 0 must be >= 1 (see --help)"),
    (train_dual_encoder, ["--batch_size", "1"],
     "error: --batch_size: 1 must be >= 2 (InfoNCE needs negatives) (see --help)"),
    (train_dual_encoder, ["--embedding_dim", "16", "0"], "error: --embedding_dim: 0 must be >= 1 (see --help)"),
    (train_dual_encoder, ["--head_dropout", "1"], "error: --head_dropout: 1 must be >= 0 and < 1 (see --help)"),
    (train_dual_encoder, ["--epochs", "two"], "error: --epochs: 'two' is not an integer (see --help)"),
    (prepare_data, ["--num_workers", "-3"],
     "error: --num_workers: -3 must be >= -1 (-1 = min(8, CPU cores)) (see --help)"),
    (prepare_data, ["--batch_size", "-1"], "error: --batch_size: -1 must be >= 0 (see --help)"),
    (search, ["--query", "a red circle", "--top_k", "0"], "error: --top_k: 0 must be >= 1 (see --help)")])
def test_bad_numeric_flag_is_one_line_at_parse_time(script, flags, line, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as e:
        script.main(flags)
    assert e.value.code == 2
    assert capsys.readouterr().err == line + "\n"
    assert os.listdir(tmp_path) == []


# ----------------------------------------------------------------------------- 6. missing / tiny synthetic data

def test_trainer_on_a_missing_synthetic_folder_says_how_to_generate_it(tiny_bert_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(train_dual_encoder, "train", never_called("training"))
    missing = tmp_path / "X"
    with pytest.raises(SystemExit) as e:
        train_dual_encoder.main(base_args(str(missing), tiny_bert_dir, tmp_path / "ck"))
    assert str(e.value) == (f"error: {missing}: no synthetic dataset here; generate it first: python prepare_data.py "
                            f"--dataset synthetic --data_dir {missing} --fetch_only data")
    assert os.listdir(tmp_path) == []


def test_too_few_synthetic_images_fail_before_any_model_or_write(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(prepare_data, "load_encoder", never_called("the model loader"))
    with pytest.raises(SystemExit) as e:
        prepare_data.main(["--dataset", "synthetic", "--data_dir", str(tmp_path / "syn"), "--synthetic_images", "3"])
    assert str(e.value) == ("error: --synthetic_images 3: too few images for the train/dev/test splits "
                            "(50/10/40 %: 2/0/1 images); give at least 6")
    assert os.listdir(tmp_path) == []
