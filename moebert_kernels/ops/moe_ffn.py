"""moe_ffn: a top-1 routed expert FFN, y_t = g_t * (W2[e_t] act(W1[e_t] x_t + b1[e_t]) + b2[e_t]).

Layout (the ``torch.nn.Linear`` convention, stacked over experts):
    x  [T, d]       w1 [E, h, d]    b1 [E, h] or None
    y  [T, d_out]   w2 [E, d_out, h] b2 [E, d_out] or None    gate [T] or None

Gated activations (``GATED_ACTIVATIONS``, e.g. ModernBERT's ``"geglu"``): w1 is ``[E, 2h, d]``
(b1 ``[E, 2h]``); its first h rows give a, the last h give g, and the down projection
takes act(a) * g. Optional features a backend must declare to be chosen: ``"gated"``,
``"no_bias"`` (b1 or b2 None).

Tied shared expert (optional, feature ``"shared"``): ``shared_w1 [s, d]`` (``[2s, d]`` gated),
``shared_b1 [s]`` (``[2s]``; None exactly when b1 is), ``shared_w2 [d_out, s]`` run on every token,
y_t = g_t * (W2s act(W1s x_t + b1s) + W2[e_t] act(W1[e_t] x_t + b1[e_t]) + b2[e_t]).
The shared part is a dense GEMM pair over all T rows (torch matmul, i.e. MKL/oneDNN or cuBLAS,
for every backend); a backend that declares ``"shared"`` takes its product in token order
(``shared_out``) and adds it in the epilogue of its routed down projection, and in the
backward adds the shared part's dx (``shared_dx``) where it scatters its own dx.

Dataflow: ``moe_ffn`` validates, picks a backend once (``dispatch.select_backend``)
and calls ``torch.ops.moebert.moe_ffn_fwd``; autograd calls
``torch.ops.moebert.moe_ffn_bwd``. Both ops forward to the chosen backend's
``moe_ffn_forward`` / ``moe_ffn_backward``; this file holds the ``torch`` backend,
which is also the reference every other backend is tested against.

A backend may return the GEMM1 pre-activation (expert order, ``[T, h]``) from the
forward so that the backward need not recompute it; it declares this with
``SAVES_HIDDEN``; the torch backend does, and recomputes only when it gets none.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from .dispatch import add_features, get_impl, register_impl, select_backend
from .routing import RoutingPlan

__all__ = ["moe_ffn", "moe_ffn_reference", "ACTIVATIONS", "GATED_ACTIVATIONS", "check_moe_ffn_inputs"]

# gated name -> the activation applied to a in act(a) * g
GATED_ACTIVATIONS = {"geglu": "gelu", "geglu_tanh": "gelu_tanh", "reglu": "relu"}
ACTIVATIONS = ("gelu", "gelu_tanh", "relu", *GATED_ACTIVATIONS)
register_impl("moe_ffn", "torch", __name__)
register_impl("moe_ffn", "triton", "moebert_kernels.triton.moe_ffn")
register_impl("moe_ffn", "cuda", "moebert_kernels.cuda.moe_ffn")
# Every backend implements the shared expert, gated experts and absent biases.
for _backend in ("torch", "triton", "cuda"):
    add_features("moe_ffn", _backend, ("shared", "gated", "no_bias"))


def needed_features(b1: Optional[Tensor], b2: Optional[Tensor], activation: str) -> tuple[str, ...]:
    """The optional features of ``moe_ffn`` one call needs (see the module docstring)."""
    return (("gated",) if activation in GATED_ACTIVATIONS else ()) + \
        (("no_bias",) if b1 is None or b2 is None else ())


def activate(h: Tensor, activation: str) -> Tensor:
    """act(h) of the pre-activation; gated: act(a) * g with a, g the two halves of h's last dim."""
    if activation in GATED_ACTIVATIONS:
        a, g = h.chunk(2, dim=-1)
        return activate(a, GATED_ACTIVATIONS[activation]) * g
    if activation == "gelu":
        return F.gelu(h)  # exact erf form, as BERT uses
    if activation == "gelu_tanh":
        return F.gelu(h, approximate="tanh")
    if activation == "relu":
        return F.relu(h)
    raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")


