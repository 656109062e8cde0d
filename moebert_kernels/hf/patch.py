"""``patch(model)``: turn a Hugging Face encoder into MoEBERT in place.

Table-driven over ``config.model_type`` (``_FAMILIES``: layer path and FFN style per family);
works on instances only (no class swapping, nothing at import time). Every argument is checked
before the model is touched, so a bad call leaves the model as it was.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Callable, Optional

import torch
from torch import Tensor, nn

from ..modules.moe import DeferredExpertLayerNorm, MoEFeedForward
from ..modules.routers import ROUTERS, BalancedHashRouter, HashRouter, RoutingContext, SentenceGate, TokenGate

__all__ = ["MoEBertSettings", "SUPPORTED_MODEL_TYPES", "SUPPORTED_CLASSES", "dense_ffn_linears", "expert_neuron_ids",
           "patch", "moe_layers", "aux_loss"]

# HF activation name -> moe_ffn activation.
_ACTIVATIONS = {"gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu_fast": "gelu_tanh",
                "relu": "relu"}
# moe_ffn activation -> its gated form act(a) * g, for gated FFNs (ModernBERT's GeGLU).
_GATED = {"gelu": "geglu", "gelu_tanh": "geglu_tanh", "relu": "reglu"}


@dataclass(frozen=True)
class _DenseFFN:
    """One dense layer's FFN as ``patch`` reads it; ``w1`` is ``[2 d_ff, d]`` (a rows, then g rows) when gated."""

    w1: Tensor
    b1: Optional[Tensor]
    w2: Tensor
    b2: Optional[Tensor]
    ln_weight: Optional[Tensor]  # the post-FFN LayerNorm each expert copies; None for pre-norm
    ln_bias: Optional[Tensor]
    ln_eps: float
    dropout: float

    @property
    def d_ff(self) -> int:
        return self.w2.shape[1]


@dataclass(frozen=True)
class _FFNStyle:
    """How a layer holds its FFN: attribute paths from the layer to its parts, and where the MoE goes.

    ``norm``: "fused" (the MoE does residual + expert LayerNorm), "deferred" (the model's own
    LayerNorm module is replaced by the experts'), "none" (pre-norm: norm and residual stay the model's).
    ``gated``: the up projection holds 2 d_ff rows, a then g, and the FFN is down(act(a) * g).
    """

    up: str
    down: str
    layer_norm: Optional[str]  # the post-FFN LayerNorm every expert copies
    dropout: str
    install: Callable[[nn.Module, MoEFeedForward], None]
    norm: str
    gated: bool = False

    def linears(self, layer: nn.Module) -> tuple[nn.Linear, nn.Linear]:
        return _get(layer, self.up), _get(layer, self.down)

    def read(self, layer: nn.Module) -> _DenseFFN:
        up, down = self.linears(layer)
        ln = _get(layer, self.layer_norm) if self.layer_norm else None
        return _DenseFFN(up.weight, up.bias, down.weight, down.bias, None if ln is None else ln.weight,
                         None if ln is None else ln.bias, ln.eps if ln is not None else 0.0,
                         _get(layer, self.dropout).p)


def _install_post_norm(layer, moe):
    layer.intermediate = nn.Identity()
    layer.output = moe  # called as output(hidden, input_tensor): residual + expert LayerNorm inside
    if hasattr(layer, "chunk_size_feed_forward"):
        layer.chunk_size_feed_forward = 0  # chunking would split a batch's routing plan


def _install_distilbert(layer, moe):
    layer.ffn = moe
    layer.output_layer_norm = DeferredExpertLayerNorm(moe)


def _install_gated_pre_norm(layer, moe):
    layer.mlp = moe  # h + mlp(mlp_norm(h)): the norm and the residual add stay the model's


POST_NORM = _FFNStyle("intermediate.dense", "output.dense", "output.LayerNorm", "output.dropout",
                      _install_post_norm, norm="fused")
DISTILBERT = _FFNStyle("ffn.lin1", "ffn.lin2", "output_layer_norm", "ffn.dropout", _install_distilbert,
                       norm="deferred")
# ModernBERT applies its dropout to act(a) * g; the MoE applies it to the FFN output (default p = 0).
GATED_PRE_NORM = _FFNStyle("mlp.Wi", "mlp.Wo", None, "mlp.drop", _install_gated_pre_norm, norm="none", gated=True)


@dataclass(frozen=True)
class _Family:
    classes: str  # the HF classes, for the error message
    layers: str  # attribute path from the base model to the layer list
    style: _FFNStyle
    activation: str = "hidden_act"  # the config attribute naming the FFN activation


