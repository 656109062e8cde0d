"""Rows in, tokenized features out.

``load_rows`` reads a task's split either from local files (CSV, TSV, JSONL/JSON lines)
or, only when no file is given and the task has a hub dataset, through ``datasets``
(an optional extra, imported lazily). ``encode`` tokenizes rows into a list of feature
dicts that the Trainer and the plain inference loops share; ``collate`` pads a batch.
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from typing import Optional, Sequence

from .tasks import DATA_DIR, TaskSpec

__all__ = ["Rows", "load_rows", "rows_from_args", "encode", "Collator", "label_maps"]

_SPLIT_ALIASES = {"validation": "dev", "val": "dev", "eval": "dev", "training": "train"}


@dataclass
class Rows:
    """Texts (one tuple per example), raw labels (None when no labels were asked for) and where each
    row came from (``locs``: "line 7" of a file, "row 7" of a hub split; None for --text)."""

    texts: list[tuple[str, ...]]
    labels: Optional[list]
    source: str
    locs: Optional[list[str]] = None

    def __len__(self) -> int:
        return len(self.texts)

    def head(self, n: Optional[int]) -> "Rows":
        if n is None or n >= len(self):
            return self
        return Rows(self.texts[:n], None if self.labels is None else self.labels[:n], self.source,
                    None if self.locs is None else self.locs[:n])

    def where(self, i: int) -> str:
        """``source line N`` of row ``i``, for error messages."""
        return self.source if self.locs is None else f"{self.source} {self.locs[i]}"


_DELIMITERS = {".csv": ",", ".tsv": "\t", ".txt": "\t"}
_JSON_LINES = (".jsonl", ".json", ".ndjson")
# A field wholly wrapped in double quotes, a quote inside written twice (what csv writers emit).
_QUOTED = {d: re.compile(r'"((?:[^"]|"")*)"(?=' + re.escape(d) + r'|$)') for d in _DELIMITERS.values()}
_NOT_UTF8 = re.compile("[\udc80-\udcff]")  # what surrogateescape decodes a non-UTF-8 byte to


def _split_line(line: str, delimiter: str) -> list[str]:
    """The fields of one line. A field wholly wrapped in double quotes is unwrapped (``""`` inside is one
    quote); any other quote is text, so a stray quote never swallows the rows after it. A record is one
    line: fields cannot span lines."""
    fields, i, quoted = [], 0, _QUOTED[delimiter]
    while True:
        m = quoted.match(line, i) if line.startswith('"', i) else None
        if m:
            fields.append(m.group(1).replace('""', '"'))
            i = m.end()
        else:
            j = line.find(delimiter, i)
            j = len(line) if j < 0 else j
            fields.append(line[i:j])
            i = j
        if i >= len(line):
            return fields
        i += len(delimiter)


def _lines(path: str):
    """(line number, text) of every line; bytes that are not UTF-8 come through as surrogates
    (``surrogateescape``) so the caller can name the line and column that holds them."""
    with open(path, "rb") as f:
        data = f.read()
    if data.startswith(b"\xef\xbb\xbf"):  # UTF-8 byte-order mark (Excel writes one)
        data = data[3:]
    for n, raw in enumerate(data.splitlines(), 1):
        yield n, raw.decode("utf-8", errors="surrogateescape")


def _check_utf8(path: str, n: int, fields: dict) -> None:
    for column, value in fields.items():
        m = _NOT_UTF8.search(value) if isinstance(value, str) else None
        if m:
            byte = ord(m.group()) - 0xDC00
            raise ValueError(f"{path} line {n}, column {column!r}: byte 0x{byte:02x} is not UTF-8 text; save the "
                             "file as UTF-8 (for example `iconv -f latin1 -t utf-8 IN > OUT`)")


def _read_table(path: str) -> tuple[list[str], list[tuple[str, dict]]]:
    """(columns, [(location, record)]) of a local CSV, TSV or JSON-lines file (see the README's "Data files")."""
    ext = os.path.splitext(path)[1].lower()
    if ext not in _DELIMITERS and ext not in _JSON_LINES:
        raise ValueError(f"unsupported data file type {ext!r} for {path}: use .csv, .tsv or .jsonl")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"data file {path} does not exist")
    records, columns = [], {}
    if ext in _JSON_LINES:
        for n, line in _lines(path):
            if not line.strip():
                continue
            try:
                r = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path} line {n} is not a JSON object per line: {e}") from None
            if not isinstance(r, dict):
                raise ValueError(f"{path} line {n} is a JSON {type(r).__name__}, not an object with named fields")
            _check_utf8(path, n, {k: v for k, v in r.items()})
            columns.update(dict.fromkeys(r))
            records.append((f"line {n}", r))
        if not records:
            raise ValueError(f"{path} holds no JSON lines: it needs one object per line, one line per example")
        return list(columns), records
    delimiter, header = _DELIMITERS[ext], None
    what = "tab" if delimiter == "\t" else "comma"
    for n, line in _lines(path):
        if header is None:
            header = _split_line(line, delimiter)
            _check_utf8(path, n, {f"header field {k + 1}": h for k, h in enumerate(header)})
            dup = sorted({h for h in header if header.count(h) > 1})
            if not line.strip() or dup:
                raise ValueError(f"{path} line 1 must be a header naming each column once; it is {line!r}")
            continue
        if not line.strip():
            continue
        fields = _split_line(line, delimiter)
        if len(fields) != len(header):
            raise ValueError(f"{path} line {n} has {len(fields)} {what}-separated fields, the header has "
                             f"{len(header)} ({header}): wrap a field that holds a {what} in double quotes "
                             'and write a quote inside it as "" (fields cannot span lines)')
        r = dict(zip(header, fields))
        _check_utf8(path, n, r)
        records.append((f"line {n}", r))
    if header is None:
        raise ValueError(f"{path} is empty: it needs a header row naming the columns, then one row per example")
    if not records:
        raise ValueError(f"{path} has a header (columns {header}) but no rows")
    return header, records


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


