"""moe_ffn_int8: the routed expert FFN of ``moe_ffn`` with int8 weights, for CPU inference.

Weights are int8, symmetric, one scale per output channel (per expert row): ``w ~ w_q * scale[:, None]``,
``w_q`` in [-127, 127] (``quantize_weight``). Activations are quantized at run time, as
``torch.ao``'s dynamic ``nn.Linear`` does: uint8 with one affine scale per GEMM call from the tensor's min
and max, 7-bit range (``reduce_range``, so fbgemm's u8*s8 pair sums cannot saturate on CPUs without VNNI).
Every expert's GEMMs run on that expert's rows only (its segment of the routing plan), so each expert's
activations get a scale of their own; the shared expert's GEMMs see all T rows, like a dense layer.
Biases, the activation (GELU or gated) and the gate stay float; the expert LayerNorm is not part of this op.

Kernel: ``torch.ops.quantized.linear_dynamic`` (fbgemm/oneDNN, what ``torch.ao.nn.quantized.dynamic.Linear``
calls) on weights packed once per expert (``pack_weights``). Measured against ``torch._int_mm`` with a
per-token activation scale and ``torch._weight_int8pack_mm`` on this project's CPU (docs-pending/int8.md):
fbgemm was 5-50x faster than either at every expert shape of BERT-base, so it is the only CPU path.

Reference: ``moe_ffn_int8_reference`` dequantizes the weights and runs ``moe_ffn_reference`` in float. With
``quantize_activations=True`` it also rounds every GEMM input the way the kernel does, which makes it
match the kernel to float rounding and lets tests catch a wrong scale far below int8 noise.
"""
from __future__ import annotations

import warnings
from typing import Optional, Sequence

import torch
from torch import Tensor

from .moe_ffn import activate, moe_ffn_reference
from .routing import RoutingPlan

__all__ = ["quantize_weight", "dequantize_weight", "pack_weights", "pack_experts", "moe_ffn_int8", "moe_ffn_int8_reference",
           "quantize_activation_like_kernel"]

QMAX = 127  # symmetric int8: -128 is never used, so -w quantizes to -w_q
REDUCE_RANGE = True  # as torch.ao's dynamic Linear: 7-bit activations, no int16 saturation in fbgemm


def quantize_weight(w: Tensor) -> tuple[Tensor, Tensor]:
    """Per-output-channel symmetric int8 of ``w [..., n, k]``: returns ``(w_q int8 [..., n, k], scale fp32 [..., n])``.

    A row of zeros gets scale 1 (any scale represents it exactly)."""
    if not w.is_floating_point():
        raise TypeError(f"quantize_weight needs a floating-point weight, got {w.dtype}")
    if not bool(torch.isfinite(w).all()):
        raise ValueError("the weight holds NaN or inf: it cannot be quantized")
    w = w.detach().float()
    amax = w.abs().amax(-1)
    scale = torch.where(amax > 0, amax / QMAX, torch.ones_like(amax))
    w_q = torch.round(w / scale.unsqueeze(-1)).clamp_(-QMAX, QMAX).to(torch.int8)
    return w_q, scale


def dequantize_weight(w_q: Tensor, scale: Tensor) -> Tensor:
    return w_q.float() * scale.unsqueeze(-1)


def pack_weights(w_q: Tensor, scale: Tensor, bias: Optional[Tensor]):
    """fbgemm/oneDNN packed params of one ``[n, k]`` int8 weight (per-channel scales) and its float bias."""
    zero = torch.zeros(scale.shape[0], dtype=torch.int64)
    q = torch._make_per_channel_quantized_tensor(w_q.cpu(), scale.double().cpu(), zero, 0)
    return torch.ops.quantized.linear_prepack(q, None if bias is None else bias.detach().float().cpu().contiguous())


def pack_experts(w_q: Tensor, scale: Tensor, bias: Optional[Tensor]) -> list:
    """``pack_weights`` of every expert of stacked ``w_q [E, n, k]``, ``scale [E, n]``, ``bias [E, n]`` or None."""
    with warnings.catch_warnings():  # torch deprecates quantized tensors; fbgemm still takes them, packed
        warnings.filterwarnings("ignore", message=".*quantized tensor creation functions.*")
        return [pack_weights(w_q[e], scale[e], None if bias is None else bias[e]) for e in range(w_q.shape[0])]


def _linear(x: Tensor, packed) -> Tensor:
    return torch.ops.quantized.linear_dynamic(x, packed, REDUCE_RANGE)