_FAMILIES = {
    "bert": _Family("BertModel/BertFor* (MiniLM-style checkpoints included)", "encoder.layer", POST_NORM),
    "roberta": _Family("RobertaModel/RobertaFor*", "encoder.layer", POST_NORM),
    "distilbert": _Family("DistilBertModel/DistilBertFor*", "transformer.layer", DISTILBERT, "activation"),
    "deberta-v2": _Family("DebertaV2Model/DebertaV2For* (DeBERTa-v2 and v3)", "encoder.layer", POST_NORM),
    "electra": _Family("ElectraModel/ElectraFor*", "encoder.layer", POST_NORM),
    "xlm-roberta": _Family("XLMRobertaModel/XLMRobertaFor*", "encoder.layer", POST_NORM),
    "camembert": _Family("CamembertModel/CamembertFor*", "encoder.layer", POST_NORM),
    "modernbert": _Family("ModernBertModel/ModernBertFor* (mmBERT and Ettin too)", "layers", GATED_PRE_NORM,
                          "hidden_activation"),
}
SUPPORTED_MODEL_TYPES = tuple(_FAMILIES)
SUPPORTED_CLASSES = ", ".join(f.classes for f in _FAMILIES.values())


@dataclass(frozen=True)
class MoEBertSettings:
    """What ``patch`` did; stored as ``config.moebert`` so a checkpoint can be rebuilt."""

    num_experts: int = 4
    expert_size: int = 768
    shared: int = 512
    router: str = "hash"
    seed: int = 0
    activation: str = "gelu"


def expert_neuron_ids(importance: Optional[Tensor], d_ff: int, num_experts: int, expert_size: int,
                      shared: int) -> Tensor:
    """Which dense neurons each expert keeps, ``[E, expert_size]``.

    Neurons are ranked by importance (descending; original order when None). The top
    ``shared`` go to every expert, the rest are dealt round-robin: expert i gets ranks
    ``shared + i``, ``shared + i + E``, ... truncated to ``expert_size``.
    """
    _check_sizes(d_ff, num_experts, expert_size, shared)
    if importance is None:
        ranked = torch.arange(d_ff)
    else:
        if tuple(importance.shape) != (d_ff,):
            raise ValueError(f"importance of one layer must be [d_ff] = ({d_ff},), got {tuple(importance.shape)}")
        ranked = torch.argsort(importance.detach().float().cpu(), descending=True, stable=True)
    rest = ranked[shared:]
    own = expert_size - shared
    return torch.stack([torch.cat([ranked[:shared], rest[e::num_experts][:own]]) for e in range(num_experts)])


