"""Search an embeddings file with a text query (a grid picture of the top-k images) or an image query.

Reads:  a hand-off file from prepare_data.py / train_dual_encoder.py (which one: see "The file searched"),
        the images under the file's `image_root` attribute, and the encoder named by its `model` /
        `checkpoint` attributes
Writes: <output_dir> (default result/search/)/search_<slug>-<hash>.png (grid: rank, score, one ground-truth caption per image) and
        <output_dir>/search_<slug>-<hash>.json (ranks, scores, image paths); --image writes the JSON only.
        <slug> is the query text (--image: the image's file name) cut to 40 characters; <hash> covers the
        query and the data file, so a search of another file never overwrites this picture, while the
        same search of the same file redoes (overwrites) its own. Both paths are printed.

The file searched, first rule that applies:
    1. --data_path, when given;
    2. else the file the last sweep evaluated: the distinct, still existing `data_path`s recorded by the
       run files <results_dir>/runs/*.json (default result/, where submit_job.sh writes; with
       --use_test_set only *_test.h5 / *_test.npz ones). Paths are as the sweep wrote them: absolute, or
       relative to the folder it ran in (run search.py from there too). Exactly one: it is used; several:
       an error lists them, choose one with --data_path;
    3. else (no run files, or none naming an existing file) the single file under coco_data/ (the *_test
       one with --use_test_set); several: an error lists them.
    The file chosen by rule 2 or 3 is printed ("searching <file> (...)").

Unreadable images: a result image that is not decodable (garbage, truncated, a decompression bomb)
becomes a "cannot read image" cell of the grid, with one warning line counting them. An --image query
that PIL refuses is an error. PIL's decompression-bomb guard applies as PIL sets it: an image above
Image.MAX_IMAGE_PIXELS pixels but below twice that is read (PIL only warns, DecompressionBombWarning);
above twice that PIL refuses it (DecompressionBombError), which is the error above.

Example:
    python search.py --query "a dog runs on the beach" --top_k 9 --use_test_set --show
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
from retrieval.errors import Parser, UserError, cli
from retrieval.flags import positive_int
from retrieval.io import atomic_path, read_json, require_writable, write_json
from retrieval.handoff import l2_normalize, read_embeddings
from retrieval.models import load_encoder

DEFAULT_DATA_DIR = "coco_data"
DEFAULT_RESULTS_DIR = "result"   # submit_job.sh's RESULT_DIR and run_experiments.py's --output_dir
HANDOFF_FILE = re.compile(r"\.(h5|npz)$")
TEST_SPLIT_FILE = re.compile(r"_test\.(h5|npz)$")
# What PIL raises for an image it cannot decode: UnidentifiedImageError and truncation are OSErrors,
# a bad header value a ValueError, and a decompression bomb (over 2x MAX_IMAGE_PIXELS) its own Exception.
IMAGE_ERRORS = (OSError, ValueError, Image.DecompressionBombError)


def parse_args(argv=None):
    # --help ends with the docstring's rules for the file searched, so the two never disagree.
    file_rules = __doc__[__doc__.index("The file searched, "):__doc__.index("Unreadable images")].rstrip()
    parser = Parser(description=__doc__.splitlines()[0], epilog=file_rules,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    query = parser.add_argument_group("query")
    query.add_argument("--query", default=None, help="text to search the images with (text→image)")
    query.add_argument("--image", default=None, help="image file to search the captions with (image→text)")
    query.add_argument("--top_k", type=positive_int, default=9, help="number of results to show")
    data = parser.add_argument_group("data")
    data.add_argument("--data_path", default=None,
                      help="embeddings file to search (default: the one file the sweep in --results_dir evaluated, "
                           f"else the one hand-off file under {DEFAULT_DATA_DIR}/; see below)")
    data.add_argument("--results_dir", default=DEFAULT_RESULTS_DIR,
                      help="sweep output folder whose runs/*.json name the file to search when --data_path "
                           "is not given (default: %(default)s)")
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
    output.add_argument("--output_dir", default=os.path.join("result", "search"),
                        help="folder for the grid PNG and the JSON of results (next to the sweep's result/)")
    output.add_argument("--show", action="store_true", help="also open the grid in a window (only when a display exists)")
    args = parser.parse_args(argv)
    if (args.query is None) == (args.image is None):
        parser.error("give exactly one of --query TEXT or --image PATH")
    return args


def check_args(args):
    """Faults parse_args lets through, as one error line before any file or model is loaded: an empty
    query (every image would be ranked against the encoding of nothing) and an output folder that
    cannot be written (a file, read-only)."""
    if args.query is not None and not args.query.strip():
        raise UserError(f"--query {args.query!r}: is empty; give the text to search the images with")
    require_writable(args.output_dir, "--output_dir")


# ----------------------------------------------------------------------------- inputs

def choose_data_path(data_path, use_test_set, results_dir=DEFAULT_RESULTS_DIR, data_dir=DEFAULT_DATA_DIR):
    """The file to search (rules in the module docstring): --data_path, else the one file the sweep in
    results_dir evaluated, else the one file under data_dir. Prints the file it chose."""
    if data_path:
        return data_path
    what = "test-split (*_test) " if use_test_set else ""
    runs = sorted(glob.glob(os.path.join(results_dir, "runs", "*.json")))
    swept = swept_data_paths(runs, use_test_set)
    if swept:
        runs_dir = os.path.join(results_dir, "runs")
        path = only_one(swept, runs_dir, f"existing {what}embeddings files evaluated by the sweep")
        print(f"searching {path} (the file the sweep in {os.path.join(results_dir, '')} evaluated)")
        return path
    if runs:  # said, so that falling back to coco_data/ is never silent
        print(f"note: the run files in {os.path.join(results_dir, 'runs', '')} name no existing {what}embeddings "
              f"file; looking under {os.path.join(data_dir, '')}", file=sys.stderr)
    path = find_data_path(use_test_set, data_dir)
    print(f"searching {path} (the only {what}embeddings file under {os.path.join(data_dir, '')})")
    return path


def swept_data_paths(run_files, use_test_set):
    """The distinct existing hand-off files the run files record (config.data_path), sorted; only
    *_test ones with use_test_set. One file spelt two ways (relative, absolute) counts once."""
    found = {}
    for run_file in run_files:
        path = run_data_path(run_file)
        if not path or not os.path.isfile(path) or not HANDOFF_FILE.search(path):
            continue  # gone since the sweep (or not a hand-off file): not a candidate
        if use_test_set and not TEST_SPLIT_FILE.search(path):
            continue
        found.setdefault(os.path.realpath(path), path)
    return sorted(found.values())


def run_data_path(run_file):
    """The data_path a run file records, or None (unreadable, or not a run file: skipped, as the sweep
    replaces an unreadable run file on its next pass)."""
    try:
        record = read_json(run_file)
    except (UserError, OSError):
        return None
    config = record.get("config") if isinstance(record, dict) else None
    path = config.get("data_path") if isinstance(config, dict) else None
    return path if isinstance(path, str) and path else None


def find_data_path(use_test_set, data_dir=DEFAULT_DATA_DIR):
    """The one hand-off file under data_dir (the *_test one with use_test_set), or a clear error."""
    found = sorted(set(glob.glob(os.path.join(data_dir, "**", "*.h5"), recursive=True)
                       + glob.glob(os.path.join(data_dir, "**", "*.npz"), recursive=True)))
    if use_test_set:
        found = [p for p in found if TEST_SPLIT_FILE.search(p)]
    what = "test-split (*_test) " if use_test_set else ""
    if not found:
        raise UserError(f"{data_dir}: no {what}embeddings file found; run prepare_data.py or pass --data_path")
    return only_one(found, data_dir, f"{what}embeddings files")


def only_one(found, where, what):
    """found[0] when it is alone; else one error line listing up to 5 of them."""
    if len(found) > 1:
        raise UserError(f"{where}: {len(found)} {what} found ({', '.join(found[:5])}"
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
            except IMAGE_ERRORS as e:
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


def output_name(label, query_key, data_path, limit=40):
    """'search_<slug of label>-<hash>': the hash covers the query and the data file (resolved, so a
    relative and an absolute spelling agree), so another file's search never overwrites this output."""
    cleaned = re.sub(r"[^a-z0-9]+", "-", label.lower()).strip("-")[:limit].strip("-") or "query"
    key = f"{query_key}\0{os.path.realpath(data_path)}"
    return f"search_{cleaned}-{hashlib.sha1(key.encode('utf-8')).hexdigest()[:8]}"


