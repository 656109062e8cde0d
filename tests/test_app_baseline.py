"""The pruned dense baseline (`moebert convert --baseline pruned`): the top-h neurons by importance in one
dense FFN, the same function as a one-expert MoE of width h, loadable with stock HF classes; it distils and
`moebert evaluate` names what it scored."""
import json

import pytest
import torch

import moebert_kernels as mk
from moebert.cli import main
from moebert.convert import prune
from test_app_chain import make_base, write_rows


def _teacher(num_labels=3, d_ff=64):
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=40, hidden_size=32, num_hidden_layers=3, num_attention_heads=2,
                     intermediate_size=d_ff, max_position_embeddings=32, num_labels=num_labels)
    return BertForSequenceClassification(cfg).eval()


@pytest.mark.parametrize("width", [1, 17, 63])
def test_kept_neurons_are_the_top_width_by_importance(width):
    teacher = _teacher()
    importance = torch.rand(3, 64, generator=torch.Generator().manual_seed(width))
    pruned = prune(teacher, importance, width)
    assert pruned.config.intermediate_size == width
    assert pruned.config.moebert_pruned == {"d_ff": 64, "width": width, "ranking": "importance"}
    for l in range(3):
        top = torch.topk(importance[l], width).indices  # independent of expert_neuron_ids
        t, p = teacher.bert.encoder.layer[l], pruned.bert.encoder.layer[l]
        assert torch.equal(p.intermediate.dense.weight, t.intermediate.dense.weight[top])
        assert torch.equal(p.intermediate.dense.bias, t.intermediate.dense.bias[top])
        assert torch.equal(p.output.dense.weight, t.output.dense.weight[:, top])
        assert torch.equal(p.output.dense.bias, t.output.dense.bias)
    assert teacher.config.intermediate_size == 64  # the teacher is left as it was
    assert teacher.bert.encoder.layer[0].intermediate.dense.weight.shape == (64, 32)


