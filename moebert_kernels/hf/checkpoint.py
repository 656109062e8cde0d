"""Why a checkpoint's MoE weights do not fit the model its config builds, in words a user can act on.

Both loaders (``moebert_kernels.from_pretrained`` and the Auto* classes) refuse such a checkpoint:
a student whose experts or hash tables were left missing or re-drawn would give wrong results.
"""
from __future__ import annotations

from typing import Iterable, Optional

from torch import nn

from ..modules.moe import MoEFeedForward

__all__ = ["moe_mismatch_message"]

_SHOWN = 4  # keys listed per kind; the rest are counted


def moe_mismatch_message(model: nn.Module, source: str, missing: Iterable[str], unexpected: Iterable[str],
                         mismatched: Iterable[tuple[str, tuple, tuple]]) -> Optional[str]:
    """The error for the MoE keys among a load's ``missing``, ``unexpected`` and ``mismatched``
    ``(key, checkpoint shape, model shape)``; None when every MoE weight loaded."""
    prefixes = tuple(name + "." for name, m in model.named_modules() if isinstance(m, MoEFeedForward))

    def moe(keys):
        return sorted(k for k in keys if k.startswith(prefixes) or k.endswith(_MOE_NAMES))

    missing, unexpected = moe(missing), moe(unexpected)
    mismatched = sorted((k, tuple(a), tuple(b)) for k, a, b in mismatched if moe([k]))
    if not (missing or unexpected or mismatched):
        return None
    settings = model.config.moebert
    hints = []
    if any(k.endswith(".shared_w1") for k in missing):
        hints.append("config.moebert['tie_shared'] is true but the checkpoint's experts are untied (it holds no "
                     "shared_w1): set tie_shared back to false in config.json")
    elif any(k.endswith(".shared_w1") for k in unexpected):
        hints.append("config.moebert['tie_shared'] is false but the checkpoint's experts are tied (it holds "
                     "shared_w1): set tie_shared back to true in config.json")
    tables = [(a, b) for k, a, b in mismatched if k.endswith("router.table")]
    if tables:
        (saved,), (built,) = tables[0]
        hints.append(f"the checkpoint's hash tables cover {saved} token ids but config.vocab_size is {built}: set "
                     f"vocab_size back to {saved} in config.json, load, then call resize_token_embeddings({built}) "
                     "(it grows the tables)")
    if not hints:
        hints.append(f"config.moebert = {settings} must hold what patch() wrote when the checkpoint was saved; "
                     "edit config.json back")
    parts = []
    for kind, items in (("mismatched (checkpoint vs model)", [f"{k} {a} vs {b}" for k, a, b in mismatched]),
                        ("missing", missing), ("unexpected", unexpected)):
        if items:
            more = f" and {len(items) - _SHOWN} more" if len(items) > _SHOWN else ""
            parts.append(f"{kind}: {', '.join(items[:_SHOWN])}{more}")
    return (f"{source} does not match the MoE model its config builds ({'; '.join(parts)}). "
            + " ".join(h[0].upper() + h[1:] + "." for h in hints)
            + " Nothing was loaded: experts or hash tables left missing or re-drawn would give wrong results.")


# MoEFeedForward's own names, for checkpoint keys the model lacks (e.g. a tied checkpoint's shared_w1).
_MOE_NAMES = ("shared_w1", "shared_b1", "shared_w2", "router.table", "router.proj.weight", "router.proj.bias")
