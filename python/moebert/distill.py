"""``moebert distill``: layer-wise distillation of a MoEBERT student from its dense teacher.

Loss (``moebert_kernels.DistillationLoss``): alpha_ce * CE(student, labels)
+ lam * (sum over layers of MSE(student hidden, teacher hidden) + prediction loss).
The teacher runs in eval mode under no_grad, on the student's device, and is an attribute
of the Trainer, not a submodule of the student, so checkpoints hold the student only.
Training goes through the HF Trainer, so ``torchrun --nproc_per_node N`` and
``accelerate launch`` work unchanged, as do fp16/bf16 and checkpoint/resume.
"""
from __future__ import annotations

from contextlib import nullcontext
from typing import Optional

import torch

__all__ = ["DistillTrainer", "build_trainer", "make_loss", "run"]

_TARGETS = ("labels", "start_positions", "end_positions")


def _make_trainer_class():
    from .common import trainer_class

    class DistillTrainer(trainer_class()):
        """A Trainer whose loss is ``DistillationLoss`` against a frozen teacher."""

        def __init__(self, *args, teacher=None, loss_fn=None, aux_weight: float = 0.01, **kwargs):
            super().__init__(*args, **kwargs)
            if teacher is None or loss_fn is None:
                raise ValueError("DistillTrainer needs teacher= and loss_fn=")
            teacher.eval()
            for p in teacher.parameters():
                p.requires_grad_(False)
            self.teacher = teacher.to(self.args.device)
            self.loss_fn = loss_fn.to(self.args.device)
            self.aux_weight = aux_weight
            self.last_parts: dict = {}
            # Our loss is a per-batch mean that ignores num_items_in_batch: let the Trainer divide it by the
            # gradient-accumulation steps as it does for plain losses.
            self.model_accepts_loss_kwargs = False

        def _teacher_autocast(self):
            dev = self.args.device
            if dev.type == "cuda" and (self.args.fp16 or self.args.bf16):
                return torch.autocast("cuda", dtype=torch.bfloat16 if self.args.bf16 else torch.float16)
            return nullcontext()

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            import moebert_kernels as mk

            inputs = dict(inputs)
            targets = {k: inputs.pop(k) for k in _TARGETS if k in inputs}
            out = model(**inputs, output_hidden_states=True)
            with torch.no_grad(), self._teacher_autocast():
                t_out = self.teacher(**inputs, output_hidden_states=True)
            if "start_positions" in targets:
                s_logits = (out.start_logits, out.end_logits)
                t_logits = (t_out.start_logits, t_out.end_logits)
                labels = (targets["start_positions"], targets["end_positions"])
            else:
                s_logits, t_logits, labels = out.logits, t_out.logits, targets.get("labels")
            # Every hidden state (embedding output + each layer), as DistillationLoss expects.
            res = self.loss_fn(list(out.hidden_states), [h.detach() for h in t_out.hidden_states],
                               s_logits, t_logits.detach() if torch.is_tensor(t_logits) else
                               tuple(t.detach() for t in t_logits), labels=labels,
                               attention_mask=inputs.get("attention_mask"))
            loss = res.loss
            aux = mk.aux_loss(self.accelerator.unwrap_model(model) if hasattr(self, "accelerator") else model)
            if aux is not None:
                loss = loss + self.aux_weight * aux
            self.last_parts = {k: getattr(res, k) for k in ("ce", "hidden_mse", "pred")
                               if getattr(res, k, None) is not None}
            return (loss, out) if return_outputs else loss

        def log(self, logs, *args, **kwargs):
            # The loss's parts of the last step, read (one host sync) only when the Trainer logs.
            if "loss" in logs:
                logs.update({f"distill_{k}": round(float(v), 4) for k, v in self.last_parts.items()})
            return super().log(logs, *args, **kwargs)

    return DistillTrainer


def __getattr__(name):
    if name == "DistillTrainer":
        return _make_trainer_class()
    raise AttributeError(name)


def make_loss(task, lam: float, alpha_ce: float, pred_loss: Optional[str], temperature: float,
              mask_padding: bool):
    try:
        from moebert_kernels import DistillationLoss
    except ImportError as e:
        raise ImportError(f"moebert_kernels.DistillationLoss is not available in this install: {e}") from None
    if pred_loss is None:
        pred_loss = "mse" if task.is_regression else "sym_kl"
    return DistillationLoss(lam=lam, alpha_ce=alpha_ce, pred_loss=pred_loss, temperature=temperature,
                            mask_padding=mask_padding)


def build_trainer(args):
    """(trainer, tokenizer, rows) for ``moebert distill``'s arguments; ``run`` trains and saves."""
    from .common import load_config, load_student, load_teacher, load_tokenizer, resolve_device, resolve_precision
    from .common import training_arguments
    from .data import Collator, encode, label_maps, rows_from_args
    from .finetune import fill_defaults
    from .outputs import check_output
    from .tasks import distill_defaults, get_task

    task = get_task(args.task)
    check_output(args.output, {"--teacher": args.teacher, "--student": args.student, "--data": args.data},
                 getattr(args, "overwrite", False), existing_ok=bool(getattr(args, "resume", None)))
    fill_defaults(args, distill_defaults(task.name))
    device = resolve_device(args.device)
    precision = resolve_precision(args.precision, device)
    student = load_student(args.student, task)
    t_config = load_config(args.teacher)
    teacher = load_teacher(args.teacher, task, num_labels=None if task.qa else t_config.num_labels,
                           id2label=getattr(t_config, "id2label", None))
    if not task.qa and teacher.config.num_labels != student.config.num_labels:
        raise ValueError(f"teacher has {teacher.config.num_labels} labels but the student has "
                         f"{student.config.num_labels}: convert the student from this teacher")
    if teacher.config.num_hidden_layers != student.config.num_hidden_layers:
        raise ValueError(f"layer-wise distillation needs as many layers in the teacher "
                         f"({teacher.config.num_hidden_layers}) as in the student ({student.config.num_hidden_layers})")
    tokenizer = load_tokenizer(args.student)
    rows = rows_from_args(task, args)
    feats = encode(tokenizer, task, rows, args.max_length, label_maps(task, rows.labels, student.config),
                   student.config.num_labels)
    student.train()
    loss_fn = make_loss(task, args.lam, args.alpha_ce, args.pred_loss, args.temperature, args.mask_padding)
    targs = training_arguments(args.output, learning_rate=args.learning_rate, batch_size=args.batch_size,
                               epochs=args.epochs, device=device, precision=precision, seed=args.seed,
                               max_steps=args.max_steps, weight_decay=args.weight_decay,
                               warmup_ratio=args.warmup_ratio, save_steps=args.save_steps,
                               logging_steps=args.logging_steps)
    trainer = _make_trainer_class()(model=student, args=targs, data_collator=Collator(tokenizer),
                                    train_dataset=feats, teacher=teacher, loss_fn=loss_fn,
                                    aux_weight=args.aux_weight)
    return trainer, tokenizer, rows


def run(args) -> int:
    from .finetune import train_and_save
    from .tasks import get_task

    task = get_task(args.task)
    trainer, tokenizer, rows = build_trainer(args)
    return train_and_save(trainer, tokenizer, args, f"distilled student ({task.name}, {len(rows)} rows from {rows.source})")
