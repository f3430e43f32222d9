"""The record every dataset loader returns, DatasetSplit, and the rules that build one.

A DatasetSplit lists image files relative to `image_root`, the captions, and `text_to_image`
(caption row -> image row), in a deterministic order (images sorted by id, captions in file order
within an image). Images missing on disk and images without a caption are dropped (build_split),
listed in DatasetSplit.skipped and warned about once on stderr. A dataset without official splits is
split by --seed (seeded_split).
"""
from __future__ import annotations

import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from retrieval.dataset_files import fail, warn_once

# The Flickr8k proportions 6000/1000/1000.
SEEDED_FRACTIONS = (("train", 0.75), ("dev", 0.125), ("test", 0.125))


@dataclass(frozen=True)
class DatasetSplit:
    dataset: str
    split: str
    image_root: str
    image_files: list[str]       # relative to image_root; also used as image ids
    captions: list[str]
    text_to_image: np.ndarray    # int64 [len(captions)]
    skipped: list[str] = field(default_factory=list)     # human-readable notes of what was dropped and why
    # what the hand-off file's attributes record about the split (split_source, seed, layout, caption_file)
    info: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        # frozen: the one conversion goes through object.__setattr__
        object.__setattr__(self, "text_to_image", np.asarray(self.text_to_image, dtype=np.int64))


def group_captions(image_files: Sequence[str], pairs: Iterable[tuple[str, str]]
                   ) -> tuple[list[str], list[str], np.ndarray, list[str]]:
    """Build (image_files, captions, text_to_image, dropped) from (image_file, caption) pairs.

    Images keep the order of `image_files`; images with no caption are dropped (returned as the
    last value) because they could never be retrieved in the i2t direction.
    """
    by_image: dict[str, list[str]] = {name: [] for name in image_files}
    for name, caption in pairs:
        if name in by_image:
            by_image[name].append(caption)
    kept = [name for name in image_files if by_image[name]]
    dropped = [name for name in image_files if not by_image[name]]
    captions, text_to_image = [], []
    for row, name in enumerate(kept):
        captions.extend(by_image[name])
        text_to_image.extend([row] * len(by_image[name]))
    return kept, captions, np.asarray(text_to_image, dtype=np.int64), dropped


def seeded_split(image_files: Iterable[str], seed: int,
                 fractions: tuple[tuple[str, float], ...] = SEEDED_FRACTIONS) -> dict[str, list[str]]:
    """Deterministic split of sorted image ids by --seed, by default in the Flickr8k proportions."""
    names = sorted(image_files)
    random.Random(seed).shuffle(names)
    splits, start = {}, 0
    for i, (split, fraction) in enumerate(fractions):
        end = len(names) if i == len(fractions) - 1 else start + int(round(fraction * len(names)))
        splits[split] = sorted(names[start:end])
        start = end
    return splits


def build_split(dataset: str, split: str, image_root: str, split_images: Iterable[str],
                pairs: Iterable[tuple[str, str]], skipped: Iterable[str], info: dict[str, Any],
                on_disk: set[str] | None = None) -> DatasetSplit:
    """DatasetSplit from the split's image names and (image, caption) pairs.

    Split images missing on disk and images without a caption are dropped and listed in `skipped`.
    """
    skipped = list(skipped)
    split_images = sorted(dict.fromkeys(split_images))
    if on_disk is not None:
        missing = [name for name in split_images if name not in on_disk]
        if missing:
            warn_once(f"{dataset} {split}: {len(missing)} images of the split are not in {image_root}; skipped")
            skipped += [f"image '{name}': listed for split '{split}' but not found in {image_root}" for name in missing]
            split_images = [name for name in split_images if name in on_disk]
    files, captions, text_to_image, no_caption = group_captions(split_images, pairs)
    if no_caption:
        warn_once(f"{dataset} {split}: {len(no_caption)} images have no caption; skipped")
        skipped += [f"image '{name}': no caption" for name in no_caption]
    if not files:
        fail(image_root, f"split '{split}' of {dataset} is empty (no image with a caption)")
    return DatasetSplit(dataset, split, image_root, files, captions, text_to_image, skipped, dict(info))
