"""The dev evaluation of a model being trained (or a joined head ensemble): its dev embeddings, the dev
fields of a log line (per nested dim too), and the score best.pt is chosen by."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from retrieval import handoff, metrics
from retrieval.data import DatasetSplit
from retrieval.dual_encoder import encoder_from_model
from retrieval.encoders import embed_split
from retrieval.features import project_features


@dataclass(frozen=True)
class DevEmbeddings:
    """Float32 unit embeddings of the dev split, and caption row -> image row."""
    images: np.ndarray          # [N, D]
    texts: np.ndarray           # [T, D]
    text_to_image: np.ndarray   # [T]


def dev_embeddings(model: nn.Module, split: DatasetSplit, device: torch.device, cache: dict[str, torch.Tensor],
                   batch_size: int, num_workers: int, blocks: int = 0, text_layers: int = 0) -> DevEmbeddings:
    """The dev embeddings for the per-epoch dev evaluation.

    With both towers frozen (`cache` holds "image" and "text") it projects the cached features (an epoch's
    evaluation then costs only the heads; same numbers on CPU, close under CUDA autocast). Otherwise it
    embeds through encoder_from_model + encoders.embed_split, the path of exported files, --eval_only and
    prepare_data.py --checkpoint."""
    model.eval()
    if "image" in cache and "text" in cache:
        images, texts = project_features(model, cache["image"], cache["text"], device, blocks, text_layers)
        return DevEmbeddings(images, texts, split.text_to_image)
    emb = embed_split(encoder_from_model(model, "dev", device), split, batch_size, num_workers, progress=False)
    return DevEmbeddings(emb.image_embeddings, emb.text_embeddings, emb.text_to_image)


def dev_results(embedded: DevEmbeddings, nested: list[int] | None) -> dict[str, Any]:
    """The dev fields of a log line: "dev" (the full dim) and, for a nested model (`nested`, its nested
    dims), "dev_nested" {str(d): metrics of the first d dims renormalised} and their mean RSUM."""
    images, texts, text_to_image = embedded.images, embedded.texts, embedded.text_to_image
    results = {"dev": metrics.evaluate(images, texts, text_to_image)}
    if nested:
        results["dev_nested"] = {str(d): metrics.evaluate(prefix(images, d), prefix(texts, d), text_to_image)
                                 for d in nested}
        results["dev_nested_mean_rsum"] = float(np.mean([m["RSUM"] for m in results["dev_nested"].values()]))
    return results


def prefix(vectors: np.ndarray, dim: int) -> np.ndarray:
    """The first `dim` dims of unit vectors (numpy), renormalised, as the sweep truncates; the full width
    as it is (as dual_encoder.prefix, so the full dim's nested metrics are the plain dev metrics)."""
    return vectors if dim == vectors.shape[1] else handoff.l2_normalize(vectors[:, :dim])


def selection_rsum(results: dict[str, Any]) -> float:
    """What best.pt is chosen by (the highest wins): without --matryoshka_dims the dev RSUM; with them
    the MEAN dev RSUM over the nested dims, the full dim included, as the model is meant to be used at
    every one of them (the full dim's RSUM alone would pick a model whose short prefixes lag)."""
    return results.get("dev_nested_mean_rsum", results["dev"]["RSUM"])
