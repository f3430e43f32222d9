"""The hand-off file every stage reads: its schema, the validating writer and the reader.

Schema (HDF5 by default, .npz when the path ends in .npz):

    image_embeddings  float32 [N_img, D]  L2-normalised rows
    text_embeddings   float32 [N_txt, D]  L2-normalised rows
    text_to_image     int64   [N_txt]     row of the caption's image in image_embeddings
    image_ids         str     [N_img]     file name (relative to attrs["image_root"]) or dataset id
    captions          str     [N_txt]
    attrs             dataset, split, model, dim, normalised, created, code_version, skipped
                      (JSON list), plus any extra JSON-able keys (image_root, seed, split_source, ...)

In .npz the attributes live in one JSON string under the key "attrs". Files from older tools
(e.g. the seed's coco_embeddings.npz) that lack "attrs" or "text_to_image" are still read: see
read_embeddings for the documented fallbacks.
"""
from __future__ import annotations

import datetime
import json
import os
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, NoReturn

import numpy as np

from retrieval.env import code_version
from retrieval.io import (STALE_TEMP_AGE_S, HandoffError, atomic_path, json_default, remove_stale_temps,
                          temp_glob)

SCHEMA_VERSION = 1
NORM_TOLERANCE = 1e-3  # fp16 autocast then fp32 normalisation stays far inside this


@dataclass
class Embeddings:
    """One hand-off file in memory (the schema in the module docstring). Not frozen: tests/test_io.py builds
    schema faults by replacing a field of a valid one, and validate_embeddings must see them."""
    image_embeddings: np.ndarray   # float32 [N_img, D]
    text_embeddings: np.ndarray    # float32 [N_txt, D]
    text_to_image: np.ndarray      # int64 [N_txt]
    image_ids: list[str]
    captions: list[str]
    attrs: dict[str, Any] = field(default_factory=dict)   # the file's attribute block, a JSON record

    @property
    def dim(self) -> int:
        return int(self.image_embeddings.shape[1])


