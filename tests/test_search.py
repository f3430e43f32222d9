"""search.py on a tiny synthetic set embedded with the tiny random CLIP: the known nearest item comes first."""
import os

import numpy as np
import pytest
import torch

import search
from retrieval.io import Embeddings, l2_normalize, make_attrs, write_embeddings

QUERY = "a small red circle left of a large blue square"
PLANTED_IMAGE = 5
PLANTED_CAPTION = 17


@pytest.fixture(scope="module")
def encoder(tiny_clip_dir):
    from retrieval.models import load_encoder
    return load_encoder(tiny_clip_dir, None, torch.device("cpu"))


def embed_image(encoder, path):
    from PIL import Image
    with Image.open(path) as image:
        pixels = encoder.image_transform(image.convert("RGB"))
    with torch.no_grad():
        return l2_normalize(encoder.embed_images(pixels.unsqueeze(0)).float().cpu().numpy())[0]


@pytest.fixture(scope="module")
def handoff(tmp_path_factory, tiny_clip_dir, synthetic_dir, encoder):
    """12 synthetic images embedded with the tiny CLIP, 3 captions each; one image row is replaced by the
    query's own embedding and one caption row by image 2's embedding, so the nearest items are known."""
    image_root = os.path.join(synthetic_dir, "images")
    image_ids = sorted(os.listdir(image_root))[:12]
    images = np.stack([embed_image(encoder, os.path.join(image_root, name)) for name in image_ids])
    with torch.no_grad():
        query = l2_normalize(encoder.embed_texts([QUERY]).float().cpu().numpy())[0]
    images[PLANTED_IMAGE] = query
    text_to_image = np.repeat(np.arange(12), 3)
    captions = [f"caption {i} of {image_ids[j]}" for i, j in enumerate(text_to_image)]
    rng = np.random.default_rng(0)
    texts = l2_normalize(images[text_to_image] + 0.5 * rng.normal(size=(36, images.shape[1])))
    texts[PLANTED_CAPTION] = embed_image(encoder, os.path.join(image_root, image_ids[2]))
    attrs = make_attrs("synthetic", "test", tiny_clip_dir, images.shape[1], image_root=image_root)
    path = str(tmp_path_factory.mktemp("search") / "tiny_test.h5")
    write_embeddings(path, Embeddings(images.astype(np.float32), texts.astype(np.float32), text_to_image,
                                      image_ids, captions, attrs))
    return path, images, texts, query, image_ids, image_root


def test_text_query_returns_the_nearest_image(handoff, tmp_path):
    from PIL import Image
    path, images, _, query, image_ids, image_root = handoff
    out = str(tmp_path / "results")
    record = search.main(["--query", QUERY, "--top_k", "4", "--use_test_set", "--data_path", path,
                          "--output_dir", out, "--device", "cpu"])
    results = record["results"]
    scores = images @ query
    assert results[0]["image_index"] == PLANTED_IMAGE == int(np.argmax(scores))
    assert results[0]["score"] == pytest.approx(1.0, abs=1e-4)
    assert [r["image_index"] for r in results] == list(np.argsort(-scores, kind="stable")[:4])
    assert [r["rank"] for r in results] == [1, 2, 3, 4]
    assert results[0]["image_path"] == os.path.join(image_root, image_ids[PLANTED_IMAGE])
    assert results[0]["caption"] == f"caption {3 * PLANTED_IMAGE} of {image_ids[PLANTED_IMAGE]}"
    with Image.open(record["picture"]) as picture:
        picture.verify()
    assert os.path.isfile(os.path.join(out, os.path.basename(record["picture"]).replace(".png", ".json")))


def test_image_query_returns_the_nearest_caption(handoff, tmp_path, capsys):
    path, _, texts, _, image_ids, image_root = handoff
    record = search.main(["--image", os.path.join(image_root, image_ids[2]), "--top_k", "3", "--data_path", path,
                          "--output_dir", str(tmp_path), "--device", "cpu"])
    assert record["results"][0]["caption_index"] == PLANTED_CAPTION
    assert record["results"][0]["score"] == pytest.approx(1.0, abs=1e-4)
    assert f"caption {PLANTED_CAPTION} of" in capsys.readouterr().out


def test_unloadable_model_is_one_clear_error(handoff, tmp_path):
    path = handoff[0]
    with pytest.raises(SystemExit) as error:
        search.main(["--query", "x", "--data_path", path, "--model", str(tmp_path / "no_such_model"),
                     "--output_dir", str(tmp_path), "--device", "cpu"])
    message = str(error.value)
    assert message.startswith("error: cannot load model") and "--model PATH" in message and "\n" not in message


def test_wrong_split_and_missing_file_are_clear_errors(handoff, tmp_path, tiny_clip_dir):
    _, images, texts, _, image_ids, _ = handoff
    train = str(tmp_path / "tiny_train.h5")
    write_embeddings(train, Embeddings(images, texts, np.repeat(np.arange(12), 3), image_ids,
                                       [f"c{i}" for i in range(36)],
                                       make_attrs("synthetic", "train", tiny_clip_dir, images.shape[1])))
    with pytest.raises(SystemExit, match="split is 'train'"):
        search.main(["--query", "x", "--data_path", train, "--use_test_set", "--output_dir", str(tmp_path)])
    with pytest.raises(SystemExit, match="file not found"):
        search.main(["--query", "x", "--data_path", str(tmp_path / "missing.h5"), "--output_dir", str(tmp_path)])
