"""MoE-FFN layer: the ways to compute a top-1 routed expert FFN, side by side on one shape.

Each benchmark group is one shape (mode, T, E, dtype), so one table compares:

- ``dense``       BERT's own FFN: Linear d->3072, GELU, Linear 3072->d (what MoEBERT replaces);
- ``loop``        MoEBERT's dispatch: argsort, ``split(counts.tolist())`` (a host sync), a Python
                  loop over the experts, then the inverse permutation (written here as the baseline);
- ``padded_bmm``  tokens scattered into an ``[E, capacity, d]`` buffer (capacity = max count,
                  one host sync), two ``baddbmm``, gathered back;
- ``grouped_mm``  ``F.grouped_mm`` / ``torch._grouped_mm`` on expert-sorted rows, with a separate
                  gather before and scatter after (skipped where the device/dtype lacks it);
- ``torch`` / ``triton`` / ``cuda``: ``moebert_kernels.ops.moe_ffn(..., backend=...)``;

All compute y = W2[e] gelu(W1[e] x + b1[e]) + b2[e] (no gate). The routing plan is built once
outside the timed region for the alternatives that take one (hash routing builds it once per
batch for all 12 layers); the loop baseline sorts inside, as MoEBERT does in every layer.
Routing is uniform random (what a hash router gives). d = h = 768.

CPU (fp32, 2 threads): T in {128, 1024}, E = 4 by default; ``MOEBERT_BENCH_FULL=1`` for all.
GPU (bf16, what the first GPU run must decide, in this order): forward + backward, then forward, at
T in {1k, 4k, 16k}, E = 4, for ``dense_equal`` (cuBLAS: a dense d -> h -> d FFN with h = 768, the same FLOPs as
the routed layer), ``grouped_mm``, ``loop``, ``triton`` and ``cuda``, each eager and captured in a CUDA graph
(``<impl>+graph``; the loop syncs with the host, so it has no graph row). ``MOEBERT_BENCH_FULL=1`` on a GPU adds
the other implementations, T = 128 and 64k, and E = 8.
Every row's ``frac_gemm_pair`` is its rate over cuBLAS dense GEMMs of equal FLOPs (forward: the GEMM pair;
forward + backward: the pair and its four backward GEMMs); report.py tabulates it for cuda and triton.
"""
from __future__ import annotations

import os
from functools import lru_cache

import pytest
import torch
import torch.nn.functional as F

from _timing import bench_device, bench_dtype, copy_bandwidth, full_matrix, interpret_mode
from moebert_kernels.ops import RoutingPlan, backend_status, moe_ffn, moe_ffn_reference

DEVICE = bench_device()
DTYPE = bench_dtype(DEVICE)
D, H, D_FF = 768, 768, 3072

GPU_FIRST = DEVICE.type == "cuda" and not full_matrix()
if GPU_FIRST:
    TOKENS, EXPERTS = [1024, 4096, 16384], [4]
    IMPLS = ["dense_equal", "grouped_mm", "loop", "triton", "cuda"]
elif DEVICE.type == "cuda" or full_matrix():
    TOKENS, EXPERTS = [128, 1024, 4096, 16384, 65536], [4, 8]
    IMPLS = ["dense", "dense_equal", "loop", "padded_bmm", "grouped_mm", "torch", "triton", "cuda"]
else:
    TOKENS, EXPERTS = [128, 1024], [4]
    IMPLS = ["dense", "dense_equal", "loop", "padded_bmm", "grouped_mm", "torch", "triton", "cuda"]
if os.environ.get("MOEBERT_BENCH_EXPERTS"):  # e.g. "4": the BERT-base rows only
    EXPERTS = [int(e) for e in os.environ["MOEBERT_BENCH_EXPERTS"].split(",")]
MODES = ["fwd+bwd", "fwd"]  # training's rows first: a run cut short keeps them
GRAPHS = [False, True] if DEVICE.type == "cuda" else [False]
# One flat list, so pytest runs the cases in exactly this order (mode, then T, then impl, eager then graph).
CASES = [pytest.param(m, e, t, i, g, id=f"{m}-{e}-{t}-{i}{'+graph' if g else ''}")
         for m in MODES for e in EXPERTS for t in TOKENS for i in IMPLS for g in GRAPHS]
BACKENDS = ("torch", "triton", "cuda")


# ---- the baselines ------------------------------------------------------------------------

def dense_ffn(x, w1, b1, w2, b2):
    return F.linear(F.gelu(F.linear(x, w1, b1)), w2, b2)


