"""Rows in, tokenized features out.

``load_rows`` reads a task's split either from local files (CSV, TSV, JSONL/JSON lines)
or, only when no file is given and the task has a hub dataset, through ``datasets``
(an optional extra, imported lazily). ``encode`` tokenizes rows into a list of feature
dicts that the Trainer and the plain inference loops share; ``collate`` pads a batch.
"""
from __future__ import annotations

import csv
import json
import os
from dataclasses import dataclass
from typing import Optional, Sequence

from .tasks import DATA_DIR, TaskSpec

__all__ = ["Rows", "load_rows", "rows_from_args", "encode", "Collator", "label_maps"]

_SPLIT_ALIASES = {"validation": "dev", "val": "dev", "eval": "dev", "training": "train"}


@dataclass
class Rows:
    """Texts (one tuple per example) and raw labels (None when the file has no label column)."""

    texts: list[tuple[str, ...]]
    labels: Optional[list]
    source: str

    def __len__(self) -> int:
        return len(self.texts)

    def head(self, n: Optional[int]) -> "Rows":
        if n is None or n >= len(self):
            return self
        return Rows(self.texts[:n], None if self.labels is None else self.labels[:n], self.source)


def _read_table(path: str) -> list[dict]:
    ext = os.path.splitext(path)[1].lower()
    if not os.path.isfile(path):
        raise FileNotFoundError(f"data file {path} does not exist")
    with open(path, encoding="utf-8", newline="") as f:
        if ext in (".jsonl", ".json", ".ndjson"):
            rows = []
            for n, line in enumerate(f, 1):
                if line.strip():
                    try:
                        rows.append(json.loads(line))
                    except json.JSONDecodeError as e:
                        raise ValueError(f"{path}:{n} is not a JSON object per line: {e}") from None
            return rows
        if ext in (".csv", ".tsv", ".txt"):
            return list(csv.DictReader(f, delimiter="\t" if ext in (".tsv", ".txt") else ","))
    raise ValueError(f"unsupported data file type {ext!r} for {path}: use .csv, .tsv or .jsonl")


def _from_hub(task: TaskSpec, split: str):
    if task.hub is None:
        raise ValueError(f"task {task.name!r} has no hub dataset: pass a local file with --data "
                         "(CSV/TSV/JSONL) and the column options")
    hub_split = task.hub_splits.get(split, split)
    try:
        import datasets  # optional extra: pip install 'moebert-kernels[data]'
    except ImportError:
        raise ImportError(f"loading {task.hub[0]}/{task.hub[1] or ''} from the hub needs the optional "
                          "'datasets' package (pip install 'moebert-kernels[data]'), or pass local files "
                          "with --data") from None
    return datasets.load_dataset(task.hub[0], task.hub[1], split=hub_split)


def load_rows(task: TaskSpec, split: str = "train", data: Optional[str] = None,
              text_columns: Optional[Sequence[str]] = None, label_column: Optional[str] = None,
              split_column: Optional[str] = None, max_rows: Optional[int] = None,
              require_labels: bool = True, skip_rows: int = 0) -> Rows:
    """One split of a task as ``Rows``.

    ``data`` is a local file; without it the task's shipped file (``movie_reviews``) or its
    hub dataset is used. When the file has a split column (``--split-column``, or the task's),
    only rows of ``split`` are kept; otherwise the whole file is the split.
    """
    split = _SPLIT_ALIASES.get(split, split)
    text_columns = tuple(text_columns) if text_columns else task.text_columns
    label_column = label_column or task.label_column
    split_column = split_column or task.split_column
    if data is None and task.local_file is not None:
        data = os.path.join(DATA_DIR, task.local_file)
    if data is not None:
        records = _read_table(data)
        source = data
    else:
        records = _from_hub(task, split)
        source = f"hub:{task.hub[0]}/{task.hub[1] or ''}[{split}]"
        split_column = None
    columns = set(records.column_names) if hasattr(records, "column_names") else \
        (set(records[0]) if len(records) else set())
    need = list(text_columns) + ([label_column] if require_labels else [])
    if split_column and split_column in columns:
        need.append(split_column)
    missing = [c for c in need if c not in columns]
    if missing:
        raise ValueError(f"{source} has no column(s) {missing}; its columns are {sorted(columns)} "
                         "(set them with --text-column/--label-column)")
    if split_column and split_column in columns:
        records = [r for r in records if _SPLIT_ALIASES.get(str(r[split_column]), str(r[split_column])) == split]
        if not records:
            raise ValueError(f"{source} has no rows whose {split_column!r} is {split!r}")
    texts, labels = [], [] if label_column in columns else None
    for n, r in enumerate(records):
        if n < skip_rows:
            continue
        if max_rows is not None and len(texts) >= max_rows:
            break
        if task.qa:
            texts.append((str(r[text_columns[0]]), str(r[text_columns[1]])))
        else:
            texts.append(tuple("" if r[c] is None else str(r[c]) for c in text_columns))
        if labels is not None:
            labels.append(r[label_column])
    if not texts:
        raise ValueError(f"{source} holds no rows for split {split!r}")
    return Rows(texts, labels, source)


def rows_from_args(task: TaskSpec, args, require_labels: bool = True) -> Rows:
    """``load_rows`` with a command's data options."""
    return load_rows(task, args.split, args.data, args.text_column, getattr(args, "label_column", None),
                     args.split_column, args.max_rows, require_labels, getattr(args, "skip_rows", 0) or 0)


