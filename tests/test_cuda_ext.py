"""The CUDA C++ backend (moebert_kernels._C, csrc/).

Three layers, each running where it can:
  (a) everywhere: the Python side degrades cleanly when _C is absent or fails to load;
  (b) where _C imports (CI builds it in a CUDA-torch venv with no GPU): every op is
      registered and CPU tensors get a clear error;
  (c) on a GPU: the oracle matrix against moe_ffn_reference in float64, the routing plan
      against RoutingPlan, a three-way check with triton, and CUDA-graph capture/replay.
"""
import importlib
import os
import signal
import subprocess
import sys

import pytest
import torch

from moebert_kernels import _cuda
from moebert_kernels.ops import dispatch
from moebert_kernels.ops.dispatch import BackendUnavailableError, select_backend
from moebert_kernels.ops.moe_ffn import moe_ffn, moe_ffn_reference
from moebert_kernels.ops.routing import RoutingPlan
from moebert_kernels.cuda.moe_ffn import GEMM_KINDS, grouped_gemm_plan_reference

MOEBERT_C_OPS = ("routing_plan", "grouped_gemm", "grouped_gemm_plan", "moe_bias_act", "moe_scatter_rows",
                 "moe_act_backward", "moe_segment_colsum", "expert_layer_norm_forward",
                 "expert_layer_norm_backward", "distill_hidden_forward", "distill_logits_forward")


def _ext_importable():
    try:
        importlib.import_module("moebert_kernels._C")
    except ImportError as exc:
        return False, f"moebert_kernels._C does not import here ({type(exc).__name__}: {exc})"
    return True, ""


_HAS_EXT, _NO_EXT_WHY = _ext_importable()
requires_ext = pytest.mark.skipif(not _HAS_EXT, reason=_NO_EXT_WHY)
requires_gpu_ext = pytest.mark.skipif(
    not (_HAS_EXT and torch.cuda.is_available()),
    reason="needs a CUDA device and the built extension" + ("" if _HAS_EXT else f": {_NO_EXT_WHY}"),
)


@pytest.fixture
def fresh_load():
    """Clear the cached load() result before and after, so monkeypatches take effect and do not leak."""
    _cuda.load.cache_clear()
    yield
    _cuda.load.cache_clear()


# ---- (a) degrading cleanly (runs on CI) -------------------------------------------------

def _pretend_cuda_torch(monkeypatch):
    monkeypatch.setattr(torch.version, "cuda", "13.0")


def test_absent_extension_gives_reason(monkeypatch, fresh_load):
    _pretend_cuda_torch(monkeypatch)
    real = importlib.import_module

    def no_ext(name, *args, **kwargs):
        if name == "moebert_kernels._C":
            raise ModuleNotFoundError(f"No module named {name!r}")
        return real(name, *args, **kwargs)

    monkeypatch.setattr(importlib, "import_module", no_ext)
    ext, why = _cuda.load()
    assert ext is None
    assert "not built" in why and "MOEBERT_BUILD_CUDA=1" in why
    with pytest.raises(BackendUnavailableError, match="not built"):
        select_backend("moe_ffn", "cuda", backend="cuda")
    # Not forced: the dispatch skips cuda instead of failing.
    assert select_backend("moe_ffn", "cuda") != "cuda"


def test_extension_that_fails_to_load_gives_reason(monkeypatch, fresh_load):
    _pretend_cuda_torch(monkeypatch)
    real = importlib.import_module

    def broken_ext(name, *args, **kwargs):
        if name == "moebert_kernels._C":
            raise ImportError("moebert_kernels/_C.so: undefined symbol: _ZN3c1017RegisterOperatorsD1Ev")
        return real(name, *args, **kwargs)

    monkeypatch.setattr(importlib, "import_module", broken_ext)
    ext, why = _cuda.load()
    assert ext is None
    assert "failed to load" in why and "undefined symbol" in why and "rebuild" in why
    with pytest.raises(BackendUnavailableError, match="undefined symbol"):
        select_backend("moe_ffn", "cuda", backend="cuda")
    # The launchers refuse with the same reason rather than an AttributeError on torch.ops.
    from moebert_kernels.cuda import moe_ffn as cuda_moe_ffn

    x = torch.randn(3, 4)
    with pytest.raises(RuntimeError, match="undefined symbol"):
        cuda_moe_ffn.routing_plan(torch.zeros(3, dtype=torch.long), 2)
    with pytest.raises(RuntimeError, match="undefined symbol"):
        cuda_moe_ffn.moe_ffn_forward(x, None, None, None, None, None, None, None, "gelu", False)


