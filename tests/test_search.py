"""search.py on a tiny synthetic set embedded with the tiny random CLIP: the known nearest item comes first."""
import os

import numpy as np
import pytest
import torch

import search
from retrieval.io import write_json
from retrieval.handoff import Embeddings, l2_normalize, make_attrs, write_embeddings

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


# ----------------------------------------------------------------------------- unreadable images (#14.5)

def test_unreadable_result_images_become_placeholder_cells(handoff, tiny_clip_dir, tmp_path, monkeypatch, capsys):
    import shutil
    from PIL import Image
    _, images, texts, query, image_ids, image_root = handoff
    # Limit high enough for the 96x96 synthetic images, low enough that a 150x150 one is a bomb (> 2x).
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 10_000)
    bad_root = shutil.copytree(image_root, tmp_path / "images")
    first, second, third = (image_ids[i] for i in np.argsort(-(images @ query), kind="stable")[:3])
    (bad_root / first).write_bytes(b"not an image at all")
    png = (bad_root / second).read_bytes()
    (bad_root / second).write_bytes(png[:len(png) // 2])
    Image.new("RGB", (150, 150)).save(bad_root / third)
    bad = str(tmp_path / "bad_test.h5")
    write_embeddings(bad, Embeddings(images, texts, np.repeat(np.arange(12), 3), image_ids,
                                     [f"c{i}" for i in range(36)],
                                     make_attrs("synthetic", "test", tiny_clip_dir, images.shape[1],
                                                image_root=str(bad_root))))
    cells = []
    drawn = search.placeholder
    monkeypatch.setattr(search, "placeholder", lambda ax, text: (cells.append(text), drawn(ax, text)))
    record = search.main(["--query", QUERY, "--top_k", "4", "--data_path", bad, "--output_dir",
                          str(tmp_path / "out"), "--device", "cpu"])
    monkeypatch.undo()   # the grid picture itself is larger than the test's pixel limit
    with Image.open(record["picture"]) as picture:
        picture.verify()
    assert cells == ["cannot read image"] * 3
    warnings = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and warnings[0].startswith("warning: 3 of 4 image files cannot be read")
    assert str(bad_root / first) in warnings[0]


def test_decompression_bomb_query_image_is_one_clear_error(handoff, tmp_path, monkeypatch):
    from PIL import Image
    bomb = str(tmp_path / "bomb.png")
    Image.new("RGB", (40, 40)).save(bomb)   # 1600 pixels: over twice the limit below
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 500)
    assert search.Image.MAX_IMAGE_PIXELS == 500   # the very module search.py opens images with
    with pytest.raises(Image.DecompressionBombError):
        Image.open(bomb)
    with pytest.raises(SystemExit) as error:
        search.main(["--image", bomb, "--data_path", handoff[0], "--output_dir", str(tmp_path / "out"),
                     "--device", "cpu"])
    message = str(error.value)
    assert message.startswith(f"error: {bomb}: cannot read the image (") and "\n" not in message
    assert not os.path.exists(tmp_path / "out")


# ----------------------------------------------------------------------------- which file is searched (#14.11)

def write_run(name, data_path, results_dir="result"):
    """A run file as the sweep writes it, reduced to what search.py reads (config.data_path)."""
    os.makedirs(os.path.join(results_dir, "runs"), exist_ok=True)
    write_json(os.path.join(results_dir, "runs", f"{name}.json"), {"config": {"data_path": data_path}})


@pytest.fixture
def pipeline_dir(handoff, tmp_path, monkeypatch):
    """A cwd like the repository after a sweep of data/a_test.h5: the synthetic demo's file is also
    under coco_data/ (the file the old rule wrongly picked)."""
    import shutil
    monkeypatch.chdir(tmp_path)
    for copy in ("data/a_test.h5", "data/b_test.h5", "data/c_train.h5", "coco_data/synthetic/demo_test.h5"):
        os.makedirs(os.path.dirname(copy), exist_ok=True)
        shutil.copy(handoff[0], copy)
    return tmp_path


def search_default_file(*extra):
    return search.main(["--query", QUERY, "--top_k", "2", "--output_dir", "out", "--device", "cpu", *extra])


def test_the_file_the_sweep_evaluated_is_searched_and_said(pipeline_dir, capsys):
    write_run("r1", "data/a_test.h5")
    write_run("r2", "data/a_test.h5")
    write_run("r3", str(pipeline_dir / "data" / "a_test.h5"))   # the same file spelt absolute
    write_run("r4", "data/c_train.h5")                          # not the test split
    record = search_default_file("--use_test_set")
    assert record["data_path"] == "data/a_test.h5"
    assert "searching data/a_test.h5 (the file the sweep in result/ evaluated)" in capsys.readouterr().out


def test_several_files_the_sweep_evaluated_are_refused_by_name(pipeline_dir):
    write_run("r1", "data/a_test.h5")
    write_run("r2", "data/b_test.h5")
    write_run("r3", "data/c_train.h5")
    with pytest.raises(SystemExit) as error:
        search_default_file("--use_test_set")
    message = str(error.value)
    assert message.startswith("error: result/runs: 2 ") and "\n" not in message
    assert "data/a_test.h5, data/b_test.h5)" in message and "choose one with --data_path" in message
    with pytest.raises(SystemExit, match=r"3 .*data/a_test.h5, data/b_test.h5, data/c_train.h5\)"):
        search_default_file()
    assert not os.path.exists("out")
    assert search_default_file("--data_path", "data/b_test.h5")["data_path"] == "data/b_test.h5"


def test_runs_naming_a_missing_file_are_ignored(pipeline_dir, capsys):
    write_run("r1", "data/gone_test.h5")
    os.makedirs("other/runs")
    with open("other/runs/broken.json", "w") as f:
        f.write("{not json")
    write_run("r2", "data/b_test.h5", results_dir="other")
    assert search_default_file("--results_dir", "other")["data_path"] == "data/b_test.h5"
    capsys.readouterr()
    # Only the missing file named: back to the single file under coco_data/, said on screen.
    record = search_default_file("--use_test_set")
    demo = os.path.join("coco_data", "synthetic", "demo_test.h5")
    assert record["data_path"] == demo
    captured = capsys.readouterr()
    assert f"searching {demo} (the only test-split (*_test) embeddings file under coco_data/)" in captured.out
    assert "note: the run files in result/runs/ name no existing test-split" in captured.err


def test_several_files_under_coco_data_are_refused_without_runs(pipeline_dir):
    import shutil
    shutil.copy("data/a_test.h5", "coco_data/other_test.h5")
    with pytest.raises(SystemExit, match=r"^error: coco_data: 2 test-split .*choose one with --data_path$"):
        search_default_file("--use_test_set")


def test_same_query_on_two_files_writes_two_pictures(pipeline_dir, capsys):
    first = search_default_file("--data_path", "data/a_test.h5")["picture"]
    second = search_default_file("--data_path", "data/b_test.h5")["picture"]
    assert first != second and os.path.isfile(first) and os.path.isfile(second)
    assert os.path.basename(first).startswith("search_a-small-red-circle-left-of-a-large-")
    assert f"wrote {first}" in capsys.readouterr().out
    # The same search of the same file (spelt absolute) is a redo: it overwrites its own picture.
    redo = search_default_file("--data_path", str(pipeline_dir / "data" / "a_test.h5"))["picture"]
    assert redo == first
    assert sorted(os.listdir("out")) == sorted(os.path.basename(p)[:-4] + ext for p in (first, second)
                                               for ext in (".png", ".json"))


# ----------------------------------------------------------------------------- issue 28: empty query, outputs

def no_model(monkeypatch):
    """Fail the test if search.py loads a model: these faults must be found before."""
    def refuse(*_args, **_kwargs):
        raise AssertionError("the model was loaded before the fault was found")
    monkeypatch.setattr(search, "load_query_encoder", refuse)


@pytest.mark.parametrize("query", ["", "   \t "])
def test_an_empty_or_blank_query_is_an_error_not_a_ranking(handoff, tmp_path, monkeypatch, query):
    no_model(monkeypatch)
    out = tmp_path / "results"
    with pytest.raises(SystemExit) as err:
        search.main(["--query", query, "--data_path", handoff[0], "--output_dir", str(out), "--device", "cpu"])
    assert str(err.value) == f"error: --query {query!r}: is empty; give the text to search the images with"
    assert not out.exists()


def test_an_output_folder_that_is_a_file_is_one_line_before_the_model_loads(handoff, tmp_path, monkeypatch):
    no_model(monkeypatch)
    out = tmp_path / "results"
    out.write_bytes(b"an earlier file")
    with pytest.raises(SystemExit) as err:
        search.main(["--query", QUERY, "--data_path", handoff[0], "--output_dir", str(out), "--device", "cpu"])
    assert str(err.value) == (f"error: {out}: not writable ({out} is not a folder); choose another output folder "
                              "with --output_dir")
    assert out.read_bytes() == b"an earlier file"


def test_a_read_only_output_folder_is_one_line_before_the_model_loads(handoff, monkeypatch, read_only_folder):
    no_model(monkeypatch)
    with pytest.raises(SystemExit) as err:
        search.main(["--query", QUERY, "--data_path", handoff[0], "--output_dir", read_only_folder, "--device", "cpu"])
    assert str(err.value) in (f"error: {read_only_folder}: not writable ({reason}); choose another output folder "
                              "with --output_dir" for reason in ("Read-only file system", "Permission denied"))
    assert os.listdir(read_only_folder) == []
