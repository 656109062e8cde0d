"""Gated MoE-FFN (ModernBERT's GeGLU experts): ModernBERT-base's dense MLP against the routed experts.

- ``dense``: ModernBERT-base's MLP, ``Wo(gelu(a) * g)`` with ``[a; g] = Wi x``, d=768, I=1152, no biases;
- ``torch`` / ``triton``: ``moe_ffn(..., activation="geglu")`` with E=4 experts of h=288 (I/4), no biases.

Routing is uniform random. CPU (fp32): T in {128, 1024}; GPU (bf16): T up to 64k.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from _timing import bench_device, bench_dtype, full_matrix, interpret_mode
from moebert_kernels.ops import RoutingPlan, backend_status, moe_ffn, moe_ffn_reference

DEVICE = bench_device()
DTYPE = bench_dtype(DEVICE)
D, I, E = 768, 1152, 4
H = I // E
TOKENS = [128, 1024, 4096, 16384, 65536] if DEVICE.type == "cuda" or full_matrix() else [128, 1024]
NEEDS = ("gated", "no_bias")


def _rnd(g, *shape, scale=1.0):
    return (torch.randn(*shape, generator=g) * scale).to(device=DEVICE, dtype=DTYPE)


def dense_geglu(x, wi, wo):
    a, g = F.linear(x, wi).chunk(2, dim=-1)
    return F.linear(F.gelu(a) * g, wo)


@pytest.mark.parametrize("impl", ["dense", "torch", "triton"])
@pytest.mark.parametrize("T", TOKENS)
@pytest.mark.parametrize("mode", ["fwd", "fwd+bwd"])
def test_moe_ffn_gated(bench, mode, T, impl):
    dtype_name = str(DTYPE).replace("torch.", "")
    bench.benchmark.group = f"moe_ffn_gated {mode} T={T} E={E} {dtype_name}"
    if impl == "triton" and interpret_mode():
        pytest.skip("TRITON_INTERPRET=1: interpreter timings are meaningless")
    if impl != "dense":
        ok, why = backend_status("moe_ffn", impl, DEVICE, NEEDS)
        if not ok:
            pytest.skip(f"backend {impl!r} unavailable on {DEVICE.type}: {why}")
    train = mode == "fwd+bwd"
    g = torch.Generator().manual_seed(0)
    x = _rnd(g, T, D)
    if impl == "dense":
        params = [x, _rnd(g, 2 * I, D, scale=D ** -0.5), _rnd(g, D, I, scale=I ** -0.5)]
        call = lambda: dense_geglu(*params)  # noqa: E731
        hidden = I
    else:
        w1, w2 = _rnd(g, E, 2 * H, D, scale=D ** -0.5), _rnd(g, E, D, H, scale=H ** -0.5)
        plan = RoutingPlan.from_expert_ids(torch.randint(0, E, (T,), generator=g).to(DEVICE), E)
        params = [x, w1, w2]
        call = lambda: moe_ffn(x, plan, w1, None, w2, None, activation="geglu", backend=impl)  # noqa: E731
        hidden = H
        with torch.no_grad():  # a benchmark of a wrong result is worthless
            ref = moe_ffn_reference(x.double(), plan.sorted_token_ids, plan.expert_offsets, w1.double(), None,
                                    w2.double(), None, None, "geglu")
            err = float((call().double() - ref).norm() / ref.norm())
        assert err < (1e-4 if DTYPE == torch.float32 else 3e-2), f"relative error {err:.2e}"
    for p in params:
        p.requires_grad_(train)
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

    flops = 6.0 * T * D * hidden * (3 if train else 1)  # up (2 hidden wide) + down; ref_gemm: the same FLOPs
    bench.run(fn, flops=flops, ref_gemm=(T, D, 3 * hidden // 2), kind="moe_ffn_gated", impl=impl, mode=mode, T=T, E=E,
              d=D, h=hidden, dtype=dtype_name)
