"""``moebert study``: does MoEBERT keep more of its teacher than a dense model of the same per-token cost?

For every task and seed: fine-tune a dense teacher, score neuron importance on other train rows, then
distil each student below from it with the same loss, data and steps, score it on the test split and
time it interleaved with its teacher (ex/s on the same batches, best of two passes each):

- ``pruned``: the top h neurons of every FFN by importance (``convert --baseline pruned``), one dense FFN;
- ``moe``: 4 experts of h neurons, 2/3 of them shared (copied into every expert), hash routing (the paper's);
- ``tied``: the same with the shared neurons stored once (only when ``moebert_kernels.patch`` has
  ``tie_shared``; ``moebert convert`` then reads ``tie_shared`` from its arguments);
- ``gate``: 4 experts with a learned token gate instead of hashing;

at h = d_ff/4 and d_ff/8, plus ``moe8``: 8 experts beside 4 at h = d_ff/4. At equal h the pruned FFN does
the same FLOPs per token with no routing, so capacity (more experts) is the experts' only possible edge.
A larger-data regime distils ``pruned`` and ``moe`` at d_ff/4 on all training rows for more epochs.

Every finished cell is written to OUTPUT/results.json at once, so an interrupted study resumes where it
stopped (same settings; the teachers and importance files stay in OUTPUT/work). At the end it writes
OUTPUT/table.md (mean and spread over seeds per cell, and the paired difference to the pruned baseline)
and OUTPUT/accuracy_vs_speed.png (when matplotlib is installed: ``pip install 'moebert-kernels[study]'``).
"""
from __future__ import annotations

import argparse
import contextlib
import inspect
import json
import os
import platform
import shutil
import statistics
import time
from dataclasses import asdict, dataclass
from typing import Optional

__all__ = ["add_arguments", "run", "students", "plan", "write_table", "write_plot"]

# Sizes: the default took about 1.5 hours on the 2-core CPU host with all-MiniLM-L6-v2, part of it beside other
# CPU work (README, Quality); --quick for a few minutes.
_DEFAULT = dict(teacher_rows=4000, importance_rows=512, distill_rows=2000, large_rows=None, large_epochs=2.0,
                eval_rows=None, speed_rows=256, large_tasks="snli")
_QUICK = dict(teacher_rows=1000, importance_rows=128, distill_rows=600, large_rows=1500, large_epochs=2.0,
              eval_rows=500, speed_rows=128, large_tasks="snli")


@dataclass(frozen=True)
class Student:
    key: str  # results key, e.g. "moe-d4"
    kind: str  # pruned, moe, tied, gate, moe8
    div: int  # h = d_ff / div
    convert: dict  # moebert convert options (demo.convert_args)

    def label(self) -> str:
        c = self.convert
        if self.kind == "pruned":
            return f"pruned dense, FFN {c['expert_size']}"
        what = {"moe": "MoE", "moe8": "MoE", "tied": "MoE tied", "gate": "MoE token gate"}[self.kind]
        return f"{what} {c['num_experts']}x{c['expert_size']} ({c['shared']} shared)"


