"""distill_loss: MoEBERT's layer-wise distillation loss, fused, with the student gradients made in the forward.

    L = alpha_ce * CE + lam * (sum_l w_l * MSE(h_s_l, h_t_l) + L_pred)

Conventions (checked against MoEBERT's ``modeling_bert_moe.py``, ``get_distillation_loss``):
- ``MSE(h_s_l, h_t_l)`` is ``nn.MSELoss()``: the mean over *all* elements ``B*S*H``, padding included, and the
  layer terms are summed (``w_l = 1``) over every hidden state given (BERT: the embedding output + 12 layers).
  ``mask_padding=True`` (not MoEBERT's behaviour) averages over real tokens only:
  ``sum_{b,s real, h} (h_s - h_t)^2 / (#real tokens * H)``; with no real token at all the term is 0, never NaN.
- ``pred_loss="sym_kl"`` (MoEBERT's default) is MoEBERT's ``symmetric_KL_loss(p_s, p_t) / B``:
  ``0.5 * (KL(p_t||p_s) + KL(p_s||p_t))`` summed over classes, averaged over the batch. Note the 0.5: MoEBERT's
  code has it, so ``sym_kl`` here is half of the bare sum ``KL + KL``. With ``temperature`` T != 1 both
  distributions are softmax(z/T) and the term is scaled by T^2 (at T=1, MoEBERT exactly).
  ``"kl"`` is ``T^2 * KL(p_t||p_s)`` averaged over the batch (Hinton KD). ``"mse"`` is the mean over ``B*C``
  of ``(z_s - z_t)^2``.
- Regression heads (``C == 1``): CE becomes ``mean_b (z_s - y)^2`` against float labels and the prediction term is
  always the MSE ``mean_b (z_s - z_t)^2`` (MoEBERT: ``MSELoss()(logits, teacher_logits)``), whatever ``pred_loss``.
- SQuAD: logits are a pair ``(start [B,S], end [B,S])``, labels a pair ``(start_positions, end_positions)``.
  Positions are the classes. CE is the *mean* of the start and end CE, and so is L_pred (MoEBERT:
  ``(pred_start + pred_end) * 0.5``). The attention mask does not mask positions in the prediction term.
- Labels ``-100`` are ignored (PyTorch's ``ignore_index``); CE averages over the remaining rows (0 if none).
- Teacher tensors are constants: no gradient flows into them (as with ``.detach()``).

Dataflow: ``distill_loss`` validates, picks a backend (``dispatch.select_backend``) and calls
``torch.ops.moebert.distill_loss_fwd``, which returns the statistics ``[loss, ce, hidden_mse, pred, per_layer...]``
plus the gradients of ``loss`` with respect to every student tensor (computed in the same pass). Autograd's
backward only multiplies those saved gradients by ``grad_output`` (in place in eager mode, so no second copy).

Backend contract (a module registered for op "distill_loss" exposes):
``distill_loss_forward(student_hidden, teacher_hidden, student_logits, teacher_logits, labels, attention_mask,
layer_weights, lam, alpha_ce, pred_loss, temperature, compute_grad) -> (stats, grad_hidden, grad_logits)``
with list arguments (``student_logits``: one ``[B,C]`` tensor or the SQuAD pair; ``labels``: [] or one per head),
``attention_mask`` None unless padding is masked, ``stats`` of dtype :func:`stats_dtype` and the gradients in
the student dtypes (empty lists when ``compute_grad`` is False). This file holds the ``torch`` backend: the
kernels' closed-form gradients written in plain PyTorch. The fused backends share :func:`hidden_plan` and :func:`logits_plan` from here.
"""
from __future__ import annotations

import functools
from typing import NamedTuple, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor

from .dispatch import get_impl, register_impl, select_backend

__all__ = ["DistillOutput", "PRED_LOSSES", "IGNORE_INDEX", "check_distill_inputs", "distill_loss",
           "distill_loss_reference"]

