"""``patch(model)``: turn a Hugging Face encoder into MoEBERT in place.

Table-driven over ``config.model_type`` (``FAMILIES``: layer path and FFN style per family); works
on instances: the model keeps its class, its config becomes the family's MoE config class
(``hf/auto.py``) so a saved student names moebert_kernels in its ``model_type``. Every argument is
checked before the model is touched, so a bad call leaves the model as it was.
"""
from __future__ import annotations

import math
import threading
import weakref
from dataclasses import asdict, dataclass, fields
from typing import Callable, Optional

import torch
from torch import Tensor, nn
from torch._C._dynamo.eval_frame import get_eval_frame_callback

from ..modules.moe import DeferredExpertLayerNorm, MoEFeedForward
from ..modules.routers import ROUTERS, BalancedHashRouter, HashRouter, SentenceGate, TokenGate
from ..modules.routing_state import RoutingState, bind_to_call, last_aux_loss, remember_aux_losses
from ..ops.dispatch import BACKENDS
from ..ops.moe_ffn import ACTIVATIONS

__all__ = ["FAMILIES", "MoEBertSettings", "SUPPORTED_CLASSES", "SUPPORTED_MODEL_TYPES", "aux_loss",
           "default_expert_sizes", "dense_ffn_linears", "expert_neuron_ids", "family_of", "moe_layers", "patch"]

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
class FFNStyle:
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


POST_NORM = FFNStyle("intermediate.dense", "output.dense", "output.LayerNorm", "output.dropout",
                     _install_post_norm, norm="fused")
DISTILBERT = FFNStyle("ffn.lin1", "ffn.lin2", "output_layer_norm", "ffn.dropout", _install_distilbert,
                      norm="deferred")
# ModernBERT applies its dropout to act(a) * g; the MoE applies it to the FFN output (default p = 0).
GATED_PRE_NORM = FFNStyle("mlp.Wi", "mlp.Wo", None, "mlp.drop", _install_gated_pre_norm, norm="none", gated=True)


@dataclass(frozen=True)
class Family:
    model_type: str  # the dense model's config.model_type
    prefix: str  # transformers class names: f"{prefix}Config", f"{prefix}Model", f"{prefix}For<Task>"
    layers: str  # attribute path from the base model to the layer list
    style: FFNStyle
    activation: str = "hidden_act"  # the config attribute naming the FFN activation

    @property
    def moe_model_type(self) -> str:
        """``model_type`` of a saved student: names the package that can load it."""
        return f"moebert_kernels_{self.model_type}"


FAMILIES = (
    Family("bert", "Bert", "encoder.layer", POST_NORM),  # MiniLM-style checkpoints too
    Family("roberta", "Roberta", "encoder.layer", POST_NORM),
    Family("distilbert", "DistilBert", "transformer.layer", DISTILBERT, "activation"),
    Family("deberta-v2", "DebertaV2", "encoder.layer", POST_NORM),  # DeBERTa-v2 and v3; LayerNorm eps 1e-7
    Family("electra", "Electra", "encoder.layer", POST_NORM),
    Family("xlm-roberta", "XLMRoberta", "encoder.layer", POST_NORM),
    Family("camembert", "Camembert", "encoder.layer", POST_NORM),
    Family("modernbert", "ModernBert", "layers", GATED_PRE_NORM, "hidden_activation"),  # mmBERT, Ettin too
)
SUPPORTED_MODEL_TYPES = tuple(f.model_type for f in FAMILIES)
SUPPORTED_CLASSES = ", ".join(f"{f.prefix}Model/{f.prefix}For*" for f in FAMILIES)
_BY_MODEL_TYPE = {t: f for f in FAMILIES for t in (f.model_type, f.moe_model_type)}


def family_of(model_type: Optional[str]) -> Optional[Family]:
    """The family of a dense or MoE ``model_type``, or None."""
    return _BY_MODEL_TYPE.get(model_type)