def loop_moe(x, expert_ids, w1, b1, w2, b2):
    """MoEBERT-style dispatch: sort, split on host counts, loop, restore order."""
    E = w1.shape[0]
    order = torch.argsort(expert_ids)
    counts = torch.bincount(expert_ids, minlength=E)
    chunks = x[order].split(counts.tolist())  # host sync in every layer
    outs = [F.linear(F.gelu(F.linear(c, w1[e], b1[e])), w2[e], b2[e]) for e, c in enumerate(chunks)]
    return torch.cat(outs)[torch.argsort(order)]


def plan_indices(plan: RoutingPlan):
    """Per-batch metadata derived from the plan without a sync: expert of each sorted row,
    its slot inside its expert, and grouped_mm's int32 end offsets."""
    e_sorted = plan.expert_ids.index_select(0, plan.sorted_token_ids)
    slot = torch.arange(plan.num_tokens, device=plan.device) - plan.expert_offsets.index_select(0, e_sorted)
    return e_sorted, slot, plan.expert_offsets[1:].to(torch.int32)


def padded_bmm_moe(x, plan, e_sorted, slot, w1, b1, w2, b2):
    E, d = w1.shape[0], x.shape[1]
    cap = int(plan.expert_counts.max())  # host sync: the capacity sizes the buffer
    dest = e_sorted * cap + slot  # row of each sorted token in the [E*cap] buffer
    xp = x.new_zeros(E * cap, d).index_copy(0, dest, x.index_select(0, plan.sorted_token_ids))
    hp = F.gelu(torch.baddbmm(b1.unsqueeze(1), xp.view(E, cap, d), w1.transpose(1, 2)))
    yp = torch.baddbmm(b2.unsqueeze(1), hp, w2.transpose(1, 2))
    return yp.reshape(E * cap, -1).index_select(0, dest.index_select(0, plan.inverse))


def _grouped_mm_fn():
    return getattr(F, "grouped_mm", None) or getattr(torch, "_grouped_mm", None)


def grouped_mm_moe(x, plan, e_sorted, offs, w1, b1, w2, b2):
    gmm = _grouped_mm_fn()
    xs = x.index_select(0, plan.sorted_token_ids)  # gather
    hs = F.gelu(gmm(xs, w1.transpose(1, 2), offs=offs) + b1.index_select(0, e_sorted))
    ys = gmm(hs, w2.transpose(1, 2), offs=offs) + b2.index_select(0, e_sorted)
    return ys.index_select(0, plan.inverse)  # scatter back to token order


@lru_cache(maxsize=None)
def grouped_mm_support(device_type: str, dtype: torch.dtype) -> tuple[bool, str]:
    """Probe grouped_mm once with a real small case (forward, backward, values)."""
    if _grouped_mm_fn() is None:
        return False, f"torch {torch.__version__} has neither F.grouped_mm nor torch._grouped_mm"
    try:
        dev = torch.device(device_type)
        x, plan, w = _inputs(64, 2, dev, dtype, requires_grad=True)
        e_sorted, _, offs = plan_indices(plan)
        y = grouped_mm_moe(x, plan, e_sorted, offs, *w)
        y.backward(torch.randn_like(y))
        with torch.no_grad():
            ref = moe_ffn_reference(x.double(), plan.sorted_token_ids, plan.expert_offsets, *(t.double() for t in w))
            err = float((y.detach().double() - ref).norm() / ref.norm())
        if not err < _tolerance(dtype):
            return False, f"grouped_mm gives wrong values here (relative error {err:.2e})"
    except Exception as exc:  # noqa: BLE001 - any failure means "not supported here"
        return False, f"grouped_mm unsupported on {device_type}/{dtype}: {type(exc).__name__}: {exc}"[:300]
    return True, ""


# ---- inputs -------------------------------------------------------------------------------

def _tolerance(dtype):
    return 1e-4 if dtype in (torch.float32, torch.float64) else 3e-2


def _inputs(T, E, device, dtype, requires_grad=False, seed=0):
    g = torch.Generator(device="cpu").manual_seed(seed)

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(device=device, dtype=dtype)

    x = rnd(T, D)
    w = [rnd(E, H, D, scale=D ** -0.5), rnd(E, H, scale=0.1), rnd(E, D, H, scale=H ** -0.5), rnd(E, D, scale=0.1)]
    ids = torch.randint(0, E, (T,), generator=g).to(device)
    plan = RoutingPlan.from_expert_ids(ids, E)
    if requires_grad:
        for t in [x] + w:
            t.requires_grad_(True)
    return x, plan, w


