"""The application gives no silent wrong results (issue #19): sentence pairs from --text, data files read
as written or refused with file/line/column, outputs whole or absent, incomplete checkpoints skipped."""
import argparse
import json
import os
import shutil

import pytest
import torch

from moebert.cli import main
from moebert.data import encode, load_rows
from moebert.evaluate import predict_rows
from moebert.tasks import TASKS, get_task
from test_app_chain import make_base, write_rows
from test_app_errors import _fails


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("reliability")
    make_base(str(root / "base"))
    make_base(str(root / "base3"), num_labels=3)
    write_rows(str(root / "train.csv"), 8)
    return root


def _write(path, text, mode="w"):
    with open(path, mode) as f:
        f.write(text)
    return str(path)


# ---- sentence pairs: predict --text "A<tab>B" encodes what --data with two columns encodes -------------------

PAIR_TASKS = sorted(name for name, t in TASKS.items() if len(t.text_columns) == 2)


def _predict_args(**kw):
    base = dict(text=None, data=None, text_column=None, split="test", split_column=None, max_rows=None)
    base.update(kw)
    return argparse.Namespace(**base)


@pytest.mark.parametrize("name", PAIR_TASKS + ["classification"])
def test_text_with_a_tab_encodes_the_pair_that_data_encodes(root, tmp_path, name):
    from transformers import AutoTokenizer

    task = get_task(name)
    columns = list(task.text_columns) if name != "classification" else ["first", "second"]
    given = None if name != "classification" else columns
    pairs = [("the movie was good", "the film is great"), ("\"quoted\" plot", "a dull story, really")]
    data = tmp_path / "pairs.jsonl"
    _write(data, "".join(json.dumps(dict(zip(columns, p))) + "\n" for p in pairs))
    tok = AutoTokenizer.from_pretrained(str(root / "base"))
    by_text = predict_rows(task, _predict_args(text=["\t".join(p) for p in pairs], text_column=given))
    by_data = predict_rows(task, _predict_args(data=str(data), text_column=given))
    assert by_text.texts == by_data.texts == pairs
    enc_text, enc_data = encode(tok, task, by_text, 64), encode(tok, task, by_data, 64)
    assert enc_text == enc_data
    sep = tok.sep_token_id
    for f in enc_text:  # a real pair: [CLS] a [SEP] b [SEP], the second segment typed 1
        assert f["input_ids"].count(sep) == 2 and 1 in f["token_type_ids"]


def test_predict_pair_cli_routes_agree(root, tmp_path, capsys):
    """The README's own example, `predict --task mnli --text $'A\\tB'`, against --data with two columns."""
    pairs = [("good great movie", "the film was bad"), ("dull plot", "a dull story")]
    data = _write(tmp_path / "mnli.tsv", "premise\thypothesis\n" + "".join(f"{a}\t{b}\n" for a, b in pairs))
    model = ["--model", str(root / "base3"), "--task", "mnli", "--device", "cpu"]
    assert main(["predict", *model, "--text", "\t".join(pairs[0]), "--text", "\t".join(pairs[1]),
                 "--output", str(tmp_path / "text.jsonl")]) == 0
    assert main(["predict", *model, "--data", data, "--output", str(tmp_path / "data.jsonl")]) == 0
    by_text = [json.loads(line) for line in open(tmp_path / "text.jsonl")]
    by_data = [json.loads(line) for line in open(tmp_path / "data.jsonl")]
    assert [r["text"] for r in by_text] == [list(p) for p in pairs]
    assert by_text == by_data


def test_pair_task_text_without_a_tab_is_an_error(root, capsys):
    _fails(capsys, ["predict", "--model", str(root / "base3"), "--task", "mnli", "--device", "cpu",
                    "--text", "no tab here"], "reads sentence pairs", "one tab")


# ---- data files ------------------------------------------------------------------------------------------

