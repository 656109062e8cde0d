"""expert_layer_norm: MoEBERT's residual LayerNorm with one affine per expert, fused.

    z_t = x_t + residual_t            (residual optional)
    y_t = (z_t - mean(z_t)) * rstd(z_t) * weight[e_t] + bias[e_t]

Layout: ``x``/``residual`` ``[T, d]``, ``expert_ids [T]`` (int), ``weight``/``bias`` ``[E, d]``. The output
dtype is ``torch.result_type(x, residual)``, as ``LayerNorm(x + residual)`` gives (under autocast the FFN
output is bf16 and the residual fp32, so the result is fp32, as in the HF model). Statistics are fp32
(fp64 for fp64 inputs). The torch backend on CPU with all-16-bit inputs works as a 16-bit ``nn.LayerNorm``
does: x + residual in x's dtype, fp32 statistics inside ATen, returned rounded to x's dtype.

Unfused, this is six passes over ``[T, d]`` (add, normalise, two ``[T, d]`` gathers of the affine, multiply,
add); a fused backend reads x and the residual once and writes y once. The backward recomputes z from the
saved inputs instead of keeping it: in BERT the residual is the FFN's input, which autograd keeps anyway.

Backend contract (module registered for op "expert_layer_norm"):
``expert_layer_norm_forward(x, residual, expert_ids, weight, bias, eps) -> (y, mean [T], rstd [T])`` and
``expert_layer_norm_backward(grad_y, x, residual, expert_ids, weight, mean, rstd, needs) -> (dz, dweight, dbias)``
with ``dz`` in fp32 (the caller casts it for x and the residual) and ``needs = [dz, dweight, dbias]``.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from .dispatch import get_impl, register_impl, select_backend
from .routing import check_expert_ids

__all__ = ["expert_layer_norm", "expert_layer_norm_reference", "check_expert_layer_norm_inputs"]

register_impl("expert_layer_norm", "torch", __name__)
register_impl("expert_layer_norm", "triton", "moebert_kernels.triton.expert_layer_norm")
register_impl("expert_layer_norm", "cuda", "moebert_kernels.cuda.expert_layer_norm")


def stats_dtype(*tensors: Optional[Tensor]) -> torch.dtype:
    return torch.float64 if any(t is not None and t.dtype == torch.float64 for t in tensors) else torch.float32


def out_dtype(x: Tensor, residual: Optional[Tensor]) -> torch.dtype:
    return x.dtype if residual is None else torch.result_type(x, residual)


def expert_layer_norm_reference(x: Tensor, expert_ids: Tensor, weight: Tensor, bias: Tensor, eps: float = 1e-12,
                                residual: Optional[Tensor] = None) -> Tensor:
    """Plain-PyTorch oracle, differentiable: LayerNorm in fp32 (fp64 for fp64), then the token's expert affine."""
    acc = stats_dtype(x, residual, weight)
    z = x.to(acc) if residual is None else x.to(acc) + residual.to(acc)
    n = F.layer_norm(z, (z.shape[-1],), eps=eps)
    ids = expert_ids.long()
    return (n * weight.to(acc)[ids] + bias.to(acc)[ids]).to(out_dtype(x, residual))


# ---- torch backend ----------------------------------------------------------------------------

def _z(x: Tensor, residual: Optional[Tensor], acc: torch.dtype) -> Tensor:
    # (the add promotes a 16-bit residual to acc: one pass fewer than casting it first)
    return x.to(acc) if residual is None else torch.add(x.to(acc), residual)