def moe_ffn_reference(
    x: Tensor,
    sorted_token_ids: Tensor,
    expert_offsets: Tensor,
    w1: Tensor,
    b1: Optional[Tensor],
    w2: Tensor,
    b2: Optional[Tensor],
    gate: Optional[Tensor] = None,
    activation: str = "gelu",
    shared_w1: Optional[Tensor] = None,
    shared_b1: Optional[Tensor] = None,
    shared_w2: Optional[Tensor] = None,
) -> Tensor:
    """Plain-PyTorch oracle, differentiable. Reads the offsets on the host (one sync on CUDA)."""
    T, E, d_out = x.shape[0], w1.shape[0], w2.shape[1]
    xs = x.index_select(0, sorted_token_ids)
    bounds = expert_offsets.tolist()
    pieces = []
    for e in range(E):
        lo, hi = bounds[e], bounds[e + 1]
        if lo == hi:
            continue
        h = _affine(xs[lo:hi], w1[e], None if b1 is None else b1[e])
        pieces.append(_affine(activate(h, activation), w2[e], None if b2 is None else b2[e]))
    y_sorted = torch.cat(pieces) if pieces else x.new_empty(0, d_out)
    y = torch.index_copy(x.new_zeros(T, d_out), 0, sorted_token_ids, y_sorted)
    if shared_w1 is not None:
        y = y + activate(_affine(x, shared_w1, shared_b1), activation) @ shared_w2.t()
    if gate is not None:
        y = y * gate.to(y.dtype).unsqueeze(-1)
    return y


def _affine(x: Tensor, w: Tensor, b: Optional[Tensor], out: Optional[Tensor] = None) -> Tensor:
    """x @ w^T (+ b): 2-D operands, or a padded batch ([E, n, k] x [E, m, k], b [E, m])."""
    if x.dim() == 3:
        if b is None:
            return torch.bmm(x, w.transpose(1, 2), out=out)
        return torch.baddbmm(b.unsqueeze(1), x, w.transpose(1, 2), out=out)
    if b is None:
        return torch.mm(x, w.t(), out=out)
    return torch.addmm(b, x, w.t(), out=out)


# ---- torch backend: plain PyTorch behind the backend contract -------------------------
#
# Works in expert order. On CPU with several threads the E per-expert GEMMs become one
# padded ``baddbmm`` each: every parallel region costs an OpenMP fork/join, and at small T
# those joins cost more than the padding (BENCHMARKS.md, T=128: with 2 threads padded beats the
# loop in every run, with 1 thread the loop ties or wins). One thread or skewed routing keeps
# the per-expert loop.

SAVES_HIDDEN = True


class _Segments:
    """Expert-order rows, either as E slices (loop) or as one zero-padded [E, cap, k] batch."""

    def __init__(self, x: Tensor, expert_offsets: Tensor, E: int):
        T = x.shape[0]
        self.E, self.bounds = E, expert_offsets.tolist()
        cap = max(b - a for a, b in zip(self.bounds, self.bounds[1:])) if T else 0
        self.padded = (x.device.type == "cpu" and torch.get_num_threads() > 1 and E > 1 and T > 0
                       and E * cap <= 2 * T)
        if self.padded:
            counts = expert_offsets[1:] - expert_offsets[:-1]
            e_sorted = torch.repeat_interleave(torch.arange(E, device=x.device), counts, output_size=T)
            self.cap = cap
            self.dest = e_sorted * cap + (torch.arange(T, device=x.device) - expert_offsets.index_select(0, e_sorted))

    def token_maps(self, sorted_token_ids: Tensor) -> tuple[Tensor, Tensor]:
        """``(src, pos)``: the token each padded row reads (padding rows re-read token 0: finite, then dropped)
        and the padded row holding each token, so the forward gathers in and out with one index_select each."""
        src = sorted_token_ids.new_zeros(self.E * self.cap).index_copy_(0, self.dest, sorted_token_ids)
        pos = torch.empty_like(self.dest).index_copy_(0, sorted_token_ids, self.dest)
        return src, pos

    def pad(self, rows: Tensor) -> Tensor:
        out = rows.new_zeros(self.E * self.cap, *rows.shape[1:]).index_copy_(0, self.dest, rows)
        return out.view(self.E, self.cap, *rows.shape[1:])

    def unpad(self, p: Tensor) -> Tensor:
        return p.reshape(self.E * self.cap, *p.shape[2:]).index_select(0, self.dest)


