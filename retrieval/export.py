"""What a trained run gives the rest of the pipeline: the joined head ensemble, the hand-off files of
the export splits, and the evaluation of a checkpoint on a split.

Exports embed through the model rebuilt from the checkpoint (checkpoint.encoder_from_checkpoint) and
encoders.embed_split, the path prepare_data.py --checkpoint and --eval_only use, so an exported file
and a later re-embedding always agree. With both towers frozen the towers' features of a split are
computed once (features.FeatureCache) and only the trained heads run per dim: the same numbers
(tests/test_train.py) without re-running the CNN for each dim. The train split's are cut from the
views cached for training (features.FeatureCache.image_from_wider), not computed a second time.
"""
from __future__ import annotations

import os
from typing import Any

import torch

from retrieval import checkpoint, handoff, io, metrics
from retrieval.data import DatasetSplit
from retrieval.dev_evaluation import dev_embeddings, dev_results, selection_rsum
from retrieval.dual_encoder import DualEncoder, join_members
from retrieval.encoders import embed_split
from retrieval.features import FeatureCache, project_features, split_views
from retrieval.train_settings import TrainSettings


def join_ensemble(settings: TrainSettings, dim: int, member_paths: list[str], dev_split: DatasetSplit,
                  device: torch.device) -> str:
    """<run>/d<dim>/best.pt: the members' best checkpoints joined into one HeadEnsemble model
    (dual_encoder.join_members), evaluated on dev from the cached features (per nested dim too)."""
    members = [checkpoint.build_from_checkpoint(path) for path in member_paths]
    model_config = settings.model_config(dim)
    model = join_members([member for member, _ in members], model_config).to(device)
    features = settings.feature_cache(device)
    cache = {"image": features.image(model, dev_split, split_views(settings.test_flip), settings.seed),
             "text": features.text(model, dev_split)}
    results = dev_results(dev_embeddings(model, dev_split, device, cache, settings.batch_size_eval,
                                         settings.num_workers), model.nested_dims)
    dev = results["dev"]
    run_dir = os.path.join(settings.model_dir, settings.run_name)
    best_path = os.path.join(run_dir, f"d{dim}", "best.pt")
    member_epochs = [saved["epoch"] for _, saved in members]
    checkpoint.write_checkpoint(best_path, model, checkpoint.model_record(model, model_config), settings.record(),
                                checkpoint.run_tag(settings.run_name, dim), epoch=max(member_epochs),
                                best_rsum=selection_rsum(results), member_epochs=member_epochs,
                                members=[os.path.relpath(p, run_dir) for p in member_paths])
    io.append_jsonl(os.path.join(run_dir, "log.jsonl"), {"dim": dim, "ensemble_of": len(members), **results})
    print(f"[d{dim}] ensemble of {len(members)} (member epochs {member_epochs}): "
          f"dev {metrics.format_metrics(dev)} -> {best_path}", flush=True)
    return best_path


def export_paths(settings: TrainSettings) -> list[str]:
    """The hand-off files a training run writes (what train_dual_encoder.py --list_exports prints)."""
    if settings.export_dir == "none":
        return []
    return [export_path(settings, dim, split) for dim in settings.embedding_dim for split in settings.export_splits]


def export_path(settings: TrainSettings, dim: int, split: str) -> str:
    """<export_dir>/<tag>_<split>.h5, the tag being the checkpoint's (checkpoint.run_tag)."""
    return os.path.join(settings.export_dir, f"{checkpoint.run_tag(settings.run_name, dim)}_{split}.h5")


def image_features(settings: TrainSettings, features: FeatureCache, model: DualEncoder,
                   split: DatasetSplit) -> torch.Tensor:
    """The frozen image tower's features of an exported split. The train split's come from the
    --cache_views views training cached (its views 0 / 1 are the export's plain / mirror views), so
    its images do not run through the tower a second time; other splits through features.image."""
    views = split_views(settings.test_flip)
    cut = features.image_from_wider(model, split, views, settings.seed, settings.cache_views)
    if cut is None:
        return features.image(model, split, views, settings.seed)
    print(f"{split.split}: embedded from the feature cache ({views} of the {settings.cache_views} views cached "
          "in training; no image-tower pass)", flush=True)
    return cut


def trained_for(model: DualEncoder, saved: dict[str, Any]) -> dict[str, Any]:
    """The attrs that say what the embeddings were trained to survive: "nested_dims" (the prefixes
    trained, the full dim last; a prefix is used truncated and renormalised) and "trained_quantization"
    (--quantization_aware), each only when set."""
    attrs = {"nested_dims": model.nested_dims, "trained_quantization": saved["args"].get("quantization_aware")}
    return {key: value for key, value in attrs.items() if value is not None}


def export(settings: TrainSettings, checkpoint_path: str, splits: dict[str, DatasetSplit], device: torch.device,
           dim: int) -> list[tuple[str, dict[str, Any]]]:
    """Write <export_dir>/<tag>_<split>.h5 for each export split from the given checkpoint; returns
    [(path, metrics of the split)]."""
    model, saved = checkpoint.build_from_checkpoint(checkpoint_path)
    encoder = checkpoint.encoder_from_checkpoint(checkpoint_path, device, built=(model, saved))
    features = settings.feature_cache(device) if settings.freeze_image and settings.freeze_text else None
    written = []
    for split_name in settings.export_splits:
        split = splits.get(split_name) or settings.load_split(split_name)
        path = export_path(settings, dim, split_name)
        embedded = None
        if features is not None:  # --train_image_blocks / --train_text_layers: cached inputs through the trained part
            embedded = project_features(model, image_features(settings, features, model, split),
                                        features.text(model, split), device, settings.train_image_blocks,
                                        settings.train_text_layers)
        emb = embed_split(encoder, split, settings.batch_size_eval, settings.num_workers, embedded=embedded)
        emb.attrs.update(seed=settings.seed, trained_epochs=saved["epoch"], **trained_for(model, saved))
        handoff.write_embeddings(path, emb)
        result = metrics.evaluate(emb.image_embeddings, emb.text_embeddings, emb.text_to_image)
        print(f"[d{dim}] {split_name}: {metrics.format_metrics(result)} -> {path}", flush=True)
        written.append((path, result))
    return written


def evaluate_checkpoint(settings: TrainSettings) -> dict[str, Any]:
    """--eval_only: exact retrieval metrics of --checkpoint on --split, embedded from pixels and tokens."""
    split = settings.load_split(settings.split)
    encoder = checkpoint.encoder_from_checkpoint(settings.checkpoint, settings.device)
    emb = embed_split(encoder, split, settings.batch_size_eval, settings.num_workers)
    result = metrics.evaluate(emb.image_embeddings, emb.text_embeddings, emb.text_to_image)
    print(f"{settings.checkpoint} on {split.dataset}/{split.split} ({len(emb.image_ids)} images, "
          f"{len(emb.captions)} captions):")
    print(metrics.format_metrics(result))
    return result