@dataclass(frozen=True)
class MoEBertSettings:
    """What ``patch`` did; stored as ``config.moebert`` so a checkpoint can be rebuilt."""

    num_experts: int = 4
    expert_size: int = 768
    shared: int = 512
    router: str = "hash"
    seed: int = 0
    activation: str = "gelu"
    aux_loss_coef: float = 0.0
    tie_shared: bool = False

    def __post_init__(self):
        def bad(name, want):
            return ValueError(f"config.moebert['{name}'] must be {want}, got {getattr(self, name)!r}; "
                              "config.moebert must hold what patch() wrote (edit config.json back)")

        for name, low in (("num_experts", 1), ("expert_size", 1), ("shared", 0), ("seed", None)):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or (low is not None and v < low):
                raise bad(name, "an int" if low is None else f"an int >= {low}")
        if self.router not in ROUTERS:
            raise bad("router", f"one of {list(ROUTERS)}")
        if self.activation not in ACTIVATIONS:
            raise bad("activation", f"one of {list(ACTIVATIONS)}")
        v = self.aux_loss_coef
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
            raise bad("aux_loss_coef", "a finite number >= 0")
        if not isinstance(self.tie_shared, bool):
            raise bad("tie_shared", "true or false")

    @classmethod
    def from_config(cls, entry) -> "MoEBertSettings":
        """The settings a checkpoint's ``config.moebert`` holds; unknown or malformed fields are errors."""
        if not isinstance(entry, dict):
            raise ValueError(f"config.moebert must be a dict of MoEBERT settings, got {type(entry).__name__}")
        known = [f.name for f in fields(cls)]
        unknown = sorted(set(entry) - set(known))
        if unknown:
            raise ValueError(f"config.moebert has unknown field(s) {unknown}; this moebert_kernels knows {known}. "
                             "Remove them from config.json, or install the moebert_kernels version that saved "
                             "the checkpoint")
        return cls(**entry)


def default_expert_sizes(d_ff: int, expert_size: Optional[int] = None,
                         shared: Optional[int] = None) -> tuple[int, int]:
    """``(expert_size, shared)`` with the defaults filled in: ``d_ff // 4`` and 2/3 of the expert
    size rounded down to a multiple of 8 (BERT-base: 768 and 512, the paper's sizes)."""
    if expert_size is None:
        expert_size = d_ff // 4
    if shared is None and isinstance(expert_size, int):
        shared = expert_size * 2 // 3 // 8 * 8
    return expert_size, shared


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
    if family_of(model_type) is None:
        raise ValueError(f"moebert_kernels.patch supports model types {list(SUPPORTED_MODEL_TYPES)} "
                         f"({SUPPORTED_CLASSES}); got {model_type!r} ({type(model).__name__})")
    base = getattr(model, "base_model", model)
    return base, family_of(model_type), config


def dense_ffn_linears(model: nn.Module) -> tuple[list[tuple[nn.Linear, nn.Linear]], bool]:
    """``([(up, down) per layer], gated)`` of a dense model of a supported family.

    Gated (ModernBERT): ``up`` has ``2 d_ff`` rows; neuron j is rows j and d_ff + j of it and column j of ``down``.
    """
    base, family, _ = _base_and_family(model)
    if any(isinstance(m, MoEFeedForward) for m in model.modules()):
        raise ValueError("this model is already patched with MoEFeedForward layers; a dense model is needed")
    return [family.style.linears(layer) for layer in _get(base, family.layers)], family.style.gated


def moe_activation(family: Family, config) -> str:
    """The ``moe_ffn`` activation of a dense model's FFN, from its config."""
    hf_act = getattr(config, family.activation, None)
    if hf_act not in _ACTIVATIONS:
        raise ValueError(f"activation {hf_act!r} is not supported; supported: {list(_ACTIVATIONS)}")
    return _GATED[_ACTIVATIONS[hf_act]] if family.style.gated else _ACTIVATIONS[hf_act]


def _make_router(kind: str, config, d: int, E: int, seed: int, token_counts: Optional[Tensor]):
    if kind == "hash":
        return HashRouter(config.vocab_size, E, seed=seed)
    if kind == "balanced_hash":
        if token_counts is None:  # loading a checkpoint: the saved table overwrites this one
            return BalancedHashRouter(config.vocab_size, E, table=torch.zeros(config.vocab_size, dtype=torch.int64))
        return BalancedHashRouter.from_token_counts(token_counts, E, seed=seed)
    return (TokenGate if kind == "token_gate" else SentenceGate)(d, E)


