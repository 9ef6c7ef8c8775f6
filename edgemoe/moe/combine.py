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
    # index_put_ with accumulate: index_add_ measured 20 ms per call on this CPU for a
    # single row (its parallel path), index_put_ 13 us
    out.index_put_((tokens,), (y.float() * weights[:, None]).to(out.dtype), accumulate=True)
