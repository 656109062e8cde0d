"""Triton backend of expert_layer_norm: one pass forward, one pass backward.

All arithmetic is in the statistics' dtype (fp32; fp64 for fp64 inputs).

Forward: one program per row; it reads x and the residual once, keeps the row in registers
(``BLOCK_D`` = next power of two of d), and writes y, mean and rstd.

Backward: each program owns ``ROWS`` consecutive rows; it writes dz per row and accumulates
``dy * xhat`` and ``dy`` into its own slice ``partial[pid, e, :]`` of a ``[P, E, d]`` table, so no
two programs touch the same address (no atomics) and the final sum over P, done in a fixed order, is
deterministic. See ``moebert_kernels.ops.expert_layer_norm`` for the contract.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..ops.expert_layer_norm import out_dtype, stats_dtype
from . import on_input_device

__all__ = ["expert_layer_norm_forward", "expert_layer_norm_backward"]

# Backward compile options. No FMA contraction: fused, ``dy * w - c1`` subtracts the rounded g (summed into
# c1) from the exact product, so d = 1 gave dz = rstd * (rounding error) instead of 0 (Triton 3.6 fuses by
# default; found on an H200, 2026-12-04; the interpreter never fuses).
BWD_OPTIONS = dict(enable_fp_fusion=False)
ROWS = 32  # rows per backward program: the partial table is T/32 x E x d (fp32, fp64 for fp64 inputs)
# The statistics' dtype (ops.expert_layer_norm.stats_dtype): fp32, or fp64 for fp64 inputs.
_ACC = {torch.float32: tl.float32, torch.float64: tl.float64}


def _new_output(shape, like: torch.Tensor, dtype=None) -> torch.Tensor:
    """Allocation of every output the kernels write; tests replace it with a NaN-filled one (poisoning)."""
    return torch.empty(shape, dtype=dtype or like.dtype, device=like.device)


def _num_warps(block_d: int) -> int:
    return 1 if block_d <= 128 else 4 if block_d <= 1024 else 8


@triton.jit
def _eln_fwd_kernel(x_ptr, r_ptr, ids_ptr, w_ptr, b_ptr, y_ptr, mean_ptr, rstd_ptr, d, eps,
                    stride_x, stride_r, stride_y,
                    HAS_RESIDUAL: tl.constexpr, ACC: tl.constexpr, BLOCK_D: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_D)
    m = cols < d
    z = tl.load(x_ptr + row * stride_x + cols, mask=m, other=0.0).to(ACC)
    if HAS_RESIDUAL:
        z += tl.load(r_ptr + row * stride_r + cols, mask=m, other=0.0).to(ACC)
    mean = tl.sum(z, axis=0) / d
    zc = tl.where(m, z - mean, 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(zc * zc, axis=0) / d + eps)
    e = tl.load(ids_ptr + row).to(tl.int64)
    w = tl.load(w_ptr + e * d + cols, mask=m, other=0.0).to(ACC)
    b = tl.load(b_ptr + e * d + cols, mask=m, other=0.0).to(ACC)
    y = zc * rstd * w + b
    tl.store(y_ptr + row * stride_y + cols, y.to(y_ptr.dtype.element_ty), mask=m)
    tl.store(mean_ptr + row, mean)
    tl.store(rstd_ptr + row, rstd)


@triton.jit
def _eln_bwd_kernel(dy_ptr, x_ptr, r_ptr, ids_ptr, w_ptr, mean_ptr, rstd_ptr, dz_ptr, pw_ptr, pb_ptr,
                    T, d, E, stride_dy, stride_x, stride_r,
                    HAS_RESIDUAL: tl.constexpr, NEED_DZ: tl.constexpr, NEED_DW: tl.constexpr,
                    NEED_DB: tl.constexpr, ACC: tl.constexpr, ROWS: tl.constexpr, BLOCK_D: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_D)
    m = cols < d
    base = pid * E * d  # this program's [E, d] slice of the partial tables
    for i in range(ROWS):
        row = pid * ROWS + i
        if row < T:
            e = tl.load(ids_ptr + row).to(tl.int64)
            mean = tl.load(mean_ptr + row)
            rstd = tl.load(rstd_ptr + row)
            z = tl.load(x_ptr + row * stride_x + cols, mask=m, other=0.0).to(ACC)
            if HAS_RESIDUAL:
                z += tl.load(r_ptr + row * stride_r + cols, mask=m, other=0.0).to(ACC)
            xhat = tl.where(m, (z - mean) * rstd, 0.0)
            dy = tl.load(dy_ptr + row * stride_dy + cols, mask=m, other=0.0).to(ACC)
            if NEED_DZ:
                g = dy * tl.load(w_ptr + e * d + cols, mask=m, other=0.0).to(ACC)
                c1 = tl.sum(g, axis=0) / d
                c2 = tl.sum(g * xhat, axis=0) / d
                dz = rstd * (g - c1 - xhat * c2)
                tl.store(dz_ptr + row * d + cols, dz, mask=m)
            if NEED_DW:
                p = pw_ptr + base + e * d + cols
                tl.store(p, tl.load(p, mask=m, other=0.0) + dy * xhat, mask=m)
            if NEED_DB:
                p = pb_ptr + base + e * d + cols
                tl.store(p, tl.load(p, mask=m, other=0.0) + dy, mask=m)


def _rows(t):
    return t if t is None or t.stride(-1) == 1 else t.contiguous()


@on_input_device
def expert_layer_norm_forward(x, residual, expert_ids, weight, bias, eps):
    T, d = x.shape
    acc = stats_dtype(x, residual, weight)
    x, residual = _rows(x), _rows(residual)
    weight, bias, ids = weight.contiguous(), bias.contiguous(), expert_ids.contiguous()
    y = _new_output((T, d), x, out_dtype(x, residual))
    mean, rstd = _new_output((T,), x, acc), _new_output((T,), x, acc)
    if T:
        block = triton.next_power_of_2(d)
        r = residual if residual is not None else x
        _eln_fwd_kernel[(T,)](x, r, ids, weight, bias, y, mean, rstd, d, eps, x.stride(0), r.stride(0), y.stride(0),
                              HAS_RESIDUAL=residual is not None, ACC=_ACC[acc], BLOCK_D=block,
                              num_warps=_num_warps(block))
    return y, mean, rstd


@on_input_device
def expert_layer_norm_backward(grad_y, x, residual, expert_ids, weight, mean, rstd, needs):
    T, d = x.shape
    E = weight.shape[0]
    acc = mean.dtype
    x, residual, grad_y = _rows(x), _rows(residual), _rows(grad_y)
    weight, ids = weight.contiguous(), expert_ids.contiguous()
    need_dz, need_dw, need_db = (bool(n) for n in needs)
    dz = _new_output((T, d), x, acc) if need_dz else None
    P = triton.cdiv(T, ROWS)
    # The partial tables start at zero: a program adds into the slice of every expert its rows route to.
    pw = torch.zeros((max(P, 1), E, d), dtype=acc, device=x.device) if need_dw else None
    pb = torch.zeros((max(P, 1), E, d), dtype=acc, device=x.device) if need_db else None
    if T and (need_dz or need_dw or need_db):
        block = triton.next_power_of_2(d)
        r = residual if residual is not None else x
        dummy = mean  # stands in for a pointer the kernel does not touch
        _eln_bwd_kernel[(P,)](grad_y, x, r, ids, weight, mean, rstd,
                              dz if dz is not None else dummy, pw if pw is not None else dummy,
                              pb if pb is not None else dummy, T, d, E, grad_y.stride(0), x.stride(0), r.stride(0),
                              HAS_RESIDUAL=residual is not None, NEED_DZ=need_dz, NEED_DW=need_dw,
                              NEED_DB=need_db, ACC=_ACC[acc], ROWS=ROWS, BLOCK_D=block,
                              num_warps=_num_warps(block), **BWD_OPTIONS)
    dw = pw.sum(0).to(acc) if need_dw else None
    db = pb.sum(0).to(acc) if need_db else None
    return dz, dw, db
