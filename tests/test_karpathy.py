"""The one Karpathy reader (retrieval/karpathy.py): Flickr30k's layout, Flickr8k through dataset_flickr8k.json
(agreeing with the official reader), the split names the field uses, and describe_protocol."""
import json
import os

import numpy as np
import pytest
from PIL import Image

from conftest import as_script
from retrieval import data, handoff, karpathy, protocol_names


def write_images(folder, names):
    os.makedirs(folder, exist_ok=True)
    for i, name in enumerate(names):
        Image.new("RGB", (8, 8), (i * 20 % 256, 40, 0)).save(os.path.join(folder, name))


def entry(imgid, filename, split, captions):
    """One image of a Karpathy file, in the real files' schema (tokens, ids, sentids)."""
    sentences = [{"tokens": caption.lower().split(), "raw": caption, "imgid": imgid, "sentid": imgid * 5 + k}
                 for k, caption in enumerate(captions)]
    return {"sentids": [s["sentid"] for s in sentences], "imgid": imgid, "sentences": sentences, "split": split,
            "filename": filename}


def five(name):
    return [f"Caption {k} of {name} ." for k in range(5)]


def make_flickr30k(root):
    """flickr30k-images/ with 9 images and a dataset_flickr30k.json of train 4 / val 2 / test 4 entries: one
    test image not on disk, one test name that leaves the folder, one val image with no usable caption."""
    names = [f"{1000 + i}.jpg" for i in range(9)]
    write_images(root / "flickr30k-images", names)
    splits = ["train"] * 4 + ["val"] * 2 + ["test"] * 3
    entries = [entry(i, name, split, five(name)) for i, (name, split) in enumerate(zip(names, splits))]
    entries[5]["sentences"] = [{"raw": "  ", "tokens": []}]            # val: no usable caption
    entries.append(entry(9, "2000.jpg", "test", five("2000.jpg")))     # test: not on disk
    entries.append(entry(10, "../secret.jpg", "test", five("secret")))  # test: leaves the image folder
    (root / "karpathy").mkdir()
    (root / "karpathy" / "dataset_flickr30k.json").write_text(json.dumps({"images": entries, "dataset": "flickr30k"}))
    return names


def test_flickr30k_layout_every_split_counts_and_skips(tmp_path, capsys):
    names = make_flickr30k(tmp_path)
    write_images(tmp_path, ["secret.jpg"])
    assert data.default_splits("flickr30k", str(tmp_path)) == ["train", "val", "test"]
    splits = {s: data.load_split("flickr30k", str(tmp_path), s) for s in ("train", "val", "test")}
    assert {s: len(v.image_files) for s, v in splits.items()} == {"train": 4, "val": 1, "test": 3}
    assert {s: len(v.captions) for s, v in splits.items()} == {"train": 20, "val": 5, "test": 15}
    test = splits["test"]
    assert test.image_files == names[6:] and test.image_root == str(tmp_path / "flickr30k-images")
    assert test.captions[:2] == ["Caption 0 of 1006.jpg .", "Caption 1 of 1006.jpg ."]
    assert np.bincount(test.text_to_image).tolist() == [5, 5, 5]
    assert any("'2000.jpg' (imgid 9): not found" in s for s in test.skipped)
    outside = [s for s in test.skipped if "outside the image folder" in s]
    assert len(outside) == 1 and outside[0].startswith("dataset_flickr30k.json (imgid 10): image '../secret.jpg'")
    assert not any("secret" in c for c in test.captions)
    assert splits["val"].skipped == [f"image '{names[5]}': no caption"]
    assert splits["train"].skipped == []
    assert test.info["split_source"] == "Karpathy dataset_flickr30k.json 'test'"
    assert test.info["split_name"] == "Flickr30k 1K test (Karpathy)"
    assert splits["val"].info["split_name"] == "Flickr30k val (Karpathy)"
    # The trainer selects on "dev": on a Karpathy file that is its val split.
    dev = data.load_split("flickr30k", str(tmp_path), "dev")
    assert dev.image_files == splits["val"].image_files and dev.info["split_name"] == "Flickr30k val (Karpathy)"
    err = capsys.readouterr().err
    assert err.count("1 images of split 'test' not found") == 1 and err.count("1 image names leave") == 1


def test_flickr30k_faults_are_one_line(tmp_path):
    write_images(tmp_path / "flickr30k-images", ["1.jpg"])
    with pytest.raises(SystemExit, match=r"no dataset_flickr30k\.json .*--download or pass --karpathy_file"):
        as_script(data.load_split, "flickr30k", str(tmp_path), "test")
    (tmp_path / "dataset_flickr30k.json").write_text(json.dumps({"images": [entry(0, "1.jpg", "test", ["a"])]}))
    with pytest.raises(SystemExit, match=r"no split 'restval' in the Karpathy split \(have train, val, test\)"):
        as_script(data.load_split, "flickr30k", str(tmp_path), "restval")
    with pytest.raises(SystemExit, match=r"split 'train' of flickr30k is empty"):
        as_script(data.load_split, "flickr30k", str(tmp_path), "train")
    with pytest.raises(SystemExit, match=r"nowhere\.json: Karpathy split file not found \(--karpathy_file\)"):
        as_script(data.load_split, "flickr30k", str(tmp_path), "test", karpathy_file=str(tmp_path / "nowhere.json"))
    (tmp_path / "dataset_flickr30k.json").write_bytes(b'{"images": [{"filename": "1.jpg", "raw": "caf\xe9"}]}')
    with pytest.raises(SystemExit, match=r"dataset_flickr30k\.json: not UTF-8 text: line 1"):
        as_script(data.load_split, "flickr30k", str(tmp_path), "test")


