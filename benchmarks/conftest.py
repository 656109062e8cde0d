"""Shared set-up for ``pytest benchmarks/``.

- Runs on CUDA (bf16) when a GPU is present, else on CPU (fp32, 2 torch threads;
  ``MOEBERT_BENCH_THREADS`` changes it, ``MOEBERT_BENCH_DEVICE=cpu`` forces CPU).
- ``MOEBERT_BENCH_FULL=1`` runs the full shape matrix on CPU too (slow on 2 cores).
- The ``bench`` fixture wraps pytest-benchmark's ``benchmark`` with the right clock
  (see ``_timing.py``). Each benchmark group is one shape, so one table compares the
  alternatives on it.
- glibc's malloc is pinned (see ``_timing.pin_glibc_malloc``) so CPU times do not depend on the order
  of the cases; ``MOEBERT_BENCH_MALLOC=default`` leaves it alone.
- The environment (torch, triton, CUDA, device, threads, malloc, command) is written into the
  JSON's ``machine_info`` for ``report.py``.
"""
import os
import shlex
import sys

import pytest
import torch

from _timing import Bench, bench_device, cpu_model, full_matrix, pin_glibc_malloc, set_cpu_threads

DEVICE = bench_device()
if DEVICE.type == "cpu":
    set_cpu_threads()
MALLOC = pin_glibc_malloc()
# CPU timings on a shared machine depend on what else runs; the report states the load.
LOAD_AT_START = os.getloadavg() if hasattr(os, "getloadavg") else None


def pytest_report_header(config):
    where = torch.cuda.get_device_name(DEVICE) if DEVICE.type == "cuda" else \
        f"{cpu_model()} ({torch.get_num_threads()} torch threads)"
    return [f"moebert benchmarks on {DEVICE.type}: {where}; full matrix: {full_matrix()}; "
            f"TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET', '0')}"]


@pytest.fixture
def bench(benchmark, request):
    return Bench(benchmark, request.config, DEVICE)


def pytest_benchmark_update_machine_info(config, machine_info):
    info = {
        "torch": torch.__version__,
        "cuda": torch.version.cuda or "none",
        "device_type": DEVICE.type,
        "cpu_model": cpu_model(),
        "torch_threads": torch.get_num_threads(),
        "full_matrix": full_matrix(),
        "command": " ".join(["pytest"] + [shlex.quote(a) for a in sys.argv[1:]]),
        "cpu_count": os.cpu_count(),
        "malloc": MALLOC,
    }
    if LOAD_AT_START is not None:
        info["loadavg_start"] = [round(v, 2) for v in LOAD_AT_START]
        info["loadavg_end"] = [round(v, 2) for v in os.getloadavg()]
    try:
        import triton

        info["triton"] = triton.__version__
    except Exception as exc:  # noqa: BLE001 - report whatever made it unusable
        info["triton"] = f"unavailable ({type(exc).__name__})"
    if DEVICE.type == "cuda":
        props = torch.cuda.get_device_properties(DEVICE)
        info["gpu"] = torch.cuda.get_device_name(DEVICE)
        info["gpu_sm"] = f"{props.major}.{props.minor}"
        info["gpu_memory_gib"] = round(props.total_memory / 2**30, 1)
    machine_info["moebert"] = info

