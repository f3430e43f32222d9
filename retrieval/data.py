"""Datasets as (images, captions, split): every loader returns a DatasetSplit.

A DatasetSplit lists image files relative to `image_root`, the captions, and `text_to_image`
(caption row -> image row), in a deterministic order (images sorted by id, captions in file order
within an image). Loaders never touch the network; downloads live in retrieval/download.py.

`load_split(dataset, data_dir, split, ...)` is the one entry point:

    flickr8k   official layout (Flicker8k_Dataset/, Flickr8k_text/Flickr8k.token.txt + split files)
               or the Kaggle layout (Images/ + captions.txt, a CSV with header image,caption)
    coco       annotations/captions_{train,val}2017.json + train2017/ val2017/; with a Karpathy
               dataset_coco.json the splits are train / restval / val / test
    csv        the user's own --images DIR --captions FILE (CSV or JSONL with image, caption and an
               optional split column)
    synthetic  the generated shapes dataset (see make_synthetic)

Bad input (a missing folder, a file that cannot be parsed at all) raises UserError("<file>: <fault>"). Single bad lines, captions naming no image and images without captions are skipped,
listed in DatasetSplit.skipped and reported once on stderr.

Every captions file is read as strict UTF-8 (a BOM allowed; read_text), and every image name in one must
be a relative path that stays inside its image folder (contained_name); a name that leaves it is skipped
like a missing image, so a captions file can never make a script open files elsewhere.
"""
import codecs
import csv
import json
import os
import random
import shutil
import sys
import tempfile
from dataclasses import dataclass, field

import numpy as np

from retrieval.errors import UserError

DATASETS = ("flickr8k", "coco", "csv", "synthetic")
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")


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
# A large test share: the default 2,500 images give a 1,000-image test gallery, so the sweep's candidate
# sizes (32, 100) are a real choice, while training stays a few minutes on a CPU.
SYNTHETIC_SPLITS = (("train", 0.5), ("dev", 0.1), ("test", 0.4))
SYNTHETIC_IMAGES = 2500


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


def make_synthetic(data_dir, num_images=SYNTHETIC_IMAGES, seed=0, image_size=96):
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
        raise UserError(f"{data_dir}/splits.json: no split '{split}' (have {sorted(meta['splits'])})")
    pairs = []
    with open(os.path.join(data_dir, "captions.jsonl")) as f:
        for line in f:
            row = json.loads(line)
            pairs.append((row["image"], row["caption"]))
    files, captions, text_to_image, _ = group_captions(meta["splits"][split], pairs)
    return DatasetSplit("synthetic", split, os.path.join(data_dir, "images"), files, captions, text_to_image,
                        info={"split_source": f"seeded (seed={meta['seed']})", "seed": meta["seed"]})


# ----------------------------------------------------------------------------- real datasets

_reported = set()


def report(message):
    """Print a data warning to stderr once per process (load_split runs once per split)."""
    if message not in _reported:
        _reported.add(message)
        print(f"warning: {message}", file=sys.stderr, flush=True)


def _fail(path, fault):
    raise UserError(f"{path}: {fault}")


def read_text(path):
    """The whole text of a captions file: strict UTF-8, a leading BOM dropped.

    A byte that is not UTF-8 is a UserError naming its line (1-based) and byte offset in the file
    (0-based): silently replacing it would change captions and image names.
    """
    with open(path, "rb") as f:
        raw = f.read()
    start = len(codecs.BOM_UTF8) if raw.startswith(codecs.BOM_UTF8) else 0
    try:
        return raw[start:].decode("utf-8")
    except UnicodeDecodeError as e:
        offset = start + e.start
        line = raw.count(b"\n", 0, offset) + 1
        _fail(path, f"not UTF-8 text: line {line}, byte offset {offset} "
                    f"(0x{raw[offset]:02x}); re-encode the file as UTF-8 and run again")


def contained_name(folder, name):
    """`name` normalised, if it is a relative path that stays inside `folder`; else None.

    The test is lexical (os.path.normpath of the joined name, no symlink resolution): an absolute
    name or a `..` that climbs out is refused, while a symlink the user put inside the folder (say
    to a shared read-only copy) stays allowed. Callers open the normalised name, so what is opened
    is what was checked (`link/../x` cannot reach past a linked folder).
    """
    root = os.path.abspath(folder)
    joined = os.path.normpath(os.path.join(root, name))
    if joined == root or not joined.startswith(root.rstrip(os.sep) + os.sep):
        return None
    return os.path.relpath(joined, root)