def moe_ffn_forward(x, sorted_token_ids, expert_offsets, w1, b1, w2, b2, gate, activation, save_hidden,
                    shared_out=None):
    """``shared_out [T, d_out]`` (token order, or None): the shared expert's product, added before the gate;
    the op layer hands over a buffer of its own, which may be returned as the output."""
    T, E, h, d_out = x.shape[0], w1.shape[0], w1.shape[1], w2.shape[1]
    seg = _Segments(x, expert_offsets, E)
    if seg.padded:
        src, pos = seg.token_maps(sorted_token_ids)
        xp = x.index_select(0, src).view(E, seg.cap, -1)
        hp = _affine(xp, w1, b1)
        yp = _affine(activate(hp, activation), w2, b2)
        out = yp.view(E * seg.cap, d_out).index_select(0, pos)
        if shared_out is not None:
            out.add_(shared_out)
        if gate is not None:
            out.mul_(gate.to(out.dtype).unsqueeze(-1))
        return out, (seg.unpad(hp) if save_hidden else x.new_empty(0))
    # Per-expert GEMMs write into expert-order buffers, so the activation is one call over all rows.
    xs = x.index_select(0, sorted_token_ids)
    hs, ys = x.new_empty(T, h), x.new_empty(T, d_out)
    for e in range(E):
        lo, hi = seg.bounds[e], seg.bounds[e + 1]
        if lo < hi:
            _affine(xs[lo:hi], w1[e], None if b1 is None else b1[e], out=hs[lo:hi])
    a = activate(hs, activation)
    for e in range(E):
        lo, hi = seg.bounds[e], seg.bounds[e + 1]
        if lo < hi:
            _affine(a[lo:hi], w2[e], None if b2 is None else b2[e], out=ys[lo:hi])
    hidden = hs if save_hidden else x.new_empty(0)
    if shared_out is not None:  # the op layer's own buffer: the routed rows are added into it in place
        out = shared_out.index_add_(0, sorted_token_ids, ys)
        return (out if gate is None else out.mul_(gate.to(out.dtype).unsqueeze(-1))), hidden
    if gate is not None:
        ys.mul_(gate.index_select(0, sorted_token_ids).to(ys.dtype).unsqueeze(-1))
    return torch.index_copy(x.new_empty(T, d_out), 0, sorted_token_ids, ys), hidden


def activation_backward(grad: Tensor, h: Tensor, activation: str) -> Tensor:
    """d act(h) / dh applied to ``grad`` (gated: the grads of a and g, concatenated like h)."""
    if activation in GATED_ACTIVATIONS:
        a, g = h.chunk(2, dim=-1)
        base = GATED_ACTIVATIONS[activation]
        return torch.cat([activation_backward(grad * g, a, base), grad * activate(a, base)], dim=-1)
    if activation == "gelu":
        return torch.ops.aten.gelu_backward(grad, h, approximate="none")
    if activation == "gelu_tanh":
        return torch.ops.aten.gelu_backward(grad, h, approximate="tanh")
    return grad * (h > 0).to(grad.dtype)


