"""ONNX translations of the ops a patched model's graph holds, for ``torch.onnx.export(dynamo=True)``.

Each function is traced by onnxscript into standard ONNX (opset 18) nodes, so the file runs in stock
onnxruntime with no custom-op library. Each one computes exactly what its op's torch reference computes.
"""
from __future__ import annotations

import math

import torch
from onnx_ir import DataType
from onnx_ir import tensor as ir_tensor
from onnxscript import opset18 as op

from ..ops.moe_ffn import GATED_ACTIVATIONS

__all__ = ["TRANSLATIONS"]


def _const(value, like):
    return ir_tensor(value, dtype=like.dtype)


def _activate(h, activation: str, rows: int):
    """act(h) of a pre-activation with ``rows`` (static) columns; gated: act(a) * g of its two halves."""
    if activation in GATED_ACTIVATIONS:
        half = rows // 2
        axis = op.Constant(value_ints=[1])
        a = op.Slice(h, op.Constant(value_ints=[0]), op.Constant(value_ints=[half]), axis)
        g = op.Slice(h, op.Constant(value_ints=[half]), op.Constant(value_ints=[rows]), axis)
        return op.Mul(_activate(a, GATED_ACTIVATIONS[activation], half), g)
    if activation == "relu":
        return op.Relu(h)
    if activation == "gelu":
        return op.Mul(h, op.Mul(_const(0.5, h), op.Add(op.Erf(op.Div(h, _const(math.sqrt(2.0), h))), _const(1.0, h))))
    if activation == "gelu_tanh":
        inner = op.Mul(_const(math.sqrt(2.0 / math.pi), h),
                       op.Add(h, op.Mul(_const(0.044715, h), op.Mul(h, op.Mul(h, h)))))
        return op.Mul(h, op.Mul(_const(0.5, h), op.Add(op.Tanh(inner), _const(1.0, h))))
    raise ValueError(f"activation {activation!r} has no ONNX translation")


def sort_stable(self, *, stable: bool = False, dim: int = -1, descending: bool = False):
    """aten::sort.stable as TopK over the whole axis: ONNX TopK breaks ties by the lower index, so it is stable."""
    n = op.Reshape(op.Gather(op.Shape(self), op.Constant(value_int=dim), axis=0), op.Constant(value_ints=[1]))
    values, indices = op.TopK(self, n, axis=dim, largest=int(descending), sorted=1)
    return values, indices


def repeat_interleave_self_int(self, repeats, dim=None, output_size=None):
    """aten::repeat_interleave.self_int. Replaces torchlib's (onnxscript 0.7.2), which puts a symbolic repeat
    count on the wrong axis ([S, 1] instead of [1, S]), so SentenceGate's per-token ids break for B > 1."""
    if dim is None:
        self, dim = op.Reshape(self, op.Constant(value_ints=[-1])), 0
    else:
        dim = dim % len(self.shape)
    reps = op.Constant(value_ints=[repeats]) if isinstance(repeats, int) else op.Reshape(
        repeats, op.Constant(value_ints=[-1]))
    head, n, tail = op.Shape(self, start=0, end=dim), op.Shape(self, start=dim, end=dim + 1), op.Shape(self, start=dim + 1)
    tiled = op.Expand(op.Unsqueeze(self, op.Constant(value_ints=[dim + 1])), op.Concat(head, n, reps, tail, axis=0))
    out_shape = op.Concat(head, op.Mul(n, reps), tail, axis=0)
    return op.Reshape(tiled, out_shape)


def _linear(x, w, b=None):
    """x @ w.T (+ b) for a weight initializer w [out, in]; ``export`` folds the transpose into an initializer."""
    y = op.MatMul(x, op.Transpose(w, perm=[1, 0]))
    return y if b is None else op.Add(y, b)


def _row(b, idx):
    """Expert idx's bias, or None for a bias-free FFN (ModernBERT)."""
    return None if b is None else op.Gather(b, idx, axis=0)


# The op's outputs: (out, hidden) or, with the tied shared expert's op, (out, hidden, shared_hidden).
_MOE_FFN_OUTPUTS = len(torch.ops.moebert.moe_ffn_fwd.default._schema.returns)


