"""MoE config and model classes for ``transformers``' Auto* loaders, one set per row of ``FAMILIES``.

A student's config has ``model_type = "moebert_kernels_<family>"``. ``import moebert_kernels``
registers that type with ``AutoConfig`` and the ``AutoModel*`` classes below, so
``AutoModelFor<Task>.from_pretrained(student)`` builds ``MoE<Family>For<Task>``: the stock class,
patched in ``__init__`` from ``config.moebert``. Without the import, transformers refuses the
unknown model type (naming it) instead of returning a dense model with random FFNs.
"""
from __future__ import annotations

import transformers

from .patch import FAMILIES, Family, MoEBertSettings, patch

__all__ = ["AUTO_CLASSES", "MOE_CLASSES", "dense_class", "moe_config_class", "patch_from_config"]

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
    settings = MoEBertSettings(**model.config.moebert)
    return patch(model, settings.num_experts, settings.expert_size, settings.shared, router=settings.router,
                 seed=settings.seed, backend=backend, aux_loss_coef=settings.aux_loss_coef, _from_checkpoint=True)


class _PatchedOnInit:
    """Mixed in before a stock class: builds it, then patches it from ``config.moebert``."""

    def __init__(self, config, *args, **kwargs):
        super().__init__(config, *args, **kwargs)
        if not isinstance(getattr(config, "moebert", None), dict):
            raise ValueError(f"{type(self).__name__} needs a MoEBERT config (with a 'moebert' entry); "
                             "build a student with moebert_kernels.patch")
        patch_from_config(self)


def _register(family: Family) -> None:
    dense_config = getattr(transformers, f"{family.prefix}Config")
    name = f"MoE{family.prefix}Config"
    config_cls = type(name, (dense_config,), {"model_type": family.moe_model_type, "__module__": __name__,
                                              "__qualname__": name})
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
