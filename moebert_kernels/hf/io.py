"""Load a patched model saved with ``save_pretrained`` (safetensors; never pickle)."""
from __future__ import annotations

import json
import os
from typing import Optional

import torch
from torch import nn

from .checkpoint import moe_mismatch_message
from .patch import MoEBertSettings

__all__ = ["from_pretrained", "load_safetensors_state"]


def load_safetensors_state(path: str) -> dict[str, torch.Tensor]:
    """The state dict of a checkpoint folder: ``model.safetensors`` or its sharded index."""
    from safetensors.torch import load_file

    single = os.path.join(path, "model.safetensors")
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.isfile(single):
        return load_file(single)
    if os.path.isfile(index):
        with open(index) as f:
            shards = sorted(set(json.load(f)["weight_map"].values()))
        state: dict[str, torch.Tensor] = {}
        for shard in shards:
            state.update(load_file(os.path.join(path, shard)))
        return state
    raise FileNotFoundError(f"{path} holds no model.safetensors (nor a sharded index); "
                            "save the model with save_pretrained(..., safe_serialization=True)")


def from_pretrained(path: str, model_class: Optional[type] = None, device: Optional[str] = None,
                    dtype: Optional[torch.dtype] = None, backend: Optional[str] = None,
                    revision: Optional[str] = None) -> nn.Module:
    """Rebuild a MoEBERT model saved with ``save_pretrained`` and load its weights and router tables.

    ``path`` is a folder or a hub id (fetched with ``huggingface_hub.snapshot_download``, which
    honours ``HF_HUB_OFFLINE`` and the local cache). ``model_class`` defaults to the class named in
    ``config.architectures``. Checkpoints of either config style load: ``model_type``
    ``"moebert_kernels_<family>"`` and the older ``"<family>"`` with a ``moebert`` entry.
    """
    import transformers

    from .auto import MOE_CLASSES, dense_class, patch_from_config

    path = os.path.expanduser(path)
    if not os.path.isdir(path):
        if _looks_local(path):
            raise FileNotFoundError(f"no such folder: {path} (a local path, so it is not looked up on the hub); "
                                    "check the spelling, or pass a hub id such as 'org/name'")
        from huggingface_hub import snapshot_download

        path = snapshot_download(path, revision=revision)
    config = transformers.AutoConfig.from_pretrained(path)
    settings = getattr(config, "moebert", None)
    if not isinstance(settings, dict):
        raise ValueError(f"{path} is not a MoEBERT checkpoint: its config has no 'moebert' entry "
                         "(patch a dense model with moebert_kernels.patch first)")
    settings = MoEBertSettings.from_config(settings)
    if model_class is None:
        arch = (getattr(config, "architectures", None) or [None])[0]
        model_class = dense_class(arch) if arch else None
        if model_class is None:
            raise ValueError(f"cannot tell the model class of {path} (architectures={arch!r}); pass model_class=")
    elif model_class.__name__ in MOE_CLASSES:  # those patch themselves; build the stock class, patch it here
        model_class = dense_class(model_class.__name__)
    model = patch_from_config(model_class(config), backend=backend)
    state = load_safetensors_state(path)
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    tied = _tied_keys(model)
    missing = sorted(k for k in shapes if k not in state and k not in tied)
    unexpected = sorted(k for k in state if k not in shapes)
    mismatched = sorted((k, tuple(v.shape), shapes[k]) for k, v in state.items() if k in shapes and
                        tuple(v.shape) != shapes[k])
    message = moe_mismatch_message(model, f"checkpoint {path}", missing, unexpected, mismatched)
    if message:
        raise ValueError(message)
    if missing or unexpected or mismatched:
        raise ValueError(f"checkpoint {path} does not match {model_class.__name__} patched with {settings}: "
                         f"missing {missing[:8]}, unexpected {unexpected[:8]}, "
                         f"mismatched (checkpoint vs model) {mismatched[:8]}")
    model.load_state_dict(state, strict=False)
    if hasattr(model, "tie_weights"):
        model.tie_weights()
    model.eval()
    if dtype is not None or device is not None:
        model.to(device=device, dtype=dtype)
    return model


def _looks_local(path: str) -> bool:
    """A path the user meant as a folder, never a hub id: ./x, ../x, /x, ~/x, a\\b, or one whose parent exists."""
    if path.startswith((".", "~")) or os.path.isabs(path) or path.count("/") > 1:
        return True
    if os.sep != "/" and os.sep in path:
        return True
    parent = os.path.dirname(path)
    return bool(parent) and os.path.isdir(parent)


def _tied_keys(model: nn.Module) -> set[str]:
    """Parameter names that share storage with an earlier name (save_pretrained drops them)."""
    seen: dict[int, str] = {}
    tied = set()
    for name, p in model.named_parameters(remove_duplicate=False):
        key = id(p)
        if key in seen:
            tied.add(name)
        else:
            seen[key] = name
    return tied
