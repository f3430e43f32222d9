"""The trainable dual encoder: an image tower and a text tower (retrieval/towers.py), each with a
projection head into one shared space, and the symmetric InfoNCE loss that trains them.

`build_model(config)` makes a model from the model part of the training arguments (MODEL_KEYS);
`join_members` makes one model of K separately trained head-ensemble members; `encoder_from_model`
wraps a model as the retrieval.encoders.Encoder every embedding path uses. Checkpoints (which
rebuild a model from the file alone) live in retrieval/checkpoint.py.

Nested (Matryoshka) embeddings (train_dual_encoder.py --matryoshka_dims; Kusupati et al., NeurIPS
2022): the first d dims of an embedding, renormalised, are an embedding of their own at every nested
dim d (`nested_dims`), because `nested_loss` trains each prefix; --quantization_aware adds the loss
of the quantized vectors (retrieval/quantize_aware.py).
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from retrieval.encoders import Encoder, autocast
from retrieval.errors import UserError
from retrieval.quantize_aware import QUANTIZERS
from retrieval.towers import ImageTower, TextTower, build_text_tower, image_transforms

# Learnable temperature is kept inside [0.01, 1] (logit scale 1..100, the CLIP clamp).
MIN_TEMPERATURE, MAX_TEMPERATURE = 0.01, 1.0


# ----------------------------------------------------------------------------- heads and model

class FeatureNorm(nn.Module):
    """Fixed standardisation (x - mean) / std; set from training features when a tower is frozen."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.register_buffer("mean", torch.zeros(dim))
        self.register_buffer("std", torch.ones(dim))

    def set(self, features: torch.Tensor) -> None:
        features = features.float()
        self.mean.copy_(features.mean(0))
        self.std.copy_(features.std(0).clamp_min(1e-6))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x.float() - self.mean) / self.std


def make_head(in_dim: int, out_dim: int, kind: str = "mlp", hidden: int = 2048, dropout: float = 0.1,
              input_dropout: float | None = None) -> nn.Sequential:
    """Projection head. input_dropout (default: dropout) drops standardised tower features; with frozen
    towers the heads see the same cached features every epoch, and dropping more of them regularises."""
    input_dropout = dropout if input_dropout is None else input_dropout
    if kind == "linear":
        return nn.Sequential(nn.Dropout(input_dropout), nn.Linear(in_dim, out_dim))
    return nn.Sequential(nn.Dropout(input_dropout), nn.Linear(in_dim, hidden), nn.GELU(), nn.Dropout(dropout),
                         nn.Linear(hidden, out_dim))


class HeadEnsemble(nn.Module):
    """K heads, each out_dim / K wide, trained as separate runs (train_dual_encoder.py --head_ensemble).
    The output concatenates their L2-normalised outputs scaled by 1/sqrt(K): a unit vector whose cosine
    with another such vector is the MEAN of the members' cosines, so the ensemble is one embedding that
    FAISS indexes like any other.

    member_nested_dims (the members' nested dims, ascending, their full width last): the output is
    ordered by nested segment instead, segment [previous, d) of every member in turn, so the joined
    embedding stays nested: its first K*d dims are the members' first d dims (over sqrt(K)). Without
    nested dims it is [member 1 | member 2 | ...]."""

    def __init__(self, members: list[nn.Module], member_nested_dims: list[int] | None = None) -> None:
        super().__init__()
        self.members = nn.ModuleList(members)
        self.bounds = [0, *member_nested_dims] if member_nested_dims else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        outputs = [F.normalize(m(x).float(), dim=-1) for m in self.members]
        if self.bounds:
            outputs = [out[..., start:end] for start, end in zip(self.bounds, self.bounds[1:]) for out in outputs]
        return torch.cat(outputs, -1) / len(self.members) ** 0.5


