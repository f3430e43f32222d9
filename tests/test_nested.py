"""Embeddings trained to be compressed (train_dual_encoder.py --matryoshka_dims / --quantization_aware):
the nested loss, the quantizers against the sweep's, nested head ensembles, the nested export and its
attrs, dev selection, resume, DDP and the flag checks."""
import json
import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import train_dual_encoder
from retrieval import checkpoint as ckpt
from retrieval import handoff, reduction
from retrieval import dual_encoder as de
from retrieval import quantize_aware as qa
from retrieval.synthetic import load_synthetic
from retrieval.encoders import embed_split
from test_train import TOWERS, base_args, make_tiny_bert


@pytest.fixture(scope="module")
def tiny_bert_dir(tmp_path_factory):
    return make_tiny_bert(str(tmp_path_factory.mktemp("tiny_bert")))


def unit(rows, dim, seed):
    return F.normalize(torch.randn(rows, dim, generator=torch.Generator().manual_seed(seed)), dim=-1)


def faiss_int4(vectors):
    """The sweep's int4 codec: an IndexScalarQuantizer QT_4bit trained on `vectors`, decode(encode)."""
    import faiss
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    index = faiss.IndexScalarQuantizer(vectors.shape[1], faiss.ScalarQuantizer.QT_4bit, faiss.METRIC_INNER_PRODUCT)
    index.train(vectors)
    return index.sa_decode(index.sa_encode(vectors))


def sweep_quantized(vectors, precision):
    """What the sweep's index of `precision` compares for these unit vectors, renormalised (numpy)."""
    if precision == "binary":
        return reduction.binary_signs(vectors) / vectors.shape[1] ** 0.5
    return handoff.l2_normalize(faiss_int4(vectors))


# ----------------------------------------------------------------------------- the loss

def test_nested_loss_is_the_weighted_mean_of_the_prefix_losses():
    images, texts = unit(6, 16, 0), unit(12, 16, 1)
    text_to_image, scale = torch.arange(6).repeat_interleave(2), torch.tensor(10.0)
    dims = [4, 8, 16]
    per_dim = [de.contrastive_loss(F.normalize(images[:, :d], dim=-1), F.normalize(texts[:, :d], dim=-1),
                                   text_to_image, scale) for d in dims]
    assert len({round(float(p), 4) for p in per_dim}) == 3          # the prefixes do differ
    torch.testing.assert_close(de.nested_loss(images, texts, text_to_image, scale, dims), sum(per_dim) / 3)
    torch.testing.assert_close(de.nested_loss(images, texts, text_to_image, scale, dims, [1.0, 2.0, 5.0]),
                               (per_dim[0] + 2 * per_dim[1] + 5 * per_dim[2]) / 8)
    # Without nested dims: exactly today's loss.
    assert torch.equal(de.nested_loss(images, texts, text_to_image, scale),
                       de.contrastive_loss(images, texts, text_to_image, scale))


@pytest.mark.parametrize("precision", ["binary", "int4"])
def test_quantization_aware_loss_adds_the_loss_of_the_sweeps_vectors(precision):
    images, texts = unit(6, 16, 2), unit(12, 16, 3)
    text_to_image, scale = torch.arange(6).repeat_interleave(2), torch.tensor(10.0)
    dims, weights = [8, 16], [1.0, 3.0]
    float_loss = de.nested_loss(images, texts, text_to_image, scale, dims, weights)
    # Independently: each modality's prefix through the sweep's own quantizer (numpy / FAISS).
    quantized = [de.contrastive_loss(
        torch.from_numpy(sweep_quantized(handoff.l2_normalize(images[:, :d].numpy()), precision)),
        torch.from_numpy(sweep_quantized(handoff.l2_normalize(texts[:, :d].numpy()), precision)),
        text_to_image, scale) for d in dims]
    expected = 0.5 * (float_loss + (quantized[0] + 3 * quantized[1]) / 4)
    got = de.nested_loss(images, texts, text_to_image, scale, dims, weights, precision)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert abs(float(got - float_loss)) > 1e-3                       # the quantized loss counts


