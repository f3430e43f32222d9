"""Training one embedding dim of the dual encoder: batch planning, set-up, restore, one epoch, and the
end of an epoch (evaluate on dev, save, log).

`config` below is the trainer's parsed arguments (train_dual_encoder.py), read and never written; a
head-ensemble member gets its own copy with its seed. What changes while training (the model, the
optimizer, the counters) lives in a `Run`; the device, the process rank and the seeds are passed as
arguments.

Reproducibility: an epoch's batches, views and crops are a pure function of (seed, epoch, image)
(`plan_epoch`), and last.pt holds the RNG states, so --resume continues bit-for-bit on CPU, also
mid-epoch (tests/test_train.py).
"""
import argparse
import math
import os
import random
import time
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn as nn
from tqdm import tqdm

from retrieval import checkpoint, data, env, io, metrics
from retrieval.distributed import (average_gradients, barrier, broadcast_from_first, gather_with_grad,
                                   rank_slice)
from retrieval.dual_encoder import build_model, encoder_from_model, nested_loss, set_frozen
from retrieval.encoders import ImageFiles, autocast, autocast_dtype, embed_split, image_loader, raise_unreadable
from retrieval.errors import UserError
from retrieval.features import (FeatureCache, image_tower_features, project_features, split_views,
                                text_tower_features)
from retrieval.towers import image_transforms


def load_split(config, split):
    """One split of the training data set (the folder must exist: the trainer never generates data)."""
    data.require_folder(config.dataset, config.data_dir)
    return data.load_split(config.dataset, config.data_dir, split, config.seed)


def feature_cache(config, device):
    return FeatureCache(os.path.join(config.model_dir, "feature_cache"), device, config.batch_size_eval,
                        config.num_workers, config.amp,
                        (config.image_encoder, config.image_weights, config.image_pool),
                        (config.text_encoder, config.text_weights, config.text_layers),
                        config.train_image_blocks, config.train_text_layers)


# ----------------------------------------------------------------------------- batches

def captions_by_image(split):
    groups = [[] for _ in split.image_files]
    for caption, image in enumerate(split.text_to_image):
        groups[image].append(caption)
    return groups


def plan_epoch(groups, captions_per_image, batch_size, world_size, seed, epoch, views):
    """The epoch's batches, a pure function of (seed, epoch): resuming replays it exactly.

    Each round shuffles the images and gives each one its next `captions_per_image` captions, so an
    epoch uses every caption once and no image appears twice in a batch. Returns a list of
    (image rows, caption rows [images * k], view per image, augmentation seed per image).
    """
    rng = np.random.default_rng([seed, epoch])
    k = captions_per_image
    shuffled = [rng.permutation(g) for g in groups]
    rounds = max(1, math.ceil(max(len(g) for g in groups) / k))
    batches = []
    for r in range(rounds):
        order = rng.permutation(len(groups))
        usable = batch_size - batch_size % world_size
        for start in range(0, len(order), batch_size):
            images = order[start:start + usable]
            images = images[:len(images) - len(images) % world_size]
            if len(images) < 2:
                continue
            captions = np.array([shuffled[i][(r * k + j) % len(shuffled[i])] for i in images for j in range(k)])
            batches.append((images, captions, rng.integers(0, views, len(images)),
                            rng.integers(0, 2 ** 31, len(images))))
    return batches


# ----------------------------------------------------------------------------- optimisation

class EmbedStep(nn.Module):
    """One forward for a training step: cached features (frozen tower; with image_blocks / text_layers cached
    block / layer inputs through the trained blocks / layers) or raw inputs -> both embeddings."""

    def __init__(self, model, image_frozen, text_frozen, image_blocks=0, text_layers=0):
        super().__init__()
        self.model, self.image_frozen, self.text_frozen = model, image_frozen, text_frozen
        self.image_blocks, self.text_layers = image_blocks, text_layers

    def forward(self, image_input, input_ids, attention_mask, text_input):
        m = self.model
        image_feats = image_tower_features(m, image_input, self.image_blocks) if self.image_frozen \
            else m.image_tower(image_input)
        text_feats = text_tower_features(m, text_input, self.text_layers) if self.text_frozen \
            else m.text_tower(input_ids, attention_mask)
        return m.project_images(image_feats), m.project_texts(text_feats), m.logit_scale()


