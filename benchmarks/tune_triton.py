"""Tune the Triton ``moe_ffn`` launch configs on this GPU and write them as data.

    python benchmarks/tune_triton.py                       # d=768 h=3072 E=4, bf16, T in {1k, 4k, 16k}
    python benchmarks/tune_triton.py --d 1024 --h 4096 --dtype bfloat16 float16 --budget-s 300
    python benchmarks/tune_triton.py --dry-run --out /tmp/cfg --device-name Fake_GPU   # no GPU: a cost model times

For every config kind (``gemm``: up, down and dX; ``hidden``: the backward's first kernel; ``dw``: the
weight gradients), dtype and token count, each candidate is timed with the other kinds at the
heuristic's choice, and the fastest is kept. The result goes to
``moebert_kernels/triton/configs/moe_ffn,d=..,h=..,E=..,device_name=<GPU>.json`` (``--out`` for
another folder; point ``MOEBERT_TRITON_CONFIG_DIR`` at it to use it), written whole.

Candidates come from one grid, filtered by what the hardware and the kernels allow: shared memory
for the pipeline stages, fp32 accumulator registers per thread (the bwd-hidden epilogue keeps about
five fp32 tiles, so 32 elements per thread at most; the GEMMs 128), and row tiles no taller than an
expert's share of the tokens. The ``--max-candidates`` nearest the heuristic (in log2 steps) are
timed, so a sweep stays within a few minutes: compiles dominate, and one config compiles once for
all token counts. ``--budget-s`` stops a sweep early (the file records it).

``--dry-run`` replaces the GPU timer by a deterministic cost model, so candidate generation, the
selection and the file writing run (and are tested) on a CPU.
"""
from __future__ import annotations

import argparse
import datetime
import math
import os
import sys
import time
from typing import Callable, Iterable, Optional

import torch

KINDS = ("gemm", "hidden", "dw")
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
SMEM_BYTES = {8: 166912, 9: 232448}  # per-block dynamic shared memory by compute-capability major (A100, H100)
MAX_ACC_PER_THREAD = {"gemm": 128, "hidden": 32, "dw": 128}  # fp32 accumulator elements per thread


