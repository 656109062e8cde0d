"""The `moebert` command: finetune -> importance -> convert -> distill -> evaluate, plus predict and demo.

Every command reads a task's data from local CSV/TSV/JSONL files (--data, with
--text-column/--label-column/--split-column), or, for GLUE tasks and SQuAD without --data,
from the Hugging Face hub through the optional `datasets` package.
"""
from __future__ import annotations

import argparse
import functools
import sys

from . import __version__
from .options import DEVICES, PRECISIONS, ROUTERS  # noqa: F401  (re-exported: moebert.cli.ROUTERS)
from .options import device_arg as _device_arg
from .options import overwrite_arg as _overwrite_arg


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Every option's help ends with its default (unless the help already says it)."""

    def _get_help_string(self, action):
        help = action.help or ""
        if (not action.option_strings or action.required or action.default is argparse.SUPPRESS
                or "default" in help or action.default is None):
            return help
        if action.default is False:
            return f"{help} (default: off)".strip()
        return f"{help} (default: %(default)s)".strip()


def _data_args(p: argparse.ArgumentParser, split: str = "train", labels: bool = True) -> None:
    g = p.add_argument_group("data")
    g.add_argument("--task", required=True, help="glue task (cola, sst2, mrpc, qqp, stsb, mnli, qnli, rte, wnli), "
                                                 "squad, movie_reviews, snli, or classification/regression for own files")
    g.add_argument("--data", help="local CSV/TSV/JSONL file (default: the task's hub dataset or shipped file)")
    g.add_argument("--split", default=split, help=f"split to use (default: {split}); with --split-column, the "
                                                  "rows whose split column has this value")
    g.add_argument("--text-column", action="append",
                   help="text column; give it twice for sentence pairs (default: the task's)")
    if labels:
        g.add_argument("--label-column", help="label column (default: the task's, usually 'label')")
    g.add_argument("--split-column", help="column that names each row's split, if the file holds several "
                                          "(default: none, the file is one split)")
    g.add_argument("--skip-rows", type=int, default=0, help="skip the first N rows of the split")
    g.add_argument("--max-rows", type=int, help="use only the first N rows (after --skip-rows; default: all)")
    g.add_argument("--max-length", type=int, help="max tokens per example (default: the task's, 128 for GLUE)")


def _train_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("training (defaults per task: see moebert.tasks)")
    g.add_argument("--learning-rate", type=float, help="default: the task's")
    g.add_argument("--batch-size", type=int, help="per-device batch size (default: the task's)")
    g.add_argument("--epochs", type=float, help="default: the task's")
    g.add_argument("--max-steps", type=int, default=-1, help="stop after N optimizer steps (overrides --epochs)")
    g.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay")
    g.add_argument("--warmup-ratio", type=float, default=0.0, help="share of the steps spent warming up")
    g.add_argument("--seed", type=int, default=0, help="random seed")
    g.add_argument("--save-steps", type=int, default=500, help="checkpoint every N steps (output/checkpoint-N)")
    g.add_argument("--logging-steps", type=int, default=50, help="log every N steps")
    g.add_argument("--resume", nargs="?", const=True, default=None,
                   help="resume from the newest complete checkpoint in --output (an incomplete one is skipped "
                        "with a warning), or from the given checkpoint folder (default: start afresh)")
    _device_arg(g)
    g.add_argument("--precision", default="auto", choices=PRECISIONS,
                   help="auto is bf16/fp16 on CUDA, fp32 on CPU")


