"""``moebert convert``: dense teacher + importance -> MoEBERT student (``save_pretrained``)."""
from __future__ import annotations

__all__ = ["convert", "run"]


def convert(model, importance=None, num_experts: int = 4, expert_size=None, shared=None,
            router: str = "hash", seed: int = 0, token_counts=None):
    """Patch ``model`` in place (see ``moebert_kernels.patch``, which fills in the default sizes);
    ``importance`` is ``[L, d_ff]``."""
    import moebert_kernels as mk

    return mk.patch(model, num_experts=num_experts, expert_size=expert_size, shared=shared,
                    importance=importance, router=router, seed=seed,
                    token_counts=token_counts)


def _token_counts(tokenizer, task, rows, vocab_size):
    import torch

    from .data import encode

    counts = torch.zeros(vocab_size, dtype=torch.int64)
    for f in encode(tokenizer, task, rows, 512):
        counts += torch.bincount(torch.tensor(f["input_ids"]), minlength=vocab_size)[:vocab_size]
    return counts


def run(args) -> int:
    from moebert_kernels import default_expert_sizes

    from .common import load_config, load_teacher, load_tokenizer
    from .importance import ffn_linears, load_importance
    from .tasks import get_task

    task = get_task(args.task)
    config = load_config(args.model)
    model = load_teacher(args.model, task, num_labels=None if task.qa else config.num_labels,
                         id2label=getattr(config, "id2label", None))
    pairs = ffn_linears(model)
    d_ff = pairs[0][0].out_features
    expert_size, shared = default_expert_sizes(d_ff, args.expert_size, args.shared)
    importance = None
    if args.importance:
        importance = load_importance(args.importance, len(pairs), d_ff)
    elif not args.no_importance:
        raise ValueError("convert needs --importance FILE (from `moebert importance`); pass --no-importance "
                         "to keep the dense neuron order instead")
    token_counts = None
    if args.router == "balanced_hash":
        from .data import load_rows

        tokenizer = load_tokenizer(args.model)
        rows = load_rows(task, "train", args.data, args.text_column, args.label_column, args.split_column,
                         args.max_rows, require_labels=False)
        token_counts = _token_counts(tokenizer, task, rows, model.config.vocab_size)
    convert(model, importance, args.num_experts, expert_size, shared, args.router, args.seed, token_counts)
    model.save_pretrained(args.output)
    load_tokenizer(args.model).save_pretrained(args.output)
    print(f"MoEBERT student ({args.num_experts} experts x {expert_size} neurons, {shared} shared, "
          f"{args.router} routing) saved to {args.output}")
    return 0
