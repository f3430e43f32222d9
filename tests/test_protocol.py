"""The evaluation protocol against a brute-force numpy reference (stable sort = lower index wins ties)."""
import numpy as np
import pytest

from retrieval import metrics


def brute_force_ranks(scores, relevant_sets):
    """Position (1-based) of the first relevant item after a stable sort by descending score."""
    ranks = []
    for row, relevant in zip(scores, relevant_sets):
        order = np.argsort(-row, kind="stable")
        ranks.append(1 + next(i for i, item in enumerate(order) if item in relevant))
    return np.array(ranks, dtype=float)


def reference(images, texts, text_to_image, k_values):
    t2i_sets = [{int(i)} for i in text_to_image]
    i2t_sets = [set(np.flatnonzero(text_to_image == i).tolist()) for i in range(images.shape[0])]
    out = {}
    for name, scores, sets in (("t2i", texts @ images.T, t2i_sets), ("i2t", images @ texts.T, i2t_sets)):
        ranks = brute_force_ranks(scores, sets)
        for k in k_values:
            out[f"{name}_R@{k}"] = 100 * np.mean(ranks <= k)
        out[f"{name}_MRR"] = np.mean(1 / ranks)
        out[f"{name}_mean_rank"] = np.mean(ranks)
        out[f"{name}_median_rank"] = np.median(ranks)
    return out


def test_metrics_match_brute_force(random_split):
    images, texts, text_to_image = random_split
    got = metrics.evaluate(images, texts, text_to_image, k_values=(1, 5, 10))
    want = reference(images, texts, text_to_image, (1, 5, 10))
    for key, value in want.items():
        assert got[key] == pytest.approx(value), key
    assert got["RSUM"] == pytest.approx(sum(want[f"{d}_R@{k}"] for d in ("t2i", "i2t") for k in (1, 5, 10)))
    assert 0 < got["t2i_R@1"] < 100  # the data is neither trivial nor hopeless


def test_ties_go_to_lower_index():
    # Quantised-looking data: few distinct values, so exact ties are everywhere.
    rng = np.random.default_rng(1)
    images = rng.integers(-1, 2, size=(30, 4)).astype(np.float32)
    text_to_image = np.repeat(np.arange(30), 3)
    rng.shuffle(text_to_image)
    text_to_image[:30] = np.arange(30)  # every image keeps at least one caption
    texts = rng.integers(-1, 2, size=(90, 4)).astype(np.float32)
    scores = texts @ images.T
    assert (np.sort(scores, axis=1)[:, 1:] == np.sort(scores, axis=1)[:, :-1]).any()  # ties exist
    got = metrics.evaluate(images, texts, text_to_image, k_values=(1, 3, 10))
    want = reference(images, texts, text_to_image, (1, 3, 10))
    for key, value in want.items():
        assert got[key] == pytest.approx(value), key


def test_i2t_hit_if_any_caption_in_top_k():
    images = np.eye(3, dtype=np.float32)
    # image 0 has two captions: one far, one perfect -> i2t rank 1 (best relevant rank).
    # image 2 has one caption, beaten only by caption 0 -> rank 2.
    texts = np.array([[0, 0, 1], [1, 0, 0], [0, 1, 0], [0, 0.9, 0.1]], dtype=np.float32)
    text_to_image = np.array([0, 0, 1, 2])
    ranks = metrics.exact_ranks(images, texts, text_to_image, "i2t")
    assert ranks.tolist() == [1.0, 1.0, 2.0]


def test_candidate_list_miss_counts_as_miss(random_split):
    images, texts, text_to_image = random_split
    scores = texts @ images.T
    order = np.argsort(-scores, axis=1, kind="stable")
    full = metrics.candidate_ranks(order, text_to_image, "t2i")
    assert np.array_equal(full, metrics.exact_ranks(texts, images, text_to_image, "t2i"))
    top5 = metrics.candidate_ranks(order[:, :5], text_to_image, "t2i")
    assert np.array_equal(np.isinf(top5), full > 5)
    summary = metrics.summarize(top5, (1, 5))
    assert summary["R@5"] == pytest.approx(100 * np.mean(full <= 5))
    assert summary["MRR"] == pytest.approx(np.mean(np.where(full <= 5, 1 / full, 0)))
    assert summary["mean_rank"] is None
    padded = np.where(np.arange(order.shape[1])[None, :] < 3, order, -1)  # FAISS pads with -1
    assert np.array_equal(np.isinf(metrics.candidate_ranks(padded, text_to_image, "t2i")), full > 3)
