"""Training one embedding dim of the dual encoder: its epochs (the steps, then the end of an epoch:
evaluate on dev, save, log), over a Run set up by retrieval/training_run.py.

Reproducibility: an epoch's batches, views and crops are a pure function of (seed, epoch, image)
(retrieval/batches.py), and last.pt holds the RNG states, so --resume continues bit-for-bit on CPU, also
mid-epoch (tests/test_train.py).
"""
from __future__ import annotations

import math
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn
from tqdm import tqdm

from retrieval import io, metrics
from retrieval.batches import PlannedBatch, plan_epoch
from retrieval.data import DatasetSplit
from retrieval.dev_evaluation import dev_embeddings, dev_results, selection_rsum
from retrieval.distributed import average_gradients, barrier, broadcast_from_first, gather_with_grad, rank_slice
from retrieval.dual_encoder import DualEncoder, nested_loss
from retrieval.encoders import ImageFiles, autocast, image_loader, raise_unreadable
from retrieval.errors import UserError
from retrieval.features import image_tower_features, text_tower_features
from retrieval.towers import image_transforms
from retrieval.train_settings import TrainSettings
from retrieval.training_run import (Progress, Run, build_run_model, cache_frozen_features, new_run, restore,
                                    rng_states, save, set_rng_states, set_up)


