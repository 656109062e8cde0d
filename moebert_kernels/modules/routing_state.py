"""Routing state of one forward call of a patched model.

A call of the model is a ``RoutingState``: the plans of its hash-routed layers (one batched sort in the
base model's pre-forward hook), its attention mask, the plan each DistilBERT FFN hands to its deferred
LayerNorm, and the gates' aux losses. It belongs to the call, never to the model, so one model can serve
several threads, be called inside its own forward, and be recomputed by activation checkpointing:

- **Finding the call.** ``begin`` pushes the call onto a ``contextvars.ContextVar`` stack and ``end`` pops
  it. Each thread (and asyncio task) has its own context, so a layer finds the innermost call of its
  own model in its own thread (by the layers a call covers, so DataParallel replicas find theirs).
- **Checkpointing.** A checkpointed layer is recomputed in backward, after its call has ended and
  perhaps after later calls. ``bind_to_call(fn)`` returns ``fn`` bound to the current stack; the model's
  checkpoint functions pass the layer through it (see ``hf/patch.py``), so the forward and the recompute
  both read the plans of the call that made them. A recompute that finds no call raises.
- **torch.compile / torch.export.** Dynamo cannot trace a ContextVar. While compiling, the call is
  set as an attribute on each of its layers (``_traced_routing``) instead: inside a traced graph those
  reads are traced values, and the attribute is None again when the graph returns.
  The aux losses leave a compiled forward as the layers' ``aux_loss`` attributes; the model's loss hook
  reads them in a frame of its own, so compiled calls with ``aux_loss_coef`` take turns (``hf/patch.py``)
  and ``remember_aux_losses`` records them for the calling thread.
- **After the call.** ``end`` records each layer's aux loss in the caller's context, for
  ``aux_loss(model)`` and the hook that adds it to ``outputs.loss``: each thread reads its own last call.
"""
from __future__ import annotations

import contextvars
import weakref
from typing import Optional

import torch
from torch import Tensor, nn

from ..ops.routing import RoutingPlan, plans_from_expert_ids
from .routers import HashRouter

__all__ = ["RoutingState", "bind_to_call", "current_call", "in_backward", "last_aux_loss", "remember_aux_losses"]

# The calls in progress in this context, innermost last (a tuple: a copied context never sees our pushes).
_CALLS: contextvars.ContextVar[tuple["RoutingState", ...]] = contextvars.ContextVar("moebert_calls", default=())
# id(layer) -> (weakref(layer), its aux loss in this context's last call, layer.aux_loss at that time).
_LAST_AUX: contextvars.ContextVar[dict] = contextvars.ContextVar("moebert_last_aux", default={})


def in_backward() -> bool:
    # Activation checkpointing re-runs a layer's forward while autograd executes a node.
    return torch._C._current_autograd_node() is not None