def _summarise_outside(source, folder, outside):
    """Report (image name, where) pairs whose name leaves `folder`: one warning, one skipped note each.
    `where` is a line number of `source` or a label such as 'image id 7'."""
    if not outside:
        return []
    report(f"{source}: {len(outside)} image names leave the image folder {folder} "
           f"(e.g. '{outside[0][0]}'); skipped")
    base = os.path.basename(source)
    places = [f"{base}:{where}" if isinstance(where, int) else f"{base} ({where})" for _, where in outside]
    return [f"{place}: image '{name}' is outside the image folder {folder}"
            for place, (name, _) in zip(places, outside)]


def _keep_inside(source, folder, entries):
    """Entries (image name, ..., where) whose name stays inside `folder`, renamed to the normalised
    name, plus the skipped notes of the others (see _summarise_outside)."""
    kept, outside = [], []
    for name, *rest in entries:
        safe = contained_name(folder, name)
        if safe is None:
            outside.append((name, rest[-1]))
        else:
            kept.append((safe, *rest))
    return kept, _summarise_outside(source, folder, outside)


def _first_existing(paths, kind="file"):
    check = os.path.isdir if kind == "dir" else os.path.isfile
    return next((p for p in paths if check(p)), None)


def _list_images(image_dir):
    """Image file names (sorted) directly inside image_dir."""
    if not os.path.isdir(image_dir):
        _fail(image_dir, "image folder not found (get the dataset with --download, or pass --data_dir)")
    return sorted(name for name in os.listdir(image_dir)
                  if name.lower().endswith(IMAGE_EXTENSIONS) and not name.startswith("."))


def _summarise_orphans(path, orphans):
    """Report caption lines that name no image file: one warning, one skipped entry per line."""
    if not orphans:
        return []
    names = sorted({name for name, _ in orphans})
    shown = ", ".join(names[:3]) + (", ..." if len(names) > 3 else "")
    report(f"{path}: {len(orphans)} caption lines name no image file ({shown}); skipped")
    source = os.path.basename(path)
    return [f"{source}:{line}: caption of '{name}' matches no image file" for name, line in orphans]


def build_split(dataset, split, image_root, split_images, pairs, skipped, info, on_disk=None):
    """DatasetSplit from the split's image names and (image, caption) pairs.

    Split images missing on disk and images without a caption are dropped and listed in `skipped`.
    """
    skipped = list(skipped)
    split_images = sorted(dict.fromkeys(split_images))
    if on_disk is not None:
        missing = [name for name in split_images if name not in on_disk]
        if missing:
            report(f"{dataset} {split}: {len(missing)} images of the split are not in {image_root}; skipped")
            skipped += [f"image '{name}': listed for split '{split}' but not found in {image_root}" for name in missing]
            split_images = [name for name in split_images if name in on_disk]
    files, captions, text_to_image, no_caption = group_captions(split_images, pairs)
    if no_caption:
        report(f"{dataset} {split}: {len(no_caption)} images have no caption; skipped")
        skipped += [f"image '{name}': no caption" for name in no_caption]
    if not files:
        _fail(image_root, f"split '{split}' of {dataset} is empty (no image with a caption)")
    return DatasetSplit(dataset, split, image_root, files, captions, text_to_image, skipped, dict(info))


def read_caption_table(path, required=("image", "caption")):
    """Rows of a CSV (header line) or JSONL file as (dict, line number), plus skipped-line notes.

    CSV goes through the csv module, so a caption holding a comma (quoted in the file) keeps its
    text without stray quote marks. JSONL is chosen by the extension (.jsonl/.json) or a first
    character '{'.
    """
    if not os.path.isfile(path):
        _fail(path, "caption file not found")
    rows, skipped = [], []
    base = os.path.basename(path)
    text = read_text(path)
    if path.lower().endswith((".jsonl", ".json")) or text.lstrip()[:1] == "{":
        for number, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                skipped.append(f"{base}:{number}: malformed JSON line ({e.msg})")
                continue
            if not isinstance(row, dict) or any(not str(row.get(k) or "").strip() for k in required):
                skipped.append(f"{base}:{number}: malformed line (needs non-empty {', '.join(required)})")
                continue
            rows.append(({k: str(v).strip() for k, v in row.items()}, number))
    else:
        reader = csv.DictReader(text.splitlines(keepends=True))
        header = [h.strip().lower() for h in (reader.fieldnames or [])]
        if any(k not in header for k in required):
            _fail(path, f"CSV header must name the columns {', '.join(required)} (found {reader.fieldnames})")
        reader.fieldnames = header
        for row in reader:
            number = reader.line_num
            if None in row or any(not (row.get(k) or "").strip() for k in required):
                skipped.append(f"{base}:{number}: malformed line (expected {len(header)} fields with "
                               f"non-empty {', '.join(required)})")
                continue
            rows.append(({k: (v or "").strip() for k, v in row.items()}, number))
    if skipped:
        report(f"{path}: {len(skipped)} malformed lines skipped (first: {skipped[0]})")
    if not rows:
        _fail(path, "no usable caption rows")
    return rows, skipped