def test_cpu_torch_gives_reason(monkeypatch, fresh_load):
    monkeypatch.setattr(torch.version, "cuda", None)
    ext, why = _cuda.load()
    assert ext is None and "CPU build" in why
    with pytest.raises(BackendUnavailableError, match="CPU build"):
        select_backend("moe_ffn", "cuda", backend="cuda")


def test_forced_cuda_on_cpu_tensors_names_the_device():
    E, T, d, h = 2, 5, 8, 12
    x = torch.randn(T, d)
    plan = RoutingPlan.from_expert_ids(torch.tensor([0, 1, 1, 0, 1]), E)
    w1, b1, w2, b2 = torch.randn(E, h, d), torch.randn(E, h), torch.randn(E, d, h), torch.randn(E, d)
    with pytest.raises(BackendUnavailableError, match="needs CUDA tensors"):
        moe_ffn(x, plan, w1, b1, w2, b2, backend="cuda")


def test_cuda_backend_is_registered_for_moe_ffn():
    assert dispatch._IMPLS[("moe_ffn", "cuda")] == "moebert_kernels.cuda.moe_ffn"
    from moebert_kernels.cuda import moe_ffn as cuda_moe_ffn

    assert cuda_moe_ffn.SAVES_HIDDEN is True
    for name in ("moe_ffn_forward", "moe_ffn_backward"):
        assert callable(getattr(cuda_moe_ffn, name))


# ---- (b) the built extension, with or without a GPU ---------------------------------------

@requires_ext
def test_every_op_is_registered():
    for name in MOEBERT_C_OPS:
        op = getattr(torch.ops.moebert_C, name)
        schema = str(op.default._schema)
        assert schema.startswith(f"moebert_C::{name}("), schema
    # Outputs are declared as mutated, so torch.compile / functionalization sees the writes.
    assert "Tensor(a!) out" in str(torch.ops.moebert_C.grouped_gemm.default._schema)
    assert "Tensor(a!) y" in str(torch.ops.moebert_C.expert_layer_norm_forward.default._schema)


@requires_ext
def test_expert_layer_norm_rejects_cpu_tensors_clearly():
    T, d, E = 4, 8, 2
    x, w = torch.randn(T, d), torch.randn(E, d)
    ids = torch.zeros(T, dtype=torch.long)
    stats = torch.empty(T)
    with pytest.raises(RuntimeError, match="expert_layer_norm_forward needs CUDA tensors"):
        torch.ops.moebert_C.expert_layer_norm_forward(x, None, ids, w, w, 1e-5, torch.empty(T, d), stats, stats)
    with pytest.raises(RuntimeError, match="expert_layer_norm_backward needs CUDA tensors"):
        torch.ops.moebert_C.expert_layer_norm_backward(x, x, None, ids, w, stats, stats, torch.empty(T, d),
                                                       torch.empty(0), torch.empty(0), 32)


@requires_ext
def test_ops_reject_cpu_tensors_clearly():
    E, T, d, h = 2, 4, 8, 16
    ids = torch.tensor([0, 1, 1, 0])
    with pytest.raises(RuntimeError, match="routing_plan needs CUDA tensors"):
        torch.ops.moebert_C.routing_plan(ids, E, torch.empty(T, dtype=torch.long), torch.empty(E, dtype=torch.long),
                                         torch.empty(E + 1, dtype=torch.long), torch.empty(T, dtype=torch.long))
    plan = RoutingPlan.from_expert_ids(ids, E)
    off, tok = plan.expert_offsets, plan.sorted_token_ids
    x, w = torch.randn(T, d), torch.randn(E, h, d)
    ops = torch.ops.moebert_C
    with pytest.raises(RuntimeError, match="grouped_gemm needs CUDA tensors"):
        ops.grouped_gemm(x, w, off, 0, torch.empty(T, h))
    with pytest.raises(RuntimeError, match="moe_bias_act needs CUDA tensors"):
        ops.moe_bias_act(torch.empty(T, h), None, off, 0, False, torch.empty(T, h))
    with pytest.raises(RuntimeError, match="moe_scatter_rows needs CUDA tensors"):
        ops.moe_scatter_rows(x, tok, off, None, None, None, torch.empty_like(x))
    with pytest.raises(RuntimeError, match="moe_act_backward needs CUDA tensors"):
        ops.moe_act_backward(x, x, tok, off, None, None, None, 0, False, torch.empty_like(x), torch.empty(0),
                             torch.empty(0))
    with pytest.raises(RuntimeError, match="moe_segment_colsum needs CUDA tensors"):
        ops.moe_segment_colsum(x, off, None, None, torch.empty(E, 4, d))


