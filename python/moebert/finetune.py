"""``moebert finetune``: fine-tune a dense encoder teacher on a task with the HF Trainer."""
from __future__ import annotations

import os

from .common import load_teacher, load_tokenizer, resolve_device, resolve_precision, training_arguments
from .data import Collator, encode, label_maps, rows_from_args
from .tasks import finetune_defaults, get_task

__all__ = ["run", "fill_defaults"]


def fill_defaults(args, defaults: dict) -> None:
    for key, value in defaults.items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)


def _label_setup(task, rows, model_path):
    """(label -> id, number of labels, id -> name for the config or None)."""
    from .common import load_config

    l2i = label_maps(task, rows.labels, load_config(model_path))
    if l2i is None:
        return None, task.num_labels, None
    n = max(l2i.values()) + 1
    if task.name != "classification" and n > task.num_labels:
        raise ValueError(f"the data of task {task.name!r} has labels {sorted(l2i)}, more than its "
                         f"{task.num_labels} classes")
    return l2i, (n if task.name == "classification" else task.num_labels), {i: k for k, i in l2i.items()}


def run(args) -> int:
    from transformers import Trainer

    task = get_task(args.task)
    fill_defaults(args, finetune_defaults(task.name))
    device = resolve_device(args.device)
    precision = resolve_precision(args.precision, device)
    rows = rows_from_args(task, args)
    tokenizer = load_tokenizer(args.model)
    l2i, num_labels, id2label = _label_setup(task, rows, args.model)
    model = load_teacher(args.model, task, num_labels=num_labels, id2label=id2label)
    feats = encode(tokenizer, task, rows, args.max_length, l2i, num_labels)
    targs = training_arguments(args.output, learning_rate=args.learning_rate, batch_size=args.batch_size,
                               epochs=args.epochs, device=device, precision=precision, seed=args.seed,
                               max_steps=args.max_steps, weight_decay=args.weight_decay,
                               warmup_ratio=args.warmup_ratio, save_steps=args.save_steps,
                               logging_steps=args.logging_steps)
    trainer = Trainer(model=model, args=targs, data_collator=Collator(tokenizer), train_dataset=feats)
    return train_and_save(trainer, tokenizer, args, f"teacher ({task.name}, {len(rows)} rows from {rows.source})")


def train_and_save(trainer, tokenizer, args, what: str) -> int:
    """Train (resuming when asked), save model and tokenizer once (rank 0), and say where."""
    trainer.train(resume_from_checkpoint=_resume(args))
    trainer.save_model(args.output)
    if trainer.is_world_process_zero():
        tokenizer.save_pretrained(args.output)
        print(f"{what} saved to {args.output}")
    return 0


def _resume(args):
    """--resume: True finds the newest checkpoint-* in the output folder; a path resumes from it."""
    r = getattr(args, "resume", None)
    if r in (None, False, ""):
        return None
    if r is True or r == "latest":
        has = os.path.isdir(args.output) and any(d.startswith("checkpoint-") for d in os.listdir(args.output))
        if not has:
            raise ValueError(f"--resume: {args.output} holds no checkpoint-* folder to resume from")
        return True
    if not os.path.isdir(r):
        raise ValueError(f"--resume: checkpoint folder {r} does not exist")
    return r