def expert_layer_norm_forward(x, residual, expert_ids, weight, bias, eps):
    acc = stats_dtype(x, residual, weight)
    ids = expert_ids.long()
    if x.dtype in (torch.bfloat16, torch.float16) and x.device.type == "cpu" and \
            all(t is None or t.dtype == x.dtype for t in (residual, weight, bias)):
        # 16-bit on CPU: add, normalise and apply the affine in x's dtype, as the dense model's LayerNorm
        # does (ATen keeps fp32 statistics inside); an fp32 round trip costs 2.2x (T=1024, d=768, bf16).
        z = x if residual is None else torch.add(x, residual)
        n, mean, rstd = torch.ops.aten.native_layer_norm(z, [z.shape[-1]], None, None, eps)
        y = torch.addcmul(bias.index_select(0, ids), n, weight.index_select(0, ids))
        return y, mean.reshape(-1).to(acc), rstd.reshape(-1).to(acc)
    z = _z(x, residual, acc)
    # (A unit weight would pick ATen's affine CPU kernel, 2.6x faster alone at T=128, d=768 fp32, but that is
    # under 0.5% of a BERT-base forward; measured 2026-12-02.)
    n, mean, rstd = torch.ops.aten.native_layer_norm(z, [z.shape[-1]], None, None, eps)
    y = torch.addcmul(bias.to(acc).index_select(0, ids), n, weight.to(acc).index_select(0, ids))
    return y.to(out_dtype(x, residual)), mean.reshape(-1).to(acc), rstd.reshape(-1).to(acc)


def expert_layer_norm_backward(grad_y, x, residual, expert_ids, weight, mean, rstd, needs):
    acc = mean.dtype
    E, d = weight.shape
    ids = expert_ids.long()
    dy = grad_y.to(acc)
    xhat = (_z(x, residual, acc) - mean[:, None]) * rstd[:, None]
    dz = dw = db = None
    if needs[0]:
        g = dy * weight.to(acc).index_select(0, ids)
        dz = rstd[:, None] * (g - g.mean(-1, keepdim=True) - xhat * (g * xhat).mean(-1, keepdim=True))
    if needs[1]:
        dw = dy.new_zeros(E, d).index_add_(0, ids, dy * xhat)
    if needs[2]:
        db = dy.new_zeros(E, d).index_add_(0, ids, dy)
    return dz, dw, db


# ---- torch.library registration ---------------------------------------------------------------

@torch.library.custom_op("moebert::expert_layer_norm_fwd", mutates_args=())
def _fwd(x: Tensor, residual: Optional[Tensor], expert_ids: Tensor, weight: Tensor, bias: Tensor, eps: float,
         backend: str) -> tuple[Tensor, Tensor, Tensor]:
    return tuple(get_impl("expert_layer_norm", backend).expert_layer_norm_forward(
        x, residual, expert_ids, weight, bias, eps))


@_fwd.register_fake
def _(x, residual, expert_ids, weight, bias, eps, backend):
    acc = stats_dtype(x, residual, weight)
    T = x.shape[0]
    return x.new_empty(x.shape, dtype=out_dtype(x, residual)), x.new_empty(T, dtype=acc), x.new_empty(T, dtype=acc)


@torch.library.custom_op("moebert::expert_layer_norm_bwd", mutates_args=())
def _bwd(grad_y: Tensor, x: Tensor, residual: Optional[Tensor], expert_ids: Tensor, weight: Tensor, mean: Tensor,
         rstd: Tensor, backend: str, needs: list[bool]) -> tuple[Tensor, Tensor, Tensor]:
    dz, dw, db = get_impl("expert_layer_norm", backend).expert_layer_norm_backward(
        grad_y.contiguous(), x, residual, expert_ids, weight, mean, rstd, list(needs))
    # custom ops return tensors, never None: an empty tensor stands for "not asked for".
    return tuple(mean.new_empty(0) if g is None else g for g in (dz, dw, db))


@_bwd.register_fake
def _(grad_y, x, residual, expert_ids, weight, mean, rstd, backend, needs):
    E, d = weight.shape
    shape = lambda need, s: s if need else (0,)  # noqa: E731
    return (mean.new_empty(shape(needs[0], tuple(x.shape))), mean.new_empty(shape(needs[1], (E, d))),
            mean.new_empty(shape(needs[2], (E, d))))