def _expert_backward(xs, hs, go, gs, w1, b1, w2, b2, activation, bmm: bool):
    """Grads of one expert (2-D operands) or of all experts at once (padded 3-D operands)."""
    mm = torch.bmm if bmm else torch.mm
    tr = (lambda t: t.transpose(1, 2)) if bmm else (lambda t: t.t())
    if hs is None:
        hs = _affine(xs, w1, b1)
    a = activate(hs, activation)
    dgs = None
    dy = go
    if gs is not None:
        dgs = (go * _affine(a, w2, b2)).sum(-1)
        dy = go * gs.unsqueeze(-1)
    dw2 = mm(tr(dy), a)
    db2 = dy.sum(-2) if b2 is not None else None
    dh = activation_backward(mm(dy, w2), hs, activation)
    dw1 = mm(tr(dh), xs)
    db1 = dh.sum(-2) if b1 is not None else None
    return mm(dh, w1), dw1, db1, dw2, db2, dgs


def moe_ffn_backward(grad_out, x, sorted_token_ids, expert_offsets, w1, b1, w2, b2, gate, hidden, activation,
                     needs_grad, shared_dx=None):
    """``shared_dx [T, d]`` (token order, or None): the shared expert's dx, added to the routed one; the op
    layer hands over a buffer of its own, which may be returned as dx."""
    # Analytic: custom-op bodies run below autograd, so autograd.grad cannot be used here.
    T, E = x.shape[0], w1.shape[0]
    seg = _Segments(x, expert_offsets, E)
    xs = x.index_select(0, sorted_token_ids)
    go = grad_out.index_select(0, sorted_token_ids).to(x.dtype)
    gs = gate.index_select(0, sorted_token_ids).to(x.dtype) if gate is not None else None
    hs = hidden if hidden.numel() else None
    if seg.padded:
        pad = seg.pad
        dxs, dw1, db1, dw2, db2, dgs = _expert_backward(
            pad(xs), None if hs is None else pad(hs), pad(go), None if gs is None else pad(gs),
            w1, b1, w2, b2, activation, bmm=True)
        dxs, dgs = seg.unpad(dxs), (None if dgs is None else seg.unpad(dgs))
    else:
        dxs, dgs = torch.zeros_like(xs), (x.new_zeros(T) if gs is not None else None)
        dw1, db1, dw2, db2 = (None if t is None else torch.zeros_like(t) for t in (w1, b1, w2, b2))
        for e in range(E):
            lo, hi = seg.bounds[e], seg.bounds[e + 1]
            if lo == hi:
                continue
            r = _expert_backward(xs[lo:hi], None if hs is None else hs[lo:hi], go[lo:hi],
                                 None if gs is None else gs[lo:hi], w1[e], None if b1 is None else b1[e], w2[e],
                                 None if b2 is None else b2[e], activation, bmm=False)
            dxs[lo:hi], dw1[e], dw2[e] = r[0], r[1], r[3]
            if db1 is not None:
                db1[e] = r[2]
            if db2 is not None:
                db2[e] = r[4]
            if dgs is not None:
                dgs[lo:hi] = r[5]
    if shared_dx is None:
        dx = torch.index_copy(torch.zeros_like(x), 0, sorted_token_ids, dxs)
    else:
        dx = shared_dx.index_add_(0, sorted_token_ids, dxs)
    if gate is None:
        dgate = x.new_empty(0)
    else:
        dgate = torch.index_copy(x.new_zeros(T), 0, sorted_token_ids, dgs).to(gate.dtype)
    none = x.new_empty  # the grad slot of an absent bias (one tensor each: outputs may not alias)
    return dx, dw1, none(0) if db1 is None else db1, dw2, none(0) if db2 is None else db2, dgate


# ---- the shared expert: dense over every token, the same for every backend ---------------