def test_pruned_model_is_the_one_expert_moe_of_the_same_width():
    teacher = _teacher()
    importance = torch.rand(3, 64, generator=torch.Generator().manual_seed(1))
    pruned = prune(teacher, importance, 24).eval()
    moe = mk.patch(_teacher(), num_experts=1, expert_size=24, shared=0, importance=importance).eval()
    ids = torch.randint(1, 40, (3, 11), generator=torch.Generator().manual_seed(2))
    mask = torch.ones_like(ids)
    mask[1, 7:] = 0
    with torch.no_grad():
        a, b, dense = (m(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states[-1]
                       for m in (pruned, moe, teacher))
    assert torch.allclose(a, b, rtol=1e-4, atol=1e-5), (a - b).abs().max()
    assert (a - dense).abs().max() > 1e-3  # pruning did change the function


def test_without_importance_keeps_the_first_neurons():
    teacher = _teacher()
    pruned = prune(teacher, None, 10)
    w = teacher.bert.encoder.layer[1].intermediate.dense.weight
    assert torch.equal(pruned.bert.encoder.layer[1].intermediate.dense.weight, w[:10])
    assert pruned.config.moebert_pruned["ranking"] == "dense order"


def test_distilbert_is_pruned_through_its_own_width_field():
    from transformers import DistilBertConfig, DistilBertForSequenceClassification

    torch.manual_seed(0)
    cfg = DistilBertConfig(vocab_size=40, dim=32, n_layers=2, n_heads=2, hidden_dim=48, max_position_embeddings=32)
    teacher = DistilBertForSequenceClassification(cfg).eval()
    importance = torch.rand(2, 48, generator=torch.Generator().manual_seed(3))
    pruned = prune(teacher, importance, 12)
    assert pruned.config.hidden_dim == 12
    top = torch.topk(importance[1], 12).indices
    assert torch.equal(pruned.distilbert.transformer.layer[1].ffn.lin1.weight,
                       teacher.distilbert.transformer.layer[1].ffn.lin1.weight[top])


def test_bad_importance_shape_is_refused():
    with pytest.raises(ValueError, match=r"importance must be \[num_layers, d_ff\]"):
        prune(_teacher(), torch.rand(2, 64), 8)


@pytest.fixture(scope="module")
def baseline_chain(tmp_path_factory):
    root = tmp_path_factory.mktemp("baseline")
    p = lambda *a: str(root.joinpath(*a))  # noqa: E731
    base = make_base(p("base"))
    write_rows(p("train.csv"), 16, seed=0)
    data = ["--task", "classification", "--text-column", "text", "--label-column", "sentiment"]
    train = ["--device", "cpu", "--batch-size", "8", "--learning-rate", "1e-3", "--logging-steps", "1"]
    assert main(["finetune", "--model", base, "--output", p("teacher"), "--data", p("train.csv"),
                 "--max-steps", "2", *data, *train]) == 0
    assert main(["importance", "--model", p("teacher"), "--output", p("imp.safetensors"), "--data",
                 p("train.csv"), "--batch-size", "8", "--quiet", "--device", "cpu", *data]) == 0
    assert main(["convert", "--model", p("teacher"), "--task", "classification", "--output", p("pruned0"),
                 "--importance", p("imp.safetensors"), "--baseline", "pruned", "--expert-size", "16"]) == 0
    assert main(["distill", "--teacher", p("teacher"), "--student", p("pruned0"), "--output", p("pruned"),
                 "--data", p("train.csv"), "--max-steps", "2", *data, *train]) == 0
    for name in ("teacher", "pruned"):
        assert main(["evaluate", "--model", p(name), "--data", p("train.csv"), "--split", "train", "--output",
                     p(f"{name}.json"), "--device", "cpu", "--no-throughput", *data]) == 0
    return root


def test_cli_baseline_loads_with_stock_classes_and_keeps_the_top_neurons(baseline_chain):
    from safetensors.torch import load_file
    from transformers import AutoModelForSequenceClassification

    root = baseline_chain
    model = AutoModelForSequenceClassification.from_pretrained(str(root / "pruned0"))
    teacher = AutoModelForSequenceClassification.from_pretrained(str(root / "teacher"))
    imp = load_file(str(root / "imp.safetensors"))["importance"]
    assert model.config.intermediate_size == 16 and not mk.moe_layers(model)
    for l in range(2):
        top = torch.topk(imp[l], 16).indices
        assert torch.equal(model.bert.encoder.layer[l].intermediate.dense.weight,
                           teacher.bert.encoder.layer[l].intermediate.dense.weight[top])


def test_evaluate_names_what_it_scored(baseline_chain):
    root = baseline_chain
    pruned, teacher = (json.load(open(root / f"{n}.json")) for n in ("pruned", "teacher"))
    assert pruned["model"] == "pruned dense baseline (FFN 16 of 64 neurons, importance-ranked)"
    assert teacher["model"] == "dense teacher (FFN 64 neurons)"
    assert pruned["params_total"] == pruned["params_active"] < teacher["params_total"]


def test_distillation_trained_the_baseline(baseline_chain):
    from transformers import AutoModelForSequenceClassification

    root = baseline_chain
    w0, w1 = (AutoModelForSequenceClassification.from_pretrained(str(root / n)).bert.encoder.layer[0]
              .intermediate.dense.weight for n in ("pruned0", "pruned"))
    assert float((w0 - w1).detach().abs().max()) > 0


def test_baseline_refuses_moe_options(tmp_path, capsys):
    base = make_base(str(tmp_path / "base"))
    code = main(["convert", "--model", base, "--task", "classification", "--output", str(tmp_path / "o"),
                 "--no-importance", "--baseline", "pruned", "--expert-size", "8", "--num-experts", "2"])
    assert code == 2
    assert "--num-experts, --shared, --router and --tie-shared do not apply" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
    code = main(["convert", "--model", base, "--task", "classification", "--output", str(tmp_path / "o"),
                 "--no-importance", "--baseline", "pruned", "--expert-size", "8", "--no-tie-shared"])
    assert code == 2 and "--tie-shared do not apply" in capsys.readouterr().err


def test_demo_reports_the_baseline_beside_the_moe_student(tmp_path, capsys):
    base = make_base(str(tmp_path / "base"))
    assert main(["demo", "--model", base, "--device", "cpu", "--teacher-rows", "16", "--importance-rows", "8",
                 "--distill-rows", "16", "--eval-rows", "16", "--max-length", "16", "--batch-size", "8",
                 "--workdir", str(tmp_path / "work")]) == 0
    out = capsys.readouterr().out
    table = out[out.index("== MoEBERT demo result"):].splitlines()
    rows = {line.split("(")[0].strip(): line for line in table[2:5]}
    assert set(rows) == {"dense teacher", "MoE student", "pruned dense baseline"}, table
    assert "4 experts x 16 neurons, 8 shared, tied, hash router" in rows["MoE student"]  # tied: the default
    assert "FFN 16 of 64 neurons, importance-ranked" in rows["pruned dense baseline"]
    # same active parameters per token: the baseline's total is the student's active count
    moe, pruned = (rows[k].split(")")[-1].split() for k in ("MoE student", "pruned dense baseline"))
    assert moe[3] == pruned[2] == pruned[3] and moe[2] != moe[3]
