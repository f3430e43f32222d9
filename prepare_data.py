"""Embed a dataset's images and captions into one validated hand-off file per split.

Reads:  <data_dir> (default coco_data/<dataset>/): Flickr8k (official or Kaggle layout, or its Karpathy
        file), Flickr30k (+ Karpathy dataset_flickr30k.json), COCO 2017 (+ optional Karpathy
        dataset_coco.json), your own --images DIR --captions FILE, or the generated synthetic set; a
        CLIP-family --model (hub id or local folder, or open_clip:ARCH/TAG) or a --checkpoint.
        Or, with --from_arrays, vectors you already have (.npy / .npz) instead of a dataset and a model.
Writes: <output_dir>/<model-tag>_<split>.h5 (or .npz), default output_dir = coco_data/<dataset>/ (never
        the data folder unless asked); with --download the official archives are fetched and extracted
        into data_dir first.

Example:
    python prepare_data.py --dataset flickr8k --download --splits train dev test \
        --model openai/clip-vit-base-patch32
"""
import os
import time

import torch

from retrieval import arrays, data, env, handoff, io, metrics, synthetic
from retrieval import download
from retrieval.encoders import embed_split
from retrieval.errors import HelpFormatter, Parser, cli
from retrieval.flags import at_least, non_negative_int, positive_int
from retrieval.hf_models import DEFAULT_MODEL
from retrieval.models import load_encoder, model_tag

DEFAULT_DATA_ROOT = "coco_data"
EVAL_MAX_IMAGES = 25000  # the sanity-check evaluation is an exact full ranking: skip it on huge splits


def parse_args(argv=None):
    p = Parser(description=__doc__.split("\n")[0], formatter_class=HelpFormatter)
    source = p.add_argument_group("data")
    source.add_argument("--dataset", choices=data.DATASETS, default="synthetic",
                        help="which dataset to read (synthetic needs no download)")
    source.add_argument("--data_dir", default="",
                        help="dataset folder (default: coco_data/<dataset>/)")
    source.add_argument("--images", default="", help="--dataset csv: folder of your images")
    source.add_argument("--captions", default="",
                        help="--dataset csv: CSV (header image,caption[,split]) or JSONL file of captions")
    source.add_argument("--karpathy_file", default="",
                        help="a Karpathy split file (dataset_coco.json, dataset_flickr30k.json, dataset_flickr8k.json) "
                             "to read the splits from (default: found in --data_dir or its karpathy/; Flickr8k uses "
                             "it only without its official split files or when given)")
    source.add_argument("--splits", nargs="+", default=None,
                        help="splits to embed (default: flickr8k/csv/synthetic train dev test; flickr30k train val "
                             "test; coco train val, or train restval val test with a Karpathy dataset_coco.json; "
                             "flickr8k through a Karpathy file train val test)")
    source.add_argument("--download", action="store_true",
                        help="fetch the official archives into --data_dir first (already present = skipped); "
                             "without it nothing touches the network for data")
    source.add_argument("--synthetic_images", type=positive_int, default=synthetic.SYNTHETIC_IMAGES,
                        help="--dataset synthetic: number of images to generate (5 captions each)")
    source.add_argument("--synthetic_image_size", type=positive_int, default=96,
                        help="--dataset synthetic: image side in pixels")
    model = p.add_argument_group("model")
    model.add_argument("--model", default=DEFAULT_MODEL,
                       help="Hugging Face CLIP-family model id or local folder (save_pretrained), or an open_clip model: "
                            "open_clip:ARCH/TAG (e.g. open_clip:ViT-B-32/laion2b_s34b_b79k), open_clip:ARCH/FILE, "
                            "open_clip:FOLDER")
    model.add_argument("--checkpoint", default="",
                       help="embed with a dual encoder trained by train_dual_encoder.py instead of --model")
    model.add_argument("--device", default="", help="'' = auto (cuda, then mps, then cpu), or e.g. cuda:1")
    model.add_argument("--batch_size", type=non_negative_int, default=0,
                       help="images per forward pass (0 = 16 on CPU, 256 on GPU; see docs/benchmarks.md, embedding speed)")
    model.add_argument("--text_batch_size", type=non_negative_int, default=0,
                       help="captions per forward pass (0 = 4 x batch_size)")
    model.add_argument("--num_workers", type=at_least(-1, " (-1 = min(8, CPU cores))"), default=-1,
                       help="DataLoader processes decoding images (-1 = min(8, CPU cores))")
    given = p.add_argument_group("vectors you already have (--from_arrays; no dataset, no model)")
    given.add_argument("--from_arrays", action="store_true",
                       help="write a hand-off file from vectors computed elsewhere (.npy / .npz) instead of embedding a "
                            "dataset; unnormalised rows are L2-normalised and the file notes it (docs/datasets.md)")
    given.add_argument("--image_vectors", nargs="+", default=None, metavar="FILE",
                       help="image vectors [N, D]: one .npy / .npz (FILE.npz:KEY picks an array) or its shards in order")
    given.add_argument("--text_vectors", nargs="+", default=None, metavar="FILE",
                       help="caption vectors [T, D], as --image_vectors")
    given.add_argument("--text_to_image", default="", metavar="FILE",
                       help="image row of each caption (.npy of integers or one integer a line); without it and "
                            "without --text_image_ids, text row i belongs to image row i")
    given.add_argument("--text_image_ids", default="", metavar="FILE",
                       help="image id of each caption (one a line, or .npy), looked up in --image_ids")
    given.add_argument("--image_ids", default="", metavar="FILE", help="id of each image row (one a line, or .npy)")
    given.add_argument("--caption_texts", default="", metavar="FILE", help="text of each caption (one a line, or .npy)")
    given.add_argument("--vectors_name", default="own-vectors",
                       help="the model that made the vectors: recorded as attribute model, names the file")
    given.add_argument("--array_split", default="test", help="split name recorded and used in the file name")
    out = p.add_argument_group("output")
    out.add_argument("--output_dir", default="",
                     help="where the hand-off files go (default: coco_data/<dataset>/, also when --data_dir is "
                          "elsewhere, so a read-only dataset copy works)")
    out.add_argument("--output_format", choices=("h5", "npz"), default="h5", help="hand-off file format")
    out.add_argument("--overwrite", action="store_true", help="redo splits whose output file already exists")
    out.add_argument("--no_eval", action="store_true",
                     help="skip the one-line retrieval sanity check printed for each written split")
    out.add_argument("--seed", type=non_negative_int, default=0,
                     help="seeds the synthetic data, seeded splits (when no official split exists) and torch")
    out.add_argument("--quiet", action="store_true", help="no progress bars")
    out.add_argument("--fetch_only", choices=("data", "model"), default=None,
                     help="data: get the dataset (--download, or generate the synthetic one) and exit; model: also "
                          "load --model / --checkpoint once (fills the Hugging Face cache on a login node) and exit")
    args = p.parse_args(argv)
    check_array_flags(p, args)
    if args.dataset == "csv" and (not args.images or not args.captions):
        p.error("--dataset csv needs --images DIR and --captions FILE")
    if args.dataset != "csv" and (args.images or args.captions):
        p.error("--images/--captions are only for --dataset csv")
    if args.karpathy_file and args.dataset not in ("coco", "flickr30k", "flickr8k"):
        p.error("--karpathy_file is only for --dataset coco, flickr30k or flickr8k")
    if args.dataset == "synthetic":   # before anything is loaded or written
        synthetic.check_num_images(args.synthetic_images)
    args.data_dir = args.data_dir or os.path.join(DEFAULT_DATA_ROOT, args.dataset)
    args.output_dir = args.output_dir or os.path.join(DEFAULT_DATA_ROOT, "own" if args.from_arrays else args.dataset)
    return args


