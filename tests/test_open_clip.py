"""open_clip models (retrieval/open_clip_models.py) on a tiny randomly initialised open_clip model built here (no
weights, no network): the --model forms, the same numbers as open_clip itself, the offline error, and one run end
to end through prepare_data.py, run_experiments.py and search.py."""
import json
import os
import time

import numpy as np
import pytest
import torch
from PIL import Image

import prepare_data
import run_experiments
import search
from conftest import as_script
from retrieval import handoff, models, open_clip_models

open_clip = pytest.importorskip("open_clip")

TINY_CFG = {"embed_dim": 16,
            "vision_cfg": {"image_size": 32, "layers": 2, "width": 32, "head_width": 16, "patch_size": 8},
            "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2}}


@pytest.fixture(scope="session")
def tiny_open_clip(tmp_path_factory):
    """A folder in the hub's open_clip layout (open_clip_config.json + open_clip_pytorch_model.bin) of a random
    tiny model, and the same weights as a bare checkpoint file of the registered architecture TinyZooTest."""
    root = tmp_path_factory.mktemp("tiny_open_clip")
    folder = root / "tiny-oc"
    folder.mkdir()
    torch.manual_seed(0)
    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": TINY_CFG, "preprocess_cfg": {}}))
    model = open_clip.create_model("TinyZooTest", pretrained=None) if "TinyZooTest" in open_clip.list_models() \
        else None
    if model is None:
        (root / "configs").mkdir()
        (root / "configs" / "TinyZooTest.json").write_text(json.dumps(TINY_CFG))
        open_clip.add_model_config(str(root / "configs"))
        model = open_clip.create_model("TinyZooTest", pretrained=None)
    torch.save(model.state_dict(), folder / "open_clip_pytorch_model.bin")
    torch.save(model.state_dict(), root / "tiny.pt")
    return str(folder), str(root / "tiny.pt")


def make_flickr30k(root, n=12):
    """A Flickr30k folder: n noise images in flickr30k-images/ and a Karpathy file, all of them test, 5 captions."""
    rng = np.random.default_rng(0)
    (root / "flickr30k-images").mkdir(parents=True)
    entries = []
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(root / "flickr30k-images" / f"{i}.jpg")
        entries.append({"filename": f"{i}.jpg", "imgid": i, "split": "test", "sentids": [],
                        "sentences": [{"raw": f"picture number {i} view {k}", "tokens": []} for k in range(5)]})
    (root / "dataset_flickr30k.json").write_text(json.dumps({"images": entries, "dataset": "flickr30k"}))
    return str(root)


def test_model_forms_and_tags(tiny_open_clip, tmp_path):
    folder, checkpoint = tiny_open_clip
    assert open_clip_models.parse(f"open_clip:{folder}").model_name == f"local-dir:{folder}"
    assert open_clip_models.parse(f"open_clip:TinyZooTest/{checkpoint}") == \
        open_clip_models.OpenClipSpec("TinyZooTest", checkpoint)
    assert open_clip_models.is_open_clip(folder) and not open_clip_models.is_open_clip(str(tmp_path))
    assert models.model_tag("open_clip:ViT-B-32/laion2b_s34b_b79k") == "ViT-B-32-laion2b_s34b_b79k"
    assert models.model_tag(f"open_clip:TinyZooTest/{checkpoint}") == "TinyZooTest-tiny"
    assert models.model_tag(f"open_clip:{folder}") == "tiny-oc"
    assert models.model_tag("openai/clip-vit-base-patch32") == "clip-vit-base-patch32"   # today's names unchanged
    for name, fault in [("open_clip:ViT-B-32", "expected open_clip:ARCH/TAG"),
                        ("open_clip:NoSuchArch/x", "'NoSuchArch' is not an open_clip architecture"),
                        ("open_clip:ViT-B-32/no_such_tag", r"'no_such_tag' is neither a file nor a tag of ViT-B-32 "
                                                           r"\(tags: openai, laion400m_e31"),
                        (f"open_clip:{tmp_path}", "has no open_clip_config.json")]:
        with pytest.raises(SystemExit, match=fault):
            as_script(models.load_encoder, name, None, "cpu")


def test_unreachable_weights_are_one_line_in_seconds(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(open_clip, "create_model_and_transforms",
                        lambda *a, **k: pytest.fail("open_clip was asked to load weights it cannot get"))
    started = time.time()
    for model in ("open_clip:ViT-B-32/laion2b_s34b_b79k", "open_clip:hf-hub:laion/CLIP-ViT-B-32-laion2B-s34B-b79K"):
        with pytest.raises(SystemExit) as e:
            prepare_data.main(["--dataset", "synthetic", "--data_dir", str(tmp_path / "syn"), "--synthetic_images",
                               "24", "--splits", "test", "--model", model, "--output_dir", str(tmp_path / "out")])
        message = str(e.value)
        assert message.startswith(f"error: --model {model}: the weights are not in the local cache")
        assert "\n" not in message and "open_clip:ARCH/FILE" in message and "open_clip:FOLDER" in message
    assert time.time() - started < 20
    assert not (tmp_path / "out").exists() or not os.listdir(tmp_path / "out")


def test_embeddings_are_open_clips_own(tiny_open_clip, tmp_path):
    folder, checkpoint = tiny_open_clip
    data_dir = make_flickr30k(tmp_path / "f30k", n=4)
    written = prepare_data.main(["--dataset", "flickr30k", "--data_dir", data_dir, "--splits", "test", "--quiet",
                                 "--model", f"open_clip:TinyZooTest/{checkpoint}", "--device", "cpu",
                                 "--num_workers", "0", "--output_dir", str(tmp_path / "out"), "--no_eval"])
    emb = handoff.read_embeddings(written["test"])
    assert os.path.basename(written["test"]) == "TinyZooTest-tiny_test.h5" and emb.dim == 16
    model, _, preprocess = open_clip.create_model_and_transforms("TinyZooTest", pretrained=checkpoint)
    tokenizer = open_clip.get_tokenizer("TinyZooTest")
    model.eval()
    with torch.no_grad():
        pixels = torch.stack([preprocess(Image.open(os.path.join(data_dir, "flickr30k-images", name)))
                              for name in emb.image_ids])
        images = torch.nn.functional.normalize(model.encode_image(pixels), dim=-1).numpy()
        texts = torch.nn.functional.normalize(model.encode_text(tokenizer(emb.captions)), dim=-1).numpy()
    np.testing.assert_allclose(emb.image_embeddings, images, atol=1e-5)
    np.testing.assert_allclose(emb.text_embeddings, texts, atol=1e-5)
    assert emb.attrs["split_name"] == "Flickr30k 1K test (Karpathy)" and emb.attrs["captions_per_image"] == 5


def test_open_clip_end_to_end_prepare_sweep_search(tiny_open_clip, tmp_path, monkeypatch):
    folder, _ = tiny_open_clip
    monkeypatch.chdir(tmp_path)
    data_dir = make_flickr30k(tmp_path / "f30k")
    written = prepare_data.main(["--dataset", "flickr30k", "--data_dir", data_dir, "--splits", "test", "--quiet",
                                 "--model", f"open_clip:{folder}", "--device", "cpu", "--num_workers", "0"])
    path = written["test"]
    assert path == os.path.join("coco_data", "flickr30k", "tiny-oc_test.h5")
    run_experiments.main(["--data_path", path, "--output_dir", "result", "--embedding_dims", "8",
                          "--precisions", "fp16", "binary", "--candidate_sizes", "4", "--recall_k", "1", "3",
                          "--min_time", "0", "--latency_queries", "2", "--num_workers", "1"])
    runs = [json.load(open(os.path.join("result", "runs", name))) for name in os.listdir(os.path.join("result", "runs"))
            if name.endswith(".json")]
    assert runs and all(r.get("skipped") is None for r in runs)
    record = search.main(["--query", "picture number 3", "--top_k", "3", "--data_path", path,
                          "--output_dir", "out", "--device", "cpu"])
    # search.py loaded the model the file names (attribute `model`) and ranked its images as that model does
    emb = handoff.read_embeddings(path)
    assert record["model"] == emb.attrs["model"] == f"open_clip:{folder}"
    query = models.load_encoder(f"open_clip:{folder}", None, "cpu").embed_texts(["picture number 3"])
    scores = emb.image_embeddings @ torch.nn.functional.normalize(query, dim=-1).numpy()[0]
    assert [r["image_index"] for r in record["results"]] == np.argsort(-scores, kind="stable")[:3].tolist()
    assert os.path.isfile(record["picture"])


def test_cached_tag_weights_load_from_the_file_without_network(monkeypatch, tmp_path):
    """A tag whose weights are in the Hugging Face cache resolves to that file (open_clip then asks no network),
    keeping the tag's preprocessing and QuickGELU; the cache is asked for the safetensors twin first."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cached = str(tmp_path / "open_clip_model.safetensors")
    asked = []

    def fake_cache(repo, names):
        asked.append((repo, names))
        return cached
    monkeypatch.setattr(open_clip_models, "_hub_file", fake_cache)
    spec = open_clip_models.resolve("open_clip:ViT-B-32/openai")
    assert asked == [("timm/vit_base_patch32_clip_224.openai", ["open_clip_model.safetensors",
                                                                "open_clip_pytorch_model.bin"])]
    options = dict(spec.options)
    assert spec.model_name == "ViT-B-32" and spec.pretrained == cached and options["force_quick_gelu"] is True
    assert options["image_resize_mode"] == "shortest" and len(options["image_mean"]) == 3
    assert dict(open_clip_models.resolve("open_clip:ViT-B-16-SigLIP/webli").options)["image_resize_mode"] == "squash"