def _setup_context(ctx, inputs, output):
    x, residual, expert_ids, weight, bias, eps, backend = inputs
    _, mean, rstd = output
    ctx.backend, ctx.has_residual = backend, residual is not None
    ctx.dtypes = (x.dtype, None if residual is None else residual.dtype, weight.dtype, bias.dtype)
    ctx.set_materialize_grads(False)  # mean and rstd are outputs only to be saved
    ctx.save_for_backward(x, residual, expert_ids, weight, mean, rstd)


def _backward(ctx, grad_y, _grad_mean, _grad_rstd):
    if grad_y is None:
        return (None,) * 7
    x, residual, expert_ids, weight, mean, rstd = ctx.saved_tensors
    nd = ctx.needs_input_grad
    needs = [nd[0] or (ctx.has_residual and nd[1]), nd[3], nd[4]]
    dz, dw, db = torch.ops.moebert.expert_layer_norm_bwd(grad_y, x, residual, expert_ids, weight, mean, rstd,
                                                         ctx.backend, needs)
    x_dt, r_dt, w_dt, b_dt = ctx.dtypes
    dx = dz.to(x_dt) if nd[0] else None
    dr = dz.to(r_dt) if ctx.has_residual and nd[1] else None
    return dx, dr, None, dw.to(w_dt) if nd[3] else None, db.to(b_dt) if nd[4] else None, None, None


_fwd.register_autograd(_backward, setup_context=_setup_context)


# ---- public entry point -------------------------------------------------------------------------

def check_expert_layer_norm_inputs(x, expert_ids, weight, bias, residual=None) -> None:
    """Raise TypeError/ValueError naming the first problem; touches nothing."""
    for name, t in (("x", x), ("expert_ids", expert_ids), ("weight", weight), ("bias", bias), ("residual", residual)):
        if t is None and name == "residual":
            continue
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if name == "expert_ids":
            if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
                raise TypeError(f"expert_ids must be an integer tensor, got {t.dtype}")
        elif not t.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor, got {t.dtype}")
        if t.device != x.device:
            raise ValueError(f"{name} is on {t.device} but x is on {x.device}")
    if x.dim() != 2:
        raise ValueError(f"x must be [T, d], got shape {tuple(x.shape)}")
    T, d = x.shape
    if weight.dim() != 2 or weight.shape[1] != d:
        raise ValueError(f"weight must be [E, d={d}], got shape {tuple(weight.shape)}")
    if tuple(bias.shape) != tuple(weight.shape):
        raise ValueError(f"bias must be [E, d] = {tuple(weight.shape)}, got {tuple(bias.shape)}")
    if tuple(expert_ids.shape) != (T,):
        raise ValueError(f"expert_ids must be [T] = ({T},), got shape {tuple(expert_ids.shape)}")
    if residual is not None and tuple(residual.shape) != (T, d):
        raise ValueError(f"residual must be [T, d] = {(T, d)}, got shape {tuple(residual.shape)}")


def expert_layer_norm(x: Tensor, expert_ids: Tensor, weight: Tensor, bias: Tensor, eps: float = 1e-12,
                      residual: Optional[Tensor] = None, backend: Optional[str] = None) -> Tensor:
    """``LayerNorm(x + residual)`` with token t using ``weight[expert_ids[t]]`` and ``bias[expert_ids[t]]``.

    An id outside ``[0, E)`` raises a ValueError on CPU and trips a device-side assert on CUDA (no host
    sync), as in the routing path; see the module docstring for dtypes.
    """
    check_expert_layer_norm_inputs(x, expert_ids, weight, bias, residual)
    check_expert_ids(expert_ids, weight.shape[0])  # the kernels read weight[expert_ids[t]]
    name = select_backend("expert_layer_norm", x.device, backend)
    y, _, _ = torch.ops.moebert.expert_layer_norm_fwd(x, residual, expert_ids, weight, bias, float(eps), name)
    return y
