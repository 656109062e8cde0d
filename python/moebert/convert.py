"""``moebert convert``: dense teacher + importance -> MoEBERT student (``save_pretrained``).

``--baseline pruned`` instead keeps the top ``--expert-size`` neurons of every FFN, ranked by the
same importance through the same slicing code as the experts (``expert_neuron_ids`` with one
expert and nothing shared), and saves a plain dense model whose ``intermediate_size`` is that
width: the same active FFN width as the MoE student, the same FLOPs per token, no routing. It
loads with stock ``AutoModelFor*.from_pretrained`` and distils with ``moebert distill``.
"""
from __future__ import annotations

from .common import PRUNED_KEY

__all__ = ["convert", "prune", "PRUNED_KEY", "run"]

# config field holding the FFN width, per model family
_FFN_WIDTH = {"distilbert": "hidden_dim"}  # every other supported family: intermediate_size


def convert(model, importance=None, num_experts: int = 4, expert_size=None, shared=None,
            router: str = "hash", seed: int = 0, token_counts=None, tie_shared: bool = False):
    """Patch ``model`` in place (see ``moebert_kernels.patch``, which fills in the default sizes);
    ``importance`` is ``[L, d_ff]``."""
    import moebert_kernels as mk

    return mk.patch(model, num_experts=num_experts, expert_size=expert_size, shared=shared,
                    importance=importance, router=router, seed=seed,
                    token_counts=token_counts, tie_shared=tie_shared)


def prune(model, importance=None, width: int = 768):
    """A new dense model: ``model`` with each FFN cut to its top ``width`` neurons by ``importance``
    (``[L, d_ff]``; None keeps the first ``width``). ``model`` itself is left as it was."""
    import moebert_kernels as mk
    import torch

    from .importance import ffn_linears

    pairs = ffn_linears(model)
    d_ff = pairs[0][1].in_features  # fc2's width: a gated fc1 holds 2 d_ff rows (a, then g)
    gated = pairs[0][0].out_features == 2 * d_ff
    if importance is not None and tuple(importance.shape) != (len(pairs), d_ff):
        raise ValueError(f"importance must be [num_layers, d_ff] = {(len(pairs), d_ff)}, got {tuple(importance.shape)}")
    names = {id(m): n for n, m in model.named_modules()}
    state = dict(model.state_dict())
    for l, (fc1, fc2) in enumerate(pairs):
        keep = mk.expert_neuron_ids(None if importance is None else importance[l], d_ff, 1, width, 0)[0]
        n1, n2 = names[id(fc1)], names[id(fc2)]
        rows = torch.cat([keep, keep + d_ff]) if gated else keep
        state[f"{n1}.weight"] = fc1.weight.detach()[rows]
        if fc1.bias is not None:
            state[f"{n1}.bias"] = fc1.bias.detach()[rows]
        state[f"{n2}.weight"] = fc2.weight.detach()[:, keep]
    config = type(model.config).from_dict(model.config.to_dict())
    setattr(config, _FFN_WIDTH.get(config.model_type, "intermediate_size"), width)
    setattr(config, PRUNED_KEY, {"d_ff": d_ff, "width": width,
                                 "ranking": "dense order" if importance is None else "importance"})
    pruned = type(model)(config).to(device=fc1.weight.device, dtype=fc1.weight.dtype)
    with torch.no_grad():
        pruned.load_state_dict(state, strict=True)
    pruned.train(model.training)
    return pruned


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
    from .outputs import check_output, replaced_folder
    from .tasks import get_task

    task = get_task(args.task)
    check_output(args.output, {"--model": args.model, "--importance": args.importance, "--data": args.data},
                 getattr(args, "overwrite", False))
    config = load_config(args.model)
    model = load_teacher(args.model, task, num_labels=None if task.qa else config.num_labels,
                         id2label=getattr(config, "id2label", None))
    pairs = ffn_linears(model)
    d_ff = pairs[0][1].in_features  # fc2's width: fc1 holds 2 d_ff rows when the FFN is gated
    baseline = getattr(args, "baseline", None)
    if baseline is not None and (args.num_experts is not None or args.shared is not None or args.router != "hash"
                                 or getattr(args, "tie_shared", None) is not None):
        raise ValueError("--baseline pruned keeps the top --expert-size neurons of each FFN in one dense FFN; "
                         "--num-experts, --shared, --router and --tie-shared do not apply to it")
    num_experts = 4 if args.num_experts is None else args.num_experts
    if baseline is not None:
        expert_size, shared = args.expert_size or d_ff // 4, 0
    else:
        expert_size, shared = default_expert_sizes(d_ff, args.expert_size, args.shared)
    importance = None
    if args.importance:
        importance = load_importance(args.importance, len(pairs), d_ff)
    elif not args.no_importance:
        raise ValueError("convert needs --importance FILE (from `moebert importance`); pass --no-importance "
                         "to keep the dense neuron order instead")
    if baseline == "pruned":
        with replaced_folder(args.output) as tmp:
            prune(model, importance, expert_size).save_pretrained(tmp)
            load_tokenizer(args.model).save_pretrained(tmp)
        print(f"pruned dense baseline (FFN {expert_size} of {d_ff} neurons, "
              f"{'importance-ranked' if importance is not None else 'dense order'}) saved to {args.output}")
        return 0
    token_counts = None
    if args.router == "balanced_hash":
        from .data import load_rows

        tokenizer = load_tokenizer(args.model)
        rows = load_rows(task, "train", args.data, args.text_column, args.label_column, args.split_column,
                         args.max_rows, require_labels=False)  # token counts need the texts only, not labels
        token_counts = _token_counts(tokenizer, task, rows, model.config.vocab_size)
    # Tied by default: within 0.4 points of the copied layout in every cell of the quality study (README).
    tie = getattr(args, "tie_shared", None) is not False
    convert(model, importance, num_experts, expert_size, shared, args.router, args.seed, token_counts, tie)
    with replaced_folder(args.output) as tmp:
        model.save_pretrained(tmp)
        load_tokenizer(args.model).save_pretrained(tmp)
    layout = "stored once as a shared FFN" if tie else "copied into every expert"
    print(f"MoEBERT student ({num_experts} experts x {expert_size} neurons, {shared} shared ({layout}), "
          f"{args.router} routing) saved to {args.output}")
    return 0
