"""CUDA C++ backend for ``moe_ffn`` and the device-side routing plan.

Launchers only: they allocate outputs and call ``torch.ops.moebert_C.*`` (csrc/moe_ffn.cu,
csrc/routing.cu). The forward is GEMM1 (row gather in the prologue, bias + activation in the
epilogue) then GEMM2 (bias, gate, scatter to token order); it saves the GEMM1
pre-activation in expert order so the backward does not recompute it.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor

from .. import _cuda
from ..ops.routing import RoutingPlan, check_expert_ids

__all__ = ["SAVES_HIDDEN", "moe_ffn_forward", "moe_ffn_backward", "routing_plan"]

SAVES_HIDDEN = True
_ACTIVATION_CODES = {"gelu": 0, "gelu_tanh": 1, "relu": 2}


def _ops():
    ext, why = _cuda.load()
    if ext is None:
        raise RuntimeError(f"the cuda backend cannot run: {why}")
    return torch.ops.moebert_C


def _new_output(shape, like: Tensor, dtype: Optional[torch.dtype] = None) -> Tensor:
    """Allocation point for every output (tests swap it for NaN-filled buffers)."""
    return torch.empty(shape, dtype=dtype or like.dtype, device=like.device)


def _activation_code(activation: str) -> int:
    try:
        return _ACTIVATION_CODES[activation]
    except KeyError:
        raise ValueError(f"activation must be one of {tuple(_ACTIVATION_CODES)}, got {activation!r}") from None


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


def moe_ffn_forward(x, sorted_token_ids, expert_offsets, w1, b1, w2, b2, gate, activation, save_hidden):
    ops = _ops()
    code = _activation_code(activation)
    T, h, d_out = x.shape[0], w1.shape[1], w2.shape[1]
    out = _new_output((T, d_out), x)
    hidden = _new_output((T, h), x) if save_hidden else x.new_empty(0)
    ops.moe_ffn_forward(x, sorted_token_ids, expert_offsets, w1, b1, w2, b2, gate, code, out, hidden)
    return out, hidden


def moe_ffn_backward(grad_out, x, sorted_token_ids, expert_offsets, w1, b1, w2, b2, gate, hidden, activation,
                     needs_grad: Sequence[bool]):
    ops = _ops()
    code = _activation_code(activation)
    if len(needs_grad) != 6:
        raise ValueError(f"needs_grad must hold 6 flags (x, w1, b1, w2, b2, gate), got {len(needs_grad)}")
    mask = sum(1 << i for i, need in enumerate(needs_grad) if need)
    dx = _new_output(x.shape, x)
    dw1, db1 = _new_output(w1.shape, w1), _new_output(b1.shape, b1)
    dw2, db2 = _new_output(w2.shape, w2), _new_output(b2.shape, b2)
    dgate = _new_output(gate.shape, gate) if gate is not None else x.new_empty(0)
    if hidden is None:
        hidden = x.new_empty(0)
    ops.moe_ffn_backward(grad_out, x, sorted_token_ids, expert_offsets, w1, b1, w2, b2, gate, hidden, code, mask,
                         dx, dw1, db1, dw2, db2, dgate)
    return dx, dw1, db1, dw2, db2, dgate