def make_optimizer(model, config):
    """AdamW over what trains: the heads and the temperature at --head_lr, the image tower at --lr, the text
    tower at --text_lr (default --lr: a pretrained transformer layer wants a smaller step than a CNN block;
    MiniLM's last layer collapsed at the bench's 3e-4). Matrices decay; biases, norms and the temperature
    do not (decaying them only hurts)."""
    heads, towers, no_decay, text, text_no_decay = [], [], [], [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if name.startswith("text_tower."):
            (text if p.ndim >= 2 else text_no_decay).append(p)
        elif p.ndim < 2:
            no_decay.append(p)
        elif name.startswith(("image_head", "text_head")):
            heads.append(p)
        else:
            towers.append(p)
    groups = [{"params": heads, "lr": config.head_lr, "weight_decay": config.weight_decay},
              {"params": towers, "lr": config.lr, "weight_decay": config.weight_decay},
              {"params": no_decay, "lr": config.head_lr, "weight_decay": 0.0},
              {"params": text, "lr": config.text_lr, "weight_decay": config.weight_decay},
              {"params": text_no_decay, "lr": config.text_lr, "weight_decay": 0.0}]
    return torch.optim.AdamW([g for g in groups if g["params"]])


def make_scheduler(optimizer, total_steps, warmup_fraction):
    """Linear warm-up over `warmup_fraction` of the steps, then cosine decay to 0."""
    warmup = max(1, int(warmup_fraction * total_steps))

    def factor(step):
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total_steps - warmup))))
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def rng_states():
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def set_rng_states(states):
    random.setstate(states["python"])
    np.random.set_state(states["numpy"])
    torch.set_rng_state(states["torch"])
    if states.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


# ----------------------------------------------------------------------------- one run

@dataclass
class Run:
    """Everything one training run (one dim, or one ensemble member) changes or needs while it trains."""
    config: argparse.Namespace
    dim: int
    label: str
    log_fields: dict
    run_dir: str
    best_path: str
    last_path: str
    model: nn.Module = None
    record: dict = None
    cache: dict = None
    optimizer: object = None
    scheduler: object = None
    scaler: object = None
    amp_dtype: object = None
    views: int = 1
    groups: list = None
    batches_per_epoch: int = 0
    state: dict = field(default_factory=lambda: {"epoch": 0, "batch_in_epoch": 0, "step": 0,
                                                 "epoch_loss": [0.0, 0], "best_rsum": -1.0})
    losses: list = field(default_factory=list)

    @property
    def mode(self):
        config = self.config
        mode = {(True, True): "features", (True, False): "image-frozen", (False, True): "text-frozen",
                (False, False): "full"}[(config.freeze_image, config.freeze_text)]
        mode += f"+image-blocks{config.train_image_blocks}" if config.train_image_blocks else ""
        return mode + (f"+text-layers{config.train_text_layers}" if config.train_text_layers else "")


