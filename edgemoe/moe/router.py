"""Routers: router logits -> (expert ids, combine weights) per token.

Shape legend: T tokens, E experts, K active experts per token, G groups.
All routing runs in float32, as the reference implementations do.
"""

from __future__ import annotations

import torch


def softmax_topk(
    logits: torch.Tensor, k: int, normalize: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax over all experts, keep the top k, optionally renormalise them to sum 1.

    Mixtral (normalize=True), Qwen2/3-MoE and OLMoE (normalize=norm_topk_prob).

    Args:
        logits: [T, E] router logits.
    Returns:
        ids [T, K] int64, weights [T, K] float32.
    """
    probs = torch.softmax(logits.float(), dim=-1)  # [T, E]
    w, ids = torch.topk(probs, k, dim=-1)  # [T, K]
    if normalize:
        w = w / w.sum(dim=-1, keepdim=True)
    return ids, w
