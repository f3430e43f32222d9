"""TrainSettings: every train_dual_encoder.py flag that training, its dev evaluation and its exports
read, in one frozen record built once by the script from its command line and passed explicitly (as
retrieval/sweep.py's SweepSettings is), and the two things built straight from it: a split of its data
set and its frozen-tower feature cache.

No defaults here: the command line is their one home. A --head_ensemble member's settings are
dataclasses.replace(...) of the run's (retrieval/training_run.py new_run).
"""
from __future__ import annotations

import dataclasses
import os
import types
from collections.abc import Mapping
from typing import Any

import torch

from retrieval import data
from retrieval.data import DatasetSplit
from retrieval.errors import UserError
from retrieval.features import FeatureCache


@dataclasses.dataclass(frozen=True)
class TrainSettings:
    """The trainer's flags of the same name (lists as tuples), and `arguments`: the command line as
    parsed, kept only to be recorded (record())."""
    # data
    dataset: str
    data_dir: str
    num_workers: int
    split: str            # --eval_only's split
    # model
    image_encoder: str
    image_weights: str
    image_size: int | None
    image_pool: str
    text_encoder: str
    text_layers: tuple[int, ...] | None
    text_weights: str
    embedding_dim: tuple[int, ...]
    head: str
    head_hidden: int
    head_dropout: float
    head_input_dropout: float | None
    head_ensemble: int
    matryoshka_dims: tuple[int, ...] | None
    test_flip: bool
    temperature: float
    # training
    batch_size: int
    captions_per_image: int
    lr: float
    head_lr: float
    text_lr: float
    weight_decay: float
    warmup: float
    epochs: int
    max_steps: int
    grad_accum: int
    freeze_image: bool
    freeze_text: bool
    train_image_blocks: int
    train_text_layers: int
    cache_views: int
    matryoshka_weights: tuple[float, ...] | None
    quantization_aware: str | None
    amp: str
    # run
    model_dir: str
    run_name: str
    save_every: int
    resume: bool
    overwrite: bool
    export_dir: str
    export_splits: tuple[str, ...]
    device: str
    seed: int
    # evaluate
    checkpoint: str
    batch_size_eval: int
    arguments: Mapping[str, Any]

    def __post_init__(self):
        # Lists (as argparse gives them) become tuples, so a frozen settings object is really immutable.
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if isinstance(value, list):
                object.__setattr__(self, field.name, tuple(value))
        object.__setattr__(self, "arguments", types.MappingProxyType(dict(self.arguments)))

    def record(self) -> dict[str, Any]:
        """What args.json and a checkpoint's "args" hold: the command line as parsed, with these settings'
        values (a member's seed, head_ensemble and matryoshka_dims), lists as argparse gives them."""
        values = {field.name: getattr(self, field.name) for field in dataclasses.fields(self)
                  if field.name != "arguments"}
        return {**self.arguments, **{name: list(value) if isinstance(value, tuple) else value
                                     for name, value in values.items()}}

    def model_config(self, embedding_dim: int) -> dict[str, Any]:
        """The model part of the arguments for one dim (dual_encoder.build_model / model_record read
        dual_encoder.MODEL_KEYS from it): record() with that embedding_dim."""
        return {**self.record(), "embedding_dim": embedding_dim}

    def require_data(self) -> None:
        """UserError unless --data_dir holds the data set. The trainer never downloads or generates one
        (data.load_split would generate a missing synthetic set, with other settings than prepare_data.py
        was given), so the message names the prepare_data.py command that does."""
        marker = os.path.join(self.data_dir, "captions.jsonl") if self.dataset == "synthetic" else self.data_dir
        if os.path.exists(marker):
            return
        prepare = f"python prepare_data.py --dataset {self.dataset} --data_dir {self.data_dir}"
        if self.dataset == "synthetic":
            raise UserError(f"{self.data_dir}: no synthetic dataset here; generate it first: {prepare} "
                            "--fetch_only data")
        if self.dataset in ("flickr8k", "coco"):
            raise UserError(f"{self.data_dir}: dataset folder not found; fetch it first ({prepare} --download "
                            "--fetch_only data) or give --data_dir the folder that holds it")
        raise UserError(f"{self.data_dir}: dataset folder not found; give --data_dir the folder that holds it "
                        "(layouts: docs/datasets.md)")

    def load_split(self, split: str) -> DatasetSplit:
        """One split of the training data set (require_data: the trainer never generates data)."""
        self.require_data()
        return data.load_split(self.dataset, self.data_dir, split, self.seed)

    def feature_cache(self, device: torch.device) -> FeatureCache:
        """The frozen-tower feature cache of these towers, in <model_dir>/feature_cache."""
        return FeatureCache(os.path.join(self.model_dir, "feature_cache"), device, self.batch_size_eval,
                            self.num_workers, self.amp,
                            (self.image_encoder, self.image_weights, self.image_pool),
                            (self.text_encoder, self.text_weights, self.text_layers),
                            self.train_image_blocks, self.train_text_layers)
