"""Local data loading (CSV/TSV/JSONL, split column, skip/max rows), the shipped demo data, and the metrics."""
import math

import numpy as np
import pytest

from moebert.data import label_maps, load_rows
from moebert.metrics import compute_metrics, squad_scores
from moebert.tasks import get_task
from test_app_chain import write_rows


@pytest.mark.parametrize("fmt", ["csv", "tsv", "jsonl"])
def test_local_formats(tmp_path, fmt):
    path = str(tmp_path / f"rows.{fmt}")
    rows = write_rows(path, 7, fmt=fmt, columns=("review", "y"))
    got = load_rows(get_task("classification"), "train", path, ["review"], "y")
    assert [t[0] for t in got.texts] == [r["review"] for r in rows]
    assert got.labels == [r["y"] for r in rows]
    assert label_maps(get_task("classification"), got.labels) == {"neg": 0, "pos": 1}
    part = load_rows(get_task("classification"), "train", path, ["review"], "y", skip_rows=2, max_rows=3)
    assert [t[0] for t in part.texts] == [r["review"] for r in rows[2:5]]


def test_sentence_pairs_and_split_column(tmp_path):
    path = tmp_path / "pairs.tsv"
    path.write_text("premise\thypothesis\tlabel\tpart\n"
                    "a man sleeps\tsomeone rests\tentailment\ttrain\n"
                    "a dog runs\ta cat sits\tcontradiction\tdev\n"
                    "kids play\tchildren are outside\tneutral\ttrain\n")
    mnli = get_task("mnli")
    got = load_rows(mnli, "train", str(path), split_column="part")
    assert got.texts == [("a man sleeps", "someone rests"), ("kids play", "children are outside")]
    assert label_maps(mnli, got.labels) == {"entailment": 0, "neutral": 1, "contradiction": 2}
    dev = load_rows(mnli, "validation", str(path), split_column="part")  # alias of dev
    assert dev.labels == ["contradiction"]


def test_shipped_movie_reviews():
    task = get_task("movie_reviews")
    sizes = {s: len(load_rows(task, s)) for s in ("train", "dev", "test")}
    assert sizes == {"train": 8072, "dev": 1000, "test": 1000}
    test = load_rows(task, "test")
    pos = sum(int(y) for y in test.labels) / len(test)
    assert 0.4 < pos < 0.6  # shuffled: both classes in every split
    train = set(t[0] for t in load_rows(task, "train").texts)
    assert not train & set(t[0] for t in test.texts)


def test_shipped_snli():
    task = get_task("snli")
    rows = {s: load_rows(task, s) for s in ("train", "dev", "test")}
    assert {s: len(r) for s, r in rows.items()} == {"train": 10000, "dev": 1000, "test": 2000}
    for r in rows.values():
        counts = {y: r.labels.count(y) for y in task.labels}
        assert sum(counts.values()) == len(r) and min(counts.values()) > 0.3 * len(r)
        assert all(len(t) == 2 and t[0] and t[1] for t in r.texts)
    # train and dev were split by premise, and no test premise is in either
    premises = {s: {t[0] for t in r.texts} for s, r in rows.items()}
    assert not premises["train"] & premises["dev"] and not premises["test"] & (premises["train"] | premises["dev"])
    assert label_maps(task, rows["dev"].labels) == {"entailment": 0, "neutral": 1, "contradiction": 2}


def test_metrics_against_hand_values():
    pred, gold = [1, 1, 0, 0, 1, 0], [1, 0, 0, 1, 1, 0]
    m = compute_metrics(("accuracy", "f1", "mcc"), pred, gold)
    tp, tn, fp, fn = 2, 2, 1, 1
    assert m["accuracy"] == pytest.approx(4 / 6)
    assert m["f1"] == pytest.approx(2 * tp / (2 * tp + fp + fn))
    assert m["mcc"] == pytest.approx((tp * tn - fp * fn) / math.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn)))
    x, y = [1.0, 2.0, 2.0, 4.0, 7.0], [2.0, 1.0, 3.0, 3.0, 9.0]
    r = compute_metrics(("pearson", "spearman"), x, y)
    assert r["pearson"] == pytest.approx(np.corrcoef(x, y)[0, 1])
    rx, ry = [1, 2.5, 2.5, 4, 5], [2, 1, 3.5, 3.5, 5]  # average ranks of the ties
    assert r["spearman"] == pytest.approx(np.corrcoef(rx, ry)[0, 1])
    with pytest.raises(ValueError, match="unknown metric"):
        compute_metrics(("bleu",), pred, gold)


def test_squad_scores():
    s = squad_scores(["The Eiffel tower", "in 1889", "Paris"], [["Eiffel Tower"], ["1889"], ["Lyon", "Marseille"]])
    assert s["exact_match"] == pytest.approx(100 / 3)
    assert s["f1"] == pytest.approx(100 * (1 + 2 / 3 + 0) / 3)
