"""retrieval/indexes.py: reduction, FAISS precision mapping, list ordering, re-ranking, timing helpers."""
import time

import numpy as np
import pytest

from retrieval import indexes, precisions, reduction, timing, two_stage
from retrieval.handoff import l2_normalize


@pytest.fixture
def vectors():
    rng = np.random.default_rng(0)
    scales = 1.0 / np.sqrt(1 + np.arange(32))
    return l2_normalize(rng.normal(size=(600, 32)) * scales + 0.05)


def test_pca_matches_numpy_svd_and_renormalises(vectors):
    projection = reduction.fit_reduction(vectors, 8, "pca")
    centred = vectors - vectors.mean(axis=0)
    _, _, vt = np.linalg.svd(centred, full_matrices=False)
    # Same subspace as the top-8 right singular vectors (signs may differ).
    assert np.allclose(np.abs(projection.T @ vt[:8].T), np.eye(8), atol=1e-4)
    reduced = reduction.reduce(vectors, projection)
    assert reduced.shape == (600, 8)
    assert np.allclose(np.linalg.norm(reduced, axis=1), 1, atol=1e-5)
    expected = vectors @ projection
    assert np.allclose(reduced, expected / np.linalg.norm(expected, axis=1, keepdims=True), atol=1e-5)


def test_truncate_random_native_and_above(vectors):
    assert reduction.fit_reduction(vectors, 32, "pca") is None  # native: untouched
    truncated = reduction.reduce(vectors, reduction.fit_reduction(vectors, 4, "truncate"))
    assert np.allclose(truncated, l2_normalize(vectors[:, :4]), atol=1e-6)
    random = reduction.fit_reduction(vectors, 8, "random", seed=3)
    assert np.allclose(random.T @ random, np.eye(8), atol=1e-5)
    assert np.array_equal(random, reduction.fit_reduction(vectors, 8, "random", seed=3))
    assert not np.allclose(random, reduction.fit_reduction(vectors, 8, "random", seed=4))
    with pytest.raises(ValueError, match="above the native"):
        reduction.fit_reduction(vectors, 64, "pca")


@pytest.mark.parametrize("precision,code_bytes", [("fp32", 128), ("fp16", 64), ("bf16", 64), ("int8", 32),
                                                  ("int4", 16), ("binary", 4), ("pq", 4), ("opq", 4), ("itq", 4),
                                                  ("rq", 4)])
def test_code_sizes_and_serialized_bytes(vectors, precision, code_bytes):
    index, timing = indexes.build_index(precision, vectors[:300], vectors[300:])
    assert precisions.bytes_per_vector(index, precision, 32) == code_bytes
    assert precisions.serialized_bytes(index) >= 300 * code_bytes
    assert timing["trained"] == (precision in ("int8", "int4", "pq", "opq", "itq", "rq"))


@pytest.mark.parametrize("precision", ["int8", "int4"])
def test_single_query_int_search_is_not_degenerate(vectors, precision):
    gallery, fit, queries = vectors[:200], vectors[200:500], vectors[500:]
    index, _ = indexes.build_index(precision, gallery, fit)
    searcher = two_stage.make_searcher(index, precision)
    batch_scores, batch_ids = searcher(queries, 20)
    scores, ids = searcher(queries[:1], 20)
    # One query alone gets exactly what it gets inside a batch: nothing is fitted on the query batch.
    assert np.array_equal(ids[0], batch_ids[0])
    assert np.allclose(scores[0], batch_scores[0])
    assert len(np.unique(scores[0])) > 15  # a real ranking, not a few collapsed levels
    decoded = two_stage.decoded_gallery(index, precision, gallery)
    correlation = np.corrcoef(decoded.ravel(), gallery.ravel())[0, 1]
    assert correlation > (0.999 if precision == "int8" else 0.95)
    exact_top = np.argsort(-(queries[:1] @ gallery.T)[0], kind="stable")[:5]
    assert len(set(exact_top) & set(ids[0][:10])) >= 4


