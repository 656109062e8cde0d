"""Hugging Face glue: patch() per model family, save/load, Auto* registration."""
from . import auto  # registers the MoE model types with transformers' Auto* classes
from .io import from_pretrained
from .patch import (FAMILIES, SUPPORTED_MODEL_TYPES, MoEBertSettings, aux_loss, default_expert_sizes, expert_neuron_ids,
                    family_of, moe_layers, patch)

__all__ = ["FAMILIES", "SUPPORTED_MODEL_TYPES", "MoEBertSettings", "auto", "aux_loss", "default_expert_sizes",
           "expert_neuron_ids", "family_of", "from_pretrained", "moe_layers", "patch"]