def _shared_forward(x, w1s, b1s, w2s, activation):
    """(pre-activation [T, s], product W2s act(W1s x + b1s) [T, d_out]), token order."""
    hs = _affine(x, w1s, b1s)
    return hs, torch.mm(activate(hs, activation), w2s.t())


def _shared_backward(go, x, gate, w1s, b1s, w2s, hs, activation, needs):
    """(dx, dW1s, db1s, dW2s, dgate) of the shared FFN for ``needs`` = (x, w1s, b1s, w2s, gate); unneeded ones None.

    The gate scales the shared product: dgate = rowsum(G * W2s a) = rowsum((G W2s) * a), so the product
    itself need not be kept.
    """
    n_x, n_w1, n_b1, n_w2, n_g = needs
    if hs is None:
        hs = _affine(x, w1s, b1s)
    a = activate(hs, activation)
    g = None if gate is None else gate.to(x.dtype).unsqueeze(-1)
    dx = dw1 = db1 = dw2 = dgate = None
    if n_w2:
        dw2 = torch.mm(go.t(), a if g is None else a * g)
    if n_x or n_w1 or n_b1 or n_g:
        p = torch.mm(go, w2s)
        if n_g:
            dgate = (p * a).sum(-1)
        if n_x or n_w1 or n_b1:
            dh = activation_backward(p if g is None else p * g, hs, activation)
            dx = torch.mm(dh, w1s) if n_x else None
            dw1 = torch.mm(dh.t(), x) if n_w1 else None
            db1 = dh.sum(0) if n_b1 and b1s is not None else None
    return dx, dw1, db1, dw2, dgate


# ---- torch.library registration ---------------------------------------------------------