def test_compressed_scores_are_query_dot_decoded(vectors):
    gallery, queries = vectors[:200], vectors[500:]
    for precision in ("fp16", "int8", "pq", "rq"):  # rq: the look-up-table search, no decode
        index, _ = indexes.build_index(precision, gallery, vectors[200:500])
        scores, ids = two_stage.make_searcher(index, precision)(queries, 10)
        decoded = two_stage.decoded_gallery(index, precision, gallery)
        expected = np.take_along_axis(queries @ decoded.T, ids, axis=1)
        assert np.allclose(scores, expected, atol=1e-4), precision


def test_binary_score_is_dot_product_of_signs_and_ties_go_to_lower_index():
    rng = np.random.default_rng(1)
    gallery = rng.normal(size=(300, 16)).astype(np.float32)
    queries = rng.normal(size=(20, 16)).astype(np.float32)
    index, _ = indexes.build_index("binary", gallery, gallery)
    scores, ids = two_stage.make_searcher(index, "binary")(queries, 300)
    signs = two_stage.compressed_queries("binary", queries) @ two_stage.decoded_gallery(index, "binary", gallery).T
    assert np.array_equal(scores, np.take_along_axis(signs, ids, axis=1))
    assert np.array_equal(two_stage.sort_candidates(scores, ids), np.argsort(-signs, axis=1, kind="stable"))


def test_sort_candidates_breaks_ties_by_index_and_puts_padding_last():
    scores = np.array([[0.5, 0.9, 0.5, 0.9, -1.0]], dtype=np.float32)
    ids = np.array([[7, 4, 2, 9, -1]])
    assert two_stage.sort_candidates(scores, ids).tolist() == [[4, 9, 2, 7, -1]]


@pytest.mark.parametrize("num_candidates", [5, 150])  # gather path and full-matmul path
def test_rerank_equals_brute_force(vectors, num_candidates):
    gallery, queries = vectors[:200], vectors[500:510]
    rng = np.random.default_rng(2)
    candidates = np.stack([rng.choice(200, num_candidates, replace=False) for _ in range(10)])
    got = two_stage.rerank(queries, gallery, candidates)
    for row, query in enumerate(queries):
        members = np.sort(candidates[row])
        want = members[np.argsort(-(gallery[members] @ query), kind="stable")]
        assert np.array_equal(got[row], want)


def test_overlap_at_k():
    found = np.array([[1, 2, 3], [4, 5, 6]])
    reference = np.array([[3, 2, 9], [7, 8, 9]])
    assert two_stage.overlap_at_k(found, reference, 2) == pytest.approx(100 * (1 / 2 + 0) / 2)
    assert two_stage.overlap_at_k(found, reference, 3) == pytest.approx(100 * (2 / 3 + 0) / 2)


def test_pinned_threads_keeps_faiss_threads_and_restores_the_blas_switch():
    import faiss
    from threadpoolctl import threadpool_info
    before_threads, before_switch = faiss.omp_get_max_threads(), faiss.cvar.distance_compute_blas_threshold
    with timing.pinned_threads(2, dim=256):
        # An OpenMP build of BLAS (FAISS's wheel bundles one) must not drag FAISS's own pool down to 1 thread.
        assert faiss.omp_get_max_threads() == 2
        assert faiss.cvar.distance_compute_blas_threshold == timing.blas_threshold(256)
        for lib in threadpool_info():
            if lib.get("user_api") == "blas":
                assert lib["num_threads"] == (2 if timing.faiss_owned(lib) else timing.BLAS_THREADS)
    assert faiss.omp_get_max_threads() == before_threads
    assert faiss.cvar.distance_compute_blas_threshold == before_switch
    # 20 queries go to BLAS and one query does not, in the unit this FAISS counts in.
    unit = 1 if timing.FAISS_DEFAULT_BLAS_THRESHOLD <= timing.BLAS_MIN_QUERIES else 256
    assert 1 * unit < timing.blas_threshold(256) <= timing.BLAS_MIN_QUERIES * unit


