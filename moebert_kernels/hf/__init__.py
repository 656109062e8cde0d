"""Hugging Face glue: patch() per model family, save/load."""
from .io import from_pretrained
from .patch import (SUPPORTED_CLASSES, SUPPORTED_MODEL_TYPES, MoEBertSettings, aux_loss, dense_ffn_linears,
                    expert_neuron_ids, moe_layers, patch)

__all__ = ["SUPPORTED_CLASSES", "SUPPORTED_MODEL_TYPES", "MoEBertSettings", "aux_loss", "dense_ffn_linears",
           "expert_neuron_ids", "from_pretrained",
           "moe_layers", "patch"]