def label_maps(task: TaskSpec, raw_labels: Optional[list], config=None) -> Optional[dict]:
    """label -> id for a classification task.

    Uses, in order: the model config's own names (a fine-tuned teacher records them), the task's
    class names, integer labels as they are, else the sorted set of string labels.
    """
    if task.is_regression or task.qa:
        return None
    if config is not None:
        l2i = {str(k): int(v) for k, v in (getattr(config, "label2id", None) or {}).items()}
        if l2i and not all(k.startswith("LABEL_") for k in l2i):
            return l2i
    if task.labels is not None:
        return {name: i for i, name in enumerate(task.labels)}
    if raw_labels is None:
        return None
    values = sorted({str(v) for v in raw_labels})
    if all(_is_int(v) for v in values):
        return {v: int(v) for v in values}
    return {v: i for i, v in enumerate(values)}


def _is_int(v: str) -> bool:
    try:
        int(v)
        return True
    except ValueError:
        return False


def _encode_label(task: TaskSpec, raw, l2i: Optional[dict], num_labels: int):
    if task.is_regression:
        try:
            return float(raw)
        except (TypeError, ValueError):
            raise ValueError(f"regression label {raw!r} is not a number") from None
    key = str(raw)
    if l2i is not None and key in l2i:
        y = l2i[key]
    elif _is_int(key):
        y = int(key)  # a GLUE hub row whose label is already an id
    else:
        raise ValueError(f"label {raw!r} is not one of the model's labels {sorted(l2i or {})}")
    if not 0 <= y < num_labels:
        raise ValueError(f"label {raw!r} -> id {y} is outside [0, {num_labels}) for a {num_labels}-class model")
    return y


def encode(tokenizer, task: TaskSpec, rows: Rows, max_length: int = 128, l2i: Optional[dict] = None,
           num_labels: Optional[int] = None) -> list[dict]:
    """Tokenize ``rows`` into feature dicts (``input_ids``, ``attention_mask``, maybe
    ``token_type_ids``, and ``labels`` when the rows have labels). No padding here."""
    num_labels = task.num_labels if num_labels is None else num_labels
    if task.qa:
        return _encode_qa(tokenizer, rows, max_length)
    firsts = [t[0] for t in rows.texts]
    seconds = [t[1] for t in rows.texts] if len(rows.texts[0]) > 1 else None
    enc = tokenizer(firsts, seconds, truncation=True, max_length=max_length)
    feats = []
    for i in range(len(rows)):
        f = {k: enc[k][i] for k in enc.keys()}
        if rows.labels is not None:
            f["labels"] = _encode_label(task, rows.labels[i], l2i, num_labels)
        feats.append(f)
    return feats


def _answer(raw) -> tuple[str, int]:
    """(text, char start) of a SQuAD answer field: the hub's dict of lists or a JSON string."""
    if isinstance(raw, str):
        raw = json.loads(raw)
    texts, starts = raw["text"], raw["answer_start"]
    if isinstance(texts, str):
        return texts, int(starts)
    return (texts[0], int(starts[0])) if texts else ("", -1)


def _encode_qa(tokenizer, rows: Rows, max_length: int) -> list[dict]:
    """SQuAD features: one window per example (context truncated), answer token span as
    ``start_positions``/``end_positions`` (0, the [CLS] token, when the answer was cut off)."""
    questions = [t[0] for t in rows.texts]
    contexts = [t[1] for t in rows.texts]
    enc = tokenizer(questions, contexts, truncation="only_second", max_length=max_length,
                    return_offsets_mapping=True)
    feats = []
    for i in range(len(rows)):
        offsets = enc["offset_mapping"][i]
        seq_ids = enc.sequence_ids(i)
        f = {k: enc[k][i] for k in enc.keys() if k != "offset_mapping"}
        f["offset_mapping"] = [o if s == 1 else None for o, s in zip(offsets, seq_ids)]
        if rows.labels is not None:
            text, start_char = _answer(rows.labels[i])
            end_char = start_char + len(text)
            s = e = 0
            for k, o in enumerate(f["offset_mapping"]):
                if o is None:
                    continue
                if o[0] <= start_char < o[1] and s == 0:
                    s = k
                if o[0] < end_char <= o[1]:
                    e = k
            if s == 0 or e < s:
                s = e = 0
            f["start_positions"], f["end_positions"] = s, e
            f["answer_text"] = text
        feats.append(f)
    return feats


class Collator:
    """Pads a list of feature dicts into a batch; keeps only model inputs and labels."""

    _KEEP = ("input_ids", "attention_mask", "token_type_ids", "labels", "start_positions", "end_positions")

    def __init__(self, tokenizer, pad_to_multiple_of: Optional[int] = None):
        self.tokenizer, self.pad_to_multiple_of = tokenizer, pad_to_multiple_of

    def __call__(self, features: list[dict]) -> dict:
        import torch

        feats = [{k: v for k, v in f.items() if k in self._KEEP} for f in features]
        extra = {}
        for key in ("labels", "start_positions", "end_positions"):
            if key in feats[0]:
                vals = [f.pop(key) for f in feats]
                dtype = torch.float32 if isinstance(vals[0], float) else torch.long
                extra[key] = torch.tensor(vals, dtype=dtype)
        batch = self.tokenizer.pad(feats, padding=True, pad_to_multiple_of=self.pad_to_multiple_of,
                                   return_tensors="pt")
        batch = dict(batch)
        batch.update(extra)
        return batch
