"""Triton backend of distill_loss: two launches compute the whole loss and every student gradient.

1. ``_distill_hidden_fwd_kernel``: one multi-tensor launch over all L hidden-state pairs. The layer
   tensors are never stacked: they reach the kernel as tuples of pointers (kernel arguments, so no address
   table is copied from the host per call and the launch stays CUDA-graph capturable), and each program
   picks its layer's pointers and constants. Grid ``(blocks of the largest layer, L)``; each program reads a block
   of student and teacher once, writes ``coef_l * m * (s - t)`` (the gradient) and one fp32 partial sum of
   ``m * (s - t)^2``. Partial sums are added per layer afterwards, in a fixed order (deterministic).
2. ``_distill_logits_fwd_kernel``: one program per logits row (rows of the SQuAD start and end heads share
   the launch). Pass 1 streams the row once with online softmax statistics for student, teacher and CE;
   pass 2 writes the gradient of CE + prediction loss.

All reductions are fp32; gradients are stored in the student dtype. See ``moebert_kernels.ops.distill_loss``
for the exact loss definitions and the backend contract this module implements.
"""
from __future__ import annotations

import struct

import torch
import triton
import triton.language as tl

from ..ops.distill_loss import combine_stats, device_constant, hidden_plan, hidden_stats, logits_plan, stats_dtype
from . import on_input_device

__all__ = ["distill_loss_forward", "distill_hidden_forward", "distill_logits_forward"]

# 4096 elements per program: 8 KiB per bf16 stream, enough in flight per SM while keeping the partial-sum
# table small ([L, numel / 4096]).
HIDDEN_BLOCK = 4096
# Largest column tile of a logits row; rows wider than this (a 30522-way vocabulary) are streamed in tiles.
MAX_BLOCK_C = 4096


def _empty_like(t: torch.Tensor) -> torch.Tensor:
    """Allocation of every output the kernels write; tests replace it with a NaN-filled one (poisoning)."""
    return torch.empty_like(t)


