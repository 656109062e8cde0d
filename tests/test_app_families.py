"""The `moebert` CLI on a folder of every newly supported family: finetune -> importance -> convert ->
distill -> evaluate, and `moebert demo --model DIR`, on tiny random models saved with save_pretrained and
tokenizers built here (WordPiece for the BERT-like families, a BPE trained with `tokenizers` for the rest)."""
import json
import os

import pytest
import torch
import transformers as tf

from moebert.cli import main
from test_app_chain import WORDS, write_rows

SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
SENTENCES = [" ".join(WORDS[i:] + WORDS[:i]) for i in range(len(WORDS))]


def _wordpiece(folder):
    import inspect

    tokens = SPECIALS + WORDS
    if "vocab" in inspect.signature(tf.BertTokenizerFast.__init__).parameters:  # transformers 5
        return tf.BertTokenizerFast(vocab={t: i for i, t in enumerate(tokens)}, do_lower_case=True)
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "vocab.txt"), "w") as f:
        f.write("\n".join(tokens) + "\n")
    return tf.BertTokenizerFast(vocab_file=os.path.join(folder, "vocab.txt"), do_lower_case=True)


def _bpe(folder):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(SENTENCES, trainers.BpeTrainer(vocab_size=80, special_tokens=SPECIALS))
    tok.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B [SEP]",
                                                       special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    tok.decoder = decoders.BPEDecoder()
    return tf.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
                                      sep_token="[SEP]", mask_token="[MASK]",
                                      model_input_names=["input_ids", "attention_mask"])


def make_family_base(folder, family):
    tok = (_bpe if family in ("xlm-roberta", "camembert", "modernbert") else _wordpiece)(folder)
    assert tok.pad_token_id == 0 and tok.cls_token_id == 2
    common = dict(vocab_size=len(tok), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                  intermediate_size=64, num_labels=2, pad_token_id=0)
    cfg = {
        "deberta-v2": lambda: tf.DebertaV2Config(max_position_embeddings=64, relative_attention=True,
                                                 position_buckets=16, pos_att_type=["p2c", "c2p"], **common),
        "electra": lambda: tf.ElectraConfig(embedding_size=16, max_position_embeddings=64, **common),
        "xlm-roberta": lambda: tf.XLMRobertaConfig(max_position_embeddings=70, **common),
        "camembert": lambda: tf.CamembertConfig(max_position_embeddings=70, **common),
        "modernbert": lambda: tf.ModernBertConfig(max_position_embeddings=64, bos_token_id=2, eos_token_id=3,
                                                  cls_token_id=2, sep_token_id=3, global_attn_every_n_layers=2,
                                                  local_attention=8, **common),
    }[family]()
    torch.manual_seed(0)
    tf.AutoModelForSequenceClassification.from_config(cfg).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


NEW_FAMILIES = ["deberta-v2", "electra", "xlm-roberta", "camembert", "modernbert"]


@pytest.mark.parametrize("family", NEW_FAMILIES)
def test_cli_chain_on_every_family(family, tmp_path):
    p = lambda *a: str(tmp_path.joinpath(*a))  # noqa: E731
    base = make_family_base(p("base"), family)
    assert json.load(open(os.path.join(base, "config.json")))["model_type"] == family
    write_rows(p("train.csv"), 16, seed=0)
    write_rows(p("dev.csv"), 8, seed=1)
    # tied is the CLI's default (gated + bias-free ModernBERT, ungated DeBERTa); the rest opt out
    untie = [] if family in ("modernbert", "deberta-v2") else ["--no-tie-shared"]
    data = ["--task", "classification", "--text-column", "text", "--label-column", "sentiment"]
    train = ["--device", "cpu", "--batch-size", "8", "--learning-rate", "1e-3", "--logging-steps", "1"]
    assert main(["finetune", "--model", base, "--output", p("teacher"), "--data", p("train.csv"), "--max-steps", "2",
                 *data, *train]) == 0
    assert main(["importance", "--model", p("teacher"), "--output", p("imp.safetensors"), "--data", p("train.csv"),
                 "--batch-size", "8", "--quiet", "--device", "cpu", *data]) == 0
    from safetensors.torch import load_file

    imp = load_file(p("imp.safetensors"))["importance"]
    assert imp.shape == (2, 64) and float(imp.sum()) > 0
    assert main(["convert", "--model", p("teacher"), "--task", "classification", "--output", p("student0"),
                 "--importance", p("imp.safetensors"), "--num-experts", "2", "--expert-size", "24",
                 "--shared", "8", *untie]) == 0
    assert main(["distill", "--teacher", p("teacher"), "--student", p("student0"), "--output", p("student"),
                 "--data", p("train.csv"), "--max-steps", "2", *data, *train]) == 0
    assert main(["evaluate", "--model", p("student"), "--data", p("dev.csv"), "--output", p("metrics.json"),
                 "--batch-size", "4", "--device", "cpu", *data]) == 0
    metrics = json.load(open(p("metrics.json")))
    assert metrics["examples"] == 8 and metrics["params_active"] < metrics["params_total"]
    settings = json.load(open(p("student", "config.json")))["moebert"]
    assert settings["num_experts"] == 2 and settings["tie_shared"] is not untie


@pytest.mark.parametrize("family", NEW_FAMILIES)
def test_demo_on_a_folder_of_every_family(family, tmp_path, capsys):
    base = make_family_base(str(tmp_path / "base"), family)
    code = main(["demo", "--model", base, "--workdir", str(tmp_path / "work"), "--device", "cpu",
                 "--teacher-rows", "16", "--importance-rows", "8", "--distill-rows", "16", "--eval-rows", "16",
                 "--batch-size", "8", "--max-length", "16", "--speed-rounds", "1"])
    assert code == 0
    out = capsys.readouterr().out
    assert "MoEBERT demo result" in out
    cfg = json.load(open(tmp_path / "work" / "student" / "config.json"))
    assert cfg["model_type"] == f"moebert_kernels_{family}" and cfg["moebert"]["num_experts"] == 4
