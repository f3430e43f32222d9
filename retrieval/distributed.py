"""Data parallelism for the trainer (torchrun): process group, barriers, the all-gather that lets
negatives span every process, and gradient averaging done by hand.

Each process embeds its equal slice of every global batch (rank_slice); the loss sees the gathered
whole batch (gather_with_grad); after backward the gradients are averaged over the processes
(average_gradients). DistributedDataParallel is not used: its asynchronous bucket all-reduces
interleaved with the all-gather's backward collective on gloo and gave wrong gradients in
tests/test_train.py.
"""
from __future__ import annotations

import os

import torch
import torch.distributed as dist
import torch.nn as nn

from retrieval.batches import PlannedBatch


def init_distributed() -> tuple[int, int]:
    """(rank, world_size); initialises the process group under torchrun (gloo on CPU, nccl on CUDA)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1:
        return 0, 1
    if not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return dist.get_rank(), world_size


def barrier(world_size: int) -> None:
    if world_size > 1:
        dist.barrier()


def broadcast_from_first(model: nn.Module, world_size: int) -> None:
    """Every process starts from rank 0's weights (as DDP would broadcast them)."""
    if world_size > 1:
        for tensor in list(model.parameters()) + list(model.buffers()):
            dist.broadcast(tensor.data, 0)


def rank_slice(batch: PlannedBatch, rank: int, world_size: int, captions_per_image: int) -> PlannedBatch:
    """This process's equal share of a planned global batch."""
    per = len(batch.images) // world_size
    lo, hi = rank * per, (rank + 1) * per
    k = captions_per_image
    return PlannedBatch(batch.images[lo:hi], batch.captions[lo * k:hi * k], batch.views[lo:hi], batch.seeds[lo:hi])


class _GatherWithGrad(torch.autograd.Function):
    """all_gather whose backward sums every rank's gradient for this rank's slice (works on gloo,
    which lacks reduce_scatter): negatives then span all ranks and gradients stay exact."""

    @staticmethod
    def forward(ctx, tensor):
        ctx.rank, ctx.rows = dist.get_rank(), tensor.shape[0]
        parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, tensor.contiguous())
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous().clone()
        dist.all_reduce(grad)
        return grad[ctx.rank * ctx.rows:(ctx.rank + 1) * ctx.rows]


def gather_with_grad(tensor: torch.Tensor) -> torch.Tensor:
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return tensor
    return _GatherWithGrad.apply(tensor)


def average_gradients(model: nn.Module, world_size: int) -> None:
    """Average every gradient over the processes after backward (see the module docstring)."""
    if world_size == 1:
        return
    for p in model.parameters():
        if p.grad is not None:
            dist.all_reduce(p.grad)
            p.grad.div_(world_size)
