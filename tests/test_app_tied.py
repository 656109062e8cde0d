"""The app with tied students: convert --tie-shared -> distill -> evaluate, and demo --compare-tied."""
import json

import torch

from moebert.cli import main
from test_app_chain import make_base, write_rows

DATA = ["--task", "classification", "--text-column", "text", "--label-column", "sentiment"]
TRAIN = ["--device", "cpu", "--batch-size", "8", "--learning-rate", "1e-3", "--logging-steps", "1"]


def test_convert_distill_evaluate_tied(tmp_path):
    import moebert_kernels as mk
    from moebert.common import parameter_counts

    p = lambda *a: str(tmp_path.joinpath(*a))  # noqa: E731
    base = make_base(p("base"))
    write_rows(p("train.csv"), 24, seed=0)
    assert main(["importance", "--model", base, "--output", p("imp.safetensors"), "--data", p("train.csv"),
                 "--batch-size", "8", "--quiet", "--device", "cpu", *DATA]) == 0
    convert = ["convert", "--model", base, "--task", "classification", "--importance", p("imp.safetensors"),
               "--num-experts", "2", "--expert-size", "24", "--shared", "8"]
    assert main([*convert, "--output", p("untied"), "--no-tie-shared"]) == 0
    assert main([*convert, "--output", p("tied")]) == 0  # tied is the default
    assert main([*convert, "--output", p("tied-explicit"), "--tie-shared"]) == 0
    assert json.load(open(p("tied", "config.json")))["moebert"]["tie_shared"] is True
    assert json.load(open(p("tied-explicit", "config.json")))["moebert"] == \
        json.load(open(p("tied", "config.json")))["moebert"]
    assert json.load(open(p("untied", "config.json")))["moebert"]["tie_shared"] is False
    untied, tied = mk.from_pretrained(p("untied")), mk.from_pretrained(p("tied"))
    ids = torch.randint(5, 30, (3, 7))
    with torch.no_grad():
        torch.testing.assert_close(tied(input_ids=ids).logits, untied(input_ids=ids).logits, rtol=1e-5, atol=1e-6)
    # active per token: the shared FFN and one expert's own neurons (+ that expert's b2 and LayerNorm)
    total, active = parameter_counts(tied)
    moe = mk.moe_layers(tied)
    per_expert = sum(t[0].numel() for t in (moe[0].w1, moe[0].b1, moe[0].w2, moe[0].b2, moe[0].ln_weight,
                                            moe[0].ln_bias))
    assert active == total - len(moe) * (2 - 1) * per_expert
    assert parameter_counts(untied)[1] == active  # the same neurons per token either way
    assert total < parameter_counts(untied)[0]

    assert main(["distill", "--teacher", base, "--student", p("tied"), "--output", p("tied-distilled"),
                 "--data", p("train.csv"), "--max-steps", "2", "--save-steps", "100", *DATA, *TRAIN]) == 0
    distilled = mk.from_pretrained(p("tied-distilled"))
    before, after = mk.moe_layers(tied)[0], mk.moe_layers(distilled)[0]
    assert float((before.shared_w1 - after.shared_w1).detach().abs().max()) > 0
    assert main(["evaluate", "--model", p("tied-distilled"), "--data", p("train.csv"), "--output", p("m.json"),
                 "--device", "cpu", *DATA]) == 0
    m = json.load(open(p("m.json")))
    assert m["params_total"] == total and m["params_active"] == active


def test_demo_compare_tied_reports_both_students(tmp_path, capsys):
    base = make_base(str(tmp_path / "base"))
    args = ["demo", "--model", base, "--device", "cpu", "--teacher-rows", "16", "--importance-rows", "8",
            "--distill-rows", "16", "--eval-rows", "12", "--max-length", "16", "--batch-size", "8",
            "--expert-size", "24", "--shared", "8", "--num-experts", "2", "--speed-rounds", "1",
            "--workdir", str(tmp_path / "work"), "--compare-tied"]
    assert main(args) == 0
    out = capsys.readouterr().out
    result = out[out.index("== MoEBERT demo result"):]
    rows = {line.split("(")[0].strip(): line for line in result.splitlines()[2:] if "student" in line}
    assert set(rows) == {"MoE student", "pruned dense baseline"} or len(rows) >= 2, result
    tied = [line for line in result.splitlines() if ", tied, " in line]
    copied = [line for line in result.splitlines() if "MoE student" in line and ", tied, " not in line
              and "backend" not in line]
    assert len(tied) == 1 and len(copied) == 1, result
    # one row each, with accuracy, before-distillation accuracy, parameters and a speed ratio
    for line in tied + copied:
        assert line.count("%") == 2 and line.rstrip().endswith("x"), line
    tot = lambda line: int(line.split(")")[-1].split()[2].replace(",", ""))  # noqa: E731
    assert tot(tied[0]) < tot(copied[0])