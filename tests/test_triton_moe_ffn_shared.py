"""The Triton moe_ffn backend with a tied shared expert against the float64 reference.

On CPU the kernels run under TRITON_INTERPRET=1 (conftest sets it) with tiny tiles; every
buffer the launchers allocate is NaN-filled, so a row the fused epilogue forgets shows up.
"""
import os

import pytest
import torch

pytest.importorskip("triton")

import _aot  # noqa: E402
from moebert_kernels import ops  # noqa: E402
from moebert_kernels.ops import RoutingPlan, moe_ffn_reference  # noqa: E402

HAS_CUDA = torch.cuda.is_available()
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
pytestmark = pytest.mark.skipif(not HAS_CUDA and not INTERPRET,
                                reason="triton needs a CUDA device or TRITON_INTERPRET=1")
requires_gpu = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device; none is present")
DEVICE = "cuda" if HAS_CUDA else "cpu"

from moebert_kernels.triton import moe_ffn as tm  # noqa: E402

NAMES = ("x", "w1", "b1", "w2", "b2", "gate", "shared_w1", "shared_b1", "shared_w2")
from test_triton_moe_ffn import TOL, poison  # noqa: E402,F401  (poison: autouse NaN-filled buffers)


def make_case(T, d, h, s, E, dtype=torch.float32, gate=True, routing="random", seed=0, gated=False, bias=True):
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(dtype).to(DEVICE)

    k = 2 if gated else 1  # gated: a rows, then g rows
    x = rnd(T, d)
    w1, b1 = rnd(E, k * h, d, scale=d ** -0.5), rnd(E, k * h, scale=0.5)
    w2, b2 = rnd(E, d, h, scale=(h + s) ** -0.5), rnd(E, d, scale=0.5)
    gt = (torch.rand(T, generator=g) + 0.1).to(dtype).to(DEVICE) if gate else None
    w1s, b1s, w2s = rnd(k * s, d, scale=d ** -0.5), rnd(k * s, scale=0.5), rnd(d, s, scale=(h + s) ** -0.5)
    if not bias:
        b1 = b2 = b1s = None
    ids = torch.randint(0, E, (T,), generator=g)
    if routing == "empty":
        ids[ids == 1] = 0
    elif routing == "one":
        ids = torch.full((T,), E - 1)
    return [x, w1, b1, w2, b2, gt, w1s, b1s, w2s], RoutingPlan.from_expert_ids(ids.to(DEVICE), E)


def forward_and_grads(fn, inputs, grad_out):
    leaves = [t.detach().clone().requires_grad_(True) if t is not None else None for t in inputs]
    out = fn(leaves)
    present = [t for t in leaves if t is not None]
    grads = iter(torch.autograd.grad(out, present, grad_out))
    return out.detach(), [next(grads) if t is not None else None for t in leaves]


def reference(inputs, plan, grad_out, activation="gelu"):
    def fn(ls):
        x, w1, b1, w2, b2, g, w1s, b1s, w2s = ls
        return moe_ffn_reference(x, plan.sorted_token_ids, plan.expert_offsets, w1, b1, w2, b2, g, activation,
                                 w1s, b1s, w2s)
    return forward_and_grads(fn, [t.double() if t is not None else None for t in inputs], grad_out.double())


def run_public(inputs, plan, grad_out, activation="gelu"):
    def fn(ls):
        x, w1, b1, w2, b2, g, w1s, b1s, w2s = ls
        return ops.moe_ffn(x, plan, w1, b1, w2, b2, gate=g, activation=activation, backend="triton",
                           shared_w1=w1s, shared_b1=b1s, shared_w2=w2s)
    return forward_and_grads(fn, inputs, grad_out)


def check(name, got, want, tol, floor=1e-30):
    """Norm-wise relative error, the denominator at least ``floor``."""
    assert got.shape == want.shape, f"{name}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    assert torch.isfinite(got).all(), f"{name}: non-finite values (a tile left unwritten?)"
    err = ((got.double() - want.double()).norm() / max(float(want.double().norm()), floor)).item()
    assert err < tol, f"{name}: relative error {err:.3g} >= {tol:.3g}"


def check_grads(grads, want, want_out, inputs, grad_out, tol):
    """dgate_t = <grad_out_t, y_t> is one dot product per token: its rounding scales with sum |grad_out_t * y_t|,
    not with the result, which may cancel (at T=1 it is a single such sum; fp16 then flaked at 0.009)."""
    gate = inputs[5]
    for name, g, w in zip(NAMES, grads, want):
        assert (g is None) == (w is None), name
        if w is None:
            continue
        assert g.dtype == inputs[NAMES.index(name)].dtype, name
        floor = 1e-30
        if name == "gate":
            y = want_out.double() / gate.double().unsqueeze(-1)
            floor = float((grad_out.double().abs() * y.abs()).sum(-1).norm())
        check(f"d{name}", g, w, tol, floor)


