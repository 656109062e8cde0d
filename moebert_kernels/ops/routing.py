"""RoutingPlan: the top-1 token -> expert assignment in the form the kernels consume.

Built once per batch (hash routing: once for all layers, see ``plans_from_expert_ids``)
and reused by both GEMMs, forward and backward. Construction never syncs with the
host, so it is safe inside CUDA-graph capture and ``torch.compile``.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["RoutingPlan", "plans_from_expert_ids", "check_expert_ids"]


def check_expert_ids(expert_ids: torch.Tensor, num_experts: int) -> None:
    """Raise a ValueError for malformed ids.

    The range check reads values. On CPU that is free; on CUDA it would be a host
    sync, so there it becomes a device-side assert (no sync, graph-safe).
    """
    if not isinstance(expert_ids, torch.Tensor):
        raise TypeError(f"expert_ids must be a torch.Tensor, got {type(expert_ids).__name__}")
    if expert_ids.dtype not in (torch.int32, torch.int64, torch.int16, torch.uint8, torch.int8):
        raise TypeError(f"expert_ids must be an integer tensor, got {expert_ids.dtype}")
    if isinstance(num_experts, bool) or not isinstance(num_experts, int) or num_experts < 1:
        raise ValueError(f"num_experts must be a positive int, got {num_experts!r}")
    if expert_ids.numel() == 0:
        return
    if torch.compiler.is_compiling():
        return
    if expert_ids.device.type == "cuda":
        torch._assert_async(((expert_ids >= 0) & (expert_ids < num_experts)).all())
        return
    lo, hi = int(expert_ids.min()), int(expert_ids.max())
    if lo < 0 or hi >= num_experts:
        bad = lo if lo < 0 else hi
        raise ValueError(f"expert id {bad} is outside [0, {num_experts})")


@dataclass(frozen=True)
class RoutingPlan:
    """Top-1 routing of T tokens to E experts.

    Attributes:
        expert_ids: ``[T]`` int64, the expert of each token (token order).
        sorted_token_ids: ``[T]`` int64, token indices grouped by expert, stable
            within an expert (expert order).
        expert_counts: ``[E]`` int64 tokens per expert.
        expert_offsets: ``[E+1]`` int64 exclusive prefix sum of counts; expert e owns
            ``sorted_token_ids[offsets[e]:offsets[e+1]]``.
        inverse: ``[T]`` int64, position of each token in expert order
            (``sorted_token_ids[inverse] == arange(T)``).
        num_experts: E.
    """

    expert_ids: torch.Tensor
    sorted_token_ids: torch.Tensor
    expert_counts: torch.Tensor
    expert_offsets: torch.Tensor
    inverse: torch.Tensor
    num_experts: int

    @property
    def num_tokens(self) -> int:
        return self.expert_ids.shape[0]

    @property
    def device(self) -> torch.device:
        return self.expert_ids.device

    @classmethod
    def from_expert_ids(cls, expert_ids: torch.Tensor, num_experts: int, validate: bool = True) -> "RoutingPlan":
        if isinstance(expert_ids, torch.Tensor) and expert_ids.dim() != 1:
            raise ValueError(f"expert_ids must be 1-D [T], got shape {tuple(expert_ids.shape)}")
        if validate:
            check_expert_ids(expert_ids, num_experts)
        return plans_from_expert_ids(expert_ids.unsqueeze(0), num_experts, validate=False)[0]

    def to(self, device: torch.device | str) -> "RoutingPlan":
        return RoutingPlan(
            *(t.to(device) for t in (self.expert_ids, self.sorted_token_ids, self.expert_counts,
                                      self.expert_offsets, self.inverse)),
            num_experts=self.num_experts,
        )


def plans_from_expert_ids(expert_ids: torch.Tensor, num_experts: int, validate: bool = True) -> list[RoutingPlan]:
    """Plans for L layers at once from ``[L, T]`` ids: one sort, one histogram."""
    if expert_ids.dim() != 2:
        raise ValueError(f"expert_ids must be [L, T], got shape {tuple(expert_ids.shape)}")
    if validate:
        check_expert_ids(expert_ids, num_experts)
    ids = expert_ids.long()
    L, T = ids.shape
    # stable=True keeps token order inside an expert, which makes plans deterministic.
    _, order = torch.sort(ids, dim=1, stable=True)
    # scatter_add instead of bincount: bincount's output size depends on the data.
    counts = torch.zeros(L, num_experts, dtype=torch.int64, device=ids.device)
    counts.scatter_add_(1, ids, torch.ones_like(ids))
    # No out= into a strided view: with L > 1 it is non-contiguous, which torch.compile and export reject.
    offsets = torch.nn.functional.pad(counts.cumsum(1), (1, 0))
    inverse = torch.empty_like(order)
    inverse.scatter_(1, order, torch.arange(T, device=ids.device).expand(L, T))
    return [RoutingPlan(ids[i], order[i], counts[i], offsets[i], inverse[i], num_experts) for i in range(L)]