def l2_normalize(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit L2 norm, as float32 (an all-zero row stays zero)."""
    x = np.asarray(x, dtype=np.float32)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.maximum(norms, 1e-12)


def validate_embeddings(emb: Embeddings, path: str = "<memory>") -> Embeddings:
    """Check the schema; raise HandoffError naming `path` and the first fault found."""
    def fail(msg: str) -> NoReturn:
        raise HandoffError(f"{path}: {msg}")

    img, txt, t2i = emb.image_embeddings, emb.text_embeddings, emb.text_to_image
    for name, arr in (("image_embeddings", img), ("text_embeddings", txt)):
        if not isinstance(arr, np.ndarray) or arr.ndim != 2:
            fail(f"{name} must be a 2-D array, got shape {getattr(arr, 'shape', None)}")
        if arr.dtype != np.float32:
            fail(f"{name} must be float32, got {arr.dtype}")
        if arr.shape[0] == 0:
            fail(f"{name} is empty (empty split?)")
        if not np.isfinite(arr).all():
            bad = int((~np.isfinite(arr).all(axis=1)).sum())
            fail(f"{name} has {bad} rows with NaN or inf")
    if img.shape[1] != txt.shape[1]:
        fail(f"image dim {img.shape[1]} != text dim {txt.shape[1]}")
    if t2i.ndim != 1 or t2i.shape[0] != txt.shape[0]:
        fail(f"text_to_image must have shape [{txt.shape[0]}], got {t2i.shape}")
    if not np.issubdtype(t2i.dtype, np.integer):
        fail(f"text_to_image must be integer, got {t2i.dtype}")
    if t2i.size and (t2i.min() < 0 or t2i.max() >= img.shape[0]):
        fail(f"text_to_image has indices outside [0, {img.shape[0]})")
    no_caption = np.setdiff1d(np.arange(img.shape[0]), t2i)
    if no_caption.size:
        fail(f"{no_caption.size} images have no caption (first: row {int(no_caption[0])})")
    if len(emb.image_ids) != img.shape[0]:
        fail(f"image_ids has {len(emb.image_ids)} entries for {img.shape[0]} images")
    if len(emb.captions) != txt.shape[0]:
        fail(f"captions has {len(emb.captions)} entries for {txt.shape[0]} texts")
    for name, arr in (("image_embeddings", img), ("text_embeddings", txt)):
        norms = np.linalg.norm(arr, axis=1)
        worst = float(np.abs(norms - 1).max())
        if worst > NORM_TOLERANCE:
            fail(f"{name} rows are not L2-normalised (worst |norm-1| = {worst:.3g})")
    return emb


def counts(emb: Embeddings) -> dict[str, Any]:
    """The gallery's sizes every file records (a report names its protocol from them): images, captions, and
    captions per image, an integer when every image has the same count (5 in the Karpathy files), else the
    mean to 2 places."""
    per_image = np.bincount(emb.text_to_image, minlength=len(emb.image_ids))
    same = per_image.size and per_image.min() == per_image.max()
    return {"num_images": len(emb.image_ids), "num_captions": len(emb.captions),
            "captions_per_image": int(per_image[0]) if same else round(float(per_image.mean()), 2)}


def make_attrs(dataset: str, split: str, model: str, dim: int, skipped: Iterable[str] = (),
               **extra: Any) -> dict[str, Any]:
    """The standard attribute block; `extra` adds JSON-able keys (image_root, seed, ...)."""
    attrs = {
        "schema_version": SCHEMA_VERSION,
        "dataset": dataset,
        "split": split,
        "model": model,
        "dim": int(dim),
        "normalised": True,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "code_version": code_version(),
        "skipped": list(skipped),
    }
    attrs.update(extra)
    return attrs


def write_embeddings(path: str | os.PathLike, emb: Embeddings) -> str:
    """Validate, then atomically write an Embeddings to .h5 (default) or .npz."""
    path = os.fspath(path)
    validate_embeddings(emb, path)
    attrs = dict(emb.attrs)
    attrs.setdefault("dim", emb.dim)
    attrs.setdefault("normalised", True)
    attrs.update(counts(emb))
    # Every hand-off writer comes through here: the one place that sweeps up a killed write's temp file.
    remove_stale_temps(os.path.dirname(os.path.abspath(path)), [temp_glob(path)], STALE_TEMP_AGE_S)
    with atomic_path(path) as tmp:
        if path.endswith(".npz"):
            with open(tmp, "wb") as f:
                np.savez(f, image_embeddings=emb.image_embeddings, text_embeddings=emb.text_embeddings,
                         text_to_image=emb.text_to_image.astype(np.int64),
                         image_ids=np.array([str(s) for s in emb.image_ids], dtype=np.str_),
                         captions=np.array([str(s) for s in emb.captions], dtype=np.str_),
                         attrs=np.array(json.dumps(attrs, default=json_default)))
        else:
            import h5py
            strings = h5py.string_dtype("utf-8")
            with h5py.File(tmp, "w") as f:
                f.create_dataset("image_embeddings", data=emb.image_embeddings)
                f.create_dataset("text_embeddings", data=emb.text_embeddings)
                f.create_dataset("text_to_image", data=emb.text_to_image.astype(np.int64))
                f.create_dataset("image_ids", data=[str(s) for s in emb.image_ids], dtype=strings)
                f.create_dataset("captions", data=[str(s) for s in emb.captions], dtype=strings)
                for key, value in attrs.items():
                    # Lists/dicts go in as JSON text: HDF5 attributes can't hold ragged objects.
                    f.attrs[key] = json.dumps(value, default=json_default) if isinstance(value, (list, dict)) \
                        else ("" if value is None else value)
    return path


def _decode_attr(value: Any) -> Any:
    if isinstance(value, bytes):
        value = value.decode("utf-8")
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, str) and value[:1] in "[{":
        try:
            return json.loads(value)
        except json.JSONDecodeError:
            return value
    return value


# numpy dtype kinds each dataset may have: legacy files' float16/float64 (or integer) embeddings are cast
# on load; h5py returns strings as object arrays of bytes.
NUMBERS, INTEGERS, TEXTS, IDS = "iuf", "iu", "USO", "USOiu"

# The attributes later stages use (run names, search's model and image folder, counts), and their types.
ATTR_TYPES = {
    "schema_version": ((int,), "an integer"),
    "dim": ((int,), "an integer"),
    "dataset": ((str,), "text"),
    "split": ((str,), "text"),
    "model": ((str,), "text"),
    "image_root": ((str, type(None)), "text"),
    "checkpoint": ((str, type(None)), "text"),
    "normalised": ((bool,), "true or false"),
    "skipped": ((list,), "a list"),
    "split_name": ((str,), "text"),                      # e.g. "Flickr30k 1K test (Karpathy)"
    "num_images": ((int,), "an integer"),
    "num_captions": ((int,), "an integer"),
    "nested_dims": ((list,), "a list of dims"),          # train_dual_encoder.py --matryoshka_dims
    "trained_quantization": ((str,), "text"),            # train_dual_encoder.py --quantization_aware
}


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _check_attrs(attrs: Any, path: str) -> None:
    """attrs must be a mapping whose known keys hold the types ATTR_TYPES names."""
    if not isinstance(attrs, dict):
        raise HandoffError(f"{path}: 'attrs' must be a JSON object, got {type(attrs).__name__} {_short(attrs)}")
    for key, (types, what) in ATTR_TYPES.items():
        if key not in attrs:
            continue
        value = attrs[key]
        if not isinstance(value, types) or (isinstance(value, bool) and bool not in types):  # True is an int too
            raise HandoffError(f"{path}: attribute '{key}' must be {what}, got {_short(value)}")


def _array(data: Mapping[str, Any], key: str, path: str, ndim: int, kinds: str, what: str) -> np.ndarray:
    """data[key] as an array, once its rank and dtype kind are the ones the schema needs."""
    arr = np.asarray(data[key])
    if arr.ndim != ndim or arr.dtype.kind not in kinds:
        raise HandoffError(f"{path}: '{key}' must be a {ndim}-D array of {what}, "
                           f"got a {arr.ndim}-D {arr.dtype} array")
    return arr


def _texts(data: Mapping[str, Any], key: str, path: str, kinds: str = TEXTS) -> list[str]:
    try:
        return [v.decode("utf-8") if isinstance(v, bytes) else str(v)
                for v in _array(data, key, path, 1, kinds, "text").tolist()]
    except UnicodeDecodeError as e:
        raise HandoffError(f"{path}: '{key}' holds text that is not UTF-8 ({e})") from None


def _text_to_image_fallback(data: Mapping[str, Any], n_img: int, n_txt: int, path: str) -> tuple[np.ndarray, str]:
    """For files without text_to_image (the seed's npz): documented, recorded fallbacks."""
    for key in ("caption_to_image", "text_image_index", "text_to_image_index"):
        if key in data:
            return _array(data, key, path, 1, INTEGERS, "integers").astype(np.int64), f"read from '{key}'"
    for key in ("caption_image_ids", "text_image_ids"):
        if key in data and "image_ids" in data:
            lookup = {v: i for i, v in enumerate(_texts(data, "image_ids", path, IDS))}
            try:
                return (np.array([lookup[v] for v in _texts(data, key, path, IDS)], dtype=np.int64),
                        f"mapped '{key}' through image_ids")
            except KeyError as e:
                raise HandoffError(f"{path}: {key} names image {e} that is not in image_ids") from None
    if n_txt == n_img:
        return np.arange(n_txt, dtype=np.int64), "assumed one caption per image, same order"
    if n_img and n_txt % n_img == 0:
        per = n_txt // n_img
        return np.repeat(np.arange(n_img, dtype=np.int64), per), f"assumed {per} consecutive captions per image"
    raise HandoffError(f"{path}: no text_to_image and {n_txt} texts cannot be matched to {n_img} images")


def _read_npz(path: str) -> tuple[dict[str, np.ndarray], Any]:
    """(datasets, attrs) of an .npz; attrs is the JSON text under "attrs" ({} in a legacy file)."""
    with np.load(path, allow_pickle=False) as z:
        data = {k: z[k] for k in z.files}
    if "attrs" not in data:
        return data, {}
    text = data.pop("attrs")
    if text.ndim != 0 or text.dtype.kind not in "US":
        raise HandoffError(f"{path}: 'attrs' must be one JSON text, got a {text.ndim}-D {text.dtype} array")
    text = text.item()
    try:
        return data, json.loads(text.decode("utf-8") if isinstance(text, bytes) else text)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise HandoffError(f"{path}: 'attrs' is not valid JSON ({e})") from None


def _read_h5(path: str) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """(datasets, attrs) of an HDF5 file; groups are no part of the schema and are left out."""
    import h5py
    with h5py.File(path, "r") as f:
        data = {k: v[()] for k, v in f.items() if isinstance(v, h5py.Dataset)}
        attrs = {k: _decode_attr(v) for k, v in f.attrs.items()}
    return data, attrs


HDF5_MAGIC = b"\x89HDF\r\n\x1a\n"
ZIP_MAGICS = (b"PK\x03\x04", b"PK\x05\x06")   # a zip with members; an empty zip (.npz of no arrays)


def _reader(path: str) -> Callable[[str], tuple[dict[str, np.ndarray], Any]]:
    """_read_h5 or _read_npz, chosen by the file's first bytes, not its suffix: an HDF5 file renamed .npz
    still reads, and a file that is neither is one line (numpy would otherwise try it as a pickle)."""
    if os.path.isdir(path):
        raise HandoffError(f"{path}: is a folder, not an embeddings file (.h5 or .npz)")
    if not os.path.exists(path):
        raise HandoffError(f"{path}: file not found")
    try:
        with open(path, "rb") as f:
            head = f.read(len(HDF5_MAGIC))
    except OSError as e:
        raise HandoffError(f"{path}: cannot read ({e.strerror or e})") from None
    if head.startswith(HDF5_MAGIC):
        return _read_h5
    if head.startswith(ZIP_MAGICS):
        return _read_npz
    found = f"it starts with {head!r}" if head else "it is empty"
    raise HandoffError(f"{path}: cannot read (neither an HDF5 nor an .npz file: {found})")


def read_embeddings(path: str | os.PathLike, validate: bool = True) -> Embeddings:
    """Read and validate a hand-off file (.h5/.hdf5 or .npz). Raises HandoffError naming the file.

    The structure (attrs a mapping with typed known keys, each dataset's rank and dtype) is always
    checked before it is used; validate=False skips only validate_embeddings' checks of the values.
    Legacy .npz files without "attrs" are accepted: missing text_to_image is rebuilt by the rules in
    _text_to_image_fallback, float16/float64 arrays are cast to float32 and unnormalised rows are
    L2-normalised; each such step is recorded in attrs["load_notes"].
    """
    path = os.fspath(path)
    reader = _reader(path)
    try:
        data, attrs = reader(path)
    except HandoffError:
        raise
    except Exception as e:  # h5py/numpy raise many types for a corrupt file
        raise HandoffError(f"{path}: cannot read ({type(e).__name__}: {e})") from None
    _check_attrs(attrs, path)
    legacy = "schema_version" not in attrs
    for key in ("image_embeddings", "text_embeddings"):
        if key not in data:
            raise HandoffError(f"{path}: missing dataset '{key}' (found {sorted(data)})")
    img, txt = (_array(data, key, path, 2, NUMBERS, "numbers") for key in ("image_embeddings", "text_embeddings"))
    if "dim" in attrs and attrs["dim"] != img.shape[1]:   # run names and reports take the dim from attrs
        raise HandoffError(f"{path}: attribute 'dim' is {attrs['dim']} but the embeddings are {img.shape[1]}-d")
    notes = []
    if legacy:
        if img.dtype != np.float32 or txt.dtype != np.float32:
            notes.append(f"cast {img.dtype}/{txt.dtype} to float32")
            img, txt = img.astype(np.float32), txt.astype(np.float32)
        if not (np.allclose(np.linalg.norm(img, axis=1), 1, atol=NORM_TOLERANCE)
                and np.allclose(np.linalg.norm(txt, axis=1), 1, atol=NORM_TOLERANCE)):
            notes.append("L2-normalised rows on load")
            img, txt = l2_normalize(img), l2_normalize(txt)
    if "text_to_image" in data:
        t2i = _array(data, "text_to_image", path, 1, INTEGERS, "integers").astype(np.int64)
    elif legacy:
        t2i, how = _text_to_image_fallback(data, img.shape[0], txt.shape[0], path)
        notes.append(f"text_to_image {how}")
    else:
        raise HandoffError(f"{path}: missing dataset 'text_to_image'")
    image_ids = _texts(data, "image_ids", path, IDS) if "image_ids" in data else \
        [f"image_{i}" for i in range(img.shape[0])]
    captions = _texts(data, "captions", path) if "captions" in data else \
        [f"caption_{i}" for i in range(txt.shape[0])]
    emb = Embeddings(img, txt, t2i, image_ids, captions, attrs)
    if legacy:
        attrs.setdefault("dataset", os.path.splitext(os.path.basename(path))[0])
        attrs.setdefault("split", "unknown")
        attrs.setdefault("model", "unknown")
        attrs.setdefault("dim", int(img.shape[1]))
        attrs.setdefault("normalised", True)
        attrs["load_notes"] = notes
    if validate:
        validate_embeddings(emb, path)
    return emb
