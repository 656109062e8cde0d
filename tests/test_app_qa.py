"""The SQuAD path (the original code's QA importance could not run): a few steps of the chain on local JSONL."""
import json

import pytest
import torch

from moebert.cli import main
from test_app_chain import WORDS, make_base


def _squad_rows(path, n, seed):
    g = torch.Generator().manual_seed(seed)
    with open(path, "w") as f:
        for _ in range(n):
            words = [WORDS[int(i)] for i in torch.randint(0, len(WORDS), (10,), generator=g)]
            s = int(torch.randint(0, 8, (1,), generator=g))
            answer = " ".join(words[s:s + 2])
            context = " ".join(words)
            start = len(" ".join(words[:s])) + (1 if s else 0)
            assert context[start:start + len(answer)] == answer
            f.write(json.dumps({"question": "what is " + words[s], "context": context,
                                "answers": {"text": [answer], "answer_start": [start]}}) + "\n")


@pytest.fixture(scope="module")
def qa_chain(tmp_path_factory):
    root = tmp_path_factory.mktemp("qa")
    p = lambda *a: str(root.joinpath(*a))  # noqa: E731
    make_base(p("base"))
    _squad_rows(p("train.jsonl"), 16, 0)
    _squad_rows(p("dev.jsonl"), 6, 1)
    train = ["--task", "squad", "--device", "cpu", "--batch-size", "8", "--max-steps", "2", "--max-length", "48",
             "--learning-rate", "1e-3"]
    codes = [
        main(["finetune", "--model", p("base"), "--output", p("teacher"), "--data", p("train.jsonl"), *train]),
        main(["importance", "--model", p("teacher"), "--output", p("imp.safetensors"), "--task", "squad",
              "--data", p("train.jsonl"), "--quiet", "--device", "cpu"]),
        main(["convert", "--model", p("teacher"), "--task", "squad", "--output", p("student0"), "--importance",
              p("imp.safetensors"), "--num-experts", "2", "--expert-size", "24", "--shared", "8"]),
        main(["distill", "--teacher", p("teacher"), "--student", p("student0"), "--output", p("student"),
              "--data", p("train.jsonl"), *train]),
        main(["evaluate", "--model", p("student"), "--task", "squad", "--data", p("dev.jsonl"), "--output",
              p("metrics.json"), "--no-throughput", "--device", "cpu"]),
    ]
    return root, codes


def test_squad_chain_runs(qa_chain):
    root, codes = qa_chain
    assert codes == [0] * 5
    from safetensors.torch import load_file

    imp = load_file(str(root / "imp.safetensors"))["importance"]
    assert imp.shape == (2, 64) and float(imp.sum()) > 0
    cfg = json.load(open(root / "student" / "config.json"))
    assert cfg["architectures"] == ["BertForQuestionAnswering"] and cfg["moebert"]["num_experts"] == 2
    m = json.load(open(root / "metrics.json"))
    assert m["examples"] == 6 and 0 <= m["exact_match"] <= 100 and 0 <= m["f1"] <= 100


def test_squad_answer_spans_decode_to_the_answer(tmp_path):
    from transformers import AutoTokenizer

    from moebert.data import encode, load_rows
    from moebert.tasks import get_task

    make_base(str(tmp_path / "base"))
    _squad_rows(str(tmp_path / "rows.jsonl"), 8, 2)
    tok = AutoTokenizer.from_pretrained(str(tmp_path / "base"))
    rows = load_rows(get_task("squad"), "train", str(tmp_path / "rows.jsonl"))
    feats = encode(tok, get_task("squad"), rows, 64)
    for f, raw in zip(feats, rows.labels):
        s, e = f["start_positions"], f["end_positions"]
        assert 0 < s <= e
        assert tok.decode(f["input_ids"][s:e + 1]) == raw["text"][0]
    # An answer cut off by truncation points at [CLS].
    short = encode(tok, get_task("squad"), rows, 12)
    assert any(f["start_positions"] == 0 == f["end_positions"] for f in short)
