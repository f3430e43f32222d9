"""The batches of a training epoch: which images, captions, cached views and augmentation seeds, a pure
function of (seed, epoch), so --resume replays an epoch exactly."""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from retrieval.dataset_split import DatasetSplit


@dataclass(frozen=True)
class PlannedBatch:
    """One batch of an epoch (a global batch, or one process's slice of it: distributed.rank_slice)."""
    images: np.ndarray     # image rows
    captions: np.ndarray   # caption rows, captions_per_image of each image in turn
    views: np.ndarray      # the cached view of each image
    seeds: np.ndarray      # the augmentation seed of each image


def captions_by_image(split: DatasetSplit) -> list[list[int]]:
    """The caption rows of each image row of the split."""
    groups = [[] for _ in split.image_files]
    for caption, image in enumerate(split.text_to_image):
        groups[image].append(caption)
    return groups


def plan_epoch(groups: list[list[int]], captions_per_image: int, batch_size: int, world_size: int, seed: int,
               epoch: int, views: int) -> list[PlannedBatch]:
    """The epoch's batches, a pure function of (seed, epoch): resuming replays it exactly.

    Each round shuffles the images and gives each one its next `captions_per_image` captions, so an
    epoch uses every caption once and no image appears twice in a batch. Returns its
    PlannedBatches.
    """
    rng = np.random.default_rng([seed, epoch])
    k = captions_per_image
    shuffled = [rng.permutation(g) for g in groups]
    rounds = max(1, math.ceil(max(len(g) for g in groups) / k))
    batches = []
    for r in range(rounds):
        order = rng.permutation(len(groups))
        usable = batch_size - batch_size % world_size
        for start in range(0, len(order), batch_size):
            images = order[start:start + usable]
            images = images[:len(images) - len(images) % world_size]
            if len(images) < 2:
                continue
            captions = np.array([shuffled[i][(r * k + j) % len(shuffled[i])] for i in images for j in range(k)])
            batches.append(PlannedBatch(images, captions, rng.integers(0, views, len(images)),
                                        rng.integers(0, 2 ** 31, len(images))))
    return batches