# (T, d, h, s, E, routing, gate): sizes off the 16/32-wide interpreter tiles on purpose.
CASES = {
    "basic": (37, 40, 24, 20, 4, "random", True),
    "no_gate": (37, 40, 24, 20, 4, "random", False),
    "empty_expert": (37, 40, 24, 20, 4, "empty", True),
    "T1": (1, 40, 24, 20, 4, "random", True),
    "one_expert_holds_all": (37, 40, 24, 20, 4, "one", True),
    "E1_odd": (29, 24, 17, 9, 1, "random", False),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("case", list(CASES))
def test_public_forward_and_grads_match_reference(case, dtype, poison):
    T, d, h, s, E, routing, gate = CASES[case]
    inputs, plan = make_case(T, d, h, s, E, dtype, gate, routing, seed=list(CASES).index(case))
    grad_out = torch.randn(T, d, dtype=dtype, device=DEVICE)
    want_out, want = reference(inputs, plan, grad_out)
    poison.clear()
    out, grads = run_public(inputs, plan, grad_out)
    assert (T, d) in poison, "the output was not allocated through _empty, so nothing was poisoned"
    check("out", out, want_out, TOL[dtype])
    check_grads(grads, want, want_out, inputs, grad_out, TOL[dtype])


@pytest.mark.parametrize("activation,bias", [("geglu", False), ("geglu_tanh", True), ("reglu", False),
                                           ("gelu", False)])
@pytest.mark.parametrize("case", ["basic", "empty_expert", "T1", "E1_odd"])
def test_gated_and_bias_free_shared_expert_match_reference(case, activation, bias, poison):
    """ModernBERT's tied layout: a gated shared up projection of 2s rows, no biases."""
    T, d, h, s, E, routing, gate = CASES[case]
    inputs, plan = make_case(T, d, h, s, E, torch.float32, gate, routing, seed=7,
                             gated=activation != "gelu", bias=bias)
    grad_out = torch.randn(T, d, device=DEVICE)
    want_out, want = reference(inputs, plan, grad_out, activation)
    poison.clear()
    out, grads = run_public(inputs, plan, grad_out, activation)
    assert (T, d) in poison
    check("out", out, want_out, TOL[torch.float32])
    check_grads(grads, want, want_out, inputs, grad_out, TOL[torch.float32])


def test_bf16_upcast_path_tiny():
    inputs, plan = make_case(21, 16, 32, 16, 2, torch.bfloat16, True, seed=9)
    grad_out = torch.randn(21, 16, dtype=torch.bfloat16, device=DEVICE)
    want_out, want = reference(inputs, plan, grad_out)
    out, grads = run_public(inputs, plan, grad_out)
    check("out", out, want_out, TOL[torch.bfloat16])
    for name, g, w in zip(NAMES, grads, want):
        check(f"d{name}", g, w, TOL[torch.bfloat16])


def test_epilogue_adds_in_forward_and_dx():
    """The backend contract directly: shared_out lands in the output before the gate, shared_dx in dx."""
    inputs, plan = make_case(37, 40, 24, 20, 4, torch.float32, True, seed=3)
    x, w1, b1, w2, b2, g = inputs[:6]
    tok, off = plan.sorted_token_ids, plan.expert_offsets
    add = torch.randn(37, 40, device=DEVICE)
    base, hidden = tm.moe_ffn_forward(x, tok, off, w1, b1, w2, b2, None, "gelu", True)
    out, _ = tm.moe_ffn_forward(x, tok, off, w1, b1, w2, b2, g, "gelu", False, shared_out=add)
    check("out", out, (base + add) * g[:, None], 1e-6)
    dy = torch.randn(37, 40, device=DEVICE)
    dx0 = tm.moe_ffn_backward(dy, x, tok, off, w1, b1, w2, b2, g, hidden, "gelu", [True] + [False] * 5)[0]
    dxs = torch.randn(37, 40, device=DEVICE)
    dx = tm.moe_ffn_backward(dy, x, tok, off, w1, b1, w2, b2, g, hidden, "gelu", [True] + [False] * 5,
                             shared_dx=dxs)[0]
    check("dx", dx, dx0 + dxs, 1e-6)
    with pytest.raises(ValueError, match="addend"):
        tm.moe_ffn_forward(x, tok, off, w1, b1, w2, b2, g, "gelu", False, shared_out=add[:-1])


def test_opcheck(monkeypatch):
    monkeypatch.setattr(tm, "_empty", lambda shape, dtype, device: torch.empty(shape, dtype=dtype, device=device))
    inputs, plan = make_case(9, 16, 16, 16, 2, torch.float32, True, seed=10)
    leaves = [t.clone().requires_grad_(True) for t in inputs]
    args = (leaves[0], plan.sorted_token_ids, plan.expert_offsets, *leaves[1:6], "gelu", "triton", True, *leaves[6:])
    torch.library.opcheck(torch.ops.moebert.moe_ffn_fwd.default, args)


# The down kernel's HAS_ADD epilogue, compiled for sm_80 and sm_90 (fresh interpreter, see tests/_aot.py).
_AOT_SCRIPT = r"""
import torch
from moebert_kernels.triton import moe_ffn as tm, moe_ffn_kernels as K

TY = {torch.float32: "fp32", torch.bfloat16: "bf16"}
n = 0
for arch in (90, 80):
    for dtype, ty in TY.items():
        for T in (128, 65536):
            cfg = tm._default_config("gemm", T, 768, 256, 4, dtype, False)
            types = {a: ("*i64" if a in ("tok_ptr", "offsets_ptr") else "*" + ty) if a.endswith("_ptr") else "i32"
                     for a in K._moe_ffn_down_kernel.arg_names}
            for has_gate, has_bias, stride in ((True, True, "stride_wk"), (False, False, "stride_wn")):
                consts = dict(HAS_BIAS=has_bias, HAS_GATE=has_gate, HAS_ADD=True, E_POW2=4, BLOCK_M=cfg.block_m,
                              BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, EVEN_K=True, UPCAST=False,
                              PRECISION="ieee" if dtype == torch.float32 else "tf32", **{stride: 1})
                k = build(K._moe_ffn_down_kernel, types, consts, cfg.num_warps, arch, cfg.num_stages)
                assert k.metadata.shared <= {80: 166912, 90: 232448}[arch], (arch, cfg, k.metadata.shared)
                n += 1
print(n, "compiled ok")
"""


@pytest.mark.skipif(HAS_CUDA, reason="on a GPU the real JIT compiles these kernels in the other tests")
@pytest.mark.skipif(not _aot.have_ptxas(), reason="triton's NVIDIA backend (ptxas) is not installed")
def test_shared_epilogue_compiles_for_sm80_and_sm90():
    res = _aot.run(_AOT_SCRIPT, timeout=600)
    assert res.returncode == 0 and res.stdout.strip().endswith("compiled ok"), res.stderr[-4000:]


# ---- GPU only ---------------------------------------------------------------------------------

@requires_gpu
@pytest.mark.parametrize("T", [128, 1024, 8192])
def test_bf16_bert_sizes(T):
    inputs, plan = make_case(T, 768, 256, 512, 4, torch.bfloat16, True, seed=11)
    grad_out = torch.randn(T, 768, dtype=torch.bfloat16, device=DEVICE)
    want_out, want = reference(inputs, plan, grad_out)
    out, grads = run_public(inputs, plan, grad_out)
    check("out", out, want_out, 2e-2)
    for name, g, w in zip(NAMES, grads, want):
        check(f"d{name}", g, w, 3e-2)


@requires_gpu
def test_auto_dispatch_on_cuda_skips_the_cuda_backend():
    inputs, plan = make_case(64, 64, 32, 32, 4, torch.float32, True)
    x, w1, b1, w2, b2, g, w1s, b1s, w2s = inputs
    assert ops.select_backend("moe_ffn", x.device, needs=("shared",)) in ("triton", "torch")
    out = ops.moe_ffn(x, plan, w1, b1, w2, b2, g, shared_w1=w1s, shared_b1=b1s, shared_w2=w2s)
    want, _ = reference(inputs, plan, torch.ones_like(x))
    check("out", out, want, 1e-4)


@requires_gpu
def test_cuda_graph_capture_of_tied_bert():
    transformers = pytest.importorskip("transformers")
    import moebert_kernels

    config = transformers.BertConfig(vocab_size=120, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=256, max_position_embeddings=64)
    model = transformers.BertModel(config).eval()
    moebert_kernels.patch(model, num_experts=4, expert_size=64, shared=32, backend="triton", tie_shared=True)
    model = model.cuda()
    ids = torch.randint(0, 120, (2, 16), device="cuda")
    with torch.no_grad():
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(3):  # compile the kernels outside the capture
                model(input_ids=ids)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static_out = model(input_ids=ids).last_hidden_state
        for seed in range(2):
            new = torch.randint(0, 120, (2, 16), device="cuda", generator=torch.Generator("cuda").manual_seed(seed))
            ids.copy_(new)
            graph.replay()
            eager = model(input_ids=new.clone()).last_hidden_state
            torch.cuda.synchronize()
            assert torch.allclose(static_out, eager, atol=1e-5, rtol=1e-5)
