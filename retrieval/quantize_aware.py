"""Straight-through quantizers for quantization-aware training (train_dual_encoder.py --quantization_aware).

Each takes a batch of unit embeddings at one dim [N, d] (one modality) and returns, in the forward,
exactly the vectors the sweep's index compares for that precision (retrieval/indexes.py), while the
backward passes the gradient through as if nothing had been rounded (straight-through estimator,
Bengio et al. 2013): rounding has a zero gradient almost everywhere, which would teach nothing.

    binary  sign(x R_d) / sqrt(d): reduction.binary_signs (R_d = reduction.binary_rotation(d)) at unit
            length. The straight-through acts on the rotated vector x R_d, which is differentiable;
            R_d is orthogonal, so inner products (all InfoNCE sees) are those of the index, and the
            gradient reaches x rotated back by R_d^T.
    int4    FAISS IndexScalarQuantizer QT_4bit decode(encode(x)), per-dimension [min, max] ranges.
            The index learns its ranges on the fit vectors; training takes the batch's (detached).
"""
from __future__ import annotations

import functools

import torch

from retrieval.reduction import binary_rotation

# FAISS QT_4bit: 16 levels; a value at fraction u of its range gets code floor(15 u) and decodes to
# the middle of that cell, (code + 0.5) / 15 of the range (faiss ScalarQuantizer Codec4bit).
INT4_STEPS = 15


def straight_through(x: torch.Tensor, quantized: torch.Tensor) -> torch.Tensor:
    """`quantized` in the forward, the identity in the backward."""
    return x + (quantized - x).detach()


@functools.lru_cache(maxsize=None)
def _rotation(dim, device):
    """reduction.binary_rotation(dim) as a tensor on `device`, built once per dim and device."""
    return torch.from_numpy(binary_rotation(dim)).to(device)


def binary(x: torch.Tensor) -> torch.Tensor:
    """The sign-bit vectors of the `binary` precision, at unit length (see the module docstring)."""
    dim = x.shape[-1]
    rotated = x.float() @ _rotation(dim, x.device)
    signs = torch.where(rotated > 0, 1.0, -1.0) / dim ** 0.5
    return straight_through(rotated, signs)


def int4_decode(x: torch.Tensor, low: torch.Tensor, high: torch.Tensor) -> torch.Tensor:
    """FAISS QT_4bit decode(encode(x)) with per-dimension ranges [low, high] (float32 [d] each)."""
    span = high - low
    # A dimension with no range (all values equal) encodes as 0, as FAISS does (it skips vdiff == 0).
    unit = torch.where(span != 0, (x - low) / torch.where(span != 0, span, 1.0), 0.0).clamp(0.0, 1.0)
    return low + (int4_codes(unit) + 0.5) / INT4_STEPS * span


def int4_codes(unit: torch.Tensor) -> torch.Tensor:
    """FAISS's code of a fraction `unit` of the range: (int)(u * 15.0), a truncation of a product taken
    in double precision (exact for a float32 u). In float32 a product just under a whole number could
    round up to it and pick the next code. MPS has no float64: there the codes are computed on the CPU."""
    exact = unit.double() if unit.device.type != "mps" else unit.cpu().double()
    return torch.floor(exact * INT4_STEPS).float().to(unit.device)


def int4(x: torch.Tensor) -> torch.Tensor:
    """The decoded `int4` vectors with the batch's per-dimension ranges (not renormalised)."""
    x = x.float()
    ranges = x.detach()
    return straight_through(x, int4_decode(ranges, ranges.amin(0), ranges.amax(0)))


QUANTIZERS = {"binary": binary, "int4": int4}