def test_fields_starting_with_a_quote_keep_their_rows(tmp_path):
    task = get_task("classification")
    want = ['"Great" movie', '"unclosed quote', 'a "b" c', 'comma, inside', 'wrapped "x"', "plain"]
    csv_text = ('text,label\n"Great" movie,pos\n"unclosed quote,neg\na "b" c,pos\n"comma, inside",neg\n'
                '"wrapped ""x""",pos\nplain,neg\n')
    tsv_text = ('text\tlabel\n"Great" movie\tpos\n"unclosed quote\tneg\na "b" c\tpos\ncomma, inside\tneg\n'
                '"wrapped ""x"""\tpos\nplain\tneg\n')
    jsonl_text = "".join(json.dumps({"text": t, "label": lab}) + "\n"
                         for t, lab in zip(want, ["pos", "neg"] * 3))
    for ext, text in (("csv", csv_text), ("tsv", tsv_text), ("jsonl", jsonl_text)):
        rows = load_rows(task, "train", _write(tmp_path / f"q.{ext}", text), ["text"])
        assert [t[0] for t in rows.texts] == want, ext
        assert rows.labels == ["pos", "neg"] * 3, ext


def test_shipped_files_still_read_their_quoted_fields():
    snli = load_rows(get_task("snli"), "test")
    assert 'two girls looking out the window at "Hair at Hart."' in [t[0] for t in snli.texts]


@pytest.mark.parametrize("ext,text,fragments", [
    ("csv", "text,label\ngood,pos\nbad,\n", ["line 3", "column 'label'", "label is empty"]),
    ("tsv", "text\tlabel\ngood\tpos\nbad\t  \n", ["line 3", "column 'label'", "label is empty"]),
    ("jsonl", '{"text": "good", "label": "pos"}\n{"text": "bad"}\n', ["line 2", "no field 'label'"]),
    ("jsonl", '{"text": "good", "label": "pos"}\n{"text": "bad", "label": null}\n',
     ["line 2", "column 'label'", "label is empty"]),
    ("jsonl", '{"text": "good", "label": "pos"}\n{"label": "neg"}\n', ["line 2", "no field 'text'"]),
    ("csv", "text,label\n", ["has a header", "but no rows"]),
    ("csv", "", ["is empty", "header row"]),
    ("jsonl", "\n\n", ["holds no JSON lines"]),
    ("csv", "text,label\ngood,pos\nbad,neg,extra\n", ["line 3 has 3", "header has 2", "double quotes"]),
    ("jsonl", '{"text": "good", "label": "pos"}\n[1, 2]\n', ["line 2", "not an object"]),
])
def test_bad_rows_name_file_line_and_column(tmp_path, capsys, root, ext, text, fragments):
    path = _write(tmp_path / f"bad.{ext}", text)
    _fails(capsys, ["finetune", "--model", str(root / "base"), "--output", str(tmp_path / "t"), "--task",
                    "classification", "--data", path, "--text-column", "text", "--device", "cpu"], path, *fragments)
    assert not (tmp_path / "t").exists()


@pytest.mark.parametrize("ext", ["csv", "tsv", "jsonl"])
def test_non_utf8_bytes_name_file_line_and_column(tmp_path, capsys, root, ext):
    if ext == "jsonl":
        raw = b'{"text": "good", "label": "pos"}\n{"text": "caf\xe9", "label": "neg"}\n'
    else:
        d = b"," if ext == "csv" else b"\t"
        raw = b"text" + d + b"label\ngood" + d + b"pos\ncaf\xe9" + d + b"neg\n"
    path = _write(tmp_path / f"latin1.{ext}", raw, "wb")
    _fails(capsys, ["predict", "--model", str(root / "base"), "--task", "classification", "--data", path,
                    "--device", "cpu", "--text-column", "text"], path, "line 3" if ext != "jsonl" else "line 2",
           "column 'text'", "0xe9", "UTF-8")


