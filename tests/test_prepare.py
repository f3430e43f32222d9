"""prepare_data.py end to end with a tiny random CLIP saved locally (no network)."""
import os

import numpy as np
import pytest
import torch
from PIL import Image

import prepare_data
import train_dual_encoder
from conftest import as_script
from retrieval import data, handoff, hf_models, models


@pytest.fixture(autouse=True)
def in_tmp_path(tmp_path, monkeypatch):
    """Each test runs in its own folder: default outputs (coco_data/<dataset>/) land there, not in the repo."""
    monkeypatch.chdir(tmp_path)


def run(*argv):
    return prepare_data.main(["--quiet", "--device", "cpu", "--batch_size", "8", *argv])


def test_synthetic_to_file_matches_direct_clip(tmp_path, tiny_clip_dir):
    data_dir = tmp_path / "synthetic"
    written = run("--dataset", "synthetic", "--data_dir", str(data_dir), "--synthetic_images", "40",
                  "--model", tiny_clip_dir, "--splits", "dev", "test", "--num_workers", "0")
    tag = models.model_tag(tiny_clip_dir)
    # outputs go to coco_data/<dataset>/ (of the working folder), never into the data folder unless asked
    assert written == {s: os.path.join("coco_data", "synthetic", f"{tag}_{s}.h5") for s in ("dev", "test")}
    assert not list(data_dir.glob("*.h5"))
    emb = handoff.read_embeddings(written["test"])  # validates shapes, norms, index range
    split = data.load_split("synthetic", str(data_dir), "test")
    assert emb.image_ids == split.image_files and emb.captions == split.captions
    assert np.array_equal(emb.text_to_image, split.text_to_image)
    assert emb.image_embeddings.dtype == np.float32 and emb.dim == 16
    assert emb.attrs["dataset"] == "synthetic" and emb.attrs["split"] == "test" and emb.attrs["model"] == tiny_clip_dir
    assert emb.attrs["image_root"] == split.image_root and emb.attrs["seed"] == 0 and emb.attrs["skipped"] == []
    assert emb.attrs["split_source"].startswith("seeded")

    # the same numbers as calling transformers' CLIP directly
    from transformers import CLIPImageProcessor, CLIPModel, CLIPTokenizer
    clip = CLIPModel.from_pretrained(tiny_clip_dir).eval()
    processor = CLIPImageProcessor.from_pretrained(tiny_clip_dir)
    tokenizer = CLIPTokenizer.from_pretrained(tiny_clip_dir)
    images = [Image.open(os.path.join(split.image_root, name)).convert("RGB") for name in split.image_files[:2]]
    with torch.no_grad():
        pixels = processor(images=images, return_tensors="pt")["pixel_values"]
        image_features = hf_models.projected_features(clip.get_image_features(pixel_values=pixels))
        tokens = tokenizer(split.captions[:3], padding=True, return_tensors="pt")
        text_features = hf_models.projected_features(clip.get_text_features(**tokens))
    expected_images = torch.nn.functional.normalize(image_features, dim=-1).numpy()
    expected_texts = torch.nn.functional.normalize(text_features, dim=-1).numpy()
    np.testing.assert_allclose(emb.image_embeddings[:2], expected_images, atol=2e-4)
    np.testing.assert_allclose(emb.text_embeddings[:3], expected_texts, atol=2e-4)


