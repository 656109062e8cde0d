"""``moebert evaluate`` (task metrics + throughput) and ``moebert predict`` (batched inference).

A MoEBERT model routes through a forward pre-hook that builds every layer's hash plan once
per batch from ``input_ids``, so plain batched calls here get one routing plan per batch.
"""
from __future__ import annotations

import contextlib
import json
import sys
import time
from typing import Optional

import numpy as np
import torch

__all__ = ["predict_logits", "score", "throughput", "compare", "run_evaluate", "predict_rows", "run_predict"]

_INPUTS = ("input_ids", "attention_mask", "token_type_ids")


def _by_length(feats: list[dict]) -> list[int]:
    """Feature order, longest first: batches of similar length pad (and compute) less."""
    return sorted(range(len(feats)), key=lambda i: -len(feats[i]["input_ids"]))


def _batches(feats: list[dict], tokenizer, batch_size: int, order: list[int]):
    from .data import Collator

    collate = Collator(tokenizer)
    for i in range(0, len(order), batch_size):
        yield collate([feats[k] for k in order[i:i + batch_size]])


@torch.no_grad()
def predict_logits(model, feats: list[dict], tokenizer, batch_size: int = 64, device: str = "cpu"):
    """Logits for every feature, in input order: ``[N, C]`` numpy, or ``(start, end)`` lists for QA.
    Batches are formed by length (one routing plan per batch, little padding) and put back in order."""
    model.eval()
    order = _by_length(feats)
    outs, starts, ends = [], [], []
    for batch in _batches(feats, tokenizer, batch_size, order):
        inputs = {k: v.to(device) for k, v in batch.items() if k in _INPUTS}
        out = model(**inputs)
        if hasattr(out, "start_logits"):
            mask = inputs["attention_mask"]
            for s, e, m in zip(out.start_logits.float().cpu(), out.end_logits.float().cpu(), mask.cpu()):
                n = int(m.sum())
                starts.append(s[:n].numpy())
                ends.append(e[:n].numpy())
        else:
            outs.append(out.logits.float().cpu().numpy())
    inverse = np.argsort(order)
    if starts:
        return [starts[k] for k in inverse], [ends[k] for k in inverse]
    return np.concatenate(outs)[inverse]


def _best_span(start: np.ndarray, end: np.ndarray, offsets: list, max_answer: int = 30) -> Optional[tuple]:
    best, span = -np.inf, None
    context = [k for k, o in enumerate(offsets[:len(start)]) if o is not None]
    if not context:
        return None
    order_s = sorted(context, key=lambda k: -start[k])[:20]
    order_e = sorted(context, key=lambda k: -end[k])[:20]
    for s in order_s:
        for e in order_e:
            if s <= e < s + max_answer and start[s] + end[e] > best:
                best, span = start[s] + end[e], (s, e)
    return span


def score(task, logits, feats: list[dict], contexts: Optional[list[str]] = None, golds=None) -> dict:
    """Task metrics from logits (GLUE conventions; SQuAD EM/F1 for QA)."""
    from .metrics import compute_metrics, squad_scores

    if task.qa:
        starts, ends = logits
        preds = []
        for f, s, e, ctx in zip(feats, starts, ends, contexts):
            span = _best_span(s, e, f["offset_mapping"])
            preds.append("" if span is None else ctx[f["offset_mapping"][span[0]][0]:f["offset_mapping"][span[1]][1]])
        return squad_scores(preds, golds)
    gold = np.array([f["labels"] for f in feats])
    pred = logits[:, 0] if task.is_regression else logits.argmax(-1)
    return compute_metrics(task.metrics, pred, gold)


@torch.no_grad()
def throughput(model, feats: list[dict], tokenizer, batch_size: int = 64, device: str = "cpu",
               repeats: int = 3, warmup: int = 1) -> float:
    """Examples per second of batched inference over ``feats`` (best of ``repeats`` passes)."""
    model.eval()
    batches = [{k: v.to(device) for k, v in b.items() if k in _INPUTS}
               for b in _batches(feats, tokenizer, batch_size, _by_length(feats))]
    sync = torch.cuda.synchronize if str(device).startswith("cuda") else (lambda: None)
    for _ in range(warmup):
        model(**batches[0])
    sync()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        for b in batches:
            model(**b)
        sync()
        best = min(best, time.perf_counter() - t0)
    return len(feats) / best


def compare(models: dict, task, feats: list[dict], tokenizer, device: str = "cpu", rounds: int = 2,
            batch_size: int = 64, speed_feats: Optional[list[dict]] = None) -> dict:
    """Metrics, parameter counts and ex/s of several models on the same features (timed on
    ``speed_feats`` when given). The timing passes are interleaved (model A, B, ..., A, B, ...;
    best pass counts) so every model sees the same load."""
    from .common import describe, parameter_counts

    out = {}
    for name, m in models.items():
        total, active = parameter_counts(m)
        out[name] = dict(score(task, predict_logits(m, feats, tokenizer, batch_size, device), feats),
                         params_total=total, params_active=active, model=describe(m), examples_per_s=0.0)
    for _ in range(rounds):
        for name, m in models.items():
            out[name]["examples_per_s"] = max(out[name]["examples_per_s"],
                                              throughput(m, speed_feats or feats, tokenizer, batch_size, device,
                                                         repeats=1))
    return out