@pytest.mark.parametrize("index_type", ["ivf", "hnsw"])
@pytest.mark.parametrize("precision", ["fp32", "int8", "binary", "pq", pytest.param("opq", marks=pytest.mark.slow),
                                       "itq"])
def test_ivf_and_hnsw_build_and_find_neighbours(vectors, index_type, precision):
    gallery = vectors[:400]
    params = {"nlist": 8, "nprobe": 8, "hnsw_m": 8, "ef_search": 32, "pq_subdim": 4}
    index, _ = indexes.build_index(precision, gallery, vectors, index_type, params)
    indexes.set_search_params(index, index_type, params, k=10)
    scores, ids = two_stage.make_searcher(index, precision)(gallery[:20], 10)
    assert (ids >= 0).all()
    # A stored vector finds itself first (or an exact duplicate code: binary/pq can collide).
    self_hit = ids[:, 0] == np.arange(20)
    assert self_hit.mean() >= (0.9 if precision in ("fp32", "int8") else 0.5)
    assert two_stage.decoded_gallery(index, precision, gallery).shape == gallery.shape


@pytest.mark.parametrize("index_type", ["ivf", "hnsw"])
@pytest.mark.parametrize("precision", ["fp16", "int8", "binary", "pq"])
def test_ivf_and_hnsw_scores_are_compressed_scores(vectors, index_type, precision):
    # Larger = better and equal to compressed query . decoded item, for the graph and list indexes
    # too (FAISS's factory builds HNSW..PQ with the L2 metric whatever it is asked: distances).
    gallery, queries = vectors[:400], vectors[500:]
    params = {"nlist": 8, "nprobe": 8, "hnsw_m": 8, "ef_search": 64, "pq_subdim": 4}
    index, _ = indexes.build_index(precision, gallery, vectors, index_type, params)
    if precision != "binary":
        assert precisions.core_index(index).metric_type == precisions.load_faiss().METRIC_INNER_PRODUCT
    scores, ids = two_stage.make_searcher(index, precision)(queries, 10)
    assert (np.diff(scores, axis=1) <= 1e-6).all()
    decoded = two_stage.decoded_gallery(index, precision, gallery)
    expected = two_stage.compressed_queries(precision, queries, index) @ decoded.T
    assert np.allclose(scores, np.take_along_axis(expected, ids, axis=1), atol=1e-4)


def test_unsupported_reasons():
    assert "divisible by 8" in precisions.unsupported("binary", 12, "flat", {})
    assert "pq_subdim" in precisions.unsupported("pq", 12, "flat", {"pq_subdim": 8})
    assert "divisible by 8" in precisions.unsupported("itq", 12, "hnsw", {})
    assert "pq_subdim=4" in precisions.unsupported("opq", 18, "ivf", {"pq_subdim": 4})
    assert precisions.unsupported("opq", 16, "hnsw", {"pq_subdim": 4}) is None
    assert precisions.unsupported("itq", 16, "ivf", {}) is None
    assert precisions.unsupported("int4", 12, "flat", {}) is None
    assert "flat only" in precisions.unsupported("rq", 16, "ivf", {"pq_subdim": 4})
    assert "flat only" in precisions.unsupported("rq", 16, "hnsw", {"pq_subdim": 4})
    assert precisions.unsupported("rq", 16, "flat", {"pq_subdim": 4}) is None
    assert "pq_subdim=8" in precisions.unsupported("rq", 12, "flat", {"pq_subdim": 8})


