"""``moebert importance``: MoEBERT's neuron importance of every FFN neuron.

For layer l and neuron j, with ``w1_j`` the j-th row of W1 [d_ff, d] and ``w2_j`` the
j-th column of W2 [d, d_ff]:

    I_j = sum over examples i of | w1_j . dL_i/dw1_j + w2_j . dL_i/dw2_j |

The absolute value is taken per example, so the per-example gradients must not be summed
first. Writing ``pre = W1 x + b1`` (per token t) and ``a = act(pre)``,

    dL_i/dw1_j = sum_t g_pre[t, j] x_t     ->  w1_j . dL_i/dw1_j = sum_t g_pre[t, j] (pre[t, j] - b1_j)
    dL_i/dw2_j = sum_t g_y[t] a[t, j]       ->  w2_j . dL_i/dw2_j = sum_t a[t, j] (W2^T g_y[t])_j
                                                                   = sum_t a[t, j] g_a[t, j]

where the sums run over example i's tokens and g_* = dL_i/d*. A gated FFN (ModernBERT:
``Wo (act(a) * g)``, ``[a; g] = Wi x``) has three weight groups per neuron, rows j and d_ff + j
of Wi and column j of Wo; the sum inside the absolute value takes all three, the two Wi terms
being ``sum_t g_pre[t, j] (pre[t, j] - b_j)`` over the a and the g halves of ``pre``. Tokens of
different examples never mix in these encoders, so with L = sum_i L_i one backward pass gives
every example's g_pre and g_a at once. Forward hooks keep ``pre`` (the output of fc1) and ``a`` (the input of fc2),
``autograd.grad`` returns their gradients without touching parameter ``.grad``, and the two
products are summed per example, made absolute and added up. Padding tokens get zero
gradient (nothing attends to them and the loss reads [CLS] or the answer span only).
"""
from __future__ import annotations

import os
from typing import Iterable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["ffn_is_gated", "ffn_linears", "importance_scores", "per_example_loss_sum", "save_importance",
           "load_importance", "run"]


def ffn_linears(model: nn.Module) -> list[tuple[nn.Linear, nn.Linear]]:
    """(fc1, fc2) of every layer of a dense model of any family ``moebert_kernels.patch`` takes
    (fc1 has 2 d_ff rows, a then g, when the FFN is gated: see ``ffn_is_gated``)."""
    return _dense_ffn(model)[0]


def ffn_is_gated(model: nn.Module) -> bool:
    return _dense_ffn(model)[1]


def _dense_ffn(model: nn.Module) -> tuple[list[tuple[nn.Linear, nn.Linear]], bool]:
    from moebert_kernels import SUPPORTED_MODEL_TYPES, moe_layers
    from moebert_kernels.hf import dense_ffn_linears

    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(f"importance supports model types {list(SUPPORTED_MODEL_TYPES)}, got {model_type!r}")
    if moe_layers(model):
        raise ValueError("importance is computed on the dense teacher, but this model is already MoEBERT")
    return dense_ffn_linears(model)


def per_example_loss_sum(outputs, batch: dict, num_labels: int) -> Tensor:
    """Sum over the batch of each example's own loss (mean-reduced per example, as a batch of one)."""
    def up(t: Tensor) -> Tensor:  # fp16/bf16 logits -> fp32; fp32/fp64 stay as they are
        return t.float() if t.element_size() < 4 else t

    if "start_positions" in batch:
        s = F.cross_entropy(up(outputs.start_logits), batch["start_positions"], reduction="sum")
        e = F.cross_entropy(up(outputs.end_logits), batch["end_positions"], reduction="sum")
        return (s + e) / 2
    logits, labels = up(outputs.logits), batch["labels"]
    if num_labels == 1:
        return F.mse_loss(logits.squeeze(-1), labels.to(logits.dtype), reduction="sum")
    return F.cross_entropy(logits, labels, reduction="sum")


