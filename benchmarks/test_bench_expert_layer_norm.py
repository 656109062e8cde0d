"""Residual add + per-expert LayerNorm (what follows every MoE FFN), fused against the unfused PyTorch form.

Each group is one shape (mode, T, dtypes), so one table compares:

- ``eager``   what MoEFeedForward did before the fused op: ``z = x + r``, ``F.layer_norm``, then
              ``n * weight[ids] + bias[ids]`` (two ``[T, d]`` gathers);
- ``torch`` / ``triton`` / ``cuda``: ``moebert_kernels.expert_layer_norm(..., backend=...)``.

Inputs follow the GPU training case: FFN output in the compute dtype, residual and affine in fp32 (autocast),
so the result is fp32. ``extra_info["gbs"]`` is the useful traffic (x, residual and y once) per second and
``frac_copy`` its ratio to a measured device copy.

GPU: T in {4096, 65536}, d=768, E=4, bf16 FFN output. CPU (fp32, 2 threads): T=4096; triton is skipped
(the interpreter is a correctness tool).
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from _timing import bench_device, bench_dtype, copy_bandwidth
from moebert_kernels.ops import backend_status, expert_layer_norm

DEVICE = bench_device()
DTYPE = bench_dtype(DEVICE)
D, E, EPS = 768, 4, 1e-12
TOKENS = [4096, 65536] if DEVICE.type == "cuda" else [4096]
IMPLS = ["eager", "torch", "triton", "cuda"]


def eager_expert_layer_norm(x, r, ids, w, b):
    n = F.layer_norm(x + r, (x.shape[-1],), eps=EPS)
    return n * w[ids] + b[ids]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("T", TOKENS)
@pytest.mark.parametrize("mode", ["fwd", "fwd+bwd"])
def test_expert_layer_norm(bench, mode, T, impl):
    if impl != "eager":
        ok, why = backend_status("expert_layer_norm", impl, DEVICE)
        if not ok:
            pytest.skip(why)
        if impl == "triton" and DEVICE.type == "cpu":
            pytest.skip("triton on CPU is the interpreter, a correctness tool; nothing to time")
    g = torch.Generator(device="cpu").manual_seed(0)
    train = mode == "fwd+bwd"
    x = torch.randn(T, D, generator=g).to(DEVICE, DTYPE).requires_grad_(train)
    r = torch.randn(T, D, generator=g).to(DEVICE).requires_grad_(train)
    w = (1 + 0.1 * torch.randn(E, D, generator=g)).to(DEVICE).requires_grad_(train)
    b = (0.1 * torch.randn(E, D, generator=g)).to(DEVICE).requires_grad_(train)
    ids = torch.randint(0, E, (T,), generator=g).to(DEVICE)
    call = (lambda: eager_expert_layer_norm(x, r, ids, w, b)) if impl == "eager" else \
        (lambda: expert_layer_norm(x, ids, w, b, EPS, residual=r, backend=impl))
    want = eager_expert_layer_norm(x.detach().double(), r.detach().double(), ids, w.detach().double(),
                                   b.detach().double())
    got = call()
    err = float((got.detach().double() - want).norm() / want.norm())
    assert err < 1e-5, f"{impl} is wrong here (relative error {err:.2e}); not timing it"
    grad_y = torch.randn(T, D, generator=g).to(DEVICE)

    def fn():
        if not train:
            with torch.no_grad():
                return call()
        for t in (x, r, w, b):
            t.grad = None
        call().backward(grad_y)

    bench.benchmark.group = f"expert_layer_norm {mode} T={T} d={D} E={E} x={str(DTYPE).replace('torch.', '')}"
    nbytes = T * D * (x.element_size() + 4 + 4)  # x, residual and y (fp32) once
    if train:
        nbytes *= 2  # the backward reads x, r and dy and writes dx, dr: the same again, at least
    info = dict(impl=impl, T=T, d=D, E=E, dtype=str(DTYPE).replace("torch.", ""), mode=mode, useful_bytes=nbytes)
    bench.run(fn, warmup=3, **info)
    med = bench.benchmark.stats.stats.median if bench.benchmark.stats is not None else None
    if med:
        bench.benchmark.extra_info["gbs"] = round(nbytes / med / 1e9, 2)
        bench.benchmark.extra_info["frac_copy"] = round(nbytes / med / copy_bandwidth(DEVICE), 3)
