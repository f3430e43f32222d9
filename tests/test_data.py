"""Dataset loaders: Flickr8k (official + Kaggle layouts), COCO (+ Karpathy), own CSV/JSONL, bad input."""
import codecs
import json
import os

import numpy as np
import pytest
from PIL import Image

import prepare_data
from conftest import as_script
from retrieval import data, dataset_files, dataset_split, handoff, synthetic


def write_images(folder, names):
    os.makedirs(folder, exist_ok=True)
    for i, name in enumerate(names):
        Image.new("RGB", (8, 8), (i * 20 % 256, 0, 0)).save(os.path.join(folder, name))


def check_consistent(split):
    assert len(split.text_to_image) == len(split.captions)
    assert sorted(set(split.text_to_image.tolist())) == list(range(len(split.image_files)))
    assert np.all(np.diff(split.text_to_image) >= 0)  # captions grouped per image, image order kept


def test_kaggle_layout_quoted_commas_and_seeded_split(tmp_path):
    names = [f"{i:04d}_x.jpg" for i in range(16)]
    write_images(tmp_path / "Images", names)
    lines = ["image,caption"]
    for name in names:
        lines += [f"{name},A dog runs on grass .", f'{name},"A dog, brown and white, runs ."']
    (tmp_path / "captions.txt").write_text("\n".join(lines) + "\n")
    splits = {s: data.load_split("flickr8k", str(tmp_path), s, seed=3) for s in ("train", "dev", "test")}
    assert [len(splits[s].image_files) for s in ("train", "dev", "test")] == [12, 2, 2]
    assert set().union(*(set(s.image_files) for s in splits.values())) == set(names)
    for split in splits.values():
        check_consistent(split)
        assert split.info["layout"] == "kaggle" and "seeded (seed=3" in split.info["split_source"]
        assert not any('"' in c for c in split.captions)
        assert "A dog, brown and white, runs ." in split.captions
        assert split.skipped == []
    # the seed decides the split, reproducibly
    assert data.load_split("flickr8k", str(tmp_path), "dev", seed=3).image_files == splits["dev"].image_files
    assert data.load_split("flickr8k", str(tmp_path), "dev", seed=4).image_files != splits["dev"].image_files


def make_official(root, orphan=True, malformed=True):
    names = [f"{i}_abc.jpg" for i in range(10)]
    write_images(root / "Flicker8k_Dataset", names)
    text = root / "Flickr8k_text"
    text.mkdir()
    lines = []
    for name in names:
        lines += [f"{name}#{k}\tcaption {k} of {name} ." for k in range(5)]
    if orphan:
        lines[12:12] = [f"3_abc.jpg.1#{k}\torphan caption {k} ." for k in range(5)]
    if malformed:
        lines.insert(30, "7_abc.jpg a line without a tab")
    (text / "Flickr8k.token.txt").write_text("\n".join(lines) + "\n")
    for split, members in (("train", names[:6]), ("dev", names[6:8]), ("test", names[8:])):
        (text / data.FLICKR8K_SPLIT_FILES[split]).write_text("\n".join(members) + "\n")
    return names


def test_official_layout_orphans_and_malformed_line(tmp_path, capsys):
    names = make_official(tmp_path)
    test = data.load_split("flickr8k", str(tmp_path), "test")
    assert test.image_files == names[8:] and len(test.captions) == 10
    assert test.info["split_source"] == "official Flickr_8k.testImages.txt"
    check_consistent(test)
    orphan_notes = [s for s in test.skipped if "3_abc.jpg.1" in s]
    assert len(orphan_notes) == 5 and orphan_notes[0].startswith("Flickr8k.token.txt:13:")
    malformed = [s for s in test.skipped if "malformed" in s]
    assert len(malformed) == 1 and malformed[0].startswith("Flickr8k.token.txt:31:")
    assert len(data.load_split("flickr8k", str(tmp_path), "train").captions) == 30
    # the malformed line names 7_abc.jpg (a dev image) but is not turned into a caption
    assert len(data.load_split("flickr8k", str(tmp_path), "dev").captions) == 10
    err = capsys.readouterr().err
    assert err.count("5 caption lines name no image file") == 1  # reported once, not per split
    assert err.count("1 malformed lines skipped") == 1


