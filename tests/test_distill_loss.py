"""distill_loss: every backend against the float64 autograd reference (loss, components and every gradient)."""
import importlib
import math

import pytest
import torch

import moebert_kernels
from moebert_kernels import DistillationLoss, DistillOutput, distill_loss, distill_loss_reference
from moebert_kernels.ops.dispatch import backend_status
import _aot
from _oplog import OpLog

HAS_GPU = torch.cuda.is_available()
requires_gpu = pytest.mark.skipif(not HAS_GPU, reason="needs a CUDA device; none is present")
L, H = 13, 768  # BERT-base: embedding output + 12 layers, hidden 768


def _backends(device):
    out = []
    for b in ("torch", "triton", "cuda"):
        ok, why = backend_status("distill_loss", b, torch.device(device))
        out.append(pytest.param(b, marks=pytest.mark.skipif(not ok, reason=why)))
    return out


def _make(B=2, S=5, C=3, squad=False, labels=True, dtype=torch.float32, device="cpu", seed=0, n_layers=L):
    g = torch.Generator().manual_seed(seed)
    rnd = lambda *shape: torch.randn(*shape, generator=g).to(device=device, dtype=dtype)  # noqa: E731
    sh = [rnd(B, S, H).requires_grad_() for _ in range(n_layers)]
    # Teacher near the student, as in training: the MSE terms are then not dominated by one scale.
    th = [(h.detach() + 0.5 * rnd(B, S, H)) for h in sh]
    if squad:
        sl = tuple(rnd(B, S).mul(2).requires_grad_() for _ in range(2))
        tl = tuple(rnd(B, S).mul(2) for _ in range(2))
        y = (torch.randint(0, S, (B,), generator=g).to(device), torch.randint(0, S, (B,), generator=g).to(device))
        if B > 1:
            y[1][0] = -100  # an ignored position
    else:
        sl = rnd(B, C).mul(2).requires_grad_()
        tl = rnd(B, C).mul(2)
        if C == 1:
            y = rnd(B).float()
        else:
            y = torch.randint(0, C, (B,), generator=g).to(device)
            if B > 2:
                y[1] = -100
    mask = torch.ones(B, S, dtype=torch.long, device=device)
    mask[0, S // 2:] = 0
    if B > 1:
        mask[-1] = 0  # a row that is all padding
    return sh, th, sl, tl, (y if labels else None), mask


def _students(sh, sl):
    return list(sh) + (list(sl) if isinstance(sl, tuple) else [sl])


def _to64(x):
    if isinstance(x, tuple):
        return tuple(_to64(t) for t in x)
    return x.detach().double().requires_grad_(x.requires_grad)


def _rel(a, b):
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    return ((a - b).norm() / b.norm().clamp(min=1e-12)).item()


TOL = {torch.float32: (1e-5, 1e-5), torch.float16: (1e-5, 2e-3), torch.bfloat16: (1e-5, 1.5e-2)}  # (loss, grads)


def _check(backend, case, dtype, device, poison=None, grad_scale=2.5):
    kw = dict(case)
    shape = {k: kw.pop(k) for k in ("B", "C", "squad", "labels") if k in kw}
    sh, th, sl, tl, y, mask = _make(dtype=dtype, device=device, **shape)
    opts = {**dict(lam=0.7, alpha_ce=1.3, layer_weights=[0.5 + i / L for i in range(L)]), **kw}
    out = distill_loss(sh, th, sl, tl, y, mask, backend=backend, **opts)
    assert isinstance(out, DistillOutput)
    (out.loss * grad_scale).backward()  # grad_output != 1
    sh64, th64, sl64, tl64 = [_to64(t) for t in sh], [t.double() for t in th], _to64(sl), _to64(tl)
    ref = distill_loss_reference(sh64, th64, sl64, tl64, y, mask, **opts)
    (ref.loss * grad_scale).backward()
    tol_loss, tol_grad = TOL[dtype]
    for name in ("loss", "ce", "hidden_mse", "pred", "per_layer"):
        got, want = getattr(out, name), getattr(ref, name)
        assert torch.isfinite(got).all(), name
        if name != "loss":
            assert not got.requires_grad, f"{name} must be detached"
        assert _rel(got, want) < tol_loss or (got - want.to(got)).abs().max() < 1e-6, (name, _rel(got, want))
    for i, (a, b) in enumerate(zip(_students(sh, sl), _students(sh64, sl64))):
        assert a.grad is not None and a.grad.dtype == a.dtype, i
        assert torch.isfinite(a.grad).all(), f"gradient {i} holds NaN/inf (unwritten output?)"
        assert _rel(a.grad, b.grad) < tol_grad, (i, _rel(a.grad, b.grad))
    assert all(t.grad is None for t in th)
    return out, ref


CASES = [
    pytest.param(dict(C=3), id="C3-symkl"),
    pytest.param(dict(C=1, mask_padding=True), id="C1-regression-masked"),
    pytest.param(dict(C=2, pred_loss="kl", temperature=2.0, mask_padding=True), id="C2-kl-T2-masked"),
    pytest.param(dict(B=3, C=30522, temperature=1.5), id="C30522-symkl-T1.5-ignored"),
    pytest.param(dict(squad=True, mask_padding=True), id="squad-masked"),
    pytest.param(dict(C=3, pred_loss="mse", labels=False), id="C3-mse-nolabels"),
]


@pytest.fixture
def poison(monkeypatch):
    """Kernel outputs start as NaN, so an element a kernel forgets to write shows up."""
    def nan_like(t):
        return torch.full_like(t, float("nan"))

    try:
        import moebert_kernels.triton.distill_loss as tri
        monkeypatch.setattr(tri, "_empty_like", nan_like)
    except ImportError:
        pass
    try:
        import moebert_kernels.cuda.distill_loss as cu
        monkeypatch.setattr(cu, "_empty_like", nan_like)
    except ImportError:
        pass


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("backend", _backends("cpu"))
def test_matches_reference_cpu_fp32(backend, case, poison):
    _check(backend, case, torch.float32, "cpu")


@pytest.mark.parametrize("case", [CASES[0], CASES[3], CASES[4]])
@pytest.mark.parametrize("backend", _backends("cpu"))
def test_matches_reference_cpu_fp16(backend, case, poison):
    _check(backend, case, torch.float16, "cpu")


@requires_gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("backend", _backends("cuda"))
def test_matches_reference_gpu(backend, case, dtype, poison):
    _check(backend, case, dtype, "cuda")


@requires_gpu
@pytest.mark.parametrize("backend", _backends("cuda"))
def test_gpu_large_bf16(backend):
    """Sizes past one block per layer and per row tile (multi-program reduction)."""
    sh, th, sl, tl, y, mask = _make(B=8, S=128, C=30522, dtype=torch.bfloat16, device="cuda")
    out = distill_loss(sh, th, sl, tl, y, mask, backend=backend, mask_padding=True)
    out.loss.backward()
    sh64, sl64 = [_to64(t) for t in sh], _to64(sl)
    ref = distill_loss_reference(sh64, [t.double() for t in th], sl64, tl.double(), y, mask, mask_padding=True)
    ref.loss.backward()
    assert _rel(out.loss, ref.loss) < 1e-5
    for a, b in zip(sh + [sl], sh64 + [sl64]):
        assert _rel(a.grad, b.grad) < 1.5e-2


@pytest.mark.parametrize("backend", _backends("cpu"))
def test_all_padding_is_zero_not_nan(backend):
    sh, th, sl, tl, y, mask = _make(n_layers=2)
    mask.zero_()
    out = distill_loss(sh, th, sl, tl, y, mask, mask_padding=True, backend=backend)
    out.loss.backward()
    assert out.hidden_mse.item() == 0.0 and torch.equal(out.per_layer, torch.zeros(2))
    assert all(torch.equal(h.grad, torch.zeros_like(h)) for h in sh)
    assert torch.isfinite(out.loss) and torch.isfinite(sl.grad).all()


def test_mask_padding_default_matches_moebert():
    """Default: padding is inside the MSE (MoEBERT's nn.MSELoss); masking changes the value."""
    sh, th, sl, tl, y, mask = _make(n_layers=2)
    plain = distill_loss(sh, th, sl, tl, y, mask)
    moebert = sum(torch.nn.functional.mse_loss(a, b) for a, b in zip(sh, th))
    assert _rel(plain.hidden_mse, moebert) < 1e-6
    masked = distill_loss(sh, th, sl, tl, y, mask, mask_padding=True)
    keep = mask.bool()
    want = sum(((a - b)[keep] ** 2).mean() for a, b in zip(sh, th))
    assert _rel(masked.hidden_mse, want) < 1e-6 and abs(masked.hidden_mse - plain.hidden_mse) > 1e-3


def test_sym_kl_is_moebert_definition():
    """sym_kl = MoEBERT's symmetric_KL_loss(softmax(s), softmax(t)) / B = 0.5 * (KL(p||q) + KL(q||p)) / B."""
    sh, th, sl, tl, y, mask = _make(B=4, C=5, n_layers=1)
    out = distill_loss(sh, th, sl, tl, lam=1.0, alpha_ce=0.0)
    p, q = sl.detach().softmax(-1), tl.softmax(-1)
    want = 0.5 * ((p - q) * (p.log() - q.log())).sum() / 4
    assert _rel(out.pred, want) < 1e-6
    assert out.ce.item() == 0.0  # labels=None -> no CE term


@pytest.mark.parametrize("backend", _backends("cpu"))
def test_no_grad_path(backend):
    sh, th, sl, tl, y, mask = _make(n_layers=2)
    with torch.no_grad():
        out = distill_loss(sh, th, sl, tl, y, backend=backend)
    ref = distill_loss_reference(sh, th, sl, tl, y)
    assert not out.loss.requires_grad and _rel(out.loss, ref.loss) < 1e-6


@pytest.mark.parametrize("backend", _backends("cpu"))
def test_zero_and_negative_layer_weights_unit_grad(backend):
    """A zero weight (no gradient, but the layer's MSE is still reported), a negative one, and grad_output 1."""
    weights = [0.0, -0.5] + [1.0] * (L - 2)
    out, ref = _check(backend, dict(C=3, layer_weights=weights), torch.float32, "cpu", grad_scale=1.0)
    assert out.per_layer[0] > 0


@pytest.mark.parametrize("scale", [1.0, 2.5])
def test_backward_does_no_full_size_work(scale):
    """The gradients exist after the forward: backward must not zero-fill grads for the op's gradient outputs
    (autograd does unless told not to) and, with grad_output 1 on CPU, must not touch them at all."""
    sh, th, sl, tl, y, mask = _make(n_layers=3)
    out = distill_loss(sh, th, sl, tl, y)
    log = OpLog()
    with log:
        (out.loss * scale).backward()
    hidden_shape = tuple(sh[0].shape)
    full = [(name, shape) for name, shape in log.ops if shape == hidden_shape and not name.startswith("detach")]
    assert not [op for op in full if "zero" in op[0] or "fill" in op[0]], full
    if scale == 1.0:
        assert full == [], full
    else:
        assert {name for name, _ in full} == {"mul_.Tensor"} and len(full) == 3, full


@pytest.mark.parametrize("scale", [1.0, 2.5])
def test_repeated_backward_is_right_or_refused(scale):
    """Backward may hand out or scale the saved gradients in place; re-running the graph must then either raise
    or accumulate exactly the right gradient, never a wrong one. ``scale`` 1 takes the CPU no-scale path."""
    sh, th, sl, tl, y, mask = _make(n_layers=2)
    want = torch.autograd.grad(scale * distill_loss_reference(sh, th, sl, tl, y).loss, sh + [sl])
    out = distill_loss(sh, th, sl, tl, y)
    runs, refused = 0, False
    for _ in range(3):
        try:
            (out.loss * scale).backward(retain_graph=True)
        except RuntimeError as e:
            assert "modified by an inplace operation" in str(e)
            refused = True
            break
        runs += 1
        for t, w in zip(sh + [sl], want):
            assert _rel(t.grad, runs * w) < 1e-5
    assert runs >= 1 and (refused or runs == 3)

def test_module_matches_functional():
    sh, th, sl, tl, y, mask = _make(n_layers=3)
    mod = DistillationLoss(lam=0.5, alpha_ce=2.0, pred_loss="kl", temperature=3.0, layer_weights=[1, 2, 3],
                           mask_padding=True)
    got = mod(sh, th, sl, tl, y, mask)
    want = distill_loss_reference(sh, th, sl, tl, y, mask, lam=0.5, alpha_ce=2.0, pred_loss="kl", temperature=3.0,
                                  layer_weights=[1, 2, 3], mask_padding=True)
    assert _rel(got.loss, want.loss) < 1e-6
    assert "pred_loss='kl'" in repr(mod)
    assert moebert_kernels.DistillationLoss is DistillationLoss


@pytest.mark.parametrize("backend", _backends("cpu"))
def test_opcheck(backend):
    sh, th, sl, tl, y, mask = _make(B=2, S=3, C=4, n_layers=2)
    sh = [t.detach()[..., :16].contiguous().requires_grad_() for t in sh]
    th = [t[..., :16].contiguous() for t in th]
    args = (sh, th, [sl], [tl], [y], mask, [1.0, 0.5], 0.7, 1.3, "sym_kl", 1.0, backend, True)
    torch.library.opcheck(torch.ops.moebert.distill_loss_fwd.default, args)


def test_torch_compile_fullgraph():
    sh, th, sl, tl, y, mask = _make(n_layers=2)

    def f(sh, th, sl, tl, y, mask):
        return distill_loss(sh, th, sl, tl, y, mask, mask_padding=True, lam=0.3).loss

    got = torch.compile(f, backend="aot_eager", fullgraph=True)(sh, th, sl, tl, y, mask)
    (got * 2.5).backward()
    g_compiled = [t.grad.clone() for t in sh + [sl]]
    for t in sh + [sl]:
        t.grad = None
    want = distill_loss_reference(sh, th, sl, tl, y, mask, mask_padding=True, lam=0.3).loss
    (want * 2.5).backward()
    assert _rel(got, want) < 1e-6
    assert all(_rel(a, t.grad) < 1e-5 for a, t in zip(g_compiled, sh + [sl]))


# ---- bad input ----------------------------------------------------------------------------------

def _bad(**changes):
    sh, th, sl, tl, y, mask = _make(B=2, S=3, C=3, n_layers=2)
    args = dict(student_hidden=sh, teacher_hidden=th, student_logits=sl, teacher_logits=tl, labels=y,
                attention_mask=mask)
    args.update(changes)
    return args


@pytest.mark.parametrize("changes, exc, match", [
    (lambda a: dict(teacher_hidden=a["teacher_hidden"][:1]), ValueError, "teacher_hidden has 1"),
    (lambda a: dict(teacher_hidden=[a["teacher_hidden"][0], a["teacher_hidden"][1][:, :2]]), ValueError,
     "hidden state 1: student shape"),
    (lambda a: dict(teacher_logits=torch.randn(2, 4)), ValueError, "different class counts: 3 vs 4"),
    (lambda a: dict(labels=torch.tensor([0, 3])), ValueError, "labels out of range: got 3"),
    (lambda a: dict(labels=torch.tensor([-1, 0])), ValueError, "labels out of range: got -1"),
    (lambda a: dict(labels=torch.tensor([0, 1, 2])), ValueError, r"labels must be \[B\]"),
    (lambda a: dict(labels=torch.tensor([0.0, 1.0])), TypeError, "integer class ids"),
    (lambda a: dict(student_hidden=a["student_hidden"][0]), TypeError, "list or tuple of Tensors"),
    (lambda a: dict(teacher_hidden=[t.half() for t in a["teacher_hidden"]]), TypeError, "share one"),
    (lambda a: dict(student_logits=torch.randn(2, 3, 1)), ValueError, r"must be \[B, C\]"),
    (lambda a: dict(student_logits=(torch.randn(2, 3), torch.randn(2, 3))), ValueError, "both"),
], ids=["list-length", "shape", "class-count", "label-high", "label-negative", "label-shape", "label-dtype",
        "not-a-list", "dtype", "logits-rank", "squad-vs-class"])
def test_bad_input(changes, exc, match):
    args = _bad()
    args.update(changes(args))
    with pytest.raises(exc, match=match):
        distill_loss(**args)


def test_bad_options():
    args = _bad()
    with pytest.raises(ValueError, match="pred_loss must be one of"):
        distill_loss(**args, pred_loss="js")
    with pytest.raises(ValueError, match="temperature must be > 0"):
        distill_loss(**args, temperature=0.0)
    with pytest.raises(ValueError, match="layer_weights has 3 entries"):
        distill_loss(**args, layer_weights=[1, 1, 1])
    args.pop("attention_mask")
    with pytest.raises(ValueError, match="mask_padding=True needs attention_mask"):
        distill_loss(**args, mask_padding=True)
    with pytest.raises(ValueError, match="pred_loss must be one of"):
        DistillationLoss(pred_loss="JS")


def test_squad_label_range():
    sh, th, sl, tl, y, mask = _make(squad=True, n_layers=1)
    with pytest.raises(ValueError, match="end_positions out of range: got 5"):
        distill_loss(sh, th, sl, tl, (y[0], torch.tensor([0, 5])))
    with pytest.raises(TypeError, match="start_positions, end_positions"):
        distill_loss(sh, th, sl, tl, y[0])


def test_regression_pred_is_mse_whatever_pred_loss():
    sh, th, sl, tl, y, mask = _make(C=1, n_layers=1)
    a = distill_loss(sh, th, sl, tl, y, pred_loss="sym_kl").pred
    b = distill_loss(sh, th, sl, tl, y, pred_loss="kl", temperature=4.0).pred
    assert math.isclose(a.item(), b.item()) and math.isclose(a.item(), ((sl - tl) ** 2).mean().item(), rel_tol=1e-6)


@pytest.mark.parametrize("backend", _backends("cpu"))
def test_prediction_only_no_hidden_states(backend):
    """L = 0 hidden-state pairs: the CE and prediction terms alone (an empty list is a valid input)."""
    sh, th, sl, tl, y, mask = _make(C=4, n_layers=0)
    out = distill_loss([], [], sl, tl, y, backend=backend)
    (out.loss * 2.5).backward()
    sl64 = _to64(sl)
    ref = distill_loss_reference([], [], sl64, tl.double(), y)
    (ref.loss * 2.5).backward()
    assert out.per_layer.shape == (0,) and _rel(out.loss, ref.loss) < 1e-5 and _rel(sl.grad, sl64.grad) < 1e-5


@pytest.fixture
def host_copies(monkeypatch):
    """Records every tensor made from host data (torch.tensor, torch.as_tensor) and every CPU -> device copy.

    Python-level wrappers, not a dispatch mode: a mode does not see the ops inside a custom op's kernel.
    """
    seen = []

    def wrap(owner, name, check):
        real = getattr(owner, name)

        def spy(*args, **kwargs):
            out = real(*args, **kwargs)
            if check(args, out):
                seen.append(name)
            return out
        monkeypatch.setattr(owner, name, spy)

    wrap(torch, "tensor", lambda a, out: True)
    wrap(torch, "as_tensor", lambda a, out: not isinstance(a[0], torch.Tensor))
    wrap(torch.Tensor, "to", lambda a, out: a[0].device.type == "cpu" and out.device.type != "cpu")
    wrap(torch.Tensor, "copy_", lambda a, out: a[1].device.type == "cpu" and a[0].device.type != "cpu")
    return seen


@pytest.mark.parametrize("masked", [False, True], ids=["unmasked", "masked"])
def test_triton_second_call_copies_nothing_from_the_host(masked, host_copies):
    """Each call's constants depend only on shapes and loss weights: built once, not copied per call (a host
    sync on every step, and not CUDA-graph capturable)."""
    device = "cuda" if HAS_GPU else "cpu"
    ok, why = backend_status("distill_loss", "triton", torch.device(device))
    if not ok:
        pytest.skip(why)
    opts = dict(lam=0.7, alpha_ce=1.3, layer_weights=[0.5 + i / L for i in range(L)], mask_padding=masked)
    cache = getattr(importlib.import_module("moebert_kernels.ops.distill_loss"), "device_constant", None)
    if cache is not None:
        cache.cache_clear()  # so the first call below builds the constants
    for call in range(2):
        sh, th, sl, tl, y, mask = _make(device=device, seed=call)
        host_copies.clear()
        distill_loss(sh, th, sl, tl, y, mask, backend="triton", **opts).loss.backward()
        if call == 0:
            assert host_copies, "the first call builds its constants, yet the check saw none: it cannot fail"
    assert host_copies == [], f"the second call made tensors from host data: {host_copies}"


@requires_gpu
def test_triton_is_cuda_graph_capturable():
    """No host copy or sync per call, so a captured forward (gradients included) replays on new inputs.
    Without labels: their range check reads values on the host."""
    ok, why = backend_status("distill_loss", "triton", torch.device("cuda"))
    if not ok:
        pytest.skip(why)
    sh, th, sl, tl, _, mask = _make(B=4, S=16, C=3, labels=False, dtype=torch.bfloat16, device="cuda")

    def step():
        return distill_loss(sh, th, sl, tl, None, mask, backend="triton", mask_padding=True)

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):  # compiles the kernels and builds the constants outside the capture
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = step()
    g = torch.Generator().manual_seed(5)
    for t in th + [tl]:
        t.copy_(torch.randn(t.shape, generator=g).to(t))
    graph.replay()
    eager = step()
    torch.cuda.synchronize()
    for name in ("loss", "hidden_mse", "pred", "per_layer"):
        assert torch.equal(getattr(captured, name), getattr(eager, name)), name