def moe_ffn_int8(
    x: Tensor,
    plan: RoutingPlan,
    up: Sequence,
    down: Sequence,
    gate: Optional[Tensor] = None,
    activation: str = "gelu",
    shared_up=None,
    shared_down=None,
) -> Tensor:
    """``x [T, d]`` fp32 on CPU -> ``y [T, d_out]`` fp32.

    Args:
        plan: the routing plan (its ``sorted_token_ids`` and ``expert_offsets``).
        up, down: per expert, packed params (``pack_weights``) of fc1 (with b1) and fc2 (with b2).
        gate: ``[T]`` gate probabilities multiplying each token's output, or None.
        activation: one of ``ops.ACTIVATIONS``; gated: fc1 gives [a | g], act(a) * g goes down.
        shared_up, shared_down: packed params of the tied shared FFN (shared_down has no bias: b2 is the
            experts'), or None.
    """
    if x.dtype != torch.float32 or x.device.type != "cpu":
        raise TypeError(f"the int8 MoE FFN runs on fp32 CPU activations, got {x.dtype} on {x.device.type}: "
                        "keep the quantized model in float32 on the CPU")
    if len(up) != plan.num_experts or len(down) != plan.num_experts:
        raise ValueError(f"the plan routes to {plan.num_experts} experts but {len(up)} fc1 and {len(down)} fc2 "
                         "weights were given")
    T = x.shape[0]
    x = x.contiguous()
    if shared_up is not None:
        out = _linear(activate(_linear(x, shared_up), activation), shared_down)
    else:
        out = x.new_zeros(T, down[0].unpack()[0].shape[0]) if T else x.new_zeros(0, x.shape[1])
    ids = plan.sorted_token_ids
    xs = x.index_select(0, ids)
    bounds = plan.expert_offsets.tolist()
    for e in range(plan.num_experts):
        lo, hi = bounds[e], bounds[e + 1]
        if lo < hi:
            y = _linear(activate(_linear(xs[lo:hi], up[e]), activation), down[e])
            out.index_add_(0, ids[lo:hi], y)
    if gate is not None:
        out.mul_(gate.to(out.dtype).unsqueeze(-1))
    return out


def quantize_activation_like_kernel(x: Tensor) -> Tensor:
    """``x`` rounded to the kernel's dynamic uint8 grid (one affine scale from min/max, 7 bits), back in float."""
    if x.numel() == 0:
        return x
    qmax = 127 if REDUCE_RANGE else 255
    lo, hi = min(float(x.min()), 0.0), max(float(x.max()), 0.0)
    scale = (hi - lo) / qmax if hi > lo else 1.0
    # fbgemm's ChooseQuantizationParams: the zero point that maps lo or hi closest, rounded and clamped
    zp = int(round(min(max(-lo / scale, 0.0), float(qmax))))
    scale32 = torch.tensor(scale, dtype=torch.float32)
    return (torch.clamp(torch.round(x / scale32) + zp, 0, qmax) - zp) * scale32


def moe_ffn_int8_reference(
    x: Tensor,
    plan: RoutingPlan,
    w1_q: Tensor, w1_scale: Tensor, b1: Optional[Tensor],
    w2_q: Tensor, w2_scale: Tensor, b2: Optional[Tensor],
    gate: Optional[Tensor] = None,
    activation: str = "gelu",
    shared_w1_q: Optional[Tensor] = None, shared_w1_scale: Optional[Tensor] = None,
    shared_b1: Optional[Tensor] = None,
    shared_w2_q: Optional[Tensor] = None, shared_w2_scale: Optional[Tensor] = None,
    quantize_activations: bool = False,
) -> Tensor:
    """Plain-PyTorch oracle in the dtype of ``x`` (fp64 for tests): dequantized weights, float activations;
    ``quantize_activations`` rounds every GEMM input as the kernel does (per expert segment, and once over
    all rows for the shared expert)."""
    dt = x.dtype
    w1, w2 = (dequantize_weight(q, s).to(dt) for q, s in ((w1_q, w1_scale), (w2_q, w2_scale)))
    b1, b2, shared_b1 = (None if b is None else b.to(dt) for b in (b1, b2, shared_b1))
    shared_w1 = None if shared_w1_q is None else dequantize_weight(shared_w1_q, shared_w1_scale).to(dt)
    shared_w2 = None if shared_w2_q is None else dequantize_weight(shared_w2_q, shared_w2_scale).to(dt)
    if not quantize_activations:
        return moe_ffn_reference(x, plan.sorted_token_ids, plan.expert_offsets, w1, b1, w2, b2, gate, activation,
                                 shared_w1, shared_b1, shared_w2)
    q = quantize_activation_like_kernel

    def ffn(rows, wa, ba, wb, bb):
        h = q(rows) @ wa.t() + (0 if ba is None else ba)
        y = q(activate(h, activation)) @ wb.t()
        return y if bb is None else y + bb

    T, d_out = x.shape[0], w2.shape[1]
    y = x.new_zeros(T, d_out)
    if shared_w1 is not None:
        y = y + ffn(x, shared_w1, shared_b1, shared_w2, None)
    ids, bounds = plan.sorted_token_ids, plan.expert_offsets.tolist()
    for e in range(plan.num_experts):
        lo, hi = bounds[e], bounds[e + 1]
        if lo < hi:
            rows = ids[lo:hi]
            y[rows] += ffn(x[rows], w1[e], None if b1 is None else b1[e], w2[e], None if b2 is None else b2[e])
    if gate is not None:
        y = y * gate.to(dt).unsqueeze(-1)
    return y