def test_missing_split_files_give_seeded_split(tmp_path):
    make_official(tmp_path, orphan=False, malformed=False)
    for split in data.FLICKR8K_SPLIT_FILES.values():
        os.remove(tmp_path / "Flickr8k_text" / split)
    splits = [data.load_split("flickr8k", str(tmp_path), s, seed=1) for s in ("train", "dev", "test")]
    assert [len(s.image_files) for s in splits] == [8, 1, 1]  # 75 / 12.5 / 12.5 % of 10
    assert len(set().union(*(s.image_files for s in splits))) == 10
    assert splits[2].info["split_source"].startswith("seeded (seed=1") and splits[2].info["seed"] == 1


def make_coco(root):
    write_images(root / "val2017", ["000000000001.jpg", "000000000002.jpg", "000000000003.jpg"])
    annotations = {
        "images": [{"id": 1, "file_name": "000000000001.jpg"}, {"id": 2, "file_name": "000000000002.jpg"},
                   {"id": 3, "file_name": "000000000003.jpg"}],
        "annotations": [{"id": 10, "image_id": 1, "caption": "A cat."}, {"id": 11, "image_id": 1, "caption": "A cat sits."},
                        {"id": 12, "image_id": 3, "caption": " A bus. "}, {"id": 13, "image_id": 99, "caption": "lost"}],
    }
    (root / "annotations").mkdir()
    (root / "annotations" / "captions_val2017.json").write_text(json.dumps(annotations))


def test_coco_images_without_captions(tmp_path, capsys):
    make_coco(tmp_path)
    assert data.default_splits("coco", str(tmp_path)) == ["train", "val"]
    val = data.load_split("coco", str(tmp_path), "val")
    assert val.image_files == ["000000000001.jpg", "000000000003.jpg"]
    assert val.captions == ["A cat.", "A cat sits.", "A bus."]
    assert val.text_to_image.tolist() == [0, 0, 1]
    assert any("000000000002.jpg" in s and "no caption" in s for s in val.skipped)
    assert any("unknown image id 99" in s for s in val.skipped)
    assert "1 images have no caption" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="captions_train2017.json"):
        as_script(data.load_split, "coco", str(tmp_path), "train")
    with pytest.raises(SystemExit, match="Karpathy"):
        as_script(data.load_split, "coco", str(tmp_path), "test")


def test_coco_karpathy_split_found_in_2017_folders(tmp_path):
    make_coco(tmp_path)
    entries = [{"filepath": "val2014", "filename": f"COCO_val2014_{i:012d}.jpg", "cocoid": i, "split": split,
                "sentences": [{"raw": f"caption {i} {k}"} for k in range(5)]}
               for i, split in ((1, "test"), (2, "test"), (3, "val"), (4, "test"))]
    (tmp_path / "dataset_coco.json").write_text(json.dumps({"images": entries}))
    assert data.default_splits("coco", str(tmp_path)) == ["train", "restval", "val", "test"]
    test = data.load_split("coco", str(tmp_path), "test")
    assert test.image_files == ["val2017/000000000001.jpg", "val2017/000000000002.jpg"]
    assert len(test.captions) == 10 and test.image_root == str(tmp_path)
    assert any("cocoid 4" in s for s in test.skipped)  # not on disk
    assert test.info["split_source"].startswith("Karpathy")


def test_own_csv_and_jsonl(tmp_path):
    write_images(tmp_path / "imgs", ["a.png", "b.png", "c.png", "d.png"])
    (tmp_path / "caps.csv").write_text('image,caption,split\na.png,"one, two",train\nb.png,beta,test\n'
                                       'c.png,gamma,test\nc.png,gamma 2,test\nmissing.png,nope,test\n')
    assert data.default_splits("csv", captions=str(tmp_path / "caps.csv")) == ["test", "train"]
    test = data.load_split("csv", "", "test", images=str(tmp_path / "imgs"), captions=str(tmp_path / "caps.csv"))
    assert test.image_files == ["b.png", "c.png"] and test.captions == ["beta", "gamma", "gamma 2"]
    assert any("missing.png" in s for s in test.skipped)
    train = data.load_split("csv", "", "train", images=str(tmp_path / "imgs"), captions=str(tmp_path / "caps.csv"))
    assert train.captions == ["one, two"]

    write_images(tmp_path / "imgs", ["e.png", "f.png", "g.png", "h.png"])
    rows = [{"image": f"{n}.png", "caption": f"photo {n}"} for n in "abcdefgh"]
    (tmp_path / "caps.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n{broken\n")
    everything = data.load_split("csv", "", "all", images=str(tmp_path / "imgs"), captions=str(tmp_path / "caps.jsonl"))
    assert everything.image_files == [f"{n}.png" for n in "abcdefgh"]
    assert any(s.startswith("caps.jsonl:9: malformed JSON") for s in everything.skipped)
    seeded = [data.load_split("csv", "", s, images=str(tmp_path / "imgs"), captions=str(tmp_path / "caps.jsonl"))
              for s in ("train", "dev", "test")]
    assert [len(s.image_files) for s in seeded] == [6, 1, 1]


