"""Timing helpers shared by the benchmark files.

Every benchmark calls ``Bench.run(fn, ...)`` (the ``bench`` fixture from conftest.py).

- CPU: pytest-benchmark's own host clock (work on CPU is synchronous), torch threads
  pinned (2 by default) so numbers are stable and comparable between runs.
- CUDA: never a host clock around async work. Each round enqueues an L2 flush, then
  CUDA event / fn / CUDA event, and waits for the end event; the round's duration is the
  device time between the two events (the ``triton.testing.do_bench`` method). The flush
  keeps the GPU busy while the host enqueues fn, so host launch latency before the first
  kernel is hidden, and weights are read from HBM, not a warm L2 (a real encoder cycles
  through 12 layers of weights, more than L2 holds). The device time is handed to
  pytest-benchmark through a clock object (its stats, JSON and terminal table are
  therefore device time).

``extra_info`` gets: device, dtype, T, E, impl, mode, flops, tflops, the measured rate of a
dense GEMM pair of equal FLOPs on the same device (``gemm_pair_tflops``; for a forward + backward, the pair's
six GEMMs) and the fraction ``frac_gemm_pair``.
"""
from __future__ import annotations

import ctypes
import math
import os
import platform
import time
from typing import Callable, Optional

import torch

__all__ = [
    "Bench",
    "DeviceClock",
    "bench_device",
    "bench_dtype",
    "copy_bandwidth",
    "cpu_model",
    "full_matrix",
    "gemm_pair_tflops",
    "interpret_mode",
    "set_cpu_threads",
]

DEFAULT_CPU_THREADS = 2


def bench_device() -> torch.device:
    """CUDA when present, else CPU; ``MOEBERT_BENCH_DEVICE=cpu`` forces CPU on a GPU machine."""
    want = os.environ.get("MOEBERT_BENCH_DEVICE", "").lower()
    if want == "cpu" or not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda")


def bench_dtype(device: torch.device) -> torch.dtype:
    # fp32 on CPU (what MoEBERT serves on CPU), bf16 on GPU (what it trains and serves in).
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def full_matrix() -> bool:
    return os.environ.get("MOEBERT_BENCH_FULL", "0") == "1"


def interpret_mode() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def set_cpu_threads() -> int:
    n = int(os.environ.get("MOEBERT_BENCH_THREADS", DEFAULT_CPU_THREADS))
    torch.set_num_threads(n)
    return n


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


_FLUSH: dict[tuple, torch.Tensor] = {}


