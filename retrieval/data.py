"""Datasets as (images, captions, split): the readers of the real layouts, and load_split, the one entry
point every script calls; each returns a DatasetSplit (retrieval/dataset_split.py).

`load_split(dataset, data_dir, split, ...)`:

    flickr8k   official layout (Flicker8k_Dataset/, Flickr8k_text/Flickr8k.token.txt + split files)
               or the Kaggle layout (Images/ + captions.txt, a CSV with header image,caption); without
               the official split files (or with --karpathy_file) through dataset_flickr8k.json
    flickr30k  flickr30k-images/ + Karpathy's dataset_flickr30k.json (train / val / test)
    coco       annotations/captions_{train,val}2017.json + train2017/ val2017/; with a Karpathy
               dataset_coco.json the splits are train / restval / val / test
    (the Karpathy files have one reader: retrieval/karpathy.py)
    csv        the user's own --images DIR --captions FILE (CSV or JSONL with image, caption and an
               optional split column)
    synthetic  the generated shapes dataset (retrieval/synthetic.py)

Loaders never touch the network; downloads live in retrieval/download.py. The checks every reader
shares (strict UTF-8, image names that stay inside their folder, one warning per kind of skipped line)
live in retrieval/dataset_files.py.
"""
from __future__ import annotations

import os
from typing import Any

from retrieval import karpathy, protocol_names, synthetic
from retrieval.dataset_files import (fail, first_existing, keep_inside, list_images,
                                     read_caption_table, read_flickr8k_tokens, read_json, read_text,
                                     summarise_orphans, warn_once)
from retrieval.dataset_split import DatasetSplit, build_split, seeded_split
from retrieval.errors import UserError

DATASETS = ("flickr8k", "flickr30k", "coco", "csv", "synthetic")


FLICKR8K_SPLIT_FILES = {"train": "Flickr_8k.trainImages.txt", "dev": "Flickr_8k.devImages.txt",
                        "test": "Flickr_8k.testImages.txt"}
FLICKR8K_IMAGE_DIRS = ("Flicker8k_Dataset", "Flickr8k_Dataset", "Images", "images")
COCO_SPLITS = ("train", "val")


# ----------------------------------------------------------------------------- Flickr8k

def flickr8k_karpathy_file(data_dir: str | None, karpathy_file: str | None = None) -> str | None:
    """The Karpathy file Flickr8k is read through: the one given, else dataset_flickr8k.json in the folder when
    the official split files are not there (they win: they are the splits the corpus was published with)."""
    if karpathy_file or not data_dir:
        return karpathy_file or None
    text_dirs = [os.path.join(data_dir, "Flickr8k_text"), data_dir]
    official = all(first_existing(os.path.join(d, f) for d in text_dirs) for f in FLICKR8K_SPLIT_FILES.values())
    return None if official else karpathy.find_file("flickr8k", data_dir)


