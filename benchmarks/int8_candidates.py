"""The int8 GEMM candidates for the CPU expert FFN, side by side: ``python benchmarks/int8_candidates.py``.

One expert GEMM ``x [M, K] @ w[N, K]^T`` at BERT-base student shapes, each candidate timed round-robin:
fbgemm/oneDNN packed weights through ``torch.ops.quantized.linear_dynamic`` (what ``ops.moe_ffn_int8`` uses),
``torch._int_mm`` with a per-token activation scale of our own, ``torch._weight_int8pack_mm`` (int8 weights,
fp32 activations), and fp32 / bf16 ``matmul`` for scale. Prints the median microseconds of each.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
import warnings

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _timing import cpu_model, pin_glibc_malloc, set_cpu_threads  # noqa: E402

SHAPES = [(32, 256, 768), (32, 768, 256), (128, 512, 768), (128, 768, 512), (1024, 256, 768)]  # (M, N, K)


def candidates(M: int, N: int, K: int) -> dict:
    from moebert_kernels.ops.moe_ffn_int8 import pack_experts, quantize_weight

    g = torch.Generator().manual_seed(0)
    x, w, b = torch.randn(M, K, generator=g), torch.randn(N, K, generator=g) / K ** 0.5, torch.randn(N, generator=g)
    w_q, scale = quantize_weight(w)
    packed = pack_experts(w_q[None], scale[None], b[None])[0]
    w_t = w_q.t().contiguous()
    xb, wb = x.bfloat16(), w.bfloat16()

    def int_mm():  # per-token symmetric int8 activations, int32 accumulate, rescale
        s = x.abs().amax(1, keepdim=True).clamp_min(1e-12) / 127
        return torch._int_mm(torch.round(x / s).to(torch.int8), w_t) * s * scale + b

    return {
        "fbgemm linear_dynamic": lambda: torch.ops.quantized.linear_dynamic(x, packed, True),
        "_int_mm per-token": int_mm,
        "_weight_int8pack_mm": lambda: torch._weight_int8pack_mm(x, w_q, scale) + b,
        "fp32 addmm": lambda: torch.addmm(b, x, w.t()),
        "bf16 matmul": lambda: xb @ wb.t(),
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rounds", type=int, default=30)
    a = p.parse_args(argv)
    set_cpu_threads()
    pin_glibc_malloc()
    warnings.filterwarnings("ignore", message=".*quantized tensor creation.*")
    print(f"{cpu_model()}, {torch.get_num_threads()} threads, torch {torch.__version__}, "
          f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, load {os.getloadavg()}")
    for M, N, K in SHAPES:
        fns = candidates(M, N, K)
        names, times = list(fns), {k: [] for k in fns}
        for k in names:
            fns[k]()
        for r in range(a.rounds):
            for k in names[r % len(names):] + names[:r % len(names)]:
                t0 = time.perf_counter()
                fns[k]()
                times[k].append(time.perf_counter() - t0)
        print(f"M={M:<5d} N={N:<5d} K={K:<4d} " + "  ".join(
            f"{k} {statistics.median(v) * 1e6:.0f} us" for k, v in times.items()), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
