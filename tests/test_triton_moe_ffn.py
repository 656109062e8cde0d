"""The Triton moe_ffn backend against the reference in float64.

On CPU the kernels run under TRITON_INTERPRET=1 (conftest sets it) with tiny tiles;
on a GPU the same matrix runs compiled, plus BERT-size bf16, CUDA-graph capture and a
cross-check against the CUDA C++ backend. Every buffer the launchers allocate is
NaN-filled first, so a row or tile a kernel forgets to write shows up as an error.
"""
import os
import re
import tokenize
from pathlib import Path

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

NAMES = ("x", "w1", "b1", "w2", "b2", "gate")
TOL = {torch.float32: 2e-5, torch.float16: 5e-3, torch.bfloat16: 4e-2}


@pytest.fixture(autouse=True)
def poison(monkeypatch):
    """NaN-fill every buffer the launchers hand to a kernel; count the allocations."""
    calls = []

    def nan_empty(shape, dtype, device):
        calls.append(tuple(shape))
        return torch.full(shape, float("nan"), dtype=dtype, device=device)

    monkeypatch.setattr(tm, "_empty", nan_empty)
    return calls


def make_case(T, d, h, E, dtype=torch.float32, gate=True, routing="random", seed=0, d_out=None, gated=False,
              bias=True):
    g = torch.Generator().manual_seed(seed)
    d_out = d if d_out is None else d_out

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(dtype).to(DEVICE)

    x = rnd(T, d)
    h_up = 2 * h if gated else h  # gated: a rows, then g rows
    w1, b1 = rnd(E, h_up, d, scale=d ** -0.5), rnd(E, h_up, scale=0.5)
    w2, b2 = rnd(E, d_out, h, scale=h ** -0.5), rnd(E, d_out, scale=0.5)
    if not bias:
        b1 = b2 = None
    gt = (torch.rand(T, generator=g) + 0.1).to(dtype).to(DEVICE) if gate else None
    if routing == "random":
        ids = torch.randint(0, E, (T,), generator=g)
    elif routing == "empty":  # expert 1 gets nothing
        ids = torch.randint(0, E, (T,), generator=g)
        ids[ids == 1] = 0
    elif routing == "one":  # every token on the last expert
        ids = torch.full((T,), E - 1)
    else:
        raise ValueError(routing)
    plan = RoutingPlan.from_expert_ids(ids.to(DEVICE), E)
    return [x, w1, b1, w2, b2, gt], plan


def _with_nones(leaves, grads):
    """The grads of the present leaves, with None where a leaf (gate, bias) is absent."""
    it = iter(grads)
    return [next(it) if t is not None else None for t in leaves]


def reference(inputs, plan, grad_out, activation="gelu"):
    """Output and all six grads in float64 (None for an absent gate or bias)."""
    leaves = [t.detach().double().requires_grad_(True) if t is not None else None for t in inputs]
    out = moe_ffn_reference(leaves[0], plan.sorted_token_ids, plan.expert_offsets, *leaves[1:5], leaves[5],
                            activation)
    present = [t for t in leaves if t is not None]
    return out.detach(), _with_nones(leaves, torch.autograd.grad(out, present, grad_out.double()))


def rel_err(a, b):
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def check(name, got, want, tol):
    assert got.shape == want.shape, f"{name}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    assert torch.isfinite(got).all(), f"{name}: non-finite values (a tile left unwritten?)"
    err = rel_err(got, want)
    assert err < tol, f"{name}: relative error {err:.3g} >= {tol:.3g}"


def run_public(inputs, plan, grad_out, activation="gelu"):
    leaves = [t.detach().clone().requires_grad_(True) if t is not None else None for t in inputs]
    out = ops.moe_ffn(leaves[0], plan, *leaves[1:5], gate=leaves[5], activation=activation, backend="triton")
    present = [t for t in leaves if t is not None]
    return out, _with_nones(leaves, torch.autograd.grad(out, present, grad_out))


