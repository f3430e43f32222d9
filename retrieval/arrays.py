"""Vectors a user already has (their own model's, precomputed LAION / DataComp shards) as a hand-off file:
prepare_data.py --from_arrays.

Inputs: image and text vectors as .npy / .npz files (a file may be given as several shards, joined in the order
given; an .npz holds one array, or name it as FILE.npz:KEY), the caption -> image map (--text_to_image: one
image row per caption, .npy or a text file of integers; or --text_image_ids: one image id per caption, looked up
in --image_ids), optional image ids and captions (text files, one per line, or .npy of strings). Without a map,
row i of the text vectors is the caption of image row i (paired shards, as LAION's img_emb / text_emb).

Unnormalised rows are L2-normalised, and the file says so (attribute `input_notes`): retrieval here is cosine
similarity, and most encoders (open_clip's encode_image, CLIP's get_image_features) return unnormalised vectors,
so refusing them would only make every user write the same line; the note keeps the step on record. float16 /
float64 are cast to float32, also noted. What cannot be repaired is one line naming the file or flag: a shard
that is not 2-D, dims that differ, NaN / inf, an all-zero row, a map of the wrong length or pointing outside
the images, an id not among the image ids.
"""
from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np

from retrieval import handoff, protocol_names
from retrieval.dataset_files import fail, read_text

NORM_TOLERANCE = handoff.NORM_TOLERANCE


def load_array(spec: str, flag: str) -> np.ndarray:
    """One array of a .npy, or of an .npz (its only array, or FILE.npz:KEY)."""
    path, _, key = spec.partition(".npz:")
    path = path + ".npz" if key else spec
    if not os.path.isfile(path):
        fail(path, f"file not found ({flag})")
    try:
        if path.endswith(".npz"):
            with np.load(path, allow_pickle=False) as z:
                if not key and len(z.files) != 1:
                    fail(path, f"holds {len(z.files)} arrays ({', '.join(z.files)}); name one as {path}:KEY ({flag})")
                if key and key not in z.files:
                    fail(path, f"has no array '{key}' (has {', '.join(z.files)}) ({flag})")
                return z[key or z.files[0]]
        return np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:
        fail(path, f"not a readable .npy / .npz file ({str(e).splitlines()[0] if str(e) else type(e).__name__}) ({flag})")


def read_vectors(specs: Sequence[str], flag: str) -> tuple[np.ndarray, list[str]]:
    """The shards joined row-wise as float32, checked (2-D, one dim, finite), and the notes of what was cast."""
    parts, notes, dim = [], [], None
    for spec in specs:
        arr = load_array(spec, flag)
        if arr.ndim != 2 or arr.dtype.kind not in "iuf" or arr.shape[0] == 0:
            fail(spec, f"must be a non-empty 2-D array of numbers [rows, dim], got a {arr.ndim}-D {arr.dtype} "
                       f"array of shape {arr.shape} ({flag})")
        if dim is not None and arr.shape[1] != dim:
            fail(spec, f"has dim {arr.shape[1]}, the shards before it {dim} ({flag})")
        dim = arr.shape[1]
        if arr.dtype != np.float32:
            notes.append(f"{flag} {os.path.basename(spec)}: cast {arr.dtype} to float32")
        arr = arr.astype(np.float32, copy=False)
        bad = ~np.isfinite(arr).all(axis=1)
        if bad.any():
            fail(spec, f"{int(bad.sum())} rows hold NaN or inf (first: row {int(np.argmax(bad))}) ({flag})")
        parts.append(arr)
    return np.concatenate(parts) if len(parts) > 1 else parts[0], notes


def normalised(vectors: np.ndarray, flag: str) -> tuple[np.ndarray, list[str]]:
    """Rows at unit L2 norm, and a note when some were not (an all-zero row has no direction: refused)."""
    norms = np.linalg.norm(vectors, axis=1)
    if (norms == 0).any():
        fail(flag, f"{int((norms == 0).sum())} rows are all zero (first: row {int(np.argmax(norms == 0))}); "
                   "a zero vector has no direction to retrieve by")
    off = np.abs(norms - 1) > NORM_TOLERANCE
    if not off.any():
        return vectors, []
    note = (f"{flag}: L2-normalised {int(off.sum())} of {len(norms)} rows (norms {norms.min():.4g} to "
            f"{norms.max():.4g})")
    return handoff.l2_normalize(vectors), [note]


def read_lines(path: str, flag: str) -> list[str]:
    """One entry per line of a UTF-8 text file (a trailing empty line dropped), or the strings of a .npy."""
    if path.endswith((".npy", ".npz")) or ".npz:" in path:
        arr = load_array(path, flag)
        if arr.ndim != 1:
            fail(path, f"must be a 1-D array, got shape {arr.shape} ({flag})")
        return [v.decode("utf-8") if isinstance(v, bytes) else str(v) for v in arr.tolist()]
    if not os.path.isfile(path):
        fail(path, f"file not found ({flag})")
    text = read_text(path)
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    return [line.rstrip("\r") for line in lines]


