"""CUDA C++ backend of distill_loss: launchers over ``torch.ops.moebert_C.distill_{hidden,logits}_forward``.

Same two passes as the Triton backend (csrc/distill_loss.cu): one multi-tensor launch over all hidden-state
pairs (the layer addresses travel in the kernel parameters, no device table, no stacking), then one CTA per
logits row. The outputs are allocated here, so tests can poison them; the loss conventions and the backend
contract are in ``moebert_kernels.ops.distill_loss``.
"""
from __future__ import annotations

import torch

from .. import _cuda
from ..ops.distill_loss import combine_stats, hidden_plan, hidden_stats, logits_plan, stats_dtype

__all__ = ["distill_loss_forward"]


def _ops():
    ext, why = _cuda.load()
    if ext is None:
        raise RuntimeError(f"the cuda backend cannot run: {why}")
    return torch.ops.moebert_C


def _empty_like(t: torch.Tensor) -> torch.Tensor:
    """Allocation of every gradient the kernels write; tests replace it with a NaN-filled one (poisoning)."""
    return torch.empty_like(t)


def distill_loss_forward(student_hidden, teacher_hidden, student_logits, teacher_logits, labels, attention_mask,
                         layer_weights, lam, alpha_ce, pred_loss, temperature, compute_grad):
    ops = _ops()
    dtype = stats_dtype(student_hidden, student_logits)
    dev = student_logits[0].device
    grad_hidden, grad_logits = [], []
    if student_hidden:
        coef, mask, inv_count = hidden_plan(student_hidden, attention_mask, layer_weights, lam)
        grad_hidden = [_empty_like(t) for t in student_hidden] if compute_grad else []
        sq_sums = torch.empty(len(student_hidden), dtype=torch.float32, device=dev)
        ops.distill_hidden_forward(student_hidden, teacher_hidden, mask, inv_count, coef, grad_hidden, sq_sums)
        per_layer = hidden_stats(sq_sums, student_hidden, attention_mask, inv_count)
    else:
        per_layer = torch.zeros(0, device=dev)
    labels_2d, ce_norm, pred_norm, kind = logits_plan(student_logits, labels, pred_loss)
    heads, B = len(student_logits), student_logits[0].shape[0]
    grad_logits = [_empty_like(t) for t in student_logits] if compute_grad else []
    row_ce = torch.empty(heads, B, dtype=torch.float32, device=dev)
    row_pred = torch.empty(heads, B, dtype=torch.float32, device=dev)
    ops.distill_logits_forward(student_logits, teacher_logits, labels_2d, ce_norm, pred_norm, alpha_ce, lam,
                               temperature, kind, grad_logits, row_ce, row_pred)
    stats = combine_stats(per_layer, layer_weights, row_ce, row_pred, ce_norm, pred_norm, lam, alpha_ce, dtype)
    return stats, grad_hidden, grad_logits
