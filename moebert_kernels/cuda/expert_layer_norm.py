"""CUDA C++ backend of expert_layer_norm: launchers over ``torch.ops.moebert_C.expert_layer_norm_{forward,backward}``
(csrc/expert_layer_norm.cu). Outputs are allocated here, so tests can poison them; the contract is in
``moebert_kernels.ops.expert_layer_norm``.
"""
from __future__ import annotations

import torch

from .. import _cuda
from ..ops.expert_layer_norm import out_dtype

__all__ = ["expert_layer_norm_forward", "expert_layer_norm_backward"]

def rows_per_warp(T: int) -> int:
    """Rows each backward warp owns. Fewer rows mean more warps in flight (T=4096: 512 warps, about one wave
    of 4-warp CTAs on an H100) but a larger [ceil(T/rows), E, d] fp32 partial table to zero and sum; at 8 rows
    that table is E/8 of the activations, at 32 rows E/32."""
    return 8 if T < 32768 else 32
_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _ops():
    ext, why = _cuda.load()
    if ext is None:
        raise RuntimeError(f"the cuda backend cannot run: {why}")
    return torch.ops.moebert_C


def _new_output(shape, like: torch.Tensor, dtype=None) -> torch.Tensor:
    """Allocation point for every output the kernels write (tests swap it for NaN-filled buffers)."""
    return torch.empty(shape, dtype=dtype or like.dtype, device=like.device)


def _check_dtypes(*tensors):
    for t in tensors:
        if t is not None and t.dtype not in _DTYPES:
            raise TypeError(f"the cuda backend of expert_layer_norm takes float32, float16 or bfloat16, got {t.dtype}; "
                            "use backend='torch' for float64")


def _rows(t):
    return t if t is None or t.stride(-1) == 1 else t.contiguous()


def expert_layer_norm_forward(x, residual, expert_ids, weight, bias, eps):
    _check_dtypes(x, residual, weight, bias)
    x, residual = _rows(x), _rows(residual)
    T, d = x.shape
    y = _new_output((T, d), x, out_dtype(x, residual))
    mean, rstd = _new_output((T,), x, torch.float32), _new_output((T,), x, torch.float32)
    if T == 0:  # nothing to launch; an empty input may carry any strides
        return y, mean, rstd
    _ops().expert_layer_norm_forward(x, residual, expert_ids.long().contiguous(), weight.contiguous(),
                                     bias.contiguous(), float(eps), y, mean, rstd)
    return y, mean, rstd


def expert_layer_norm_backward(grad_y, x, residual, expert_ids, weight, mean, rstd, needs):
    x, residual, grad_y = _rows(x), _rows(residual), _rows(grad_y)
    T, d = x.shape
    E = weight.shape[0]
    if T == 0:  # an empty grad_y (e.g. from y.sum()) may be an expanded view with zero strides
        zeros = lambda: torch.zeros(E, d, dtype=torch.float32, device=x.device)  # noqa: E731
        return (x.new_empty(0, d, dtype=torch.float32) if needs[0] else None, zeros() if needs[1] else None,
                zeros() if needs[2] else None)
    rows = rows_per_warp(T)
    P = -(-T // rows)
    empty = lambda: x.new_empty(0, dtype=torch.float32)  # noqa: E731 - "not asked for"
    dz = _new_output((T, d), x, torch.float32) if needs[0] else empty()
    pw = torch.zeros(P, E, d, dtype=torch.float32, device=x.device) if needs[1] else empty()
    pb = torch.zeros(P, E, d, dtype=torch.float32, device=x.device) if needs[2] else empty()
    _ops().expert_layer_norm_backward(grad_y, x, residual, expert_ids.long().contiguous(), weight.contiguous(),
                                      mean, rstd, dz, pw, pb, rows)
    return (dz if needs[0] else None, pw.sum(0) if needs[1] else None, pb.sum(0) if needs[2] else None)
