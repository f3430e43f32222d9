"""Dual-encoder checkpoints: the one place that writes, reads (with a version check) and rebuilds a
model from a `.pt` file.

A checkpoint is a dict written with torch.save:

    version        CHECKPOINT_VERSION of the code that wrote it (checked on read)
    model          the state dict
    model_record   what rebuilds the model with no other file: the model config (MODEL_KEYS plus the
                   image normalisation), the text model's config and its tokenizer files
    tag            the model's name in hand-off files, 'dual-<run>-d<dim>' (run_tag)
    args, environment, image_encoder, text_encoder   what produced it
    + the training state of last.pt/best.pt (optimizer, scheduler, scaler, epoch, step, RNG states,
      ...) or, for a joined head ensemble, its members and their epochs.
"""
from __future__ import annotations

import os
from typing import Any

import torch
import torch.nn as nn

from retrieval import env, io
from retrieval.dual_encoder import MODEL_KEYS, DualEncoder, encoder_from_model, model_from_config
from retrieval.encoders import Encoder
from retrieval.errors import UserError
from retrieval.towers import ImageTower, text_tower_from_stored, tokenizer_files

# Raise when the layout of a checkpoint changes; load_checkpoint refuses files of another version.
CHECKPOINT_VERSION = 1


def run_tag(run_name: str, dim: int) -> str:
    """The name of a trained model in its checkpoint and hand-off files: 'dual-<run>-d<dim>'."""
    return f"dual-{run_name}-d{dim}"


def model_record(model: DualEncoder, config: dict[str, Any]) -> dict[str, Any]:
    """What a checkpoint needs to rebuild the model with no other file: towers, text config, tokenizer."""
    text_config = model.text_tower.model.config.to_dict()
    # image_norm follows from the tower; it is stored so a later change of default cannot misfeed the weights.
    return {"config": {**{k: config.get(k) for k in MODEL_KEYS}, "image_norm": model.image_tower.input_norm},
            "image_encoder": model.image_tower.name, "text_encoder": config["text_encoder"],
            "text_config": text_config, "tokenizer_files": tokenizer_files(model.text_tower.tokenizer)}


def write_checkpoint(path: str, model: nn.Module, record: dict[str, Any], args: dict[str, Any], tag: str,
                     **fields: Any) -> None:
    """Atomically write a checkpoint: what rebuilds and describes the model, plus `fields`.

    args: the training arguments (a dict), stored as what produced the file."""
    checkpoint = {"version": CHECKPOINT_VERSION, "model": {k: v.cpu() for k, v in model.state_dict().items()},
                  **fields, "args": dict(args), "model_record": record, "tag": tag,
                  "image_encoder": args["image_encoder"], "text_encoder": args["text_encoder"],
                  "environment": env.environment()}
    with io.atomic_path(path) as tmp:
        torch.save(checkpoint, tmp)


def load_checkpoint(path: str) -> dict[str, Any]:
    """The checkpoint dict of `path`, validated: a train_dual_encoder.py checkpoint of this version."""
    if not os.path.isfile(path):
        raise UserError(f"{path}: checkpoint file not found")
    try:
        # weights_only=False: the file holds RNG states and the tokenizer files next to the tensors.
        checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:
        raise UserError(f"{path}: cannot read checkpoint ({type(e).__name__}: {e})") from None
    if not isinstance(checkpoint, dict) or "model" not in checkpoint or "model_record" not in checkpoint:
        raise UserError(f"{path}: not a train_dual_encoder.py checkpoint (no model / model_record)")
    version = checkpoint.get("version")
    if version != CHECKPOINT_VERSION:
        newer = isinstance(version, int) and version > CHECKPOINT_VERSION
        raise UserError(f"{path}: checkpoint version {version} is {'newer' if newer else 'older'} than this code "
                        f"reads ({CHECKPOINT_VERSION}); use the version of the code that wrote it"
                        + (" (update this checkout)" if newer else ""))
    return checkpoint


def build_from_checkpoint(path_or_checkpoint: str | dict[str, Any]) -> tuple[DualEncoder, dict[str, Any]]:
    """(model, checkpoint) rebuilt from the checkpoint alone, weights loaded, in eval mode."""
    checkpoint = load_checkpoint(path_or_checkpoint) if isinstance(path_or_checkpoint, str) else path_or_checkpoint
    record = checkpoint["model_record"]
    config = record["config"]
    # Checkpoints written before image_norm was recorded were all trained on ImageNet-normalised pixels.
    image_tower = ImageTower(config["image_encoder"], config.get("image_pool", "last"),
                             config.get("image_norm") or "imagenet", config.get("image_size"))
    text_tower = text_tower_from_stored(record["text_config"], record["tokenizer_files"], config.get("text_layers"))
    model = model_from_config(image_tower, text_tower, config)
    model.load_state_dict(checkpoint["model"])
    return model.eval(), checkpoint


def encoder_from_checkpoint(path: str, device: str | torch.device = "",
                            built: tuple[DualEncoder, dict[str, Any]] | None = None) -> Encoder:
    """A retrieval.encoders.Encoder for prepare_data.py --checkpoint / search.py: eval image transform,
    batched image and text embedding with the trained heads. built: the (model, checkpoint) that
    build_from_checkpoint(path) returned, when the caller needs the model too (the trainer's export)."""
    model, checkpoint = built or build_from_checkpoint(path)
    return encoder_from_model(model, checkpoint.get("tag", "dual-encoder"), env.pick_device(device), checkpoint=path)
