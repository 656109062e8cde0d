"""Shared helpers: loading teachers and students, devices, precision, Trainer arguments."""
from __future__ import annotations

import functools
import inspect
import json
import os
from typing import Optional

import torch

from .tasks import TaskSpec

__all__ = ["resolve_device", "resolve_precision", "load_config", "is_moebert_checkpoint", "load_teacher",
           "load_student", "load_any", "load_tokenizer", "training_arguments", "trainer_class", "parameter_counts",
           "describe", "PRUNED_KEY"]

# config key recording what ``moebert convert --baseline pruned`` kept (how `moebert evaluate` tells a
# baseline from a teacher); here, not in convert, so that loading never imports the converter
PRUNED_KEY = "moebert_pruned"


def resolve_device(device: Optional[str]) -> str:
    if device in (None, "auto"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {device} asked for, but torch {torch.__version__} sees no CUDA device")
    if device != "cpu" and not device.startswith("cuda"):
        raise ValueError(f"--device must be cpu, cuda[:N] or auto, got {device!r}")
    return device


def resolve_precision(precision: str, device: str) -> str:
    """fp32 on CPU; on CUDA ``auto`` picks bf16 where supported, else fp16."""
    if precision not in ("auto", "fp32", "fp16", "bf16"):
        raise ValueError(f"--precision must be auto, fp32, fp16 or bf16, got {precision!r}")
    if not device.startswith("cuda"):
        if precision in ("fp16", "bf16"):
            raise ValueError(f"--precision {precision} needs a CUDA device (training here runs in fp32)")
        return "fp32"
    if precision == "auto":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return precision


def load_config(path: str):
    from transformers import AutoConfig

    import moebert_kernels  # noqa: F401  registers the students' model types with AutoConfig

    if not os.path.isdir(path):
        raise FileNotFoundError(f"model folder {path} does not exist")
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise ValueError(f"{path} holds no config.json: not a Hugging Face model folder")
    try:
        return AutoConfig.from_pretrained(path)
    except (ValueError, KeyError) as e:
        raise ValueError(f"cannot read the model config in {path}: {e}") from None


def is_moebert_checkpoint(path: str) -> bool:
    with open(os.path.join(path, "config.json")) as f:
        return isinstance(json.load(f).get("moebert"), dict)


def is_pruned_checkpoint(path: str) -> bool:
    """A dense baseline from ``moebert convert --baseline pruned``."""
    with open(os.path.join(path, "config.json")) as f:
        return isinstance(json.load(f).get(PRUNED_KEY), dict)


def _check_family(config, path: str, role: str) -> None:
    from moebert_kernels import SUPPORTED_MODEL_TYPES
    from moebert_kernels.hf import SUPPORTED_CLASSES, family_of

    if family_of(config.model_type) is None:
        raise ValueError(f"{role} checkpoint {path} is a {config.model_type!r} model; MoEBERT supports "
                         f"{list(SUPPORTED_MODEL_TYPES)} ({SUPPORTED_CLASSES})")


def _head_class(task: TaskSpec):
    from transformers import AutoModelForQuestionAnswering, AutoModelForSequenceClassification

    return AutoModelForQuestionAnswering if task.qa else AutoModelForSequenceClassification


def load_teacher(path: str, task: TaskSpec, num_labels: Optional[int] = None, id2label: Optional[dict] = None,
                 device: Optional[str] = None):
    """A dense encoder of a supported family with the task's head (new head when ``path`` is a bare encoder)."""
    config = load_config(path)
    _check_family(config, path, "teacher")
    if is_moebert_checkpoint(path):
        raise ValueError(f"{path} is already a MoEBERT (converted) checkpoint; a dense teacher is needed here")
    kw = {}
    if not task.qa:
        kw["num_labels"] = num_labels or task.num_labels
        if id2label:
            kw["id2label"] = {int(k): v for k, v in id2label.items()}
            kw["label2id"] = {v: int(k) for k, v in id2label.items()}
        if task.is_regression:
            kw["problem_type"] = "regression"
    # fp32 master weights even from a half-precision copy (scripts/pack_demo_model.py); AMP does the rest.
    model = _head_class(task).from_pretrained(path, **kw).float()
    _check_head(model, task, path)
    return model.to(device) if device else model


def load_student(path: str, task: Optional[TaskSpec] = None, device: Optional[str] = None):
    import moebert_kernels as mk

    config = load_config(path)
    _check_family(config, path, "student")
    if is_pruned_checkpoint(path):  # a dense baseline student: stock HF classes load it
        if task is None:
            raise ValueError(f"{path} is a pruned dense baseline; loading it needs its task")
        return load_teacher(path, task, num_labels=None if task.qa else config.num_labels, device=device)
    if not is_moebert_checkpoint(path):
        raise ValueError(f"{path} is a dense {config.model_type!r} checkpoint, not a MoEBERT one: "
                         "run `moebert convert` on it first (or `moebert convert --baseline pruned`)")
    model = mk.from_pretrained(path, device=device)
    if task is not None:
        _check_head(model, task, path)
    return model


def load_any(path: str, task: TaskSpec, device: Optional[str] = None):
    """Teacher or student, whichever the folder holds (for evaluate/predict)."""
    load_config(path)
    if is_moebert_checkpoint(path):
        return load_student(path, task, device)
    return load_teacher(path, task, device=device, num_labels=load_config(path).num_labels if not task.qa else None)


def _check_head(model, task: TaskSpec, path: str) -> None:
    name = type(model).__name__
    if task.qa and not name.endswith("ForQuestionAnswering"):
        raise ValueError(f"{path} holds a {name}; task {task.name!r} needs a question-answering model")
    if not task.qa:
        if not name.endswith("ForSequenceClassification"):
            raise ValueError(f"{path} holds a {name}; task {task.name!r} needs a sequence-classification model")
        n = model.config.num_labels
        if task.is_regression and n != 1:
            raise ValueError(f"{path} has {n} labels; the regression task {task.name!r} needs 1")
        if not task.is_regression and task.name not in ("classification",) and n != task.num_labels:
            raise ValueError(f"{path} has {n} labels; task {task.name!r} has {task.num_labels}")


def load_tokenizer(path: str):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as e:
        raise ValueError(f"cannot load a tokenizer from {path}: {e}") from None


def training_arguments(output_dir: str, *, learning_rate: float, batch_size: int, epochs: float, device: str,
                       precision: str, seed: int = 0, max_steps: int = -1, weight_decay: float = 0.0,
                       warmup_ratio: float = 0.0, save_steps: int = 500, save_total_limit: Optional[int] = 2,
                       logging_steps: int = 50, gradient_accumulation_steps: int = 1, ddp_backend: Optional[str] = None,
                       dataloader_num_workers: int = 0, group_by_length: bool = True):
    """TrainingArguments for both finetune and distill; torchrun/accelerate set the world size."""
    from transformers import TrainingArguments

    if ddp_backend is None and int(os.environ.get("WORLD_SIZE", "1")) > 1 and not device.startswith("cuda"):
        ddp_backend = "gloo"
    kw = dict(
        output_dir=output_dir,
        learning_rate=learning_rate,
        per_device_train_batch_size=batch_size,
        per_device_eval_batch_size=batch_size,
        num_train_epochs=epochs,
        max_steps=max_steps,
        weight_decay=weight_decay,
        seed=seed,
        data_seed=seed,
        fp16=precision == "fp16",
        bf16=precision == "bf16",
        use_cpu=not device.startswith("cuda"),
        save_strategy="steps",
        save_steps=save_steps,
        save_total_limit=save_total_limit,
        logging_steps=logging_steps,
        report_to="none",
        remove_unused_columns=False,
        gradient_accumulation_steps=gradient_accumulation_steps,
        ddp_backend=ddp_backend,
        ddp_find_unused_parameters=False,
        dataloader_num_workers=dataloader_num_workers,
    )
    accepted = inspect.signature(TrainingArguments.__init__).parameters
    # transformers 5.x folded warmup_ratio into a float warmup_steps; older releases have both.
    if "warmup_ratio" in accepted:
        kw["warmup_ratio"] = warmup_ratio
    elif warmup_ratio:
        kw["warmup_steps"] = float(warmup_ratio)
    if group_by_length:  # batches of similar length: far less padding to compute on
        if "train_sampling_strategy" in accepted:
            kw["train_sampling_strategy"] = "group_by_length"
        elif "group_by_length" in accepted:
            kw["group_by_length"] = True
    if "save_safetensors" in accepted:
        kw["save_safetensors"] = True
    return TrainingArguments(**kw)


@functools.lru_cache(maxsize=None)
def trainer_class():
    """transformers' ``Trainer`` whose group-by-length batch order is drawn from (seed, epoch) alone.

    The stock ``LengthGroupedSampler`` draws each epoch's order from the global RNG, whose state at the
    epoch's start no checkpoint keeps, so a run resumed mid-epoch saw other batches than the uninterrupted
    run (its weights ended up to 9e-4 apart on a tiny model). Seeded per epoch, the resumed run skips to the
    same batches, the Trainer restores the dropout RNG, and both runs end bit-identical (tests)."""
    from transformers import Trainer
    from transformers.trainer_pt_utils import LengthGroupedSampler, get_length_grouped_indices

    class EpochSeededLengthSampler(LengthGroupedSampler):
        def __init__(self, batch_size: int, lengths: list, seed: int):
            super().__init__(batch_size, lengths=lengths)
            self.seed, self.epoch = seed, 0

        def set_epoch(self, epoch: int) -> None:  # the Trainer calls it before every epoch
            self.epoch = int(epoch)

        def __iter__(self):
            g = torch.Generator().manual_seed(self.seed + self.epoch)
            return iter(get_length_grouped_indices(self.lengths, self.batch_size, generator=g))

    class ResumableTrainer(Trainer):
        def _get_train_sampler(self, *args, **kwargs):
            sampler = super()._get_train_sampler(*args, **kwargs)
            if type(sampler) is LengthGroupedSampler:
                seed = self.args.data_seed if self.args.data_seed is not None else self.args.seed
                return EpochSeededLengthSampler(sampler.batch_size, sampler.lengths, seed)
            return sampler

    return ResumableTrainer


def parameter_counts(model) -> tuple[int, int]:
    """(total, active per token): a token runs one expert of each MoE layer, and its shared FFN if tied."""
    import moebert_kernels as mk

    total = sum(p.numel() for p in model.parameters())
    inactive = 0
    for layer in mk.moe_layers(model):
        E = layer.num_experts
        expert = sum(p.numel() for n, p in layer.named_parameters(recurse=False) if not n.startswith("shared_"))
        inactive += expert - expert // E
    return total, total - inactive


def describe(model) -> str:
    """What a loaded model is: dense (a teacher), pruned dense baseline, or MoE student."""
    config = model.config
    moe, pruned = getattr(config, "moebert", None), getattr(config, PRUNED_KEY, None)
    if isinstance(moe, dict):
        layout = ", tied" if moe.get("tie_shared") else ""
        return (f"MoE student ({moe['num_experts']} experts x {moe['expert_size']} neurons, {moe['shared']} shared"
                f"{layout}, {moe['router']} router)")
    if isinstance(pruned, dict):
        ranking = "importance-ranked" if pruned["ranking"] == "importance" else pruned["ranking"]
        return f"pruned dense baseline (FFN {pruned['width']} of {pruned['d_ff']} neurons, {ranking})"
    width = getattr(config, "intermediate_size", None) or getattr(config, "hidden_dim", None)
    return f"dense teacher (FFN {width} neurons)"
