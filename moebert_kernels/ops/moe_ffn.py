"""moe_ffn: a top-1 routed expert FFN, y_t = g_t * (W2[e_t] act(W1[e_t] x_t + b1[e_t]) + b2[e_t]).

Layout (the ``torch.nn.Linear`` convention, stacked over experts):
    x  [T, d]       w1 [E, h, d]    b1 [E, h] or None
    y  [T, d_out]   w2 [E, d_out, h] b2 [E, d_out] or None    gate [T] or None

Gated activations (``GATED_ACTIVATIONS``, e.g. ModernBERT's ``"geglu"``): w1 is ``[E, 2h, d]``
(b1 ``[E, 2h]``); its first h rows give a, the last h give g, and the down projection
takes act(a) * g. Optional features a backend must declare to be chosen: ``"gated"``,
``"no_bias"`` (b1 or b2 None).

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
# Gated experts and absent biases; the CUDA C++ kernels implement neither (dispatch falls back).
add_features("moe_ffn", "torch", ("gated", "no_bias"))
add_features("moe_ffn", "triton", ("gated", "no_bias"))


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


def moe_ffn_forward(x, sorted_token_ids, expert_offsets, w1, b1, w2, b2, gate, activation, save_hidden):
    T, E, h, d_out = x.shape[0], w1.shape[0], w1.shape[1], w2.shape[1]
    seg = _Segments(x, expert_offsets, E)
    if seg.padded:
        src, pos = seg.token_maps(sorted_token_ids)
        xp = x.index_select(0, src).view(E, seg.cap, -1)
        hp = _affine(xp, w1, b1)
        yp = _affine(activate(hp, activation), w2, b2)
        out = yp.view(E * seg.cap, d_out).index_select(0, pos)
        if gate is not None:
            out.mul_(gate.to(out.dtype).unsqueeze(-1))
        return out, (seg.unpad(hp) if save_hidden else x.new_empty(0))
    xs = x.index_select(0, sorted_token_ids)
    ys, hs = x.new_empty(T, d_out), (x.new_empty(T, h) if save_hidden else None)
    for e in range(E):
        lo, hi = seg.bounds[e], seg.bounds[e + 1]
        if lo == hi:
            continue
        he = _affine(xs[lo:hi], w1[e], None if b1 is None else b1[e])
        _affine(activate(he, activation), w2[e], None if b2 is None else b2[e], out=ys[lo:hi])
        if hs is not None:
            hs[lo:hi] = he
    if gate is not None:
        ys = ys * gate.index_select(0, sorted_token_ids).to(ys.dtype).unsqueeze(-1)
    out = torch.index_copy(x.new_empty(T, d_out), 0, sorted_token_ids, ys)
    return out, (hs if hs is not None else x.new_empty(0))


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
                     needs_grad):
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
    dx = torch.index_copy(torch.zeros_like(x), 0, sorted_token_ids, dxs)
    if gate is None:
        dgate = x.new_empty(0)
    else:
        dgate = torch.index_copy(x.new_zeros(T), 0, sorted_token_ids, dgs).to(gate.dtype)
    none = x.new_empty  # the grad slot of an absent bias (one tensor each: outputs may not alias)
    return dx, dw1, none(0) if db1 is None else db1, dw2, none(0) if db2 is None else db2, dgate


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
) -> tuple[Tensor, Tensor]:
    return get_impl("moe_ffn", backend).moe_ffn_forward(
        x, sorted_token_ids, expert_offsets, w1, b1, w2, b2, gate, activation, save_hidden
    )


@_moe_ffn_fwd.register_fake
def _(x, sorted_token_ids, expert_offsets, w1, b1, w2, b2, gate, activation, backend, save_hidden):
    out = x.new_empty(x.shape[0], w2.shape[1])
    saves = save_hidden and getattr(get_impl("moe_ffn", backend), "SAVES_HIDDEN", False)
    hidden = x.new_empty(x.shape[0], w1.shape[1]) if saves else x.new_empty(0)
    return out, hidden


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
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    grads = get_impl("moe_ffn", backend).moe_ffn_backward(
        grad_out.contiguous(), x, sorted_token_ids, expert_offsets, w1, b1, w2, b2, gate, hidden, activation,
        list(needs_grad),
    )
    # custom_op outputs may not alias inputs; a backend may hand back e.g. a zero grad view.
    return tuple(g.clone() if _aliases(g, (grad_out, x, w1, b1, w2, b2, gate, hidden)) else g for g in grads)


def _aliases(t: Tensor, others) -> bool:
    return any(o is not None and o.numel() and t.numel() and t.untyped_storage().data_ptr() ==
               o.untyped_storage().data_ptr() for o in others)


@_moe_ffn_bwd.register_fake
def _(grad_out, x, sorted_token_ids, expert_offsets, w1, b1, w2, b2, gate, hidden, activation, backend, needs_grad):
    dgate = torch.empty_like(gate) if gate is not None else x.new_empty(0)
    bias_grad = lambda b: torch.empty_like(b) if b is not None else x.new_empty(0)  # noqa: E731
    return (torch.empty_like(x), torch.empty_like(w1), bias_grad(b1), torch.empty_like(w2), bias_grad(b2), dgate)


def _setup_context(ctx, inputs, output):
    x, sorted_token_ids, expert_offsets, w1, b1, w2, b2, gate, activation, backend, _ = inputs
    ctx.activation, ctx.backend = activation, backend
    # The saved pre-activation is an output only to be kept; without this autograd would zero-fill a [T, h]
    # grad for it in every backward.
    ctx.set_materialize_grads(False)
    ctx.has_gate = gate is not None
    saved = [x, sorted_token_ids, expert_offsets, w1, b1, w2, b2, output[1]]
    if gate is not None:
        saved.append(gate)
    ctx.save_for_backward(*saved)


def _backward(ctx, grad_out, _grad_hidden):
    x, sorted_token_ids, expert_offsets, w1, b1, w2, b2, hidden, *rest = ctx.saved_tensors
    gate = rest[0] if ctx.has_gate else None
    if grad_out is None:  # the output took no part in the loss
        return (None,) * 11
    nd = ctx.needs_input_grad
    needs = [nd[0], nd[3], nd[4], nd[5], nd[6], nd[7] and ctx.has_gate]
    dx, dw1, db1, dw2, db2, dgate = torch.ops.moebert.moe_ffn_bwd(
        grad_out, x, sorted_token_ids, expert_offsets, w1, b1, w2, b2, gate, hidden, ctx.activation, ctx.backend,
        needs,
    )
    pick = lambda need, g: g if need else None  # noqa: E731
    return (pick(needs[0], dx), None, None, pick(needs[1], dw1), pick(needs[2], db1), pick(needs[3], dw2),
            pick(needs[4], db2), pick(needs[5], dgate), None, None, None)


_moe_ffn_fwd.register_autograd(_backward, setup_context=_setup_context)


# ---- public entry point -----------------------------------------------------------------

def check_moe_ffn_inputs(x, plan, w1, b1, w2, b2, gate=None, activation="gelu") -> None:
    """Raise TypeError/ValueError naming the first problem; touches nothing."""
    named = {"x": x, "w1": w1, "w2": w2}
    for name, t in (("b1", b1), ("b2", b2), ("gate", gate)):
        if t is not None:
            named[name] = t
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
) -> Tensor:
    """Top-1 routed expert FFN on ``[T, d]`` tokens; see the module docstring for layout."""
    check_moe_ffn_inputs(x, plan, w1, b1, w2, b2, gate, activation)
    name = select_backend("moe_ffn", x.device, backend, needs=needed_features(b1, b2, activation))
    save = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (x, w1, b1, w2, b2, gate)
    )
    out, _ = torch.ops.moebert.moe_ffn_fwd(
        x, plan.sorted_token_ids, plan.expert_offsets, w1, b1, w2, b2, gate, activation, name, save
    )
    return out
