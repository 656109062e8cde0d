"""DistillationLoss: MoEBERT's layer-wise distillation objective as an nn.Module over ``ops.distill_loss``."""
from __future__ import annotations

from typing import Optional, Sequence

from torch import Tensor, nn

from ..ops.distill_loss import PRED_LOSSES, DistillOutput, distill_loss

__all__ = ["DistillationLoss", "DistillOutput"]


class DistillationLoss(nn.Module):
    """``L = alpha_ce * CE + lam * (sum_l w_l * MSE(h_s_l, h_t_l) + L_pred)``; returns a :class:`DistillOutput`.

    Pass every hidden state (HF ``output_hidden_states=True``: the embedding output plus each layer) for the
    student and the teacher, and the logits (``[B, C]``, or ``(start, end)`` for SQuAD). The loss conventions
    (MoEBERT's: mean-over-elements MSE with padding, ``0.5 * (KL + KL)`` per example) are in
    ``moebert_kernels.ops.distill_loss``. ``mask_padding=True`` with ``attention_mask`` leaves padding out of
    the hidden-state MSE. The teacher gets no gradient.
    """

    def __init__(self, lam: float = 1.0, alpha_ce: float = 1.0, pred_loss: str = "sym_kl", temperature: float = 1.0,
                 layer_weights: Optional[Sequence[float]] = None, mask_padding: bool = False,
                 backend: Optional[str] = None):
        super().__init__()
        if pred_loss not in PRED_LOSSES:
            raise ValueError(f"pred_loss must be one of {PRED_LOSSES}, got {pred_loss!r}")
        if not float(temperature) > 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self.lam = float(lam)
        self.alpha_ce = float(alpha_ce)
        self.pred_loss = pred_loss
        self.temperature = float(temperature)
        # Plain floats, not a buffer: they are hyper-parameters, and a tensor would cost a host sync per call.
        self.layer_weights = None if layer_weights is None else [float(w) for w in layer_weights]
        self.mask_padding = bool(mask_padding)
        self.backend = backend

    def forward(self, student_hidden: Sequence[Tensor], teacher_hidden: Sequence[Tensor], student_logits,
                teacher_logits, labels=None, attention_mask: Optional[Tensor] = None) -> DistillOutput:
        return distill_loss(student_hidden, teacher_hidden, student_logits, teacher_logits, labels, attention_mask,
                            layer_weights=self.layer_weights, lam=self.lam, alpha_ce=self.alpha_ce,
                            pred_loss=self.pred_loss, temperature=self.temperature, mask_padding=self.mask_padding,
                            backend=self.backend)

    def extra_repr(self) -> str:
        return (f"lam={self.lam}, alpha_ce={self.alpha_ce}, pred_loss={self.pred_loss!r}, "
                f"temperature={self.temperature}, mask_padding={self.mask_padding}, backend={self.backend!r}")
