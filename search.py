"""Search an embeddings file with a text query (a grid picture of the top-k images) or an image query.

Reads:  --data_path (hand-off file from prepare_data.py / train_dual_encoder.py; default: the one file
        found under coco_data/, the test split's with --use_test_set), the images under the file's
        `image_root` attribute, and the encoder named by its `model` / `checkpoint` attributes
Writes: <output_dir>/search_<query>.png (grid: rank, score, one ground-truth caption per image) and
        <output_dir>/search_<query>.json (ranks, scores, image paths); --image writes the JSON only

Example:
    python search.py --query "a dog runs on the beach" --top_k 9 --use_test_set --output_dir results --show
"""
import argparse
import glob
import hashlib
import os
import re
import sys
import textwrap

import matplotlib
import numpy as np
import torch
from PIL import Image

from retrieval import env
from retrieval.errors import UserError, cli
from retrieval.io import atomic_path, l2_normalize, read_embeddings, write_json
from retrieval.models import load_encoder

DEFAULT_DATA_DIR = "coco_data"


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    query = parser.add_argument_group("query")
    query.add_argument("--query", default=None, help="text to search the images with (text→image)")
    query.add_argument("--image", default=None, help="image file to search the captions with (image→text)")
    query.add_argument("--top_k", type=int, default=9, help="number of results to show")
    data = parser.add_argument_group("data")
    data.add_argument("--data_path", default=None,
                      help=f"embeddings file to search (default: the single hand-off file under {DEFAULT_DATA_DIR}/)")
    data.add_argument("--use_test_set", action="store_true",
                      help="search the test split: pick the *_test file by default and refuse a file whose "
                           "`split` attribute says otherwise")
    model = parser.add_argument_group("model (default: what the file's attributes name)")
    model.add_argument("--model", default=None,
                       help="encoder to embed the query: Hugging Face id or local directory "
                            "(default: the file's `model` attribute)")
    model.add_argument("--checkpoint", default=None,
                       help="dual-encoder checkpoint (default: the file's `checkpoint` attribute, if any)")
    model.add_argument("--device", default="", help="cuda, mps or cpu (empty = auto: cuda → mps → cpu)")
    output = parser.add_argument_group("output")
    output.add_argument("--output_dir", default="results", help="folder for the grid PNG and the JSON of results")
    output.add_argument("--show", action="store_true", help="also open the grid in a window (only when a display exists)")
    args = parser.parse_args(argv)
    if (args.query is None) == (args.image is None):
        parser.error("give exactly one of --query TEXT or --image PATH")
    if args.top_k < 1:
        parser.error("--top_k must be at least 1")
    return args


# ----------------------------------------------------------------------------- inputs

def find_data_path(use_test_set, data_dir=DEFAULT_DATA_DIR):
    """The one hand-off file under data_dir (the *_test one with use_test_set), or a clear error."""
    found = sorted(set(glob.glob(os.path.join(data_dir, "**", "*.h5"), recursive=True)
                       + glob.glob(os.path.join(data_dir, "**", "*.npz"), recursive=True)))
    if use_test_set:
        found = [p for p in found if re.search(r"_test\.(h5|npz)$", p)]
    what = "test-split (*_test.h5) " if use_test_set else ""
    if not found:
        raise UserError(f"{data_dir}: no {what}embeddings file found; run prepare_data.py or pass --data_path")
    if len(found) > 1:
        raise UserError(f"{data_dir}: {len(found)} {what}embeddings files found ({', '.join(found[:5])}"
                        f"{', ...' if len(found) > 5 else ''}); choose one with --data_path")
    return found[0]


def resolve_image(image_root, image_id, data_path):
    """Path of an image: image_root/image_id; a relative root is tried from the cwd, then the file's folder."""
    candidates = []
    if image_root:
        candidates.append(os.path.join(image_root, image_id))
        if not os.path.isabs(image_root):
            candidates.append(os.path.join(os.path.dirname(os.path.abspath(data_path)), image_root, image_id))
    candidates.append(image_id)
    for path in candidates:
        if os.path.isfile(path):
            return path
    return None