@requires_ext
@pytest.mark.parametrize("kind", [0, 1, 2])
@pytest.mark.parametrize("counts", [[3, 0, 5], [1], [0, 0, 7, 0], [0, 0]], ids=str)
def test_plan_on_the_host_matches_the_reference(kind, counts):
    """The argument builder (csrc/grouped_gemm.h), run on the host by the CPU op, against the Python reference."""
    offsets = torch.tensor([0, *counts]).cumsum(0)
    got = torch.ops.moebert_C.grouped_gemm_plan(offsets, kind, 24, 40, 16)
    want = grouped_gemm_plan_reference(offsets.tolist(), kind, 24, 40, 16)
    assert got.dtype == torch.long and got.tolist() == [list(p) for p in want]


def _run_isolated(body: str) -> str:
    """Run ``body`` in a fresh interpreter; a crash fails the test naming the signal and the last step printed
    (``step: ...`` lines), instead of killing the pytest process and every test after it."""
    res = subprocess.run([sys.executable, "-X", "faulthandler", "-c", body], capture_output=True, text=True,
                         timeout=300)
    if res.returncode < 0:
        steps = [line for line in res.stdout.splitlines() if line.startswith("step: ")]
        pytest.fail(f"the subprocess died of {signal.Signals(-res.returncode).name} "
                    f"at {steps[-1] if steps else 'its start'}\n{res.stderr[-3000:]}")
    assert res.returncode == 0, res.stderr[-4000:]
    return res.stdout


def test_isolated_run_names_a_crash():
    with pytest.raises(pytest.fail.Exception, match="SIGSEGV at step: the crash"):
        _run_isolated("import os, signal\nprint('step: the crash', flush=True)\nos.kill(os.getpid(), signal.SIGSEGV)")


# On the H200 run of 2026-12-04 (torch 2.11.0+cu130, nvcc 13.0 build) the first call below segfaulted after the
# 20 tests above had passed in the same process, where CI's build raises. It is the only moebert_C op that
# returns a tensor, and the only one whose TORCH_CHECK failed there (the void ops above raised fine). It runs
# in its own process: a crash there is reported with the step it died at, and a pass there while the in-process
# run crashes points at state left by earlier tests rather than at the throw itself.
_PLAN_REJECTS = r"""
import re
import torch
import moebert_kernels._C  # noqa: F401
for step, args, want in (("kind=3", (torch.tensor([0, 2]), 3, 8, 8, 8), "kind must be 0, 1 or 2, got 3"),
                         ("float offsets", (torch.tensor([0.0, 2.0]), 0, 8, 8, 8),
                          r"expert_offsets must be int64 \[E\+1\]")):
    print("step:", step, flush=True)
    try:
        torch.ops.moebert_C.grouped_gemm_plan(*args)
    except RuntimeError as exc:
        assert re.search(want, str(exc)), (step, str(exc))
    else:
        raise AssertionError(f"{step}: no error")
print("rejected ok")
"""


@requires_ext
def test_plan_rejects_bad_arguments():
    assert _run_isolated(_PLAN_REJECTS).strip().endswith("rejected ok")


# ---- (c) GPU ------------------------------------------------------------------------------

@pytest.mark.skipif(os.environ.get("MOEBERT_REQUIRE_GPU") != "1",
                    reason="MOEBERT_REQUIRE_GPU=1 is not set (scripts/gpu_check.sh sets it on a GPU machine)")
def test_gpu_machine_has_every_backend():
    """On a GPU machine a missing piece must fail the run, not turn every GPU test into a skip."""
    assert torch.cuda.is_available(), "MOEBERT_REQUIRE_GPU=1 but torch sees no CUDA device"
    assert _HAS_EXT, _NO_EXT_WHY
    dev = torch.device("cuda")
    missing = {f"{op}/{b}": why for op in ("moe_ffn", "distill_loss") for b in ("triton", "cuda")
               for ok, why in [dispatch.backend_status(op, b, dev)] if not ok}
    assert not missing, missing



TOL = {torch.float32: 1e-4, torch.float16: 5e-3, torch.bfloat16: 3e-2}


def _rel(a, b):
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


@pytest.fixture
def poisoned(monkeypatch):
    """Every output the cuda launchers allocate starts as NaN (or -1 for indices)."""
    from moebert_kernels.cuda import moe_ffn as cuda_moe_ffn

    def nan_output(shape, like, dtype=None):
        dtype = dtype or like.dtype
        fill = float("nan") if dtype.is_floating_point else -1
        return torch.full(shape, fill, dtype=dtype, device=like.device)

    monkeypatch.setattr(cuda_moe_ffn, "_new_output", nan_output)
    return cuda_moe_ffn


