"""The field's names for a split and its evaluation protocol, so a report's fp32 exact row can be held next
to published numbers (open_clip's docs/openclip_retrieval_results.csv, the CLIP paper's Table 13, the
DataComp suite's flickr_1k_test / mscoco_2014_5k_test).

split_name(dataset, split, split_source) is recorded on every hand-off file as attribute `split_name`
(retrieval/data.py load_split); describe_protocol(attrs) turns a file's attributes into one line such as
"Flickr30k 1K test (Karpathy), 1,000 images, 5 captions per image, t2i / i2t R@1/5/10".
"""
from __future__ import annotations

from typing import Any

# Karpathy test splits under the names papers use (the gallery size is part of the name: COCO 5K, not 1K).
KARPATHY_TEST_NAMES = {"coco": "COCO 5K test (Karpathy)", "flickr30k": "Flickr30k 1K test (Karpathy)",
                       "flickr8k": "Flickr8k 1K test (Karpathy)"}
DISPLAY = {"coco": "COCO", "flickr30k": "Flickr30k", "flickr8k": "Flickr8k", "csv": "own data",
           "synthetic": "synthetic shapes"}
RECALL_KS = (1, 5, 10)   # what retrieval/metrics.py reports and the field quotes


def split_name(dataset: str, split: str, split_source: str = "") -> str:
    """The split as papers name it: "Flickr30k 1K test (Karpathy)", "Flickr8k official test", "COCO 2017
    val", or for splits with no published name "<dataset> <split> (<how it was made>)"."""
    name = DISPLAY.get(dataset, dataset)
    if split_source.startswith("Karpathy"):
        return KARPATHY_TEST_NAMES[dataset] if split == "test" and dataset in KARPATHY_TEST_NAMES \
            else f"{name} {split} (Karpathy)"
    if split_source.startswith("official"):
        return f"{name} official {split}" if dataset == "flickr8k" else f"{name} 2017 {split}"
    how = split_source.split(" (")[0] if split_source else "unknown split"
    return f"{name} {split} ({how})"


def describe_protocol(attrs: dict[str, Any]) -> str:
    """One line naming a hand-off file's protocol in the field's terms, from its attributes: split name,
    gallery size, captions per image, the directions and R@K. Older files without `split_name` (or the
    counts) get the parts they can: the dataset and split, no counts."""
    name = attrs.get("split_name") or split_name(str(attrs.get("dataset", "?")), str(attrs.get("split", "?")),
                                                 str(attrs.get("split_source", "")))
    parts = [name]
    if isinstance(attrs.get("num_images"), int):
        parts.append(f"{attrs['num_images']:,} images")
    per = attrs.get("captions_per_image")
    if isinstance(per, (int, float)) and not isinstance(per, bool):
        parts.append(f"{per:g} caption{'' if per == 1 else 's'} per image")
    ks = "/".join(str(k) for k in RECALL_KS)
    parts.append(f"t2i / i2t R@{ks}")
    return ", ".join(parts)