def load_query_encoder(args, attrs, data_path):
    """The encoder that made the file (or --model/--checkpoint); one clear error when it can't load."""
    model = args.model or attrs.get("model")
    checkpoint = args.checkpoint or attrs.get("checkpoint") or None
    if (not model or model == "unknown") and not checkpoint:
        raise UserError(f"{data_path}: the file does not name the model that made it (attribute "
                        f"'model'); pass --model PATH (or --checkpoint FILE)")
    device = env.pick_device(args.device)
    try:
        return load_encoder(model, checkpoint, device)
    except UserError as e:  # hub offline, missing folder, wrong checkpoint, ...
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        source = "given with --model/--checkpoint" if (args.model or args.checkpoint) else f"named in {data_path}"
        raise UserError(f"cannot load model {model!r}{f' / checkpoint {checkpoint!r}' if checkpoint else ''} "
                        f"{source} ({reason}); pass --model PATH to a local copy of it") from None


def embed_query(encoder, text=None, image_path=None):
    """L2-normalised float32 [dim] embedding of the text or the image."""
    with torch.no_grad():
        if text is not None:
            vector = encoder.embed_texts([text])
        else:
            try:
                with Image.open(image_path) as image:
                    pixels = encoder.image_transform(image.convert("RGB"))
            except (OSError, ValueError) as e:
                raise UserError(f"{image_path}: cannot read the image ({e})") from None
            vector = encoder.embed_images(pixels.unsqueeze(0).to(encoder.device or "cpu"))
    vector = vector.float().cpu().numpy().reshape(1, -1)
    return l2_normalize(vector)[0]


def top_k(gallery, query, k):
    """(indices, scores) of the k highest dot products; ties go to the lower index (the protocol's rule)."""
    scores = gallery @ query
    order = np.argsort(-scores, kind="stable")[:k]
    return order, scores[order]


# ----------------------------------------------------------------------------- outputs

def has_display():
    if sys.platform in ("darwin", "win32"):
        return True
    return bool(os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY"))


def slug(text, limit=40):
    cleaned = re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:limit].strip("-") or "query"
    return f"{cleaned}-{hashlib.sha1(text.encode('utf-8')).hexdigest()[:6]}"


def draw_grid(results, query, path, show=False):
    """Grid PNG of the result images with rank, score and one ground-truth caption each."""
    if not show:
        matplotlib.use("Agg")
    import matplotlib.pyplot as plt   # after choosing the backend: pyplot fixes it on import
    cols = int(np.ceil(np.sqrt(len(results))))
    rows = int(np.ceil(len(results) / cols))
    # constrained layout reserves room for the suptitle and the 3-line caption labels (tight_layout overlapped them)
    fig, axes = plt.subplots(rows, cols, figsize=(3.4 * cols, 4.1 * rows), squeeze=False, layout="constrained")
    for ax in axes.flat[len(results):]:
        ax.axis("off")
    for ax, result in zip(axes.flat, results):
        # Ticks and frame off but the axis kept: its x label holds the caption, so layout leaves room for it.
        ax.set_xticks([])
        ax.set_yticks([])
        for spine in ax.spines.values():
            spine.set_visible(False)
        if result["image_path"]:
            with Image.open(result["image_path"]) as image:
                ax.imshow(image.convert("RGB"))
        else:
            ax.imshow(np.full((8, 8, 3), 200, dtype=np.uint8))
            ax.text(0.5, 0.5, "image file not found", ha="center", va="center", transform=ax.transAxes)
        ax.set_title(f"#{result['rank']}  score {result['score']:.3f}", fontsize=11)
        caption = "\n".join(textwrap.wrap(f"ground truth: {result['caption']}", 40)[:3])
        ax.set_xlabel(caption, fontsize=8.5)
    fig.suptitle(f"\u201c{query}\u201d: top {len(results)}", fontsize=13)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=100, bbox_inches="tight")
    if show:
        plt.show()
    plt.close(fig)
    return path


