"""The verdicts a first GPU run must deliver: every backend at BERT sizes in bf16 against the fp32 reference.

``scripts/gpu_check.sh`` runs this file first, in its own process, right after the build, so these checks are
in even if the lease runs short. The order inside matters too (first Triton compiles are slow): the default
backend (triton) first, then CUDA C++, then the two cross-checked, then the distillation loss and the expert
LayerNorm. moe_ffn: d = h = 768, E = 4, gated, forward and every gradient (the gate's included); the CUDA C++
backend also at T = 4096, the size users run (a batch of 32 x 128 tokens).

Without a GPU every test skips with its reason; with ``MOEBERT_REQUIRE_GPU=1`` (the GPU check sets it) a
missing backend fails instead of skipping.
"""
import os

import pytest
import torch

from moebert_kernels.ops import RoutingPlan, backend_status, moe_ffn, moe_ffn_reference
from moebert_kernels.ops.distill_loss import distill_loss, distill_loss_reference
from moebert_kernels.ops.expert_layer_norm import expert_layer_norm, expert_layer_norm_reference

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device; none is present")

D = H = 768
E = 4
NAMES = ("x", "w1", "b1", "w2", "b2", "gate")
OUT_TOL, GRAD_TOL = 2e-2, 3e-2  # bf16 inputs and outputs, fp32 accumulation


def _rel(a, b):
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def _need(op, backend):
    ok, why = backend_status(op, backend, torch.device("cuda"))
    if not ok:
        if os.environ.get("MOEBERT_REQUIRE_GPU") == "1":
            pytest.fail(f"{op}/{backend} is unavailable on this GPU machine: {why}")
        pytest.skip(why)


def _moe_case(T, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, D, generator=g)
    w = [torch.randn(E, H, D, generator=g) * D ** -0.5, torch.randn(E, H, generator=g) * 0.1,
         torch.randn(E, D, H, generator=g) * H ** -0.5, torch.randn(E, D, generator=g) * 0.1]
    gate = torch.rand(T, generator=g) + 0.5
    inputs = [t.to("cuda", torch.bfloat16) for t in [x, *w, gate]]
    plan = RoutingPlan.from_expert_ids(torch.randint(0, E, (T,), generator=g).to("cuda"), E)
    grad_out = torch.randn(T, D, generator=g).to("cuda", torch.bfloat16)
    return inputs, plan, grad_out


def _moe_run(backend, inputs, plan, grad_out):
    leaves = [t.detach().clone().requires_grad_(True) for t in inputs]
    out = moe_ffn(leaves[0], plan, *leaves[1:5], gate=leaves[5], backend=backend)
    grads = torch.autograd.grad(out, leaves, grad_out)
    torch.cuda.synchronize()
    return out.detach(), grads


def _moe_reference(inputs, plan, grad_out):
    """fp32 on the bf16-rounded inputs (TF32 off: PyTorch's default for matmul)."""
    assert not torch.backends.cuda.matmul.allow_tf32
    leaves = [t.detach().float().requires_grad_(True) for t in inputs]
    out = moe_ffn_reference(leaves[0], plan.sorted_token_ids, plan.expert_offsets, *leaves[1:])
    return out.detach(), torch.autograd.grad(out, leaves, grad_out.float())


def _check(what, got, want, tol):
    assert got.shape == want.shape, f"{what}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    assert torch.isfinite(got).all(), f"{what}: non-finite values (a tile left unwritten?)"
    err = _rel(got, want)
    assert err < tol, f"{what}: relative error {err:.3g} >= {tol:g}"


MOE_CASES = [("triton", 1024), ("triton", 8192), ("cuda", 1024), ("cuda", 4096), ("cuda", 8192), ("triton", 4096)]


@pytest.mark.parametrize("backend,T", MOE_CASES, ids=[f"{b}-T{t}" for b, t in MOE_CASES])
def test_moe_ffn_bf16_matches_fp32_reference(backend, T):
    _need("moe_ffn", backend)
    inputs, plan, grad_out = _moe_case(T, seed=T)
    out, grads = _moe_run(backend, inputs, plan, grad_out)
    want_out, want = _moe_reference(inputs, plan, grad_out)
    _check(f"{backend} T={T} out", out, want_out, OUT_TOL)
    for name, g, w in zip(NAMES, grads, want):
        assert g.dtype == torch.bfloat16, name
        _check(f"{backend} T={T} d{name}", g, w, GRAD_TOL)