def candidates(kind: str, tokens: int, E: int, dtype: torch.dtype, smem_bytes: int) -> list:
    """Every config of the grid that fits the hardware and the kernel (unordered)."""
    from moebert_kernels.triton.moe_ffn import MoEFFNConfig

    elem = 4 if dtype == torch.float32 else 2
    rows_per_expert = max(16, 1 << max(0, math.ceil(math.log2(max(1, tokens // E)))))
    out = []
    for bm in (16, 32, 64, 128, 256):
        for bn in (32, 64, 128, 256):
            for bk in (32, 64, 128):
                for warps in (4, 8):
                    for stages in (2, 3, 4, 5):
                        if kind != "dw" and bm > rows_per_expert:
                            continue  # a row tile never spans two experts: taller ones are mostly padding
                        if bm * bn / (32 * warps) > MAX_ACC_PER_THREAD[kind]:
                            continue
                        if stages * (bm * bk + bk * bn) * elem > smem_bytes:
                            continue
                        out.append(MoEFFNConfig(bm, bn, bk, warps, stages))
    return out


def nearest(cands: Iterable, ref, n: int) -> list:
    """The ``n`` candidates closest to ``ref`` in log2 steps of each field (ties broken by the fields)."""
    def dist(c):
        return sum(abs(math.log2(getattr(c, f)) - math.log2(getattr(ref, f)))
                   for f in ("block_m", "block_n", "block_k", "num_warps", "num_stages"))
    ranked = sorted(set(cands), key=lambda c: (dist(c), c.block_m, c.block_n, c.block_k, c.num_warps, c.num_stages))
    return ranked[:n]


def fake_time(kind: str, cfg, tokens: int, d: int, h: int, E: int) -> float:
    """Dry-run cost model (ms): padding waste, wave quantisation and a per-stage latency term. Made up, but
    deterministic and sensitive to every field, so tests can tell that the cheapest candidate was written."""
    rows = tokens / E
    pad = math.ceil(rows / cfg.block_m) * cfg.block_m / rows
    tiles = E * math.ceil(rows / cfg.block_m) * math.ceil(h / cfg.block_n)
    waves = math.ceil(tiles / 132) / max(tiles / 132, 1e-9)
    latency = 1.0 + 0.5 / cfg.num_stages + 0.1 * abs(cfg.num_warps - 8) / 8 + 16.0 / cfg.block_k / 8
    return 1e-6 * tokens * d * h * pad * min(waves, 4.0) * latency * (1.2 if kind == "hidden" else 1.0)


def gpu_timer(kind: str, d: int, h: int, E: int, dtype: torch.dtype) -> Callable:
    """A timer (cfg, tokens) -> ms that runs the launches of ``kind`` with ``cfg`` on random inputs."""
    import triton.testing

    from moebert_kernels.ops import RoutingPlan
    from moebert_kernels.triton import moe_ffn as tm

    cache = {}

    def inputs(tokens):
        if tokens not in cache:
            g = torch.Generator(device="cuda").manual_seed(0)
            x = torch.randn(tokens, d, device="cuda", dtype=dtype, generator=g)
            w1 = torch.randn(E, h, d, device="cuda", dtype=dtype, generator=g) * d ** -0.5
            w2 = torch.randn(E, d, h, device="cuda", dtype=dtype, generator=g) * h ** -0.5
            b1, b2 = torch.zeros(E, h, device="cuda", dtype=dtype), torch.zeros(E, d, device="cuda", dtype=dtype)
            gate = torch.rand(tokens, device="cuda", dtype=dtype)
            plan = RoutingPlan.from_expert_ids(torch.arange(tokens, device="cuda") % E, E)  # balanced, like hashing
            args = (plan.sorted_token_ids, plan.expert_offsets, w1, b1, w2, b2, gate)
            _, hidden = tm.moe_ffn_forward(x, *args, "gelu", True)
            cache[tokens] = (x, args, hidden, torch.randn_like(x))
        return cache[tokens]

    def run(cfg, tokens):
        x, args, hidden, go = inputs(tokens)
        if kind == "gemm":
            fn = lambda: tm.moe_ffn_forward(x, *args, "gelu", True)  # noqa: E731
            ctx = dict(gemm=cfg)
        else:  # hidden: dgate, db1, dX path; dw: the weight grads (and the hidden kernel they need)
            needs = [True, False, True, False, False, True] if kind == "hidden" else [False, True, True, True, True,
                                                                                       False]
            fn = lambda: tm.moe_ffn_backward(go, x, *args, hidden, "gelu", needs)  # noqa: E731
            ctx = {kind: cfg}
        with tm.override_config(**ctx):
            return triton.testing.do_bench(fn, warmup=10, rep=40)

    return run


def tune(d: int, h: int, E: int, dtypes: list, tokens: list, max_candidates: int, budget_s: float,
         smem_bytes: int, timer_for: Callable, log=print) -> tuple[dict, bool]:
    """{kind: {dtype name: {tokens: config fields}}} of the fastest candidates, and whether the budget cut it short."""
    from moebert_kernels.triton import moe_ffn as tm

    start, cut = time.monotonic(), False
    table: dict = {}
    for dtype_name in dtypes:
        dtype = DTYPES[dtype_name]
        for kind in KINDS:
            timer = timer_for(kind, d, h, E, dtype)
            for T in tokens:
                bucket = 1 << max(4, (T - 1).bit_length())
                ref = tm._default_config(kind, bucket, d, h, E, dtype, False)
                pool = nearest(candidates(kind, T, E, dtype, smem_bytes) + [ref], ref, max_candidates)
                best, best_ms = ref, timer(ref, T)
                for cfg in pool:
                    if time.monotonic() - start > budget_s:
                        cut = True
                        break
                    if cfg == ref:
                        continue
                    try:
                        ms = timer(cfg, T)
                    except Exception as err:  # a config the compiler refuses (resources): say so, skip it
                        log(f"  {kind} {dtype_name} T={T} {cfg}: skipped ({type(err).__name__}: {str(err)[:120]})")
                        continue
                    if ms < best_ms:
                        best, best_ms = cfg, ms
                log(f"{kind:6s} {dtype_name:8s} T={T:6d}: {best} {best_ms:.4f} ms (heuristic {ref})")
                table.setdefault(kind, {}).setdefault(dtype_name, {})[T] = {
                    f: getattr(best, f) for f in ("block_m", "block_n", "block_k", "num_warps", "num_stages", "chunk")}
    return table, cut


def main(argv: Optional[list] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--d", type=int, default=768)
    ap.add_argument("--h", type=int, default=3072)
    ap.add_argument("--E", type=int, default=4)
    ap.add_argument("--dtype", nargs="+", default=["bfloat16"], choices=list(DTYPES))
    ap.add_argument("--tokens", nargs="+", type=int, default=[1024, 4096, 16384])
    ap.add_argument("--max-candidates", type=int, default=16, help="per kind and token count")
    ap.add_argument("--budget-s", type=float, default=600.0, help="stop timing new candidates after this long")
    ap.add_argument("--out", default=None, help="folder for the JSON (default: the package's configs folder)")
    ap.add_argument("--dry-run", action="store_true", help="no GPU: time with a cost model (tests, CI)")
    ap.add_argument("--device-name", default=None, help="with --dry-run: the GPU name the file is for")
    args = ap.parse_args(argv)

    from moebert_kernels.triton import configs

    if args.dry_run:
        device_name = args.device_name or "DRY_RUN_GPU"
        smem = SMEM_BYTES[9]

        def timer_for(kind, d, h, E, dtype):
            return lambda cfg, T: fake_time(kind, cfg, T, d, h, E)
    else:
        if not torch.cuda.is_available():
            print("tune_triton.py needs a CUDA GPU (or --dry-run to check the plumbing on a CPU)", file=sys.stderr)
            return 2
        if args.device_name:
            print("--device-name is only for --dry-run: the file is named after the GPU it was timed on",
                  file=sys.stderr)
            return 2
        from moebert_kernels.triton.moe_ffn import gpu_name

        device_name = gpu_name(torch.device("cuda"))
        smem = SMEM_BYTES.get(torch.cuda.get_device_capability()[0], SMEM_BYTES[8])
        timer_for = gpu_timer
    table, cut = tune(args.d, args.h, args.E, args.dtype, sorted(set(args.tokens)), args.max_candidates,
                      args.budget_s, smem, timer_for)
    import triton

    meta = {"date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "triton": triton.__version__, "torch": torch.__version__,
            "command": "python benchmarks/tune_triton.py " + " ".join(argv if argv is not None else sys.argv[1:]),
            "dry_run": args.dry_run, "budget_cut_short": cut}
    path = configs.write_table(args.out or str(configs.PACKAGE_DIR), "moe_ffn",
                               {"d": args.d, "h": args.h, "E": args.E}, device_name, table, meta)
    print(f"wrote {path}" + (" (budget reached: not every candidate was timed)" if cut else ""))
    return 0


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    raise SystemExit(main())