@pytest.mark.slow
def test_rq_keeps_more_than_pq_at_the_same_bytes_on_a_short_pca_like_vector():
    # 4 codebooks of 8 bits on 16 dims whose variance decays like PCA output: pq gives each codebook 4 dims of
    # its own (the first block gets most of the variance), rq's codebooks each span all 16. Measured: the
    # squared reconstruction error and the queries whose top-1 under the code is the exact top-1.
    rng = np.random.default_rng(1)
    vectors = l2_normalize(rng.standard_normal((3000, 16)) / np.sqrt(1 + np.arange(16))).astype(np.float32)
    gallery, fit, queries = vectors[:500], vectors[500:2800], vectors[2800:]
    exact_top = (queries @ gallery.T).argmax(axis=1)
    found, error = {}, {}
    for precision in ("pq", "rq"):
        index, _ = indexes.build_index(precision, gallery, fit, "flat", {"pq_subdim": 4})
        assert precisions.bytes_per_vector(index, precision, 16) == 4
        decoded = two_stage.decoded_gallery(index, precision, gallery)
        error[precision] = float(((decoded - gallery) ** 2).sum(axis=1).mean())
        found[precision] = float((two_stage.make_searcher(index, precision)(queries, 1)[1][:, 0] == exact_top).mean())
    assert error["rq"] < 0.9 * error["pq"], error  # measured 0.073 against 0.088
    assert found["rq"] > found["pq"], found


def test_binary_codes_track_cosine_on_anisotropic_data():
    # Like PCA output: the variance sits in the first coordinates, the tail is small noise. Signs of raw
    # coordinates would give the noisy tail as many bits as the signal; the rotated signs must not.
    rng = np.random.default_rng(0)
    scale = np.r_[np.ones(8), np.full(56, 0.02)]
    vectors = reduction.reduce(rng.standard_normal((400, 64)) * scale, None)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    cosine = (vectors[:200] @ vectors[200:].T).ravel()
    hamming_score = (reduction.binary_signs(vectors[:200]) @ reduction.binary_signs(vectors[200:]).T).ravel()
    raw_sign_score = (np.sign(vectors[:200]) @ np.sign(vectors[200:]).T).ravel()
    assert np.corrcoef(cosine, hamming_score)[0, 1] > 0.8
    assert np.corrcoef(cosine, hamming_score)[0, 1] > np.corrcoef(cosine, raw_sign_score)[0, 1] + 0.2


@pytest.mark.parametrize("precision, index_type", [("pq", "flat"), ("pq", "ivf"), ("pq", "hnsw"),
                                                     pytest.param("opq", "ivf", marks=pytest.mark.slow),
                                                     pytest.param("rq", "flat", marks=pytest.mark.slow)])
def test_small_fit_sets_give_one_note_not_a_flood_and_the_same_codes(precision, index_type, capfd):
    import faiss
    rng = np.random.default_rng(3)
    fit = l2_normalize(rng.normal(size=(400, 32)).astype(np.float32))
    params = {"pq_subdim": 8, "nlist": 8}
    index, _ = indexes.build_index(precision, fit, fit, index_type, params)
    err = capfd.readouterr().err
    assert "WARNING clustering" not in err and err.count("note:") == 1 and "400 fit vectors" in err
    # The same index trained with FAISS's own warning threshold encodes the gallery identically: the
    # threshold only decides the warning.
    loud = indexes.make_index(precision, 32, index_type, params, 400)
    loud.train(fit)
    capfd.readouterr()
    codes = [faiss.downcast_index(precisions.core_index(i)) for i in (index, loud)]
    if index_type == "flat":
        assert np.array_equal(codes[0].sa_encode(fit), codes[1].sa_encode(fit))
    else:
        loud.add(fit)
        np.testing.assert_array_equal(two_stage.decoded_gallery(index, precision, fit),
                                      two_stage.decoded_gallery(loud, precision, fit))


# ----------------------------------------------------------------------------- shared coarse quantizers, decodes