def read_flickr8k_tokens(path):
    """(image, caption, line number) triples of Flickr8k.token.txt, plus malformed-line notes."""
    triples, skipped = [], []
    base = os.path.basename(path)
    lines = read_text(path).replace("\r\n", "\n").replace("\r", "\n").split("\n")
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        key, tab, caption = line.partition("\t")
        name, hash_sign, index = key.strip().rpartition("#")
        if not tab or not hash_sign or not name or not index.isdigit() or not caption.strip():
            skipped.append(f"{base}:{number}: malformed line (expected '<image>#<n><TAB><caption>'): "
                           f"{line[:60]!r}")
            continue
        triples.append((name, caption.strip(), number))
    if skipped:
        report(f"{path}: {len(skipped)} malformed lines skipped (first: {skipped[0]})")
    if not triples:
        _fail(path, "no caption lines found")
    return triples, skipped


FLICKR8K_SPLIT_FILES = {"train": "Flickr_8k.trainImages.txt", "dev": "Flickr_8k.devImages.txt",
                        "test": "Flickr_8k.testImages.txt"}
FLICKR8K_IMAGE_DIRS = ("Flicker8k_Dataset", "Flickr8k_Dataset", "Images", "images")


def load_flickr8k(data_dir, split, seed=0):
    """Flickr8k in the official layout or the Kaggle layout (see the module docstring)."""
    text_dirs = [os.path.join(data_dir, "Flickr8k_text"), data_dir]
    token_file = _first_existing(os.path.join(d, "Flickr8k.token.txt") for d in text_dirs)
    kaggle_file = _first_existing([os.path.join(data_dir, "captions.txt")])
    image_dir = _first_existing([os.path.join(data_dir, d) for d in FLICKR8K_IMAGE_DIRS], kind="dir")
    if not token_file and not kaggle_file:
        _fail(data_dir, "no Flickr8k captions found (expected Flickr8k_text/Flickr8k.token.txt or the Kaggle "
                        "captions.txt); get them with --download")
    if not image_dir:
        _fail(data_dir, f"no Flickr8k image folder found (expected one of {', '.join(FLICKR8K_IMAGE_DIRS)}); "
                        "get it with --download")
    images = _list_images(image_dir)
    on_disk = set(images)
    if token_file:
        triples, skipped = read_flickr8k_tokens(token_file)
        source, layout = token_file, "official"
    else:
        rows, skipped = read_caption_table(kaggle_file)
        triples = [(row["image"], row["caption"], number) for row, number in rows]
        source, layout = kaggle_file, "kaggle"
    triples, outside = _keep_inside(source, image_dir, triples)
    skipped += outside
    orphans = [(name, number) for name, _, number in triples if name not in on_disk]
    skipped += _summarise_orphans(source, orphans)
    pairs = [(name, caption) for name, caption, _ in triples if name in on_disk]
    info = {"layout": layout, "caption_file": os.path.relpath(token_file or kaggle_file, data_dir)}

    split_files = {name: _first_existing(os.path.join(d, f) for d in text_dirs)
                   for name, f in FLICKR8K_SPLIT_FILES.items()}
    if all(split_files.values()):
        if split not in split_files:
            _fail(data_dir, f"no split '{split}' in Flickr8k (have {', '.join(FLICKR8K_SPLIT_FILES)})")
        split_images = [line.strip() for line in read_text(split_files[split]).splitlines() if line.strip()]
        info["split_source"] = f"official {FLICKR8K_SPLIT_FILES[split]}"
    else:
        if split not in FLICKR8K_SPLIT_FILES:
            _fail(data_dir, f"no split '{split}' in Flickr8k (have {', '.join(FLICKR8K_SPLIT_FILES)})")
        captioned = sorted({name for name, _ in pairs})
        split_images = seeded_split(captioned, seed)[split]
        info["split_source"] = f"seeded (seed={seed}, 75/12.5/12.5 %; no official split files found)"
        info["seed"] = seed
        report(f"{data_dir}: no Flickr8k split files; using a seeded split (seed={seed}) of 75/12.5/12.5 %")
    return build_split("flickr8k", split, image_dir, split_images, pairs, skipped, info, on_disk)