# (T, d, h, E, routing, gate): T/d/h off the 16/32-wide interpreter tiles on purpose.
CASES = {
    "basic": (37, 40, 24, 4, "random", True),
    "no_gate": (37, 40, 24, 4, "random", False),
    "empty_expert": (37, 40, 24, 4, "empty", True),
    "T1": (1, 40, 24, 4, "random", True),
    "one_expert_holds_all": (37, 40, 24, 4, "one", True),
    "E1": (29, 24, 40, 1, "random", False),
    "E8": (53, 16, 48, 8, "random", True),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("case", list(CASES))
def test_public_forward_and_grads_match_reference(case, dtype, poison):
    T, d, h, E, routing, gate = CASES[case]
    inputs, plan = make_case(T, d, h, E, dtype, gate, routing, seed=list(CASES).index(case))
    grad_out = torch.randn(T, d, dtype=dtype, device=DEVICE)
    want_out, want_grads = reference(inputs, plan, grad_out)
    poison.clear()
    out, grads = run_public(inputs, plan, grad_out)
    assert poison, "the launchers did not allocate through _empty, so nothing was poisoned"
    tol = TOL[dtype]
    assert out.dtype == dtype
    check("out", out, want_out, tol)
    for name, g, w in zip(NAMES, grads, want_grads):
        if w is None:
            assert g is None
            continue
        assert g.dtype == dtype, name
        check(f"d{name}", g, w, tol)


@pytest.mark.parametrize("activation", ["gelu_tanh", "relu"])
def test_other_activations(activation):
    inputs, plan = make_case(37, 40, 24, 4, torch.float32, True, seed=3)
    grad_out = torch.randn(37, 40, device=DEVICE)
    want_out, want_grads = reference(inputs, plan, grad_out, activation)
    out, grads = run_public(inputs, plan, grad_out, activation)
    check("out", out, want_out, TOL[torch.float32])
    for name, g, w in zip(NAMES, grads, want_grads):
        check(f"d{name}", g, w, TOL[torch.float32])


def test_exact_erf_gelu_not_tanh():
    # With large pre-activations the two GELUs differ by ~1e-3 relative; fp32 must pick erf.
    inputs, plan = make_case(37, 40, 24, 4, torch.float32, False, seed=4)
    inputs[2] = inputs[2] * 6
    out, _ = tm.moe_ffn_forward(inputs[0], plan.sorted_token_ids, plan.expert_offsets, *inputs[1:5], None, "gelu",
                                False)
    erf = moe_ffn_reference(*[t.double() for t in inputs[:1]], plan.sorted_token_ids, plan.expert_offsets,
                            *[t.double() for t in inputs[1:5]], None, "gelu")
    tanh = moe_ffn_reference(*[t.double() for t in inputs[:1]], plan.sorted_token_ids, plan.expert_offsets,
                             *[t.double() for t in inputs[1:5]], None, "gelu_tanh")
    assert rel_err(out, erf) < 1e-5 < rel_err(out, tanh)


@pytest.mark.parametrize("E, routing, gemm, dw, seed", [
    (2, "random", (32, 16, 16), (16, 16, 16, 4, 3, 16), 5),  # ~5 chunks per expert, 16-row dW tiles
    (3, "random", (16, 16, 16), (32, 16, 16, 4, 3, 32), 11),  # 32-row dW tiles: summed in two 16-row slices
    (3, "empty", (16, 16, 16), (32, 16, 16, 4, 3, 32), 11),  # expert 1 empty: a surplus chunk clears it
], ids=["16-row", "32-row", "empty-expert"])
def test_split_k_reduce_in_the_last_chunk(E, routing, gemm, dw, seed):
    """Several chunks per expert reduced by the last one to finish (semaphore + ordered sum), experts
    that fit one chunk stored directly: dW1, dW2 and both biases against the reference."""
    inputs, plan = make_case(150, 24, 40, E, torch.float32, True, routing, seed=seed)
    grad_out = torch.randn(150, 24, device=DEVICE)
    _, want = reference(inputs, plan, grad_out)
    with tm.override_config(gemm=tm.MoEFFNConfig(*gemm), dw=tm.MoEFFNConfig(*dw)):
        _, got = run_public(inputs, plan, grad_out)
    for name, g, w in zip(NAMES, got, want):
        check(f"d{name}", g, w, TOL[torch.float32])


def test_backend_direct_recompute_and_partial_needs():
    """The contract functions: save_hidden off (backward recomputes H), and grad subsets."""
    inputs, plan = make_case(37, 40, 24, 4, torch.float32, True, seed=6)
    x, w1, b1, w2, b2, gate = inputs
    tok, off = plan.sorted_token_ids, plan.expert_offsets
    grad_out = torch.randn(37, 40, device=DEVICE)
    want_out, want = reference(inputs, plan, grad_out)

    out, hidden = tm.moe_ffn_forward(x, tok, off, w1, b1, w2, b2, gate, "gelu", True)
    check("out", out, want_out, 2e-5)
    pre = torch.cat([torch.addmm(b1[e].double(), x[tok[off[e]:off[e + 1]]].double(), w1[e].double().t())
                     for e in range(4)])
    check("hidden (pre-activation, expert order)", hidden, pre, 2e-5)
    out2, empty = tm.moe_ffn_forward(x, tok, off, w1, b1, w2, b2, gate, "gelu", False)
    assert empty.numel() == 0 and torch.equal(out, out2)

    no_hidden = x.new_empty(0)  # the backward recomputes H
    for needs, saved in (("111111", no_hidden), ("100000", hidden), ("000110", no_hidden), ("000001", hidden),
                         ("000010", no_hidden), ("011000", hidden), ("010100", hidden)):
        needs = [c == "1" for c in needs]
        grads = tm.moe_ffn_backward(grad_out, x, tok, off, w1, b1, w2, b2, gate, saved, "gelu", needs)
        assert [tuple(g.shape) for g in grads] == [tuple(t.shape) for t in inputs]
        for name, need, g, w in zip(NAMES, needs, grads, want):
            if need:
                check(f"d{name} (needs={needs}, saved={saved.numel() > 0})", g, w, 2e-5)


def test_backward_is_deterministic():
    inputs, plan = make_case(37, 16, 24, 4, torch.float32, True, seed=7)
    grad_out = torch.randn(37, 16, device=DEVICE)
    args = (plan.sorted_token_ids, plan.expert_offsets, *inputs[1:])
    _, hidden = tm.moe_ffn_forward(inputs[0], *args, "gelu", True)
    a = tm.moe_ffn_backward(grad_out, inputs[0], *args, hidden, "gelu", [True] * 6)
    b = tm.moe_ffn_backward(grad_out, inputs[0], *args, hidden, "gelu", [True] * 6)
    assert all(torch.equal(u, v) for u, v in zip(a, b))


def test_empty_expert_gets_zero_weight_grad():
    inputs, plan = make_case(37, 40, 24, 4, torch.float32, True, "empty", seed=8)
    _, grads = run_public(inputs, plan, torch.randn(37, 40, device=DEVICE))
    for g in grads[1:5]:
        assert torch.equal(g[1], torch.zeros_like(g[1]))


def test_bf16_upcast_path_tiny():
    """bf16 end to end; under the interpreter the kernels upcast dot operands (its bf16 dot is broken)."""
    inputs, plan = make_case(21, 16, 32, 2, torch.bfloat16, True, seed=9)
    grad_out = torch.randn(21, 16, dtype=torch.bfloat16, device=DEVICE)
    want_out, want = reference(inputs, plan, grad_out)
    out, grads = run_public(inputs, plan, grad_out)
    check("out", out, want_out, TOL[torch.bfloat16])
    for name, g, w in zip(NAMES, grads, want):
        assert g.dtype == torch.bfloat16
        check(f"d{name}", g, w, TOL[torch.bfloat16])


def test_empty_batch():
    inputs, plan = make_case(0, 16, 32, 2, torch.float32, True)
    out, grads = run_public(inputs, plan, torch.zeros(0, 16, device=DEVICE))
    assert out.shape == (0, 16)
    assert all(torch.equal(g, torch.zeros_like(g)) for g in grads)


def test_opcheck(poison, monkeypatch):
    # opcheck compares runs with each other, so NaN-filled scratch is fine, but keep it plain here.
    monkeypatch.setattr(tm, "_empty", lambda shape, dtype, device: torch.empty(shape, dtype=dtype, device=device))
    inputs, plan = make_case(9, 16, 16, 2, torch.float32, True, seed=10)
    leaves = [t.clone().requires_grad_(True) for t in inputs]
    args = (leaves[0], plan.sorted_token_ids, plan.expert_offsets, *leaves[1:], "gelu", "triton", True)
    torch.library.opcheck(torch.ops.moebert.moe_ffn_fwd.default, args)


def test_bad_dtype_and_activation_are_named():
    inputs, plan = make_case(5, 16, 16, 2, torch.float32, False)
    x, w1, b1, w2, b2, _ = (t.double() if t is not None else None for t in inputs)
    with pytest.raises(TypeError, match="float64"):
        tm.moe_ffn_forward(x, plan.sorted_token_ids, plan.expert_offsets, w1, b1, w2, b2, None, "gelu", False)
    with pytest.raises(ValueError, match="activation"):
        tm.moe_ffn_forward(*inputs[:1], plan.sorted_token_ids, plan.expert_offsets, *inputs[1:5], None, "swish",
                           False)


def test_configs_are_valid_and_overridable():
    for kind in ("gemm", "dw"):
        for T in (1, 128, 1024, 4096, 16384, 65536):
            for dt in (torch.float32, torch.float16, torch.bfloat16):
                cfg = tm._default_config(kind, 1 << max(4, (T - 1).bit_length()), 768, 768, 4, dt, False)
                assert isinstance(cfg, tm.MoEFFNConfig) and cfg.num_warps in (4, 8)
    custom = tm.MoEFFNConfig(16, 16, 16)
    with tm.override_config(gemm=custom):
        assert tm.get_config("gemm", 100, 16, 16, 2, torch.float32) is custom
    assert tm.get_config("gemm", 100, 16, 16, 2, torch.float32) is not custom
    with pytest.raises(ValueError, match="power of two"):
        tm.MoEFFNConfig(24, 16, 16)
    with pytest.raises(ValueError, match="multiple"):
        tm.MoEFFNConfig(16, 16, 32, chunk=48)


@pytest.mark.parametrize("sms", [132, 108], ids=["H100", "A100"])
def test_split_k_chunks_fill_one_or_two_waves(sms):
    """E=4, balanced routing: the dW launches make one to two waves of programs (or one chunk per
    expert when that alone is more), so the fp32 partials are few (and none when each expert is one chunk)."""
    E = 4
    for T in (1024, 4096, 16384, 65536):
        for M, N in ((3072, 768), (768, 3072), (768, 768)):
            cfg = tm._default_config("dw", 1 << (T - 1).bit_length(), 768, 3072, E, torch.bfloat16, False)
            chunk = tm._dw_chunk(T, M, N, E, cfg, sms)
            tiles = -(-M // cfg.block_m) * -(-N // cfg.block_n)
            chunks = E * -(-(T // E) // chunk)
            assert chunk % cfg.block_k == 0
            if tiles * E >= 2 * sms:
                assert chunks == E, (T, M, N, chunk)
            else:
                assert sms <= tiles * chunks <= 2 * sms + tiles * E, (T, M, N, chunk, tiles * chunks)


def test_no_host_sync_in_the_triton_path():
    # .item()/.tolist()/int(tensor) would break CUDA-graph capture; keep them out of the source.
    root = Path(tm.__file__).parent
    for name in ("moe_ffn.py", "moe_ffn_kernels.py"):
        with open(root / name) as f:  # code only: docstrings and comments may name the calls
            code = " ".join(t.string for t in tokenize.generate_tokens(f.readline)
                            if t.type not in (tokenize.STRING, tokenize.COMMENT))
        assert not re.search(r"\.item\(\)|\.tolist\(\)|\.cpu\(\)|\.numpy\(\)", code), name


# ---- gated experts (ModernBERT: act(a) * g, optional biases) -----------------------------------

GATED_CASES = {k: CASES[k] for k in ("basic", "empty_expert", "T1", "one_expert_holds_all", "E1", "E8")}


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no_bias"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("case", list(GATED_CASES))
def test_gated_forward_and_grads_match_reference(case, dtype, bias, poison):
    T, d, h, E, routing, gate = GATED_CASES[case]
    inputs, plan = make_case(T, d, h, E, dtype, gate, routing, seed=20 + list(CASES).index(case), gated=True,
                             bias=bias)
    grad_out = torch.randn(T, d, dtype=dtype, device=DEVICE)
    want_out, want_grads = reference(inputs, plan, grad_out, "geglu")
    poison.clear()
    out, grads = run_public(inputs, plan, grad_out, "geglu")
    assert poison
    check("out", out, want_out, TOL[dtype])
    for name, g, w in zip(NAMES, grads, want_grads):
        if w is None:
            assert g is None, name
            continue
        check(f"d{name}", g, w, TOL[dtype])


@pytest.mark.parametrize("activation", ["geglu_tanh", "reglu"])
def test_gated_other_activations(activation):
    inputs, plan = make_case(37, 40, 24, 4, torch.float32, True, seed=30, gated=True)
    grad_out = torch.randn(37, 40, device=DEVICE)
    want_out, want_grads = reference(inputs, plan, grad_out, activation)
    out, grads = run_public(inputs, plan, grad_out, activation)
    check("out", out, want_out, TOL[torch.float32])
    for name, g, w in zip(NAMES, grads, want_grads):
        check(f"d{name}", g, w, TOL[torch.float32])


def test_gated_backend_direct_recompute_and_partial_needs():
    inputs, plan = make_case(37, 40, 24, 4, torch.float32, True, seed=31, gated=True, bias=False)
    x, w1, b1, w2, b2, gate = inputs
    tok, off = plan.sorted_token_ids, plan.expert_offsets
    grad_out = torch.randn(37, 40, device=DEVICE)
    want_out, want = reference(inputs, plan, grad_out, "geglu")
    out, hidden = tm.moe_ffn_forward(x, tok, off, w1, b1, w2, b2, gate, "geglu", True)
    check("out", out, want_out, 2e-5)
    pre = torch.cat([x[tok[off[e]:off[e + 1]]].double() @ w1[e].double().t() for e in range(4)])
    check("hidden ([T, 2h]: a, then g; expert order)", hidden, pre, 2e-5)
    for needs, saved in (("111111", x.new_empty(0)), ("100000", hidden), ("010100", x.new_empty(0)),
                         ("000001", hidden)):
        needs = [c == "1" for c in needs]
        grads = tm.moe_ffn_backward(grad_out, x, tok, off, w1, b1, w2, b2, gate, saved, "geglu", needs)
        assert grads[2].numel() == 0 and grads[4].numel() == 0  # no biases: empty grad slots
        for name, need, g, w in zip(NAMES, needs, grads, want):
            if need and w is not None:
                check(f"d{name} (needs={needs}, saved={saved.numel() > 0})", g, w, 2e-5)


def test_gated_bf16_upcast_path_tiny():
    inputs, plan = make_case(21, 16, 32, 2, torch.bfloat16, True, seed=32, gated=True)
    grad_out = torch.randn(21, 16, dtype=torch.bfloat16, device=DEVICE)
    want_out, want = reference(inputs, plan, grad_out, "geglu")
    out, grads = run_public(inputs, plan, grad_out, "geglu")
    check("out", out, want_out, TOL[torch.bfloat16])
    for name, g, w in zip(NAMES, grads, want):
        check(f"d{name}", g, w, TOL[torch.bfloat16])


def test_gated_opcheck(monkeypatch):
    monkeypatch.setattr(tm, "_empty", lambda shape, dtype, device: torch.empty(shape, dtype=dtype, device=device))
    inputs, plan = make_case(9, 16, 16, 2, torch.float32, True, seed=33, gated=True, bias=False)
    leaves = [t.clone().requires_grad_(True) if t is not None else None for t in inputs]
    args = (leaves[0], plan.sorted_token_ids, plan.expert_offsets, *leaves[1:], "geglu", "triton", True)
    torch.library.opcheck(torch.ops.moebert.moe_ffn_fwd.default, args)


# ---- compiled for sm_80 and sm_90 without a GPU: catches what the interpreter cannot ----------

# Runs in a fresh interpreter: with TRITON_INTERPRET=1 set at import, triton.jit hands back
# interpreter objects that cannot be compiled. Every (kind, dtype) config that
# `_default_config` can hand out on a GPU is compiled for sm_90 (CI: the up kernel for each,
# the other kernels at the largest tile; MOEBERT_AOT_FULL=1: every kernel variant, both
# archs, ~3 min), then the largest tiles for sm_80. Checks: it compiles (tl.dot shapes and
# dtypes, constexpr logic), shared memory fits (A100 163 KiB, H100 227 KiB), loads are
# pipelined and Hopper GEMMs use wgmma.
_AOT_SCRIPT = r"""
import os, torch, triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from moebert_kernels.triton import moe_ffn as tm, moe_ffn_kernels as K

FULL = os.environ.get("MOEBERT_AOT_FULL") == "1"
SMEM = {80: 166912, 90: 232448}  # max dynamic shared memory per block, bytes
TY = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}
FP32_PTRS = ("DGATE_ptr", "DB_ptr", "DB2_ptr", "PW_ptr", "PB_ptr")

def build(kernel, consts, dt, cfg, arch, div=True):
    sig, attrs = {}, {}
    for i, n in enumerate(kernel.arg_names):
        if n in consts:
            sig[n] = "constexpr"
        elif n.endswith("_ptr"):
            sig[n] = "*" + ("i64" if n in ("tok_ptr", "offsets_ptr") else "i32" if n == "SEM_ptr" else
                            "fp32" if n in FP32_PTRS else dt)
            attrs[(i,)] = [["tt.divisibility", 16]]
        else:
            sig[n] = "i32"
            # What the JIT's divisibility specialization sees at d=768, h=3072 (div=False: odd sizes).
            if div and n not in ("E", "T", "CHUNK", "CHUNK_B"):
                attrs[(i,)] = [["tt.divisibility", 16]]
    src = ASTSource(fn=kernel, signature=sig, attrs=attrs,
                    constexprs={(kernel.arg_names.index(k),): v for k, v in consts.items()})
    k = triton.compile(src, target=GPUTarget("cuda", arch, 32),
                       options=dict(num_warps=cfg.num_warps, num_stages=cfg.num_stages))
    assert k.metadata.shared <= SMEM[arch], (kernel.__name__, cfg, arch, k.metadata.shared)
    return k

def spill_bytes(k):
    # Stack + local bytes per thread in the cubin (cuobjdump ships with triton's NVIDIA backend).
    import re, subprocess, tempfile
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(k.asm["cubin"])
        f.flush()
        usage = subprocess.run([tool, "--dump-resource-usage", f.name], capture_output=True, text=True, check=True)
    m = re.search(r"STACK:(\d+) SHARED:\d+ LOCAL:(\d+)", usage.stdout)
    return int(m[1]) + int(m[2])

def variants(kind, dtype, cfg, everything):
    # Unit strides are constexpr 1 at run time (the JIT specializes ints equal to 1), as here.
    prec = "ieee" if dtype == torch.float32 else "tf32"
    blk = dict(BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, E_POW2=4, UPCAST=False, PRECISION=prec)
    if kind == "hidden":
        out = [("bwd_hidden", K._moe_ffn_bwd_hidden_kernel, dict(ACTIVATION=1, GATED=False, B2_DOT=True, HAS_GATE=True,
                STORE_DH=True, STORE_ACT=True, DGATE=True, STORE_DB=True, STORE_DB2=True, ROW_PASS=True, stride_wn=1,
                EVEN_K=True, **blk), True)]
        more = [("bwd_hidden_min", K._moe_ffn_bwd_hidden_kernel, dict(ACTIVATION=2, GATED=False, B2_DOT=False,
                 HAS_GATE=False, STORE_DH=True, STORE_ACT=False, DGATE=False, STORE_DB=False, STORE_DB2=False,
                 ROW_PASS=False, stride_wn=1, EVEN_K=False, **blk), False)]
    elif kind == "gemm":
        out = [("up", K._moe_ffn_up_kernel, dict(ACTIVATION=0, GATED=False, HAS_BIAS=True, STORE_ACT=True,
                                                  STORE_H=True, stride_wk=1, EVEN_K=True, **blk), True)]
        more = [
            ("down_fwd", K._moe_ffn_down_kernel, dict(HAS_BIAS=True, HAS_GATE=True, HAS_ADD=False, stride_wk=1,
             EVEN_K=True, **blk), True),
            ("down_dx_oddK", K._moe_ffn_down_kernel, dict(HAS_BIAS=False, HAS_GATE=False, HAS_ADD=True, stride_wn=1,
             EVEN_K=False,
             **blk), False),
            ("up_oddK_tf32", K._moe_ffn_up_kernel, dict(ACTIVATION=2, GATED=False, HAS_BIAS=True, STORE_ACT=True,
             STORE_H=False, stride_wk=1, EVEN_K=False, **dict(blk, PRECISION="tf32")), False),
        ]
    else:
        out = [("dw2", K._moe_ffn_dw_kernel, dict(L_GATHER=True, R_GATHER=False, LOAD_TOK=True, COMPUTE_W=True,
                                                   COMPUTE_B=True, **blk), True)]
        more = [
            ("dw1", K._moe_ffn_dw_kernel, dict(L_GATHER=False, R_GATHER=True, LOAD_TOK=True, COMPUTE_W=True,
             COMPUTE_B=True, **blk), True),
            ("db2_only", K._moe_ffn_dw_kernel, dict(L_GATHER=True, R_GATHER=False, LOAD_TOK=True, COMPUTE_W=False,
             COMPUTE_B=True, **blk), False),
        ]
    return out + more if everything else out + more[:1]  # more[:1]: the other operand layout

# Every config the GPU heuristic can choose (BERT-base and -large sizes, 1..64 experts, 16..65536 tokens).
cfgs = {}
for dtype in TY:
    for kind in ("gemm", "hidden", "dw"):
        for T in [1 << i for i in range(4, 17)]:
            for E in (1, 2, 4, 8, 16, 64):
                for d, h in ((768, 3072), (1024, 4096)):
                    cfgs.setdefault((kind, dtype, tm._default_config(kind, T, d, h, E, dtype, False)), None)
largest = {}
for kind, dtype, cfg in cfgs:
    key = (kind, dtype)
    if key not in largest or cfg.block_m * cfg.block_n > largest[key].block_m * largest[key].block_n:
        largest[key] = cfg
n = 0
for arch in (90, 80):
    for kind, dtype, cfg in cfgs:
        is_largest = largest[(kind, dtype)] == cfg
        if FULL:
            todo = variants(kind, dtype, cfg, True)
        elif dtype == torch.float16 or (not is_largest and (dtype == torch.float32 or (arch == 80 and kind != "hidden"))):
            continue  # CI: bf16 every tile on sm_90 (and every bwd-hidden tile on sm_80); the largest tiles otherwise
        else:  # GEMM1 (w read transposed), plus the bwd hidden / dW1 kernels (w as stored) at the largest bf16 tile
            todo = variants(kind, dtype, cfg, False)[:2 if is_largest and dtype == torch.bfloat16 else 1]
            if arch == 80 and (kind, dtype) in (("dw", torch.float32), ("dw", torch.bfloat16)):
                todo = todo[:1] if dtype == torch.bfloat16 else []  # sm_80: shared-memory check of the big tiles
        for name, kern, consts, even in todo:
            k = build(kern, consts, TY[dtype], cfg, arch, div=even)
            n += 1
            ptx = k.asm["ptx"]
            if even and kind != "gemm" and dtype == torch.bfloat16:  # the kernels whose epilogues spilled before
                # (odd sizes, no 16-divisible strides: bwd_hidden at 128 x 64 spills 8 bytes on sm_80, accepted)
                assert spill_bytes(k) == 0, ("spills", name, cfg, arch, spill_bytes(k))
            if even and dtype != torch.float32 and kind in ("gemm", "hidden"):
                assert "cp.async" in ptx, ("operand loads are not pipelined", name, cfg, arch)
                if arch == 90 and cfg.block_m >= 64:
                    assert "wgmma" in ptx, ("no Hopper wgmma", name, cfg)
            if even and dtype != torch.float32 and kind == "dw" and arch == 90:
                assert "wgmma" in ptx, ("no Hopper wgmma", name, cfg)
# Gated experts (ModernBERT's GeGLU, no biases): up and bwd-hidden kernels at the largest tiles, both archs.
for arch in (90, 80):
    for dtype in (torch.bfloat16, torch.float32):
        cfg = largest[("gemm", dtype)]
        hcfg = largest[("hidden", dtype)]
        prec = "ieee" if dtype == torch.float32 else "tf32"
        blk = dict(BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, E_POW2=4, UPCAST=False,
                   PRECISION=prec)
        k = build(K._moe_ffn_up_kernel, dict(ACTIVATION=0, GATED=True, HAS_BIAS=False, STORE_ACT=True, STORE_H=True,
                  stride_wk=1, EVEN_K=True, **blk), TY[dtype], cfg, arch)
        if dtype != torch.float32:
            assert "cp.async" in k.asm["ptx"], ("gated up: operand loads are not pipelined", cfg, arch)
        hblk = dict(blk, BLOCK_M=hcfg.block_m, BLOCK_N=hcfg.block_n, BLOCK_K=hcfg.block_k)
        k = build(K._moe_ffn_bwd_hidden_kernel, dict(ACTIVATION=0, GATED=True, B2_DOT=False, HAS_GATE=True,
                  STORE_DH=True, STORE_ACT=True, DGATE=True, STORE_DB=False, STORE_DB2=False, ROW_PASS=False,
                  stride_wn=1, EVEN_K=True, **hblk), TY[dtype], hcfg, arch)
        assert dtype == torch.float32 or spill_bytes(k) == 0, ("gated bwd_hidden spills", hcfg, arch, spill_bytes(k))
        n += 2
# E == 1 and T == 1 become constexpr 1 under the JIT's specialization.
build(K._moe_ffn_bwd_hidden_kernel, dict(ACTIVATION=0, GATED=False, B2_DOT=True, HAS_GATE=True, STORE_DH=True,
      STORE_ACT=True, DGATE=True, STORE_DB=True, STORE_DB2=True, ROW_PASS=True, stride_wn=1, EVEN_K=True, E=1, T=1, BLOCK_M=16, BLOCK_N=64,
      BLOCK_K=128, E_POW2=2, UPCAST=False, PRECISION="tf32"), "bf16", tm.MoEFFNConfig(16, 64, 128, 4, 4), 90)
print(n + 1, "compiled ok")
"""


@pytest.mark.skipif(HAS_CUDA, reason="on a GPU the real JIT compiles these kernels in the other tests")
@pytest.mark.skipif(not _aot.have_ptxas(), reason="triton's NVIDIA backend (ptxas) is not installed")
def test_kernels_compile_for_sm80_and_sm90():
    res = _aot.run(_AOT_SCRIPT, timeout=600)  # the script defines its own build() (shared-memory checks)
    assert res.returncode == 0 and res.stdout.strip().endswith("compiled ok"), res.stderr[-4000:]


# ---- GPU only ---------------------------------------------------------------------------------

@requires_gpu
@pytest.mark.parametrize("T", [1024, 8192])
def test_bf16_bert_sizes(T):
    inputs, plan = make_case(T, 768, 768, 4, torch.bfloat16, True, seed=11)
    grad_out = torch.randn(T, 768, dtype=torch.bfloat16, device=DEVICE)
    want_out, want = reference(inputs, plan, grad_out)
    out, grads = run_public(inputs, plan, grad_out)
    check("out", out, want_out, 2e-2)
    for name, g, w in zip(NAMES, grads, want):
        check(f"d{name}", g, w, 3e-2)


@requires_gpu
@pytest.mark.parametrize("routing", ["random", "one"])
def test_split_k_semaphore_reduce_on_a_gpu_is_right_and_deterministic(routing):
    """What the interpreter cannot show: chunks of one expert finish in any order on a GPU, and the
    last one must see every other chunk's partial (release/acquire on the semaphore, .cg loads)."""
    inputs, plan = make_case(8192, 256, 384, 4, torch.bfloat16, True, routing, seed=12)
    grad_out = torch.randn(8192, 256, dtype=torch.bfloat16, device=DEVICE)
    _, want = reference(inputs, plan, grad_out)
    runs = []
    with tm.override_config(dw=tm.MoEFFNConfig(64, 64, 32, 4, 3, chunk=256)):  # ~8 chunks per expert
        for _ in range(3):
            runs.append(run_public(inputs, plan, grad_out)[1])
    for name, g, w in zip(NAMES, runs[0], want):
        check(f"d{name}", g, w, 3e-2)
    for other in runs[1:]:
        assert all(torch.equal(a, b) for a, b in zip(runs[0], other)), "the split-K reduce is not deterministic"


@requires_gpu
def test_fp32_tf32_policy_follows_torch():
    inputs, plan = make_case(512, 256, 256, 4, torch.float32, True, seed=12)
    want_out, _ = reference(inputs, plan, torch.ones(512, 256, device=DEVICE))
    # Set and restored by hand: newer pytest's monkeypatch undo calls delattr, which torch's cuBLASModule refuses.
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        out, _ = tm.moe_ffn_forward(inputs[0], plan.sorted_token_ids, plan.expert_offsets, *inputs[1:], "gelu",
                                    False)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old
    assert rel_err(out, want_out) < 1e-5  # ieee: as accurate as cuBLAS fp32


@requires_gpu
def test_cuda_graph_capture_of_patched_bert():
    transformers = pytest.importorskip("transformers")
    import moebert_kernels

    config = transformers.BertConfig(vocab_size=120, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=256, max_position_embeddings=64)
    model = transformers.BertModel(config).eval()
    moebert_kernels.patch(model, num_experts=4, expert_size=64, shared=32, backend="triton")
    model = model.cuda()
    ids = torch.randint(0, 120, (2, 16), device="cuda")
    with torch.no_grad():
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(3):  # warm up: compile the kernels outside the capture
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


@requires_gpu
@pytest.mark.parametrize("T", [1024, 8192])
def test_gated_bf16_modernbert_sizes(T):
    # ModernBERT-base: d=768, intermediate 1152 (Wi 2304 x 768), no biases; 4 experts of 288.
    inputs, plan = make_case(T, 768, 288, 4, torch.bfloat16, False, seed=14, gated=True, bias=False)
    grad_out = torch.randn(T, 768, dtype=torch.bfloat16, device=DEVICE)
    want_out, want = reference(inputs, plan, grad_out, "geglu")
    out, grads = run_public(inputs, plan, grad_out, "geglu")
    check("out", out, want_out, 2e-2)
    for name, g, w in zip(NAMES, grads, want):
        if w is not None:
            check(f"d{name}", g, w, 3e-2)


@requires_gpu
@pytest.mark.skipif(not HAS_CUDA or "cuda" not in ops.available_backends("moe_ffn", "cuda"),
                    reason="the CUDA C++ moe_ffn backend is not built/available")
def test_matches_cuda_backend():
    inputs, plan = make_case(1024, 768, 768, 4, torch.bfloat16, True, seed=13)
    grad_out = torch.randn(1024, 768, dtype=torch.bfloat16, device=DEVICE)
    out_t, grads_t = run_public(inputs, plan, grad_out)
    leaves = [t.detach().clone().requires_grad_(True) for t in inputs]
    out_c = ops.moe_ffn(leaves[0], plan, *leaves[1:5], gate=leaves[5], backend="cuda")
    grads_c = torch.autograd.grad(out_c, leaves, grad_out)
    check("out vs cuda", out_t, out_c, 2e-2)
    for name, a, b in zip(NAMES, grads_t, grads_c):
        check(f"d{name} vs cuda", a, b, 3e-2)
