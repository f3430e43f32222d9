"""Two or more models' exports of one split, compared: recall with 95% bootstrap intervals over images, and each
model's paired difference from the first (the same resamples for all), so a gain can be read against the noise.

Reads:  hand-off files of the same split (retrieval/handoff.py), e.g. the _test.h5 exports of bench_train.py runs
Writes: stdout (a markdown table: R@1/5/10 per direction and RSUM, each with its interval, and the paired
        difference from the first file)

Example:
    python bench/compare_exports.py coco_data/flickr8k-heads-v2/dual-flickr8k-heads-v2-d512_test.h5 \
        coco_data/flickr8k-blocks2/dual-flickr8k-blocks2-d512_test.h5
"""
import argparse
import os
import sys

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from retrieval import bootstrap, metrics  # noqa: E402
from retrieval.errors import UserError  # noqa: E402
from retrieval.handoff import read_embeddings  # noqa: E402

K_VALUES = (1, 5, 10)


def ranked(path):
    """(RunRanks, metrics) of one export: exact full ranking in both directions (the protocol of metrics.py)."""
    emb = read_embeddings(path)
    ranks = metrics.split_ranks(emb.image_embeddings, emb.text_embeddings, emb.text_to_image)
    values = metrics.from_ranks(ranks, K_VALUES)
    return bootstrap.per_image(ranks, np.asarray(emb.text_to_image, dtype=np.int64), values), values


def compare(paths, resamples=1000, seed=0):
    """[(path, metrics, intervals)]: intervals of each file's metrics and, for all but the first, of its paired
    difference from the first (keys m_ci_low / m_ci_high, m_delta_ci_low / m_delta_ci_high)."""
    runs = {path: ranked(path) for path in paths}
    for path in paths[1:]:
        if runs[path][0].split != runs[paths[0]][0].split:
            raise UserError(f"{path}: not the same split as {paths[0]} (other images or captions per image)")
    resampler = bootstrap.Resampler(bootstrap.Settings(resamples, 0.95, seed))
    intervals = resampler.intervals({p: run for p, (run, _) in runs.items()}, {p: paths[0] for p in paths[1:]})
    return [(p, runs[p][1], intervals[p]) for p in paths]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("paths", nargs="+", help="exports of one split; the first is the reference")
    parser.add_argument("--bootstrap", type=int, default=1000, help="resamples")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if len(args.paths) < 2:
        parser.error("give at least two exports")
    try:
        rows = compare(args.paths, args.bootstrap, args.seed)
    except UserError as e:
        raise SystemExit(f"error: {e}")
    columns = [f"{d}_R@{k}" for d in ("t2i", "i2t") for k in K_VALUES] + ["RSUM"]
    print("| export | " + " | ".join(columns) + " |")
    print("|---" * (len(columns) + 1) + "|")
    for index, (path, values, ci) in enumerate(rows):
        cells = [f"{values[m]:.1f} [{ci[m + '_ci_low']:.1f}, {ci[m + '_ci_high']:.1f}]" for m in columns]
        print(f"| {os.path.relpath(path)} | " + " | ".join(cells) + " |")
        if index:
            delta = [f"{values[m] - rows[0][1][m]:+.1f} [{ci[m + '_delta_ci_low']:+.1f}, "
                     f"{ci[m + '_delta_ci_high']:+.1f}]" for m in columns]
            print("| minus the first (paired) | " + " | ".join(delta) + " |")
    return rows


if __name__ == "__main__":
    main()
