"""moebert-kernels: fused kernels and drop-in modules for MoEBERT (Zuo et al., NAACL 2022)."""
from . import ops
from .hf import (SUPPORTED_MODEL_TYPES, MoEBertSettings, aux_loss, default_expert_sizes, expert_neuron_ids,
                 from_pretrained, moe_layers, patch)
from .modules import (BalancedHashRouter, HashRouter, MoEFeedForward, SentenceGate, TokenGate)
from .ops import BackendUnavailableError, RoutingPlan, moe_ffn, select_backend
from .ops import DistillOutput, distill_loss, distill_loss_reference
from .ops import expert_layer_norm, expert_layer_norm_reference
from .modules import DistillationLoss, QuantizedMoEFeedForward
from .quantization import quantize_dynamic

__version__ = "0.1.0"

__all__ = [
    "BackendUnavailableError",
    "BalancedHashRouter",
    "DistillOutput",
    "DistillationLoss",
    "HashRouter",
    "MoEBertSettings",
    "MoEFeedForward",
    "RoutingPlan",
    "SUPPORTED_MODEL_TYPES",
    "SentenceGate",
    "TokenGate",
    "aux_loss",
    "default_expert_sizes",
    "distill_loss",
    "distill_loss_reference",
    "expert_layer_norm",
    "expert_layer_norm_reference",
    "expert_neuron_ids",
    "from_pretrained",
    "moe_ffn",
    "moe_layers",
    "ops",
    "patch",
    "QuantizedMoEFeedForward",
    "quantize_dynamic",
    "select_backend",
]