def test_utf8_byte_order_mark_is_not_part_of_the_first_column(tmp_path):
    path = _write(tmp_path / "bom.csv", "\ufefftext,label\ngood,pos\n".encode("utf-8"), "wb")
    assert load_rows(get_task("classification"), "train", path, ["text"]).texts == [("good",)]


def test_more_than_two_text_columns_is_an_error(tmp_path):
    path = _write(tmp_path / "three.csv", "a,b,c,label\nx,y,z,pos\n")
    with pytest.raises(ValueError, match="two for sentence pairs"):
        load_rows(get_task("classification"), "train", path, ["a", "b", "c"])


# ---- outputs: never an input, never a non-empty folder without --overwrite, whole or absent -------------------

def _files(folder):
    return {os.path.relpath(os.path.join(d, f), folder): open(os.path.join(d, f), "rb").read()
            for d, _, fs in os.walk(folder) for f in fs}


def test_output_that_is_an_input_is_refused(root, tmp_path, capsys):
    teacher = tmp_path / "teacher"
    shutil.copytree(root / "base", teacher)
    before = _files(teacher)
    for extra in ([], ["--overwrite"]):
        _fails(capsys, ["convert", "--model", str(teacher), "--task", "classification", "--output", str(teacher),
                        "--no-importance", *extra], f"is the input --model {teacher}")
    _fails(capsys, ["convert", "--model", str(teacher), "--task", "classification", "--output", str(tmp_path),
                    "--no-importance", "--overwrite"], f"holds the input --model {teacher}")
    data = str(root / "train.csv")
    _fails(capsys, ["predict", "--model", str(teacher), "--task", "classification", "--data", data,
                    "--text-column", "text", "--output", data, "--overwrite"], "is the input --data")
    assert _files(teacher) == before


COMMANDS = {
    "finetune": lambda r, o: ["finetune", "--model", f"{r}/base", "--output", o, "--task", "classification",
                              "--data", f"{r}/train.csv", "--text-column", "text", "--label-column", "sentiment",
                              "--max-steps", "1", "--batch-size", "4", "--device", "cpu", "--save-steps", "100"],
    "importance": lambda r, o: ["importance", "--model", f"{r}/base", "--output", o, "--task", "classification",
                                "--data", f"{r}/train.csv", "--text-column", "text", "--label-column", "sentiment",
                                "--quiet", "--device", "cpu"],
    "convert": lambda r, o: ["convert", "--model", f"{r}/base", "--task", "classification", "--output", o,
                             "--no-importance", "--num-experts", "2"],
    "evaluate": lambda r, o: ["evaluate", "--model", f"{r}/base", "--task", "classification", "--data",
                              f"{r}/train.csv", "--text-column", "text", "--label-column", "sentiment",
                              "--device", "cpu", "--no-throughput", "--output", o],
    "predict": lambda r, o: ["predict", "--model", f"{r}/base", "--task", "classification", "--data",
                             f"{r}/train.csv", "--text-column", "text", "--device", "cpu", "--output", o],
}
FILE_OUTPUTS = ("importance", "evaluate", "predict")


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_existing_output_needs_overwrite(root, tmp_path, capsys, command):
    out = tmp_path / "out"
    if command in FILE_OUTPUTS:
        _write(out, "earlier result")
        frag = "already exists"
    else:
        out.mkdir()
        _write(out / "earlier.txt", "earlier result")
        frag = "already holds 1 entries (earlier.txt)"
    argv = COMMANDS[command](str(root), str(out))
    _fails(capsys, argv, frag, "--overwrite")
    assert (open(out).read() if command in FILE_OUTPUTS else open(out / "earlier.txt").read()) == "earlier result"
    assert main([*argv, "--overwrite"]) == 0, capsys.readouterr().err
    if command in FILE_OUTPUTS:
        assert open(out, "rb").read() != b"earlier result"
    elif command == "convert":  # a whole new folder: nothing of the earlier one is left
        assert not (out / "earlier.txt").exists() and (out / "config.json").is_file()
    assert not [p for p in os.listdir(tmp_path) if ".partial-" in p or ".old-" in p]


