"""prepare_data.py --from_arrays (retrieval/arrays.py): vectors a user already has become a validated hand-off
file equal to the arrays (normalised with a note where they were not), and each unusable input is one line."""
import os

import numpy as np
import pytest

import prepare_data
from retrieval import handoff


@pytest.fixture(autouse=True)
def in_tmp_path(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)


def run(*argv):
    return prepare_data.main(["--from_arrays", *argv])


def vectors(rows, dim=8, seed=0, dtype=np.float64):
    return np.random.default_rng(seed).normal(size=(rows, dim)).astype(dtype)


def test_round_trip_equals_the_arrays_with_shards_ids_and_captions(tmp_path, capsys):
    images, texts = vectors(6), vectors(12, seed=1)
    np.save("img_0.npy", images[:4])
    np.savez("img_1.npz", emb=images[4:])
    np.save("txt.npy", texts.astype(np.float16))
    t2i = np.array([0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5])
    np.save("t2i.npy", t2i)
    (tmp_path / "ids.txt").write_text("".join(f"photo_{i}.jpg\n" for i in range(6)))
    (tmp_path / "caps.txt").write_text("".join(f"a caption, number {i}\n" for i in range(12)), encoding="utf-8")
    written = run("--image_vectors", "img_0.npy", "img_1.npz:emb", "--text_vectors", "txt.npy", "--text_to_image",
                  "t2i.npy", "--image_ids", "ids.txt", "--caption_texts", "caps.txt", "--vectors_name", "my-model")
    assert written == {"test": os.path.join("coco_data", "own", "my-model_test.h5")}
    emb = handoff.read_embeddings(written["test"])
    np.testing.assert_allclose(emb.image_embeddings, images / np.linalg.norm(images, axis=1, keepdims=True), atol=1e-6)
    half = texts.astype(np.float16).astype(np.float32)
    np.testing.assert_allclose(emb.text_embeddings, half / np.linalg.norm(half, axis=1, keepdims=True), atol=1e-6)
    assert emb.text_to_image.tolist() == t2i.tolist()
    assert emb.image_ids == [f"photo_{i}.jpg" for i in range(6)] and emb.captions[3] == "a caption, number 3"
    assert emb.attrs["model"] == "my-model" and emb.attrs["dataset"] == "own" and emb.attrs["captions_per_image"] == 2
    notes = emb.attrs["input_notes"]
    assert "--text_vectors txt.npy: cast float16 to float32" in notes
    assert any(n.startswith("--image_vectors: L2-normalised 6 of 6 rows") for n in notes)
    out = capsys.readouterr().out
    assert "note: --image_vectors: L2-normalised 6 of 6 rows" in out and "RSUM" in out


def test_normalised_float32_pairs_are_stored_bit_for_bit_without_notes():
    images = handoff.l2_normalize(vectors(5))
    texts = handoff.l2_normalize(vectors(5, seed=2))
    np.save("img.npy", images)
    np.save("txt.npy", texts)
    emb = handoff.read_embeddings(run("--image_vectors", "img.npy", "--text_vectors", "txt.npy",
                                      "--output_format", "npz", "--no_eval")["test"])
    assert np.array_equal(emb.image_embeddings, images) and np.array_equal(emb.text_embeddings, texts)
    assert emb.text_to_image.tolist() == list(range(5))
    assert emb.attrs["input_notes"] == ["no caption -> image map given: text row i is the caption of image row i"]


def test_captions_found_by_image_id():
    np.save("img.npy", vectors(3))
    np.save("txt.npy", vectors(4, seed=3))
    np.save("ids.npy", np.array(["a", "b", "c"]))
    np.save("cap_ids.npy", np.array(["c", "a", "b", "c"]))
    emb = handoff.read_embeddings(run("--image_vectors", "img.npy", "--text_vectors", "txt.npy", "--image_ids",
                                      "ids.npy", "--text_image_ids", "cap_ids.npy", "--no_eval")["test"])
    assert emb.text_to_image.tolist() == [2, 0, 1, 2]


def fails(*argv):
    with pytest.raises(SystemExit) as e:
        run(*argv)
    message = str(e.value)
    assert "\n" not in message and message.startswith("error: ")
    assert not os.path.exists(os.path.join("coco_data", "own", "own-vectors_test.h5"))
    return message


def test_bad_inputs_are_one_line_each():
    np.save("img.npy", vectors(4))
    np.save("txt.npy", vectors(8, seed=1))
    np.save("img3d.npy", np.zeros((2, 3, 4)))
    np.save("img_dim5.npy", vectors(4, dim=5))
    nan = vectors(4)
    nan[2, 1] = np.nan
    np.save("nan.npy", nan)
    np.save("t2i_out.npy", np.array([0, 1, 2, 3, 4, 0, 1, 2]))
    np.save("t2i_short.npy", np.array([0, 1, 2]))
    zero = vectors(4)
    zero[1] = 0
    np.save("zero.npy", zero)
    pairs = ["--text_vectors", "txt.npy", "--text_to_image", "t2i_out.npy"]
    assert fails("--image_vectors", "img3d.npy", *pairs) == (
        "error: img3d.npy: must be a non-empty 2-D array of numbers [rows, dim], got a 3-D float64 array of shape "
        "(2, 3, 4) (--image_vectors)")
    assert fails("--image_vectors", "img.npy", "img_dim5.npy", *pairs) == \
        "error: img_dim5.npy: has dim 5, the shards before it 8 (--image_vectors)"
    assert fails("--image_vectors", "nan.npy", *pairs) == \
        "error: nan.npy: 1 rows hold NaN or inf (first: row 2) (--image_vectors)"
    assert fails("--image_vectors", "img.npy", *pairs) == (
        "error: t2i_out.npy: 1 entries point outside the 4 images (first: caption 4 -> 4) (--text_to_image)")
    assert fails("--image_vectors", "img.npy", "--text_vectors", "txt.npy", "--text_to_image", "t2i_short.npy") == \
        "error: t2i_short.npy: has 3 entries for 8 text vectors (--text_to_image)"
    assert "cannot be paired row by row" in fails("--image_vectors", "img.npy", "--text_vectors", "txt.npy")
    assert fails("--image_vectors", "zero.npy", *pairs).startswith("error: --image_vectors: 1 rows are all zero")
    assert fails("--image_vectors", "img_dim5.npy", "--text_vectors", "txt.npy") == \
        "error: --text_vectors: dim 8 differs from the image vectors' 5"
    assert fails("--image_vectors", "missing.npy", *pairs) == "error: missing.npy: file not found (--image_vectors)"


def test_array_flags_need_from_arrays(capsys):
    with pytest.raises(SystemExit):
        prepare_data.main(["--image_vectors", "img.npy"])
    assert "--image_vectors: only with --from_arrays" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        run("--image_vectors", "img.npy")
    assert "--from_arrays needs --image_vectors FILE and --text_vectors FILE" in capsys.readouterr().err