@torch.library.custom_op("moebert::moe_ffn_fwd", mutates_args=())
def _moe_ffn_fwd(
    x: Tensor,
    sorted_token_ids: Tensor,
    expert_offsets: Tensor,
    w1: Tensor,
    b1: Optional[Tensor],
    w2: Tensor,
    b2: Optional[Tensor],
    gate: Optional[Tensor],
    activation: str,
    backend: str,
    save_hidden: bool,
    shared_w1: Optional[Tensor] = None,
    shared_b1: Optional[Tensor] = None,
    shared_w2: Optional[Tensor] = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """(out, routed pre-activation or empty, shared pre-activation [T, s] token order or empty)."""
    impl = get_impl("moe_ffn", backend)
    args = (x, sorted_token_ids, expert_offsets, w1, b1, w2, b2, gate, activation, save_hidden)
    if shared_w1 is None:
        return (*impl.moe_ffn_forward(*args), x.new_empty(0))
    hs, shared_out = _shared_forward(x, shared_w1, shared_b1, shared_w2, activation)
    out, hidden = impl.moe_ffn_forward(*args, shared_out=shared_out)
    return out, hidden, (hs if save_hidden else x.new_empty(0))


@_moe_ffn_fwd.register_fake
def _(x, sorted_token_ids, expert_offsets, w1, b1, w2, b2, gate, activation, backend, save_hidden, shared_w1=None,
      shared_b1=None, shared_w2=None):
    out = x.new_empty(x.shape[0], w2.shape[1])
    saves = save_hidden and getattr(get_impl("moe_ffn", backend), "SAVES_HIDDEN", False)
    hidden = x.new_empty(x.shape[0], w1.shape[1]) if saves else x.new_empty(0)
    shared_saved = save_hidden and shared_w1 is not None
    shared_hidden = x.new_empty(x.shape[0], shared_w1.shape[0]) if shared_saved else x.new_empty(0)
    return out, hidden, shared_hidden


@torch.library.custom_op("moebert::moe_ffn_bwd", mutates_args=())
def _moe_ffn_bwd(
    grad_out: Tensor,
    x: Tensor,
    sorted_token_ids: Tensor,
    expert_offsets: Tensor,
    w1: Tensor,
    b1: Optional[Tensor],
    w2: Tensor,
    b2: Optional[Tensor],
    gate: Optional[Tensor],
    hidden: Tensor,
    activation: str,
    backend: str,
    needs_grad: Sequence[bool],
    shared_w1: Optional[Tensor] = None,
    shared_b1: Optional[Tensor] = None,
    shared_w2: Optional[Tensor] = None,
    shared_hidden: Optional[Tensor] = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(dx, dw1, db1, dw2, db2, dgate, dshared_w1, dshared_b1, dshared_w2); the last three empty without a
    shared expert. ``needs_grad``: 6 flags, 9 with a shared expert."""
    needs = list(needs_grad)
    grad_out = grad_out.contiguous()
    impl = get_impl("moe_ffn", backend)
    args = (grad_out, x, sorted_token_ids, expert_offsets, w1, b1, w2, b2, gate, hidden, activation, needs[:6])
    if shared_w1 is None:
        grads = (*impl.moe_ffn_backward(*args), *(x.new_empty(0) for _ in range(3)))
    else:
        if len(needs) != 9:
            raise ValueError(f"needs_grad must hold 9 flags with a shared expert, got {len(needs)}")
        saved = shared_hidden if shared_hidden is not None and shared_hidden.numel() else None
        sdx, sdw1, sdb1, sdw2, sdgate = _shared_backward(
            grad_out.to(x.dtype), x, gate, shared_w1, shared_b1, shared_w2, saved, activation,
            (needs[0], needs[6], needs[7], needs[8], needs[5] and gate is not None))
        dx, dw1, db1, dw2, db2, dgate = impl.moe_ffn_backward(*args, shared_dx=sdx)
        if sdgate is not None:
            dgate = (dgate.to(sdgate.dtype) + sdgate).to(gate.dtype)
        grads = (dx, dw1, db1, dw2, db2, dgate, *(x.new_empty(0) if g is None else g for g in (sdw1, sdb1, sdw2)))
    # custom_op outputs may not alias inputs; a backend may hand back e.g. a zero grad view.
    inputs = (grad_out, x, w1, b1, w2, b2, gate, hidden, shared_w1, shared_b1, shared_w2, shared_hidden)
    return tuple(g.clone() if _aliases(g, inputs) else g for g in grads)


def _aliases(t: Tensor, others) -> bool:
    return any(o is not None and o.numel() and t.numel() and t.untyped_storage().data_ptr() ==
               o.untyped_storage().data_ptr() for o in others)


@_moe_ffn_bwd.register_fake
def _(grad_out, x, sorted_token_ids, expert_offsets, w1, b1, w2, b2, gate, hidden, activation, backend, needs_grad,
      shared_w1=None, shared_b1=None, shared_w2=None, shared_hidden=None):
    dgate = torch.empty_like(gate) if gate is not None else x.new_empty(0)
    if shared_w1 is None:
        shared = tuple(x.new_empty(0) for _ in range(3))
    else:
        shared = tuple(torch.empty_like(t) if need else x.new_empty(0)
                       for t, need in zip((shared_w1, shared_b1, shared_w2), list(needs_grad)[6:9]))
    bias_grad = lambda b: torch.empty_like(b) if b is not None else x.new_empty(0)  # noqa: E731
    return (torch.empty_like(x), torch.empty_like(w1), bias_grad(b1), torch.empty_like(w2), bias_grad(b2), dgate,
            *shared)


def _setup_context(ctx, inputs, output):
    x, sorted_token_ids, expert_offsets, w1, b1, w2, b2, gate, activation, backend, _ = inputs[:11]
    shared = tuple(inputs[11:14]) if len(inputs) > 11 else (None, None, None)
    ctx.activation, ctx.backend = activation, backend
    ctx.num_inputs = len(inputs)
    # The saved pre-activations are outputs only to be kept; without this autograd would zero-fill [T, h] and
    # [T, s] grads for them in every backward.
    ctx.set_materialize_grads(False)
    ctx.has_gate = gate is not None
    ctx.has_shared = shared[0] is not None
    saved = [x, sorted_token_ids, expert_offsets, w1, b1, w2, b2, output[1]]
    if ctx.has_shared:
        saved += [*shared, output[2]]
    if gate is not None:
        saved.append(gate)
    ctx.save_for_backward(*saved)


def _backward(ctx, grad_out, _grad_hidden, _grad_shared_hidden):
    x, sorted_token_ids, expert_offsets, w1, b1, w2, b2, hidden, *rest = ctx.saved_tensors
    shared = rest[:4] if ctx.has_shared else ()
    gate = rest[-1] if ctx.has_gate else None
    if grad_out is None:  # the output took no part in the loss
        return (None,) * ctx.num_inputs
    nd = ctx.needs_input_grad
    needs = [nd[0], nd[3], nd[4], nd[5], nd[6], nd[7] and ctx.has_gate]
    if ctx.has_shared:
        needs += [nd[11], nd[12], nd[13]]
    dx, dw1, db1, dw2, db2, dgate, dw1s, db1s, dw2s = torch.ops.moebert.moe_ffn_bwd(
        grad_out, x, sorted_token_ids, expert_offsets, w1, b1, w2, b2, gate, hidden, ctx.activation, ctx.backend,
        needs, *shared,
    )
    pick = lambda i, g: g if i < len(needs) and needs[i] else None  # noqa: E731
    grads = (pick(0, dx), None, None, pick(1, dw1), pick(2, db1), pick(3, dw2), pick(4, db2), pick(5, dgate),
             None, None, None, pick(6, dw1s), pick(7, db1s), pick(8, dw2s))
    return grads[:ctx.num_inputs]


_moe_ffn_fwd.register_autograd(_backward, setup_context=_setup_context)


# ---- public entry point -----------------------------------------------------------------

def check_moe_ffn_inputs(x, plan, w1, b1, w2, b2, gate=None, activation="gelu", shared_w1=None, shared_b1=None,
                         shared_w2=None) -> None:
    """Raise TypeError/ValueError naming the first problem; touches nothing."""
    named = {"x": x, "w1": w1, "w2": w2}
    for name, t in (("b1", b1), ("b2", b2), ("gate", gate)):
        if t is not None:
            named[name] = t
    given = [k for k, v in (("shared_w1", shared_w1), ("shared_b1", shared_b1), ("shared_w2", shared_w2))
             if v is not None]
    if given and (shared_w1 is None or shared_w2 is None):
        raise ValueError(f"a shared expert needs shared_w1 and shared_w2 together; got only {given}")
    if shared_w1 is not None:
        if (shared_b1 is None) != (b1 is None):
            raise ValueError("shared_b1 must be given exactly when b1 is: the shared expert has biases like the "
                             f"routed ones (b1 is {'None' if b1 is None else 'given'}, shared_b1 is "
                             f"{'None' if shared_b1 is None else 'given'})")
        named.update({"shared_w1": shared_w1, "shared_w2": shared_w2})
        if shared_b1 is not None:
            named["shared_b1"] = shared_b1
    for name, t in named.items():
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if not t.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor, got {t.dtype}")
    if not isinstance(plan, RoutingPlan):
        raise TypeError(f"plan must be a RoutingPlan, got {type(plan).__name__}")
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
    if x.dim() != 2:
        raise ValueError(f"x must be [T, d], got shape {tuple(x.shape)}")
    if w1.dim() != 3 or w2.dim() != 3:
        raise ValueError(f"w1 must be [E, h, d] and w2 [E, d_out, h]; got {tuple(w1.shape)} and {tuple(w2.shape)}")
    T, d = x.shape
    E, h_up, d_in = w1.shape
    gated = activation in GATED_ACTIVATIONS
    if d_in != d:
        raise ValueError(f"w1 is [E, h, d] = {tuple(w1.shape)} but x has d={d}")
    if gated and h_up % 2:
        raise ValueError(f"a gated activation ({activation!r}) needs w1 [E, 2h, d] (a rows, then g rows); "
                         f"got {tuple(w1.shape)} with an odd row count")
    h = h_up // 2 if gated else h_up
    if w2.shape[0] != E or w2.shape[2] != h:
        raise ValueError(f"w2 must be [E={E}, d_out, h={h}]" + (f" (w1 holds 2h={h_up} rows: {activation!r} is gated)"
                                                               if gated else "") + f", got {tuple(w2.shape)}")
    if b1 is not None and tuple(b1.shape) != (E, h_up):
        raise ValueError(f"b1 must be [E, {'2h' if gated else 'h'}] = {(E, h_up)}, got {tuple(b1.shape)}")
    if b2 is not None and tuple(b2.shape) != (E, w2.shape[1]):
        raise ValueError(f"b2 must be [E, d_out] = {(E, w2.shape[1])}, got {tuple(b2.shape)}")
    if shared_w1 is not None:
        if shared_w1.dim() != 2 or shared_w1.shape[1] != d or (gated and shared_w1.shape[0] % 2):
            raise ValueError(f"shared_w1 must be [{'2s' if gated else 's'}, d={d}], got {tuple(shared_w1.shape)}")
        s_up = shared_w1.shape[0]
        s = s_up // 2 if gated else s_up
        if shared_b1 is not None and tuple(shared_b1.shape) != (s_up,):
            raise ValueError(f"shared_b1 must be [{'2s' if gated else 's'}] = ({s_up},), got {tuple(shared_b1.shape)}")
        if tuple(shared_w2.shape) != (w2.shape[1], s):
            raise ValueError(f"shared_w2 must be [d_out, s] = {(w2.shape[1], s)}, got {tuple(shared_w2.shape)}")
    if plan.num_experts != E:
        raise ValueError(f"plan routes to {plan.num_experts} experts but the weights hold {E}")
    if plan.num_tokens != T:
        raise ValueError(f"plan covers {plan.num_tokens} tokens but x has {T}")
    if gate is not None and tuple(gate.shape) != (T,):
        raise ValueError(f"gate must be [T] = ({T},), got {tuple(gate.shape)}")
    for name, t in named.items():
        if t.device != x.device:
            raise ValueError(f"{name} is on {t.device} but x is on {x.device}")
        if name != "gate" and t.dtype != x.dtype:
            raise TypeError(f"{name} has dtype {t.dtype} but x has {x.dtype}; cast the weights or use autocast")
    if plan.device != x.device:
        raise ValueError(f"plan is on {plan.device} but x is on {x.device}")


def moe_ffn(
    x: Tensor,
    plan: RoutingPlan,
    w1: Tensor,
    b1: Optional[Tensor],
    w2: Tensor,
    b2: Optional[Tensor],
    gate: Optional[Tensor] = None,
    activation: str = "gelu",
    backend: Optional[str] = None,
    shared_w1: Optional[Tensor] = None,
    shared_b1: Optional[Tensor] = None,
    shared_w2: Optional[Tensor] = None,
) -> Tensor:
    """Top-1 routed expert FFN on ``[T, d]`` tokens, plus a tied shared expert when ``shared_*`` are given;
    see the module docstring for layout."""
    check_moe_ffn_inputs(x, plan, w1, b1, w2, b2, gate, activation, shared_w1, shared_b1, shared_w2)
    needs = needed_features(b1, b2, activation) + (("shared",) if shared_w1 is not None else ())
    name = select_backend("moe_ffn", x.device, backend, needs=needs)
    save = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (x, w1, b1, w2, b2, gate, shared_w1, shared_b1, shared_w2)
    )
    out, _, _ = torch.ops.moebert.moe_ffn_fwd(
        x, plan.sorted_token_ids, plan.expert_offsets, w1, b1, w2, b2, gate, activation, name, save,
        shared_w1, shared_b1, shared_w2,
    )
    return out
