"""The one reader of Karpathy's split files (dataset_coco.json, dataset_flickr30k.json, dataset_flickr8k.json,
from caption_datasets.zip): the splits cross-modal retrieval is reported on (COCO 5K test, Flickr30k 1K test).

Schema (the real files): {"images": [{"filename": ..., "split": "train" | "restval" | "val" | "test",
"sentences": [{"raw": ...}, ...], "imgid": ..., COCO only: "filepath": "val2014", "cocoid": ...}],
"dataset": ...}.

Where the images are: COCO entries at <filepath>/<filename> (the 2014 folders) or by cocoid in train2017/ /
val2017/, relative to the data folder; Flickr entries by filename in the dataset's image folder (the first of
IMAGE_FOLDERS that exists). The rules every reader shares hold here too (retrieval/dataset_files.py): strict
UTF-8, names that leave their folder are skipped with one warning, entries without a usable filename, images
missing on disk and images without a caption are skipped and listed.
"""
from __future__ import annotations

import os
from typing import Any

from retrieval.dataset_files import contained_name, fail, first_existing, read_json, summarise_outside, warn_once
from retrieval.dataset_split import DatasetSplit, build_split

FILES = {"coco": "dataset_coco.json", "flickr30k": "dataset_flickr30k.json", "flickr8k": "dataset_flickr8k.json"}
SPLITS = {"coco": ("train", "restval", "val", "test"), "flickr30k": ("train", "val", "test"),
          "flickr8k": ("train", "val", "test")}
# Flickr image folders, first found wins: the official archive names, the Kaggle names, the data folder itself.
IMAGE_FOLDERS = {"flickr30k": ("flickr30k-images", "flickr30k_images", "Images", "images", ""),
                 "flickr8k": ("Flicker8k_Dataset", "Flickr8k_Dataset", "Images", "images", "")}
SEARCHED = ("", "karpathy", "caption_datasets", "annotations")


def find_file(dataset: str, data_dir: str | None) -> str | None:
    """The dataset's Karpathy file inside data_dir (or its karpathy/, caption_datasets/, annotations/)."""
    if not data_dir or dataset not in FILES:
        return None
    return first_existing(os.path.join(data_dir, d, FILES[dataset]) for d in SEARCHED)


def read_entries(dataset: str, karpathy_file: str, split: str) -> list[dict[str, Any]]:
    """The file's entries of `split` (a UserError for an unknown split or a file that is not in the schema)."""
    if split not in SPLITS[dataset]:
        fail(karpathy_file, f"no split '{split}' in the Karpathy split (have {', '.join(SPLITS[dataset])})")
    data = read_json(karpathy_file)
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        fail(karpathy_file, "not a Karpathy split file (needs an 'images' list)")
    return [e for e in data["images"] if isinstance(e, dict) and e.get("split") == split]


def sentences(entry: dict[str, Any]) -> list[str]:
    """The entry's non-empty raw captions, in file order."""
    raws = (s.get("raw") for s in entry.get("sentences") or [] if isinstance(s, dict))
    return [str(raw).strip() for raw in raws if str(raw or "").strip()]


def load(dataset: str, data_dir: str, karpathy_file: str, split: str) -> DatasetSplit:
    """One Karpathy split of COCO, Flickr30k or Flickr8k as a DatasetSplit."""
    entries = read_entries(dataset, karpathy_file, split)
    if dataset == "coco":
        image_root, (named, skipped) = data_dir, _coco_images(data_dir, karpathy_file, entries)
    else:
        image_root, named, skipped = _flickr_images(dataset, data_dir, karpathy_file, entries)
    found = [(name, entry) for name, entry in named if name is not None]
    missing = [entry for name, entry in named if name is None]
    if missing:
        warn_once(f"{karpathy_file}: {len(missing)} images of split '{split}' not found under {image_root}; "
                  "skipped")
        skipped += [f"image '{_declared(e)}' ({_label(e)}): not found under {image_root}" for e in missing]
    pairs = [(name, caption) for name, entry in found for caption in sentences(entry)]
    info = {"layout": f"{dataset}+karpathy", "caption_file": os.path.relpath(karpathy_file, data_dir),
            "split_source": f"Karpathy {os.path.basename(karpathy_file)} '{split}'"}
    names = [name for name, _ in found]
    return build_split(dataset, split, image_root, names, pairs, skipped, info, set(names))


def _declared(entry: dict[str, Any]) -> str:
    """The entry's own [<filepath>/]<filename>."""
    return "/".join(str(part) for part in (entry.get("filepath"), entry.get("filename")) if part)


def _label(entry: dict[str, Any]) -> str:
    return f"cocoid {entry['cocoid']}" if "cocoid" in entry else f"imgid {entry.get('imgid')}"


def _listing(root: str, folder: str, listings: dict[str, set[str]]) -> set[str]:
    """The names in root/folder (empty when it is no folder), listed once per folder into `listings`:
    a folder listing per folder, not a stat per image."""
    if folder not in listings:
        path = os.path.join(root, folder)
        listings[folder] = set(os.listdir(path)) if os.path.isdir(path) else set()
    return listings[folder]


def _coco_images(data_dir: str, karpathy_file: str, entries: list[dict[str, Any]]
                 ) -> tuple[list[tuple[str | None, dict[str, Any]]], list[str]]:
    """(name relative to data_dir or None when not on disk, entry) pairs, and the notes of names that leave
    data_dir: the declared 2014 path first, then the 2017 files of the entry's cocoid."""
    listings: dict[str, set[str]] = {}
    named, outside = [], []
    for entry in entries:
        candidates = []
        if entry.get("filename"):
            safe = contained_name(data_dir, _declared(entry))
            if safe is None:
                outside.append((_declared(entry), _label(entry)))
                continue
            candidates.append(safe)
        if str(entry.get("cocoid", "")).isdigit():
            candidates += [f"{folder}/{int(entry['cocoid']):012d}.jpg" for folder in ("train2017", "val2017")]
        name = next((c for c in candidates
                     if os.path.basename(c) in _listing(data_dir, os.path.dirname(c), listings)), None)
        named.append((name, entry))
    return named, summarise_outside(karpathy_file, data_dir, outside)


def _flickr_images(dataset: str, data_dir: str, karpathy_file: str, entries: list[dict[str, Any]]
                   ) -> tuple[str, list[tuple[str | None, dict[str, Any]]], list[str]]:
    """(image folder, (file name or None when not on disk, entry) pairs, skipped notes) of a Flickr split."""
    folder = first_existing([os.path.join(data_dir, d) for d in IMAGE_FOLDERS[dataset]], kind="dir")
    listings: dict[str, set[str]] = {}
    named, outside, unnamed = [], [], []
    for entry in entries:
        if not str(entry.get("filename") or "").strip():
            unnamed.append(f"{os.path.basename(karpathy_file)} ({_label(entry)}): entry without a filename; skipped")
            continue
        safe = contained_name(folder, str(entry["filename"]))
        if safe is None:
            outside.append((str(entry["filename"]), _label(entry)))
            continue
        there = os.path.basename(safe) in _listing(folder, os.path.dirname(safe), listings)
        named.append((safe if there else None, entry))
    if unnamed:
        warn_once(f"{karpathy_file}: {len(unnamed)} entries without a filename; skipped")
    return folder, named, summarise_outside(karpathy_file, folder, outside) + unnamed
