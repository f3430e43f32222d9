"""One training run (one embedding dim, or one --head_ensemble member) before and between its epochs:
its names and paths, its model, its frozen-tower features, its optimizer and schedule, and its
checkpoints (--resume restores one exactly, RNG states included).

What changes while training (the model, the optimizer, the counters) lives in a `Run`; its settings
(retrieval/train_settings.py) are read and never written, and a member gets its own with its seed. The
device, the process rank and the seeds are passed as arguments.
"""
from __future__ import annotations

import dataclasses
import math
import os
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from retrieval import checkpoint, env
from retrieval.batches import captions_by_image, plan_epoch
from retrieval.data import DatasetSplit
from retrieval.distributed import barrier
from retrieval.dual_encoder import MODEL_KEYS, DualEncoder, build_model, set_frozen
from retrieval.encoders import autocast_dtype
from retrieval.errors import UserError
from retrieval.features import FeatureCache, image_tower_features, split_views, text_tower_features
from retrieval.optimization import make_optimizer, make_scheduler
from retrieval.train_settings import TrainSettings


def rng_states() -> dict[str, Any]:
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def set_rng_states(states: dict[str, Any]) -> None:
    random.setstate(states["python"])
    np.random.set_state(states["numpy"])
    torch.set_rng_state(states["torch"])
    if states.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


@dataclass
class Progress:
    """A run's counters, saved in its checkpoints under the same names and restored by --resume."""
    epoch: int = 0
    batch_in_epoch: int = 0
    step: int = 0
    epoch_loss: list = field(default_factory=lambda: [0.0, 0])   # [sum of the epoch's batch losses, batches]
    best_rsum: float = -1.0


@dataclass
class Run:
    """Everything one training run (one dim, or one ensemble member) changes or needs while it trains."""
    settings: TrainSettings
    dim: int
    label: str
    log_fields: dict
    run_dir: str
    best_path: str
    last_path: str
    # Set by build_run_model, cache_frozen_features and set_up, in that order.
    model: DualEncoder | None = None
    record: dict | None = None
    cache: dict | None = None
    optimizer: torch.optim.Optimizer | None = None
    scheduler: torch.optim.lr_scheduler.LambdaLR | None = None
    scaler: torch.amp.GradScaler | None = None
    amp_dtype: torch.dtype | None = None
    views: int = 1
    groups: list | None = None
    batches_per_epoch: int = 0
    progress: Progress = field(default_factory=Progress)
    losses: list = field(default_factory=list)

    @property
    def mode(self) -> str:
        settings = self.settings
        mode = {(True, True): "features", (True, False): "image-frozen", (False, True): "text-frozen",
                (False, False): "full"}[(settings.freeze_image, settings.freeze_text)]
        mode += f"+image-blocks{settings.train_image_blocks}" if settings.train_image_blocks else ""
        return mode + (f"+text-layers{settings.train_text_layers}" if settings.train_text_layers else "")


