"""What every encoder shares: the `Encoder` record, the one autocast policy, the one image dataset
(with its one bad-image policy) and the one embedding loop, `embed_split`.

An Encoder is a record of plain functions, so a CLIP-family model (retrieval/models.py) and a trained
dual encoder (retrieval/dual_encoder.py, retrieval/checkpoint.py) embed through the same code in
prepare_data.py, search.py and the trainer's export and evaluation.

Bad images: `ImageFiles` never raises for a file it cannot read; it returns the error with the row.
Embedding a split skips such images and records them in the file's `skipped` attribute; training,
which cannot drop an image from a planned batch, stops with a UserError naming the file.
"""
from __future__ import annotations

import contextlib
import os
import sys
from dataclasses import dataclass
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader
from tqdm import tqdm

from retrieval import handoff
from retrieval.dataset_split import DatasetSplit
from retrieval.errors import UserError


@dataclass
class Encoder:
    name: str                       # recorded as the hand-off file's `model` attribute
    dim: int                        # output embedding dimension
    image_transform: Callable       # PIL.Image -> float tensor [3, H, W]; runs in DataLoader workers
    embed_images: Callable          # tensor [B, 3, H, W] (already on device) -> tensor [B, dim]
    embed_texts: Callable           # list[str] -> tensor [B, dim] on device
    device: object = None
    checkpoint: str = None          # path of a dual-encoder checkpoint, when the encoder came from one
    channels_last: bool = False     # feed images in channels_last memory format (faster for CNNs)


def autocast_dtype(device: str | torch.device, amp: str = "auto", training: bool = False) -> torch.dtype | None:
    """The one mixed-precision policy: the dtype autocast runs in, or None for plain fp32.

    CUDA: bf16 where the GPU supports it, else fp16 (amp='bf16' / 'fp16' force one; 'off' = fp32).
    Apple MPS: fp16 when embedding; fp32 when training (no loss scaling there). CPU: fp32 (CPU
    autocast is slower than fp32 for these models)."""
    device = torch.device(device)
    if amp == "off" or device.type not in ("cuda", "mps") or (device.type == "mps" and training):
        return None
    if device.type == "mps":
        return torch.float16
    if amp == "fp16" or (amp == "auto" and not torch.cuda.is_bf16_supported()):
        return torch.float16
    return torch.bfloat16


def autocast(device: str | torch.device, amp: str = "auto",
             training: bool = False) -> contextlib.AbstractContextManager:
    """torch.autocast under autocast_dtype's policy (a no-op context where it says fp32)."""
    dtype = autocast_dtype(device, amp, training)
    if dtype is None:
        return contextlib.nullcontext()
    try:
        return torch.autocast(torch.device(device).type, dtype=dtype)
    except (RuntimeError, ValueError):  # older torch: no MPS autocast
        return contextlib.nullcontext()


# ----------------------------------------------------------------------------- the image dataset

class ImageFiles:
    """Map-style dataset over a split's image files. Item `row` -> (row, pixels, "") with the eval
    `transform`; item (row, seed) -> the same with `train_transform` under torch seed `seed`, so an
    augmentation depends only on its seed (bit-for-bit resume, any worker count). An unreadable file
    gives (row, None, error text) instead of raising (see the module docstring)."""

    def __init__(self, image_root: str, image_files: Sequence[str], transform: Callable,
                 train_transform: Callable | None = None) -> None:
        self.image_root, self.image_files = image_root, list(image_files)
        self.transform, self.train_transform = transform, train_transform

    def __len__(self):
        return len(self.image_files)

    def path(self, row: int) -> str:
        return os.path.join(self.image_root, self.image_files[row])

    def open(self, row: int) -> Image.Image:
        """The decoded RGB image (raises what PIL raises for a bad file)."""
        with Image.open(self.path(row)) as image:
            image.load()  # decode now: a truncated/corrupt file fails here, not later in a transform
            return image.convert("RGB")

    def apply(self, image: Image.Image, seed: int | None = None) -> torch.Tensor:
        if seed is None:
            return self.transform(image)
        # Fork the RNG so augmentation depends only on the seed, not on what ran before in this process.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(seed))
            return self.train_transform(image)

    def __getitem__(self, item):
        row, seed = item if isinstance(item, tuple) else (item, None)
        try:
            image = self.open(row)
        except Exception as e:  # PIL raises OSError, SyntaxError, ValueError... for bad files
            return row, None, describe_error(e)
        return row, self.apply(image, seed), ""


def describe_error(error: Exception) -> str:
    text = str(error).splitlines()[0] if str(error) else ""
    return f"{type(error).__name__}: {text}".strip()


def raise_unreadable(dataset: ImageFiles, errors: list[tuple[int, str]]) -> None:
    """Training cannot skip an image of a planned batch: stop naming the first unreadable file."""
    if errors:
        row, error = errors[0]
        raise UserError(f"{dataset.path(row)}: cannot read image ({error})")


def collate_images(items: list[tuple[int, torch.Tensor | None, str]]
                   ) -> tuple[list[int], torch.Tensor | None, list[tuple[int, str]]]:
    """Stack the readable images of a batch; keep the rows and the errors of the others."""
    good = [(row, pixels) for row, pixels, _ in items if pixels is not None]
    errors = [(row, error) for row, pixels, error in items if pixels is None]
    rows = [row for row, _ in good]
    pixels = torch.stack([p for _, p in good]) if good else None
    return rows, pixels, errors


