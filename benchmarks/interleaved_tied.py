"""Dense BERT-base against its students, timed interleaved: ``python benchmarks/interleaved_tied.py``.

fp32, bf16 and int8 (``moebert_kernels.quantize_dynamic``), in PyTorch and (``--runtimes torch,ort``) in
onnxruntime from ``moebert_kernels.onnx.export(..., int8=...)``; each ratio is against the dense model of
the same dtype and runtime.

``test_bench_tied.py`` runs its cases one after another, so on a shared VM a neighbour's load between two
cases moves their ratio (two quiet runs on one host gave the tied student at B=1 fp32 1.84x and 1.37x).
Here every round calls each model once, in rotating order, and the ratio of each round is taken before
the median, so drift that is slow against one round cancels. Same models, shapes, threads and malloc
pinning as ``test_bench_tied.py``; prints a table and writes ``--json``.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _timing import cpu_model, pin_glibc_malloc, set_cpu_threads  # noqa: E402
from test_bench_tied import MODELS, SEQ, _ffn  # noqa: E402


def _models(dtype, what: str, runtime: str = "torch"):
    """``dtype``: a torch float dtype, or ``"int8"``: ``moebert_kernels.quantize_dynamic`` of the fp32 models
    (torch.ao's dynamic int8 for the dense model, int8 experts for the students). ``runtime="ort"``: each
    model exported (``export(..., int8=...)``) and run in onnxruntime with as many threads as torch."""
    import copy

    import transformers

    from moebert_kernels import patch, quantize_dynamic

    int8 = dtype == "int8"
    cast = quantize_dynamic if int8 else (lambda m: m.to(dtype))
    if what == "ffn":
        return {k: cast(_ffn(k).eval()) for k in MODELS}
    torch.manual_seed(0)
    base = transformers.BertModel(transformers.BertConfig()).eval()
    out = {}
    for k, kw in MODELS.items():
        net = copy.deepcopy(base)
        if kw is not None:
            patch(net, **kw)
        if runtime == "ort":
            out[k] = _ort(net, k, int8)
        else:
            out[k] = cast(net)
    return out


def _ort(net, name: str, int8: bool):
    import tempfile

    import moebert_kernels.onnx as mo

    folder = tempfile.mkdtemp(prefix=f"interleaved_{name}_")
    # export's own parity check runs on a tiny batch: int8 within INT8_TOLERANCE, fp32 within 1e-4
    return mo.OrtModel(mo.export(net, folder, int8=int8), threads=torch.get_num_threads())


def _calls(models, what: str, B: int, dtype):
    g = torch.Generator().manual_seed(0)
    if what == "ffn":
        x = torch.randn(B * SEQ, 768, generator=g).to(dtype)
        ids = torch.randint(0, 30522, (B * SEQ,), generator=g)
        return {k: (lambda m=m, k=k: m(x) if k == "dense" else m(x, input_ids=ids)) for k, m in models.items()}
    ids = torch.randint(1000, 30522, (B, SEQ), generator=g)
    mask = torch.ones_like(ids)
    return {k: (lambda m=m: m(input_ids=ids, attention_mask=mask)) for k, m in models.items()}


def measure(what: str, B: int, dtype, rounds: int, warmup_s: float, runtime: str = "torch", models=None) -> dict:
    models = models if models is not None else _models(dtype, what, runtime)
    calls = _calls(models, what, B, torch.float32 if dtype == "int8" else dtype)
    names = list(calls)
    times = {k: [] for k in names}
    with torch.inference_mode():
        end = time.perf_counter() + warmup_s * len(names)
        while time.perf_counter() < end:
            for k in names:
                calls[k]()
        for r in range(rounds):
            for k in names[r % len(names):] + names[:r % len(names)]:
                t0 = time.perf_counter()
                calls[k]()
                times[k].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) * 1e3 for k, v in times.items()}
    ratio = {k: statistics.median(d / t for d, t in zip(times["dense"], times[k])) for k in names}
    return {"what": what, "B": B, "T": B * SEQ, "dtype": str(dtype).replace("torch.", ""), "runtime": runtime,
            "median_ms": med, "speedup_vs_dense": ratio, "rounds": rounds}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--batches", default="1,8")
    p.add_argument("--dtypes", default="float32,bfloat16,int8", help="torch float dtypes and/or int8")
    p.add_argument("--runtimes", default="torch", help="torch and/or ort (onnxruntime: encoder only, fp32/int8)")
    p.add_argument("--what", default="model,ffn", help="model (encoder at S=128), ffn (the layer on B*128 tokens)")
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--warmup", type=float, default=1.5, help="seconds of warm-up per model")
    p.add_argument("--json", default="interleaved_tied.json")
    a = p.parse_args(argv)
    set_cpu_threads()
    malloc = pin_glibc_malloc()
    env = {"cpu": cpu_model(), "threads": torch.get_num_threads(), "torch": torch.__version__, "malloc": malloc,
           "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "python": platform.python_version(),
           "load_at_start": os.getloadavg(), "command": " ".join(["python", *sys.argv])}
    print(f"{env['cpu']}, {env['threads']} threads, torch {env['torch']}, {env['date']}, load {env['load_at_start']}")
    rows = []
    for what, rt, dt in ((w, rt, dt) for w in a.what.split(",") for rt in a.runtimes.split(",")
                         for dt in a.dtypes.split(",")):
        if rt == "ort" and (what != "model" or dt not in ("float32", "int8")):
            continue  # onnxruntime: the exported encoder, fp32 or int8
        dtype = dt if dt == "int8" else getattr(torch, dt)
        models = _models(dtype, what, rt)  # once for every batch size
        for B in (int(b) for b in a.batches.split(",")):
            if what == "ffn" and B != 1:
                continue  # the layer alone at T=128 (B=1's tokens), as test_bench_tied
            r = measure(what, B, dtype, a.rounds, a.warmup, rt, models)
            rows.append(r)
            print(f"{what:5s} {rt:5s} B={B} {r['dtype']:8s} " + "  ".join(
                f"{k} {r['median_ms'][k]:.2f} ms ({r['speedup_vs_dense'][k]:.2f}x)" for k in r["median_ms"]),
                flush=True)
    with open(a.json, "w") as f:
        json.dump({"machine": env, "results": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
