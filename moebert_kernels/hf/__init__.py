"""Hugging Face glue: patch() per model family, save/load, Auto* registration."""
import importlib.util

# Registers the MoE model types with transformers' Auto* classes; without transformers there is nothing to
# register with (the ops and modules still work, e.g. in the CUDA build check's venv).
if importlib.util.find_spec("transformers") is not None:
    from . import auto
from .io import from_pretrained
from .patch import (FAMILIES, SUPPORTED_CLASSES, SUPPORTED_MODEL_TYPES, MoEBertSettings, aux_loss,
                    default_expert_sizes, dense_ffn_linears, expert_neuron_ids, family_of, moe_layers, patch)

__all__ = ["FAMILIES", "SUPPORTED_CLASSES", "SUPPORTED_MODEL_TYPES", "MoEBertSettings", "auto", "aux_loss",
           "default_expert_sizes", "dense_ffn_linears", "expert_neuron_ids", "family_of", "from_pretrained",
           "moe_layers", "patch"]