def test_demo_workdir_and_study_output_need_overwrite(root, tmp_path, capsys):
    (tmp_path / "w").mkdir()
    _write(tmp_path / "w" / "mine.txt", "x")
    _fails(capsys, ["demo", "--model", str(root / "base"), "--workdir", str(tmp_path / "w"), "--device", "cpu"],
           "--workdir", "already holds", "--overwrite")
    _fails(capsys, ["study", "--model", str(root / "base"), "--output", str(tmp_path / "w"), "--device", "cpu"],
           "--output", "already holds", "--overwrite")


def test_replaced_folder_leaves_the_target_as_it_was_when_the_block_fails(tmp_path):
    from moebert.outputs import replaced_folder

    target = tmp_path / "out"
    target.mkdir()
    _write(target / "model.onnx", "good")
    with pytest.raises(RuntimeError, match="parity"):
        with replaced_folder(str(target)) as tmp:
            _write(os.path.join(tmp, "model.onnx"), "bad")
            raise RuntimeError("parity check failed")
    assert _files(target) == {"model.onnx": b"good"} and os.listdir(tmp_path) == ["out"]
    with replaced_folder(str(target)) as tmp:
        _write(os.path.join(tmp, "new.txt"), "new")
    assert _files(target) == {"new.txt": b"new"} and os.listdir(tmp_path) == ["out"]
    assert oct(os.stat(target).st_mode & 0o777) != oct(0o700)


def test_failing_export_over_a_good_one_leaves_it_whole(root, tmp_path, capsys, monkeypatch):
    import moebert_kernels.onnx as mo

    student, out = tmp_path / "student", tmp_path / "onnx"
    assert main(["convert", "--model", str(root / "base"), "--task", "classification", "--output", str(student),
                 "--no-importance", "--num-experts", "2", "--expert-size", "24", "--shared", "8"]) == 0
    assert main(["export", "--model", str(student), "--output", str(out)]) == 0
    good = _files(out)
    assert "model.onnx" in good and "config.json" in good
    _fails(capsys, ["export", "--model", str(student), "--output", str(out)], "already holds", "--overwrite")
    monkeypatch.setattr(mo, "_rel_err", lambda a, b: 1.0)  # the parity check fails
    with pytest.raises(RuntimeError, match="differs from PyTorch"):
        main(["export", "--model", str(student), "--output", str(out), "--overwrite"])
    assert _files(out) == good
    assert sorted(os.listdir(tmp_path)) == ["onnx", "student"]


# ---- resume: an incomplete checkpoint is skipped with a warning -------------------------------------------------

