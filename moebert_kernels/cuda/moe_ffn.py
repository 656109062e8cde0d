"""CUDA C++ backend for ``moe_ffn`` and the device-side routing plan.

Launchers only: the GEMMs are CUTLASS grouped GEMMs (``torch.ops.moebert_C.grouped_gemm``,
csrc/grouped_gemm_sm90.cu on sm_90a, csrc/grouped_gemm_sm80.cu elsewhere and for fp32), the
steps CUTLASS cannot fuse are 16-byte element-wise kernels (csrc/moe_ffn.cu), and the row
gathers are ``index_select``. Rows are in expert order between the gather and the scatter.

Forward (``hidden`` = H, saved for the backward):
    xs = x[tok]                                  gather            (index_select)
    H  = xs W1[e]^T                              GEMM up           (grouped, rows x W^T)
    H += b1[e]; A = act(H)  (gated: act(a) * g)  moe_bias_act      (one pass)
    Y  = A W2[e]^T                               GEMM down         (grouped, rows x W^T)
    out[tok] = g (Y + b2[e] + shared[tok])       moe_scatter_rows  (one pass)
Backward (G = grad_out):
    Gs = G[tok]                                  gather
    P  = Gs W2[e]                                GEMM dH           (grouped, rows x W)
    dH, gA = g A, dgate = P.A + G.b2             moe_act_backward  (one pass, one block a row)
    dx[tok] = dH W1[e] (+ shared dx)             GEMM dX + moe_scatter_rows
    dW1[e] = dH^T xs,  dW2[e] = Gs^T gA          GEMM weight grads (grouped, K = the expert's rows)
    db1, db2 = per-expert column sums            moe_segment_colsum (fixed-order partials + sum)
Every reduction runs in a fixed order: dW, db and dgate are deterministic (no atomics).
Nothing reads ``expert_offsets`` on the host: no sync, CUDA-graph capturable.

16-bit GEMMs need feature sizes that are multiples of 8 (16-byte TMA / cp.async rows); other
sizes run the whole layer in fp32 (SIMT GEMMs) and round the results once (``_via_fp32``).
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor

from .. import _cuda
from ..ops.routing import RoutingPlan, check_expert_ids

__all__ = ["SAVES_HIDDEN", "GEMM_KINDS", "grouped_gemm", "grouped_gemm_plan_reference", "moe_ffn_forward",
           "moe_ffn_backward", "routing_plan"]

SAVES_HIDDEN = True
_ACTIVATION_CODES = {"gelu": 0, "gelu_tanh": 1, "relu": 2}
_GATED = {"geglu": "gelu", "geglu_tanh": "gelu_tanh", "reglu": "relu"}
# grouped_gemm kinds (csrc/grouped_gemm.h)
GEMM_KINDS = {"rows_x_wt": 0, "rows_x_w": 1, "weight_grad": 2}
_COLSUM_SPLITS = 32  # fixed partials per expert in the bias grads


def _ops():
    ext, why = _cuda.load()
    if ext is None:
        raise RuntimeError(f"the cuda backend cannot run: {why}")
    return torch.ops.moebert_C


def _check_arch(x: Tensor) -> None:
    """The CUTLASS GEMMs need sm_80 or newer (cp.async, bf16 mma); an older GPU gets a clear error, not garbage."""
    if x.is_cuda and torch.cuda.get_device_capability(x.device) < (8, 0):
        major, minor = torch.cuda.get_device_capability(x.device)
        raise RuntimeError(f"the cuda backend of moe_ffn needs an sm_80 or newer GPU (its GEMMs are CUTLASS sm_80/"
                           f"sm_90a kernels); this one is sm_{major}{minor}: use backend='triton' or 'torch'")


def _new_output(shape, like: Tensor, dtype: Optional[torch.dtype] = None) -> Tensor:
    """Allocation point for every output (tests swap it for NaN-filled buffers)."""
    return torch.empty(shape, dtype=dtype or like.dtype, device=like.device)


def _activation_code(activation: str) -> tuple[int, bool]:
    """(code of act, gated) for ``activation``."""
    base = _GATED.get(activation, activation)
    try:
        return _ACTIVATION_CODES[base], activation in _GATED
    except KeyError:
        raise ValueError(f"activation must be one of {(*_ACTIVATION_CODES, *_GATED)}, got {activation!r}") from None


def grouped_gemm_plan_reference(expert_offsets: Sequence[int], kind: int, M: int, N: int, K: int) -> list[tuple]:
    """What the device-side argument builder (csrc/grouped_gemm.h: group_problem) computes for each expert:
    ``(m, n, k, a_off, b_off, d_off)``, offsets in elements of the contiguous operands."""
    rows_of = list(zip(expert_offsets[:-1], expert_offsets[1:]))
    plan = []
    for e, (lo, hi) in enumerate(rows_of):
        rows = hi - lo
        if kind == GEMM_KINDS["weight_grad"]:  # D[e] = A[rows]^T B[rows]: empty experts get no tiles
            plan.append((M if rows else 0, N, rows, lo * M, lo * N, e * M * N))
        elif kind in (GEMM_KINDS["rows_x_wt"], GEMM_KINDS["rows_x_w"]):
            plan.append((rows, N, K, lo * K, e * N * K, lo * N))
        else:
            raise ValueError(f"kind must be one of {sorted(GEMM_KINDS.values())}, got {kind}")
    return plan


def _dense(t: Tensor) -> Tensor:
    """Contiguous and 16-byte aligned (a view with an odd storage offset is copied)."""
    t = t.contiguous()
    return t if t.data_ptr() % 16 == 0 else t.clone()


def grouped_gemm(a: Tensor, b: Tensor, expert_offsets: Tensor, kind: str, out: Tensor, impl: int = 0) -> Tensor:
    """One CUTLASS grouped GEMM (see GEMM_KINDS and csrc/grouped_gemm.h) into ``out``; returns ``out``."""
    _ops().grouped_gemm(_dense(a), _dense(b), expert_offsets, GEMM_KINDS[kind], out, impl)
    return out


def routing_plan(expert_ids: Tensor, num_experts: int, validate: bool = True) -> RoutingPlan:
    """The same plan as ``RoutingPlan.from_expert_ids`` (stable within an expert), built by
    three CUDA kernels (histogram, scan, scatter) with no host sync."""
    if not isinstance(expert_ids, Tensor):
        raise TypeError(f"expert_ids must be a torch.Tensor, got {type(expert_ids).__name__}")
    if expert_ids.dim() != 1:
        raise ValueError(f"expert_ids must be 1-D [T], got shape {tuple(expert_ids.shape)}")
    if validate:
        check_expert_ids(expert_ids, num_experts)
    ops = _ops()
    ids = expert_ids.long()
    T = ids.shape[0]
    sorted_ids = _new_output((T,), ids)
    counts = _new_output((num_experts,), ids)
    offsets = _new_output((num_experts + 1,), ids)
    inverse = _new_output((T,), ids)
    ops.routing_plan(ids, num_experts, sorted_ids, counts, offsets, inverse)
    return RoutingPlan(ids, sorted_ids, counts, offsets, inverse, num_experts)


def _aligned(x: Tensor, w1: Tensor, w2: Tensor) -> bool:
    """Whether the 16-bit GEMMs can take these sizes (fp32 runs any size)."""
    return x.dtype == torch.float32 or all(n % 8 == 0 for n in (x.shape[1], w1.shape[1], w2.shape[1], w2.shape[2]))


def _via_fp32(fn, dtypes, *args):
    """Run ``fn`` on fp32 copies of the floating-point tensors and round its outputs once, to ``dtypes``."""
    up = [a.float() if isinstance(a, Tensor) and a.is_floating_point() else a for a in args]
    return tuple(r.to(dt) for r, dt in zip(fn(*up), dtypes))


def _gate32(gate: Optional[Tensor]) -> Optional[Tensor]:
    return None if gate is None else gate.float().contiguous()


def _up(ops, xs, offsets, w1, b1, code, gated, want_act: bool):
    """H = xs W1[e]^T + b1[e] and, if wanted, A = act(H); both expert order."""
    T, h_up = xs.shape[0], w1.shape[1]
    hidden = _new_output((T, h_up), xs)
    grouped_gemm(xs, w1, offsets, "rows_x_wt", hidden)
    act = _new_output((T, h_up // 2 if gated else h_up), xs) if want_act else xs.new_empty(0)
    ops.moe_bias_act(hidden, b1, offsets, code, gated, act)
    return hidden, act


def moe_ffn_forward(x, sorted_token_ids, expert_offsets, w1, b1, w2, b2, gate, activation, save_hidden,
                    shared_out=None):
    """Backend contract: ``(out [T, d_out], hidden [T, h_up] expert order or empty)``; ``shared_out`` [T, d_out]
    (token order) is added before the gate, in the scatter."""
    code, gated = _activation_code(activation)
    _check_arch(x)
    args = (x, sorted_token_ids, expert_offsets, w1, b1, w2, b2, gate, code, gated, save_hidden, shared_out)
    if not _aligned(x, w1, w2):
        return _via_fp32(_forward, (x.dtype, x.dtype), *args)
    return _forward(*args)


def _forward(x, tok, offsets, w1, b1, w2, b2, gate, code, gated, save_hidden, shared_out):
    ops = _ops()
    tok, offsets = tok.contiguous(), offsets.contiguous()
    T, d_out = x.shape[0], w2.shape[1]
    xs = x.index_select(0, tok)
    hidden, act = _up(ops, xs, offsets, w1, None if b1 is None else b1.contiguous(), code, gated, True)
    ys = _new_output((T, d_out), x)
    grouped_gemm(act, w2, offsets, "rows_x_wt", ys)
    out = _new_output((T, d_out), x)
    ops.moe_scatter_rows(ys, tok, offsets, None if b2 is None else b2.contiguous(), _gate32(gate),
                         None if shared_out is None else shared_out.contiguous(), out)
    return out, (hidden if save_hidden else x.new_empty(0))


def moe_ffn_backward(grad_out, x, sorted_token_ids, expert_offsets, w1, b1, w2, b2, gate, hidden, activation,
                     needs_grad: Sequence[bool], shared_dx=None):
    """Backend contract: ``(dx, dw1, db1, dw2, db2, dgate)``, all full-shaped (an absent bias gets an empty slot);
    grads not in ``needs_grad`` (x, w1, b1, w2, b2, gate) hold unspecified values. ``shared_dx`` [T, d] (token
    order) is added to dx in its scatter."""
    code, gated = _activation_code(activation)
    if len(needs_grad) != 6:
        raise ValueError(f"needs_grad must hold 6 flags (x, w1, b1, w2, b2, gate), got {len(needs_grad)}")
    _check_arch(x)
    args = (grad_out, x, sorted_token_ids, expert_offsets, w1, b1, w2, b2, gate, hidden, code, gated,
            [bool(n) for n in needs_grad], shared_dx)
    if not _aligned(x, w1, w2):
        return _via_fp32(_backward, [x.dtype if t is None else t.dtype for t in (x, w1, b1, w2, b2, gate)], *args)
    return _backward(*args)


def _backward(grad_out, x, tok, offsets, w1, b1, w2, b2, gate, hidden, code, gated, needs, shared_dx):
    ops = _ops()
    tok, offsets = tok.contiguous(), offsets.contiguous()
    T, d = x.shape
    E, h_up, _ = w1.shape
    d_out, h = w2.shape[1], w2.shape[2]
    n_x, n_w1, n_b1, n_w2, n_b2, n_g = needs
    n_b1, n_b2, n_g = n_b1 and b1 is not None, n_b2 and b2 is not None, n_g and gate is not None
    dx = _new_output((T, d), x)
    dw1, dw2 = _new_output((E, h_up, d), w1), _new_output((E, d_out, h), w2)
    db1 = _new_output((E, h_up), b1) if b1 is not None else x.new_empty(0)
    db2 = _new_output((E, d_out), b2) if b2 is not None else x.new_empty(0)
    dgate = _new_output((T,), gate) if gate is not None else x.new_empty(0)
    if T == 0:
        for t in (dw1, db1, dw2, db2):
            t.zero_()
        if shared_dx is not None:
            dx = shared_dx
        return dx, dw1, db1, dw2, db2, dgate

    g32 = _gate32(gate)
    b1c = None if b1 is None else b1.contiguous()
    need_xs = n_w1 or hidden.numel() == 0
    xs = x.index_select(0, tok) if need_xs else None
    if hidden.numel() == 0:  # the forward did not save H: recompute it (GEMM up only)
        hidden, _ = _up(ops, xs, offsets, w1, b1c, code, gated, False)
    hidden = _dense(hidden)
    gs = grad_out.to(x.dtype).index_select(0, tok)
    need_dh = n_x or n_w1 or n_b1
    if need_dh or n_w2 or n_g:
        p = _new_output((T, h), x)
        grouped_gemm(gs, w2, offsets, "rows_x_w", p)
        dh = _new_output((T, h_up), x)
        ga = _new_output((T, h), x) if n_w2 else x.new_empty(0)
        dgate32 = _new_output((T,), x, torch.float32) if n_g else x.new_empty(0, dtype=torch.float32)
        ops.moe_act_backward(p, hidden, tok, offsets, g32, grad_out.to(x.dtype).contiguous() if n_g else None,
                             None if b2 is None else b2.contiguous(), code, gated, dh, ga, dgate32)
        if n_g:
            dgate.copy_(dgate32)
        if n_x:
            dxs = _new_output((T, d), x)
            grouped_gemm(dh, w1, offsets, "rows_x_w", dxs)
            ops.moe_scatter_rows(dxs, tok, offsets, None, None, None if shared_dx is None else shared_dx.contiguous(),
                                 dx)
        if n_w1:
            grouped_gemm(dh, xs, offsets, "weight_grad", dw1)
        if n_b1:
            db1.copy_(_segment_colsum(ops, dh, offsets, E, None, tok))
        if n_w2:
            grouped_gemm(gs, ga, offsets, "weight_grad", dw2)
    if n_b2:
        db2.copy_(_segment_colsum(ops, gs, offsets, E, g32, tok))
    return dx, dw1, db1, dw2, db2, dgate


def _segment_colsum(ops, rows: Tensor, offsets: Tensor, E: int, scale: Optional[Tensor], tok: Tensor) -> Tensor:
    """[E, n] fp32: per-expert column sums of ``rows`` (each row scaled by ``scale[tok[s]]``), fixed order."""
    partial = torch.empty((E, _COLSUM_SPLITS, rows.shape[1]), dtype=torch.float32, device=rows.device)
    ops.moe_segment_colsum(rows, offsets, scale, tok, partial)
    return partial.sum(1)
