"""Combine: weighted sum of expert outputs back into token order.

Shape legend: T tokens, N tokens of one expert, D hidden.
"""

from __future__ import annotations

import torch


def combine_into(
    out: torch.Tensor, tokens: torch.Tensor, y: torch.Tensor, weights: torch.Tensor
) -> None:
    """out[tokens] += weights * y, in place.

    Args:
        out: [T, D] accumulator (float32 keeps the sum order-insensitive enough).
        tokens: [N] rows of out.
        y: [N, D] expert output.
        weights: [N] combine weights.
    """
    out.index_add_(0, tokens, (y.float() * weights[:, None]).to(out.dtype))