def load_flickr8k(data_dir: str, split: str, seed: int = 0, karpathy_file: str | None = None) -> DatasetSplit:
    """Flickr8k in the official layout or the Kaggle layout (see the module docstring), or through its
    Karpathy file (flickr8k_karpathy_file)."""
    karpathy_file = flickr8k_karpathy_file(data_dir, karpathy_file)
    if karpathy_file:
        return karpathy.load("flickr8k", data_dir, karpathy_file, split)
    text_dirs = [os.path.join(data_dir, "Flickr8k_text"), data_dir]
    token_file = first_existing(os.path.join(d, "Flickr8k.token.txt") for d in text_dirs)
    kaggle_file = first_existing([os.path.join(data_dir, "captions.txt")])
    image_dir = first_existing([os.path.join(data_dir, d) for d in FLICKR8K_IMAGE_DIRS], kind="dir")
    if not token_file and not kaggle_file:
        fail(data_dir, "no Flickr8k captions found (expected Flickr8k_text/Flickr8k.token.txt or the Kaggle "
                       "captions.txt); get them with --download")
    if not image_dir:
        fail(data_dir, f"no Flickr8k image folder found (expected one of {', '.join(FLICKR8K_IMAGE_DIRS)}); "
                       "get it with --download")
    on_disk = set(list_images(image_dir))
    if token_file:
        triples, skipped = read_flickr8k_tokens(token_file)
        source, layout = token_file, "official"
    else:
        rows, skipped = read_caption_table(kaggle_file)
        triples = [(row["image"], row["caption"], number) for row, number in rows]
        source, layout = kaggle_file, "kaggle"
    triples, outside = keep_inside(source, image_dir, triples)
    skipped += outside
    orphans = [(name, number) for name, _, number in triples if name not in on_disk]
    skipped += summarise_orphans(source, orphans)
    pairs = [(name, caption) for name, caption, _ in triples if name in on_disk]
    info = {"layout": layout, "caption_file": os.path.relpath(source, data_dir)}
    split_images, split_info = _flickr8k_split(data_dir, text_dirs, split, seed, pairs)
    info.update(split_info)
    return build_split("flickr8k", split, image_dir, split_images, pairs, skipped, info, on_disk)


def _flickr8k_split(data_dir: str, text_dirs: list[str], split: str, seed: int,
                    pairs: list[tuple[str, str]]) -> tuple[list[str], dict[str, Any]]:
    """The split's image names and where they came from: the official split files when all three are
    there, else a seeded split of the captioned images."""
    split_files = {name: first_existing(os.path.join(d, f) for d in text_dirs)
                   for name, f in FLICKR8K_SPLIT_FILES.items()}
    if split not in FLICKR8K_SPLIT_FILES:
        fail(data_dir, f"no split '{split}' in Flickr8k (have {', '.join(FLICKR8K_SPLIT_FILES)})")
    if all(split_files.values()):
        split_images = [line.strip() for line in read_text(split_files[split]).splitlines() if line.strip()]
        return split_images, {"split_source": f"official {FLICKR8K_SPLIT_FILES[split]}"}
    captioned = sorted({name for name, _ in pairs})
    warn_once(f"{data_dir}: no Flickr8k split files; using a seeded split (seed={seed}) of 75/12.5/12.5 %")
    return seeded_split(captioned, seed)[split], {
        "split_source": f"seeded (seed={seed}, 75/12.5/12.5 %; no official split files found)", "seed": seed}


# ----------------------------------------------------------------------------- Flickr30k

def load_flickr30k(data_dir: str, split: str, karpathy_file: str | None = None) -> DatasetSplit:
    """Flickr30k: flickr30k-images/ + Karpathy's dataset_flickr30k.json (its only published split)."""
    karpathy_file = karpathy_file or karpathy.find_file("flickr30k", data_dir)
    if not karpathy_file:
        fail(data_dir, "no dataset_flickr30k.json (Karpathy split) found in the folder or its karpathy/; "
                       "get it with --download or pass --karpathy_file")
    return karpathy.load("flickr30k", data_dir, karpathy_file, split)


# ----------------------------------------------------------------------------- COCO

