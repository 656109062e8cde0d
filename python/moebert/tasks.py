"""Tasks: where their data lives, how they are scored, and their default hyper-parameters.

Each task names its text columns, its label column and its metrics. GLUE tasks and SQuAD
load from the Hugging Face hub through ``datasets`` (optional); every task also reads
local CSV/TSV/JSONL files, and ``classification`` / ``regression`` are generic tasks for
any local file.

Default hyper-parameters (see ``DISTILL_DEFAULTS`` and the README table): the
distillation recipe is the one in the official MoEBERT example script (MNLI): lr 5e-5,
5 epochs, lambda_distill 5, weight decay 0, no warm-up, max length 128, 4 experts of
768 neurons with 512 shared, hash routing. The teacher recipe is BERT's GLUE recipe
(lr 2e-5, batch 32, 3 epochs). Every value can be overridden on the command line.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Optional

__all__ = ["TaskSpec", "TASKS", "get_task", "DATA_DIR", "DISTILL_DEFAULTS", "FINETUNE_DEFAULTS"]

DATA_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data")


@dataclass(frozen=True)
class TaskSpec:
    name: str
    text_columns: tuple[str, ...]
    label_column: str = "label"
    num_labels: int = 2  # 1 = regression
    metrics: tuple[str, ...] = ("accuracy",)
    hub: Optional[tuple[str, Optional[str]]] = None  # (dataset path, config) for datasets.load_dataset
    hub_splits: dict = field(default_factory=lambda: {"train": "train", "dev": "validation"})
    local_file: Optional[str] = None  # a file shipped in moebert/data
    split_column: Optional[str] = None
    labels: Optional[tuple[str, ...]] = None  # names of classes, in id order
    qa: bool = False

    @property
    def is_regression(self) -> bool:
        return self.num_labels == 1


_GLUE = {
    "cola": TaskSpec("cola", ("sentence",), metrics=("mcc", "accuracy"), hub=("glue", "cola")),
    "sst2": TaskSpec("sst2", ("sentence",), hub=("glue", "sst2")),
    "mrpc": TaskSpec("mrpc", ("sentence1", "sentence2"), metrics=("f1", "accuracy"), hub=("glue", "mrpc")),
    "qqp": TaskSpec("qqp", ("question1", "question2"), metrics=("f1", "accuracy"), hub=("glue", "qqp")),
    "stsb": TaskSpec("stsb", ("sentence1", "sentence2"), num_labels=1, metrics=("pearson", "spearman"),
                     hub=("glue", "stsb")),
    "mnli": TaskSpec("mnli", ("premise", "hypothesis"), num_labels=3, hub=("glue", "mnli"),
                     hub_splits={"train": "train", "dev": "validation_matched", "dev_mm": "validation_mismatched"},
                     labels=("entailment", "neutral", "contradiction")),
    "qnli": TaskSpec("qnli", ("question", "sentence"), hub=("glue", "qnli"), labels=("entailment", "not_entailment")),
    "rte": TaskSpec("rte", ("sentence1", "sentence2"), hub=("glue", "rte"), labels=("entailment", "not_entailment")),
    "wnli": TaskSpec("wnli", ("sentence1", "sentence2"), hub=("glue", "wnli")),
}

TASKS: dict[str, TaskSpec] = {
    **_GLUE,
    "squad": TaskSpec("squad", ("question", "context"), label_column="answers", num_labels=2,
                      metrics=("exact_match", "f1"), hub=("squad", None), qa=True),
    # The demo's embedded task: movie-review sentences (see data/README.md), one file with a split column.
    "movie_reviews": TaskSpec("movie_reviews", ("sentence",), local_file="movie_reviews.tsv", split_column="split",
                              labels=("negative", "positive")),  # the file's label 0 / 1
    # A second shipped task, 3-class: SNLI sentence pairs (see data/README.md), same file layout.
    "snli": TaskSpec("snli", ("premise", "hypothesis"), num_labels=3, local_file="snli.tsv", split_column="split",
                     labels=("entailment", "neutral", "contradiction")),
    "classification": TaskSpec("classification", ("sentence",)),
    "regression": TaskSpec("regression", ("sentence",), num_labels=1, metrics=("pearson", "spearman")),
}


def get_task(name: str) -> TaskSpec:
    key = name.lower().replace("-", "").replace("_", "") if name else name
    for k, spec in TASKS.items():
        if k.replace("_", "") == key:
            return spec
    raise ValueError(f"unknown task {name!r}; known tasks: {sorted(TASKS)} "
                     "(use 'classification' or 'regression' for your own files)")


# Distillation defaults per task: lr, per-device batch, epochs, lambda_distill (weight of the
# layer-wise + prediction distillation terms), max length. MNLI's row is the official
# MoEBERT example script; the other rows reuse that recipe (batch and epochs scaled for
# the small tasks) - override them with flags when reproducing a specific table.
DISTILL_DEFAULTS = {
    "mnli": dict(learning_rate=5e-5, batch_size=64, epochs=5, lam=5.0, max_length=128),
    "qqp": dict(learning_rate=5e-5, batch_size=64, epochs=5, lam=5.0, max_length=128),
    "qnli": dict(learning_rate=5e-5, batch_size=32, epochs=5, lam=5.0, max_length=128),
    "sst2": dict(learning_rate=5e-5, batch_size=32, epochs=5, lam=5.0, max_length=128),
    "cola": dict(learning_rate=5e-5, batch_size=16, epochs=10, lam=5.0, max_length=128),
    "stsb": dict(learning_rate=5e-5, batch_size=16, epochs=10, lam=5.0, max_length=128),
    "mrpc": dict(learning_rate=5e-5, batch_size=16, epochs=10, lam=5.0, max_length=128),
    "rte": dict(learning_rate=5e-5, batch_size=16, epochs=10, lam=5.0, max_length=128),
    "wnli": dict(learning_rate=5e-5, batch_size=16, epochs=10, lam=5.0, max_length=128),
    "squad": dict(learning_rate=5e-5, batch_size=32, epochs=5, lam=5.0, max_length=384),
}
_DISTILL_FALLBACK = dict(learning_rate=5e-5, batch_size=32, epochs=5, lam=5.0, max_length=128)

FINETUNE_DEFAULTS = {
    "squad": dict(learning_rate=3e-5, batch_size=12, epochs=2, max_length=384),
}
_FINETUNE_FALLBACK = dict(learning_rate=2e-5, batch_size=32, epochs=3, max_length=128)


def distill_defaults(task: str) -> dict:
    return dict(DISTILL_DEFAULTS.get(get_task(task).name, _DISTILL_FALLBACK))


def finetune_defaults(task: str) -> dict:
    return dict(FINETUNE_DEFAULTS.get(get_task(task).name, _FINETUNE_FALLBACK))