def test_resume_skips_a_checkpoint_cut_off_mid_write(root, tmp_path, capsys):
    out = tmp_path / "teacher"
    argv = COMMANDS["finetune"](str(root), str(out))
    argv[argv.index("--save-steps") + 1] = "2"
    argv[argv.index("--max-steps") + 1] = "2"
    assert main(argv) == 0
    good, cut = out / "checkpoint-2", out / "checkpoint-4"
    shutil.copytree(good, cut)  # a later save killed before trainer_state.json, optimizer.pt half written
    os.remove(cut / "trainer_state.json")
    opt = open(cut / "optimizer.pt", "rb").read()
    _write(cut / "optimizer.pt", opt[:len(opt) // 2], "wb")
    capsys.readouterr()
    argv[argv.index("--max-steps") + 1] = "4"
    _fails(capsys, [*argv, "--resume", str(cut)], "is incomplete (no trainer_state.json)")
    assert main([*argv, "--resume"]) == 0
    err = capsys.readouterr().err
    warnings = [line for line in err.splitlines() if "skipping incomplete checkpoint" in line]
    assert warnings == [f"moebert: warning: skipping incomplete checkpoint {cut} (no trainer_state.json)"], err
    assert json.load(open(cut / "trainer_state.json"))["global_step"] == 4


def test_checkpoint_problem_finds_truncated_files(root, tmp_path):
    from moebert.finetune import checkpoint_problem

    out = tmp_path / "t"
    argv = COMMANDS["finetune"](str(root), str(out))
    argv[argv.index("--save-steps") + 1] = "1"
    assert main(argv) == 0
    ck = out / "checkpoint-1"
    assert checkpoint_problem(str(ck)) is None
    for name in ("model.safetensors", "optimizer.pt", "trainer_state.json"):
        bad = tmp_path / name
        shutil.copytree(ck, bad)
        data = open(bad / name, "rb").read()
        _write(bad / name, data[:len(data) - 7], "wb")
        assert checkpoint_problem(str(bad)) is not None and name in checkpoint_problem(str(bad)), name


# ---- clear errors ---------------------------------------------------------------------------------------------

def test_balanced_hash_with_string_labels_counts_tokens(root, tmp_path, capsys):
    assert main(["convert", "--model", str(root / "base"), "--task", "classification", "--output",
                 str(tmp_path / "s"), "--no-importance", "--router", "balanced_hash", "--num-experts", "2",
                 "--data", str(root / "train.csv"), "--text-column", "text", "--label-column", "sentiment"]) == 0, \
        capsys.readouterr().err
    assert json.load(open(tmp_path / "s" / "config.json"))["moebert"]["router"] == "balanced_hash"


def test_finetuning_a_two_label_head_on_three_classes_says_what_to_do(root, tmp_path, capsys):
    path = _write(tmp_path / "three.csv", "text,label\ngood,pos\nbad,neg\nfine,neutral\n")
    _fails(capsys, ["finetune", "--model", str(root / "base"), "--output", str(tmp_path / "t"), "--task",
                    "classification", "--data", path, "--device", "cpu", "--text-column", "text"],
           "with 2 labels", "has 3 classes (['neg', 'neutral', 'pos'])", "without this classification head")
    assert not (tmp_path / "t").exists()


def test_resumed_distill_ends_where_the_uninterrupted_one_does(root, tmp_path):
    """Killed after a mid-epoch checkpoint and resumed: the same batches and dropout as the run that went on
    (24 rows in batches of 8: 3 steps per epoch; checkpoint-4 is one step into the second epoch)."""
    from safetensors.torch import load_file

    student0 = str(tmp_path / "student0")
    assert main(["convert", "--model", str(root / "base"), "--task", "classification", "--output", student0,
                 "--no-importance", "--num-experts", "2", "--expert-size", "24", "--shared", "8"]) == 0
    write_rows(str(tmp_path / "train.csv"), 24, seed=5)
    argv = ["distill", "--teacher", str(root / "base"), "--student", student0, "--task", "classification",
            "--data", str(tmp_path / "train.csv"), "--text-column", "text", "--label-column", "sentiment",
            "--device", "cpu", "--batch-size", "8", "--learning-rate", "1e-3", "--save-steps", "4",
            "--max-steps", "8", "--logging-steps", "100"]
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    assert main([*argv, "--output", str(full)]) == 0
    resumed.mkdir()
    shutil.copytree(full / "checkpoint-4", resumed / "checkpoint-4")  # what a run killed after step 5 leaves
    assert main([*argv, "--output", str(resumed), "--resume"]) == 0
    a, b = load_file(str(full / "model.safetensors")), load_file(str(resumed / "model.safetensors"))
    w0 = load_file(os.path.join(student0, "model.safetensors"))
    assert any(not torch.equal(a[k], w0[k]) for k in a)  # it trained
    assert {k: float((a[k] - b[k]).abs().max()) for k in a} == {k: 0.0 for k in a}
