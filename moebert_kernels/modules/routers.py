"""Top-1 routers. Each is an nn.Module whose state (tables, gate weights) is saved with the model.

Hash routers map token ids to experts through a fixed table and are computed once per
call for every layer (see ``routing_state.RoutingState``); gates are computed inside each layer
from its hidden states.
"""
from __future__ import annotations

import heapq
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..ops.routing import check_expert_ids

__all__ = [
    "ROUTERS",
    "BalancedHashRouter",
    "GateOutput",
    "HashRouter",
    "SentenceGate",
    "TokenGate",
    "switch_load_balancing_loss",
]


def _check_positive(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")


class HashRouter(nn.Module):
    """MoEBERT's main router: a fixed random table from token id to expert.

    Each layer gets its own table (``patch`` seeds layer l with ``seed + l``).
    """

    kind = "hash"

    def __init__(self, vocab_size: int, num_experts: int, seed: int = 0, table: Optional[Tensor] = None):
        super().__init__()
        _check_positive("vocab_size", vocab_size)
        _check_positive("num_experts", num_experts)
        if table is None:
            table = self._draw(0, vocab_size, num_experts, seed)
        else:
            if tuple(table.shape) != (vocab_size,):
                raise ValueError(f"table must be [vocab_size] = ({vocab_size},), got {tuple(table.shape)}")
            if not table.is_meta:  # transformers builds models on the meta device; the checkpoint fills it
                check_expert_ids(table, num_experts)
        self.vocab_size, self.num_experts, self.seed = vocab_size, num_experts, int(seed)
        self.register_buffer("table", table.to(torch.int64).clone())

    @staticmethod
    def _draw(start: int, stop: int, num_experts: int, seed: int) -> Tensor:
        """Experts of token ids ``[start, stop)``: entry v is the v-th draw of a generator seeded with ``seed``,
        so a table grown later holds what a table drawn at the larger size would."""
        gen = torch.Generator().manual_seed(int(seed))
        return torch.randint(0, num_experts, (stop,), generator=gen)[start:]

    def _new_entries(self, start: int, stop: int) -> Tensor:
        return self._draw(start, stop, self.num_experts, getattr(self, "seed", 0))  # pickles of older versions

    def resize(self, vocab_size: int) -> None:
        """Grow or shrink the table to ``vocab_size`` ids (after ``resize_token_embeddings``).

        Kept ids keep their experts; new ids get deterministic ones (``_new_entries``).
        """
        _check_positive("vocab_size", vocab_size)
        old = self.table
        if vocab_size <= old.numel():
            table = old[:vocab_size].clone()
        else:
            table = torch.cat([old, self._new_entries(old.numel(), vocab_size).to(old.device)])
        self.table, self.vocab_size = table, vocab_size

    def forward(self, input_ids: Tensor) -> Tensor:
        """Expert id of every token, same shape as ``input_ids``."""
        if input_ids.dtype not in (torch.int32, torch.int64):
            raise TypeError(f"input_ids must be int32/int64, got {input_ids.dtype}")
        if input_ids.numel():
            self._check_ids(input_ids)
        return self.table[input_ids]

    def _check_ids(self, input_ids: Tensor) -> None:
        fix = ("if the tokenizer has more tokens than the model, call model.resize_token_embeddings(len(tokenizer)) "
               "(it grows the hash tables too)")
        if torch.compiler.is_compiling():
            # No host read while compiling: a graph-safe assert (compiled code would index past the table).
            if not torch.compiler.is_exporting():
                torch._assert_async(((input_ids >= 0) & (input_ids < self.vocab_size)).all(),
                                    f"a token id is outside the vocabulary [0, {self.vocab_size}); {fix}")
            return
        if input_ids.device.type != "cpu":  # a host read would sync; the embedding lookup asserts on device
            return
        lo, hi = int(input_ids.min()), int(input_ids.max())
        if lo < 0 or hi >= self.vocab_size:
            raise ValueError(f"token id {lo if lo < 0 else hi} is outside the vocabulary [0, {self.vocab_size}); "
                             + fix)

    def extra_repr(self) -> str:
        return f"vocab_size={self.vocab_size}, num_experts={self.num_experts}"


class BalancedHashRouter(HashRouter):
    """A hash table balanced by token frequency: greedy, most frequent token first,
    each to the currently least-loaded expert. Unseen tokens are dealt round-robin."""

    kind = "balanced_hash"

    def _new_entries(self, start: int, stop: int) -> Tensor:
        return torch.arange(start, stop) % self.num_experts  # round-robin, as unseen tokens

    @classmethod
    def from_token_counts(cls, token_counts: Tensor, num_experts: int, seed: int = 0) -> "BalancedHashRouter":
        counts = torch.as_tensor(token_counts).flatten()
        if counts.dtype.is_floating_point or counts.dtype == torch.bool:
            raise TypeError(f"token_counts must be integer counts, got {counts.dtype}")
        if counts.numel() == 0 or bool((counts < 0).any()):
            raise ValueError("token_counts must be a non-empty [vocab_size] tensor of non-negative counts")
        _check_positive("num_experts", num_experts)
        gen = torch.Generator().manual_seed(int(seed))
        # A seeded shuffle breaks frequency ties, so each layer's table differs.
        perm = torch.randperm(counts.numel(), generator=gen)
        order = perm[torch.argsort(counts[perm], descending=True, stable=True)].tolist()
        counts_list = counts.tolist()
        table = [0] * counts.numel()
        heap = [(0, e) for e in range(num_experts)]
        unseen = 0
        for tok in order:
            c = counts_list[tok]
            if c == 0:
                table[tok] = unseen % num_experts
                unseen += 1
                continue
            load, e = heapq.heappop(heap)
            table[tok] = e
            heapq.heappush(heap, (load + c, e))
        return cls(counts.numel(), num_experts, seed=seed, table=torch.tensor(table, dtype=torch.int64))


@dataclass
class GateOutput:
    expert_ids: Tensor  # [T] int64
    probs: Tensor  # [T] fp32, the chosen expert's probability
    aux_loss: Tensor  # scalar Switch load-balancing loss


def switch_load_balancing_loss(probs: Tensor, expert_ids: Tensor, mask: Optional[Tensor] = None) -> Tensor:
    """Switch Transformer's N * sum_i f_i * P_i over rows of ``probs`` [n, E]; rows where
    ``mask`` [n] is 0 (padding) count in neither f_i nor P_i."""
    E = probs.shape[-1]
    if probs.shape[0] == 0:
        return probs.new_zeros(())
    w = torch.ones_like(expert_ids, dtype=probs.dtype) if mask is None else mask.to(probs.dtype)
    n = w.sum().clamp_min(1.0)
    f = torch.zeros(E, dtype=probs.dtype, device=probs.device).scatter_add_(0, expert_ids, w) / n
    return E * (f * (probs * w.unsqueeze(-1)).sum(0) / n).sum()


class TokenGate(nn.Module):
    """Learned top-1 gate per token: Linear d->E, fp32 softmax, output scaled by the probability."""

    kind = "token_gate"

    def __init__(self, hidden_size: int, num_experts: int):
        super().__init__()
        _check_positive("hidden_size", hidden_size)
        _check_positive("num_experts", num_experts)
        self.num_experts = num_experts
        self.proj = nn.Linear(hidden_size, num_experts)

    def _route(self, x: Tensor, mask: Optional[Tensor] = None) -> GateOutput:
        # fp32 softmax: bf16 logits make top-1 ties and a noisy balancing loss.
        proj = self.proj
        if isinstance(proj, nn.Linear):
            logits = F.linear(x.float(), proj.weight.float(), proj.bias.float())
        else:  # a Linear swapped in by a tool (quantize_dynamic's) computes its own way
            logits = proj(x.float()).float()
        probs = logits.softmax(-1)
        top_p, top_i = probs.max(-1)
        return GateOutput(top_i, top_p, switch_load_balancing_loss(probs, top_i, mask))

    def forward(self, x: Tensor, mask: Optional[Tensor] = None) -> GateOutput:
        """``x [T, d]``; ``mask [T]`` (1 = real token) keeps padding out of the balancing loss."""
        if x.dim() != 2:
            raise ValueError(f"TokenGate expects [T, d] tokens, got shape {tuple(x.shape)}")
        if mask is not None and tuple(mask.shape) != (x.shape[0],):
            raise ValueError(f"mask must be [T] = ({x.shape[0]},), got {tuple(mask.shape)}")
        return self._route(x, mask)


class SentenceGate(TokenGate):
    """Learned top-1 gate per sequence over the attention-masked mean of its hidden states."""

    kind = "sentence_gate"

    def forward(self, hidden: Tensor, attention_mask: Optional[Tensor] = None) -> GateOutput:
        if hidden.dim() != 3:
            raise ValueError(f"SentenceGate expects [B, S, d] hidden states, got shape {tuple(hidden.shape)}")
        B, S, _ = hidden.shape
        if attention_mask is None:
            pooled = hidden.float().mean(1)
        else:
            if tuple(attention_mask.shape) != (B, S):
                raise ValueError(f"attention_mask must be [B, S] = {(B, S)}, got {tuple(attention_mask.shape)}")
            m = attention_mask.to(torch.float32).unsqueeze(-1)
            pooled = (hidden.float() * m).sum(1) / m.sum(1).clamp_min(1.0)
        out = self._route(pooled)
        return GateOutput(out.expert_ids.repeat_interleave(S), out.probs.repeat_interleave(S), out.aux_loss)


ROUTERS = {cls.kind: cls for cls in (HashRouter, BalancedHashRouter, TokenGate, SentenceGate)}