def students(d_ff: int, tied: bool) -> list[Student]:
    out = []
    for div in (4, 8):
        h = d_ff // div
        moe = dict(num_experts=4, expert_size=h, shared=h * 2 // 3, tie_shared=False)  # the CLI's default is tied
        out.append(Student(f"pruned-d{div}", "pruned", div, dict(baseline="pruned", expert_size=h)))
        out.append(Student(f"moe-d{div}", "moe", div, dict(moe, router="hash")))
        if tied:
            out.append(Student(f"tied-d{div}", "tied", div, dict(moe, router="hash", tie_shared=True)))
        out.append(Student(f"gate-d{div}", "gate", div, dict(moe, router="token_gate")))
    h = d_ff // 4
    out.append(Student("moe8-d4", "moe8", 4, dict(num_experts=8, expert_size=h, shared=h * 2 // 3, router="hash",
                                                  tie_shared=False)))
    return out


_LARGE = ("pruned-d4", "moe-d4")


def add_arguments(p: argparse.ArgumentParser) -> None:
    from .options import overwrite_arg

    p.add_argument("--output", default="moebert-study", help="results, table and plot go here (default: %(default)s)")
    p.add_argument("--model", help="BERT-family folder (default: the demo's all-MiniLM-L6-v2)")
    overwrite_arg(p)
    p.add_argument("--tasks", default="movie_reviews,snli", help="comma-separated shipped tasks (default: %(default)s)")
    p.add_argument("--seeds", default="0,1", help="comma-separated seeds (default: %(default)s)")
    p.add_argument("--students", help="comma-separated student keys to run (default: all: pruned-d4, moe-d4, "
                                      "[tied-d4,] gate-d4, the same with -d8, moe8-d4)")
    p.add_argument("--quick", action="store_true", help="a few hundred rows per step: minutes, not an hour")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"), help="where to train and time")
    p.add_argument("--max-length", type=int, default=64, help="max tokens per example")
    p.add_argument("--batch-size", type=int, default=32, help="training and scoring batch size")
    p.add_argument("--lam", type=float, default=5.0, help="distillation weight (paper's lambda_distill)")
    g = p.add_argument_group("sizes (default: the hour-long study; --quick: a few minutes)")
    g.add_argument("--teacher-rows", type=int, help=f"train rows for each teacher (default: {_DEFAULT['teacher_rows']})")
    g.add_argument("--importance-rows", type=int, help=f"other train rows for importance (default: {_DEFAULT['importance_rows']})")
    g.add_argument("--distill-rows", type=int, help=f"train rows for each student, 1 epoch (default: {_DEFAULT['distill_rows']})")
    g.add_argument("--large-rows", type=int, help="train rows of the larger-data regime (default: all of them)")
    g.add_argument("--large-epochs", type=float, help=f"epochs of the larger-data regime (default: {_DEFAULT['large_epochs']})")
    g.add_argument("--large-tasks", help=f"tasks that also run the larger-data regime (default: {_DEFAULT['large_tasks']}; "
                                        "'none' for none)")
    g.add_argument("--eval-rows", type=int, help="test rows to score (default: the whole test split)")
    g.add_argument("--speed-rows", type=int, help=f"test rows to time (default: {_DEFAULT['speed_rows']})")


def _settings(args) -> dict:
    sizes = dict(_QUICK if args.quick else _DEFAULT)
    for k in sizes:
        if getattr(args, k, None) is not None:
            sizes[k] = getattr(args, k)
    large = [] if sizes["large_tasks"] in ("", "none") else sizes["large_tasks"].split(",")
    tasks = [t for t in args.tasks.split(",") if t]
    seeds = [int(s) for s in args.seeds.split(",") if s != ""]
    if not tasks or not seeds:
        raise ValueError("--tasks and --seeds must each name at least one")
    unknown = [t for t in large if t not in tasks]
    if unknown:
        raise ValueError(f"--large-tasks {unknown} are not among --tasks {tasks}")
    sizes["large_tasks"] = large
    picked = [k for k in (args.students or "").split(",") if k] or None
    return dict(sizes, tasks=tasks, seeds=seeds, students=picked, max_length=args.max_length,
                batch_size=args.batch_size, lam=args.lam, quick=bool(args.quick))


def plan(settings: dict, d_ff: int, tied: bool) -> list[tuple]:
    """Every job, in order: ("teacher", task, seed) then ("cell", task, seed, regime, Student)."""
    jobs = []
    roster = students(d_ff, tied)
    if settings["students"] is not None:
        known = [s.key for s in roster]
        unknown = [k for k in settings["students"] if k not in known]
        if unknown:
            raise ValueError(f"unknown --students {unknown}; this study has {known}")
        roster = [s for s in roster if s.key in settings["students"]]
    for seed in settings["seeds"]:  # seed-major: a study stopped half-way has every cell once
        for task in settings["tasks"]:
            jobs.append(("teacher", task, seed))
            jobs += [("cell", task, seed, "base", s) for s in roster]
            if task in settings["large_tasks"]:
                jobs += [("cell", task, seed, "large", s) for s in roster if s.key in _LARGE]
    return jobs


def _key(job) -> str:
    return f"{job[1]}|seed{job[2]}|teacher" if job[0] == "teacher" else f"{job[1]}|seed{job[2]}|{job[3]}|{job[4].key}"


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


class _Results:
    """results.json: settings + one record per finished job, rewritten atomically after each one."""

    def __init__(self, path: str, settings: dict):
        self.path = path
        self.data = {"settings": settings, "records": {}}
        if os.path.isfile(path):
            with open(path) as f:
                old = json.load(f)
            if old.get("settings") != settings:
                raise ValueError(f"{path} holds a study with other settings ({old.get('settings')}); "
                                 "pass another --output, or delete it to start over")
            self.data = old

    @property
    def records(self) -> dict:
        return self.data["records"]

    def add(self, key: str, record: dict) -> None:
        self.records[key] = record
        tmp = self.path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(self.data, f, indent=1)
        os.replace(tmp, self.path)


def _cost(job, settings: dict, train_rows: dict) -> float:
    """Rough work units (training examples, a distillation step counted 1.5x) for the time estimate."""
    if job[0] == "teacher":
        return settings["teacher_rows"] + settings["importance_rows"] / 2
    rows, epochs = _distill_size(job[1], job[3], settings, train_rows)
    return 1.5 * rows * epochs + 100  # + loading, converting and scoring


def _distill_size(task: str, regime: str, settings: dict, train_rows: dict) -> tuple[int, float]:
    if regime == "large":
        return min(settings["large_rows"] or train_rows[task], train_rows[task]), settings["large_epochs"]
    return min(settings["distill_rows"], train_rows[task]), 1.0


def run(args) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch
    from tqdm.auto import tqdm
    from transformers.utils import logging as hf_logging

    import moebert_kernels as mk

    from . import convert, distill, finetune, importance
    from .common import load_any, load_config, load_tokenizer, resolve_device, resolve_precision
    from .convert import _FFN_WIDTH
    from .data import encode, label_maps, load_rows
    from .demo import _ns, convert_args, demo_model_path, distill_args
    from .evaluate import compare
    from .outputs import check_output
    from .tasks import get_task

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    settings = _settings(args)
    model_path = demo_model_path(args.model)
    device = resolve_device(args.device)
    precision = resolve_precision("auto", device)
    config = load_config(model_path)
    d_ff = getattr(config, _FFN_WIDTH.get(config.model_type, "intermediate_size"))
    tied = "tie_shared" in inspect.signature(mk.patch).parameters
    tasks = {name: get_task(name) for name in settings["tasks"]}
    for name, t in tasks.items():
        if t.local_file is None:
            raise ValueError(f"the study runs on shipped tasks (movie_reviews, snli); {name!r} has no shipped file")
    # A folder that holds this study's results.json resumes it; any other non-empty folder needs --overwrite.
    check_output(args.output, {"--model": model_path}, getattr(args, "overwrite", False),
                 existing_ok=os.path.isfile(os.path.join(args.output, "results.json")))
    os.makedirs(args.output, exist_ok=True)
    settings.update(model=os.path.abspath(model_path), d_ff=d_ff, tied=tied)
    results = _Results(os.path.join(args.output, "results.json"), settings)
    work = os.path.join(args.output, "work")
    log_path = os.path.join(args.output, "study.log")
    train_rows = {n: len(load_rows(t, "train")) for n, t in tasks.items()}
    jobs = plan(settings, d_ff, tied)
    costs = [_cost(j, settings, train_rows) for j in jobs]
    done = sum(c for j, c in zip(jobs, costs) if _key(j) in results.records)
    todo = [j for j in jobs if _key(j) not in results.records]
    print(f"moebert study: {len(jobs)} jobs ({len(jobs) - len(todo)} done before), tasks {settings['tasks']}, "
          f"seeds {settings['seeds']}, model {model_path}, d_ff {d_ff}, tied students "
          f"{'on' if tied else 'off (moebert_kernels.patch has no tie_shared)'}; device {device}, "
          f"{torch.get_num_threads()} threads; log in {log_path}", flush=True)
    bar = tqdm(total=sum(costs), initial=done, unit="ex", desc="study", unit_scale=True, dynamic_ncols=True)
    feats_cache: dict = {}

    def teacher_dir(task, seed):
        return os.path.join(work, f"{task}-seed{seed}", "teacher")

    def eval_feats(task_name, tokenizer, model):
        if task_name not in feats_cache:
            task = tasks[task_name]
            rows = load_rows(task, "test", max_rows=settings["eval_rows"])
            feats = encode(tokenizer, task, rows, settings["max_length"], label_maps(task, rows.labels, model.config))
            feats_cache[task_name] = (feats, feats[:settings["speed_rows"]])
        return feats_cache[task_name]

    with open(log_path, "a") as log:
        for job, cost in zip(jobs, costs):
            key = _key(job)
            if key in results.records:
                continue
            task, seed = tasks[job[1]], job[2]
            bar.set_postfix_str(key, refresh=True)
            tdir = teacher_dir(task.name, seed)
            imp_file = os.path.join(os.path.dirname(tdir), "importance.safetensors")
            common = dict(task=task.name, device=device, seed=seed, max_length=settings["max_length"])
            t0 = time.perf_counter()
            with contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
                print(f"\n== {key}", flush=True)
                if job[0] == "teacher":
                    finetune.run(_ns(model=model_path, output=tdir, max_rows=settings["teacher_rows"],
                                     learning_rate=5e-5, batch_size=settings["batch_size"], epochs=1.0,
                                     precision=precision, **common))
                    skip = min(settings["teacher_rows"], max(0, train_rows[task.name] - settings["importance_rows"]))
                    importance.run(_ns(model=tdir, output=imp_file, batch_size=settings["batch_size"], quiet=True,
                                       skip_rows=skip, max_rows=settings["importance_rows"], **common))
                    teacher = load_any(tdir, task, device)
                    tok = load_tokenizer(tdir)
                    feats, speed = eval_feats(task.name, tok, teacher)
                    rec = compare({"teacher": teacher}, task, feats, tok, device, rounds=2, speed_feats=speed)["teacher"]
                    rec.update(task=task.name, seed=seed, student="teacher", train_s=time.perf_counter() - t0)
                else:
                    if not os.path.isfile(os.path.join(tdir, "config.json")):
                        raise FileNotFoundError(f"the teacher of {key} is gone from {tdir}; delete {results.path} "
                                                "to start over")
                    regime, student = job[3], job[4]
                    out = os.path.join(work, f"{task.name}-seed{seed}", f"{regime}-{student.key}")
                    convert.run(convert_args(tdir, task.name, out + "-init", imp_file, seed, **student.convert))
                    if student.kind == "tied":
                        _check_tied(out + "-init")
                    rows, epochs = _distill_size(task.name, regime, settings, train_rows)
                    t1 = time.perf_counter()
                    distill.run(distill_args(tdir, out + "-init", out, max_rows=rows, epochs=epochs,
                                             batch_size=settings["batch_size"], precision=precision,
                                             lam=settings["lam"], **common))
                    train_s = time.perf_counter() - t1
                    teacher, model = load_any(tdir, task, device), load_any(out, task, device)
                    tok = load_tokenizer(out)
                    feats, speed = eval_feats(task.name, tok, teacher)
                    r = compare({"teacher": teacher, "student": model}, task, feats, tok, device, rounds=2,
                                speed_feats=speed)
                    rec = dict(r["student"], task=task.name, seed=seed, regime=regime, student=student.key,
                               kind=student.kind, label=student.label(), div=student.div, train_rows=rows,
                               epochs=epochs, train_s=train_s, teacher_accuracy=r["teacher"]["accuracy"],
                               teacher_examples_per_s=r["teacher"]["examples_per_s"],
                               speedup=r["student"]["examples_per_s"] / r["teacher"]["examples_per_s"])
                    shutil.rmtree(out, ignore_errors=True)
                    shutil.rmtree(out + "-init", ignore_errors=True)
                rec["wall_s"] = time.perf_counter() - t0
                print(json.dumps(rec), flush=True)
            results.add(key, rec)
            bar.update(cost)
    bar.close()
    table = write_table(results.data, os.path.join(args.output, "table.md"), _cpu_model())
    plot = write_plot(results.data, os.path.join(args.output, "accuracy_vs_speed.png"))
    print(table)
    print(f"results {results.path}; table {os.path.join(args.output, 'table.md')}; "
          f"plot {plot or '(not drawn: matplotlib is not installed)'}")
    return 0


def _check_tied(folder: str) -> None:
    """A tied student must say so in its config: never report an untied copy as tied."""
    with open(os.path.join(folder, "config.json")) as f:
        settings = json.load(f).get("moebert", {})
    if settings.get("tie_shared") is not True:
        raise ValueError(f"moebert convert ignored tie_shared=True ({folder} records {settings}); "
                         "run the study with --students without the tied-* keys")


def _mean_sd(xs: list[float]) -> tuple[float, float]:
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


def _cells(data: dict) -> dict:
    """(task, regime, student key) -> records over seeds, in plan order; teachers under regime 'teacher'."""
    cells: dict = {}
    for rec in data["records"].values():
        regime = rec.get("regime", "teacher")
        cells.setdefault((rec["task"], regime, rec["student"]), []).append(rec)
    return cells


def write_table(data: dict, path: str, hardware: str = "") -> str:
    """Markdown: per task and regime, accuracy mean ± sd over seeds, the paired difference (same teacher
    and seed) to the pruned baseline of the same width, active parameters and speed against the teacher."""
    s = data["settings"]
    cells = _cells(data)
    lines = [f"Quality study{' (--quick)' if s.get('quick') else ''}: model {os.path.join(*s['model'].split(os.sep)[-2:])} "
             f"(d_ff {s['d_ff']}), seeds {s['seeds']}, teacher {s['teacher_rows']} rows, students "
             f"{s['distill_rows']} rows, 1 epoch ("
             + (f"larger-data regime on {', '.join(s['large_tasks'])}: {s['large_rows'] or 'all'} rows, "
                f"{s['large_epochs']:g} epochs" if s["large_tasks"] else "no larger-data regime")
             + f"), test rows {s['eval_rows'] or 'all'}, max length {s['max_length']}"
             + (f"; {hardware}" if hardware else "") + ".", "",
             "| task | regime | student | params total | active | accuracy, % (mean ± sd, n) | vs pruned, same seed | "
             "ex/s | speed-up vs teacher |", "|---|---|---|---:|---:|---:|---:|---:|---:|"]
    by_seed = {(r["task"], r.get("regime", "teacher"), r["student"], r["seed"]): r for r in data["records"].values()}
    for (task, regime, key), recs in cells.items():
        acc = _mean_sd([100 * r["accuracy"] for r in recs])
        label = "teacher (dense)" if regime == "teacher" else recs[0]["label"]
        diff = "—"
        if regime != "teacher" and recs[0]["kind"] != "pruned":
            pairs = [100 * (r["accuracy"] - by_seed[(task, regime, f"pruned-d{r['div']}", r["seed"])]["accuracy"])
                     for r in recs if (task, regime, f"pruned-d{r['div']}", r["seed"]) in by_seed]
            if pairs:
                m, sd = _mean_sd(pairs)
                diff = f"{m:+.2f} ± {sd:.2f}"
        speed = _mean_sd([r["examples_per_s"] for r in recs])
        up = "1.00×" if regime == "teacher" else f"{_mean_sd([r['speedup'] for r in recs])[0]:.2f}×"
        lines.append(f"| {task} | {'—' if regime == 'teacher' else regime} | {label} | {recs[0]['params_total']:,} | {recs[0]['params_active']:,} | "
                     f"{acc[0]:.2f} ± {acc[1]:.2f} ({len(recs)}) | {diff} | {speed[0]:.0f} | {up} |")
    text = "\n".join(lines) + "\n"
    with open(path, "w") as f:
        f.write(text)
    return text


def write_plot(data: dict, path: str) -> Optional[str]:
    """Accuracy against inference ex/s, one panel per task (mean ± sd over seeds); None without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    cells = _cells(data)
    tasks = list(dict.fromkeys(t for t, _, _ in cells))
    fig, axes = plt.subplots(1, len(tasks), figsize=(6 * len(tasks), 4.5), squeeze=False)
    markers = {"teacher": "*", "pruned": "s", "moe": "o", "moe8": "D", "tied": "^", "gate": "v"}
    for ax, task in zip(axes[0], tasks):
        for (t, regime, key), recs in cells.items():
            if t != task:
                continue
            kind = recs[0].get("kind", "teacher")
            x, xs = _mean_sd([r["examples_per_s"] for r in recs])
            y, ys = _mean_sd([100 * r["accuracy"] for r in recs])
            label = "teacher" if kind == "teacher" else f"{recs[0]['label']}{' [more data]' if regime == 'large' else ''}"
            ax.errorbar(x, y, xerr=xs, yerr=ys, marker=markers.get(kind, "o"), linestyle="none", capsize=3,
                        markerfacecolor="none" if regime == "large" else None, label=label)
        ax.set_title(task)
        ax.set_xlabel("inference, examples/s (this run)")
        ax.set_ylabel("test accuracy, %")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