def _ids(kind, T, E, gen):
    if kind == "random":
        return torch.randint(0, E, (T,), generator=gen)
    if kind == "empty_expert":  # expert 1 gets nothing
        ids = torch.randint(0, E - 1, (T,), generator=gen)
        return ids + (ids >= 1).long()
    if kind == "one_expert":
        return torch.full((T,), E - 1, dtype=torch.long)
    raise ValueError(kind)


def _problem(T, d, h, d_out, E, dtype, kind="random", gated=False, seed=0, up=1):
    """``gated``: a router gate; ``up=2``: a gated activation's [E, 2h, d] up projection."""
    gen = torch.Generator().manual_seed(seed)
    dev = "cuda"
    x = torch.randn(T, d, generator=gen)
    w1 = torch.randn(E, up * h, d, generator=gen) / d**0.5
    b1 = torch.randn(E, up * h, generator=gen) * 0.1
    w2 = torch.randn(E, d_out, h, generator=gen) / h**0.5
    b2 = torch.randn(E, d_out, generator=gen) * 0.1
    gate = torch.rand(T, generator=gen) + 0.5 if gated else None
    ids = _ids(kind, T, E, gen)
    tensors = [t.to(dev, dtype) for t in (x, w1, b1, w2, b2)] + [gate.to(dev, dtype) if gated else None]
    return tensors, RoutingPlan.from_expert_ids(ids.to(dev), E)


def _check_against_reference(tensors, plan, activation, dtype, backend="cuda", grad_mask=None):
    n = len(tensors)
    grad_mask = grad_mask or [t is not None for t in tensors]
    # detach() without clone keeps each input's strides (some tests pass non-contiguous views).
    leaves = [t.detach().requires_grad_(m) if t is not None else None for t, m in zip(tensors, grad_mask)]
    ref_leaves = [t.detach().double().requires_grad_(m) if t is not None else None for t, m in zip(tensors, grad_mask)]
    out = moe_ffn(leaves[0], plan, *leaves[1:5], gate=leaves[5], activation=activation, backend=backend)
    ref = moe_ffn_reference(ref_leaves[0], plan.sorted_token_ids, plan.expert_offsets, *ref_leaves[1:5],
                            ref_leaves[5], activation)
    assert out.dtype == dtype and out.shape == ref.shape
    assert torch.isfinite(out).all()
    if out.numel():
        assert _rel(out, ref) < TOL[dtype], f"forward: {_rel(out, ref):.3e}"
    gy = torch.randn(ref.shape, generator=torch.Generator().manual_seed(7)).to(out.device)
    want = [i for i in range(n) if leaves[i] is not None and grad_mask[i]]
    got = torch.autograd.grad(out, [leaves[i] for i in want], gy.to(dtype))
    exp = torch.autograd.grad(ref, [ref_leaves[i] for i in want], gy.double(), allow_unused=True)
    names = ["x", "w1", "b1", "w2", "b2", "gate"]
    for i, g, e in zip(want, got, exp):
        e = torch.zeros_like(ref_leaves[i]) if e is None else e
        assert g.shape == e.shape and g.dtype == tensors[i].dtype, names[i]
        assert torch.isfinite(g).all(), f"d{names[i]} has non-finite values"
        if e.norm() == 0:
            assert g.abs().sum() == 0, f"d{names[i]} should be zero"
        else:
            assert _rel(g, e) < TOL[dtype] * 2, f"d{names[i]}: {_rel(g, e):.3e}"
    return out


DTYPES = [torch.float32, torch.float16, torch.bfloat16]
SHAPES = [  # T, d, h, d_out, E, routing
    (64, 32, 48, 32, 4, "random"),
    (37, 40, 24, 40, 3, "random"),       # odd sizes, nothing a multiple of a tile
    (1, 16, 32, 16, 4, "random"),        # a single token
    (150, 48, 80, 48, 5, "empty_expert"),
    (97, 24, 72, 24, 4, "one_expert"),
    (600, 72, 136, 56, 2, "random"),     # several row, column and k tiles; >256 rows per expert
]


@requires_gpu_ext
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s[:5])) + "-" + s[5])
@pytest.mark.parametrize("gated", [False, True], ids=["nogate", "gate"])
def test_oracle_matrix(poisoned, dtype, shape, gated):
    *dims, kind = shape
    tensors, plan = _problem(*dims, dtype, kind=kind, gated=gated)
    _check_against_reference(tensors, plan, "gelu", dtype)