COCO_SPLITS = ("train", "val")
KARPATHY_SPLITS = ("train", "restval", "val", "test")


def find_karpathy_file(data_dir):
    return _first_existing(os.path.join(data_dir, d, "dataset_coco.json")
                           for d in ("", "karpathy", "caption_datasets", "annotations"))


def _read_json(path):
    try:
        return json.loads(read_text(path))
    except json.JSONDecodeError as e:
        _fail(path, f"not valid JSON ({e})")


def load_coco(data_dir, split, seed=0):
    """COCO 2017 captions; the Karpathy split when dataset_coco.json is present."""
    karpathy = find_karpathy_file(data_dir)
    if karpathy:
        return _load_karpathy(data_dir, karpathy, split)
    if split not in COCO_SPLITS:
        _fail(data_dir, f"no split '{split}' in COCO without a Karpathy dataset_coco.json (have "
                        f"{', '.join(COCO_SPLITS)}; --download fetches the Karpathy file)")
    annotation_file = os.path.join(data_dir, "annotations", f"captions_{split}2017.json")
    if not os.path.isfile(annotation_file):
        _fail(annotation_file, "COCO caption annotations not found (get them with --download)")
    data = _read_json(annotation_file)
    if not isinstance(data, dict) or "images" not in data or "annotations" not in data:
        _fail(annotation_file, "not a COCO captions file (needs 'images' and 'annotations')")
    image_dir = os.path.join(data_dir, f"{split}2017")
    on_disk = set(_list_images(image_dir))
    named = [(str(image["file_name"]), image["id"], f"image id {image['id']}") for image in data["images"]]
    inside, outside = _keep_inside(annotation_file, image_dir, named)
    file_of = {image_id: name for name, image_id, _ in inside}
    refused = {image_id for _, image_id, _ in named} - set(file_of)  # already noted once per image
    pairs, skipped = [], []
    for annotation in data["annotations"]:
        if annotation.get("image_id") in refused:
            continue
        name = file_of.get(annotation.get("image_id"))
        caption = str(annotation.get("caption") or "").strip()
        if name is None or not caption:
            skipped.append(f"{os.path.basename(annotation_file)}: annotation {annotation.get('id')} "
                           f"{'names unknown image id ' + str(annotation.get('image_id')) if name is None else 'has an empty caption'}")
            continue
        pairs.append((name, caption))
    if skipped:
        report(f"{annotation_file}: {len(skipped)} unusable annotations skipped")
    info = {"layout": "coco2017", "caption_file": os.path.relpath(annotation_file, data_dir),
            "split_source": f"official COCO 2017 {split}"}
    return build_split("coco", split, image_dir, sorted(file_of.values()), pairs, outside + skipped, info, on_disk)


def _load_karpathy(data_dir, karpathy_file, split):
    """Karpathy split: images found as <filepath>/<filename> (2014 layout) or by id in train2017/val2017."""
    if split not in KARPATHY_SPLITS:
        _fail(karpathy_file, f"no split '{split}' in the Karpathy split (have {', '.join(KARPATHY_SPLITS)})")
    data = _read_json(karpathy_file)
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        _fail(karpathy_file, "not a Karpathy split file (needs an 'images' list)")
    folders = {}

    def present(folder):
        if folder not in folders:
            path = os.path.join(data_dir, folder)
            folders[folder] = set(os.listdir(path)) if os.path.isdir(path) else set()
        return folders[folder]

    split_images, pairs, skipped, on_disk, outside = [], [], [], set(), []
    for entry in data["images"]:
        if entry.get("split") != split:
            continue
        declared = "/".join(str(part) for part in (entry.get("filepath"), entry.get("filename")) if part)
        candidates = []
        if entry.get("filename"):
            safe = contained_name(data_dir, declared)
            if safe is None:
                outside.append((declared, f"cocoid {entry.get('cocoid')}"))
                continue
            candidates.append(safe)
        if "cocoid" in entry:
            candidates += [f"{folder}/{int(entry['cocoid']):012d}.jpg" for folder in ("train2017", "val2017")]
        # a candidate counts when its folder lists it (a folder listing per folder, not a stat per image)
        name = next((c for c in candidates if os.path.basename(c) in present(os.path.dirname(c))), None)
        if name is None:
            wanted = f"{entry.get('filepath', '')}/{entry.get('filename', '')}".strip("/")
            skipped.append(f"image '{wanted}' (cocoid {entry.get('cocoid')}): not found under {data_dir}")
            continue
        on_disk.add(name)
        split_images.append(name)
        pairs.extend((name, s.get("raw", "").strip()) for s in entry.get("sentences", []) if s.get("raw", "").strip())
    if skipped:
        report(f"{karpathy_file}: {len(skipped)} images of split '{split}' not found on disk; skipped "
               f"(get COCO 2017 train+val with --download)")
    skipped = _summarise_outside(karpathy_file, data_dir, outside) + skipped
    info = {"layout": "coco+karpathy", "caption_file": os.path.relpath(karpathy_file, data_dir),
            "split_source": f"Karpathy {os.path.basename(karpathy_file)} '{split}'"}
    return build_split("coco", split, data_dir, split_images, pairs, skipped, info, on_disk)