def test_bad_input_names_the_file(tmp_path):
    with pytest.raises(SystemExit, match=r"error: .*nowhere: dataset folder not found"):
        as_script(data.load_split, "flickr8k", str(tmp_path / "nowhere"), "test")
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit, match="no Flickr8k captions found"):
        as_script(data.load_split, "flickr8k", str(tmp_path / "empty"), "test")
    write_images(tmp_path / "imgs", ["a.png"])
    (tmp_path / "bad.csv").write_text("file;text\na.png;hello\n")
    with pytest.raises(SystemExit, match=r"bad\.csv: CSV header must name the columns image, caption"):
        as_script(data.load_split, "csv", "", "all", images=str(tmp_path / "imgs"), captions=str(tmp_path / "bad.csv"))
    (tmp_path / "annotations").mkdir()
    (tmp_path / "annotations" / "captions_val2017.json").write_text("{not json")
    with pytest.raises(SystemExit, match=r"captions_val2017\.json: not valid JSON"):
        as_script(data.load_split, "coco", str(tmp_path), "val")
    make_official(tmp_path / "f8k")
    with pytest.raises(SystemExit, match="no split 'val'"):
        as_script(data.load_split, "flickr8k", str(tmp_path / "f8k"), "val")


def test_real_flickr8k_counts(capsys, flickr8k_dir):
    splits = {s: data.load_split("flickr8k", flickr8k_dir, s) for s in ("train", "dev", "test")}
    assert [len(splits[s].image_files) for s in ("train", "dev", "test")] == [6000, 1000, 1000]
    assert (len(splits["test"].image_files), len(splits["test"].captions)) == (1000, 5000)
    assert sum(len(s.captions) for s in splits.values()) == 40000
    images = dataset_files.list_images(os.path.join(flickr8k_dir, "Flicker8k_Dataset"))
    triples, malformed = dataset_files.read_flickr8k_tokens(os.path.join(flickr8k_dir, "Flickr8k_text", "Flickr8k.token.txt"))
    on_disk = set(images)
    assert len(images) == 8091 and malformed == []
    assert sum(name in on_disk for name, _, _ in triples) == 40455
    orphans = [s for s in splits["test"].skipped if "matches no image file" in s]
    assert len(orphans) == 5 and all("2258277193_586949ec62.jpg.1" in s for s in orphans)
    assert capsys.readouterr().err.count("5 caption lines name no image file") <= 1
    for split in splits.values():
        check_consistent(split)
        assert all(count == 5 for count in np.bincount(split.text_to_image))


# ----------------------------------------------------------------------------- image names stay inside their folder

def make_outside_files(tmp_path):
    """tmp/outside/secret.jpg (a file no captions file may reach) and tmp/shared/real.jpg (a file the user
    links into an image folder, as with a folder of links to a shared read-only copy)."""
    write_images(tmp_path / "outside", ["secret.jpg"])
    write_images(tmp_path / "shared", ["real.jpg"])
    return str(tmp_path / "outside" / "secret.jpg")