def faiss_own_ivf(precision, gallery, fit, params):
    """The IVF index FAISS builds when it trains everything itself (its own k-means, no shared quantizer)."""
    index = indexes.make_index(precision, gallery.shape[1], "ivf", params, gallery.shape[0])
    for cp, _ in indexes.clusterings(index):
        cp.min_points_per_centroid = 1  # what build_index does (only decides FAISS's warning)
    index.train(np.ascontiguousarray(fit))
    index.add(np.ascontiguousarray(gallery))
    indexes.set_search_params(index, "ivf", params, k=10)
    return index


def test_one_coarse_quantizer_serves_every_float_ivf_precision_as_its_own_would(vectors, monkeypatch):
    gallery, fit, queries = vectors[:300], vectors[:500], vectors[500:]
    params = {"nlist": 8, "nprobe": 3, "pq_subdim": 16}  # nprobe < nlist: the lists decide what is found
    coarse = indexes.train_coarse(fit, 8)
    calls = []
    real_train_coarse = indexes.train_coarse
    monkeypatch.setattr(indexes, "train_coarse", lambda *a: calls.append(a) or real_train_coarse(*a))
    shared_precisions = [p for p in precisions.PRECISIONS if indexes.shares_coarse(p, "ivf")]
    assert shared_precisions == ["fp32", "fp16", "bf16", "int8", "int4", "pq"]
    for precision in ["fp32", "fp16", "int8", "int4", "pq"]:
        index, timing = indexes.build_index(precision, gallery, fit, "ivf", params, coarse)
        own = faiss_own_ivf(precision, gallery, fit, params)
        core, own_core = precisions.core_index(index), precisions.core_index(own)
        np.testing.assert_array_equal(core.quantizer.reconstruct_n(0, 8), own_core.quantizer.reconstruct_n(0, 8))
        np.testing.assert_array_equal(two_stage.decoded_gallery(index, precision, gallery),
                                      two_stage.decoded_gallery(own, precision, gallery))
        scores, ids = two_stage.make_searcher(index, precision)(queries, 10)
        own_scores, own_ids = two_stage.make_searcher(own, precision)(queries, 10)
        np.testing.assert_array_equal(ids, own_ids)
        np.testing.assert_array_equal(scores, own_scores)
        assert timing["coarse_train_s"] == coarse.train_s
        assert timing["build_s"] == pytest.approx(coarse.train_s + timing["train_s"] + timing["add_s"])
    assert calls == []  # five precisions, one k-means (the one above)
    # The index keeps what it is given: FAISS does not train its quantizer again.
    planted = indexes.Coarse(l2_normalize(np.random.default_rng(1).normal(size=(8, 32))).astype(np.float32), 0.5)
    index, _ = indexes.build_index("int8", gallery, fit, "ivf", params, planted)
    np.testing.assert_array_equal(precisions.core_index(index).quantizer.reconstruct_n(0, 8), planted.centroids)
    # Without one, the build trains its own (once), timed apart from the rest of its training.
    index, timing = indexes.build_index("int8", gallery, fit, "ivf", params)
    assert len(calls) == 1 and timing["coarse_train_s"] > 0 and "coarse_shared" not in timing
    np.testing.assert_array_equal(precisions.core_index(index).quantizer.reconstruct_n(0, 8), coarse.centroids)
    # opq (rotated space) and the sign codes (bits) cannot take a quantizer of the plain vectors.
    for precision in ("opq", "binary"):
        with pytest.raises(ValueError, match="coarse quantizer"):
            indexes.build_index(precision, gallery, fit, "ivf", params, coarse)


