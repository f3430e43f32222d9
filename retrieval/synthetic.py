"""The generated shapes dataset (`--dataset synthetic`): drawing it, writing it once, reading a split back.

Each image holds two coloured shapes side by side or stacked, with five captions of varying detail. The
folder make_synthetic writes (images/, captions.jsonl, splits.json) is deterministic from
(num_images, seed, image_size), so every machine that generates it gets the same files.
"""
from __future__ import annotations

import json
import os
import random
import shutil
import tempfile

from PIL import Image, ImageDraw

from retrieval.dataset_split import DatasetSplit, group_captions, seeded_split
from retrieval.errors import UserError

SHAPES = ("circle", "square", "triangle")
COLOURS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220),
           "yellow": (235, 210, 40), "purple": (140, 60, 180), "orange": (240, 140, 30)}
SIZES = {"small": 0.16, "large": 0.30}
# A large test share: the default 2,500 images give a 1,000-image test gallery, so the sweep's candidate
# sizes (32, 100) are a real choice, while training stays a few minutes on a CPU.
SYNTHETIC_SPLITS = (("train", 0.5), ("dev", 0.1), ("test", 0.4))
SYNTHETIC_IMAGES = 2500


def _draw(draw: ImageDraw.ImageDraw, shape: str, colour: tuple[int, int, int], centre: tuple[float, float],
          radius: float) -> None:
    x, y = centre
    box = (x - radius, y - radius, x + radius, y + radius)
    if shape == "circle":
        draw.ellipse(box, fill=colour)
    elif shape == "square":
        draw.rectangle(box, fill=colour)
    else:
        draw.polygon([(x, y - radius), (x - radius, y + radius), (x + radius, y + radius)], fill=colour)


def _synthetic_item(rng: random.Random, image_size: int) -> tuple[Image.Image, list[str]]:
    """One image (two objects side by side or stacked) and five captions of varying detail.

    Captions only sometimes name sizes, background or both objects, so many images share a
    caption's content: retrieval is learnable but far from trivial.
    """
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


def split_sizes(num_images: int) -> dict[str, int]:
    """Images per split for `num_images` (the seed changes which images, never how many)."""
    names = [str(i) for i in range(num_images)]
    return {split: len(files) for split, files in seeded_split(names, 0, SYNTHETIC_SPLITS).items()}


def check_num_images(num_images: int, flag: str = "--synthetic_images") -> None:
    """UserError unless every split gets an image: a split without one would fail only when it is read,
    after the model has loaded and the earlier splits are written."""
    sizes = split_sizes(num_images)
    if min(sizes.values()) > 0:
        return
    enough = next(n for n in range(num_images + 1, num_images + 100) if min(split_sizes(n).values()) > 0)
    shares = "/".join(f"{round(100 * share)}" for _, share in SYNTHETIC_SPLITS)
    raise UserError(f"{flag} {num_images}: too few images for the {'/'.join(sizes)} splits ({shares} %: "
                    f"{'/'.join(str(n) for n in sizes.values())} images); give at least {enough}")


def make_synthetic(data_dir: str, num_images: int = SYNTHETIC_IMAGES, seed: int = 0, image_size: int = 96) -> str:
    """Render the synthetic dataset into data_dir (images/, captions.jsonl, splits.json).

    Deterministic from (num_images, seed, image_size); written into a temp folder and renamed, so an
    interrupted run never leaves a half dataset. Returns data_dir. Does nothing if it already exists.
    """
    if os.path.exists(os.path.join(data_dir, "captions.jsonl")):
        return data_dir
    check_num_images(num_images)
    parent = os.path.dirname(os.path.abspath(data_dir))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".synthetic.", dir=parent)
    try:
        _render(tmp, num_images, seed, image_size)
        if os.path.exists(data_dir):
            shutil.rmtree(data_dir) if not os.listdir(data_dir) else None
        os.replace(tmp, data_dir)
    finally:
        if os.path.exists(tmp):
            shutil.rmtree(tmp)
    return data_dir


def _render(folder: str, num_images: int, seed: int, image_size: int) -> None:
    """Write the images, captions.jsonl and splits.json into `folder`."""
    os.makedirs(os.path.join(folder, "images"))
    rng = random.Random(seed)
    rows = []
    for i in range(num_images):
        image, captions = _synthetic_item(rng, image_size)
        name = f"synth_{i:05d}.png"
        image.save(os.path.join(folder, "images", name))
        rows.extend({"image": name, "caption": c} for c in captions)
    with open(os.path.join(folder, "captions.jsonl"), "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    names = [f"synth_{i:05d}.png" for i in range(num_images)]
    with open(os.path.join(folder, "splits.json"), "w") as f:
        json.dump({"seed": seed, "num_images": num_images, "image_size": image_size,
                   "splits": seeded_split(names, seed, SYNTHETIC_SPLITS)}, f)


def load_synthetic(data_dir: str, split: str) -> DatasetSplit:
    """Read a folder written by make_synthetic."""
    with open(os.path.join(data_dir, "splits.json")) as f:
        meta = json.load(f)
    if split not in meta["splits"]:
        raise UserError(f"{data_dir}/splits.json: no split '{split}' (have {sorted(meta['splits'])})")
    pairs = []
    with open(os.path.join(data_dir, "captions.jsonl")) as f:
        for line in f:
            row = json.loads(line)
            pairs.append((row["image"], row["caption"]))
    files, captions, text_to_image, _ = group_captions(meta["splits"][split], pairs)
    if not files:   # a folder generated before check_num_images refused tiny sizes
        raise UserError(f"{data_dir}: split '{split}' of synthetic is empty ({meta['num_images']} images are too "
                        "few); generate it again with more --synthetic_images")
    return DatasetSplit("synthetic", split, os.path.join(data_dir, "images"), files, captions, text_to_image,
                        info={"split_source": f"seeded (seed={meta['seed']})", "seed": meta["seed"]})