@requires_gpu_ext
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("activation", ["gelu_tanh", "relu", "geglu", "geglu_tanh", "reglu"])
def test_other_activations(poisoned, dtype, activation):
    tensors, plan = _problem(70, 40, 56, 24, 3, dtype, gated=True, seed=3, up=2 if "glu" in activation else 1)
    _check_against_reference(tensors, plan, activation, dtype)


@requires_gpu_ext
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_no_biases(poisoned, dtype):
    tensors, plan = _problem(90, 32, 48, 32, 3, dtype, gated=True, seed=4, up=2)
    tensors[2] = tensors[4] = None
    _check_against_reference(tensors, plan, "geglu", dtype)


@requires_gpu_ext
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_odd_sizes_in_half_precision(poisoned, dtype):
    """16-bit feature sizes that are not multiples of 8 (no 16-byte rows for TMA/cp.async) run in fp32."""
    tensors, plan = _problem(45, 20, 36, 12, 3, dtype, gated=True, seed=6)
    _check_against_reference(tensors, plan, "gelu", dtype)


@requires_gpu_ext
@pytest.mark.parametrize("mask", [[True, False, False, False, False, False], [False, True, False, False, True, True],
                                  [False, False, True, True, False, False]])
def test_partial_grads(poisoned, mask):
    tensors, plan = _problem(90, 32, 40, 32, 3, torch.float32, gated=True, seed=5)
    _check_against_reference(tensors, plan, "gelu", torch.float32, grad_mask=mask)


@requires_gpu_ext
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_strided_inputs(poisoned, dtype):
    (x, w1, b1, w2, b2, gate), plan = _problem(80, 40, 56, 40, 3, dtype, gated=True, seed=9)
    # Same values, other strides: x transposed storage, weights stored [E, in, out].
    x_t = x.t().contiguous().t()
    w1_t = w1.transpose(1, 2).contiguous().transpose(1, 2)
    w2_t = w2.transpose(1, 2).contiguous().transpose(1, 2)
    gate_s = torch.stack([gate, gate], 1)[:, 0]
    assert not x_t.is_contiguous() and not w1_t.is_contiguous() and not gate_s.is_contiguous()
    _check_against_reference([x_t, w1_t, b1, w2_t, b2, gate_s], plan, "gelu", dtype)


@requires_gpu_ext
def test_no_saved_hidden_recomputes(poisoned):
    (x, w1, b1, w2, b2, gate), plan = _problem(50, 24, 40, 24, 3, torch.float32, gated=True, seed=11)
    args = (x, plan.sorted_token_ids, plan.expert_offsets, w1, b1, w2, b2, gate, "gelu")
    _, hidden = poisoned.moe_ffn_forward(*args, True)
    gy = torch.randn_like(x)
    with_h = poisoned.moe_ffn_backward(gy, *args[:-1], hidden, "gelu", [True] * 6)
    without = poisoned.moe_ffn_backward(gy, *args[:-1], x.new_empty(0), "gelu", [True] * 6)
    for a, b in zip(with_h, without):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@requires_gpu_ext
def test_zero_tokens(poisoned):
    tensors, plan = _problem(0, 16, 24, 16, 3, torch.float32, gated=True)
    _check_against_reference(tensors, plan, "gelu", torch.float32)


@requires_gpu_ext
@pytest.mark.parametrize("T,E", [(0, 3), (1, 1), (1, 4), (255, 4), (257, 7), (1000, 64), (5000, 8)])
def test_routing_plan_matches(poisoned, T, E):
    gen = torch.Generator().manual_seed(T + E)
    ids = torch.randint(0, E, (T,), generator=gen)
    if E > 2 and T > 0:
        ids[ids == 1] = 0  # an empty expert
    ids = ids.cuda()
    got = poisoned.routing_plan(ids, E)
    want = RoutingPlan.from_expert_ids(ids, E)
    for field in ("expert_ids", "sorted_token_ids", "expert_counts", "expert_offsets", "inverse"):
        g, w = getattr(got, field), getattr(want, field)
        assert g.dtype == w.dtype and torch.equal(g, w), field
    assert got.num_experts == E


@requires_gpu_ext
@pytest.mark.parametrize("dtype", [torch.int64, torch.int32], ids=str)
def test_routing_plan_strided_ids(poisoned, dtype):
    ids = torch.randint(0, 5, (300, 2), device="cuda", dtype=dtype)[:, 1]
    assert not ids.is_contiguous()
    got = poisoned.routing_plan(ids, 5)
    want = RoutingPlan.from_expert_ids(ids, 5)
    for field in ("sorted_token_ids", "expert_counts", "expert_offsets", "inverse"):
        assert torch.equal(getattr(got, field), getattr(want, field)), field