PRED_LOSSES = ("sym_kl", "kl", "mse")
IGNORE_INDEX = -100

register_impl("distill_loss", "torch", __name__)
register_impl("distill_loss", "triton", "moebert_kernels.triton.distill_loss")
register_impl("distill_loss", "cuda", "moebert_kernels.cuda.distill_loss")

Logits = Union[Tensor, Sequence[Tensor]]


class DistillOutput(NamedTuple):
    """``loss`` is differentiable w.r.t. the student tensors; the rest are detached, for logging.

    ``ce`` is 0 without labels; ``hidden_mse`` is ``sum_l w_l * per_layer[l]``; ``per_layer`` is ``[L]``, unweighted.
    """
    loss: Tensor
    ce: Tensor
    hidden_mse: Tensor
    pred: Tensor
    per_layer: Tensor


def stats_dtype(student_hidden: Sequence[Tensor], student_logits: Sequence[Tensor]) -> torch.dtype:
    """float64 if any student tensor is float64, else float32: the dtype of the loss and its components."""
    return torch.float64 if any(t.dtype == torch.float64 for t in (*student_hidden, *student_logits)) else torch.float32


# ---- reference: the oracle ------------------------------------------------------------------

def _pred_term(s: Tensor, t: Tensor, pred_loss: str, temperature: float) -> Tensor:
    """Prediction loss of one head ``[B, C]``, already in the accumulation dtype."""
    B, C = s.shape
    if C == 1 or pred_loss == "mse":
        return (s - t).square().mean()
    ls, lt = F.log_softmax(s / temperature, dim=-1), F.log_softmax(t / temperature, dim=-1)
    if pred_loss == "sym_kl":
        row = 0.5 * ((ls.exp() - lt.exp()) * (ls - lt)).sum(-1)
    else:  # "kl": KL(p_t || p_s)
        row = (lt.exp() * (lt - ls)).sum(-1)
    return row.sum() / B * temperature ** 2


def _ce_term(s: Tensor, y: Tensor) -> Tensor:
    if s.shape[1] == 1:  # regression against float labels
        return (s.reshape(-1) - y.reshape(-1).to(s.dtype)).square().mean()
    y = y.reshape(-1)
    n_valid = (y != IGNORE_INDEX).sum().clamp(min=1)
    return F.cross_entropy(s, y, ignore_index=IGNORE_INDEX, reduction="sum") / n_valid


def _reference_terms(student_hidden, teacher_hidden, student_logits, teacher_logits, labels, attention_mask,
                     layer_weights, lam, alpha_ce, pred_loss, temperature):
    """Everything as lists (see the backend contract). Returns (loss, ce, hidden_mse, pred, per_layer)."""
    acc = stats_dtype(student_hidden, student_logits)
    per_layer = []
    for hs, ht in zip(student_hidden, teacher_hidden):
        d = hs.to(acc) - ht.detach().to(acc)
        if attention_mask is None:
            per_layer.append(d.square().mean())
        else:
            m = (attention_mask != 0).to(acc)
            n = m.sum().clamp(min=1) * d.shape[-1]
            per_layer.append((d.square() * m.unsqueeze(-1)).sum() / n)
    per_layer = torch.stack(per_layer) if per_layer else student_logits[0].new_zeros(0, dtype=acc)
    w = torch.tensor(list(layer_weights), dtype=acc, device=per_layer.device)
    hidden = (per_layer * w).sum()
    heads = len(student_logits)
    pred = sum(_pred_term(s.to(acc), t.detach().to(acc), pred_loss, temperature)
               for s, t in zip(student_logits, teacher_logits)) / heads
    if labels:
        ce = sum(_ce_term(s.to(acc), y) for s, y in zip(student_logits, labels)) / heads
    else:
        ce = hidden.new_zeros(())
    loss = alpha_ce * ce + lam * (hidden + pred)
    return loss, ce, hidden, pred, per_layer


