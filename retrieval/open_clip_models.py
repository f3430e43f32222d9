"""open_clip models (`open_clip_torch`: LAION, DataComp, MetaCLIP, SigLIP checkpoints ...) as an Encoder.

`--model` forms (parse):

    open_clip:ARCH/TAG       a built-in architecture and a published tag, e.g. open_clip:ViT-B-32/laion2b_s34b_b79k
    open_clip:ARCH/FILE      a built-in architecture and a checkpoint file on disk
    open_clip:FOLDER         a folder with open_clip_config.json and its weights (the hub's layout; a bare FOLDER
                             with open_clip_config.json and no config.json is read the same way)
    open_clip:hf-hub:ORG/REPO  an open_clip repository on the Hugging Face hub

Weights for a tag come from the Hugging Face cache when they are there (then nothing touches the network), else
from the hub after the one hub check (retrieval/env.py); when neither can give them the load stops in seconds
with one line naming the offline alternatives (OFFLINE_HINT). Embedding goes through the shared loop and
autocast policy (retrieval/encoders.py), like the Hugging Face models (retrieval/hf_models.py).
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import Any

import torch

from retrieval import env
from retrieval.encoders import Encoder, autocast
from retrieval.errors import UserError

PREFIX = "open_clip:"
CONFIG = "open_clip_config.json"
OFFLINE_HINT = ("pass --model open_clip:ARCH/FILE (a checkpoint file on disk) or open_clip:FOLDER (open_clip_config.json "
                "+ its weights, as on the hub), or fill the cache first on a machine with network "
                "(prepare_data.py --fetch_only model)")


@dataclass(frozen=True)
class OpenClipSpec:
    """What open_clip.create_model_and_transforms gets: a model name (ARCH, 'local-dir:...' or 'hf-hub:...'),
    `pretrained` (a tag or a file; None for the schema forms) and the preprocessing of a tag's weights."""
    model_name: str
    pretrained: str | None = None
    options: tuple[tuple[str, Any], ...] = ()


def is_open_clip(model: str | None) -> bool:
    """True for an `open_clip:` name, or a folder holding open_clip_config.json and no Hugging Face config.json."""
    model = str(model or "")
    return model.startswith(PREFIX) or (os.path.isdir(model) and os.path.isfile(os.path.join(model, CONFIG))
                                        and not os.path.isfile(os.path.join(model, "config.json")))


def tag(model: str) -> str:
    """File-name tag: open_clip:ViT-B-32/laion2b_s34b_b79k -> ViT-B-32-laion2b_s34b_b79k; a checkpoint file or
    folder -> ARCH-<file stem> / the folder's name."""
    rest = model[len(PREFIX):] if model.startswith(PREFIX) else model
    rest = re.sub(r"^(hf-hub|local-dir):", "", rest)
    if os.path.isdir(rest):
        raw = os.path.basename(os.path.normpath(rest))
    else:
        arch, _, pretrained = rest.partition("/")
        raw = f"{arch}-{os.path.splitext(os.path.basename(pretrained))[0]}" if pretrained else arch
    return re.sub(r"[^A-Za-z0-9._-]+", "-", raw.replace("/", "-")).strip("-.") or "open_clip"


def _open_clip():
    try:
        import open_clip
    except ImportError:
        raise UserError("--model open_clip:...: the open_clip_torch package is not installed "
                        "(pip install -r requirements.txt)") from None
    return open_clip


def parse(model: str) -> OpenClipSpec:
    """The spec of an open_clip --model (the forms in the module docstring); a UserError for a name none fits."""
    open_clip = _open_clip()
    rest = model[len(PREFIX):] if model.startswith(PREFIX) else model
    if rest.startswith("hf-hub:"):
        return OpenClipSpec(rest)
    folder = rest[len("local-dir:"):] if rest.startswith("local-dir:") else rest
    if os.path.isdir(folder):
        if not os.path.isfile(os.path.join(folder, CONFIG)):
            raise UserError(f"--model {model}: {folder} has no {CONFIG} (an open_clip model folder holds it and "
                            "its weights)")
        return OpenClipSpec(f"local-dir:{folder}")
    arch, _, pretrained = rest.partition("/")
    if not arch or not pretrained:
        raise UserError(f"--model {model}: expected open_clip:ARCH/TAG (e.g. open_clip:ViT-B-32/laion2b_s34b_b79k), "
                        "open_clip:ARCH/FILE or open_clip:FOLDER")
    if arch not in open_clip.list_models():
        raise UserError(f"--model {model}: '{arch}' is not an open_clip architecture (open_clip.list_models())")
    if os.path.isfile(pretrained):
        return OpenClipSpec(arch, pretrained)
    if not open_clip.get_pretrained_cfg(arch, pretrained):
        tags = ", ".join(open_clip.list_pretrained_tags_by_model(arch)) or "none"
        raise UserError(f"--model {model}: '{pretrained}' is neither a file nor a tag of {arch} (tags: {tags})")
    return OpenClipSpec(arch, pretrained)