@pytest.mark.parametrize("precision", [pytest.param("opq", marks=pytest.mark.slow), "binary", "itq"])
def test_ivf_that_trains_its_own_coarse_quantizer_equals_faiss_own_build(vectors, precision):
    gallery, fit, queries = vectors[:300], vectors[:500], vectors[500:]
    params = {"nlist": 8, "nprobe": 3, "pq_subdim": 16}
    index, timing = indexes.build_index(precision, gallery, fit, "ivf", params)
    if precision in precisions.SIGN_CODES:  # FAISS's own build of the same bits
        rotation = reduction.code_rotation(index, precision)
        own = indexes.make_index(precision, 32, "ivf", params, 300)
        indexes.quiet_clustering(own, 500)
        own.train(reduction.sign_bits(fit, rotation))
        own.add(reduction.sign_bits(gallery, rotation))
        indexes.set_search_params(own, "ivf", params, k=10)
        searchers = [two_stage.make_searcher(i, precision, rotation) for i in (index, own)]
    else:
        own = faiss_own_ivf(precision, gallery, fit, params)
        searchers = [two_stage.make_searcher(i, precision) for i in (index, own)]
    np.testing.assert_array_equal(precisions.core_index(index).quantizer.reconstruct_n(0, 8),
                                  precisions.core_index(own).quantizer.reconstruct_n(0, 8))
    (scores, ids), (own_scores, own_ids) = (s(queries, 10) for s in searchers)
    np.testing.assert_array_equal(ids, own_ids)
    np.testing.assert_array_equal(scores, own_scores)
    assert timing["coarse_train_s"] > 0 and timing["train_s"] >= 0


