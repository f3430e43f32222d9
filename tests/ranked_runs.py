"""Run folders with rank files, as run_experiments.py writes them: runs/<id>.json plus runs/<id>.ranks.npz
(t2i / i2t ranks, 1-based, inf = miss, and text_to_image). The JSON's metrics are computed from the ranks
with the protocol's own metrics.summarize, so the pair is consistent the way the sweep's is."""
import os

import numpy as np

from retrieval import io
from retrieval import metrics as protocol

DATA = {"dataset": "toyset", "split": "test", "model": "toy-model", "dim": 8}
K_VALUES = (1, 5)


def synthetic_ranks(rng, text_to_image, quality, image_effect=1.0):
    """Realistic-looking ranks: each image has a difficulty shared by its captions (so captions of one image
    are correlated), `quality` moves every rank up; a few misses (inf) for candidate lists."""
    n_images = int(text_to_image.max()) + 1
    difficulty = rng.normal(size=n_images) * image_effect
    t2i = np.floor(np.exp(rng.normal(1.0 - quality, 1.2, size=text_to_image.size) + difficulty[text_to_image]))
    i2t = np.floor(np.exp(rng.normal(0.5 - quality, 1.2, size=n_images) + difficulty))
    return {"t2i": 1.0 + t2i, "i2t": 1.0 + i2t}


def write_ranked_run(folder, name, precision, dim, ranks, text_to_image, *, exact=False, rerank=False,
                     candidate_size=None, bytes_per_vector=32, qps=1000.0, p50=1.0, p99=None, index="flat",
                     index_params=None, data=DATA, gallery_size=None, memory_extra=None, extra_metrics=None,
                     ranks_file=True):
    """One run JSON whose metrics come from `ranks`, and (ranks_file=True) its rank file beside it."""
    n_images = int(text_to_image.max()) + 1
    metrics = {}
    for direction, values in ranks.items():
        metrics.update({f"{direction}_{k}": v for k, v in protocol.summarize(values, K_VALUES).items()})
    if set(ranks) == {"t2i", "i2t"}:
        metrics["RSUM"] = protocol.rsum(metrics, K_VALUES)
    metrics.update(extra_metrics or {})
    speed = {}
    for direction in ranks:
        speed.update({f"{direction}_qps": qps, f"{direction}_latency_p50_ms": p50,
                      f"{direction}_latency_p99_ms": p99 if p99 is not None else 2 * p50})
    run = {"config": {"dim": dim, "native_dim": 8, "dim_method": "none" if dim == 8 else "pca",
                      "precision": precision, "candidate_size": candidate_size, "rerank": rerank, "exact": exact,
                      "k_values": list(K_VALUES), "index": index, "index_params": index_params or {},
                      "gallery_size": gallery_size or n_images,
                      "data_path": f"coco_data/{data['dataset']}/{data['model']}_test.h5"},
           "data": dict(data), "env": {"cpu": "test cpu", "threads": 1, "hostname": "here"},
           "metrics": metrics, "speed": speed,
           "memory": dict({"bytes_per_vector": bytes_per_vector}, **(memory_extra or {}))}
    os.makedirs(os.path.join(folder, "runs"), exist_ok=True)
    if ranks_file:
        run["ranks_file"] = f"{name}.ranks.npz"
        io.write_ranks(os.path.join(folder, "runs", f"{name}.ranks.npz"), ranks, text_to_image)
    io.write_json(os.path.join(folder, "runs", f"{name}.json"), run)
    return run


def captions_of(n_images, per_image=5):
    return np.repeat(np.arange(n_images), per_image)