@pytest.mark.parametrize("T", [1024, 8192])
def test_moe_ffn_cuda_and_triton_agree(T):
    _need("moe_ffn", "triton")
    _need("moe_ffn", "cuda")
    inputs, plan, grad_out = _moe_case(T, seed=T + 1)
    out_t, grads_t = _moe_run("triton", inputs, plan, grad_out)
    out_c, grads_c = _moe_run("cuda", inputs, plan, grad_out)
    _check(f"T={T} out triton vs cuda", out_t, out_c, OUT_TOL)
    for name, a, b in zip(NAMES, grads_t, grads_c):
        _check(f"T={T} d{name} triton vs cuda", a, b, GRAD_TOL)


@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_distill_loss_bert_base_bf16(backend):
    """13 hidden states [32, 128, 768] (embeddings + 12 layers), 2 classes, padding masked."""
    _need("distill_loss", backend)
    g = torch.Generator().manual_seed(3)
    B, S, L, C = 32, 128, 13, 2
    bf = lambda *s: torch.randn(*s, generator=g).to("cuda", torch.bfloat16)  # noqa: E731
    sh = [bf(B, S, H).requires_grad_() for _ in range(L)]
    th = [(h.detach().float() + 0.5 * torch.randn(B, S, H, generator=g).cuda()).bfloat16() for h in sh]
    sl, tl = bf(B, C).mul(2).requires_grad_(), bf(B, C).mul(2)
    labels = torch.randint(0, C, (B,), generator=g).cuda()
    mask = torch.ones(B, S, dtype=torch.long, device="cuda")
    mask[:, 100:] = 0
    out = distill_loss(sh, th, sl, tl, labels, mask, backend=backend, mask_padding=True)
    out.loss.backward()
    torch.cuda.synchronize()
    sh32 = [t.detach().float().requires_grad_() for t in sh]
    sl32 = sl.detach().float().requires_grad_()
    ref = distill_loss_reference(sh32, [t.float() for t in th], sl32, tl.float(), labels, mask, mask_padding=True)
    ref.loss.backward()
    for name in ("loss", "ce", "hidden_mse", "pred", "per_layer"):
        _check(f"distill {backend} {name}", getattr(out, name).float(), getattr(ref, name), 1e-4)
    for i, (a, b) in enumerate(zip(sh + [sl], sh32 + [sl32])):
        _check(f"distill {backend} grad {i}", a.grad, b.grad, 1.5e-2)


@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_expert_layer_norm_bert_base_bf16(backend):
    """T = 32 x 128 tokens, d = 768, E = 4: bf16 FFN output + fp32 residual and affine (autocast's mix)."""
    _need("expert_layer_norm", backend)
    g = torch.Generator().manual_seed(4)
    T = 4096
    x = torch.randn(T, D, generator=g).to("cuda", torch.bfloat16).requires_grad_()
    r = torch.randn(T, D, generator=g).cuda().requires_grad_()
    w = (1 + 0.1 * torch.randn(E, D, generator=g)).cuda().requires_grad_()
    b = (0.1 * torch.randn(E, D, generator=g)).cuda().requires_grad_()
    ids = torch.randint(0, E, (T,), generator=g).cuda()
    gy = torch.randn(T, D, generator=g).cuda()
    y = expert_layer_norm(x, ids, w, b, 1e-12, residual=r, backend=backend)
    grads = torch.autograd.grad(y, [x, r, w, b], gy)
    leaves = [t.detach().float().requires_grad_() for t in (x, r, w, b)]
    want_y = expert_layer_norm_reference(leaves[0], ids, leaves[2], leaves[3], 1e-12, residual=leaves[1])
    want = torch.autograd.grad(want_y, leaves, gy)
    _check(f"layer norm {backend} y", y, want_y, 1e-5)
    for name, a, e in zip(("x", "residual", "weight", "bias"), grads, want):
        _check(f"layer norm {backend} d{name}", a, e, 1e-2 if name == "x" else 1e-5)
