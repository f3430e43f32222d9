"""Datasets as (images, captions, split): every loader returns a DatasetSplit.

A DatasetSplit lists image files relative to `image_root`, the captions, and `text_to_image`
(caption row -> image row), in a deterministic order (images sorted by id, captions in file order
within an image). Loaders never touch the network; downloads live in retrieval/download.py.
"""
import json
import os
import random
import shutil
import tempfile
from dataclasses import dataclass, field

import numpy as np


@dataclass
class DatasetSplit:
    dataset: str
    split: str
    image_root: str
    image_files: list            # relative to image_root; also used as image ids
    captions: list
    text_to_image: np.ndarray    # int64 [len(captions)]
    skipped: list = field(default_factory=list)   # human-readable notes of what was dropped and why
    info: dict = field(default_factory=dict)      # e.g. split_source, seed

    def __post_init__(self):
        self.text_to_image = np.asarray(self.text_to_image, dtype=np.int64)


def group_captions(image_files, pairs):
    """Build (image_files, captions, text_to_image) from (image_file, caption) pairs.

    Images keep the order of `image_files`; images with no caption are dropped (returned as the
    second value) because they could never be retrieved in the i2t direction.
    """
    by_image = {name: [] for name in image_files}
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


def seeded_split(image_files, seed, fractions=(("train", 0.75), ("dev", 0.125), ("test", 0.125))):
    """Deterministic split of sorted image ids by --seed, in the Flickr8k proportions 6000/1000/1000."""
    names = sorted(image_files)
    random.Random(seed).shuffle(names)
    splits, start = {}, 0
    for i, (split, fraction) in enumerate(fractions):
        end = len(names) if i == len(fractions) - 1 else start + int(round(fraction * len(names)))
        splits[split] = sorted(names[start:end])
        start = end
    return splits


# ----------------------------------------------------------------------------- synthetic

SHAPES = ("circle", "square", "triangle")
COLOURS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220),
           "yellow": (235, 210, 40), "purple": (140, 60, 180), "orange": (240, 140, 30)}
SIZES = {"small": 0.16, "large": 0.30}
SYNTHETIC_SPLITS = (("train", 0.75), ("dev", 0.125), ("test", 0.125))


def _draw(draw, shape, colour, centre, radius):
    x, y = centre
    box = (x - radius, y - radius, x + radius, y + radius)
    if shape == "circle":
        draw.ellipse(box, fill=colour)
    elif shape == "square":
        draw.rectangle(box, fill=colour)
    else:
        draw.polygon([(x, y - radius), (x - radius, y + radius), (x + radius, y + radius)], fill=colour)


def _synthetic_item(rng, image_size):
    """One image (two objects side by side or stacked) and five captions of varying detail.

    Captions only sometimes name sizes, background or both objects, so many images share a
    caption's content: retrieval is learnable but far from trivial.
    """
    from PIL import Image, ImageDraw
    objects = []
    for _ in range(2):
        objects.append((rng.choice(SHAPES), rng.choice(list(COLOURS)), rng.choice(list(SIZES))))
    while objects[1][:2] == objects[0][:2]:
        objects[1] = (rng.choice(SHAPES), rng.choice(list(COLOURS)), objects[1][2])
    horizontal = rng.random() < 0.5
    background = rng.choice(("white", "grey"))
    image = Image.new("RGB", (image_size, image_size), (245, 245, 245) if background == "white" else (150, 150, 150))
    draw = ImageDraw.Draw(image)
    for i, (shape, colour, size) in enumerate(objects):
        jitter = rng.uniform(-0.06, 0.06) * image_size
        along = (0.28 if i == 0 else 0.72) * image_size + jitter
        across = 0.5 * image_size + rng.uniform(-0.1, 0.1) * image_size
        centre = (along, across) if horizontal else (across, along)
        _draw(draw, shape, COLOURS[colour], centre, SIZES[size] * image_size)
    (s1, c1, z1), (s2, c2, z2) = objects
    first, second = f"{z1} {c1} {s1}", f"{z2} {c2} {s2}"
    relation, inverse = ("left of", "right of") if horizontal else ("above", "below")
    captions = [
        f"a {first} {relation} a {second}",
        f"a {c2} {s2} {inverse} a {c1} {s1}",
        f"a {c1} {s1} and a {c2} {s2} on a {background} background",
        f"a {first} next to a {s2}",
        f"a {c2} {s2} and another shape",
    ]
    return image, captions


def make_synthetic(data_dir, num_images=500, seed=0, image_size=96):
    """Render the synthetic dataset into data_dir (images/, captions.jsonl, splits.json).

    Deterministic from (num_images, seed, image_size); written into a temp folder and renamed, so an
    interrupted run never leaves a half dataset. Returns data_dir. Does nothing if it already exists.
    """
    if os.path.exists(os.path.join(data_dir, "captions.jsonl")):
        return data_dir
    parent = os.path.dirname(os.path.abspath(data_dir))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".synthetic.", dir=parent)
    try:
        os.makedirs(os.path.join(tmp, "images"))
        rng = random.Random(seed)
        rows = []
        for i in range(num_images):
            image, captions = _synthetic_item(rng, image_size)
            name = f"synth_{i:05d}.png"
            image.save(os.path.join(tmp, "images", name))
            rows.extend({"image": name, "caption": c} for c in captions)
        with open(os.path.join(tmp, "captions.jsonl"), "w") as f:
            for row in rows:
                f.write(json.dumps(row) + "\n")
        names = [f"synth_{i:05d}.png" for i in range(num_images)]
        with open(os.path.join(tmp, "splits.json"), "w") as f:
            json.dump({"seed": seed, "num_images": num_images, "image_size": image_size,
                       "splits": seeded_split(names, seed, SYNTHETIC_SPLITS)}, f)
        if os.path.exists(data_dir):
            shutil.rmtree(data_dir) if not os.listdir(data_dir) else None
        os.replace(tmp, data_dir)
    finally:
        if os.path.exists(tmp):
            shutil.rmtree(tmp)
    return data_dir


def load_synthetic(data_dir, split):
    """Read a folder written by make_synthetic."""
    with open(os.path.join(data_dir, "splits.json")) as f:
        meta = json.load(f)
    if split not in meta["splits"]:
        raise SystemExit(f"error: {data_dir}/splits.json: no split '{split}' (have {sorted(meta['splits'])})")
    pairs = []
    with open(os.path.join(data_dir, "captions.jsonl")) as f:
        for line in f:
            row = json.loads(line)
            pairs.append((row["image"], row["caption"]))
    files, captions, text_to_image, _ = group_captions(meta["splits"][split], pairs)
    return DatasetSplit("synthetic", split, os.path.join(data_dir, "images"), files, captions, text_to_image,
                        info={"split_source": f"seeded (seed={meta['seed']})", "seed": meta["seed"]})