def image_loader(dataset: Any, batch_size: int = 1, num_workers: int = 0, device: str | torch.device | None = None,
                 batch_sampler: Iterator | Sequence | None = None, generator: torch.Generator | None = None) -> DataLoader:
    """DataLoader over an image dataset, in file order unless a batch_sampler says otherwise; decoding and
    preprocessing run in `num_workers` processes. Batches are collate_images' (rows, pixels, errors)."""
    pin = device is not None and torch.device(device).type == "cuda"
    if batch_sampler is not None:
        batch_size = 1   # DataLoader accepts batch_sampler only with the default batch_size
    return DataLoader(dataset, batch_size=batch_size, batch_sampler=batch_sampler, shuffle=False,
                      num_workers=num_workers, collate_fn=collate_images, pin_memory=pin, generator=generator,
                      prefetch_factor=4 if num_workers > 0 else None, persistent_workers=False)


def embed_images(encoder: Encoder, split: DatasetSplit, batch_size: int = 32, num_workers: int = 2,
                 progress: bool = True) -> tuple[np.ndarray, list[int], list[tuple[int, str]]]:
    """(float32 [N_ok, dim] L2-normalised, rows that were read, [(row, error)] of unreadable files)."""
    device = torch.device(encoder.device or "cpu")
    memory_format = torch.channels_last if encoder.channels_last else torch.contiguous_format
    parts, rows, errors = [], [], []
    loader = image_loader(ImageFiles(split.image_root, split.image_files, encoder.image_transform), batch_size,
                          num_workers, device)
    with torch.inference_mode(), autocast(device), \
            tqdm(total=len(split.image_files), desc=f"images {split.split}", unit="img", disable=not progress,
                 file=sys.stderr) as bar:
        for batch_rows, pixels, batch_errors in loader:
            errors += batch_errors
            if pixels is not None:
                pixels = pixels.to(device, non_blocking=True).contiguous(memory_format=memory_format)
                out = encoder.embed_images(pixels).float()
                parts.append(torch.nn.functional.normalize(out, dim=-1).cpu())
                rows += batch_rows
            bar.update(len(batch_rows) + len(batch_errors))
    vectors = torch.cat(parts).numpy().astype(np.float32) if parts else np.zeros((0, encoder.dim), np.float32)
    return vectors, rows, errors


def embed_texts(encoder: Encoder, captions: Sequence[str], batch_size: int = 128, progress: bool = True,
                desc: str = "captions") -> np.ndarray:
    """float32 [len(captions), dim] L2-normalised text embeddings, in order."""
    parts = []
    with torch.inference_mode():
        for start in tqdm(range(0, len(captions), batch_size), desc=desc, unit="batch", disable=not progress,
                          file=sys.stderr):
            out = encoder.embed_texts(list(captions[start:start + batch_size])).float()
            parts.append(torch.nn.functional.normalize(out, dim=-1).cpu())
    return torch.cat(parts).numpy().astype(np.float32) if parts else np.zeros((0, encoder.dim), np.float32)


def embed_split(encoder: Encoder, split: DatasetSplit, batch_size: int = 32, num_workers: int = 2,
                progress: bool = True, text_batch_size: int | None = None,
                embedded: tuple[np.ndarray, np.ndarray] | None = None) -> handoff.Embeddings:
    """Embed a DatasetSplit into an handoff.Embeddings (validated by the writer later).

    Unreadable or corrupt images are skipped, counted and listed in attrs["skipped"]; their captions
    are dropped and text_to_image is re-indexed to the kept images. Raises UserError when no image
    of the split can be read.

    embedded: optional (image vectors [N, dim], text vectors [T, dim]) already computed for every
    image and caption of the split by the same encoder (the trainer projects its cached frozen-tower
    features); the file is then assembled exactly as if they had been embedded here.
    """
    if embedded is None:
        image_vectors, kept_rows, errors = embed_images(encoder, split, batch_size, num_workers, progress)
    else:
        image_vectors, kept_rows, errors = embedded[0], list(range(len(split.image_files))), []
    skipped = list(split.skipped)
    if errors:
        print(f"warning: {split.dataset} {split.split}: {len(errors)} unreadable images skipped "
              f"(first: {split.image_files[errors[0][0]]}: {errors[0][1]})", file=sys.stderr, flush=True)
        skipped += [f"image '{split.image_files[row]}': unreadable ({error})" for row, error in sorted(errors)]
    if not kept_rows:
        raise UserError(f"{split.image_root}: none of the {len(split.image_files)} images of split "
                        f"'{split.split}' could be read")
    new_row = np.full(len(split.image_files), -1, dtype=np.int64)
    new_row[np.asarray(kept_rows, dtype=np.int64)] = np.arange(len(kept_rows))
    keep_caption = new_row[split.text_to_image] >= 0
    captions = [c for c, keep in zip(split.captions, keep_caption) if keep]
    text_to_image = new_row[split.text_to_image[keep_caption]]
    if embedded is None:
        text_vectors = embed_texts(encoder, captions, text_batch_size or max(batch_size, 64), progress,
                                   desc=f"captions {split.split}")
    else:
        text_vectors = embedded[1]
    extra = {k: v for k, v in split.info.items() if k not in ("dataset", "split", "model", "dim", "skipped")}
    extra["image_root"] = split.image_root
    if encoder.checkpoint:
        extra["checkpoint"] = encoder.checkpoint
    attrs = handoff.make_attrs(split.dataset, split.split, encoder.name, image_vectors.shape[1], skipped=skipped,
                          **extra)
    attrs["num_unreadable_images"] = len(errors)
    return handoff.Embeddings(image_vectors, text_vectors, text_to_image,
                         [split.image_files[row] for row in kept_rows], captions, attrs)