def load_coco(data_dir: str, split: str, karpathy_file: str | None = None) -> DatasetSplit:
    """COCO 2017 captions; the Karpathy split when dataset_coco.json is present (or given)."""
    karpathy_file = karpathy_file or karpathy.find_file("coco", data_dir)
    if karpathy_file:
        return karpathy.load("coco", data_dir, karpathy_file, split)
    if split not in COCO_SPLITS:
        fail(data_dir, f"no split '{split}' in COCO without a Karpathy dataset_coco.json (have "
                       f"{', '.join(COCO_SPLITS)}; --download fetches the Karpathy file)")
    annotation_file = os.path.join(data_dir, "annotations", f"captions_{split}2017.json")
    if not os.path.isfile(annotation_file):
        fail(annotation_file, "COCO caption annotations not found (get them with --download)")
    data = read_json(annotation_file)
    if not isinstance(data, dict) or "images" not in data or "annotations" not in data:
        fail(annotation_file, "not a COCO captions file (needs 'images' and 'annotations')")
    image_dir = os.path.join(data_dir, f"{split}2017")
    on_disk = set(list_images(image_dir))
    named = [(str(image["file_name"]), image["id"], f"image id {image['id']}") for image in data["images"]]
    inside, outside = keep_inside(annotation_file, image_dir, named)
    file_of = {image_id: name for name, image_id, _ in inside}
    refused = {image_id for _, image_id, _ in named} - set(file_of)  # already noted once per image
    pairs, skipped = _coco_pairs(annotation_file, data["annotations"], file_of, refused)
    info = {"layout": "coco2017", "caption_file": os.path.relpath(annotation_file, data_dir),
            "split_source": f"official COCO 2017 {split}"}
    return build_split("coco", split, image_dir, sorted(file_of.values()), pairs, outside + skipped, info, on_disk)


def _coco_pairs(annotation_file: str, annotations: list[dict[str, Any]], file_of: dict[Any, str],
                refused: set[Any]) -> tuple[list[tuple[str, str]], list[str]]:
    """(image file, caption) pairs of the annotations, and notes of the unusable ones (unknown image id,
    empty caption); annotations of `refused` images (names outside the folder) are dropped unnoted."""
    pairs, skipped = [], []
    for annotation in annotations:
        if annotation.get("image_id") in refused:
            continue
        name = file_of.get(annotation.get("image_id"))
        caption = str(annotation.get("caption") or "").strip()
        if name is None or not caption:
            fault = f"names unknown image id {annotation.get('image_id')}" if name is None else "has an empty caption"
            skipped.append(f"{os.path.basename(annotation_file)}: annotation {annotation.get('id')} {fault}")
            continue
        pairs.append((name, caption))
    if skipped:
        warn_once(f"{annotation_file}: {len(skipped)} unusable annotations skipped")
    return pairs, skipped


# ----------------------------------------------------------------------------- the user's own files

def load_csv(images: str | None, captions: str | None, split: str, seed: int = 0) -> DatasetSplit:
    """The user's own data: an image folder and a CSV/JSONL of (image, caption[, split]) rows."""
    if not images or not captions:
        raise UserError("--dataset csv needs --images DIR and --captions FILE")
    if not os.path.isdir(images):
        fail(images, "image folder not found")
    rows, skipped = read_caption_table(captions)
    inside, outside = keep_inside(captions, images, [(row["image"], row, number) for row, number in rows])
    skipped += outside
    rows = [(dict(row, image=name), number) for name, row, number in inside]
    names = sorted({row["image"] for row, _ in rows})
    on_disk = {name for name in names if os.path.isfile(os.path.join(images, name))}
    orphans = [(row["image"], number) for row, number in rows if row["image"] not in on_disk]
    skipped += summarise_orphans(captions, orphans)
    pairs = [(row["image"], row["caption"]) for row, _ in rows if row["image"] in on_disk]
    split_of: dict[str, str] = {}
    for row, _ in rows:
        if row.get("split") and row["image"] in on_disk:  # rows of missing images are already reported
            split_of.setdefault(row["image"], row["split"])
    split_images, split_info = _csv_split(captions, split, seed, split_of, on_disk)
    info = {"layout": "csv", "caption_file": os.path.abspath(captions), **split_info}
    return build_split("csv", split, images, split_images, pairs, skipped, info, on_disk)