@triton.jit
def _distill_hidden_fwd_kernel(
    S, T, G,        # tuples of L pointers: student, teacher and gradient ([B, S, H] each, contiguous)
    meta_ptr,       # int64 [3, L]: numel, H, coef (float64 bits) of each layer
    mask_ptr,       # fp32 [B*S]: 1.0 real token, 0.0 padding (read only if HAS_MASK)
    inv_count_ptr,  # fp32 [1]: 1 / max(#real tokens, 1) (read only if HAS_MASK)
    partial_ptr,    # fp32 [L, n_blocks]: out, per-program sums of m * (s - t)^2
    n_blocks,
    L: tl.constexpr,
    HAS_MASK: tl.constexpr,
    COMPUTE_GRAD: tl.constexpr,
    BLOCK: tl.constexpr,
):
    pid = tl.program_id(0)
    layer = tl.program_id(1)
    # This program's layer's pointers: a chain of scalar selects over the tuples (L is small and constexpr).
    s_ptr, t_ptr, g_ptr = S[0], T[0], G[0]
    for i in tl.static_range(1, L):
        if layer == i:
            s_ptr, t_ptr, g_ptr = S[i], T[i], G[i]
    numel = tl.load(meta_ptr + layer)
    offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    valid = offs < numel  # programs past a smaller layer's end load nothing and store 0
    s = tl.load(s_ptr + offs, mask=valid, other=0.0).to(tl.float32)
    t = tl.load(t_ptr + offs, mask=valid, other=0.0).to(tl.float32)
    d = s - t
    if HAS_MASK:
        H = tl.load(meta_ptr + L + layer)
        m = tl.load(mask_ptr + offs // H, mask=valid, other=0.0)
        d = d * m  # m is 0 or 1, so d^2 below is m * (s - t)^2
    tl.store(partial_ptr + layer * n_blocks + pid, tl.sum(d * d, axis=0))
    if COMPUTE_GRAD:
        c = tl.load(meta_ptr + 2 * L + layer).to(tl.float64, bitcast=True).to(tl.float32)
        if HAS_MASK:
            c = c * tl.load(inv_count_ptr)
        tl.store(g_ptr + offs, (c * d).to(g_ptr.dtype.element_ty), mask=valid)


@triton.jit
def _distill_logits_fwd_kernel(
    S, T, G,        # tuples of `heads` pointers: student, teacher and gradient [B, C] logits of each head
    labels_ptr,     # [heads, B]: int64 class ids (-100 ignored), or fp32 targets if IS_REG (read if HAS_LABELS)
    ce_norm_ptr,    # fp32 [heads]: a head's CE = ce_norm * sum_b row_ce
    pred_norm_ptr,  # fp32 [heads]: a head's prediction loss = pred_norm * sum_b row_pred
    row_ce_ptr,     # fp32 [heads * B]: out, per-row CE (0 for ignored rows)
    row_pred_ptr,   # fp32 [heads * B]: out, per-row prediction loss
    heads: tl.constexpr,
    B,
    C,
    alpha_ce,
    lam,
    temperature,
    PRED: tl.constexpr,  # 0 sym_kl, 1 kl, 2 mse
    IS_REG: tl.constexpr,
    HAS_LABELS: tl.constexpr,
    COMPUTE_GRAD: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    row = tl.program_id(0)
    head = row // B
    b = (row % B).to(tl.int64)
    s_row, t_row, g_row = S[0], T[0], G[0]
    for i in tl.static_range(1, heads):
        if head == i:
            s_row, t_row, g_row = S[i], T[i], G[i]
    s_row += b * C
    t_row += b * C
    g_row += b * C
    out_ty = g_row.dtype.element_ty
    pn = tl.load(pred_norm_ptr + head) * lam

    if IS_REG:
        # C == 1: CE is the squared error to a float target, the prediction loss the squared logit gap.
        s = tl.load(s_row).to(tl.float32)
        pd = s - tl.load(t_row).to(tl.float32)
        tl.store(row_pred_ptr + row, pd * pd)
        g = pn * 2.0 * pd
        if HAS_LABELS:
            cd = s - tl.load(labels_ptr + row).to(tl.float32)
            tl.store(row_ce_ptr + row, cd * cd)
            g += tl.load(ce_norm_ptr + head) * alpha_ce * 2.0 * cd
        else:
            tl.store(row_ce_ptr + row, 0.0)
        if COMPUTE_GRAD:
            tl.store(g_row, g.to(out_ty))
    else:
        inv_t = 1.0 / temperature
        # Pass 1, online over column tiles. For z = logits / T:
        #   m_*, d_* : running max and sum of exp(z - m)      -> log-sum-exp
        #   a_*      : running sum of exp(z - m) * (zs - zt)   -> a / d = E_p[zs - zt]
        # and m_c, d_c the same for CE's softmax at T = 1; sq the sum of squares for "mse".
        m_s = float("-inf")
        d_s = 0.0
        a_s = 0.0
        m_t = float("-inf")
        d_t = 0.0
        a_t = 0.0
        m_c = float("-inf")
        d_c = 0.0
        sq = 0.0
        for c0 in range(0, C, BLOCK_C):
            cols = c0 + tl.arange(0, BLOCK_C)
            msk = cols < C
            s = tl.load(s_row + cols, mask=msk, other=0.0).to(tl.float32)
            t = tl.load(t_row + cols, mask=msk, other=0.0).to(tl.float32)
            if PRED == 2:
                sq += tl.sum((s - t) * (s - t), axis=0)
            else:
                dz = (s - t) * inv_t
                # Padding lanes get -inf so that exp() drops them; dz is 0 there already.
                zs = tl.where(msk, s * inv_t, float("-inf"))
                zt = tl.where(msk, t * inv_t, float("-inf"))
                new_m = tl.maximum(m_s, tl.max(zs, axis=0))
                e = tl.exp(zs - new_m)
                r = tl.exp(m_s - new_m)
                d_s = d_s * r + tl.sum(e, axis=0)
                a_s = a_s * r + tl.sum(e * dz, axis=0)
                m_s = new_m
                new_m = tl.maximum(m_t, tl.max(zt, axis=0))
                e = tl.exp(zt - new_m)
                r = tl.exp(m_t - new_m)
                d_t = d_t * r + tl.sum(e, axis=0)
                a_t = a_t * r + tl.sum(e * dz, axis=0)
                m_t = new_m
            if HAS_LABELS:
                sc = tl.where(msk, s, float("-inf"))
                new_m = tl.maximum(m_c, tl.max(sc, axis=0))
                d_c = d_c * tl.exp(m_c - new_m) + tl.sum(tl.exp(sc - new_m), axis=0)
                m_c = new_m

        t2 = temperature * temperature
        lse_s = 0.0
        lse_t = 0.0
        ps_dz = 0.0
        pt_dz = 0.0
        if PRED != 2:
            lse_s = m_s + tl.log(d_s)
            lse_t = m_t + tl.log(d_t)
            ps_dz = a_s / d_s  # E_{p_s}[zs - zt] = KL(p_s || p_t) + lse_s - lse_t
            pt_dz = a_t / d_t  # E_{p_t}[zs - zt]
        if PRED == 0:
            # 0.5 * sum (p_s - p_t)(log p_s - log p_t); the lse terms cancel because sum(p_s - p_t) = 0.
            tl.store(row_pred_ptr + row, 0.5 * t2 * (ps_dz - pt_dz))
        elif PRED == 1:
            tl.store(row_pred_ptr + row, t2 * (lse_s - lse_t - pt_dz))
        else:
            tl.store(row_pred_ptr + row, sq)

        cn = 0.0
        y = 0
        lse_c = 0.0
        if HAS_LABELS:
            y = tl.load(labels_ptr + row)
            keep = y != -100
            y = tl.where(keep, y, 0)
            lse_c = m_c + tl.log(d_c)
            s_y = tl.load(s_row + y).to(tl.float32)
            tl.store(row_ce_ptr + row, tl.where(keep, lse_c - s_y, 0.0))
            cn = tl.where(keep, tl.load(ce_norm_ptr + head) * alpha_ce, 0.0)
        else:
            tl.store(row_ce_ptr + row, 0.0)

        if COMPUTE_GRAD:
            # Pass 2: d/ds of lam * pred_norm * pred + alpha_ce * ce_norm * ce, one tile at a time.
            for c0 in range(0, C, BLOCK_C):
                cols = c0 + tl.arange(0, BLOCK_C)
                msk = cols < C
                s = tl.load(s_row + cols, mask=msk, other=0.0).to(tl.float32)
                t = tl.load(t_row + cols, mask=msk, other=0.0).to(tl.float32)
                if PRED == 2:
                    g = pn * 2.0 * (s - t)
                else:
                    zs = s * inv_t
                    zt = t * inv_t
                    ps = tl.exp(zs - lse_s)
                    pt = tl.exp(zt - lse_t)
                    if PRED == 0:
                        g = pn * 0.5 * temperature * (ps * ((zs - zt) - ps_dz) + ps - pt)
                    else:
                        g = pn * temperature * (ps - pt)
                if HAS_LABELS:
                    g += cn * (tl.exp(s - lse_c) - tl.where(cols == y, 1.0, 0.0))
                tl.store(g_row + cols, g.to(out_ty), mask=msk)


def layer_table(numels, hidden_sizes, coef, device) -> torch.Tensor:
    """int64 ``[3, L]``: each layer's numel, H and coef (float64 bits). It depends only on shapes and the loss
    weights, so it is built once per value (``device_constant``), not copied from the host on every call."""
    coef_bits = [struct.unpack("<q", struct.pack("<d", float(c)))[0] for c in coef]
    return device_constant((*numels, *hidden_sizes, *coef_bits), torch.int64, device)


@on_input_device
def distill_hidden_forward(student_hidden, teacher_hidden, coef, mask, inv_count, compute_grad):
    """Returns ``(sq_sums [L] fp32, grads)``: per-layer ``sum m*(s-t)^2`` and ``coef_l * m * (s - t)``."""
    L = len(student_hidden)
    dev = student_hidden[0].device
    grads = [_empty_like(t) for t in student_hidden] if compute_grad else []
    numels = [t.numel() for t in student_hidden]
    n_blocks = max(triton.cdiv(max(numels), HIDDEN_BLOCK), 1)
    partial = torch.empty(L, n_blocks, dtype=torch.float32, device=dev)
    has_mask = mask is not None
    dummy = partial  # never read when HAS_MASK is False
    _distill_hidden_fwd_kernel[(n_blocks, L)](
        tuple(student_hidden), tuple(teacher_hidden), tuple(grads if compute_grad else student_hidden),
        layer_table(numels, [t.shape[-1] for t in student_hidden], coef, dev),
        mask if has_mask else dummy, inv_count if has_mask else dummy, partial,
        n_blocks, L=L, HAS_MASK=has_mask, COMPUTE_GRAD=compute_grad, BLOCK=HIDDEN_BLOCK, num_warps=8,
    )
    return partial.sum(1), grads


@on_input_device
def distill_logits_forward(student_logits, teacher_logits, labels_2d, ce_norm, pred_norm, pred_kind, alpha_ce, lam,
                           temperature, compute_grad):
    """Returns ``(row_ce [heads, B], row_pred [heads, B], grads)``; see the kernel for the meaning."""
    heads = len(student_logits)
    B, C = student_logits[0].shape
    dev = student_logits[0].device
    grads = [_empty_like(t) for t in student_logits] if compute_grad else []
    row_ce = torch.empty(heads, B, dtype=torch.float32, device=dev)
    row_pred = torch.empty(heads, B, dtype=torch.float32, device=dev)
    block_c = min(max(triton.next_power_of_2(C), 16), MAX_BLOCK_C)
    if heads * B:
        _distill_logits_fwd_kernel[(heads * B,)](
            tuple(student_logits), tuple(teacher_logits), tuple(grads if compute_grad else student_logits),
            labels_2d if labels_2d is not None else row_ce, ce_norm, pred_norm, row_ce, row_pred,
            heads, B, C, alpha_ce, lam, temperature,
            PRED=pred_kind, IS_REG=C == 1, HAS_LABELS=labels_2d is not None, COMPUTE_GRAD=compute_grad,
            BLOCK_C=block_c, num_warps=4 if block_c <= 1024 else 8,
        )
    return row_ce, row_pred, grads


def distill_loss_forward(student_hidden, teacher_hidden, student_logits, teacher_logits, labels, attention_mask,
                         layer_weights, lam, alpha_ce, pred_loss, temperature, compute_grad):
    dtype = stats_dtype(student_hidden, student_logits)
    dev = student_logits[0].device
    if student_hidden:
        coef, mask, inv_count = hidden_plan(student_hidden, attention_mask, layer_weights, lam)
        sq_sums, grad_hidden = distill_hidden_forward(student_hidden, teacher_hidden, coef, mask, inv_count,
                                                      compute_grad)
        per_layer = hidden_stats(sq_sums, student_hidden, attention_mask, inv_count)
    else:
        per_layer, grad_hidden = torch.zeros(0, device=dev), []
    labels_2d, ce_norm, pred_norm, kind = logits_plan(student_logits, labels, pred_loss)
    row_ce, row_pred, grad_logits = distill_logits_forward(
        student_logits, teacher_logits, labels_2d, ce_norm, pred_norm, kind, alpha_ce, lam, temperature, compute_grad)
    stats = combine_stats(per_layer, layer_weights, row_ce, row_pred, ce_norm, pred_norm, lam, alpha_ce, dtype)
    return stats, grad_hidden, grad_logits