def distill_loss_reference(
    student_hidden: Sequence[Tensor],
    teacher_hidden: Sequence[Tensor],
    student_logits: Logits,
    teacher_logits: Logits,
    labels=None,
    attention_mask: Optional[Tensor] = None,
    *,
    layer_weights: Optional[Sequence[float]] = None,
    lam: float = 1.0,
    alpha_ce: float = 1.0,
    pred_loss: str = "sym_kl",
    temperature: float = 1.0,
    mask_padding: bool = False,
) -> DistillOutput:
    """Plain-PyTorch oracle, differentiable; math in float32 (float64 for float64 inputs), as MoEBERT under AMP."""
    args = check_distill_inputs(student_hidden, teacher_hidden, student_logits, teacher_logits, labels,
                                attention_mask, layer_weights, lam, alpha_ce, pred_loss, temperature, mask_padding)
    loss, ce, hidden, pred, per_layer = _reference_terms(*args)
    return DistillOutput(loss, ce.detach(), hidden.detach(), pred.detach(), per_layer.detach())


# ---- torch backend: the same closed-form gradients as the kernels, in plain PyTorch -----------------
# (Autograd cannot run inside a custom op's implementation, so this backend writes the gradients out by hand;
# the tests hold it, like the kernels, against the autograd reference above.)

def _logits_rows(s, t, y, ce_norm, pred_norm, kind, alpha_ce, lam, temperature, compute_grad):
    """One head ``[B, C]`` (accumulation dtype): ``(row_ce [B], row_pred [B], grad [B, C] or None)``."""
    B, C = s.shape
    g = None
    if C == 1:
        pd = (s - t)[:, 0]
        row_pred = pd.square()
        g = (lam * pred_norm * 2.0) * pd
        row_ce = s.new_zeros(B)
        if y is not None:
            cd = s[:, 0] - y.to(s.dtype)
            row_ce = cd.square()
            g = g + (alpha_ce * ce_norm * 2.0) * cd
        return row_ce, row_pred, g[:, None] if compute_grad else None
    T = temperature
    if kind == 2:
        row_pred = (s - t).square().sum(1)
        gp = 2.0 * (s - t)
    else:
        zs, zt = s / T, t / T
        ps, pt = F.softmax(zs, -1), F.softmax(zt, -1)
        dz = zs - zt
        if kind == 0:
            row_pred = 0.5 * T * T * ((ps - pt) * dz).sum(1)
            gp = 0.5 * T * (ps * (dz - (ps * dz).sum(1, keepdim=True)) + ps - pt)
        else:
            row_pred = T * T * (pt * (F.log_softmax(zt, -1) - F.log_softmax(zs, -1))).sum(1)
            gp = T * (ps - pt)
    grad = (lam * pred_norm) * gp
    row_ce = s.new_zeros(B)
    if y is not None:
        keep = y != IGNORE_INDEX
        ys = torch.where(keep, y, 0)
        row_ce = -F.log_softmax(s, -1).gather(1, ys[:, None])[:, 0] * keep
        gce = F.softmax(s, -1) - F.one_hot(ys, C).to(s.dtype)
        grad = grad + (alpha_ce * ce_norm * keep.to(s.dtype))[:, None] * gce
    return row_ce, row_pred, grad if compute_grad else None