@pytest.mark.parametrize("precision", ["pq", pytest.param("opq", marks=pytest.mark.slow)])
def test_ivf_pq_skips_polysemous_training_and_scores_as_faiss_default_build(vectors, precision):
    # index_factory's IVF-PQ relabels each sub-space's centroids for Hamming search (polysemous training, over
    # 10 minutes for OPQ IVF on 10,000 vectors); ADC scores do not depend on the labels, so the lists are equal.
    gallery, fit, queries = vectors[:300], vectors[:500], vectors[500:]
    params = {"nlist": 8, "nprobe": 3, "pq_subdim": 16}
    ours = faiss_own_ivf(precision, gallery, fit, params)
    assert precisions.core_index(ours).do_polysemous_training is False
    default = indexes.make_index(precision, 32, "ivf", params, 300)
    precisions.core_index(default).do_polysemous_training = True  # what index_factory leaves on
    for cp, _ in indexes.clusterings(default):
        cp.min_points_per_centroid = 1
    default.train(np.ascontiguousarray(fit))
    default.add(np.ascontiguousarray(gallery))
    indexes.set_search_params(default, "ivf", params, k=10)
    (scores, ids), (default_scores, default_ids) = (two_stage.make_searcher(i, precision)(queries, 10)
                                                    for i in (ours, default))
    np.testing.assert_array_equal(ids, default_ids)
    np.testing.assert_allclose(scores, default_scores, rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_equal_decode_keys_mean_equal_decoded_galleries(vectors):
    gallery, fit = vectors[:200], vectors[200:500]
    params = {"nlist": 4, "hnsw_m": 8, "pq_subdim": 16}
    for precision in precisions.PRECISIONS:
        decodes = {}
        for index_type, knobs in (("flat", ()), ("hnsw", (("hnsw_m", 8),)), ("ivf", (("nlist", 4),))):
            if precisions.unsupported(precision, 32, index_type, params):
                assert precision in precisions.FLAT_ONLY and index_type != "flat", (precision, index_type)
                continue
            index, _ = indexes.build_index(precision, gallery, fit, index_type, params)
            key = two_stage.decode_key(precision, index_type, knobs)
            decoded = two_stage.decoded_gallery(index, precision, gallery)
            if key in decodes:
                np.testing.assert_array_equal(decoded, decodes[key], err_msg=f"{precision} {index_type}")
            decodes[key] = decoded
        # fp32 and the sign codes decode alike in every structure; the others share flat and HNSW, and IVF
        # (residuals from the list centroids) has its own decode per nlist. rq has the flat index alone.
        alike = precision == "fp32" or precision in precisions.SIGN_CODES + precisions.FLAT_ONLY
        assert len(decodes) == (1 if alike else 2), precision
        if len(decodes) == 2:
            flat, ivf = decodes.values()
            assert not np.array_equal(flat, ivf), precision
    assert two_stage.decode_key("int8", "ivf", (("nlist", 4),)) != two_stage.decode_key("int8", "ivf", (("nlist", 8),))
    # A product code of another sub-quantizer count decodes differently; flat and HNSW of one count alike.
    subdim = {s: two_stage.decoded_gallery(indexes.build_index("pq", gallery, fit, "flat", {"pq_subdim": s})[0], "pq",
                                         gallery) for s in (4, 8)}
    assert not np.array_equal(subdim[4], subdim[8])
    assert two_stage.decode_key("pq", "flat", (("pq_subdim", 4),)) != \
        two_stage.decode_key("pq", "flat", (("pq_subdim", 8),))
    assert two_stage.decode_key("pq", "flat", (("pq_subdim", 4),)) == \
        two_stage.decode_key("pq", "hnsw", (("hnsw_m", 8), ("pq_subdim", 4)))


def test_default_lists_leave_residual_codecs_something_to_learn():
    # A fit set of 200 vectors and a 4,000-item gallery: the rule of thumb (4 sqrt(N) = 253 lists) would make
    # every fit vector its own centroid, train the int8 codec on zero residuals and rank every probed item
    # as its centroid. With the default capped at fit / 39 lists, probing every list gives the flat int8 lists.
    rng = np.random.default_rng(3)
    fit, gallery = l2_normalize(rng.normal(size=(200, 32))), l2_normalize(rng.normal(size=(4000, 32)))
    queries = l2_normalize(gallery[:50] + 0.05 * rng.normal(size=(50, 32)))
    params = {"fit_size": fit.shape[0], "sq_ranges": "per_dim"}
    nlist = indexes.ivf_lists(gallery.shape[0], params)
    assert nlist == 200 // indexes.MIN_POINTS_PER_LIST
    assert indexes.ivf_lists(gallery.shape[0], dict(params, nlist=300)) == 200   # asked for: only capped by fit
    ivf, _ = indexes.build_index("int8", gallery, fit, "ivf", dict(params, nlist=nlist))
    ivf.nprobe = nlist
    flat, _ = indexes.build_index("int8", gallery, fit, "flat", params)
    _, ivf_ids = ivf.search(queries, 10)
    _, flat_ids = flat.search(queries, 10)
    assert np.mean([len(set(a) & set(b)) / 10 for a, b in zip(ivf_ids, flat_ids)]) > 0.9
    assert np.mean(ivf_ids[:, 0] == np.arange(50)) > 0.9      # the noisy copies find their item


def test_rq_candidates_break_ties_by_the_lower_gallery_index():
    # Duplicated gallery rows get one code, so they score exactly alike; the C candidates must be the
    # protocol's: (-score, id) order, whichever of two tied items FAISS's own search keeps at the boundary.
    rng = np.random.default_rng(0)
    base = l2_normalize(rng.normal(size=(300, 8)).astype(np.float32))
    gallery = np.concatenate([base, base[::-1]])          # every row twice, the copy at a higher index
    queries = l2_normalize(rng.normal(size=(50, 8)).astype(np.float32))
    index, _ = indexes.build_index("rq", gallery, gallery, params={"pq_subdim": 4})
    searcher = two_stage.make_searcher(index, "rq")
    decoded = index.reconstruct_n(0, index.ntotal)
    for k in (1, 5, 20, 31):
        _, ids = searcher(queries, k)
        scores = queries @ decoded.T
        want = np.stack([np.lexsort((np.arange(len(gallery)), -row))[:k] for row in scores])
        np.testing.assert_array_equal(np.sort(ids, axis=1), np.sort(want, axis=1))
