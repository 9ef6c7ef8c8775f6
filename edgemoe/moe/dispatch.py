"""Dispatch: group a layer's (token, expert) assignments by expert and level.

Shape legend: T tokens, K active experts per token, N assignments of one (expert, level).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Assignment:
    """The tokens one expert serves at one level in one layer."""

    expert: int
    tokens: torch.Tensor  # [N] int64 row indices into x
    weights: torch.Tensor  # [N] float32 combine weights
    level: int = 0  # the level these pairs compute at (0: none given, the executor's own)


_ROW0 = torch.zeros(1, dtype=torch.int64)  # the one token of a single-token call (read only)


def dispatch(
    expert_ids: torch.Tensor, expert_weights: torch.Tensor, levels: torch.Tensor | None = None
) -> list[Assignment]:
    """One Assignment per distinct (expert, level), ascending expert, then ascending level.

    Args:
        expert_ids: [T, K] int64.
        expert_weights: [T, K] float32.
        levels: [T, K] int64 level of each pair (bits.BitPolicy), or None (all level 0).
    """
    t, k = expert_ids.shape
    if t == 1:  # a decode step: its K experts are distinct, each one pair (no sort kernels)
        ids = expert_ids[0].tolist()
        lv = levels[0].tolist() if levels is not None else [0] * k
        row = _ROW0
        return [
            Assignment(ids[j], row, expert_weights[0, j : j + 1], int(lv[j]))
            for j in sorted(range(k), key=lambda j: (ids[j], lv[j]))
        ]
    flat = expert_ids.reshape(-1)  # [T*K]
    if levels is not None:
        lv = levels.reshape(-1).to(torch.int64)  # [T*K]
        span = int(lv.max()) + 1 if lv.numel() else 1
        flat = flat * span + lv  # one sort key: expert, then level
    order = torch.argsort(flat, stable=True)
    sorted_ids = flat[order]
    keys, counts = torch.unique_consecutive(sorted_ids, return_counts=True)
    token_of = order // k  # [T*K] token row of each sorted assignment
    w_sorted = expert_weights.reshape(-1)[order]
    out, start = [], 0
    for key, n in zip(keys.tolist(), counts.tolist(), strict=True):
        e, level = (key // span, key % span) if levels is not None else (key, 0)
        out.append(Assignment(e, token_of[start : start + n], w_sorted[start : start + n], level))
        start += n
    return out