def distill_loss_forward(student_hidden, teacher_hidden, student_logits, teacher_logits, labels, attention_mask,
                         layer_weights, lam, alpha_ce, pred_loss, temperature, compute_grad):
    acc = stats_dtype(student_hidden, student_logits)
    grad_hidden, sq_sums = [], []
    per_layer = student_logits[0].new_zeros(0, dtype=acc)
    if student_hidden:
        coef, mask, inv_count = hidden_plan(student_hidden, attention_mask, layer_weights, lam)
        for hs, ht, c in zip(student_hidden, teacher_hidden, coef):
            # One temporary per layer, updated in place: the difference, then (after its dot) the gradient.
            d = torch.sub(hs.to(acc), ht.to(acc))
            if mask is not None:
                d.mul_(mask.to(acc).view(*d.shape[:2], 1))
                c = c * inv_count.to(acc)
            flat = d.reshape(-1)
            sq_sums.append(torch.dot(flat, flat))
            if compute_grad:
                grad_hidden.append(d.mul_(c).to(hs.dtype))
        per_layer = hidden_stats(torch.stack(sq_sums), student_hidden, attention_mask, inv_count)
    labels_2d, ce_norm, pred_norm, kind = logits_plan(student_logits, labels, pred_loss)
    rows_ce, rows_pred, grad_logits = [], [], []
    for h, (s, t) in enumerate(zip(student_logits, teacher_logits)):
        y = labels_2d[h] if labels_2d is not None else None
        cn = ce_norm[h].to(acc)
        r_ce, r_pred, g = _logits_rows(s.to(acc), t.to(acc), y, cn, pred_norm[h].to(acc), kind, alpha_ce, lam,
                                       temperature, compute_grad)
        rows_ce.append(r_ce)
        rows_pred.append(r_pred)
        if compute_grad:
            grad_logits.append(g.to(s.dtype))
    stats = combine_stats(per_layer, layer_weights, torch.stack(rows_ce), torch.stack(rows_pred), ce_norm,
                          pred_norm, lam, alpha_ce, acc)
    return stats, grad_hidden, grad_logits


# ---- helpers shared by the fused backends ------------------------------------------------------

@functools.lru_cache(maxsize=256)
def device_constant(values: tuple, dtype: torch.dtype, device: torch.device) -> Tensor:
    """A small constant tensor, built once per (values, dtype, device) and never written.

    Building it per call would be a host-to-device copy on every step: a host sync, and an operation a CUDA
    graph cannot capture (the first call, which builds it, belongs in the warm-up before a capture).
    """
    return torch.tensor(values, dtype=dtype, device=device)


def hidden_plan(student_hidden, attention_mask, layer_weights, lam):
    """Per-layer constants of the fused hidden-state pass.

    Returns ``(coef, mask, inv_count)``: ``coef[l]`` (python floats) is ``2*lam*w_l/denominator`` where the
    denominator is ``numel`` unmasked and ``H_l`` masked; masked, the kernel also multiplies by ``inv_count``
    (a device fp32 ``[1]`` holding ``1/max(#real tokens, 1)``), so no host sync is needed. ``mask`` is fp32 ``[B*S]``.
    """
    if attention_mask is None:
        coef = [2.0 * lam * w / max(h.numel(), 1) for h, w in zip(student_hidden, layer_weights)]
        return coef, None, None
    mask = (attention_mask != 0).to(torch.float32).reshape(-1).contiguous()
    inv_count = (1.0 / mask.sum().clamp(min=1.0)).reshape(1)
    coef = [2.0 * lam * w / h.shape[-1] for h, w in zip(student_hidden, layer_weights)]
    return coef, mask, inv_count


def hidden_stats(sq_sums: Tensor, student_hidden, attention_mask, inv_count) -> Tensor:
    """Per-layer MSE ``[L]`` fp32 from the kernels' per-layer sums of squared differences."""
    if inv_count is None:
        den = device_constant(tuple(float(max(h.numel(), 1)) for h in student_hidden), torch.float32, sq_sums.device)
        return sq_sums / den
    H = device_constant(tuple(float(h.shape[-1]) for h in student_hidden), torch.float32, sq_sums.device)
    return sq_sums * inv_count / H


PRED_KIND = {"sym_kl": 0, "kl": 1, "mse": 2}