# ---- compiled for sm_80 and sm_90 without a GPU: catches what the interpreter cannot ----------

# A fresh interpreter: with TRITON_INTERPRET=1 set at import, triton.jit hands back interpreter objects.
# Covers the pointer selects over the tuple arguments, the loop-carried online-softmax scalars and every
# constexpr branch, with the JIT's specializations (ints equal to 1 are constexpr).
_AOT_SCRIPT = r"""
from moebert_kernels.triton import distill_loss as D

n = 0
for arch in (90, 80):
    for dt, mask, grad, L in (("bf16", True, True, 13), ("fp32", False, False, 1), ("fp16", True, False, 2)):
        ptrs = ("*" + dt,) * L
        types = dict(S=ptrs, T=ptrs, G=ptrs, meta_ptr="*i64", mask_ptr="*fp32", inv_count_ptr="*fp32",
                     partial_ptr="*fp32", n_blocks="i32")
        extra = dict(n_blocks=1) if L == 1 else {}
        build(D._distill_hidden_fwd_kernel, types,
              dict(L=L, HAS_MASK=mask, COMPUTE_GRAD=grad, BLOCK=D.HIDDEN_BLOCK, **extra), 8, arch)
        n += 1
    for dt, pred, reg, labels, grad, block_c, one in (
            ("bf16", 0, False, True, True, D.MAX_BLOCK_C, False), ("fp16", 1, False, True, True, 16, True),
            ("fp32", 2, False, False, True, 64, False), ("bf16", 0, True, True, True, 16, True),
            ("fp32", 1, False, False, False, 1024, False)):
        ptrs = ("*" + dt,) * (1 if one else 2)
        types = dict(S=ptrs, T=ptrs, G=ptrs, labels_ptr="*fp32" if reg else "*i64", ce_norm_ptr="*fp32",
                     pred_norm_ptr="*fp32", row_ce_ptr="*fp32", row_pred_ptr="*fp32",
                     B="i32", C="i32", alpha_ce="fp32", lam="fp32", temperature="fp32")
        extra = dict(heads=len(ptrs), B=1) if one else dict(heads=len(ptrs))
        if reg:
            extra["C"] = 1
        build(D._distill_logits_fwd_kernel, types, dict(PRED=pred, IS_REG=reg, HAS_LABELS=labels, COMPUTE_GRAD=grad,
              BLOCK_C=block_c, **extra), 4 if block_c <= 1024 else 8, arch)
        n += 1
print(n, "compiled ok")
"""


@pytest.mark.skipif(HAS_GPU, reason="on a GPU the real JIT compiles these kernels in the other tests")
@pytest.mark.skipif(not _aot.have_ptxas(), reason="triton (with its NVIDIA backend and ptxas) is not installed")
def test_triton_kernels_compile_for_sm80_and_sm90():
    res = _aot.run(_AOT_SCRIPT)
    assert res.returncode == 0 and res.stdout.strip().endswith("compiled ok"), res.stderr[-4000:]
