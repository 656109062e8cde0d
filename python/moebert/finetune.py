"""``moebert finetune``: fine-tune a dense encoder teacher on a task with the HF Trainer."""
from __future__ import annotations

import json
import os
import re
import sys
import zipfile

from .common import load_teacher, load_tokenizer, resolve_device, resolve_precision, training_arguments
from .data import Collator, encode, label_maps, rows_from_args
from .outputs import check_output
from .tasks import finetune_defaults, get_task

__all__ = ["run", "fill_defaults", "train_and_save", "checkpoints", "checkpoint_problem"]


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


def _check_head_size(path, task, num_labels: int, l2i) -> None:
    """A checkpoint that already has a classifier head of another size cannot be fine-tuned on this data (its
    head would have to be thrown away and drawn anew): say so, instead of transformers' size-mismatch error."""
    from .common import load_config

    config = load_config(path)
    heads = [a for a in (getattr(config, "architectures", None) or []) if a.endswith("ForSequenceClassification")]
    if task.qa or not heads or config.num_labels == num_labels:
        return
    classes = f" ({sorted(l2i, key=l2i.get)})" if l2i else ""
    raise ValueError(f"{path} holds a {heads[0]} with {config.num_labels} labels, but the data of task "
                     f"{task.name!r} has {num_labels} classes{classes}: fine-tune the pretrained encoder it came "
                     f"from (a folder without this classification head), or give data with its "
                     f"{config.num_labels} classes")


def run(args) -> int:
    from .common import trainer_class

    task = get_task(args.task)
    check_output(args.output, {"--model": args.model, "--data": args.data}, getattr(args, "overwrite", False),
                 existing_ok=bool(getattr(args, "resume", None)))
    fill_defaults(args, finetune_defaults(task.name))
    device = resolve_device(args.device)
    precision = resolve_precision(args.precision, device)
    rows = rows_from_args(task, args)
    tokenizer = load_tokenizer(args.model)
    l2i, num_labels, id2label = _label_setup(task, rows, args.model)
    _check_head_size(args.model, task, num_labels, l2i)
    model = load_teacher(args.model, task, num_labels=num_labels, id2label=id2label)
    feats = encode(tokenizer, task, rows, args.max_length, l2i, num_labels)
    targs = training_arguments(args.output, learning_rate=args.learning_rate, batch_size=args.batch_size,
                               epochs=args.epochs, device=device, precision=precision, seed=args.seed,
                               max_steps=args.max_steps, weight_decay=args.weight_decay,
                               warmup_ratio=args.warmup_ratio, save_steps=args.save_steps,
                               logging_steps=args.logging_steps)
    trainer = trainer_class()(model=model, args=targs, data_collator=Collator(tokenizer), train_dataset=feats)
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
    """--resume: True (or ``latest``) finds the newest complete checkpoint-* in the output folder, skipping
    incomplete ones (a run cut off while saving) with a one-line warning each; a path resumes from it."""
    r = getattr(args, "resume", None)
    if r in (None, False, ""):
        return None
    if r is True or r == "latest":
        found = checkpoints(args.output)
        if not found:
            raise ValueError(f"--resume: {args.output} holds no checkpoint-* folder to resume from")
        for path in found:
            problem = checkpoint_problem(path)
            if problem is None:
                return path
            print(f"moebert: warning: skipping incomplete checkpoint {path} ({problem})", file=sys.stderr)
        raise ValueError(f"--resume: every checkpoint in {args.output} is incomplete (see the warnings); "
                         "start afresh without --resume (with --overwrite)")
    if not os.path.isdir(r):
        raise ValueError(f"--resume: checkpoint folder {r} does not exist")
    problem = checkpoint_problem(r)
    if problem is not None:
        raise ValueError(f"--resume: checkpoint {r} is incomplete ({problem}); resume from an older one, or "
                         "give --resume alone to pick the newest complete one")
    return r


def checkpoints(folder: str) -> list[str]:
    """The Trainer's checkpoint-N folders in ``folder``, newest (largest N) first."""
    if not os.path.isdir(folder):
        return []
    steps = [(int(m.group(1)), d) for d in os.listdir(folder)
             if (m := re.fullmatch(r"checkpoint-(\d+)", d)) and os.path.isdir(os.path.join(folder, d))]
    return [os.path.join(folder, d) for _, d in sorted(steps, reverse=True)]


def checkpoint_problem(path: str):
    """Why the checkpoint folder ``path`` cannot be resumed from, or None when it is whole. The Trainer writes
    trainer_state.json last, so a folder without a readable one was cut off mid-write; the weights and the
    torch.save files (zip archives, whose directory sits at the end) are checked for truncation too."""
    try:
        with open(os.path.join(path, "trainer_state.json")) as f:
            json.load(f)
    except FileNotFoundError:
        return "no trainer_state.json"
    except (OSError, ValueError) as e:
        return f"unreadable trainer_state.json: {e}"
    names = os.listdir(path)
    weights = [n for n in names if n.endswith((".safetensors", ".bin")) and n.startswith(("model", "pytorch_model"))]
    if not weights:
        return "no model weights"
    for name in names:
        file = os.path.join(path, name)
        if name.endswith(".safetensors") and not _whole_safetensors(file):
            return f"truncated {name}"
        if name.endswith((".pt", ".pth", ".bin")) and not zipfile.is_zipfile(file):
            return f"truncated {name}"
    return None


def _whole_safetensors(file: str) -> bool:
    """A safetensors file is an 8-byte header size, a JSON header, then exactly the bytes it lists."""
    try:
        size = os.path.getsize(file)
        with open(file, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            if n <= 0 or 8 + n > size:
                return False
            header = json.loads(f.read(n))
    except (OSError, ValueError):
        return False
    end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    return 8 + n + end == size