def test_csv_image_names_cannot_leave_the_image_folder(tmp_path, tiny_clip_dir, capsys):
    secret = make_outside_files(tmp_path)
    images = tmp_path / "imgs"
    write_images(images, ["a.png", "b.png"])
    os.symlink(tmp_path / "shared" / "real.jpg", images / "link.jpg")      # a link inside: allowed
    os.symlink(tmp_path / "outside", images / "linkdir")                   # linkdir/.. is tmp/, not imgs/
    (tmp_path / "caps.csv").write_text(
        "image,caption\n"
        "a.png,alpha\n"
        "../outside/secret.jpg,secret one\n"
        f"{secret},secret two\n"
        "../../../etc/passwd,secret three\n"
        "link.jpg,linked\n"
        "sub/../b.png,beta\n"
        "linkdir/../outside/secret.jpg,secret four\n")
    split = data.load_split("csv", "", "all", images=str(images), captions=str(tmp_path / "caps.csv"))
    assert split.image_files == ["a.png", "b.png", "link.jpg"]
    assert split.captions == ["alpha", "beta", "linked"]
    outside = [s for s in split.skipped if "outside the image folder" in s]
    assert [s.split(": image")[0] for s in outside] == ["caps.csv:3", "caps.csv:4", "caps.csv:5"]
    assert f"'{secret}'" in outside[1] and "'../../../etc/passwd'" in outside[2]
    # normalised without resolving the link, the last name is imgs/outside/secret.jpg: simply not there
    assert any(s.startswith("caps.csv:8: caption of 'outside/secret.jpg' matches no image") for s in split.skipped)
    err = capsys.readouterr().err
    assert err.count("image names leave the image folder") == 1
    assert "caps.csv: 3 image names leave the image folder" in err and "(e.g. '../outside/secret.jpg')" in err

    # end to end: the script embeds exactly the images inside the folder, the link included
    written = prepare_data.main(["--quiet", "--device", "cpu", "--dataset", "csv", "--images", str(images),
                                 "--captions", str(tmp_path / "caps.csv"), "--model", tiny_clip_dir,
                                 "--output_dir", str(tmp_path / "out"), "--output_format", "npz",
                                 "--splits", "all", "--num_workers", "0", "--no_eval"])
    emb = handoff.read_embeddings(written["all"])
    assert emb.image_ids == ["a.png", "b.png", "link.jpg"] and len(emb.captions) == 3
    assert sum("outside the image folder" in s for s in emb.attrs["skipped"]) == 3


def test_kaggle_captions_names_cannot_leave_the_image_folder(tmp_path, capsys):
    secret = make_outside_files(tmp_path)
    names = [f"{i}_x.jpg" for i in range(8)]
    write_images(tmp_path / "Images", names)
    lines = ["image,caption"] + [f"{name},a photo of {name}" for name in names]
    lines += ["../outside/secret.jpg,secret one", f"{secret},secret two", "../../../etc/passwd,secret three"]
    (tmp_path / "captions.txt").write_text("\n".join(lines) + "\n")
    splits = [data.load_split("flickr8k", str(tmp_path), s) for s in ("train", "dev", "test")]
    assert sorted(sum((s.image_files for s in splits), [])) == names
    assert not any("secret" in c for s in splits for c in s.captions)
    outside = [s for s in splits[0].skipped if "outside the image folder" in s]
    assert [s.split(": image")[0] for s in outside] == ["captions.txt:10", "captions.txt:11", "captions.txt:12"]
    assert capsys.readouterr().err.count("3 image names leave the image folder") == 1


def test_karpathy_paths_cannot_leave_the_data_folder(tmp_path, capsys):
    make_outside_files(tmp_path)
    root = tmp_path / "coco"
    make_coco(root)
    os.symlink(tmp_path / "shared", root / "linked")   # a linked folder inside the data folder: allowed
    entries = [{"filepath": "val2014", "filename": "COCO_val2014_000000000001.jpg", "cocoid": 1},
               {"filepath": "../outside", "filename": "secret.jpg", "cocoid": 2},
               {"filepath": str(tmp_path / "outside"), "filename": "secret.jpg", "cocoid": 3},
               {"filepath": "../../../etc", "filename": "passwd"},
               {"filepath": "linked", "filename": "real.jpg"}]
    for entry in entries:
        entry.update(split="test", sentences=[{"raw": f"caption of {entry['filename']}"}])
    (root / "dataset_coco.json").write_text(json.dumps({"images": entries}))
    test = data.load_split("coco", str(root), "test")
    assert test.image_files == ["linked/real.jpg", "val2017/000000000001.jpg"]
    assert test.captions == ["caption of real.jpg", "caption of COCO_val2014_000000000001.jpg"]
    outside = [s for s in test.skipped if "outside the image folder" in s]
    assert len(outside) == 3 and outside[0].startswith("dataset_coco.json (cocoid 2): image '../outside/secret.jpg'")
    assert "'../../../etc/passwd'" in outside[2]
    assert capsys.readouterr().err.count("3 image names leave the image folder") == 1