def logits_plan(student_logits, labels, pred_loss):
    """Row-normalisers of the fused logits pass (device fp32, no host sync).

    Returns ``(labels_2d, ce_norm [heads], pred_norm [heads], pred_kind)``: ``labels_2d`` is ``[heads, B]``
    (int64 class ids, or fp32 targets for a regression head) or None; a head's CE is
    ``ce_norm[h] * sum_b row_ce``, its prediction loss ``pred_norm[h] * sum_b row_pred``.
    """
    heads = len(student_logits)
    B, C = student_logits[0].shape
    dev = student_logits[0].device
    regression = C == 1
    kind = 2 if regression else PRED_KIND[pred_loss]
    pred_den = B * C if kind == 2 else B
    pred_norm = torch.full((heads,), 1.0 / (heads * max(pred_den, 1)), device=dev)
    if not labels:
        return None, pred_norm.new_zeros(heads), pred_norm, kind
    if regression:
        y = labels[0].reshape(1, B).to(torch.float32).contiguous()
        ce_norm = torch.full((heads,), 1.0 / (heads * max(B, 1)), device=dev)
        return y, ce_norm, pred_norm, kind
    y = torch.stack([t.reshape(B).to(torch.int64) for t in labels])
    n_valid = (y != IGNORE_INDEX).sum(1).clamp(min=1).to(torch.float32)
    return y, 1.0 / (heads * n_valid), pred_norm, kind


def combine_stats(per_layer: Tensor, layer_weights, row_ce: Tensor, row_pred: Tensor, ce_norm: Tensor,
                  pred_norm: Tensor, lam: float, alpha_ce: float, dtype: torch.dtype) -> Tensor:
    """``[loss, ce, hidden_mse, pred, per_layer...]`` from the per-layer MSEs and the per-row terms ``[heads, B]``."""
    w = device_constant(tuple(layer_weights), per_layer.dtype, per_layer.device)
    hidden = (per_layer * w).sum()
    ce = (row_ce * ce_norm[:, None]).sum()
    pred = (row_pred * pred_norm[:, None]).sum()
    loss = alpha_ce * ce + lam * (hidden + pred)
    return torch.cat([torch.stack([loss, ce, hidden, pred]), per_layer]).to(dtype)


# ---- torch.library registration -----------------------------------------------------------------

@torch.library.custom_op("moebert::distill_loss_fwd", mutates_args=())
def _distill_loss_fwd(
    student_hidden: list[Tensor],
    teacher_hidden: list[Tensor],
    student_logits: list[Tensor],
    teacher_logits: list[Tensor],
    labels: list[Tensor],
    attention_mask: Optional[Tensor],
    layer_weights: list[float],
    lam: float,
    alpha_ce: float,
    pred_loss: str,
    temperature: float,
    backend: str,
    compute_grad: bool,
) -> tuple[Tensor, list[Tensor], list[Tensor]]:
    stats, gh, gl = get_impl("distill_loss", backend).distill_loss_forward(
        student_hidden, teacher_hidden, student_logits, teacher_logits, labels, attention_mask, layer_weights,
        lam, alpha_ce, pred_loss, temperature, compute_grad)
    return stats, list(gh), list(gl)


@_distill_loss_fwd.register_fake
def _(student_hidden, teacher_hidden, student_logits, teacher_logits, labels, attention_mask, layer_weights, lam,
      alpha_ce, pred_loss, temperature, backend, compute_grad):
    dtype = stats_dtype(student_hidden, student_logits)
    stats = student_logits[0].new_empty(4 + len(student_hidden), dtype=dtype)
    if not compute_grad:
        return stats, [], []
    return stats, [torch.empty_like(t) for t in student_hidden], [torch.empty_like(t) for t in student_logits]


def _setup_context(ctx, inputs, output):
    _, grad_hidden, grad_logits = output
    ctx.n_hidden = len(grad_hidden)
    # The gradient outputs are never differentiated; without this autograd would zero-fill a [B, S, H] grad for
    # each of them in every backward.
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(*grad_hidden, *grad_logits)
    ctx.compute_grad = inputs[-1]
    # Gradients must mirror the inputs' structure: a list of Nones for each Tensor-list input; the float list
    # layer_weights counts as one leaf, except when it is empty (no hidden states).
    ctx.n_teacher, ctx.n_teacher_logits, ctx.n_labels, ctx.n_weights = (len(inputs[i]) for i in (1, 3, 4, 6))