# ----------------------------------------------------------------------------- the quantizers

def test_binary_forward_is_the_sweeps_signs_and_the_gradient_passes_straight_through():
    dim = 32
    x = unit(64, dim, 4).requires_grad_(True)
    q = qa.binary(x)
    # x R + (signs - x R) rounds within a float32 step of the signs
    np.testing.assert_allclose(q.detach().numpy(), reduction.binary_signs(x.detach().numpy()) / dim ** 0.5, atol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(q.detach().numpy(), axis=1), 1.0, atol=1e-6)
    upstream = torch.randn(64, dim, generator=torch.Generator().manual_seed(5))
    (q * upstream).sum().backward()
    # The identity on the rotated vector x R (what the signs are taken of), so x gets it rotated back.
    rotation = torch.from_numpy(reduction.binary_rotation(dim))
    torch.testing.assert_close(x.grad, upstream @ rotation.t())


def test_int4_forward_is_the_faiss_codec_and_the_gradient_is_the_identity():
    x = unit(200, 24, 6)
    x[:, 5] = 0.125              # a dimension with no range: FAISS encodes it as 0 and decodes its value
    x.requires_grad_(True)
    q = qa.int4(x)
    reference = faiss_int4(x.detach().numpy())
    np.testing.assert_allclose(q.detach().numpy(), reference, atol=1e-5, rtol=0)
    assert np.abs(reference - x.detach().numpy()).max() > 1e-2      # it does round
    upstream = torch.randn(200, 24, generator=torch.Generator().manual_seed(7))
    (q * upstream).sum().backward()
    assert torch.equal(x.grad, upstream)


# ----------------------------------------------------------------------------- nested head ensembles