def _csv_split(captions: str, split: str, seed: int, split_of: dict[str, str], on_disk: set[str]
               ) -> tuple[list[str], dict[str, Any]]:
    """The split's image names and where they came from: every image ('all'), the file's split column,
    or, without one, a seeded split."""
    if split == "all":
        return sorted(on_disk), {"split_source": "all images"}
    if split_of:
        split_images = [name for name, s in split_of.items() if s == split]
        if not split_images:
            fail(captions, f"no rows with split '{split}' (have {', '.join(sorted(set(split_of.values())))})")
        return split_images, {"split_source": f"'split' column of {os.path.basename(captions)}"}
    if split not in FLICKR8K_SPLIT_FILES:
        fail(captions, f"no split '{split}' (without a 'split' column: train, dev, test or all)")
    return seeded_split(sorted(on_disk), seed)[split], {"split_source": f"seeded (seed={seed}, 75/12.5/12.5 %)",
                                                          "seed": seed}


# ----------------------------------------------------------------------------- the entry point

def default_splits(dataset: str, data_dir: str | None = None, captions: str | None = None,
                   karpathy_file: str | None = None) -> list[str]:
    """The splits prepare_data.py writes when --splits is not given."""
    if dataset == "coco":
        found = karpathy_file or karpathy.find_file("coco", data_dir)
        return list(karpathy.SPLITS["coco"]) if found else list(COCO_SPLITS)
    if dataset == "flickr30k" or (dataset == "flickr8k" and flickr8k_karpathy_file(data_dir, karpathy_file)):
        return list(karpathy.SPLITS[dataset])
    if dataset == "csv" and captions and os.path.isfile(captions):
        rows, _ = read_caption_table(captions)
        found = sorted({row["split"] for row, _ in rows if row.get("split")})
        if found:
            return found
    return ["train", "dev", "test"]


def require_folder(dataset: str, data_dir: str | None) -> None:
    """UserError unless the dataset's folder exists (naming --download where it can fetch the dataset)."""
    if not data_dir or not os.path.isdir(data_dir):
        hint = f" (use --download to fetch {dataset}, or pass --data_dir)" if dataset in ("flickr8k", "flickr30k", "coco") \
            else " (pass --data_dir)"
        fail(data_dir, f"dataset folder not found{hint}")


def load_split(dataset: str, data_dir: str | None, split: str, seed: int = 0, images: str | None = None,
               captions: str | None = None, karpathy_file: str | None = None) -> DatasetSplit:
    """One split of a dataset as a DatasetSplit (the single entry point for every script); its info names
    the split in the field's terms (`split_name`, retrieval/protocol_names.py). "dev" (the split the trainer
    selects on) is the dataset's "val" where it has no "dev" (Karpathy files, COCO)."""
    if split == "dev" and dataset != "csv":
        splits = default_splits(dataset, data_dir, captions, karpathy_file)
        split = "val" if "dev" not in splits and "val" in splits else split
    loaded = _load(dataset, data_dir, split, seed, images, captions, karpathy_file)
    loaded.info.setdefault("split_name", protocol_names.split_name(dataset, split, loaded.info.get("split_source", "")))
    return loaded


def _load(dataset: str, data_dir: str | None, split: str, seed: int, images: str | None, captions: str | None,
          karpathy_file: str | None) -> DatasetSplit:
    if karpathy_file and not os.path.isfile(karpathy_file):
        fail(karpathy_file, "Karpathy split file not found (--karpathy_file)")
    if dataset == "synthetic":
        if not os.path.exists(os.path.join(data_dir, "captions.jsonl")):
            synthetic.make_synthetic(data_dir, seed=seed)
        return synthetic.load_synthetic(data_dir, split)
    if dataset == "csv":
        return load_csv(images, captions, split, seed)
    require_folder(dataset, data_dir)
    if dataset == "flickr8k":
        return load_flickr8k(data_dir, split, seed, karpathy_file)
    if dataset == "flickr30k":
        return load_flickr30k(data_dir, split, karpathy_file)
    if dataset == "coco":
        return load_coco(data_dir, split, karpathy_file)
    raise UserError(f"--dataset {dataset}: unknown (choose from {', '.join(DATASETS)})")