def _is_empty(value) -> bool:
    return value is None or (isinstance(value, str) and not value.strip())


def load_rows(task: TaskSpec, split: str = "train", data: Optional[str] = None,
              text_columns: Optional[Sequence[str]] = None, label_column: Optional[str] = None,
              split_column: Optional[str] = None, max_rows: Optional[int] = None,
              require_labels: bool = True, skip_rows: int = 0) -> Rows:
    """One split of a task as ``Rows``.

    ``data`` is a local file; without it the task's shipped file (``movie_reviews``) or its
    hub dataset is used. When the file has a split column (``--split-column``, or the task's),
    only rows of ``split`` are kept; otherwise the whole file is the split. Labels are read only
    when ``require_labels``; then an empty or missing one is an error naming its line.
    """
    split = _SPLIT_ALIASES.get(split, split)
    text_columns = tuple(text_columns) if text_columns else task.text_columns
    label_column = label_column or task.label_column
    split_column = split_column or task.split_column
    if data is None and task.local_file is not None:
        data = os.path.join(DATA_DIR, task.local_file)
    if data is not None:
        columns, records = _read_table(data)
        source = data
    else:
        hub = _from_hub(task, split)
        source = f"hub:{task.hub[0]}/{task.hub[1] or ''}[{split}]"
        # lazily: --max-rows stops reading a large hub split early
        columns, records = list(hub.column_names), ((f"row {k + 1}", r) for k, r in enumerate(hub))
        split_column = None
    if not 1 <= len(text_columns) <= 2:
        raise ValueError(f"give one text column, or two for sentence pairs; got {list(text_columns)}")
    need = list(text_columns) + ([label_column] if require_labels else [])
    if split_column and split_column in columns:
        need.append(split_column)
    missing = [c for c in need if c not in columns]
    if missing:
        raise ValueError(f"{source} has no column(s) {missing}; its columns are {sorted(columns)} "
                         "(set them with --text-column/--label-column)")
    if split_column and split_column in columns:
        records = [(loc, r) for loc, r in records
                   if _SPLIT_ALIASES.get(str(r.get(split_column)), str(r.get(split_column))) == split]
        if not records:
            raise ValueError(f"{source} has no rows whose {split_column!r} is {split!r}")
    texts, labels, locs = [], [] if require_labels else None, []
    for n, (loc, r) in enumerate(records):
        if n < skip_rows:
            continue
        if max_rows is not None and len(texts) >= max_rows:
            break
        for c in need:
            if c not in r:
                raise ValueError(f"{source} {loc} has no field {c!r} (its fields: {list(r)}); give every row "
                                 f"the same fields")
        if require_labels and _is_empty(r[label_column]):
            raise ValueError(f"{source} {loc}, column {label_column!r}: the label is empty; give every row a "
                             "label, or drop the row (predict needs no labels)")
        nulls = [c for c in text_columns if r[c] is None]
        if nulls:
            raise ValueError(f"{source} {loc}, column {nulls[0]!r}: the text is null; give it a string")
        texts.append(tuple(str(r[c]) for c in text_columns))
        locs.append(loc)
        if labels is not None:
            labels.append(r[label_column])
    if not texts:
        raise ValueError(f"{source} holds no rows for split {split!r}")
    return Rows(texts, labels, source, locs)


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
            try:
                f["labels"] = _encode_label(task, rows.labels[i], l2i, num_labels)
            except ValueError as e:
                raise ValueError(f"{rows.where(i)}: {e}") from None
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