def _backward(ctx, grad_stats, _grad_hidden, _grad_logits):
    if not ctx.compute_grad:
        raise RuntimeError("distill_loss was called without gradients (no student tensor required grad)")
    # Only stats[0] (the loss) is differentiable; the components are handed out detached.
    go = grad_stats[0]
    saved = ctx.saved_tensors
    traced = torch.compiler.is_compiling() or any(type(t) is not Tensor for t in (go, *saved))
    if not traced and go.device.type == "cpu" and go.numel() == 1 and float(go) == 1.0:
        # The usual loss.backward(): on CPU reading go is free, and skipping the scale saves a pass over every grad.
        scaled = list(saved)
    elif traced or torch.is_grad_enabled():
        # Under tracing (torch.compile, AOT, fake tensors) or create_graph, stay functional.
        scaled = [g * go.to(g.dtype) for g in saved]
    else:
        # In place, as Liger's cross entropy: the saved gradients are private to this graph, and scaling them
        # avoids a second copy of every hidden-state gradient. A second backward (retain_graph) hits the
        # version-counter check on ctx.saved_tensors and raises.
        scaled = [g.mul_(go) for g in saved]
    nones = lambda n: [None] * n  # noqa: E731
    return (scaled[:ctx.n_hidden], nones(ctx.n_teacher), scaled[ctx.n_hidden:], nones(ctx.n_teacher_logits),
            nones(ctx.n_labels), None, [] if ctx.n_weights == 0 else None, None, None, None, None, None, None)


_distill_loss_fwd.register_autograd(_backward, setup_context=_setup_context)


# ---- validation and the public entry point ----------------------------------------------------------

def _as_heads(name: str, logits) -> list[Tensor]:
    if isinstance(logits, Tensor):
        if logits.dim() != 2:
            raise ValueError(f"{name} must be [B, C] (or a (start, end) pair of [B, S]), got shape {tuple(logits.shape)}")
        return [logits]
    if isinstance(logits, (tuple, list)) and len(logits) == 2 and all(isinstance(t, Tensor) for t in logits):
        for part, t in zip(("start", "end"), logits):
            if t.dim() != 2:
                raise ValueError(f"{name} {part} logits must be [B, S], got shape {tuple(t.shape)}")
        if logits[0].shape != logits[1].shape:
            raise ValueError(f"{name} start and end logits differ in shape: {tuple(logits[0].shape)} vs "
                             f"{tuple(logits[1].shape)}")
        return list(logits)
    raise TypeError(f"{name} must be a Tensor [B, C] or a (start, end) pair of Tensors, got {type(logits).__name__}")


def _check_labels(labels, heads: list[Tensor], squad: bool) -> list[Tensor]:
    B, C = heads[0].shape
    if squad:
        if not (isinstance(labels, (tuple, list)) and len(labels) == 2):
            raise TypeError("with (start, end) logits, labels must be a (start_positions, end_positions) pair")
        parts = list(zip(("start_positions", "end_positions"), labels))
    else:
        parts = [("labels", labels)]
    out = []
    for name, y in parts:
        if not isinstance(y, Tensor):
            raise TypeError(f"{name} must be a Tensor, got {type(y).__name__}")
        if y.numel() != B or (y.dim() > 1 and y.shape[0] != B):
            raise ValueError(f"{name} must be [B] = ({B},), got shape {tuple(y.shape)}")
        if y.device != heads[0].device:
            raise ValueError(f"{name} is on {y.device} but the logits are on {heads[0].device}")
        if C == 1 and not squad:
            if not (y.is_floating_point() or y.dtype in (torch.int32, torch.int64)):
                raise TypeError(f"regression labels (C=1) must be float, got {y.dtype}")
        else:
            if y.is_floating_point() or y.dtype == torch.bool:
                raise TypeError(f"{name} must be integer class ids, got {y.dtype}")
            if not torch.compiler.is_compiling():  # one small host sync; skipped inside a compiled graph
                bad = ((y < 0) & (y != IGNORE_INDEX)) | (y >= C)
                if bool(bad.any()):
                    v = int(y.reshape(-1)[bad.reshape(-1)][0])
                    what = "positions" if squad else "classes"
                    raise ValueError(f"{name} out of range: got {v}, expected 0 <= label < {C} ({what}) or "
                                     f"{IGNORE_INDEX} (ignored)")
        out.append(y)
    return out


