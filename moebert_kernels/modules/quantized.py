"""QuantizedMoEFeedForward: a ``MoEFeedForward`` whose expert (and shared) FFN weights are int8, for CPU inference.

Built from a float layer with ``QuantizedMoEFeedForward.from_float(moe)`` (``moebert_kernels.quantize_dynamic``
does it for every layer of a model). Routing, dropout and the expert LayerNorm are the float module's own
code (this is a subclass); only ``experts()``, the GEMM part, runs ``ops.moe_ffn_int8``.

State dict: ``w1_q``/``w2_q`` (int8, the float layout ``[E, h, d]``/``[E, d, h]``), ``w1_scale``/``w2_scale``
(fp32 per output channel), with a shared FFN ``shared_w1_q``/``shared_w1_scale``/``shared_w2_q``/
``shared_w2_scale``; biases and LayerNorm stay float under their float names. The packed weights fbgemm
runs on are a cache built from these on first use and dropped whenever they may change (load, ``to()``,
copy, pickle), so they never go stale and never enter a checkpoint.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ..ops.moe_ffn_int8 import moe_ffn_int8, pack_experts, quantize_weight
from ..ops.routing import RoutingPlan
from .moe import MoEFeedForward

__all__ = ["QuantizedMoEFeedForward"]

_FLOAT_WEIGHTS = ("w1", "w2", "shared_w1", "shared_w2")


class QuantizedMoEFeedForward(MoEFeedForward):
    """``MoEFeedForward`` with int8 weights (per-output-channel scales) and dynamically quantized activations.

    Takes the arguments of ``MoEFeedForward`` and holds zero int8 weights with unit scales: build it with
    ``from_float``, or build the float model, quantize it and then ``load_state_dict`` a quantized checkpoint.
    Inference only, fp32 activations on the CPU (fbgemm/oneDNN, like ``torch.ao``'s dynamic ``nn.Linear``).
    """

    def __init__(self, hidden_size: int, expert_size: int, num_experts: int, *args, device=None, dtype=None,
                 **kwargs):
        if dtype not in (None, torch.float32):
            raise TypeError(f"a quantized MoE layer keeps its float parts in float32, got dtype={dtype}")
        super().__init__(hidden_size, expert_size, num_experts, *args, device="meta", **kwargs)
        for name in _FLOAT_WEIGHTS:  # the int8 buffers below replace them
            if getattr(self, name) is not None:
                delattr(self, name)
        kw = {"device": device}
        # biases and LayerNorm: float, real storage (the float __init__ made them on meta)
        for name in ("b1", "b2", "ln_weight", "ln_bias", "shared_b1"):
            p = getattr(self, name, None)
            if p is not None:
                setattr(self, name, torch.nn.Parameter(torch.zeros(p.shape, **kw), requires_grad=False))
        if self.expert_norm:
            self.ln_weight.data.fill_(1.0)
        E, d, h = num_experts, hidden_size, expert_size
        h_up = 2 * h if self.gated else h
        shapes = {"w1": (E, h_up, d), "w2": (E, d, h)}
        if self.shared_size:
            s = self.shared_size
            shapes.update(shared_w1=(2 * s if self.gated else s, d), shared_w2=(d, s))
        for name, shape in shapes.items():
            self.register_buffer(f"{name}_q", torch.zeros(shape, dtype=torch.int8, **kw))
            self.register_buffer(f"{name}_scale", torch.ones(shape[:-1], dtype=torch.float32, **kw))
        self._packed = None

    @classmethod
    @torch.no_grad()
    def from_float(cls, moe: MoEFeedForward) -> "QuantizedMoEFeedForward":
        """An int8 copy of ``moe`` that shares its router (the float layer is left as it was); inside a model it
        finds its call's routing state as every MoE layer does (``modules/routing_state.py``)."""
        if isinstance(moe, QuantizedMoEFeedForward):
            raise ValueError("this MoE layer is already quantized")
        if not isinstance(moe, MoEFeedForward):
            raise TypeError(f"from_float needs a MoEFeedForward, got {type(moe).__name__}")
        device = moe.w1.device
        if device.type != "cpu" or moe.w1.dtype != torch.float32:
            raise TypeError(f"int8 quantization needs a float32 model on the CPU, this layer is {moe.w1.dtype} on "
                            f"{device.type}: call model.float().cpu() first")
        q = cls(moe.hidden_size, moe.expert_size, moe.num_experts, router=None, activation=moe.activation,
                dropout=moe.dropout.p, layer_norm_eps=moe.layer_norm_eps, layer_idx=moe.layer_idx,
                fuse_norm=moe.fuse_norm, expert_norm=moe.expert_norm, bias=moe.b1 is not None,
                backend=moe.backend, device=device, shared_size=moe.shared_size)
        q.router = moe.router
        for name in ("b1", "b2", "ln_weight", "ln_bias", "shared_b1"):
            src = getattr(moe, name, None)
            if src is not None:
                getattr(q, name).copy_(src)
        for name in _FLOAT_WEIGHTS:
            w = getattr(moe, name, None)
            if w is not None:
                w_q, scale = quantize_weight(w)
                getattr(q, f"{name}_q").copy_(w_q)
                getattr(q, f"{name}_scale").copy_(scale)
        q.train(moe.training)
        return q

    # -- the packed-weight cache -----------------------------------------------------------
    def _packed_weights(self):
        packed = self._packed
        if packed is None:  # two threads may both build it: each gets a complete, equal copy
            up = pack_experts(self.w1_q, self.w1_scale, self.b1)
            down = pack_experts(self.w2_q, self.w2_scale, self.b2)
            shared = (None, None)
            if self.shared_size:
                b1s = None if self.shared_b1 is None else self.shared_b1[None]  # one "expert" each
                shared = (pack_experts(self.shared_w1_q[None], self.shared_w1_scale[None], b1s)[0],
                          pack_experts(self.shared_w2_q[None], self.shared_w2_scale[None], None)[0])
            self._packed = packed = (up, down, *shared)
        return packed

    def _load_from_state_dict(self, *args, **kwargs):
        self._packed = None
        super()._load_from_state_dict(*args, **kwargs)

    def _apply(self, fn, *args, **kwargs):
        self._packed = None
        return super()._apply(fn, *args, **kwargs)

    def __getstate__(self):
        state = super().__getstate__()
        return {**state, "_packed": None}

    # -- compute -------------------------------------------------------------------------
    @torch.compiler.disable  # fbgemm's packed weights are opaque to the compiler: this part runs eager
    def experts(self, x: Tensor, plan: RoutingPlan, gate: Optional[Tensor]) -> Tensor:
        up, down, shared_up, shared_down = self._packed_weights()
        return moe_ffn_int8(x, plan, up, down, gate, self.activation, shared_up, shared_down)

    def reset_parameters(self) -> None:
        if "w1" not in self._parameters:  # only the float __init__ calls this, on its meta weights
            raise RuntimeError("a quantized MoE layer cannot be re-initialised: quantize a float layer")
        super().reset_parameters()

    def extra_repr(self) -> str:
        return super().extra_repr() + ", int8"