def read_map(path: str, num_texts: int, num_images: int) -> np.ndarray:
    """--text_to_image: one image row per caption, each inside [0, num_images)."""
    if path.endswith((".npy", ".npz")) or ".npz:" in path:
        arr = load_array(path, "--text_to_image")
        if arr.ndim != 1 or arr.dtype.kind not in "iu":
            fail(path, f"must be a 1-D array of integers, got a {arr.ndim}-D {arr.dtype} array (--text_to_image)")
    else:
        lines = read_lines(path, "--text_to_image")
        bad = next((n for n, line in enumerate(lines, 1) if not line.strip().lstrip("-").isdigit()), None)
        if bad:
            fail(path, f"line {bad}: {lines[bad - 1][:40]!r} is not an integer (--text_to_image)")
        arr = np.array([int(line) for line in lines], dtype=np.int64)
    if arr.shape[0] != num_texts:
        fail(path, f"has {arr.shape[0]} entries for {num_texts} text vectors (--text_to_image)")
    out = (arr < 0) | (arr >= num_images)
    if out.any():
        first = int(np.argmax(out))
        fail(path, f"{int(out.sum())} entries point outside the {num_images} images (first: caption {first} -> "
                   f"{int(arr[first])}) (--text_to_image)")
    return arr.astype(np.int64)


def map_from_ids(path: str, image_ids: list[str] | None, num_texts: int) -> np.ndarray:
    """--text_image_ids: one image id per caption, turned into image rows through --image_ids."""
    if image_ids is None:
        fail("--text_image_ids", "needs --image_ids (the id of each image row) to find each caption's image")
    ids = read_lines(path, "--text_image_ids")
    if len(ids) != num_texts:
        fail(path, f"has {len(ids)} entries for {num_texts} text vectors (--text_image_ids)")
    row = {image_id: i for i, image_id in enumerate(image_ids)}
    missing = next((n for n, image_id in enumerate(ids) if image_id not in row), None)
    if missing is not None:
        fail(path, f"caption {missing} names image '{ids[missing]}', which is not in --image_ids (--text_image_ids)")
    return np.array([row[image_id] for image_id in ids], dtype=np.int64)


def embeddings_from_arrays(image_vectors: Sequence[str], text_vectors: Sequence[str], text_to_image: str | None = None,
                           text_image_ids: str | None = None, image_ids: str | None = None,
                           captions: str | None = None, split: str = "test", model: str = "own-vectors"
                           ) -> handoff.Embeddings:
    """The hand-off Embeddings of the given files (validated again by the writer)."""
    images, notes = read_vectors(image_vectors, "--image_vectors")
    texts, text_notes = read_vectors(text_vectors, "--text_vectors")
    if images.shape[1] != texts.shape[1]:
        fail("--text_vectors", f"dim {texts.shape[1]} differs from the image vectors' {images.shape[1]}")
    images, image_norm = normalised(images, "--image_vectors")
    texts, text_norm = normalised(texts, "--text_vectors")
    notes += text_notes + image_norm + text_norm
    ids = read_lines(image_ids, "--image_ids") if image_ids else None
    if ids is not None and len(ids) != len(images):
        fail(image_ids, f"has {len(ids)} ids for {len(images)} image vectors (--image_ids)")
    if text_to_image:
        t2i = read_map(text_to_image, len(texts), len(images))
    elif text_image_ids:
        t2i = map_from_ids(text_image_ids, ids, len(texts))
    elif len(texts) == len(images):
        t2i = np.arange(len(texts), dtype=np.int64)
        notes.append("no caption -> image map given: text row i is the caption of image row i")
    else:
        fail("--text_to_image", f"needed: {len(texts)} text vectors for {len(images)} images cannot be paired row by "
                                "row (give --text_to_image or --text_image_ids)")
    texts_of = read_lines(captions, "--caption_texts") if captions else [f"caption {i}" for i in range(len(texts))]
    if len(texts_of) != len(texts):
        fail(captions, f"has {len(texts_of)} captions for {len(texts)} text vectors (--caption_texts)")
    attrs = handoff.make_attrs("own", split, model, images.shape[1], skipped=[], input_notes=notes,
                               split_source="vectors given with --from_arrays",
                               split_name=protocol_names.split_name("own", split, "vectors given with --from_arrays"),
                               vector_files={"image": list(image_vectors), "text": list(text_vectors)})
    return handoff.Embeddings(images, texts, t2i, ids or [f"image {i}" for i in range(len(images))], texts_of, attrs)