class EmbedStep(nn.Module):
    """One forward for a training step: cached features (frozen tower; with image_blocks / text_layers cached
    block / layer inputs through the trained blocks / layers) or raw inputs -> both embeddings."""

    def __init__(self, model: DualEncoder, image_frozen: bool, text_frozen: bool, image_blocks: int = 0,
                 text_layers: int = 0) -> None:
        super().__init__()
        self.model, self.image_frozen, self.text_frozen = model, image_frozen, text_frozen
        self.image_blocks, self.text_layers = image_blocks, text_layers

    def forward(self, image_input: torch.Tensor, input_ids: torch.Tensor | None, attention_mask: torch.Tensor | None,
                text_input: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        m = self.model
        image_feats = image_tower_features(m, image_input, self.image_blocks) if self.image_frozen \
            else m.image_tower(image_input)
        text_feats = text_tower_features(m, text_input, self.text_layers) if self.text_frozen \
            else m.text_tower(input_ids, attention_mask)
        return m.project_images(image_feats), m.project_texts(text_feats), m.logit_scale()


# ----------------------------------------------------------------------------- one epoch

@dataclass(frozen=True)
class EpochPass:
    """What train_epoch did: samples seen, seconds, whether --max_steps stopped it, batches in the epoch."""
    samples: int
    seconds: float
    stopped: bool
    batches: int


def step_inputs(run: Run, batch: PlannedBatch, train: DatasetSplit, pixel_batches: Iterator | None,
                pixel_files: ImageFiles | None, device: torch.device) -> tuple[torch.Tensor | None, ...]:
    """The inputs of one step: cached features of a frozen tower, pixels / tokens of a trained one."""
    if run.settings.freeze_image:
        image_input = run.cache["train"]["image"][torch.as_tensor(batch.views),
                                                  torch.as_tensor(batch.images)].to(device)
    else:
        _, pixels, errors = next(pixel_batches)
        raise_unreadable(pixel_files, errors)
        image_input = pixels.to(device, non_blocking=True)
    if run.settings.freeze_text:
        return image_input, None, None, run.cache["train"]["text"][torch.as_tensor(batch.captions)].to(device)
    tokens = run.model.text_tower.tokenize([train.captions[c] for c in batch.captions])
    return image_input, tokens["input_ids"].to(device), tokens["attention_mask"].to(device), None


def pixel_batches(run: Run, local: list[PlannedBatch], train: DatasetSplit,
                  device: torch.device) -> tuple[Iterator | None, ImageFiles | None]:
    """Augmented train pixels for the planned batches (trained image tower only), decoded in workers."""
    if run.settings.freeze_image:
        return None, None
    tower = run.model.image_tower
    files = ImageFiles(train.image_root, train.image_files, image_transforms(False, tower.input_norm, tower.image_size),
                       image_transforms(True, tower.input_norm, tower.image_size))
    sampler = [[(int(i), int(s)) for i, s in zip(b.images, b.seeds)] for b in local]
    # Its own generator: creating an iterator must not consume the global RNG (dropout draws from it),
    # or a resumed run would diverge from an uninterrupted one. Augmentation is seeded per item anyway.
    loader = image_loader(files, num_workers=run.settings.num_workers, device=device, batch_sampler=sampler,
                          generator=torch.Generator().manual_seed(0))
    return iter(loader), files


def optimizer_step(run: Run, world_size: int) -> None:
    run.scaler.unscale_(run.optimizer)
    average_gradients(run.model, world_size)
    run.scaler.step(run.optimizer)
    run.scaler.update()
    run.optimizer.zero_grad(set_to_none=True)
    run.scheduler.step()
    run.progress.step += 1


def set_train_mode(run: Run) -> None:
    """Dropout on; a frozen tower stays in eval mode (its BatchNorm statistics stay as trained)."""
    run.model.train()
    if run.settings.freeze_image:
        run.model.image_tower.eval()
    if run.settings.freeze_text:
        run.model.text_tower.eval()


def train_epoch(run: Run, step_module: EmbedStep, train: DatasetSplit, device: torch.device, rank: int,
                world_size: int) -> EpochPass:
    """The rest of the current epoch (from batch_in_epoch on)."""
    settings, progress = run.settings, run.progress
    plan = plan_epoch(run.groups, settings.captions_per_image, settings.batch_size, world_size, settings.seed,
                      progress.epoch, run.views)
    # Rank r embeds its equal slice of every global batch; the loss sees the gathered whole batch.
    local = [rank_slice(b, rank, world_size, settings.captions_per_image) for b in plan[progress.batch_in_epoch:]]
    batches, files = pixel_batches(run, local, train, device)
    set_train_mode(run)
    start, samples = time.time(), 0
    bar = tqdm(local, desc=f"{run.label} epoch {progress.epoch + 1}/{settings.epochs}", leave=False,
               disable=rank != 0)
    for batch in bar:
        inputs = step_inputs(run, batch, train, batches, files, device)
        with autocast(device, settings.amp, training=True):
            image_emb, text_emb, scale = step_module(*inputs)
        image_all, text_all = gather_with_grad(image_emb), gather_with_grad(text_emb)
        text_to_image = torch.arange(image_all.shape[0], device=device).repeat_interleave(settings.captions_per_image)
        loss = nested_loss(image_all, text_all, text_to_image, scale, run.model.nested_dims,
                           settings.matryoshka_weights, settings.quantization_aware)
        require_finite(loss.item(), run, progress)
        run.scaler.scale(loss / settings.grad_accum).backward()
        progress.batch_in_epoch += 1
        progress.epoch_loss[0] += loss.item()
        progress.epoch_loss[1] += 1
        samples += text_all.shape[0]
        run.losses.append(loss.item())
        if progress.batch_in_epoch % settings.grad_accum == 0 or progress.batch_in_epoch == len(plan):
            optimizer_step(run, world_size)
            bar.set_postfix(loss=f"{loss.item():.3f}", T=f"{run.model.temperature:.3f}")
            if settings.max_steps and progress.step >= settings.max_steps:
                return EpochPass(samples, time.time() - start, True, len(plan))
    return EpochPass(samples, time.time() - start, False, len(plan))


def require_finite(loss: float, run: Run, progress: Progress) -> None:
    """Stop on a NaN / infinite loss: later steps would only spread it into every weight (and the log
    and checkpoints would hold NaN); what was written before stays as it was."""
    if not math.isfinite(loss):
        raise UserError(f"{run.run_dir}: training diverged: the loss is {loss} at step {progress.step + 1} "
                        f"(epoch {progress.epoch + 1}); lower --lr / --head_lr, or try --amp off")


# ----------------------------------------------------------------------------- end of an epoch

def epoch_record(run: Run, done: EpochPass) -> dict[str, Any]:
    """The log line of the epoch so far (its counters as they stand)."""
    progress = run.progress
    return {**run.log_fields, "epoch": progress.epoch + 1, "step": progress.step, "mode": run.mode,
            "loss": progress.epoch_loss[0] / max(1, progress.epoch_loss[1]),
            "temperature": run.model.temperature, "samples_per_s": done.samples / max(done.seconds, 1e-9),
            "epoch_seconds": done.seconds, "lr": run.scheduler.get_last_lr()[0]}


def close_epoch(run: Run, done: EpochPass) -> dict[str, Any]:
    """The epoch's log line (before its counters are reset), then advance to the next epoch."""
    record = epoch_record(run, done)
    progress = run.progress
    progress.epoch, progress.batch_in_epoch, progress.epoch_loss = progress.epoch + 1, 0, [0.0, 0]
    return record


def partial_epoch(run: Run, done: EpochPass) -> dict[str, Any]:
    """--max_steps stopped the epoch part-way: its log line, marked partial with the batches done. The
    counters stay, so --resume finishes the same epoch."""
    return {**epoch_record(run, done), "partial_epoch": True,
            "batches_done": run.progress.batch_in_epoch, "batches_in_epoch": done.batches}


def evaluate_dev(run: Run, dev_split: DatasetSplit, device: torch.device) -> dict[str, Any]:
    """Dev results of the model now (dev_results). The RNG states are put back after: building the
    evaluation's loader draws from the global RNG, and an evaluation (e.g. at a --max_steps stop) must
    not change the dropout of the steps after it, or a resumed run would diverge from an uninterrupted one."""
    states, settings = rng_states(), run.settings
    embedded = dev_embeddings(run.model, dev_split, device, run.cache["dev"], settings.batch_size_eval,
                              settings.num_workers, settings.train_image_blocks, settings.train_text_layers)
    set_rng_states(states)
    return dev_results(embedded, run.model.nested_dims)


def end_of_epoch(run: Run, record: dict[str, Any], dev_split: DatasetSplit, device: torch.device,
                 stopped: bool) -> None:
    """Rank 0, after an epoch or a --max_steps stop: evaluate on dev, keep best.pt (the best
    selection_rsum) and last.pt, append the log line (every evaluation has one)."""
    settings, progress = run.settings, run.progress
    results = evaluate_dev(run, dev_split, device)
    record.update(results)
    dev = results["dev"]
    score = selection_rsum(results)
    improved = score > progress.best_rsum
    if improved:
        progress.best_rsum = score
        save(run, run.best_path)
    if stopped or progress.epoch % settings.save_every == 0 or progress.epoch == settings.epochs:
        save(run, run.last_path)
    io.append_jsonl(os.path.join(run.run_dir, "log.jsonl"), record)
    partial = f" (partial: {record['batches_done']}/{record['batches_in_epoch']} batches)" \
        if record.get("partial_epoch") else ""
    nested = f" | nested mean RSUM {results['dev_nested_mean_rsum']:.1f}" if "dev_nested" in results else ""
    print(f"[{run.label}] epoch {record['epoch']}{partial} loss {record['loss']:.4f} T {run.model.temperature:.4f} "
          f"{record['samples_per_s']:.0f} samples/s | dev {metrics.format_metrics(dev)}{nested}"
          f"{' *best*' if improved else ''}", flush=True)


# ----------------------------------------------------------------------------- one dim

def prepared_run(settings: TrainSettings, dim: int, splits: dict[str, DatasetSplit], device: torch.device,
                 rank: int, world_size: int, member: int | None) -> Run:
    """A run ready for its next epoch: built, its frozen features cached, set up, restored on --resume,
    every process on rank 0's weights."""
    run = new_run(settings, dim, member)
    build_run_model(run, settings.seed, member)
    cache_frozen_features(run, splits, settings.feature_cache(device), settings.seed, rank, world_size)
    set_up(run, splits, device, world_size)
    restore(run, rank)
    broadcast_from_first(run.model, world_size)
    return run


def train_one_dim(settings: TrainSettings, dim: int, splits: dict[str, DatasetSplit], device: torch.device,
                  rank: int, world_size: int, member: int | None = None) -> dict[str, Any]:
    """Train (or resume) one embedding dim (or one --head_ensemble member). Returns the paths of its
    best and last checkpoints, the loss of every batch and the model."""
    run = prepared_run(settings, dim, splits, device, rank, world_size, member)
    step_module = EmbedStep(run.model, run.settings.freeze_image, run.settings.freeze_text,
                            run.settings.train_image_blocks, run.settings.train_text_layers)
    if rank == 0:
        trainable = sum(p.numel() for p in run.model.parameters() if p.requires_grad)
        print(f"[{run.label}] mode {run.mode}: {trainable:,} trainable parameters, "
              f"{run.batches_per_epoch} batches/epoch x {run.settings.epochs} epochs", flush=True)
    stopped = False
    while run.progress.epoch < run.settings.epochs and not stopped:
        done = train_epoch(run, step_module, splits["train"], device, rank, world_size)
        stopped = done.stopped
        # only --max_steps ends an epoch early
        record = close_epoch(run, done) if run.progress.batch_in_epoch >= done.batches else partial_epoch(run, done)
        if rank == 0:
            end_of_epoch(run, record, splits["dev"], device, stopped)
        barrier(world_size)
    return {"best": run.best_path, "last": run.last_path, "losses": run.losses, "model": run.model}