def _check_sizes(d_ff: int, num_experts: int, expert_size: int, shared: int) -> None:
    for name, v in (("num_experts", num_experts), ("expert_size", expert_size)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be a positive int, got {v!r}")
    if isinstance(shared, bool) or not isinstance(shared, int) or shared < 0:
        raise ValueError(f"shared must be a non-negative int, got {shared!r}")
    if expert_size > d_ff:
        raise ValueError(f"expert_size={expert_size} is larger than the dense FFN's d_ff={d_ff}")
    if shared >= expert_size:
        raise ValueError(f"shared={shared} must be smaller than expert_size={expert_size}")
    if num_experts > 1 and (d_ff - shared) // num_experts < expert_size - shared:
        raise ValueError(
            f"d_ff={d_ff} has too few neurons: after {shared} shared ones, {num_experts} experts get "
            f"{(d_ff - shared) // num_experts} each, fewer than the {expert_size - shared} they need")


def _get(obj, path: str):
    for part in path.split("."):
        obj = getattr(obj, part)
    return obj


def _base_and_family(model: nn.Module):
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type not in _FAMILIES:
        raise ValueError(f"moebert_kernels.patch supports model types {list(SUPPORTED_MODEL_TYPES)} "
                         f"({SUPPORTED_CLASSES}); got {model_type!r} ({type(model).__name__})")
    base = getattr(model, "base_model", model)
    return base, _FAMILIES[model_type], config


def dense_ffn_linears(model: nn.Module) -> tuple[list[tuple[nn.Linear, nn.Linear]], bool]:
    """``([(up, down) per layer], gated)`` of a dense model of a supported family.

    Gated (ModernBERT): ``up`` has ``2 d_ff`` rows; neuron j is rows j and d_ff + j of it and column j of ``down``.
    """
    base, family, _ = _base_and_family(model)
    if any(isinstance(m, MoEFeedForward) for m in model.modules()):
        raise ValueError("this model is already patched with MoEFeedForward layers; a dense model is needed")
    return [family.style.linears(layer) for layer in _get(base, family.layers)], family.style.gated


def _make_router(kind: str, config, d: int, E: int, seed: int, token_counts: Optional[Tensor]):
    if kind == "hash":
        return HashRouter(config.vocab_size, E, seed=seed)
    if kind == "balanced_hash":
        if token_counts is None:  # loading a checkpoint: the saved table overwrites this one
            return BalancedHashRouter(config.vocab_size, E, table=torch.zeros(config.vocab_size, dtype=torch.int64))
        return BalancedHashRouter.from_token_counts(token_counts, E, seed=seed)
    return (TokenGate if kind == "token_gate" else SentenceGate)(d, E)


def patch(model: nn.Module, num_experts: int = 4, expert_size: int = 768, shared: int = 512,
          importance: Optional[Tensor] = None, router: str = "hash", seed: int = 0,
          token_counts: Optional[Tensor] = None, backend: Optional[str] = None,
          _from_checkpoint: bool = False) -> nn.Module:
    """Replace every layer's FFN of a HF encoder with ``MoEFeedForward``.

    Args:
        model: a stock HF model of a family in ``SUPPORTED_MODEL_TYPES`` (base model or ``*For*`` head).
        num_experts, expert_size, shared: MoEBERT's N, expert width and shared neurons.
        importance: ``[L, d_ff]`` neuron importance (see ``expert_neuron_ids``); None keeps the dense order.
        router: one of ``"hash"`` (the paper's default), ``"balanced_hash"`` (needs ``token_counts``),
            ``"token_gate"``, ``"sentence_gate"``.
        seed: layer l's hash table is drawn with ``seed + l``.
        token_counts: ``[vocab_size]`` token frequencies for ``"balanced_hash"``.
        backend: force a backend for every MoE layer (default: the dispatch decides).

    Returns the same model, patched. ``model.config.moebert`` records the settings.
    """
    base, family, config = _base_and_family(model)
    layers = _get(base, family.layers)
    if any(isinstance(m, MoEFeedForward) for m in model.modules()):
        raise ValueError("model is already patched with MoEFeedForward layers")
    if router not in ROUTERS:
        raise ValueError(f"router must be one of {list(ROUTERS)}, got {router!r}")
    if router == "balanced_hash" and token_counts is not None:
        if tuple(torch.as_tensor(token_counts).shape) != (config.vocab_size,):
            raise ValueError(f"token_counts must be [vocab_size] = ({config.vocab_size},), "
                             f"got {tuple(torch.as_tensor(token_counts).shape)}")
    elif router == "balanced_hash" and not _from_checkpoint:
        raise ValueError("router='balanced_hash' needs token_counts=[vocab_size] token frequencies")
    hf_act = getattr(config, family.activation, None)
    if hf_act not in _ACTIVATIONS:
        raise ValueError(f"activation {hf_act!r} is not supported; supported: {list(_ACTIVATIONS)}")
    activation = _GATED[_ACTIVATIONS[hf_act]] if family.style.gated else _ACTIVATIONS[hf_act]
    dense = [family.style.read(layer) for layer in layers]
    d_ff, d = dense[0].d_ff, dense[0].w2.shape[0]
    _check_sizes(d_ff, num_experts, expert_size, shared)
    if importance is not None:
        importance = torch.as_tensor(importance)
        if tuple(importance.shape) != (len(layers), d_ff):
            raise ValueError(f"importance must be [num_layers, d_ff] = {(len(layers), d_ff)}, "
                             f"got {tuple(importance.shape)}")
        if not bool(torch.isfinite(importance).all()):
            raise ValueError("importance holds NaN or inf")
    neuron_ids = [expert_neuron_ids(None if importance is None else importance[i], d_ff, num_experts, expert_size,
                                    shared) for i in range(len(layers))]

    # Everything is checked: from here on the model changes.
    context = RoutingContext()
    style = family.style
    for i, (layer, ffn) in enumerate(zip(layers, dense)):
        w1 = ffn.w1
        r = _make_router(router, config, d, num_experts, seed + i, token_counts)
        moe = MoEFeedForward(d, expert_size, num_experts, router=r.to(w1.device), activation=activation,
                             dropout=ffn.dropout, layer_norm_eps=ffn.ln_eps, layer_idx=i,
                             fuse_norm=style.norm == "fused", expert_norm=style.norm != "none",
                             bias=ffn.b1 is not None, backend=backend, device=w1.device, dtype=w1.dtype)
        moe.load_dense(*(None if t is None else t.detach() for t in (ffn.w1, ffn.b1, ffn.w2, ffn.b2, ffn.ln_weight,
                                                                       ffn.ln_bias)), neuron_ids[i])
        moe.train(layer.training)  # new modules start in train mode; keep the model's mode
        moe._context = context
        if isinstance(r, HashRouter):
            context.hash_layers[i] = r
        style.install(layer, moe)

    def _begin(module, args, kwargs):
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        mask = kwargs.get("attention_mask", args[1] if len(args) > 1 else None)
        context.begin(input_ids, mask)

    model._moebert_hook = base.register_forward_pre_hook(_begin, with_kwargs=True)
    model._moebert_context = context
    config.moebert = asdict(MoEBertSettings(num_experts, expert_size, shared, router, seed, activation))
    return model


def moe_layers(model: nn.Module) -> list[MoEFeedForward]:
    return [m for m in model.modules() if isinstance(m, MoEFeedForward)]


def aux_loss(model: nn.Module) -> Optional[Tensor]:
    """Sum of the gates' load-balancing losses from the last forward (None with hash routing)."""
    losses = [m.aux_loss for m in moe_layers(model) if m.aux_loss is not None]
    return torch.stack(losses).sum() if losses else None