@requires_gpu_ext
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_three_way_with_triton(dtype):
    if "triton" not in dispatch.available_backends("moe_ffn", "cuda"):
        pytest.skip("the triton backend is not available for moe_ffn here")
    tensors, plan = _problem(200, 64, 96, 64, 4, dtype, gated=True, seed=13)
    out_cuda = _check_against_reference(tensors, plan, "gelu", dtype, backend="cuda")
    out_triton = _check_against_reference(tensors, plan, "gelu", dtype, backend="triton")
    assert _rel(out_cuda, out_triton) < TOL[dtype]


@requires_gpu_ext
def test_cuda_graph_capture_and_replay():
    from moebert_kernels.cuda import moe_ffn as cuda_moe_ffn

    T, d, h, E = 96, 32, 64, 4
    (x, w1, b1, w2, b2, gate), _ = _problem(T, d, h, d, E, torch.float16, gated=True, seed=17)
    ids = torch.randint(0, E, (T,), device="cuda")
    gy = torch.randn(T, d, device="cuda", dtype=torch.float16)

    def step():
        plan = cuda_moe_ffn.routing_plan(ids, E, validate=False)
        args = (x, plan.sorted_token_ids, plan.expert_offsets, w1, b1, w2, b2, gate)
        out, hidden = cuda_moe_ffn.moe_ffn_forward(*args, "gelu", True)
        grads = cuda_moe_ffn.moe_ffn_backward(gy, *args, hidden, "gelu", [True] * 6)
        return (out, *grads)

    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(2):
            step()
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static = step()

    for seed in (1, 2):  # new routing and new activations, same buffers
        gen = torch.Generator().manual_seed(seed)
        ids.copy_(torch.randint(0, E, (T,), generator=gen))
        x.copy_(torch.randn(T, d, generator=gen))
        graph.replay()
        torch.cuda.synchronize()
        eager = step()
        for a, b in zip(static, eager):
            torch.testing.assert_close(a, b, rtol=2e-3, atol=2e-3)
        plan = RoutingPlan.from_expert_ids(ids, E)
        ref = moe_ffn_reference(x.double(), plan.sorted_token_ids, plan.expert_offsets, w1.double(), b1.double(),
                                w2.double(), b2.double(), gate.double(), "gelu")
        assert _rel(static[0], ref) < TOL[torch.float16]


# ---- (c) GPU: the C++ ops one by one, against their torch models (tests/_cuda_ops_model.py) -------

def _gemm_impls():
    impls = [1]
    if torch.cuda.is_available() and torch.cuda.get_device_capability()[0] == 9:
        impls.append(2)  # the sm_90a kernels exist only in a build with 9.0a
    return impls


@requires_gpu_ext
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("kind", sorted(GEMM_KINDS))
@pytest.mark.parametrize("counts", [[300, 0, 517, 1], [1000], [0, 0, 0]], ids=str)
def test_grouped_gemm_matches_its_model(dtype, kind, counts):
    import _cuda_ops_model as model

    gen = torch.Generator().manual_seed(len(counts) + sum(counts))
    off = torch.tensor([0, *counts]).cumsum(0).cuda()
    T, E, M, N, K = sum(counts), len(counts), 136, 200, 264
    r = lambda *s: torch.randn(*s, generator=gen).to("cuda", dtype)  # noqa: E731
    if kind == "weight_grad":
        a, b, shape = r(T, M), r(T, N), (E, M, N)
    else:
        a, b, shape = r(T, K), (r(E, N, K) if kind == "rows_x_wt" else r(E, K, N)), (T, N)
    want = torch.zeros(shape, dtype=dtype, device="cuda")
    model.grouped_gemm(a, b, off, GEMM_KINDS[kind], want)
    for impl in [i for i in _gemm_impls() if dtype != torch.float32 or i == 1]:
        got = torch.full(shape, float("nan"), dtype=dtype, device="cuda")
        torch.ops.moebert_C.grouped_gemm(a, b, off, GEMM_KINDS[kind], got, impl)
        assert torch.isfinite(got).all(), f"impl {impl}: unwritten tiles"
        if want.numel():
            assert _rel(got, want) < TOL[dtype], f"impl {impl}: {_rel(got, want):.2e}"


@requires_gpu_ext
@pytest.mark.parametrize("kind", [0, 1, 2])
def test_plan_on_the_device_matches_the_reference(kind):
    offsets = torch.tensor([0, 5, 5, 12, 40]).cuda()
    got = torch.ops.moebert_C.grouped_gemm_plan(offsets, kind, 24, 40, 16)
    assert got.tolist() == [list(p) for p in grouped_gemm_plan_reference(offsets.tolist(), kind, 24, 40, 16)]