ARRAY_FLAGS = ("image_vectors", "text_vectors", "text_to_image", "text_image_ids", "image_ids", "caption_texts")


def check_array_flags(p, args):
    """--from_arrays needs both vector flags and takes at most one caption -> image map; the others need it."""
    if not args.from_arrays:
        used = [f"--{name}" for name in ARRAY_FLAGS if getattr(args, name)]
        if used:
            p.error(f"{', '.join(used)}: only with --from_arrays")
        return
    if not args.image_vectors or not args.text_vectors:
        p.error("--from_arrays needs --image_vectors FILE and --text_vectors FILE")
    if args.text_to_image and args.text_image_ids:
        p.error("--text_to_image and --text_image_ids: give one caption -> image map, not both")


def default_batch_size(device):
    # Measured (bench/bench_embed.py): small CPU batches keep activations in cache; GPUs want big ones.
    return 256 if device.type == "cuda" else 16


def output_path(args, split):
    return os.path.join(args.output_dir, f"{model_tag(args.model, args.checkpoint)}_{split}.{args.output_format}")


def write_from_arrays(args):
    """--from_arrays: one validated hand-off file of the given vectors, and the sanity-check line."""
    path = os.path.join(args.output_dir, f"{model_tag(args.vectors_name)}_{args.array_split}.{args.output_format}")
    if os.path.exists(path) and not args.overwrite:
        print(f"skip {args.array_split}: {path} exists (use --overwrite to redo)")
        return {}
    emb = arrays.embeddings_from_arrays(args.image_vectors, args.text_vectors, args.text_to_image or None,
                                        args.text_image_ids or None, args.image_ids or None,
                                        args.caption_texts or None, args.array_split, args.vectors_name)
    emb.attrs.update(environment=env.environment(), args=vars(args))
    handoff.write_embeddings(path, emb)
    for note in emb.attrs["input_notes"]:
        print(f"note: {note}")
    print(f"{args.array_split}: {len(emb.image_ids)} images, {len(emb.captions)} captions -> {path}", flush=True)
    if not args.no_eval and len(emb.image_ids) <= EVAL_MAX_IMAGES:
        result = metrics.evaluate(emb.image_embeddings, emb.text_embeddings, emb.text_to_image)
        print(f"{args.array_split}: {metrics.format_metrics(result)}", flush=True)
    return {args.array_split: path}


