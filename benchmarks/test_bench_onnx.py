"""Serving on CPU: dense BERT-base against the MoEBERT student, in ONNX Runtime and in PyTorch.

BERT-base shapes (``BertConfig()``, random weights: speed does not depend on the values), encoder only
(``BertModel``), S=128, B in {1, 8}. The student is ``patch(num_experts=4, expert_size=768, shared=512)``
with hash routing, exported with ``moebert_kernels.onnx.export`` (the dense model through the same call).

- ``onnx_interleaved``: the four (runtime, model) pairs timed in alternation, one call each per round, so
  a shared machine's load drifts over all four alike; ``extra_info`` holds each median and the ratios
  (``student_x_ort`` = dense / student in ORT, ``student_x_torch`` likewise, ``ort_x_torch_student`` =
  PyTorch student / ORT student). pytest-benchmark's own stats are of one whole round.
- dtypes: fp32 in both runtimes; bf16 weights in PyTorch where the CPU has AVX512-BF16 or AMX-BF16
  (stock onnxruntime's CPU provider has no bf16 MatMul, so ORT's bf16 row is missing); int8 in ORT as
  ``moebert_kernels.onnx.quantize_int8`` of both files (what ``export(..., int8=True)`` writes) (``MOEBERT_BENCH_INT8=0`` skips it).
- Every callable is warmed up for ``MOEBERT_BENCH_WARMUP_S`` seconds (default 2) before timing: first
  touches of fresh memory are expensive on these VMs. ORT runs with 2 intra-op threads (the torch
  thread count), sequential execution.

Run: ``python -m pytest benchmarks/test_bench_onnx.py --benchmark-json=onnx.json`` (about 10 minutes on
2 cores, most of it the two exports and the warm-ups).
"""
from __future__ import annotations

import copy
import os
import re
import statistics
import time

import pytest
import torch

from moebert_kernels import patch

transformers = pytest.importorskip("transformers")
ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")
import moebert_kernels.onnx as mo  # noqa: E402

SEQ = 128
PATCH_KW = dict(num_experts=4, expert_size=768, shared=512)
WARMUP_S = float(os.environ.get("MOEBERT_BENCH_WARMUP_S", "2"))


def cpu_bf16() -> str:
    """'amx_bf16' / 'avx512_bf16' when the CPU has it (from /proc/cpuinfo), else ''."""
    try:
        flags = open("/proc/cpuinfo").read()
    except OSError:
        return ""
    for f in ("amx_bf16", "avx512_bf16"):
        if re.search(rf"\b{f}\b", flags):
            return f
    return ""


_CACHE: dict = {}


def _models(tmp_path_factory):
    """(dense, student) BertModels in fp32 and their ONNX folders, built once per session."""
    if "models" not in _CACHE:
        torch.manual_seed(0)
        dense = transformers.BertModel(transformers.BertConfig()).eval()
        student = patch(copy.deepcopy(dense), **PATCH_KW).eval()
        root = tmp_path_factory.mktemp("onnx_bench")
        files = {k: mo.export(m, str(root / k)) for k, m in (("dense", dense), ("student", student))}
        _CACHE["models"] = dense, student, files
    return _CACHE["models"]


def _int8(file: str) -> str:
    from moebert_kernels.onnx import quantize_int8  # per-channel, 7-bit weights: what `export --int8` writes

    out = file.replace(".onnx", ".int8.onnx")
    if not os.path.exists(out):
        quantize_int8(file, out)
    return out


def _session(file: str):
    so = ort.SessionOptions()
    so.intra_op_num_threads = torch.get_num_threads()
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    sess = ort.InferenceSession(file, so, providers=["CPUExecutionProvider"])
    return sess


def _ort_fn(file, ids, mask):
    sess = _session(file)
    feed = {"input_ids": ids.numpy(), "attention_mask": mask.numpy()}
    names = [i.name for i in sess.get_inputs()]
    if "token_type_ids" in names:
        feed["token_type_ids"] = torch.zeros_like(ids).numpy()
    return lambda: sess.run(None, feed)


def _torch_fn(model, ids, mask):
    def fn():
        with torch.inference_mode():
            return model(input_ids=ids, attention_mask=mask).last_hidden_state
    return fn


def _warm(fn):
    t0 = time.perf_counter()
    fn()
    while time.perf_counter() - t0 < WARMUP_S:
        fn()


CASES = [("fp32", 1), ("fp32", 8), ("bf16", 1), ("bf16", 8), ("int8", 1), ("int8", 8)]


@pytest.mark.parametrize("dtype,B", CASES, ids=[f"{d}-B{b}" for d, b in CASES])
def test_onnx_interleaved(benchmark, tmp_path_factory, dtype, B):
    if dtype == "bf16" and not cpu_bf16():
        pytest.skip("the CPU has neither AVX512-BF16 nor AMX-BF16")
    if dtype == "int8" and os.environ.get("MOEBERT_BENCH_INT8", "1") == "0":
        pytest.skip("MOEBERT_BENCH_INT8=0")
    benchmark.group = f"onnx_interleaved {B}x{SEQ} {dtype}"
    dense, student, files = _models(tmp_path_factory)
    g = torch.Generator().manual_seed(B)
    ids = torch.randint(1000, dense.config.vocab_size, (B, SEQ), generator=g)
    mask = torch.ones_like(ids)
    fns = {}
    if dtype == "fp32":
        fns["ort_dense"], fns["ort_student"] = (_ort_fn(files[k], ids, mask) for k in ("dense", "student"))
        fns["torch_dense"], fns["torch_student"] = _torch_fn(dense, ids, mask), _torch_fn(student, ids, mask)
    elif dtype == "bf16":  # bf16 weights (autocast would cast them on every call)
        fns["torch_dense"] = _torch_fn(copy.deepcopy(dense).to(torch.bfloat16), ids, mask)
        fns["torch_student"] = _torch_fn(copy.deepcopy(student).to(torch.bfloat16), ids, mask)
    else:
        fns["ort_dense"], fns["ort_student"] = (_ort_fn(_int8(files[k]), ids, mask) for k in ("dense", "student"))
    for fn in fns.values():
        _warm(fn)
    times: dict = {k: [] for k in fns}
    names = list(fns)

    def one_round():
        names.append(names.pop(0))  # rotate the order so no pair always follows the same one
        for k in names:
            t0 = time.perf_counter()
            fns[k]()
            times[k].append(time.perf_counter() - t0)

    rounds = 3 if benchmark.disabled else (15 if B == 1 else 5)
    benchmark.pedantic(one_round, rounds=rounds, iterations=1, warmup_rounds=0)
    med = {k: statistics.median(v) for k, v in times.items()}
    ei = benchmark.extra_info
    ei.update({f"{k}_ms": round(v * 1e3, 2) for k, v in med.items()})
    ei.update(B=B, S=SEQ, dtype=dtype, threads=torch.get_num_threads(), warmup_s=WARMUP_S,
              cpu_bf16=cpu_bf16() or "none", onnxruntime=ort.__version__)
    if "ort_dense" in med:
        ei["student_x_ort"] = round(med["ort_dense"] / med["ort_student"], 3)
    if "torch_dense" in med:
        ei["student_x_torch"] = round(med["torch_dense"] / med["torch_student"], 3)
    if "ort_student" in med and "torch_student" in med:
        ei["ort_x_torch_student"] = round(med["torch_student"] / med["ort_student"], 3)
        ei["ort_x_torch_dense"] = round(med["torch_dense"] / med["ort_dense"], 3)