def check_distill_inputs(student_hidden, teacher_hidden, student_logits, teacher_logits, labels=None,
                         attention_mask=None, layer_weights=None, lam=1.0, alpha_ce=1.0, pred_loss="sym_kl",
                         temperature=1.0, mask_padding=False):
    """Raise TypeError/ValueError naming the first problem.

    Returns the normalised list form ``(student_hidden, teacher_hidden, student_logits, teacher_logits, labels,
    attention_mask or None, layer_weights, lam, alpha_ce, pred_loss, temperature)``.
    """
    for name, seq in (("student_hidden", student_hidden), ("teacher_hidden", teacher_hidden)):
        if isinstance(seq, Tensor) or not isinstance(seq, (list, tuple)):
            raise TypeError(f"{name} must be a list or tuple of Tensors, got {type(seq).__name__}")
        for i, t in enumerate(seq):
            if not isinstance(t, Tensor):
                raise TypeError(f"{name}[{i}] must be a Tensor, got {type(t).__name__}")
    if len(student_hidden) != len(teacher_hidden):
        raise ValueError(f"student_hidden has {len(student_hidden)} tensors but teacher_hidden has "
                         f"{len(teacher_hidden)}; pass one teacher hidden state per student hidden state")
    sl = _as_heads("student_logits", student_logits)
    tl = _as_heads("teacher_logits", teacher_logits)
    if len(sl) != len(tl):
        raise ValueError("student_logits and teacher_logits must both be [B, C] tensors or both (start, end) pairs")
    squad = len(sl) == 2
    if sl[0].shape[1] != tl[0].shape[1]:
        what = "positions" if squad else "class counts"
        raise ValueError(f"student and teacher logits have different {what}: {sl[0].shape[1]} vs {tl[0].shape[1]}")
    if sl[0].shape != tl[0].shape:
        raise ValueError(f"student_logits {tuple(sl[0].shape)} and teacher_logits {tuple(tl[0].shape)} differ in shape")
    B = sl[0].shape[0]
    dev = sl[0].device
    for t in sl + tl:
        if not t.is_floating_point():
            raise TypeError(f"logits must be floating point, got {t.dtype}")
        if t.device != dev:
            raise ValueError(f"all logits must be on one device; got {t.device} and {dev}")
    if tl[0].dtype != sl[0].dtype or any(t.dtype != sl[0].dtype for t in sl + tl):
        raise TypeError(f"student and teacher logits must share one dtype; got {sl[0].dtype} and {tl[0].dtype}")
    hdtype = student_hidden[0].dtype if student_hidden else None
    for i, (hs, ht) in enumerate(zip(student_hidden, teacher_hidden)):
        if hs.shape != ht.shape:
            raise ValueError(f"hidden state {i}: student shape {tuple(hs.shape)} != teacher shape {tuple(ht.shape)}")
        if hs.dim() != 3:
            raise ValueError(f"hidden state {i} must be [B, S, H], got shape {tuple(hs.shape)}")
        if hs.shape[:2] != student_hidden[0].shape[:2]:
            raise ValueError(f"hidden state {i} is {tuple(hs.shape)} but hidden state 0 is "
                             f"{tuple(student_hidden[0].shape)}; all must share [B, S]")
        if hs.shape[0] != B:
            raise ValueError(f"hidden states have batch {hs.shape[0]} but the logits have batch {B}")
        if not hs.is_floating_point() or hs.dtype != hdtype or ht.dtype != hdtype:
            raise TypeError(f"hidden state {i}: student {hs.dtype} / teacher {ht.dtype}; all hidden states must "
                            f"share one floating-point dtype ({hdtype})")
        if hs.device != dev or ht.device != dev:
            raise ValueError(f"hidden state {i} is on {hs.device}/{ht.device} but the logits are on {dev}")
    L = len(student_hidden)
    if layer_weights is None:
        layer_weights = [1.0] * L
    else:
        if isinstance(layer_weights, Tensor):
            layer_weights = layer_weights.detach().reshape(-1).tolist()
        layer_weights = [float(w) for w in layer_weights]
        if len(layer_weights) != L:
            raise ValueError(f"layer_weights has {len(layer_weights)} entries but there are {L} hidden-state pairs")
    if pred_loss not in PRED_LOSSES:
        raise ValueError(f"pred_loss must be one of {PRED_LOSSES}, got {pred_loss!r}")
    if not float(temperature) > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    ys = _check_labels(labels, sl, squad) if labels is not None else []
    mask = None
    if mask_padding:
        if attention_mask is None:
            raise ValueError("mask_padding=True needs attention_mask [B, S]")
        if not isinstance(attention_mask, Tensor):
            raise TypeError(f"attention_mask must be a Tensor, got {type(attention_mask).__name__}")
        if L and tuple(attention_mask.shape) != tuple(student_hidden[0].shape[:2]):
            raise ValueError(f"attention_mask must be [B, S] = {tuple(student_hidden[0].shape[:2])}, "
                             f"got {tuple(attention_mask.shape)}")
        if attention_mask.device != dev:
            raise ValueError(f"attention_mask is on {attention_mask.device} but the logits are on {dev}")
        mask = attention_mask
    return (list(student_hidden), list(teacher_hidden), sl, tl, ys, mask, layer_weights, float(lam),
            float(alpha_ce), pred_loss, float(temperature))