def patch(model: nn.Module, num_experts: int = 4, expert_size: Optional[int] = None, shared: Optional[int] = None,
          importance: Optional[Tensor] = None, router: str = "hash", seed: int = 0,
          token_counts: Optional[Tensor] = None, backend: Optional[str] = None, aux_loss_coef: float = 0.0,
          _from_checkpoint: bool = False, tie_shared: bool = False) -> nn.Module:
    """Replace every layer's FFN of a HF encoder with ``MoEFeedForward``.

    Args:
        model: a stock HF model of a family in ``FAMILIES`` (base model or ``*For*`` head).
        num_experts, expert_size, shared: MoEBERT's N, expert width and shared neurons; the sizes
            default to ``default_expert_sizes(d_ff)`` (d_ff/4 and 2/3 of that: 768/512 for BERT-base).
        importance: ``[L, d_ff]`` neuron importance (see ``expert_neuron_ids``); None keeps the dense order.
        router: one of ``"hash"`` (the paper's default), ``"balanced_hash"`` (needs ``token_counts``),
            ``"token_gate"``, ``"sentence_gate"``.
        seed: layer l's hash table is drawn with ``seed + l``. After ``resize_token_embeddings`` the tables
            follow ``config.vocab_size`` (new ids get deterministic experts, see ``HashRouter.resize``).
        token_counts: ``[vocab_size]`` token frequencies for ``"balanced_hash"``.
        backend: force a backend for every MoE layer (one of ``ops.dispatch.BACKENDS``; default: the
            dispatch decides).
        aux_loss_coef: gate routers only: the model adds ``aux_loss_coef * aux_loss(model)`` to
            ``outputs.loss`` whenever it computes a loss (labels passed), like transformers'
            ``router_aux_loss_coef``.
        tie_shared: store the ``shared`` neurons once, as a shared FFN every token runs, instead of a
            copy in every expert; each expert keeps its ``expert_size - shared`` own neurons. Right after
            conversion the outputs are those of the copied layout; ``shared=0`` is the same either way.

    Returns the same model, patched. ``model.config.moebert`` records the settings.
    """
    base, family, config = _base_and_family(model)
    layers = _get(base, family.layers)
    if any(isinstance(m, MoEFeedForward) for m in model.modules()):
        raise ValueError("model is already patched with MoEFeedForward layers")
    if router not in ROUTERS:
        raise ValueError(f"router must be one of {list(ROUTERS)}, got {router!r}")
    if backend is not None and backend not in BACKENDS:
        raise ValueError(f"backend must be one of {list(BACKENDS)} or None, got {backend!r}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"seed must be an int, got {seed!r}")
    if isinstance(aux_loss_coef, bool) or not isinstance(aux_loss_coef, (int, float)) or \
            not math.isfinite(aux_loss_coef) or aux_loss_coef < 0:
        raise ValueError(f"aux_loss_coef must be a finite number >= 0, got {aux_loss_coef!r}")
    if aux_loss_coef and router not in ("token_gate", "sentence_gate"):
        raise ValueError(f"aux_loss_coef is the weight of the gate routers' balancing loss; router={router!r} "
                         "has none (use token_gate or sentence_gate, or leave aux_loss_coef at 0)")
    if not isinstance(tie_shared, bool):
        raise TypeError(f"tie_shared must be a bool, got {type(tie_shared).__name__}")
    if router == "balanced_hash" and token_counts is not None:
        if tuple(torch.as_tensor(token_counts).shape) != (config.vocab_size,):
            raise ValueError(f"token_counts must be [vocab_size] = ({config.vocab_size},), "
                             f"got {tuple(torch.as_tensor(token_counts).shape)}")
    elif router == "balanced_hash" and not _from_checkpoint:
        raise ValueError("router='balanced_hash' needs token_counts=[vocab_size] token frequencies")
    activation = moe_activation(family, config)
    style = family.style
    dense = [style.read(layer) for layer in layers]
    d_ff, d = dense[0].d_ff, dense[0].w2.shape[0]
    expert_size, shared = default_expert_sizes(d_ff, expert_size, shared)
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
    from .auto import moe_config_class  # auto.py builds its classes from this file's table

    # Everything is checked: from here on the model changes.
    tied = shared if tie_shared else 0
    for i, (layer, ffn) in enumerate(zip(layers, dense)):
        w1 = ffn.w1
        r = _make_router(router, config, d, num_experts, seed + i, token_counts)
        moe = MoEFeedForward(d, expert_size - tied, num_experts, router=r.to(w1.device), activation=activation,
                             dropout=ffn.dropout, layer_norm_eps=ffn.ln_eps, layer_idx=i,
                             fuse_norm=style.norm == "fused", expert_norm=style.norm != "none",
                             bias=ffn.b1 is not None, backend=backend, device=w1.device, dtype=w1.dtype,
                             shared_size=tied)
        moe.load_dense(*(None if t is None else t.detach() for t in (ffn.w1, ffn.b1, ffn.w2, ffn.b2, ffn.ln_weight,
                                                                       ffn.ln_bias)), neuron_ids[i])
        moe.train(layer.training)  # new modules start in train mode; keep the model's mode
        style.install(layer, moe)

    # Each call of the base model is a RoutingState (modules/routing_state.py); the model holds none.
    # The hash tables follow resize_token_embeddings before a state dict is taken (and in _begin_batch).
    base.register_state_dict_pre_hook(_follow_vocabulary)
    base.register_forward_pre_hook(_begin_batch, with_kwargs=True)
    base.register_forward_hook(_end_batch, always_call=True)
    if aux_loss_coef:
        model.register_forward_pre_hook(_take_turn)
        model.register_forward_hook(_add_aux_loss, with_kwargs=True, always_call=True)
    config.__class__ = moe_config_class(family)
    config.moebert = asdict(MoEBertSettings(num_experts, expert_size, shared, router, seed, activation,
                                            float(aux_loss_coef), tie_shared))
    return model


# Module-level hooks (no closures), so copies, pickles, EMA and quantized models route like the original.
def _follow_vocabulary(base: nn.Module, *_) -> None:
    """Resize the hash tables to ``config.vocab_size`` once ``resize_token_embeddings`` changed it.

    transformers offers no hook into the resize, so the tables follow before the next forward and
    before the state dict is taken (``save_pretrained``): the saved tables always match the saved config.
    """
    for m in moe_layers(base):
        _follow_vocabulary_of(m, base.config.vocab_size)


def _follow_vocabulary_of(moe: MoEFeedForward, vocab_size: int) -> None:
    if isinstance(moe.router, HashRouter) and moe.router.vocab_size != vocab_size:
        moe.router.resize(vocab_size)


def _begin_batch(base: nn.Module, args, kwargs) -> None:
    input_ids = kwargs.get("input_ids", args[0] if args else None)
    mask = kwargs.get("attention_mask", args[1] if len(args) > 1 else None)
    layers = []
    vocab_size = base.config.vocab_size
    for m in base.modules():  # one walk a call: vocabulary, layers and checkpoint functions
        if isinstance(m, MoEFeedForward):
            _follow_vocabulary_of(m, vocab_size)  # before the plans are built from the tables
            layers.append(m)
        # Set by gradient_checkpointing_enable() on each layer, at any time: wrapped (once) so that
        # the recompute in backward runs in the call that ran the layer.
        checkpoint = m.__dict__.get("_gradient_checkpointing_func")
        if checkpoint is not None and not isinstance(checkpoint, _CheckpointInCall) and \
                not torch.compiler.is_compiling():
            m._gradient_checkpointing_func = _CheckpointInCall(checkpoint)
    RoutingState.begin(layers, input_ids, mask)


def _end_batch(base: nn.Module, args, output) -> None:
    RoutingState.end(moe_layers(base))


class _CheckpointInCall:
    """A layer's checkpoint function (``torch.utils.checkpoint.checkpoint`` or HF's variant of it)
    whose recompute reads the routing of the call that ran the layer, not of a later call."""

    def __init__(self, checkpoint: Callable):
        self.checkpoint = checkpoint

    def __call__(self, function, *args, **kwargs):
        return self.checkpoint(bind_to_call(function), *args, **kwargs)


# torch.compile(model) and model.compile() run the model's own hooks as frames of their own, outside the
# compiled forward: its graph hands the layers' aux losses out as attributes (``layer.aux_loss``) and the
# loss hook reads them back, so another thread's compiled call could land in between and lend this call its
# aux loss. Such calls of one model take turns, from the pre-hook to the loss hook; eager calls (whose
# losses stay in their context) and calls inlined into a larger graph (one frame) do not. Both hooks run
# eagerly when dynamo meets them as a frame of their own (skip_code) and are traced when inlined.
_TURNS: "weakref.WeakKeyDictionary[nn.Module, threading.RLock]" = weakref.WeakKeyDictionary()
_TURNS_LOCK = threading.Lock()
_HELD = threading.local()  # .models: the models whose turn this thread holds, innermost last


def _between_compiled_frames() -> bool:
    # An eager hook under dynamo's frame callback; is_compiling first, so a traced hook reads nothing else.
    return not torch.compiler.is_compiling() and get_eval_frame_callback() is not None


def _take_turn(model: nn.Module, args) -> None:
    if _between_compiled_frames():
        _wait_for_turn(model)


def _add_aux_loss(model: nn.Module, args, kwargs, output):
    if _between_compiled_frames():
        return _add_aux_loss_in_turn(model, kwargs, output)
    return _with_aux_loss(model, kwargs, output)


@torch.compiler.disable  # (the hooks' eager branches: their callees must not become compiled frames)
def _wait_for_turn(model: nn.Module) -> None:
    with _TURNS_LOCK:
        turn = _TURNS.setdefault(model, threading.RLock())
    turn.acquire()
    _HELD.__dict__.setdefault("models", []).append(model)


@torch.compiler.disable
def _add_aux_loss_in_turn(model: nn.Module, kwargs, output):
    held = getattr(_HELD, "models", None)
    if not held or held[-1] is not model:  # (the pre-hook ran before dynamo's callback was set)
        return _with_aux_loss(model, kwargs, output)
    try:
        # The layers' aux_loss attributes are this call's: this thread's aux_loss(model) reads them later too.
        remember_aux_losses(moe_layers(model))
        return _with_aux_loss(model, kwargs, output)
    finally:
        held.pop()
        _TURNS[model].release()


def _with_aux_loss(model: nn.Module, kwargs, output):
    if output is None:  # the forward raised (an always_call hook)
        return output
    # A loss is there when labels were passed: the ModelOutput's "loss", or a tuple's first item.
    as_tuple = isinstance(output, tuple)
    if as_tuple:
        has_loss = any(kwargs.get(k) is not None for k in ("labels", "start_positions", "end_positions"))
        loss = output[0] if has_loss else None
    else:
        loss = output.get("loss") if isinstance(output, dict) else None
    aux = aux_loss(model) if loss is not None else None
    if aux is None:
        return output
    loss = loss + model.config.moebert["aux_loss_coef"] * aux
    if as_tuple:
        return (loss,) + output[1:]
    output["loss"] = loss
    return output


for _hook in (_take_turn, _add_aux_loss, _between_compiled_frames):
    torch._dynamo.eval_frame.skip_code(_hook.__code__)


def moe_layers(model: nn.Module) -> list[MoEFeedForward]:
    return [m for m in model.modules() if isinstance(m, MoEFeedForward)]


def aux_loss(model: nn.Module) -> Optional[Tensor]:
    """Sum of the gates' load-balancing losses from the model's last forward in this thread (None with
    hash routing); ``model`` may also be one layer or any module holding some."""
    losses = [a for a in map(last_aux_loss, moe_layers(model)) if a is not None]
    return torch.stack(losses).sum() if losses else None
