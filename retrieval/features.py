"""Frozen-tower features: computed once per (tower, weights, data), cached on disk, and projected
through the trained heads instead of re-running the towers.

With a frozen tower an epoch costs only the heads: `FeatureCache` computes the tower's features of a
split once (train images: several views, see ImageViews) and keeps them in
<model_dir>/feature_cache/<dataset>-<split>-<kind>-<key>.pt, the key a hash of everything that decides
them. `project_features` turns cached features into the embeddings DualEncoder.embed_images /
embed_texts would compute from pixels and tokens (tests/test_train.py checks they agree).
"""
from __future__ import annotations

import functools
import hashlib
import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

from retrieval import io
from retrieval.data import DatasetSplit
from retrieval.encoders import ImageFiles, autocast, describe_error, image_loader, raise_unreadable
from retrieval.towers import IMAGE_SIZES, image_transforms


def cache_key(*parts: object) -> str:
    """Short stable hash of everything that decides a cached feature file (tower, weights, data)."""
    return hashlib.sha1(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def load_or_compute(path: str, compute: Callable[[], torch.Tensor]) -> torch.Tensor:
    """torch.load(path) if it exists, else compute() and save it atomically."""
    if os.path.exists(path):
        return torch.load(path, map_location="cpu", weights_only=True)
    value = compute()
    with io.atomic_path(path) as tmp:
        torch.save(value, tmp)
    return value


def split_views(test_flip: bool) -> int:
    """Image views cached for an evaluated split: the eval transform, plus its mirror with --test_flip."""
    return 2 if test_flip else 1


# Views 0 (the eval transform) and 1 (its mirror) of ImageViews: the same in a cache of any view count
# and seed, so a split's first FIXED_VIEWS views can be cut from a cache of more (image_from_wider).
FIXED_VIEWS = 2


class ImageViews:
    """Item row -> (row, [views, 3, H, W], error): the eval transform of the image, its mirror, then
    seeded random resized crops (seed, row and view decide each crop), from one read of the file."""

    def __init__(self, split: DatasetSplit, views: int, seed: int, input_norm: str, size: int) -> None:
        self.files = ImageFiles(split.image_root, split.image_files, image_transforms(False, input_norm, size),
                                image_transforms(True, input_norm, size))
        self.views, self.seed = views, seed

    def __len__(self):
        return len(self.files)

    def __getitem__(self, row):
        try:
            image = self.files.open(row)   # decoded once for every view
        except Exception as e:  # the one bad-image policy: report, never raise (encoders.ImageFiles)
            return row, None, describe_error(e)
        plain = self.files.apply(image)
        out = [plain, plain.flip(-1)][:self.views]
        out += [self.files.apply(image, self.seed * 1_000_003 + row * 97 + v)
                for v in range(FIXED_VIEWS, self.views)]
        return row, torch.stack(out), ""


@dataclass(frozen=True)
class FeatureCache:
    """Where and how frozen-tower features are computed. image_source / text_source: what identifies
    the tower's weights beyond the model object ((encoder, weights, pool) and (encoder, weights, layers))."""
    folder: str
    device: torch.device
    batch_size: int
    num_workers: int
    amp: str
    image_source: tuple
    text_source: tuple
    image_blocks: int = 0   # --train_image_blocks: cache the input of the tower's last N blocks instead
    text_layers: int = 0    # --train_text_layers: cache the input of the text model's last N layers instead

    def image(self, model: nn.Module, split: DatasetSplit, views: int, seed: int) -> torch.Tensor:
        """[views, N, F] image-tower features of the split (view 0 = the eval transform); with image_blocks
        the frozen part's output instead (ImageTower.block_input: the input of the trained blocks)."""
        return self._cached(split, self._image_kind(), self._image_key(model, split, views, seed),
                            lambda: self._image_features(model, split, views, seed))

    def image_from_wider(self, model: nn.Module, split: DatasetSplit, views: int, seed: int,
                         wider: int) -> torch.Tensor | None:
        """image(model, split, views, seed) cut from an existing cache of `wider` views of the split (the
        train split's, cached while training), or None when there is no such file: no tower pass.
        Only views 0 and 1 (plain, mirror) can be cut: ImageViews makes them whatever the view count and
        seed, while the crops from view 2 on depend on both."""
        if views > min(wider, FIXED_VIEWS):
            return None
        path = self._path(split, self._image_kind(), self._image_key(model, split, wider, seed))
        if not os.path.exists(path):
            return None
        return torch.load(path, map_location="cpu", weights_only=True)[:views].contiguous()

    def _image_key(self, model, split, views, seed):
        encoder, weights, pool = self.image_source
        # image_size joins the key only when it is not the tower's own, so existing caches keep their names.
        tower = model.image_tower
        size = [tower.image_size] if tower.image_size != IMAGE_SIZES[tower.name] else []
        blocks = [f"blocks{self.image_blocks}"] if self.image_blocks else []  # likewise
        return cache_key("image", encoder, weights, pool, tower.input_norm, *size, *blocks, views, seed,
                         os.path.abspath(split.image_root), list(split.image_files))

    def _image_kind(self):
        return f"image-blocks{self.image_blocks}" if self.image_blocks else "image"

    def text(self, model: nn.Module, split: DatasetSplit) -> torch.Tensor:
        """[T, F] text-tower features of the split's captions; with text_layers the frozen part's output
        instead (TextTower.layer_input: the input of the trained layers, padded to the split's longest caption)."""
        encoder, weights, layers = self.text_source
        # text_layers / --train_text_layers join the key only when set, so earlier caches keep their names.
        trained = [f"layers{self.text_layers}"] if self.text_layers else []
        key = cache_key("text", encoder, weights, *([layers] if layers else []), *trained, list(split.captions))
        kind = f"text-layers{self.text_layers}" if self.text_layers else "text"
        return self._cached(split, kind, key, lambda: self._text_features(model, split.captions))

    def _path(self, split, kind, key):
        return os.path.join(self.folder, f"{split.dataset}-{split.split}-{kind}-{key}.pt")

    def _cached(self, split, kind, key, compute):
        path = self._path(split, kind, key)
        start, exists = time.time(), os.path.exists(path)
        value = load_or_compute(path, compute)
        if not exists:
            print(f"cached {kind} features of {split.split} ({tuple(value.shape)}) in {time.time() - start:.0f}s "
                  f"-> {path}", flush=True)
        return value

    def _image_features(self, model, split, views, seed):
        tower = model.image_tower
        dataset = ImageViews(split, views, seed, tower.input_norm, tower.image_size)
        # Its own generator: creating the iterator must not draw from the global RNG (training's dropout does).
        loader = image_loader(dataset, self.batch_size // max(1, views) or 1, self.num_workers, self.device,
                              generator=torch.Generator().manual_seed(0))
        # channels_last is the faster memory layout for these CNNs on CPU and GPU alike.
        tower = tower.eval().to(self.device, memory_format=torch.channels_last)
        forward = (lambda p: tower.block_input(p, self.image_blocks)) if self.image_blocks else tower
        out = []
        with torch.no_grad():
            for _, pixels, errors in tqdm(loader, desc=f"image features {split.split}", leave=False):
                raise_unreadable(dataset.files, errors)
                b, v = pixels.shape[:2]
                pixels = pixels.flatten(0, 1).to(self.device, non_blocking=True).contiguous(
                    memory_format=torch.channels_last)
                with autocast(self.device, self.amp):
                    out.append(forward(pixels).float().cpu().view(b, v, -1))
        return torch.cat(out).transpose(0, 1).contiguous()

    def _text_features(self, model, captions):
        tower = model.text_tower.eval().to(self.device)
        # Sorting by length keeps padding (wasted work) small; rows go back to caption order after.
        order = np.argsort([len(c) for c in captions], kind="stable")
        forward, out = tower, None
        if self.text_layers:   # every row padded to the split's longest caption, so the rows have one width
            width = int(tower.tokenize(captions)["attention_mask"].sum(1).max())
            forward = functools.partial(tower.layer_input, layers=self.text_layers, width=width)
        with torch.no_grad():
            for start in tqdm(range(0, len(order), self.batch_size), desc="text features", leave=False):
                rows = order[start:start + self.batch_size]
                tokens = tower.tokenize([captions[i] for i in rows])
                with autocast(self.device, self.amp):
                    feats = forward(tokens["input_ids"].to(self.device), tokens["attention_mask"].to(self.device))
                if out is None:
                    out = torch.empty(len(captions), feats.shape[1])
                out[torch.as_tensor(rows)] = feats.float().cpu()
        return out


def image_tower_features(model: nn.Module, cached: torch.Tensor, blocks: int) -> torch.Tensor:
    """The image tower's features of cached rows: the rows themselves, or with --train_image_blocks the
    trained blocks run on the cached block inputs (ImageTower.from_block_input)."""
    return model.image_tower.from_block_input(cached, blocks) if blocks else cached


def text_tower_features(model: nn.Module, cached: torch.Tensor, layers: int) -> torch.Tensor:
    """The text tower's features of cached rows: the rows themselves, or with --train_text_layers the
    trained layers run on the cached layer inputs (TextTower.from_layer_input)."""
    return model.text_tower.from_layer_input(cached, layers) if layers else cached


def project_features(model: nn.Module, image_views: torch.Tensor, text_feats: torch.Tensor, device: torch.device,
                     blocks: int = 0, text_layers: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(image [N, D], text [T, D]) float32 numpy embeddings of cached frozen-tower features (`blocks` /
    `text_layers`: of cached block / layer inputs, FeatureCache.image_blocks / text_layers), as
    DualEncoder.embed_images / embed_texts compute them from pixels and tokens."""
    def project(rows):
        return model.project_images(image_tower_features(model, rows.to(device), blocks))

    with torch.no_grad():
        # View 1 of a cache with test_flip is the mirror image, as in DualEncoder.embed_images.
        views = image_views[:2 if model.test_flip else 1]
        images = F.normalize(sum(torch.cat([project(f) for f in view.split(1024)]) for view in views), dim=-1)
        texts = torch.cat([model.project_texts(text_tower_features(model, f.to(device), text_layers))
                           for f in text_feats.split(1024)])
    return images.float().cpu().numpy(), texts.float().cpu().numpy()
