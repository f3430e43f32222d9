"""Shared fixtures: small data the tests make themselves (no network), and the one lookup of the optional
shared Flickr8k copy (FLICKR8K_DIR)."""
import contextlib
import json
import os
import shutil
import subprocess

import numpy as np
import pytest

# Tests must never reach for the Hugging Face hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


# The shared Flickr8k copy for the tests that check real counts: $FLICKR8K_DIR, else shared/datasets/flickr8k
# next to the repository (where the project's machines keep it). The one place this path is spelled.
FLICKR8K_DIR = os.environ.get("FLICKR8K_DIR") or os.path.join(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "..", "shared", "datasets", "flickr8k")


@pytest.fixture(scope="session")
def flickr8k_dir():
    """Path of the shared Flickr8k copy (see FLICKR8K_DIR); the test is skipped, with the path, when absent."""
    if not os.path.isdir(FLICKR8K_DIR):
        pytest.skip(f"shared Flickr8k copy not found at {FLICKR8K_DIR} (set FLICKR8K_DIR to use one elsewhere)")
    return FLICKR8K_DIR


def make_tiny_clip(path, projection_dim=16, image_size=32):
    """A randomly initialised, tiny CLIP (model + tokenizer + image processor) saved to `path`.

    The tokenizer has a character-level BPE vocabulary (no merges), which is enough for the real
    CLIPTokenizer / CLIPProcessor code paths to run exactly as they do for openai/clip-vit-base-patch32.
    """
    import torch
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer
    torch.manual_seed(0)
    os.makedirs(path, exist_ok=True)
    chars = [chr(c) for c in range(33, 127)] + [chr(256 + c) for c in range(256 - 94)]
    vocab = {}
    for token in chars + [c + "</w>" for c in chars]:
        vocab.setdefault(token, len(vocab))
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    with open(os.path.join(path, "vocab.json"), "w") as f:
        json.dump(vocab, f)
    with open(os.path.join(path, "merges.txt"), "w") as f:
        f.write("#version: 0.2\n")
    tokenizer = CLIPTokenizer(os.path.join(path, "vocab.json"), os.path.join(path, "merges.txt"))
    config = CLIPConfig(
        text_config=dict(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, max_position_embeddings=77,
                         bos_token_id=vocab["<|startoftext|>"], eos_token_id=vocab["<|endoftext|>"],
                         pad_token_id=vocab["<|endoftext|>"]),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                           image_size=image_size, patch_size=8),
        projection_dim=projection_dim)
    CLIPModel(config).eval().save_pretrained(path)
    image_processor = CLIPImageProcessor(size={"shortest_edge": image_size},
                                         crop_size={"height": image_size, "width": image_size})
    CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_clip_dir(tmp_path_factory):
    """Path of a tiny random CLIP saved with save_pretrained (load it with --model PATH)."""
    return make_tiny_clip(str(tmp_path_factory.mktemp("tiny_clip")))


@pytest.fixture(scope="session")
def synthetic_dir(tmp_path_factory):
    """A small synthetic dataset folder (120 images, 5 captions each) written by make_synthetic."""
    from retrieval.synthetic import make_synthetic
    return make_synthetic(str(tmp_path_factory.mktemp("synthetic") / "synthetic"), num_images=120, seed=0)


@pytest.fixture
def random_split():
    """Random L2-normalised embeddings for 40 images x 5 captions (captions near their image)."""
    from retrieval.handoff import l2_normalize
    rng = np.random.default_rng(0)
    images = l2_normalize(rng.normal(size=(40, 16)))
    text_to_image = np.repeat(np.arange(40), 5)
    texts = l2_normalize(images[text_to_image] + 0.8 * rng.normal(size=(200, 16)))
    return images, texts, text_to_image


def as_script(function, *args, **kwargs):
    """Call a library function the way a script does: a UserError becomes SystemExit('error: ...')."""
    from retrieval.errors import cli
    return cli(lambda _argv: function(*args, **kwargs))()


@contextlib.contextmanager
def mounted_tmpfs(folder, size="1m", read_only=False):
    """A tmpfs of `size` mounted on `folder` for the block (root only): a full one refuses writes with a
    real ENOSPC, a read-only one with EROFS even for root. Skips the test where no mount is permitted."""
    os.makedirs(folder, exist_ok=True)
    options = f"size={size}" + (",ro" if read_only else "")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(folder)], capture_output=True,
                          text=True) if os.geteuid() == 0 and shutil.which("mount") else None
    if done is None or done.returncode:
        pytest.skip(f"no tmpfs can be mounted here ({done.stderr.strip() if done else 'not root'})")
    try:
        yield str(folder)
    finally:
        subprocess.run(["umount", str(folder)], check=False)


def fill_up(folder):
    """Write one file into `folder` until its file system is full (ENOSPC), so the next write fails."""
    with open(os.path.join(folder, "filler"), "wb", buffering=0) as f:
        with contextlib.suppress(OSError):
            while True:
                f.write(b"\0" * 4096)


@pytest.fixture
def read_only_folder(tmp_path):
    """An empty folder no file can be written in: chmod 555, or for root (who ignores it) a read-only tmpfs."""
    folder = tmp_path / "read_only"
    if os.geteuid() != 0:
        folder.mkdir()
        folder.chmod(0o555)
        yield str(folder)
        folder.chmod(0o755)
        return
    with mounted_tmpfs(folder, "64k", read_only=True):
        yield str(folder)
