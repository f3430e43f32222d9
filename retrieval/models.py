"""Encoders that turn images and captions into embeddings: CLIP-family models from Hugging Face
`transformers`, or a dual encoder trained by train_dual_encoder.py (see retrieval/dual_encoder.py).

Every encoder is an `Encoder` record of plain functions, so prepare_data.py, search.py and the
trainer embed through the same code path.
"""
from dataclasses import dataclass
from typing import Callable


@dataclass
class Encoder:
    name: str                       # recorded as the hand-off file's `model` attribute
    dim: int                        # output embedding dimension
    image_transform: Callable       # PIL.Image -> float tensor [3, H, W]; runs in DataLoader workers
    embed_images: Callable          # tensor [B, 3, H, W] (already on device) -> tensor [B, dim]
    embed_texts: Callable           # list[str] -> tensor [B, dim] on device
    device: object = None
    checkpoint: str = None          # path of a dual-encoder checkpoint, when the encoder came from one
