"""The CPU-side logic of the CUDA C++ moe_ffn backend, tested without a GPU.

- The grouped-GEMM plan (what csrc/grouped_gemm.h's argument builder computes from expert_offsets): executed
  with torch on flat operands, it must give every expert's GEMM, for the three GEMM shapes of the layer.
- The launchers (moebert_kernels/cuda/moe_ffn.py): with every C++ op swapped for its torch model
  (tests/_cuda_ops_model.py), the backend behind the ``moebert::moe_ffn_*`` ops must match the reference,
  forward and every gradient, for each activation (gated too), with and without biases, gate and shared expert.
- Argument checks that run before any kernel.
The C++ ops themselves are compared with these models on a GPU (tests/test_cuda_ext.py).
"""
import pytest
import torch

from _cuda_ops_model import MODEL, grouped_gemm as model_grouped_gemm
from moebert_kernels.cuda import moe_ffn as cuda_moe_ffn
from moebert_kernels.cuda.moe_ffn import GEMM_KINDS, grouped_gemm_plan_reference
from moebert_kernels.ops.moe_ffn import GATED_ACTIVATIONS, moe_ffn_reference
from moebert_kernels.ops.routing import RoutingPlan

COUNTS = [[5, 3, 4], [0, 6, 0, 2], [7], [1, 0], [0, 0, 0]]  # empty experts, one expert, one token, no tokens


def _offsets(counts):
    return torch.tensor([0, *counts]).cumsum(0)


@pytest.mark.parametrize("counts", COUNTS, ids=str)
def test_plan_gives_each_experts_gemm(counts):
    gen = torch.Generator().manual_seed(sum(counts) + len(counts))
    off = _offsets(counts)
    T, E, M, N, K = int(off[-1]), len(counts), 6, 5, 4
    bounds = off.tolist()
    a, w_t, w = torch.randn(T, K, generator=gen), torch.randn(E, N, K, generator=gen), torch.randn(E, K, N,
                                                                                                   generator=gen)
    a_m, b_n = torch.randn(T, M, generator=gen), torch.randn(T, N, generator=gen)
    cases = [("rows_x_wt", a, w_t, (T, N), lambda e, lo, hi: a[lo:hi] @ w_t[e].t()),
             ("rows_x_w", a, w, (T, N), lambda e, lo, hi: a[lo:hi] @ w[e]),
             ("weight_grad", a_m, b_n, (E, M, N), lambda e, lo, hi: a_m[lo:hi].t() @ b_n[lo:hi])]
    for kind, lhs, rhs, shape, direct in cases:
        out = torch.full(shape, float("nan"))
        model_grouped_gemm(lhs, rhs, off, GEMM_KINDS[kind], out)
        for e in range(E):
            lo, hi = bounds[e], bounds[e + 1]
            got = out[e] if kind == "weight_grad" else out[lo:hi]
            torch.testing.assert_close(got, direct(e, lo, hi), msg=f"{kind}, expert {e}")
        assert not out.isnan().any(), kind  # every row / every expert's grad written (empty ones as zeros)


def test_plan_fields():
    plan = grouped_gemm_plan_reference([0, 3, 3, 8], GEMM_KINDS["weight_grad"], 16, 24, 0)
    assert plan == [(16, 24, 3, 0, 0, 0), (0, 24, 0, 48, 72, 384), (16, 24, 5, 48, 72, 768)]
    plan = grouped_gemm_plan_reference([0, 3, 3, 8], GEMM_KINDS["rows_x_wt"], 0, 24, 16)
    assert plan == [(3, 24, 16, 0, 0, 0), (0, 24, 16, 48, 384, 72), (5, 24, 16, 48, 768, 72)]
    with pytest.raises(ValueError, match="kind must be one of"):
        grouped_gemm_plan_reference([0, 1], 7, 1, 1, 1)


@pytest.fixture
def modelled(monkeypatch):
    """The cuda backend with every C++ op replaced by its torch model; outputs start as NaN."""
    monkeypatch.setattr(cuda_moe_ffn, "_ops", lambda: MODEL)

    def nan_output(shape, like, dtype=None):
        return torch.full(shape, float("nan"), dtype=dtype or like.dtype, device=like.device)

    monkeypatch.setattr(cuda_moe_ffn, "_new_output", nan_output)
    return cuda_moe_ffn