def new_run(config, dim, member=None):
    """The Run's names and paths. member=k: member k of the --head_ensemble for `dim`, an ordinary run
    dim/K wide with seed + k in <run>/d<dim>/member<k>/ (its own batches, views and initial heads), and
    --matryoshka_dims d/K (its own nested loss; the joined model's first d dims are its first d/K)."""
    run_dir = os.path.join(config.model_dir, config.run_name)
    dim_dir = os.path.join(run_dir, f"d{dim}")
    label, log_fields = f"d{dim}", {"dim": dim}
    if member is not None:
        dim_dir = os.path.join(dim_dir, f"member{member}")
        label = f"d{dim} member {member + 1}/{config.head_ensemble}"
        log_fields = {"dim": dim, "member": member}
        dim //= config.head_ensemble
        member_nested = [d // config.head_ensemble for d in config.matryoshka_dims or ()] or None
        config = argparse.Namespace(**{**vars(config), "seed": config.seed + member, "head_ensemble": 1,
                                       "matryoshka_dims": member_nested})
    run = Run(config, dim, label, log_fields, run_dir, os.path.join(dim_dir, "best.pt"),
              os.path.join(dim_dir, "last.pt"))
    if os.path.exists(run.last_path) and not (config.resume or config.overwrite):
        raise UserError(f"{run.last_path}: run exists; pass --resume to continue or --overwrite to start over")
    return run


def build_run_model(run, feature_seed, member):
    """The model of a run. Ensemble members share the towers of the run's seed (random towers too, so
    the shared feature cache is theirs); only their heads start from seed + k."""
    env.seed_everything(feature_seed)
    run.model = build_model(dict(vars(run.config), embedding_dim=run.dim))
    if member is not None:
        env.seed_everything(run.config.seed)
        for layer in [*run.model.image_head.modules(), *run.model.text_head.modules()]:
            if isinstance(layer, nn.Linear):
                layer.reset_parameters()
    set_frozen(run.model.image_tower, run.config.freeze_image)
    set_frozen(run.model.text_tower, run.config.freeze_text)
    if run.config.train_image_blocks:  # the last N blocks and the head conv train on cached block inputs
        for module in run.model.image_tower.trained_modules(run.config.train_image_blocks):
            set_frozen(module, False)
    if run.config.train_text_layers:   # the last N transformer layers train on cached layer inputs
        for module in run.model.text_tower.trained_modules(run.config.train_text_layers):
            set_frozen(module, False)


def rank_zero_first(rank, world_size, compute):
    """compute() on rank 0 first (it writes the cache), then on the others (they read its files)."""
    value = compute() if rank == 0 else None
    barrier(world_size)
    return value if rank == 0 else compute()


def cache_frozen_features(run, splits, features, feature_seed, rank, world_size):
    """Frozen towers: train and dev features once (rank 0 computes, the others then read the cache),
    and the feature standardisation set from train."""
    config, run.cache = run.config, {"train": {}, "dev": {}}
    for kind, frozen in (("image", config.freeze_image), ("text", config.freeze_text)):
        if not frozen:
            continue
        for split_name in ("train", "dev"):
            split = splits[split_name]
            views = config.cache_views if split_name == "train" else split_views(config.test_flip)
            compute = (lambda: features.image(run.model, split, views, feature_seed)) if kind == "image" \
                else (lambda: features.text(run.model, split))
            run.cache[split_name][kind] = rank_zero_first(rank, world_size, compute)
        train_rows = run.cache["train"][kind]
        if kind == "image":
            run.model.image_norm.set(initial_features(run.model, train_rows.flatten(0, 1), image_tower_features,
                                                      config.train_image_blocks))
        else:
            run.model.text_norm.set(initial_features(run.model, train_rows, text_tower_features,
                                                     config.train_text_layers))


def initial_features(model, rows, tower_features, trained):
    """[rows, F] a tower's features of cached train rows (image: every view), as the model is now (with
    --train_image_blocks / --train_text_layers `trained`: the pretrained blocks / layers run once on the cached
    inputs through `tower_features`), to standardise them by. Trained blocks / layers change their features
    later; the standardisation stays that of the pretrained tower."""
    if not trained:
        return rows
    with torch.no_grad():
        model.eval()   # as the towers run in training (train_epoch sets the heads back to train mode)
        return torch.cat([tower_features(model, chunk, trained) for chunk in rows.split(1024)])


def set_up(run, splits, device, world_size):
    """Optimizer, schedule and mixed precision of a run whose model is built."""
    config = run.config
    run.record = checkpoint.model_record(run.model, dict(vars(config), embedding_dim=run.dim))
    run.model.to(device)
    run.optimizer = make_optimizer(run.model, config)
    run.groups = captions_by_image(splits["train"])
    run.views = config.cache_views if config.freeze_image else 1
    run.batches_per_epoch = len(plan_epoch(run.groups, config.captions_per_image, config.batch_size, world_size,
                                           config.seed, 0, run.views))
    steps_per_epoch = math.ceil(run.batches_per_epoch / config.grad_accum)
    run.scheduler = make_scheduler(run.optimizer, steps_per_epoch * config.epochs, config.warmup)
    run.amp_dtype = autocast_dtype(device, config.amp, training=True)
    # Loss scaling only for fp16 (bf16 has fp32's range); a disabled scaler passes everything through.
    run.scaler = torch.amp.GradScaler("cuda", enabled=run.amp_dtype == torch.float16)


# Flags that change the loss or what trains but not the weights' shapes: a resume with other values would
# load and silently continue under another objective (or fail on the optimizer's groups), so restore refuses it.
LOSS_FLAGS = ("matryoshka_dims", "matryoshka_weights", "quantization_aware", "train_image_blocks",
              "train_text_layers")


def restore(run, rank):
    """--resume: continue from last.pt (validated by checkpoint.load_checkpoint) exactly where it stopped."""
    if not (run.config.resume and os.path.exists(run.last_path)):
        return
    saved = checkpoint.load_checkpoint(run.last_path)
    for flag in LOSS_FLAGS:
        trained, given = saved["args"].get(flag) or None, getattr(run.config, flag) or None
        if trained != given:
            raise UserError(f"--resume: {run.last_path} was trained with --{flag} {trained or '(not set)'}, "
                            f"not {given or '(not set)'}; give the same value or --overwrite")
    run.model.load_state_dict(saved["model"])
    run.optimizer.load_state_dict(saved["optimizer"])
    run.scheduler.load_state_dict(saved["scheduler"])
    if run.scaler.is_enabled() and saved.get("scaler"):
        run.scaler.load_state_dict(saved["scaler"])
    run.state = {k: saved[k] for k in run.state}
    set_rng_states(saved["rng"])
    if rank == 0:
        print(f"resumed {run.last_path}: epoch {run.state['epoch']} batch {run.state['batch_in_epoch']} "
              f"step {run.state['step']}", flush=True)


def save(run, path):
    """last.pt / best.pt: the model and the whole training state (resume continues from it)."""
    state = run.state
    checkpoint.write_checkpoint(path, run.model, run.record, vars(run.config),
                                checkpoint.run_tag(run.config.run_name, run.dim),
                                optimizer=run.optimizer.state_dict(), scheduler=run.scheduler.state_dict(),
                                scaler=run.scaler.state_dict() if run.scaler.is_enabled() else None,
                                epoch=state["epoch"], batch_in_epoch=state["batch_in_epoch"], step=state["step"],
                                epoch_loss=state["epoch_loss"], best_rsum=state["best_rsum"], rng=rng_states())


# ----------------------------------------------------------------------------- epochs

def step_inputs(run, batch, train, pixel_batches, pixel_files, device):
    """The inputs of one step: cached features of a frozen tower, pixels / tokens of a trained one."""
    images, captions, batch_views, _ = batch
    if run.config.freeze_image:
        image_input = run.cache["train"]["image"][torch.as_tensor(batch_views), torch.as_tensor(images)].to(device)
    else:
        _, pixels, errors = next(pixel_batches)
        raise_unreadable(pixel_files, errors)
        image_input = pixels.to(device, non_blocking=True)
    if run.config.freeze_text:
        return image_input, None, None, run.cache["train"]["text"][torch.as_tensor(captions)].to(device)
    tokens = run.model.text_tower.tokenize([train.captions[c] for c in captions])
    return image_input, tokens["input_ids"].to(device), tokens["attention_mask"].to(device), None


def pixel_batches(run, local, train, device):
    """Augmented train pixels for the planned batches (trained image tower only), decoded in workers."""
    if run.config.freeze_image:
        return None, None
    tower = run.model.image_tower
    files = ImageFiles(train.image_root, train.image_files, image_transforms(False, tower.input_norm, tower.image_size),
                       image_transforms(True, tower.input_norm, tower.image_size))
    sampler = [[(int(i), int(s)) for i, s in zip(b[0], b[3])] for b in local]
    # Its own generator: creating an iterator must not consume the global RNG (dropout draws from it),
    # or a resumed run would diverge from an uninterrupted one. Augmentation is seeded per item anyway.
    loader = image_loader(files, num_workers=run.config.num_workers, device=device, batch_sampler=sampler,
                          generator=torch.Generator().manual_seed(0))
    return iter(loader), files


def optimizer_step(run, world_size):
    run.scaler.unscale_(run.optimizer)
    average_gradients(run.model, world_size)
    run.scaler.step(run.optimizer)
    run.scaler.update()
    run.optimizer.zero_grad(set_to_none=True)
    run.scheduler.step()
    run.state["step"] += 1


def train_epoch(run, step_module, train, device, rank, world_size):
    """The rest of the current epoch (from batch_in_epoch on). Returns (samples, seconds, stopped by
    --max_steps, batches in the epoch)."""
    config, state = run.config, run.state
    plan = plan_epoch(run.groups, config.captions_per_image, config.batch_size, world_size, config.seed,
                      state["epoch"], run.views)
    # Rank r embeds its equal slice of every global batch; the loss sees the gathered whole batch.
    local = [rank_slice(b, rank, world_size, config.captions_per_image) for b in plan[state["batch_in_epoch"]:]]
    batches, files = pixel_batches(run, local, train, device)
    run.model.train()
    if config.freeze_image:
        run.model.image_tower.eval()    # frozen BatchNorm statistics stay as trained
    if config.freeze_text:
        run.model.text_tower.eval()
    start, samples = time.time(), 0
    progress = tqdm(local, desc=f"{run.label} epoch {state['epoch'] + 1}/{config.epochs}", leave=False,
                    disable=rank != 0)
    for batch in progress:
        inputs = step_inputs(run, batch, train, batches, files, device)
        with autocast(device, config.amp, training=True):
            image_emb, text_emb, scale = step_module(*inputs)
        image_all, text_all = gather_with_grad(image_emb), gather_with_grad(text_emb)
        text_to_image = torch.arange(image_all.shape[0], device=device).repeat_interleave(config.captions_per_image)
        loss = nested_loss(image_all, text_all, text_to_image, scale, run.model.nested_dims,
                           config.matryoshka_weights, config.quantization_aware)
        require_finite(loss.item(), run, state)
        run.scaler.scale(loss / config.grad_accum).backward()
        state["batch_in_epoch"] += 1
        state["epoch_loss"][0] += loss.item()
        state["epoch_loss"][1] += 1
        samples += text_all.shape[0]
        run.losses.append(loss.item())
        if state["batch_in_epoch"] % config.grad_accum == 0 or state["batch_in_epoch"] == len(plan):
            optimizer_step(run, world_size)
            progress.set_postfix(loss=f"{loss.item():.3f}", T=f"{run.model.temperature:.3f}")
            if config.max_steps and state["step"] >= config.max_steps:
                return samples, time.time() - start, True, len(plan)
    return samples, time.time() - start, False, len(plan)


def require_finite(loss, run, state):
    """Stop on a NaN / infinite loss: later steps would only spread it into every weight (and the log
    and checkpoints would hold NaN); what was written before stays as it was."""
    if not math.isfinite(loss):
        raise UserError(f"{run.run_dir}: training diverged: the loss is {loss} at step {state['step'] + 1} "
                        f"(epoch {state['epoch'] + 1}); lower --lr / --head_lr, or try --amp off")


def dev_embeddings(model, split, device, cache, batch_size, num_workers, blocks=0, text_layers=0):
    """(image [N, D], text [T, D], text_to_image) numpy arrays for the per-epoch dev evaluation.

    With both towers frozen it projects the cached features (an epoch's evaluation then costs only the
    heads; same numbers on CPU, close under CUDA autocast). Otherwise it embeds through
    encoder_from_model + encoders.embed_split, the path of exported files, --eval_only and
    prepare_data.py --checkpoint."""
    model.eval()
    if "image" in cache and "text" in cache:
        return (*project_features(model, cache["image"], cache["text"], device, blocks, text_layers),
                split.text_to_image)
    emb = embed_split(encoder_from_model(model, "dev", device), split, batch_size, num_workers, progress=False)
    return emb.image_embeddings, emb.text_embeddings, emb.text_to_image


def epoch_record(run, samples, elapsed):
    """The log line of the epoch so far (its counters as they stand)."""
    state = run.state
    return {**run.log_fields, "epoch": state["epoch"] + 1, "step": state["step"], "mode": run.mode,
            "loss": state["epoch_loss"][0] / max(1, state["epoch_loss"][1]),
            "temperature": run.model.temperature, "samples_per_s": samples / max(elapsed, 1e-9),
            "epoch_seconds": elapsed, "lr": run.scheduler.get_last_lr()[0]}


def close_epoch(run, samples, elapsed):
    """The epoch's log line (before its counters are reset), then advance to the next epoch."""
    record = epoch_record(run, samples, elapsed)
    run.state.update(epoch=run.state["epoch"] + 1, batch_in_epoch=0, epoch_loss=[0.0, 0])
    return record


def partial_epoch(run, samples, elapsed, batches):
    """--max_steps stopped the epoch part-way: its log line, marked partial with the batches done. The
    counters stay, so --resume finishes the same epoch."""
    return {**epoch_record(run, samples, elapsed), "partial_epoch": True,
            "batches_done": run.state["batch_in_epoch"], "batches_in_epoch": batches}


def dev_results(images, texts, text_to_image, nested):
    """The dev fields of a log line: "dev" (the full dim) and, for a nested model (`nested`, its nested
    dims), "dev_nested" {str(d): metrics of the first d dims renormalised} and their mean RSUM."""
    results = {"dev": metrics.evaluate(images, texts, text_to_image)}
    if nested:
        results["dev_nested"] = {str(d): metrics.evaluate(prefix(images, d), prefix(texts, d), text_to_image)
                                 for d in nested}
        results["dev_nested_mean_rsum"] = float(np.mean([m["RSUM"] for m in results["dev_nested"].values()]))
    return results


def prefix(vectors, dim):
    """The first `dim` dims of unit vectors (numpy), renormalised, as the sweep truncates; the full width
    as it is (as dual_encoder.prefix, so the full dim's nested metrics are the plain dev metrics)."""
    return vectors if dim == vectors.shape[1] else io.l2_normalize(vectors[:, :dim])


def selection_rsum(results):
    """What best.pt is chosen by (the highest wins): without --matryoshka_dims the dev RSUM; with them
    the MEAN dev RSUM over the nested dims, the full dim included, as the model is meant to be used at
    every one of them (the full dim's RSUM alone would pick a model whose short prefixes lag)."""
    return results.get("dev_nested_mean_rsum", results["dev"]["RSUM"])


def evaluate_dev(run, dev_split, device):
    """Dev results of the model now (dev_results). The RNG states are put back after: building the
    evaluation's loader draws from the global RNG, and an evaluation (e.g. at a --max_steps stop) must
    not change the dropout of the steps after it, or a resumed run would diverge from an uninterrupted one."""
    states = rng_states()
    embedded = dev_embeddings(run.model, dev_split, device, run.cache["dev"], run.config.batch_size_eval,
                              run.config.num_workers, run.config.train_image_blocks, run.config.train_text_layers)
    set_rng_states(states)
    return dev_results(*embedded, run.model.nested_dims)


def end_of_epoch(run, record, dev_split, device, stopped):
    """Rank 0, after an epoch or a --max_steps stop: evaluate on dev, keep best.pt (the best
    selection_rsum) and last.pt, append the log line (every evaluation has one)."""
    config, state = run.config, run.state
    results = evaluate_dev(run, dev_split, device)
    record.update(results)
    dev = results["dev"]
    score = selection_rsum(results)
    improved = score > state["best_rsum"]
    if improved:
        state["best_rsum"] = score
        save(run, run.best_path)
    if stopped or state["epoch"] % config.save_every == 0 or state["epoch"] == config.epochs:
        save(run, run.last_path)
    io.append_jsonl(os.path.join(run.run_dir, "log.jsonl"), record)
    partial = f" (partial: {record['batches_done']}/{record['batches_in_epoch']} batches)" \
        if record.get("partial_epoch") else ""
    nested = f" | nested mean RSUM {results['dev_nested_mean_rsum']:.1f}" if "dev_nested" in results else ""
    print(f"[{run.label}] epoch {record['epoch']}{partial} loss {record['loss']:.4f} T {run.model.temperature:.4f} "
          f"{record['samples_per_s']:.0f} samples/s | dev {metrics.format_metrics(dev)}{nested}"
          f"{' *best*' if improved else ''}", flush=True)


def train_one_dim(config, dim, splits, device, rank, world_size, member=None):
    """Train (or resume) one embedding dim (or one --head_ensemble member). Returns the paths of its
    best and last checkpoints, the loss of every batch and the model."""
    run = new_run(config, dim, member)
    build_run_model(run, config.seed, member)
    cache_frozen_features(run, splits, feature_cache(config, device), config.seed, rank, world_size)
    set_up(run, splits, device, world_size)
    restore(run, rank)
    step_module = EmbedStep(run.model, run.config.freeze_image, run.config.freeze_text,
                            run.config.train_image_blocks, run.config.train_text_layers)
    broadcast_from_first(run.model, world_size)
    if rank == 0:
        trainable = sum(p.numel() for p in run.model.parameters() if p.requires_grad)
        print(f"[{run.label}] mode {run.mode}: {trainable:,} trainable parameters, "
              f"{run.batches_per_epoch} batches/epoch x {run.config.epochs} epochs", flush=True)
    stopped = False
    while run.state["epoch"] < run.config.epochs and not stopped:
        samples, elapsed, stopped, batches = train_epoch(run, step_module, splits["train"], device, rank, world_size)
        if run.state["batch_in_epoch"] >= batches:
            record = close_epoch(run, samples, elapsed)
        else:   # only --max_steps ends an epoch early
            record = partial_epoch(run, samples, elapsed, batches)
        if rank == 0:
            end_of_epoch(run, record, splits["dev"], device, stopped)
        barrier(world_size)
    return {"best": run.best_path, "last": run.last_path, "losses": run.losses, "model": run.model}