def test_joined_ensemble_prefix_is_the_members_prefixes(tiny_bert_dir):
    torch.manual_seed(0)
    members = [de.build_model(dict(TOWERS, text_encoder=tiny_bert_dir, embedding_dim=6, matryoshka_dims=[2, 4]))
               for _ in range(2)]
    joined = de.join_members(members, dict(TOWERS, text_encoder=tiny_bert_dir, embedding_dim=12, head_ensemble=2,
                                           matryoshka_dims=[4, 8]))
    plain = de.join_members(members, dict(TOWERS, text_encoder=tiny_bert_dir, embedding_dim=12, head_ensemble=2))
    features = torch.randn(5, members[0].image_tower.feature_dim, generator=torch.Generator().manual_seed(8))
    with torch.no_grad():
        outputs = [m.eval().project_images(features) for m in members]
        embedded = joined.project_images(features)
        torch.testing.assert_close(plain.project_images(features), torch.cat(outputs, 1) / 2 ** 0.5)  # as before
    assert joined.nested_dims == [4, 8, 12]
    for dim in joined.nested_dims:
        # segment by segment ([0, 2), [2, 4), [4, 6) of each member), every member's first dim/2 dims
        bounds = [0] + [d // 2 for d in joined.nested_dims if d <= dim]
        expected = torch.cat([out[:, a:b] for a, b in zip(bounds, bounds[1:]) for out in outputs], 1) / 2 ** 0.5
        torch.testing.assert_close(embedded[:, :dim], expected)
    # The full joined cosine is still the mean of the members' cosines (the order is a permutation).
    torch.testing.assert_close(embedded @ embedded.t(), sum(o @ o.t() for o in outputs) / 2)


@pytest.mark.slow
def test_nested_head_ensemble_members_train_nested_and_the_joined_export_stays_nested(synthetic_dir,
                                                                                     tiny_bert_dir, tmp_path):
    export_dir = tmp_path / "export"
    results = train_dual_encoder.main(base_args(synthetic_dir, tiny_bert_dir, tmp_path, "--max_steps", "2",
                                                "--freeze_image", "--freeze_text", "--head_ensemble", "2",
                                                "--matryoshka_dims", "8")
                                      + ["--export_dir", str(export_dir), "--export_splits", "test"])
    member_paths = [m["best"] for m in results[16]["members"]]
    members = [ckpt.build_from_checkpoint(path) for path in member_paths]
    assert [saved["args"]["matryoshka_dims"] for _, saved in members] == [[4], [4]]
    assert [model.nested_dims for model, _ in members] == [[4, 8], [4, 8]]
    joined, saved = ckpt.build_from_checkpoint(results[16]["best"])
    assert joined.nested_dims == [8, 16]
    split = load_synthetic(synthetic_dir, "test")
    parts = [embed_split(ckpt.encoder_from_checkpoint(p, device="cpu"), split, batch_size=16, num_workers=0,
                         progress=False) for p in member_paths]
    exported = handoff.read_embeddings(str(export_dir / "dual-tiny-d16_test.h5"))
    assert exported.attrs["nested_dims"] == [8, 16] and "trained_quantization" not in exported.attrs
    for field in ("image_embeddings", "text_embeddings"):
        first, second = (getattr(p, field) for p in parts)
        expected = np.concatenate([first[:, :4], second[:, :4], first[:, 4:], second[:, 4:]], 1) / 2 ** 0.5
        np.testing.assert_allclose(getattr(exported, field), expected, atol=1e-5)
    joined_line = [json.loads(line) for line in open(tmp_path / "tiny" / "log.jsonl")][-1]
    assert joined_line["ensemble_of"] == 2 and set(joined_line["dev_nested"]) == {"8", "16"}
    assert saved["best_rsum"] == joined_line["dev_nested_mean_rsum"]


# ----------------------------------------------------------------------------- export, dev selection

@pytest.mark.slow
def test_nested_export_truncated_is_the_model_at_that_dim(synthetic_dir, tiny_bert_dir, tmp_path):
    # Towers trained (not frozen), binary quantization-aware; the export is embedded from pixels.
    export_dir = tmp_path / "export"
    results = train_dual_encoder.main(base_args(synthetic_dir, tiny_bert_dir, tmp_path, "--max_steps", "2",
                                                "--matryoshka_dims", "4", "8", "--quantization_aware", "binary")
                                      + ["--export_dir", str(export_dir), "--export_splits", "test"])
    exported = handoff.read_embeddings(str(export_dir / "dual-tiny-d16_test.h5"))      # validates the attrs too
    assert exported.attrs["nested_dims"] == [4, 8, 16] and exported.attrs["trained_quantization"] == "binary"
    model, _ = ckpt.build_from_checkpoint(results[16]["best"])
    transform = ckpt.encoder_from_checkpoint(results[16]["best"], device="cpu").image_transform
    pixels = torch.stack([transform(Image.open(f"{exported.attrs['image_root']}/{name}").convert("RGB"))
                          for name in exported.image_ids])
    tokens = model.text_tower.tokenize(exported.captions)
    with torch.no_grad():
        images = model.embed_images(pixels)
        texts = model.embed_texts(tokens["input_ids"], tokens["attention_mask"])
    for dim in (4, 8, 16):
        np.testing.assert_allclose(handoff.l2_normalize(exported.image_embeddings[:, :dim]),
                                   F.normalize(images[:, :dim], dim=-1).numpy(), atol=1e-5)
        np.testing.assert_allclose(handoff.l2_normalize(exported.text_embeddings[:, :dim]),
                                   F.normalize(texts[:, :dim], dim=-1).numpy(), atol=1e-5)


@pytest.mark.slow
def test_dev_metrics_per_nested_dim_and_best_is_the_highest_mean_rsum(synthetic_dir, tiny_bert_dir, tmp_path):
    results = train_dual_encoder.main(base_args(synthetic_dir, tiny_bert_dir, tmp_path, "--epochs", "3",
                                                "--freeze_image", "--freeze_text", "--matryoshka_dims", "2", "8",
                                                "--head_lr", "3e-3"))
    log = [json.loads(line) for line in open(tmp_path / "tiny" / "log.jsonl")]
    assert len(log) == 3
    for line in log:
        assert set(line["dev_nested"]) == {"2", "8", "16"}
        assert line["dev_nested"]["16"] == line["dev"]          # the full dim is the plain dev evaluation
        assert line["dev_nested_mean_rsum"] == pytest.approx(np.mean([m["RSUM"] for m in line["dev_nested"].values()]))
    assert log[0]["dev_nested"]["2"]["RSUM"] != log[0]["dev"]["RSUM"]
    best = max(range(3), key=lambda i: (log[i]["dev_nested_mean_rsum"], -i))     # the first of equal ones
    saved = ckpt.load_checkpoint(results[16]["best"])
    assert saved["best_rsum"] == log[best]["dev_nested_mean_rsum"] and saved["epoch"] == best + 1


# ----------------------------------------------------------------------------- resume (DDP: tests/test_train.py's nested case)

@pytest.mark.parametrize("flags", [
    ["--matryoshka_dims", "4", "8", "--matryoshka_weights", "1", "2", "3", "--quantization_aware", "int4"],
    ["--freeze_image", "--freeze_text", "--matryoshka_dims", "8", "--quantization_aware", "binary"]],
    ids=["towers-trained-int4", "frozen-binary"])
@pytest.mark.slow
def test_resume_with_nested_flags_reproduces_the_next_step_loss(flags, synthetic_dir, tiny_bert_dir, tmp_path):
    def run(name, steps, *more):
        return train_dual_encoder.main(base_args(synthetic_dir, tiny_bert_dir, tmp_path, "--max_steps", str(steps),
                                                 "--run_name", name, "--lr", "1e-3", *flags, *more))[16]["losses"]
    straight = run("straight", 3)
    first = run("split", 2)
    with pytest.raises(SystemExit, match="--resume: .* was trained with --quantization_aware"):
        train_dual_encoder.main(base_args(synthetic_dir, tiny_bert_dir, tmp_path, "--max_steps", "3", "--run_name",
                                          "split", "--resume", *flags[:-2]))   # the same but float-only
    resumed = run("split", 3, "--resume")
    assert first == straight[:2]
    assert resumed == [straight[2]]


# ----------------------------------------------------------------------------- flags

@pytest.mark.parametrize("flags, message", [
    (["--matryoshka_dims", "24"], "--matryoshka_dims 24: larger than --embedding_dim 16"),
    (["--matryoshka_dims", "0", "8"], "--matryoshka_dims 0: must be positive"),
    (["--matryoshka_dims", "4", "8", "--matryoshka_weights", "1", "2"],
     r"--matryoshka_weights: 2 values for the 3 nested dims \[4, 8, 16\]"),
    (["--matryoshka_dims", "8", "--matryoshka_weights", "1", "0"], "--matryoshka_weights 0.0: must be positive"),
    (["--matryoshka_weights", "1"], "--matryoshka_weights: needs --matryoshka_dims"),
    (["--matryoshka_dims", "6", "--head_ensemble", "4", "--freeze_image", "--freeze_text"],
     "--matryoshka_dims 6: not divisible by --head_ensemble 4"),
    # one weight per nested dim: right for --embedding_dim 16 ([8, 16]), not for 32 ([8, 16, 32])
    (["--matryoshka_dims", "8", "16", "--embedding_dim", "16", "32", "--matryoshka_weights", "1", "1"],
     r"--matryoshka_weights: 2 values for the 3 nested dims \[8, 16, 32\]"),
])
def test_bad_nested_flags_give_one_error_before_any_data_or_model(flags, message, tmp_path):
    # No data folder and no text model exist: the flags are checked first.
    args = base_args(str(tmp_path / "no-data"), str(tmp_path / "no-model"), tmp_path / "runs", *flags)
    with pytest.raises(SystemExit) as info:
        train_dual_encoder.main(args)
    text = str(info.value)
    assert text.startswith("error: ") and text.count("error") == 1 and "\n" not in text
    assert re.search(message, text), text