def _golds(task, rows):
    from .data import _answer

    if not task.qa or rows.labels is None:
        return None
    out = []
    for raw in rows.labels:
        if isinstance(raw, str):
            raw = json.loads(raw)
        texts = raw["text"] if isinstance(raw["text"], list) else [raw["text"]]
        out.append(texts or [_answer(raw)[0]])
    return out


def _load(args, task):
    """``(model, tokenizer, device)``: the PyTorch checkpoint of ``--model``, or with ``--onnx`` the exported
    file run in ONNX Runtime on CPU (called like the HF model)."""
    from .common import load_any, load_tokenizer, resolve_device

    if not getattr(args, "onnx", None):
        device = resolve_device(args.device)
        return load_any(args.model, task, device), load_tokenizer(args.model), device
    from moebert_kernels.onnx import OrtModel

    model = OrtModel(args.onnx, threads=torch.get_num_threads())
    if model.config is None:
        raise ValueError(f"{args.onnx} holds no config.json: pass a folder written by `moebert export`")
    need = "start_logits" if task.qa else "logits"
    if need not in model.output_names:
        raise ValueError(f"{args.onnx} outputs {model.output_names}; task {task.name!r} needs {need!r}")
    return model, load_tokenizer(args.onnx), "cpu"


def run_evaluate(args) -> int:
    from .common import describe, parameter_counts
    from .data import encode, label_maps, rows_from_args
    from .outputs import check_output, replaced_file
    from .tasks import get_task

    task = get_task(args.task)
    if args.output:
        check_output(args.output, {"--model": args.model, "--onnx": args.onnx, "--data": args.data},
                     getattr(args, "overwrite", False))
    model, tokenizer, device = _load(args, task)
    rows = rows_from_args(task, args)
    feats = encode(tokenizer, task, rows, args.max_length or 128, label_maps(task, rows.labels, model.config),
                   getattr(model.config, "num_labels", task.num_labels))
    logits = predict_logits(model, feats, tokenizer, args.batch_size, device)
    result = score(task, logits, feats, [t[1] for t in rows.texts] if task.qa else None, _golds(task, rows))
    if not args.no_throughput:
        result["examples_per_s"] = throughput(model, feats, tokenizer, args.batch_size, device)
    if isinstance(model, torch.nn.Module):
        total, active = parameter_counts(model)
        result.update(params_total=total, params_active=active)
    result.update(model=describe(model) if isinstance(model, torch.nn.Module) else f"ONNX export of {describe(model)}")
    result.update(examples=len(rows), split=args.split, runtime="onnxruntime" if args.onnx else "pytorch")
    print(json.dumps(result, indent=2))
    if args.output:
        with replaced_file(args.output) as tmp, open(tmp, "w") as f:
            json.dump(result, f, indent=2)
    return 0


def predict_rows(task, args):
    """The rows ``moebert predict`` classifies: its --text values, or the rows of --data. A task with two text
    columns (the task's, or two --text-column) reads each --text as a pair split at its one tab, so both
    routes give the encoder the same pair."""
    from .data import Rows, load_rows

    if args.text and args.data:
        raise ValueError("predict takes --text or --data, not both")
    if not args.text:
        if not args.data:
            raise ValueError("predict needs --data FILE or one or more --text")
        return load_rows(task, args.split, args.data, args.text_column, None, args.split_column, args.max_rows,
                         require_labels=False)
    columns = tuple(args.text_column or task.text_columns)
    if len(columns) == 1:
        return Rows([(t,) for t in args.text], None, "--text")
    texts = [tuple(t.split("\t")) for t in args.text]
    bad = [t for t, parts in zip(args.text, texts) if len(parts) != len(columns)]
    if bad:
        raise ValueError(f"task {task.name!r} reads sentence pairs ({' and '.join(columns)}), but --text {bad[0]!r} "
                         f"holds {bad[0].count(chr(9)) + 1} part(s): separate the two texts with one tab "
                         "(in bash: --text $'first\\tsecond')")
    return Rows(texts, None, "--text", [f"--text {k + 1}" for k in range(len(texts))])


def run_predict(args) -> int:
    from .data import encode
    from .outputs import check_output, replaced_file
    from .tasks import get_task

    task = get_task(args.task)
    if args.output:
        check_output(args.output, {"--model": args.model, "--onnx": args.onnx, "--data": args.data},
                     getattr(args, "overwrite", False))
    rows = predict_rows(task, args)
    model, tokenizer, device = _load(args, task)
    feats = encode(tokenizer, task, rows, args.max_length or 128)
    logits = predict_logits(model, feats, tokenizer, args.batch_size, device)
    id2label = getattr(model.config, "id2label", None) or {}
    with contextlib.ExitStack() as stack:
        out = sys.stdout
        if args.output:
            out = stack.enter_context(open(stack.enter_context(replaced_file(args.output)), "w"))
        for i, t in enumerate(rows.texts):
            if task.qa:
                span = _best_span(logits[0][i], logits[1][i], feats[i]["offset_mapping"])
                om = feats[i]["offset_mapping"]
                rec = {"question": t[0], "answer": "" if span is None else t[1][om[span[0]][0]:om[span[1]][1]]}
            elif task.is_regression:
                rec = {"text": list(t), "score": float(logits[i, 0])}
            else:
                p = torch.softmax(torch.from_numpy(logits[i]), -1)
                k = int(p.argmax())
                rec = {"text": list(t) if len(t) > 1 else t[0], "label": id2label.get(k, k), "label_id": k,
                       "prob": round(float(p[k]), 6)}
            out.write(json.dumps(rec) + "\n")
    return 0
