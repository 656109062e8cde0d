"""MoEFeedForward: MoEBERT's expert FFN, out = LayerNorm_e(x + dropout(fc2_e(act(fc1_e(x))))).

Every expert owns fc1, fc2 (with its own b2) and its own LayerNorm, as in the
paper's code. With ``shared_size > 0`` the shared neurons are stored once, as a shared FFN
every token runs (``shared_w1 [s, d]``, ``shared_b1 [s]``, ``shared_w2 [d, s]``; gated ``[2s, d]`` and
``[2s]``), and each expert's fc1/fc2 hold only its own neurons. The GEMMs go through ``ops.moe_ffn`` and
the residual add + expert LayerNorm through ``ops.expert_layer_norm``; the module never picks a backend.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from ..ops import moe_ffn
from ..ops.expert_layer_norm import expert_layer_norm
from ..ops.moe_ffn import ACTIVATIONS, GATED_ACTIVATIONS
from ..ops.routing import RoutingPlan
from .routers import HashRouter, SentenceGate, TokenGate
from .routing_state import RoutingState, current_call, in_backward

__all__ = ["MoEFeedForward", "DeferredExpertLayerNorm"]


class MoEFeedForward(nn.Module):
    """Top-1 routed expert FFN with per-expert residual LayerNorm.

    Args:
        hidden_size: d.
        expert_size: h, the width of each expert.
        num_experts: E.
        router: a router from ``modules.routers``; None means the caller passes ``plan=``.
        activation: ``"gelu"`` (exact erf, BERT), ``"gelu_tanh"``, ``"relu"``, or a gated form
            ``"geglu"``/``"geglu_tanh"``/``"reglu"`` (act(a) * g; w1 is then ``[E, 2h, d]``).
        dropout: applied to the FFN output before the residual add.
        layer_norm_eps: BERT uses 1e-12.
        layer_idx: which layer's plan to take from the model call's ``RoutingState``.
        fuse_norm: False returns ``dropout(ffn(x))`` and leaves the residual LayerNorm to
            a ``DeferredExpertLayerNorm`` (DistilBERT applies it outside its FFN).
        expert_norm: False: no per-expert LayerNorm at all, the module is ``dropout(ffn(x))``
            (pre-norm models such as ModernBERT keep their shared norm and residual outside).
        bias: False: no b1/b2 (ModernBERT's default).
        backend: force a backend for this module; None lets the dispatch decide.
        shared_size: s, the width of a shared FFN tied across experts (0: none). A token then
            uses s + h neurons.

    Parameters are stacked over experts: ``w1 [E, h, d]`` (``[E, 2h, d]`` gated: a rows, then g rows),
    ``b1 [E, h]`` (``[E, 2h]``), ``w2 [E, d, h]``, ``b2 [E, d]``, ``ln_weight``/``ln_bias [E, d]``; with a
    shared FFN also ``shared_w1 [s, d]`` (``[2s, d]`` gated), ``shared_b1 [s]`` (``[2s]``; absent with
    ``bias=False``), ``shared_w2 [d, s]``.
    Inside a patched model the routing state belongs to the model's call (``routing_state``), and
    ``hf.aux_loss(model)`` gives the gates' losses of this thread's last call. A layer called on its
    own (or compiled) keeps its gate's load-balancing loss in ``aux_loss`` (None for hash routers).
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
        expert_norm: bool = True,
        bias: bool = True,
        backend: Optional[str] = None,
        device=None,
        dtype=None,
        shared_size: int = 0,
    ):
        super().__init__()
        for name, v in (("hidden_size", hidden_size), ("expert_size", expert_size), ("num_experts", num_experts)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        if isinstance(shared_size, bool) or not isinstance(shared_size, int) or shared_size < 0:
            raise ValueError(f"shared_size must be a non-negative int, got {shared_size!r}")
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
        E, h, d = num_experts, expert_size, hidden_size
        kw = {"device": device, "dtype": dtype}
        self.hidden_size, self.expert_size, self.num_experts = d, h, E
        self.activation, self.layer_norm_eps, self.layer_idx = activation, layer_norm_eps, layer_idx
        self.fuse_norm, self.expert_norm, self.backend = fuse_norm and expert_norm, expert_norm, backend
        self.gated = activation in GATED_ACTIVATIONS
        h_up = 2 * h if self.gated else h
        self.w1 = nn.Parameter(torch.empty(E, h_up, d, **kw))
        self.b1 = nn.Parameter(torch.empty(E, h_up, **kw)) if bias else None
        self.w2 = nn.Parameter(torch.empty(E, d, h, **kw))
        self.b2 = nn.Parameter(torch.empty(E, d, **kw)) if bias else None
        self.ln_weight = nn.Parameter(torch.ones(E, d, **kw)) if expert_norm else None
        self.ln_bias = nn.Parameter(torch.zeros(E, d, **kw)) if expert_norm else None
        self.shared_size = shared_size
        if shared_size:
            s_up = 2 * shared_size if self.gated else shared_size
            self.shared_w1 = nn.Parameter(torch.empty(s_up, d, **kw))
            self.shared_b1 = nn.Parameter(torch.empty(s_up, **kw)) if bias else None
            self.shared_w2 = nn.Parameter(torch.empty(d, shared_size, **kw))
        else:
            self.shared_w1 = self.shared_b1 = self.shared_w2 = None
        self.dropout = nn.Dropout(dropout)
        self.router = router
        self.aux_loss: Optional[Tensor] = None
        self._last_plan: Optional[RoutingPlan] = None  # for the deferred LayerNorm of a layer used on its own
        self._traced_routing: Optional[RoutingState] = None  # the call, while torch.compile traces one
        self.reset_parameters()

    def reset_parameters(self) -> None:
        fan_in2 = self.expert_size + self.shared_size  # fc2 sums over the shared and the own neurons
        for w, b, fan_in in ((self.w1, self.b1, self.hidden_size), (self.w2, self.b2, fan_in2)):
            bound = fan_in ** -0.5
            nn.init.uniform_(w, -bound, bound)
            if b is not None:
                nn.init.uniform_(b, -bound, bound)
        if self.shared_size:
            for w, fan_in in ((self.shared_w1, self.hidden_size), (self.shared_w2, fan_in2)):
                nn.init.uniform_(w, -fan_in ** -0.5, fan_in ** -0.5)
            if self.shared_b1 is not None:
                nn.init.uniform_(self.shared_b1, -self.hidden_size ** -0.5, self.hidden_size ** -0.5)
        if self.expert_norm:
            nn.init.ones_(self.ln_weight)
            nn.init.zeros_(self.ln_bias)

    @torch.no_grad()
    def load_dense(self, w1: Tensor, b1: Optional[Tensor], w2: Tensor, b2: Optional[Tensor],
                   ln_weight: Optional[Tensor], ln_bias: Optional[Tensor], neuron_ids: Tensor) -> "MoEFeedForward":
        """Copy slices of a dense FFN (``w1 [d_ff, d]``, ``w2 [d, d_ff]``) into the experts.

        ``neuron_ids [E, s + h]`` says which dense neurons each expert uses; with a shared FFN its
        first s columns (the same in every row) go to the shared FFN, the rest to the experts.
        b2 and the LayerNorm are copied to every expert. Gated: ``w1 [2 d_ff, d]`` holds the a rows,
        then the g rows, and neuron j is rows j and d_ff + j of w1 with column j of w2.
        """
        E, h, s = self.num_experts, self.expert_size, self.shared_size
        if tuple(neuron_ids.shape) != (E, s + h):
            raise ValueError(f"neuron_ids must be [E, s + h] = {(E, s + h)}, got {tuple(neuron_ids.shape)}")
        # (not checkable on meta tensors: HF builds models from checkpoints under a meta device)
        if s and neuron_ids.device.type != "meta" and not bool((neuron_ids[:, :s] == neuron_ids[:1, :s]).all()):
            raise ValueError(f"the first shared_size={s} neuron ids must be the same for every expert")
        d_ff = w2.shape[1]
        rows = 2 * d_ff if self.gated else d_ff
        if tuple(w1.shape) != (rows, self.hidden_size) or tuple(w2.shape) != (self.hidden_size, d_ff):
            raise ValueError(f"dense weights must be w1 [{'2 d_ff' if self.gated else 'd_ff'}, d] and w2 [d, d_ff] "
                             f"with d={self.hidden_size}; got {tuple(w1.shape)} and {tuple(w2.shape)}")
        for name, t, want in (("b1", b1, self.b1), ("b2", b2, self.b2), ("ln_weight", ln_weight, self.ln_weight),
                              ("ln_bias", ln_bias, self.ln_bias)):
            if (t is None) != (want is None):
                raise ValueError(f"{name} is {'missing' if t is None else 'given'} but this module "
                                 f"{'has' if want is not None else 'has no'} {name}")
        idx = neuron_ids.to(w1.device)
        rows_of = (lambda i: torch.cat([i, i + d_ff], dim=-1)) if self.gated else (lambda i: i)  # noqa: E731
        if s:
            self.shared_w1.copy_(w1[rows_of(idx[0, :s])])
            if b1 is not None:
                self.shared_b1.copy_(b1[rows_of(idx[0, :s])])
            self.shared_w2.copy_(w2[:, idx[0, :s]])
            idx = idx[:, s:]
        up = rows_of(idx)
        self.w1.copy_(w1[up])
        self.w2.copy_(w2[:, idx].permute(1, 0, 2))
        if b1 is not None:
            self.b1.copy_(b1[up])
            self.b2.copy_(b2.expand(E, -1))
        if ln_weight is not None:
            self.ln_weight.copy_(ln_weight.expand(E, -1))
            self.ln_bias.copy_(ln_bias.expand(E, -1))
        return self

    # -- routing ---------------------------------------------------------------------
    def route(self, hidden_states: Tensor, plan: Optional[RoutingPlan] = None,
              input_ids: Optional[Tensor] = None, attention_mask: Optional[Tensor] = None):
        """Return ``(plan, gate_probs_or_None, aux_loss_or_None)`` for ``hidden_states [..., d]``."""
        T = hidden_states.numel() // self.hidden_size
        if plan is not None:
            return plan, None, None
        call = current_call(self)
        router = self.router
        if isinstance(router, HashRouter):
            if input_ids is None and call is not None:
                plan = _kept_tokens_plan(call, self.layer_idx, T, hidden_states)
                if plan is None:
                    plan = call.plan(self.layer_idx, T)
            if plan is None:
                if input_ids is None:
                    raise ValueError(_no_plan_message(call))
                if input_ids.numel() != T:
                    raise ValueError(f"input_ids has {input_ids.numel()} tokens but hidden_states has {T}")
                plan = RoutingPlan.from_expert_ids(router(input_ids.reshape(-1)), self.num_experts, validate=False)
            return plan, None, None
        if attention_mask is None and call is not None:
            attention_mask = call.attention_mask
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

    def experts(self, x: Tensor, plan: RoutingPlan, gate: Optional[Tensor]) -> Tensor:
        """The routed (and shared) FFN of ``x [T, d]``, before dropout and LayerNorm; the part a quantized
        subclass (``modules.quantized``) replaces."""
        weights = (self.w1, self.b1, self.w2, self.b2)
        shared = (self.shared_w1, self.shared_b1, self.shared_w2) if self.shared_size else (None, None, None)
        dev = x.device.type
        if torch.is_autocast_enabled(dev):
            dt = torch.get_autocast_dtype(dev)
            with torch.autocast(dev, enabled=False):
                x, *weights = (None if t is None else t.to(dt) for t in (x, *weights))
                shared = tuple(t if t is None else t.to(dt) for t in shared)
                return moe_ffn(x, plan, *weights, gate, self.activation, self.backend, *shared)
        return moe_ffn(x, plan, *weights, gate, self.activation, self.backend, *shared)

    def forward(self, hidden_states: Tensor, input_tensor: Optional[Tensor] = None, *,
                plan: Optional[RoutingPlan] = None, input_ids: Optional[Tensor] = None,
                attention_mask: Optional[Tensor] = None) -> Tensor:
        """``hidden_states [..., d]``; ``input_tensor`` is the residual (defaults to ``hidden_states``,
        which is what BERT passes once its intermediate layer is an identity)."""
        if hidden_states.shape[-1] != self.hidden_size:
            raise ValueError(f"hidden_states must end in d={self.hidden_size}, got shape {tuple(hidden_states.shape)}")
        plan, gate, aux_loss = self.route(hidden_states, plan, input_ids, attention_mask)
        call = current_call(self)
        if call is None or torch.compiler.is_compiling():
            self.aux_loss = aux_loss
        if call is not None and not call.ended:  # (a checkpoint's recompute leaves the call's record alone)
            call.aux_losses[self.layer_idx] = aux_loss
        shape = hidden_states.shape
        y = self.dropout(self.experts(hidden_states.reshape(-1, self.hidden_size), plan, gate)).reshape(shape)
        if not self.expert_norm:
            return y
        if not self.fuse_norm:
            if call is None:
                self._last_plan = plan
            else:
                call.last_plans[self.layer_idx] = plan
            return y
        residual = hidden_states if input_tensor is None else input_tensor
        return self.expert_layer_norm(y, plan, residual)

    def extra_repr(self) -> str:
        return (f"hidden_size={self.hidden_size}, expert_size={self.expert_size}, num_experts={self.num_experts}, "
                f"shared_size={self.shared_size}, activation={self.activation!r}, layer_idx={self.layer_idx}")


def _no_plan_message(call: Optional[RoutingState]) -> str:
    if call is not None:
        return ("hash routing needs token ids: call the patched model with input_ids (not inputs_embeds), "
                "or pass input_ids= or plan= to this layer")
    if in_backward():
        return ("this layer is recomputed in backward (activation checkpointing) after the model call that "
                "routed it ended, and no plan of that call came with it: enable checkpointing with the model's "
                "gradient_checkpointing_enable(), or checkpoint the whole model, not a layer by hand")
    return ("no routing plan for this batch: was this layer called outside its model's forward? "
            "Call the patched model, or pass input_ids= or plan= to this layer")


def _kept_tokens_plan(call: RoutingState, layer_idx: int, T: int, hidden_states: Tensor) -> Optional[RoutingPlan]:
    """Unpadded hidden states ``[kept tokens, d]`` (ModernBERT's FlashAttention path in transformers 4.x):
    the call's plan restricted to the tokens the attention mask keeps, in the row-major order unpadding
    keeps them. None when the hidden states are not unpadded."""
    full, mask = call.plans.get(layer_idx), call.attention_mask
    if hidden_states.dim() != 2 or full is None or mask is None or full.num_tokens == T:
        return None
    kept = full.expert_ids.reshape(-1)[mask.reshape(-1).bool()]
    if kept.numel() != T:
        raise ValueError(f"hidden_states has {T} tokens; the batch has {full.num_tokens}, of which the attention "
                         f"mask keeps {kept.numel()}")
    return RoutingPlan.from_expert_ids(kept, full.num_experts, validate=False)


class DeferredExpertLayerNorm(nn.Module):
    """Stands in for a model's own post-FFN LayerNorm (DistilBERT's ``output_layer_norm``)
    and applies the routed experts' LayerNorms with the plan the FFN just used in this call."""

    def __init__(self, moe: MoEFeedForward):
        super().__init__()
        object.__setattr__(self, "_moe", moe)  # not a submodule: its parameters live in the FFN

    def forward(self, z: Tensor) -> Tensor:
        moe = self._moe
        call = current_call(moe)
        plan = moe._last_plan if call is None else call.last_plans.get(moe.layer_idx)
        if plan is None:
            raise RuntimeError("DeferredExpertLayerNorm ran before its MoEFeedForward")
        return moe.expert_layer_norm(z, plan)
