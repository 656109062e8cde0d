"""`moebert demo --int8`: the int8 teacher and int8 student scored and timed in the same run as the float ones."""
import pytest

from moebert.cli import main
from test_app_chain import make_base


def test_demo_int8_rows_beside_the_float_ones(tmp_path, capsys):
    base = make_base(str(tmp_path / "base"))
    assert main(["demo", "--model", base, "--device", "cpu", "--teacher-rows", "16", "--importance-rows", "8",
                 "--distill-rows", "16", "--eval-rows", "16", "--max-length", "16", "--batch-size", "8",
                 "--no-baseline", "--int8", "--workdir", str(tmp_path / "work")]) == 0
    out = capsys.readouterr().out
    table = out[out.index("== MoEBERT demo result"):].splitlines()[2:6]
    assert len(table) == 4 and all(line.strip().startswith(("dense teacher", "MoE student")) for line in table)
    float_rows = [line for line in table if " int8 " not in line]
    int8_rows = [line for line in table if " int8 " in line]
    assert len(float_rows) == 2 and len(int8_rows) == 2, table
    for f, q in zip(float_rows, int8_rows):  # same parameter counts (total, active), stored in int8
        assert f.split()[-4:-2] == q.split()[-4:-2], (f, q)


def test_demo_int8_needs_the_cpu():
    from moebert.demo import _int8_models

    with pytest.raises(ValueError, match="--device cpu"):
        _int8_models({}, "cuda")