def read_cell_image(path):
    """RGB pixels of a result image, or (None, reason) when PIL cannot decode it."""
    try:
        with Image.open(path) as image:
            return np.asarray(image.convert("RGB")), None
    except IMAGE_ERRORS as e:
        return None, f"{type(e).__name__}: {e}"


def placeholder(ax, text):
    ax.imshow(np.full((8, 8, 3), 200, dtype=np.uint8))
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes)


def draw_grid(results, query, path, show=False):
    """Grid PNG of the result images with rank, score and one ground-truth caption each.
    Returns [(image path, reason)] of the images it could not decode (drawn as placeholders)."""
    if not show:
        matplotlib.use("Agg")
    import matplotlib.pyplot as plt   # after choosing the backend: pyplot fixes it on import
    cols = int(np.ceil(np.sqrt(len(results))))
    rows = int(np.ceil(len(results) / cols))
    # constrained layout reserves room for the suptitle and the 3-line caption labels (tight_layout overlapped them)
    fig, axes = plt.subplots(rows, cols, figsize=(3.4 * cols, 4.1 * rows), squeeze=False, layout="constrained")
    for ax in axes.flat[len(results):]:
        ax.axis("off")
    unreadable = []
    for ax, result in zip(axes.flat, results):
        # Ticks and frame off but the axis kept: its x label holds the caption, so layout leaves room for it.
        ax.set_xticks([])
        ax.set_yticks([])
        for spine in ax.spines.values():
            spine.set_visible(False)
        pixels, reason = read_cell_image(result["image_path"]) if result["image_path"] else (None, None)
        if pixels is not None:
            ax.imshow(pixels)
        elif reason:
            placeholder(ax, "cannot read image")
            unreadable.append((result["image_path"], reason))
        else:
            placeholder(ax, "image file not found")
        ax.set_title(f"#{result['rank']}  score {result['score']:.3f}", fontsize=11)
        caption = "\n".join(textwrap.wrap(f"ground truth: {result['caption']}", 40)[:3])
        ax.set_xlabel(caption, fontsize=8.5)
    fig.suptitle(f"\u201c{query}\u201d: top {len(results)}", fontsize=13)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=100, bbox_inches="tight")
    if show:
        plt.show()
    plt.close(fig)
    return unreadable


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
    name = output_name(args.query, args.query, data_path)
    missing = sum(r["image_path"] is None for r in results)
    if missing:
        print(f"warning: {missing} of {len(results)} image files not found under image_root "
              f"{image_root!r}; the grid shows placeholders", file=sys.stderr)
    show = args.show and has_display()
    if args.show and not show:
        print("no display found: --show ignored, the picture is saved instead", file=sys.stderr)
    picture = os.path.join(args.output_dir, f"{name}.png")
    unreadable = draw_grid(results, args.query, picture, show)
    if unreadable:
        path, reason = unreadable[0]
        print(f"warning: {len(unreadable)} of {len(results)} image files cannot be read (first: {path}: "
              f"{reason}); the grid shows placeholders", file=sys.stderr)
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
    return results, output_name(os.path.basename(args.image), os.path.realpath(args.image), data_path), None


@cli
def main(argv=None):
    args = parse_args(argv)
    check_args(args)
    data_path = choose_data_path(args.data_path, args.use_test_set, args.results_dir)
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
    json_path = os.path.join(args.output_dir, f"{name}.json")
    write_json(json_path, record)
    print(f"wrote {json_path}")
    return record


if __name__ == "__main__":
    main()