def load_csv(images, captions, split, seed=0):
    """The user's own data: an image folder and a CSV/JSONL of (image, caption[, split]) rows."""
    if not images or not captions:
        raise UserError("--dataset csv needs --images DIR and --captions FILE")
    if not os.path.isdir(images):
        _fail(images, "image folder not found")
    rows, skipped = read_caption_table(captions)
    inside, outside = _keep_inside(captions, images, [(row["image"], row, number) for row, number in rows])
    skipped += outside
    rows = [(dict(row, image=name), number) for name, row, number in inside]
    names = sorted({row["image"] for row, _ in rows})
    on_disk = {name for name in names if os.path.isfile(os.path.join(images, name))}
    orphans = [(row["image"], number) for row, number in rows if row["image"] not in on_disk]
    skipped += _summarise_orphans(captions, orphans)
    pairs = [(row["image"], row["caption"]) for row, _ in rows if row["image"] in on_disk]
    info = {"layout": "csv", "caption_file": os.path.abspath(captions)}
    split_of = {}
    for row, _ in rows:
        if row.get("split") and row["image"] in on_disk:  # rows of missing images are already reported
            split_of.setdefault(row["image"], row["split"])
    if split == "all":
        split_images = sorted(on_disk)
        info["split_source"] = "all images"
    elif split_of:
        split_images = [name for name, s in split_of.items() if s == split]
        if not split_images:
            _fail(captions, f"no rows with split '{split}' (have {', '.join(sorted(set(split_of.values())))})")
        info["split_source"] = f"'split' column of {os.path.basename(captions)}"
    else:
        if split not in FLICKR8K_SPLIT_FILES:
            _fail(captions, f"no split '{split}' (without a 'split' column: train, dev, test or all)")
        split_images = seeded_split(sorted(on_disk), seed)[split]
        info["split_source"] = f"seeded (seed={seed}, 75/12.5/12.5 %)"
        info["seed"] = seed
    return build_split("csv", split, images, split_images, pairs, skipped, info, on_disk)


def default_splits(dataset, data_dir=None, captions=None):
    """The splits prepare_data.py writes when --splits is not given."""
    if dataset == "coco":
        return list(KARPATHY_SPLITS) if data_dir and find_karpathy_file(data_dir) else list(COCO_SPLITS)
    if dataset == "csv" and captions and os.path.isfile(captions):
        rows, _ = read_caption_table(captions)
        found = sorted({row["split"] for row, _ in rows if row.get("split")})
        if found:
            return found
    return ["train", "dev", "test"]


def require_folder(dataset, data_dir):
    """UserError unless the dataset's folder exists (naming --download where it can fetch the dataset)."""
    if not data_dir or not os.path.isdir(data_dir):
        hint = f" (use --download to fetch {dataset}, or pass --data_dir)" if dataset in ("flickr8k", "coco") \
            else " (pass --data_dir)"
        _fail(data_dir, f"dataset folder not found{hint}")


def load_split(dataset, data_dir, split, seed=0, images=None, captions=None):
    """One split of a dataset as a DatasetSplit (the single entry point for every script)."""
    if dataset == "synthetic":
        if not os.path.exists(os.path.join(data_dir, "captions.jsonl")):
            make_synthetic(data_dir, seed=seed)
        return load_synthetic(data_dir, split)
    if dataset == "csv":
        return load_csv(images, captions, split, seed)
    require_folder(dataset, data_dir)
    if dataset == "flickr8k":
        return load_flickr8k(data_dir, split, seed)
    if dataset == "coco":
        return load_coco(data_dir, split, seed)
    raise UserError(f"--dataset {dataset}: unknown (choose from {', '.join(DATASETS)})")