def _dense_weights(device, dtype, requires_grad, hidden=D_FF):
    g = torch.Generator(device="cpu").manual_seed(1)
    w = [torch.randn(hidden, D, generator=g) * D ** -0.5, torch.randn(hidden, generator=g) * 0.1,
         torch.randn(D, hidden, generator=g) * hidden ** -0.5, torch.randn(D, generator=g) * 0.1]
    return [t.to(device=device, dtype=dtype).requires_grad_(requires_grad) for t in w]


def _skip_reason(impl):
    if impl in BACKENDS:
        if impl == "triton" and interpret_mode():
            return "TRITON_INTERPRET=1: interpreter timings are meaningless; the triton backend is GPU-only here"
        ok, why = backend_status("moe_ffn", impl, DEVICE)
        return None if ok else f"backend {impl!r} unavailable on {DEVICE.type}: {why}"
    if impl == "grouped_mm":
        ok, why = grouped_mm_support(DEVICE.type, DTYPE)
        return None if ok else why
    return None


# ---- the benchmark ------------------------------------------------------------------------

@pytest.mark.parametrize("mode, E, T, impl, graph", CASES)
def test_moe_ffn(bench, mode, E, T, impl, graph):
    dtype_name = str(DTYPE).replace("torch.", "")
    bench.benchmark.group = f"moe_ffn {mode} T={T} E={E} {dtype_name}"
    why = _skip_reason(impl)
    if why:
        pytest.skip(why)
    if graph and impl == "loop":
        pytest.skip("the loop reads expert counts on the host (.tolist()): a CUDA graph cannot capture it")
    train = mode == "fwd+bwd"
    x, plan, w = _inputs(T, E, DEVICE, DTYPE, requires_grad=train)
    e_sorted, slot, offs = plan_indices(plan)

    if impl in ("dense", "dense_equal"):
        hidden = D_FF if impl == "dense" else H
        params = [x] + _dense_weights(DEVICE, DTYPE, train, hidden)
        call = lambda: dense_ffn(*params)  # noqa: E731
        weights = params[1:]
    else:
        params = [x] + w
        hidden, weights = H, w
        call = {
            "loop": lambda: loop_moe(x, plan.expert_ids, *w),
            "padded_bmm": lambda: padded_bmm_moe(x, plan, e_sorted, slot, *w),
            "grouped_mm": lambda: grouped_mm_moe(x, plan, e_sorted, offs, *w),
        }.get(impl, lambda: moe_ffn(x, plan, *w, backend=impl))
        _check_values(call, x, plan, w)

    if train:
        grad_y = torch.randn(T, D, device=DEVICE, dtype=DTYPE)

        def fn():
            for p in params:
                p.grad = None
            call().backward(grad_y)
    else:
        def fn():
            with torch.no_grad():
                return call()

    if graph:
        fn = _graph_replay(fn)
    flops = 4.0 * T * D * hidden * (3 if train else 1)
    info = {"kind": "moe_ffn", "impl": impl + ("+graph" if graph else ""), "mode": mode, "T": T, "E": E, "d": D,
            "h": hidden, "dtype": dtype_name, "graph": graph}
    if DEVICE.type == "cuda" and not train:
        # Small T is bound by reading the weights once: report the time against that floor.
        wbytes = sum(t.numel() for t in weights) * weights[0].element_size()
        info["weight_bytes"] = wbytes
        info["weight_floor_us"] = round(wbytes / copy_bandwidth(DEVICE) * 1e6, 3)
    bench.run(fn, flops=flops, ref_gemm=(T, D, hidden), ref_backward=train, **info)
    if DEVICE.type == "cuda" and "weight_floor_us" in info and bench.benchmark.stats is not None:
        med_us = bench.benchmark.stats.stats.median * 1e6
        bench.benchmark.extra_info["x_weight_floor"] = round(med_us / info["weight_floor_us"], 3)


def _graph_replay(fn):
    """``fn`` captured once in a CUDA graph (after a warm-up on a side stream); returns its replay."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    try:
        with torch.cuda.stream(side):
            for _ in range(3):
                fn()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            fn()
    except Exception as exc:  # noqa: BLE001 - an implementation that cannot be captured is a skip, with why
        torch.cuda.synchronize()
        pytest.skip(f"not CUDA-graph capturable: {type(exc).__name__}: {exc}"[:300])
    return graph.replay


def _check_values(call, x, plan, w):
    """A benchmark of a wrong result is worthless: compare once with the float64 reference."""
    with torch.no_grad():
        y = call()
        ref = moe_ffn_reference(x.double(), plan.sorted_token_ids, plan.expert_offsets, *(t.double() for t in w))
    err = float((y.double() - ref).norm() / ref.norm())
    assert err < _tolerance(x.dtype), f"relative error {err:.2e} against the float64 reference"
