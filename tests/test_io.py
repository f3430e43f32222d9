"""The hand-off file: round trip in both formats, and validation that names the file and fault."""
import os

import numpy as np
import pytest

from retrieval import io


def make(random_split, **attrs):
    images, texts, text_to_image = random_split
    return io.Embeddings(images.copy(), texts.copy(), text_to_image.copy(), [f"img{i}.jpg" for i in range(40)],
                         [f"caption {i}" for i in range(200)], io.make_attrs("unit", "test", "none", 16, **attrs))


@pytest.mark.parametrize("suffix", [".h5", ".npz"])
def test_round_trip(tmp_path, random_split, suffix):
    emb = make(random_split, skipped=["bad.jpg: cannot identify image"], image_root="imgs")
    path = io.write_embeddings(tmp_path / f"e{suffix}", emb)
    back = io.read_embeddings(path)
    assert np.array_equal(back.image_embeddings, emb.image_embeddings)
    assert np.array_equal(back.text_embeddings, emb.text_embeddings)
    assert np.array_equal(back.text_to_image, emb.text_to_image)
    assert back.image_ids == emb.image_ids and back.captions == emb.captions
    assert back.attrs["skipped"] == ["bad.jpg: cannot identify image"]
    assert back.attrs["dataset"] == "unit" and back.attrs["dim"] == 16 and back.attrs["image_root"] == "imgs"
    assert [f for f in os.listdir(tmp_path) if f.startswith(".")] == []  # no temp file left


@pytest.mark.parametrize("fault, message", [
    (lambda e: e.image_embeddings.__setitem__((3, 2), np.nan), "NaN"),
    (lambda e: setattr(e, "text_embeddings", e.text_embeddings * 2), "not L2-normalised"),
    (lambda e: e.text_to_image.__setitem__(0, 40), "outside"),
    (lambda e: setattr(e, "image_embeddings", e.image_embeddings.astype(np.float64)), "float32"),
    (lambda e: setattr(e, "text_to_image", e.text_to_image[:-1]), "text_to_image must have shape"),
    (lambda e: setattr(e, "text_to_image", np.where(e.text_to_image == 7, 8, e.text_to_image)), "no caption"),
])
def test_validation_names_file_and_fault(tmp_path, random_split, fault, message):
    emb = make(random_split)
    fault(emb)
    with pytest.raises(io.HandoffError, match=message) as err:
        io.write_embeddings(tmp_path / "bad.h5", emb)
    assert "bad.h5" in str(err.value)
    assert not (tmp_path / "bad.h5").exists()


def test_corrupt_file_and_missing_key(tmp_path):
    bad = tmp_path / "corrupt.h5"
    bad.write_bytes(b"not an hdf5 file")
    with pytest.raises(io.HandoffError, match="corrupt.h5: cannot read"):
        io.read_embeddings(bad)
    np.savez(tmp_path / "partial.npz", image_embeddings=np.eye(2, dtype=np.float32))
    with pytest.raises(io.HandoffError, match="missing dataset 'text_embeddings'"):
        io.read_embeddings(tmp_path / "partial.npz")


def test_legacy_npz_without_attrs_or_index(tmp_path):
    rng = np.random.default_rng(0)
    images = rng.normal(size=(10, 8)).astype(np.float16)  # not normalised, half precision
    texts = rng.normal(size=(50, 8)).astype(np.float16)
    np.savez(tmp_path / "coco_embeddings.npz", image_embeddings=images, text_embeddings=texts)
    emb = io.read_embeddings(tmp_path / "coco_embeddings.npz")
    assert emb.text_to_image.tolist() == np.repeat(np.arange(10), 5).tolist()
    assert emb.image_embeddings.dtype == np.float32
    assert np.allclose(np.linalg.norm(emb.text_embeddings, axis=1), 1, atol=1e-5)
    assert any("consecutive" in note for note in emb.attrs["load_notes"])


def test_atomic_write_keeps_old_file_on_failure(tmp_path):
    target = tmp_path / "out.json"
    io.write_json(target, {"a": 1})
    with pytest.raises(RuntimeError):
        with io.atomic_path(target) as tmp:
            open(tmp, "w").write("half")
            raise RuntimeError("crash mid-write")
    assert io.read_json(target) == {"a": 1}
    assert sorted(os.listdir(tmp_path)) == ["out.json"]
    umask = os.umask(0)
    os.umask(umask)
    assert os.stat(target).st_mode & 0o777 == 0o666 & ~umask  # readable like a plain open(), not 0600