def distill_loss(
    student_hidden: Sequence[Tensor],
    teacher_hidden: Sequence[Tensor],
    student_logits: Logits,
    teacher_logits: Logits,
    labels=None,
    attention_mask: Optional[Tensor] = None,
    *,
    layer_weights: Optional[Sequence[float]] = None,
    lam: float = 1.0,
    alpha_ce: float = 1.0,
    pred_loss: str = "sym_kl",
    temperature: float = 1.0,
    mask_padding: bool = False,
    backend: Optional[str] = None,
) -> DistillOutput:
    """MoEBERT's distillation loss; see the module docstring for the exact conventions."""
    sh, th, sl, tl, ys, mask, w, lam, alpha_ce, pred_loss, temperature = check_distill_inputs(
        student_hidden, teacher_hidden, student_logits, teacher_logits, labels, attention_mask, layer_weights, lam,
        alpha_ce, pred_loss, temperature, mask_padding)
    name = select_backend("distill_loss", sl[0].device, backend)
    compute_grad = torch.is_grad_enabled() and any(t.requires_grad for t in sh + sl)
    if name != "torch":
        # The fused kernels read flat memory; HF hidden states are contiguous already, so this rarely copies.
        sh, th, sl, tl = ([t.contiguous() for t in group] for group in (sh, th, sl, tl))
    # The teacher is a constant: detaching keeps a teacher that requires grad out of the graph.
    th, tl = [t.detach() for t in th], [t.detach() for t in tl]
    stats, _, _ = torch.ops.moebert.distill_loss_fwd(sh, th, sl, tl, ys, mask, w, lam, alpha_ce, pred_loss,
                                                     temperature, name, compute_grad)
    loss = stats[0]
    rest = stats.detach()
    return DistillOutput(loss, rest[1], rest[2], rest[3], rest[4:])
