"""MoE config and model classes for ``transformers``' Auto* loaders, one set per row of ``FAMILIES``.

A student's config has ``model_type = "moebert_kernels_<family>"``. ``import moebert_kernels``
registers that type with ``AutoConfig`` and the ``AutoModel*`` classes below, so
``AutoModelFor<Task>.from_pretrained(student)`` builds ``MoE<Family>For<Task>``: the stock class,
patched in ``__init__`` from ``config.moebert``. Without the import, transformers refuses the
unknown model type (naming it) instead of returning a dense model with random FFNs.

A stock class (``BertModel.from_pretrained(student)``, or ``pipeline()`` falling back to the class
named in ``config.architectures``) reads config.json with the stock config class, which would build
dense FFNs and leave them random. So a saved student's activation field (``hidden_act``) carries
``STOCK_CLASS_GUARD``: no stock class can build it, and its error says how to load the student.
The MoE config classes strip the guard again when they read the file.
"""
from __future__ import annotations

import transformers

from .checkpoint import moe_mismatch_message
from .patch import FAMILIES, Family, MoEBertSettings, family_of, moe_activation, patch

__all__ = ["AUTO_CLASSES", "MOE_CLASSES", "STOCK_CLASS_GUARD", "dense_class", "moe_config_class",
           "patch_from_config"]

STOCK_CLASS_GUARD = (" [a moebert_kernels MoE student: a stock transformers class would give it random FFNs. "
                     "Load it with `import moebert_kernels` and then AutoModel*.from_pretrained or pipeline(), "
                     "or with moebert_kernels.from_pretrained; those say why if they cannot load it]")

# (transformers Auto class, class-name suffix after the family prefix)
AUTO_CLASSES = (
    ("AutoModel", "Model"),
    ("AutoModelForSequenceClassification", "ForSequenceClassification"),
    ("AutoModelForTokenClassification", "ForTokenClassification"),
    ("AutoModelForQuestionAnswering", "ForQuestionAnswering"),
    ("AutoModelForMultipleChoice", "ForMultipleChoice"),
    ("AutoModelForMaskedLM", "ForMaskedLM"),
)

_CONFIGS: dict[str, type] = {}
MOE_CLASSES: dict[str, type] = {}  # class name -> MoE model class


def moe_config_class(family: Family) -> type:
    """The config class of a patched model of ``family`` (the family's config, another model_type)."""
    return _CONFIGS[family.model_type]


def dense_class(name: str):
    """The stock transformers class for a class name from ``config.architectures`` (MoE names included)."""
    cls = MOE_CLASSES.get(name)
    return cls.__bases__[-1] if cls is not None else getattr(transformers, name, None)


def patch_from_config(model, backend=None):
    """Patch a freshly built stock model as ``model.config.moebert`` says (weights come from the checkpoint)."""
    settings = MoEBertSettings.from_config(model.config.moebert)
    family = family_of(model.config.model_type)
    if family is not None:
        activation = moe_activation(family, model.config)
        if settings.activation != activation:
            raise ValueError(f"config.moebert['activation'] is {settings.activation!r} but the model's "
                             f"{family.activation}={getattr(model.config, family.activation)!r} makes the experts "
                             f"use {activation!r}; set it back to {activation!r} in config.json")
    return patch(model, settings.num_experts, settings.expert_size, settings.shared, router=settings.router,
                 seed=settings.seed, backend=backend, aux_loss_coef=settings.aux_loss_coef, _from_checkpoint=True,
                 tie_shared=settings.tie_shared)


class _StockClassGuard:
    """Mixed in before a family's config class: writes ``STOCK_CLASS_GUARD`` into the saved activation
    field of a student's config and strips it when reading one."""

    moebert_family: Family  # set on each MoE config class

    def __post_init__(self, **kwargs):
        name = self.moebert_family.activation
        value = getattr(self, name, None)
        if isinstance(value, str) and value.endswith(STOCK_CLASS_GUARD):
            setattr(self, name, value[:-len(STOCK_CLASS_GUARD)])
        super().__post_init__(**kwargs)

    def to_dict(self):
        out = super().to_dict()
        name = self.moebert_family.activation
        if "moebert" in out and isinstance(out.get(name), str) and not out[name].endswith(STOCK_CLASS_GUARD):
            out[name] += STOCK_CLASS_GUARD
        return out


class _PatchedOnInit:
    """Mixed in before a stock class: builds it, then patches it from ``config.moebert``."""

    def __init__(self, config, *args, **kwargs):
        super().__init__(config, *args, **kwargs)
        if not isinstance(getattr(config, "moebert", None), dict):
            raise ValueError(f"{type(self).__name__} needs a MoEBERT config (with a 'moebert' entry); "
                             "build a student with moebert_kernels.patch")
        patch_from_config(self)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs):
        """transformers' ``from_pretrained``, except that MoE weights missing from the checkpoint or of other
        shapes are an error, ``ignore_mismatched_sizes=True`` included (it would re-draw experts or tables)."""
        want_info = kwargs.pop("output_loading_info", False)
        ignore = kwargs.pop("ignore_mismatched_sizes", False)
        # Mismatches are collected instead of raised, so those of MoE weights can be explained.
        model, info = super().from_pretrained(pretrained_model_name_or_path, *args, output_loading_info=True,
                                              ignore_mismatched_sizes=True, **kwargs)
        source = f"checkpoint {pretrained_model_name_or_path}"
        message = moe_mismatch_message(model, source, info["missing_keys"], info["unexpected_keys"],
                                       info["mismatched_keys"])
        if message:
            raise ValueError(message)
        if info["mismatched_keys"] and not ignore:
            shapes = ", ".join(f"{k} {tuple(a)} vs {tuple(b)}" for k, a, b in sorted(info["mismatched_keys"]))
            raise ValueError(f"{source} does not fit {cls.__name__} (checkpoint vs model shapes: {shapes}); pass "
                             "ignore_mismatched_sizes=True to start those weights afresh (e.g. a new classifier)")
        return (model, info) if want_info else model


def _register(family: Family) -> None:
    dense_config = getattr(transformers, f"{family.prefix}Config")
    name = f"MoE{family.prefix}Config"
    config_cls = type(name, (_StockClassGuard, dense_config), {
        "model_type": family.moe_model_type, "moebert_family": family, "__module__": __name__, "__qualname__": name})
    globals()[name] = _CONFIGS[family.model_type] = config_cls
    transformers.AutoConfig.register(family.moe_model_type, config_cls)
    for auto_name, suffix in AUTO_CLASSES:
        dense_cls = getattr(transformers, f"{family.prefix}{suffix}", None)
        if dense_cls is None:
            continue
        name = f"MoE{dense_cls.__name__}"
        cls = type(name, (_PatchedOnInit, dense_cls), {"config_class": config_cls, "__module__": __name__,
                                                       "__qualname__": name})
        globals()[name] = MOE_CLASSES[name] = cls
        getattr(transformers, auto_name).register(config_cls, cls)


for _family in FAMILIES:
    _register(_family)