@requires_gpu_ext
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("gated", [False, True], ids=["plain", "gated"])
def test_elementwise_ops_match_their_models(dtype, gated):
    import _cuda_ops_model as model

    ops = torch.ops.moebert_C
    gen = torch.Generator().manual_seed(1)
    T, E, h, d_out = 77, 3, 40, 24
    hu = 2 * h if gated else h
    r = lambda *s: torch.randn(*s, generator=gen).to("cuda", dtype)  # noqa: E731
    plan = RoutingPlan.from_expert_ids(torch.randint(0, E, (T,), generator=gen).cuda(), E)
    tok, off = plan.sorted_token_ids, plan.expert_offsets
    gate = (torch.rand(T, generator=gen) + 0.5).cuda()
    hin, bias = r(T, hu), r(E, hu)
    outs = []
    for impl in (ops, model):
        hh, a = hin.clone(), torch.full((T, h), float("nan"), dtype=dtype, device="cuda")
        impl.moe_bias_act(hh, bias, off, 0, gated, a)
        outs.append((hh, a))
    for g, w in zip(outs[0], outs[1]):
        assert _rel(g, w) < TOL[dtype]
    rows, b2, add = r(T, d_out), r(E, d_out), r(T, d_out)
    got, want = (torch.full((T, d_out), float("nan"), dtype=dtype, device="cuda") for _ in range(2))
    ops.moe_scatter_rows(rows, tok, off, b2, gate, add, got)
    model.moe_scatter_rows(rows, tok, off, b2, gate, add, want)
    assert _rel(got, want) < TOL[dtype]
    p, gy = r(T, h), r(T, d_out)
    res = []
    for impl in (ops, model):
        dh = torch.full((T, hu), float("nan"), dtype=dtype, device="cuda")
        ga = torch.full((T, h), float("nan"), dtype=dtype, device="cuda")
        dg = torch.full((T,), float("nan"), device="cuda")
        impl.moe_act_backward(p, hin, tok, off, gate, gy, b2, 1, gated, dh, ga, dg)
        res.append((dh, ga, dg))
    for g, w in zip(*res):
        assert torch.isfinite(g).all() and _rel(g, w) < TOL[dtype]
    part = [torch.full((E, 8, h), float("nan"), device="cuda") for _ in range(2)]
    ops.moe_segment_colsum(p, off, gate, tok, part[0])
    model.moe_segment_colsum(p, off, gate, tok, part[1])
    assert _rel(part[0].sum(1), part[1].sum(1)) < 1e-5


@requires_gpu_ext
def test_weight_grads_are_deterministic():
    """No atomics: two backward passes give bitwise equal dW, db and dgate."""
    (x, w1, b1, w2, b2, gate), plan = _problem(4096, 256, 512, 256, 4, torch.bfloat16, gated=True, seed=21)
    args = (x, plan.sorted_token_ids, plan.expert_offsets, w1, b1, w2, b2, gate)
    from moebert_kernels.cuda import moe_ffn as cuda_moe_ffn

    _, hidden = cuda_moe_ffn.moe_ffn_forward(*args, "gelu", True)
    gy = torch.randn_like(x)
    first = cuda_moe_ffn.moe_ffn_backward(gy, *args, hidden, "gelu", [True] * 6)
    second = cuda_moe_ffn.moe_ffn_backward(gy, *args, hidden, "gelu", [True] * 6)
    for name, a, b in zip(("dx", "dw1", "db1", "dw2", "db2", "dgate"), first, second):
        assert torch.equal(a, b), name


@requires_gpu_ext
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("activation", ["gelu", "geglu"])
def test_shared_expert(poisoned, dtype, activation):
    up = 2 if activation == "geglu" else 1
    (x, w1, b1, w2, b2, gate), plan = _problem(120, 64, 96, 64, 3, dtype, gated=True, seed=8, up=up)
    gen = torch.Generator().manual_seed(9)
    s = 32
    shared = [(torch.randn(up * s, 64, generator=gen) / 8).to("cuda", dtype),
              (torch.randn(up * s, generator=gen) * 0.1).to("cuda", dtype),
              (torch.randn(64, s, generator=gen) / s ** 0.5).to("cuda", dtype)]
    inputs = [x, w1, b1, w2, b2, gate, *shared]
    leaves = [t.detach().clone().requires_grad_(True) for t in inputs]
    refs = [t.detach().double().requires_grad_(True) for t in inputs]
    out = moe_ffn(leaves[0], plan, *leaves[1:5], gate=leaves[5], activation=activation, backend="cuda",
                  shared_w1=leaves[6], shared_b1=leaves[7], shared_w2=leaves[8])
    ref = moe_ffn_reference(refs[0], plan.sorted_token_ids, plan.expert_offsets, *refs[1:6], activation, *refs[6:])
    assert _rel(out, ref) < TOL[dtype]
    gy = torch.randn(out.shape, generator=gen).to("cuda")
    for i, (g, e) in enumerate(zip(torch.autograd.grad(out, leaves, gy.to(dtype)),
                                   torch.autograd.grad(ref, refs, gy.double()))):
        assert _rel(g, e) < 2 * TOL[dtype], f"grad {i}: {_rel(g, e):.2e}"