def test_contained_name_is_lexical():
    assert dataset_files.contained_name("imgs", "a/./b/../c.jpg") == os.path.join("a", "c.jpg")
    for name in ("../x.jpg", "/etc/passwd", "a/../../x.jpg", "", ".", "a/.."):
        assert dataset_files.contained_name("imgs", name) is None, name
    assert dataset_files.contained_name("/", "etc/passwd") == os.path.join("etc", "passwd")  # a folder at the root


# ----------------------------------------------------------------------------- captions files are strict UTF-8

def kaggle_with(tmp_path, text):
    write_images(tmp_path / "Images", ["a.jpg", "b.jpg"])
    (tmp_path / "captions.txt").write_text(text, encoding="utf-8")
    for split_file in data.FLICKR8K_SPLIT_FILES.values():  # beside captions.txt: both images in every split
        (tmp_path / split_file).write_text("a.jpg\nb.jpg\n")
    return ("flickr8k", str(tmp_path), "test"), {}, tmp_path / "captions.txt"


def own_file_with(name):
    def build(tmp_path, text):
        write_images(tmp_path / "imgs", ["a.jpg", "b.jpg"])
        (tmp_path / name).write_text(text, encoding="utf-8")
        return ("csv", "", "all"), dict(images=str(tmp_path / "imgs"), captions=str(tmp_path / name)), tmp_path / name
    return build


def token_file_with(tmp_path, _text):
    make_official(tmp_path, orphan=False, malformed=False)
    path = tmp_path / "Flickr8k_text" / "Flickr8k.token.txt"
    lines = path.read_text().splitlines()
    lines[40] = lines[40].replace("caption", "café")  # a caption of 8_abc.jpg, a test image
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return ("flickr8k", str(tmp_path), "test"), {}, path


def karpathy_with(tmp_path, _text):
    make_coco(tmp_path)
    entries = [{"filepath": "val2017", "filename": "000000000001.jpg", "split": "test",
                "sentences": [{"raw": "un café"}]}]
    path = tmp_path / "dataset_coco.json"
    path.write_text(json.dumps({"images": entries}, ensure_ascii=False), encoding="utf-8")
    return ("coco", str(tmp_path), "test"), {}, path


CSV_TEXT = "image,caption\na.jpg,a dog\nb.jpg,a café\n"
JSONL_TEXT = '{"image": "a.jpg", "caption": "a dog"}\n{"image": "b.jpg", "caption": "a café"}\n'
ENCODING_CASES = {  # name: (builder, text, line of the café)
    "csv": (own_file_with("caps.csv"), CSV_TEXT, 3),
    "jsonl": (own_file_with("caps.jsonl"), JSONL_TEXT, 2),
    "kaggle captions.txt": (kaggle_with, CSV_TEXT, 3),
    "Flickr8k token file": (token_file_with, None, 41),
    "Karpathy json": (karpathy_with, None, 1),
}


@pytest.mark.parametrize("case", list(ENCODING_CASES))
def test_non_utf8_captions_name_line_and_byte(tmp_path, case):
    build, text, line = ENCODING_CASES[case]
    args, kwargs, path = build(tmp_path, text)
    good = path.read_bytes()
    offset = good.index("café".encode()) + 3
    path.write_bytes(good.replace("café".encode(), "café".encode("latin-1"), 1))  # what a Windows editor saves
    message = (f"error: {path}: not UTF-8 text: line {line}, byte offset {offset} (0xe9); "
               f"re-encode the file as UTF-8 and run again")
    with pytest.raises(SystemExit) as exit_info:
        as_script(data.load_split, *args, **kwargs)
    assert str(exit_info.value) == message
    # with a BOM in front, the offset still counts bytes of the file as it is
    path.write_bytes(codecs.BOM_UTF8 + path.read_bytes())
    with pytest.raises(SystemExit, match=f"line {line}, byte offset {offset + 3} "):
        as_script(data.load_split, *args, **kwargs)


