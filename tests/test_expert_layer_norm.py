"""expert_layer_norm: the oracle against per-expert nn.LayerNorm, then every backend against the oracle in fp64.

Triton runs under TRITON_INTERPRET=1 on CPU (conftest) and compiled on a GPU. Every output a Triton
launcher allocates is NaN-filled first, so a row or column a kernel forgets to write fails the test.
"""
import os

import pytest
import torch
from torch import nn

from moebert_kernels.ops import backend_status
from moebert_kernels.ops.expert_layer_norm import expert_layer_norm, expert_layer_norm_reference

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOL = {torch.float64: 1e-12, torch.float32: 2e-6, torch.float16: 2e-3, torch.bfloat16: 1.5e-2}


def _rel(a, b):
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def _backends():
    out = []
    for b in ("torch", "triton", "cuda"):
        ok, why = backend_status("expert_layer_norm", b, torch.device(DEVICE))
        out.append(pytest.param(b, marks=pytest.mark.skipif(not ok, reason=why)))
    return out


@pytest.fixture(autouse=True)
def poison(monkeypatch):
    """NaN-fill every output the Triton and CUDA launchers allocate."""
    import importlib

    nan = lambda shape, like, dtype=None: torch.full(shape, float("nan"), dtype=dtype or like.dtype,  # noqa: E731
                                                     device=like.device)
    for mod in ("moebert_kernels.triton.expert_layer_norm", "moebert_kernels.cuda.expert_layer_norm"):
        try:
            monkeypatch.setattr(importlib.import_module(mod), "_new_output", nan)
        except ImportError:  # no triton here
            pass


ROUTING = {
    "random": lambda T, E, g: torch.randint(0, E, (T,), generator=g),
    "empty_expert": lambda T, E, g: torch.randint(0, E - 1, (T,), generator=g),  # the last expert gets nothing
    "all_on_one": lambda T, E, g: torch.full((T,), 1, dtype=torch.long),
}


def make(T, d, E, dtype=torch.float32, residual=True, routing="random", res_dtype=None, seed=None):
    g = torch.Generator().manual_seed(torch.seed() % 2**31 if seed is None else seed)
    rnd = lambda *s, scale=1.0, dt=dtype: (torch.randn(*s, generator=g) * scale + 0.3).to(DEVICE, dt)  # noqa: E731
    x = rnd(T, d, scale=2.0)
    r = rnd(T, d, dt=res_dtype or dtype) if residual else None
    w = rnd(E, d, scale=0.5) + 1.0
    b = rnd(E, d, scale=0.5)
    ids = ROUTING[routing](T, E, g).to(DEVICE)
    return x, r, ids, w, b


def test_reference_is_each_experts_layer_norm():
    """Token t through nn.LayerNorm holding expert e_t's affine: the definition, in fp64."""
    T, d, E, eps = 23, 19, 3, 1e-5
    x, r, ids, w, b = make(T, d, E, torch.float64)
    x, r, ids, w, b = (t.cpu() for t in (x, r, ids, w, b))
    want = []
    for t in range(T):
        ln = nn.LayerNorm(d, eps=eps, dtype=torch.float64)
        with torch.no_grad():
            ln.weight.copy_(w[ids[t]])
            ln.bias.copy_(b[ids[t]])
        want.append(ln(x[t] + r[t]))
    got = expert_layer_norm_reference(x, ids, w, b, eps, residual=r)
    assert _rel(got, torch.stack(want)) < 1e-14


CASES = [(37, 48, 4, "random"), (1, 24, 4, "random"), (40, 33, 3, "empty_expert"), (33, 40, 4, "all_on_one"),
         (70, 100, 2, "random")]  # odd d (33, 37 rows, 100 columns: nothing a power of two); 70 rows: 3 bwd programs


