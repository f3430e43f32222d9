"""Named training recipes: train_dual_encoder.py --recipe NAME takes them as its defaults (flags given
on the command line still win). The one definition used by bench/bench_train.py, submit_job.sh and
the docs (docs/training.md, docs/benchmarks.md), so a recipe cannot drift between them.

    bench  the Flickr8k benchmark (docs/benchmarks.md): frozen EfficientNet-Lite2 (multi-stage pooling)
           + MiniLM layers 0/2/4/6, 4 cached train views, MLP heads with input dropout 0.4, a 2 x 256
           head ensemble joined into one 512-d embedding, mirror-averaged test images, 30 epochs.
    demo   the Quickstart (submit_job.sh): frozen EfficientNet-Lite0 at 128 px (the synthetic images are 96 px;
           5x faster than 224) + MiniLM, 256-d heads, 10 epochs; both towers' weights install from pip,
           so it runs offline.
    quick  real data in about a quarter of an hour on 2 CPU cores (README "Quickstart"): the demo's towers
           and heads with one cached view per train image (no flipped copy) and 15 epochs.
"""
RECIPES: dict[str, dict[str, object]] = {
    "bench": dict(image_encoder="efficientnet_lite2", image_pool="multi", text_encoder="minilm",
                  text_layers=[0, 2, 4, 6], freeze_image=True, freeze_text=True, cache_views=4,
                  captions_per_image=5, batch_size=128, lr=3e-4, weight_decay=0.5, head="mlp", head_hidden=2048,
                  head_dropout=0.2, head_input_dropout=0.4, head_ensemble=2, temperature=0.05, epochs=30,
                  test_flip=True, embedding_dim=[512]),
    "demo": dict(image_encoder="efficientnet_lite0", image_weights="imagenet", image_size=128, text_encoder="minilm",
                 freeze_image=True, freeze_text=True, embedding_dim=[256], epochs=10, batch_size=64,
                 captions_per_image=5, lr=1e-3),
    "quick": dict(image_encoder="efficientnet_lite0", image_weights="imagenet", text_encoder="minilm",
                  freeze_image=True, freeze_text=True, cache_views=1, embedding_dim=[256], epochs=15,
                  batch_size=128, captions_per_image=5, lr=1e-3),
}
