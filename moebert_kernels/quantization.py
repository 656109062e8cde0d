"""``quantize_dynamic(model)``: int8 dynamic quantization of a MoEBERT student (or a dense model) for the CPU.

Named and shaped after ``torch.ao.quantization.quantize_dynamic(model, qconfig_spec, dtype, inplace)``, the
call people already make to serve BERT on a CPU: swapping it for this one is the whole change. (torchao's
``quantize_(model, config)`` works in place on tensor subclasses; on this project's CPU its int8 path was no
faster than fp32, so the fbgemm path of ``torch.ao`` is the one used, for the experts and the rest.)

``torch.ao``'s call alone leaves the experts float: they are parameters of ``MoEFeedForward``, not
``nn.Linear``s. This one quantizes every ``nn.Linear`` as ``torch.ao`` does (attention, pooler, heads) and
every MoE layer with ``QuantizedMoEFeedForward`` (int8 experts and shared FFN). Gate routers keep their
small ``d -> E`` projection in float, so the int8 student routes every token as the float student does.
"""
from __future__ import annotations

import copy
import warnings

import torch
from torch import nn

from .modules.moe import DeferredExpertLayerNorm, MoEFeedForward
from .modules.quantized import QuantizedMoEFeedForward
from .modules.routers import TokenGate

__all__ = ["quantize_dynamic"]


def quantize_dynamic(model: nn.Module, dtype: torch.dtype = torch.qint8, inplace: bool = False) -> nn.Module:
    """int8 weights, activations quantized at run time, for CPU inference.

    Args:
        model: a float32 model on the CPU: a patched student (``moebert_kernels.patch`` /
            ``from_pretrained``), a dense model or any module; it is put in eval mode.
        dtype: ``torch.qint8`` (the only one: int8 weights).
        inplace: quantize ``model`` itself instead of a deep copy.

    Returns the quantized model; it takes the same inputs and returns the same outputs. Save it with
    ``torch.save(q.state_dict(), f)``; load by quantizing the float model again and ``q.load_state_dict(...)``.
    """
    if dtype != torch.qint8:
        raise ValueError(f"quantize_dynamic supports dtype=torch.qint8 only, got {dtype}")
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    for name, p in model.named_parameters():
        if p.device.type != "cpu" or p.dtype != torch.float32:
            raise TypeError(f"int8 dynamic quantization needs a float32 model on the CPU; parameter {name!r} is "
                            f"{p.dtype} on {p.device.type}: call model.float().cpu() first")
    if not inplace:
        model = copy.deepcopy(model)
    model.eval()
    swapped = {}
    for parent in list(model.modules()):
        for child_name, child in list(parent.named_children()):
            if isinstance(child, MoEFeedForward) and not isinstance(child, QuantizedMoEFeedForward):
                q = swapped.get(id(child))
                if q is None:
                    q = swapped[id(child)] = QuantizedMoEFeedForward.from_float(child)
                setattr(parent, child_name, q)
    for m in model.modules():  # DistilBERT's deferred LayerNorm points at its FFN (not a submodule)
        if isinstance(m, DeferredExpertLayerNorm) and id(m._moe) in swapped:
            object.__setattr__(m, "_moe", swapped[id(m._moe)])
    # Every nn.Linear but a gate's: a flipped top-1 choice costs more than the d x E projection saves.
    spec = {nn.Linear: torch.ao.quantization.default_dynamic_qconfig}
    for name, m in model.named_modules():
        if isinstance(m, TokenGate):
            spec.update({f"{name}.{sub}" if sub else name: None for sub, _ in m.named_modules()})
    with warnings.catch_warnings():  # torch.ao's notice points to torchao, slower on CPU (module docstring)
        warnings.filterwarnings("ignore", message=".*deprecat.*")
        torch.ao.quantization.quantize_dynamic(model, spec, dtype=torch.qint8, inplace=True)
    return model

