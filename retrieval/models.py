"""The one entry point that gives an Encoder for a CLIP-family model from Hugging Face
(retrieval/hf_models.py), an open_clip model (`open_clip:...`, retrieval/open_clip_models.py) or a trained
dual-encoder checkpoint (retrieval/checkpoint.py), and the file-name tag of each.

The Encoder record, the autocast policy and the embedding loop are in retrieval/encoders.py.
"""
from __future__ import annotations

import os
import re

import torch

from retrieval.checkpoint import encoder_from_checkpoint
from retrieval.encoders import Encoder
from retrieval.hf_models import DEFAULT_MODEL, load_hf_encoder
from retrieval.open_clip_models import is_open_clip, load_open_clip_encoder
from retrieval.open_clip_models import tag as open_clip_tag


# Folders train_dual_encoder.py puts inside a run folder (<run>/d<dim>/[member<k>/]best.pt): they name the
# dim and member, not the run, so model_tag climbs past them to the run folder.
_RUN_SUBFOLDER = re.compile(r"d\d+|member\d+")


def model_tag(model: str = DEFAULT_MODEL, checkpoint: str | None = None) -> str:
    """File-name-safe short name: 'openai/clip-vit-base-patch32' -> 'clip-vit-base-patch32'.

    A checkpoint 'checkpoints/run1/best.pt' -> 'run1-best' (the folder names the training run); the
    trainer's own layout 'checkpoints/r1/d32/best.pt' -> 'r1-d32-best', so two runs with one dim never
    share an export name.
    """
    if checkpoint:
        parts = [os.path.splitext(os.path.basename(os.path.normpath(checkpoint)))[0]]
        folder = os.path.dirname(os.path.abspath(checkpoint))
        while os.path.basename(folder) and os.path.basename(folder) not in ("checkpoints", "."):
            parts.insert(0, os.path.basename(folder))
            if not _RUN_SUBFOLDER.fullmatch(parts[0]):
                break
            folder = os.path.dirname(folder)
        raw = "-".join(parts)
    elif is_open_clip(model):
        return open_clip_tag(str(model))
    else:
        raw = os.path.basename(os.path.normpath(str(model))) or str(model)
    tag = re.sub(r"[^A-Za-z0-9._-]+", "-", raw).strip("-.")
    return tag or "model"


def load_encoder(model: str | None = DEFAULT_MODEL, checkpoint: str | None = None,
                 device: str | torch.device = "") -> Encoder:
    """An Encoder for a trained checkpoint when one is given, else for a CLIP-family model (hub id or
    local folder). Fails fast with one clear UserError when the model is neither local, cached nor
    downloadable."""
    if checkpoint:
        return encoder_from_checkpoint(checkpoint, device)
    if is_open_clip(model):
        return load_open_clip_encoder(str(model), device)
    return load_hf_encoder(model, device)