def make_official_with_karpathy(root):
    """A Flickr8k folder in the official layout (train 6 / dev 2 / test 2 images) and a dataset_flickr8k.json
    of the same images and captions in the real schema (dev is Karpathy's val)."""
    names = [f"{i}_abc.jpg" for i in range(10)]
    write_images(root / "Flicker8k_Dataset", names)
    text = root / "Flickr8k_text"
    text.mkdir()
    (text / "Flickr8k.token.txt").write_text("".join(f"{n}#{k}\t{c}\n" for n in names for k, c in enumerate(five(n))))
    splits = {"train": names[:6], "dev": names[6:8], "test": names[8:]}
    for split, members in splits.items():
        (text / data.FLICKR8K_SPLIT_FILES[split]).write_text("\n".join(members) + "\n")
    entries = [entry(i, n, "val" if s == "dev" else s, five(n)) for i, (s, members) in enumerate(splits.items())
               for n in members]
    (root / "dataset_flickr8k.json").write_text(json.dumps({"images": entries, "dataset": "flickr8k"}))
    return names


def same_split(a, b):
    assert a.image_files == b.image_files and a.captions == b.captions
    assert np.array_equal(a.text_to_image, b.text_to_image) and a.image_root == b.image_root


def test_flickr8k_karpathy_reader_agrees_with_the_official_one(tmp_path):
    make_official_with_karpathy(tmp_path)
    karpathy_file = str(tmp_path / "dataset_flickr8k.json")
    official = data.load_split("flickr8k", str(tmp_path), "test")
    through = data.load_split("flickr8k", str(tmp_path), "test", karpathy_file=karpathy_file)
    same_split(official, through)
    assert official.info["split_name"] == "Flickr8k official test"
    assert through.info["split_name"] == "Flickr8k 1K test (Karpathy)"
    same_split(data.load_split("flickr8k", str(tmp_path), "dev"),
               data.load_split("flickr8k", str(tmp_path), "val", karpathy_file=karpathy_file))
    # the official split files win when both are there; without them the Karpathy file is the split
    assert data.default_splits("flickr8k", str(tmp_path)) == ["train", "dev", "test"]
    for split_file in data.FLICKR8K_SPLIT_FILES.values():
        os.remove(tmp_path / "Flickr8k_text" / split_file)
    assert data.default_splits("flickr8k", str(tmp_path)) == ["train", "val", "test"]
    same_split(official, data.load_split("flickr8k", str(tmp_path), "test"))


def test_real_flickr8k_karpathy_test_equals_the_official_test(flickr8k_dir):
    found = karpathy.find_file("flickr8k", flickr8k_dir)
    if not found:
        pytest.skip(f"no dataset_flickr8k.json in the shared Flickr8k copy ({flickr8k_dir} and its karpathy/, "
                    "caption_datasets/, annotations/): the Karpathy Flickr8k test split could not be compared with "
                    "the official one here; the reader is checked on a test-made file in the real schema")
    official = data.load_split("flickr8k", flickr8k_dir, "test")
    through = data.load_split("flickr8k", flickr8k_dir, "test", karpathy_file=found)
    assert through.image_files == official.image_files and len(through.captions) == len(official.captions) == 5000


def test_describe_protocol_names_the_split_counts_and_metrics(tmp_path):
    make_flickr30k(tmp_path)
    split = data.load_split("flickr30k", str(tmp_path), "test")
    rng = np.random.default_rng(0)
    emb = handoff.Embeddings(handoff.l2_normalize(rng.normal(size=(3, 4))),
                             handoff.l2_normalize(rng.normal(size=(15, 4))), split.text_to_image, split.image_files,
                             split.captions, handoff.make_attrs("flickr30k", "test", "m", 4, **split.info))
    path = handoff.write_embeddings(str(tmp_path / "f.npz"), emb)
    attrs = handoff.read_embeddings(path).attrs
    assert (attrs["num_images"], attrs["num_captions"], attrs["captions_per_image"]) == (3, 15, 5)
    assert protocol_names.describe_protocol(attrs) == \
        "Flickr30k 1K test (Karpathy), 3 images, 5 captions per image, t2i / i2t R@1/5/10"
    uneven = dict(attrs, num_images=2, captions_per_image=2.5)
    assert protocol_names.describe_protocol(uneven).endswith("2 images, 2.5 captions per image, t2i / i2t R@1/5/10")
    legacy = {"dataset": "coco", "split": "test", "split_source": "Karpathy dataset_coco.json 'test'"}
    assert protocol_names.describe_protocol(legacy) == "COCO 5K test (Karpathy), t2i / i2t R@1/5/10"
    assert protocol_names.split_name("csv", "all", "all images") == "own data all (all images)"


def test_karpathy_file_flag_only_for_datasets_with_one(capsys):
    import prepare_data
    with pytest.raises(SystemExit):
        prepare_data.main(["--dataset", "synthetic", "--karpathy_file", "dataset_coco.json"])
    assert "--karpathy_file is only for --dataset coco, flickr30k or flickr8k" in capsys.readouterr().err
