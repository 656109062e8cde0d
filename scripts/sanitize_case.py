"""A tiny case for ``compute-sanitizer --tool memcheck``: every GPU kernel once, forward and backward.

Run by scripts/gpu_check.sh as
    PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer --tool memcheck --error-exitcode 3 \
        python scripts/sanitize_case.py
(without the caching allocator every tensor is its own allocation, so memcheck sees an
out-of-bounds access instead of landing in a neighbour inside a pooled block).

- moe_ffn, backends cuda and triton: T=37 (not a multiple of any block), E=4 with one empty
  expert, gate on and off, fp32 and bf16, forward + backward: the output and every gradient (the gate's
  included) checked against the float64 reference.
- distill_loss, backends cuda and triton: 13 hidden states [2, 7, 768], 3 classes, with labels,
  forward + backward.
- expert_layer_norm, backends cuda and triton: T=37, d=100, bf16 FFN output with an fp32 residual,
  forward + backward.

``--backends cuda`` limits it to those backends (gpu_check.sh sanitizes the CUDA C++ path only: Triton's
kernels are checked by their bounds masks and the GPU tests, and memcheck slows them most).

Prints one line per case (OK / SKIP reason / FAIL) and exits 1 if any case failed.
"""
from __future__ import annotations

import argparse
import sys
import traceback

import torch

from moebert_kernels.ops import RoutingPlan, backend_status, moe_ffn, moe_ffn_reference


def _rel(a, b):
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def moe_case(backend: str, dtype: torch.dtype, gated: bool, device: str = "cuda") -> str:
    dev = torch.device(device)
    g = torch.Generator().manual_seed(0)
    T, E, d, h = 37, 4, 768, 768
    ids = torch.randint(0, E, (T,), generator=g)
    ids[ids == 2] = 1  # expert 2 gets no token
    plan = RoutingPlan.from_expert_ids(ids.to(dev), E)
    x = torch.randn(T, d, generator=g)
    w = [torch.randn(E, h, d, generator=g) * d ** -0.5, torch.randn(E, h, generator=g) * 0.1,
         torch.randn(E, d, h, generator=g) * h ** -0.5, torch.randn(E, d, generator=g) * 0.1]
    gate = torch.rand(T, generator=g) if gated else None
    leaves = [t.to(dev, dtype).requires_grad_(True) for t in [x] + w]
    gl = gate.to(dev).requires_grad_(True) if gated else None
    y = moe_ffn(leaves[0], plan, *leaves[1:], gate=gl, backend=backend)
    gy = torch.randn(T, d, generator=g).to(dev, dtype)
    y.backward(gy)
    if dev.type == "cuda":
        torch.cuda.synchronize()
    ref_leaves = [t.detach().to(dtype).double().to(dev).requires_grad_(True) for t in [x] + w]
    ref_gate = gate.detach().double().to(dev).requires_grad_(True) if gated else None
    ref = moe_ffn_reference(ref_leaves[0], plan.sorted_token_ids, plan.expert_offsets, *ref_leaves[1:], ref_gate)
    ref.backward(gy.double())
    err = _rel(y, ref)
    tol = 1e-4 if dtype == torch.float32 else 3e-2
    if not err < tol:
        raise AssertionError(f"forward relative error {err:.2e} > {tol:g}")
    # Every gradient, the gate's included, against the reference's.
    pairs = list(zip(("x", "w1", "b1", "w2", "b2"), leaves, ref_leaves)) + ([("gate", gl, ref_gate)] if gated else [])
    worst = 0.0
    for name, got, want in pairs:
        if got.grad is None or not torch.isfinite(got.grad).all():
            raise AssertionError(f"d{name} is missing or non-finite")
        e = _rel(got.grad, want.grad)
        if not e < 2 * tol:
            raise AssertionError(f"d{name} relative error {e:.2e} > {2 * tol:g}")
        worst = max(worst, e)
    return f"rel err {err:.1e}, worst gradient {worst:.1e}"