@pytest.mark.parametrize("case", list(ENCODING_CASES))
def test_utf8_bom_captions_read_like_plain_utf8(tmp_path, case):
    build, text, _ = ENCODING_CASES[case]
    args, kwargs, path = build(tmp_path, text)
    plain = data.load_split(*args, **kwargs)
    path.write_bytes(codecs.BOM_UTF8 + path.read_bytes())
    with_bom = data.load_split(*args, **kwargs)
    assert (with_bom.image_files, with_bom.captions) == (plain.image_files, plain.captions)
    assert any("café" in c for c in plain.captions)
    assert not any("\ufeff" in s for s in with_bom.image_files + with_bom.captions + with_bom.skipped)


def test_script_stops_on_non_utf8_captions_and_writes_nothing(tmp_path, tiny_clip_dir):
    write_images(tmp_path / "imgs", ["a.jpg", "b.jpg"])
    (tmp_path / "caps.csv").write_bytes(CSV_TEXT.encode("latin-1"))
    with pytest.raises(SystemExit, match=r"^error: .*caps\.csv: not UTF-8 text: line 3, byte offset 37 \(0xe9\); "
                                         r"re-encode the file as UTF-8 and run again$"):
        prepare_data.main(["--quiet", "--device", "cpu", "--dataset", "csv", "--images", str(tmp_path / "imgs"),
                           "--captions", str(tmp_path / "caps.csv"), "--model", tiny_clip_dir,
                           "--output_dir", str(tmp_path / "out"), "--splits", "all"])
    assert not (tmp_path / "out").exists()


def test_default_synthetic_test_split_is_a_real_gallery():
    # the demo's test gallery: >= 1,000 images, so the default candidate sizes (32, 100) re-rank a small
    # part of it instead of half or all of it
    names = [f"synth_{i:05d}.png" for i in range(synthetic.SYNTHETIC_IMAGES)]
    splits = dataset_split.seeded_split(names, 0, synthetic.SYNTHETIC_SPLITS)
    assert len(splits["test"]) >= 1000 >= 10 * 100
    assert sorted(sum(splits.values(), [])) == names      # disjoint and complete


# ----------------------------------------------------------------------------- issue 28: repeated rows

def test_repeated_image_caption_rows_are_dropped_with_a_count(tmp_path, tiny_clip_dir, capsys):
    images = tmp_path / "imgs"
    write_images(images, ["a.png", "b.png"])
    (tmp_path / "caps.csv").write_text("image,caption\na.png,alpha\nb.png,beta\na.png,alpha\n./a.png,alpha\n"
                                       "a.png,alpha two\nb.png,beta\n")
    split = data.load_split("csv", "", "all", images=str(images), captions=str(tmp_path / "caps.csv"))
    assert split.captions == ["alpha", "alpha two", "beta"] and split.text_to_image.tolist() == [0, 0, 1]
    repeats = [s for s in split.skipped if "same image and caption" in s]
    assert repeats == ["caps.csv:4: repeats line 2 (same image and caption); dropped",
                       "caps.csv:5: repeats line 2 (same image and caption); dropped",
                       "caps.csv:7: repeats line 3 (same image and caption); dropped"]
    err = capsys.readouterr().err
    assert err.count("repeat an earlier") == 1
    assert f"{tmp_path / 'caps.csv'}: 3 rows repeat an earlier (image, caption) row; dropped (first: " in err
    rows = [{"image": "a.png", "caption": "alpha"}, {"image": "b.png", "caption": "beta"}] * 2
    (tmp_path / "caps.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    split = data.load_split("csv", "", "all", images=str(images), captions=str(tmp_path / "caps.jsonl"))
    assert split.captions == ["alpha", "beta"] and sum("repeats line" in s for s in split.skipped) == 2

    # end to end: the hand-off file holds each pair once and records the dropped rows
    written = prepare_data.main(["--quiet", "--device", "cpu", "--dataset", "csv", "--images", str(images),
                                 "--captions", str(tmp_path / "caps.csv"), "--model", tiny_clip_dir,
                                 "--output_dir", str(tmp_path / "out"), "--output_format", "npz",
                                 "--splits", "all", "--num_workers", "0", "--no_eval"])
    emb = handoff.read_embeddings(written["all"])
    assert emb.captions == ["alpha", "alpha two", "beta"]
    assert sum("same image and caption" in s for s in emb.attrs["skipped"]) == 3
