"""moebert-kernels: fused kernels and drop-in modules for MoEBERT (Zuo et al., NAACL 2022)."""
from . import ops
from .hf import SUPPORTED_MODEL_TYPES, MoEBertSettings, aux_loss, expert_neuron_ids, from_pretrained, moe_layers, patch
from .modules import (BalancedHashRouter, HashRouter, MoEFeedForward, SentenceGate, TokenGate)
from .ops import BackendUnavailableError, RoutingPlan, moe_ffn, select_backend

__version__ = "0.1.0"

__all__ = [
    "BackendUnavailableError",
    "BalancedHashRouter",
    "HashRouter",
    "MoEBertSettings",
    "MoEFeedForward",
    "RoutingPlan",
    "SUPPORTED_MODEL_TYPES",
    "SentenceGate",
    "TokenGate",
    "aux_loss",
    "expert_neuron_ids",
    "from_pretrained",
    "moe_ffn",
    "moe_layers",
    "ops",
    "patch",
    "select_backend",
]