def new_run(settings: TrainSettings, dim: int, member: int | None = None) -> Run:
    """The Run's names and paths. member=k: member k of the --head_ensemble for `dim`, an ordinary run
    dim/K wide with seed + k in <run>/d<dim>/member<k>/ (its own batches, views and initial heads), and
    --matryoshka_dims d/K (its own nested loss; the joined model's first d dims are its first d/K)."""
    run_dir = os.path.join(settings.model_dir, settings.run_name)
    dim_dir = os.path.join(run_dir, f"d{dim}")
    label, log_fields = f"d{dim}", {"dim": dim}
    if member is not None:
        dim_dir = os.path.join(dim_dir, f"member{member}")
        label = f"d{dim} member {member + 1}/{settings.head_ensemble}"
        log_fields = {"dim": dim, "member": member}
        dim //= settings.head_ensemble
        member_nested = tuple(d // settings.head_ensemble for d in settings.matryoshka_dims or ()) or None
        settings = dataclasses.replace(settings, seed=settings.seed + member, head_ensemble=1,
                                       matryoshka_dims=member_nested)
    run = Run(settings, dim, label, log_fields, run_dir, os.path.join(dim_dir, "best.pt"),
              os.path.join(dim_dir, "last.pt"))
    if os.path.exists(run.last_path) and not (settings.resume or settings.overwrite):
        raise UserError(f"{run.last_path}: run exists; pass --resume to continue or --overwrite to start over")
    return run


def build_run_model(run: Run, feature_seed: int, member: int | None) -> None:
    """The model of a run. Ensemble members share the towers of the run's seed (random towers too, so
    the shared feature cache is theirs); only their heads start from seed + k."""
    settings = run.settings
    env.seed_everything(feature_seed)
    run.model = build_model(settings.model_config(run.dim))
    if member is not None:
        env.seed_everything(settings.seed)
        for layer in [*run.model.image_head.modules(), *run.model.text_head.modules()]:
            if isinstance(layer, nn.Linear):
                layer.reset_parameters()
    set_frozen(run.model.image_tower, settings.freeze_image)
    set_frozen(run.model.text_tower, settings.freeze_text)
    if settings.train_image_blocks:  # the last N blocks and the head conv train on cached block inputs
        for module in run.model.image_tower.trained_modules(settings.train_image_blocks):
            set_frozen(module, False)
    if settings.train_text_layers:   # the last N transformer layers train on cached layer inputs
        for module in run.model.text_tower.trained_modules(settings.train_text_layers):
            set_frozen(module, False)


def rank_zero_first(rank: int, world_size: int, compute: Callable[[], torch.Tensor]) -> torch.Tensor:
    """compute() on rank 0 first (it writes the cache), then on the others (they read its files)."""
    value = compute() if rank == 0 else None
    barrier(world_size)
    return value if rank == 0 else compute()


def cache_frozen_features(run: Run, splits: dict[str, DatasetSplit], features: FeatureCache, feature_seed: int,
                          rank: int, world_size: int) -> None:
    """Frozen towers: train and dev features once (rank 0 computes, the others then read the cache),
    and the feature standardisation set from train."""
    settings, run.cache = run.settings, {"train": {}, "dev": {}}
    for kind, frozen in (("image", settings.freeze_image), ("text", settings.freeze_text)):
        if not frozen:
            continue
        for split_name in ("train", "dev"):
            split = splits[split_name]
            views = settings.cache_views if split_name == "train" else split_views(settings.test_flip)
            compute = (lambda: features.image(run.model, split, views, feature_seed)) if kind == "image" \
                else (lambda: features.text(run.model, split))
            run.cache[split_name][kind] = rank_zero_first(rank, world_size, compute)
        train_rows = run.cache["train"][kind]
        if kind == "image":
            run.model.image_norm.set(initial_features(run.model, train_rows.flatten(0, 1), image_tower_features,
                                                      settings.train_image_blocks))
        else:
            run.model.text_norm.set(initial_features(run.model, train_rows, text_tower_features,
                                                     settings.train_text_layers))


def initial_features(model: DualEncoder, rows: torch.Tensor,
                     tower_features: Callable[[DualEncoder, torch.Tensor, int], torch.Tensor],
                     trained: int) -> torch.Tensor:
    """[rows, F] a tower's features of cached train rows (image: every view), as the model is now (with
    --train_image_blocks / --train_text_layers `trained`: the pretrained blocks / layers run once on the cached
    inputs through `tower_features`), to standardise them by. Trained blocks / layers change their features
    later; the standardisation stays that of the pretrained tower."""
    if not trained:
        return rows
    with torch.no_grad():
        model.eval()   # as the towers run in training (train_epoch sets the heads back to train mode)
        return torch.cat([tower_features(model, chunk, trained) for chunk in rows.split(1024)])


def set_up(run: Run, splits: dict[str, DatasetSplit], device: torch.device, world_size: int) -> None:
    """Optimizer, schedule and mixed precision of a run whose model is built."""
    settings = run.settings
    run.record = checkpoint.model_record(run.model, settings.model_config(run.dim))
    run.model.to(device)
    run.optimizer = make_optimizer(run.model, settings.lr, settings.head_lr, settings.text_lr,
                                   settings.weight_decay)
    run.groups = captions_by_image(splits["train"])
    run.views = settings.cache_views if settings.freeze_image else 1
    run.batches_per_epoch = len(plan_epoch(run.groups, settings.captions_per_image, settings.batch_size,
                                           world_size, settings.seed, 0, run.views))
    steps_per_epoch = math.ceil(run.batches_per_epoch / settings.grad_accum)
    run.scheduler = make_scheduler(run.optimizer, steps_per_epoch * settings.epochs, settings.warmup)
    run.amp_dtype = autocast_dtype(device, settings.amp, training=True)
    # Loss scaling only for fp16 (bf16 has fp32's range); a disabled scaler passes everything through.
    run.scaler = torch.amp.GradScaler("cuda", enabled=run.amp_dtype == torch.float16)


# Flags that change the loss or what trains but not the weights' shapes: a resume with other values would
# load and silently continue under another objective (or fail on the optimizer's groups), so restore refuses it.
LOSS_FLAGS = ("matryoshka_dims", "matryoshka_weights", "quantization_aware", "train_image_blocks",
              "train_text_layers")
# And the flags that shape the model (its towers, heads, inputs) or what of it trains: another value fails
# in load_state_dict or the optimizer's groups, or trains another model on these weights. embedding_dim is
# the run's folder (d<dim>), so it cannot differ; temperature is only the initial value of a learned one.
RESUME_FLAGS = (*(key for key in MODEL_KEYS if key not in ("embedding_dim", "temperature", *LOSS_FLAGS)),
                "freeze_image", "freeze_text", *LOSS_FLAGS)


def changed_flags(trained: dict[str, Any], given: dict[str, Any]) -> list[str]:
    """'--flag <trained>, not <given>' for every RESUME_FLAGS flag whose values differ (compared as
    recorded: lists, as argparse gives them). A flag the checkpoint predates is not compared."""
    changed = []
    for flag in RESUME_FLAGS:
        if flag in trained and (trained[flag] or None) != (given[flag] or None):
            changed.append(f"--{flag} {trained[flag] or '(not set)'}, not {given[flag] or '(not set)'}")
    return changed


def refuse_changed_flags(run: Run, trained: dict[str, Any]) -> None:
    """--resume: one UserError naming every flag whose value differs from the one last.pt was trained with."""
    changed = changed_flags(trained, run.settings.record())
    if changed:
        raise UserError(f"--resume: {run.last_path} was trained with {'; '.join(changed)}; give the same "
                        f"value{'s' if len(changed) > 1 else ''} or --overwrite")


def check_runs(settings: TrainSettings, rank: int) -> None:
    """Every refusal of the runs this command trains (each dim, each --head_ensemble member), before the
    first write: an existing run without --resume / --overwrite (new_run), a --resume with changed flags.
    A --resume of a dim (or member) with no last.pt yet says that it starts fresh."""
    for dim in settings.embedding_dim:
        for member in range(settings.head_ensemble) if settings.head_ensemble > 1 else [None]:
            run = new_run(settings, dim, member)
            if not settings.resume or settings.overwrite:
                continue
            if os.path.exists(run.last_path):
                refuse_changed_flags(run, checkpoint.load_checkpoint(run.last_path)["args"])
            elif rank == 0:
                print(f"note: --resume: {run.last_path} does not exist; {run.label} starts fresh", flush=True)


def restore(run: Run, rank: int) -> None:
    """--resume: continue from last.pt (validated by checkpoint.load_checkpoint) exactly where it stopped."""
    if not (run.settings.resume and os.path.exists(run.last_path)):
        return
    saved = checkpoint.load_checkpoint(run.last_path)
    refuse_changed_flags(run, saved["args"])
    run.model.load_state_dict(saved["model"])
    run.optimizer.load_state_dict(saved["optimizer"])
    run.scheduler.load_state_dict(saved["scheduler"])
    if run.scaler.is_enabled() and saved.get("scaler"):
        run.scaler.load_state_dict(saved["scaler"])
    run.progress = Progress(**{f.name: saved[f.name] for f in dataclasses.fields(Progress)})
    set_rng_states(saved["rng"])
    if rank == 0:
        progress = run.progress
        print(f"resumed {run.last_path}: epoch {progress.epoch} batch {progress.batch_in_epoch} "
              f"step {progress.step}", flush=True)


def save(run: Run, path: str) -> None:
    """last.pt / best.pt: the model and the whole training state (resume continues from it)."""
    checkpoint.write_checkpoint(path, run.model, run.record, run.settings.record(),
                                checkpoint.run_tag(run.settings.run_name, run.dim),
                                optimizer=run.optimizer.state_dict(), scheduler=run.scheduler.state_dict(),
                                scaler=run.scaler.state_dict() if run.scaler.is_enabled() else None,
                                **dataclasses.asdict(run.progress), rng=rng_states())