@pytest.mark.parametrize("backend", _backends())
@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(map(str, c)))
@pytest.mark.parametrize("residual", [True, False], ids=["residual", "no_residual"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_backend_matches_reference_forward_and_grads(backend, case, residual, dtype):
    if backend == "cuda" and dtype == torch.float64:
        pytest.skip("the cuda backend takes fp32/fp16/bf16; test_cuda_backend_rejects_fp64 checks the error")
    T, d, E, routing = case
    x, r, ids, w, b = make(T, d, E, dtype, residual, routing)
    leaves = [t.detach().requires_grad_() if t is not None else None for t in (x, r, w, b)]
    y = expert_layer_norm(leaves[0], ids, leaves[2], leaves[3], 1e-5, residual=leaves[1], backend=backend)
    ref64 = [t.detach().double().requires_grad_() if t is not None else None for t in (x, r, w, b)]
    want = expert_layer_norm_reference(ref64[0], ids, ref64[2], ref64[3], 1e-5, residual=ref64[1])
    assert y.dtype == dtype and y.shape == (T, d)
    assert torch.isfinite(y).all()
    assert _rel(y, want) < TOL[dtype]
    gy = torch.randn(T, d, generator=torch.Generator().manual_seed(1)).to(DEVICE)
    (y.float() * gy).sum().backward()
    (want * gy.double()).sum().backward()
    for name, a, e in zip(("x", "residual", "weight", "bias"), leaves, ref64):
        if a is None:
            continue
        assert a.grad is not None and a.grad.dtype == a.dtype, name
        assert torch.isfinite(a.grad).all(), name
        assert _rel(a.grad, e.grad) < 4 * TOL[dtype], (name, _rel(a.grad, e.grad))
    if routing == "empty_expert":
        assert leaves[2].grad[E - 1].abs().max() == 0 and leaves[3].grad[E - 1].abs().max() == 0


@pytest.mark.parametrize("backend", _backends())
def test_zero_tokens_with_an_expanded_grad(backend):
    """T=0: y.sum().backward() hands the op an expanded empty gradient with zero strides."""
    x, r, ids, w, b = make(0, 16, 3)
    leaves = [t.detach().requires_grad_() for t in (x, r, w, b)]
    y = expert_layer_norm(leaves[0], ids, leaves[2], leaves[3], residual=leaves[1], backend=backend)
    assert y.shape == (0, 16)
    y.sum().backward()
    assert leaves[0].grad.shape == (0, 16) and leaves[1].grad.shape == (0, 16)
    assert leaves[2].grad.abs().sum() == 0 and leaves[3].grad.abs().sum() == 0


@pytest.mark.parametrize("backend", _backends())
def test_d1_with_a_transposed_layout(backend):
    """[T, 1] views with column stride T (PyTorch calls them contiguous): y is the bias, dx is 0."""
    T, E = 7, 2
    x = torch.randn(1, T).t().to(DEVICE).requires_grad_()
    r = torch.randn(1, T).t().to(DEVICE)
    ids = torch.randint(0, E, (T,)).to(DEVICE)
    w, b = torch.randn(E, 1).to(DEVICE), torch.randn(E, 1).to(DEVICE)
    y = expert_layer_norm(x, ids, w, b, 1e-5, residual=r, backend=backend)
    assert torch.allclose(y, b[ids])
    y.backward(torch.randn_like(y))
    assert x.grad.abs().max() == 0


@pytest.mark.skipif(DEVICE != "cuda", reason="needs a CUDA device; none is present")
def test_cuda_backend_rejects_fp64():
    ok, why = backend_status("expert_layer_norm", "cuda", torch.device("cuda"))
    if not ok:
        pytest.skip(why)
    x, r, ids, w, b = make(4, 8, 2, torch.float64)
    with pytest.raises(TypeError, match="float32, float16 or bfloat16"):
        expert_layer_norm(x, ids, w, b, residual=r, backend="cuda")


@pytest.mark.parametrize("backend", _backends())
def test_fp16_ffn_output_with_fp32_residual_gives_fp32(backend):
    """Under autocast the FFN output is half and the residual fp32: the result is fp32, as LayerNorm(x + r) gives."""
    x, r, ids, w, b = make(9, 16, 2, torch.float16, res_dtype=torch.float32)
    w, b = w.float(), b.float()
    y = expert_layer_norm(x, ids, w, b, 1e-12, residual=r, backend=backend)
    assert y.dtype == torch.float32
    want = expert_layer_norm_reference(x.double(), ids, w.double(), b.double(), 1e-12, residual=r.double())
    assert _rel(y, want) < 1e-6


@pytest.mark.parametrize("backend", _backends())
@pytest.mark.parametrize("which", ["x", "weight", "bias", "residual"])
def test_only_some_inputs_need_grad(backend, which):
    x, r, ids, w, b = make(21, 20, 3)
    named = {"x": x, "residual": r, "weight": w, "bias": b}
    named[which] = named[which].detach().requires_grad_()
    y = expert_layer_norm(named["x"], ids, named["weight"], named["bias"], 1e-5, residual=named["residual"],
                          backend=backend)
    gy = torch.randn_like(y)
    (g,) = torch.autograd.grad((y * gy).sum(), [named[which]])
    ref = {k: v.detach().double().requires_grad_(k == which) for k, v in named.items()}
    want = expert_layer_norm_reference(ref["x"], ids, ref["weight"], ref["bias"], 1e-5, residual=ref["residual"])
    (e,) = torch.autograd.grad((want * gy.double()).sum(), [ref[which]])
    assert _rel(g, e) < 1e-5


def test_torch_backend_gradcheck():
    x, r, ids, w, b = (t.cpu() if t is not None else None for t in make(6, 7, 3, torch.float64))
    args = [t.requires_grad_() for t in (x, r, w, b)]
    fn = lambda x, r, w, b: expert_layer_norm(x, ids, w, b, 1e-5, residual=r, backend="torch")  # noqa: E731
    assert torch.autograd.gradcheck(fn, args)


def test_opcheck():
    from torch.library import opcheck

    x, r, ids, w, b = (t.cpu() for t in make(8, 12, 3))
    for args in [(x, r, ids, w, b, 1e-5, "torch"), (x, None, ids, w, b, 1e-5, "torch")]:
        leaf = [a.detach().requires_grad_() if isinstance(a, torch.Tensor) and a.is_floating_point() else a
                for a in args]
        opcheck(torch.ops.moebert.expert_layer_norm_fwd.default, tuple(leaf))


def test_compiles_fullgraph_with_backward():
    x, r, ids, w, b = (t.cpu() for t in make(10, 16, 2))
    w.requires_grad_()
    fn = torch.compile(lambda x, r, w, b: expert_layer_norm(x, ids, w, b, residual=r), fullgraph=True,
                       backend="aot_eager")
    y = fn(x, r, w, b)
    assert _rel(y, expert_layer_norm_reference(x, ids, w, b, residual=r)) < 1e-6
    y.sum().backward()
    assert w.grad is not None and torch.isfinite(w.grad).all()


BAD = [
    (lambda a: a.update(x=a["x"][None]), ValueError, "x must be \\[T, d\\]"),
    (lambda a: a.update(weight=a["weight"][:, :-1]), ValueError, "weight must be"),
    (lambda a: a.update(bias=a["bias"][:-1]), ValueError, "bias must be"),
    (lambda a: a.update(expert_ids=a["expert_ids"][:-1]), ValueError, "expert_ids must be \\[T\\]"),
    (lambda a: a.update(expert_ids=a["expert_ids"].float()), TypeError, "integer"),
    (lambda a: a.update(residual=a["residual"][:, :-1]), ValueError, "residual must be"),
    (lambda a: a.update(x=a["x"].long()), TypeError, "floating-point"),
    (lambda a: a.update(weight="w"), TypeError, "weight must be a torch.Tensor"),
    (lambda a: a.update(backend="nope"), ValueError, "backend"),
]


@pytest.mark.parametrize("mutate,exc,msg", BAD)
def test_bad_input_is_named(mutate, exc, msg):
    x, r, ids, w, b = make(5, 8, 2)
    args = dict(x=x, expert_ids=ids, weight=w, bias=b, residual=r)
    mutate(args)
    with pytest.raises(exc, match=msg):
        expert_layer_norm(**args)


@pytest.mark.parametrize("bad", [2, -1])
@pytest.mark.parametrize("backend", _backends())
def test_expert_id_out_of_range_is_refused(backend, bad):
    """The kernels read weight[expert_ids[t]]: an id outside [0, E) must never reach them."""
    if DEVICE != "cpu":
        pytest.skip("CPU check: on CUDA the range check is a device-side assert (torch._assert_async)")
    x, r, ids, w, b = make(5, 8, 2)
    ids[3] = bad
    with pytest.raises(ValueError, match=f"expert id {bad} is outside \\[0, 2\\)"):
        expert_layer_norm(x, ids, w, b, residual=r, backend=backend)


def test_triton_on_cpu_needs_the_interpreter(monkeypatch):
    if DEVICE != "cpu":
        pytest.skip("CPU-only check")
    from moebert_kernels.ops.dispatch import BackendUnavailableError

    monkeypatch.setenv("TRITON_INTERPRET", "0")
    x, r, ids, w, b = make(5, 8, 2)
    with pytest.raises(BackendUnavailableError, match="triton needs CUDA tensors"):
        expert_layer_norm(x, ids, w, b, residual=r, backend="triton")
    assert os.environ["TRITON_INTERPRET"] == "0"


_AOT_BODY = r"""
from moebert_kernels.triton import expert_layer_norm as K

n = 0
for arch in (90, 80):
    # (x, residual, weight, y) dtypes: autocast (half FFN output, fp32 residual and affine), a half model, fp32.
    for xd, rd, wd, yd, has_r, block in (("bf16", "fp32", "fp32", "fp32", True, 1024),
                                         ("fp16", "fp16", "fp16", "fp16", True, 1024),
                                         ("fp32", "fp32", "fp32", "fp32", False, 128),
                                         ("bf16", "bf16", "bf16", "bf16", True, 4096),
                                         ("fp64", "fp64", "fp64", "fp64", True, 1024)):
        nw = K._num_warps(block)
        acc = K.tl.float64 if xd == "fp64" else K.tl.float32
        st = "*fp64" if xd == "fp64" else "*fp32"
        build(K._eln_fwd_kernel, dict(x_ptr="*" + xd, r_ptr="*" + rd, ids_ptr="*i64", w_ptr="*" + wd, b_ptr="*" + wd,
              y_ptr="*" + yd, mean_ptr=st, rstd_ptr=st, d="i32", eps="fp32", stride_x="i32",
              stride_r="i32", stride_y="i32"), dict(HAS_RESIDUAL=has_r, ACC=acc, BLOCK_D=block), nw, arch)
        for need in ((True, True, True), (True, False, False), (False, True, True)):
            build(K._eln_bwd_kernel, dict(dy_ptr="*" + yd, x_ptr="*" + xd, r_ptr="*" + rd, ids_ptr="*i64",
                  w_ptr="*" + wd, mean_ptr=st, rstd_ptr=st, dz_ptr=st, pw_ptr=st,
                  pb_ptr=st, T="i32", d="i32", E="i32", stride_dy="i32", stride_x="i32", stride_r="i32"),
                  dict(HAS_RESIDUAL=has_r, NEED_DZ=need[0], NEED_DW=need[1], NEED_DB=need[2], ACC=acc,
                       ROWS=K.ROWS, BLOCK_D=block), nw, arch)
            n += 1
        n += 1
print(n, "compiled ok")
"""


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU the real JIT compiles these kernels in the other tests")
def test_triton_kernels_compile_for_sm80_and_sm90():
    import _aot

    if not _aot.have_ptxas():
        pytest.skip("triton (with its NVIDIA backend and ptxas) is not installed")
    res = _aot.run(_AOT_BODY)
    assert res.returncode == 0 and res.stdout.strip().endswith("compiled ok"), res.stderr[-4000:]


_NO_FMA_BODY = r"""
from moebert_kernels.triton import expert_layer_norm as K

k = build(K._eln_bwd_kernel, dict(dy_ptr="*fp32", x_ptr="*fp32", r_ptr="*fp32", ids_ptr="*i64", w_ptr="*fp32",
          mean_ptr="*fp32", rstd_ptr="*fp32", dz_ptr="*fp32", pw_ptr="*fp32", pb_ptr="*fp32", T="i32", d="i32",
          E="i32", stride_dy="i32", stride_x="i32", stride_r="i32"),
          dict(HAS_RESIDUAL=True, NEED_DZ=True, NEED_DW=False, NEED_DB=False, ACC=K.tl.float32, ROWS=K.ROWS,
               BLOCK_D=128), 1, 90, **K.BWD_OPTIONS)
print("fma.rn.f32" in k.asm["ptx"], "ptx ok")
"""


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU test_d1_with_a_transposed_layout checks this")
def test_triton_backward_compiles_without_fma_contraction():
    """The GPU-only failure of test_d1_with_a_transposed_layout: fused, dy * w - c1 left rstd * (rounding error)
    in dz where d = 1 gives exactly 0. The interpreter never fuses, so check the compiled sm_90 code."""
    import _aot

    if not _aot.have_ptxas():
        pytest.skip("triton (with its NVIDIA backend and ptxas) is not installed")
    res = _aot.run(_NO_FMA_BODY)
    assert res.returncode == 0 and res.stdout.strip().endswith("ptx ok"), res.stderr[-4000:]
    assert res.stdout.split()[0] == "False", "the backward kernel's PTX has fma.rn.f32: dz loses its cancellation"


def test_cuda_backward_products_are_not_contracted():
    """Same bug in csrc (nvcc contracts a * b - c by default; no nvcc build here): the g = dy * w that feeds
    g - c1 must be __fmul_rn in both of the backward kernel's loops."""
    import pathlib
    import re

    src = (pathlib.Path(__file__).resolve().parents[1] / "csrc" / "expert_layer_norm.cu").read_text()
    body = src[src.index("__global__ void _eln_bwd_kernel"):src.index("// ---- host side")]
    products = re.findall(r"const float g = ([^;]*);", body)
    assert len(products) == 2, products
    assert all(p.startswith("__fmul_rn(") for p in products), products
