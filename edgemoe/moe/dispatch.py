"""Dispatch: group a layer's (token, expert) assignments by expert.

Shape legend: T tokens, K active experts per token, N assignments of one expert.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Assignment:
    """The tokens one expert serves in one layer."""

    expert: int
    tokens: torch.Tensor  # [N] int64 row indices into x
    weights: torch.Tensor  # [N] float32 combine weights


def dispatch(expert_ids: torch.Tensor, expert_weights: torch.Tensor) -> list[Assignment]:
    """One Assignment per distinct expert, in ascending expert order.

    Args:
        expert_ids: [T, K] int64.
        expert_weights: [T, K] float32.
    """
    t, k = expert_ids.shape
    flat = expert_ids.reshape(-1)  # [T*K]
    order = torch.argsort(flat, stable=True)
    sorted_ids = flat[order]
    experts, counts = torch.unique_consecutive(sorted_ids, return_counts=True)
    token_of = order // k  # [T*K] token row of each sorted assignment
    w_sorted = expert_weights.reshape(-1)[order]
    out, start = [], 0
    for e, n in zip(experts.tolist(), counts.tolist(), strict=True):
        out.append(Assignment(e, token_of[start : start + n], w_sorted[start : start + n]))
        start += n
    return out