def _model_or_onnx(p: argparse.ArgumentParser, what: str) -> None:
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--model", help=f"{what} (default: none; give this or --onnx)")
    g.add_argument("--onnx", help="folder from `moebert export`, run in ONNX Runtime on CPU "
                                  "(default: none, --model runs in PyTorch)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="moebert", description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--version", action="version", version=f"moebert {__version__}")
    sub = parser.add_subparsers(dest="command", required=True,
                                parser_class=functools.partial(argparse.ArgumentParser, formatter_class=HelpFormatter))

    p = sub.add_parser("finetune", help="fine-tune a dense teacher on a task")
    p.add_argument("--model", required=True, help="pretrained encoder folder of a supported family (or hub id)")
    p.add_argument("--output", required=True)
    _overwrite_arg(p)
    _data_args(p)
    _train_args(p)
    p.set_defaults(func=lambda a: __import__("moebert.finetune", fromlist=["run"]).run(a))

    p = sub.add_parser("importance", help="neuron importance of the teacher's FFNs (train split by default)")
    p.add_argument("--model", required=True, help="fine-tuned dense teacher")
    p.add_argument("--output", required=True, help="safetensors file to write")
    _overwrite_arg(p)
    p.add_argument("--batch-size", type=int, default=32, help="examples per batch")
    _device_arg(p)
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    _data_args(p)
    p.set_defaults(func=lambda a: __import__("moebert.importance", fromlist=["run"]).run(a))

    p = sub.add_parser("convert", help="patch the teacher into MoEBERT with the importance and save it")
    p.add_argument("--model", required=True, help="fine-tuned dense teacher")
    p.add_argument("--task", required=True)
    p.add_argument("--output", required=True)
    _overwrite_arg(p)
    p.add_argument("--importance", help="file from `moebert importance` (default: none; then pass --no-importance)")
    p.add_argument("--no-importance", action="store_true", help="keep the dense neuron order (no importance)")
    p.add_argument("--num-experts", type=int, help="experts per layer (default: 4)")
    p.add_argument("--expert-size", type=int, help="neurons per expert (default: d_ff/4, 768 for BERT-base)")
    p.add_argument("--baseline", choices=["pruned"],
                   help="pruned: instead of experts, one dense FFN of the top --expert-size neurons by importance "
                        "(the same-cost baseline to distil beside the MoE student; default: none, make the MoE student)")
    p.add_argument("--shared", type=int, help="neurons shared by all experts (default: 2/3 of --expert-size, "
                                              "rounded down to a multiple of 8)")
    p.add_argument("--router", default="hash", choices=ROUTERS, help="hash is the paper's")
    p.add_argument("--tie-shared", action=argparse.BooleanOptionalAction, default=None,
                   help="store the shared neurons once, as a shared FFN every token runs (half the FFN weights at "
                        "BERT-base sizes; the default, README: Quality); --no-tie-shared copies them into every "
                        "expert, as the paper's code does")
    p.add_argument("--seed", type=int, default=0, help="layer l's hash table is drawn with seed + l")
    g = p.add_argument_group("data for balanced_hash token counts")
    g.add_argument("--data", help="local CSV/TSV/JSONL file (default: the task's hub dataset or shipped file)")
    g.add_argument("--text-column", action="append", help="text column, repeatable (default: the task's)")
    g.add_argument("--label-column", help="default: the task's")
    g.add_argument("--split-column", help="default: none, the file is one split")
    g.add_argument("--max-rows", type=int, help="count tokens of the first N train rows (default: all)")
    p.set_defaults(func=lambda a: __import__("moebert.convert", fromlist=["run"]).run(a))

    p = sub.add_parser("distill", help="layer-wise distillation of the student from the teacher (HF Trainer)")
    p.add_argument("--teacher", required=True)
    p.add_argument("--student", required=True, help="converted MoEBERT checkpoint")
    p.add_argument("--output", required=True)
    _overwrite_arg(p)
    _data_args(p)
    _train_args(p)
    g = p.add_argument_group("distillation loss")
    g.add_argument("--lam", type=float, help="weight of the distillation terms (paper's lambda_distill; "
                                             "default: the task's)")
    g.add_argument("--alpha-ce", type=float, default=1.0, help="weight of the task loss on labels")
    g.add_argument("--pred-loss", choices=["sym_kl", "kl", "mse"], help="default: sym_kl, mse for regression")
    g.add_argument("--temperature", type=float, default=1.0, help="softmax temperature of the kl prediction loss")
    g.add_argument("--mask-padding", action="store_true", help="leave padding tokens out of the hidden MSE")
    g.add_argument("--aux-weight", type=float, default=0.01, help="weight of gate routers' balancing loss")
    p.set_defaults(func=lambda a: __import__("moebert.distill", fromlist=["run"]).run(a))

    p = sub.add_parser("evaluate", help="task metrics (GLUE conventions / SQuAD EM-F1) and throughput")
    _model_or_onnx(p, "teacher or MoEBERT checkpoint")
    p.add_argument("--batch-size", type=int, default=64, help="examples per batch")
    _device_arg(p)
    p.add_argument("--output", help="also write the metrics as JSON here (default: print only)")
    _overwrite_arg(p)
    p.add_argument("--no-throughput", action="store_true", help="skip the throughput measurement")
    _data_args(p, split="dev")
    p.set_defaults(func=lambda a: __import__("moebert.evaluate", fromlist=["run_evaluate"]).run_evaluate(a))

    p = sub.add_parser("predict", help="classify text in batches (JSON lines out)")
    _model_or_onnx(p, "teacher or MoEBERT checkpoint")
    p.add_argument("--task", required=True)
    p.add_argument("--text", action="append", help="a text to classify (repeatable; tab separates a pair; "
                                                    "default: none, read --data)")
    p.add_argument("--data", help="file of texts (CSV/TSV/JSONL; default: none, classify --text)")
    p.add_argument("--split", default="test", help="rows of this split, with --split-column")
    p.add_argument("--text-column", action="append", help="text column, repeatable (default: the task's)")
    p.add_argument("--split-column", help="default: none, the file is one split")
    p.add_argument("--max-rows", type=int, help="default: all")
    p.add_argument("--max-length", type=int, help="default: the task's")
    p.add_argument("--batch-size", type=int, default=64, help="examples per batch")
    _device_arg(p)
    p.add_argument("--output", help="JSON lines file (default: stdout)")
    _overwrite_arg(p)
    p.set_defaults(func=lambda a: __import__("moebert.evaluate", fromlist=["run_predict"]).run_predict(a))

    p = sub.add_parser("export", help="export a MoEBERT student to ONNX (OUT/model.onnx + tokenizer, config)")
    p.add_argument("--model", required=True, help="MoEBERT student folder")
    p.add_argument("--output", required=True, help="folder to write")
    _overwrite_arg(p)
    p.add_argument("--no-check", action="store_true",
                   help="skip the onnxruntime parity check of the file (default: check)")
    p.add_argument("--int8", action="store_true",
                   help="int8 weights for every MatMul, experts included (onnxruntime dynamic quantization; "
                        "default: fp32)")
    p.set_defaults(func=lambda a: __import__("moebert.export", fromlist=["run"]).run(a))

    p = sub.add_parser("study", help="quality study: MoE students beside the pruned dense baseline, seeds, tasks")
    from .study import add_arguments as study_arguments

    study_arguments(p)
    p.set_defaults(func=lambda a: __import__("moebert.study", fromlist=["run"]).run(a))

    p = sub.add_parser("demo", help="the whole chain on the embedded model and movie-review data (offline)")
    from .demo import add_arguments

    add_arguments(p)
    p.set_defaults(func=lambda a: __import__("moebert.demo", fromlist=["run"]).run(a))
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, TypeError, FileNotFoundError, ImportError) as e:
        if getattr(args, "debug", False) or __import__("os").environ.get("MOEBERT_DEBUG"):
            raise
        print(f"moebert {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
