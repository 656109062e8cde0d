"""GLUE-convention metrics in plain numpy (accuracy, binary F1, Matthews correlation,
Pearson and Spearman) and SQuAD's exact match / token F1."""
from __future__ import annotations

import collections
import re
import string

import numpy as np

__all__ = ["compute_metrics", "squad_scores"]


def accuracy(pred, gold) -> float:
    return float((np.asarray(pred) == np.asarray(gold)).mean())


def f1_binary(pred, gold) -> float:
    """F1 of the positive class (label 1), as GLUE scores MRPC and QQP."""
    pred, gold = np.asarray(pred), np.asarray(gold)
    tp = float(((pred == 1) & (gold == 1)).sum())
    fp = float(((pred == 1) & (gold != 1)).sum())
    fn = float(((pred != 1) & (gold == 1)).sum())
    return 0.0 if tp == 0 else 2 * tp / (2 * tp + fp + fn)


def mcc(pred, gold) -> float:
    """Matthews correlation (multi-class form; equals the binary formula for 2 classes)."""
    pred, gold = np.asarray(pred), np.asarray(gold)
    labels = np.union1d(pred, gold)
    idx = {v: i for i, v in enumerate(labels)}
    C = np.zeros((len(labels), len(labels)))
    for p, g in zip(pred, gold):
        C[idx[g], idx[p]] += 1
    t, p, c, s = C.sum(1), C.sum(0), np.trace(C), C.sum()
    den = np.sqrt((s * s - (p * p).sum()) * (s * s - (t * t).sum()))
    return 0.0 if den == 0 else float((c * s - (t * p).sum()) / den)


def pearson(x, y) -> float:
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    x, y = x - x.mean(), y - y.mean()
    den = np.sqrt((x * x).sum() * (y * y).sum())
    return 0.0 if den == 0 else float((x * y).sum() / den)


def _ranks(x) -> np.ndarray:
    """Average ranks (ties share their mean rank), as scipy.stats.rankdata."""
    x = np.asarray(x, np.float64)
    order = np.argsort(x, kind="mergesort")
    ranks = np.empty(len(x))
    sx = x[order]
    i = 0
    while i < len(x):
        j = i
        while j + 1 < len(x) and sx[j + 1] == sx[i]:
            j += 1
        ranks[order[i:j + 1]] = (i + j) / 2 + 1
        i = j + 1
    return ranks


def spearman(x, y) -> float:
    return pearson(_ranks(x), _ranks(y))


_FNS = {"accuracy": accuracy, "f1": f1_binary, "mcc": mcc, "pearson": pearson, "spearman": spearman}


def compute_metrics(names, pred, gold) -> dict:
    unknown = [n for n in names if n not in _FNS]
    if unknown:
        raise ValueError(f"unknown metric(s) {unknown}; known: {sorted(_FNS)}")
    return {n: _FNS[n](pred, gold) for n in names}


# ---- SQuAD v1.1 scoring: normalise, exact match, token F1 -------------------------------

def _normalize(s: str) -> str:
    s = s.lower()
    s = "".join(ch for ch in s if ch not in set(string.punctuation))
    s = re.sub(r"\b(a|an|the)\b", " ", s)
    return " ".join(s.split())


def _token_f1(pred: str, gold: str) -> float:
    p, g = _normalize(pred).split(), _normalize(gold).split()
    common = collections.Counter(p) & collections.Counter(g)
    same = sum(common.values())
    if same == 0:
        return 0.0
    precision, recall = same / len(p), same / len(g)
    return 2 * precision * recall / (precision + recall)


def squad_scores(preds: list[str], golds: list[list[str]]) -> dict:
    """exact_match and f1 in percent, each the max over an example's gold answers."""
    em = [max(float(_normalize(p) == _normalize(g)) for g in gs) for p, gs in zip(preds, golds)]
    f1 = [max(_token_f1(p, g) for g in gs) for p, gs in zip(preds, golds)]
    return {"exact_match": 100 * float(np.mean(em)), "f1": 100 * float(np.mean(f1))}