class RoutingState:
    """The routing state of one forward call of a patched model (see the module docstring).

    Attributes:
        layers: the call's MoE layers (``MoEFeedForward``), by ``id``.
        attention_mask: the call's mask, or None.
        plans: ``layer_idx -> RoutingPlan`` of every hash-routed layer (empty without ``input_ids``).
        last_plans: ``layer_idx ->`` the plan a ``fuse_norm=False`` FFN used, for its deferred LayerNorm.
        aux_losses: ``layer_idx ->`` the gate's load-balancing loss (None for hash routers).
        ended: the model's forward has returned; only a checkpoint recompute may still use the call.
    """

    __slots__ = ("layers", "attention_mask", "plans", "last_plans", "aux_losses", "ended")

    def __init__(self, layers: list[nn.Module], attention_mask: Optional[Tensor] = None):
        self.layers = {id(m): m for m in layers}
        self.attention_mask = attention_mask
        self.plans: dict[int, RoutingPlan] = {}
        self.last_plans: dict[int, RoutingPlan] = {}
        self.aux_losses: dict[int, Optional[Tensor]] = {}
        self.ended = False

    @classmethod
    def begin(cls, layers: list[nn.Module], input_ids: Optional[Tensor],
              attention_mask: Optional[Tensor]) -> "RoutingState":
        """Start a call of the model whose MoE layers are ``layers`` and make it the current one."""
        call = cls(layers, attention_mask)
        if torch.compiler.is_compiling():
            for m in layers:
                m._traced_routing = call
        else:
            _CALLS.set(_CALLS.get() + (call,))
        # The plans after the push: if a token id is bad, ``end`` still finds and pops this call.
        hash_layers = sorted((m for m in layers if isinstance(m.router, HashRouter)), key=lambda m: m.layer_idx)
        if input_ids is not None and hash_layers:
            flat = input_ids.reshape(-1)
            ids = torch.stack([m.router(flat) for m in hash_layers])
            plans = plans_from_expert_ids(ids, hash_layers[0].num_experts, validate=False)
            call.plans = {m.layer_idx: p for m, p in zip(hash_layers, plans)}
        return call

    @staticmethod
    def end(layers: list[nn.Module]) -> None:
        """End the innermost call covering ``layers``; record its aux losses for ``last_aux_loss``."""
        if torch.compiler.is_compiling():
            for m in layers:
                call = getattr(m, "_traced_routing", None)
                m._traced_routing = None
                if call is not None:
                    call.ended = True
            return
        stack = _CALLS.get()
        key = id(layers[0]) if layers else None
        for i in range(len(stack) - 1, -1, -1):
            if key in stack[i].layers:
                call = stack[i]
                _CALLS.set(stack[:i] + stack[i + 1:])
                break
        else:
            return  # the pre-hook failed before it pushed
        call.ended = True
        _remember({m: call.aux_losses.get(m.layer_idx) for m in layers})

    def plan(self, layer_idx: int, num_tokens: int) -> Optional[RoutingPlan]:
        """The call's plan of one hash-routed layer; None when the model got no ``input_ids``."""
        plan = self.plans.get(layer_idx)
        if plan is not None and plan.num_tokens != num_tokens:
            raise ValueError(f"the batch's routing plan covers {plan.num_tokens} tokens but hidden_states has "
                             f"{num_tokens}; was this layer called outside its model's forward?")
        return plan


def current_call(layer: nn.Module) -> Optional[RoutingState]:
    """The innermost call of ``layer``'s model in progress in this thread (or being recomputed), or None."""
    if torch.compiler.is_compiling():
        return getattr(layer, "_traced_routing", None)
    key = id(layer)
    for call in reversed(_CALLS.get()):
        if key in call.layers:
            return call
    return getattr(layer, "_traced_routing", None)  # a compiled pre-hook before a graph break


def last_aux_loss(layer: nn.Module) -> Optional[Tensor]:
    """``layer``'s aux loss from the last call of its model in this thread; its ``aux_loss`` attribute
    when the layer ran since on its own or compiled (those write the attribute, shared by threads)."""
    if not torch.compiler.is_compiling():
        ref, aux, attr_then = _LAST_AUX.get().get(id(layer), (None, None, None))
        if ref is not None and ref() is layer and layer.aux_loss is attr_then:
            return aux
    return layer.aux_loss


def remember_aux_losses(layers: list[nn.Module]) -> None:
    """Record the layers' ``aux_loss`` attributes as this context's last call (a compiled call, which
    cannot reach the context: the caller makes sure no other call wrote them since)."""
    _remember({m: m.aux_loss for m in layers})


def _remember(aux_of_layer: dict) -> None:
    # This context's last aux loss of each layer, with the layer's aux_loss attribute of that moment.
    last = {k: v for k, v in _LAST_AUX.get().items() if v[0]() is not None}
    for m, aux in aux_of_layer.items():
        last[id(m)] = (weakref.ref(m), aux, m.aux_loss)
    _LAST_AUX.set(last)


def bind_to_call(fn):
    """``fn`` run with this context's calls, wherever and whenever it runs (a checkpoint's recompute)."""
    if torch.compiler.is_compiling():
        return fn
    return _InCalls(fn, _CALLS.get())


class _InCalls:
    """A picklable ``functools.partial`` that restores a stack of calls around ``fn``."""

    __slots__ = ("fn", "calls")

    def __init__(self, fn, calls):
        self.fn, self.calls = fn, calls

    def __call__(self, *args, **kwargs):
        token = _CALLS.set(self.calls)
        try:
            return self.fn(*args, **kwargs)
        finally:
            _CALLS.reset(token)