def importance_scores(model: nn.Module, batches: Iterable[dict], progress: bool = False,
                      total: Optional[int] = None) -> tuple[Tensor, int]:
    """``([L, d_ff] float64 importance, number of examples)`` over ``batches`` (dicts of tensors
    on the model's device, with labels). One forward and one backward per batch."""
    pairs, gated = _dense_ffn(model)
    num_labels = model.config.num_labels
    saved: dict = {}
    handles = []
    for l, (fc1, fc2) in enumerate(pairs):
        handles.append(fc1.register_forward_hook(lambda m, i, o, l=l: saved.__setitem__(("pre", l), o)))
        handles.append(fc2.register_forward_hook(lambda m, i, o, l=l: saved.__setitem__(("act", l), i[0])))
    d_ff = pairs[0][1].in_features
    scores = torch.zeros(len(pairs), d_ff, dtype=torch.float64, device=pairs[0][0].weight.device)
    seen = 0
    was_training = model.training
    model.eval()  # no dropout: the score is of the model as it predicts
    it = batches
    if progress:
        from tqdm.auto import tqdm

        it = tqdm(batches, total=total, desc="importance", unit="batch")
    try:
        for batch in it:
            saved.clear()
            inputs = {k: v for k, v in batch.items() if k not in ("labels", "start_positions", "end_positions")}
            outputs = model(**inputs)
            loss = per_example_loss_sum(outputs, batch, num_labels)
            tensors = [saved[(kind, l)] for l in range(len(pairs)) for kind in ("pre", "act")]
            grads = torch.autograd.grad(loss, tensors, allow_unused=True)
            B = batch["input_ids"].shape[0]
            for l, (fc1, _) in enumerate(pairs):
                pre, act = tensors[2 * l], tensors[2 * l + 1]
                g_pre, g_act = grads[2 * l], grads[2 * l + 1]
                g_pre = torch.zeros_like(pre) if g_pre is None else g_pre
                g_act = torch.zeros_like(act) if g_act is None else g_act
                w1x = pre.detach() - fc1.bias.detach() if fc1.bias is not None else pre.detach()
                up_terms = g_pre * w1x  # [B, S, d_ff], or [B, S, 2 d_ff] gated: the a and g rows of neuron j
                if gated:
                    up_terms = up_terms[..., :d_ff] + up_terms[..., d_ff:]
                per_tok = up_terms + act.detach() * g_act  # [B, S, d_ff]
                per_example = per_tok.reshape(B, -1, d_ff).sum(1, dtype=torch.float64)
                scores[l] += per_example.abs().sum(0)
            seen += B
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return scores, seen


def save_importance(path: str, scores: Tensor, metadata: dict) -> None:
    from safetensors.torch import save_file

    from .outputs import replaced_file

    with replaced_file(path) as tmp:
        save_file({"importance": scores.float().cpu().contiguous()}, tmp,
                  metadata={k: str(v) for k, v in metadata.items()})


def load_importance(path: str, num_layers: Optional[int] = None, d_ff: Optional[int] = None) -> Tensor:
    """The ``[L, d_ff]`` importance saved by ``moebert importance``, shape-checked against the model."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if not os.path.isfile(path):
        raise FileNotFoundError(f"importance file {path} does not exist")
    try:
        tensors = load_file(path)
    except (SafetensorError, OSError, ValueError) as e:
        raise ValueError(f"{path} is not a safetensors importance file: {e}") from None
    if "importance" not in tensors:
        raise ValueError(f"{path} holds no 'importance' tensor (keys: {sorted(tensors)})")
    scores = tensors["importance"]
    if num_layers is not None and tuple(scores.shape) != (num_layers, d_ff):
        raise ValueError(f"importance in {path} has shape {tuple(scores.shape)}, but the model needs "
                         f"[num_layers, d_ff] = ({num_layers}, {d_ff}); was it computed on another model?")
    return scores


def run(args) -> int:
    from torch.utils.data import DataLoader

    from .common import load_teacher, load_tokenizer, resolve_device
    from .data import Collator, encode, label_maps, rows_from_args
    from .tasks import get_task

    from .common import load_config
    from .outputs import check_output

    task = get_task(args.task)
    check_output(args.output, {"--model": args.model, "--data": args.data}, getattr(args, "overwrite", False))
    device = resolve_device(args.device)

    config = load_config(args.model)
    if not task.qa:
        n = config.num_labels
        if task.name != "classification" and n != task.num_labels:
            raise ValueError(f"{args.model} has {n} labels; task {task.name!r} has {task.num_labels}")
    model = load_teacher(args.model, task, num_labels=None if task.qa else config.num_labels, device=device,
                         id2label=getattr(config, "id2label", None))
    tokenizer = load_tokenizer(args.model)
    rows = rows_from_args(task, args)
    feats = encode(tokenizer, task, rows, args.max_length or 128, label_maps(task, rows.labels, model.config),
                   model.config.num_labels)
    loader = DataLoader(feats, batch_size=args.batch_size, shuffle=False, collate_fn=Collator(tokenizer))
    batches = ({k: v.to(device) for k, v in b.items()} for b in loader)
    scores, n = importance_scores(model, batches, progress=not args.quiet, total=len(loader))
    save_importance(args.output, scores, {"task": task.name, "split": args.split, "examples": n,
                                          "model_type": model.config.model_type, "source": rows.source})
    print(f"importance [{scores.shape[0]}, {scores.shape[1]}] over {n} {args.split} examples saved to {args.output}")
    return 0
