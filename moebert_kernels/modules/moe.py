"""MoEFeedForward: MoEBERT's expert FFN, out = LayerNorm_e(x + dropout(fc2_e(act(fc1_e(x))))).

Every expert owns fc1, fc2 (with its own b2) and its own LayerNorm, as in the
paper's code. The GEMMs go through ``ops.moe_ffn`` and the residual add + expert LayerNorm through
``ops.expert_layer_norm``; the module never picks a backend.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from ..ops import moe_ffn
from ..ops.expert_layer_norm import expert_layer_norm
from ..ops.moe_ffn import ACTIVATIONS
from ..ops.routing import RoutingPlan
from .routers import HashRouter, RoutingState, SentenceGate, TokenGate

__all__ = ["MoEFeedForward", "DeferredExpertLayerNorm"]


class MoEFeedForward(nn.Module):
    """Top-1 routed expert FFN with per-expert residual LayerNorm.

    Args:
        hidden_size: d.
        expert_size: h, the width of each expert.
        num_experts: E.
        router: a router from ``modules.routers``; None means the caller passes ``plan=``.
        activation: ``"gelu"`` (exact erf, BERT), ``"gelu_tanh"`` or ``"relu"``.
        dropout: applied to the FFN output before the residual add.
        layer_norm_eps: BERT uses 1e-12.
        layer_idx: which layer's plan to take from the model's ``RoutingState``.
        fuse_norm: False returns ``dropout(ffn(x))`` and leaves the residual LayerNorm to
            a ``DeferredExpertLayerNorm`` (DistilBERT applies it outside its FFN).
        backend: force a backend for this module; None lets the dispatch decide.

    Parameters are stacked over experts: ``w1 [E, h, d]``, ``b1 [E, h]``,
    ``w2 [E, d, h]``, ``b2 [E, d]``, ``ln_weight``/``ln_bias [E, d]``.
    After each forward, ``aux_loss`` holds the gate's load-balancing loss (None for hash routers).
    """

    def __init__(
        self,
        hidden_size: int,
        expert_size: int,
        num_experts: int,
        router: Optional[nn.Module] = None,
        activation: str = "gelu",
        dropout: float = 0.1,
        layer_norm_eps: float = 1e-12,
        layer_idx: int = 0,
        fuse_norm: bool = True,
        backend: Optional[str] = None,
        device=None,
        dtype=None,
    ):
        super().__init__()
        for name, v in (("hidden_size", hidden_size), ("expert_size", expert_size), ("num_experts", num_experts)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
        E, h, d = num_experts, expert_size, hidden_size
        kw = {"device": device, "dtype": dtype}
        self.hidden_size, self.expert_size, self.num_experts = d, h, E
        self.activation, self.layer_norm_eps, self.layer_idx = activation, layer_norm_eps, layer_idx
        self.fuse_norm, self.backend = fuse_norm, backend
        self.w1 = nn.Parameter(torch.empty(E, h, d, **kw))
        self.b1 = nn.Parameter(torch.empty(E, h, **kw))
        self.w2 = nn.Parameter(torch.empty(E, d, h, **kw))
        self.b2 = nn.Parameter(torch.empty(E, d, **kw))
        self.ln_weight = nn.Parameter(torch.ones(E, d, **kw))
        self.ln_bias = nn.Parameter(torch.zeros(E, d, **kw))
        self.dropout = nn.Dropout(dropout)
        self.router = router
        self.aux_loss: Optional[Tensor] = None
        self._routing: Optional[RoutingState] = None  # the model's, set by patch (not a submodule)
        self._last_plan: Optional[RoutingPlan] = None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for w, b in ((self.w1, self.b1), (self.w2, self.b2)):
            bound = w.shape[-1] ** -0.5
            nn.init.uniform_(w, -bound, bound)
            nn.init.uniform_(b, -bound, bound)
        nn.init.ones_(self.ln_weight)
        nn.init.zeros_(self.ln_bias)

    @torch.no_grad()
    def load_dense(self, w1: Tensor, b1: Tensor, w2: Tensor, b2: Tensor, ln_weight: Tensor, ln_bias: Tensor,
                   neuron_ids: Tensor) -> "MoEFeedForward":
        """Copy slices of a dense FFN (``w1 [d_ff, d]``, ``w2 [d, d_ff]``) into the experts.

        ``neuron_ids [E, h]`` says which dense neurons each expert keeps; b2 and the
        LayerNorm are copied to every expert.
        """
        E, h = self.num_experts, self.expert_size
        if tuple(neuron_ids.shape) != (E, h):
            raise ValueError(f"neuron_ids must be [E, h] = {(E, h)}, got {tuple(neuron_ids.shape)}")
        d_ff = w1.shape[0]
        if tuple(w1.shape) != (d_ff, self.hidden_size) or tuple(w2.shape) != (self.hidden_size, d_ff):
            raise ValueError(f"dense weights must be w1 [d_ff, d] and w2 [d, d_ff] with d={self.hidden_size}; "
                             f"got {tuple(w1.shape)} and {tuple(w2.shape)}")
        idx = neuron_ids.to(w1.device)
        self.w1.copy_(w1[idx])
        self.b1.copy_(b1[idx])
        self.w2.copy_(w2[:, idx].permute(1, 0, 2))
        self.b2.copy_(b2.expand(E, -1))
        self.ln_weight.copy_(ln_weight.expand(E, -1))
        self.ln_bias.copy_(ln_bias.expand(E, -1))
        return self

    # -- routing ---------------------------------------------------------------------
    def route(self, hidden_states: Tensor, plan: Optional[RoutingPlan] = None,
              input_ids: Optional[Tensor] = None, attention_mask: Optional[Tensor] = None):
        """Return ``(plan, gate_probs_or_None, aux_loss_or_None)`` for ``hidden_states [..., d]``."""
        T = hidden_states.numel() // self.hidden_size
        state = self._routing
        if plan is not None:
            return plan, None, None
        router = self.router
        if isinstance(router, HashRouter):
            if input_ids is None and state is not None:
                plan = state.plan(self.layer_idx, T)
            if plan is None:
                if input_ids is None:
                    raise ValueError(
                        "hash routing needs token ids: call the patched model with input_ids "
                        "(not inputs_embeds), or pass input_ids= or plan= to this layer")
                if input_ids.numel() != T:
                    raise ValueError(f"input_ids has {input_ids.numel()} tokens but hidden_states has {T}")
                plan = RoutingPlan.from_expert_ids(router(input_ids.reshape(-1)), self.num_experts, validate=False)
            return plan, None, None
        if attention_mask is None and state is not None and state.usable():
            attention_mask = state.attention_mask
        if isinstance(router, SentenceGate):
            if hidden_states.dim() != 3:
                raise ValueError("sentence routing needs [B, S, d] hidden states")
            out = router(hidden_states, attention_mask)
        elif isinstance(router, TokenGate):
            if attention_mask is not None and attention_mask.numel() != T:
                raise ValueError(f"attention_mask has {attention_mask.numel()} tokens but hidden_states has {T}")
            out = router(hidden_states.reshape(-1, self.hidden_size),
                         None if attention_mask is None else attention_mask.reshape(-1))
        elif router is None:
            raise ValueError("this MoEFeedForward has no router: pass plan=")
        else:
            raise TypeError(f"unsupported router {type(router).__name__}")
        return RoutingPlan.from_expert_ids(out.expert_ids, self.num_experts, validate=False), out.probs, out.aux_loss

    # -- compute ---------------------------------------------------------------------
    def expert_layer_norm(self, x: Tensor, plan: RoutingPlan, residual: Optional[Tensor] = None) -> Tensor:
        """Per-expert ``LayerNorm(x + residual)`` of ``[..., d]``: each token uses its expert's affine (fused op)."""
        shape = x.shape
        d = self.hidden_size
        if residual is not None and residual.shape != shape:
            raise ValueError(f"residual {tuple(residual.shape)} and FFN output {tuple(shape)} differ in shape")
        out = expert_layer_norm(x.reshape(-1, d), plan.expert_ids, self.ln_weight, self.ln_bias, self.layer_norm_eps,
                                residual=None if residual is None else residual.reshape(-1, d), backend=self.backend)
        return out.reshape(shape)

    def forward(self, hidden_states: Tensor, input_tensor: Optional[Tensor] = None, *,
                plan: Optional[RoutingPlan] = None, input_ids: Optional[Tensor] = None,
                attention_mask: Optional[Tensor] = None) -> Tensor:
        """``hidden_states [..., d]``; ``input_tensor`` is the residual (defaults to ``hidden_states``,
        which is what BERT passes once its intermediate layer is an identity)."""
        if hidden_states.shape[-1] != self.hidden_size:
            raise ValueError(f"hidden_states must end in d={self.hidden_size}, got shape {tuple(hidden_states.shape)}")
        plan, gate, self.aux_loss = self.route(hidden_states, plan, input_ids, attention_mask)
        shape = hidden_states.shape
        x = hidden_states.reshape(-1, self.hidden_size)
        w1, b1, w2, b2 = self.w1, self.b1, self.w2, self.b2
        dev = x.device.type
        if torch.is_autocast_enabled(dev):
            dt = torch.get_autocast_dtype(dev)
            with torch.autocast(dev, enabled=False):
                x, w1, b1, w2, b2 = (t.to(dt) for t in (x, w1, b1, w2, b2))
                y = moe_ffn(x, plan, w1, b1, w2, b2, gate, self.activation, self.backend)
        else:
            y = moe_ffn(x, plan, w1, b1, w2, b2, gate, self.activation, self.backend)
        y = self.dropout(y).reshape(shape)
        if not self.fuse_norm:
            self._last_plan = plan
            return y
        residual = hidden_states if input_tensor is None else input_tensor
        return self.expert_layer_norm(y, plan, residual)

    def extra_repr(self) -> str:
        return (f"hidden_size={self.hidden_size}, expert_size={self.expert_size}, num_experts={self.num_experts}, "
                f"activation={self.activation!r}, layer_idx={self.layer_idx}")


class DeferredExpertLayerNorm(nn.Module):
    """Stands in for a model's own post-FFN LayerNorm (DistilBERT's ``output_layer_norm``)
    and applies the routed experts' LayerNorms with the plan the FFN just used."""

    def __init__(self, moe: MoEFeedForward):
        super().__init__()
        object.__setattr__(self, "_moe", moe)  # not a submodule: its parameters live in the FFN

    def forward(self, z: Tensor) -> Tensor:
        plan = self._moe._last_plan
        if plan is None:
            raise RuntimeError("DeferredExpertLayerNorm ran before its MoEFeedForward")
        return self._moe.expert_layer_norm(z, plan)