def _case(T, d, h, d_out, E, dtype, activation, bias, gate, shared, counts=None, seed=0):
    gen = torch.Generator().manual_seed(seed)
    k = 2 if activation in GATED_ACTIVATIONS else 1
    r = lambda *s, scale=1.0: (torch.randn(*s, generator=gen) * scale).to(dtype)  # noqa: E731
    x = r(T, d)
    w1, b1, w2, b2 = r(E, k * h, d, scale=d ** -0.5), r(E, k * h, scale=0.1), r(E, d_out, h, scale=h ** -0.5), \
        r(E, d_out, scale=0.1)
    s = 8
    w1s, b1s, w2s = r(k * s, d, scale=d ** -0.5), r(k * s, scale=0.1), r(d_out, s, scale=s ** -0.5)
    if not bias:
        b1 = b2 = b1s = None
    g = (torch.rand(T, generator=gen) + 0.5).to(dtype) if gate else None
    if counts is None:
        ids = torch.randint(0, E, (T,), generator=gen)
    else:
        ids = torch.repeat_interleave(torch.arange(E), torch.tensor(counts))[torch.randperm(T, generator=gen)]
    shared_w = (w1s, b1s, w2s) if shared else (None, None, None)
    return [x, w1, b1, w2, b2, g, *shared_w], RoutingPlan.from_expert_ids(ids, E)


def _run_op(inputs, plan, activation, backend):
    leaves = [t.detach().clone().requires_grad_(True) if t is not None else None for t in inputs]
    x, w1, b1, w2, b2, g, w1s, b1s, w2s = leaves
    out, _, _ = torch.ops.moebert.moe_ffn_fwd(x, plan.sorted_token_ids, plan.expert_offsets, w1, b1, w2, b2, g,
                                              activation, backend, True, w1s, b1s, w2s)
    live = [t for t in leaves if t is not None]
    gy = torch.randn(out.shape, generator=torch.Generator().manual_seed(3)).to(out.dtype)
    return out, torch.autograd.grad(out, live, gy)


def _reference(inputs, plan, activation):
    leaves = [t.detach().double().requires_grad_(True) if t is not None else None for t in inputs]
    x, w1, b1, w2, b2, g, w1s, b1s, w2s = leaves
    out = moe_ffn_reference(x, plan.sorted_token_ids, plan.expert_offsets, w1, b1, w2, b2, g, activation, w1s, b1s,
                            w2s)
    live = [t for t in leaves if t is not None]
    gy = torch.randn(out.shape, generator=torch.Generator().manual_seed(3)).double()
    return out, torch.autograd.grad(out, live, gy, allow_unused=True)


def _rel(a, b):
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def _compare(inputs, plan, activation, tol):
    out, grads = _run_op(inputs, plan, activation, "cuda")
    ref, ref_grads = _reference(inputs, plan, activation)
    assert out.dtype == inputs[0].dtype and torch.isfinite(out).all()
    if out.numel():
        assert _rel(out, ref) < tol, f"out: {_rel(out, ref):.2e}"
    live = [t for t in inputs if t is not None]
    for i, (g, r, t) in enumerate(zip(grads, ref_grads, live)):
        r = torch.zeros_like(g, dtype=torch.float64) if r is None else r
        assert g.dtype == t.dtype, f"grad {i} is {g.dtype}, its input {t.dtype}"
        assert torch.isfinite(g).all(), f"grad {i} not finite"
        if r.norm() == 0:
            assert g.abs().sum() == 0, f"grad {i} should be zero"
        else:
            assert _rel(g, r) < tol, f"grad {i}: {_rel(g, r):.2e}"


@pytest.mark.parametrize("activation", ["gelu", "gelu_tanh", "relu", "geglu", "geglu_tanh", "reglu"])
@pytest.mark.parametrize("bias,gate,shared", [(True, True, False), (False, False, False), (True, True, True),
                                              (False, True, True)], ids=["bias-gate", "plain", "shared", "nobias"])