def make_heads(in_dim: int, out_dim: int, kind: str, hidden: int, dropout: float, input_dropout: float | None,
               ensemble: int = 1, nested: list[int] | None = None) -> nn.Module:
    if ensemble == 1:
        return make_head(in_dim, out_dim, kind, hidden, dropout, input_dropout)
    if ensemble < 1 or out_dim % ensemble:
        raise UserError(f"--head_ensemble {ensemble}: must be >= 1 and divide --embedding_dim {out_dim}")
    return HeadEnsemble([make_head(in_dim, out_dim // ensemble, kind, hidden, dropout, input_dropout)
                         for _ in range(ensemble)], nested and [d // ensemble for d in nested])


def nested_dims(embedding_dim: int, matryoshka_dims: Sequence[int] | None, ensemble: int = 1) -> list[int] | None:
    """The dims a nested model is trained and evaluated at: --matryoshka_dims plus the full dim,
    ascending; None without --matryoshka_dims (a plain model). Each must be a prefix length that
    every --head_ensemble member can give (d / K of its dims)."""
    if not matryoshka_dims:
        return None
    for dim in matryoshka_dims:
        if dim <= 0:
            raise UserError(f"--matryoshka_dims {dim}: must be positive")
        if dim > embedding_dim:
            raise UserError(f"--matryoshka_dims {dim}: larger than --embedding_dim {embedding_dim}")
        if dim % ensemble:
            raise UserError(f"--matryoshka_dims {dim}: not divisible by --head_ensemble {ensemble} "
                            "(each member gives d / K of the first d dims)")
    return sorted(set(matryoshka_dims) | {embedding_dim})


def check_nested_weights(dims: list[int] | None, weights: Sequence[float] | None) -> None:
    """--matryoshka_weights: one positive weight per nested dim (`dims`, as nested_dims gives them)."""
    if not weights:
        return
    if dims is None:
        raise UserError("--matryoshka_weights: needs --matryoshka_dims")
    if len(weights) != len(dims):
        raise UserError(f"--matryoshka_weights: {len(weights)} values for the {len(dims)} nested dims {dims} "
                        "(one per dim, ascending, the full dim included)")
    for weight in weights:
        if not (math.isfinite(weight) and weight > 0):
            raise UserError(f"--matryoshka_weights {weight}: must be positive")


class DualEncoder(nn.Module):
    def __init__(self, image_tower: ImageTower, text_tower: TextTower, embedding_dim: int, temperature: float = 0.07,
                 head: str = "mlp", head_hidden: int = 2048, head_dropout: float = 0.1, test_flip: bool = False,
                 head_input_dropout: float | None = None, head_ensemble: int = 1,
                 matryoshka_dims: Sequence[int] | None = None) -> None:
        super().__init__()
        # test_flip: an image's embedding at evaluation is the mean of its own and its mirror's.
        self.test_flip = bool(test_flip)
        # channels_last: the faster layout for these CNNs, set once here so that every path through the model
        # (training, its dev evaluation, exports, a rebuilt checkpoint) runs the same kernels and gives the same
        # numbers (the layouts' kernels differ in the last bits, enough to flip near-tied ranks).
        self.image_tower = image_tower.to(memory_format=torch.channels_last)
        self.text_tower = text_tower
        self.image_norm, self.text_norm = FeatureNorm(image_tower.feature_dim), FeatureNorm(text_tower.feature_dim)
        # nested_dims: None for a plain model; else the dims its prefixes were trained at (full dim last).
        self.nested_dims = nested_dims(embedding_dim, matryoshka_dims, head_ensemble)
        self.image_head = make_heads(image_tower.feature_dim, embedding_dim, head, head_hidden, head_dropout,
                                     head_input_dropout, head_ensemble, self.nested_dims)
        self.text_head = make_heads(text_tower.feature_dim, embedding_dim, head, head_hidden, head_dropout,
                                    head_input_dropout, head_ensemble, self.nested_dims)
        self.log_inverse_temperature = nn.Parameter(torch.tensor(math.log(1.0 / temperature)))
        self.embedding_dim = embedding_dim

    @property
    def temperature(self) -> float:
        return 1.0 / float(self.logit_scale().detach())

    def logit_scale(self) -> torch.Tensor:
        return self.log_inverse_temperature.clamp(math.log(1 / MAX_TEMPERATURE), math.log(1 / MIN_TEMPERATURE)).exp()

    def project_images(self, features: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.image_head(self.image_norm(features)).float(), dim=-1)

    def project_texts(self, features: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.text_head(self.text_norm(features)).float(), dim=-1)

    def embed_images(self, pixels: torch.Tensor) -> torch.Tensor:
        """Evaluation/export embedding (training steps call the tower and project_images directly)."""
        embedded = self.project_images(self.image_tower(pixels))
        if self.test_flip:
            embedded = F.normalize(embedded + self.project_images(self.image_tower(pixels.flip(-1))), dim=-1)
        return embedded

    def embed_texts(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.project_texts(self.text_tower(input_ids, attention_mask))


def set_frozen(module: nn.Module, frozen: bool) -> None:
    for p in module.parameters():
        p.requires_grad_(not frozen)


# ----------------------------------------------------------------------------- loss

def contrastive_loss(image_embeddings: torch.Tensor, text_embeddings: torch.Tensor, text_to_image: torch.Tensor,
                     logit_scale: torch.Tensor) -> torch.Tensor:
    """Symmetric InfoNCE for a batch of distinct images and their captions.

    text_to_image[j] = row of caption j's image. Text->image: each caption's one image is the
    positive among the batch's images. Image->text: ALL the image's captions in the batch are
    positives (target spread evenly over them), so captions of the same image are never pushed
    apart as negatives of each other.
    """
    logits = logit_scale * text_embeddings.float() @ image_embeddings.float().t()   # [T, I]
    text_to_image_loss = F.cross_entropy(logits, text_to_image)
    positives = (text_to_image.unsqueeze(0) == torch.arange(image_embeddings.shape[0], device=logits.device)
                 .unsqueeze(1)).float()                                             # [I, T]
    targets = positives / positives.sum(1, keepdim=True).clamp_min(1.0)
    image_to_text_loss = -(targets * F.log_softmax(logits.t(), dim=1)).sum(1).mean()
    return 0.5 * (text_to_image_loss + image_to_text_loss)


def prefix(embeddings: torch.Tensor, dim: int) -> torch.Tensor:
    """The first `dim` dims of unit embeddings, renormalised (the full width as it is)."""
    if dim == embeddings.shape[-1]:
        return embeddings
    return F.normalize(embeddings[..., :dim], dim=-1)


def nested_loss(image_embeddings: torch.Tensor, text_embeddings: torch.Tensor, text_to_image: torch.Tensor,
                logit_scale: torch.Tensor, dims: list[int] | None = None, weights: Sequence[float] | None = None,
                quantization: str | None = None) -> torch.Tensor:
    """The training loss of a batch of unit embeddings: sum_d w_d L_d / sum_d w_d over the nested dims
    d (`dims`, ascending; weights default 1), L_d = contrastive_loss of the first d dims renormalised. With
    `quantization` ("binary" / "int4"): the mean of that and the same loss on the quantized vectors
    at every nested dim (straight-through, retrieval/quantize_aware.py; images and texts each quantized
    with their own batch ranges, as the sweep fits each gallery on its own modality).

    dims None: the full dim only, so without quantization this is exactly contrastive_loss(...)."""
    dims = dims or [image_embeddings.shape[-1]]
    weights = weights or [1.0] * len(dims)

    def weighted(transform):
        total = sum(w * contrastive_loss(transform(prefix(image_embeddings, d)),
                                         transform(prefix(text_embeddings, d)), text_to_image, logit_scale)
                    for d, w in zip(dims, weights))
        return total / sum(weights)

    loss = weighted(lambda x: x)
    if quantization is None:
        return loss
    quantize = QUANTIZERS[quantization]
    return 0.5 * (loss + weighted(lambda x: F.normalize(quantize(x), dim=-1)))


# ----------------------------------------------------------------------------- build

MODEL_KEYS = ("image_encoder", "image_weights", "image_pool", "image_size", "text_encoder", "text_weights", "text_layers",
              "embedding_dim", "temperature", "head", "head_hidden", "head_dropout", "test_flip",
              "head_input_dropout", "head_ensemble", "matryoshka_dims")


def model_from_config(image_tower: ImageTower, text_tower: TextTower, config: dict[str, Any]) -> DualEncoder:
    """A DualEncoder (fresh heads) on the given towers, with the head settings of `config`."""
    return DualEncoder(image_tower, text_tower, config["embedding_dim"], config.get("temperature", 0.07),
                       config.get("head", "mlp"), config.get("head_hidden", 2048), config.get("head_dropout", 0.1),
                       config.get("test_flip", False), config.get("head_input_dropout"),
                       config.get("head_ensemble") or 1, config.get("matryoshka_dims"))


def build_model(config: dict[str, Any]) -> DualEncoder:
    """A DualEncoder from the model part of the training args (dict with MODEL_KEYS)."""
    image_tower = ImageTower(config["image_encoder"], config.get("image_pool", "last"),
                             image_size=config.get("image_size"))
    image_tower.load_pretrained(config.get("image_weights", "imagenet"))
    text_tower = build_text_tower(config["text_encoder"], config.get("text_weights", "pretrained"),
                                  config.get("text_layers"))
    return model_from_config(image_tower, text_tower, config)


def join_members(members: list[DualEncoder], config: dict[str, Any]) -> DualEncoder:
    """One DualEncoder with a HeadEnsemble per side from K trained members (config["head_ensemble"] = K,
    config["embedding_dim"] = K x a member's dim, config["matryoshka_dims"] = K x the members'): the
    members' shared towers and feature standardisation, their heads side by side, their mean temperature."""
    first = members[0]
    model = model_from_config(first.image_tower, first.text_tower, config)
    model.image_norm.load_state_dict(first.image_norm.state_dict())
    model.text_norm.load_state_dict(first.text_norm.state_dict())
    with torch.no_grad():
        for k, member in enumerate(members):
            model.image_head.members[k].load_state_dict(member.image_head.state_dict())
            model.text_head.members[k].load_state_dict(member.text_head.state_dict())
        model.log_inverse_temperature.copy_(torch.stack([m.log_inverse_temperature for m in members]).mean())
    return model.eval()


def encoder_from_model(model: DualEncoder, name: str, device: torch.device, checkpoint: str | None = None) -> Encoder:
    """The Encoder of an in-memory DualEncoder (moved to `device`; call model.eval() first): the one
    embedding path of exports, --eval_only, prepare_data.py --checkpoint and the trainer's dev
    evaluation when a tower is trained."""
    model.to(device)

    @torch.no_grad()
    def embed_images(pixels):
        with autocast(device):
            return model.embed_images(pixels.to(device)).float()

    @torch.no_grad()
    def embed_texts(captions):
        tokens = model.text_tower.tokenize(captions)
        with autocast(device):
            return model.embed_texts(tokens["input_ids"].to(device), tokens["attention_mask"].to(device)).float()

    return Encoder(name=name, dim=model.embedding_dim,
                   image_transform=image_transforms(False, model.image_tower.input_norm,
                                                    model.image_tower.image_size),
                   embed_images=embed_images, embed_texts=embed_texts, device=device, checkpoint=checkpoint,
                   channels_last=True)
