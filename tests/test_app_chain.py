"""A tiny end-to-end chain through the `moebert` CLI on a random BertConfig and a few rows of local data:
finetune -> importance -> convert -> distill (+ resume) -> evaluate -> reload -> predict."""
import csv
import json
import os

import pytest
import torch

from moebert.cli import main

WORDS = ("good great fine fun superb lovely bad awful dull boring poor weak movie film plot actors story "
         "the a is was very not really truly").split()


def write_rows(path, n=24, seed=0, fmt="csv", columns=("text", "sentiment")):
    """Labelled toy sentences: label 1 iff the sentence holds more positive than negative words."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(n):
        k = int(torch.randint(3, 9, (1,), generator=g))
        words = [WORDS[int(i)] for i in torch.randint(0, len(WORDS), (k,), generator=g)]
        pos = sum(w in WORDS[:6] for w in words) >= sum(w in WORDS[6:12] for w in words)
        rows.append({columns[0]: " ".join(words), columns[1]: "pos" if pos else "neg"})
    if fmt == "jsonl":
        with open(path, "w") as f:
            for r in rows:
                f.write(json.dumps(r) + "\n")
    else:
        with open(path, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(columns), delimiter="\t" if fmt == "tsv" else ",")
            w.writeheader()
            w.writerows(rows)
    return rows


def make_base(folder, num_labels=2, d_ff=64):
    """A tiny random BERT and a word-level tokenizer, saved like a pretrained folder."""
    import inspect

    from transformers import BertConfig, BertForSequenceClassification, BertTokenizerFast

    os.makedirs(folder, exist_ok=True)
    tokens = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + WORDS
    vocab = os.path.join(folder, "vocab.txt")
    with open(vocab, "w") as f:
        f.write("\n".join(tokens) + "\n")
    if "vocab" in inspect.signature(BertTokenizerFast.__init__).parameters:  # transformers 5
        tok = BertTokenizerFast(vocab={t: i for i, t in enumerate(tokens)}, do_lower_case=True)
    else:
        tok = BertTokenizerFast(vocab_file=vocab, do_lower_case=True)
    assert tok.convert_tokens_to_ids("movie") == tokens.index("movie")
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=len(WORDS) + 5, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=d_ff, max_position_embeddings=64, num_labels=num_labels)
    BertForSequenceClassification(cfg).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    """Runs the whole chain once; the tests below check its products."""
    root = tmp_path_factory.mktemp("chain")
    p = lambda *a: str(root.joinpath(*a))  # noqa: E731
    base = make_base(p("base"))
    write_rows(p("train.csv"), 24, seed=0)
    write_rows(p("dev.jsonl"), 12, seed=1, fmt="jsonl")
    data = ["--task", "classification", "--text-column", "text", "--label-column", "sentiment"]
    train = ["--device", "cpu", "--batch-size", "8", "--learning-rate", "1e-3", "--logging-steps", "1"]
    codes = {}
    codes["finetune"] = main(["finetune", "--model", base, "--output", p("teacher"), "--data", p("train.csv"),
                              "--max-steps", "3", *data, *train])
    codes["importance"] = main(["importance", "--model", p("teacher"), "--output", p("imp.safetensors"),
                                "--data", p("train.csv"), "--batch-size", "8", "--quiet", "--device", "cpu", *data])
    codes["convert"] = main(["convert", "--model", p("teacher"), "--task", "classification", "--output",
                             p("student0"), "--importance", p("imp.safetensors"), "--num-experts", "2",
                             "--expert-size", "24", "--shared", "8"])
    distill = ["distill", "--teacher", p("teacher"), "--student", p("student0"), "--output", p("student"),
               "--data", p("train.csv"), "--save-steps", "2", *data, *train]
    codes["distill"] = main([*distill, "--max-steps", "2"])
    codes["resume"] = main([*distill, "--max-steps", "4", "--resume"])
    codes["evaluate"] = main(["evaluate", "--model", p("student"), "--data", p("dev.jsonl"), "--output",
                              p("metrics.json"), "--batch-size", "5", "--device", "cpu", *data])
    codes["predict"] = main(["predict", "--model", p("student"), "--task", "classification", "--data",
                             p("dev.jsonl"), "--text-column", "text", "--output", p("pred.jsonl"),
                             "--batch-size", "5", "--device", "cpu"])
    return root, codes


def test_every_step_succeeds(chain):
    _, codes = chain
    assert codes == {k: 0 for k in codes}, codes


def test_importance_file(chain):
    root, _ = chain
    from safetensors.torch import load_file

    imp = load_file(str(root / "imp.safetensors"))["importance"]
    assert imp.shape == (2, 64) and bool(torch.isfinite(imp).all()) and float(imp.sum()) > 0


def test_student_checkpoint_is_moebert_without_teacher(chain):
    root, _ = chain
    from safetensors.torch import load_file

    cfg = json.load(open(root / "student" / "config.json"))
    assert cfg["moebert"]["num_experts"] == 2 and cfg["moebert"]["expert_size"] == 24
    assert cfg["id2label"] == {"0": "neg", "1": "pos"}
    keys = load_file(str(root / "student" / "model.safetensors")).keys()
    assert not any("teacher" in k for k in keys)
    n_params = sum(v.numel() for v in load_file(str(root / "student" / "model.safetensors")).values())
    teacher_params = sum(v.numel() for v in load_file(str(root / "teacher" / "model.safetensors")).values())
    assert n_params < 2 * teacher_params  # a teacher copy inside would double it
    # Resume went from checkpoint-2 to step 4.
    assert (root / "student" / "checkpoint-2").is_dir() and (root / "student" / "checkpoint-4").is_dir()
    state = json.load(open(root / "student" / "checkpoint-4" / "trainer_state.json"))
    assert state["global_step"] == 4


def test_distillation_changed_the_student(chain):
    root, _ = chain
    import moebert_kernels as mk

    before = mk.from_pretrained(str(root / "student0"))
    after = mk.from_pretrained(str(root / "student"))
    w0, w1 = mk.moe_layers(before)[0].w1, mk.moe_layers(after)[0].w1
    assert float((w0 - w1).detach().abs().max()) > 0


def test_evaluate_and_predict_match_reloaded_model(chain):
    root, _ = chain
    import moebert_kernels as mk
    from transformers import AutoTokenizer

    metrics = json.load(open(root / "metrics.json"))
    assert metrics["examples"] == 12 and 0.0 <= metrics["accuracy"] <= 1.0
    assert metrics["examples_per_s"] > 0 and metrics["params_active"] < metrics["params_total"]
    preds = [json.loads(line) for line in open(root / "pred.jsonl")]
    rows = [json.loads(line) for line in open(root / "dev.jsonl")]
    assert [p["text"] for p in preds] == [r["text"] for r in rows]

    model = mk.from_pretrained(str(root / "student")).eval()
    tok = AutoTokenizer.from_pretrained(str(root / "student"))
    with torch.no_grad():  # one batch of all 12 here, batches of 5 in predict: same outputs
        enc = tok([r["text"] for r in rows], padding=True, return_tensors="pt")
        probs = torch.softmax(model(**enc).logits, -1)
    got = torch.tensor([p["prob"] for p in preds])
    ids = probs.argmax(-1)
    assert [p["label_id"] for p in preds] == ids.tolist()
    assert [p["label"] for p in preds] == [model.config.id2label[int(i)] for i in ids]
    assert torch.allclose(got, probs.max(-1).values, atol=1e-5)
    gold = torch.tensor([model.config.label2id[r["sentiment"]] for r in rows])
    assert metrics["accuracy"] == pytest.approx(float((ids == gold).float().mean()))