def distill_case(backend: str, dtype: torch.dtype, device: str = "cuda") -> str:
    from moebert_kernels.ops.distill_loss import distill_loss

    dev = torch.device(device)
    g = torch.Generator().manual_seed(1)
    B, S, H, C, L = 2, 7, 768, 3, 13
    sh = [torch.randn(B, S, H, generator=g).to(dev, dtype).requires_grad_(True) for _ in range(L)]
    th = [torch.randn(B, S, H, generator=g).to(dev, dtype) for _ in range(L)]
    sl = torch.randn(B, C, generator=g).to(dev, dtype).requires_grad_(True)
    tl = torch.randn(B, C, generator=g).to(dev, dtype)
    labels = torch.tensor([0, 2], device=dev)
    out = distill_loss(sh, th, sl, tl, labels, backend=backend)
    loss = out[0]
    (loss * 0.5).backward()
    if dev.type == "cuda":
        torch.cuda.synchronize()
    value = loss.item()
    if value != value or abs(value) == float("inf"):
        raise AssertionError(f"loss is {value}")
    bad = [i for i, t in enumerate(sh) if not torch.isfinite(t.grad).all()]
    if bad or not torch.isfinite(sl.grad).all():
        raise AssertionError(f"non-finite student gradients (hidden states {bad}, logits)")
    return f"loss {value:.4f}"


def layer_norm_case(backend: str, device: str = "cuda") -> str:
    """T=37 rows of d=100 (not a multiple of a warp), bf16 FFN output + fp32 residual and affine, E=3."""
    from moebert_kernels.ops.expert_layer_norm import expert_layer_norm, expert_layer_norm_reference

    dev = torch.device(device)
    g = torch.Generator().manual_seed(2)
    T, d, E = 37, 100, 3
    x = torch.randn(T, d, generator=g).to(dev, torch.bfloat16).requires_grad_(True)
    r = torch.randn(T, d, generator=g).to(dev).requires_grad_(True)
    w = (1 + torch.randn(E, d, generator=g) * 0.1).to(dev).requires_grad_(True)
    b = (torch.randn(E, d, generator=g) * 0.1).to(dev).requires_grad_(True)
    ids = torch.randint(0, E, (T,), generator=g).to(dev)
    y = expert_layer_norm(x, ids, w, b, 1e-5, residual=r, backend=backend)
    y.backward(torch.randn(T, d, generator=g).to(dev))
    if dev.type == "cuda":
        torch.cuda.synchronize()
    ref = expert_layer_norm_reference(x.detach().double(), ids, w.detach().double(), b.detach().double(), 1e-5,
                                      residual=r.detach().double())
    err = _rel(y, ref)
    if not err < 1e-5:
        raise AssertionError(f"forward relative error {err:.2e} > 1e-5")
    bad = [n for n, t in zip(("x", "residual", "weight", "bias"), (x, r, w, b)) if not torch.isfinite(t.grad).all()]
    if bad:
        raise AssertionError(f"non-finite gradients: {bad}")
    return f"rel err {err:.1e}"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="every GPU kernel once, for compute-sanitizer")
    ap.add_argument("--backends", default="cuda,triton", help="comma-separated: cuda, triton")
    backends = [b for b in ap.parse_args(argv).backends.split(",") if b]
    unknown = set(backends) - {"cuda", "triton"}
    if unknown:
        ap.error(f"unknown backends {sorted(unknown)}: use cuda and/or triton")
    if not torch.cuda.is_available():
        print("SKIP all: no CUDA device")
        return 0
    try:
        import moebert_kernels.ops.distill_loss  # noqa: F401 - registers the op's backends
    except ImportError as exc:
        print(f"SKIP distill_loss: {exc}")
    failed = 0
    cases = []
    for backend in backends:
        for dtype in (torch.float32, torch.bfloat16):
            for gated in (False, True):
                cases.append((f"moe_ffn {backend} {dtype} gate={gated}", "moe_ffn", backend,
                              lambda b=backend, dt=dtype, gt=gated: moe_case(b, dt, gt)))
        cases.append((f"distill_loss {backend} bfloat16", "distill_loss", backend,
                      lambda b=backend: distill_case(b, torch.bfloat16)))
        cases.append((f"expert_layer_norm {backend} bf16+fp32", "expert_layer_norm", backend,
                      lambda b=backend: layer_norm_case(b)))
    for name, op, backend, fn in cases:
        ok, why = backend_status(op, backend, torch.device("cuda"))
        if not ok:
            print(f"SKIP {name}: {why}", flush=True)
            continue
        try:
            print(f"OK   {name}: {fn()}", flush=True)
        except Exception as exc:  # noqa: BLE001 - report every case, then fail
            failed += 1
            print(f"FAIL {name}: {type(exc).__name__}: {exc}", flush=True)
            traceback.print_exc()
    print(f"sanitize_case: {len(cases)} cases, {failed} failed", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