def moe_ffn_fwd(x, sorted_token_ids, expert_offsets, w1, b1, w2, b2, gate=None, activation: str = "gelu",
                backend: str = "torch", save_hidden: bool = False, shared_w1=None, shared_b1=None, shared_w2=None):
    """moebert::moe_ffn_fwd: gather rows into expert order, one GEMM pair per expert on its slice of rows
    (a slice may be empty), scatter back to token order; then the tied shared FFN's product (if any) is
    added and the gate (if any) scales the sum. E is static (the weights' first dim), the slices dynamic."""
    E = w1.shape[0]
    xs = op.Gather(x, sorted_token_ids, axis=0)
    zero = op.Constant(value_ints=[0])
    ys, hs = [], []
    for e in range(E):
        lo = op.Slice(expert_offsets, op.Constant(value_ints=[e]), op.Constant(value_ints=[e + 1]))
        hi = op.Slice(expert_offsets, op.Constant(value_ints=[e + 1]), op.Constant(value_ints=[e + 2]))
        idx = op.Constant(value_int=e)
        he = _linear(op.Slice(xs, lo, hi, zero), op.Gather(w1, idx, axis=0), _row(b1, idx))
        ys.append(_linear(_activate(he, activation, w1.shape[1]), op.Gather(w2, idx, axis=0), _row(b2, idx)))
        hs.append(he)
    out_shape = op.Concat(op.Shape(x, start=0, end=1), op.Shape(w2, start=1, end=2), axis=0)
    zeros = op.Expand(op.CastLike(op.Constant(value_float=0.0), x), out_shape)
    out = op.ScatterND(zeros, op.Unsqueeze(sorted_token_ids, op.Constant(value_ints=[1])), op.Concat(*ys, axis=0))
    # Pre-activations, kept only for a backward: empty at inference, as in the op.
    empty = op.Slice(op.Reshape(x, op.Constant(value_ints=[-1])), zero, zero)
    shared_hidden = empty
    if shared_w1 is not None:
        h_shared = _linear(x, shared_w1, shared_b1)
        out = op.Add(_linear(_activate(h_shared, activation, shared_w1.shape[0]), shared_w2), out)
        if save_hidden:
            shared_hidden = h_shared
    if gate is not None:
        out = op.Mul(out, op.Unsqueeze(op.Cast(gate, to=x.dtype), op.Constant(value_ints=[1])))
    hidden = op.Concat(*hs, axis=0) if save_hidden else empty
    return (out, hidden, shared_hidden) if _MOE_FFN_OUTPUTS == 3 else (out, hidden)


def expert_layer_norm_fwd(x, residual, expert_ids, weight, bias, eps: float = 1e-12, backend: str = "torch"):
    """moebert::expert_layer_norm_fwd: fp32 (fp64 for fp64) LayerNorm of x + residual, then each token's
    expert affine; returns (y, mean [T], rstd [T]) like the op."""
    acc = DataType.DOUBLE if DataType.DOUBLE in (x.dtype, weight.dtype) or (
        residual is not None and residual.dtype == DataType.DOUBLE) else DataType.FLOAT
    z = op.Cast(x, to=acc)
    out_dtype = x.dtype
    if residual is not None:
        z = op.Add(z, op.Cast(residual, to=acc))
        if residual.dtype != x.dtype:  # torch.result_type of two different float dtypes is fp32 or fp64, as acc
            out_dtype = acc
    d = op.Shape(z, start=1, end=2)
    one = op.Expand(op.CastLike(op.Constant(value_float=1.0), z), d)
    n, mean, rstd = op.LayerNormalization(z, one, op.Sub(one, one), axis=-1, epsilon=eps)
    ids = op.Cast(expert_ids, to=DataType.INT64)
    w = op.Gather(op.Cast(weight, to=acc), ids, axis=0)
    b = op.Gather(op.Cast(bias, to=acc), ids, axis=0)
    y = op.Cast(op.Add(op.Mul(n, w), b), to=out_dtype)
    flat = op.Constant(value_ints=[-1])
    return y, op.Reshape(mean, flat), op.Reshape(rstd, flat)


TRANSLATIONS = {
    torch.ops.aten.sort.stable: sort_stable,
    torch.ops.aten.repeat_interleave.self_int: repeat_interleave_self_int,
    torch.ops.moebert.moe_ffn_fwd.default: moe_ffn_fwd,
    torch.ops.moebert.expert_layer_norm_fwd.default: expert_layer_norm_fwd,
}