def test_launchers_match_the_reference(modelled, activation, bias, gate, shared):
    inputs, plan = _case(23, 16, 24, 8, 3, torch.float32, activation, bias, gate, shared)
    _compare(inputs, plan, activation, 1e-5)


@pytest.mark.parametrize("counts", [[0, 9, 0], [9], [1, 0, 0], [0, 0, 0]], ids=str)
def test_launchers_routing_edge_cases(modelled, counts):
    inputs, plan = _case(sum(counts), 16, 24, 8, len(counts), torch.float32, "geglu", True, True, False,
                         counts=counts)
    _compare(inputs, plan, "geglu", 1e-5)


@pytest.mark.parametrize("dims", [(16, 24, 8), (12, 20, 6)], ids=["aligned", "odd"])
def test_launchers_half_precision(modelled, dims, monkeypatch):
    """16-bit sizes that are not multiples of 8 run the layer in fp32 (``_via_fp32``); aligned ones do not."""
    calls = []
    real = cuda_moe_ffn._via_fp32
    monkeypatch.setattr(cuda_moe_ffn, "_via_fp32", lambda *a: calls.append(1) or real(*a))
    inputs, plan = _case(30, *dims[:2], dims[2], 3, torch.float16, "gelu", True, True, False)
    inputs[5] = inputs[5].float()  # an fp32 gate on fp16 experts: dgate stays fp32
    _compare(inputs, plan, "gelu", 5e-3)
    # The backend's own dtypes (autograd would cast a wrong one silently).
    x, w1, b1, w2, b2, g = inputs[:6]
    args = (x, plan.sorted_token_ids, plan.expert_offsets, w1, b1, w2, b2, g)
    _, hidden = modelled.moe_ffn_forward(*args, "gelu", True)
    grads = modelled.moe_ffn_backward(torch.randn(30, dims[2]).half(), *args, hidden, "gelu", [True] * 6)
    assert [t.dtype for t in grads] == [t.dtype for t in (x, w1, b1, w2, b2, g)]
    assert bool(calls) == (dims != (16, 24, 8))


def test_partial_needs_leave_other_grads_alone(modelled):
    inputs, plan = _case(20, 16, 24, 8, 3, torch.float32, "gelu", True, True, False)
    x, w1, b1, w2, b2, g = inputs[:6]
    args = (x, plan.sorted_token_ids, plan.expert_offsets, w1, b1, w2, b2, g)
    _, hidden = modelled.moe_ffn_forward(*args, "gelu", True)
    gy = torch.randn(20, 8)
    full = modelled.moe_ffn_backward(gy, *args, hidden, "gelu", [True] * 6)
    for i in range(6):
        mask = [j == i for j in range(6)]
        part = modelled.moe_ffn_backward(gy, *args, hidden, "gelu", mask)
        torch.testing.assert_close(part[i], full[i])
    recomputed = modelled.moe_ffn_backward(gy, *args, x.new_empty(0), "gelu", [True] * 6)
    for a, b in zip(recomputed, full):
        torch.testing.assert_close(a, b)


def test_argument_errors_name_the_problem():
    x = torch.zeros(2, 8)
    with pytest.raises(ValueError, match="activation must be one of"):
        cuda_moe_ffn.moe_ffn_forward(x, None, None, None, None, None, None, None, "swish", False)
    w1, w2 = torch.zeros(1, 8, 8), torch.zeros(1, 8, 8)
    with pytest.raises(ValueError, match="needs_grad must hold 6 flags"):
        cuda_moe_ffn.moe_ffn_backward(x, x, None, None, w1, None, w2, None, None, x, "gelu", [True] * 5)


def test_older_gpus_get_a_clear_error(monkeypatch):
    """sm_75 and older: the CUTLASS GEMMs would not run there; the launcher says so before any kernel."""
    x = torch.zeros(2, 8)
    monkeypatch.setattr(torch.Tensor, "is_cuda", property(lambda self: True))
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 5))
    with pytest.raises(RuntimeError, match="needs an sm_80 or newer GPU.*sm_75"):
        cuda_moe_ffn.moe_ffn_forward(x, None, None, None, None, None, None, None, "gelu", False)
