"""`moebert study` end to end on a tiny random BERT: every job runs once, results resume, the table pairs each
MoE student with the pruned baseline of its width, and the plot is drawn."""
import json
import os

import pytest

from moebert.cli import main
from moebert.study import plan, students
from test_app_chain import make_base

SIZES = ["--teacher-rows", "16", "--importance-rows", "8", "--distill-rows", "16", "--large-rows", "24",
         "--large-epochs", "1", "--eval-rows", "12", "--speed-rows", "8", "--max-length", "16", "--batch-size", "8",
         "--device", "cpu"]


@pytest.fixture(scope="module")
def bare_model(tmp_path_factory):
    """make_base's tiny BERT and tokenizer saved without a head, like a pretrained encoder."""
    from transformers import AutoTokenizer, BertModel

    root = tmp_path_factory.mktemp("study-model")
    make_base(str(root / "cls"))
    BertModel.from_pretrained(str(root / "cls")).save_pretrained(str(root / "bare"))
    AutoTokenizer.from_pretrained(str(root / "cls")).save_pretrained(str(root / "bare"))
    return str(root / "bare")


def _study(model, out, *extra):
    return main(["study", "--model", model, "--output", str(out), "--quick", "--tasks", "snli", "--seeds", "0,1",
                 "--students", "pruned-d4,moe-d4", "--large-tasks", "snli", *SIZES, *extra])


def test_plan_covers_every_student_width_and_regime():
    settings = dict(tasks=["a", "b"], seeds=[0, 1], students=None, large_tasks=["b"])
    keys = [s.key for s in students(1536, tied=False)]
    assert keys == ["pruned-d4", "moe-d4", "gate-d4", "pruned-d8", "moe-d8", "gate-d8", "moe8-d4"]
    assert [s.key for s in students(1536, tied=True)][:4] == ["pruned-d4", "moe-d4", "tied-d4", "gate-d4"]
    moe8 = students(1536, tied=False)[-1].convert
    assert moe8 == dict(num_experts=8, expert_size=384, shared=256, router="hash", tie_shared=False)
    # the copied layout is asked for by name: the CLI's default is tied
    assert all(s.convert.get("tie_shared") is (s.kind == "tied") for s in students(1536, tied=True)
               if s.kind != "pruned")
    jobs = plan(settings, 1536, tied=False)
    assert len(jobs) == 2 * 2 * (1 + 7) + 2 * 2  # teachers, every student, two larger-data cells on task b
    assert [(j[1], j[4].key) for j in jobs if j[0] == "cell" and j[3] == "large"] == \
        [("b", "pruned-d4"), ("b", "moe-d4")] * 2


def test_quick_study_end_to_end_and_resume(bare_model, tmp_path, capsys):
    out = tmp_path / "study"
    assert _study(bare_model, out) == 0
    first = capsys.readouterr().out
    assert "10 jobs (0 done before)" in first
    data = json.load(open(out / "results.json"))
    recs = data["records"]
    assert len(recs) == 10 and data["settings"]["seeds"] == [0, 1]
    cell = recs["snli|seed1|large|moe-d4"]
    assert cell["train_rows"] == 24 and cell["kind"] == "moe" and cell["examples_per_s"] > 0
    assert cell["model"] == "MoE student (4 experts x 16 neurons, 10 shared, hash router)"
    assert recs["snli|seed0|base|pruned-d4"]["params_total"] == cell["params_active"]
    assert not [d for d in os.listdir(out / "work" / "snli-seed1") if "moe" in d or "pruned" in d]  # students removed
    table = (out / "table.md").read_text()
    rows = [line for line in table.splitlines() if line.startswith("| snli | base")]
    assert len(rows) == 2 and "(2) |" in rows[0]
    assert rows[1].split("|")[7].strip().startswith(("+", "-"))  # the MoE row's paired difference to pruned
    assert (out / "accuracy_vs_speed.png").stat().st_size > 0

    # interrupted after all but one cell: a rerun does that one only
    del data["records"]["snli|seed1|base|moe-d4"]
    json.dump(data, open(out / "results.json", "w"))
    assert _study(bare_model, out) == 0
    assert "10 jobs (9 done before)" in capsys.readouterr().out
    assert "snli|seed1|base|moe-d4" in json.load(open(out / "results.json"))["records"]

    # other settings in the same folder are refused, and nothing is overwritten
    before = (out / "results.json").read_text()
    assert _study(bare_model, out, "--lam", "2") == 2
    assert "holds a study with other settings" in capsys.readouterr().err
    assert (out / "results.json").read_text() == before


def test_unknown_student_is_refused(bare_model, tmp_path, capsys):
    assert main(["study", "--model", bare_model, "--output", str(tmp_path / "s"), "--students", "moe-d3",
                 *SIZES]) == 2
    assert "unknown --students ['moe-d3']" in capsys.readouterr().err


def test_an_untied_student_is_never_reported_as_tied(tmp_path):
    from moebert.study import _check_tied

    (tmp_path / "config.json").write_text(json.dumps({"moebert": {"num_experts": 4, "shared": 256}}))
    with pytest.raises(ValueError, match="ignored tie_shared=True"):
        _check_tied(str(tmp_path))
    (tmp_path / "config.json").write_text(json.dumps({"moebert": {"num_experts": 4, "tie_shared": True}}))
    _check_tied(str(tmp_path))