def fetch_data(args):
    """The dataset on disk: downloaded (--download), generated (synthetic), or checked to be there."""
    if args.download and args.dataset in download.ARCHIVES:
        download.download_dataset(args.dataset, args.data_dir, splits=args.splits)
    elif args.download:
        print(f"--download: nothing to fetch for --dataset {args.dataset}")
    if args.dataset == "synthetic":
        synthetic.make_synthetic(args.data_dir, num_images=args.synthetic_images, seed=args.seed,
                                 image_size=args.synthetic_image_size)


def fetch_only(args):
    """--fetch_only: what a later offline job needs, on disk and in the caches; nothing is embedded."""
    if args.dataset not in ("csv", "synthetic"):
        data.require_folder(args.dataset, args.data_dir)
    print(f"prefetch: data {args.data_dir} ready")
    if args.fetch_only == "model":
        load_encoder(args.model, args.checkpoint or None, "cpu")
        print(f"prefetch: model {args.checkpoint or args.model} cached")


def todo_splits(args):
    """(split, output path) of every split still to write; existing files are skipped unless --overwrite."""
    todo = []
    for split in args.splits or data.default_splits(args.dataset, args.data_dir, args.captions,
                                                           args.karpathy_file or None):
        path = output_path(args, split)
        if os.path.exists(path) and not args.overwrite:
            print(f"skip {split}: {path} exists (use --overwrite to redo)")
        else:
            todo.append((split, path))
    return todo


def write_split(args, encoder, split_data, path, environment):
    """Embed one split, write its hand-off file, print its counts and the sanity-check retrieval line."""
    device = torch.device(encoder.device or "cpu")
    batch_size = args.batch_size or default_batch_size(device)
    num_workers = args.num_workers if args.num_workers >= 0 else min(8, os.cpu_count() or 1)
    split, started = split_data.split, time.time()
    emb = embed_split(encoder, split_data, batch_size=batch_size, num_workers=num_workers,
                      progress=not args.quiet, text_batch_size=args.text_batch_size or 4 * batch_size)
    emb.attrs.update(seed=args.seed, batch_size=batch_size, device=str(device),
                     embed_seconds=round(time.time() - started, 2), environment=environment, args=vars(args))
    if args.checkpoint:
        emb.attrs["model_tag"] = encoder.name
    handoff.write_embeddings(path, emb)
    print(f"{split}: {len(emb.image_ids)} images, {len(emb.captions)} captions, "
          f"{len(emb.attrs['skipped'])} skipped ({emb.attrs['num_unreadable_images']} unreadable images) "
          f"-> {path}", flush=True)
    if args.no_eval:
        return
    if len(emb.image_ids) <= EVAL_MAX_IMAGES:
        result = metrics.evaluate(emb.image_embeddings, emb.text_embeddings, emb.text_to_image)
        print(f"{split}: {metrics.format_metrics(result)}", flush=True)
    else:
        print(f"{split}: sanity-check evaluation skipped ({len(emb.image_ids)} images > {EVAL_MAX_IMAGES})")


@cli(interrupted="interrupted; finished splits kept; run the same command to write the rest")
def main(argv=None):
    args = parse_args(argv)
    if not args.fetch_only:
        # Before any download or model: a read-only output folder must not surface only at the first write.
        io.require_writable(args.output_dir, "--output_dir")
    if args.from_arrays:
        return write_from_arrays(args)
    fetch_data(args)
    if args.fetch_only:
        fetch_only(args)
        return {}
    todo = todo_splits(args)
    if not todo:
        return {}
    # Read every split before loading the model: bad input fails in seconds, not after an hour.
    loaded = [(data.load_split(args.dataset, args.data_dir, split, args.seed, args.images or None,
                               args.captions or None, args.karpathy_file or None), path) for split, path in todo]
    env.seed_everything(args.seed)
    encoder = load_encoder(args.model, args.checkpoint or None, args.device)
    environment = env.environment()
    for split_data, path in loaded:
        write_split(args, encoder, split_data, path, environment)
    return {split_data.split: path for split_data, path in loaded}


if __name__ == "__main__":
    main()
