"""How far a resumed `moebert distill` ends from an uninterrupted one (tiny random BERT, CPU, about a minute).

    python scripts/resume_parity.py [DIR]

Distils 12 steps (48 rows, batch 8: 6 steps per epoch, checkpoints every 4 steps) twice without a break, then
resumes a third run from the first run's checkpoint-8 (a run killed after step 8: a third into epoch 2) and
prints the largest weight difference of each pair as JSON. Since `moebert`'s trainers seed each epoch's
batch order, resumed_vs_full is 0.0; with the stock sampler it was 8.7e-4 (README: Resuming).
"""
import json
import os
import shutil
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.join(HERE, "..", "tests")]  # the tiny model and rows of the app tests

from safetensors.torch import load_file  # noqa: E402

from moebert.cli import main  # noqa: E402
from test_app_chain import make_base, write_rows  # noqa: E402


def run(root: str) -> dict:
    p = lambda *a: os.path.join(root, *a)  # noqa: E731
    make_base(p("base"))
    write_rows(p("train.csv"), 48, seed=0)
    assert main(["convert", "--model", p("base"), "--output", p("student0"), "--no-importance", "--num-experts", "2",
                 "--expert-size", "24", "--shared", "8", "--task", "classification", "--overwrite"]) == 0
    distill = ["distill", "--teacher", p("base"), "--student", p("student0"), "--task", "classification",
               "--text-column", "text", "--label-column", "sentiment", "--data", p("train.csv"), "--device", "cpu",
               "--batch-size", "8", "--learning-rate", "1e-3", "--logging-steps", "100", "--save-steps", "4",
               "--max-steps", "12", "--overwrite"]
    for name in ("full1", "full2"):
        assert main([*distill, "--output", p(name)]) == 0
    shutil.rmtree(p("resumed"), ignore_errors=True)
    shutil.copytree(p("full1", "checkpoint-8"), p("resumed", "checkpoint-8"))
    assert main([*distill, "--output", p("resumed"), "--resume"]) == 0
    w = {name: load_file(p(name, "model.safetensors")) for name in ("full1", "full2", "resumed")}

    def diff(a, b):
        return max(float((w[a][k] - w[b][k]).abs().max()) for k in w[a])

    return {"full_vs_full": diff("full1", "full2"), "resumed_vs_full": diff("resumed", "full1"),
            "max_abs_weight": max(float(v.abs().max()) for v in w["full1"].values())}


if __name__ == "__main__":
    print(json.dumps(run(sys.argv[1] if len(sys.argv) > 1 else tempfile.mkdtemp(prefix="resume-parity-"))))