def _grouped_mm_layer(leaves, plan):
    """The same layer on torch's grouped GEMM (CUTLASS inside torch), gather and scatter around it."""
    import torch.nn.functional as F

    gmm = getattr(F, "grouped_mm", None) or getattr(torch, "_grouped_mm", None)
    x, w1, b1, w2, b2, gate = leaves
    counts = plan.expert_offsets[1:] - plan.expert_offsets[:-1]
    e_sorted = torch.repeat_interleave(torch.arange(w1.shape[0], device=x.device), counts, output_size=x.shape[0])
    offs = plan.expert_offsets[1:].to(torch.int32)
    xs = x.index_select(0, plan.sorted_token_ids)
    hs = F.gelu(gmm(xs, w1.transpose(1, 2), offs=offs) + b1.index_select(0, e_sorted))
    ys = gmm(hs, w2.transpose(1, 2), offs=offs) + b2.index_select(0, e_sorted)
    return ys.index_select(0, plan.inverse) * gate.unsqueeze(-1)


@requires_gpu_ext
@pytest.mark.parametrize("T", [1024, 4096, 16384])
def test_cross_check_at_bert_size(T):
    """bf16, d = h = 768, E = 4, with a gate: cuda against the fp32 reference, triton and torch's grouped_mm on the
    same plan, forward and every gradient."""
    (x, w1, b1, w2, b2, gate), plan = _problem(T, 768, 768, 768, 4, torch.bfloat16, gated=True, seed=T)
    inputs = [x, w1, b1, w2, b2, gate]
    gy = torch.randn(T, 768, generator=torch.Generator().manual_seed(1)).to("cuda", torch.bfloat16)

    def run(fn, dtype):
        leaves = [t.detach().to(dtype).requires_grad_(True) for t in inputs]
        out = fn(leaves)
        return [out.detach(), *torch.autograd.grad(out, leaves, gy.to(dtype))]

    layer = lambda backend: lambda l: moe_ffn(l[0], plan, *l[1:5], gate=l[5], backend=backend)  # noqa: E731
    ref = run(lambda l: moe_ffn_reference(l[0], plan.sorted_token_ids, plan.expert_offsets, *l[1:]), torch.float32)
    got = run(layer("cuda"), torch.bfloat16)
    names = ("out", "dx", "dw1", "db1", "dw2", "db2", "dgate")
    for n, g, r in zip(names, got, ref):
        assert torch.isfinite(g).all() and _rel(g, r) < 3e-2, f"cuda {n} vs fp32 reference: {_rel(g, r):.2e}"
    others = {}
    if "triton" in dispatch.available_backends("moe_ffn", "cuda"):
        others["triton"] = run(layer("triton"), torch.bfloat16)
    try:
        others["grouped_mm"] = run(lambda l: _grouped_mm_layer(l, plan), torch.bfloat16)
    except (RuntimeError, TypeError, AttributeError) as exc:  # not on this torch/GPU: the other checks stand
        print(f"grouped_mm skipped: {exc}")
    for who, theirs in others.items():
        for n, g, t in zip(names, got, theirs):
            assert _rel(g, t) < 3e-2, f"cuda {n} vs {who}: {_rel(g, t):.2e}"


@pytest.mark.parametrize("archs,cap,ok", [
    ("8.0,9.0", (8, 0), True), ("8.0,9.0", (8, 6), True), ("8.0,9.0", (9, 0), True),
    ("8.0,9.0", (7, 5), False), ("8.0,9.0", (10, 0), False), ("8.0,9.0+PTX", (10, 0), True),
    ("9.0a", (9, 0), True), ("8.6", (8, 0), False), ("", (7, 0), False),
])
def test_arch_supported(archs, cap, ok):
    from moebert_kernels._cuda import arch_supported

    assert arch_supported(archs, cap) is ok