def text_to_image(args, emb, query, k, data_path, encoder):
    """Rank the file's images for a text query, draw the grid (one ground-truth caption per image)."""
    image_root = emb.attrs.get("image_root") or ""
    first_caption = {}
    for row, image in enumerate(emb.text_to_image.tolist()):
        first_caption.setdefault(image, emb.captions[row])
    indices, scores = top_k(emb.image_embeddings, query, k)
    results = [{"rank": r + 1, "score": float(s), "image_index": int(i), "image_id": emb.image_ids[i],
                "image_path": resolve_image(image_root, emb.image_ids[i], data_path),
                "caption": first_caption.get(int(i), "")} for r, (i, s) in enumerate(zip(indices, scores))]
    name = slug(args.query)
    missing = sum(r["image_path"] is None for r in results)
    if missing:
        print(f"warning: {missing} of {len(results)} image files not found under image_root "
              f"{image_root!r}; the grid shows placeholders", file=sys.stderr)
    show = args.show and has_display()
    if args.show and not show:
        print("no display found: --show ignored, the picture is saved instead", file=sys.stderr)
    picture = draw_grid(results, args.query, os.path.join(args.output_dir, f"search_{name}.png"), show)
    print(f"query: {args.query!r}  ({data_path}, {emb.image_embeddings.shape[0]} images, model {encoder.name})")
    for r in results:
        print(f"  #{r['rank']:<3} {r['score']:.4f}  {r['image_path'] or r['image_id']}  | {r['caption']}")
    print(f"wrote {picture}")
    return results, name, picture


def image_to_text(args, emb, query, k, data_path, encoder):
    """Rank the file's captions for an image query (printed; no picture)."""
    indices, scores = top_k(emb.text_embeddings, query, k)
    results = [{"rank": r + 1, "score": float(s), "caption_index": int(i), "caption": emb.captions[i],
                "image_id": emb.image_ids[int(emb.text_to_image[i])]}
               for r, (i, s) in enumerate(zip(indices, scores))]
    print(f"image: {args.image}  ({data_path}, {emb.text_embeddings.shape[0]} captions, model {encoder.name})")
    for r in results:
        print(f"  #{r['rank']:<3} {r['score']:.4f}  {r['caption']}  (image {r['image_id']})")
    return results, slug(os.path.basename(args.image)), None


@cli
def main(argv=None):
    args = parse_args(argv)
    data_path = args.data_path or find_data_path(args.use_test_set)
    emb = read_embeddings(data_path)
    split = str(emb.attrs.get("split", "unknown"))
    if args.use_test_set and split not in ("test", "unknown"):
        raise UserError(f"{data_path}: split is '{split}', but --use_test_set asks for the test split")
    if args.image is not None and not os.path.isfile(args.image):
        raise UserError(f"{args.image}: image file not found")
    encoder = load_query_encoder(args, emb.attrs, data_path)
    if encoder.dim != emb.dim:
        raise UserError(f"{data_path}: holds {emb.dim}-d embeddings but the encoder {encoder.name!r} "
                        f"makes {encoder.dim}-d ones; pass the --model/--checkpoint that made the file")
    query = embed_query(encoder, text=args.query, image_path=args.image)
    k = min(args.top_k, emb.image_embeddings.shape[0] if args.query is not None else emb.text_embeddings.shape[0])
    os.makedirs(args.output_dir, exist_ok=True)
    search = text_to_image if args.query is not None else image_to_text
    results, name, picture = search(args, emb, query, k, data_path, encoder)
    record = {"query": args.query, "image": args.image, "data_path": data_path, "model": encoder.name,
              "checkpoint": encoder.checkpoint, "split": split, "picture": picture, "results": results}
    json_path = os.path.join(args.output_dir, f"search_{name}.json")
    write_json(json_path, record)
    print(f"wrote {json_path}")
    return record


if __name__ == "__main__":
    main()