def _flush_buffer(device: torch.device, nbytes: int) -> torch.Tensor:
    # Larger than any GPU's L2 (H100: 50 MB); zeroing it evicts what fn would find cached.
    key = (str(device), nbytes)
    if key not in _FLUSH:
        _FLUSH[key] = torch.empty(nbytes // 4, dtype=torch.int32, device=device)
    return _FLUSH[key]


class DeviceClock:
    """A clock for pytest-benchmark that advances by device time only.

    ``timed(fn)`` wraps fn so that each call flushes L2, brackets fn with CUDA events,
    waits for the end event and adds the elapsed device time to the clock. pytest-benchmark
    reads the clock before and after each call, so a round's duration is fn's device time.
    """

    def __init__(self, device: torch.device, flush_bytes: int = 256 << 20):
        self.now = 0.0
        self.samples: list[float] = []
        self._flush = _flush_buffer(device, flush_bytes)
        self.__name__ = "DeviceClock"  # how pytest-benchmark names the timer in its JSON

    def __call__(self) -> float:
        return self.now

    def timed(self, fn: Callable[[], object]) -> Callable[[], object]:
        def run():
            self._flush.zero_()
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            start.record()
            out = fn()
            end.record()
            end.synchronize()
            dt = start.elapsed_time(end) / 1e3
            self.samples.append(dt)
            self.now += dt
            return out

        run.__name__ = getattr(fn, "__name__", "run")
        return run


def _time_once(fn: Callable[[], object], device: torch.device) -> float:
    """Seconds for one call (device time on CUDA); only used to pick a round count."""
    if device.type == "cuda":
        clock = DeviceClock(device, flush_bytes=4 << 20)
        clock.timed(fn)()
        return clock.samples[-1]
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def _median(xs: list[float]) -> float:
    xs = sorted(xs)
    n = len(xs)
    return xs[n // 2] if n % 2 else 0.5 * (xs[n // 2 - 1] + xs[n // 2])


_GEMM_RATES: dict[tuple, float] = {}


def gemm_pair_tflops(T: int, d: int, h: int, dtype: torch.dtype, device: torch.device, reps: int = 10,
                     backward: bool = False) -> float:
    """Measured TFLOP/s of a plain dense GEMM pair ``[T,d]x[d,h] -> [T,h]x[h,d]`` (cuBLAS/MKL).

    This is the rate an ideal routed FFN of the same FLOPs could reach; the MoE benchmarks
    report their fraction of it. ``backward``: the pair's forward and the four GEMMs of its backward
    (dX and dW of each), the work of a training step. Cached per shape.
    """
    key = (T, d, h, dtype, str(device), backward)
    if key in _GEMM_RATES:
        return _GEMM_RATES[key]
    g = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(T, d, device=device, dtype=dtype, generator=g)
    w1 = torch.randn(h, d, device=device, dtype=dtype, generator=g) * d ** -0.5
    w2 = torch.randn(d, h, device=device, dtype=dtype, generator=g) * h ** -0.5

    g_out = torch.randn(T, d, device=device, dtype=dtype, generator=g)

    def pair():
        hid = torch.mm(x, w1.t())
        y = torch.mm(hid, w2.t())
        if backward:  # dH = G W2, dW2 = G^T H, dX = dH W1, dW1 = dH^T X
            dh = torch.mm(g_out, w2)
            torch.mm(g_out.t(), hid)
            torch.mm(dh, w1)
            torch.mm(dh.t(), x)
        return y

    with torch.no_grad():
        for _ in range(2):
            pair()
        if device.type == "cuda":
            torch.cuda.synchronize()
            clock = DeviceClock(device)
            timed = clock.timed(pair)
            for _ in range(reps):
                timed()
            t = _median(clock.samples)
        else:
            samples = []
            for _ in range(max(3, reps // 2)):
                t0 = time.perf_counter()
                pair()
                samples.append(time.perf_counter() - t0)
            t = _median(samples)
    rate = 4.0 * T * d * h * (3 if backward else 1) / t / 1e12
    _GEMM_RATES[key] = rate
    return rate


def pin_glibc_malloc() -> str:
    """Fix glibc's mmap and trim thresholds for the whole run; returns what was done, for the report.

    By default glibc moves its mmap threshold up as large blocks are freed and trims the heap top, so a case
    that runs after one with many large temporaries can pay thousands of page faults a step (measured on the
    2-vCPU host: ``distill_loss`` fwd+bwd 2.1 ms median alone, 6.1 ms right after ``eager``, 1,711 faults a
    step). Tables would then rank the run order, not the code. Fixed thresholds (32 MiB, 1 GiB) keep freed
    blocks in the heap for every case alike, much as tcmalloc or jemalloc would.
    """
    if os.environ.get("MOEBERT_BENCH_MALLOC", "pinned") == "default":
        return "glibc defaults (MOEBERT_BENCH_MALLOC=default)"
    try:
        libc = ctypes.CDLL("libc.so.6")
        M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
        ok = libc.mallopt(M_MMAP_THRESHOLD, 32 << 20) == 1 and libc.mallopt(M_TRIM_THRESHOLD, 1 << 30) == 1
    except (OSError, AttributeError):
        return "system default (not glibc)"
    return "glibc, mmap threshold 32 MiB, trim threshold 1 GiB (pinned)" if ok else "glibc defaults (mallopt failed)"


class Bench:
    """Runs one benchmark with the right clock and round count, and fills ``extra_info``."""

    def __init__(self, benchmark, config, device: torch.device):
        self.benchmark = benchmark
        self.device = device
        self.min_rounds = int(config.getoption("benchmark_min_rounds", 5) or 5)
        self.max_time = float(config.getoption("benchmark_max_time", 1.0) or 1.0)
        self.max_rounds = int(os.environ.get("MOEBERT_BENCH_MAX_ROUNDS", "200"))
        self.disabled = bool(config.getoption("benchmark_disable", False))

    def run(self, fn: Callable[[], object], *, flops: Optional[float] = None, ref_gemm: Optional[tuple] = None,
            ref_backward: bool = False, warmup: int = 2, **info):
        """Time ``fn`` (no arguments). ``flops``: useful FLOPs of one call (for TFLOP/s).
        ``ref_gemm``: (T, d, h) of the dense GEMM pair to compare the rate with (with its backward GEMMs
        too when ``ref_backward``: for a timed forward + backward).
        Other keyword arguments go to ``extra_info`` as they are."""
        bm, dev = self.benchmark, self.device
        ei = bm.extra_info
        ei.update(info)
        ei.setdefault("device", torch.cuda.get_device_name(dev) if dev.type == "cuda" else cpu_model())
        ei.setdefault("device_type", dev.type)
        if dev.type == "cpu":
            ei.setdefault("threads", torch.get_num_threads())
        if self.disabled:  # --benchmark-disable: pytest-benchmark runs it once, as a smoke test
            return bm.pedantic(fn, rounds=1, iterations=1)
        for _ in range(max(warmup - 1, 0)):
            fn()
        one = max(_time_once(fn, dev), 1e-7)  # the last warm-up call, timed, sets the round count
        rounds = int(min(self.max_rounds, max(self.min_rounds, math.ceil(self.max_time / one))))
        if dev.type == "cuda":
            clock = DeviceClock(dev)
            # pytest-benchmark has no public hook for a device clock: swap its timer for ours.
            if not hasattr(bm, "_timer"):
                raise RuntimeError("this pytest-benchmark has no _timer attribute; cannot install the CUDA clock")
            bm._timer = clock
            target = clock.timed(fn)
            ei["timer"] = "cuda-events (L2 flushed before each call)"
        else:
            target = fn
            ei["timer"] = "host perf_counter (synchronous CPU work)"
        result = bm.pedantic(target, rounds=rounds, iterations=1, warmup_rounds=0)
        med = bm.stats.stats.median if bm.stats is not None else None
        if med and flops:
            ei["flops"] = flops
            ei["tflops"] = round(flops / med / 1e12, 4)
            if ref_gemm is not None:
                rate = gemm_pair_tflops(*ref_gemm, bench_dtype(dev), dev, backward=ref_backward)
                ei["gemm_pair_tflops"] = round(rate, 4)
                ei["frac_gemm_pair"] = round(ei["tflops"] / rate, 4)
        return result


_BANDWIDTH: dict[str, float] = {}


def copy_bandwidth(device: torch.device, nbytes: int = 1 << 30) -> float:
    """Measured device-memory bandwidth in bytes/s (a large ``copy_``: read + write counted)."""
    key = str(device)
    if key not in _BANDWIDTH:
        src = torch.empty(nbytes // 4, dtype=torch.int32, device=device).fill_(1)
        dst = torch.empty_like(src)
        for _ in range(2):
            dst.copy_(src)
        if device.type == "cuda":
            clock = DeviceClock(device, flush_bytes=4 << 20)
            timed = clock.timed(lambda: dst.copy_(src))
            for _ in range(5):
                timed()
            t = _median(clock.samples)
        else:
            samples = []
            for _ in range(3):
                t0 = time.perf_counter()
                dst.copy_(src)
                samples.append(time.perf_counter() - t0)
            t = _median(samples)
        _BANDWIDTH[key] = 2.0 * nbytes / t
        del src, dst
    return _BANDWIDTH[key]
