"""Ops: one file each, holding the reference, the torch.library registration and the dispatch."""
from .dispatch import (
    BACKENDS,
    BackendUnavailableError,
    available_backends,
    backend_status,
    select_backend,
)
from .moe_ffn import ACTIVATIONS, moe_ffn, moe_ffn_reference
from .moe_ffn_int8 import moe_ffn_int8, moe_ffn_int8_reference
from .distill_loss import DistillOutput, distill_loss, distill_loss_reference
from .expert_layer_norm import expert_layer_norm, expert_layer_norm_reference
from .routing import RoutingPlan, plans_from_expert_ids

__all__ = [
    "ACTIVATIONS",
    "BACKENDS",
    "BackendUnavailableError",
    "DistillOutput",
    "RoutingPlan",
    "available_backends",
    "backend_status",
    "distill_loss",
    "distill_loss_reference",
    "expert_layer_norm",
    "expert_layer_norm_reference",
    "moe_ffn",
    "moe_ffn_reference",
    "moe_ffn_int8",
    "moe_ffn_int8_reference",
    "plans_from_expert_ids",
    "select_backend",
]
