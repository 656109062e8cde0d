"""Distillation loss, forward + backward: the fused op against eager PyTorch and torch.compile of it.

Each benchmark group is one problem (hidden states L x [B, S, H], logits, dtype), so one table compares:

- ``eager``        ``distill_loss_reference``: the loss as MoEBERT computes it under AMP (math in fp32);
- ``eager_native`` the same loss written with the input dtype kept (``F.mse_loss`` on bf16 directly, no
                   fp32 copies): the cheapest eager form, less accurate;
- ``compile``      ``torch.compile`` of ``eager`` (compile time excluded: warm-up runs first);
- ``torch`` / ``triton`` / ``cuda``: ``moebert_kernels.distill_loss(..., backend=...)``, which computes the
                   student gradients in the forward and only scales them in the backward.

Every round clears the student ``.grad`` first, so the timed work and the peak memory include making the
gradients. On CUDA, ``extra_info["peak_extra_mib"]`` is the peak memory above what was allocated before the
call (inputs), and ``peak_vs_eager`` its ratio to ``eager``'s on the same problem.

GPU (bf16): 13 x [32, 128, 768] with 3 classes and the SQuAD (start, end) pair over 128 positions.
CPU (fp32, 2 threads): 13 x [4, 64, 768], 3 classes; ``compile`` only with ``MOEBERT_BENCH_FULL=1``
(Inductor's CPU compile takes minutes on 2 cores); ``triton`` is skipped (the interpreter is a
correctness tool).
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from _timing import bench_device, bench_dtype, full_matrix
from moebert_kernels.ops import backend_status, distill_loss, distill_loss_reference

DEVICE = bench_device()
DTYPE = bench_dtype(DEVICE)
L, H = 13, 768
if DEVICE.type == "cuda":
    PROBLEMS = [(32, 128, 3), (32, 128, "squad")]
else:
    PROBLEMS = [(4, 64, 3)]
IMPLS = ["eager", "eager_native", "torch", "triton", "cuda", "compile"]  # compile last: a cold Inductor compile may hit a time cap


def _inputs(B, S, C):
    g = torch.Generator(device=DEVICE).manual_seed(0)
    rnd = lambda *shape: torch.randn(*shape, generator=g, device=DEVICE).to(DTYPE)  # noqa: E731
    sh = [rnd(B, S, H).requires_grad_() for _ in range(L)]
    th = [rnd(B, S, H) for _ in range(L)]
    if C == "squad":
        sl = (rnd(B, S).requires_grad_(), rnd(B, S).requires_grad_())
        tl = (rnd(B, S), rnd(B, S))
        y = (torch.randint(0, S, (B,), device=DEVICE, generator=g), torch.randint(0, S, (B,), device=DEVICE, generator=g))
    else:
        sl, tl = rnd(B, C).requires_grad_(), rnd(B, C)
        y = torch.randint(0, C, (B,), device=DEVICE, generator=g)
    return sh, th, sl, tl, y


def _sym_kl(s, t):
    p, q = F.softmax(s, -1, dtype=torch.float32), F.softmax(t, -1, dtype=torch.float32)
    return 0.5 * ((p - q) * (p.log() - q.log())).sum() / s.shape[0]


def eager_native(sh, th, sl, tl, y):
    """MoEBERT's get_distillation_loss + CE, without AMP's fp32 casts of the MSE inputs."""
    hidden = sum(F.mse_loss(a, b) for a, b in zip(sh, th))
    heads = list(sl) if isinstance(sl, tuple) else [sl]
    theads = list(tl) if isinstance(tl, tuple) else [tl]
    ys = list(y) if isinstance(y, tuple) else [y]
    pred = sum(_sym_kl(s, t) for s, t in zip(heads, theads)) / len(heads)
    ce = sum(F.cross_entropy(s.float(), yy) for s, yy in zip(heads, ys)) / len(heads)
    return ce + hidden + pred


def _make_fn(impl, sh, th, sl, tl, y):
    students = sh + (list(sl) if isinstance(sl, tuple) else [sl])
    if impl == "eager":
        loss_fn = lambda: distill_loss_reference(sh, th, sl, tl, y).loss  # noqa: E731
    elif impl == "eager_native":
        loss_fn = lambda: eager_native(sh, th, sl, tl, y)  # noqa: E731
    elif impl == "compile":
        compiled = torch.compile(lambda a, b, c, d, e: distill_loss_reference(a, b, c, d, e).loss)
        loss_fn = lambda: compiled(sh, th, sl, tl, y)  # noqa: E731
    else:
        loss_fn = lambda: distill_loss(sh, th, sl, tl, y, backend=impl).loss  # noqa: E731

    def step():
        for t in students:
            t.grad = None
        loss_fn().backward()

    return step


def _peak_extra_mib(fn, students) -> float:
    for t in students:  # fn clears them first: measured from a base that still held them, the peak reads low
        t.grad = None
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


_EAGER_PEAK: dict = {}


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("problem", PROBLEMS, ids=lambda p: f"B{p[0]}-S{p[1]}-C{p[2]}")
def test_distill_loss_fwd_bwd(bench, impl, problem):
    B, S, C = problem
    if impl in ("torch", "triton", "cuda"):
        ok, why = backend_status("distill_loss", impl, DEVICE)
        if not ok:
            pytest.skip(why)
        if impl == "triton" and DEVICE.type == "cpu":
            pytest.skip("triton on CPU is the interpreter, a correctness tool; nothing to time")
    if impl == "compile" and DEVICE.type == "cpu" and not full_matrix():
        pytest.skip("Inductor's CPU compile takes minutes on 2 cores; set MOEBERT_BENCH_FULL=1")
    sh, th, sl, tl, y = _inputs(B, S, C)
    bench.benchmark.group = f"distill_loss fwd+bwd {L}x[{B},{S},{H}] C={C} {str(DTYPE).replace('torch.', '')}"
    fn = _make_fn(impl, sh, th, sl, tl, y)
    students = sh + (list(sl) if isinstance(sl, tuple) else [sl])
    info = dict(impl=impl, L=L, B=B, S=S, H=H, C=C, dtype=str(DTYPE).replace("torch.", ""), mode="fwd+bwd")
    if DEVICE.type == "cuda":
        for _ in range(3):  # warm-up: compile, autotune, allocator
            fn()
        key = (B, S, C)
        if key not in _EAGER_PEAK:
            ref = _make_fn("eager", sh, th, sl, tl, y)
            ref()
            _EAGER_PEAK[key] = _peak_extra_mib(ref, students)
        peak = _peak_extra_mib(fn, students)
        info.update(peak_extra_mib=round(peak, 1), eager_peak_extra_mib=round(_EAGER_PEAK[key], 1),
                    peak_vs_eager=round(peak / _EAGER_PEAK[key], 3))
    bench.run(fn, warmup=3, **info)