def test_corrupt_images_skipped_listed_and_reindexed(tmp_path, tiny_clip_dir, capsys):
    images = tmp_path / "imgs"
    images.mkdir()
    rng = np.random.default_rng(0)
    names = [f"ok{i}.jpg" for i in range(6)]
    for name in names:
        Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(images / name)
    (images / "garbage.jpg").write_bytes(b"this is not a jpeg at all")
    full = (images / "ok0.jpg").read_bytes()
    (images / "truncated.jpg").write_bytes(full[: len(full) // 2])
    rows = ["image,caption,split"]
    for name in ["garbage.jpg"] + names[:3] + ["truncated.jpg"] + names[3:]:
        rows += [f"{name},first caption of {name},all", f'{name},"second, of {name}",all']
    (tmp_path / "caps.csv").write_text("\n".join(rows) + "\n")
    out = tmp_path / "out"
    written = run("--dataset", "csv", "--images", str(images), "--captions", str(tmp_path / "caps.csv"),
                  "--model", tiny_clip_dir, "--output_dir", str(out), "--num_workers", "2",
                  "--output_format", "npz")
    emb = handoff.read_embeddings(written["all"])
    assert written["all"].endswith("_all.npz")
    assert emb.image_ids == names and len(emb.captions) == 12
    for caption, image in zip(emb.captions, emb.text_to_image):
        assert caption.endswith(emb.image_ids[image])  # captions still point at their own image
    unreadable = [s for s in emb.attrs["skipped"] if "unreadable" in s]
    assert len(unreadable) == 2 and any("garbage.jpg" in s for s in unreadable)
    assert any("truncated.jpg" in s for s in unreadable) and emb.attrs["num_unreadable_images"] == 2
    printed = capsys.readouterr().out
    assert "all: 6 images, 12 captions, 2 skipped" in printed and "RSUM" in printed


def test_skip_existing_and_overwrite(tmp_path, tiny_clip_dir, capsys):
    args = ["--dataset", "synthetic", "--data_dir", str(tmp_path / "syn"), "--synthetic_images", "24",
            "--model", tiny_clip_dir, "--splits", "test", "--num_workers", "0", "--no_eval"]
    path = run(*args)["test"]
    before = os.stat(path).st_mtime_ns
    assert run(*args) == {}
    assert "exists (use --overwrite" in capsys.readouterr().out
    assert os.stat(path).st_mtime_ns == before
    assert run(*args, "--overwrite") == {"test": path}
    assert os.stat(path).st_mtime_ns != before
    assert [f for f in os.listdir(os.path.dirname(path)) if f.startswith(".")] == []  # no temp files left


def test_bad_input_fails_with_the_file_and_writes_nothing(tmp_path, tiny_clip_dir):
    (tmp_path / "imgs").mkdir()
    with pytest.raises(SystemExit, match=r"error: .*missing\.csv: caption file not found"):
        run("--dataset", "csv", "--images", str(tmp_path / "imgs"), "--captions", str(tmp_path / "missing.csv"),
            "--model", tiny_clip_dir, "--output_dir", str(tmp_path / "out"), "--splits", "all")
    with pytest.raises(SystemExit, match=r"error: .*nowhere: dataset folder not found"):
        run("--dataset", "flickr8k", "--data_dir", str(tmp_path / "nowhere"), "--model", tiny_clip_dir)
    assert not (tmp_path / "out").exists()


def never_called(what):
    def fail(*args, **kwargs):
        pytest.fail(f"{what} ran although an output folder is not writable")  # not caught by @cli
    return fail


def test_unwritable_output_dir_fails_before_data_or_model(tmp_path, monkeypatch):
    monkeypatch.setattr(prepare_data, "load_encoder", never_called("the model loader"))
    monkeypatch.setattr(prepare_data.synthetic, "make_synthetic", never_called("the data generator"))
    (tmp_path / "file").write_text("a regular file, so this fails even for root")
    out = tmp_path / "file" / "out"
    with pytest.raises(SystemExit) as e:
        run("--dataset", "synthetic", "--data_dir", str(tmp_path / "syn"), "--model", "never/loaded",
            "--output_dir", str(out))
    assert str(e.value) == (f"error: {out}: not writable ({tmp_path / 'file'} is not a folder); "
                            "choose another output folder with --output_dir")
    assert sorted(os.listdir(tmp_path)) == ["file"]  # no data generated, no folder made


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores file permissions")
def test_read_only_output_dir_fails_before_data_or_model(tmp_path, monkeypatch):
    monkeypatch.setattr(prepare_data, "load_encoder", never_called("the model loader"))
    monkeypatch.setattr(prepare_data.synthetic, "make_synthetic", never_called("the data generator"))
    locked = tmp_path / "read_only_copy"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        with pytest.raises(SystemExit, match=rf"^error: {locked}: not writable \(Permission denied\); choose "
                                             r"another output folder with --output_dir$"):
            run("--dataset", "synthetic", "--data_dir", str(tmp_path / "syn"), "--output_dir", str(locked))
    finally:
        locked.chmod(0o755)
    assert not (tmp_path / "syn").exists()


# train_dual_encoder.py's early check sits next to prepare_data's: both are io.require_writable before any model.
@pytest.mark.parametrize("flag", ["--model_dir", "--export_dir"])
def test_train_unwritable_folder_fails_before_training(tmp_path, monkeypatch, flag):
    monkeypatch.setattr(train_dual_encoder, "train", never_called("training"))
    monkeypatch.setattr(train_dual_encoder, "init_distributed", never_called("the process group"))
    (tmp_path / "file").write_text("a regular file")
    bad = tmp_path / "file" / "sub"
    folders = {"--model_dir": str(tmp_path / "checkpoints"), "--export_dir": str(tmp_path / "exports"), flag: str(bad)}
    with pytest.raises(SystemExit) as e:
        train_dual_encoder.main(["--dataset", "synthetic", "--data_dir", str(tmp_path / "syn"),
                                 *[item for pair in folders.items() for item in pair]])
    assert str(e.value) == (f"error: {bad}: not writable ({tmp_path / 'file'} is not a folder); "
                            f"choose another output folder with {flag}")
    assert sorted(os.listdir(tmp_path)) == ["file"]


def test_unreachable_hub_is_one_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(SystemExit) as e:
        run("--dataset", "synthetic", "--data_dir", str(tmp_path / "syn"), "--synthetic_images", "24",
            "--model", "openai/clip-vit-base-patch32", "--splits", "test")
    message = str(e.value)
    assert "--model PATH" in message and "efficientnet_lite0" in message and "minilm" in message
    assert not list((tmp_path / "syn").glob("*.h5"))
    with pytest.raises(SystemExit, match="not a model folder"):
        as_script(models.load_encoder, str(tmp_path), None, "cpu")


def test_model_tag():
    assert models.model_tag("openai/clip-vit-base-patch32") == "clip-vit-base-patch32"
    assert models.model_tag("/some/dir/my model/") == "my-model"
    assert models.model_tag("x", "checkpoints/run1/best.pt") == "run1-best"