def _hub_file(repo: str, names: list[str]) -> str | None:
    """The cached path of the first of `names` in hub repo `repo`, or None."""
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return None
    for name in names:
        try:
            found = try_to_load_from_cache(repo, name)
        except Exception:   # a malformed repo id: not cached
            found = None
        if isinstance(found, str):
            return found
    return None


def _weight_names(filename: str) -> list[str]:
    """open_clip's own preference: the safetensors twin of a .bin / .pth first."""
    if filename == "open_clip_pytorch_model.bin":
        return ["open_clip_model.safetensors", filename]
    stem, ext = os.path.splitext(filename)
    return [stem + ".safetensors", filename] if ext in (".bin", ".pth") else [filename]


def _tag_source(arch: str, pretrained: str) -> tuple[str | None, bool]:
    """(cached weights file or None, can they be downloaded?) of a tag, as open_clip would fetch them (the hub
    when the tag names a hub file, else its URL)."""
    cfg = _open_clip().get_pretrained_cfg(arch, pretrained)
    if cfg.get("hf_hub"):   # 'org/repo/' (the default file) or 'org/repo/file'
        repo, filename = os.path.split(cfg["hf_hub"])
        return _hub_file(repo, _weight_names(filename or "open_clip_pytorch_model.bin")), env.hub_reachable()
    url = cfg.get("url", "")
    cached = os.path.join(os.path.expanduser("~/.cache/clip"), os.path.basename(url))
    host = re.sub(r"^https?://", "", url).split("/")[0]
    return (cached if url and os.path.isfile(cached) else None), bool(host) and env.reachable(host)


def resolve(model: str) -> OpenClipSpec:
    """The spec to load, the weights taken from the cache when they are there; a UserError naming the offline
    alternatives when they are neither cached nor downloadable (no library retries for minutes)."""
    spec = parse(model)
    offline = UserError(f"--model {model}: the weights are not in the local cache and cannot be downloaded (hub or "
                        f"URL unreachable, or HF_HUB_OFFLINE=1); {OFFLINE_HINT}")
    if spec.model_name.startswith("hf-hub:"):
        repo = spec.model_name[len("hf-hub:"):]
        config = _hub_file(repo, [CONFIG])
        if config and _hub_file(repo, _weight_names("open_clip_pytorch_model.bin")):
            return OpenClipSpec(f"local-dir:{os.path.dirname(config)}")
        if not env.hub_reachable():
            raise offline
        return spec
    if spec.pretrained is None or os.path.isfile(spec.pretrained):
        return spec
    cached, reachable = _tag_source(spec.model_name, spec.pretrained)
    if cached:   # a file path: open_clip then loads it without asking the network; the tag's preprocessing kept
        cfg = _open_clip().get_pretrained_cfg(spec.model_name, spec.pretrained)
        options = (("force_quick_gelu", bool(cfg.get("quick_gelu", False))), ("image_mean", cfg.get("mean")),
                   ("image_std", cfg.get("std")), ("image_interpolation", cfg.get("interpolation")),
                   ("image_resize_mode", cfg.get("resize_mode")))
        return OpenClipSpec(spec.model_name, cached, options)
    if not reachable:
        raise offline
    return spec


def load_network(model: str) -> tuple[torch.nn.Module, Any, Any]:
    """(model in eval mode, its eval image transform, its tokenizer) of an open_clip --model."""
    open_clip = _open_clip()
    spec = resolve(model)
    try:
        network, _, preprocess = open_clip.create_model_and_transforms(spec.model_name, pretrained=spec.pretrained,
                                                                       **dict(spec.options))
        tokenizer = open_clip.get_tokenizer(spec.model_name)
    except (OSError, RuntimeError, ValueError, KeyError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"--model {model}: cannot load ({first[:300]}); {OFFLINE_HINT}") from None
    return network.eval(), preprocess, tokenizer


def load_open_clip_encoder(model: str, device: str | torch.device = "") -> Encoder:
    """An Encoder for an open_clip model (encode_image / encode_text, under the one autocast policy)."""
    network, preprocess, tokenizer = load_network(model)
    device = env.pick_device(device)
    network = network.to(device)

    def embed_images(pixels):
        with torch.inference_mode(), autocast(device):
            return network.encode_image(pixels.to(device)).float()

    def embed_texts(captions):
        tokens = tokenizer(list(captions)).to(device)
        with torch.inference_mode(), autocast(device):
            return network.encode_text(tokens).float()

    with torch.inference_mode():
        dim = int(embed_texts(["a photo"]).shape[1])
    return Encoder(name=model, dim=dim, image_transform=preprocess, embed_images=embed_images,
                   embed_texts=embed_texts, device=device)
